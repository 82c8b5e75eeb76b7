"""Pod packing: GPU counts respected, TP groups on one node, priorities, minimum moves, spread."""

from __future__ import annotations

import random

from archipelago.decide.planner.packing import PackItem, pack
from archipelago.decide.planner.types import (
    CurrentPlacement,
    FleetSnapshot,
    NodeSnapshot,
    PlannerConfig,
    PoolSnapshot,
)

CFG = PlannerConfig(packing_time_limit_s=5.0)


def _fleet(free: list[int], alloc: int = 8, name: str = "p") -> FleetSnapshot:
    nodes = tuple(NodeSnapshot(f"{name}-{i}", alloc, f) for i, f in enumerate(free))
    return FleetSnapshot((PoolSnapshot(name, "big", 1.0, nodes),))


def _check_capacity(fleet: FleetSnapshot, res, items):
    free = {n.name: n.gpus_free for p in fleet.pools for n in p.nodes}
    used: dict[str, int] = {}
    tp = {it.island: it.tp for it in items}
    for a in res.assignments:
        assert a.gpus == tp[a.island]
        used[a.node] = used.get(a.node, 0) + a.gpus
    for node, u in used.items():
        assert u <= free[node], f"node {node} over its free GPUs: {u} > {free[node]}"
    names = [a.pod for a in res.assignments]
    assert len(names) == len(set(names))


def test_random_instances_never_overcommit_a_node():
    rng = random.Random(7)
    for _trial in range(6):
        free = [rng.choice([0, 1, 2, 3, 4, 6, 8]) for _ in range(rng.randint(2, 8))]
        fleet = _fleet(free)
        items = [PackItem(f"m/x/p/tp{t}-{j}", "p", t, rng.randint(0, 4), rng.randint(0, 2))
                 for j, t in enumerate(rng.choice([1, 2, 4, 8]) for _ in range(rng.randint(1, 5)))]
        res = pack(fleet, items, CFG)
        _check_capacity(fleet, res, items)
        assert res.unplaced == sum(it.replicas for it in items) - sum(res.placed.values())
        assert all(res.placed[it.island] <= it.replicas for it in items if it.replicas)


def test_everything_placed_when_it_fits_and_tp_groups_stay_on_one_node():
    fleet = _fleet([8, 8, 4])
    items = [PackItem("a", "p", 4, 3), PackItem("b", "p", 2, 2), PackItem("c", "p", 1, 4)]
    res = pack(fleet, items, CFG)
    assert res.unplaced == 0
    assert res.placed == {"a": 3, "b": 2, "c": 4}
    _check_capacity(fleet, res, items)


def test_fragmented_gpus_cannot_host_a_tp_group_and_are_reported_stranded():
    # 3 + 3 free GPUs: 6 in total, but no node has 4 for a TP-4 pod
    fleet = _fleet([3, 3])
    res = pack(fleet, [PackItem("big", "p", 4, 1)], CFG)
    assert res.unplaced == 1
    assert res.stranded_gpus == 6


def test_higher_priority_placed_first():
    fleet = _fleet([8])
    items = [PackItem("low", "p", 4, 2, priority=0), PackItem("high", "p", 4, 2, priority=5)]
    res = pack(fleet, items, CFG)
    assert res.placed["high"] == 2
    assert res.placed["low"] == 0
    assert res.unplaced == 2


def test_running_pods_do_not_move_when_they_can_stay():
    fleet = _fleet([8, 8, 8])
    cur = CurrentPlacement({"a": {"a-0": "p-2", "a-1": "p-1"}})
    res = pack(fleet, [PackItem("a", "p", 2, 3)], CFG, cur)
    by_pod = {a.pod: a.node for a in res.assignments}
    assert by_pod["a-0"] == "p-2" and by_pod["a-1"] == "p-1"
    assert res.moved == 0
    assert res.placed["a"] == 3


def test_pods_on_a_vanished_node_are_counted_as_moved():
    fleet = _fleet([8, 8])
    cur = CurrentPlacement({"a": {"a-0": "gone-node", "a-1": "p-0"}})
    res = pack(fleet, [PackItem("a", "p", 2, 2)], CFG, cur)
    assert res.moved == 1
    assert res.placed["a"] == 2


def test_replicas_spread_over_nodes():
    fleet = _fleet([8, 8, 8])
    res = pack(fleet, [PackItem("a", "p", 1, 3)], CFG)
    assert sorted(a.node for a in res.assignments) == ["p-0", "p-1", "p-2"]


def test_deterministic():
    fleet = _fleet([5, 7, 8, 3, 6])
    items = [PackItem("a", "p", 2, 4, 1), PackItem("b", "p", 1, 5), PackItem("c", "p", 4, 2)]
    r1 = pack(fleet, items, CFG)
    r2 = pack(fleet, items, CFG)
    assert r1.assignments == r2.assignments
