"""Tests of the performance model (archipelago.decide.perf): calibration against measured
profiles, internal consistency and generalisation sanity checks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from archipelago.decide.catalog import ModelSpec, load_gpu_catalog, load_model_catalog
from archipelago.decide.perf import EngineLimits, PerfModel

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT.parent / "shared" / "data" / "profiles" / "splitwise_llama2-70b_perf.csv"


@pytest.fixture(scope="module")
def gpus():
    return load_gpu_catalog()


@pytest.fixture(scope="module")
def models():
    return load_model_catalog()


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_calibration", ROOT / "bench" / "bench_calibration.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_calibration"] = mod
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------------
# calibration against measurements
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not PROFILE.exists(), reason="shared/data profiles not present")
def test_calibration_error_within_bound():
    """MdAPE of prompt_time and token_time per GPU <= 15 % (target 10 %) on the Splitwise profile."""
    table = _bench().calibration_table(PROFILE)
    assert set(table["gpu"]) == {"A100-80GB", "H100-SXM"}
    assert (table["n"] > 50).all()
    for row in table.itertuples():
        assert row.prompt_mdape <= 15.0, (row.gpu, row.rows, row.prompt_mdape)
        assert row.token_mdape <= 15.0, (row.gpu, row.rows, row.token_mdape)


@pytest.mark.skipif(not PROFILE.exists(), reason="shared/data profiles not present")
def test_calibration_profile_reading():
    bench = _bench()
    df = bench.load_profile(PROFILE)
    assert "h100-80gb-pcap" not in set(df["hardware"])  # derived rows are excluded
    assert not ((df["tensor_parallel"] == 2) & (df["batch_size"] == 64)).any()
    # prompt_time is the prefill of batch_size prompts: it scales with the batch
    h = df[
        (df["hardware"] == "h100-80gb")
        & (df["tensor_parallel"] == 2)
        & (df["prompt_size"] == 512)
        & (df["token_size"] == 128)
    ]
    by_batch = h.groupby("batch_size")["prompt_time"].median()
    assert by_batch[16] / by_batch[1] == pytest.approx(16, rel=0.15)


@pytest.mark.skipif(not PROFILE.exists(), reason="shared/data profiles not present")
def test_features_reproduce_the_model(gpus, models):
    """The grid search's term decomposition reproduces PerfModel exactly for the catalogue constants."""
    bench = _bench()
    cfg = bench.configurations(bench.load_profile(PROFILE))
    model = models.get(bench.MODEL)
    for hw, key in bench.HARDWARE.items():
        sub = cfg[cfg["hardware"] == hw].reset_index(drop=True)
        gpu = gpus.get(key)
        xp, xt = bench.features(sub, model, gpu)
        e = gpu.efficiency
        theta = np.array(
            [[e.compute, e.memory, e.link, e.allreduce_latency_us, e.step_overhead_ms, e.per_seq_overhead_ms]]
        )
        p, t = bench.predict(sub, model, gpu)
        np.testing.assert_allclose(bench.model_ms(xp, theta)[0], p, rtol=1e-9)
        np.testing.assert_allclose(bench.model_ms(xt, theta)[0], t, rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# memory and feasibility
# ---------------------------------------------------------------------------------------------


def test_llama8b_fits_on_one_l4_with_sensible_kv(gpus, models):
    pm = PerfModel(models.get("llama-3.1-8b"), gpus.get("L4"), 1)
    assert pm.fits and pm.fit_error is None
    # 8.03B params x 2 bytes = 14.96 GiB of weights
    assert pm.weight_bytes / 2**30 == pytest.approx(8.03e9 * 2 / 2**30, rel=0.01)
    # 22.5 GiB x 0.9 - 15 GiB weights - ~1.8 GiB reserve = ~3.5 GiB / 128 KiB per token
    assert 15_000 <= pm.kv_capacity_tokens <= 40_000
    assert pm.kv_capacity_tokens % 16 == 0
    assert pm.kv_bytes_per_token == 131072


def test_llama70b_does_not_fit_on_one_l4_and_says_why(gpus, models):
    pm = PerfModel(models.get("llama-3.1-70b"), gpus.get("L4"), 1)
    assert not pm.fits
    msg = pm.fit_error
    assert "Llama-3.1-70B" in msg and "GiB of weights" in msg and "L4" in msg
    assert "gpu_memory_utilization 0.90" in msg
    assert "TP>=8" in msg
    assert pm.saturation_throughput(1000, 100) == 0.0
    assert PerfModel(models.get("llama-3.1-70b"), gpus.get("L4"), 8).fits


def test_tp_must_divide_heads(gpus, models):
    pm = PerfModel(models.get("qwen2.5-7b"), gpus.get("L4"), 8)  # 28 heads
    assert not pm.fits and "28 attention heads" in pm.fit_error and "[1, 2, 4]" in pm.fit_error
    with pytest.raises(ValueError, match="tp"):
        PerfModel(models.get("qwen2.5-7b"), gpus.get("L4"), 0)


def test_kv_too_small_for_max_model_len(gpus, models):
    pm = PerfModel(models.get("llama-3.1-8b"), gpus.get("L4"), 1, EngineLimits(max_model_len=131072))
    assert not pm.fits and "KV cache" in pm.fit_error and "131072" in pm.fit_error
    assert pm.max_model_len_fit == pm.kv_capacity_tokens


def test_kv_capacity_shrinks_with_lower_memory_utilization(gpus, models):
    m, g = models.get("llama-3.1-8b"), gpus.get("A100-80GB")
    caps = [
        PerfModel(m, g, 1, EngineLimits(gpu_memory_utilization=u)).kv_capacity_tokens
        for u in (0.95, 0.9, 0.8, 0.6)
    ]
    assert caps == sorted(caps, reverse=True) and len(set(caps)) == 4
    # each 0.1 of 80 GiB is 8 GiB = 65,536 tokens of 128 KiB
    assert caps[1] - caps[2] == pytest.approx(8 * 2**30 / 131072, abs=16)


def test_fp8_quantization_halves_weight_bytes(gpus, models):
    m, g = models.get("llama-3.1-70b"), gpus.get("H100-SXM")
    bf16 = PerfModel(m, g, 4)
    fp8 = PerfModel(m, g, 4, EngineLimits(quantization="fp8"))
    # linear layers at 1 byte; embedding and LM head (3 % of the weights) stay BF16
    assert fp8.weight_bytes / bf16.weight_bytes == pytest.approx(0.5, abs=0.02)
    assert fp8.kv_capacity_tokens > bf16.kv_capacity_tokens
    assert fp8.compute_dtype == "fp8"
    assert fp8.decode_step_time(1, 1000) < bf16.decode_step_time(1, 1000)
    kv8 = PerfModel(m, g, 4, EngineLimits(kv_cache_dtype="fp8"))
    assert kv8.kv_bytes_per_token == bf16.kv_bytes_per_token / 2
    with pytest.raises(ValueError, match="quantization"):
        EngineLimits(quantization="int3")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineLimits(gpu_memory_utilization=1.5)


def test_max_batch(gpus, models):
    pm = PerfModel(models.get("llama-3.1-8b"), gpus.get("L4"), 1)
    assert pm.max_batch(1000) == min(256, pm.kv_capacity_tokens // 1008)
    assert PerfModel(models.get("llama-3.1-8b"), gpus.get("H100-SXM"), 1).max_batch(100) == 256
    assert pm.max_batch(pm.kv_capacity_tokens + 1) == 0


def test_tp_replicates_kv_heads_beyond_their_count(gpus, models):
    m = models.get("qwen2.5-7b")  # 4 KV heads
    g = gpus.get("H100-SXM")
    assert PerfModel(m, g, 4).kv_bytes_per_token == m.kv_bytes_per_token()
    llama = models.get("llama-3.1-70b")  # 8 KV heads: at TP=16 each KV head lives on two GPUs
    assert PerfModel(llama, g, 16).kv_bytes_per_token == 2 * llama.kv_bytes_per_token()
    # TP=7 is invalid (28 heads OK, but 7 is neither a divisor nor a multiple of 4 KV heads)
    assert not PerfModel(m, g, 7).fits


# ---------------------------------------------------------------------------------------------
# step times
# ---------------------------------------------------------------------------------------------


def test_h100_faster_than_a100_faster_than_l4(gpus, models):
    m = models.get("llama-3.1-8b")
    pms = [PerfModel(m, gpus.get(g), 1) for g in ("H100-SXM", "A100-80GB", "L4")]
    for batch in (1, 16, 64):
        t = [pm.decode_step_time(batch, 1500) for pm in pms]
        assert t[0] < t[1] < t[2], (batch, t)
    p = [pm.prefill_time(2048) for pm in pms]
    assert p[0] < p[1] < p[2]
    s = [pm.saturation_throughput(1000, 200) for pm in pms]
    assert s[0] > s[1] > s[2] > 0


def test_tp4_faster_per_step_than_tp1_for_70b(gpus, models):
    m = models.get("llama-3.1-70b")
    for g in ("MI300X", "H100-SXM"):  # 70B fits at TP1 on MI300X (192 GB)
        tp1, tp4 = PerfModel(m, gpus.get(g), 1), PerfModel(m, gpus.get(g), 4)
        assert tp4.fits
        assert tp4.decode_step_time(32, 2000) < tp1.decode_step_time(32, 2000)
        assert tp4.prefill_time(4096) < tp1.prefill_time(4096)
    assert PerfModel(m, gpus.get("MI300X"), 1).fits


def test_decode_time_grows_with_batch_and_context(gpus, models):
    pm = PerfModel(models.get("llama-3.1-8b"), gpus.get("A100-80GB"), 1)
    b = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256], dtype=float)
    tb = pm.decode_step_time(b, 2000.0)
    assert np.all(np.diff(tb) > 0)
    c = np.array([128, 512, 2048, 8192, 32768], dtype=float)
    tc = pm.decode_step_time(32.0, c)
    assert np.all(np.diff(tc) > 0)
    # the extra context costs at least its KV-cache reads: 32 seqs x (32768-128) tokens x 128 KiB
    kv_read_s = 32 * (32768 - 128) * 131072 / (pm.gpu.hbm_bandwidth_gb_s * 1e9 * pm.gpu.efficiency.memory)
    assert tc[-1] - tc[0] >= kv_read_s * (1 - 1e-9)


