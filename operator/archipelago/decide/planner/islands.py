"""Inner loop, step 1: island sizing and workload mapping (OR-Tools CP-SAT), and its LP
relaxation (OR-Tools GLOP) as a lower bound on cost.

Data -> variables -> constraints -> objective -> result:

* **data** (:func:`build_problem`): per model its input-length buckets (:mod:`.capacity`) and
  candidate *variants* (pool x TP degree) that fit in memory, each with a per-replica SLO
  capacity ``cap[b, v]`` (req/s) for every bucket ``b``;
* **variables**: replicas ``n_v`` (integer), traffic share ``x_bv`` of bucket ``b`` on variant
  ``v`` in steps of ``1/S``, unserved share ``u_b``, island-used flags, churn ``d_v``;
* **constraints**: every bucket is fully assigned (``sum_v x_bv + u_b = S``); each variant's
  load fits its capacity ``sum_b (rate_b / ((1-headroom) cap_bv)) x_bv <= S n_v``; per pool and
  TP level ``t`` the GPUs of replicas with TP >= t fit the pool's free GPUs in t-GPU blocks on
  single nodes; model replica bounds; optional $/h and watt budget caps;
* **objective**: $/h of the replicas + energy weight x W/1000 + churn penalty x |n_v - running|
  + island penalty + a penalty on unserved load larger than serving it; when load must be
  dropped, higher-priority models' unserved load is minimised first (lexicographic stages).

Determinism: one worker (or ``num_workers`` fixed with interleaved search), fixed
``random_seed``, and a deterministic-time limit next to the wall-clock limit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ortools.sat.python import cp_model

from .capacity import Bucket, Capacity, CapacityCache, workload_buckets
from .types import (
    CurrentPlacement,
    FleetSnapshot,
    Infeasibility,
    ModelRequest,
    PlannerConfig,
    PlannerInputError,
    island_id,
)

MILLI = 1000  # $/h and W are scaled to integers in thousandths


@dataclass
class Variant:
    """A candidate island shape of one model: ``tp`` GPUs of pool ``pool`` per replica.

    ``price`` $/h per replica, ``busy_w``/``idle_w`` W per replica, ``caps[b]`` the per-replica
    SLO capacity of bucket ``b``."""

    model_idx: int
    iid: str
    pool: str
    gpu: str
    tp: int
    perf: Any
    limits: Any
    price: float
    busy_w: float
    idle_w: float
    caps: list[Capacity]
    scale: float = 1.0
    calibrated: bool = False


@dataclass
class ModelProblem:
    """One model's buckets, candidate variants (after pruning), all fitting variants (for the
    LP bound) and notes found while building."""

    req: ModelRequest
    buckets: list[Bucket]
    variants: list[Variant]
    all_variants: list[Variant]
    notes: list[Infeasibility] = field(default_factory=list)
    dead: set[int] = field(default_factory=set)


@dataclass
class Problem:
    """The inner loop's data: fleet, config, per-model problems."""

    fleet: FleetSnapshot
    config: PlannerConfig
    models: list[ModelProblem]
    notes: list[Infeasibility] = field(default_factory=list)


def default_perf_factory() -> Callable[[Any, Any, int, Any], Any]:
    """``archipelago.decide.perf.PerfModel`` (imported lazily)."""
    from archipelago.decide.perf import PerfModel

    return PerfModel


def default_limits() -> Any:
    """Default ``EngineLimits``."""
    from archipelago.decide.perf import EngineLimits

    return EngineLimits()


def resolve_limits(req: ModelRequest, config: PlannerConfig) -> Any:
    """The request's engine limits with the config's overrides applied (global ``max_num_seqs``
    / ``max_num_batched_tokens`` / ``gpu_memory_utilization``, then the per-model
    ``model_max_num_seqs`` / ``model_max_num_batched_tokens``)."""
    lim = req.limits if req.limits is not None else default_limits()
    kw = {}
    if config.max_num_seqs is not None:
        kw["max_num_seqs"] = int(config.max_num_seqs)
    if config.max_num_batched_tokens is not None:
        kw["max_num_batched_tokens"] = int(config.max_num_batched_tokens)
    if config.gpu_memory_utilization is not None:
        kw["gpu_memory_utilization"] = float(config.gpu_memory_utilization)
    if req.key in config.model_max_num_seqs:
        kw["max_num_seqs"] = int(config.model_max_num_seqs[req.key])
    if req.key in config.model_max_num_batched_tokens:
        kw["max_num_batched_tokens"] = int(config.model_max_num_batched_tokens[req.key])
    if kw:
        import dataclasses

        lim = dataclasses.replace(lim, **kw)
    return lim


def _power(perf: Any, phase: str, override_per_gpu: float | None, tp: int) -> float:
    if override_per_gpu is not None and phase != "idle":
        return override_per_gpu * tp
    try:
        return float(perf.power_w(phase))
    except Exception:  # fakes without phases
        return 0.0


class _PerfPool:
    """Shares PerfModel instances between models with the same catalogue entry."""

    def __init__(self, factory: Callable[[Any, Any, int, Any], Any]) -> None:
        self.factory = factory
        self._d: dict[Any, Any] = {}

    def get(self, model: Any, gpu: Any, tp: int, limits: Any) -> Any:
        key = (getattr(model, "name", id(model)), getattr(gpu, "name", id(gpu)), tp, repr(limits))
        p = self._d.get(key)
        if p is None:
            p = self._d[key] = self.factory(model, gpu, tp, limits)
        return p


_PERF_POOLS: dict[Any, _PerfPool] = {}


