"""Emulated vLLM / SGLang server for one pod: OpenAI API, ``/health`` and the engine's real ``/metrics``.

The process impersonates one serving replica (one engine on ``tp`` GPUs of one type). Latencies come
from the performance model (:class:`archipelago.decide.perf.PerfModel`) for the pod's GPU type and TP
degree; requests are batched and queued by :class:`~archipelago.emulate.scheduler.BatchScheduler`,
which follows the simulator's continuous-batching rules, driven in real time by an asyncio loop
(each engine step sleeps for its modelled duration, divided by an optional speed-up factor).

HTTP API (aiohttp)
------------------
* ``POST /v1/completions`` and ``POST /v1/chat/completions``: OpenAI-compatible, non-streaming and
  ``"stream": true`` (server-sent events ``data: {...}`` then ``data: [DONE]``; with
  ``stream_options.include_usage`` a last chunk carries ``usage``). Prompt length, tokens: the
  extension field ``archipelago_prompt_tokens`` if given; else a ``prompt`` given as token ids
  (exact); else estimated from text length at :data:`CHARS_PER_TOKEN` characters per token (chat:
  plus :data:`CHAT_TOKENS_PER_MESSAGE` template tokens per message). Output length: ``max_tokens``
  (chat also ``max_completion_tokens``), generated to the end as with ``ignore_eos`` (finish reason
  ``length``); without it, ``default_output_tokens`` (finish reason ``stop``, emulating EOS).
  Errors use vLLM's JSON error shape (``{"object": "error", "message", "type", "code"}``).
* ``GET /health`` (200 once serving), ``GET /v1/models``, ``GET /version``.
* ``GET /metrics``: Prometheus text exposition from a per-server ``CollectorRegistry`` with the
  engine's real metric names, types, labels and histogram buckets:

  - vLLM v1 (labels ``model_name``, ``engine``; source ``vllm/v1/metrics/loggers.py``): gauges
    ``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``;
    counters ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``,
    ``vllm:request_success_total{finished_reason}``, ``vllm:num_preemptions_total``; histograms
    ``vllm:time_to_first_token_seconds``, ``vllm:inter_token_latency_seconds``,
    ``vllm:e2e_request_latency_seconds``, ``vllm:request_queue_time_seconds``,
    ``vllm:request_prompt_tokens``, ``vllm:request_generation_tokens``.
  - SGLang (label ``model_name``; source ``python/sglang/srt/metrics/collector.py``): gauges
    ``sglang:num_running_reqs``, ``sglang:num_queue_reqs``, ``sglang:token_usage``,
    ``sglang:gen_throughput``, ``sglang:cache_hit_rate``; counters ``sglang:prompt_tokens_total``,
    ``sglang:generation_tokens_total``, ``sglang:num_requests_total``; histograms
    ``sglang:time_to_first_token_seconds``, ``sglang:inter_token_latency_seconds``,
    ``sglang:e2e_request_latency_seconds``.

Time: all metrics are in *emulated* seconds (wall seconds x ``speedup``). With ``speedup=1`` they
are wall-clock seconds, as a client measures them.

Command line: :func:`parse_engine_argv` reads the real engines' command lines
(``vllm serve MODEL --tensor-parallel-size N ...``, ``python3 -m sglang.launch_server --model-path M
--tp-size N ...``) and ignores flags it does not model, so the emulator can replace the engine binary
in a container; the GPU type comes from ``--gpu`` or the ``ARCHIPELAGO_GPU`` /
``ARCHIPELAGO_GPU_PRODUCT`` environment variables or a downward-API annotations file.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from archipelago.decide.catalog import (
    CatalogError,
    GPUSpec,
    ModelSpec,
    load_gpu_catalog,
    load_model_catalog,
)
from archipelago.decide.perf import EngineLimits, PerfModel
from archipelago.emulate.scheduler import BatchScheduler, EmuRequest, RequestRejected, StepOutcome

__all__ = [
    "EngineKind",
    "EmulatorConfigError",
    "EngineSpec",
    "parse_engine_argv",
    "resolve_gpu",
    "EngineMetrics",
    "EmulatedEngine",
    "count_prompt_tokens",
    "serve",
    "CHARS_PER_TOKEN",
    "CHAT_TOKENS_PER_MESSAGE",
    "PROMPT_TOKENS_FIELD",
    "VLLM_TTFT_BUCKETS",
    "VLLM_ITL_BUCKETS",
    "VLLM_REQUEST_LATENCY_BUCKETS",
    "SGLANG_TTFT_BUCKETS",
    "SGLANG_ITL_BUCKETS",
    "SGLANG_E2E_BUCKETS",
    "build_1_2_5_buckets",
]

EngineKind = Literal["vllm", "sglang"]

#: Characters per token when a prompt's length must be estimated from its text. ~4 characters of
#: English per token is OpenAI's rule of thumb ("What are tokens and how to count them?", OpenAI
#: help centre); Llama-3's 128k-vocabulary tokenizer is close to it on English prose.
CHARS_PER_TOKEN = 4.0
#: Chat-template tokens added per message (role header and separators); OpenAI's cookbook
#: "How to count tokens with tiktoken" counts 3-4 per message for its chat models.
CHAT_TOKENS_PER_MESSAGE = 4
#: Request field carrying an explicit prompt length (tokens); an emulator extension.
PROMPT_TOKENS_FIELD = "archipelago_prompt_tokens"
#: Output length when a request gives no ``max_tokens``, tokens (emulates the model's EOS).
DEFAULT_OUTPUT_TOKENS = 128

#: vLLM v1 ``vllm:time_to_first_token_seconds`` buckets (``vllm/v1/metrics/loggers.py``), seconds.
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                     7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
#: vLLM v1 ``vllm:inter_token_latency_seconds`` buckets, seconds.
VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)
#: vLLM v1 ``request_latency_buckets`` (e2e and queue-time histograms), seconds.
VLLM_REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
#: SGLang ``TokenizerMetricsCollector`` default TTFT buckets, seconds.
SGLANG_TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
#: SGLang default inter-token-latency buckets, seconds.
SGLANG_ITL_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060,
                      0.080, 0.100, 0.200, 0.400, 0.600, 0.800, 1.000, 2.000, 4.000, 6.000, 8.000)
#: SGLang default end-to-end latency buckets, seconds.
SGLANG_E2E_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200,
                      1800, 2400)

DEFAULT_PORTS = {"vllm": 8000, "sglang": 30000}
#: Downward-API annotations file read for ``archipelago.dev/gpu-type`` when no flag/env gives the GPU.
PODINFO_ANNOTATIONS = "/etc/podinfo/annotations"
GPU_TYPE_ANNOTATION = "archipelago.dev/gpu-type"

_WORDS = (" the", " of", " and", " to", " in", " is", " for", " on", " as", " it", " an", " by")


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1-2-5 series up to ``max_value`` (inclusive): 1, 2, 5, 10, 20, 50, ... -- vLLM's token-count
    histogram buckets (``build_1_2_5_buckets`` in ``vllm/v1/metrics/loggers.py``).

    Raises:
        ValueError: ``max_value`` < 1.
    """
    if max_value < 1:
        raise ValueError(f"max_value must be >= 1, got {max_value}")
    out: list[int] = []
    for e in itertools.count():
        for m in (1, 2, 5):
            v = m * 10**e
            if v > max_value:
                return out
            out.append(v)
    return out  # pragma: no cover


