"""GPU and model catalogues: validated specifications loaded from ``policies/*.yaml``.

Two catalogues feed the performance model (:mod:`archipelago.decide.perf`) and the planner:

* the **GPU catalogue** (``policies/gpus.yaml``), keyed by a short name such as ``"H100-SXM"``,
  holding vendor datasheet figures (dense BF16/FP8 TFLOPS, memory, memory bandwidth, TDP,
  interconnect), a default on-demand price, the node labels that identify the GPU (NVIDIA GPU
  Feature Discovery ``nvidia.com/gpu.product`` / AMD ``amd.com/gpu.product-name``) and the
  performance model's efficiency constants (:class:`Efficiency`);
* the **model catalogue** (``policies/models.yaml``), keyed by Hugging Face model id, holding the
  architecture from each model's published ``config.json``.

:class:`ModelSpec` is also constructible inline (a ``ModelDeployment`` may give the architecture
itself, or paste a Hugging Face ``config.json`` via :meth:`ModelSpec.from_hf_config`); total and
active parameter counts are derived from the architecture and, when given, checked against it.

Units: memory in GiB (2**30 bytes), bandwidths in GB/s (10**9 bytes/s), compute in TFLOPS
(10**12 FLOP/s, dense, no structured sparsity), power in W, prices in $ per GPU-hour.

Errors: unknown names raise :class:`CatalogError` (a ``KeyError``) listing the accepted names;
malformed catalogue files raise :class:`CatalogFileError` (a ``ValueError``) naming the file, the
line, the entry and the field.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "CatalogError",
    "CatalogFileError",
    "Efficiency",
    "GPUSpec",
    "ModelSpec",
    "GPUCatalog",
    "ModelCatalog",
    "policies_dir",
    "load_gpu_catalog",
    "load_model_catalog",
    "dtype_bytes",
    "GIB",
]

#: Bytes in one GiB.
GIB = float(2**30)

#: Environment variable overriding the policies directory.
POLICIES_ENV = "ARCHIPELAGO_POLICIES"
#: Where the operator image installs the policies when the repository is not around.
SYSTEM_POLICIES_DIR = Path("/etc/archipelago/policies")

#: Relative tolerance between a declared and a derived parameter count (5 %): published
#: counts are rounded ("8B", "70.6B") and a few small tensors (rotary caches, biases not in
#: the architecture fields) are not modelled.
PARAM_TOLERANCE = 0.05

_DTYPE_BYTES: dict[str, float] = {
    "bfloat16": 2.0,
    "bf16": 2.0,
    "float16": 2.0,
    "fp16": 2.0,
    "half": 2.0,
    "float32": 4.0,
    "fp32": 4.0,
    "float": 4.0,
    "fp8": 1.0,
    "fp8_e4m3": 1.0,
    "fp8_e5m2": 1.0,
    "float8_e4m3fn": 1.0,
    "int8": 1.0,
    "int4": 0.5,
    "awq": 0.5,
    "gptq": 0.5,
}


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of a weight, activation or KV-cache dtype name.

    Args:
        dtype: e.g. ``"bfloat16"``, ``"float16"``, ``"fp8"``, ``"fp8_e5m2"``, ``"int4"``
            (case-insensitive).

    Returns:
        bytes per element (float; 0.5 for 4-bit formats).

    Raises:
        ValueError: unknown dtype; the message lists the accepted names.
    """
    key = str(dtype).strip().lower()
    if key not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[key]


