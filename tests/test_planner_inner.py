"""Inner loop: capacity model, island sizing, infeasibility explanations, priorities, hysteresis,
determinism and serialisation. Uses the linear fake performance model of test_planner_fakes."""

from __future__ import annotations

import json
import math

import pytest

from archipelago.decide.planner.capacity import Bucket, predict_replica, replica_capacity, workload_buckets
from archipelago.decide.planner.islands import build_problem, lp_lower_bound
from archipelago.decide.planner.planner import island_utilization, plan
from archipelago.decide.planner.types import (
    CurrentPlacement,
    ModelRequest,
    PlannerConfig,
    PlannerInputError,
    Workload,
)
from archipelago.decide.sim import SLOTarget
from test_planner_fakes import GPUS, FakeCatalog, FakePerf, FModel, fake_perf_factory, fleet, pool

CAT = FakeCatalog(GPUS)
SLO = SLOTarget(ttft_s=1.0, tpot_s=0.05)
CFG = PlannerConfig(inner_time_limit_s=20, packing_time_limit_s=5)


def _req(key="ns/a", weights=14, rate=20.0, **kw):
    wl = kw.pop("workload", None) or Workload(rate_rps=rate, input_mean=1000, input_p90=3000, output_mean=200)
    return ModelRequest(key, FModel(key.split("/")[1], weights), kw.pop("slo", SLO), wl, **kw)


def _plan(fl, reqs, **kw):
    return plan(fl, reqs, config=kw.pop("config", CFG), gpu_catalog=CAT, perf_factory=fake_perf_factory, **kw)


# ---------------------------------------------------------------- capacity model
def test_buckets_conserve_rate_and_fractions():
    w = Workload(rate_rps=12.0, input_mean=900, input_p90=2500, output_mean=150)
    bs = workload_buckets(w)
    assert math.isclose(sum(b.rate_rps for b in bs), 12.0, rel_tol=1e-9)
    assert math.isclose(sum(b.fraction for b in bs), 1.0, rel_tol=1e-9)
    assert all(b.lo < b.hi and b.lo <= b.mean_in <= b.hi for b in bs)


def test_cumulative_histogram_conversion_and_validation():
    assert Workload.from_cumulative([(128, 10), (512, 30), (math.inf, 31)]) == ((128.0, 10.0), (512.0, 20.0),
                                                                                 (math.inf, 1.0))
    with pytest.raises(PlannerInputError, match="decreases"):
        Workload.from_cumulative([(128, 10), (512, 5)])
    with pytest.raises(PlannerInputError, match="input_hist or input_mean"):
        Workload(rate_rps=1.0, output_mean=10)


def test_capacity_meets_slo_at_capacity_and_violates_just_above():
    perf = FakePerf(FModel("a", 14), GPUS["mid"], 1)
    b = Bucket(512, 1024, 768, 200, 1.0, 1.0)
    cap = replica_capacity(perf, b, ttft_s=0.3, tpot_s=0.05, budget=8192)
    assert cap.rate_rps > 0
    at = predict_replica(perf, b, cap.rate_rps, budget=8192)
    assert at.ok and at.ttft_q_s <= 0.3 + 1e-9 and at.tpot_q_s <= 0.05 + 1e-9
    above = predict_replica(perf, b, cap.rate_rps * 1.05, budget=8192)
    assert (not above.ok) or above.ttft_q_s > 0.3 or above.tpot_q_s > 0.05
    # a tighter SLO never gives more capacity
    tight = replica_capacity(perf, b, ttft_s=0.15, tpot_s=0.05, budget=8192)
    assert tight.rate_rps <= cap.rate_rps


def test_capacity_zero_when_idle_replica_misses_ttft():
    perf = FakePerf(FModel("a", 14), GPUS["small"], 1)
    b = Bucket(8192, 16384, 12000, 100, 1.0, 1.0)
    cap = replica_capacity(perf, b, ttft_s=0.2, tpot_s=1.0, budget=8192)
    assert cap.rate_rps == 0 and cap.binding == "ttft-slo" and cap.idle_ttft_s > 0.2