def test_mixtral_decode_cheaper_than_dense_of_equal_total_params(gpus, models):
    mix = models.get("mixtral-8x7b")
    dense = ModelSpec(
        name="dense-46.7b",
        num_layers=32,
        hidden_size=4096,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=8 * 14336,
        vocab_size=32000,
    )
    assert dense.total_params == pytest.approx(mix.total_params, rel=0.01)
    g = gpus.get("H100-SXM")
    pm_mix, pm_dense = PerfModel(mix, g, 2), PerfModel(dense, g, 2)
    # batch 1 reads 2 of 8 experts per layer (12.9B of 46.7B weights); the step overhead is shared
    assert pm_mix.decode_step_time(1, 1000) < 0.7 * pm_dense.decode_step_time(1, 1000)
    for batch in (2, 4, 8, 16):
        assert pm_mix.decode_step_time(batch, 1000) < pm_dense.decode_step_time(batch, 1000)
    # large batches touch every expert: the MoE reads all its weights, like the dense model
    big_mix, big_dense = pm_mix.decode_step_time(256, 1000), pm_dense.decode_step_time(256, 1000)
    assert big_mix < big_dense and big_mix > 0.5 * big_dense
    # prefill: FLOPs follow active params (12.9B vs 46.7B)
    assert pm_mix.prefill_time(8192) < 0.5 * pm_dense.prefill_time(8192)


