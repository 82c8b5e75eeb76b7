"""Cluster objects -> the planner's input types (a frozen snapshot; no I/O here).

* :func:`build_fleet` -- GPUPool specs + Node and Pod dicts -> ``FleetSnapshot`` and per-pool
  inventories (for GPUPool status), with a problem list for pools the planner cannot use
  (unknown GPU type, no nodes).
* :func:`resolve_workload` -- observed Prometheus figures, else the ModelDeployment's
  ``workloadHint`` (and a message saying so) -> the planner's ``Workload``.
* :func:`build_model_request` -- ModelDeployment + ServingSLO + workload -> ``ModelRequest``.

Errors: :class:`SpecProblem` (a spec the operator cannot plan: unknown model/GPU, missing SLO or
workload); the controller turns it into a condition and a Warning Event, never a crash.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from archipelago.api.v1alpha1 import GPUPool, ModelDeployment, ServingSLO
from archipelago.decide.planner.types import FleetSnapshot, ModelRequest, PoolSnapshot, Workload
from archipelago.observe.cluster import PoolInventory, group_pools
from archipelago.observe.metrics import ObservedWorkload


class SpecProblem(ValueError):
    """A spec the operator cannot plan. ``reason`` is a CamelCase condition reason."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True)
class FleetView:
    """A snapshot of the GPU fleet.

    Attributes:
        fleet: the planner's ``FleetSnapshot`` (usable pools only).
        inventories: ``{pool: PoolInventory}`` for every GPUPool (status).
        problems: ``{pool: (reason, message)}`` for pools left out of ``fleet``.
        warnings: fleet-wide warnings (e.g. a node matched by two pools).
        resources: ``{pool: extended resource name}`` (``nvidia.com/gpu`` / ``amd.com/gpu``).
    """

    fleet: FleetSnapshot
    inventories: dict[str, PoolInventory]
    problems: dict[str, tuple[str, str]] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    resources: dict[str, str] = field(default_factory=dict)

    def fingerprint(self) -> tuple:
        """Structural identity of the fleet: pools, prices and every node's (schedulable, GPUs free).

        Equal fingerprints mean a re-plan would see the same fleet.
        """
        out = []
        for p in self.fleet.pools:
            out.append((p.name, p.gpu, round(p.price_per_gpu_hour, 4), p.max_gpus,
                        tuple((n.name, n.schedulable, n.gpus_allocatable, n.gpus_free) for n in p.nodes)))
        return tuple(out)


def build_fleet(pools: Mapping[str, GPUPool], nodes: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]],
                gpu_catalog: Any, planned: set[str] | None = None) -> FleetView:
    """Group nodes into pools and convert them to the planner's ``FleetSnapshot``.

    Args:
        pools: ``{name: GPUPool}`` parsed specs.
        nodes / pods: Node and Pod dicts (e.g. from kopf indices).
        gpu_catalog: a ``GPUCatalog`` (``get(name)`` raising ``KeyError`` for unknown types).
        planned: ``namespace/name`` keys of the models being planned; our pods of other models count
            as used by others (their GPUs are not handed out).

    Price: ``spec.pricing`` (spot when ``useSpot``), else the catalogue's ``price_per_gpu_hour``.
    Power: ``spec.power.maxWatts`` if set. Pools whose GPU type is not in the catalogue are left out
    with reason ``UnknownGPU``.
    """
    selectors = {name: p.spec.node_selector.to_dict() for name, p in pools.items()}
    inventories, warnings = group_pools(selectors, nodes, pods, planned)
    snaps: list[PoolSnapshot] = []
    problems: dict[str, tuple[str, str]] = {}
    resources: dict[str, str] = {}
    for name in sorted(pools):
        pool = pools[name]
        resources[name] = pool.spec.resource_name
        inv = inventories[name]
        try:
            gspec = gpu_catalog.get(pool.spec.gpu.type)
        except KeyError as e:
            problems[name] = ("UnknownGPU", f"spec.gpu.type {pool.spec.gpu.type!r} is not in the GPU catalogue: "
                                            f"{e}; use a catalogue key or add it to policies/gpus.yaml")
            continue
        price = pool.spec.pricing.effective_per_gpu_hour()
        if price is None:
            price = float(gspec.price_per_gpu_hour)
        if not inv.nodes:
            problems[name] = ("NoNodes", "no Ready GPU node matches spec.nodeSelector; check the node labels "
                                         "(kubectl get nodes --show-labels)")
        snaps.append(inv.to_snapshot(gpu=gspec.name, price_per_gpu_hour=float(price),
                                     power_w=pool.spec.power.max_watts))
    return FleetView(FleetSnapshot(tuple(snaps)), inventories, problems, tuple(warnings), resources)