class EmulatorConfigError(ValueError):
    """The emulator cannot start: unknown model or GPU, bad flag value, or the model does not fit.
    The message names the flag / environment variable and the fix."""


# --------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class EngineSpec:
    """What one emulated engine serves and how fast.

    Attributes:
        kind: ``vllm`` or ``sglang`` (metric names, default port, ``owned_by``).
        model: model as given on the command line (Hugging Face id or path).
        served_model_name: name clients use and the ``model_name`` metric label.
        model_spec: architecture from the model catalogue.
        gpu: GPU specification from the GPU catalogue.
        tp: tensor-parallel degree (GPUs), >= 1.
        limits: engine limits (:class:`EngineLimits`) from the flags.
        host / port: listen address (port 0 = pick a free port).
        speedup: emulated seconds per wall second (> 0); 1 = real time.
        default_output_tokens: output length of requests without ``max_tokens``, tokens.
        startup_delay_s: seconds (wall) before ``/health`` turns 200, emulating model loading.
        slowdown: every engine step takes this many times the performance model's time (> 0; 1 = as
            modelled). Fault injection: a GPU slower than the operator's model of it (throttling, an
            older driver, a catalogue entry that is wrong), to test that the operator notices.
    """

    kind: EngineKind
    model: str
    served_model_name: str
    model_spec: ModelSpec
    gpu: GPUSpec
    tp: int = 1
    limits: EngineLimits = field(default_factory=EngineLimits)
    host: str = "0.0.0.0"
    port: int = 8000
    speedup: float = 1.0
    default_output_tokens: int = DEFAULT_OUTPUT_TOKENS
    startup_delay_s: float = 0.0
    slowdown: float = 1.0

    def __post_init__(self) -> None:
        if not self.slowdown > 0:
            raise EmulatorConfigError(f"--slowdown: {self.slowdown} must be > 0 (1 = as modelled)")

    def perf(self) -> PerfModel:
        """The performance model of this replica (:class:`PerfModel`)."""
        return PerfModel(self.model_spec, self.gpu, self.tp, self.limits)

    def served_perf(self) -> Any:
        """The model the engine actually runs at: :meth:`perf`, with step times x ``slowdown``."""
        p = self.perf()
        return p if self.slowdown == 1.0 else SlowedPerf(p, self.slowdown)


