"""Pydantic models of the ``archipelago.dev/v1alpha1`` custom resources.

These models are the single source of truth for the API: ``archipelago.api.crdgen`` turns them
into the CustomResourceDefinitions in ``crds/``, and the operator parses custom objects with them
(``ModelDeployment.from_k8s(body)``).

* JSON/YAML names are camelCase (``gpuMemoryUtilization``); Python attributes are snake_case
  (``gpu_memory_utilization``). Both are accepted when constructing models in Python.
* Every field carries ``Field(description=...)``: it becomes the ``kubectl explain`` text.
* Every cross-field rule is written twice, once as a pydantic validator and once as a CEL rule
  (``x-kubernetes-validations``) with the same message, so a spec the API server refuses is also
  refused in Python and vice versa. ``tests/test_api.py`` checks the pairs.

Units: seconds for latencies, tokens for lengths, GiB for memory, GB/s for bandwidth, TFLOPS for
compute, watts for power, US dollars per hour for cost. Percentiles are in (0, 100] (``99`` means
p99); attainment is a fraction in (0, 1].

The condition shape follows ``metav1.Condition`` (k8s.io/apimachinery/pkg/apis/meta/v1/types.go):
type, status, reason, message, observedGeneration, lastTransitionTime.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_serializer,
    model_validator,
)
from pydantic.alias_generators import to_camel

GROUP = "archipelago.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

#: Tensor-parallel degrees an island may use (powers of two up to one 8-GPU node).
ALLOWED_TP_DEGREES: tuple[int, ...] = (1, 2, 4, 8)

# --------------------------------------------------------------------------------------------
# String types (limits from k8s.io/apimachinery/pkg/util/validation/validation.go). Every string
# has a maxLength and every list a maxItems so the API server's CEL cost estimator accepts rules.
# --------------------------------------------------------------------------------------------
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
LABEL_KEY = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
CONDITION_TYPE = LABEL_KEY
CONDITION_REASON = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
ENV_VAR_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
_LABEL_KEY_RE = re.compile(LABEL_KEY)

ResourceName = Annotated[str, StringConstraints(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN)]
IslandName = Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=DNS1123_LABEL)]
LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=317, pattern=LABEL_KEY)]
LabelValue = Annotated[str, StringConstraints(max_length=63, pattern=LABEL_VALUE)]
ShortText = Annotated[str, StringConstraints(max_length=256)]
ArgText = Annotated[str, StringConstraints(max_length=1024)]
TPDegree = Annotated[int, Field(ge=1, le=8)]

T = TypeVar("T", bound="ApiModel")


def cel(*rules: tuple[str, str] | tuple[str, str, str]) -> dict[str, Any]:
    """Build the ``json_schema_extra`` that attaches CEL rules to a model's or field's schema.

    Args:
        rules: ``(rule, message)`` or ``(rule, message, fieldPath)`` tuples. ``rule`` is a CEL
            expression over ``self`` (the object or list being validated), ``message`` the error
            the API server returns, ``fieldPath`` (e.g. ``".max"``) where it reports it.

    Returns:
        ``{"x-kubernetes-validations": [{"rule": ..., "message": ..., ["fieldPath": ...]}]}``,
        the shape of ``apiextensions.k8s.io/v1`` ``ValidationRule``.
    """
    out = []
    for r in rules:
        entry = {"rule": r[0], "message": r[1]}
        if len(r) == 3:
            entry["fieldPath"] = r[2]  # type: ignore[misc]
        out.append(entry)
    return {"x-kubernetes-validations": out}


class ApiModel(BaseModel):
    """Base of every spec model: camelCase aliases, unknown fields refused (typos fail loudly)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def to_dict(self) -> dict[str, Any]:
        """Serialise to the Kubernetes JSON shape: camelCase keys, unset (``None``) fields omitted."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class StatusModel(ApiModel):
    """Base of status models: unknown fields are ignored (status written by other versions)."""

    model_config = ConfigDict(extra="ignore")


def _obj(factory: type[BaseModel], description: str) -> Any:
    """A nested object field that defaults to ``{}`` in the CRD (so nested defaults show up)."""
    return Field(default_factory=factory, description=description, json_schema_extra={"default": {}})


def format_time(ts: datetime) -> str:
    """Format a timezone-aware datetime as Kubernetes ``metav1.Time`` (RFC 3339, seconds, ``Z``).

    Raises:
        ValueError: if ``ts`` is naive (no tzinfo): Kubernetes timestamps are UTC instants.
    """
    if ts.tzinfo is None:
        raise ValueError(f"timestamp {ts!r} has no timezone; pass an aware datetime, e.g. datetime.now(UTC)")
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ============================================================================================
# Shared pieces
# ============================================================================================
class Condition(StatusModel):
    """Standard condition (metav1.Condition): one aspect of the resource's current state."""

    type: Annotated[str, StringConstraints(min_length=1, max_length=316, pattern=CONDITION_TYPE)] = Field(
        description="Type of condition in CamelCase, e.g. Ready, Planned, Feasible, Degraded."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="Status of the condition: True, False or Unknown.")
    reason: Annotated[str, StringConstraints(min_length=1, max_length=1024, pattern=CONDITION_REASON)] = Field(
        description="Programmatic identifier (CamelCase) of the reason for the last transition, e.g. SLOInfeasible."
    )
    message: Annotated[str, StringConstraints(max_length=32768)] = Field(
        default="", description="Human-readable details about the last transition."
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation the condition was set from."
    )
    last_transition_time: datetime = Field(
        description="Last time the condition changed status (RFC 3339, UTC)."
    )

    @field_serializer("last_transition_time")
    def _ser_time(self, v: datetime) -> str:
        return format_time(v if v.tzinfo else v.replace(tzinfo=UTC))