@dataclass(frozen=True)
class WorkloadChoice:
    """The workload a plan uses and where it came from.

    ``source``: ``prometheus`` (all figures measured), ``mixed`` (measured rate, hinted lengths),
    ``hint`` (spec.workloadHint only). ``message`` says what was unknown.
    """

    workload: Workload
    source: str
    message: str


def resolve_workload(observed: ObservedWorkload | None, md: ModelDeployment, prom_error: str | None = None,
                     backlog_drain_s: float = 0.0) -> WorkloadChoice:
    """Measured workload when Prometheus has the model's series, else the ModelDeployment's hint.

    Missing series are unknown, never zero: a figure is only taken from ``observed`` when it is
    not None. Histograms (``vllm:request_prompt_tokens`` buckets) are used when present, and so is the
    per-prompt-bucket output mean estimated from per-island series (``output_mean_by_prompt_bucket``).

    ``backlog_drain_s`` > 0 adds the queued requests (``waiting``, summed over replicas) spread over
    that many seconds to the measured arrival rate: a fleet planned for the arrival rate alone runs at
    85-95 % of its capacity and drains a backlog built while it was too small (a load step measured
    through a rate window) only very slowly -- in the demo, L4 islands still held 40-60 s queues a
    minute after the scale-out.

    Raises:
        SpecProblem(reason="NoWorkload"): neither metrics nor ``spec.workloadHint`` give a request
            rate and mean lengths.
    """
    hint = md.spec.workload_hint
    why = prom_error or ""
    if observed is not None and observed.request_rate is not None:
        in_hist = tuple((b.hi, b.count) for b in observed.prompt_len_buckets or ()) if observed.prompt_len_buckets else ()
        out_hist = tuple((b.hi, b.count) for b in observed.output_len_buckets or ()) if observed.output_len_buckets else ()
        if sum(c for _, c in in_hist) <= 0:
            in_hist = ()
        if sum(c for _, c in out_hist) <= 0:
            out_hist = ()
        in_mean = observed.prompt_tokens_mean
        out_mean = observed.output_tokens_mean
        missing = []
        if not in_hist and in_mean is None:
            if hint is None:
                raise SpecProblem("NoWorkload", "Prometheus gives a request rate but no prompt lengths and "
                                                "spec.workloadHint is not set; set spec.workloadHint.meanInputTokens")
            in_mean = hint.mean_input_tokens
            missing.append("prompt lengths")
        if not out_hist and out_mean is None:
            if hint is None:
                raise SpecProblem("NoWorkload", "Prometheus gives a request rate but no output lengths and "
                                                "spec.workloadHint is not set; set spec.workloadHint.meanOutputTokens")
            out_mean = hint.mean_output_tokens
            missing.append("output lengths")
        by_in = observed.output_mean_by_prompt_bucket
        if not in_hist or by_in is None or len(by_in) != len(observed.prompt_len_buckets or ()):
            by_in = None
        rate = observed.request_rate
        if backlog_drain_s > 0 and observed.waiting:
            rate += max(0.0, observed.waiting) / backlog_drain_s
        w = Workload(rate_rps=rate, input_hist=in_hist, output_hist=out_hist,
                     input_mean=in_mean, output_mean=out_mean,
                     input_p90=(hint.p90_input_tokens if hint and missing else None),
                     output_mean_by_input=by_in)
        if missing:
            return WorkloadChoice(w, "mixed", f"measured request rate; {', '.join(missing)} unknown in Prometheus, "
                                              "taken from spec.workloadHint")
        shape = observed.shape_window_s
        lengths = f", lengths over {int(shape)}s" if shape and shape > observed.window_s else ""
        return WorkloadChoice(w, "prometheus", f"measured over {int(observed.window_s)}s{lengths}")
    if hint is None:
        raise SpecProblem("NoWorkload", "no workload metrics for this model"
                                        + (f" ({why})" if why else "")
                                        + " and spec.workloadHint is not set; set spec.workloadHint "
                                          "(requestsPerSecond, meanInputTokens, meanOutputTokens)")
    w = Workload(rate_rps=hint.requests_per_second, input_mean=hint.mean_input_tokens,
                 output_mean=hint.mean_output_tokens,
                 input_p90=float(hint.p90_input_tokens) if hint.p90_input_tokens else None)
    if observed is None:
        msg = "workload from spec.workloadHint" + (f" ({why})" if why else " (metrics disabled)")
    else:
        msg = "workload from spec.workloadHint: no request-rate series in Prometheus yet"
    return WorkloadChoice(w, "hint", msg)


