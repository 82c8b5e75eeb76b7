"""Scale benchmark of the inner loop and of pod packing.

1. Island sizing + workload mapping for ``--nodes`` nodes in ``--gpu-types`` pools (default
   1,000 nodes, 8 GPU types) and ``--models`` models (default 50, drawn round-robin from the
   model catalogue with three SLO classes and log-uniform rates), time-limited by
   ``PlannerConfig.inner_time_limit_s``; reports wall time, status and objective vs bound.
2. Pod packing of ``--pods`` pods (default 5,000) in islands of TP 1/2/4/8 onto the same nodes
   with a fraction already running; reports wall time, optimality gap, moves and stranded GPUs.

Usage: ``python bench/bench_scale.py [--nodes 1000] [--models 50] [--pods 5000]``.
"""

from __future__ import annotations

import argparse
import math
import random
import time

from rich.console import Console
from rich.table import Table

from archipelago.decide.catalog import load_gpu_catalog, load_model_catalog
from archipelago.decide.planner.capacity import CapacityCache
from archipelago.decide.planner.islands import build_problem, lp_lower_bound, solve_islands
from archipelago.decide.planner.packing import PackItem, pack
from archipelago.decide.planner.types import (
    CurrentPlacement,
    FleetSnapshot,
    ModelRequest,
    NodeSnapshot,
    PlannerConfig,
    PoolSnapshot,
    Workload,
)
from archipelago.decide.sim import SLOTarget

GPU_TYPES = ("H100-SXM", "H200", "A100-80GB", "A100-40GB", "L40S", "L4", "A10G", "H100-PCIe")
SLOS = (SLOTarget(ttft_s=1.0, tpot_s=0.05), SLOTarget(ttft_s=2.0, tpot_s=0.1), SLOTarget(ttft_s=5.0, tpot_s=0.2))


def build(nodes: int, types: int, models: int, seed: int):
    rng = random.Random(seed)
    gc, mc = load_gpu_catalog(), load_model_catalog()
    per = nodes // types
    pools = []
    for g in GPU_TYPES[:types]:
        ns = tuple(NodeSnapshot(f"{g.lower()}-{i}", 8, rng.choice([8, 8, 8, 8, 8, 6, 4])) for i in range(per))
        pools.append(PoolSnapshot(f"pool-{g.lower()}", g, gc.get(g).price_per_gpu_hour, ns))
    fleet = FleetSnapshot(tuple(pools))
    names = mc.names()
    reqs = []
    for i in range(models):
        m = mc.get(names[i % len(names)])
        rate = math.exp(rng.uniform(math.log(0.5), math.log(20)))
        wl = Workload(rate_rps=rate, input_mean=rng.choice([512, 1155, 2048]), input_p90=4000,
                      output_mean=rng.choice([28, 128, 211]))
        reqs.append(ModelRequest(f"ns{i % 7}/m{i}", m, SLOS[i % 3], wl, priority=i % 3))
    return fleet, reqs