ConditionList = Annotated[
    list[Condition],
    Field(
        default_factory=list,
        max_length=16,
        description="Standard conditions (Ready, Planned, Feasible, ...) with observedGeneration and lastTransitionTime.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    ),
]


class Toleration(ApiModel):
    """A Kubernetes toleration (core/v1 Toleration) copied onto the pods placed in this pool."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
                "toleration value must be empty when operator is Exists",
                ".value",
            ),
            (
                "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
                "a toleration without a key must use operator Exists (it then tolerates every taint)",
            ),
            (
                "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                "tolerationSeconds only applies to effect NoExecute",
                ".tolerationSeconds",
            ),
        )
    )

    key: Annotated[str, StringConstraints(max_length=317)] | None = Field(
        default=None, description="Taint key to tolerate, e.g. nvidia.com/gpu. Empty with operator Exists matches all keys."
    )
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists (any value) or Equal (value must match). Kubernetes default: Equal."
    )
    value: LabelValue | None = Field(default=None, description="Taint value to match when operator is Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None,
        ge=0,
        description="For effect NoExecute: seconds the pod stays bound after the taint appears (unset: forever).",
    )

    @model_validator(mode="after")
    def _check(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("toleration value must be empty when operator is Exists")
        if not self.key and self.operator != "Exists":
            raise ValueError("a toleration without a key must use operator Exists (it then tolerates every taint)")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds only applies to effect NoExecute")
        return self


# ============================================================================================
# GPUPool
# ============================================================================================
MSG_SELECTOR_VALUES = "values must be non-empty for operators In/NotIn and empty for Exists/DoesNotExist"
MSG_SELECTOR_EMPTY = (
    "nodeSelector must not be empty (it would claim every node): set matchLabels, "
    "e.g. nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3, or matchExpressions"
)
MSG_LABEL_KEYS = "matchLabels keys must be valid label keys ([prefix/]name, e.g. nvidia.com/gpu.product)"
MSG_SPOT = "pricing.useSpot is true but pricing.spotPerGPUHour is not set"
MSG_POWER = "power.idleWatts must be <= power.maxWatts"
MSG_NODES = "nodes.min must be <= nodes.max"


class NodeSelectorRequirement(ApiModel):
    """A label selector requirement: key, operator and values (metav1.LabelSelectorRequirement)."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0) "
                ": (!has(self.values) || size(self.values) == 0)",
                MSG_SELECTOR_VALUES,
                ".values",
            )
        )
    )

    key: LabelKey = Field(description="Node label key, e.g. nvidia.com/gpu.product or nvidia.com/gpu.memory.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="Relation of the key to values: In, NotIn, Exists or DoesNotExist."
    )
    values: list[LabelValue] = Field(
        default_factory=list,
        max_length=64,
        description="Label values; non-empty for In/NotIn, empty for Exists/DoesNotExist.",
    )

    @model_validator(mode="after")
    def _check(self) -> NodeSelectorRequirement:
        if (self.operator in ("In", "NotIn")) != bool(self.values):
            raise ValueError(MSG_SELECTOR_VALUES)
        return self


class PoolNodeSelector(ApiModel):
    """Which nodes form the pool: a label selector, typically on nvidia.com/gpu.product (GPU Feature Discovery)."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "(has(self.matchLabels) && size(self.matchLabels) > 0) || "
                "(has(self.matchExpressions) && size(self.matchExpressions) > 0)",
                MSG_SELECTOR_EMPTY,
            )
        )
    )

    match_labels: dict[str, LabelValue] = Field(
        default_factory=dict,
        max_length=32,
        description="Node labels that must all match, e.g. {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}.",
        # CEL string literals have no "\." escape: write the dot as [.] (same regex).
        json_schema_extra=cel((f"self.all(k, size(k) <= 317 && k.matches('{LABEL_KEY.replace(chr(92) + '.', '[.]')}'))", MSG_LABEL_KEYS)),
    )
    match_expressions: list[NodeSelectorRequirement] = Field(
        default_factory=list, max_length=16, description="Label requirements that must all hold (ANDed)."
    )

    @model_validator(mode="after")
    def _check(self) -> PoolNodeSelector:
        if not self.match_labels and not self.match_expressions:
            raise ValueError(MSG_SELECTOR_EMPTY)
        bad = [k for k in self.match_labels if not _LABEL_KEY_RE.match(k) or len(k) > 317]
        if bad:
            raise ValueError(f"{MSG_LABEL_KEYS} (got {bad})")
        return self


class GPUSpec(ApiModel):
    """The pool's GPU model: a key into the GPU catalogue plus optional overrides of its datasheet specs."""

    type: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*$")] = (
        Field(description="GPU catalogue key, e.g. H100-SXM, A100-80GB, L4 (policies/gpus.yaml).")
    )
    memory_gib: float | None = Field(
        default=None, alias="memoryGiB", gt=0, le=4096, description="Override: device memory per GPU, GiB."
    )
    tflops_bf16: float | None = Field(
        default=None, gt=0, le=100000, description="Override: dense BF16 peak per GPU, TFLOPS (no sparsity)."
    )
    hbm_gbps: float | None = Field(
        default=None, alias="hbmGBps", gt=0, le=100000, description="Override: memory bandwidth per GPU, GB/s."
    )
    tdp_watts: float | None = Field(
        default=None, gt=0, le=10000, description="Override: thermal design power per GPU, W."
    )


