"""Input and output types of the planner.

Everything here is plain data (frozen dataclasses), free of Kubernetes and network imports, and
JSON-serialisable through ``to_dict()``. The planner's inputs are

* :class:`FleetSnapshot` -- GPU pools with their nodes and free GPUs, prices and power;
* :class:`ModelRequest` -- one ModelDeployment with its SLO, bounds, allowed pools/TP degrees,
  priority and :class:`Workload` (arrival rate and input/output length histograms as they come
  from Prometheus ``vllm:request_prompt_tokens`` / ``vllm:request_generation_tokens``);
* :class:`CurrentPlacement` -- which pods of which island run on which node now;
* :class:`PlannerConfig` -- solver time limits, seeds, hysteresis margin, churn penalty, headroom.

Its output is a :class:`Plan`: per model the islands (pool, GPU type, TP degree, replicas, role,
input-length ranges with traffic shares, engine settings), pod-to-node assignments, predictions
(cost $/h, SLO attainment, TTFT/TPOT p99, watts), the Pareto front, stranded GPUs, solve
statistics, and :class:`Infeasibility` entries instead of exceptions.

Units: seconds, tokens, requests/second, $/h, watts (W), GPUs (integer counts).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

Role = Literal["mixed", "prefill", "decode"]
Engine = Literal["vllm", "sglang"]

# Default upper edges (tokens) for input-length buckets when a workload carries no histogram.
# Powers of two as in vLLM's ``vllm:request_prompt_tokens`` histogram (1-2-5 series there;
# powers of two here keep TP/chunk arithmetic simple).
DEFAULT_INPUT_EDGES: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

# Default upper edges (tokens) for output-length histograms built from traces: vLLM's 1-2-5
# series of ``vllm:request_generation_tokens`` buckets (short outputs matter: a request's mean
# TPOT over a few tokens is ruined by one long co-scheduled prefill step).
DEFAULT_OUTPUT_EDGES: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000,
                                         20000, 50000)


class PlannerInputError(ValueError):
    """Raised for malformed planner input (not for infeasible-but-valid input, which becomes an
    :class:`Infeasibility`). The message names the field and the fix."""


# --------------------------------------------------------------------------------------------
# Fleet
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeSnapshot:
    """One node of a GPU pool.

    Attributes:
        name: Kubernetes node name.
        gpus_allocatable: ``status.allocatable["nvidia.com/gpu"]`` (GPUs).
        gpus_free: GPUs not used by pods *other than Archipelago's own* (GPUs). The operator's
            own pods are described by :class:`CurrentPlacement`; their GPUs count as free here
            so the planner may keep or move them.
        labels: node labels (e.g. ``nvidia.com/gpu.product``, ``topology.kubernetes.io/zone``).
        schedulable: False for cordoned / NotReady nodes (no new pods are placed there).
    """

    name: str
    gpus_allocatable: int
    gpus_free: int
    labels: dict[str, str] = field(default_factory=dict)
    schedulable: bool = True

    def __post_init__(self) -> None:
        if self.gpus_allocatable < 0 or self.gpus_free < 0:
            raise PlannerInputError(f"node {self.name!r}: GPU counts must be >= 0 "
                                    f"(allocatable={self.gpus_allocatable}, free={self.gpus_free})")
        if self.gpus_free > self.gpus_allocatable:
            raise PlannerInputError(f"node {self.name!r}: gpus_free={self.gpus_free} exceeds "
                                    f"gpus_allocatable={self.gpus_allocatable}; fix the snapshot")


@dataclass(frozen=True)
class PoolSnapshot:
    """A GPUPool: nodes with one GPU type.

    Attributes:
        name: GPUPool name.
        gpu: GPU catalogue key (e.g. ``"H100-SXM"``).
        price_per_gpu_hour: $/GPU-hour used for cost.
        nodes: the pool's nodes.
        power_w: optional override of the busy power per GPU (W); None = the performance model's.
        max_gpus: optional cap on GPUs the operator may use in this pool (budget / quota).
    """

    name: str
    gpu: str
    price_per_gpu_hour: float
    nodes: tuple[NodeSnapshot, ...] = ()
    power_w: float | None = None
    max_gpus: int | None = None

    def __post_init__(self) -> None:
        if not (self.price_per_gpu_hour >= 0 and math.isfinite(self.price_per_gpu_hour)):
            raise PlannerInputError(f"pool {self.name!r}: price_per_gpu_hour must be a finite "
                                    f"number >= 0, got {self.price_per_gpu_hour!r}")
        object.__setattr__(self, "nodes", tuple(self.nodes))

    @property
    def gpus_free(self) -> int:
        """GPUs free for the operator on schedulable nodes, capped by ``max_gpus``."""
        free = sum(n.gpus_free for n in self.nodes if n.schedulable)
        return free if self.max_gpus is None else min(free, self.max_gpus)

    def gpus_free_in_blocks(self, tp: int) -> int:
        """GPUs usable by replicas of TP degree ``tp`` (each needs ``tp`` GPUs on one node):
        ``sum_nodes floor(free/tp)*tp``, capped by ``max_gpus``."""
        g = sum((n.gpus_free // tp) * tp for n in self.nodes if n.schedulable)
        return g if self.max_gpus is None else min(g, (self.max_gpus // tp) * tp)

    @property
    def max_node_gpus(self) -> int:
        """Largest free-GPU count on one schedulable node (bounds the TP degree)."""
        return max((n.gpus_free for n in self.nodes if n.schedulable), default=0)


@dataclass(frozen=True)
class FleetSnapshot:
    """All GPU pools. ``pools`` names must be unique."""

    pools: tuple[PoolSnapshot, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "pools", tuple(self.pools))
        names = [p.name for p in self.pools]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise PlannerInputError(f"fleet: duplicate pool names {sorted(dup)}")
        nodes = [n.name for p in self.pools for n in p.nodes]
        dupn = {n for n in nodes if nodes.count(n) > 1}
        if dupn:
            raise PlannerInputError(f"fleet: nodes {sorted(dupn)[:5]} belong to more than one pool; "
                                    "fix the pools' node selectors")

    def pool(self, name: str) -> PoolSnapshot:
        """Pool by name; raises :class:`PlannerInputError` if unknown."""
        for p in self.pools:
            if p.name == name:
                return p
        raise PlannerInputError(f"unknown pool {name!r}; known: {[p.name for p in self.pools]}")


# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """Observed or hinted workload of one model.

    Attributes:
        rate_rps: mean arrival rate (requests/second).
        input_hist: ``[(upper_edge_tokens, count), ...]`` per-bucket (NOT cumulative) counts of
            prompt lengths, edges strictly increasing; the last edge may be ``math.inf``. Bucket
            *i* covers ``[edge_{i-1}, edge_i)`` with ``edge_{-1} = 0``. Use
            :meth:`from_cumulative` for Prometheus ``le`` buckets.
        output_hist: the same for generated tokens.
        input_mean, input_p90, output_mean, output_p90: hints used when a histogram is missing
            (a log-normal fitted to mean and p90 is bucketed on :data:`DEFAULT_INPUT_EDGES`).
        input_means: optional per-input-bucket mean prompt length (tokens), aligned with
            ``input_hist`` (known when built from a trace; otherwise the bucket midpoint is used).
        output_mean_by_input: optional per-input-bucket mean output length (tokens); otherwise
            input and output lengths are assumed independent (Prometheus gives marginals only).
        arrival_cv: optional coefficient of variation (std/mean) of the inter-arrival gaps at
            short time scales (gaps clipped at their 99th percentile, so idle periods do not
            count); None = Poisson (1.0). Used by the simulated capacity calibration.
    """

    rate_rps: float
    input_hist: tuple[tuple[float, float], ...] = ()
    output_hist: tuple[tuple[float, float], ...] = ()
    input_mean: float | None = None
    input_p90: float | None = None
    output_mean: float | None = None
    output_p90: float | None = None
    input_means: tuple[float, ...] | None = None
    output_mean_by_input: tuple[float, ...] | None = None
    arrival_cv: float | None = None

    def __post_init__(self) -> None:
        if self.arrival_cv is not None and not (self.arrival_cv > 0 and math.isfinite(self.arrival_cv)):
            raise PlannerInputError(f"workload.arrival_cv must be a finite number > 0, got {self.arrival_cv!r}")
        if not (self.rate_rps >= 0 and math.isfinite(self.rate_rps)):
            raise PlannerInputError(f"workload.rate_rps must be finite and >= 0, got {self.rate_rps!r}")
        for fname in ("input_hist", "output_hist"):
            h = tuple((float(e), float(c)) for e, c in getattr(self, fname))
            object.__setattr__(self, fname, h)
            for i, (e, c) in enumerate(h):
                if c < 0:
                    raise PlannerInputError(f"workload.{fname}[{i}]: negative count {c}")
                if i and e <= h[i - 1][0]:
                    raise PlannerInputError(f"workload.{fname}[{i}]: edges must increase "
                                            f"({h[i - 1][0]} then {e})")
        if not self.input_hist and self.input_mean is None:
            raise PlannerInputError("workload: give input_hist or input_mean (prompt tokens)")
        if not self.output_hist and self.output_mean is None:
            raise PlannerInputError("workload: give output_hist or output_mean (generated tokens)")
        for fname in ("input_means", "output_mean_by_input"):
            v = getattr(self, fname)
            if v is not None:
                v = tuple(float(x) for x in v)
                object.__setattr__(self, fname, v)
                if len(v) != len(self.input_hist):
                    raise PlannerInputError(f"workload.{fname} has {len(v)} entries but input_hist "
                                            f"has {len(self.input_hist)}; align them")

    @staticmethod
    def from_cumulative(le_counts: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
        """Convert Prometheus cumulative ``le`` buckets ``[(le, cumulative_count)]`` to the
        per-bucket counts :class:`Workload` expects. Raises :class:`PlannerInputError` if the
        counts decrease."""
        out, prev = [], 0.0
        for le, c in sorted(le_counts):
            if c < prev - 1e-9:
                raise PlannerInputError(f"cumulative histogram decreases at le={le}: {c} < {prev}")
            out.append((float(le), float(c - prev)))
            prev = c
        return tuple(out)

    @classmethod
    def from_arrays(cls, arrival_s, input_tokens, output_tokens,
                    edges: tuple[float, ...] = DEFAULT_INPUT_EDGES + (math.inf,),
                    output_edges: tuple[float, ...] = DEFAULT_OUTPUT_EDGES + (math.inf,)) -> Workload:
        """Build a workload from per-request arrays (e.g. a trace): rate = n / span, the input
        histogram on ``edges`` with per-bucket input and output means (a joint refinement of the
        marginals), the output histogram on ``output_edges`` and ``arrival_cv`` (see the class
        docstring). Arrays: arrival times (s), prompt tokens, generated tokens, same length.

        Raises:
            PlannerInputError: fewer than 2 requests or arrays of different lengths."""
        import numpy as np

        a = np.asarray(arrival_s, dtype=float)
        i = np.asarray(input_tokens, dtype=float)
        o = np.asarray(output_tokens, dtype=float)
        if not (len(a) == len(i) == len(o)) or len(a) < 2:
            raise PlannerInputError("from_arrays: need >= 2 requests and equal-length arrays")
        span = float(a.max() - a.min())
        rate = (len(a) - 1) / span if span > 0 else float(len(a))
        e = np.asarray(edges, dtype=float)
        idx = np.searchsorted(e, i, side="right")
        idx = np.minimum(idx, len(e) - 1)
        ih, imeans, omeans = [], [], []
        for b in range(len(e)):
            m = idx == b
            cnt = int(m.sum())
            if cnt == 0:
                continue
            ih.append((float(e[b]), float(cnt)))
            imeans.append(float(i[m].mean()))
            omeans.append(float(o[m].mean()))
        oe = np.asarray(output_edges, dtype=float)
        oidx = np.minimum(np.searchsorted(oe, o, side="right"), len(oe) - 1)
        oh = [(float(oe[b]), float((oidx == b).sum())) for b in range(len(oe)) if (oidx == b).any()]
        gaps = np.diff(np.sort(a))
        cv = None
        if len(gaps) >= 10 and gaps.mean() > 0:
            g = np.minimum(gaps, np.quantile(gaps, 0.99))
            cv = float(g.std() / g.mean()) if g.mean() > 0 else None
        return cls(rate_rps=rate, input_hist=tuple(ih), output_hist=tuple(oh),
                   input_means=tuple(imeans), output_mean_by_input=tuple(omeans),
                   output_mean=float(o.mean()), input_mean=float(i.mean()),
                   arrival_cv=cv if cv and cv > 0 else None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (``inf`` edges become the string ``"+Inf"``)."""
        d = asdict(self)
        for k in ("input_hist", "output_hist"):
            d[k] = [["+Inf" if math.isinf(e) else e, c] for e, c in d[k]]
        return d