def main() -> None:
    ap = argparse.ArgumentParser(description="inner-loop and packing scale benchmark")
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--gpu-types", type=int, default=8)
    ap.add_argument("--models", type=int, default=50)
    ap.add_argument("--pods", type=int, default=5000)
    ap.add_argument("--time-limit", type=float, default=8.0, help="CP-SAT wall limit, s")
    ap.add_argument("--pack-time-limit", type=float, default=2.0,
                    help="packing budget, s (model building of later pools counts against it; each pool's "
                         "CP-SAT gets its pods' share of what is left)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    con = Console(width=140)
    fleet, reqs = build(a.nodes, a.gpu_types, a.models, a.seed)
    cfg = PlannerConfig(inner_time_limit_s=a.time_limit, inner_deterministic_limit=a.time_limit,
                        packing_time_limit_s=a.pack_time_limit, packing_deterministic_limit=a.pack_time_limit,
                        seed=a.seed, max_variants_per_bucket=4)
    t = Table(title=f"Scale: {a.nodes} nodes, {a.gpu_types} GPU types, {a.models} models, {a.pods} pods")
    for c in ("step", "wall s", "status", "objective", "bound / gap", "notes"):
        t.add_column(c)
    cache = CapacityCache()
    t0 = time.perf_counter()
    prob = build_problem(fleet, reqs, cfg, cache=cache)
    t_build = time.perf_counter() - t0
    t1 = time.perf_counter()
    sol = solve_islands(prob)
    t_solve = time.perf_counter() - t1
    gap = (sol.objective - sol.bound) / max(1e-9, abs(sol.objective)) if sol.objective else math.nan
    nvar = sum(len(mp.variants) for mp in prob.models)
    t.add_row("inner: capacities (cold cache)", f"{t_build:.2f}", "-", "-", "-",
              f"{cache.misses} capacity evaluations, {nvar} candidate islands")
    t.add_row("inner: CP-SAT island sizing", f"{t_solve:.2f}", sol.status, f"{sol.objective:.2f}",
              f"{sol.bound:.2f} / {gap:.2%}",
              f"{sol.num_variables} variables, {len(sol.replicas)} islands; start: {sol.start} "
              f"(objective {sol.start_objective:.2f})" if sol.start_objective is not None else sol.start)
    t.add_row("inner: total", f"{t_build + t_solve:.2f}", "", "", "", "target <= 10 s")
    t3 = time.perf_counter()
    lb = lp_lower_bound(prob)
    cost = sum(r * sol.variants[i].price for i, r in sol.replicas.items())
    t.add_row("LP bound (all variants, $/h only; not in the inner loop)", f"{time.perf_counter() - t3:.2f}",
              lb.status, f"{lb.cost_per_hour:.2f}", f"plan $/h {cost:.2f} = {cost / lb.cost_per_hour:.2f}x",
              f"served {lb.served_fraction:.4f} (LP) vs "
              f"{1 - sum(b.rate_rps * sol.unserved.get((mi, bi), 0) for mi, mp in enumerate(prob.models) for bi, b in enumerate(mp.buckets)) / sum(b.rate_rps for mp in prob.models for b in mp.buckets):.4f} (plan)")
    # packing: islands of TP 1/2/4/8 summing to ~pods pods
    rng = random.Random(a.seed)
    items, cur, total = [], {}, 0
    k = 0
    while total < a.pods:
        p = rng.choice(fleet.pools)
        tp = rng.choice([1, 1, 1, 1, 2, 2, 4, 8])
        r = min(rng.randint(1, 12) if tp <= 2 else rng.randint(1, 3), a.pods - total)
        iid = f"ns/m{k}/{p.name}/tp{tp}"
        items.append(PackItem(iid, p.name, tp, r, priority=k % 3))
        total += r
        k += 1
    # a third of the islands already run on random nodes (some of them will have to move)
    for it in items[: len(items) // 3]:
        p = fleet.pool(it.pool)
        cur[it.island] = {f"{it.island}-{j}": rng.choice(p.nodes).name for j in range(it.replicas)}
    t2 = time.perf_counter()
    res = pack(fleet, items, cfg, CurrentPlacement(cur))
    t_pack = time.perf_counter() - t2
    demand = sum(i.replicas * i.tp for i in items)
    placed = sum(it.tp * res.placed.get(it.island, 0) for it in items)
    t.add_row("packing", f"{t_pack:.2f}", res.status, f"{placed} GPUs placed",
              f"placement gap {res.placement_gap:.2%} (vs upper bound); moves/spread gap {res.gap:.2%}",
              f"{total} pods / {demand} GPUs in {len(items)} islands; unplaced {res.unplaced}, "
              f"moved {res.moved}, stranded {res.stranded_gpus}; target <= 5 s")
    con.print(t)


if __name__ == "__main__":
    main()
