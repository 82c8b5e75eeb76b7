"""Command lines for the serving engines (vLLM and SGLang) of one island.

Pure functions: an :class:`EngineConfig` (what the planner chose for an island plus what the
ModelDeployment spec asks for) becomes the container ``command`` and ``args`` of the island's pods.

Flag names and defaults come from the engines' own CLIs (``shared/reference/FACTS.md``):

* vLLM (image ``vllm/vllm-openai``, port 8000): ``vllm serve MODEL --tensor-parallel-size N
  --pipeline-parallel-size N --enable-expert-parallel --max-num-seqs N --max-num-batched-tokens N
  --gpu-memory-utilization F --max-model-len N --quantization Q --kv-cache-dtype D``;
  metrics on ``/metrics`` of the serving port, health on ``/health``.
* SGLang (image ``lmsysorg/sglang``, port 30000): ``python3 -m sglang.launch_server --model-path M
  --tp-size N --ep-size N --max-running-requests N --chunked-prefill-size N
  --mem-fraction-static F --context-length N --quantization Q --kv-cache-dtype D --enable-metrics
  --host 0.0.0.0 --port 30000``; metrics (with ``--enable-metrics``) on ``/metrics`` of the
  serving port, health on ``/health``.

The SGLang analogue of vLLM's per-step token budget ``--max-num-batched-tokens`` is
``--chunked-prefill-size`` (largest prefill chunk per forward pass); that mapping is ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

EngineName = Literal["vllm", "sglang"]

#: Default container images (FACTS.md, "Engine command lines"). The ModelDeployment spec overrides them.
DEFAULT_IMAGES: dict[str, str] = {
    "vllm": "vllm/vllm-openai:latest",
    "sglang": "lmsysorg/sglang:latest",
}
#: Serving (and metrics) port per engine (FACTS.md).
DEFAULT_PORTS: dict[str, int] = {"vllm": 8000, "sglang": 30000}
HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"

# Flags each builder sets itself; extra args may not repeat them (the spec field is the one place).
_VLLM_MANAGED = {
    "--tensor-parallel-size": "tensorParallel (chosen by the planner)",
    "--pipeline-parallel-size": "pipelineParallel",
    "--enable-expert-parallel": "expertParallel",
    "--max-num-seqs": "maxNumSeqs",
    "--max-num-batched-tokens": "maxNumBatchedTokens",
    "--gpu-memory-utilization": "gpuMemoryUtilization",
    "--max-model-len": "maxModelLen",
    "--quantization": "quantization",
    "--kv-cache-dtype": "kvCacheDtype",
    "--served-model-name": "servedModelName",
    "--host": "(fixed to 0.0.0.0)",
    "--port": "port",
}
_SGLANG_MANAGED = {
    "--model-path": "model",
    "--tp-size": "tensorParallel (chosen by the planner)",
    "--ep-size": "expertParallel",
    "--max-running-requests": "maxNumSeqs",
    "--chunked-prefill-size": "maxNumBatchedTokens",
    "--mem-fraction-static": "gpuMemoryUtilization",
    "--context-length": "maxModelLen",
    "--quantization": "quantization",
    "--kv-cache-dtype": "kvCacheDtype",
    "--served-model-name": "servedModelName",
    "--enable-metrics": "(always on)",
    "--host": "(fixed to 0.0.0.0)",
    "--port": "port",
}


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings of one island.

    Attributes:
        engine: ``"vllm"`` or ``"sglang"``.
        model: model identity passed to the engine (Hugging Face id or a path in the image).
        tensor_parallel: TP degree (GPUs per replica), >= 1.
        pipeline_parallel: pipeline-parallel degree (vLLM only; SGLang ignores it), >= 1.
        expert_parallel: shard MoE experts across the TP group (vLLM ``--enable-expert-parallel``,
            SGLang ``--ep-size = TP``).
        max_num_seqs: max concurrently running sequences per replica (vLLM ``--max-num-seqs``,
            SGLang ``--max-running-requests``), or None for the engine default.
        max_num_batched_tokens: token budget per engine step (tokens), or None.
        gpu_memory_utilization: fraction of GPU memory the engine may use, in (0, 1], or None.
        max_model_len: context length (prompt + output tokens), or None for the model's own.
        quantization: weight quantisation method (e.g. ``fp8``, ``awq``), or None.
        kv_cache_dtype: KV-cache dtype (e.g. ``fp8``), or None for the model dtype.
        served_model_name: name clients use in the OpenAI API (and the ``model_name`` metric label).
        port: serving port; None means the engine default (8000 vLLM, 30000 SGLang).
        extra_args: further flags from the spec, appended verbatim after the managed ones.
    """

    engine: EngineName
    model: str
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    expert_parallel: bool = False
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    quantization: str | None = None
    kv_cache_dtype: str | None = None
    served_model_name: str | None = None
    port: int | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def serving_port(self) -> int:
        """The port the engine listens on (also serves ``/metrics`` and ``/health``)."""
        return self.port if self.port is not None else DEFAULT_PORTS[self.engine]