# --------------------------------------------------------------------------------------------
# Models and placement
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRequest:
    """One ModelDeployment as the planner sees it.

    Attributes:
        key: ``"namespace/name"``.
        model: a catalogue ``ModelSpec`` (anything the performance model accepts).
        slo: an ``SLOTarget`` (``ttft_s``, ``tpot_s``, ``ttft_percentile``, ``tpot_percentile``,
            ``attainment``), from ``archipelago.decide.sim``.
        workload: :class:`Workload`.
        engine: ``"vllm"`` or ``"sglang"``.
        min_replicas, max_replicas: bounds on the model's total replicas over all islands.
        allowed_pools: pool names (empty = all pools).
        allowed_tp: TP degrees to consider (each must be a power of two).
        priority: higher is served first when GPUs are short (lexicographic).
        disaggregation: ``"none"`` (mixed islands only) -- prefill/decode islands are not yet
            planned; other values yield an :class:`Infeasibility` note and mixed islands.
        limits: ``EngineLimits`` (max_num_seqs, gpu_memory_utilization, ...) or None = defaults.
        energy_weight: electricity price in $/kWh used to add energy to the objective
            (0 = ignore energy). The energy term is ``watts / 1000 * energy_weight`` $/h.
        preference: operating point on the Pareto front: ``"cost"``, ``"latency"``, ``"energy"``
            or ``"balanced"``.
        max_cost_per_hour, max_power_w: optional budget caps ($/h, W) from the ServingSLO.
    """

    key: str
    model: Any
    slo: Any
    workload: Workload
    engine: Engine = "vllm"
    min_replicas: int = 0
    max_replicas: int | None = None
    allowed_pools: tuple[str, ...] = ()
    allowed_tp: tuple[int, ...] = (1, 2, 4, 8)
    priority: int = 0
    disaggregation: str = "none"
    limits: Any = None
    energy_weight: float = 0.0
    preference: str = "cost"
    max_cost_per_hour: float | None = None
    max_power_w: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_pools", tuple(self.allowed_pools))
        object.__setattr__(self, "allowed_tp", tuple(sorted(set(int(t) for t in self.allowed_tp))))
        if "/" not in self.key:
            raise PlannerInputError(f"model key {self.key!r} must be 'namespace/name'")
        if self.engine not in ("vllm", "sglang"):
            raise PlannerInputError(f"{self.key}: engine must be 'vllm' or 'sglang', got {self.engine!r}")
        if self.min_replicas < 0:
            raise PlannerInputError(f"{self.key}: min_replicas must be >= 0")
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise PlannerInputError(f"{self.key}: max_replicas ({self.max_replicas}) < min_replicas "
                                    f"({self.min_replicas})")
        for t in self.allowed_tp:
            if t < 1 or (t & (t - 1)):
                raise PlannerInputError(f"{self.key}: allowed_tp entry {t} is not a power of two")
        if not self.allowed_tp:
            raise PlannerInputError(f"{self.key}: allowed_tp is empty")
        if self.preference not in ("cost", "latency", "energy", "balanced"):
            raise PlannerInputError(f"{self.key}: preference must be cost|latency|energy|balanced, "
                                    f"got {self.preference!r}")

    @property
    def model_name(self) -> str:
        """Catalogue name of the model (``model.name`` when present)."""
        return str(getattr(self.model, "name", self.model))