class SlowedPerf:
    """A performance model whose steps take ``factor`` times longer (``EngineSpec.slowdown``); every other
    attribute (memory, KV capacity, fit) is the wrapped model's."""

    def __init__(self, perf: PerfModel, factor: float) -> None:
        self._perf, self.factor = perf, float(factor)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._perf, name)

    def step_time(self, *args: Any, **kwargs: Any) -> float:
        """The wrapped model's ``step_time`` x ``factor`` (seconds)."""
        return float(self._perf.step_time(*args, **kwargs)) * self.factor


# flags taking a value that the emulator reads (both engines); everything else is ignored
_VALUE_FLAGS = {
    "--model", "--model-path", "--served-model-name", "--tensor-parallel-size", "-tp", "--tp-size", "--tp",
    "--max-num-seqs", "--max-running-requests", "--max-num-batched-tokens", "--chunked-prefill-size",
    "--gpu-memory-utilization", "--mem-fraction-static", "--max-model-len", "--context-length",
    "--quantization", "-q", "--kv-cache-dtype", "--host", "--port", "--gpu", "--speedup", "--slowdown", "--engine",
    "--default-output-tokens", "--startup-delay", "--pipeline-parallel-size", "-pp",
}
_SWITCH_FLAGS = {"--enable-chunked-prefill", "--no-enable-chunked-prefill", "--enable-expert-parallel",
                 "--enable-metrics", "--disable-chunked-prefill"}


def _scan(argv: Sequence[str]) -> tuple[list[str], dict[str, str | None]]:
    """Split argv into positionals and ``{flag: value}`` (last occurrence wins; unknown flags kept
    with the following token as value when it does not start with ``-``)."""
    pos: list[str] = []
    flags: dict[str, str | None] = {}
    i = 0
    args = list(argv)
    while i < len(args):
        a = args[i]
        if a.startswith("-") and len(a) > 1 and not _is_number(a):
            if "=" in a and a.startswith("--"):
                k, v = a.split("=", 1)
                flags[k] = v
            elif a in _SWITCH_FLAGS:
                flags[a] = None
            elif a == "-m":  # python3 -m module
                if i + 1 < len(args):
                    pos.append(args[i + 1])
                    i += 1
            elif i + 1 < len(args) and (not args[i + 1].startswith("-") or _is_number(args[i + 1])):
                flags[a] = args[i + 1]
                i += 1
            else:
                flags[a] = None
        else:
            pos.append(a)
        i += 1
    return pos, flags


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _int_flag(flags: Mapping[str, str | None], names: Sequence[str], minimum: int = 1) -> int | None:
    for n in names:
        if n in flags:
            v = flags[n]
            try:
                x = int(str(v))
            except ValueError:
                raise EmulatorConfigError(f"{n} {v!r}: expected an integer >= {minimum}") from None
            if x < minimum:
                raise EmulatorConfigError(f"{n} {x}: must be >= {minimum}")
            return x
    return None


def _float_flag(flags: Mapping[str, str | None], names: Sequence[str], lo: float, hi: float) -> float | None:
    for n in names:
        if n in flags:
            v = flags[n]
            try:
                x = float(str(v))
            except ValueError:
                raise EmulatorConfigError(f"{n} {v!r}: expected a number in ({lo:g}, {hi:g}]") from None
            if not (lo < x <= hi):
                raise EmulatorConfigError(f"{n} {x}: must be in ({lo:g}, {hi:g}]")
            return x
    return None


def resolve_gpu(name_or_label: str, catalog_path: str | Path | None = None) -> GPUSpec:
    """GPU spec from a catalogue key (``H100-SXM``) or a node-label value (``NVIDIA-H100-80GB-HBM3``).

    Raises:
        EmulatorConfigError: no catalogue GPU has that name or product label (lists what is known).
    """
    cat = load_gpu_catalog(catalog_path)
    try:
        return cat.get(name_or_label)
    except CatalogError:
        pass
    try:
        return cat.by_product_label(name_or_label)
    except CatalogError as exc:
        raise EmulatorConfigError(
            f"GPU {name_or_label!r} is neither a GPU catalogue key ({', '.join(cat.names())}) nor a known "
            f"node label value: {exc}"
        ) from None


def _gpu_from_podinfo(path: str) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            if k.strip() == GPU_TYPE_ANNOTATION:
                return v.strip().strip('"')
    return None


