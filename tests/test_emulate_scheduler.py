"""The emulator's step-wise scheduler follows the simulator's continuous-batching rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from archipelago.decide.catalog import load_gpu_catalog, load_model_catalog
from archipelago.decide.perf import EngineLimits, PerfModel
from archipelago.decide.sim import ReplicaSpec, simulate
from archipelago.decide.traces import load_azure_csv
from archipelago.emulate.scheduler import ABORTED, BatchScheduler, EmuRequest, RequestRejected

TRACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces"
CONV = TRACES / "AzureLLMInferenceTrace_conv.csv"


def _perf(gpu: str, **lim) -> tuple[PerfModel, EngineLimits]:
    m = load_model_catalog().get("meta-llama/Llama-3.1-8B-Instruct")
    limits = EngineLimits(**lim)
    return PerfModel(m, load_gpu_catalog().get(gpu), 1, limits), limits


def _compare(perf, limits, trace):
    sim = simulate(trace, [ReplicaSpec("a", perf)], exact_steps=True, record_timeseries=False)
    reqs = BatchScheduler(perf, limits).run_virtual(zip(trace.arrival_s, trace.input_tokens, trace.output_tokens,
                                                        strict=True))
    ttft = np.array([r.first_token - r.arrival if r.first_token is not None else np.nan for r in reqs])
    e2e = np.array([r.finished - r.arrival if r.finished is not None else np.nan for r in reqs])
    return sim, reqs, ttft, e2e


@pytest.mark.skipif(not CONV.is_file(), reason="needs ../shared/data/traces")
def test_matches_simulator_per_request_under_kv_pressure() -> None:
    # L4 holds ~30k KV tokens for Llama-3.1-8B: the conversation trace forces queueing and preemptions.
    perf, limits = _perf("L4", max_num_seqs=128, max_num_batched_tokens=8192, max_model_len=8192)
    trace = load_azure_csv(CONV).window(0, 60)
    sim, reqs, ttft, e2e = _compare(perf, limits, trace)
    assert sim.preemptions > 0  # the scenario exercises recompute preemption
    assert sum(r.preemptions for r in reqs) == sim.preemptions
    assert np.all(np.isfinite(ttft)) and np.all(np.isfinite(e2e))
    # the simulator buckets decode contexts to 16 tokens; everything else is the same arithmetic
    np.testing.assert_allclose(ttft, sim.ttft_s, rtol=0.01, atol=0.01)
    np.testing.assert_allclose(e2e, sim.e2e_s, rtol=0.01, atol=0.01)
    assert [r.generated for r in reqs] == [max(1, int(o)) for o in trace.output_tokens]


@pytest.mark.skipif(not CONV.is_file(), reason="needs ../shared/data/traces")
def test_matches_simulator_percentiles_without_chunked_prefill() -> None:
    perf, limits = _perf("A100-80GB", max_num_seqs=32, max_num_batched_tokens=16384, max_model_len=16384,
                         chunked_prefill=False)
    trace = load_azure_csv(CONV).window(0, 30).scale_rate(3)
    sim, _, ttft, e2e = _compare(perf, limits, trace)
    for q in (50, 90, 99):
        assert np.percentile(ttft, q) == pytest.approx(np.nanpercentile(sim.ttft_s, q), rel=0.02, abs=0.01)
        assert np.percentile(e2e, q) == pytest.approx(np.nanpercentile(sim.e2e_s, q), rel=0.02, abs=0.01)


def test_single_request_ttft_is_the_prefill_step_and_tpot_the_decode_step() -> None:
    perf, limits = _perf("A100-80GB", max_num_seqs=8, max_num_batched_tokens=4096, max_model_len=8192)
    [r] = BatchScheduler(perf, limits).run_virtual([(1.0, 1000, 5)])
    assert r.first_token - r.arrival == pytest.approx(perf.step_time(1000, 0, 0.0), rel=1e-9)
    # 4 decode steps at contexts 1000..1003
    dec = sum(perf.step_time(0, 1, 1000 + k) for k in range(4))
    assert r.finished - r.first_token == pytest.approx(dec, rel=1e-9)
    assert r.finish_reason == "length" and r.generated == 5


def test_rejects_and_truncates_like_the_simulator() -> None:
    perf, limits = _perf("A100-80GB", max_model_len=4096)
    s = BatchScheduler(perf, limits)
    with pytest.raises(RequestRejected, match="maximum context length is 4096"):
        s.submit(EmuRequest("a", 4096, 10, 0.0))
    r = EmuRequest("b", 4000, 500, 0.0)
    s.submit(r)
    assert r.max_output_tokens == 96 and r.truncated


class _TinyPerf:
    """A replica with a 1,000-token KV cache (collaborator fake: only capacity matters here)."""

    fits = True
    kv_capacity_tokens = 1000
    limits = EngineLimits(max_num_seqs=4, max_num_batched_tokens=512, max_model_len=None)

    def step_time(self, p, b, ctx, prefill_context_tokens=0.0, prefill_seqs=1):
        return 0.01 + 1e-5 * p


def test_rejects_requests_that_cannot_fit_the_kv_cache() -> None:
    s = BatchScheduler(_TinyPerf())
    with pytest.raises(RequestRejected, match="KV cache of this replica .1000 tokens"):
        s.submit(EmuRequest("c", 900, 101, 0.0))
    s.submit(EmuRequest("d", 900, 100, 0.0))
    assert s.num_waiting == 1


def test_abort_frees_kv_and_leaves_others_running() -> None:
    perf, limits = _perf("A100-80GB", max_num_seqs=8, max_num_batched_tokens=4096, max_model_len=8192)
    s = BatchScheduler(perf, limits)
    a, b = EmuRequest("a", 500, 50, 0.0), EmuRequest("b", 700, 50, 0.0)
    s.submit(a)
    s.submit(b)
    t = 0.0
    for _ in range(3):
        plan = s.schedule(t)
        t += plan.duration
        s.complete(plan, t)
    assert s.kv_usage > 0 and s.num_running == 2
    used = s.ctx_sum + s.pf_kv
    held = a.kv
    assert held > 0
    assert s.abort(a, t) and a.state == ABORTED and a.finish_reason == "abort"
    assert s.ctx_sum + s.pf_kv == used - held
    assert s.num_running == 1 and s.ctx_sum == b.kv
    assert not s.abort(a, t)
    plan = s.schedule(t)
    assert plan.decode == [b]
