"""Inner loop, step 2: pod packing with OR-Tools CP-SAT.

Each island asks for ``replicas`` pods of ``tp`` GPUs in one pool; a pod's GPUs must be on one
node. Pools are independent, so each pool is one model:

* variables ``z[i, k]`` = pods of island ``i`` on node ``k`` (replicas are interchangeable,
  which keeps 5,000 pods tractable), ``moved[i, k] >= running[i, k] - z[i, k]``,
  ``excess[i, k] >= z[i, k] - ceil(R_i / nodes)``;
* constraints: ``sum_i tp_i z[i, k] <= free GPUs of k``; ``sum_k z[i, k] <= R_i``;
* objectives, lexicographically: (1) placed GPUs of the highest priority, then the next, ...
  (one stage per priority level, each fixing the previous optimum; a single stage when
  everything fits); (2) fewest moved running pods, then replicas spread over nodes.
* warm start: hints ``z = running``; fixed seed; deterministic-time limits.

Stranded GPUs: free GPUs left on nodes whose free count is too small for one more pod of the
largest TP island of that pool (after packing).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from ortools.sat.python import cp_model

from .types import CurrentPlacement, FleetSnapshot, PlannerConfig, PodAssignment


@dataclass(frozen=True)
class PackItem:
    """An island to place: ``replicas`` pods of ``tp`` GPUs in pool ``pool``; higher
    ``priority`` is placed first."""

    island: str
    pool: str
    tp: int
    replicas: int
    priority: int = 0


@dataclass
class PackResult:
    """Packing outcome: ``assignments``; ``placed[island]`` pods placed; ``unplaced`` pods not
    placed; ``moved`` running pods that move or stop; ``stranded_gpus``; ``status`` (worst
    CP-SAT status over pools); ``gap`` (max relative gap of the last stage over pools, 0 =
    proven optimal, 1 = no bound); ``placement_gap`` (max over pools of the relative gap of the
    placed GPUs to :func:`placement_upper_bound` or CP-SAT's bound: the primary objective);
    ``wall_s``; ``per_pool`` stats."""

    assignments: list[PodAssignment]
    placed: dict[str, int]
    unplaced: int
    moved: int
    stranded_gpus: int
    status: str
    gap: float
    wall_s: float
    per_pool: dict[str, dict] = field(default_factory=dict)
    placement_gap: float = 0.0


def pack(fleet: FleetSnapshot, items: list[PackItem], config: PlannerConfig,
         current: CurrentPlacement | None = None) -> PackResult:
    """Place the pods of ``items`` on the fleet's nodes; see the module docstring.

    Raises:
        ValueError: an item names an unknown pool or has tp < 1 / replicas < 0.
    """
    t0 = time.perf_counter()
    current = current or CurrentPlacement()
    by_pool: dict[str, list[PackItem]] = {}
    for it in items:
        if it.tp < 1 or it.replicas < 0:
            raise ValueError(f"pack item {it.island!r}: tp must be >= 1 and replicas >= 0")
        fleet.pool(it.pool)
        if it.replicas > 0:
            by_pool.setdefault(it.pool, []).append(it)
    res = PackResult([], {}, 0, 0, 0, "OPTIMAL", 0.0, 0.0)
    rank = {"OPTIMAL": 0, "FEASIBLE": 1, "UNKNOWN": 2, "MODEL_INVALID": 3, "INFEASIBLE": 3}
    # time shares: each pool gets the remaining budget in proportion to its pods (model
    # building counts against the budget, so later pools get what earlier ones left)
    left_pods = sum(it.replicas for its in by_pool.values() for it in its)
    for pn in sorted(by_pool):
        pods = sum(it.replicas for it in by_pool[pn])
        frac = pods / max(1, left_pods)
        left_pods -= pods
        wall_left = max(0.05, config.packing_time_limit_s - (time.perf_counter() - t0))
        det_left = max(0.05, config.packing_deterministic_limit * frac * len(by_pool) / max(1, len(by_pool)))
        pool_cfg = config.with_(packing_time_limit_s=max(0.15, wall_left * frac),
                                packing_deterministic_limit=min(det_left, config.packing_deterministic_limit))
        r = _pack_pool(fleet, pn, sorted(by_pool[pn], key=lambda i: i.island), pool_cfg, current)
        res.assignments += r.assignments
        res.placed.update(r.placed)
        res.unplaced += r.unplaced
        res.moved += r.moved
        res.stranded_gpus += r.stranded_gpus
        res.gap = max(res.gap, r.gap)
        res.placement_gap = max(res.placement_gap, r.placement_gap)
        if rank.get(r.status, 2) > rank.get(res.status, 2):
            res.status = r.status
        res.per_pool[pn] = {"status": r.status, "gap": r.gap, "wall_s": r.wall_s, "pods": sum(
            i.replicas for i in by_pool[pn]), "unplaced": r.unplaced, "moved": r.moved,
            "stranded_gpus": r.stranded_gpus, "placement_gap": r.placement_gap}
    res.wall_s = time.perf_counter() - t0
    return res


def _solver(config: PlannerConfig, share: float) -> cp_model.CpSolver:
    s = cp_model.CpSolver()
    p = s.parameters
    p.num_workers = config.num_workers
    p.random_seed = config.seed
    p.max_time_in_seconds = max(0.05, config.packing_time_limit_s * share)
    p.max_deterministic_time = max(0.05, config.packing_deterministic_limit * share)
    # thousands of pods: presolve and symmetry detection alone would eat the time share before
    # the (complete, feasible) greedy hint is even looked at; without them CP-SAT takes the hint
    # as its first solution at once and spends the rest improving it and proving a bound
    p.cp_model_presolve = False
    p.symmetry_level = 0
    if config.num_workers > 1:
        p.interleave_search = True
    return s


def _pack_pool(fleet: FleetSnapshot, pn: str, items: list[PackItem], config: PlannerConfig,
               current: CurrentPlacement) -> PackResult:
    r = _pack_pool_inner(fleet, pn, items, config, current)
    free = [n.gpus_free for n in fleet.pool(pn).nodes if n.schedulable and n.gpus_free > 0]
    ub = placement_upper_bound(items, free)
    placed = sum(it.tp * r.placed.get(it.island, 0) for it in items)
    r.placement_gap = (ub - placed) / ub if ub > 0 else 0.0
    return r


def _pack_pool_inner(fleet: FleetSnapshot, pn: str, items: list[PackItem], config: PlannerConfig,
                     current: CurrentPlacement) -> PackResult:
    t0 = time.perf_counter()
    pool = fleet.pool(pn)
    nodes = [n for n in pool.nodes if n.schedulable and n.gpus_free > 0]
    m = cp_model.CpModel()
    z: dict[tuple[int, int], cp_model.IntVar] = {}
    zub: dict[tuple[int, int], int] = {}
    cur: dict[tuple[int, int], int] = {}
    node_idx = {n.name: k for k, n in enumerate(nodes)}
    placed_expr = {}
    for i, it in enumerate(items):
        for node, c in current.per_node(it.island).items():
            if node in node_idx:
                cur[i, node_idx[node]] = c
        terms = []
        for k, n in enumerate(nodes):
            ub = min(it.replicas, n.gpus_free // it.tp)
            if ub <= 0:
                continue
            z[i, k] = m.NewIntVar(0, ub, f"z{i},{k}")
            zub[i, k] = ub
            terms.append(z[i, k])
        placed_expr[i] = sum(terms) if terms else 0
        if terms:
            m.Add(sum(terms) <= it.replicas)
    per_node: dict[int, list] = {}
    elig: dict[int, int] = {}
    for (i, k), var in z.items():
        per_node.setdefault(k, []).append(items[i].tp * var)
        elig[i] = elig.get(i, 0) + 1
    for k, ts in per_node.items():
        m.Add(sum(ts) <= nodes[k].gpus_free)
    greedy = _greedy_fill(items, nodes, z, cur)
    moved_terms, spread_terms = [], []
    aux: list[tuple[cp_model.IntVar, tuple[int, int], int, int]] = []  # (var, key, sign, offset)
    for (i, k), c in cur.items():
        if (i, k) in z:
            mv = m.NewIntVar(0, c, f"mv{i},{k}")
            m.Add(mv >= c - z[i, k])
            moved_terms.append(mv)
            aux.append((mv, (i, k), -1, c))
    for (i, k), var in z.items():
        it = items[i]
        q = max(1, math.ceil(it.replicas / max(1, elig.get(i, 1))))
        if zub[i, k] > q:
            ex = m.NewIntVar(0, it.replicas, f"ex{i},{k}")
            m.Add(ex >= var - q)
            spread_terms.append(ex)
            aux.append((ex, (i, k), 1, -q))

    def full_hint(counts: dict[tuple[int, int], int]) -> None:
        # a *complete* hint (placements and the moved/excess auxiliaries): CP-SAT then takes it
        # as its first solution at once instead of searching for one in its short time share
        m.ClearHints()
        for key, var in z.items():
            m.AddHint(var, counts.get(key, 0))
        for var, key, sign, off in aux:
            m.AddHint(var, max(0, sign * counts.get(key, 0) + off))

    full_hint(greedy)
    # running pods on nodes that are gone, cordoned or cannot host them any more must move
    const_moved = sum(c for (i, k), c in cur.items() if (i, k) not in z)
    const_moved += sum(c for it in items for node, c in current.per_node(it.island).items()
                       if node not in node_idx)
    # (1) placement, lexicographic by priority
    total_demand = sum(it.replicas * it.tp for it in items)
    gap = 0.0
    levels = sorted({it.priority for it in items}, reverse=True)
    all_placed = sum(it.tp * placed_expr[i] for i, it in enumerate(items))
    ub = placement_upper_bound(items, [n.gpus_free for n in nodes])
    g_placed = sum(items[i].tp * c for (i, _k), c in greedy.items())
    if g_placed >= ub:
        # the greedy placement attains the upper bound: stage (1) is optimal without a solve
        got = g_placed
        solver = None
    else:
        solver = _solver(config, 0.5)
        m.Maximize(all_placed)
        st = solver.Solve(m)
        if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            if st == cp_model.INFEASIBLE:
                return _empty(items, pn, solver.StatusName(st), time.perf_counter() - t0)
            # out of time before a first solution: the greedy best-fit placement, with the gap
            # of its placed GPUs to the upper bound (bound-based, relative)
            return _decode(items, nodes, greedy, cur, z, current, const_moved, "GREEDY",
                           (ub - g_placed) / max(1, ub), t0)
        got = int(round(solver.ObjectiveValue()))
    # ``best`` is the last placement some solve (or the greedy fill) produced; a later stage that
    # finds no solution in its time share leaves it in force
    best = greedy if solver is None else {key: int(solver.Value(v)) for key, v in z.items()}
    best_status = "OPTIMAL" if solver is None else solver.StatusName(st)
    if solver is not None and got < total_demand and len(levels) > 1:
        for lv in levels:
            expr = sum(it.tp * placed_expr[i] for i, it in enumerate(items) if it.priority == lv)
            full_hint(best)
            m.Maximize(expr)
            s_lv = _solver(config, 0.5 / len(levels))
            st_lv = s_lv.Solve(m)
            if st_lv not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
                # fix this level at what the best placement so far achieves and go on
                m.Add(expr >= sum(items[i].tp * c for (i, _k), c in best.items() if items[i].priority == lv))
                best_status = "FEASIBLE"
                continue
            best = {key: int(s_lv.Value(v)) for key, v in z.items()}
            m.Add(expr >= int(round(s_lv.ObjectiveValue())))
    else:
        m.Add(all_placed >= got)
    # (2) moves, then spread
    if moved_terms or spread_terms:
        full_hint(best)
        obj = 1000 * sum(moved_terms) + sum(spread_terms)
        m.Minimize(obj)
        solver2 = _solver(config, 1.0 if solver is None else 0.5)
        st2 = solver2.Solve(m)
        if st2 in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            ov, bd = solver2.ObjectiveValue(), solver2.BestObjectiveBound()
            gap = abs(ov - bd) / max(1.0, abs(ov))
            counts = {key: int(solver2.Value(v)) for key, v in z.items()}
            status = "OPTIMAL" if (solver2.StatusName(st2) == "OPTIMAL" and best_status == "OPTIMAL") else "FEASIBLE"
            return _decode(items, nodes, counts, cur, z, current, const_moved, status, gap, t0)
        # no CP-SAT solution in time: keep ``best``; gap of its moves+spread objective to
        # CP-SAT's bound (0 when none was proven)
        b_obj = 1000 * sum(max(0, c - best.get(key, 0)) for key, c in cur.items() if key in z)
        b_obj += sum(max(0, best.get(key, 0) - max(1, math.ceil(items[key[0]].replicas
                                                                / max(1, elig.get(key[0], 1)))))
                     for key in z)
        bd = solver2.BestObjectiveBound()
        bd = max(0.0, bd) if math.isfinite(bd) else 0.0
        return _decode(items, nodes, best, cur, z, current, const_moved,
                       "GREEDY" if solver is None else best_status, (b_obj - min(bd, b_obj)) / max(1.0, b_obj), t0)
    if solver is None:
        return _decode(items, nodes, best, cur, z, current, const_moved, "OPTIMAL", 0.0, t0)
    ov, bd = solver.ObjectiveValue(), solver.BestObjectiveBound()
    gap = abs(ov - bd) / max(1.0, abs(ov))
    return _decode(items, nodes, best, cur, z, current, const_moved, best_status, gap, t0)


def placement_upper_bound(items: list[PackItem], free: list[int]) -> int:
    """Upper bound on the GPUs a pool can place (GPUs): the demand ``sum_i R_i tp_i``, the free
    GPUs, and for every TP level ``t`` the GPUs usable in whole ``t``-blocks
    (``sum_k floor(free_k / t) t``) for islands of TP >= ``t`` plus the demand of smaller ones
    (valid for power-of-two TP degrees: a pod of TP >= t uses whole t-blocks)."""
    demand = sum(it.replicas * it.tp for it in items)
    ub = min(demand, sum(free))
    for t in sorted({it.tp for it in items}):
        big = sum(it.replicas * it.tp for it in items if it.tp >= t)
        small = demand - big
        ub = min(ub, min(big, sum((f // t) * t for f in free)) + small)
    return int(ub)


def _decode(items: list[PackItem], nodes: list, counts: dict, cur: dict, z: dict, current: CurrentPlacement,
            const_moved: int, status: str, gap: float, t0: float) -> PackResult:
    """Turn per-(island, node) pod counts into named pod assignments and statistics."""
    assignments: list[PodAssignment] = []
    placed: dict[str, int] = {}
    moved = const_moved
    used = [0] * len(nodes)
    for i, it in enumerate(items):
        running = current.islands.get(it.island, {})
        by_node: dict[str, list[str]] = {}
        for pod, node in sorted(running.items()):
            by_node.setdefault(node, []).append(pod)
        names_taken = set(running)
        new_idx = 0
        cnt_total = 0
        for k, n in enumerate(nodes):
            c = counts.get((i, k), 0)
            if not c:
                continue
            used[k] += c * it.tp
            keep = by_node.get(n.name, [])[:c]
            for pod in keep:
                assignments.append(PodAssignment(it.island, pod, n.name, it.tp))
            for _ in range(c - len(keep)):
                while f"{it.island}#{new_idx}" in names_taken:
                    new_idx += 1
                pod = f"{it.island}#{new_idx}"
                names_taken.add(pod)
                assignments.append(PodAssignment(it.island, pod, n.name, it.tp))
            cnt_total += c
        for (ii, k), c in cur.items():
            if ii == i and (i, k) in z:
                moved += max(0, c - counts.get((i, k), 0))
        placed[it.island] = cnt_total
    unplaced = sum(it.replicas - placed[it.island] for it in items)
    tmax = max(it.tp for it in items)
    stranded = sum(n.gpus_free - used[k] for k, n in enumerate(nodes)
                   if 0 < n.gpus_free - used[k] < tmax)
    return PackResult(assignments, placed, unplaced, moved, stranded, status, gap,
                      time.perf_counter() - t0)


def _greedy_fill(items: list[PackItem], nodes: list, z: dict, cur: dict) -> dict[tuple[int, int], int]:
    """Feasible-by-construction hint: keep running pods where they still fit, then place the
    rest first-fit-decreasing by (priority, TP) on the node with the fewest free GPUs that fits
    (best fit)."""
    free = [n.gpus_free for n in nodes]
    out: dict[tuple[int, int], int] = {key: 0 for key in z}
    left = {i: it.replicas for i, it in enumerate(items)}
    for (i, k), c in sorted(cur.items()):
        if (i, k) not in z:
            continue
        c = min(c, left[i], free[k] // items[i].tp)
        out[i, k] += c
        free[k] -= c * items[i].tp
        left[i] -= c
    elig: dict[int, list[int]] = {}
    for (i, k) in z:
        elig.setdefault(i, []).append(k)
    for i in sorted(left, key=lambda i: (-items[i].priority, -items[i].tp, items[i].island)):
        tp = items[i].tp
        while left[i] > 0:
            ks = [k for k in elig.get(i, []) if free[k] >= tp]
            if not ks:
                break
            k = min(ks, key=lambda k: (free[k], k))
            out[i, k] += 1
            free[k] -= tp
            left[i] -= 1
    return out


def _empty(items: list[PackItem], pn: str, status: str, wall: float) -> PackResult:
    return PackResult([], {it.island: 0 for it in items}, sum(it.replicas for it in items), 0, 0,
                      status, math.inf, wall)