def build_problem(fleet: FleetSnapshot, requests: list[ModelRequest], config: PlannerConfig, *,
                  gpu_catalog: Any = None, perf_factory: Callable[..., Any] | None = None,
                  cache: CapacityCache | None = None, current: CurrentPlacement | None = None,
                  fixed_tp: dict[tuple[str, str], int] | None = None,
                  calibrate_all: bool = False) -> Problem:
    """Enumerate buckets and candidate variants with their SLO capacities.

    Args:
        fleet: pools and nodes.
        requests: the models.
        config: headroom, SLO scales, pruning.
        gpu_catalog: object with ``.get(name)`` -> GPU spec (default: the project catalogue).
        perf_factory: ``(model, gpu_spec, tp, limits) -> PerfModel`` (default: the real one).
        cache: capacity memo shared across calls.
        current: running islands (always kept as candidates, for churn).
        fixed_tp: ``{(model_key, pool): tp}`` restricts a model to one TP per pool (baselines
            and the outer loop use it).
        calibrate_all: with ``config.capacity_model == "simulated"``, calibrate every fitting
            variant (for the LP lower bound), not only the candidates kept after pruning.

    Returns:
        :class:`Problem`. Models that cannot run anywhere get :class:`Infeasibility` notes
        (``memory``, ``ttft-slo``, ``tpot-slo``, ``unsupported``) rather than exceptions.

    Raises:
        PlannerInputError: an ``allowed_pools`` entry names no pool of the fleet.
    """
    if gpu_catalog is None:
        from archipelago.decide.catalog import load_gpu_catalog

        gpu_catalog = load_gpu_catalog()
    factory = perf_factory or default_perf_factory()
    perfs = _PERF_POOLS.setdefault(factory, _PerfPool(factory))
    cache = cache if cache is not None else CapacityCache()
    pool_names = {p.name for p in fleet.pools}
    problem = Problem(fleet=fleet, config=config, models=[])
    gpu_specs: dict[str, Any] = {}
    for p in fleet.pools:
        try:
            gpu_specs[p.name] = gpu_catalog.get(p.gpu)
        except Exception as e:  # CatalogError: unknown GPU
            problem.notes.append(Infeasibility("*", "unknown-gpu", f"pool {p.name!r}: {e}",
                                               f"set spec.gpu of GPUPool {p.name!r} to a catalogue key "
                                               "or add the GPU to policies/gpus.yaml"))
        else:
            if gpu_specs[p.name] is None:
                del gpu_specs[p.name]
                problem.notes.append(Infeasibility("*", "unknown-gpu", f"pool {p.name!r}: GPU {p.gpu!r} "
                                                   "is not in the catalogue", "fix the pool's gpu"))
    running = set(current.islands) if current else set()
    for mi, req in enumerate(requests):
        for pn in req.allowed_pools:
            if pn not in pool_names:
                raise PlannerInputError(f"{req.key}: allowed_pools entry {pn!r} is not a GPUPool; "
                                        f"known pools: {sorted(pool_names)}")
        limits = resolve_limits(req, config)
        mml = getattr(limits, "max_model_len", None)
        buckets = workload_buckets(req.workload, max_model_len=mml)
        mp = ModelProblem(req=req, buckets=buckets, variants=[], all_variants=[])
        if req.disaggregation not in ("none", "", None):
            mp.notes.append(Infeasibility(req.key, "unsupported",
                                          f"disaggregation={req.disaggregation!r} is not planned yet; "
                                          "mixed (prefill+decode) islands are used",
                                          "set disaggregation: none to silence this note"))
        ttft = req.slo.ttft_s * config.ttft_scale
        tpot = req.slo.tpot_s * config.tpot_scale
        fit_errors: list[str] = []
        pools = [p for p in fleet.pools if (not req.allowed_pools or p.name in req.allowed_pools)
                 and p.name in gpu_specs]
        budget = int(getattr(limits, "max_num_batched_tokens", 8192))
        for p in pools:
            for tp in req.allowed_tp:
                if fixed_tp is not None and fixed_tp.get((req.key, p.name), tp) != tp:
                    continue
                if tp > max((n.gpus_allocatable for n in p.nodes), default=0):
                    continue
                perf = perfs.get(req.model, gpu_specs[p.name], tp, limits)
                if not getattr(perf, "fits", True):
                    fit_errors.append(f"{p.gpu} x{tp}: {getattr(perf, 'fit_error', 'does not fit')}")
                    continue
                ckey = (req.model_name, p.gpu, tp, repr(limits))
                caps = [cache.get(ckey, perf, b, ttft_s=ttft, tpot_s=tpot, budget=budget,
                                  ttft_pct=req.slo.ttft_percentile, tpot_pct=req.slo.tpot_percentile)
                        for b in buckets]
                iid = island_id(req.key, p.name, tp)
                scale = (config.capacity_scale.get(p.name, 1.0) * config.model_capacity_scale.get(req.key, 1.0)
                         * config.island_capacity_scale.get(iid, 1.0))
                if scale != 1.0:
                    caps = [Capacity(c.rate_rps * scale, c.binding, c.idle_ttft_s, c.idle_tpot_s,
                                     c.at_capacity) for c in caps]
                v = Variant(model_idx=mi, iid=iid, pool=p.name, gpu=p.gpu,
                            tp=tp, perf=perf, limits=limits,
                            price=float(perf.price_per_hour(p.price_per_gpu_hour)),
                            busy_w=_power(perf, "decode", p.power_w, tp),
                            idle_w=_power(perf, "idle", None, tp), caps=caps, scale=scale)
                mp.all_variants.append(v)
        if not mp.all_variants:
            if fit_errors:
                mp.notes.append(Infeasibility(
                    req.key, "memory", "no allowed pool x TP holds the model: " + "; ".join(fit_errors[:4]),
                    "allow a larger TP degree (allowed_tp), a pool with more GPU memory, quantization, "
                    "or a smaller max_model_len", served_fraction=0.0))
            else:
                mp.notes.append(Infeasibility(
                    req.key, "pool-capacity",
                    f"no allowed pool has a node with >= {min(req.allowed_tp)} GPUs (allowed pools: "
                    f"{list(req.allowed_pools) or 'all'})",
                    "add nodes to an allowed pool or allow smaller TP degrees", served_fraction=0.0))
            mp.dead = set(range(len(buckets)))
            problem.models.append(mp)
            continue
        # buckets no variant can serve within the SLO
        lost = 0.0
        for bi, b in enumerate(buckets):
            if all(v.caps[bi].rate_rps <= 0 for v in mp.all_variants):
                mp.dead.add(bi)
                lost += b.fraction
        if mp.dead:
            _explain_dead(mp, ttft, tpot)
        # prune: keep the best variants per bucket by $/h per req/s, plus running islands
        keep: set[str] = set()
        k = max(1, config.max_variants_per_bucket)
        for bi in range(len(buckets)):
            if bi in mp.dead:
                continue
            ranked = sorted((v for v in mp.all_variants if v.caps[bi].rate_rps > 0),
                            key=lambda v, bi=bi: (v.price / v.caps[bi].rate_rps, v.iid))
            keep.update(v.iid for v in ranked[:k])
        # cheapest per-replica variant helps min_replicas
        if mp.all_variants:
            keep.add(min(mp.all_variants, key=lambda v: (v.price, v.iid)).iid)
        keep |= running | {iid for iid, r in config.island_floor.items() if r > 0}
        mp.variants = [v for v in mp.all_variants if v.iid in keep]
        if config.capacity_model == "simulated":
            _calibrate(mp, config, cache, ttft, tpot, calibrate_all)
        problem.models.append(mp)
    return problem