class Pricing(ApiModel):
    """Price of one GPU-hour in this pool (US dollars). Unset prices fall back to the GPU catalogue."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            ("!has(self.useSpot) || !self.useSpot || has(self.spotPerGPUHour)", MSG_SPOT, ".spotPerGPUHour")
        )
    )

    on_demand_per_gpu_hour: float | None = Field(
        default=None,
        alias="onDemandPerGPUHour",
        ge=0,
        le=1000,
        description="On-demand price per GPU-hour, $/h; unset: the catalogue default for the GPU type.",
    )
    spot_per_gpu_hour: float | None = Field(
        default=None, alias="spotPerGPUHour", ge=0, le=1000, description="Spot/preemptible price per GPU-hour, $/h."
    )
    use_spot: bool = Field(default=False, description="Plan with the spot price (requires spotPerGPUHour).")

    @model_validator(mode="after")
    def _check(self) -> Pricing:
        if self.use_spot and self.spot_per_gpu_hour is None:
            raise ValueError(MSG_SPOT)
        return self

    def effective_per_gpu_hour(self) -> float | None:
        """The price the planner uses, $/GPU-hour: spot if ``useSpot`` else on-demand (``None``: use catalogue)."""
        return self.spot_per_gpu_hour if self.use_spot else self.on_demand_per_gpu_hour


class Power(ApiModel):
    """Per-GPU power draw used for energy estimates; unset values fall back to the GPU catalogue."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            ("!has(self.idleWatts) || !has(self.maxWatts) || self.idleWatts <= self.maxWatts", MSG_POWER, ".idleWatts")
        )
    )

    idle_watts: float | None = Field(default=None, ge=0, le=10000, description="Idle power per GPU, W.")
    max_watts: float | None = Field(default=None, gt=0, le=10000, description="Power per GPU at full load, W.")

    @model_validator(mode="after")
    def _check(self) -> Power:
        if self.idle_watts is not None and self.max_watts is not None and self.idle_watts > self.max_watts:
            raise ValueError(MSG_POWER)
        return self


class NodeBounds(ApiModel):
    """Autoscaling bounds on the pool's node count (for a cluster autoscaler / node provisioner)."""

    model_config = ConfigDict(
        json_schema_extra=cel(("!has(self.max) || !has(self.min) || self.min <= self.max", MSG_NODES, ".min"))
    )

    min: int = Field(default=0, ge=0, le=10000, description="Fewest nodes the pool keeps.")
    max: int | None = Field(
        default=None, ge=0, le=10000, description="Most nodes the pool may grow to; unset: the nodes that exist."
    )
    gpus_per_node: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="GPUs per node, used for nodes not yet provisioned; otherwise read from node capacity.",
    )

    @model_validator(mode="after")
    def _check(self) -> NodeBounds:
        if self.max is not None and self.min > self.max:
            raise ValueError(f"{MSG_NODES} (got min={self.min}, max={self.max})")
        return self


class GPUPoolSpec(ApiModel):
    """Desired state of a GPUPool: which nodes, which GPU, its price, power and scaling bounds."""

    node_selector: PoolNodeSelector = Field(
        description="Label selector choosing the pool's nodes, typically on nvidia.com/gpu.product."
    )
    gpu: GPUSpec = Field(description="GPU type (catalogue key) and optional spec overrides.")
    pricing: Pricing = _obj(Pricing, "Price per GPU-hour, on-demand and spot.")
    power: Power = _obj(Power, "Per-GPU idle and full-load power for energy estimates.")
    nodes: NodeBounds = _obj(NodeBounds, "Autoscaling bounds on the number of nodes.")
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Tolerations added to pods placed on this pool's nodes."
    )
    resource_name: Annotated[
        str,
        StringConstraints(max_length=64, pattern=r"^(nvidia\.com/(gpu|mig-[0-9]+g\.[0-9]+gb)|amd\.com/gpu)$"),
    ] = Field(
        default="nvidia.com/gpu",
        description="Extended resource requested per GPU: nvidia.com/gpu, a MIG profile (nvidia.com/mig-1g.10gb) or amd.com/gpu.",
    )


class GPUPoolStatus(StatusModel):
    """Observed state of a GPUPool, recomputed from nodes and pods on every reconcile."""

    nodes: int | None = Field(default=None, ge=0, description="Ready nodes matching the selector.")
    gpus_total: int | None = Field(default=None, ge=0, description="GPUs in the pool's node capacity.")
    gpus_allocatable: int | None = Field(default=None, ge=0, description="GPUs allocatable on the pool's nodes.")
    gpus_used_by_archipelago: int | None = Field(default=None, ge=0, description="GPUs requested by pods this operator manages.")
    gpus_used_by_others: int | None = Field(default=None, ge=0, description="GPUs requested by other pods.")
    gpus_free: int | None = Field(default=None, ge=0, description="Allocatable GPUs not requested by any pod.")
    conditions: ConditionList
    observed_generation: int | None = Field(default=None, ge=0, description="metadata.generation this status reflects.")


# ============================================================================================
# ServingSLO
# ============================================================================================
MSG_OBJECTIVE_ONE = "set exactly one of objective.preset or objective.weights"
MSG_WEIGHTS_ZERO = "objective weights must not all be zero"


class LatencyTarget(ApiModel):
    """A latency target: the given percentile of requests must finish the phase within ``seconds``."""

    seconds: float = Field(gt=0, le=3600, description="Latency bound in seconds (> 0).")
    percentile: float = Field(
        default=99.0, gt=0, le=100, description="Percentile the bound applies to, in (0, 100]; 99 means p99."
    )


class ObjectiveWeights(ApiModel):
    """Relative weights of the planner's objectives; non-negative, not all zero, need not sum to 1."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "(has(self.cost) ? self.cost : 0.0) + (has(self.latency) ? self.latency : 0.0)"
                " + (has(self.energy) ? self.energy : 0.0) > 0.0",
                MSG_WEIGHTS_ZERO,
            )
        )
    )

    cost: float = Field(default=0.0, ge=0, le=1000, description="Weight of cost ($/h).")
    latency: float = Field(default=0.0, ge=0, le=1000, description="Weight of tail latency (TTFT, TPOT).")
    energy: float = Field(default=0.0, ge=0, le=1000, description="Weight of energy (W).")

    @model_validator(mode="after")
    def _check(self) -> ObjectiveWeights:
        if self.cost + self.latency + self.energy <= 0:
            raise ValueError(MSG_WEIGHTS_ZERO)
        return self


class Objective(ApiModel):
    """Which point of the Pareto front (cost, SLO attainment / tail latency, energy) to run: a preset or weights."""

    model_config = ConfigDict(json_schema_extra=cel(("has(self.preset) != has(self.weights)", MSG_OBJECTIVE_ONE)))

    preset: Literal["cost", "latency", "energy", "balanced"] | None = Field(
        default=None,
        description="Named preference: cost (cheapest plan meeting the SLO), latency (lowest tail latency within "
        "budget), energy (fewest watts), balanced (equal weights).",
    )
    weights: ObjectiveWeights | None = Field(default=None, description="Explicit weights instead of a preset.")

    @model_validator(mode="after")
    def _check(self) -> Objective:
        if (self.preset is None) == (self.weights is None):
            raise ValueError(MSG_OBJECTIVE_ONE)
        return self

    def resolved_weights(self) -> ObjectiveWeights:
        """Weights the planner uses: ``weights`` as given, or the preset's (cost/latency/energy one-hot, balanced 1/1/1)."""
        if self.weights is not None:
            return self.weights
        if self.preset == "balanced":
            return ObjectiveWeights(cost=1.0, latency=1.0, energy=1.0)
        return ObjectiveWeights(**{str(self.preset): 1.0})