def parse_engine_argv(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    gpu: str | None = None,
    kind: str | None = None,
    speedup: float | None = None,
    host: str | None = None,
    port: int | None = None,
    models_path: str | Path | None = None,
    gpus_path: str | Path | None = None,
) -> EngineSpec:
    """Build an :class:`EngineSpec` from a real engine command line.

    Accepted forms: ``vllm serve MODEL [flags]``, ``serve MODEL [flags]``, ``python3 -m
    sglang.launch_server [flags]``, ``sglang.launch_server [flags]``, or flags only with ``--engine``
    and ``--model``/``--model-path``. Read flags: vLLM ``--tensor-parallel-size/-tp``, ``--max-num-seqs``,
    ``--max-num-batched-tokens``, ``--gpu-memory-utilization``, ``--max-model-len``, ``--quantization``,
    ``--kv-cache-dtype``, ``--[no-]enable-chunked-prefill``, ``--served-model-name``, ``--host``,
    ``--port``; SGLang ``--model-path``, ``--tp-size``, ``--max-running-requests``,
    ``--chunked-prefill-size``, ``--mem-fraction-static``, ``--context-length``; emulator ``--gpu``,
    ``--speedup``, ``--slowdown``, ``--default-output-tokens``, ``--startup-delay`` (seconds). Other flags
    are ignored.

    The GPU type, first found: ``gpu`` argument, ``--gpu``, ``ARCHIPELAGO_GPU`` (catalogue key or
    label value), ``ARCHIPELAGO_GPU_PRODUCT`` (``nvidia.com/gpu.product`` value), the
    ``archipelago.dev/gpu-type`` line of the downward-API file ``ARCHIPELAGO_PODINFO``
    (default ``/etc/podinfo/annotations``).

    Keyword arguments override the command line. ``--max-model-len`` defaults to the longest context
    the replica's KV cache holds, capped at the model's maximum (what the operator would emit).

    Raises:
        EmulatorConfigError: no model, unknown model or GPU, bad flag values, or a model that does not
            fit on ``tp`` GPUs (as a real engine fails at start-up).
    """
    env = os.environ if env is None else env
    pos, flags = _scan(argv)
    k = kind or flags.get("--engine")
    model = flags.get("--model") or flags.get("--model-path")
    if pos and Path(pos[0]).name in ("vllm", "python", "python3") or (pos and pos[0].startswith("python")):
        pos = pos[1:]
    if pos and pos[0] == "serve":
        k = k or "vllm"
        if len(pos) > 1 and not model:
            model = pos[1]
    elif pos and pos[0] in ("sglang.launch_server", "sglang"):
        k = k or "sglang"
    if k is None:
        k = "sglang" if "--model-path" in flags or "--tp-size" in flags else "vllm"
    if k not in DEFAULT_PORTS:
        raise EmulatorConfigError(f"--engine {k!r}: use 'vllm' or 'sglang'")
    if not model:
        hint = "vllm serve MODEL" if k == "vllm" else "--model-path MODEL"
        raise EmulatorConfigError(f"no model given; pass it as `{hint}`")
    try:
        mspec = load_model_catalog(models_path).get(str(model))
    except CatalogError as exc:
        raise EmulatorConfigError(f"model {model!r}: {exc}") from None

    gname = gpu or flags.get("--gpu") or env.get("ARCHIPELAGO_GPU") or env.get("ARCHIPELAGO_GPU_PRODUCT")
    if not gname:
        gname = _gpu_from_podinfo(env.get("ARCHIPELAGO_PODINFO", PODINFO_ANNOTATIONS))
    if not gname:
        raise EmulatorConfigError(
            "no GPU type: pass --gpu H100-SXM (catalogue key or nvidia.com/gpu.product value) or set "
            "ARCHIPELAGO_GPU / ARCHIPELAGO_GPU_PRODUCT (e.g. from the node label or the pod annotation "
            f"{GPU_TYPE_ANNOTATION} via the downward API)"
        )
    gspec = resolve_gpu(str(gname), gpus_path)

    tp = _int_flag(flags, ("--tensor-parallel-size", "-tp", "--tp-size", "--tp")) or 1
    pp = _int_flag(flags, ("--pipeline-parallel-size", "-pp")) or 1
    if pp > 1:
        raise EmulatorConfigError(f"--pipeline-parallel-size {pp}: the emulator models tensor parallelism only")
    chunked = True
    if "--no-enable-chunked-prefill" in flags or "--disable-chunked-prefill" in flags or flags.get("--enable-chunked-prefill") in ("false", "False", "0"):
        chunked = False
    if k == "sglang" and flags.get("--chunked-prefill-size") == "-1":
        chunked = False  # SGLang: -1 disables chunked prefill
        flags = {kk: vv for kk, vv in flags.items() if kk != "--chunked-prefill-size"}
    base = EngineLimits()
    kw: dict[str, Any] = {"chunked_prefill": chunked}
    v = _int_flag(flags, ("--max-num-seqs", "--max-running-requests"))
    if v is not None:
        kw["max_num_seqs"] = v
    v = _int_flag(flags, ("--max-num-batched-tokens", "--chunked-prefill-size"))
    if v is not None:
        kw["max_num_batched_tokens"] = v
    f = _float_flag(flags, ("--gpu-memory-utilization", "--mem-fraction-static"), 0.0, 1.0)
    if f is not None:
        kw["gpu_memory_utilization"] = f
    v = _int_flag(flags, ("--max-model-len", "--context-length"))
    if v is not None:
        kw["max_model_len"] = v
    q = flags.get("--quantization") or flags.get("-q")
    if q:
        kw["quantization"] = q
    kvd = flags.get("--kv-cache-dtype")
    if kvd and kvd != "auto":
        kw["kv_cache_dtype"] = kvd
    try:
        limits = replace(base, **kw)
    except ValueError as exc:
        raise EmulatorConfigError(f"engine flags: {exc}") from None
    try:
        perf = PerfModel(mspec, gspec, tp, limits)
    except ValueError as exc:
        raise EmulatorConfigError(f"--tensor-parallel-size: {exc}") from None
    if not perf.fits:
        raise EmulatorConfigError(f"{mspec.name} on {tp}x {gspec.name} does not start: {perf.fit_error}")
    if limits.max_model_len is None:
        limits = replace(limits, max_model_len=perf.max_model_len_fit)

    sp = speedup if speedup is not None else _float_flag(flags, ("--speedup",), 0.0, 1e6)
    if sp is None:
        env_sp = env.get("ARCHIPELAGO_SPEEDUP")
        sp = _float_flag({"ARCHIPELAGO_SPEEDUP": env_sp}, ("ARCHIPELAGO_SPEEDUP",), 0.0, 1e6) if env_sp else 1.0
    served = flags.get("--served-model-name") or str(model)
    listen_port = port if port is not None else _int_flag(flags, ("--port",), minimum=0)
    return EngineSpec(
        kind=k,  # type: ignore[arg-type]
        model=str(model),
        served_model_name=str(served),
        model_spec=mspec,
        gpu=gspec,
        tp=tp,
        limits=limits,
        host=host or flags.get("--host") or "0.0.0.0",
        port=DEFAULT_PORTS[k] if listen_port is None else listen_port,
        speedup=float(sp),
        default_output_tokens=_int_flag(flags, ("--default-output-tokens",)) or DEFAULT_OUTPUT_TOKENS,
        startup_delay_s=_float_flag(flags, ("--startup-delay",), -1e-9, 1e6) or 0.0,
        slowdown=_float_flag(flags, ("--slowdown",), 0.0, 1e6) or 1.0,
    )