# ---------------------------------------------------------------- island sizing
def test_feasible_plan_serves_load_within_capacity_and_pools():
    fl = fleet(pool("pb", "big", 1), pool("pm", "mid", 2), pool("ps", "small", 2))
    reqs = [_req("ns/a", 14, 30.0), _req("ns/b", 70, 4.0)]
    p = _plan(fl, reqs)
    assert p.feasible and not p.infeasibilities
    cfg = CFG
    problem = build_problem(fl, reqs, cfg, gpu_catalog=CAT, perf_factory=fake_perf_factory)
    shares = {}
    for mi, mp in enumerate(problem.models):
        mplan = p.model(mp.req.key)
        assert mplan.served_fraction == pytest.approx(1.0)
        for lo, hi, sh in mplan.routing:
            bi = next(i for i, b in enumerate(mp.buckets) if b.lo == lo and b.hi == hi)
            assert sum(sh.values()) == pytest.approx(1.0)
            shares[(mi, bi)] = sh
    varmap = {v.iid: v for mp in problem.models for v in mp.all_variants}
    for isl in p.islands:
        assert island_utilization(problem, varmap[isl.id], isl.replicas, shares) <= 1.0 + 1e-9
    for pl in fl.pools:
        used = sum(i.replicas * i.tp for i in p.islands if i.pool == pl.name)
        assert used <= pl.gpus_free
    assert sum(a.gpus for a in p.assignments) == p.gpus
    # cost is the sum of replica prices
    assert p.cost_per_hour == pytest.approx(sum(i.replicas * i.tp * GPUS[i.gpu].price for i in p.islands))
    # lower bound below the integer plan
    lb = lp_lower_bound(problem)
    assert lb.served_fraction == pytest.approx(1.0)
    assert lb.cost_per_hour <= p.cost_per_hour + 1e-6


def test_more_load_never_costs_less():
    fl = fleet(pool("pm", "mid", 4), pool("ps", "small", 4))
    c = [_plan(fl, [_req(rate=r)]).cost_per_hour for r in (5.0, 20.0, 60.0)]
    assert c[0] <= c[1] <= c[2] and c[2] > c[0]


def test_plan_is_deterministic_and_json_serialisable():
    fl = fleet(pool("pm", "mid", 3), pool("ps", "small", 3))
    reqs = [_req("ns/a", 14, 25.0), _req("ns/c", 14, 10.0, priority=2)]
    p1, p2 = _plan(fl, reqs), _plan(fl, reqs)
    assert p1.plan_id == p2.plan_id
    d = json.loads(json.dumps(p1.to_dict()))
    assert d["planId"] == p1.plan_id and d["models"][0]["islands"]


# ---------------------------------------------------------------- infeasibility explanations
def test_model_too_big_for_allowed_pools_is_explained_not_raised():
    fl = fleet(pool("ps", "small", 2))
    p = _plan(fl, [_req("ns/huge", 400, 1.0, allowed_tp=(1, 2))])
    [inf] = [i for i in p.infeasibilities if i.model == "ns/huge"]
    assert inf.constraint == "memory" and inf.served_fraction == 0.0
    assert "TP" in inf.suggestion or "tp" in inf.suggestion.lower()
    assert not p.feasible and p.model("ns/huge").islands == ()


def test_unattainable_ttft_names_the_prompt_range_and_the_fix():
    fl = fleet(pool("ps", "small", 2))
    slo = SLOTarget(ttft_s=0.15, tpot_s=0.05)
    p = _plan(fl, [_req("ns/a", 14, 2.0, slo=slo, allowed_tp=(1,))])
    ttft = [i for i in p.infeasibilities if i.constraint == "ttft-slo"]
    assert ttft, p.infeasibilities
    assert "raise the TTFT target" in ttft[0].suggestion
    assert 0 < ttft[0].served_fraction < 1
    # the short prompts are still served
    assert p.model("ns/a").islands