class Budget(ApiModel):
    """Hard caps the plan must respect; a plan over budget is refused (the model becomes Infeasible)."""

    max_dollars_per_hour: float | None = Field(
        default=None, gt=0, le=1_000_000, description="Most the model's islands may cost, $/h."
    )
    max_watts: float | None = Field(default=None, gt=0, le=10_000_000, description="Most the model's GPUs may draw, W.")


class ServingSLOSpec(ApiModel):
    """Latency targets (TTFT, TPOT), the fraction of requests that must meet them, and the objective."""

    ttft: LatencyTarget = Field(description="Time-to-first-token target (queueing + prefill), seconds at a percentile.")
    tpot: LatencyTarget = Field(
        description="Time-per-output-token (inter-token latency, decode) target, seconds at a percentile."
    )
    e2e: LatencyTarget | None = Field(default=None, alias="e2e", description="Optional end-to-end request latency target.")
    attainment: float = Field(
        default=0.99,
        gt=0,
        le=1,
        description="SLO attainment target: fraction of requests that must meet all targets, in (0, 1].",
    )
    objective: Objective = Field(
        default_factory=lambda: Objective(preset="cost"),
        description="Preference among Pareto-optimal plans; default preset cost.",
        json_schema_extra={"default": {"preset": "cost"}},
    )
    budget: Budget | None = Field(default=None, description="Optional caps on $/h and watts.")


class ServingSLOStatus(StatusModel):
    """Observed state of a ServingSLO."""

    conditions: ConditionList
    observed_generation: int | None = Field(default=None, ge=0, description="metadata.generation this status reflects.")
    bound_models: list[ResourceName] = Field(
        default_factory=list,
        max_length=256,
        description="Names of the ModelDeployments in this namespace whose sloRef names this SLO.",
    )


# ============================================================================================
# ModelDeployment
# ============================================================================================
MSG_REPLICAS = "replicas.min must be <= replicas.max"
MSG_TP = "tensorParallel entries must be powers of two: 1, 2, 4 or 8"
MSG_KV_HEADS = "kvHeads must divide attentionHeads (grouped-query attention)"
MSG_MOE = "moe.expertsPerToken must be <= moe.experts"
MSG_ENV_BOTH = "set value or valueFrom, not both"
MSG_ENV_SOURCE = "valueFrom must set exactly one of secretKeyRef, configMapKeyRef, fieldRef"
MSG_PD_REPLICAS = "disaggregation prefill-decode needs replicas.max >= 2 (one prefill and one decode replica)"


class MoESpec(ApiModel):
    """Mixture-of-experts layout of the FFN layers."""

    model_config = ConfigDict(
        json_schema_extra=cel(("self.expertsPerToken <= self.experts", MSG_MOE, ".expertsPerToken"))
    )

    experts: int = Field(ge=2, le=4096, description="Routed experts per MoE layer, e.g. 8 for Mixtral-8x7B.")
    experts_per_token: int = Field(ge=1, le=256, description="Experts activated per token (top-k), e.g. 2.")
    expert_intermediate_size: int | None = Field(
        default=None, ge=1, le=1_000_000, description="FFN hidden size of one expert; unset: intermediateSize."
    )
    shared_experts: int = Field(default=0, ge=0, le=64, description="Always-active shared experts (DeepSeek-style).")

    @model_validator(mode="after")
    def _check(self) -> MoESpec:
        if self.experts_per_token > self.experts:
            raise ValueError(f"{MSG_MOE} (got {self.experts_per_token} > {self.experts})")
        return self


class ModelArchitecture(ApiModel):
    """Inline transformer architecture, for models not in the model catalogue (or to override it)."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.kvHeads) || (self.kvHeads <= self.attentionHeads && self.attentionHeads % self.kvHeads == 0)",
                MSG_KV_HEADS,
                ".kvHeads",
            )
        )
    )

    parameters_b: float = Field(gt=0, le=100_000, description="Total parameters, billions (all experts for MoE).")
    layers: int = Field(ge=1, le=1024, description="Transformer layers (decoder blocks).")
    hidden_size: int = Field(ge=1, le=1_000_000, description="Model (embedding) dimension.")
    attention_heads: int = Field(ge=1, le=4096, description="Query attention heads.")
    kv_heads: int | None = Field(
        default=None, ge=1, le=4096, description="Key/value heads (GQA/MQA); unset: attentionHeads (MHA)."
    )
    head_dim: int | None = Field(
        default=None, ge=1, le=65536, description="Dimension per head; unset: hiddenSize / attentionHeads."
    )
    intermediate_size: int | None = Field(default=None, ge=1, le=1_000_000, description="Dense FFN hidden size.")
    vocab_size: int | None = Field(default=None, ge=1, le=10_000_000, description="Vocabulary size, tokens.")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        default="bfloat16", description="Weight and activation dtype before quantization."
    )
    moe: MoESpec | None = Field(default=None, description="Mixture-of-experts layout; unset for dense models.")

    @model_validator(mode="after")
    def _check(self) -> ModelArchitecture:
        if self.kv_heads is not None and (
            self.kv_heads > self.attention_heads or self.attention_heads % self.kv_heads != 0
        ):
            raise ValueError(f"{MSG_KV_HEADS} (got kvHeads={self.kv_heads}, attentionHeads={self.attention_heads})")
        return self


class ModelSpec(ApiModel):
    """Which model to serve: a Hugging Face id or catalogue key, and optionally its architecture."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=256)] = Field(
        description="Hugging Face model id or model catalogue key, e.g. meta-llama/Llama-3.1-8B-Instruct."
    )
    revision: Annotated[str, StringConstraints(max_length=128)] | None = Field(
        default=None, description="Model revision (git commit, branch or tag) to pin."
    )
    architecture: ModelArchitecture | None = Field(
        default=None, description="Inline architecture; unset: looked up in the model catalogue by name."
    )
    quantization: Literal["fp8", "int8", "awq", "gptq"] | None = Field(
        default=None,
        description="Weight quantization: fp8/int8 (1 byte per weight) or awq/gptq (4-bit); unset: the model dtype.",
    )