def _calibrate(mp: ModelProblem, config: PlannerConfig, cache: CapacityCache, ttft: float, tpot: float,
               calibrate_all: bool) -> None:
    """Replace the analytic capacities of the candidate variants by simulator-calibrated ones
    (:mod:`.calibrate`); buckets no candidate can serve any more become dead (explained)."""
    import dataclasses

    from .calibrate import calibrated_capacity, output_shape, per_replica_cv

    req = mp.req
    slo = dataclasses.replace(req.slo, ttft_s=ttft, tpot_s=tpot) if dataclasses.is_dataclass(req.slo) else req.slo
    shape = output_shape(req.workload)
    rate = max(1e-9, req.workload.rate_rps)
    targets = mp.all_variants if calibrate_all else mp.variants
    for v in targets:
        if v.calibrated:
            continue
        key = (req.model_name, v.gpu, v.tp, repr(v.limits))
        caps = []
        for bi, b in enumerate(mp.buckets):
            a = v.caps[bi]
            raw = Capacity(a.rate_rps / v.scale, a.binding, a.idle_ttft_s, a.idle_tpot_s, a.at_capacity) \
                if v.scale not in (0.0, 1.0) else a
            if bi in mp.dead or raw.rate_rps <= 0:
                caps.append(a)
                continue
            cv = per_replica_cv(req.workload.arrival_cv, raw.rate_rps / rate)
            c = calibrated_capacity(cache, key, v.perf, v.limits, b, slo, analytic=raw, out_shape=shape,
                                    cv=cv, n_requests=config.calib_requests, max_sims=config.calib_max_sims,
                                    rel_tol=config.calib_rel_tol, seed=config.calib_seed,
                                    max_utilization=config.calib_max_utilization)
            caps.append(Capacity(c.rate_rps * v.scale, c.binding, c.idle_ttft_s, c.idle_tpot_s, c.at_capacity))
        v.caps = caps
        v.calibrated = True
    newly = [bi for bi in range(len(mp.buckets)) if bi not in mp.dead
             and all(v.caps[bi].rate_rps <= 0 for v in mp.variants)]
    for bi in newly:
        b = mp.buckets[bi]
        mp.dead.add(bi)
        mp.notes.append(Infeasibility(
            req.key, "ttft-slo",
            f"prompts of {b.lo:.0f}-{b.hi:.0f} tokens ({b.fraction:.1%} of requests): no candidate island "
            f"meets the SLO (TTFT {ttft:.3f} s, TPOT {tpot * 1e3:.1f} ms, attainment {req.slo.attainment:.0%}) "
            "in the simulator even at 1 % of its modelled capacity",
            "relax the TTFT/TPOT target, allow faster GPUs or a higher TP degree, or cap prompt length",
            served_fraction=1.0 - b.fraction))


def _explain_dead(mp: ModelProblem, ttft: float, tpot: float) -> None:
    req = mp.req
    for bi in sorted(mp.dead):
        b = mp.buckets[bi]
        caps = [(v, v.caps[bi]) for v in mp.all_variants]
        best_ttft = min(caps, key=lambda vc: vc[1].idle_ttft_s)
        best_tpot = min(caps, key=lambda vc: vc[1].idle_tpot_s)
        if best_ttft[1].idle_ttft_s > ttft:
            v, c = best_ttft
            detail = (f"prompts of {b.lo:.0f}-{b.hi:.0f} tokens ({b.fraction:.1%} of requests): the fastest "
                      f"allowed island ({v.gpu} TP{v.tp}) needs {c.idle_ttft_s:.3f} s to first token even "
                      f"when idle; TTFT target is {ttft:.3f} s")
            sugg = (f"raise the TTFT target to >= {c.idle_ttft_s * 1.2:.2f} s, allow a higher TP degree or "
                    f"faster GPUs, or cap prompts below {b.lo:.0f} tokens (max_model_len)")
            cons = "ttft-slo"
        elif best_tpot[1].idle_tpot_s > tpot:
            v, c = best_tpot
            detail = (f"prompts of {b.lo:.0f}-{b.hi:.0f} tokens: the fastest allowed island ({v.gpu} TP{v.tp}) "
                      f"decodes at {c.idle_tpot_s * 1e3:.1f} ms/token at batch 1; TPOT target is "
                      f"{tpot * 1e3:.1f} ms")
            sugg = (f"raise the TPOT target to >= {c.idle_tpot_s * 1.2 * 1e3:.0f} ms or allow a higher TP degree "
                    "/ faster GPUs")
            cons = "tpot-slo"
        else:
            bind = sorted({c.binding for _, c in caps})
            detail = (f"prompts of {b.lo:.0f}-{b.hi:.0f} tokens: no allowed island has KV-cache room or "
                      f"headroom for them within the SLO (limits: {', '.join(bind)})")
            sugg = "allow a higher TP degree or GPUs with more memory, or lower max_model_len"
            cons = "memory" if "memory" in bind or "kv" in bind else "ttft-slo"
        mp.notes.append(Infeasibility(req.key, cons, detail, sugg, served_fraction=1.0 - b.fraction))


# ------------------------------------------------------------------------------------------
# CP-SAT
# ------------------------------------------------------------------------------------------
@dataclass
class IslandSolution:
    """Result of island sizing: ``replicas[iid]``, ``shares[(model_idx, bucket_idx)][iid]``
    (0..1), ``unserved[(model_idx, bucket_idx)]`` (0..1), solver status, objective ($/h incl.
    penalties), best bound, wall time (s), variable count, lexicographic stages; ``start``
    which starting point was hinted (``greedy``, ``lp-rounding`` or ``none``) and
    ``start_objective`` its objective (same units as ``objective``)."""

    replicas: dict[str, int]
    shares: dict[tuple[int, int], dict[str, float]]
    unserved: dict[tuple[int, int], float]
    status: str
    objective: float | None
    bound: float | None
    wall_s: float
    num_variables: int
    stages: int
    variants: dict[str, Variant]
    start: str = ""
    start_objective: float | None = None


