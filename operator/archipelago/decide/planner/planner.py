"""The planner's entry point: :func:`plan` runs the inner loop (island sizing + workload mapping,
then pod packing, with packing feedback), explains infeasibility, and applies hysteresis
against the previous plan.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

from .capacity import CapacityCache, predict_replica
from .islands import (
    MILLI,
    IslandSolution,
    Problem,
    Variant,
    build_problem,
    solve_islands,
)
from .packing import PackItem, PackResult, pack
from .types import (
    CurrentPlacement,
    EngineSettings,
    FleetSnapshot,
    Infeasibility,
    IslandPlan,
    ModelPlan,
    ModelRequest,
    ParetoPoint,
    Plan,
    PlannerConfig,
    RangeShare,
    SolveStats,
)

#: Process-wide capacity memo (the capacity of a (model, GPU, TP, limits, bucket, SLO) does not
#: change between planning rounds).
SHARED_CACHE = CapacityCache()


def plan(fleet: FleetSnapshot, requests: list[ModelRequest], current: CurrentPlacement | None = None,
         config: PlannerConfig | None = None, *, previous: Plan | None = None, gpu_catalog: Any = None,
         perf_factory: Callable[..., Any] | None = None, cache: CapacityCache | None = None,
         fixed_tp: dict[tuple[str, str], int] | None = None, method: str = "cpsat",
         pack_pods: bool = True, traces: dict[str, Any] | None = None,
         progress: Callable[[int, Any], None] | None = None) -> Plan:
    """Plan islands and pod placement for ``requests`` on ``fleet``.

    Args:
        fleet: pools, nodes, free GPUs, prices.
        requests: models with SLOs and workloads.
        current: running pods per island (warm start, churn penalty, minimum moves).
        config: :class:`PlannerConfig` (default values if None). ``capacity_model="simulated"``
            calibrates capacities in the simulator (:mod:`.calibrate`, cached in ``cache``);
            ``verify=True`` adds verify-and-repair (:mod:`.repair`).
        previous: the plan in force; it is kept (``kept_previous=True``) while it still serves
            the load and fits the fleet, unless the new plan is cheaper by more than
            ``config.hysteresis_margin`` (relative, on the objective $/h).
        gpu_catalog, perf_factory: override the GPU catalogue / performance model (tests).
        cache: capacity memo (default: process-wide; keep one across calls to reuse
            calibrations).
        fixed_tp: ``{(model_key, pool): tp}`` TP restrictions (baselines, outer loop).
        method: name recorded in ``stats.method``.
        pack_pods: False skips pod packing (used by the outer loop's inner evaluations).
        traces: ``{model_key: Trace}`` used by verify-and-repair (synthetic from the workload
            histograms for models without one).
        progress: verify-and-repair callback ``(round, RepairRound)``.

    Returns:
        :class:`Plan`; infeasible parts are reported in ``plan.infeasibilities``.

    Raises:
        PlannerInputError: malformed input (unknown pool in allowed_pools, bad workload).
    """
    cfg = config or PlannerConfig()
    t0 = time.perf_counter()
    cache = cache if cache is not None else SHARED_CACHE
    kw = dict(gpu_catalog=gpu_catalog, perf_factory=perf_factory, cache=cache, fixed_tp=fixed_tp,
              method=method, pack_pods=pack_pods, previous=previous)
    if cfg.verify:
        from .repair import verify_and_repair

        new, cfg, _ = verify_and_repair(lambda c: _plan_once(fleet, requests, current, c, **kw)[0], requests,
                                        fleet, cfg, traces=traces, gpu_catalog=gpu_catalog,
                                        perf_factory=perf_factory, progress=progress)
        problem = build_problem(fleet, requests, cfg, gpu_catalog=gpu_catalog, perf_factory=perf_factory,
                                cache=cache, current=current, fixed_tp=fixed_tp)
        new = dataclasses.replace(new, stats=dataclasses.replace(new.stats, wall_s=time.perf_counter() - t0))
    else:
        new, problem = _plan_once(fleet, requests, current, cfg, **kw)
    if previous is not None:
        kept = apply_hysteresis(problem, new, previous, current, cfg)
        if kept is not None:
            return kept
    return new


def _plan_once(fleet: FleetSnapshot, requests: list[ModelRequest], current: CurrentPlacement | None,
               cfg: PlannerConfig, *, gpu_catalog: Any, perf_factory: Callable[..., Any] | None,
               cache: CapacityCache, fixed_tp: dict[tuple[str, str], int] | None, method: str,
               pack_pods: bool, previous: Plan | None) -> tuple[Plan, Problem]:
    """One inner-loop pass: build the problem, CP-SAT island sizing, packing with feedback."""
    t0 = time.perf_counter()
    problem = build_problem(fleet, requests, cfg, gpu_catalog=gpu_catalog, perf_factory=perf_factory,
                            cache=cache, current=current, fixed_tp=fixed_tp)
    hint = None
    if previous is not None:
        hint = {i.id: i.replicas for i in previous.islands}
    cut: dict[str, int] = {}
    packed: PackResult | None = None
    sol: IslandSolution | None = None
    rounds = 0
    for _ in range(3):
        rounds += 1
        sol = solve_islands(problem, current, hint=hint, pool_cut=cut)
        if not pack_pods:
            break
        packed = pack(fleet, _pack_items(problem, sol), cfg, current)
        if packed.unplaced == 0:
            break
        # packing feedback: withhold the GPUs that could not be packed and re-solve
        newcut = dict(cut)
        for pn, st in packed.per_pool.items():
            if st["unplaced"]:
                lost = sum(sol.variants[a].tp * (r - packed.placed.get(a, 0))
                           for a, r in sol.replicas.items() if sol.variants[a].pool == pn)
                newcut[pn] = newcut.get(pn, 0) + max(1, lost)
        if newcut == cut:
            break
        cut = newcut
    assert sol is not None
    new = assemble(problem, sol, packed, method=method, wall_s=time.perf_counter() - t0, rounds=rounds)
    return new, problem


def _pack_items(problem: Problem, sol: IslandSolution) -> list[PackItem]:
    items = []
    for iid, r in sorted(sol.replicas.items()):
        v = sol.variants[iid]
        items.append(PackItem(iid, v.pool, v.tp, r, problem.models[v.model_idx].req.priority))
    return items


def _engine(v: Variant) -> EngineSettings:
    lim = v.limits
    return EngineSettings(
        max_num_seqs=int(getattr(lim, "max_num_seqs", 256)),
        gpu_memory_utilization=float(getattr(lim, "gpu_memory_utilization", 0.9)),
        max_model_len=getattr(lim, "max_model_len", None),
        max_num_batched_tokens=int(getattr(lim, "max_num_batched_tokens", 8192)),
    )


def island_utilization(problem: Problem, v: Variant, n: int,
                       shares: dict[tuple[int, int], dict[str, float]]) -> float:
    """Fraction of the island's (headroom-reduced) SLO capacity its assigned load uses."""
    if n <= 0:
        return 0.0
    mp = problem.models[v.model_idx]
    h = problem.config.headroom
    load = 0.0
    for bi, b in enumerate(mp.buckets):
        s = shares.get((v.model_idx, bi), {}).get(v.iid, 0.0)
        if s > 0:
            load += b.rate_rps * s / (v.caps[bi].rate_rps * (1 - h))
    return load / n


def assemble(problem: Problem, sol: IslandSolution, packed: PackResult | None, *, method: str,
             wall_s: float, rounds: int = 1) -> Plan:
    """Turn an :class:`IslandSolution` (+ packing) into a :class:`Plan` with predictions and
    infeasibility explanations."""
    cfg = problem.config
    h = cfg.headroom
    infeas: list[Infeasibility] = list(problem.notes)
    models: list[ModelPlan] = []
    total_cost = total_w = 0.0
    for mi, mp in enumerate(problem.models):
        req = mp.req
        infeas += mp.notes
        islands: list[IslandPlan] = []
        for v in mp.variants:
            n = sol.replicas.get(v.iid, 0)
            if n <= 0:
                continue
            util = island_utilization(problem, v, n, sol.shares)
            ranges, ttft, tpot, share_tot = [], 0.0, 0.0, 0.0
            for bi, b in enumerate(mp.buckets):
                s = sol.shares.get((mi, bi), {}).get(v.iid, 0.0)
                if s <= 0:
                    continue
                ranges.append(RangeShare(b.lo, b.hi, s, b.rate_rps * s))
                share_tot += b.fraction * s
                lam = v.caps[bi].rate_rps * (1 - h) * min(util, 1.0)
                p = predict_replica(v.perf, b, lam, budget=int(getattr(v.limits, "max_num_batched_tokens", 8192)),
                                    ttft_pct=req.slo.ttft_percentile, tpot_pct=req.slo.tpot_percentile)
                ttft, tpot = max(ttft, p.ttft_q_s), max(tpot, p.tpot_q_s)
            busy = min(1.0, util * (1 - h))
            watts = n * (v.idle_w + busy * (v.busy_w - v.idle_w))
            lo = min((r.lo for r in ranges), default=0.0)
            hi = max((r.hi for r in ranges), default=0.0)
            islands.append(IslandPlan(
                id=v.iid, model=req.key, pool=v.pool, gpu=v.gpu, tp=v.tp, replicas=n, role="mixed",
                ranges=tuple(ranges), input_range=(lo, hi), traffic_share=share_tot, engine=_engine(v),
                cost_per_hour=n * v.price, power_w=watts, utilization=util, ttft_p99_s=ttft,
                tpot_p99_s=tpot))
        routing = []
        for bi, b in enumerate(mp.buckets):
            sh = {k: s for k, s in sol.shares.get((mi, bi), {}).items() if s > 0}
            if sh:
                routing.append((b.lo, b.hi, sh))
        unserved = sum(b.fraction * sol.unserved.get((mi, bi), 1.0) for bi, b in enumerate(mp.buckets))
        served = max(0.0, 1.0 - unserved)
        explained = sum(1.0 - i.served_fraction for i in mp.notes)
        if unserved > 1e-9 and unserved > explained + 1e-6:
            infeas.append(_explain_unserved(problem, mi, sol, served))
        cost = sum(i.cost_per_hour for i in islands)
        watts = sum(i.power_w for i in islands)
        total_cost += cost
        total_w += watts
        models.append(ModelPlan(
            model=req.key, islands=tuple(islands), routing=tuple(routing), served_fraction=served,
            cost_per_hour=cost, power_w=watts, ttft_p99_s=max((i.ttft_p99_s for i in islands), default=math.nan),
            tpot_p99_s=max((i.tpot_p99_s for i in islands), default=math.nan), attainment=None))
    unplaced = 0
    assignments: tuple = ()
    stranded = 0
    pstat = pwall = ""
    pgap = None
    if packed is not None:
        assignments = tuple(sorted(packed.assignments, key=lambda a: (a.island, a.pod)))
        unplaced = packed.unplaced
        stranded = packed.stranded_gpus
        pstat, pwall, pgap = packed.status, packed.wall_s, packed.gap
        if unplaced:
            for pn, st in packed.per_pool.items():
                if st["unplaced"]:
                    infeas.append(Infeasibility(
                        "*", "packing", f"pool {pn!r}: {st['unplaced']} pod(s) do not fit on any node "
                        f"(free GPUs are fragmented across nodes; {st['stranded_gpus']} stranded)",
                        "add nodes to the pool, drain fragmented nodes, or allow smaller TP degrees"))
    stats = SolveStats(method=method, status=sol.status, wall_s=wall_s, objective=sol.objective,
                       bound=sol.bound, packing_status=pstat, packing_wall_s=float(pwall or 0.0),
                       packing_gap=pgap, num_variables=sol.num_variables,
                       lexicographic_stages=sol.stages, note=f"packing rounds={rounds}")
    params = {"headroom": h, "ttft_scale": cfg.ttft_scale, "tpot_scale": cfg.tpot_scale,
              "simulated_capacity": 1.0 if cfg.capacity_model == "simulated" else 0.0}
    pareto = (ParetoPoint(total_cost, min((m.served_fraction for m in models), default=1.0), total_w,
                          params, chosen=True),)
    return Plan(models=tuple(models), assignments=assignments, cost_per_hour=total_cost, power_w=total_w,
                infeasibilities=tuple(_dedup(infeas)), stranded_gpus=stranded, unplaced_pods=unplaced,
                pareto=pareto, stats=stats, params=params)


def _dedup(items: list[Infeasibility]) -> list[Infeasibility]:
    seen, out = set(), []
    for i in items:
        k = (i.model, i.constraint, i.detail)
        if k not in seen:
            seen.add(k)
            out.append(i)
    return out


def _explain_unserved(problem: Problem, mi: int, sol: IslandSolution, served: float) -> Infeasibility:
    """Name the binding constraint for a model's dropped load and what would fix it."""
    mp = problem.models[mi]
    req = mp.req
    h = problem.config.headroom
    reps = sum(sol.replicas.get(v.iid, 0) for v in mp.variants)
    # GPUs that would be needed for the unserved load on its cheapest variant per bucket
    need: dict[tuple[str, str, int], float] = {}
    for bi, b in enumerate(mp.buckets):
        u = sol.unserved.get((mi, bi), 0.0)
        if u <= 0 or bi in mp.dead:
            continue
        cands = [v for v in mp.variants if v.caps[bi].rate_rps > 0]
        if not cands:
            continue
        v = min(cands, key=lambda v: v.price / v.caps[bi].rate_rps)
        key = (v.pool, v.gpu, v.tp)
        need[key] = need.get(key, 0.0) + b.rate_rps * u / (v.caps[bi].rate_rps * (1 - h))
    extra = ", ".join(f"{math.ceil(r) * tp} x {gpu} GPUs in pool {pool} (TP{tp})"
                      for (pool, gpu, tp), r in sorted(need.items()))
    if req.max_replicas is not None and reps >= req.max_replicas:
        add = sum(math.ceil(r) for r in need.values())
        return Infeasibility(req.key, "max-replicas",
                             f"max_replicas={req.max_replicas} is reached; {1 - served:.1%} of the load is unserved",
                             f"raise max_replicas to >= {req.max_replicas + add}", served)
    if req.max_cost_per_hour is not None:
        cost = sum(sol.replicas.get(v.iid, 0) * v.price for v in mp.variants)
        if cost >= req.max_cost_per_hour * 0.9:
            return Infeasibility(req.key, "budget",
                                 f"the $/h cap {req.max_cost_per_hour:.2f} binds ({cost:.2f} used); "
                                 f"{1 - served:.1%} of the load is unserved",
                                 f"raise the ServingSLO budget or add {extra}", served)
    if req.max_power_w is not None:
        return Infeasibility(req.key, "budget", f"the power cap {req.max_power_w:.0f} W may bind; "
                             f"{1 - served:.1%} of the load is unserved", "raise the power cap", served)
    higher = [m.req.key for m in problem.models if m.req.priority > req.priority]
    detail = (f"not enough free GPUs in the allowed pools ({list(req.allowed_pools) or 'all'}); "
              f"{1 - served:.1%} of the load is unserved")
    if higher:
        detail += f"; higher-priority models were served first: {higher[:5]}"
    return Infeasibility(req.key, "pool-capacity", detail,
                         f"add {extra}" if extra else "add GPUs to an allowed pool", served)


# ------------------------------------------------------------------------------------------
# Hysteresis
# ------------------------------------------------------------------------------------------
def plan_still_valid(problem: Problem, previous: Plan) -> tuple[bool, str, float]:
    """Whether ``previous`` still serves the current load within SLO capacity and the pools'
    free GPUs, and its objective $/h at current prices (+ energy weight).

    Returns:
        ``(valid, reason, objective_per_hour)``."""
    h = problem.config.headroom
    keys = {mp.req.key for mp in problem.models}
    if keys != {m.model for m in previous.models}:
        return False, "the set of models changed", math.inf
    if not previous.feasible:
        return False, "the previous plan was not feasible", math.inf
    varmap = {v.iid: v for mp in problem.models for v in mp.all_variants}
    obj = 0.0
    gpus: dict[str, int] = {}
    for mp in problem.models:
        prev = previous.model(mp.req.key)
        assert prev is not None
        load: dict[str, float] = {}
        for isl in prev.islands:
            v = varmap.get(isl.id)
            if v is None:
                return False, f"island {isl.id} is no longer a feasible variant", math.inf
            obj += isl.replicas * (v.price + mp.req.energy_weight * v.busy_w / 1000.0)
            gpus[v.pool] = gpus.get(v.pool, 0) + isl.replicas * v.tp
            load[isl.id] = 0.0
        for bi, b in enumerate(mp.buckets):
            mid = (b.lo + b.hi) / 2
            route = next((r for r in prev.routing if r[0] <= mid < r[1]), None)
            if route is None:
                if b.fraction > 1e-3:
                    return False, f"{mp.req.key}: prompts {b.lo:.0f}-{b.hi:.0f} have no route", math.inf
                continue
            tot = sum(route[2].values())
            for iid, w in route[2].items():
                v = varmap[iid]
                cap = v.caps[bi].rate_rps * (1 - h)
                if cap <= 0:
                    return False, f"{iid} cannot serve prompts {b.lo:.0f}-{b.hi:.0f} within the SLO", math.inf
                load[iid] += b.rate_rps * (w / tot) / cap
        for isl in prev.islands:
            if load[isl.id] > isl.replicas + 1e-6:
                return False, (f"{isl.id} would need {load[isl.id]:.2f} replicas for the current load, "
                               f"has {isl.replicas}"), math.inf
    for pn, g in gpus.items():
        if g > problem.fleet.pool(pn).gpus_free:
            return False, f"pool {pn} no longer has {g} free GPUs", math.inf
    return True, "", obj


def _objective(problem: Problem, p: Plan) -> float:
    varmap = {v.iid: v for mp in problem.models for v in mp.all_variants}
    tot = 0.0
    for mp in problem.models:
        mplan = p.model(mp.req.key)
        for isl in (mplan.islands if mplan else ()):
            v = varmap[isl.id]
            tot += isl.replicas * (v.price + mp.req.energy_weight * v.busy_w / 1000.0)
    return tot


def apply_hysteresis(problem: Problem, new: Plan, previous: Plan, current: CurrentPlacement | None,
                     cfg: PlannerConfig) -> Plan | None:
    """Return ``previous`` (marked ``kept_previous``) when it is still valid and ``new`` is not
    better by ``cfg.hysteresis_margin``; None when the new plan should be adopted.

    A new plan that serves more load than the previous always wins; a previous plan whose pods
    no longer fit the nodes (re-packed against ``current``) is dropped."""
    ok, why, prev_obj = plan_still_valid(problem, previous)
    if not ok:
        return None
    if not new.feasible and previous.feasible:
        pass  # the previous still serves everything: keep it
    new_obj = _objective(problem, new)
    served_new = min((m.served_fraction for m in new.models), default=1.0)
    served_old = min((m.served_fraction for m in previous.models), default=1.0)
    if served_new > served_old + 1e-9:
        return None
    if new_obj < prev_obj * (1.0 - cfg.hysteresis_margin) - 1e-9:
        return None
    # re-pack the previous islands on the current nodes (nodes may have gone)
    items = [PackItem(i.id, i.pool, i.tp, i.replicas,
                      next(mp.req.priority for mp in problem.models if mp.req.key == i.model))
             for i in previous.islands]
    packed = pack(problem.fleet, items, cfg, current or CurrentPlacement.from_plan(previous))
    if packed.unplaced:
        return None
    from dataclasses import replace

    stats = replace(previous.stats, note=(f"kept by hysteresis: new objective {new_obj:.3f} $/h vs "
                                          f"{prev_obj:.3f} $/h (margin {cfg.hysteresis_margin:.0%})"))
    return replace(previous, assignments=tuple(sorted(packed.assignments, key=lambda a: (a.island, a.pod))),
                   stranded_gpus=packed.stranded_gpus, unplaced_pods=0, kept_previous=True, stats=stats)


__all__ = ["plan", "assemble", "apply_hysteresis", "plan_still_valid", "SHARED_CACHE", "MILLI"]