class SecretKeyRef(ApiModel):
    """Selects a key of a Secret in the model's namespace."""

    name: ResourceName = Field(description="Name of the Secret.")
    key: Annotated[str, StringConstraints(min_length=1, max_length=253)] = Field(description="Key within the Secret.")
    optional: bool | None = Field(default=None, description="Start even if the Secret or key is missing.")


class ConfigMapKeyRef(ApiModel):
    """Selects a key of a ConfigMap in the model's namespace."""

    name: ResourceName = Field(description="Name of the ConfigMap.")
    key: Annotated[str, StringConstraints(min_length=1, max_length=253)] = Field(description="Key within the ConfigMap.")
    optional: bool | None = Field(default=None, description="Start even if the ConfigMap or key is missing.")


class FieldRef(ApiModel):
    """Selects a field of the pod (downward API)."""

    field_path: Annotated[str, StringConstraints(min_length=1, max_length=256)] = Field(
        description="Path of the pod field, e.g. metadata.name or status.podIP."
    )
    api_version: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        default=None, description="Schema version of fieldPath; default v1."
    )


class EnvVarSource(ApiModel):
    """Source of an environment variable's value: a Secret key, a ConfigMap key or a pod field."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "(has(self.secretKeyRef) ? 1 : 0) + (has(self.configMapKeyRef) ? 1 : 0) + (has(self.fieldRef) ? 1 : 0) == 1",
                MSG_ENV_SOURCE,
            )
        )
    )

    secret_key_ref: SecretKeyRef | None = Field(default=None, description="A key of a Secret, e.g. an HF token.")
    config_map_key_ref: ConfigMapKeyRef | None = Field(default=None, description="A key of a ConfigMap.")
    field_ref: FieldRef | None = Field(default=None, description="A pod field (downward API).")

    @model_validator(mode="after")
    def _check(self) -> EnvVarSource:
        if sum(x is not None for x in (self.secret_key_ref, self.config_map_key_ref, self.field_ref)) != 1:
            raise ValueError(MSG_ENV_SOURCE)
        return self


class EnvVar(ApiModel):
    """An environment variable for the engine container (core/v1 EnvVar, common sources only)."""

    model_config = ConfigDict(json_schema_extra=cel(("!has(self.value) || !has(self.valueFrom)", MSG_ENV_BOTH)))

    name: Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=ENV_VAR_NAME)] = Field(
        description="Variable name, e.g. HF_TOKEN."
    )
    value: Annotated[str, StringConstraints(max_length=4096)] | None = Field(default=None, description="Literal value.")
    value_from: EnvVarSource | None = Field(default=None, description="Value read from a Secret, ConfigMap or pod field.")

    @model_validator(mode="after")
    def _check(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError(MSG_ENV_BOTH)
        return self


class EngineSpec(ApiModel):
    """The inference engine and its settings shared by all islands (the planner sets TP and roles)."""

    kind: Literal["vllm", "sglang"] = Field(default="vllm", description="Inference engine: vllm or sglang.")
    image: Annotated[str, StringConstraints(max_length=512)] | None = Field(
        default=None, description="Container image; unset: vllm/vllm-openai or lmsysorg/sglang at the operator's pinned tag."
    )
    extra_args: list[ArgText] = Field(
        default_factory=list,
        max_length=64,
        description="Extra engine command-line arguments, appended verbatim (e.g. --enable-prefix-caching).",
    )
    env: list[EnvVar] = Field(default_factory=list, max_length=64, description="Environment variables for the engine.")
    max_model_len: int | None = Field(
        default=None, ge=16, le=10_000_000, description="Context length limit, tokens (vLLM --max-model-len, SGLang --context-length)."
    )
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Fraction of GPU memory the engine may use, in (0, 1] (vLLM --gpu-memory-utilization, SGLang --mem-fraction-static).",
    )
    max_num_seqs: int | None = Field(
        default=None, ge=1, le=65536, description="Most concurrent sequences per replica (vLLM --max-num-seqs, SGLang --max-running-requests)."
    )
    max_num_batched_tokens: int | None = Field(
        default=None, ge=1, le=10_000_000, description="Token budget per engine step (chunked prefill), tokens."
    )


class ReplicaBounds(ApiModel):
    """Bounds on the total number of engine replicas (pods) across all islands."""

    model_config = ConfigDict(
        json_schema_extra=cel(("!has(self.max) || !has(self.min) || self.min <= self.max", MSG_REPLICAS, ".min"))
    )

    min: int = Field(default=1, ge=0, le=10000, description="Fewest replicas kept even without load (0 allows scale to zero).")
    max: int | None = Field(default=None, ge=1, le=10000, description="Most replicas; unset: limited by pool capacity.")

    @model_validator(mode="after")
    def _check(self) -> ReplicaBounds:
        if self.max is not None and self.min > self.max:
            raise ValueError(f"{MSG_REPLICAS} (got min={self.min}, max={self.max})")
        return self


class Placement(ApiModel):
    """Where and how the planner may place the model's islands."""

    allowed_pools: list[ResourceName] = Field(
        default_factory=list,
        max_length=32,
        description="GPUPool names the model may use; empty: every pool.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    tensor_parallel: list[TPDegree] = Field(
        default_factory=list,
        max_length=4,
        description="Allowed tensor-parallel (TP) degrees, powers of two in 1..8; empty: all that fit the model.",
        json_schema_extra={"x-kubernetes-list-type": "set", **cel(("self.all(t, t in [1, 2, 4, 8])", MSG_TP))},
    )
    disaggregation: Literal["none", "auto", "prefill-decode"] = Field(
        default="none",
        description="Prefill/decode disaggregation: none (mixed islands), auto (planner decides), prefill-decode (always split).",
    )

    @model_validator(mode="after")
    def _check(self) -> Placement:
        bad = [t for t in self.tensor_parallel if t not in ALLOWED_TP_DEGREES]
        if bad:
            raise ValueError(f"{MSG_TP} (got {bad})")
        if len(set(self.tensor_parallel)) != len(self.tensor_parallel):
            raise ValueError(f"tensorParallel entries must be unique (got {self.tensor_parallel})")
        if len(set(self.allowed_pools)) != len(self.allowed_pools):
            raise ValueError(f"allowedPools entries must be unique (got {self.allowed_pools})")
        return self