@dataclass(frozen=True)
class CurrentPlacement:
    """Running pods per island: ``islands[island_id] = {pod_name: node_name}``.

    ``island_id`` is :func:`island_id` of (model key, pool, tp, role). Used for warm starts
    (solution hints), the churn penalty and minimum-move packing."""

    islands: dict[str, dict[str, str]] = field(default_factory=dict)

    def replicas(self, iid: str) -> int:
        """Number of running pods of island ``iid``."""
        return len(self.islands.get(iid, {}))

    def per_node(self, iid: str) -> dict[str, int]:
        """Running pods of island ``iid`` per node name."""
        out: dict[str, int] = {}
        for node in self.islands.get(iid, {}).values():
            out[node] = out.get(node, 0) + 1
        return out

    @classmethod
    def from_plan(cls, plan: Plan) -> CurrentPlacement:
        """The placement a plan prescribes (pods named ``<island>-<k>``)."""
        out: dict[str, dict[str, str]] = {}
        for a in plan.assignments:
            out.setdefault(a.island, {})[a.pod] = a.node
        return cls(out)


def island_id(model_key: str, pool: str, tp: int, role: str = "mixed") -> str:
    """Stable island identifier ``"<ns>/<name>/<pool>/tp<N>[/<role>]"``."""
    base = f"{model_key}/{pool}/tp{tp}"
    return base if role == "mixed" else f"{base}/{role}"


