"""Discrete-event fleet simulator: hand-computed schedules on a small affine fake perf model, and
consistency with the real PerfModel (saturation throughput, Little's law, scaling, closed-form
decode stretches vs step-by-step)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from archipelago.decide.catalog import load_gpu_catalog, load_model_catalog
from archipelago.decide.perf import EngineLimits, PerfModel
from archipelago.decide.sim import (
    LeastLoaded,
    LengthRangeRouter,
    ReplicaSpec,
    RoundRobin,
    SimError,
    SLOTarget,
    simulate,
)
from archipelago.decide.traces import Trace, load_trace, poisson_trace

CONV = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces" / "AzureLLMInferenceTrace_conv.csv"
LLAMA8 = "meta-llama/Llama-3.1-8B-Instruct"
LLAMA70 = "meta-llama/Llama-3.1-70B-Instruct"


# ---------------------------------------------------------------------------------------------
# a small affine fake with PerfModel's method names (hand-computable schedules)


@dataclass(frozen=True)
class Limits:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    chunked_prefill: bool = True


class AffinePerf:
    """step = C0 + CP*prefill_tokens + CB*decode_seqs + CC*decode_seqs*mean_context (seconds)."""

    C0, CP, CB, CC = 0.010, 1e-4, 1e-4, 1e-6

    def __init__(self, kv: int = 1_000_000, limits: Limits | None = None, tp: int = 1) -> None:
        self.kv_capacity_tokens = kv
        self.limits = limits or Limits()
        self.tp = tp
        self.fits = True
        self.fit_error = None

    def step_time(self, p, b, ctx, prefill_context_tokens=0.0, prefill_seqs=1.0):
        if p <= 0 and b <= 0:
            return 0.0
        return self.C0 + self.CP * p + self.CB * b + self.CC * b * ctx

    def decode(self, ctx: float) -> float:
        return self.step_time(0, 1, ctx)

    def power_w(self, phase: str) -> float:
        return {"idle": 50.0, "prefill": 400.0, "decode": 250.0}[phase]

    def price_per_hour(self, price_per_gpu_hour: float | None = None) -> float:
        return 3.6 * self.tp


def _trace(arrivals, inputs, outputs, span=None) -> Trace:
    return Trace(np.asarray(arrivals, float), np.asarray(inputs), np.asarray(outputs), source="test", span_s=span)


# decode context is bucketed to 16 tokens per sequence: at most 8 tokens of error per sequence-step
CTX_TOL = 8 * AffinePerf.CC


def test_single_request_hand_computed() -> None:
    pm = AffinePerf()
    res = simulate(_trace([0.5], [100], [5]), [ReplicaSpec("a", pm)], record_timeseries=False)
    prefill = pm.step_time(100, 0, 0)
    decode = sum(pm.decode(100 + j) for j in range(4))  # 4 decode steps after the first token
    assert res.ttft_s[0] == pytest.approx(prefill, abs=1e-12)
    assert res.e2e_s[0] == pytest.approx(prefill + decode, abs=4 * CTX_TOL)
    assert res.tpot_s[0] == pytest.approx(decode / 4, abs=CTX_TOL)
    assert res.steps == 5
    assert res.n_completed == 1 and res.preemptions == 0


def test_chunked_prefill_splits_long_prompt() -> None:
    pm = AffinePerf(limits=Limits(max_num_batched_tokens=64))
    res = simulate(_trace([0.0], [100], [3]), [ReplicaSpec("a", pm)], record_timeseries=False)
    assert res.steps == 4  # 64 + 36 prompt tokens, then 2 decode steps
    assert res.ttft_s[0] == pytest.approx(pm.step_time(64, 0, 0) + pm.step_time(36, 0, 0), abs=1e-12)


def test_prefill_shares_step_with_decodes_only_when_chunked() -> None:
    """A second request arriving mid-decode lengthens the first one's step by its prefill cost
    (chunked: one mixed step) or by a whole prefill-only step (not chunked: decodes pause)."""
    tr = _trace([0.0, 0.2], [100, 500], [40, 2])
    alone = simulate(_trace([0.0], [100], [40]), [ReplicaSpec("a", AffinePerf())], record_timeseries=False)
    mixed = simulate(tr, [ReplicaSpec("a", AffinePerf())], record_timeseries=False)
    separate = simulate(tr, [ReplicaSpec("a", AffinePerf(limits=Limits(chunked_prefill=False)))],
                        record_timeseries=False)
    pm = AffinePerf()
    # chunked: the step carrying the 500-token prompt costs CP*500 extra; request 2 decodes once more
    extra_mixed = mixed.e2e_s[0] - alone.e2e_s[0]
    assert extra_mixed == pytest.approx(pm.CP * 500 + pm.CB + pm.CC * 500, abs=3 * CTX_TOL + 1e-3)
    # not chunked: a whole prefill-only step is inserted (C0 + CP*500) plus the shared decode step
    extra_sep = separate.e2e_s[0] - alone.e2e_s[0]
    assert extra_sep == pytest.approx(pm.step_time(500, 0, 0) + pm.CB + pm.CC * 500, abs=3 * CTX_TOL + 1e-3)
    assert extra_sep - extra_mixed == pytest.approx(pm.C0, abs=1e-3)
    # request 2 waits for the next step boundary, then its prefill step
    assert 0 < mixed.ttft_s[1] - pm.step_time(500, 1, 120) < pm.decode(140) + 1e-9


def test_preemption_when_kv_is_tiny() -> None:
    pm = AffinePerf(kv=1200)
    tr = _trace(np.zeros(6), [100] * 6, [300] * 6)
    res = simulate(tr, [ReplicaSpec("a", pm)], timeseries_step_s=0.05)
    assert res.preemptions > 0
    assert res.n_completed == 6 and res.n_rejected == 0
    assert int(res.preemptions_per_request.sum()) == res.preemptions
    assert res.preemptions_per_request[0] == 0  # FCFS: the oldest is never the victim
    assert res.preemptions_per_request[-1] >= 1
    assert res.timeseries.kv_usage.max() <= 1.0 + 1e-12
    assert res.timeseries.kv_usage.max() > 0.9
    # recompute costs time: the preempted request finishes later than the oldest one
    assert res.e2e_s[-1] > res.e2e_s[0]
    # without KV pressure nothing is preempted
    assert simulate(tr, [ReplicaSpec("a", AffinePerf())], record_timeseries=False).preemptions == 0


def test_request_larger_than_kv_is_rejected_and_misses_slo() -> None:
    pm = AffinePerf(kv=1000)  # no max_model_len: the KV capacity bounds a request
    res = simulate(_trace([0.0, 1.0, 2.0], [1000, 10, 900], [200, 5, 200]), [ReplicaSpec("a", pm)],
                   slo=SLOTarget(10, 1), record_timeseries=False)
    assert res.n_rejected == 1 and res.n_completed == 2 and res.n_truncated == 1
    assert math.isnan(res.ttft_s[0]) and math.isnan(res.e2e_s[0])
    assert res.output_tokens.tolist() == [0, 5, 100]  # 900 + 100 = the 1000-token capacity
    assert res.attained.tolist() == [False, True, True]
    assert res.attainment == pytest.approx(2 / 3)
    assert res.slo_met is False


def test_max_model_len_truncates_and_rejects() -> None:
    pm = AffinePerf(limits=Limits(max_model_len=150))
    res = simulate(_trace([0.0, 0.0], [100, 200], [100, 5]), [ReplicaSpec("a", pm)], record_timeseries=False)
    assert res.n_truncated == 1 and res.n_rejected == 1
    assert res.output_tokens.tolist() == [50, 0]
    assert res.steps == 50  # 1 prefill step + 49 decode steps


def test_zero_load_and_zero_length_requests() -> None:
    pm = AffinePerf()
    empty = simulate(_trace([], [], [], span=60.0), [ReplicaSpec("a", pm)] * 2, slo=SLOTarget(1, 1))
    assert empty.n_requests == 0 and empty.steps == 0
    assert empty.energy_j == pytest.approx(2 * 50.0 * 60.0)
    assert empty.cost_usd == pytest.approx(2 * 3.6 * 60 / 3600)
    assert empty.summary()["ttft_p99_s"] is None
    assert empty.timeseries.arrivals.sum() == 0
    one = simulate(_trace([0.0], [0], [0]), [ReplicaSpec("a", pm)], record_timeseries=False)
    assert one.n_completed == 1 and math.isnan(one.tpot_s[0])
    assert one.ttft_s[0] == pytest.approx(pm.step_time(1, 0, 0))


def test_energy_cost_and_gpu_hours_accounting() -> None:
    pm = AffinePerf(tp=2)
    res = simulate(_trace([0.0], [1000], [50], span=100.0), [ReplicaSpec("a", pm)], record_timeseries=False)
    ttft, e2e = res.ttft_s[0], res.e2e_s[0]
    assert res.horizon_s == 100.0
    expected = 400.0 * ttft + 250.0 * (e2e - ttft) + 50.0 * (100.0 - e2e)
    assert res.energy_j == pytest.approx(expected, rel=1e-9)
    assert res.energy_wh == pytest.approx(expected / 3600)
    assert res.cost_usd == pytest.approx(7.2 * 100 / 3600)
    assert res.gpu_hours == pytest.approx(2 * 100 / 3600)
    priced = simulate(_trace([0.0], [10], [5], span=3600.0), [ReplicaSpec("a", pm, price_per_hour=1.5)],
                      record_timeseries=False)
    assert priced.cost_usd == pytest.approx(1.5)


def test_slo_attainment_and_goodput_from_request_arrays() -> None:
    tr = poisson_trace(30.0, 60.0, input_tokens=np.array([50, 500, 3000]), output_tokens=np.array([5, 50, 300]),
                       seed=3)
    slo = SLOTarget(ttft_s=0.25, tpot_s=0.02)
    res = simulate(tr, [ReplicaSpec("a", AffinePerf())] * 2, slo=slo, record_timeseries=False)
    ok = (res.ttft_s <= 0.25) & (np.isnan(res.tpot_s) | (res.tpot_s <= 0.02))
    assert 0.0 < ok.mean() < 1.0  # the targets bite
    assert np.array_equal(res.attained, ok)
    assert res.attainment == pytest.approx(ok.mean())
    assert res.goodput_rps == pytest.approx(ok.sum() / 60.0)
    assert res.slo_met == (np.quantile(res.ttft_s, 0.99) <= 0.25 and np.quantile(np.nan_to_num(res.tpot_s), 0.99)
                           <= 0.02 and ok.mean() >= 0.99)
    with pytest.raises(SimError, match="ttft_s"):
        SLOTarget(ttft_s=0, tpot_s=1)
    with pytest.raises(SimError, match="attainment"):
        SLOTarget(ttft_s=1, tpot_s=1, attainment=99)


# ---------------------------------------------------------------------------------------------
# routers


def test_round_robin_and_least_loaded_balance() -> None:
    tr = poisson_trace(40.0, 60.0, 300, 100, seed=2)
    rr = simulate(tr, [ReplicaSpec("a", AffinePerf())] * 4, RoundRobin(), record_timeseries=False)
    counts = np.bincount(rr.replica, minlength=4)
    assert counts.max() - counts.min() <= 1
    ll = simulate(tr, [ReplicaSpec("a", AffinePerf())] * 4, LeastLoaded(), record_timeseries=False)
    counts = np.bincount(ll.replica, minlength=4)
    assert counts.min() > 0.9 * counts.max()
    # a replica 4x slower gets clearly less traffic under least-loaded, the same under round-robin
    slow = AffinePerf()
    slow.C0 = 0.04  # instance attribute shadows the class constant
    fleet = [ReplicaSpec("fast", AffinePerf())] * 3 + [ReplicaSpec("slow", slow)]
    ll2 = simulate(tr, fleet, LeastLoaded(), record_timeseries=False)
    c = np.bincount(ll2.replica, minlength=4)
    assert c[3] < 0.8 * c[:3].mean()


def test_length_range_router_routes_by_prompt_length() -> None:
    tr = _trace(np.arange(6) * 0.01, [10, 999, 1000, 5000, 20000, 3], [2] * 6)
    fleet = [ReplicaSpec("short", AffinePerf())] * 2 + [ReplicaSpec("long", AffinePerf())]
    router = LengthRangeRouter([(0, 1000, {"short": 1.0}), (1000, 8000, {"long": 1.0})])
    res = simulate(tr, fleet, router, record_timeseries=False)
    islands = [fleet[r].island for r in res.replica]
    assert islands == ["short", "short", "long", "long", "long", "short"]  # 20000: nearest range
    strict = LengthRangeRouter([(0, 1000, {"short": 1.0}), (1000, 8000, {"long": 1.0})], out_of_range="error")
    with pytest.raises(SimError, match="20000 tokens is outside every routing range"):
        simulate(tr, fleet, strict, record_timeseries=False)


def test_length_range_router_validation() -> None:
    with pytest.raises(SimError, match="overlap"):
        LengthRangeRouter([(0, 1000, {"a": 1}), (500, 2000, {"b": 1})])
    with pytest.raises(SimError, match="lo < hi"):
        LengthRangeRouter([(100, 100, {"a": 1})])
    with pytest.raises(SimError, match="weight"):
        LengthRangeRouter([(0, None, {"a": 0})])
    router = LengthRangeRouter([(0, None, {"ghost": 1})])
    with pytest.raises(SimError, match=r"island 'ghost'.*islands in the fleet: \['a'\]"):
        simulate(_trace([0.0], [5], [5]), [ReplicaSpec("a", AffinePerf())], router)


def test_weighted_routing_is_seeded_and_proportional() -> None:
    tr = poisson_trace(50.0, 60.0, 100, 10, seed=4)
    fleet = [ReplicaSpec("a", AffinePerf())] * 2 + [ReplicaSpec("b", AffinePerf())] * 2
    router = LengthRangeRouter([(0, None, {"a": 3.0, "b": 1.0})])
    r1 = simulate(tr, fleet, router, seed=11, record_timeseries=False)
    r2 = simulate(tr, fleet, router, seed=11, record_timeseries=False)
    r3 = simulate(tr, fleet, router, seed=12, record_timeseries=False)
    assert np.array_equal(r1.replica, r2.replica)
    assert np.array_equal(r1.e2e_s, r2.e2e_s, equal_nan=True)
    assert not np.array_equal(r1.replica, r3.replica)
    share_a = np.isin(r1.replica, [0, 1]).mean()
    n = len(tr)
    assert abs(share_a - 0.75) < 4 * math.sqrt(0.75 * 0.25 / n)


def test_determinism_including_timeseries() -> None:
    tr = poisson_trace(20.0, 30.0, np.array([100, 2000]), np.array([10, 300]), seed=5)
    a = simulate(tr, [ReplicaSpec("a", AffinePerf(kv=20000))] * 2, seed=3)
    b = simulate(tr, [ReplicaSpec("a", AffinePerf(kv=20000))] * 2, seed=3)
    assert a.summary() == b.summary()
    assert np.array_equal(a.ttft_s, b.ttft_s, equal_nan=True)
    assert np.array_equal(a.timeseries.queue, b.timeseries.queue)


def test_fleet_and_argument_errors() -> None:
    with pytest.raises(SimError, match="empty"):
        simulate(_trace([0.0], [1], [1]), [])
    bad = AffinePerf()
    bad.fits, bad.fit_error = False, "needs 140 GiB of weights"
    with pytest.raises(SimError, match="does not fit: needs 140 GiB"):
        simulate(_trace([0.0], [1], [1]), [ReplicaSpec("x", bad)])
    with pytest.raises(SimError, match="timeseries_step_s"):
        simulate(_trace([0.0], [1], [1]), [ReplicaSpec("x", AffinePerf())], timeseries_step_s=0)


# ---------------------------------------------------------------------------------------------
# consistency with the real performance model


@pytest.fixture(scope="module")
def catalogs():
    return load_gpu_catalog(), load_model_catalog()


def _pm(catalogs, model: str, gpu: str, tp: int, **limits) -> PerfModel:
    gpus, models = catalogs
    return PerfModel(models[model], gpus[gpu], tp, EngineLimits(**limits))


def _steady_rate(res, trace: Trace) -> float:
    """Completions per second in the middle 60 % of the run (queue never empties there)."""
    fin = np.sort((trace.arrival_s + res.e2e_s)[~np.isnan(res.e2e_s)])
    lo, hi = 0.2 * fin[-1], 0.8 * fin[-1]
    return float(((fin >= lo) & (fin < hi)).sum() / (hi - lo))


@pytest.mark.parametrize(
    ("model", "gpu", "tp", "inp", "out", "tol"),
    [
        (LLAMA8, "A100-80GB", 1, 512, 128, 0.05),
        (LLAMA8, "A100-80GB", 1, 2048, 64, 0.05),
        (LLAMA8, "A100-80GB", 1, 128, 512, 0.05),
        (LLAMA70, "H100-SXM", 4, 1000, 200, 0.05),
    ],
)
def test_overloaded_replica_reaches_perf_model_saturation(catalogs, model, gpu, tp, inp, out, tol) -> None:
    pm = _pm(catalogs, model, gpu, tp)
    sat = pm.saturation_throughput(inp, out)
    duration = 2000.0 / sat
    tr = poisson_trace(3.0 * sat, duration, inp, out, seed=1)  # open loop at 3x saturation
    res = simulate(tr, [ReplicaSpec("x", pm)], RoundRobin(), record_timeseries=False)
    assert _steady_rate(res, tr) == pytest.approx(sat, rel=tol)


def test_kv_bound_replica_preempts_and_stays_below_closed_form(catalogs) -> None:
    """KV-bound (8B on one L4): the closed form is an upper bound, the simulator pays for preemption.

    vLLM admits a prompt when its KV fits without reserving decode room, so a KV-bound replica
    preempts and recomputes; ``saturation_throughput`` assumes every sequence sits at its mean
    context and ignores that waste. Measured (2026-11-21): simulator 2.65 req/s vs closed form
    3.57 req/s (0.74x) with ~0.2 preemptions per request. The planner therefore must not plan a
    replica at KV saturation (see decide/planner/capacity.py); this test pins the direction and
    size of the gap so a change in either model shows up.
    """
    pm = _pm(catalogs, LLAMA8, "L4", 1)
    sat = pm.saturation_throughput(512, 128)
    tr = poisson_trace(3.0 * sat, 2000.0 / sat, 512, 128, seed=1)
    res = simulate(tr, [ReplicaSpec("x", pm)], RoundRobin(), record_timeseries=False)
    rate = _steady_rate(res, tr)
    assert res.preemptions > 0
    assert 0.65 * sat <= rate <= 1.02 * sat


def test_littles_law_on_simulated_system(catalogs) -> None:
    pm = _pm(catalogs, LLAMA8, "A100-80GB", 1)
    sat = pm.saturation_throughput(1000, 200)
    tr = poisson_trace(2 * 0.7 * sat, 300.0, np.array([200, 1000, 1800]), np.array([50, 200, 350]), seed=9)
    res = simulate(tr, [ReplicaSpec("x", pm)] * 2, LeastLoaded(), timeseries_step_s=0.05)
    ts = res.timeseries
    span = len(ts.time_s) * ts.step_s
    assert ts.time_s[-1] >= res.makespan_s  # the samples cover every request's stay
    in_system = float((ts.queue + ts.running).mean())  # time-average L, from state samples
    lam = len(tr) / span
    w_mean = float(np.nanmean(res.e2e_s))  # mean time in system W, from request timestamps
    assert in_system == pytest.approx(lam * w_mean, rel=0.03)
    assert ts.arrivals.sum() == len(tr)
    assert ts.completions.sum() == res.n_completed


@pytest.mark.skipif(not CONV.exists(), reason="shared/data traces not present")
@pytest.mark.parametrize("router", [LeastLoaded, RoundRobin])
def test_doubling_replicas_never_worsens_p99_ttft(catalogs, router) -> None:
    pm = _pm(catalogs, LLAMA8, "A100-80GB", 1)
    tr = load_trace(CONV).window(0, 300).scale_rate(2.0)
    p99 = []
    for n in (1, 2, 4, 8):
        res = simulate(tr, [ReplicaSpec("x", pm)] * n, router(), record_timeseries=False)
        p99.append(res.percentiles["ttft"]["p99"])
    assert all(b <= a for a, b in zip(p99, p99[1:], strict=False)), p99
    assert p99[-1] < p99[0]


@pytest.mark.skipif(not CONV.exists(), reason="shared/data traces not present")
def test_closed_form_decode_stretches_match_step_by_step(catalogs) -> None:
    pm = _pm(catalogs, LLAMA8, "A100-80GB", 1)
    tr = load_trace(CONV).window(0, 240)
    fleet = [ReplicaSpec("x", pm)] * 2
    fast = simulate(tr, fleet, RoundRobin(), record_timeseries=False)
    slow = simulate(tr, fleet, RoundRobin(), record_timeseries=False, exact_steps=True)
    # step boundaries drift by microseconds, so a request may wait one step more or less for
    # admission (TTFT is sensitive to that phase); the distributions must agree and be unbiased
    for m in ("ttft", "tpot", "e2e"):
        for q in ("p50", "p90", "p99", "mean"):
            rel = 0.03 if (m == "ttft" and q != "mean") else 0.01
            assert fast.percentiles[m][q] == pytest.approx(slow.percentiles[m][q], rel=rel), (m, q)
    assert abs(np.nanmean(fast.ttft_s - slow.ttft_s)) < 1e-3  # seconds
    assert fast.energy_j == pytest.approx(slow.energy_j, rel=0.002)
    assert abs(fast.steps - slow.steps) <= 0.002 * slow.steps


def test_closed_form_is_exact_per_request_without_mid_stretch_arrivals(catalogs) -> None:
    """All requests arrive at once: every stretch ends at a completion, so the closed form and the
    step-by-step run must agree request by request (up to the 16-token context bucketing)."""
    pm = _pm(catalogs, LLAMA8, "A100-80GB", 1)
    rng = np.random.default_rng(0)
    n = 64
    tr = _trace(np.zeros(n), rng.integers(50, 3000, n), rng.integers(1, 800, n))
    fast = simulate(tr, [ReplicaSpec("x", pm)], record_timeseries=False)
    slow = simulate(tr, [ReplicaSpec("x", pm)], record_timeseries=False, exact_steps=True)
    assert fast.steps == slow.steps
    np.testing.assert_allclose(fast.e2e_s, slow.e2e_s, rtol=1e-4)
    np.testing.assert_allclose(fast.ttft_s, slow.ttft_s, rtol=1e-4)


def test_real_model_that_does_not_fit_is_refused(catalogs) -> None:
    pm = _pm(catalogs, LLAMA70, "L4", 1)
    assert not pm.fits
    with pytest.raises(SimError, match="does not fit"):
        simulate(_trace([0.0], [10], [10]), [ReplicaSpec("l4", pm)])