def validate(cfg: EngineConfig) -> None:
    """Check an :class:`EngineConfig`; raise ``ValueError`` naming the bad field and the fix."""
    if cfg.engine not in DEFAULT_PORTS:
        raise ValueError(f"engine: {cfg.engine!r} is not supported; use 'vllm' or 'sglang'")
    if not cfg.model or not cfg.model.strip():
        raise ValueError("model: empty; set the Hugging Face id or path the engine should load")
    for name in ("tensor_parallel", "pipeline_parallel"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: {v!r} must be an integer >= 1")
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{name}: {v!r} must be a positive integer or unset")
    f = cfg.gpu_memory_utilization
    if f is not None and not (0.0 < f <= 1.0):
        raise ValueError(f"gpu_memory_utilization: {f!r} must be in (0, 1] (a fraction of GPU memory)")
    if cfg.port is not None and not (1 <= cfg.port <= 65535):
        raise ValueError(f"port: {cfg.port!r} must be in 1..65535")
    managed = _VLLM_MANAGED if cfg.engine == "vllm" else _SGLANG_MANAGED
    for arg in cfg.extra_args:
        flag = arg.split("=", 1)[0]
        if flag in managed:
            raise ValueError(
                f"extra_args: {flag} is set by Archipelago from {managed[flag]}; "
                f"remove it from the engine's extraArgs and set that field instead"
            )


def _opt(out: list[str], flag: str, value: object | None) -> None:
    if value is not None:
        out += [flag, str(value)]


def vllm_args(cfg: EngineConfig) -> list[str]:
    """Full vLLM command line, ``["vllm", "serve", MODEL, flags...]`` (FACTS.md)."""
    if cfg.engine != "vllm":
        raise ValueError(f"engine: vllm_args needs engine 'vllm', got {cfg.engine!r}")
    out = ["vllm", "serve", cfg.model, "--host", "0.0.0.0", "--port", str(cfg.serving_port)]
    out += ["--tensor-parallel-size", str(cfg.tensor_parallel)]
    if cfg.pipeline_parallel > 1:
        out += ["--pipeline-parallel-size", str(cfg.pipeline_parallel)]
    if cfg.expert_parallel:
        out.append("--enable-expert-parallel")
    _opt(out, "--max-num-seqs", cfg.max_num_seqs)
    _opt(out, "--max-num-batched-tokens", cfg.max_num_batched_tokens)
    _opt(out, "--gpu-memory-utilization", _fmt_frac(cfg.gpu_memory_utilization))
    _opt(out, "--max-model-len", cfg.max_model_len)
    _opt(out, "--quantization", cfg.quantization)
    _opt(out, "--kv-cache-dtype", cfg.kv_cache_dtype)
    _opt(out, "--served-model-name", cfg.served_model_name)
    out += list(cfg.extra_args)
    return out


def sglang_args(cfg: EngineConfig) -> list[str]:
    """Full SGLang command line, ``["python3", "-m", "sglang.launch_server", flags...]`` (FACTS.md)."""
    if cfg.engine != "sglang":
        raise ValueError(f"engine: sglang_args needs engine 'sglang', got {cfg.engine!r}")
    out = ["python3", "-m", "sglang.launch_server", "--model-path", cfg.model]
    out += ["--tp-size", str(cfg.tensor_parallel)]
    if cfg.expert_parallel:
        out += ["--ep-size", str(cfg.tensor_parallel)]
    _opt(out, "--max-running-requests", cfg.max_num_seqs)
    _opt(out, "--chunked-prefill-size", cfg.max_num_batched_tokens)
    _opt(out, "--mem-fraction-static", _fmt_frac(cfg.gpu_memory_utilization))
    _opt(out, "--context-length", cfg.max_model_len)
    _opt(out, "--quantization", cfg.quantization)
    _opt(out, "--kv-cache-dtype", cfg.kv_cache_dtype)
    _opt(out, "--served-model-name", cfg.served_model_name)
    out += ["--enable-metrics", "--host", "0.0.0.0", "--port", str(cfg.serving_port)]
    out += list(cfg.extra_args)
    return out


def command_line(cfg: EngineConfig) -> list[str]:
    """The engine's full command line for ``cfg`` (dispatches on ``cfg.engine``)."""
    return vllm_args(cfg) if cfg.engine == "vllm" else sglang_args(cfg)


def container_command(cfg: EngineConfig) -> tuple[list[str], list[str]]:
    """Split :func:`command_line` into a container ``(command, args)`` pair.

    ``command`` is the executable part (``["vllm", "serve"]`` or
    ``["python3", "-m", "sglang.launch_server"]``), ``args`` the rest, so a human reading the pod
    spec sees the flags in ``args``.
    """
    full = command_line(cfg)
    n = 2 if cfg.engine == "vllm" else 3
    return full[:n], full[n:]


def parse_flags(args: Sequence[str]) -> dict[str, str | None]:
    """Parse ``["--flag", "value", "--switch", ...]`` into ``{flag: value or None}``.

    Handy for tests and for reading back what an existing Deployment runs. Positional arguments are
    ignored. ``--flag=value`` is understood too.
    """
    out: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            if "=" in a:
                k, v = a.split("=", 1)
                out[k] = v
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                out[a] = args[i + 1]
                i += 1
            else:
                out[a] = None
        i += 1
    return out


def _fmt_frac(f: float | None) -> str | None:
    return None if f is None else f"{f:.4g}"