def test_expected_distinct_experts(gpus, models):
    pm = PerfModel(models.get("mixtral-8x7b"), gpus.get("H100-SXM"), 2)
    assert pm._experts_touched(1) == pytest.approx(2.0)  # top-2 of 8
    assert pm._experts_touched(2) == pytest.approx(8 * (1 - 0.75**2))
    assert pm._experts_touched(10_000) == pytest.approx(8.0)


def test_step_time_consistent_with_prefill_and_decode(gpus, models):
    for name, g, tp in (
        ("llama-3.1-8b", "L4", 1),
        ("llama-3.1-70b", "H100-SXM", 4),
        ("qwen3-30b-a3b", "A100-80GB", 2),
    ):
        pm = PerfModel(models.get(name), gpus.get(g), tp)
        for n in (1, 100, 4096, 8192):
            assert pm.step_time(n, 0, 0) == pytest.approx(pm.prefill_time(n))
        for b, c in ((1, 10), (32, 1500), (200, 6000)):
            assert pm.step_time(0, b, c) == pytest.approx(pm.decode_step_time(b, c))
        assert pm.step_time(0, 0, 0) == 0.0
        assert pm.decode_step_time(0, 100) == 0.0
        mixed = pm.step_time(2048, 64, 1500)
        # one pass is cheaper than a separate prefill step and decode step (weights read once)
        assert pm.prefill_time(2048) < mixed < pm.prefill_time(2048) + pm.decode_step_time(64, 1500)