def test_unknown_allowed_pool_is_an_input_error_naming_the_field():
    with pytest.raises(PlannerInputError, match="allowed_pools"):
        _plan(fleet(pool("ps", "small", 1)), [_req(allowed_pools=("nope",))])


def test_priorities_are_lexicographic_when_gpus_are_short():
    fl = fleet(pool("pm", "mid", 1))  # 8 GPUs only
    hi = _req("ns/hi", 14, 150.0, priority=10)
    lo = _req("ns/lo", 14, 150.0, priority=0)
    assert _plan(fl, [hi]).model("ns/hi").served_fraction == pytest.approx(1.0)  # fits alone
    p = _plan(fl, [lo, hi])
    assert p.model("ns/hi").served_fraction == pytest.approx(1.0)
    assert p.model("ns/lo").served_fraction < 1.0
    [inf] = [i for i in p.infeasibilities if i.model == "ns/lo"]
    assert inf.constraint == "pool-capacity" and "ns/hi" in inf.detail and "add" in inf.suggestion
    # swapping priorities swaps who is served
    p2 = _plan(fl, [_req("ns/lo", 14, 150.0, priority=20), hi])
    assert p2.model("ns/lo").served_fraction == pytest.approx(1.0)


def test_max_replicas_binding_is_explained():
    fl = fleet(pool("ps", "small", 4))
    p = _plan(fl, [_req("ns/a", 14, 40.0, max_replicas=1, allowed_tp=(1,))])
    [inf] = [i for i in p.infeasibilities if i.constraint == "max-replicas"]
    assert "raise max_replicas" in inf.suggestion and inf.served_fraction < 1


# ---------------------------------------------------------------- hysteresis
def test_hysteresis_keeps_previous_plan_when_new_is_not_better_by_margin():
    fl = fleet(pool("pm", "mid", 2), pool("ps", "small", 2))
    reqs = [_req("ns/a", 14, 20.0)]
    p1 = _plan(fl, reqs)
    # load drifts down a little: the old plan still serves it
    reqs2 = [_req("ns/a", 14, 19.0)]
    p2 = _plan(fl, reqs2, previous=p1, current=CurrentPlacement.from_plan(p1),
               config=CFG.with_(hysteresis_margin=0.5))
    assert p2.kept_previous and p2.plan_id == p1.plan_id and "hysteresis" in p2.stats.note


def test_hysteresis_replaces_plan_that_no_longer_serves_the_load():
    fl = fleet(pool("pm", "mid", 4), pool("ps", "small", 4))
    p1 = _plan(fl, [_req("ns/a", 14, 5.0)])
    p2 = _plan(fl, [_req("ns/a", 14, 60.0)], previous=p1, current=CurrentPlacement.from_plan(p1),
               config=CFG.with_(hysteresis_margin=0.9))
    assert not p2.kept_previous and p2.cost_per_hour > p1.cost_per_hour


def test_hysteresis_adopts_a_much_cheaper_plan():
    fl = fleet(pool("pb", "big", 2), pool("ps", "small", 4))
    short = Workload(rate_rps=10.0, input_mean=300, input_p90=500, output_mean=100)
    expensive = _plan(fl, [_req("ns/a", 14, workload=short, allowed_pools=("pb",))])
    p = _plan(fl, [_req("ns/a", 14, workload=short)], previous=expensive, current=CurrentPlacement.from_plan(expensive),
              config=CFG.with_(hysteresis_margin=0.05))
    assert not p.kept_previous and p.cost_per_hour < expensive.cost_per_hour * 0.95


def test_churn_penalty_prefers_running_islands_on_ties():
    fl = fleet(pool("pm", "mid", 2), pool("pm2", "mid", 2))
    p1 = _plan(fl, [_req("ns/a", 14, 10.0, allowed_pools=("pm2",))])
    p2 = _plan(fl, [_req("ns/a", 14, 10.0)], current=CurrentPlacement.from_plan(p1))
    assert {i.pool for i in p2.islands} == {"pm2"}


