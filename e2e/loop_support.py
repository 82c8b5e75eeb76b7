"""Shared set-up of the load-driven e2e scenarios (``test_loop.py``, ``test_capacity_feedback.py``).

:func:`loop_environment` starts Prometheus (file_sd over the fleet emulator's targets, 2 s scrape), the
fleet emulator (subprocess scoped to a fresh namespace, stopped by PID) and the operator
(``--prometheus-url``), then applies the sample GPU pools, the ``interactive`` ServingSLO and one
ModelDeployment; :class:`LoadThread` replays the Azure conversation trace through the routing ConfigMap
(Patel et al., "Splitwise", ISCA 2024; CC-BY-4.0; read from ``../shared/data/traces/``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

import prometheus as prom
from operator_fixtures import OperatorProcess, apply_custom, load_samples, stop_process

REPO = Path(__file__).resolve().parents[1]
TRACE = REPO.parent / "shared" / "data" / "traces" / "AzureLLMInferenceTrace_conv.csv"
MODEL = "llama-3-1-8b"
#: the conversation trace's mean arrival rate at 1x over the replayed window, req/s
TRACE_RPS = 5.4


class LoadThread:
    """Runs a :class:`~archipelago.emulate.replay.Replayer` over a phased trace in a background thread."""

    def __init__(self, kubeconfig: Path, ns: str, endpoints: Path, phases: list[tuple[float, float]],
                 ttft_s: float, tpot_s: float, model: str = MODEL) -> None:
        from kubernetes import config

        from archipelago.decide.sim import SLOTarget
        from archipelago.decide.traces import load_azure_csv
        from archipelago.emulate.replay import FileEndpoints, Replayer, phased_trace, routing_from_configmap

        api = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
        trace = phased_trace(load_azure_csv(TRACE), phases, start_s=60.0)
        self.windows: list = []
        self.replayer = Replayer(trace, lambda: routing_from_configmap(api, ns, f"{model}-routing"),
                                 FileEndpoints(endpoints), slo=SLOTarget(ttft_s=ttft_s, tpot_s=tpot_s),
                                 window_s=10.0, on_window=self.windows.append, timeout_s=120)
        self.t0 = time.monotonic()
        self.result = None
        self.error: BaseException | None = None
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._stop = asyncio.Event()
        try:
            self.result = self._loop.run_until_complete(self.replayer.run(self._stop))
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def start(self) -> LoadThread:
        self.t0 = time.monotonic()
        self.thread.start()
        return self

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(60)

    def save(self, path: Path, **extra: Any) -> None:
        """Write ``extra`` and the replayer's per-window summaries (``windows``) to ``path`` as JSON."""
        path.write_text(json.dumps(extra | {"windows": [w.summary | {"end_s": w.end_s, "sent": w.sent}
                                                         for w in self.windows]}, indent=1, default=str))

    def attainment(self, since_s: float, until_s: float | None = None) -> float | None:
        """Attainment over requests finished between ``since_s`` and ``until_s`` (replay seconds)."""
        from archipelago.emulate.replay import summarize

        recs = [r for r in self.replayer.records if r.status != "pending" and r.done_s >= since_s
                and (until_s is None or r.done_s < until_s)]
        return summarize(recs, self.replayer.slo)["attainment"] if recs else None


def plan_gpus(md: dict) -> int:
    plan = (md.get("status") or {}).get("plan") or {}
    return sum(int(i["replicas"]) * int(i["tp"]) for i in plan.get("islands") or [])


def plan_cost(md: dict) -> float:
    """Predicted $/h of the current plan: the planner's measure of capacity bought (scale-out or a change
    to larger islands both raise it; the planner minimises it subject to the SLO)."""
    plan = (md.get("status") or {}).get("plan") or {}
    return float((plan.get("predicted") or {}).get("dollarsPerHour") or 0.0)


def plan_shape(md: dict) -> tuple:
    """The islands of the current plan as sorted (gpu, tp, replicas)."""
    plan = (md.get("status") or {}).get("plan") or {}
    return tuple(sorted((i["gpu"], int(i["tp"]), int(i["replicas"])) for i in plan.get("islands") or []))


def plan_id(md: dict) -> str:
    return ((md.get("status") or {}).get("plan") or {}).get("planId", "")


@contextlib.contextmanager
def loop_environment(cluster: Any, api: Any, *, name: str, op_args: Sequence[str], op_env: dict[str, str],
                     hint_rps: float, fleet_args: Sequence[str] = (),
                     patch_model: Callable[[dict], None] | None = None) -> Iterator[dict[str, Any]]:
    """Prometheus + fleet emulator + operator + a namespace ``<name>-<hex>`` with the pools, SLO and :data:`MODEL`.

    Args:
        cluster / api: the session's cluster handle and API client (conftest fixtures).
        name: work directory under the cluster's (logs, Prometheus data, targets) and namespace prefix.
        op_args / op_env: operator command-line arguments and environment (``--prometheus-url`` is added).
        hint_rps: the model's ``spec.workloadHint.requestsPerSecond`` (the first plan, before metrics).
        fleet_args: extra ``emulate-fleet`` arguments (e.g. ``--slowdown H100-SXM=1.8``).
        patch_model: edits the ModelDeployment dict before it is applied.

    Yields:
        ``{"core", "custom", "apps", "ns", "work", "prom", "operator", "fleet", "slo", "kubeconfig"}``.
    """
    work = cluster.work_dir / name
    work.mkdir(parents=True, exist_ok=True)
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    p = prom.start_prometheus(work, scrape_interval="2s")
    ns = f"{name}-{secrets.token_hex(3)}"
    fleet_log = open(work / "fleet-emulator.log", "ab")  # noqa: SIM115 - closed below
    fleet = subprocess.Popen(
        [sys.executable, "-m", "archipelago.cli_emulate", "emulate-fleet", "--run-dir", str(work),
         "--kubeconfig", str(cluster.kubeconfig), "--poll", "1", "--namespace", ns, *fleet_args],
        stdout=fleet_log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    op = OperatorProcess(cluster.kubeconfig, work, [*op_args, "--prometheus-url", p.url], env=op_env)
    try:
        op.start()
        core.create_namespace({"metadata": {"name": ns}})
        slo_doc = None
        for obj in load_samples(ns):
            if obj["kind"] == "GPUPool" or (obj["kind"] == "ServingSLO" and obj["metadata"]["name"] == "interactive"):
                apply_custom(custom, obj)
                if obj["kind"] == "ServingSLO":
                    slo_doc = obj
            elif obj["kind"] == "ModelDeployment" and obj["metadata"]["name"] == MODEL:
                obj["spec"]["workloadHint"] = {"requestsPerSecond": hint_rps, "meanInputTokens": 1155,
                                               "meanOutputTokens": 211}
                obj["spec"]["engine"].pop("env", None)
                if patch_model is not None:
                    patch_model(obj)
                apply_custom(custom, obj)
        assert slo_doc is not None
        yield {"core": core, "custom": custom, "apps": client.AppsV1Api(api), "ns": ns, "work": work,
               "prom": p, "operator": op, "fleet": fleet, "slo": slo_doc["spec"], "kubeconfig": cluster.kubeconfig}
    finally:
        op.stop()
        stop_process(fleet)
        fleet_log.close()
        prom.stop_prometheus(work)
        with contextlib.suppress(ApiException):
            core.delete_namespace(ns)