# --------------------------------------------------------------------------------------------------
# metrics


class EngineMetrics:
    """The engine's Prometheus metrics in their own :class:`CollectorRegistry`.

    Args:
        kind: ``vllm`` or ``sglang``: selects names, labels and buckets (module docstring).
        model_name: value of the ``model_name`` label (the served model name).
        max_model_len: upper end of vLLM's 1-2-5 token-count buckets, tokens.

    Methods take emulated seconds and token counts; :meth:`exposition` renders the text format.
    """

    def __init__(self, kind: str, model_name: str, max_model_len: int) -> None:
        self.kind = kind
        self.registry = CollectorRegistry()
        r = self.registry
        self._gen_window: list[tuple[float, int]] = []
        if kind == "vllm":
            ln = ["model_name", "engine"]
            lv = (model_name, "0")
            self.running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                                 ln, registry=r).labels(*lv)
            self.waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                                 ln, registry=r).labels(*lv)
            self.kv = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                            ln, registry=r).labels(*lv)
            self.preempt = Counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                                   ln, registry=r).labels(*lv)
            self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                                         ln, registry=r).labels(*lv)
            self.gen_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                      ln, registry=r).labels(*lv)
            succ = Counter("vllm:request_success", "Count of successfully processed requests.",
                           [*ln, "finished_reason"], registry=r)
            self.success = {reason: succ.labels(*lv, reason) for reason in ("stop", "length", "abort")}
            tok_buckets = build_1_2_5_buckets(max(1, int(max_model_len)))
            self.h_prompt = Histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                      ln, buckets=tok_buckets, registry=r).labels(*lv)
            self.h_gen = Histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                   ln, buckets=tok_buckets, registry=r).labels(*lv)
            self.h_ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                                    ln, buckets=VLLM_TTFT_BUCKETS, registry=r).labels(*lv)
            self.h_itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                                   ln, buckets=VLLM_ITL_BUCKETS, registry=r).labels(*lv)
            self.h_e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                                   ln, buckets=VLLM_REQUEST_LATENCY_BUCKETS, registry=r).labels(*lv)
            self.h_queue = Histogram("vllm:request_queue_time_seconds",
                                     "Histogram of time spent in WAITING phase for request.",
                                     ln, buckets=VLLM_REQUEST_LATENCY_BUCKETS, registry=r).labels(*lv)
            self.num_requests = None
            self.gen_throughput = None
        elif kind == "sglang":
            ln = ["model_name"]
            lv = (model_name,)
            self.running = Gauge("sglang:num_running_reqs", "The number of running requests.", ln,
                                 registry=r).labels(*lv)
            self.waiting = Gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.", ln,
                                 registry=r).labels(*lv)
            self.kv = Gauge("sglang:token_usage", "The token usage.", ln, registry=r).labels(*lv)
            self.gen_throughput = Gauge("sglang:gen_throughput", "The generation throughput (token/s).", ln,
                                        registry=r).labels(*lv)
            Gauge("sglang:cache_hit_rate", "The prefix cache hit rate.", ln, registry=r).labels(*lv).set(0.0)
            self.prompt_tokens = Counter("sglang:prompt_tokens_total", "Number of prefill tokens processed.", ln,
                                         registry=r).labels(*lv)
            self.gen_tokens = Counter("sglang:generation_tokens_total", "Number of generation tokens processed.",
                                      ln, registry=r).labels(*lv)
            self.num_requests = Counter("sglang:num_requests_total", "Number of requests processed.", ln,
                                        registry=r).labels(*lv)
            self.h_ttft = Histogram("sglang:time_to_first_token_seconds",
                                    "Histogram of time to first token in seconds.", ln,
                                    buckets=SGLANG_TTFT_BUCKETS, registry=r).labels(*lv)
            self.h_itl = Histogram("sglang:inter_token_latency_seconds",
                                   "Histogram of inter-token latency in seconds.", ln,
                                   buckets=SGLANG_ITL_BUCKETS, registry=r).labels(*lv)
            self.h_e2e = Histogram("sglang:e2e_request_latency_seconds",
                                   "Histogram of End-to-end request latency in seconds", ln,
                                   buckets=SGLANG_E2E_BUCKETS, registry=r).labels(*lv)
            self.preempt = self.h_prompt = self.h_gen = self.h_queue = None
            self.success = {}
        else:
            raise ValueError(f"kind must be 'vllm' or 'sglang', got {kind!r}")

    def record_step(self, out: StepOutcome, running: int, waiting: int, kv_usage: float, now: float) -> None:
        """Update counters, histograms and gauges after one engine step ending at ``now`` (seconds)."""
        n_tok = len(out.tokens)
        if n_tok:
            self.gen_tokens.inc(n_tok)
        for r in out.first_tokens:
            self.prompt_tokens.inc(r.prompt_tokens)
            self.h_ttft.observe(max(0.0, r.first_token - r.arrival))
        for r in out.tokens:
            if r.prev_token is not None:
                self.h_itl.observe(max(0.0, r.last_token - r.prev_token))
        if out.preempted and self.preempt is not None:
            self.preempt.inc(len(out.preempted))
        for r in out.finished:
            self.record_finished(r)
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv.set(kv_usage)
        if self.gen_throughput is not None:
            self._gen_window.append((now, n_tok))
            while self._gen_window and self._gen_window[0][0] < now - 5.0:
                self._gen_window.pop(0)
            span = max(1e-9, min(5.0, now - self._gen_window[0][0])) if len(self._gen_window) > 1 else 5.0
            self.gen_throughput.set(sum(x for _, x in self._gen_window) / span)

    def record_finished(self, r: EmuRequest) -> None:
        """Observe a finished (or aborted) request: success counter, e2e, queue time, lengths."""
        e2e = max(0.0, (r.finished or r.arrival) - r.arrival)
        if self.kind == "vllm":
            self.success[r.finish_reason or "abort"].inc()
            self.h_e2e.observe(e2e)
            if r.first_scheduled is not None:
                self.h_queue.observe(max(0.0, r.first_scheduled - r.arrival))
            self.h_prompt.observe(r.prompt_tokens)
            self.h_gen.observe(r.generated)
        else:
            self.num_requests.inc()
            self.h_e2e.observe(e2e)

    def set_idle(self, running: int, waiting: int, kv_usage: float) -> None:
        """Refresh the gauges (e.g. after an abort)."""
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv.set(kv_usage)
        if self.gen_throughput is not None and running == 0:
            self.gen_throughput.set(0.0)

    def exposition(self) -> bytes:
        """Prometheus text format of this engine's registry."""
        return generate_latest(self.registry)


