"""Analytical performance model of one serving replica (model x GPU type x TP degree x engine limits).

A replica is one vLLM/SGLang engine spanning ``tp`` GPUs with tensor parallelism. The model gives

* memory: weight bytes per GPU, KV-cache bytes per token, KV-cache capacity (tokens) and whether
  the replica fits at all (:attr:`PerfModel.fits` / :attr:`PerfModel.fit_error`);
* time of one engine iteration (a *step*): prefill of a batch of prompts, a decode step, and a
  mixed chunked-prefill step (vLLM's continuous batching puts a prefill chunk and the running
  sequences' decode tokens into one forward pass);
* power per phase, price, and the steady-state saturation throughput.

Formulas (all per GPU of the replica; sources in ``docs/performance-model.md``)
------------------------------------------------------------------------------
Roofline terms (Williams et al. 2009; applied to LLM inference in Yuan et al. 2024, "LLM Inference
Unveiled: Survey and Roofline Model Insights")::

    t_compute = FLOPs / (peak_tflops * 1e12 * eff.compute)
    t_memory  = bytes / (bandwidth_gb_s * 1e9 * eff.memory)

taken per operator class -- ``max`` within the linear layers (GEMM FLOPs vs weight bytes) and
``max`` within attention (attention FLOPs vs KV-cache bytes), the two added -- so that a mixed
step whose GEMMs are compute-bound (prefill chunk) and whose attention is memory-bound (decode
sequences with long contexts) pays for both. (A ``sum`` of compute and memory time fitted the
calibration data worse: objective 0.19 vs 0.13/0.10, see ``docs/performance-model.md``.)

* FLOPs per token: ``2 * active_params`` of the transformer body (Kaplan et al. 2020), plus
  ``2 * vocab * hidden`` for the LM head per *sampled* token (vLLM computes logits only for the
  last position of each sequence), plus attention ``4 * heads * head_dim * L`` per (query, key)
  pair; a causal prefill of ``n`` tokens after ``o`` cached tokens has ``n*o + n^2/2`` pairs.
* Bytes per step: all non-expert weights once (the embedding table is gathered, not streamed),
  for MoE layers only the experts the step's ``T`` tokens touch -- expected number of distinct
  experts ``E * (1 - (1 - k/E)^T)`` under uniform top-k routing --, KV cache read for every
  cached token attended to, and KV written for every new token.
* TP all-reduce: 2 per layer (after attention and after the MLP; Megatron-LM, Shoeybi et al.
  2019) of ``T * hidden * 2`` bytes, ring algorithm
  ``2(tp-1)/tp * bytes / (link_gb_s * eff.link) + 2(tp-1) * alpha`` (Thakur, Rabenseifner &
  Gropp 2005).
* Engine overhead per step: ``step_overhead + per_seq_overhead * sequences`` (Vidur, Agrawal
  et al. 2024, profiles the scheduler, input preparation and sampler CPU costs, linear in the
  batch size).

:meth:`PerfModel.step_components` returns every term of a step separately.

The efficiency constants (``GPUSpec.efficiency``) are per GPU type, fitted once against the
measured Splitwise Llama-2-70B profile (``bench/bench_calibration.py``), never per request.

Memory (vLLM's profiler logic, ``vllm/worker``): the engine may use ``gpu_memory_utilization`` of
the device memory; weights, the activation peak of a ``max_num_batched_tokens`` forward pass,
CUDA-graph buffers and non-PyTorch allocations (NCCL, cuBLAS workspaces) come off first; the rest
holds KV-cache blocks of 16 tokens.

Hot path: the simulator calls :meth:`PerfModel.step_time` millions of times, so every
per-instance constant is precomputed in ``__init__`` as a plain float and the time methods are
plain arithmetic that also works element-wise on numpy arrays (no pydantic, no numpy calls on
scalars).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from archipelago.decide.catalog import GIB, GPUSpec, ModelSpec, dtype_bytes

__all__ = [
    "EngineLimits",
    "PerfModel",
    "Phase",
    "KV_BLOCK_TOKENS",
    "MIN_CONTEXT_TOKENS",
    "DECODE_POWER_FRACTION",
]

Phase = Literal["idle", "prefill", "decode"]

#: vLLM's default KV-cache block size (tokens per paged block), ``--block-size 16``.
KV_BLOCK_TOKENS = 16
#: Activations are BF16/FP16 (2 bytes) for every quantization scheme modelled here.
ACT_BYTES = 2.0
#: Logits are materialised in FP32 for sampling (4 bytes), logits + probabilities -> 2 copies.
LOGIT_BYTES = 4.0 * 2
#: Memory kept by captured CUDA graphs, GiB. vLLM's log line "Graph capturing finished ...
#: took X GiB" typically reports 0.3-1 GiB for the default capture sizes; 0.5 GiB assumed.
CUDA_GRAPH_RESERVE_GIB = 0.5
#: Non-PyTorch memory (CUDA context allocations, cuBLAS workspace) at TP=1, GiB; vLLM's memory
#: profiling log reports "non_torch_memory" of 0.1-0.3 GiB on one GPU.
NON_TORCH_RESERVE_GIB = 0.25
#: Extra non-PyTorch memory with TP>1 (NCCL buffers, custom all-reduce IPC buffers), GiB;
#: vLLM reports 0.5-1.3 GiB of non_torch_memory with NCCL initialised.
NCCL_RESERVE_GIB = 0.5
#: Context that must fit in the KV cache when ``EngineLimits.max_model_len`` is None (tokens):
#: the operator then emits ``--max-model-len`` = min(model maximum, :attr:`PerfModel.max_model_len_fit`),
#: and refuses replicas that cannot hold one request of this length.
MIN_CONTEXT_TOKENS = 8192
#: Decode-phase power as a fraction of the way from idle to TDP. splitwise-sim's power model
#: (``configs/power_model``) gives A100 63/400/250 W and H100 75/700/380 W (idle/prefill/decode):
#: (250-63)/(400-63)=0.55 and (380-75)/(700-75)=0.49; 0.5 is used for GPUs without measurements.
DECODE_POWER_FRACTION = 0.5
#: TP degrees tried when suggesting a fix in :attr:`PerfModel.fit_error`.
_TP_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)

_FP8_NAMES = {"fp8", "fp8_e4m3", "fp8_e5m2", "float8_e4m3fn", "modelopt", "fbgemm_fp8"}
_QUANT_WEIGHT_BYTES = {
    "awq": 0.5,
    "gptq": 0.5,
    "marlin": 0.5,
    "awq_marlin": 0.5,
    "gptq_marlin": 0.5,
    "bitsandbytes": 0.5,
    "int8": 1.0,
    "w8a8": 1.0,
    "smoothquant": 1.0,
}


@dataclass(frozen=True)
class EngineLimits:
    """Engine settings that shape performance and memory (vLLM flag names).

    Attributes:
        max_num_seqs: most sequences in one step (``--max-num-seqs``).
        max_num_batched_tokens: token budget of one step (``--max-num-batched-tokens``); with
            chunked prefill, longer prompts are split into chunks of at most this many tokens.
        gpu_memory_utilization: fraction of device memory the engine may use (0, 1].
        max_model_len: longest request (prompt + output), tokens; None = see
            :data:`MIN_CONTEXT_TOKENS`.
        kv_cache_dtype: ``None``/``"auto"`` (= model dtype) or ``"fp8"``/``"fp8_e4m3"``/``"fp8_e5m2"``.
        quantization: weight quantization (``"fp8"``, ``"awq"``, ``"gptq"``, ...) or None.
        chunked_prefill: vLLM chunked prefill (mixed prefill/decode steps); False = prefill steps
            run alone and take priority (vLLM v0 default scheduler).

    Raises:
        ValueError: a field out of range (the message names the field).
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    gpu_memory_utilization: float = 0.90
    max_model_len: int | None = None
    kv_cache_dtype: str | None = None
    quantization: str | None = None
    chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if int(self.max_num_seqs) < 1:
            raise ValueError(f"EngineLimits.max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if int(self.max_num_batched_tokens) < 1:
            raise ValueError(
                f"EngineLimits.max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if not 0.0 < float(self.gpu_memory_utilization) <= 1.0:
            raise ValueError(
                f"EngineLimits.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.max_model_len is not None and int(self.max_model_len) < 1:
            raise ValueError(f"EngineLimits.max_model_len must be >= 1 or None, got {self.max_model_len}")
        if self.kv_cache_dtype not in (None, "auto"):
            dtype_bytes(self.kv_cache_dtype)  # ValueError lists accepted names
        if self.quantization is not None:
            _quant_weight_bytes(self.quantization, 2.0)


def _quant_weight_bytes(quantization: str | None, model_bytes: float) -> float:
    """Bytes per weight of the quantized linear layers."""
    if quantization is None:
        return model_bytes
    q = quantization.lower()
    if q in _FP8_NAMES:
        return 1.0
    if q in _QUANT_WEIGHT_BYTES:
        return _QUANT_WEIGHT_BYTES[q]
    raise ValueError(
        f"EngineLimits.quantization {quantization!r} is not modelled; use one of "
        f"{sorted(_FP8_NAMES | set(_QUANT_WEIGHT_BYTES))} or None"
    )


def _fmt_gib(x: float) -> str:
    return f"{x / GIB:.1f} GiB"


class PerfModel:
    """Performance of one replica of ``model`` on ``tp`` GPUs of type ``gpu`` under ``limits``.

    Args:
        model: the architecture (:class:`~archipelago.decide.catalog.ModelSpec`).
        gpu: the accelerator (:class:`~archipelago.decide.catalog.GPUSpec`), including its
            efficiency constants.
        tp: tensor-parallel degree (GPUs per replica), >= 1.
        limits: engine settings (:class:`EngineLimits`).

    Raises:
        ValueError: ``tp`` < 1 or not an integer. An infeasible replica (weights or one
        context do not fit, TP does not divide the heads) does *not* raise: :attr:`fits` is
        False and :attr:`fit_error` says why and what to change.

    Attributes (all per replica unless noted):
        weight_bytes_per_gpu: resident weight bytes on each GPU.
        weight_bytes: resident weight bytes of the replica (``tp * weight_bytes_per_gpu``).
        kv_bytes_per_token: KV-cache bytes per token of the whole replica.
        kv_capacity_tokens: tokens the KV cache holds (multiple of 16; 0 if nothing is left).
        activation_reserve_bytes_per_gpu: activation peak + CUDA graphs + non-PyTorch memory.
        fits / fit_error: feasibility and a human explanation.
    """

    def __init__(self, model: ModelSpec, gpu: GPUSpec, tp: int, limits: EngineLimits | None = None) -> None:
        if isinstance(tp, bool) or not isinstance(tp, (int, np.integer)) or tp < 1:
            raise ValueError(f"tp (tensor-parallel degree) must be an integer >= 1, got {tp!r}")
        self.model = model
        self.gpu = gpu
        self.tp = tp = int(tp)
        self.limits = limits = limits if limits is not None else EngineLimits()
        m = model
        L = m.num_layers
        h = float(m.hidden_size)
        d = float(m.head_dim or 0)

        # --- bytes per weight --------------------------------------------------------------
        model_b = m.weight_bytes_per_param
        lin_b = _quant_weight_bytes(limits.quantization, model_b)  # quantized linear layers
        emb_b = model_b  # embedding and LM head stay in the model dtype (vLLM does not quantize them)
        kv_b = model_b if limits.kv_cache_dtype in (None, "auto") else dtype_bytes(limits.kv_cache_dtype)
        self.weight_dtype_bytes = lin_b
        self.kv_dtype_bytes = kv_b

        # --- weights per GPU (Megatron TP: column/row-parallel linears, vocab-parallel embedding;
        # K/V projections are replicated when tp > num_kv_heads) -------------------------------
        body_total, self.kv_heads_per_gpu, self.weight_bytes_per_gpu, kv_pg = _memory_terms(m, tp, limits)
        self.weight_bytes = self.weight_bytes_per_gpu * tp

        # streamed every step: body without routed experts, plus the LM head
        experts_params_all = m.num_moe_layers * m.num_experts * m.expert_params
        self._w_fixed = ((body_total - experts_params_all) * lin_b + m.lm_head_params * emb_b) / tp
        self._expert_bytes = m.expert_params * lin_b / tp  # one expert of one layer, per GPU
        self._n_moe = float(m.num_moe_layers)
        self._E = float(m.num_experts)
        self._keep = 1.0 - (m.experts_per_token / m.num_experts) if m.is_moe else 1.0

        # --- FLOPs per GPU ---------------------------------------------------------------
        body_active = (
            float(m.active_params or 0.0)
            - m.embedding_params
            - (0.0 if m.tie_word_embeddings else m.lm_head_params)
        )
        self._f_lin = 2.0 * body_active / tp  # per token, transformer body
        self._f_lm = 2.0 * m.vocab_size * h / tp  # per sampled token, LM head
        self._f_attn = 4.0 * (m.num_heads / tp) * d * L  # per (query, key) pair

        # --- KV cache ----------------------------------------------------------------------
        self._kv_pg = kv_pg  # bytes per token per GPU
        self.kv_bytes_per_token = self._kv_pg * tp

        # --- rates from the GPU and its efficiency constants ----------------------------------
        eff = gpu.efficiency
        compute_dtype = "bfloat16" if m.dtype == "bfloat16" else "float16"
        if limits.quantization is not None and limits.quantization.lower() in _FP8_NAMES and gpu.fp8_tflops:
            compute_dtype = "fp8"  # W8A8 FP8 GEMMs on Hopper/Ada/Blackwell/CDNA3
        self.compute_dtype = compute_dtype
        self._flops_rate = gpu.peak_tflops(compute_dtype) * 1e12 * eff.compute
        self._bw = gpu.hbm_bandwidth_gb_s * 1e9 * eff.memory
        self._c0 = eff.step_overhead_ms * 1e-3
        self._cseq = eff.per_seq_overhead_ms * 1e-3
        n_ar = 2.0 * L  # all-reduces per forward pass
        if tp > 1:
            link = gpu.interconnect_gb_s * 1e9 * eff.link
            # seconds per token of all-reduce traffic (ring bandwidth term) over the whole pass
            self._ar_per_token = n_ar * (2.0 * (tp - 1) / tp) * h * ACT_BYTES / link
            self._ar_fixed = n_ar * 2.0 * (tp - 1) * eff.allreduce_latency_us * 1e-6
        else:
            self._ar_per_token = 0.0
            self._ar_fixed = 0.0
        self._budget = float(limits.max_num_batched_tokens)
        self._chunked = bool(limits.chunked_prefill)

        # --- memory plan -------------------------------------------------------------------
        self.activation_reserve_bytes_per_gpu = _reserve_bytes(m, tp, limits)
        self.memory_budget_bytes_per_gpu = gpu.device_memory_gib * GIB * limits.gpu_memory_utilization
        free = (
            self.memory_budget_bytes_per_gpu
            - self.weight_bytes_per_gpu
            - self.activation_reserve_bytes_per_gpu
        )
        blocks = math.floor(free / (self._kv_pg * KV_BLOCK_TOKENS)) if free > 0 else 0
        self.kv_capacity_tokens: int = int(max(blocks, 0) * KV_BLOCK_TOKENS)
        self.required_context_tokens = (
            int(limits.max_model_len)
            if limits.max_model_len is not None
            else min(m.max_context, MIN_CONTEXT_TOKENS)
        )
        self.fit_error: str | None = self._check_fit()
        self.fits: bool = self.fit_error is None

    # ------------------------------------------------------------------------------------
    # feasibility
    # ------------------------------------------------------------------------------------

    def _check_fit(self) -> str | None:
        m, g, tp, lim = self.model, self.gpu, self.tp, self.limits
        name = m.short_name
        kv_heads = int(m.num_kv_heads or m.num_heads)
        if m.num_heads % tp:
            ok = [t for t in _TP_CANDIDATES if _tp_valid(m, t)]
            return f"TP={tp} does not divide the {m.num_heads} attention heads of {name}; use TP in {ok}"
        if tp > kv_heads and tp % kv_heads:
            return f"TP={tp} is neither a divisor nor a multiple of the {kv_heads} KV heads of {name}"
        if lim.max_model_len is not None and lim.max_model_len > m.max_context:
            return (
                f"max_model_len {lim.max_model_len} exceeds the {m.max_context}-token context of {name}; "
                f"lower max_model_len to at most {m.max_context}"
            )
        free = self.memory_budget_bytes_per_gpu - self.activation_reserve_bytes_per_gpu
        need_ctx = self.required_context_tokens
        if self.weight_bytes_per_gpu <= free and self.kv_capacity_tokens >= need_ctx:
            return None
        hint = self._fix_hint()
        where = (
            f"{tp}x {g.name} ({g.device_memory_gib:.1f} GiB each) at gpu_memory_utilization "
            f"{lim.gpu_memory_utilization:.2f}"
        )
        if self.weight_bytes_per_gpu > free:
            return (
                f"{name} needs {_fmt_gib(self.weight_bytes)} of weights per replica"
                f"{f' ({_fmt_gib(self.weight_bytes_per_gpu)} per GPU)' if tp > 1 else ''}; {where} leaves "
                f"{_fmt_gib(self.memory_budget_bytes_per_gpu)} per GPU, of which "
                f"{_fmt_gib(self.activation_reserve_bytes_per_gpu)} goes to activations and CUDA graphs; {hint}"
            )
        return (
            f"{name} on {where} has room for only {self.kv_capacity_tokens} tokens of KV cache "
            f"({self.kv_bytes_per_token / 2**20:.3f} MiB per token) but one request needs {need_ctx}"
            f"{'' if lim.max_model_len is not None else ' (no max_model_len given)'}; "
            f"lower max_model_len, use fp8 KV cache, {hint}"
        )

    def _fix_hint(self) -> str:
        for t in _TP_CANDIDATES:
            if t <= self.tp:
                continue
            if _fits_at(self.model, self.gpu, t, self.limits, self.required_context_tokens):
                if t <= self.gpu.gpus_per_node:
                    return f"use TP>={t} or a larger GPU"
                return (
                    f"it needs TP>={t}, more than the {self.gpu.gpus_per_node} GPUs of a typical "
                    f"{self.gpu.name} node; use a larger GPU"
                )
        return "no tensor-parallel degree up to 64 fits; use a larger GPU or quantization"

    @property
    def max_model_len_fit(self) -> int:
        """Largest ``--max-model-len`` this replica can serve: min(model context, KV capacity), tokens."""
        cap = self.kv_capacity_tokens
        if self.limits.max_model_len is not None:
            return int(min(self.limits.max_model_len, cap))
        return int(min(self.model.max_context, cap))

    # ------------------------------------------------------------------------------------
    # capacity
    # ------------------------------------------------------------------------------------

    def max_batch(self, avg_context_tokens: float) -> int:
        """Most sequences that can run together: min(max_num_seqs, KV capacity / context).

        Args:
            avg_context_tokens: mean tokens held per sequence (prompt + generated so far);
                rounded up to whole 16-token KV blocks.

        Returns:
            sequences (int, 0 when not even one sequence fits).
        """
        ctx = max(float(avg_context_tokens), 1.0)
        per_seq = math.ceil(ctx / KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS
        return int(min(self.limits.max_num_seqs, self.kv_capacity_tokens // per_seq))

    # ------------------------------------------------------------------------------------
    # step times (seconds); scalar floats or numpy arrays, element-wise
    # ------------------------------------------------------------------------------------

    def _experts_touched(self, tokens: Any) -> Any:
        """Expected distinct experts per MoE layer touched by ``tokens`` routed tokens."""
        return self._E * (1.0 - self._keep**tokens)

    def step_components(
        self,
        prefill_tokens: Any,
        decode_seqs: Any,
        decode_context_tokens: Any,
        prefill_context_tokens: Any = 0.0,
        prefill_seqs: Any = 1.0,
    ) -> dict[str, Any]:
        """The terms of one step's time, seconds each (same arguments as :meth:`step_time`).

        ``step_time = step_overhead + per_seq_overhead + max(linear_compute, weight_read)
        + max(attention_compute, kv_read) + allreduce_bandwidth + allreduce_latency``
        (0 for an empty step).

        Returns:
            dict with keys ``linear_compute`` (GEMMs and LM head), ``weight_read`` (weights and
            touched experts streamed from memory), ``attention_compute``, ``kv_read`` (KV cache
            read and written), ``allreduce_bandwidth``, ``allreduce_latency``, ``step_overhead``,
            ``per_seq_overhead``; floats or arrays of the broadcast shape.
        """
        p = prefill_tokens
        nd = decode_seqs
        ps = prefill_seqs * (p > 0)
        T = p + nd
        nonempty = T > 0
        pairs = nd * decode_context_tokens + p * prefill_context_tokens
        if isinstance(ps, np.ndarray):
            pairs = pairs + np.where(ps > 0, p * p * 0.5 / np.maximum(ps, 1e-12), 0.0)
        elif ps > 0:
            pairs = pairs + p * p * 0.5 / ps
        kv_tokens = nd * decode_context_tokens + ps * prefill_context_tokens + T
        weights = self._w_fixed + self._n_moe * self._experts_touched(T) * self._expert_bytes
        return {
            "linear_compute": (T * self._f_lin + (nd + ps) * self._f_lm) / self._flops_rate,
            "weight_read": weights * nonempty / self._bw,
            "attention_compute": pairs * self._f_attn / self._flops_rate,
            "kv_read": kv_tokens * self._kv_pg / self._bw,
            "allreduce_bandwidth": T * self._ar_per_token,
            "allreduce_latency": self._ar_fixed * nonempty,
            "step_overhead": self._c0 * nonempty,
            "per_seq_overhead": self._cseq * (nd + ps),
        }

    def step_time(
        self,
        prefill_tokens: Any,
        decode_seqs: Any,
        decode_context_tokens: Any,
        prefill_context_tokens: Any = 0.0,
        prefill_seqs: Any = 1.0,
    ) -> Any:
        """Time of one continuous-batching iteration (vLLM chunked prefill), seconds.

        One forward pass processes ``prefill_tokens`` prompt tokens (a chunk of one or more
        prompts) and one decode token for each of ``decode_seqs`` running sequences. The token
        budget ``max_num_batched_tokens`` is the caller's (the simulator's scheduler) to respect.
        Roofline per operator class: the linear layers take ``max(FLOPs / compute rate,
        weight bytes / bandwidth)``, attention ``max(FLOPs / compute rate, KV bytes /
        bandwidth)``; all-reduce and engine overheads add (:meth:`step_components`).

        Args:
            prefill_tokens: prompt tokens in this step (>= 0).
            decode_seqs: decoding sequences in this step (>= 0).
            decode_context_tokens: MEAN context (tokens already in the KV cache) of the decoding
                sequences.
            prefill_context_tokens: tokens already cached for each prefilling sequence before
                this chunk (0 for a first chunk; the chunk offset for later chunks).
            prefill_seqs: sequences the prefill tokens belong to (may be fractional in
                steady-state averages).

        Returns:
            seconds (float, or an array of the broadcast shape); 0 for an empty step.
        """
        p = prefill_tokens
        nd = decode_seqs
        ps = prefill_seqs * (p > 0)
        T = p + nd
        pairs = nd * decode_context_tokens + p * prefill_context_tokens
        if isinstance(ps, np.ndarray):
            pairs = pairs + np.where(ps > 0, p * p * 0.5 / np.maximum(ps, 1e-12), 0.0)
        elif ps > 0:
            pairs = pairs + p * p * 0.5 / ps
        t_lin = (T * self._f_lin + (nd + ps) * self._f_lm) / self._flops_rate
        t_w = (self._w_fixed + self._n_moe * self._experts_touched(T) * self._expert_bytes) / self._bw
        t_att = pairs * self._f_attn / self._flops_rate
        t_kv = (nd * decode_context_tokens + ps * prefill_context_tokens + T) * self._kv_pg / self._bw
        t = (
            self._c0
            + self._cseq * (nd + ps)
            + _max(t_lin, t_w)
            + _max(t_att, t_kv)
            + T * self._ar_per_token
            + self._ar_fixed
        )
        if isinstance(t, np.ndarray):
            return np.where(np.asarray(T) > 0, t, 0.0)
        return t if T > 0 else 0.0

    def decode_step_time(self, batch_size: Any, avg_context_tokens: Any) -> Any:
        """Time of one decode iteration (one new token for each of ``batch_size`` sequences), seconds.

        Equal to ``step_time(0, batch_size, avg_context_tokens)``.

        Args:
            batch_size: running sequences (int/float or numpy array); 0 gives 0.
            avg_context_tokens: mean context (prompt + generated tokens) of those sequences.

        Returns:
            seconds (float, or array of the broadcast shape); this is the inter-token latency
            (TPOT) the batch sees.
        """
        b = batch_size
        ctx = avg_context_tokens
        t_lin = b * (self._f_lin + self._f_lm) / self._flops_rate
        t_w = (self._w_fixed + self._n_moe * self._experts_touched(b) * self._expert_bytes) / self._bw
        t_att = b * ctx * self._f_attn / self._flops_rate
        t_kv = b * (ctx + 1.0) * self._kv_pg / self._bw
        t = (
            self._c0
            + self._cseq * b
            + _max(t_lin, t_w)
            + _max(t_att, t_kv)
            + b * self._ar_per_token
            + self._ar_fixed
        )
        if isinstance(t, np.ndarray):
            return np.where(np.asarray(b) > 0, t, 0.0)
        return t if b > 0 else 0.0

    def prefill_time(self, prompt_tokens: Any, batch: Any = 1) -> Any:
        """Time to prefill ``batch`` prompts of ``prompt_tokens`` tokens each, seconds.

        This is the time to first token of a request served alone (``batch=1``) or of a batch of
        equal prompts, with no decode sequences in the same steps. Without chunking it equals
        ``step_time(prompt_tokens * batch, 0, 0, 0, batch)``. With chunked prefill, the
        ``T = prompt_tokens * batch`` tokens take ``k = ceil(T / max_num_batched_tokens)`` steps
        of ``T/k`` tokens: each step pays the step overhead, the all-reduce latency and its own
        roofline terms (weights are re-read every step); a prompt spanning ``k_p`` chunks reads
        the KV cache of its earlier chunks (``n (k_p - 1) / 2`` tokens) and pays the
        per-sequence overhead ``k_p`` times. Attention terms use the mean chunk.

        Args:
            prompt_tokens: tokens per prompt (int/float or numpy array).
            batch: prompts (int/float or numpy array broadcastable with ``prompt_tokens``).

        Returns:
            seconds (float, or an array of the broadcast shape).
        """
        n = prompt_tokens
        b = batch
        T = n * b
        if self._chunked:
            k = -(-T // self._budget)  # ceil: steps
            k_p = -(-n // self._budget)  # steps one prompt spans
            if isinstance(k, np.ndarray):
                k = np.maximum(k, 1.0)
                k_p = np.maximum(k_p, 1.0)
            else:
                k = max(k, 1)
                k_p = max(k_p, 1)
        else:
            k = 1
            k_p = 1
        c = T / k  # tokens per step
        t_lin = (c * self._f_lin + (b / k) * self._f_lm) / self._flops_rate
        t_w = (self._w_fixed + self._n_moe * self._experts_touched(c) * self._expert_bytes) / self._bw
        t_att = (b * n * n * 0.5 / k) * self._f_attn / self._flops_rate
        t_kv = (T + b * n * (k_p - 1) * 0.5) / k * self._kv_pg / self._bw
        return (
            k * (self._c0 + self._ar_fixed + _max(t_lin, t_w) + _max(t_att, t_kv))
            + self._cseq * b * k_p
            + T * self._ar_per_token
        )

    # ------------------------------------------------------------------------------------
    # power, price, throughput
    # ------------------------------------------------------------------------------------

    def power_w(self, phase: Phase) -> float:
        """Power draw of the whole replica (``tp`` GPUs) in a phase, W.

        Per GPU: ``idle_w`` when idle; ``prefill_w`` (default TDP) in prefill; ``decode_w``
        (default ``idle + DECODE_POWER_FRACTION * (TDP - idle)``) in decode -- splitwise-sim's
        phase power model (Patel et al. 2024).

        Raises:
            ValueError: unknown phase.
        """
        g = self.gpu
        if phase == "idle":
            w = g.idle_w
        elif phase == "prefill":
            w = g.prefill_w if g.prefill_w is not None else g.tdp_w
        elif phase == "decode":
            w = (
                g.decode_w
                if g.decode_w is not None
                else g.idle_w + DECODE_POWER_FRACTION * (g.tdp_w - g.idle_w)
            )
        else:
            raise ValueError(f"phase must be one of 'idle', 'prefill', 'decode', got {phase!r}")
        return float(w) * self.tp

    def price_per_hour(self, price_per_gpu_hour: float | None = None) -> float:
        """Price of the replica, $/h: ``tp * price_per_gpu_hour`` (default: the catalogue price).

        Raises:
            ValueError: negative price.
        """
        p = self.gpu.price_per_gpu_hour if price_per_gpu_hour is None else float(price_per_gpu_hour)
        if p < 0:
            raise ValueError(f"price_per_gpu_hour must be >= 0, got {p}")
        return p * self.tp

    def saturation_throughput(self, input_tokens: float, output_tokens: float) -> float:
        """Steady-state maximum request rate of one replica for a fixed request shape, requests/s.

        With chunked prefill (default): ``N`` sequences decode together while the prompts of
        their replacements are prefilled in the same steps. A request needs ``D = output - 1``
        decode steps (the first token comes out of the prefill), so each step admits
        ``N/D`` new requests, i.e. ``p = N * input / D`` prompt tokens. ``N`` is the largest
        value allowed by ``max_num_seqs``, the KV capacity at the mean context ``input + D/2``
        and the step budget ``N + p <= max_num_batched_tokens``; the rate is
        ``N / (D * step_time(p, N, input + D/2))``. Without chunked prefill, prefill steps
        (batched up to the budget) and decode steps alternate and the per-request costs add.
        With ``output <= 1`` the replica only prefills.

        Args:
            input_tokens: prompt tokens per request (> 0).
            output_tokens: generated tokens per request (>= 1).

        Returns:
            requests per second (0.0 if the replica does not fit or cannot hold one request).

        Raises:
            ValueError: non-positive ``input_tokens`` or ``output_tokens`` < 1.
        """
        if not input_tokens > 0:
            raise ValueError(f"input_tokens must be > 0, got {input_tokens}")
        if not output_tokens >= 1:
            raise ValueError(f"output_tokens must be >= 1, got {output_tokens}")
        if not self.fits:
            return 0.0
        n_in = float(input_tokens)
        D = float(output_tokens) - 1.0
        budget = self._budget
        if D <= 0.0:
            b = max(1.0, math.floor(budget / n_in))
            return b / float(self.prefill_time(n_in, b))
        ctx = n_in + 0.5 * D
        n_kv = self.max_batch(ctx)
        if n_kv < 1:
            return 0.0
        if self._chunked:
            n = min(float(self.limits.max_num_seqs), float(n_kv), budget / (1.0 + n_in / D))
            if n <= 0.0:
                return 0.0
            p = n * n_in / D
            t = self.step_time(p, n, ctx, 0.0, p / n_in)
            return n / (D * t)
        b = max(1.0, math.floor(budget / n_in))
        per_req_prefill = float(self.prefill_time(n_in, b)) / b
        n = float(min(self.limits.max_num_seqs, n_kv))
        per_req_decode = D * float(self.decode_step_time(n, ctx)) / n
        return 1.0 / (per_req_prefill + per_req_decode)

    def __repr__(self) -> str:
        return (
            f"PerfModel({self.model.short_name}, {self.tp}x {self.gpu.name}, fits={self.fits}, "
            f"kv_capacity_tokens={self.kv_capacity_tokens})"
        )


def _max(a: Any, b: Any) -> Any:
    """Element-wise maximum that stays a plain float for scalars (cheap in the hot path)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.maximum(a, b)
    return a if a > b else b


def _reserve_bytes(m: ModelSpec, tp: int, limits: EngineLimits) -> float:
    """Activation peak of a ``max_num_batched_tokens`` forward pass + CUDA graphs + non-PyTorch
    memory, bytes per GPU (the memory vLLM's profiler subtracts before sizing the KV cache)."""
    tokens = float(limits.max_num_batched_tokens)
    if not limits.chunked_prefill and limits.max_model_len is not None:
        tokens = max(tokens, float(limits.max_model_len))
    h = float(m.hidden_size)
    if m.is_moe:
        mlp_width = m.experts_per_token * float(m.expert_intermediate_size or 0)
    else:
        mlp_width = float(m.intermediate_size)
    qkv = (m.q_dim + 2 * m.kv_dim) / tp
    per_token = ACT_BYTES * (2.0 * h + max(qkv, 3.0 * mlp_width / tp))
    logits = min(float(limits.max_num_seqs), tokens) * m.vocab_size * LOGIT_BYTES
    fixed = (CUDA_GRAPH_RESERVE_GIB + NON_TORCH_RESERVE_GIB + (NCCL_RESERVE_GIB if tp > 1 else 0.0)) * GIB
    return tokens * per_token + logits + fixed


def _tp_valid(m: ModelSpec, tp: int) -> bool:
    """vLLM's TP constraints: tp divides the attention heads; tp divides or is a multiple of the KV heads."""
    kv_heads = int(m.num_kv_heads or m.num_heads)
    return m.num_heads % tp == 0 and (kv_heads % tp == 0 or tp % kv_heads == 0)


def _memory_terms(m: ModelSpec, tp: int, limits: EngineLimits) -> tuple[float, float, float, float]:
    """Weights and KV cache per GPU.

    Returns:
        (body parameters including replicated K/V projections, KV heads per GPU,
        weight bytes per GPU, KV-cache bytes per token per GPU).
    """
    h = float(m.hidden_size)
    d = float(m.head_dim or 0)
    kv_heads = int(m.num_kv_heads or m.num_heads)
    model_b = m.weight_bytes_per_param
    lin_b = _quant_weight_bytes(limits.quantization, model_b)
    kv_b = model_b if limits.kv_cache_dtype in (None, "auto") else dtype_bytes(limits.kv_cache_dtype)
    kv_heads_pg = max(1.0, kv_heads / tp)
    kv_proj_replicated = 2.0 * h * d * kv_heads_pg * tp  # == 2*h*kv_dim when tp <= kv_heads
    head = m.embedding_params + (0.0 if m.tie_word_embeddings else m.lm_head_params)
    body_total = (
        float(m.total_params or 0.0) - head + m.num_layers * (kv_proj_replicated - 2.0 * h * m.kv_dim)
    )
    # the embedding and LM head stay in the model dtype (vLLM does not quantize them)
    weight_pg = (body_total * lin_b + head * model_b) / tp
    kv_pg = 2.0 * m.num_layers * kv_heads_pg * d * kv_b
    return body_total, kv_heads_pg, weight_pg, kv_pg


def _fits_at(m: ModelSpec, g: GPUSpec, tp: int, limits: EngineLimits, need_ctx: int) -> bool:
    """Whether ``tp`` GPUs hold the weights, the activation reserve and one ``need_ctx``-token context."""
    if not _tp_valid(m, tp):
        return False
    _, _, weight_pg, kv_pg = _memory_terms(m, tp, limits)
    free = (
        g.device_memory_gib * GIB * limits.gpu_memory_utilization - weight_pg - _reserve_bytes(m, tp, limits)
    )
    return free >= need_ctx * kv_pg