def catalog_model(md: ModelDeployment, model_catalog: Any) -> Any:
    """The catalogue ``ModelSpec`` of a ModelDeployment: inline ``spec.model.architecture`` when given,
    else the model catalogue entry; quantisation (fp8/int8/awq/gptq) sets the weight dtype.

    Raises:
        SpecProblem(reason="UnknownModel" | "InvalidArchitecture").
    """
    from archipelago.decide.catalog import ModelSpec as CatalogModel

    m = md.spec.model
    arch = m.architecture
    if arch is not None:
        missing = [n for n, v in (("intermediateSize", arch.intermediate_size), ("vocabSize", arch.vocab_size))
                   if v is None]
        if missing:
            raise SpecProblem("InvalidArchitecture",
                              f"spec.model.architecture needs {', '.join(missing)} for a model that is not in "
                              "the model catalogue")
        kw: dict[str, Any] = dict(
            name=m.name, num_layers=arch.layers, hidden_size=arch.hidden_size, num_heads=arch.attention_heads,
            num_kv_heads=arch.kv_heads, head_dim=arch.head_dim, intermediate_size=arch.intermediate_size,
            vocab_size=arch.vocab_size, dtype=arch.dtype, total_params=arch.parameters_b * 1e9,
            source="ModelDeployment spec.model.architecture",
        )
        if md.spec.engine.max_model_len:
            kw["max_context"] = md.spec.engine.max_model_len
        if arch.moe is not None:
            kw.update(num_experts=arch.moe.experts, experts_per_token=arch.moe.experts_per_token,
                      expert_intermediate_size=arch.moe.expert_intermediate_size,
                      num_shared_experts=arch.moe.shared_experts)
        try:
            spec = CatalogModel(**kw)
        except ValueError as e:
            raise SpecProblem("InvalidArchitecture", f"spec.model.architecture: {e}") from None
    else:
        try:
            spec = model_catalog.get(m.name)
        except KeyError as e:
            raise SpecProblem("UnknownModel", f"spec.model.name {m.name!r}: {e}") from None
    if m.quantization:
        spec = spec.model_copy(update={"dtype": m.quantization})
    return spec


def build_model_request(md: ModelDeployment, slo: ServingSLO | None, workload: Workload, model_catalog: Any,
                        known_pools: Iterable[str]) -> ModelRequest:
    """The planner's ``ModelRequest`` for one ModelDeployment.

    Percentiles in the ServingSLO are in (0, 100]; the simulator's ``SLOTarget`` takes fractions.

    Raises:
        SpecProblem: ``SLONotFound`` (``spec.sloRef`` names no ServingSLO in the namespace),
            ``UnknownPool`` (``placement.allowedPools`` names no GPUPool), or a model problem
            (:func:`catalog_model`).
    """
    from archipelago.decide.sim import SLOTarget

    ns, name = md.metadata.namespace, md.metadata.name
    if slo is None:
        raise SpecProblem("SLONotFound", f"spec.sloRef {md.spec.slo_ref!r}: no ServingSLO of that name in "
                                         f"namespace {ns}; create it or fix sloRef")
    known = set(known_pools)
    unknown = [p for p in md.spec.placement.allowed_pools if p not in known]
    if unknown and len(unknown) == len(md.spec.placement.allowed_pools):
        raise SpecProblem("UnknownPool", f"spec.placement.allowedPools {unknown} name no GPUPool; "
                                         f"known pools: {sorted(known)}")
    allowed = tuple(p for p in md.spec.placement.allowed_pools if p in known)
    s = slo.spec
    target = SLOTarget(
        ttft_s=s.ttft.seconds, tpot_s=s.tpot.seconds, e2e_s=s.e2e.seconds if s.e2e else None,
        ttft_percentile=s.ttft.percentile / 100.0, tpot_percentile=s.tpot.percentile / 100.0,
        attainment=s.attainment,
    )
    obj = s.objective
    preference = obj.preset or "balanced"
    energy_weight = 0.0
    if obj.weights is not None:
        w = obj.weights
        top = max(("cost", w.cost), ("latency", w.latency), ("energy", w.energy), key=lambda kv: kv[1])
        preference = top[0] if sorted([w.cost, w.latency, w.energy])[-2] < top[1] else "balanced"
    budget = s.budget
    return ModelRequest(
        key=f"{ns}/{name}",
        model=catalog_model(md, model_catalog),
        slo=target,
        workload=workload,
        engine=md.spec.engine.kind,
        min_replicas=md.spec.replicas.min,
        max_replicas=md.spec.replicas.max,
        allowed_pools=allowed,
        allowed_tp=tuple(md.spec.placement.tensor_parallel) or (1, 2, 4, 8),
        priority=md.spec.priority,
        disaggregation=md.spec.placement.disaggregation,
        energy_weight=energy_weight,
        preference=preference,
        max_cost_per_hour=budget.max_dollars_per_hour if budget else None,
        max_power_w=budget.max_watts if budget else None,
    )