# --------------------------------------------------------------------------------------------------
# request parsing


class BadRequest(ValueError):
    """A malformed API request (HTTP 400); the message names the field."""


def _text_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def count_prompt_tokens(body: Mapping[str, Any], chat: bool) -> int:
    """Prompt length of an OpenAI request body, tokens (>= 1).

    Order: ``archipelago_prompt_tokens`` (int >= 1); completions ``prompt`` as token ids (list of ints,
    or a one-element list of such a list: exact) or text (``ceil(chars / CHARS_PER_TOKEN)``); chat
    ``messages``: text length of every content part / CHARS_PER_TOKEN + CHAT_TOKENS_PER_MESSAGE per
    message.

    Raises:
        BadRequest: missing/ill-typed ``prompt``/``messages``, several prompts in one request, or a bad
            ``archipelago_prompt_tokens``.
    """
    if PROMPT_TOKENS_FIELD in body:
        v = body[PROMPT_TOKENS_FIELD]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise BadRequest(f"{PROMPT_TOKENS_FIELD}: expected an integer >= 1, got {v!r}")
        return v
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest("messages: expected a non-empty list of {role, content} objects")
        n = 0
        for i, m in enumerate(msgs):
            if not isinstance(m, Mapping):
                raise BadRequest(f"messages[{i}]: expected an object with role and content")
            c = m.get("content")
            if isinstance(c, str):
                chars = len(c)
            elif isinstance(c, list):
                chars = sum(len(p.get("text", "")) for p in c if isinstance(p, Mapping))
            elif c is None:
                chars = 0
            else:
                raise BadRequest(f"messages[{i}].content: expected a string or a list of content parts")
            n += math.ceil(chars / CHARS_PER_TOKEN) + CHAT_TOKENS_PER_MESSAGE
        return max(1, n)
    p = body.get("prompt")
    if isinstance(p, str):
        return _text_tokens(p)
    if isinstance(p, list) and p:
        if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            return len(p)
        if len(p) == 1 and isinstance(p[0], str):
            return _text_tokens(p[0])
        if len(p) == 1 and isinstance(p[0], list) and all(isinstance(x, int) for x in p[0]):
            return max(1, len(p[0]))
        raise BadRequest("prompt: the emulator serves one prompt per request; send a string or a list of token ids")
    raise BadRequest("prompt: expected a string or a list of token ids")


