"""Engine command lines (vLLM / SGLang) built from an island's settings."""

from __future__ import annotations

import pytest

from archipelago.act.engine import EngineConfig, command_line, container_command, parse_flags


def test_vllm_flags_carry_planned_settings() -> None:
    cfg = EngineConfig(engine="vllm", model="meta-llama/Llama-2-70b-hf", tensor_parallel=4, max_num_seqs=96,
                       max_num_batched_tokens=8192, gpu_memory_utilization=0.9, max_model_len=8192,
                       quantization="fp8", kv_cache_dtype="fp8", extra_args=("--enable-prefix-caching",))
    cmd, args = container_command(cfg)
    assert cmd == ["vllm", "serve"]
    assert args[0] == "meta-llama/Llama-2-70b-hf"
    f = parse_flags(args)
    assert f["--tensor-parallel-size"] == "4"
    assert f["--max-num-seqs"] == "96"
    assert f["--max-num-batched-tokens"] == "8192"
    assert f["--gpu-memory-utilization"] == "0.9"
    assert f["--max-model-len"] == "8192"
    assert f["--quantization"] == "fp8"
    assert f["--kv-cache-dtype"] == "fp8"
    assert f["--port"] == "8000"
    assert "--enable-prefix-caching" in f and args[-1] == "--enable-prefix-caching"
    assert "--pipeline-parallel-size" not in f


def test_vllm_unset_options_are_left_to_engine_defaults() -> None:
    args = command_line(EngineConfig(engine="vllm", model="m", tensor_parallel=1))
    f = parse_flags(args)
    assert set(f) == {"--host", "--port", "--tensor-parallel-size"}


def test_sglang_flags_and_metrics_enabled() -> None:
    cfg = EngineConfig(engine="sglang", model="Qwen/Qwen2-7B", tensor_parallel=2, max_num_seqs=64,
                       gpu_memory_utilization=0.85, max_model_len=4096, expert_parallel=True)
    cmd, args = container_command(cfg)
    assert cmd == ["python3", "-m", "sglang.launch_server"]
    f = parse_flags(args)
    assert f["--model-path"] == "Qwen/Qwen2-7B"
    assert f["--tp-size"] == "2"
    assert f["--ep-size"] == "2"
    assert f["--max-running-requests"] == "64"
    assert f["--mem-fraction-static"] == "0.85"
    assert f["--context-length"] == "4096"
    assert "--enable-metrics" in f and f["--enable-metrics"] is None
    assert f["--host"] == "0.0.0.0" and f["--port"] == "30000"
    assert cfg.serving_port == 30000


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"tensor_parallel": 0}, "tensor_parallel"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"max_num_seqs": -1}, "max_num_seqs"),
        ({"model": " "}, "model"),
        ({"extra_args": ("--tensor-parallel-size=2",)}, "extra_args"),
        ({"port": 70000}, "port"),
    ],
)
def test_bad_settings_name_the_field(kw: dict, field: str) -> None:
    base = {"engine": "vllm", "model": "m"}
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{**base, **kw})


def test_unknown_engine_rejected() -> None:
    with pytest.raises(ValueError, match="engine"):
        EngineConfig(engine="tgi", model="m")  # type: ignore[arg-type]