@dataclass(frozen=True)
class PlannerConfig:
    """Solver and policy knobs.

    Attributes:
        inner_time_limit_s: wall-clock cap of each CP-SAT island-sizing solve (s).
        inner_deterministic_limit: CP-SAT ``max_deterministic_time`` (deterministic "seconds";
            bounding this instead of wall time keeps results reproducible).
        packing_time_limit_s: wall-clock cap of each pod-packing solve (s).
        packing_deterministic_limit: CP-SAT deterministic time cap of each packing solve.
        num_workers: CP-SAT workers (1 = fully deterministic single thread).
        seed: CP-SAT ``random_seed`` and the outer loop's seed.
        share_steps: traffic shares are multiples of ``1/share_steps``.
        headroom: fraction of each replica's SLO capacity kept free (0.1 = plan at 90 %).
        ttft_scale, tpot_scale: multiply the SLO targets used by the capacity model (the outer
            loop tunes these; 1.0 = as declared).
        hysteresis_margin: keep the current plan unless the new one is cheaper by this
            fraction (0.05 = 5 %) or the current one no longer serves the load.
        churn_penalty_per_replica: $/h-equivalent charged per replica added to or removed
            from a running island (discourages flapping).
        island_penalty: $/h-equivalent per island used (discourages needless fragmentation).
        max_variants_per_bucket: candidate islands kept per (model, bucket) by cost per
            capacity (pruning for scale; the LP lower bound uses all).
        max_num_seqs, max_num_batched_tokens, gpu_memory_utilization: override the models'
            engine limits (None = keep).
        capacity_scale: per-pool multiplier of the modelled capacity (``{pool: factor}``; the
            outer loop uses it to correct the queueing approximation per GPU type).
        model_capacity_scale: per-model multiplier of the modelled capacity (``{"ns/name":
            factor}``): the outer loop's per-model headroom for bursty or heavy-tailed traffic.
        capacity_model: ``"analytic"`` (queueing approximation only, fast; the default for the
            operator's reconcile) or ``"simulated"`` (per-replica capacities calibrated by
            bisection on the rate in the discrete-event simulator, :mod:`.calibrate`; cached).
        calib_requests: requests per calibration simulation (resampled from the bucket).
        calib_max_sims: simulations per (variant, bucket) calibration (bounds its time).
        calib_rel_tol: relative width at which the rate bisection stops.
        calib_seed: seed of the calibration samples (common random numbers across rates).
        calib_max_utilization: calibrated capacities never exceed this fraction of the replica's
            simulated saturation throughput (:func:`.calibrate.saturation_rate`; finite-horizon
            simulations cannot see a queue that grows slowly near saturation); 1 disables the cap.
        verify: after CP-SAT, score the plan in the simulator and repair per-model headroom
            until every model meets its attainment target (:mod:`.repair`); off by default.
        verify_max_iters: at most this many plan + simulate rounds in verify-and-repair.
        verify_trim: also try *lowering* the headroom of models that meet their target (finds
            the cheapest passing per-model capacity scale by bisection).
        verify_margin: attainment margin over the SLO's attainment target the repair aims for
            (guards against sampling noise of the trace).
        verify_requests: requests per model in the synthetic verification trace when no trace
            is given (built from the workload histograms).
        model_max_islands: per-model cap on the number of islands (``{"ns/name": k}``, k >= 1):
            island consolidation. Fewer islands mean fewer whole-replica roundings and
            least-loaded pooling over more replicas of one island (which the per-replica capacity
            model cannot credit); the outer loop searches it.
        model_max_num_seqs, model_max_num_batched_tokens: per-model engine-limit overrides
            (``{"ns/name": value}``), applied after the global ``max_num_seqs`` /
            ``max_num_batched_tokens``; the outer loop searches them per model.
        island_capacity_scale: per-island multiplier of the modelled capacity (``{"ns/name/pool/tpN":
            factor}``, factor in (0, 1]): the operator's correction after it measured an island
            missing its SLO at a load the model said it could carry (see
            ``archipelago.controller.planning.capacity_corrections``).
        island_floor: minimum replicas per island id (``{"ns/name/pool/tpN": replicas}``): a
            plan made for a load *rise* keeps what runs and only adds (the operator sets it for
            ``load-up`` re-plans, so a ramp grows the fleet instead of replacing islands that are
            still starting); capped at what the pool can hold.
        lp_hint: also build an LP-rounding starting point for CP-SAT island sizing (GLOP LP
            relaxation, shares rounded, small islands emptied into slack) and hint the cheaper
            of it and the greedy start; False = greedy start only.
    """

    inner_time_limit_s: float = 10.0
    inner_deterministic_limit: float = 5.0
    packing_time_limit_s: float = 5.0
    packing_deterministic_limit: float = 3.0
    num_workers: int = 1
    seed: int = 0
    share_steps: int = 100
    headroom: float = 0.0
    ttft_scale: float = 1.0
    tpot_scale: float = 1.0
    hysteresis_margin: float = 0.05
    churn_penalty_per_replica: float = 0.05
    island_penalty: float = 0.01
    max_variants_per_bucket: int = 8
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float | None = None
    capacity_scale: dict[str, float] = field(default_factory=dict)
    model_capacity_scale: dict[str, float] = field(default_factory=dict)
    capacity_model: str = "analytic"
    calib_requests: int = 600
    calib_max_sims: int = 12
    calib_rel_tol: float = 0.05
    calib_seed: int = 0
    calib_max_utilization: float = 0.85
    verify: bool = False
    verify_max_iters: int = 6
    verify_trim: bool = True
    verify_margin: float = 0.0
    verify_requests: int = 4000
    model_max_islands: dict[str, int] = field(default_factory=dict)
    model_max_num_seqs: dict[str, int] = field(default_factory=dict)
    model_max_num_batched_tokens: dict[str, int] = field(default_factory=dict)
    lp_hint: bool = True
    island_floor: dict[str, int] = field(default_factory=dict)
    island_capacity_scale: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.capacity_model not in ("analytic", "simulated"):
            raise PlannerInputError(f"PlannerConfig.capacity_model must be 'analytic' or 'simulated', "
                                    f"got {self.capacity_model!r}")
        if self.calib_requests < 50 or self.calib_max_sims < 3:
            raise PlannerInputError("PlannerConfig.calib_requests must be >= 50 and calib_max_sims >= 3")
        if not 0.1 <= self.calib_max_utilization <= 1.0:
            raise PlannerInputError("PlannerConfig.calib_max_utilization must be in [0.1, 1], "
                                    f"got {self.calib_max_utilization}")
        if self.verify_max_iters < 1:
            raise PlannerInputError("PlannerConfig.verify_max_iters must be >= 1")
        if not (-0.5 < self.headroom < 0.95):
            raise PlannerInputError(f"PlannerConfig.headroom must be in (-0.5, 0.95), got {self.headroom}")
        if self.share_steps < 1:
            raise PlannerInputError("PlannerConfig.share_steps must be >= 1")
        if self.num_workers < 1:
            raise PlannerInputError("PlannerConfig.num_workers must be >= 1")
        for k, v in self.island_floor.items():
            if int(v) < 0:
                raise PlannerInputError(f"PlannerConfig.island_floor[{k!r}] must be >= 0, got {v!r}")
        for k, v in self.island_capacity_scale.items():
            if not 0.0 < float(v) <= 1.0:
                raise PlannerInputError(f"PlannerConfig.island_capacity_scale[{k!r}] must be in (0, 1], got {v!r}")
        for fname in ("model_max_islands", "model_max_num_seqs", "model_max_num_batched_tokens"):
            for k, v in getattr(self, fname).items():
                if int(v) < 1:
                    raise PlannerInputError(f"PlannerConfig.{fname}[{k!r}] must be >= 1, got {v!r}")

    def with_(self, **kw: Any) -> PlannerConfig:
        """Copy with fields replaced."""
        return replace(self, **kw)


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineSettings:
    """Engine arguments for an island: ``--max-num-seqs`` / ``--max-running-requests``,
    ``--gpu-memory-utilization`` / ``--mem-fraction-static``, ``--max-model-len`` /
    ``--context-length``, ``--max-num-batched-tokens``."""

    max_num_seqs: int
    gpu_memory_utilization: float
    max_model_len: int | None
    max_num_batched_tokens: int


