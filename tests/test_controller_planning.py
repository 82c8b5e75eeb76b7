"""When the operator re-plans: spec and node changes at once, load changes with hysteresis and a
cooldown, planner failures keep the last good plan, BO results adopted only when better by a margin."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from archipelago.controller.planning import PlanningService, _call_planner, spec_fingerprint
from archipelago.controller.settings import OperatorConfig, configure_logging
from archipelago.decide.planner.types import (
    CurrentPlacement,
    FleetSnapshot,
    ModelRequest,
    NodeSnapshot,
    Plan,
    PoolSnapshot,
    Workload,
)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class CountingPlanner:
    """Fake planner (collaborator): records calls, returns a Plan whose cost is the total request rate."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.fail = False

    def __call__(self, fleet, models, current, config, previous):
        self.calls.append({"fleet": fleet, "models": models, "previous": previous, "config": config})
        if self.fail:
            raise RuntimeError("solver exploded")
        cost = sum(m.workload.rate_rps for m in models)
        return Plan(models=(), assignments=(), cost_per_hour=cost, power_w=0.0)


def fleet(free: int = 8) -> FleetSnapshot:
    return FleetSnapshot((PoolSnapshot("h100", "H100-SXM", 3.99, (NodeSnapshot("n1", 8, free),)),))


def req(rate: float, tp=(1, 2)) -> ModelRequest:
    return ModelRequest(key="llm/chat", model="m", slo="slo", workload=Workload(rate, input_mean=1000, output_mean=200),
                        allowed_tp=tp)


def svc(**kw):
    p, c = CountingPlanner(), Clock()
    cfg = OperatorConfig(cooldown_s=60, load_hysteresis=0.2, **kw)
    return PlanningService(cfg, plan_fn=p, clock=c), p, c


def fp(f: FleetSnapshot) -> tuple:
    return tuple((p.name, tuple((n.name, n.schedulable, n.gpus_free) for n in p.nodes)) for p in f.pools)


def test_initial_then_reuse() -> None:
    s, p, _ = svc()
    o1 = s.ensure_plan(fleet(), fp(fleet()), [req(5)], CurrentPlacement())
    assert o1.replanned and o1.trigger == "initial" and len(p.calls) == 1
    o2 = s.ensure_plan(fleet(), fp(fleet()), [req(5)], CurrentPlacement())
    assert not o2.replanned and o2.plan is o1.plan and o2.plan_trigger == "initial" and len(p.calls) == 1
    assert p.calls[0]["previous"] is None


def test_spec_and_node_changes_replan_immediately() -> None:
    s, p, _ = svc()
    s.ensure_plan(fleet(), fp(fleet()), [req(5)], CurrentPlacement())
    o = s.ensure_plan(fleet(), fp(fleet()), [req(5, tp=(1,))], CurrentPlacement())
    assert o.trigger == "spec" and len(p.calls) == 2
    assert p.calls[1]["previous"] is not None  # the planner gets the plan in force for its own hysteresis
    f2 = fleet(free=4)
    o = s.ensure_plan(f2, fp(f2), [req(5, tp=(1,))], CurrentPlacement())
    assert o.trigger == "nodes" and len(p.calls) == 3


def test_load_rise_replans_at_once_and_fall_needs_hysteresis_and_cooldown() -> None:
    s, p, c = svc(scale_down_window_s=0)
    s.ensure_plan(fleet(), fp(fleet()), [req(50)], CurrentPlacement())
    c.t += 10
    assert not s.ensure_plan(fleet(), fp(fleet()), [req(5)], CurrentPlacement()).replanned  # fall: cooldown
    assert not s.ensure_plan(fleet(), fp(fleet()), [req(55)], CurrentPlacement()).replanned  # rise within 20 %
    o = s.ensure_plan(fleet(), fp(fleet()), [req(70)], CurrentPlacement())  # rise > 20 %: no cooldown
    assert o.replanned and o.trigger == "load-up" and len(p.calls) == 2
    c.t += 61
    assert not s.ensure_plan(fleet(), fp(fleet()), [req(60)], CurrentPlacement()).replanned  # within 20 %
    o = s.ensure_plan(fleet(), fp(fleet()), [req(40)], CurrentPlacement())
    assert o.replanned and o.trigger == "load" and len(p.calls) == 3