class CatalogError(KeyError):
    """An unknown GPU or model name; the message lists the accepted names."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class CatalogFileError(ValueError):
    """A catalogue file that cannot be read or fails validation (message names file, line and field)."""


# ---------------------------------------------------------------------------------------------
# GPU catalogue
# ---------------------------------------------------------------------------------------------


class Efficiency(BaseModel):
    """Efficiency constants of the performance model for one GPU (per GPU, not per workload).

    These are the only fitted numbers in :mod:`archipelago.decide.perf`. For A100-80GB and
    H100-SXM they come from a grid search against the measured Splitwise Llama-2-70B profile
    (``bench/bench_calibration.py --fit``); other GPUs inherit the constants of the calibrated
    GPU of the same or the nearest generation (each entry's ``source`` says which).

    Attributes:
        compute: achieved fraction of the dense tensor-core peak in GEMM-dominated phases
            (Vidur's measured GEMM efficiency is 0.70 on A100 and 0.76 on H100; FACTS.md).
        memory: achieved fraction of the datasheet memory bandwidth when streaming weights and
            KV cache (aiconfigurator uses 0.8).
        link: achieved fraction of the per-direction interconnect bandwidth in a ring all-reduce.
        allreduce_latency_us: latency of one ring hop of an all-reduce, microseconds.
        step_overhead_ms: fixed engine cost per forward step (scheduling, input preparation,
            kernel launches, sampling set-up), milliseconds.
        per_seq_overhead_ms: engine cost per scheduled sequence per step (block tables,
            sampling, detokenisation; Vidur models these CPU costs as linear in batch size), ms.
        source: how the numbers were obtained.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    compute: float = Field(gt=0.0, le=1.0)
    memory: float = Field(gt=0.0, le=1.0)
    link: float = Field(gt=0.0, le=1.0)
    allreduce_latency_us: float = Field(ge=0.0)
    step_overhead_ms: float = Field(ge=0.0)
    per_seq_overhead_ms: float = Field(ge=0.0)
    source: str = ""


class GPUSpec(BaseModel):
    """One accelerator type: datasheet figures, price, node labels and efficiency constants.

    Attributes:
        name: catalogue key, e.g. ``"H100-SXM"``.
        vendor: ``"nvidia"`` or ``"amd"``.
        family: architecture generation (GFD ``nvidia.com/gpu.family`` values such as
            ``"hopper"``, ``"ampere"``, ``"ada-lovelace"``; ``"cdna3"`` for MI300X).
        product_labels: node-label values identifying the GPU: NVIDIA GPU Feature Discovery
            ``nvidia.com/gpu.product`` or AMD ``amd.com/gpu.product-name``.
        bf16_tflops: dense BF16 (FP16 where the GPU lacks BF16) tensor-core peak, TFLOPS.
        fp16_tflops: dense FP16 peak, TFLOPS; defaults to ``bf16_tflops``.
        fp8_tflops: dense FP8 peak, TFLOPS; ``None`` when the GPU has no FP8 tensor cores.
        memory_gib: device memory as marketed, GiB.
        usable_memory_gib: memory the driver reports (``nvidia.com/gpu.memory`` / 1024; smaller
            than ``memory_gib`` when ECC is carved out of GDDR); ``None`` = ``memory_gib``.
        hbm_bandwidth_gb_s: device-memory bandwidth (HBM or GDDR), GB/s.
        tdp_w: board power limit, W. idle_w: idle power, W.
        prefill_w / decode_w: measured busy power per GPU in the prefill / decode phase, W
            (``None``: the performance model derives them from TDP and idle power).
        interconnect_kind: ``"nvlink"``, ``"pcie"`` or ``"infinity-fabric"``.
        interconnect_gb_s: intra-node GPU-to-GPU bandwidth per direction, GB/s.
        price_per_gpu_hour: default on-demand price, $ per GPU-hour (GPUPool overrides it).
        gpus_per_node: typical GPUs per node (largest useful TP degree without multi-node).
        efficiency: the performance model's constants (:class:`Efficiency`).
        source: where the figures come from.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    vendor: Literal["nvidia", "amd"]
    family: str
    product_labels: tuple[str, ...] = ()
    bf16_tflops: float = Field(gt=0.0)
    fp16_tflops: float | None = Field(default=None, gt=0.0)
    fp8_tflops: float | None = Field(default=None, gt=0.0)
    memory_gib: float = Field(gt=0.0)
    usable_memory_gib: float | None = Field(default=None, gt=0.0)
    hbm_bandwidth_gb_s: float = Field(gt=0.0)
    tdp_w: float = Field(gt=0.0)
    idle_w: float = Field(ge=0.0)
    prefill_w: float | None = Field(default=None, gt=0.0)
    decode_w: float | None = Field(default=None, gt=0.0)
    interconnect_kind: Literal["nvlink", "pcie", "infinity-fabric"]
    interconnect_gb_s: float = Field(gt=0.0)
    price_per_gpu_hour: float = Field(ge=0.0)
    gpus_per_node: int = Field(default=8, ge=1)
    efficiency: Efficiency
    source: str = Field(min_length=1)

    @model_validator(mode="after")
    def _check_consistency(self) -> GPUSpec:
        if self.usable_memory_gib is not None and self.usable_memory_gib > self.memory_gib:
            raise ValueError(
                f"usable_memory_gib ({self.usable_memory_gib}) exceeds memory_gib ({self.memory_gib}); "
                "usable memory is what the driver reports and cannot exceed the physical memory"
            )
        if self.idle_w >= self.tdp_w:
            raise ValueError(f"idle_w ({self.idle_w}) must be below tdp_w ({self.tdp_w})")
        for fld in ("prefill_w", "decode_w"):
            val = getattr(self, fld)
            if val is not None and not (self.idle_w <= val <= self.tdp_w * 1.05):
                raise ValueError(f"{fld} ({val} W) must lie between idle_w and tdp_w")
        return self

    @property
    def device_memory_gib(self) -> float:
        """Memory the engine can see, GiB (``usable_memory_gib`` or ``memory_gib``)."""
        return self.usable_memory_gib if self.usable_memory_gib is not None else self.memory_gib

    def peak_tflops(self, dtype: str = "bfloat16") -> float:
        """Dense tensor-core peak for a compute dtype, TFLOPS.

        FP8 falls back to the BF16 peak on GPUs without FP8 tensor cores (vLLM then runs FP8
        checkpoints as weight-only FP8 with BF16 math, e.g. the Marlin kernels on Ampere).
        """
        key = dtype.lower()
        if key.startswith("fp8") or key.startswith("float8"):
            return self.fp8_tflops if self.fp8_tflops is not None else self.bf16_tflops
        if key in ("float16", "fp16", "half") and self.fp16_tflops is not None:
            return self.fp16_tflops
        return self.bf16_tflops

    def with_overrides(self, **overrides: Any) -> GPUSpec:
        """A validated copy with some fields replaced (e.g. a GPUPool's price or memory).

        Raises:
            pydantic.ValidationError: an override has the wrong type or range.
        """
        data = self.model_dump()
        data.update(overrides)
        return GPUSpec.model_validate(data)


# ---------------------------------------------------------------------------------------------
# Model catalogue
# ---------------------------------------------------------------------------------------------

_HF_KEYS = {
    # Hugging Face config.json key -> ModelSpec field
    "num_hidden_layers": "num_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "intermediate_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "torch_dtype": "dtype",
    "dtype": "dtype",
    "max_position_embeddings": "max_context",
    "tie_word_embeddings": "tie_word_embeddings",
    "attention_bias": "attention_bias",
    "num_local_experts": "num_experts",
    "num_experts": "num_experts",
    "n_routed_experts": "num_experts",
    "num_experts_per_tok": "experts_per_token",
    "moe_intermediate_size": "expert_intermediate_size",
    "n_shared_experts": "num_shared_experts",
    "shared_expert_intermediate_size": "shared_expert_intermediate_size",
    "first_k_dense_replace": "num_dense_layers",
}


class ModelSpec(BaseModel):
    """Architecture of a decoder-only transformer (dense or mixture-of-experts).

    Field names are short; Hugging Face ``config.json`` names are accepted as aliases
    (``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
    ``max_position_embeddings``, ``num_local_experts`` / ``num_experts``,
    ``num_experts_per_tok``, ``moe_intermediate_size``, ``torch_dtype``).

    Parameter counts follow the Llama/Mixtral/Qwen layer layout: per layer Q/K/V/O projections
    (plus Q/K/V biases when ``attention_bias``), a gated (SwiGLU) MLP of three
    ``hidden x intermediate`` matrices (or ``num_experts`` such experts of
    ``expert_intermediate_size`` plus a router and shared experts), RMSNorm weights; an input
    embedding and an LM head (shared when ``tie_word_embeddings``).

    Attributes:
        name: Hugging Face model id (``"meta-llama/Llama-3.1-8B-Instruct"``) or a local name.
        aliases: other accepted names (case-insensitive).
        num_layers, hidden_size, num_heads, num_kv_heads, head_dim (default
            ``hidden_size // num_heads``), intermediate_size (dense MLP width), vocab_size.
        dtype: checkpoint dtype (``"bfloat16"``, ``"float16"``, ``"fp8"``...).
        max_context: maximum context length, tokens (``max_position_embeddings``).
        num_experts / experts_per_token / expert_intermediate_size: routed MoE experts
            (0 experts = dense).
        num_shared_experts / shared_expert_intermediate_size: always-active experts.
        num_dense_layers: leading layers with a dense MLP in an MoE model.
        total_params / active_params: parameter counts; derived when omitted, checked
            within 5 % when given (ValueError otherwise).
        source: where the numbers come from (e.g. the HF repo and file).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(min_length=1)
    aliases: tuple[str, ...] = ()
    num_layers: int = Field(gt=0, validation_alias=AliasChoices("num_layers", "num_hidden_layers"))
    hidden_size: int = Field(gt=0)
    num_heads: int = Field(gt=0, validation_alias=AliasChoices("num_heads", "num_attention_heads"))
    num_kv_heads: int | None = Field(
        default=None, gt=0, validation_alias=AliasChoices("num_kv_heads", "num_key_value_heads")
    )
    head_dim: int | None = Field(default=None, gt=0)
    intermediate_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    dtype: str = Field(default="bfloat16", validation_alias=AliasChoices("dtype", "torch_dtype"))
    max_context: int = Field(
        default=4096, gt=0, validation_alias=AliasChoices("max_context", "max_position_embeddings")
    )
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    num_experts: int = Field(
        default=0, ge=0, validation_alias=AliasChoices("num_experts", "num_local_experts", "n_routed_experts")
    )
    experts_per_token: int = Field(
        default=0, ge=0, validation_alias=AliasChoices("experts_per_token", "num_experts_per_tok")
    )
    expert_intermediate_size: int | None = Field(
        default=None, gt=0, validation_alias=AliasChoices("expert_intermediate_size", "moe_intermediate_size")
    )
    num_shared_experts: int = Field(default=0, ge=0)
    shared_expert_intermediate_size: int | None = Field(default=None, gt=0)
    num_dense_layers: int = Field(default=0, ge=0)
    total_params: float | None = Field(default=None, gt=0)
    active_params: float | None = Field(default=None, gt=0)
    source: str = ""

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        dtype_bytes(v)  # raises ValueError listing the accepted names
        return v.lower()

    @model_validator(mode="after")
    def _derive_and_check(self) -> ModelSpec:
        set_ = functools.partial(object.__setattr__, self)  # frozen model: fill derived fields once
        if self.num_kv_heads is None:
            set_("num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"head_dim is not given and hidden_size {self.hidden_size} is not divisible by "
                    f"num_heads {self.num_heads}; give head_dim explicitly"
                )
            set_("head_dim", self.hidden_size // self.num_heads)
        assert self.num_kv_heads is not None
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.num_experts:
            if not 1 <= self.experts_per_token <= self.num_experts:
                raise ValueError(
                    f"experts_per_token ({self.experts_per_token}) must be between 1 and num_experts "
                    f"({self.num_experts}) for a mixture-of-experts model"
                )
            if self.expert_intermediate_size is None:
                set_("expert_intermediate_size", self.intermediate_size)
            if self.num_dense_layers >= self.num_layers:
                raise ValueError("num_dense_layers must be smaller than num_layers")
        elif self.experts_per_token or self.num_shared_experts or self.expert_intermediate_size:
            raise ValueError(
                "experts_per_token / num_shared_experts / expert_intermediate_size are set but num_experts "
                "is 0; set num_experts for a mixture-of-experts model or drop the MoE fields"
            )
        if self.num_shared_experts and self.shared_expert_intermediate_size is None:
            set_("shared_expert_intermediate_size", self.expert_intermediate_size)
        total, active = self._derived_params()
        for fld, derived in (("total_params", total), ("active_params", active)):
            given = getattr(self, fld)
            if given is None:
                set_(fld, float(derived))
            elif abs(given - derived) > PARAM_TOLERANCE * derived:
                raise ValueError(
                    f"{fld}={given:.4g} disagrees with the architecture, which gives {derived:.4g} "
                    f"(more than {PARAM_TOLERANCE:.0%} apart); fix the architecture fields or omit {fld}"
                )
        return self

    # --- derived architecture quantities (parameter counts, not bytes) ---------------------

    @property
    def is_moe(self) -> bool:
        """True for a mixture-of-experts model."""
        return self.num_experts > 0

    @property
    def q_dim(self) -> int:
        """Query projection width, ``num_heads * head_dim``."""
        return self.num_heads * int(self.head_dim or 0)

    @property
    def kv_dim(self) -> int:
        """Key (= value) projection width, ``num_kv_heads * head_dim``."""
        return int(self.num_kv_heads or 0) * int(self.head_dim or 0)

    @property
    def attn_params_per_layer(self) -> float:
        """Attention parameters per layer: Q, K, V, O projections (+ biases, + QK-norm), 2 RMSNorms."""
        h = self.hidden_size
        p = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        if self.attention_bias:
            p += self.q_dim + 2 * self.kv_dim
        if self.qk_norm:
            p += 2 * int(self.head_dim or 0)
        return float(p + 2 * h)

    @property
    def dense_mlp_params(self) -> float:
        """Gated-MLP parameters of one dense layer, ``3 * hidden * intermediate``."""
        return 3.0 * self.hidden_size * self.intermediate_size

    @property
    def expert_params(self) -> float:
        """Parameters of one routed expert, ``3 * hidden * expert_intermediate`` (0 if dense)."""
        return 3.0 * self.hidden_size * int(self.expert_intermediate_size or 0) if self.is_moe else 0.0

    @property
    def shared_expert_params(self) -> float:
        """Parameters of all shared experts of one MoE layer."""
        if not self.num_shared_experts:
            return 0.0
        return (
            3.0 * self.hidden_size * int(self.shared_expert_intermediate_size or 0) * self.num_shared_experts
        )

    @property
    def num_moe_layers(self) -> int:
        """Layers with routed experts (0 for a dense model)."""
        return self.num_layers - self.num_dense_layers if self.is_moe else 0

    @property
    def embedding_params(self) -> float:
        """Input embedding parameters, ``vocab * hidden``."""
        return float(self.vocab_size * self.hidden_size)

    @property
    def lm_head_params(self) -> float:
        """LM-head parameters (the same matrix as the embedding when tied; counted once in totals)."""
        return float(self.vocab_size * self.hidden_size)

    def _derived_params(self) -> tuple[float, float]:
        dense_layers = self.num_layers - self.num_moe_layers
        router = float(self.hidden_size * self.num_experts)
        per_moe_layer_fixed = self.attn_params_per_layer + router + self.shared_expert_params
        body_total = dense_layers * (
            self.attn_params_per_layer + self.dense_mlp_params
        ) + self.num_moe_layers * (per_moe_layer_fixed + self.num_experts * self.expert_params)
        body_active = dense_layers * (
            self.attn_params_per_layer + self.dense_mlp_params
        ) + self.num_moe_layers * (per_moe_layer_fixed + self.experts_per_token * self.expert_params)
        head = self.embedding_params + (0.0 if self.tie_word_embeddings else self.lm_head_params)
        head += self.hidden_size  # final norm
        return body_total + head, body_active + head

    @property
    def weight_bytes_per_param(self) -> float:
        """Bytes per weight of the checkpoint dtype."""
        return dtype_bytes(self.dtype)

    def kv_bytes_per_token(self, kv_dtype: str | None = None) -> float:
        """KV-cache bytes per token for the whole model: ``2 * layers * kv_heads * head_dim * bytes``.

        Args:
            kv_dtype: KV-cache dtype (``None``/``"auto"`` = the model dtype; ``"fp8"`` = 1 byte).
        """
        b = self.weight_bytes_per_param if kv_dtype in (None, "auto") else dtype_bytes(kv_dtype)
        return 2.0 * self.num_layers * self.kv_dim * b

    @property
    def short_name(self) -> str:
        """The model id without the organisation prefix (``"Llama-3.1-8B-Instruct"``)."""
        return self.name.rsplit("/", 1)[-1]

    @classmethod
    def from_hf_config(cls, name: str, config: Mapping[str, Any], **extra: Any) -> ModelSpec:
        """Build a spec from a Hugging Face ``config.json`` mapping (unknown keys are ignored).

        Args:
            name: the model id to record.
            config: the parsed ``config.json`` (a nested ``text_config`` is used when present).
            extra: more fields (``aliases``, ``source``...) overriding the config.

        Raises:
            pydantic.ValidationError: missing or inconsistent architecture fields.
        """
        cfg = dict(config.get("text_config") or config)
        data: dict[str, Any] = {}
        for hf_key, fld in _HF_KEYS.items():
            if hf_key in cfg and cfg[hf_key] is not None and fld not in data:
                data[fld] = cfg[hf_key]
        if str(cfg.get("model_type", "")).startswith("qwen3"):
            data.setdefault("qk_norm", True)
        data.update(extra)
        data["name"] = name
        return cls.model_validate(data)


# ---------------------------------------------------------------------------------------------
# Catalogue containers and loading
# ---------------------------------------------------------------------------------------------


def _norm(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


class GPUCatalog(Mapping[str, GPUSpec]):
    """GPU specifications keyed by short name, with look-up by node label.

    Look-ups are case-insensitive and treat ``_``/space like ``-``.
    """

    def __init__(self, gpus: Mapping[str, GPUSpec], path: Path | None = None) -> None:
        self._gpus: dict[str, GPUSpec] = dict(gpus)
        self.path = path
        self._by_norm = {_norm(k): v for k, v in self._gpus.items()}
        self._by_label: dict[str, GPUSpec] = {}
        for spec in self._gpus.values():
            for label in spec.product_labels:
                other = self._by_label.get(_norm(label))
                if other is not None and other.name != spec.name:
                    raise CatalogFileError(
                        f"{path or 'GPU catalogue'}: product label {label!r} is claimed by both "
                        f"{other.name} and {spec.name}; a label must identify one GPU"
                    )
                self._by_label[_norm(label)] = spec

    def names(self) -> list[str]:
        """Catalogue keys, sorted."""
        return sorted(self._gpus)

    def get(self, name: str, default: Any = None) -> GPUSpec:  # type: ignore[override]
        """The GPU called ``name`` (case-insensitive).

        Raises:
            CatalogError: unknown name (the message lists the accepted names), unless a
                ``default`` other than None is given.
        """
        spec = self._by_norm.get(_norm(name))
        if spec is not None:
            return spec
        if default is not None:
            return default
        raise CatalogError(f"unknown GPU {name!r}; known GPUs: {', '.join(self.names())}")

    def by_product_label(self, label: str) -> GPUSpec:
        """The GPU identified by a node label value (``nvidia.com/gpu.product`` or
        ``amd.com/gpu.product-name``), e.g. ``"NVIDIA-H100-80GB-HBM3"``.

        GFD appends ``-SHARED`` to the product under time-slicing and ``-MIG-...`` under MIG;
        those suffixes are stripped before the look-up.

        Raises:
            CatalogError: no GPU carries the label (the message lists the known labels).
        """
        key = _norm(label)
        spec = self._by_label.get(key)
        if spec is None:
            base = re.sub(r"-(shared|mig-.*)$", "", key)
            spec = self._by_label.get(base)
        if spec is None:
            known = sorted(lbl for s in self._gpus.values() for lbl in s.product_labels)
            raise CatalogError(
                f"no GPU in the catalogue has product label {label!r}; known labels: {', '.join(known)}"
            )
        return spec

    def __getitem__(self, name: str) -> GPUSpec:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._gpus)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _norm(name) in self._by_norm


class ModelCatalog(Mapping[str, ModelSpec]):
    """Model specifications keyed by Hugging Face id; also found by alias or by the id without
    its organisation (all case-insensitive)."""

    def __init__(self, models: Mapping[str, ModelSpec], path: Path | None = None) -> None:
        self._models: dict[str, ModelSpec] = dict(models)
        self.path = path
        self._index: dict[str, ModelSpec] = {}
        for key, spec in self._models.items():
            for alias in (key, spec.name, spec.short_name, *spec.aliases):
                k = _norm(alias)
                other = self._index.get(k)
                if other is not None and other.name != spec.name:
                    raise CatalogFileError(
                        f"{path or 'model catalogue'}: name or alias {alias!r} is used by both "
                        f"{other.name} and {spec.name}"
                    )
                self._index[k] = spec

    def names(self) -> list[str]:
        """Catalogue keys (Hugging Face ids), sorted."""
        return sorted(self._models)

    def aliases(self) -> list[str]:
        """Every accepted name (ids, short names and aliases), sorted."""
        out = set(self._models)
        for spec in self._models.values():
            out.update(spec.aliases)
        return sorted(out)

    def get(self, name: str, default: Any = None) -> ModelSpec:  # type: ignore[override]
        """The model with this id or alias (case-insensitive).

        Raises:
            CatalogError: unknown name (the message lists ids and aliases), unless a ``default``
                other than None is given.
        """
        spec = self._index.get(_norm(name))
        if spec is not None:
            return spec
        if default is not None:
            return default
        raise CatalogError(
            f"unknown model {name!r}; known models and aliases: {', '.join(self.aliases())}; "
            "or give the architecture inline"
        )

    def __getitem__(self, name: str) -> ModelSpec:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _norm(name) in self._index


def policies_dir() -> Path:
    """Directory holding the policy files (``gpus.yaml``, ``models.yaml``...).

    Order: the ``ARCHIPELAGO_POLICIES`` environment variable; else the repository's
    ``policies/`` found relative to this file (``operator/archipelago/decide/`` -> repo root);
    else ``/etc/archipelago/policies`` (the operator image).
    """
    env = os.environ.get(POLICIES_ENV)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[3] / "policies"
    if repo.is_dir():
        return repo
    return SYSTEM_POLICIES_DIR


def _key_lines(text: str, section: str) -> dict[str, int]:
    """1-based line of each key of the top-level ``section`` mapping (for error messages)."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    lines: dict[str, int] = {}
    if isinstance(root, yaml.MappingNode):
        for k, v in root.value:
            if k.value == section and isinstance(v, yaml.MappingNode):
                for kk, _vv in v.value:
                    lines[str(kk.value)] = kk.start_mark.line + 1
    return lines


def _read_section(path: Path, section: str) -> tuple[dict[str, Any], dict[str, int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogFileError(
            f"cannot read catalogue {path}: {exc.strerror or exc}; set {POLICIES_ENV} to the policies directory"
        ) from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise CatalogFileError(f"{where}: invalid YAML: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get(section), dict):
        raise CatalogFileError(f"{path}: expected a top-level mapping '{section}:' of entries keyed by name")
    return doc[section], _key_lines(text, section)


def _validation_message(path: Path, line: int | None, section: str, key: str, exc: ValidationError) -> str:
    where = f"{path}:{line}" if line else str(path)
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        field = f"{section}.{key}.{loc}" if loc else f"{section}.{key}"
        parts.append(f"{field}: {err['msg']}")
    return f"{where}: invalid entry {key!r}: " + "; ".join(parts)


@functools.lru_cache(maxsize=16)
def _load_gpu_catalog_cached(path: Path) -> GPUCatalog:
    raw, lines = _read_section(path, "gpus")
    gpus: dict[str, GPUSpec] = {}
    for key, entry in raw.items():
        if not isinstance(entry, dict):
            raise CatalogFileError(f"{path}:{lines.get(str(key), '?')}: entry {key!r} must be a mapping")
        data = {"name": str(key), **entry}
        if "product_labels" in data and isinstance(data["product_labels"], list):
            data["product_labels"] = tuple(data["product_labels"])
        try:
            gpus[str(key)] = GPUSpec.model_validate(data)
        except ValidationError as exc:
            raise CatalogFileError(
                _validation_message(path, lines.get(str(key)), "gpus", str(key), exc)
            ) from exc
    return GPUCatalog(gpus, path)


@functools.lru_cache(maxsize=16)
def _load_model_catalog_cached(path: Path) -> ModelCatalog:
    raw, lines = _read_section(path, "models")
    models: dict[str, ModelSpec] = {}
    for key, entry in raw.items():
        if not isinstance(entry, dict):
            raise CatalogFileError(f"{path}:{lines.get(str(key), '?')}: entry {key!r} must be a mapping")
        data = {"name": str(key), **entry}
        if isinstance(data.get("aliases"), list):
            data["aliases"] = tuple(data["aliases"])
        try:
            models[str(key)] = ModelSpec.model_validate(data)
        except ValidationError as exc:
            raise CatalogFileError(
                _validation_message(path, lines.get(str(key)), "models", str(key), exc)
            ) from exc
    return ModelCatalog(models, path)


def load_gpu_catalog(path: str | Path | None = None) -> GPUCatalog:
    """Load and validate the GPU catalogue (cached per resolved path).

    Args:
        path: a ``gpus.yaml`` file; default ``policies_dir() / "gpus.yaml"``.

    Raises:
        CatalogFileError: unreadable file, bad YAML, or an entry failing validation (the
            message names the file, line, entry and field).
    """
    p = Path(path) if path is not None else policies_dir() / "gpus.yaml"
    return _load_gpu_catalog_cached(p.resolve())


def load_model_catalog(path: str | Path | None = None) -> ModelCatalog:
    """Load and validate the model catalogue (cached per resolved path).

    Args:
        path: a ``models.yaml`` file; default ``policies_dir() / "models.yaml"``.

    Raises:
        CatalogFileError: unreadable file, bad YAML, or an entry failing validation.
    """
    p = Path(path) if path is not None else policies_dir() / "models.yaml"
    return _load_model_catalog_cached(p.resolve())
