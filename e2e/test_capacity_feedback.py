"""A GPU slower than the operator's model of it: measured SLO breaches correct the capacity model, end to end.

The fleet emulator runs every H100 engine ``SLOWDOWN`` times slower than the performance model
(``emulate-fleet --slowdown H100-SXM=3``: throttled or mis-catalogued GPUs); Llama-3.1-8B may use only the
H100 pool at TP 1, and the Azure conversation trace is replayed at a constant ``RATE`` x its rate. The operator
plans from its model, so its H100 replicas run over their real capacity and the request rate never changes:
no load trigger can help. Within ``DEADLINE_S`` of the load it must

1. post a Warning Event ``CapacityCorrected`` naming the H100 island, and say so in the Planned condition;
2. run more H100 replicas than the plan it made from the measured workload before the correction;
3. and the replayer's SLO attainment over the last minute of the replay is >= 0.8.

Trace: ``../shared/data/traces/AzureLLMInferenceTrace_conv.csv`` (Azure LLM inference trace, Patel et al.,
"Splitwise", ISCA 2024, CC-BY-4.0). Logs: ``<cluster work dir>/capfb/``.
"""

from __future__ import annotations

import json
import time

import pytest

from loop_support import MODEL, TRACE, TRACE_RPS, LoadThread, loop_environment, plan_shape
from operator_fixtures import condition, get_md, wait_for

SLOWDOWN = 3.0
RATE = 1.5
T_LOAD = 300
DEADLINE_S = 180
OP_ARGS = ["--timer-interval", "2", "--cooldown", "30", "--plan-time-limit", "5"]
OP_ENV = {"ARCHIPELAGO_METRICS_WINDOW_S": "30", "ARCHIPELAGO_METRICS_INTERVAL_S": "5",
          "ARCHIPELAGO_SCALE_DOWN_WINDOW_S": "60", "ARCHIPELAGO_DRAIN_S": "20",
          "ARCHIPELAGO_METRICS_SHAPE_WINDOW_S": "120"}

pytestmark = [pytest.mark.skipif(not TRACE.is_file(), reason=f"needs the Azure trace at {TRACE}")]


def _h100_only(md: dict) -> None:
    md["spec"]["placement"] = {"allowedPools": ["h100"], "tensorParallel": [1]}


def _h100_replicas(md: dict) -> int:
    return sum(r for gpu, _, r in plan_shape(md) if gpu.startswith("H100"))


def test_slower_gpus_than_modelled_are_corrected_from_measured_latency(cluster, api):
    with loop_environment(cluster, api, name="capfb", op_args=OP_ARGS, op_env=OP_ENV, hint_rps=TRACE_RPS * RATE,
                          fleet_args=["--slowdown", f"H100-SXM={SLOWDOWN}"], patch_model=_h100_only) as env:
        custom, core, ns = env["custom"], env["core"], env["ns"]
        endpoints = env["work"] / "emulator" / "endpoints.json"
        wait_for(lambda: plan_shape(get_md(custom, ns, MODEL)), 120, "a first plan from the workload hint")
        wait_for(lambda: endpoints.is_file() and any(json.loads(endpoints.read_text())["services"].values()), 120,
                 "the fleet emulator serving the first pods")
        slo = env["slo"]
        load = LoadThread(env["kubeconfig"], ns, endpoints, [(T_LOAD, RATE)], slo["ttft"]["seconds"],
                          slo["tpot"]["seconds"]).start()
        history: list[tuple[float, tuple, str]] = []
        t_fix = events = before = None
        try:
            def sample() -> dict:
                md = get_md(custom, ns, MODEL)
                history.append((load.elapsed(), plan_shape(md), ((md.get("status") or {}).get("observed") or {})
                                .get("source", "")))
                return md

            def corrected() -> list:
                evs = core.list_namespaced_event(ns, field_selector=f"involvedObject.name={MODEL}").items
                return [e for e in evs if e.reason == "CapacityCorrected"]

            # the plan made from the measured workload (what the performance model believes)
            wait_for(lambda: sample() and history[-1][2] == "prometheus", 90, "observed.source == prometheus")
            modelled = _h100_replicas(sample())
            assert modelled >= 1
            events = wait_for(lambda: sample() and corrected(), DEADLINE_S - load.elapsed(),
                              f"a CapacityCorrected Event within {DEADLINE_S}s of the load")
            t_fix = load.elapsed()
            before = load.attainment(20, t_fix)
            assert all(e.type == "Warning" for e in events)
            assert any("h100/tp1" in (e.message or "") and "modelled capacity scaled by" in (e.message or "")
                       for e in events), [e.message for e in events]
            md = wait_for(lambda: (lambda m: _h100_replicas(m) > modelled and m)(sample()), 60,
                          f"more than the modelled {modelled} H100 replicas after the correction")
            msg = (condition(md, "Planned") or {}).get("message", "")
            assert "capacity corrected after measured SLO breaches: h100/tp1 x" in msg, msg
            while load.elapsed() < T_LOAD - 1:
                sample()
                time.sleep(2)
            late = load.attainment(T_LOAD - 60, T_LOAD)
            assert late is not None and late >= 0.8, f"attainment over the last minute: {late}"
        finally:
            load.stop()
            load.save(env["work"] / "capfb-history.json", history=history, t_fix=t_fix,
                      attainment_before_fix=before, events=[e.message for e in events or []])
        assert load.error is None, load.error
        print(f"\nH100 x{SLOWDOWN} slower than modelled: {modelled} replica(s) planned from the model (attainment "
              f"{before}), corrected {t_fix:.0f}s into the load, now {_h100_replicas(get_md(custom, ns, MODEL))}; "
              f"attainment over the last minute {late:.3f}")