@dataclass(frozen=True)
class RangeShare:
    """Traffic of input-length range ``[lo, hi)`` tokens; ``share`` (0..1) of it goes to the
    island; ``rate_rps`` is the resulting request rate (req/s)."""

    lo: float
    hi: float
    share: float
    rate_rps: float


@dataclass(frozen=True)
class IslandPlan:
    """One island: ``replicas`` pods of ``model`` on GPU ``gpu`` of pool ``pool`` at TP ``tp``.

    ``ranges`` lists the input-length ranges it serves and its share of each; ``input_range``
    is their hull ``[lo, hi)``; ``traffic_share`` its fraction of the model's requests.
    Predictions per island: ``cost_per_hour`` ($/h), ``power_w`` (W at the predicted load),
    ``utilization`` (fraction of SLO capacity used), ``ttft_p99_s``/``tpot_p99_s`` (s)."""

    id: str
    model: str
    pool: str
    gpu: str
    tp: int
    replicas: int
    role: Role
    ranges: tuple[RangeShare, ...]
    input_range: tuple[float, float]
    traffic_share: float
    engine: EngineSettings
    cost_per_hour: float
    power_w: float
    utilization: float
    ttft_p99_s: float
    tpot_p99_s: float


@dataclass(frozen=True)
class PodAssignment:
    """Pod ``pod`` (index ``k`` of ``island``) runs on ``node`` using ``gpus`` GPUs."""

    island: str
    pod: str
    node: str
    gpus: int