def test_step_components_add_up_to_step_time(gpus, models):
    pm = PerfModel(models.get("mixtral-8x7b"), gpus.get("H100-SXM"), 4)
    for args in ((2048, 0, 0), (0, 64, 3000), (1024, 100, 8000, 4096, 1), (0, 0, 0)):
        c = pm.step_components(*args)
        total = (
            c["step_overhead"]
            + c["per_seq_overhead"]
            + max(c["linear_compute"], c["weight_read"])
            + max(c["attention_compute"], c["kv_read"])
            + c["allreduce_bandwidth"]
            + c["allreduce_latency"]
        )
        assert pm.step_time(*args) == pytest.approx(total)
    # a big prefill chunk is compute-bound, a small decode batch memory-bound
    big = pm.step_components(8192, 0, 0)
    assert big["linear_compute"] > big["weight_read"]
    small = pm.step_components(0, 4, 1000)
    assert small["weight_read"] > small["linear_compute"] and small["kv_read"] > small["attention_compute"]


def test_chunked_prefill_of_long_prompts(gpus, models):
    m, g = models.get("llama-3.1-8b"), gpus.get("H100-SXM")
    chunked = PerfModel(m, g, 1, EngineLimits(max_num_batched_tokens=2048))
    whole = PerfModel(m, g, 1, EngineLimits(max_num_batched_tokens=32768))
    n = 16384
    assert chunked.prefill_time(n) > whole.prefill_time(n)
    # 8 chunks: the 7 extra steps each cost at least the step overhead and a weight read
    assert chunked.prefill_time(n) - whole.prefill_time(n) > 7 * g.efficiency.step_overhead_ms * 1e-3
    assert chunked.prefill_time(2048) == pytest.approx(whole.prefill_time(2048))
    # the chunk offset makes later chunks dearer (attention over the cached prefix)
    assert chunked.step_time(2048, 0, 0, prefill_context_tokens=14336) > chunked.step_time(2048, 0, 0)


