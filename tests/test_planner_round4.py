"""Round 4 of the planner: per-model evaluation in the structure search (each model's candidate
judged with the other models held fixed, then the per-model choices combined and checked jointly).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from archipelago.decide.planner.outer import (
    fleet_without,
    gpus_by_pool,
    grid_key,
    island_cap,
    make_model_evaluator,
    pool_slack,
    run_per_model_search,
)
from archipelago.decide.planner.types import PlannerConfig, SolveStats
from test_planner_fakes import fleet, pool

KEYS = ["ns/a", "ns/b"]
SPACE = {f"{n}:{k}": b for k in KEYS for n, b in (("log2_mbt", (9.0, 13.0)), ("islands", (1.0, 3.999)))}
START = {f"log2_mbt:{k}": 11.0 for k in KEYS} | {f"islands:{k}": 3.5 for k in KEYS}


def _model_cost(k, p):
    """Known per-model optimum: a is cheapest at log2_mbt 12 with one island, b at 10 uncapped;
    a fails its SLO below log2_mbt 10."""
    mbt = round(p[f"log2_mbt:{k}"])
    isl = island_cap(p[f"islands:{k}"])
    best = 12 if k == "ns/a" else 10
    cost = 10.0 + 2.0 * abs(mbt - best) + (0.0 if (isl == 1) == (k == "ns/a") else 1.5)
    att = 0.95 if (k == "ns/a" and mbt < 10) else 0.995
    return cost, att


def _plan_of(models, scales):
    return SimpleNamespace(cost_per_hour=sum(m.cost_per_hour for m in models), models=models,
                           params={f"scale:{k}": v for k, v in scales.items()},
                           model=lambda key, ms=models: next((m for m in ms if m.model == key), None))


def _fake_model_eval(calls):
    def ev(key, params):
        calls.append((key, dict(params)))
        c, att = _model_cost(key, params)
        m = SimpleNamespace(model=key, cost_per_hour=c, power_w=100.0 * c, served_fraction=1.0, islands=())
        sc = SimpleNamespace(cost_per_hour=c, attainment=att, power_w=100.0 * c, simulations=4,
                             per_model={key: {"attainment": att, "slo_met": att >= 0.99}})
        return _plan_of([m], {key: 0.5 + 0.1 * round(params[f"log2_mbt:{key}"])}), sc

    return ev


def _fake_combine(calls, fail=False, plan_calls=None):
    plan_calls = [] if plan_calls is None else plan_calls

    def comb(params, plans=None):
        calls.append(dict(params))
        plan_calls.append(sorted(plans or {}))
        models, per = [], {}
        for k in KEYS:
            c, att = _model_cost(k, params)
            att = 0.9 if fail else att
            models.append(SimpleNamespace(model=k, cost_per_hour=c, power_w=100.0 * c, served_fraction=1.0))
            per[k] = {"attainment": att, "slo_met": att >= 0.99}
        pl = _plan_of(models, {k: params.get(f"scale:{k}", 1.0) for k in KEYS})
        sc = SimpleNamespace(cost_per_hour=pl.cost_per_hour, attainment=min(v["attainment"] for v in per.values()),
                             power_w=100.0 * pl.cost_per_hour, per_model=per, simulations=6)
        return pl, sc

    return comb


@pytest.mark.slow
def test_per_model_search_evaluates_models_alone_and_combines_their_cheapest_passing_settings():
    design = [START] + [{**START, **{f"log2_mbt:{k}": e for k in KEYS}} for e in (12.0, 10.0)]
    mcalls, ccalls, pcalls = [], [], []
    r = run_per_model_search(_fake_model_eval(mcalls), _fake_combine(ccalls, plan_calls=pcalls), KEYS, space=SPACE,
                             max_evals=6, seed=1, n_init=3, initial=design)
    # every candidate is evaluated for one model alone, never twice in the same discrete configuration
    for k in KEYS:
        mine = [p for key, p in mcalls if key == k]
        assert mine and all(set(p) == {f"log2_mbt:{k}", f"islands:{k}"} for p in mine)
        assert len({grid_key(p) for p in mine}) == len(mine)
        # the initial design is evaluated first, in order
        assert [round(p[f"log2_mbt:{k}"]) for p in mine[:3]] == [11, 12, 10]
    # one joint check of the combination: each model's cheapest passing setting with its scale
    assert len(ccalls) == 1 and pcalls == [KEYS]  # with the per-model plans of the chosen points
    comb = ccalls[0]
    per_obs = r.observations[0].extra["per_model_observations"]
    for k in KEYS:
        best = min((o for o in per_obs[k] if o.attainment >= 0.99), key=lambda o: o.cost_per_hour)
        assert round(comb[f"log2_mbt:{k}"]) == round(best.params[f"log2_mbt:{k}"])
        assert comb[f"scale:{k}"] == pytest.approx(0.5 + 0.1 * round(best.params[f"log2_mbt:{k}"]))
    # the design already contains both models' best chunk budgets, so the combination is cheaper
    # than the start (a: 12 + 1.5 for uncapped islands at worst; b: 10)
    start_cost = sum(_model_cost(k, START)[0] for k in KEYS)
    assert r.chosen.cost_per_hour < start_cost and r.chosen.attainment >= 0.99
    assert round(comb["log2_mbt:ns/a"]) == 12 and round(comb["log2_mbt:ns/b"]) == 10
    assert r.evaluations == len(mcalls) + 1
    assert r.observations[0].extra["search_simulations"] == 4 * len(mcalls) + 6
    # deterministic
    mcalls2, ccalls2 = [], []
    r2 = run_per_model_search(_fake_model_eval(mcalls2), _fake_combine(ccalls2), KEYS, space=SPACE, max_evals=6,
                              seed=1, n_init=3, initial=design)
    assert mcalls2 == mcalls and ccalls2 == ccalls and r2.chosen.params == r.chosen.params


def test_per_model_search_keeps_the_fallback_when_the_combination_fails_and_honours_the_sim_budget():
    mcalls, ccalls = [], []
    fb = _fake_combine([])(START)
    r = run_per_model_search(_fake_model_eval(mcalls), _fake_combine(ccalls, fail=True), KEYS, space=SPACE,
                             max_evals=5, max_sims=8, seed=0, n_init=3, initial=[START], fallback=fb)
    # budget 8 simulations at 4 per candidate: one round of both models, then stop
    assert len(mcalls) == 2 and len(ccalls) == 1
    assert r.chosen.extra.get("fallback") and r.plan is fb[0]
    assert r.chosen.cost_per_hour == pytest.approx(fb[1].cost_per_hour)


def test_fleet_without_withholds_other_models_gpus():
    fl = fleet(pool("p", "mid", 2), pool("q", "big", 1))
    ref = SimpleNamespace(models=[
        SimpleNamespace(model="ns/a", islands=[SimpleNamespace(pool="p", tp=2, replicas=3)]),
        SimpleNamespace(model="ns/b", islands=[SimpleNamespace(pool="p", tp=1, replicas=5),
                                               SimpleNamespace(pool="q", tp=4, replicas=1)])])
    assert gpus_by_pool(ref) == {"p": 11, "q": 4}
    assert gpus_by_pool(ref, exclude="ns/b") == {"p": 6}
    assert pool_slack(fl, ref) == {"p": (11, 16), "q": (4, 8)}
    red = fleet_without(fl, gpus_by_pool(ref, exclude="ns/a"))
    assert red.pool("p").gpus_free == 11 and red.pool("q").gpus_free == 4
    assert red.pool("p").gpus_free_in_blocks(4) == 8  # blocks of 4 within the 11 left
    with pytest.raises(KeyError, match="nope"):
        fleet_without(fl, {"nope": 1})


@pytest.fixture(scope="module")
def two_models():
    from archipelago.decide.catalog import load_gpu_catalog, load_model_catalog
    from archipelago.decide.planner.types import (
        FleetSnapshot,
        ModelRequest,
        NodeSnapshot,
        PoolSnapshot,
        Workload,
    )
    from archipelago.decide.sim import SLOTarget
    from archipelago.decide.traces import poisson_trace

    gc, mc = load_gpu_catalog(), load_model_catalog()

    def p(name, gpu, n):
        return PoolSnapshot(name, gpu, gc.get(gpu).price_per_gpu_hour,
                            tuple(NodeSnapshot(f"{name}-{i}", 8, 8) for i in range(n)))

    fl = FleetSnapshot((p("l4", "L4", 2), p("l40s", "L40S", 2)))
    reqs, traces = [], {}
    for i, k in enumerate(KEYS):
        tr = poisson_trace(4.0, 90, input_tokens=1024, output_tokens=128, seed=i + 1)
        wl = Workload.from_arrays(tr.arrival_s, tr.input_tokens, tr.output_tokens)
        reqs.append(ModelRequest(k, mc.get("meta-llama/Llama-3.1-8B-Instruct"), SLOTarget(ttft_s=2.0, tpot_s=0.1), wl))
        traces[k] = tr
    return fl, reqs, traces


@pytest.mark.slow
def test_model_evaluator_is_independent_of_the_other_models_settings_and_respects_their_gpus(two_models):
    fl, reqs, traces = two_models
    cfg = PlannerConfig(verify_max_iters=3)
    ev = make_model_evaluator(fl, reqs, traces, cfg)
    p1 = {"log2_mbt:ns/a": 11.0, "islands:ns/a": 3.5, "log2_mbt:ns/b": 9.0, "islands:ns/b": 1.0}
    p2 = {"log2_mbt:ns/a": 11.0, "islands:ns/a": 3.5, "log2_mbt:ns/b": 13.0, "islands:ns/b": 3.5}
    pl1, sc1 = ev("ns/a", p1)
    pl2, sc2 = ev("ns/a", p2)
    # the plan holds model a only, and b's settings do not change a's cost or simulated attainment
    assert [m.model for m in pl1.models] == ["ns/a"] and pl1.model("ns/a").islands
    assert pl1.plan_id == pl2.plan_id and sc1.attainment == sc2.attainment
    assert set(sc1.per_model) == {"ns/a"} and sc1.simulations == 1 + int(pl1.params["verify_rounds"])
    assert "scale:ns/a" in pl1.params
    # with b holding every L40S GPU in the reference plan, a is planned on the L4 pool only
    ref = SimpleNamespace(models=[SimpleNamespace(model="ns/b", islands=[SimpleNamespace(pool="l40s", tp=1,
                                                                                         replicas=16)])])
    ev_fixed = make_model_evaluator(fl, reqs, traces, cfg, reference=ref)
    pl3, _ = ev_fixed("ns/a", p1)
    assert pl3.model("ns/a").islands and {i.pool for i in pl3.model("ns/a").islands} == {"l4"}
    with pytest.raises(KeyError, match="ns/zz"):
        ev("ns/zz", p1)


def test_merge_model_plans_sums_models_and_refuses_plans_that_do_not_fit_together():
    from archipelago.decide.planner.outer import merge_model_plans

    fl = fleet(pool("p", "mid", 1), pool("q", "big", 1))  # 8 GPUs each

    def one(key, islands, cost):
        mp = SimpleNamespace(model=key, islands=[SimpleNamespace(pool=a, tp=t, replicas=n) for a, t, n in islands],
                             cost_per_hour=cost, power_w=10.0 * cost)
        return SimpleNamespace(model=lambda k, mp=mp: mp if k == mp.model else None, params={f"scale:{key}": 0.5},
                               infeasibilities=(), stats=SolveStats())

    reqs = [SimpleNamespace(key=k) for k in KEYS]
    a = one("ns/a", [("p", 4, 1)], 4.0)
    b = one("ns/b", [("p", 2, 2), ("q", 1, 3)], 5.0)
    m = merge_model_plans(fl, reqs, {"ns/a": a, "ns/b": b})
    assert m is not None and m.cost_per_hour == pytest.approx(9.0) and m.power_w == pytest.approx(90.0)
    assert [x.model for x in m.models] == KEYS and m.assignments == ()
    assert m.params["scale:ns/a"] == 0.5 and m.params["scale:ns/b"] == 0.5 and m.params["merged_per_model"] == 1.0
    # 4 + 2x2 fits the 8 GPUs of p; one more TP4 replica does not
    assert merge_model_plans(fl, reqs, {"ns/a": one("ns/a", [("p", 4, 2)], 8.0), "ns/b": b}) is None
    assert merge_model_plans(fl, reqs, {"ns/a": a}) is None  # a model without a plan
