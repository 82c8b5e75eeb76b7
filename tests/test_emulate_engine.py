"""Emulated vLLM / SGLang server: command-line parsing, OpenAI API, and real metric exposition."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from archipelago.emulate.engine import (
    SGLANG_ITL_BUCKETS,
    SGLANG_TTFT_BUCKETS,
    VLLM_ITL_BUCKETS,
    VLLM_REQUEST_LATENCY_BUCKETS,
    VLLM_TTFT_BUCKETS,
    BadRequest,
    EmulatedEngine,
    EmulatorConfigError,
    build_1_2_5_buckets,
    count_prompt_tokens,
    parse_engine_argv,
)

LLAMA8 = "meta-llama/Llama-3.1-8B-Instruct"


# ------------------------------------------------------------------------------------------------
# command lines


def test_parses_the_vllm_command_line_the_operator_renders_and_ignores_unknown_flags() -> None:
    from archipelago.act.engine import EngineConfig, command_line

    cfg = EngineConfig(engine="vllm", model=LLAMA8, tensor_parallel=2, max_num_seqs=64,
                       max_num_batched_tokens=4096, gpu_memory_utilization=0.85, max_model_len=16384,
                       extra_args=("--enable-prefix-caching", "--block-size", "32"))
    spec = parse_engine_argv(command_line(cfg), env={"ARCHIPELAGO_GPU_PRODUCT": "NVIDIA-H100-80GB-HBM3"})
    assert (spec.kind, spec.model, spec.tp, spec.port) == ("vllm", LLAMA8, 2, 8000)
    assert spec.gpu.name == "H100-SXM"
    lim = spec.limits
    assert (lim.max_num_seqs, lim.max_num_batched_tokens, lim.max_model_len) == (64, 4096, 16384)
    assert lim.gpu_memory_utilization == pytest.approx(0.85) and lim.chunked_prefill


def test_parses_the_sglang_command_line() -> None:
    from archipelago.act.engine import EngineConfig, command_line

    cfg = EngineConfig(engine="sglang", model="Qwen/Qwen2.5-7B-Instruct", tensor_parallel=1, max_num_seqs=32,
                       max_num_batched_tokens=2048, max_model_len=8192, served_model_name="qwen")
    spec = parse_engine_argv(command_line(cfg), env={}, gpu="L4")
    assert (spec.kind, spec.served_model_name, spec.port, spec.tp) == ("sglang", "qwen", 30000, 1)
    assert (spec.limits.max_num_seqs, spec.limits.max_num_batched_tokens, spec.limits.max_model_len) == (32, 2048, 8192)
    off = parse_engine_argv(["python3", "-m", "sglang.launch_server", "--model-path", "Qwen/Qwen2.5-7B-Instruct",
                             "--chunked-prefill-size", "-1", "--context-length", "4096"], env={}, gpu="L4")
    assert not off.limits.chunked_prefill


def test_gpu_from_flag_env_or_downward_api_file(tmp_path) -> None:
    argv = ["vllm", "serve", LLAMA8, "--max-model-len", "8192"]
    assert parse_engine_argv([*argv, "--gpu", "A100-80GB"], env={}).gpu.name == "A100-80GB"
    assert parse_engine_argv(argv, env={"ARCHIPELAGO_GPU": "l4"}).gpu.name == "L4"
    f = tmp_path / "annotations"
    f.write_text('prometheus.io/scrape="true"\narchipelago.dev/gpu-type="L40S"\n')
    assert parse_engine_argv(argv, env={"ARCHIPELAGO_PODINFO": str(f)}).gpu.name == "L40S"
    with pytest.raises(EmulatorConfigError, match="no GPU type"):
        parse_engine_argv(argv, env={"ARCHIPELAGO_PODINFO": str(tmp_path / "none")})
    with pytest.raises(EmulatorConfigError, match="neither a GPU catalogue key"):
        parse_engine_argv([*argv, "--gpu", "GTX-1080"], env={})


def test_bad_configurations_fail_like_an_engine_start() -> None:
    with pytest.raises(EmulatorConfigError, match="does not start.*TP>="):
        parse_engine_argv(["vllm", "serve", "meta-llama/Llama-3.1-70B-Instruct"], env={}, gpu="L4")
    with pytest.raises(EmulatorConfigError, match="--max-num-seqs 'many'"):
        parse_engine_argv(["vllm", "serve", LLAMA8, "--max-num-seqs", "many"], env={}, gpu="L4")
    with pytest.raises(EmulatorConfigError, match="unknown model"):
        parse_engine_argv(["vllm", "serve", "nobody/NoModel-1B"], env={}, gpu="L4")
    with pytest.raises(EmulatorConfigError, match="no model given"):
        parse_engine_argv(["vllm", "serve"], env={}, gpu="L4")


def test_prompt_token_counting() -> None:
    assert count_prompt_tokens({"archipelago_prompt_tokens": 1234, "prompt": "x"}, chat=False) == 1234
    assert count_prompt_tokens({"prompt": [1, 2, 3, 4, 5]}, chat=False) == 5
    assert count_prompt_tokens({"prompt": "a" * 400}, chat=False) == 100
    assert count_prompt_tokens({"messages": [{"role": "user", "content": "b" * 40}]}, chat=True) == 14
    with pytest.raises(BadRequest, match="one prompt per request"):
        count_prompt_tokens({"prompt": ["a", "b"]}, chat=False)
    with pytest.raises(BadRequest, match="archipelago_prompt_tokens"):
        count_prompt_tokens({"archipelago_prompt_tokens": 0}, chat=False)
    with pytest.raises(BadRequest, match="messages"):
        count_prompt_tokens({}, chat=True)


def test_vllm_token_buckets_are_the_1_2_5_series() -> None:
    assert build_1_2_5_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert build_1_2_5_buckets(8192)[-1] == 5000


# ------------------------------------------------------------------------------------------------
# the server


def _spec(kind: str = "vllm", **kw):
    if kind == "vllm":
        argv = ["vllm", "serve", LLAMA8, "--max-model-len", "8192", "--max-num-seqs", "16", "--port", "0",
                "--host", "127.0.0.1"]
    else:
        argv = ["python3", "-m", "sglang.launch_server", "--model-path", LLAMA8, "--context-length", "8192",
                "--port", "0", "--host", "127.0.0.1", "--enable-metrics"]
    return parse_engine_argv(argv, env={}, gpu="A100-80GB", **kw)


async def _with_engine(spec, fn):
    eng = EmulatedEngine(spec)
    port = await eng.start()
    try:
        async with aiohttp.ClientSession() as s:
            return await fn(eng, s, f"http://127.0.0.1:{port}")
    finally:
        await eng.stop()


async def _sse(resp) -> list:
    out = []
    async for raw in resp.content:
        line = raw.strip()
        if line:
            assert line.startswith(b"data: ")
            out.append(line[6:])
    return out


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_completions_latency_comes_from_the_performance_model() -> None:
    spec = _spec()

    async def go(eng, s, base):
        t0 = time.monotonic()
        async with s.post(base + "/v1/completions",
                          json={"model": LLAMA8, "prompt": "hi", "archipelago_prompt_tokens": 2000, "max_tokens": 8,
                                "stream": True}) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            first = None
            chunks = []
            async for raw in r.content:
                line = raw.strip()
                if not line:
                    continue
                if first is None:
                    first = time.monotonic() - t0
                chunks.append(line)
        total = time.monotonic() - t0
        async with s.post(base + "/v1/completions", json={"prompt": [7] * 300, "max_tokens": 3}) as r:
            body = await r.json()
        async with s.get(base + "/metrics") as r:
            metrics = await r.text()
        return first, total, chunks, body, metrics, eng.perf

    first, total, chunks, body, metrics, perf = asyncio.run(_with_engine(spec, go))
    prefill = perf.step_time(2000, 0, 0.0)
    decode = sum(perf.step_time(0, 1, 2000 + k) for k in range(7))
    assert prefill <= first <= prefill + 0.08  # wall clock: the model's TTFT plus scheduling jitter
    assert prefill + decode <= total <= prefill + decode + 0.15
    assert chunks[-1] == b"data: [DONE]"
    payloads = [json.loads(c[6:]) for c in chunks[:-1]]
    assert len(payloads) == 8 and all(p["object"] == "text_completion" for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 300, "completion_tokens": 3, "total_tokens": 303}
    assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["text"]
    fam = _families(metrics)
    ttft = fam["vllm:time_to_first_token_seconds"]
    count = [s for s in ttft.samples if s.name.endswith("_count")][0]
    assert count.value == 2 and count.labels == {"model_name": LLAMA8, "engine": "0"}
    total_sum = [s for s in ttft.samples if s.name.endswith("_sum")][0].value
    assert total_sum == pytest.approx(prefill + perf.step_time(300, 0, 0.0), rel=0.05, abs=0.03)


def test_vllm_metric_names_types_labels_and_buckets() -> None:
    async def go(eng, s, base):
        async with s.post(base + "/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}) as r:
            assert r.status == 200
            chat = await r.json()
        async with s.get(base + "/metrics") as r:
            return chat, r.headers["Content-Type"], await r.text()

    chat, ctype, text = asyncio.run(_with_engine(_spec(), go))
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    assert ctype.startswith("text/plain")
    fam = _families(text)
    expect = {
        "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge", "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter",
        "vllm:request_success": "counter", "vllm:num_preemptions": "counter",
        "vllm:time_to_first_token_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram", "vllm:request_queue_time_seconds": "histogram",
        "vllm:request_prompt_tokens": "histogram", "vllm:request_generation_tokens": "histogram",
    }
    for name, typ in expect.items():
        assert fam[name].type == typ, name
    # exposition uses the real sample names (counters end in _total exactly once)
    lines = text.splitlines()
    for sample in ("vllm:prompt_tokens_total{", "vllm:generation_tokens_total{", "vllm:num_preemptions_total{",
                   'vllm:request_success_total{engine="0",finished_reason="length"'):
        assert any(ln.startswith(sample) for ln in lines), sample
    assert not any("_total_total" in ln for ln in lines)

    def les(name):
        return [float(s.labels["le"]) for s in fam[name].samples if s.name.endswith("_bucket")][:-1]

    assert les("vllm:time_to_first_token_seconds") == list(VLLM_TTFT_BUCKETS)
    assert les("vllm:inter_token_latency_seconds") == list(VLLM_ITL_BUCKETS)
    assert les("vllm:e2e_request_latency_seconds") == list(VLLM_REQUEST_LATENCY_BUCKETS)
    assert les("vllm:request_prompt_tokens") == build_1_2_5_buckets(8192)
    gen = [s for s in fam["vllm:generation_tokens"].samples if s.name == "vllm:generation_tokens_total"][0]
    assert gen.value == 4
    itl = [s for s in fam["vllm:inter_token_latency_seconds"].samples if s.name.endswith("_count")][0]
    assert itl.value == 3  # tokens after the first


def test_sglang_metric_names_and_streaming_chat() -> None:
    async def go(eng, s, base):
        async with s.post(base + "/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "x" * 80}], "max_tokens": 3, "stream": True,
                                "stream_options": {"include_usage": True}}) as r:
            lines = await _sse(r)
        async with s.get(base + "/metrics") as r:
            return lines, await r.text()

    lines, text = asyncio.run(_with_engine(_spec("sglang"), go))
    assert lines[-1] == b"[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"] == {"prompt_tokens": 24, "completion_tokens": 3, "total_tokens": 27}
    assert chunks[-1]["choices"] == [] and chunks[-2]["choices"][0]["finish_reason"] == "length"
    fam = _families(text)
    for name, typ in {"sglang:num_running_reqs": "gauge", "sglang:num_queue_reqs": "gauge",
                      "sglang:token_usage": "gauge", "sglang:gen_throughput": "gauge",
                      "sglang:cache_hit_rate": "gauge", "sglang:prompt_tokens": "counter",
                      "sglang:generation_tokens": "counter", "sglang:num_requests": "counter",
                      "sglang:time_to_first_token_seconds": "histogram",
                      "sglang:inter_token_latency_seconds": "histogram",
                      "sglang:e2e_request_latency_seconds": "histogram"}.items():
        assert fam[name].type == typ, name
    assert any(ln.startswith('sglang:num_requests_total{model_name="' + LLAMA8 + '"} 1.0') for ln in text.splitlines())
    les = [float(s.labels["le"]) for s in fam["sglang:time_to_first_token_seconds"].samples
           if s.name.endswith("_bucket")][:-1]
    assert les == [float(x) for x in SGLANG_TTFT_BUCKETS]
    les = [float(s.labels["le"]) for s in fam["sglang:inter_token_latency_seconds"].samples
           if s.name.endswith("_bucket")][:-1]
    assert les == list(SGLANG_ITL_BUCKETS)
    assert not any(n.startswith("vllm:") for n in fam)


def test_errors_health_models_and_queueing_gauges() -> None:
    async def go(eng, s, base):
        out = {}
        async with s.get(base + "/health") as r:
            out["health"] = r.status
        async with s.get(base + "/v1/models") as r:
            out["models"] = await r.json()
        async with s.post(base + "/v1/completions", json={"model": "other", "prompt": "x"}) as r:
            out["404"] = (r.status, await r.json())
        async with s.post(base + "/v1/completions", json={"prompt": "x", "archipelago_prompt_tokens": 9000}) as r:
            out["long"] = (r.status, await r.json())
        async with s.post(base + "/v1/completions", data=b"{nope") as r:
            out["json"] = r.status
        async with s.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": -1}) as r:
            out["neg"] = (r.status, (await r.json())["message"])
        # 20 long requests on max_num_seqs=16: 4 must wait
        tasks = [asyncio.create_task(s.post(base + "/v1/completions",
                                            json={"prompt": "x", "archipelago_prompt_tokens": 100, "max_tokens": 400}))
                 for _ in range(20)]
        await asyncio.sleep(0.5)
        async with s.get(base + "/metrics") as r:
            out["busy"] = _families(await r.text())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(1.0)  # the server notices the closed connections and aborts
        async with s.get(base + "/metrics") as r:
            out["after"] = _families(await r.text())
        return out

    out = asyncio.run(_with_engine(_spec(speedup=1.0), go))
    assert out["health"] == 200
    assert out["models"]["data"][0]["id"] == LLAMA8 and out["models"]["data"][0]["max_model_len"] == 8192
    assert out["404"][0] == 404 and out["404"][1]["object"] == "error"
    assert out["long"][0] == 400 and "maximum context length is 8192" in out["long"][1]["message"]
    assert out["json"] == 400
    assert out["neg"] == (400, "max_tokens: expected an integer >= 1, got -1")
    busy = out["busy"]

    def val(name):
        return busy[name].samples[0].value

    assert val("vllm:num_requests_running") == 16 and val("vllm:num_requests_waiting") == 4
    assert 0 < val("vllm:kv_cache_usage_perc") < 1
    after = out["after"]
    aborted = [x for x in after["vllm:request_success"].samples
               if x.name == "vllm:request_success_total" and x.labels["finished_reason"] == "abort"][0]
    assert aborted.value == 20
    assert after["vllm:num_requests_running"].samples[0].value == 0
    assert after["vllm:kv_cache_usage_perc"].samples[0].value == 0


def test_speedup_compresses_wall_time_but_metrics_stay_in_model_seconds() -> None:
    spec = _spec(speedup=20.0)

    async def go(eng, s, base):
        t0 = time.monotonic()
        async with s.post(base + "/v1/completions", json={"prompt": "x", "archipelago_prompt_tokens": 1000,
                                                          "max_tokens": 200}) as r:
            await r.json()
        wall = time.monotonic() - t0
        async with s.get(base + "/metrics") as r:
            return wall, _families(await r.text()), eng.perf

    wall, fam, perf = asyncio.run(_with_engine(spec, go))
    model_e2e = perf.step_time(1000, 0, 0.0) + sum(perf.step_time(0, 1, 1000 + k) for k in range(199))
    e2e_sum = [s for s in fam["vllm:e2e_request_latency_seconds"].samples if s.name.endswith("_sum")][0].value
    assert e2e_sum == pytest.approx(model_e2e, rel=0.05)
    assert wall < model_e2e / 5


def test_slowdown_makes_every_step_slower_than_the_performance_model() -> None:
    """Fault injection (``--slowdown`` / the fleet emulator's ``GPU=FACTOR``): steps take FACTOR x the model's time."""
    spec = parse_engine_argv(
        ["vllm", "serve", LLAMA8, "--max-model-len", "8192", "--port", "0", "--host", "127.0.0.1", "--slowdown", "3"],
        env={}, gpu="A100-80GB")
    assert spec.slowdown == 3.0

    async def go(eng, s, base):
        t0 = time.monotonic()
        async with s.post(base + "/v1/completions", json={"prompt": "hi", "archipelago_prompt_tokens": 4000,
                                                          "max_tokens": 1}) as r:
            assert r.status == 200
        return time.monotonic() - t0, eng.perf

    took, perf = asyncio.run(_with_engine(spec, go))
    modelled = spec.perf().step_time(4000, 0, 0.0)
    assert perf.step_time(4000, 0, 0.0) == pytest.approx(3 * modelled)
    assert 3 * modelled <= took <= 3 * modelled + 0.1
    assert perf.kv_capacity_tokens == spec.perf().kv_capacity_tokens  # only time changes
    with pytest.raises(EmulatorConfigError, match="slowdown"):
        parse_engine_argv(["vllm", "serve", LLAMA8, "--slowdown", "0"], env={}, gpu="A100-80GB")