def _load_coef(v: Variant, bi: int, b: Bucket, headroom: float) -> int:
    """Replica-units x MILLI of the whole bucket on variant v (rounded up = conservative)."""
    cap = v.caps[bi].rate_rps * (1.0 - headroom)
    return int(math.ceil(b.rate_rps / cap * MILLI))


def _pool_limits(fleet: FleetSnapshot, variants: list[Variant]) -> dict[str, list[tuple[int, int]]]:
    """Per pool: [(tp level t, GPUs usable in t-blocks)] for every TP level used."""
    out: dict[str, list[tuple[int, int]]] = {}
    levels: dict[str, set[int]] = {}
    for v in variants:
        levels.setdefault(v.pool, set()).add(v.tp)
    for pn, ts in levels.items():
        p = fleet.pool(pn)
        out[pn] = [(t, p.gpus_free_in_blocks(t)) for t in sorted(ts)]
    return out


def solve_islands(problem: Problem, current: CurrentPlacement | None = None, *,
                  hint: dict[str, int] | None = None,
                  pool_cut: dict[str, int] | None = None) -> IslandSolution:
    """Solve island sizing + workload mapping with CP-SAT (see module docstring).

    Args:
        problem: from :func:`build_problem`.
        current: running islands: hints and the churn penalty.
        hint: extra replica hints ``{iid: replicas}`` (e.g. the previous plan).
        pool_cut: GPUs to withhold per pool (packing feedback: GPUs that exist but could not
            be packed into whole TP groups).

    Returns:
        :class:`IslandSolution`. Status ``INFEASIBLE`` only if hard constraints (replica upper
        bounds, budget caps) contradict ``min_replicas``; otherwise load that cannot be served
        shows up in ``unserved``.
    """
    cfg = problem.config
    t0 = time.perf_counter()
    S = cfg.share_steps
    h = cfg.headroom
    m = cp_model.CpModel()
    all_vars: list[Variant] = [v for mp in problem.models for v in mp.variants]
    vmap = {v.iid: v for v in all_vars}
    n: dict[str, cp_model.IntVar] = {}
    n_ub: dict[str, int] = {}
    used: dict[str, cp_model.IntVar] = {}
    pool_cap = {p.name: p for p in problem.fleet.pools}
    cur_reps = {iid: current.replicas(iid) for iid in current.islands} if current else {}
    hint = dict(hint or {})
    for iid, r in cur_reps.items():
        hint.setdefault(iid, r)
    for v in all_vars:
        ub = pool_cap[v.pool].gpus_free_in_blocks(v.tp) // v.tp
        mr = problem.models[v.model_idx].req.max_replicas
        if mr is not None:
            ub = min(ub, mr)
        n[v.iid] = m.NewIntVar(0, max(0, ub), f"n[{v.iid}]")
        n_ub[v.iid] = max(0, ub)
        used[v.iid] = m.NewBoolVar(f"used[{v.iid}]")
        m.Add(n[v.iid] <= max(0, ub) * used[v.iid])
        m.Add(n[v.iid] >= used[v.iid])
        floor = min(int(cfg.island_floor.get(v.iid, 0)), max(0, ub))
        if floor > 0:
            m.Add(n[v.iid] >= floor)
    x: dict[tuple[int, int, str], cp_model.IntVar] = {}
    u: dict[tuple[int, int], cp_model.IntVar] = {}
    load_terms: dict[str, list[Any]] = {v.iid: [] for v in all_vars}
    unserved_w: dict[tuple[int, int], int] = {}
    cost_terms: list[Any] = []
    dvars: dict[str, tuple[Any, int]] = {}
    for mi, mp in enumerate(problem.models):
        req = mp.req
        for bi, b in enumerate(mp.buckets):
            u[mi, bi] = m.NewIntVar(0, S, f"u[{mi},{bi}]")
            terms = [u[mi, bi]]
            worst = 0.0
            if bi not in mp.dead:
                for v in mp.variants:
                    if v.caps[bi].rate_rps <= 0:
                        continue
                    xv = m.NewIntVar(0, S, f"x[{mi},{bi},{v.iid}]")
                    x[mi, bi, v.iid] = xv
                    terms.append(xv)
                    load_terms[v.iid].append(_load_coef(v, bi, b, h) * xv)
                    worst = max(worst, v.price * math.ceil(b.rate_rps / (v.caps[bi].rate_rps * (1 - h)) + 1))
            else:
                m.Add(u[mi, bi] == S)
            m.Add(sum(terms) == S)
            # unserved penalty per share step: 10x the cost of serving the bucket on its worst variant
            unserved_w[mi, bi] = int(math.ceil((10 * worst + 1000 * b.fraction + 1) * MILLI / S))
        nsum = sum(n[v.iid] for v in mp.variants) if mp.variants else 0
        if req.max_replicas is not None and mp.variants:
            m.Add(nsum <= req.max_replicas)
        if req.min_replicas > 0 and mp.variants:
            m.Add(nsum >= req.min_replicas)
        if req.max_cost_per_hour is not None and mp.variants:
            m.Add(sum(int(round(v.price * MILLI)) * n[v.iid] for v in mp.variants)
                  <= int(req.max_cost_per_hour * MILLI))
        if req.max_power_w is not None and mp.variants:
            m.Add(sum(int(round(v.busy_w)) * n[v.iid] for v in mp.variants) <= int(req.max_power_w))
        kmax = cfg.model_max_islands.get(req.key)
        if kmax is not None and len(mp.variants) > kmax:
            m.Add(sum(used[v.iid] for v in mp.variants) <= int(kmax))
        for v in mp.variants:
            e = req.energy_weight * v.busy_w / 1000.0
            cost_terms.append(int(round((v.price + e) * MILLI)) * n[v.iid])
            cost_terms.append(int(round(cfg.island_penalty * MILLI)) * used[v.iid])
            c = cur_reps.get(v.iid)
            if c is not None or cur_reps:
                c = c or 0
                d = m.NewIntVar(0, max(c, 10_000), f"d[{v.iid}]")
                dvars[v.iid] = (d, c)
                m.Add(d >= n[v.iid] - c)
                m.Add(d >= c - n[v.iid])
                cost_terms.append(int(round(cfg.churn_penalty_per_replica * MILLI)) * d)
    for v in all_vars:
        if load_terms[v.iid]:
            m.Add(sum(load_terms[v.iid]) <= MILLI * S * n[v.iid])
    for pn, levels in _pool_limits(problem.fleet, all_vars).items():
        cut = (pool_cut or {}).get(pn, 0)
        for t, gpus in levels:
            vs = [v for v in all_vars if v.pool == pn and v.tp >= t]
            m.Add(sum(v.tp * n[v.iid] for v in vs) <= max(0, gpus - cut))
    # warm start: the cheaper of the greedy and the LP-rounding starting points (both complete
    # and checked against every constraint), hinted in full so CP-SAT starts from it at once
    cands = [_greedy_hint(m, problem, n, n_ub, x, u, hint, S, h), None, None]
    if cfg.lp_hint:
        cands[1] = _lp_rounding(problem, x, S, h, pool_cut or {})
        if len(problem.models) > 1:
            cands[2] = _per_model_start(problem, x, n_ub, S, h, pool_cut or {}, unserved_w)
    scored = [(c_obj, i, c) for i, c in enumerate(cands) if c is not None
              for c_obj in [_check_start(problem, c, n_ub, x, S, h, pool_cut or {}, unserved_w)] if c_obj is not None]
    best = min(scored, key=lambda t: (t[0], t[1])) if scored else None
    start = best[2] if best else None
    hint_source = "none" if best is None else ("greedy", "lp-rounding", "per-model")[best[1]]
    start_obj = best[0] / MILLI if best else None
    _apply_start(m, start, n, used, x, u, dvars, S)
    unserved_expr = sum(unserved_w[k] * u[k] for k in u)
    cost_expr = sum(cost_terms)

    solver = cp_model.CpSolver()
    multi = len({mp.req.priority for mp in problem.models}) > 1
    share = 0.7 if multi else 1.0
    _params(solver, cfg, cfg.inner_time_limit_s * share, cfg.inner_deterministic_limit * share)
    m.Minimize(cost_expr + unserved_expr)
    st = solver.Solve(m)
    stages = 1
    live_u = [k for k in u if k[1] not in problem.models[k[0]].dead]
    if st in (cp_model.OPTIMAL, cp_model.FEASIBLE) and any(solver.Value(u[k]) for k in live_u):
        prios = sorted({mp.req.priority for mp in problem.models}, reverse=True)
        if len(prios) > 1:
            st, stages = _lexicographic(m, solver, problem, u, n, prios, cost_expr, cfg)
    wall = time.perf_counter() - t0
    status = solver.StatusName(st)
    if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return IslandSolution({}, {}, {k: 1.0 for k in u}, status, None, None, wall,
                              len(m.Proto().variables), stages, vmap, hint_source, start_obj)
    reps = {iid: int(solver.Value(var)) for iid, var in n.items() if solver.Value(var) > 0}
    shares: dict[tuple[int, int], dict[str, float]] = {}
    for (mi, bi, iid), var in x.items():
        val = solver.Value(var)
        if val:
            shares.setdefault((mi, bi), {})[iid] = val / S
    uns = {k: solver.Value(var) / S for k, var in u.items()}
    return IslandSolution(reps, shares, uns, status, solver.ObjectiveValue() / MILLI,
                          solver.BestObjectiveBound() / MILLI, wall, len(m.Proto().variables), stages, vmap,
                          hint_source, start_obj)