def _output_tokens(body: Mapping[str, Any], chat: bool, default: int) -> tuple[int, bool]:
    """(output tokens, stop_at_end)."""
    keys = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    for k in keys:
        v = body.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise BadRequest(f"{k}: expected an integer >= 1, got {v!r}")
        return v, False
    return default, True


def _error(status: int, message: str, typ: str = "BadRequestError") -> web.Response:
    return web.json_response({"object": "error", "message": message, "type": typ, "param": None, "code": status},
                             status=status)


# --------------------------------------------------------------------------------------------------
# the server


class _Handle:
    __slots__ = ("req", "changed", "done")

    def __init__(self, req: EmuRequest) -> None:
        self.req = req
        self.changed = asyncio.Event()
        self.done = False


class EmulatedEngine:
    """One emulated engine: scheduler + asyncio step loop + aiohttp application + metrics.

    Args:
        spec: the :class:`EngineSpec`.

    Use :meth:`start` / :meth:`stop` inside a running event loop (several engines may share one loop,
    as the fleet emulator does); :attr:`port` is the bound port after :meth:`start`.

    Raises:
        ValueError: the replica does not fit (from :class:`BatchScheduler`).
    """

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.perf = spec.served_perf()
        self.scheduler = BatchScheduler(self.perf, spec.limits)
        self.metrics = EngineMetrics(spec.kind, spec.served_model_name, spec.limits.max_model_len or 1)
        self._t0 = time.monotonic()
        self._speed = float(spec.speedup)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._runner: web.AppRunner | None = None
        self._ready_at = time.monotonic() + max(0.0, spec.startup_delay_s)
        self._ids = itertools.count(1)
        self._created = int(time.time())
        self.port: int = spec.port
        #: how far the wall clock is behind the step clock, emulated seconds (0 when keeping up)
        self.lag_s = 0.0
        self.app = self._make_app()

    # -- clock ----------------------------------------------------------------------------------

    def now(self) -> float:
        """Emulated seconds since the engine started (wall seconds x speedup)."""
        return (time.monotonic() - self._t0) * self._speed

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> int:
        """Start the step loop and the HTTP server; returns the bound port.

        Raises:
            OSError: the port is taken.
        """
        self._task = asyncio.get_running_loop().create_task(self._loop())
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.spec.host, self.spec.port, reuse_address=True)
        await site.start()
        socks = getattr(site._server, "sockets", None) or []  # noqa: SLF001 - aiohttp exposes no getter
        if socks:
            self.port = int(socks[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        """Stop serving: close the HTTP server, cancel the step loop, abort what is in flight."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- engine loop ----------------------------------------------------------------------------

    async def _loop(self) -> None:
        """Run engine steps back to back while there is work.

        The step clock is the performance model's: a busy engine starts each step when the previous
        one ends (virtual time ``vt``), and sleeps until the wall clock reaches the step's end. After
        an idle period the clock re-anchors to the wall clock. If the process falls behind (CPU
        starvation, very high speed-up), steps run without sleeping until the wall clock is caught
        up; :attr:`lag_s` reports the current gap in emulated seconds. A request that arrived after
        the busy step clock (only possible while lagging) moves the step start to its arrival.
        """
        sch = self.scheduler
        vt = 0.0
        idle = True
        while True:
            if not sch.has_work():
                self.lag_s = 0.0
                self._wake.clear()
                await self._wake.wait()
                idle = True
                continue
            plan = sch.schedule()
            if plan is None:  # pragma: no cover - guarded by admission checks
                self._wake.clear()
                await self._wake.wait()
                idle = True
                continue
            start = self.now() if idle else vt
            if plan.admitted:
                start = max(start, max(r.arrival for r in plan.admitted))
                for r in plan.admitted:
                    if r.first_scheduled is None:
                        r.first_scheduled = start
            idle = False
            end = start + plan.duration
            delay = (end - self.now()) / self._speed
            self.lag_s = max(0.0, -delay * self._speed)
            await asyncio.sleep(delay if delay > 0 else 0)
            out = sch.complete(plan, end)
            vt = end
            self.metrics.record_step(out, sch.num_running, sch.num_waiting, sch.kv_usage, end)
            for r in out.tokens:
                h = r.listener
                if h is not None:
                    h.changed.set()
            for r in out.finished:
                h = r.listener
                if h is not None:
                    h.done = True
                    h.changed.set()

    def submit(self, prompt_tokens: int, output_tokens: int, stop_at_end: bool = False) -> _Handle:
        """Queue a request now; returns a handle whose ``changed`` event fires on every token.

        Raises:
            RequestRejected: too long for ``max_model_len`` or the KV cache.
        """
        req = EmuRequest(rid=f"{next(self._ids)}", prompt_tokens=prompt_tokens, max_output_tokens=output_tokens,
                         arrival=self.now(), stop_at_end=stop_at_end)
        h = _Handle(req)
        req.listener = h
        self.scheduler.submit(req)
        self.metrics.set_idle(self.scheduler.num_running, self.scheduler.num_waiting, self.scheduler.kv_usage)
        self._wake.set()
        return h

    def abort(self, h: _Handle) -> None:
        """Abort a request whose client went away (vLLM finished_reason ``abort``)."""
        if self.scheduler.abort(h.req, self.now()):
            h.done = True
            self.metrics.record_finished(h.req)
            self.metrics.set_idle(self.scheduler.num_running, self.scheduler.num_waiting, self.scheduler.kv_usage)

    # -- HTTP -----------------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/version", self._version)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        if time.monotonic() < self._ready_at:
            return web.Response(status=503, text="loading")
        return web.Response(status=200)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self.metrics.exposition()
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": f"archipelago-emulator ({self.spec.kind})"})

    async def _models(self, request: web.Request) -> web.Response:
        s = self.spec
        return web.json_response({"object": "list", "data": [{
            "id": s.served_model_name, "object": "model", "created": self._created, "owned_by": s.kind,
            "root": s.model, "parent": None, "max_model_len": s.limits.max_model_len,
        }]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        if time.monotonic() < self._ready_at:
            return _error(503, "the engine is still loading the model", "ServiceUnavailableError")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "request body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        model = body.get("model")
        if model is not None and model not in (self.spec.served_model_name, self.spec.model):
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
        try:
            if body.get("n", 1) != 1:
                raise BadRequest("n: the emulator generates one choice per request (n=1)")
            p = count_prompt_tokens(body, chat)
            n, stop_at_end = _output_tokens(body, chat, self.spec.default_output_tokens)
            h = self.submit(p, n, stop_at_end)
        except (BadRequest, RequestRejected) as exc:
            return _error(400, str(exc))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        name = self.spec.served_model_name
        created = int(time.time())
        try:
            if body.get("stream"):
                opts = body.get("stream_options") or {}
                usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
                return await self._stream(request, h, rid, name, created, chat, usage)
            while not h.done:
                h.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(h.changed.wait(), timeout=0.5)
                tr = request.transport
                if not h.done and (tr is None or tr.is_closing()):
                    self.abort(h)  # the client went away (vLLM aborts the request)
                    return web.Response(status=499)
            r = h.req
            text = "".join(_WORDS[i % len(_WORDS)] for i in range(r.generated))
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": r.finish_reason}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            return web.json_response({
                "id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": name, "choices": [choice], "usage": _usage(r),
            })
        finally:
            if not h.done:
                self.abort(h)

    async def _stream(self, request: web.Request, h: _Handle, rid: str, name: str, created: int, chat: bool,
                      include_usage: bool) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream",
                                                       "Cache-Control": "no-cache"})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
            d: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": name, "choices": choices}
            if usage is not None:
                d["usage"] = usage
            return b"data: " + json.dumps(d, separators=(",", ":")).encode() + b"\n\n"

        sent = 0
        r = h.req
        if chat:
            await resp.write(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]))
        while True:
            h.changed.clear()
            if r.generated > sent:
                text = "".join(_WORDS[i % len(_WORDS)] for i in range(sent, r.generated))
                sent = r.generated
                fin = r.finish_reason if h.done else None
                c: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": fin}
                if chat:
                    c["delta"] = {"content": text}
                else:
                    c["text"] = text
                await resp.write(chunk([c]))
            if h.done:
                break
            await h.changed.wait()
        if include_usage:
            await resp.write(chunk([], _usage(r)))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _usage(r: EmuRequest) -> dict[str, int]:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.generated,
            "total_tokens": r.prompt_tokens + r.generated}


async def serve(spec: EngineSpec, stop: asyncio.Event | None = None) -> None:
    """Run one emulated engine until ``stop`` is set (or forever); prints the listen address.

    Raises:
        OSError: the port is taken.
    """
    eng = EmulatedEngine(spec)
    port = await eng.start()
    print(
        f"archipelago emulator: {spec.kind} serving {spec.served_model_name} as {spec.tp}x {spec.gpu.name} "
        f"on http://{spec.host}:{port} (KV {eng.perf.kv_capacity_tokens} tokens, max_num_seqs "
        f"{spec.limits.max_num_seqs}, max_model_len {spec.limits.max_model_len}, speedup {spec.speedup:g})",
        flush=True,
    )
    try:
        if stop is None:
            await asyncio.Event().wait()
        else:
            await stop.wait()
    finally:
        await eng.stop()