def test_replan_with_idle_models_and_a_current_placement() -> None:
    """Regression: re-planning the samples when two models see zero load, warm-started from the
    previous plan, used to raise KeyError in the LP-rounding start (a zero-rate bucket's share sat
    on a variant that got no replicas). The operator hit it as soon as Prometheus reported 0 req/s."""
    import dataclasses
    from pathlib import Path

    from archipelago.cli_plan import fleet_from_pools, load_resources, requests_from_resources
    from archipelago.decide.planner import plan
    from archipelago.decide.planner.types import CurrentPlacement

    samples = sorted((Path(__file__).resolve().parents[1] / "manifests" / "samples").glob("*.yaml"))
    pools, slos, mds = load_resources(samples)
    fleet = fleet_from_pools(pools)
    reqs = requests_from_resources(slos, mds, {})
    first = plan(fleet, reqs)
    idle = [
        dataclasses.replace(r, workload=dataclasses.replace(r.workload, rate_rps=0.0 if "8b" not in r.key else 5.9))
        for r in reqs
    ]
    second = plan(fleet, idle, current=CurrentPlacement.from_plan(first), previous=first)
    served = {i.model for i in second.islands}
    # replicas.min keeps idle models running; Mixtral's sample allows scale to zero (min 0)
    assert {r.key for r in reqs if r.min_replicas >= 1} <= served
    assert any(r.min_replicas == 0 for r in reqs)


def test_island_floor_keeps_running_islands_and_only_adds():
    """A load-up re-plan (the operator sets ``island_floor`` to the plan in force) grows the fleet instead of
    replacing islands: the floored island keeps its replicas although the unconstrained optimum drops it."""
    fl = fleet(pool("pm", "mid", 4), pool("pm2", "mid", 4), pool("ps", "small", 4))
    p1 = _plan(fl, [_req("ns/a", 14, 10.0, allowed_pools=("pm2",))])
    kept = {i.id: i.replicas for i in p1.islands}
    assert kept and all(i.pool == "pm2" for i in p1.islands)
    free = _plan(fl, [_req("ns/a", 14, 40.0, allowed_pools=("pm", "pm2", "ps"))],
                 config=CFG.with_(churn_penalty_per_replica=0.0))
    assert any(next((i.replicas for i in free.islands if i.id == iid), 0) < r for iid, r in kept.items())
    grown = _plan(fl, [_req("ns/a", 14, 40.0, allowed_pools=("pm", "pm2", "ps"))],
                  config=CFG.with_(island_floor=kept, churn_penalty_per_replica=0.0))
    for iid, r in kept.items():
        assert next(i.replicas for i in grown.islands if i.id == iid) >= r
    assert grown.feasible and grown.gpus > p1.gpus
    with pytest.raises(PlannerInputError, match="island_floor"):
        PlannerConfig(island_floor={"x": -1})


def test_island_capacity_scale_lowers_one_islands_capacity_only():
    """The operator's correction after a measured SLO breach: halving one island's modelled capacity
    doubles the replicas it needs for the same load, and leaves other islands' capacities alone."""
    fl = fleet(pool("pm", "mid", 8))
    reqs = [_req("ns/a", 14, 10.0, allowed_pools=("pm",), allowed_tp=(1,))]
    base = _plan(fl, reqs)
    (isl,) = base.islands
    halved = _plan(fl, reqs, config=CFG.with_(island_capacity_scale={isl.id: 0.5}))
    (isl2,) = halved.islands
    assert isl2.id == isl.id and isl2.utilization == pytest.approx(isl.utilization * 2 * isl.replicas / isl2.replicas)
    assert isl2.replicas >= 2 * isl.replicas - 1 and isl2.replicas > isl.replicas
    other = _plan(fl, reqs, config=CFG.with_(island_capacity_scale={"ns/b/pm/tp1": 0.5}))
    assert [(i.id, i.replicas) for i in other.islands] == [(isl.id, isl.replicas)]
    for bad in (0.0, 1.5):
        with pytest.raises(PlannerInputError, match="island_capacity_scale"):
            PlannerConfig(island_capacity_scale={"x": bad})