def test_scale_down_waits_for_the_stabilization_window_and_noise_does_not_replan() -> None:
    s, p, c = svc(scale_down_window_s=300)
    s.ensure_plan(fleet(), fp(fleet()), [req(5)], CurrentPlacement())
    c.t += 61
    o = s.ensure_plan(fleet(), fp(fleet()), [req(10)], CurrentPlacement())  # a rise: planned at once
    assert o.trigger == "load-up" and p.calls[-1]["models"][0].workload.rate_rps == 10
    t_rise = c.t
    for k, rate in enumerate([7.0, 9.0, 6.5, 8.0, 7.5] * 8):  # noisy, lower: still planned for the peak
        c.t += 6
        o = s.ensure_plan(fleet(), fp(fleet()), [req(rate)], CurrentPlacement())
        assert not o.replanned, (k, rate)
    assert c.t - t_rise == 240 and len(p.calls) == 2
    c.t = t_rise + 301  # the 10 req/s peak left the window; the noisy samples since t_rise + 6 have not
    o = s.ensure_plan(fleet(), fp(fleet()), [req(5)], CurrentPlacement())
    assert not o.replanned  # planned for their peak, 9 req/s: within the 20 % hysteresis of 10
    c.t = t_rise + 240 + 301  # low for a whole window: planned for what it is now
    o = s.ensure_plan(fleet(), fp(fleet()), [req(5)], CurrentPlacement())
    assert o.trigger == "load" and p.calls[-1]["models"][0].workload.rate_rps == 5
    # a spec change starts the history afresh
    o = s.ensure_plan(fleet(), fp(fleet()), [req(3, tp=(1,))], CurrentPlacement())
    assert o.trigger == "spec" and p.calls[-1]["models"][0].workload.rate_rps == 3


class _StepPlan:
    """Fake plan whose decision (``plan_id``) only changes per 10 req/s step of the load."""

    def __init__(self, rate: float) -> None:
        self.plan_id = f"step-{int(rate // 10)}"
        self.cost_per_hour, self.gpus, self.feasible, self.infeasibilities = rate, 1, True, ()
        self.models, self.assignments, self.unplaced_pods = (), (), 0

    def model(self, key):
        return None


def test_a_load_replan_that_keeps_the_plan_does_not_restart_the_cooldown() -> None:
    calls = []

    def planner(fleet, models, current, config, previous):
        calls.append(models[0].workload.rate_rps)
        return _StepPlan(models[0].workload.rate_rps)

    c = Clock()
    s = PlanningService(OperatorConfig(cooldown_s=60, load_hysteresis=0.2, scale_down_window_s=0), plan_fn=planner,
                        clock=c)
    s.ensure_plan(fleet(), fp(fleet()), [req(29)], CurrentPlacement())  # plan step-2
    c.t += 61
    assert s.ensure_plan(fleet(), fp(fleet()), [req(22)], CurrentPlacement()).trigger == "load"  # still step-2
    c.t += 5  # the load keeps falling: planned at once, the last change was > 60 s ago
    o = s.ensure_plan(fleet(), fp(fleet()), [req(12)], CurrentPlacement())
    assert o.trigger == "load" and o.plan.plan_id == "step-1" and calls == [29, 22, 12]
    c.t += 5  # a real change happened 5 s ago: now the cooldown holds for falls
    assert not s.ensure_plan(fleet(), fp(fleet()), [req(5)], CurrentPlacement()).replanned
    c.t += 56
    assert s.ensure_plan(fleet(), fp(fleet()), [req(5)], CurrentPlacement()).plan.plan_id == "step-0"


