"""Plan -> objects, rollouts that never drop capacity, status and Events (pure controller logic)."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta

import pytest

from archipelago.act.engine import parse_flags
from archipelago.api.v1alpha1 import GPUPool, ModelDeployment, ServingSLO
from archipelago.controller import reconcile as rc
from archipelago.decide.planner.types import (
    EngineSettings,
    Infeasibility,
    IslandPlan,
    ModelPlan,
    Plan,
    PodAssignment,
    RangeShare,
)
from archipelago.observe.metrics import ObservedWorkload

MD = ModelDeployment.from_k8s({
    "apiVersion": "archipelago.dev/v1alpha1", "kind": "ModelDeployment",
    "metadata": {"name": "chat", "namespace": "llm", "uid": "uid-1", "generation": 3},
    "spec": {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"},
             "engine": {"kind": "vllm", "maxModelLen": 8192, "extraArgs": ["--enable-prefix-caching"]},
             "sloRef": "interactive", "workloadHint": {"requestsPerSecond": 5, "meanInputTokens": 1000,
                                                       "meanOutputTokens": 200}},
})
POOLS = {
    "h100": GPUPool.from_k8s({"apiVersion": "archipelago.dev/v1alpha1", "kind": "GPUPool", "metadata": {"name": "h100"},
                              "spec": {"nodeSelector": {"matchLabels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}},
                                       "gpu": {"type": "H100-SXM"},
                                       "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm",
                                                        "effect": "NoSchedule"}]}}),
    "l4": GPUPool.from_k8s({"apiVersion": "archipelago.dev/v1alpha1", "kind": "GPUPool", "metadata": {"name": "l4"},
                            "spec": {"nodeSelector": {"matchLabels": {"nvidia.com/gpu.product": "NVIDIA-L4"}},
                                     "gpu": {"type": "L4"}}}),
}
SLO = ServingSLO.from_k8s({"apiVersion": "archipelago.dev/v1alpha1", "kind": "ServingSLO",
                           "metadata": {"name": "interactive", "namespace": "llm"},
                           "spec": {"ttft": {"seconds": 1.0}, "tpot": {"seconds": 0.1}}})
ES = EngineSettings(max_num_seqs=128, gpu_memory_utilization=0.9, max_model_len=16384, max_num_batched_tokens=8192)


def island(pool, gpu, tp, replicas, lo=0.0, hi=float("inf"), share=1.0):
    iid = f"llm/chat/{pool}/tp{tp}"
    return IslandPlan(id=iid, model="llm/chat", pool=pool, gpu=gpu, tp=tp, replicas=replicas, role="mixed",
                      ranges=(RangeShare(lo, hi, share, 1.0),), input_range=(lo, hi), traffic_share=share,
                      engine=ES, cost_per_hour=1.0, power_w=100.0, utilization=0.5, ttft_p99_s=0.3, tpot_p99_s=0.05)


def make_plan(islands, assignments=(), infeas=()):
    routing = tuple((0.0, 2048.0, {i.id: 1.0}) for i in islands[:1]) + tuple(
        (2048.0, float("inf"), {i.id: 1.0}) for i in islands[1:2])
    mp = ModelPlan(model="llm/chat", islands=tuple(islands), routing=routing, served_fraction=1.0,
                   cost_per_hour=sum(i.cost_per_hour for i in islands), power_w=200.0, ttft_p99_s=0.3,
                   tpot_p99_s=0.05, attainment=0.995)
    return Plan(models=(mp,), assignments=tuple(assignments), cost_per_hour=mp.cost_per_hour, power_w=200.0,
                infeasibilities=tuple(infeas)), mp


def test_renders_carry_plan_and_spec() -> None:
    plan, mp = make_plan([island("h100", "H100-SXM", 2, 2, hi=2048.0), island("l4", "L4", 1, 3, lo=2048.0)],
                         [PodAssignment("llm/chat/h100/tp2", "p0", "h100-0", 2),
                          PodAssignment("llm/chat/h100/tp2", "p1", "h100-1", 2)])
    renders, routes = rc.renders_for_model(MD, mp, plan, POOLS)
    r = {x.island: x for x in renders}
    assert set(r) == {"h100-tp2", "l4-tp1"}
    h = r["h100-tp2"]
    assert h.engine.tensor_parallel == 2 and h.replicas == 2 and h.node_names == ("h100-0", "h100-1")
    assert h.engine.max_model_len == 8192  # spec wins over the planner's 16384
    assert h.engine.max_num_seqs == 128  # planner's choice (spec unset)
    assert h.tolerations[0]["key"] == "dedicated"
    assert h.pool_selector["matchLabels"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert r["l4-tp1"].node_pinning == "none"  # no assignment -> pool only
    assert [(x["minInputTokens"], x["maxInputTokens"]) for x in routes] == [(0, 2048), (2048, None)]
    objs = rc.desired_objects(MD, renders, routes, plan.plan_id)
    dep = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "chat-h100-tp2")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    f = parse_flags(c["args"])
    assert f["--tensor-parallel-size"] == "2" and f["--max-num-seqs"] == "128" and f["--max-model-len"] == "8192"
    assert "--enable-prefix-caching" in f
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert dep["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    cm = next(o for o in objs if o["kind"] == "ConfigMap")
    assert json.loads(cm["data"]["routes.json"])["routes"][1]["backends"][0]["service"] == "chat-l4-tp1.llm.svc"


def _live(obj, available=True, replicas=None):
    lv = copy.deepcopy(obj)
    lv["metadata"]["uid"] = "u-" + obj["metadata"]["name"]
    lv["metadata"]["generation"] = 1
    if obj["kind"] == "Deployment":
        n = obj["spec"]["replicas"] if replicas is None else replicas
        lv["spec"]["replicas"] = n
        if replicas is not None:
            lv = rc.stamp(lv)
        lv["status"] = {"observedGeneration": 1, "updatedReplicas": n, "availableReplicas": n if available else 0}
    return lv


def _objs(islands):
    plan, mp = make_plan(islands)
    renders, routes = rc.renders_for_model(MD, mp, plan, POOLS)
    return rc.desired_objects(MD, renders, routes, plan.plan_id)


def test_rollout_creates_new_before_removing_old() -> None:
    old = _objs([island("h100", "H100-SXM", 2, 2)])
    new = _objs([island("l4", "L4", 1, 4)])
    live = {(o["kind"], o["metadata"]["name"]): _live(o) for o in old}
    step = rc.rollout(new, live)
    applied = {(o["kind"], o["metadata"]["name"]) for o in step.apply}
    assert ("Deployment", "chat-l4-tp1") in applied
    assert ("ConfigMap", "chat-routing") not in applied  # routes switch only once l4 can serve
    assert step.delete == []  # new island not available yet: the old one stays
    assert step.retained == ["chat-h100-tp2"] and step.waiting == ["chat-l4-tp1"]
    # new island comes up but not yet available -> still retained
    live.update({(o["kind"], o["metadata"]["name"]): _live(o, available=False) for o in new
                 if o["kind"] != "ConfigMap"})
    assert ("ConfigMap", "chat-routing") not in {(o["kind"], o["metadata"]["name"]) for o in rc.rollout(new, live).apply}
    step = rc.rollout(new, live)
    assert step.delete == [] and step.retained == ["chat-h100-tp2"]
    # available -> the routes switch to the new island (stamped with the time); the old one still serves
    live.update({(o["kind"], o["metadata"]["name"]): _live(o) for o in new if o["kind"] != "ConfigMap"})
    step = rc.rollout(new, live, now=1000.0, drain_s=30.0)
    assert [o["kind"] for o in step.apply] == ["ConfigMap"]  # now the routes move to the new island
    cm = step.apply[0]
    assert cm["metadata"]["annotations"]["archipelago.dev/routes-switched-at"] == "1000.000"
    assert rc.content_hash(cm) == rc.content_hash(next(o for o in new if o["kind"] == "ConfigMap"))
    assert step.delete == [] and step.retained == ["chat-h100-tp2"] and step.draining_s == 30.0
    live[("ConfigMap", "chat-routing")] = _live(cm)
    # draining: routers re-read the routes and requests in flight finish on the old island
    step = rc.rollout(new, live, now=1010.0, drain_s=30.0)
    assert step.apply == [] and step.delete == [] and step.retained == ["chat-h100-tp2"]
    assert step.draining_s == pytest.approx(20.0)
    # a periodic re-apply keeps the switch time
    step = rc.rollout(new, live, force_apply=True, now=1011.0, drain_s=30.0)
    cm2 = next(o for o in step.apply if o["kind"] == "ConfigMap")
    assert cm2["metadata"]["annotations"]["archipelago.dev/routes-switched-at"] == "1000.000"
    # drained -> old Deployment and Service removed
    step = rc.rollout(new, live, now=1031.0, drain_s=30.0)
    assert ("Deployment", "chat-h100-tp2", "u-chat-h100-tp2") in step.delete
    assert ("Service", "chat-h100-tp2", "u-chat-h100-tp2") in step.delete
    assert step.apply == [] and step.draining_s == 0.0


def test_shrinking_island_holds_replicas_until_others_available() -> None:
    before = _objs([island("h100", "H100-SXM", 2, 4)])
    after = _objs([island("h100", "H100-SXM", 2, 2), island("l4", "L4", 1, 2, lo=2048.0)])
    live = {(o["kind"], o["metadata"]["name"]): _live(o) for o in before}
    step = rc.rollout(after, live)
    deps = {o["metadata"]["name"]: o for o in step.apply if o["kind"] == "Deployment"}
    assert "chat-l4-tp1" in deps
    assert "chat-h100-tp2" not in deps  # only its replica count changes: held at 4, nothing to write yet
    step = rc.rollout(after, live)
    assert "chat-h100-tp2" not in {o["metadata"]["name"] for o in step.apply}  # held version already live
    assert step.waiting == ["chat-l4-tp1"]
    live.update({(o["kind"], o["metadata"]["name"]): _live(o) for o in after
                 if o["metadata"]["name"] not in ("chat-h100-tp2", "chat-routing")})
    step = rc.rollout(after, live, now=50.0, drain_s=20.0)
    assert [o["kind"] for o in step.apply] == ["ConfigMap"]  # routes switch first; h100 still held at 4
    live[("ConfigMap", "chat-routing")] = _live(step.apply[0])
    assert rc.rollout(after, live, now=60.0, drain_s=20.0).apply == []
    step = rc.rollout(after, live, now=71.0, drain_s=20.0)
    deps = {o["metadata"]["name"]: o for o in step.apply if o["kind"] == "Deployment"}
    assert deps["chat-h100-tp2"]["spec"]["replicas"] == 2  # drained: now it shrinks


def test_deleted_deployment_is_reapplied_and_unchanged_is_not() -> None:
    objs = _objs([island("h100", "H100-SXM", 2, 2)])
    live = {(o["kind"], o["metadata"]["name"]): _live(o) for o in objs}
    assert rc.rollout(objs, live).apply == []
    assert rc.rollout(objs, live).complete
    del live[("Deployment", "chat-h100-tp2")]
    step = rc.rollout(objs, live)
    assert [o["metadata"]["name"] for o in step.apply] == ["chat-h100-tp2"]
    assert len(rc.rollout(objs, {k: v for k, v in live.items()}, force_apply=True).apply) == len(objs)


def test_status_conditions_and_events() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    facts = rc.ModelFacts(planned=True, plan_reason="PlanApplied", plan_message="plan x", available=False,
                          waiting=["chat-l4-tp1"], slo_at_risk=("Unknown", "NoLatencyMetrics", "none"))
    s1 = rc.build_status(None, 3, now, facts, {"planId": "x"}, None, (2, 4, 15.96))
    conds = {c["type"]: c for c in s1["conditions"]}
    assert set(conds) == set(rc.CONDITION_TYPES)
    assert conds["Planned"]["status"] == "True" and conds["Planned"]["observedGeneration"] == 3
    assert conds["Available"]["reason"] == "RollingOut" and s1["phase"] == "Planning"
    assert s1["gpus"] == 4 and s1["dollarsPerHour"] == 15.96
    assert rc.condition_events(None, s1["conditions"]) == []  # first good/rolling state: no news
    later = now + timedelta(minutes=1)
    facts2 = rc.ModelFacts(planned=True, plan_reason="PlanApplied", plan_message="plan x", available=True,
                           infeasible=("InsufficientGPUs", "serves 60% of the load"),
                           slo_at_risk=("Unknown", "NoLatencyMetrics", "none"))
    s2 = rc.build_status(s1, 3, later, facts2, None, None, None)
    c2 = {c["type"]: c for c in s2["conditions"]}
    assert c2["Planned"]["lastTransitionTime"] == conds["Planned"]["lastTransitionTime"]  # unchanged status
    assert c2["Available"]["lastTransitionTime"] == "2026-01-01T00:01:00Z"
    assert s2["plan"] == {"planId": "x"}  # kept when not recomputed
    ev = rc.condition_events(s1["conditions"], s2["conditions"])
    assert ("Warning", "InsufficientGPUs") in [(t, r) for t, r, _ in ev]
    assert ("Normal", "AllIslandsAvailable") in [(t, r) for t, r, _ in ev]
    assert s2["phase"] == "Degraded"
    assert not rc.status_changed(s2, dict(s2))


def test_infeasible_without_plan_phase() -> None:
    facts = rc.ModelFacts(planned=False, plan_reason="Infeasible", plan_message="m",
                          infeasible=("TTFTUnattainable", "m"))
    s = rc.build_status(None, 1, datetime(2026, 1, 1, tzinfo=UTC), facts, None, None, None)
    assert s["phase"] == "Infeasible"
    assert ("Warning", "TTFTUnattainable") in [(t, r) for t, r, _ in rc.condition_events(None, s["conditions"])]


def test_slo_risk_from_measurements_and_predictions() -> None:
    obs = ObservedWorkload(engine="vllm", window_s=300, quantile=0.99, ttft_p_s=1.5, itl_p_s=0.05)
    st, reason, msg = rc.slo_risk(obs, SLO, None)
    assert (st, reason) == ("True", "ObservedLatencyAboveSLO") and "TTFT" in msg
    obs_ok = ObservedWorkload(engine="vllm", window_s=300, quantile=0.99, ttft_p_s=0.5)
    assert rc.slo_risk(obs_ok, SLO, None)[0] == "False"
    _, mp = make_plan([island("h100", "H100-SXM", 2, 2)])
    assert rc.slo_risk(None, SLO, mp)[0] == "Unknown"
    assert rc.slo_risk(None, None, mp)[1] == "SLONotFound"


def test_infeasibility_summary() -> None:
    plan, _ = make_plan([island("h100", "H100-SXM", 2, 2)], infeas=[
        Infeasibility("llm/chat", "pool-capacity", "needs 16 GPUs, 8 free", "add nodes", served_fraction=0.5),
        Infeasibility("llm/other", "memory", "x", "y", served_fraction=0.0),
        Infeasibility("llm/chat", "unsupported", "note", "none", served_fraction=1.0)])
    reason, msg = rc.infeasibility_for(plan, "llm/chat")
    assert reason == "InsufficientGPUs" and "50.00%" in msg and "add nodes" in msg
    assert rc.infeasibility_for(plan, "llm/chat", attainment=0.4) is None  # the SLO allows losing 60 %
    assert "pool-capacity" in rc.partial_notes(plan, "llm/chat") and "unsupported" in rc.partial_notes(plan, "llm/chat")
    assert rc.infeasibility_for(make_plan([island("h100", "H100-SXM", 2, 2)])[0], "llm/chat") is None


def test_plan_status_shape_validates_against_api() -> None:
    from archipelago.api.v1alpha1 import ModelDeploymentStatus

    plan, mp = make_plan([island("h100", "H100-SXM", 2, 2, hi=2048.0), island("l4", "L4", 1, 3, lo=2048.0)])
    renders, _ = rc.renders_for_model(MD, mp, plan, POOLS)
    block = rc.plan_status(mp, plan, datetime(2026, 1, 1, tzinfo=UTC), renders)
    facts = rc.ModelFacts(planned=True, plan_reason="PlanApplied", plan_message="ok", available=True)
    st = rc.build_status(None, 1, datetime(2026, 1, 1, tzinfo=UTC), facts, block,
                         {"requestsPerSecond": 5.0, "source": "hint"}, (5, 7, 10.0))
    parsed = ModelDeploymentStatus.model_validate(st)
    assert parsed.plan.islands[0].input_tokens.max == 2048
    assert parsed.plan.islands[1].input_tokens.max is None
    assert parsed.phase == "Ready"


def test_node_preference_or_plan_id_alone_do_not_rewrite() -> None:
    plan1, mp1 = make_plan([island("h100", "H100-SXM", 2, 2)], [PodAssignment("llm/chat/h100/tp2", "p0", "h100-0", 2)])
    plan2, mp2 = make_plan([island("h100", "H100-SXM", 2, 2)], [PodAssignment("llm/chat/h100/tp2", "p0", "h100-1", 2)])
    o1 = rc.desired_objects(MD, *rc.renders_for_model(MD, mp1, plan1, POOLS), plan1.plan_id)
    o2 = rc.desired_objects(MD, *rc.renders_for_model(MD, mp2, plan2, POOLS), plan2.plan_id)
    assert plan1.plan_id != plan2.plan_id
    live = {(o["kind"], o["metadata"]["name"]): _live(o) for o in o1}
    assert rc.rollout(o2, live).apply == []
    # required pinning is part of the hash: a moved node means a new template
    r1 = rc.desired_objects(MD, *rc.renders_for_model(MD, mp1, plan1, POOLS, "required"), plan1.plan_id)
    r2 = rc.desired_objects(MD, *rc.renders_for_model(MD, mp2, plan2, POOLS, "required"), plan2.plan_id)
    live = {(o["kind"], o["metadata"]["name"]): _live(o) for o in r1}
    assert [o["kind"] for o in rc.rollout(r2, live).apply] == ["Deployment"]


def test_metadata_only_reapply_keeps_live_node_preference() -> None:
    plan1, mp1 = make_plan([island("h100", "H100-SXM", 2, 2, hi=2048.0)],
                           [PodAssignment("llm/chat/h100/tp2", "p0", "h100-0", 2)])
    # same island, other routing range (metadata annotation) and another preferred node
    plan2, mp2 = make_plan([island("h100", "H100-SXM", 2, 2, hi=4096.0)],
                           [PodAssignment("llm/chat/h100/tp2", "p0", "h100-1", 2)])
    o1 = rc.desired_objects(MD, *rc.renders_for_model(MD, mp1, plan1, POOLS), "a")
    o2 = rc.desired_objects(MD, *rc.renders_for_model(MD, mp2, plan2, POOLS), "b")
    live = {(o["kind"], o["metadata"]["name"]): _live(o) for o in o1}
    dep = next(o for o in rc.rollout(o2, live).apply if o["kind"] == "Deployment")
    assert dep["metadata"]["annotations"]["archipelago.dev/input-range"] == "0-4096"
    pref = dep["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert pref[0]["preference"]["matchFields"][0]["values"] == ["h100-0"]  # live preference kept: no pod roll
    assert rc.spec_hash(dep) == rc.spec_hash(live[("Deployment", "chat-h100-tp2")])


def _island_scaled_from_2_to_3():
    """Objects of an H100 TP2 island at 2 replicas (live) and at 3 with another packing node choice."""
    plan1, mp1 = make_plan([island("h100", "H100-SXM", 2, 2)],
                           [PodAssignment("llm/chat/h100/tp2", f"p{k}", "h100-0", 2) for k in range(2)])
    plan2, mp2 = make_plan([island("h100", "H100-SXM", 2, 3)],
                           [PodAssignment("llm/chat/h100/tp2", f"p{k}", f"h100-{k}", 2) for k in range(3)])
    o1 = rc.desired_objects(MD, *rc.renders_for_model(MD, mp1, plan1, POOLS), "a")
    o2 = rc.desired_objects(MD, *rc.renders_for_model(MD, mp2, plan2, POOLS), "b")
    return o1, o2, {(o["kind"], o["metadata"]["name"]): _live(o) for o in o1}


def test_scaling_an_island_keeps_the_live_node_preference_so_running_pods_are_not_replaced() -> None:
    o1, o2, live = _island_scaled_from_2_to_3()
    d1 = next(o for o in o1 if o["kind"] == "Deployment")
    d2 = next(o for o in o2 if o["kind"] == "Deployment")
    assert d1["spec"]["template"] != d2["spec"]["template"]  # the packing's node choice changed
    dep = next(o for o in rc.rollout(o2, live).apply if o["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["template"] == live[("Deployment", dep["metadata"]["name"])]["spec"]["template"]  # no roll


def test_node_preference_is_kept_against_a_live_object_with_server_defaults() -> None:
    """The API server adds defaults to a Deployment's spec (strategy, revisionHistoryLimit, container
    defaults ...): the decision must come from the stamped template hash, not from hashing the live spec."""
    o1, o2, live = _island_scaled_from_2_to_3()
    name = next(o["metadata"]["name"] for o in o1 if o["kind"] == "Deployment")
    lv = live[("Deployment", name)]
    lv["spec"]["revisionHistoryLimit"] = 10
    lv["spec"]["strategy"] = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}
    lv["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] = "/dev/termination-log"
    dep = next(o for o in rc.rollout(o2, live).apply if o["kind"] == "Deployment")
    want = lv["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert dep["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"] == want and dep["spec"]["replicas"] == 3
    # a real template change (another engine image) still writes the new preference
    o3 = json.loads(json.dumps(o2))
    d3 = next(o for o in o3 if o["kind"] == "Deployment")
    d3["spec"]["template"]["spec"]["containers"][0]["image"] = "vllm/vllm-openai:v9"
    rc.stamp(d3)
    dep3 = next(o for o in rc.rollout(o3, live).apply if o["kind"] == "Deployment")
    assert dep3["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"] != want