def _greedy_hint(m: cp_model.CpModel, problem: Problem, n: dict, n_ub: dict, x: dict, u: dict,
                 hint: dict[str, int], S: int, h: float) -> tuple:
    """A complete, feasible-by-construction starting point ``(replicas, shares, unserved)``:
    each bucket goes wholly to its cheapest-per-capacity variant that still has room
    (hinted/running islands first), replicas rounded up; buckets that do not fit stay unserved.
    Without a start a single CP-SAT worker can spend its whole budget looking for a first
    solution."""
    reps: dict[str, float] = {}
    gpus_left = {p.name: p.gpus_free for p in problem.fleet.pools}
    chosen: dict[tuple[int, int], str] = {}
    for mi, mp in enumerate(problem.models):
        cnt = 0
        for bi, b in sorted(enumerate(mp.buckets), key=lambda t: -t[1].rate_rps):
            if bi in mp.dead:
                continue
            cands = [v for v in mp.variants if (mi, bi, v.iid) in x]
            kmax = problem.config.model_max_islands.get(mp.req.key)
            opened = {iid for (mj, _bj), iid in chosen.items() if mj == mi}
            if kmax is not None and len(opened) >= kmax:
                cands = [v for v in cands if v.iid in opened]
            cands.sort(key=lambda v: (v.iid not in hint, v.price / v.caps[bi].rate_rps, v.iid))
            for v in cands:
                add = b.rate_rps / (v.caps[bi].rate_rps * (1 - h))
                before = math.ceil(reps.get(v.iid, 0.0) - 1e-9)
                after = math.ceil(reps.get(v.iid, 0.0) + add - 1e-9)
                mr = mp.req.max_replicas
                if after > n_ub[v.iid] or (after - before) * v.tp > gpus_left[v.pool] or (
                        mr is not None and cnt + after - before > mr):
                    continue
                gpus_left[v.pool] -= (after - before) * v.tp
                cnt += after - before
                reps[v.iid] = reps.get(v.iid, 0.0) + add
                chosen[mi, bi] = v.iid
                break
    # the per-(pool, TP-level) block limits are stricter than gpus_left; verify, else drop all
    ok = True
    for pn, levels in _pool_limits(problem.fleet, [v for mp in problem.models for v in mp.variants]).items():
        for t, g in levels:
            used = sum(math.ceil(r - 1e-9) * problem_variant(problem, iid).tp for iid, r in reps.items()
                       if problem_variant(problem, iid).pool == pn and problem_variant(problem, iid).tp >= t)
            ok &= used <= g
    if not ok:
        reps, chosen = {}, {}
    xs = {(mi, bi, iid): S for (mi, bi), iid in chosen.items()}
    return _start_from_shares(problem, xs, x, u, S, h)