@dataclass(frozen=True)
class Infeasibility:
    """Why (part of) a model's load cannot be served.

    ``constraint`` is one of ``memory`` (no allowed variant holds the weights + KV cache),
    ``ttft-slo`` / ``tpot-slo`` (unattainable even on an idle replica), ``pool-capacity``
    (too few free GPUs), ``max-replicas``, ``min-replicas``, ``packing`` (GPUs exist but not
    on one node), ``budget``, ``unsupported``; ``served_fraction`` is the share of the
    model's traffic the plan still serves (1.0 for notes that do not drop load)."""

    model: str
    constraint: str
    detail: str
    suggestion: str
    served_fraction: float = 1.0


@dataclass(frozen=True)
class ParetoPoint:
    """A point of the Pareto front: cost ($/h), SLO attainment (0..1, minimum over models),
    energy (W, fleet average power), the parameters that produced it and whether it was
    chosen."""

    cost_per_hour: float
    attainment: float
    power_w: float
    params: dict[str, float]
    chosen: bool = False


@dataclass(frozen=True)
class SolveStats:
    """How the plan was found: solver statuses, wall time (s), objective and bound of the
    island-sizing model, packing gap (relative), number of variables, method name."""

    method: str = "cpsat"
    status: str = ""
    wall_s: float = 0.0
    objective: float | None = None
    bound: float | None = None
    packing_status: str = ""
    packing_wall_s: float = 0.0
    packing_gap: float | None = None
    num_variables: int = 0
    lexicographic_stages: int = 0
    note: str = ""