def test_vectorised_equals_scalar(gpus, models):
    pm = PerfModel(models.get("mixtral-8x7b"), gpus.get("A100-80GB"), 4)
    n = np.array([1.0, 17.0, 512.0, 3000.0, 9000.0])
    b = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    ctx = np.array([10.0, 100.0, 1000.0, 5000.0, 20000.0])
    np.testing.assert_allclose(
        pm.prefill_time(n, b), [pm.prefill_time(float(x), float(y)) for x, y in zip(n, b, strict=True)]
    )
    np.testing.assert_allclose(
        pm.decode_step_time(b, ctx),
        [pm.decode_step_time(float(x), float(y)) for x, y in zip(b, ctx, strict=True)],
    )
    p = np.array([0.0, 0.0, 512.0, 2048.0, 100.0])
    d = np.array([0.0, 8.0, 0.0, 32.0, 200.0])
    np.testing.assert_allclose(
        pm.step_time(p, d, ctx),
        [pm.step_time(float(x), float(y), float(z)) for x, y, z in zip(p, d, ctx, strict=True)],
    )
    assert isinstance(pm.step_time(512, 8, 1000.0), float)


# ---------------------------------------------------------------------------------------------
# power, price, throughput
# ---------------------------------------------------------------------------------------------


def test_power_and_price(gpus, models):
    pm = PerfModel(models.get("llama-2-70b"), gpus.get("A100-80GB"), 2)
    assert (
        pm.power_w("idle") == 2 * 63 and pm.power_w("prefill") == 2 * 400 and pm.power_w("decode") == 2 * 250
    )
    l4 = PerfModel(models.get("llama-3.1-8b"), gpus.get("L4"), 1)
    g = gpus.get("L4")
    assert l4.power_w("decode") == pytest.approx(g.idle_w + 0.5 * (g.tdp_w - g.idle_w))
    assert l4.power_w("idle") < l4.power_w("decode") < l4.power_w("prefill") == g.tdp_w
    with pytest.raises(ValueError, match="phase"):
        pm.power_w("busy")
    assert pm.price_per_hour() == pytest.approx(2 * 2.79)
    assert pm.price_per_hour(1.5) == pytest.approx(3.0)


def test_saturation_throughput(gpus, models):
    pm = PerfModel(models.get("llama-3.1-8b"), gpus.get("H100-SXM"), 1)
    base = pm.saturation_throughput(1000, 200)
    assert base > 0
    assert pm.saturation_throughput(1000, 400) < base
    assert pm.saturation_throughput(4000, 200) < base
    # work conservation: generated tokens per step never exceed the step's token budget
    lim = pm.limits
    d = 199.0
    n = min(lim.max_num_seqs, pm.max_batch(1000 + d / 2), lim.max_num_batched_tokens / (1 + 1000 / d))
    step = pm.step_time(n * 1000 / d, n, 1000 + d / 2, 0.0, n / d)
    assert base * d * step == pytest.approx(n, rel=1e-9)
    assert n + n * 1000 / d <= lim.max_num_batched_tokens + 1e-9
    # prefill-only requests
    assert pm.saturation_throughput(2000, 1) == pytest.approx(4 / pm.prefill_time(2000, 4))
    # without chunked prefill the phases alternate: lower throughput than one fused pass
    plain = PerfModel(
        models.get("llama-3.1-8b"), gpus.get("H100-SXM"), 1, EngineLimits(chunked_prefill=False)
    )
    assert 0 < plain.saturation_throughput(1000, 200) < base
    with pytest.raises(ValueError):
        pm.saturation_throughput(0, 10)


def test_step_time_is_cheap(gpus, models):
    import time

    pm = PerfModel(models.get("llama-3.1-8b"), gpus.get("H100-SXM"), 1)
    t0 = time.perf_counter()
    for i in range(20000):
        pm.step_time(256 + i % 7, 32, 1500.0)
    per_call = (time.perf_counter() - t0) / 20000
    assert per_call < 50e-6  # ~1 us measured; generous bound for a loaded CI machine