def _start_from_shares(problem: Problem, xs: dict[tuple[int, int, str], int], x: dict, u: dict, S: int,
                       h: float) -> tuple[dict[str, int], dict[tuple[int, int, str], int], dict[tuple[int, int], int]]:
    """A starting point ``(replicas, shares, unserved)`` from integer shares (steps of 1/S):
    unserved = the rest of each bucket, replicas = the fewest that carry the load (the CP-SAT
    model's load coefficients, so the point satisfies its capacity rows)."""
    load: dict[str, int] = {}
    for (mi, bi, iid), q in xs.items():
        if q <= 0:
            continue
        v = problem_variant(problem, iid)
        load[iid] = load.get(iid, 0) + _load_coef(v, bi, problem.models[mi].buckets[bi], h) * q
    reps = {iid: -(-ld // (MILLI * S)) for iid, ld in load.items() if ld > 0}
    uns = {}
    for key in u:
        tot = sum(q for (mi, bi, _iid), q in xs.items() if (mi, bi) == key)
        uns[key] = S - tot
    return reps, {k: q for k, q in xs.items() if q > 0 and k in x}, uns


def _check_start(problem: Problem, start: tuple, n_ub: dict[str, int], x: dict, S: int, h: float,
                 pool_cut: dict[str, int], unserved_w: dict[tuple[int, int], int]) -> int | None:
    """Objective (MILLI units, without churn) of a starting point, or None if it violates a
    constraint of the CP-SAT model (so only feasible points are hinted)."""
    reps, xs, uns = start
    cfg = problem.config
    if any(q < 0 for q in uns.values()) or any(k not in x for k in xs):
        return None
    for iid, r in reps.items():
        if r > n_ub.get(iid, -1):
            return None
    allv = [v for mp in problem.models for v in mp.variants]
    for pn, levels in _pool_limits(problem.fleet, allv).items():
        for t, gpus in levels:
            used = sum(v.tp * reps.get(v.iid, 0) for v in allv if v.pool == pn and v.tp >= t)
            if used > max(0, gpus - pool_cut.get(pn, 0)):
                return None
    obj = 0
    for mp in problem.models:
        req = mp.req
        tot = sum(reps.get(v.iid, 0) for v in mp.variants)
        if (req.max_replicas is not None and tot > req.max_replicas) or tot < req.min_replicas:
            return None
        if req.max_cost_per_hour is not None and sum(int(round(v.price * MILLI)) * reps.get(v.iid, 0)
                                                     for v in mp.variants) > int(req.max_cost_per_hour * MILLI):
            return None
        if req.max_power_w is not None and sum(int(round(v.busy_w)) * reps.get(v.iid, 0)
                                               for v in mp.variants) > int(req.max_power_w):
            return None
        kmax = cfg.model_max_islands.get(req.key)
        if kmax is not None and sum(1 for v in mp.variants if reps.get(v.iid, 0) > 0) > kmax:
            return None
        for v in mp.variants:
            r = reps.get(v.iid, 0)
            e = req.energy_weight * v.busy_w / 1000.0
            obj += int(round((v.price + e) * MILLI)) * r + (int(round(cfg.island_penalty * MILLI)) if r else 0)
    obj += sum(unserved_w[k] * q for k, q in uns.items())
    return obj


def _apply_start(m: cp_model.CpModel, start: tuple | None, n: dict, used: dict, x: dict, u: dict,
                 dvars: dict[str, tuple[Any, int]], S: int) -> None:
    """Hint every variable (replicas, island flags, shares, unserved, churn) from ``start``
    (all-unserved when None)."""
    reps, xs, uns = start if start is not None else ({}, {}, {k: S for k in u})
    for iid, var in n.items():
        m.AddHint(var, reps.get(iid, 0))
        m.AddHint(used[iid], 1 if reps.get(iid, 0) > 0 else 0)
    for key, var in x.items():
        m.AddHint(var, xs.get(key, 0))
    for key, var in u.items():
        m.AddHint(var, uns.get(key, S))
    for iid, (d, c) in dvars.items():
        m.AddHint(d, abs(reps.get(iid, 0) - c))


def _per_model_start(problem: Problem, x: dict, n_ub: dict[str, int], S: int, h: float,
                     pool_cut: dict[str, int], unserved_w: dict[tuple[int, int], int]) -> tuple | None:
    """Decomposed starting point: one small CP-SAT model per model (its variants, buckets,
    replica bounds, budget and island caps; the same objective), solved in priority order
    (then largest load first) against the pool GPUs the models before it left, TP level by TP
    level. Each sub-model has a few dozen variables and is usually solved to optimality in
    milliseconds, so at 50 models the start is close to the joint optimum except for the pool
    contention the order decides. Returns None if a sub-model fails."""
    cfg = problem.config
    allv = [v for mp in problem.models for v in mp.variants]
    limits = {pn: dict(lv) for pn, lv in _pool_limits(problem.fleet, allv).items()}
    usedg: dict[tuple[str, int], int] = {}
    reps: dict[str, int] = {}
    xs: dict[tuple[int, int, str], int] = {}
    order = sorted(range(len(problem.models)),
                   key=lambda i: (-problem.models[i].req.priority, -problem.models[i].req.workload.rate_rps, i))
    per_solve = max(0.02, min(0.25, cfg.inner_time_limit_s * 0.3 / max(1, len(order))))
    for mi in order:
        mp = problem.models[mi]
        if not mp.variants:
            continue
        sm = cp_model.CpModel()
        nn = {v.iid: sm.NewIntVar(0, n_ub[v.iid], "") for v in mp.variants}
        uu = {v.iid: sm.NewBoolVar("") for v in mp.variants}
        for v in mp.variants:
            sm.Add(nn[v.iid] <= n_ub[v.iid] * uu[v.iid])
        ld: dict[str, list] = {v.iid: [] for v in mp.variants}
        xx: dict[tuple[int, int, str], Any] = {}
        obj = []
        for bi, b in enumerate(mp.buckets):
            keys = [(mi, bi, v.iid) for v in mp.variants if (mi, bi, v.iid) in x]
            ub_ = sm.NewIntVar(0, S, "")
            for k in keys:
                xx[k] = sm.NewIntVar(0, S, "")
                ld[k[2]].append(_load_coef(problem_variant(problem, k[2]), bi, b, h) * xx[k])
            sm.Add(sum(xx[k] for k in keys) + ub_ == S)
            obj.append(unserved_w[mi, bi] * ub_)
        for v in mp.variants:
            if ld[v.iid]:
                sm.Add(sum(ld[v.iid]) <= MILLI * S * nn[v.iid])
            e = mp.req.energy_weight * v.busy_w / 1000.0
            obj.append(int(round((v.price + e) * MILLI)) * nn[v.iid] + int(round(cfg.island_penalty * MILLI)) * uu[v.iid])
        for pn, lv in limits.items():
            for t, gpus in lv.items():
                vs = [v for v in mp.variants if v.pool == pn and v.tp >= t]
                if vs:
                    room = max(0, gpus - pool_cut.get(pn, 0) - usedg.get((pn, t), 0))
                    sm.Add(sum(v.tp * nn[v.iid] for v in vs) <= room)
        tot = sum(nn.values())
        req = mp.req
        if req.max_replicas is not None:
            sm.Add(tot <= req.max_replicas)
        if req.min_replicas:
            sm.Add(tot >= req.min_replicas)
        if req.max_cost_per_hour is not None:
            sm.Add(sum(int(round(v.price * MILLI)) * nn[v.iid] for v in mp.variants) <= int(req.max_cost_per_hour * MILLI))
        if req.max_power_w is not None:
            sm.Add(sum(int(round(v.busy_w)) * nn[v.iid] for v in mp.variants) <= int(req.max_power_w))
        kmax = cfg.model_max_islands.get(req.key)
        if kmax is not None:
            sm.Add(sum(uu.values()) <= kmax)
        sm.Minimize(sum(obj))
        sv = cp_model.CpSolver()
        sv.parameters.num_workers = 1
        sv.parameters.random_seed = cfg.seed
        sv.parameters.max_time_in_seconds = per_solve
        sv.parameters.max_deterministic_time = per_solve
        sv.parameters.linearization_level = 2
        if sv.Solve(sm) not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return None
        for v in mp.variants:
            r = int(sv.Value(nn[v.iid]))
            if r:
                reps[v.iid] = r
                for t in limits.get(v.pool, {}):
                    if v.tp >= t:
                        usedg[(v.pool, t)] = usedg.get((v.pool, t), 0) + v.tp * r
        xs.update({k: int(sv.Value(var)) for k, var in xx.items() if sv.Value(var)})
    u = {(mi, bi): 0 for mi, mp in enumerate(problem.models) for bi in range(len(mp.buckets))}
    start = _start_from_shares(problem, xs, x, u, S, h)
    return start


def _lp_rounding(problem: Problem, x: dict, S: int, h: float, pool_cut: dict[str, int]
                 ) -> tuple[dict[str, int], dict[tuple[int, int, str], int], dict[tuple[int, int], int]] | None:
    """LP-rounding starting point: solve the LP relaxation over the candidate variants (OR-Tools
    GLOP; fractional replicas and shares, pool TP-block limits with ``pool_cut``, replica caps),
    round each bucket's shares to steps of 1/S (largest remainder), replicas up, then empty the
    islands whose load fits in the slack the rounding left on the model's other islands
    (cheapest-to-drop first). Returns None if the LP fails. At scale this is far closer to the
    optimum than the greedy start (each bucket wholly on its cheapest variant)."""
    from ortools.linear_solver import pywraplp

    s = pywraplp.Solver.CreateSolver("GLOP")
    if s is None:  # pragma: no cover
        return None
    inf = s.infinity()
    allv = [v for mp in problem.models for v in mp.variants]
    nv = {v.iid: s.NumVar(0, inf, v.iid) for v in allv}
    load: dict[str, list] = {v.iid: [] for v in allv}
    xv: dict[tuple[int, int, str], Any] = {}
    obj = []
    for mi, mp in enumerate(problem.models):
        for v in mp.variants:
            obj.append((v.price + mp.req.energy_weight * v.busy_w / 1000.0) * nv[v.iid])
        for bi, b in enumerate(mp.buckets):
            keys = [k for k in ((mi, bi, v.iid) for v in mp.variants) if k in x]
            if not keys:
                continue
            uv = s.NumVar(0, 1, "")
            for k in keys:
                xv[k] = s.NumVar(0, 1, "")
                v = problem_variant(problem, k[2])
                load[k[2]].append(_load_coef(v, bi, b, h) / MILLI * xv[k])
            s.Add(sum(xv[k] for k in keys) + uv == 1)
            obj.append(1e4 * (1 + b.rate_rps) * uv)
        if mp.req.max_replicas is not None and mp.variants:
            s.Add(sum(nv[v.iid] for v in mp.variants) <= mp.req.max_replicas)
    for v in allv:
        if load[v.iid]:
            s.Add(sum(load[v.iid]) <= nv[v.iid])
    for pn, levels in _pool_limits(problem.fleet, allv).items():
        for t, gpus in levels:
            s.Add(sum(v.tp * nv[v.iid] for v in allv if v.pool == pn and v.tp >= t)
                  <= max(0, gpus - pool_cut.get(pn, 0)))
    s.Minimize(sum(obj))
    if s.Solve() not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        return None
    xs: dict[tuple[int, int, str], int] = {}
    groups: dict[tuple[int, int], list] = {}
    for k, var in xv.items():
        groups.setdefault(k[:2], []).append((k, var.solution_value()))
    for _key, vals in groups.items():
        fl = {k: int(math.floor(val * S + 1e-9)) for k, val in vals}
        want = int(round(sum(val for _, val in vals) * S))
        rest = sorted(vals, key=lambda kv: -(kv[1] * S - fl[kv[0]]))
        for k, _ in rest[: max(0, want - sum(fl.values()))]:
            fl[k] += 1
        xs.update({k: q for k, q in fl.items() if q > 0})
    # empty small islands into the slack of the model's other islands
    coef = {k: _load_coef(problem_variant(problem, k[2]), k[1], problem.models[k[0]].buckets[k[1]], h) for k in x}
    for _ in range(2):
        reps, _, _ = _start_from_shares(problem, xs, x, {}, S, h)
        # shares of zero-rate buckets may sit on variants that got no replicas (zero load)
        ld = {iid: 0 for iid in reps}
        for k, q in xs.items():
            ld[k[2]] = ld.get(k[2], 0) + coef[k] * q
        slack = {iid: reps[iid] * MILLI * S - ld[iid] for iid in reps}
        order = sorted(reps, key=lambda iid: (problem_variant(problem, iid).price * reps[iid], iid))
        for iid in order:
            if reps.get(iid, 0) == 0:
                continue
            mine = [k for k in xs if k[2] == iid]
            moves: list[tuple[tuple, tuple, int]] = []
            trial = dict(slack)
            ok = True
            for k in mine:
                q = xs[k]
                dest = None
                for w in sorted((w for w in reps if w != iid and reps[w] > 0 and (k[0], k[1], w) in x),
                                key=lambda w: -trial[w]):
                    if problem_variant(problem, w).model_idx != k[0]:
                        continue
                    need = coef[(k[0], k[1], w)] * q
                    if need <= trial[w]:
                        dest = w
                        trial[w] -= need
                        break
                if dest is None:
                    ok = False
                    break
                moves.append((k, (k[0], k[1], dest), q))
            if not ok or not moves:
                continue
            for k, kd, q in moves:
                del xs[k]
                xs[kd] = xs.get(kd, 0) + q
            slack = trial
            reps[iid] = 0
    u = {k[:2]: 0 for k in xs}
    for mi, mp in enumerate(problem.models):
        for bi in range(len(mp.buckets)):
            u.setdefault((mi, bi), 0)
    return _start_from_shares(problem, xs, x, u, S, h)


def problem_variant(problem: Problem, iid: str) -> Variant:
    """The variant called ``iid`` (KeyError if none)."""
    idx = getattr(problem, "_vidx", None)
    if idx is None:
        idx = {v.iid: v for mp in problem.models for v in mp.all_variants}
        problem._vidx = idx  # type: ignore[attr-defined]
    return idx[iid]


def _params(solver: cp_model.CpSolver, cfg: PlannerConfig, wall: float, det: float) -> None:
    p = solver.parameters
    p.num_workers = cfg.num_workers
    p.random_seed = cfg.seed
    p.max_time_in_seconds = wall
    p.max_deterministic_time = det
    # island sizing is a MIP: the full LP relaxation lets a single worker prove optimality fast
    p.linearization_level = 2
    if cfg.num_workers > 1:
        p.interleave_search = True


def _lexicographic(m: cp_model.CpModel, solver: cp_model.CpSolver, problem: Problem, u: dict,
                   n: dict, prios: list[int], cost_expr: Any, cfg: PlannerConfig) -> tuple[int, int]:
    """Minimise unserved load (req/s) priority level by priority level, then cost."""
    stages = 1
    st = cp_model.FEASIBLE
    S = cfg.share_steps
    # the stages share one more time budget, like the first solve
    _params(solver, cfg, cfg.inner_time_limit_s / (len(prios) + 1),
            cfg.inner_deterministic_limit / (len(prios) + 1))
    for pr in prios:
        keys = [(mi, bi) for (mi, bi) in u if problem.models[mi].req.priority == pr
                and bi not in problem.models[mi].dead]
        if not keys:
            continue
        w = {k: max(1, int(round(problem.models[k[0]].buckets[k[1]].rate_rps * MILLI))) for k in keys}
        expr = sum(w[k] * u[k] for k in keys)
        _hint_from(m, solver, n, u)
        m.Minimize(expr)
        st = solver.Solve(m)
        stages += 1
        if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return st, stages
        m.Add(expr <= int(round(solver.ObjectiveValue())))
    _hint_from(m, solver, n, u)
    m.Minimize(cost_expr)
    st = solver.Solve(m)
    del S
    return st, stages + 1


def _hint_from(m: cp_model.CpModel, solver: cp_model.CpSolver, n: dict, u: dict) -> None:
    m.ClearHints()
    for var in list(n.values()) + list(u.values()):
        m.AddHint(var, solver.Value(var))


# ------------------------------------------------------------------------------------------
# LP relaxation lower bound
# ------------------------------------------------------------------------------------------
@dataclass
class LowerBound:
    """LP relaxation of island sizing over *all* fitting variants (no pruning, fractional
    replicas and shares, no island/churn penalties): ``cost_per_hour`` ($/h) is a lower bound
    on the $/h of any plan serving ``served_fraction`` of the load under the capacity model;
    ``replicas`` the fractional replica counts."""

    cost_per_hour: float
    served_fraction: float
    status: str
    replicas: dict[str, float]


def lp_lower_bound(problem: Problem) -> LowerBound:
    """Solve the LP relaxation with OR-Tools GLOP; see :class:`LowerBound`. Energy is not
    included (the bound is on $/h)."""
    from ortools.linear_solver import pywraplp

    s = pywraplp.Solver.CreateSolver("GLOP")
    if s is None:  # pragma: no cover - GLOP ships with OR-Tools
        raise RuntimeError("OR-Tools GLOP solver unavailable")
    h = problem.config.headroom
    inf = s.infinity()
    n, load, cost, penal = {}, {}, [], []
    total_rate = 0.0
    served_rate = []
    for mi, mp in enumerate(problem.models):
        for v in mp.all_variants:
            n[v.iid] = s.NumVar(0, inf, v.iid)
            load[v.iid] = []
            cost.append(v.price * n[v.iid])
        for bi, b in enumerate(mp.buckets):
            total_rate += b.rate_rps
            if bi in mp.dead:
                continue
            terms = []
            for v in mp.all_variants:
                if v.caps[bi].rate_rps <= 0:
                    continue
                xv = s.NumVar(0, 1, f"x{mi},{bi},{v.iid}")
                terms.append(xv)
                load[v.iid].append(b.rate_rps / (v.caps[bi].rate_rps * (1 - h)) * xv)
            uv = s.NumVar(0, 1, f"u{mi},{bi}")
            s.Add(sum(terms) + uv == 1)
            penal.append(1e6 * b.rate_rps * uv)
            served_rate.append((b.rate_rps, uv))
        if mp.all_variants:
            nsum = sum(n[v.iid] for v in mp.all_variants)
            if mp.req.max_replicas is not None:
                s.Add(nsum <= mp.req.max_replicas)
            if mp.req.min_replicas:
                s.Add(nsum >= mp.req.min_replicas)
    allv = [v for mp in problem.models for v in mp.all_variants]
    for v in allv:
        if load[v.iid]:
            s.Add(sum(load[v.iid]) <= n[v.iid])
    for pn, levels in _pool_limits(problem.fleet, allv).items():
        for t, gpus in levels:
            s.Add(sum(v.tp * n[v.iid] for v in allv if v.pool == pn and v.tp >= t) <= gpus)
    s.Minimize(sum(cost) + sum(penal))
    st = s.Solve()
    name = {pywraplp.Solver.OPTIMAL: "OPTIMAL", pywraplp.Solver.FEASIBLE: "FEASIBLE",
            pywraplp.Solver.INFEASIBLE: "INFEASIBLE"}.get(st, str(st))
    if st not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        return LowerBound(math.nan, 0.0, name, {})
    c = sum(v.price * n[v.iid].solution_value() for v in allv)
    served = sum(r * (1.0 - uv.solution_value()) for r, uv in served_rate)
    return LowerBound(c, served / total_rate if total_rate > 0 else 1.0, name,
                      {iid: var.solution_value() for iid, var in n.items() if var.solution_value() > 1e-9})