@dataclass(frozen=True)
class ModelPlan:
    """The part of a plan for one model: islands, routing table ``[(lo, hi, {island: weight})]``
    and predictions (``attainment`` is the capacity model's; the simulator's is filled in by
    :func:`archipelago.decide.planner.evaluate.score_plan`)."""

    model: str
    islands: tuple[IslandPlan, ...]
    routing: tuple[tuple[float, float, dict[str, float]], ...]
    served_fraction: float
    cost_per_hour: float
    power_w: float
    ttft_p99_s: float
    tpot_p99_s: float
    attainment: float | None = None


@dataclass(frozen=True)
class Plan:
    """The planner's answer. ``plan_id`` is a hash of the islands and placement (not of
    predictions or timings), so equal decisions compare equal."""

    models: tuple[ModelPlan, ...]
    assignments: tuple[PodAssignment, ...]
    cost_per_hour: float
    power_w: float
    infeasibilities: tuple[Infeasibility, ...] = ()
    stranded_gpus: int = 0
    unplaced_pods: int = 0
    pareto: tuple[ParetoPoint, ...] = ()
    stats: SolveStats = field(default_factory=SolveStats)
    kept_previous: bool = False
    params: dict[str, float] = field(default_factory=dict)

    @property
    def islands(self) -> list[IslandPlan]:
        """All islands of all models."""
        return [i for m in self.models for i in m.islands]

    def model(self, key: str) -> ModelPlan | None:
        """The :class:`ModelPlan` of ``key`` or None."""
        for m in self.models:
            if m.model == key:
                return m
        return None

    @property
    def feasible(self) -> bool:
        """True when every model's load is served (no load-dropping infeasibility) and all
        pods are placed."""
        return self.unplaced_pods == 0 and all(i.served_fraction >= 1.0 - 1e-9
                                               for i in self.infeasibilities)

    @property
    def gpus(self) -> int:
        """GPUs the plan uses."""
        return sum(i.replicas * i.tp for i in self.islands)

    @property
    def plan_id(self) -> str:
        """16-hex-digit SHA-256 of the decision (islands, ranges rounded to 1 %, placement)."""
        dec = {
            "islands": sorted(
                (i.id, i.replicas, i.role, [(r.lo, r.hi, round(r.share, 2)) for r in i.ranges],
                 asdict(i.engine)) for i in self.islands),
            "assign": sorted((a.island, a.node) for a in self.assignments),
        }
        blob = json.dumps(dec, sort_keys=True, default=_json_default).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (``inf`` → ``"+Inf"``), with ``planId``."""
        d = _clean(asdict(self))
        d["planId"] = self.plan_id
        d["feasible"] = self.feasible
        d["gpus"] = self.gpus
        return d

    def to_json(self, **kw: Any) -> str:
        """``json.dumps(self.to_dict())``."""
        return json.dumps(self.to_dict(), **kw)


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isinf(o):
        return "+Inf"
    return str(o)


def _clean(o: Any) -> Any:
    if isinstance(o, float):
        if math.isinf(o):
            return "+Inf" if o > 0 else "-Inf"
        if math.isnan(o):
            return None
        return o
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_clean(v) for v in o]
    return o