class WorkloadHint(ApiModel):
    """Expected load, used to plan until Prometheus metrics for the model exist."""

    requests_per_second: float = Field(ge=0, le=1_000_000, description="Mean arrival rate, requests/s.")
    mean_input_tokens: float = Field(gt=0, le=10_000_000, description="Mean prompt length, tokens.")
    mean_output_tokens: float = Field(gt=0, le=10_000_000, description="Mean generated length, tokens.")
    p90_input_tokens: int | None = Field(default=None, ge=1, le=10_000_000, description="90th percentile prompt length, tokens.")


class ModelDeploymentSpec(ApiModel):
    """Desired state of a ModelDeployment: model, engine, SLO, bounds and placement constraints."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.placement) || !has(self.placement.disaggregation) || "
                "self.placement.disaggregation != 'prefill-decode' || !has(self.replicas) || "
                "!has(self.replicas.max) || self.replicas.max >= 2",
                MSG_PD_REPLICAS,
            )
        )
    )

    model: ModelSpec = Field(description="Model identity, optional inline architecture and quantization.")
    engine: EngineSpec = _obj(EngineSpec, "Inference engine (vllm or sglang) and its settings.")
    slo_ref: ResourceName = Field(description="Name of a ServingSLO in the same namespace.")
    replicas: ReplicaBounds = _obj(ReplicaBounds, "Bounds on the total engine replicas across islands.")
    placement: Placement = _obj(Placement, "Allowed pools, TP degrees and prefill/decode disaggregation.")
    priority: int = Field(
        default=0, ge=-1000, le=1000, description="Higher priority models get GPUs first when pools are short."
    )
    workload_hint: WorkloadHint | None = Field(
        default=None, description="Expected load used until metrics exist."
    )
    paused: bool = Field(default=False, description="Stop re-planning and keep the current Deployments as they are.")

    @model_validator(mode="after")
    def _check(self) -> ModelDeploymentSpec:
        if (
            self.placement.disaggregation == "prefill-decode"
            and self.replicas.max is not None
            and self.replicas.max < 2
        ):
            raise ValueError(MSG_PD_REPLICAS)
        return self


class TokenRange(StatusModel):
    """A range of prompt lengths, tokens: [min, max); max unset means unbounded."""

    min: int = Field(default=0, ge=0, description="Smallest prompt length routed here, tokens (inclusive).")
    max: int | None = Field(default=None, ge=1, description="Prompt length bound, tokens (exclusive); unset: unbounded.")


class Island(StatusModel):
    """One island of the plan: a GPU type x TP degree x replica count serving one role and input-length range."""

    name: IslandName = Field(description="Island name; also the suffix of its Deployment.")
    pool: ResourceName = Field(description="GPUPool the island runs in.")
    gpu: ShortText = Field(description="GPU catalogue key of the pool.")
    tp: int = Field(ge=1, le=64, description="Tensor-parallel degree (GPUs per replica).")
    replicas: int = Field(ge=0, le=10000, description="Engine replicas (pods).")
    role: Literal["mixed", "prefill", "decode"] = Field(
        default="mixed", description="Phase served: mixed (prefill and decode), prefill or decode."
    )
    input_tokens: TokenRange = Field(
        default_factory=TokenRange, description="Prompt-length range routed to this island, tokens."
    )
    traffic_share: float = Field(default=1.0, ge=0, le=1, description="Fraction of the model's requests routed here.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Engine settings chosen for this island (e.g. maxNumSeqs, maxNumBatchedTokens).",
    )


class Predicted(StatusModel):
    """Predicted cost, tail latency, SLO attainment and power of a plan."""

    dollars_per_hour: float | None = Field(default=None, ge=0, description="Cost of the plan's GPUs, $/h.")
    ttft_p99_seconds: float | None = Field(default=None, ge=0, description="Predicted p99 TTFT, seconds.")
    tpot_p99_seconds: float | None = Field(default=None, ge=0, description="Predicted p99 TPOT (inter-token latency), seconds.")
    attainment: float | None = Field(default=None, ge=0, le=1, description="Predicted SLO attainment, fraction in [0, 1].")
    watts: float | None = Field(default=None, ge=0, description="Predicted mean power of the plan's GPUs, W.")


class ParetoPoint(StatusModel):
    """One plan on the Pareto front the chosen plan was picked from."""

    dollars_per_hour: float = Field(ge=0, description="Cost, $/h.")
    attainment: float = Field(ge=0, le=1, description="Predicted SLO attainment, fraction.")
    watts: float | None = Field(default=None, ge=0, description="Predicted mean power, W.")
    ttft_p99_seconds: float | None = Field(default=None, ge=0, description="Predicted p99 TTFT, seconds.")
    chosen: bool = Field(default=False, description="True for the plan the operator runs.")


class Plan(StatusModel):
    """The plan the operator runs: islands, their predicted performance and the alternatives."""

    islands: list[Island] = Field(default_factory=list, max_length=64, description="Islands of the plan.")
    predicted: Predicted | None = Field(default=None, description="Predicted cost, latency, attainment, power.")
    pareto_front: list[ParetoPoint] = Field(
        default_factory=list, max_length=64, description="Pareto-optimal plans considered (cost, attainment, watts)."
    )
    plan_time: datetime | None = Field(default=None, description="When the plan was computed (RFC 3339).")
    plan_id: ShortText | None = Field(default=None, description="Content hash identifying the plan.")

    @field_serializer("plan_time")
    def _ser_time(self, v: datetime | None) -> str | None:
        return None if v is None else format_time(v if v.tzinfo else v.replace(tzinfo=UTC))


class Observed(StatusModel):
    """Workload and latency measured for the model (Prometheus), or the hint when no metrics exist."""

    requests_per_second: float | None = Field(default=None, ge=0, description="Arrival rate, requests/s.")
    ttft_p99_seconds: float | None = Field(default=None, ge=0, description="Measured p99 TTFT, seconds.")
    tpot_p99_seconds: float | None = Field(default=None, ge=0, description="Measured p99 inter-token latency, seconds.")
    attainment: float | None = Field(default=None, ge=0, le=1, description="Measured SLO attainment, fraction.")
    source: Literal["prometheus", "hint", "none"] | None = Field(
        default=None, description="Where the figures come from: prometheus, hint (workloadHint) or none."
    )


class ModelDeploymentStatus(StatusModel):
    """Observed state of a ModelDeployment: phase, plan, predictions, observations, conditions."""

    phase: Literal["Pending", "Planning", "Ready", "Degraded", "Infeasible"] | None = Field(
        default=None, description="Pending, Planning, Ready, Degraded or Infeasible (SLO or budget cannot be met)."
    )
    plan: Plan | None = Field(default=None, description="The plan being run.")
    observed: Observed | None = Field(default=None, description="Measured load and latency.")
    replicas: int | None = Field(default=None, ge=0, description="Engine replicas across all islands.")
    gpus: int | None = Field(default=None, ge=0, description="GPUs used across all islands.")
    dollars_per_hour: float | None = Field(default=None, ge=0, description="Cost of the running islands, $/h.")
    conditions: ConditionList
    observed_generation: int | None = Field(default=None, ge=0, description="metadata.generation this status reflects.")


# ============================================================================================
# Top-level resources
# ============================================================================================
class ObjectMeta(BaseModel):
    """The parts of metav1.ObjectMeta the operator reads; other keys are kept as they are."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    creation_timestamp: datetime | None = None


