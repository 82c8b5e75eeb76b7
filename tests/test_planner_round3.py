"""Round 3 of the planner: island caps and per-model engine limits, the LP-rounding and per-model
starting points of CP-SAT island sizing, complete packing hints, and the per-model structure search
(ask/tell BO over knobs verify-and-repair cannot search). Uses the fakes of test_planner_fakes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from archipelago.decide.planner.islands import (
    MILLI,
    _check_start,
    _lp_rounding,
    _per_model_start,
    build_problem,
    resolve_limits,
    solve_islands,
)
from archipelago.decide.planner.outer import (
    config_from_params,
    grid_key,
    island_cap,
    run_structure_search,
    structure_space,
)
from archipelago.decide.planner.packing import PackItem, pack
from archipelago.decide.planner.planner import plan
from archipelago.decide.planner.types import (
    CurrentPlacement,
    ModelRequest,
    PlannerConfig,
    PlannerInputError,
    Workload,
)
from archipelago.decide.sim import SLOTarget
from test_planner_fakes import GPUS, FakeCatalog, FLimits, FModel, fake_perf_factory, fleet, pool

CAT = FakeCatalog(GPUS)
SLO = SLOTarget(ttft_s=1.0, tpot_s=0.05)
CFG = PlannerConfig(inner_time_limit_s=10, packing_time_limit_s=5)


def _req(key="ns/a", weights=14, rate=20.0, **kw):
    wl = kw.pop("workload", None) or Workload(rate_rps=rate, input_mean=1000, input_p90=3000, output_mean=200)
    return ModelRequest(key, FModel(key.split("/")[1], weights), SLO, wl, limits=kw.pop("limits", FLimits()), **kw)


def _plan(fl, reqs, cfg=CFG, **kw):
    return plan(fl, reqs, config=cfg, gpu_catalog=CAT, perf_factory=fake_perf_factory, **kw)


# ------------------------------------------------------------------ config knobs
def test_island_cap_limits_islands_and_still_serves_the_load():
    fl = fleet(pool("big", "big", 4), pool("mid", "mid", 4), pool("small", "small", 4))
    r = _req(rate=40.0)
    free = _plan(fl, [r])
    assert free.feasible
    capped = _plan(fl, [r], CFG.with_(model_max_islands={"ns/a": 1}))
    assert capped.feasible and len(capped.model("ns/a").islands) == 1
    assert capped.model("ns/a").served_fraction == pytest.approx(1.0)
    # a cap can only cost more (or the same) under the same capacity model
    assert capped.cost_per_hour >= free.cost_per_hour - 1e-9


def test_per_model_engine_limits_override_the_global_ones():
    r1, r2 = _req("ns/a"), _req("ns/b")
    cfg = PlannerConfig(max_num_batched_tokens=4096, model_max_num_batched_tokens={"ns/a": 1024},
                        model_max_num_seqs={"ns/b": 32})
    assert resolve_limits(r1, cfg).max_num_batched_tokens == 1024
    assert resolve_limits(r2, cfg).max_num_batched_tokens == 4096
    assert resolve_limits(r2, cfg).max_num_seqs == 32 and resolve_limits(r1, cfg).max_num_seqs == 256
    with pytest.raises(PlannerInputError, match="model_max_islands"):
        PlannerConfig(model_max_islands={"ns/a": 0})


def test_config_from_params_maps_structure_parameters():
    base = PlannerConfig(model_max_islands={"ns/b": 2})
    cfg = config_from_params(base, {"log2_mbt:ns/a": 10.4, "log2_mns:ns/a": 6.6, "islands:ns/a": 1.7,
                                    "islands:ns/b": 3.2, "scale:ns/a": 0.5})
    assert cfg.model_max_num_batched_tokens == {"ns/a": 1024}
    assert cfg.model_max_num_seqs == {"ns/a": 128}
    assert cfg.model_max_islands == {"ns/a": 1}  # ns/b uncapped: its base cap is removed
    assert cfg.model_capacity_scale == {"ns/a": 0.5}
    assert island_cap(1.0) == 1 and island_cap(2.99) == 2 and island_cap(3.0) is None
    assert grid_key({"log2_mbt:x": 10.6, "islands:x": 1.2}) == grid_key({"log2_mbt:x": 11.4, "islands:x": 1.9})
    assert grid_key({"log2_mbt:x": 10.4}) != grid_key({"log2_mbt:x": 10.6})
    sp = structure_space([_req("ns/a"), _req("ns/b")], mns=None)
    assert set(sp) == {"log2_mbt:ns/a", "islands:ns/a", "log2_mbt:ns/b", "islands:ns/b"}


# ------------------------------------------------------------------ CP-SAT starting points
def _many_models_problem(n=12, cfg=CFG):
    fl = fleet(pool("big", "big", 6), pool("mid", "mid", 6), pool("small", "small", 6))
    reqs = [_req(f"ns/m{i}", weights=10 + (i % 3) * 4, rate=3.0 + 2.5 * i, priority=i % 2) for i in range(n)]
    prob = build_problem(fl, reqs, cfg, gpu_catalog=CAT, perf_factory=fake_perf_factory)
    return fl, reqs, prob


def _x_keys(prob):
    return {(mi, bi, v.iid): None for mi, mp in enumerate(prob.models) for bi, b in enumerate(mp.buckets)
            if bi not in mp.dead for v in mp.variants if v.caps[bi].rate_rps > 0}


def test_starting_points_satisfy_every_constraint_of_the_model():
    fl, reqs, prob = _many_models_problem()
    S, h = CFG.share_steps, CFG.headroom
    x = _x_keys(prob)
    n_ub = {v.iid: fl.pool(v.pool).gpus_free_in_blocks(v.tp) // v.tp for mp in prob.models for v in mp.variants}
    uw = {(mi, bi): 10**6 for mi, mp in enumerate(prob.models) for bi in range(len(mp.buckets))}
    lp = _lp_rounding(prob, x, S, h, {})
    assert lp is not None
    # LP rounding rounds replicas up and may overshoot a pool; the checker must say so exactly
    over = any(sum(r * int(iid.rsplit("tp", 1)[1]) for iid, r in lp[0].items() if f"/{p.name}/" in iid)
               > p.gpus_free for p in fl.pools)
    assert (_check_start(prob, lp, n_ub, x, S, h, {}, uw) is None) == over
    starts = [_per_model_start(prob, x, n_ub, S, h, {}, uw)] + ([] if over else [lp])
    for start in starts:
        assert start is not None
        reps, xs, uns = start
        assert _check_start(prob, start, n_ub, x, S, h, {}, uw) is not None
        # every bucket fully assigned, capacity rows hold (checked here independently)
        for (mi, bi), q in uns.items():
            tot = sum(v for (a, b, _), v in xs.items() if (a, b) == (mi, bi))
            assert tot + q == S
        for iid, r in reps.items():
            v = next(v for mp in prob.models for v in mp.variants if v.iid == iid)
            load = sum(math.ceil(prob.models[mi].buckets[bi].rate_rps / (v.caps[bi].rate_rps * (1 - h)) * MILLI) * q
                       for (mi, bi, i2), q in xs.items() if i2 == iid)
            assert load <= MILLI * S * r
        # all load served: the fleet is ample
        assert all(q == 0 for (mi, bi), q in uns.items() if bi not in prob.models[mi].dead)


def test_check_start_rejects_a_point_over_the_pool():
    fl, reqs, prob = _many_models_problem(n=3)
    S, h = CFG.share_steps, CFG.headroom
    x = _x_keys(prob)
    n_ub = {v.iid: 10**6 for mp in prob.models for v in mp.variants}
    uw = {(mi, bi): 1 for mi, mp in enumerate(prob.models) for bi in range(len(mp.buckets))}
    reps, xs, uns = _lp_rounding(prob, x, S, h, {})
    iid = next(iter(reps))
    pool_gpus = fl.pool(prob.models[0].variants[0].pool).gpus_free
    bad = ({**reps, iid: reps[iid] + pool_gpus * 10}, xs, uns)
    assert _check_start(prob, bad, n_ub, x, S, h, {}, uw) is None


def test_better_start_gives_a_cheaper_plan_than_greedy_alone_at_equal_effort():
    fl, reqs, prob = _many_models_problem(n=14)
    cfg = CFG.with_(inner_time_limit_s=2.0, inner_deterministic_limit=0.2)
    g = solve_islands(build_problem(fl, reqs, cfg.with_(lp_hint=False), gpu_catalog=CAT,
                                    perf_factory=fake_perf_factory))
    s = solve_islands(build_problem(fl, reqs, cfg, gpu_catalog=CAT, perf_factory=fake_perf_factory))
    assert g.start == "greedy" and s.start in ("greedy", "lp-rounding", "per-model")
    assert s.start_objective is not None and s.objective <= s.start_objective + 1e-6
    assert s.objective is not None  # the hinted start is a solution even when the budget is tiny
    assert g.objective is None or s.objective <= g.objective + 1e-6
    assert s.bound <= s.objective + 1e-6


# ------------------------------------------------------------------ packing
def test_packing_returns_a_cp_sat_solution_with_a_complete_hint_and_respects_nodes():
    fl = fleet(pool("p", "mid", 40, free=[8, 6, 4, 8, 2] * 8))
    items = [PackItem(f"ns/m{i}/p/tp{t}", "p", t, r, priority=i % 2)
             for i, (t, r) in enumerate([(1, 9), (2, 7), (4, 6), (8, 5), (1, 12), (2, 10)] * 3)]
    cur = CurrentPlacement({items[0].island: {"a-0": "p-n1", "a-1": "p-n1", "a-2": "p-n7"},
                            items[3].island: {"b-0": "p-n3"}})
    res = pack(fl, items, PlannerConfig(packing_time_limit_s=3.0, packing_deterministic_limit=3.0), cur)
    assert res.status in ("OPTIMAL", "FEASIBLE")
    free = {n.name: n.gpus_free for n in fl.pools[0].nodes}
    used: dict[str, int] = {}
    for a in res.assignments:
        used[a.node] = used.get(a.node, 0) + a.gpus
    assert all(u <= free[k] for k, u in used.items())
    assert 0.0 <= res.gap <= 1.0


# ------------------------------------------------------------------ structure search
def _separable_eval(calls):
    """A fake inner loop + simulator with a known optimum per model: model a is cheapest at
    log2_mbt 12 (4096) with one island, model b at log2_mbt 10; attainment fails below 10 for a."""

    def cost(k, p):
        mbt = round(p[f"log2_mbt:{k}"])
        isl = island_cap(p[f"islands:{k}"])
        best = 12 if k == "ns/a" else 10
        return 10.0 + 2.0 * abs(mbt - best) + (0.0 if (isl == 1) == (k == "ns/a") else 1.5)

    def ev(params):
        calls.append(dict(params))
        per = {}
        models = []
        for k in ("ns/a", "ns/b"):
            c = cost(k, params)
            att = 0.95 if (k == "ns/a" and round(params[f"log2_mbt:{k}"]) < 10) else 0.995
            per[k] = {"attainment": att, "slo_met": att >= 0.99, "energy_j": 100.0 * c, "horizon_s": 1.0}
            models.append(SimpleNamespace(model=k, cost_per_hour=c, power_w=100.0 * c, served_fraction=1.0))
        pl = SimpleNamespace(cost_per_hour=sum(m.cost_per_hour for m in models), params={},
                             model=lambda key, ms=models: next(m for m in ms if m.model == key))
        sc = SimpleNamespace(cost_per_hour=pl.cost_per_hour, attainment=min(v["attainment"] for v in per.values()),
                             power_w=sum(100.0 * m.cost_per_hour for m in models), per_model=per, simulations=3)
        return pl, sc

    return ev


@pytest.mark.slow
def test_structure_search_improves_on_its_initial_point_and_is_seeded_and_warm_startable():
    keys = ["ns/a", "ns/b"]
    space = {f"{n}:{k}": b for k in keys for n, b in (("log2_mbt", (9.0, 13.0)), ("islands", (1.0, 3.999)))}
    init = {f"log2_mbt:{k}": 11.0 for k in keys} | {f"islands:{k}": 3.5 for k in keys}
    calls1: list = []
    r1 = run_structure_search(_separable_eval(calls1), keys, space=space, max_evals=7, seed=1, n_init=2, initial=[init])
    calls2: list = []
    r2 = run_structure_search(_separable_eval(calls2), keys, space=space, max_evals=7, seed=1, n_init=2, initial=[init])
    assert calls1 == calls2 and r1.evaluations == 7 and r2.chosen.params == r1.chosen.params
    first = r1.observations[0]
    assert r1.chosen.attainment >= 0.99
    assert r1.chosen.cost_per_hour < first.cost_per_hour  # it found something cheaper than the start
    # no discrete configuration evaluated twice
    assert len({grid_key(c) for c in calls1}) == len(calls1)
    assert all("per_model" in o.extra and o.extra["simulations"] == 3 for o in r1.observations)
    # warm start: earlier observations are reused, not re-evaluated
    calls3: list = []
    r3 = run_structure_search(_separable_eval(calls3), keys, space=space, max_evals=2, seed=1, n_init=2,
                              observations=r1.observations)
    assert len(calls3) == 2 and len(r3.observations) == 9
    assert r3.chosen.cost_per_hour <= r1.chosen.cost_per_hour + 1e-9