def test_load_up_grows_the_plan_in_force_then_consolidates_after_the_cooldown() -> None:
    from types import SimpleNamespace

    seen = []

    def planner(fleet, models, current, config, previous):
        seen.append(dict(config.island_floor))
        rate = models[0].workload.rate_rps
        isl = _island(f"llm/chat/h100/tp{1 if rate < 20 else 2}", int(rate // 5) + 1, rate, 0.9)
        p = _StepPlan(rate)
        p.plan_id = f"{isl.id}x{isl.replicas}"
        p.models = (SimpleNamespace(islands=(isl,)),)
        return p

    c = Clock()
    s = PlanningService(OperatorConfig(cooldown_s=60, load_hysteresis=0.2, scale_down_window_s=0), plan_fn=planner,
                        clock=c)
    s.ensure_plan(fleet(), fp(fleet()), [req(4)], CurrentPlacement())
    c.t += 5
    assert s.ensure_plan(fleet(), fp(fleet()), [req(12)], CurrentPlacement()).trigger == "load-up"
    assert seen[-1] == {"llm/chat/h100/tp1": 1}  # keep what runs, only add
    c.t += 5
    assert s.ensure_plan(fleet(), fp(fleet()), [req(25)], CurrentPlacement()).trigger == "load-up"
    assert seen[-1] == {"llm/chat/h100/tp1": 3}
    c.t += 30
    assert not s.ensure_plan(fleet(), fp(fleet()), [req(25)], CurrentPlacement()).replanned
    c.t += 31  # cooldown since the last change: one unconstrained re-plan
    o = s.ensure_plan(fleet(), fp(fleet()), [req(25)], CurrentPlacement())
    assert o.trigger == "consolidate" and seen[-1] == {}
    c.t += 61
    assert not s.ensure_plan(fleet(), fp(fleet()), [req(25)], CurrentPlacement()).replanned  # consolidated once


def test_planner_failure_keeps_last_good_plan_and_backs_off() -> None:
    configure_logging("CRITICAL")
    s, p, c = svc()
    good = s.ensure_plan(fleet(), fp(fleet()), [req(5)], CurrentPlacement()).plan
    p.fail = True
    o = s.ensure_plan(fleet(), fp(fleet()), [req(5, tp=(1,))], CurrentPlacement())
    assert o.plan is good and o.error and "solver exploded" in o.error and not o.replanned
    n = len(p.calls)
    o = s.ensure_plan(fleet(), fp(fleet()), [req(5, tp=(1,))], CurrentPlacement())
    assert len(p.calls) == n and o.plan is good  # same inputs are not retried on every tick
    c.t += 61
    assert s.ensure_plan(fleet(), fp(fleet()), [req(5, tp=(1,))], CurrentPlacement()).trigger == "retry"
    assert len(p.calls) == n + 1
    p.fail = False
    f2 = fleet(free=6)
    o = s.ensure_plan(f2, fp(f2), [req(5, tp=(1,))], CurrentPlacement())
    assert o.replanned and o.error is None


def test_bo_margin() -> None:
    s, _, _ = svc(bo_margin=0.1)
    base = Plan(models=(), assignments=(), cost_per_hour=100.0, power_w=0)
    assert s.better_by_margin(Plan(models=(), assignments=(), cost_per_hour=89.0, power_w=0), base)
    assert not s.better_by_margin(Plan(models=(), assignments=(), cost_per_hour=95.0, power_w=0), base)


def test_bo_result_adopted_in_background() -> None:
    p = CountingPlanner()

    def bo(fleet, models, current, config, previous):
        return Plan(models=(), assignments=(), cost_per_hour=previous.cost_per_hour * 0.5, power_w=0)

    s = PlanningService(OperatorConfig(bo_enabled=True, bo_margin=0.05), plan_fn=p, bo_fn=bo)
    first = s.ensure_plan(fleet(), fp(fleet()), [req(10)], CurrentPlacement()).plan
    s._bo_thread.join(5)
    o = s.ensure_plan(fleet(), fp(fleet()), [req(10)], CurrentPlacement())
    assert o.trigger == "bo" and o.plan.cost_per_hour == first.cost_per_hour * 0.5


def test_call_planner_adapts_to_signature() -> None:
    seen = {}

    def plan(snapshot, requests, *, placement=None):
        seen.update(snapshot=snapshot, requests=requests, placement=placement)
        return "ok"

    assert _call_planner(plan, fleet=1, models=2, current=3, config=4, previous=5) == "ok"
    assert seen == {"snapshot": 1, "requests": 2, "placement": 3}
    assert "previous" in inspect.signature(CountingPlanner.__call__).parameters


def test_spec_fingerprint_ignores_load() -> None:
    assert spec_fingerprint([req(1)]) == spec_fingerprint([req(100)])
    assert spec_fingerprint([req(1)]) != spec_fingerprint([req(1, tp=(1,))])


def test_unattainable_models_are_planned_out() -> None:
    from archipelago.controller.planning import unattainable_models
    from archipelago.decide.planner.types import Infeasibility
    from archipelago.decide.sim import SLOTarget

    slo = SLOTarget(ttft_s=1.0, tpot_s=0.1, attainment=0.9)
    a = ModelRequest(key="llm/a", model="m", slo=slo, workload=Workload(1, input_mean=10, output_mean=10))
    b = ModelRequest(key="llm/b", model="m", slo=slo, workload=Workload(1, input_mean=10, output_mean=10))
    plan = Plan(models=(), assignments=(), cost_per_hour=0, power_w=0, infeasibilities=(
        Infeasibility("llm/a", "ttft-slo", "d", "s", served_fraction=0.5),
        Infeasibility("llm/b", "ttft-slo", "d", "s", served_fraction=0.95),  # within the 10 % allowance
        Infeasibility("llm/b", "pool-capacity", "d", "s", served_fraction=0.1)))  # more GPUs would fix it
    assert unattainable_models(plan, [a, b]) == {"llm/a"}

    calls = []

    def planner(fleet, models, current, config, previous):
        calls.append([m.key for m in models])
        notes = (Infeasibility("llm/a", "ttft-slo", "d", "s", 0.0),) if any(m.key == "llm/a" for m in models) else ()
        return Plan(models=(), assignments=(), cost_per_hour=len(models), power_w=0, infeasibilities=notes)

    seen_keys = []
    s = PlanningService(OperatorConfig(), plan_fn=planner)
    out = s.ensure_plan(fleet(), fp(fleet()), [a, b], CurrentPlacement(),
                        fleet_for=lambda keys: seen_keys.append(keys) or fleet())
    assert calls == [["llm/a", "llm/b"], ["llm/b"]] and seen_keys == [{"llm/b"}]
    assert out.plan.cost_per_hour == 1 and [i.model for i in out.plan.infeasibilities] == ["llm/a"]


def test_model_becoming_unattainable_leaves_the_others_plan_untouched() -> None:
    from archipelago.decide.planner.types import (
        EngineSettings,
        Infeasibility,
        IslandPlan,
        ModelPlan,
        PodAssignment,
    )
    from archipelago.decide.sim import SLOTarget

    ok, bad = SLOTarget(ttft_s=1.0, tpot_s=0.1), SLOTarget(ttft_s=1e-4, tpot_s=1e-5)

    def mk(key, slo):
        return ModelRequest(key=key, model="m", slo=slo, workload=Workload(1, input_mean=10, output_mean=10))

    def island(key):
        return IslandPlan(id=f"{key}/h100/tp1", model=key, pool="h100", gpu="H100-SXM", tp=1, replicas=1, role="mixed",
                          ranges=(), input_range=(0, 1), traffic_share=1, engine=EngineSettings(8, 0.9, None, 512),
                          cost_per_hour=1, power_w=1,
                          utilization=0.5, ttft_p99_s=0.1, tpot_p99_s=0.01)

    calls = []

    def planner(fleet, models, current, config, previous):
        calls.append(sorted(m.key for m in models))
        mps = tuple(ModelPlan(m.key, (island(m.key),), (), 1.0, 1.0, 1.0, 0.1, 0.01) for m in models)
        notes = tuple(Infeasibility(m.key, "ttft-slo", "d", "s", 0.0) for m in models if m.slo is bad)
        return Plan(models=mps, assignments=tuple(PodAssignment(f"{m.key}/h100/tp1", "p0", "n1", 1) for m in models),
                    cost_per_hour=len(models), power_w=0, infeasibilities=notes)

    s = PlanningService(OperatorConfig(), plan_fn=planner)
    first = s.ensure_plan(fleet(), fp(fleet()), [mk("llm/a", ok), mk("llm/b", ok)], CurrentPlacement()).plan
    out = s.ensure_plan(fleet(), fp(fleet()), [mk("llm/a", bad), mk("llm/b", ok)], CurrentPlacement(),
                        fleet_for=lambda keys: fleet())
    assert calls == [["llm/a", "llm/b"], ["llm/a", "llm/b"]]  # one detection pass, no re-plan of b
    assert out.plan.model("llm/b") == first.model("llm/b") and out.plan.model("llm/a") is None
    assert [a.island for a in out.plan.assignments] == ["llm/b/h100/tp1"]
    assert [i.model for i in out.plan.infeasibilities] == ["llm/a"]


def test_restart_restores_the_plan_when_inputs_are_unchanged() -> None:
    import json
    import math

    from archipelago.controller.planning import inputs_digest, model_slice, plan_from_slices, spec_fingerprint
    from archipelago.decide.planner.types import (
        EngineSettings,
        Infeasibility,
        IslandPlan,
        ModelPlan,
        PodAssignment,
        RangeShare,
    )

    isl = IslandPlan(id="llm/chat/h100/tp2", model="llm/chat", pool="h100", gpu="H100-SXM", tp=2, replicas=3,
                     role="mixed", ranges=(RangeShare(0, 2048, 0.5, 1.0), RangeShare(2048, math.inf, 1.0, 2.0)),
                     input_range=(0, math.inf), traffic_share=0.75, engine=EngineSettings(64, 0.9, None, 8192),
                     cost_per_hour=23.9, power_w=900, utilization=0.6, ttft_p99_s=0.4, tpot_p99_s=0.03)
    mp = ModelPlan("llm/chat", (isl,), ((0, 2048, {isl.id: 1.0}), (2048, math.inf, {isl.id: 1.0})), 1.0, 23.9, 900,
                   0.4, 0.03, attainment=0.99)
    plan = Plan(models=(mp,), assignments=(PodAssignment(isl.id, "p0", "n1", 2),), cost_per_hour=23.9, power_w=900,
                infeasibilities=(Infeasibility("llm/chat", "unsupported", "d", "s", 1.0),))
    sl = json.loads(json.dumps(model_slice(plan, "llm/chat")))  # through JSON, as in the annotation
    back = plan_from_slices([sl])
    assert back.plan_id == plan.plan_id and back.model("llm/chat") == mp and back.infeasibilities == plan.infeasibilities

    p = CountingPlanner()
    s = PlanningService(OperatorConfig(), plan_fn=p)
    models = [req(5)]
    digest = inputs_digest(spec_fingerprint(models), fp(fleet()), {"llm/chat": 5.0})
    out = s.ensure_plan(fleet(), fp(fleet()), models, CurrentPlacement(), restore=lambda: {"llm/chat": (digest, sl)})
    assert out.trigger == "restored" and out.plan.plan_id == plan.plan_id and p.calls == []
    # a digest from other inputs is ignored: the planner runs
    s2 = PlanningService(OperatorConfig(), plan_fn=p)
    out2 = s2.ensure_plan(fleet(), fp(fleet()), [req(6)], CurrentPlacement(), restore=lambda: {"llm/chat": (digest, sl)})
    assert out2.trigger == "initial" and len(p.calls) == 1


def test_planned_workload_is_the_one_the_plan_was_made_for() -> None:
    s, _, c = svc(scale_down_window_s=0)
    s.ensure_plan(fleet(), fp(fleet()), [req(50)], CurrentPlacement())
    c.t += 5
    s.ensure_plan(fleet(), fp(fleet()), [req(5)], CurrentPlacement())  # a fall within the cooldown: no re-plan
    assert s.planned_workload("llm/chat").rate_rps == 50
    assert s.planned_workload("llm/other") is None


def test_workload_cache_keeps_last_good_observation_through_an_outage() -> None:
    from archipelago.controller.handlers import WorkloadCache
    from archipelago.observe.metrics import PrometheusUnavailable

    class Prom:
        url = "fake"
        down = False

        def custom_query(self, q):
            if self.down:
                import requests

                raise requests.ConnectionError("refused")
            if q.startswith("sum(rate(vllm:request_success_total"):
                return [{"metric": {}, "value": [0, "3.0"]}]
            return []

    prom = Prom()
    cache = WorkloadCache(OperatorConfig(metrics_interval_s=0.001), prom)
    obs, err = cache.get("llm/chat", "vllm")
    assert obs.request_rate == 3.0 and err is None
    prom.down = True
    import time as _t

    _t.sleep(0.01)
    obs2, err2 = cache.get("llm/chat", "vllm")
    assert obs2 is obs and "unreachable" in err2  # stale but kept; the error is reported
    assert issubclass(PrometheusUnavailable, RuntimeError)


# ---------------------------------------------------------------- measured SLO breaches correct capacity
def _island(iid: str, replicas: int, rate: float, util: float):
    from archipelago.decide.planner.types import EngineSettings, IslandPlan, RangeShare

    pool, tp = iid.split("/")[2], int(iid.split("/")[3][2:])
    return IslandPlan(id=iid, model="llm/chat", pool=pool, gpu=pool.upper(), tp=tp, replicas=replicas, role="mixed",
                      ranges=(RangeShare(0, 2048, 1.0, rate),), input_range=(0, 2048), traffic_share=1.0,
                      engine=EngineSettings(256, 0.9, None, 8192), cost_per_hour=3.99 * replicas, power_w=700.0,
                      utilization=util, ttft_p99_s=0.2, tpot_p99_s=0.05)


def _island_plan(*islands) -> Plan:
    from archipelago.decide.planner.types import ModelPlan

    mp = ModelPlan(model="llm/chat", islands=tuple(islands), routing=((0, 2048, {i.id: 1.0 for i in islands}),),
                   served_fraction=1.0, cost_per_hour=sum(i.cost_per_hour for i in islands), power_w=0.0,
                   ttft_p99_s=0.2, tpot_p99_s=0.05)
    return Plan(models=(mp,), assignments=(), cost_per_hour=mp.cost_per_hour, power_w=0.0)


def _slo_req(rate: float) -> ModelRequest:
    from archipelago.decide.sim import SLOTarget

    return ModelRequest(key="llm/chat", model="m", slo=SLOTarget(ttft_s=1.0, tpot_s=0.1, ttft_percentile=0.9,
                                                                   tpot_percentile=0.9, attainment=0.9),
                        workload=Workload(rate, input_mean=1000, output_mean=200))


def test_slo_breaches_judge_measured_latency_against_the_slo_and_size_the_correction() -> None:
    from archipelago.controller.planning import slo_breaches
    from archipelago.observe.metrics import IslandObservation as Obs

    h100, a100 = _island("llm/chat/h100/tp1", 1, 6.0, 0.9), _island("llm/chat/a100/tp1", 1, 3.0, 0.6)
    plan = _island_plan(h100, a100)
    reqs = [_slo_req(9.0)]
    # H100 saturated: modelled 6.67 req/s, served 5.0 at TPOT p90 0.12 s -> capacity x 0.9 * 5 / 6.67
    got = slo_breaches(plan, reqs, {h100.id: Obs("h100-tp1", 5.0, 0.3, 0.12, 20, 15),
                                    a100.id: Obs("a100-tp1", 3.0, 0.2, 0.05, 0, 0)})
    assert [b.island for b in got] == [h100.id]
    assert got[0].step == pytest.approx(0.9 * 5.0 / (6.0 / 0.9))
    assert "inter-token latency p90 0.120 s > SLO 0.1 s" in got[0].message and "6.67 req/s modelled" in got[0].message
    # a per-token tail over the target while the island keeps up (prefill stalls) is no breach; its mean is
    assert slo_breaches(plan, reqs, {h100.id: Obs("h100-tp1", 5.0, 0.3, 0.14, 0, 0, 40, -2, 0.06)}) == []
    (b,) = slo_breaches(plan, reqs, {h100.id: Obs("h100-tp1", 5.0, 0.3, 0.14, 0, 0, 40, -2, 0.11)})
    assert "mean inter-token latency 0.110 s > SLO 0.1 s" in b.message
    # within the tolerance, or no requests served: no breach
    assert slo_breaches(plan, reqs, {h100.id: Obs("h100-tp1", 5.0, 1.04, 0.104, 0, 0)}) == []
    assert slo_breaches(plan, reqs, {h100.id: Obs("h100-tp1", 0.0, 3.0, 0.3, 9, 9)}) == []
    # a TTFT breach while the queue drains is a backlog being worked off; while it grows it is a breach
    assert slo_breaches(plan, reqs, {h100.id: Obs("h100-tp1", 6.5, 4.0, 0.05, 30, -20)}) == []
    (b,) = slo_breaches(plan, reqs, {h100.id: Obs("h100-tp1", 6.5, 4.0, 0.05, 30, 5)})
    assert "TTFT p90 4.000 s > SLO 1 s" in b.message and b.step == pytest.approx(0.9 * 6.5 / (6.0 / 0.9))
    # sent more than the model said it carries (6.67 req/s): no evidence against the model
    assert slo_breaches(plan, reqs, {h100.id: Obs("h100-tp1", 7.2, 4.0, 0.15, 30, 5)}) == []
    (b,) = slo_breaches(plan, reqs, {h100.id: Obs("h100-tp1", 0.5, 4.0, 0.05, 30, 5)})
    assert b.step == 0.5  # one step never cuts more than half
    # a plan made with headroom: utilization is of the reduced capacity, the modelled capacity is the full one
    roomy = dataclasses.replace(plan, params={"headroom": 0.1})
    (b,) = slo_breaches(roomy, reqs, {h100.id: Obs("h100-tp1", 7.2, 4.0, 0.05, 30, 5)})
    assert "7.41 req/s modelled" in b.message and b.step == pytest.approx(0.9 * 7.2 / (6.0 / 0.9 / 0.9))


def test_slo_breach_lowers_the_islands_capacity_and_replans_once_per_settle_period() -> None:
    from archipelago.observe.metrics import IslandObservation as Obs

    h100 = _island("llm/chat/h100/tp1", 1, 6.0, 0.9)
    configs = []

    def planner(fleet, models, current, config, previous):
        configs.append(config)
        reps = 1 if not config.island_capacity_scale else 2  # a lower capacity needs another replica
        return _island_plan(_island(h100.id, reps, 6.0, 0.9 / reps))

    c = Clock()
    s = PlanningService(OperatorConfig(cooldown_s=30, metrics_window_s=60, scale_down_window_s=0,
                                       capacity_correction_ttl_s=600), plan_fn=planner, clock=c)
    s.ensure_plan(fleet(), fp(fleet()), [_slo_req(6.0)], CurrentPlacement())
    breach = {h100.id: Obs("h100-tp1", 5.0, 0.3, 0.13, 10, 8)}
    def ensure(rate=6.0, obs=breach):
        return s.ensure_plan(fleet(), fp(fleet()), [_slo_req(rate)], CurrentPlacement(), measured=obs)

    c.t += 30  # the plan's own window is not yet in: wait max(cooldown, metrics window)
    assert not ensure().replanned
    c.t += 31  # settled, but the breach has been seen for 31 s only: it must last a whole window
    assert not ensure().replanned
    c.t += 20
    assert not ensure(obs={}).replanned  # gone for one evaluation: the count restarts
    c.t += 10
    assert not ensure().replanned
    c.t += 60
    o = ensure()
    step = 0.9 * 5.0 / (6.0 / 0.9)
    assert o.trigger == "slo" and o.plan.models[0].islands[0].replicas == 2
    assert configs[-1].island_capacity_scale == {h100.id: pytest.approx(step)}
    assert configs[-1].island_floor == {h100.id: 1}  # like load-up: keep what runs, add
    assert len(o.corrections) == 1 and o.corrections[0].startswith(h100.id) and "re-planning" in o.corrections[0]
    # the new plan has to show its effect over a whole window first; no consolidation follows an slo plan
    # (same load, lower capacity: re-solving would only undo part of the correction on a noisy estimate)
    c.t += 59
    assert ensure().trigger == "none"
    c.t += 2
    assert not ensure().replanned  # seen breaching for 2 s since the new plan
    c.t += 60  # still breaching: corrections compound, never below the floor
    assert ensure().trigger == "slo"
    # the plan in force models 2 replicas at 0.45 utilisation (13.3 req/s); 5 req/s served: the step is 0.5
    assert s.capacity_corrections[h100.id] == pytest.approx(step * 0.5)
    # later plans (any trigger) keep the correction until it expires or the spec changes
    c.t += 61
    s.ensure_plan(fleet(), fp(fleet()), [_slo_req(3.0)], CurrentPlacement())
    assert configs[-1].island_capacity_scale == s.capacity_corrections != {}
    c.t += 600
    s.ensure_plan(fleet(), fp(fleet()), [_slo_req(9.0)], CurrentPlacement())
    assert s.capacity_corrections == {} and configs[-1].island_capacity_scale == {}
    # a spec change (here the allowed TP degrees) drops the model's corrections: they were measured for the old spec
    c.t += 61
    ensure(9.0)
    c.t += 61
    assert ensure(9.0).trigger == "slo"
    assert s.capacity_corrections
    from dataclasses import replace

    o = s.ensure_plan(fleet(), fp(fleet()), [replace(_slo_req(9.0), allowed_tp=(1,))], CurrentPlacement())
    assert o.trigger == "spec" and s.capacity_corrections == {} and configs[-1].island_capacity_scale == {}


def test_measured_islands_match_the_pods_island_label_and_skip_stale_observations() -> None:
    from archipelago.controller.handlers import measured_islands
    from archipelago.observe.metrics import IslandObservation as Obs
    from archipelago.observe.metrics import ObservedWorkload

    plan = _island_plan(_island("llm/chat/h100/tp1", 1, 6.0, 0.9), _island("llm/chat/l4/tp2", 1, 1.0, 0.5))
    obs = ObservedWorkload("vllm", 30.0, 0.99, islands=(Obs("h100-tp1", 5.0), Obs("l4-tp2", 1.0), Obs("gone-tp1", 1.0)))
    got = measured_islands(plan, {"llm/chat": (None, obs, None)})
    assert {k: v.island for k, v in got.items()} == {"llm/chat/h100/tp1": "h100-tp1", "llm/chat/l4/tp2": "l4-tp2"}
    assert measured_islands(plan, {"llm/chat": (None, obs, "Prometheus unreachable")}) == {}  # stale: not judged
    assert measured_islands(None, {"llm/chat": (None, obs, None)}) == {}


def test_load_up_needs_a_rise_beyond_the_windows_counting_noise() -> None:
    """1.7 -> 2.3 req/s over a 30 s window is +35 % but 2.5 sigma of Poisson noise: no load-up; 1.7 -> 3.4 is."""
    s, p, c = svc(metrics_window_s=30, scale_down_window_s=0)
    s.ensure_plan(fleet(), fp(fleet()), [req(1.7)], CurrentPlacement())
    c.t += 5
    assert s.ensure_plan(fleet(), fp(fleet()), [req(2.3)], CurrentPlacement()).trigger == "none"
    assert s.ensure_plan(fleet(), fp(fleet()), [req(3.4)], CurrentPlacement()).trigger == "load-up"
    assert s.rise_is_significant(3.4, 4.5) and not s.rise_is_significant(1.0, 1.5)


def test_capacity_headroom_is_an_operator_knob_the_planner_receives() -> None:
    assert PlanningService(OperatorConfig()).planner_config().headroom == pytest.approx(0.1)
    cfg = OperatorConfig.from_env({"ARCHIPELAGO_CAPACITY_HEADROOM": "0.25"})
    assert PlanningService(cfg).planner_config().headroom == pytest.approx(0.25)
    assert PlanningService(OperatorConfig(capacity_headroom=0)).planner_config().headroom == 0
    for bad in ("0.95", "-0.1"):
        with pytest.raises(ValueError, match="capacity_headroom"):
            OperatorConfig.from_env({"ARCHIPELAGO_CAPACITY_HEADROOM": bad})
    with pytest.raises(ValueError, match="ARCHIPELAGO_CAPACITY_HEADROOM"):
        OperatorConfig.from_env({"ARCHIPELAGO_CAPACITY_HEADROOM": "ten percent"})


def test_headroom_is_dropped_only_when_the_fleet_cannot_serve_the_load_with_it() -> None:
    """Real planner (fake catalogue): one replica at most; at 95 % of its capacity the 10 % headroom would
    drop load, so the operator plans at capacity and says so; at 50 % it keeps the headroom, one solve."""
    from functools import partial

    from archipelago.controller.planning import plan_with_headroom, served_rate
    from archipelago.decide.planner.planner import plan as real_plan
    from archipelago.decide.planner.types import PlannerConfig
    from archipelago.decide.sim import SLOTarget
    from test_planner_fakes import GPUS, FakeCatalog, FModel, fake_perf_factory
    from test_planner_fakes import fleet as fake_fleet
    from test_planner_fakes import pool as fake_pool

    calls: list[float] = []

    def planner(fleet, models, current, config, previous):
        calls.append(config.headroom)
        return real_plan(fleet, models, config=config, gpu_catalog=FakeCatalog(GPUS), perf_factory=fake_perf_factory,
                         current=current, previous=previous)

    fl = fake_fleet(fake_pool("ps", "small", 4))
    slo = SLOTarget(ttft_s=2.0, tpot_s=0.05)

    def request(rate):
        return ModelRequest("ns/a", FModel("a", 14), slo, Workload(rate_rps=rate, input_mean=1000, output_mean=200),
                            max_replicas=1, allowed_tp=(1,))

    cfg = PlannerConfig(inner_time_limit_s=10, packing_time_limit_s=5, headroom=0.1)
    at_cap = planner(fl, [request(0.5)], None, dataclasses.replace(cfg, headroom=0.0), None)
    assert at_cap.feasible
    (isl,) = at_cap.islands
    capacity = 0.5 / isl.utilization  # req/s one replica carries at the SLO
    solve = partial(plan_with_headroom, planner, fleet=fl, current=None, config=cfg, previous=None)

    calls.clear()
    roomy = solve(models=[request(0.5 * capacity)])
    assert calls == [0.1] and roomy.params["headroom"] == 0.1 and roomy.feasible
    assert not [i for i in roomy.infeasibilities if i.constraint == "headroom"]

    calls.clear()
    models = [request(0.95 * capacity)]
    tight = solve(models=models)
    assert calls == [0.1, 0.0]
    assert tight.params["headroom"] == 0.0 and served_rate(tight, models) == pytest.approx(0.95 * capacity)
    (note,) = [i for i in tight.infeasibilities if i.constraint == "headroom"]
    assert note.model == "ns/a" and note.served_fraction == 1.0 and "10%" in note.detail and "add GPUs" in note.suggestion