class ResourceValidationError(ValueError):
    """A custom object failed validation. ``str()`` names the kind, object, fields and each problem.

    Attributes:
        kind: the resource kind (e.g. ``ModelDeployment``).
        name: ``namespace/name`` or ``name`` of the object, ``"<unnamed>"`` if absent.
        errors: list of ``(field_path, message)`` with camelCase dotted paths, e.g. ``spec.replicas``.
    """

    def __init__(self, kind: str, name: str, errors: list[tuple[str, str]], source: str | None = None):
        self.kind, self.name, self.errors, self.source = kind, name, errors, source
        where = f" ({source})" if source else ""
        lines = "\n".join(f"  {path or '<root>'}: {msg}" for path, msg in errors)
        super().__init__(f"{kind} {name}{where} is invalid; fix these fields:\n{lines}")


def _plain(obj: Any) -> Any:
    """Deep-convert Mappings (e.g. kopf.Body) and sequences into plain dicts and lists."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _errors_of(exc: ValidationError) -> list[tuple[str, str]]:
    out = []
    for e in exc.errors(include_url=False):
        path = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        out.append((path, msg))
    return out


class _Resource(ApiModel):
    """Common shape of the custom resources: apiVersion, kind, metadata, spec, status."""

    KIND: ClassVar[str]
    PLURAL: ClassVar[str]
    SHORT_NAMES: ClassVar[tuple[str, ...]]
    SCOPE: ClassVar[Literal["Namespaced", "Cluster"]]
    CATEGORIES: ClassVar[tuple[str, ...]] = ("archipelago",)
    #: additionalPrinterColumns: (name, type, jsonPath, description[, priority])
    PRINTER_COLUMNS: ClassVar[tuple[tuple[str, str, str, str], ...]]
    SPEC: ClassVar[type[ApiModel]]
    STATUS: ClassVar[type[StatusModel]]

    api_version: str = Field(default=API_VERSION, description="archipelago.dev/v1alpha1")
    kind: str = Field(description="Resource kind.")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Standard object metadata.")

    @model_validator(mode="before")
    @classmethod
    def _check_kind(cls, data: Any) -> Any:
        """Fill in ``kind``/``apiVersion`` when absent; refuse another kind before checking fields."""
        if isinstance(data, dict):
            data = dict(data)
            data.setdefault("kind", cls.KIND)
            data.setdefault("apiVersion", API_VERSION)
            if data["kind"] != cls.KIND:
                raise ValueError(f"kind is {data['kind']!r}, expected {cls.KIND!r}")
            if data["apiVersion"] != API_VERSION:
                raise ValueError(f"apiVersion is {data['apiVersion']!r}, expected {API_VERSION!r}")
        return data

    @classmethod
    def from_k8s(cls: type[T], obj: Mapping[str, Any], source: str | None = None) -> T:
        """Parse a whole custom object (as returned by the API server or kopf's ``body``) into the model.

        Args:
            obj: mapping with ``apiVersion``, ``kind``, ``metadata``, ``spec`` and optional ``status``;
                nested Mappings (``kopf.Body``) are accepted.
            source: optional origin for error messages, e.g. ``"samples/llama.yaml"``.

        Returns:
            The validated resource, with defaults applied.

        Raises:
            ResourceValidationError: naming the kind, ``namespace/name`` and each invalid field
                (camelCase path) with the reason.
        """
        data = _plain(obj)
        if not isinstance(data, dict):
            raise ResourceValidationError(cls.KIND, "<unnamed>", [("", f"expected a mapping, got {type(obj).__name__}")], source)
        meta = data.get("metadata") or {}
        name = meta.get("name", "<unnamed>") if isinstance(meta, dict) else "<unnamed>"
        if isinstance(meta, dict) and meta.get("namespace"):
            name = f"{meta['namespace']}/{name}"
        try:
            try:
                # Kubernetes objects use the camelCase names only: refuse snake_case keys, which the
                # API server would silently prune (pydantic >= 2.11 supports per-call by_name).
                return cls.model_validate(data, by_alias=True, by_name=False)
            except TypeError:  # pragma: no cover - pydantic < 2.11
                return cls.model_validate(data)
        except ValidationError as exc:
            raise ResourceValidationError(cls.KIND, name, _errors_of(exc), source) from None

    def to_k8s(self) -> dict[str, Any]:
        """Serialise to a Kubernetes object dict (camelCase, ``None`` omitted), e.g. for apply or tests."""
        return self.to_dict()


class GPUPool(_Resource):
    """A pool of identical GPUs on nodes chosen by a label selector (cluster-scoped)."""

    KIND: ClassVar[str] = "GPUPool"
    PLURAL: ClassVar[str] = "gpupools"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("gp",)
    SCOPE: ClassVar[Literal["Namespaced", "Cluster"]] = "Cluster"
    PRINTER_COLUMNS: ClassVar[tuple[tuple[str, str, str, str], ...]] = (
        ("GPU", "string", ".spec.gpu.type", "GPU catalogue key"),
        ("Nodes", "integer", ".status.nodes", "Ready nodes in the pool"),
        ("GPUs", "integer", ".status.gpusTotal", "GPUs in the pool"),
        ("Free", "integer", ".status.gpusFree", "GPUs not requested by any pod"),
        ("$/GPU-h", "number", ".spec.pricing.onDemandPerGPUHour", "On-demand price per GPU-hour"),
        ("Age", "date", ".metadata.creationTimestamp", "Time since creation"),
    )
    SPEC: ClassVar[type[ApiModel]] = GPUPoolSpec
    STATUS: ClassVar[type[StatusModel]] = GPUPoolStatus

    spec: GPUPoolSpec
    status: GPUPoolStatus | None = None


class ServingSLO(_Resource):
    """Latency SLO (TTFT, TPOT), attainment target, objective and budget for the models that reference it."""

    KIND: ClassVar[str] = "ServingSLO"
    PLURAL: ClassVar[str] = "servingslos"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("slo",)
    SCOPE: ClassVar[Literal["Namespaced", "Cluster"]] = "Namespaced"
    PRINTER_COLUMNS: ClassVar[tuple[tuple[str, str, str, str], ...]] = (
        ("TTFT", "number", ".spec.ttft.seconds", "TTFT target, seconds"),
        ("TPOT", "number", ".spec.tpot.seconds", "TPOT (inter-token latency) target, seconds"),
        ("Attainment", "number", ".spec.attainment", "Fraction of requests that must meet all targets"),
        ("Age", "date", ".metadata.creationTimestamp", "Time since creation"),
    )
    SPEC: ClassVar[type[ApiModel]] = ServingSLOSpec
    STATUS: ClassVar[type[StatusModel]] = ServingSLOStatus

    spec: ServingSLOSpec
    status: ServingSLOStatus | None = None


class ModelDeployment(_Resource):
    """An LLM served by vLLM or SGLang on islands the operator plans under a ServingSLO."""

    KIND: ClassVar[str] = "ModelDeployment"
    PLURAL: ClassVar[str] = "modeldeployments"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("md",)
    SCOPE: ClassVar[Literal["Namespaced", "Cluster"]] = "Namespaced"
    PRINTER_COLUMNS: ClassVar[tuple[tuple[str, str, str, str], ...]] = (
        ("Engine", "string", ".spec.engine.kind", "Inference engine"),
        ("SLO", "string", ".spec.sloRef", "ServingSLO name"),
        ("Replicas", "integer", ".status.replicas", "Engine replicas across islands"),
        ("GPUs", "integer", ".status.gpus", "GPUs across islands"),
        ("$/h", "number", ".status.dollarsPerHour", "Cost of the running islands, $/h"),
        ("Phase", "string", ".status.phase", "Pending, Planning, Ready, Degraded or Infeasible"),
        ("Age", "date", ".metadata.creationTimestamp", "Time since creation"),
    )
    SPEC: ClassVar[type[ApiModel]] = ModelDeploymentSpec
    STATUS: ClassVar[type[StatusModel]] = ModelDeploymentStatus

    spec: ModelDeploymentSpec
    status: ModelDeploymentStatus | None = None


#: The kinds this API version defines, in CRD generation order.
RESOURCES: tuple[type[_Resource], ...] = (GPUPool, ServingSLO, ModelDeployment)
_BY_KIND: dict[str, type[_Resource]] = {r.KIND: r for r in RESOURCES}


def parse_resource(obj: Mapping[str, Any], source: str | None = None) -> GPUPool | ServingSLO | ModelDeployment:
    """Parse any ``archipelago.dev/v1alpha1`` object, choosing the model by its ``kind``.

    Raises:
        ResourceValidationError: unknown apiVersion/kind, or invalid fields (see ``from_k8s``).
    """
    kind = obj.get("kind") if isinstance(obj, Mapping) else None
    api = obj.get("apiVersion") if isinstance(obj, Mapping) else None
    if api != API_VERSION or kind not in _BY_KIND:
        raise ResourceValidationError(
            str(kind),
            "<object>",
            [("kind", f"expected apiVersion {API_VERSION} and kind one of {sorted(_BY_KIND)}, got {api}/{kind}")],
            source,
        )
    return _BY_KIND[kind].from_k8s(obj, source)  # type: ignore[return-value]

