"""Baselines in the planner's framework (same capacity model, same Plan type, scored by the same
simulator) and the LP lower bound.

* :func:`best_homogeneous` -- the cheapest single GPU type (one pool for all models, TP free)
  whose plan serves all load.
* :func:`melange` -- Mélange-style (Griggs et al., "Mélange: Cost Efficient Large Language Model
  Serving by Exploiting GPU Heterogeneity", 2024): an ILP choosing GPU types per request-size
  bucket at a *fixed* TP per (model, GPU) -- the smallest that fits -- with no phase split.
* :func:`greedy_cost_per_capacity` -- the variant-autoscaler approach: per model, repeatedly add
  replicas of the variant with the lowest $/h per req/s of the model's whole length mix until
  the load fits (all of a model's traffic on that one island).
* :func:`lower_bound` -- the LP relaxation of island sizing (fractional replicas and shares).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from .capacity import CapacityCache
from .islands import IslandSolution, build_problem, lp_lower_bound
from .planner import SHARED_CACHE, assemble, plan
from .types import CurrentPlacement, FleetSnapshot, ModelRequest, Plan, PlannerConfig

BASELINES = ("homogeneous", "melange", "greedy")


def best_homogeneous(fleet: FleetSnapshot, requests: list[ModelRequest], config: PlannerConfig | None = None,
                     **kw: Any) -> Plan:
    """Cheapest feasible plan that uses one GPU type (pool) for every model. If no single pool
    serves everything, the plan serving the most load (then cheapest) is returned. With
    ``config.verify`` each pool's plan is repaired in the simulator and pools whose plan meets
    every SLO there are preferred."""
    cfg = config or PlannerConfig()
    t0 = time.perf_counter()
    best: tuple[Any, Plan] | None = None
    for p in fleet.pools:
        reqs = [_restrict(r, (p.name,)) for r in requests]
        if any(r.allowed_pools == ("__none__",) for r in reqs):
            continue
        pl = plan(fleet, reqs, None, cfg, method=f"homogeneous:{p.gpu}", **kw)
        served = min((m.served_fraction for m in pl.models), default=0.0)
        missed = any(i.constraint == "slo-attainment" for i in pl.infeasibilities)
        key = (missed, -round(served, 6), pl.cost_per_hour)
        if best is None or key < best[0]:
            best = (key, pl)
    if best is None:
        return plan(fleet, requests, None, cfg, method="homogeneous", **kw)
    import dataclasses

    out = best[1]
    return dataclasses.replace(out, stats=dataclasses.replace(out.stats, wall_s=time.perf_counter() - t0))


def _restrict(r: ModelRequest, pools: tuple[str, ...]) -> ModelRequest:
    import dataclasses

    allowed = tuple(p for p in pools if not r.allowed_pools or p in r.allowed_pools)
    return dataclasses.replace(r, allowed_pools=allowed or ("__none__",))


def smallest_fitting_tp(fleet: FleetSnapshot, requests: list[ModelRequest], config: PlannerConfig, *,
                        gpu_catalog: Any = None, perf_factory: Callable[..., Any] | None = None
                        ) -> dict[tuple[str, str], int]:
    """``{(model_key, pool): tp}`` -- the smallest allowed TP whose replica fits in memory."""
    prob = build_problem(fleet, requests, config.with_(capacity_model="analytic"), gpu_catalog=gpu_catalog,
                         perf_factory=perf_factory, cache=SHARED_CACHE)
    out: dict[tuple[str, str], int] = {}
    for mp in prob.models:
        for v in mp.all_variants:
            k = (mp.req.key, v.pool)
            out[k] = min(out.get(k, v.tp), v.tp)
    return out


def melange(fleet: FleetSnapshot, requests: list[ModelRequest], config: PlannerConfig | None = None,
            **kw: Any) -> Plan:
    """Mélange-style ILP: GPU type per bucket at fixed (smallest fitting) TP."""
    cfg = config or PlannerConfig()
    fixed = smallest_fitting_tp(fleet, requests, cfg, gpu_catalog=kw.get("gpu_catalog"),
                                perf_factory=kw.get("perf_factory"))
    return plan(fleet, requests, None, cfg, fixed_tp=fixed, method="melange", **kw)


def greedy_cost_per_capacity(fleet: FleetSnapshot, requests: list[ModelRequest],
                             config: PlannerConfig | None = None, *, gpu_catalog: Any = None,
                             perf_factory: Callable[..., Any] | None = None,
                             cache: CapacityCache | None = None, current: CurrentPlacement | None = None,
                             traces: dict[str, Any] | None = None, **_: Any) -> Plan:
    """Greedy: per model (highest priority first) pick the variant with the lowest $/h per unit
    of capacity for the model's whole mix (harmonic capacity ``1 / sum_b f_b / cap_b``) and add
    replicas until the load fits, moving to the next variant when its pool runs out of GPUs.

    Uses the same capacities as the planner (``config.capacity_model``) and, with
    ``config.verify``, the same verify-and-repair of per-model headroom (:mod:`.repair`)."""
    cfg = config or PlannerConfig()
    if cfg.verify:
        from .repair import verify_and_repair

        t0 = time.perf_counter()
        pl, _, _ = verify_and_repair(
            lambda c: _greedy_once(fleet, requests, c, gpu_catalog=gpu_catalog, perf_factory=perf_factory,
                                   cache=cache, current=current), requests, fleet, cfg, traces=traces,
            gpu_catalog=gpu_catalog, perf_factory=perf_factory)
        import dataclasses

        return dataclasses.replace(pl, stats=dataclasses.replace(pl.stats, wall_s=time.perf_counter() - t0))
    return _greedy_once(fleet, requests, cfg, gpu_catalog=gpu_catalog, perf_factory=perf_factory, cache=cache,
                        current=current)


def _greedy_once(fleet: FleetSnapshot, requests: list[ModelRequest], cfg: PlannerConfig, *, gpu_catalog: Any,
                 perf_factory: Callable[..., Any] | None, cache: CapacityCache | None,
                 current: CurrentPlacement | None) -> Plan:
    t0 = time.perf_counter()
    prob = build_problem(fleet, requests, cfg, gpu_catalog=gpu_catalog, perf_factory=perf_factory,
                         cache=cache if cache is not None else SHARED_CACHE)
    h = cfg.headroom
    free = {p.name: {t: p.gpus_free_in_blocks(t) for t in (1, 2, 4, 8, 16)} for p in fleet.pools}
    reps: dict[str, int] = {}
    shares: dict[tuple[int, int], dict[str, float]] = {}
    unserved: dict[tuple[int, int], float] = {}
    variants = {}
    order = sorted(range(len(prob.models)), key=lambda i: -prob.models[i].req.priority)
    for mi in order:
        mp = prob.models[mi]
        live = [bi for bi in range(len(mp.buckets)) if bi not in mp.dead]
        for bi in range(len(mp.buckets)):
            unserved[mi, bi] = 1.0
        if not live:
            continue
        tot = sum(mp.buckets[bi].rate_rps for bi in live)
        cands = []
        for v in mp.all_variants:
            if any(v.caps[bi].rate_rps <= 0 for bi in live):
                continue
            cap = 1.0 / sum((mp.buckets[bi].rate_rps / tot) / v.caps[bi].rate_rps for bi in live) * (1 - h)
            cands.append((v.price / cap, v.iid, v, cap))
        cands.sort(key=lambda c: (c[0], c[1]))
        remaining = tot
        for _, _, v, cap in cands:
            if remaining <= 1e-12:
                break
            need = math.ceil(remaining / cap - 1e-9)
            if mp.req.max_replicas is not None:
                need = min(need, mp.req.max_replicas - sum(reps.get(x.iid, 0) for x in mp.all_variants))
            can = free[v.pool].get(v.tp, 0) // v.tp
            k = max(0, min(need, can))
            if k == 0:
                continue
            for t in free[v.pool]:  # conservative: a replica may break a larger block
                free[v.pool][t] = max(0, free[v.pool][t] - k * v.tp)
            reps[v.iid] = reps.get(v.iid, 0) + k
            variants[v.iid] = v
            served = min(remaining, k * cap)
            remaining -= served
            frac = served / tot
            for bi in live:
                shares.setdefault((mi, bi), {})[v.iid] = shares.get((mi, bi), {}).get(v.iid, 0.0) + frac
        for bi in live:
            s = sum(shares.get((mi, bi), {}).values())
            unserved[mi, bi] = max(0.0, 1.0 - s)
    # make the chosen variants visible to assemble() even if pruning dropped them
    for mp in prob.models:
        have = {v.iid for v in mp.variants}
        mp.variants += [v for v in mp.all_variants if v.iid in reps and v.iid not in have]
    sol = IslandSolution(reps, shares, unserved, "GREEDY", None, None, time.perf_counter() - t0, 0, 0,
                         {v.iid: v for mp in prob.models for v in mp.all_variants})
    from .packing import pack
    from .planner import _pack_items

    packed = pack(fleet, _pack_items(prob, sol), cfg, current)
    return assemble(prob, sol, packed, method="greedy", wall_s=time.perf_counter() - t0)


def lower_bound(fleet: FleetSnapshot, requests: list[ModelRequest], config: PlannerConfig | None = None, *,
                gpu_catalog: Any = None, perf_factory: Callable[..., Any] | None = None,
                cache: CapacityCache | None = None) -> float:
    """LP-relaxation lower bound on $/h (see :func:`archipelago.decide.planner.islands.lp_lower_bound`)
    over *every* fitting variant with the config's capacities: with
    ``capacity_model="simulated"`` all variants are calibrated (not only the pruned candidates)
    and ``model_capacity_scale`` (e.g. the scales verify-and-repair settled on) applies. A bound
    relative to those capacities, not to the simulator. NaN if the LP fails."""
    cfg = config or PlannerConfig()
    prob = build_problem(fleet, requests, cfg, gpu_catalog=gpu_catalog, perf_factory=perf_factory,
                         cache=cache if cache is not None else SHARED_CACHE, calibrate_all=True)
    return lp_lower_bound(prob).cost_per_hour


def run_baseline(name: str, fleet: FleetSnapshot, requests: list[ModelRequest],
                 config: PlannerConfig | None = None, **kw: Any) -> Plan:
    """Run baseline ``name`` (one of :data:`BASELINES`, or ``cpsat`` for the planner).

    Raises:
        ValueError: unknown name (the message lists the valid ones)."""
    fns = {"homogeneous": best_homogeneous, "melange": melange, "greedy": greedy_cost_per_capacity,
           "cpsat": lambda f, r, c, **k: plan(f, r, None, c, **k)}
    if name not in fns:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(fns)}")
    return fns[name](fleet, requests, config, **kw)
