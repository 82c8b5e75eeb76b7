"""Trace replayer: routing ConfigMap parsing, weighted routing, phased traces, replay against emulated engines."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest

from archipelago.act.engine import EngineConfig
from archipelago.act.manifests import IslandRender, build_routing_configmap
from archipelago.decide.sim import SLOTarget
from archipelago.decide.traces import Trace
from archipelago.emulate.engine import EmulatedEngine, parse_engine_argv
from archipelago.emulate.replay import (
    Replayer,
    ReplayError,
    RequestRecord,
    RoutingTable,
    StaticEndpoints,
    phased_trace,
    summarize,
)

LLAMA8 = "meta-llama/Llama-3.1-8B-Instruct"


def _isl(island: str, lo: int, hi: int | None, weight: float, gpu: str = "A100-80GB") -> IslandRender:
    return IslandRender(model="chat", namespace="llm", island=island, pool="p", gpu_type=gpu, replicas=1,
                        engine=EngineConfig(engine="vllm", model=LLAMA8, max_model_len=8192),
                        input_range=(lo, hi), weight=weight)


def _table() -> RoutingTable:
    cm = build_routing_configmap("chat", "llm", [_isl("short-a", 0, 1024, 3.0), _isl("short-b", 0, 1024, 1.0),
                                                 _isl("long", 1024, None, 1.0)], None)
    return RoutingTable.parse(cm["data"]["routes.json"], "cm")


def test_parses_the_operators_routing_configmap_and_routes_by_length_and_weight() -> None:
    t = _table()
    assert t.model == "chat" and [(r.lo, r.hi) for r in t.routes] == [(0, 1024), (1024, None)]
    assert t.choose(5000, 0.99).island == "long" and t.choose(1024, 0.0).island == "long"
    rng = np.random.default_rng(1)
    picks = [t.choose(100, float(u)).island for u in rng.random(20000)]
    assert picks.count("short-a") / len(picks) == pytest.approx(0.75, abs=0.015)
    assert set(picks) == {"short-a", "short-b"}
    gap = RoutingTable.parse({"routes": [
        {"minInputTokens": 100, "maxInputTokens": 200, "backends": [{"service": "a.x.svc", "port": 1, "weight": 1}]},
        {"minInputTokens": 1000, "maxInputTokens": None, "backends": [{"service": "b.x.svc", "port": 1}]}]})
    assert gap.choose(10, 0.5).service == "a.x.svc"  # below every range: nearest
    assert gap.choose(900, 0.5).service == "b.x.svc"  # in a gap: nearest edge
    assert RoutingTable.parse({"routes": []}).choose(10, 0.5) is None


@pytest.mark.parametrize("doc, match", [
    ("{not json", "cm: not valid JSON"),
    ({"routes": {}}, "'routes' list"),
    ({"routes": [{"minInputTokens": -1, "backends": []}]}, r"routes\[0\].minInputTokens"),
    ({"routes": [{"minInputTokens": 5, "maxInputTokens": 5, "backends": []}]}, r"routes\[0\].maxInputTokens"),
    ({"routes": [{"backends": [{"service": "a", "port": 0}]}]}, r"routes\[0\].backends\[0\].port"),
    ({"routes": [{"backends": [{"service": "a", "port": 80, "weight": "x"}]}]}, r"backends\[0\].weight"),
    ({"routes": [{"minInputTokens": 0, "maxInputTokens": 10, "backends": [{"service": "a", "port": 80}]},
                 {"minInputTokens": 5, "backends": [{"service": "b", "port": 80}]}]}, "overlap"),
])
def test_malformed_routing_is_refused_with_the_field(doc, match) -> None:
    with pytest.raises(ReplayError, match=match):
        RoutingTable.parse(doc, "cm")


def test_phased_trace_changes_the_rate_and_keeps_the_request_mix() -> None:
    n = 600
    base = Trace(np.arange(n) * 0.5, np.arange(n) % 97 + 1, np.full(n, 7), source="base", span_s=n * 0.5)  # 2 rps
    tr = phased_trace(base, [(30, 1.0), (30, 4.0), (30, 1.0)])
    arr = tr.arrival_s
    rates = [((arr >= a) & (arr < a + 30)).sum() / 30 for a in (0, 30, 60)]
    assert rates == pytest.approx([2.0, 8.0, 2.0], abs=0.1)
    assert tr.duration_s == 90 and np.all(np.diff(arr) >= 0)
    # phase 2 replays the base seconds [30, 150) compressed 4x: the request mix continues
    assert tr.input_tokens[60] == base.input_tokens[60]
    with pytest.raises(ReplayError, match="shorten the phases"):
        phased_trace(base, [(200, 2.0)])


def test_summary_attainment_counts_errors_as_misses() -> None:
    slo = SLOTarget(ttft_s=1.0, tpot_s=0.1)
    recs = [RequestRecord(0, 0, 10, 5, status="ok", ttft_s=0.5, tpot_s=0.05, e2e_s=0.7, island="a"),
            RequestRecord(1, 0, 10, 5, status="ok", ttft_s=1.5, tpot_s=0.05, e2e_s=1.7, island="a"),
            RequestRecord(2, 0, 10, 1, status="ok", ttft_s=0.2, tpot_s=math.nan, e2e_s=0.2, island="b"),
            RequestRecord(3, 0, 10, 5, status="http_400"),
            RequestRecord(4, 0, 10, 5)]  # pending: not counted
    s = summarize(recs, slo)
    assert s["requests"] == 4 and s["ok"] == 3 and s["errors"] == {"http_400": 1}
    assert s["attainment"] == pytest.approx(0.5)
    assert s["by_island"] == {"a": 2, "b": 1}
    assert s["ttft_s"]["p50"] == pytest.approx(0.5)


def test_replay_against_emulated_engines() -> None:
    """Two islands (A100 for short prompts, H100 for long ones) behind the operator's routing table."""
    short = _isl("short", 0, 1024, 1.0)
    long_ = _isl("long", 1024, None, 1.0)
    routes = build_routing_configmap("chat", "llm", [short, long_, _isl("gone", 0, 1024, 1.0)], None)
    table = RoutingTable.parse(routes["data"]["routes.json"])
    rng = np.random.default_rng(0)
    n = 40
    arrivals = np.sort(rng.uniform(0, 2.0, n))
    inp = np.where(np.arange(n) % 2 == 0, 300, 3000)
    inp[5] = 9000  # longer than max_model_len 8192: HTTP 400
    trace = Trace(arrivals, inp, np.full(n, 12), source="test")
    windows = []

    async def go():
        engines = {}
        for name, gpu in (("short", "A100-80GB"), ("long", "H100-SXM")):
            spec = parse_engine_argv(["vllm", "serve", LLAMA8, "--max-model-len", "8192", "--port", "0",
                                      "--host", "127.0.0.1"], env={}, gpu=gpu)
            eng = EmulatedEngine(spec)
            engines[name] = (eng, await eng.start())
        eps = StaticEndpoints({f"{short.name}.llm.svc": [f"127.0.0.1:{engines['short'][1]}"],
                               f"{long_.name}.llm.svc": [f"127.0.0.1:{engines['long'][1]}"]})
        rp = Replayer(trace, lambda: table, eps, slo=SLOTarget(ttft_s=5.0, tpot_s=0.2), seed=3, window_s=1.0,
                      on_window=windows.append)
        try:
            res = await rp.run()
        finally:
            for eng, _ in engines.values():
                await eng.stop()
        return res, {k: v[0].perf for k, v in engines.items()}

    res, perfs = asyncio.run(go())
    recs = res.records
    assert recs[5].status == "http_400" and "maximum context length" in recs[5].error
    gone = [r for r in recs if r.status == "no_endpoint"]
    assert gone and all(r.island == "gone" for r in gone)
    ok = [r for r in recs if r.status == "ok"]
    assert len(ok) + len(gone) + 1 == n
    for r in ok:
        assert r.island == ("short" if r.input_tokens < 1024 else "long")
        assert r.completion_tokens == 12
        # a request never beats the performance model's prefill of its own prompt
        assert r.ttft_s >= perfs[r.island].step_time(r.input_tokens, 0, 0.0) * 0.999
        assert r.ttft_s < 2.0 and 0 < r.tpot_s < 0.5  # decodes share steps with 3000-token prefills
    s = res.summary
    assert s["errors"] == {"http_400": 1, "no_endpoint": len(gone)}
    assert s["attainment"] == pytest.approx(len(ok) / n)
    assert windows and sum(w.summary["requests"] for w in windows) == n
    json.dumps(res.to_json())
