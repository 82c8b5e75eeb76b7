"""Unit tests of the archipelago.dev/v1alpha1 pydantic models and the condition helpers."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from archipelago.api import (
    GPUPool,
    ModelDeployment,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
    Objective,
    ResourceValidationError,
    ServingSLO,
    ServingSLOSpec,
    get_condition,
    is_true,
    parse_resource,
    remove_condition,
    set_condition,
)
from archipelago.api.crdgen import generate_crds

# ---------------------------------------------------------------------------------------------
# Minimal valid objects
# ---------------------------------------------------------------------------------------------


def md(**spec: Any) -> dict[str, Any]:
    base = {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"}, "sloRef": "interactive"}
    base.update(spec)
    return {
        "apiVersion": "archipelago.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "llama", "namespace": "llm", "generation": 3},
        "spec": base,
    }


def slo(**spec: Any) -> dict[str, Any]:
    base = {"ttft": {"seconds": 1.0, "percentile": 90}, "tpot": {"seconds": 0.1, "percentile": 90}}
    base.update(spec)
    return {"apiVersion": "archipelago.dev/v1alpha1", "kind": "ServingSLO", "metadata": {"name": "chat", "namespace": "llm"}, "spec": base}


def pool(**spec: Any) -> dict[str, Any]:
    base = {
        "nodeSelector": {"matchLabels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}},
        "gpu": {"type": "H100-SXM"},
    }
    base.update(spec)
    return {"apiVersion": "archipelago.dev/v1alpha1", "kind": "GPUPool", "metadata": {"name": "h100"}, "spec": base}


def reject(obj: dict[str, Any]) -> ResourceValidationError:
    with pytest.raises(ResourceValidationError) as info:
        parse_resource(obj)
    return info.value


# ---------------------------------------------------------------------------------------------
# Defaults, aliases, round trips
# ---------------------------------------------------------------------------------------------


def test_minimal_model_deployment_gets_defaults() -> None:
    m = ModelDeployment.from_k8s(md())
    assert m.metadata.namespace == "llm" and m.metadata.generation == 3
    assert m.spec.engine.kind == "vllm"
    assert m.spec.engine.gpu_memory_utilization == pytest.approx(0.9)
    assert m.spec.replicas.min == 1 and m.spec.replicas.max is None
    assert m.spec.placement.disaggregation == "none"
    assert m.spec.placement.tensor_parallel == []
    assert m.spec.priority == 0 and m.spec.paused is False


def test_minimal_slo_defaults_to_cost_preset_and_p99_attainment() -> None:
    s = ServingSLO.from_k8s(slo())
    assert s.spec.attainment == pytest.approx(0.99)
    assert s.spec.objective.preset == "cost" and s.spec.objective.weights is None
    w = s.spec.objective.resolved_weights()
    assert (w.cost, w.latency, w.energy) == (1.0, 0.0, 0.0)


def test_objective_presets_resolve_to_weights() -> None:
    b = Objective(preset="balanced").resolved_weights()
    assert (b.cost, b.latency, b.energy) == (1.0, 1.0, 1.0)
    e = Objective(preset="energy").resolved_weights()
    assert (e.cost, e.latency, e.energy) == (0.0, 0.0, 1.0)
    given = Objective(weights={"cost": 2, "latency": 0.5})
    assert given.resolved_weights().cost == 2.0 and given.resolved_weights().energy == 0.0


def test_snake_case_and_camel_case_both_accepted_and_output_is_camel_case() -> None:
    by_alias = ModelDeploymentSpec.model_validate(
        {"model": {"name": "x"}, "sloRef": "s", "engine": {"gpuMemoryUtilization": 0.8, "maxNumSeqs": 64}}
    )
    by_name = ModelDeploymentSpec(model={"name": "x"}, slo_ref="s", engine={"gpu_memory_utilization": 0.8, "max_num_seqs": 64})
    assert by_alias == by_name
    out = by_name.to_dict()
    assert out["sloRef"] == "s"
    assert out["engine"]["gpuMemoryUtilization"] == 0.8 and out["engine"]["maxNumSeqs"] == 64
    assert "slo_ref" not in out and "max_model_len" not in out["engine"] and "maxModelLen" not in out["engine"]


def test_from_k8s_refuses_snake_case_keys_the_api_server_would_prune() -> None:
    err = reject(md(slo_ref="x"))
    assert any(path == "spec.slo_ref" for path, _ in err.errors), err.errors
    s = ServingSLO.from_k8s(slo(e2e={"seconds": 30}))
    assert s.spec.e2e is not None and s.spec.e2e.seconds == 30
    assert "e2e" in s.spec.to_dict()


def test_gpu_pool_irregular_aliases() -> None:
    p = GPUPool.from_k8s(
        pool(gpu={"type": "H100-SXM", "memoryGiB": 80, "hbmGBps": 3350, "tflopsBf16": 989, "tdpWatts": 700},
             pricing={"onDemandPerGPUHour": 3.99, "spotPerGPUHour": 2.1, "useSpot": True})
    )
    assert p.spec.gpu.memory_gib == 80 and p.spec.gpu.hbm_gbps == 3350 and p.spec.gpu.tflops_bf16 == 989
    assert p.spec.pricing.effective_per_gpu_hour() == pytest.approx(2.1)
    assert p.spec.resource_name == "nvidia.com/gpu"
    d = p.to_k8s()
    assert d["spec"]["gpu"]["memoryGiB"] == 80 and d["spec"]["pricing"]["onDemandPerGPUHour"] == 3.99
    assert d["apiVersion"] == "archipelago.dev/v1alpha1" and d["kind"] == "GPUPool"
    assert GPUPool.from_k8s(d) == p


def test_round_trip_of_full_status() -> None:
    t = datetime(2025, 3, 1, 12, 0, 5, 123456, tzinfo=UTC)
    status = {
        "phase": "Ready",
        "plan": {
            "islands": [
                {"name": "h100-tp4-prefill", "pool": "h100", "gpu": "H100-SXM", "tp": 4, "replicas": 2, "role": "prefill",
                 "inputTokens": {"min": 0, "max": 4096}, "trafficShare": 0.7, "engineArgs": {"maxNumSeqs": 128, "chunked": True}},
            ],
            "predicted": {"dollarsPerHour": 31.9, "ttftP99Seconds": 0.42, "tpotP99Seconds": 0.05, "attainment": 0.995, "watts": 4100},
            "paretoFront": [{"dollarsPerHour": 31.9, "attainment": 0.995, "chosen": True}],
            "planTime": t.isoformat(),
            "planId": "abc123",
        },
        "observed": {"requestsPerSecond": 5.5, "source": "prometheus"},
        "replicas": 2,
        "gpus": 8,
        "dollarsPerHour": 31.92,
        "conditions": [{"type": "Ready", "status": "True", "reason": "PlanApplied", "message": "ok",
                        "observedGeneration": 3, "lastTransitionTime": "2025-03-01T12:00:05Z"}],
        "observedGeneration": 3,
    }
    obj = md()
    obj["status"] = status
    m = ModelDeployment.from_k8s(obj)
    assert m.status is not None and m.status.plan is not None
    island = m.status.plan.islands[0]
    assert island.input_tokens.max == 4096 and island.engine_args == {"maxNumSeqs": 128, "chunked": True}
    out = m.status.to_dict()
    assert out["plan"]["planTime"] == "2025-03-01T12:00:05Z"  # metav1.Time: seconds, Z
    assert out["conditions"][0]["lastTransitionTime"] == "2025-03-01T12:00:05Z"
    assert out["plan"]["islands"][0]["trafficShare"] == 0.7
    assert ModelDeploymentStatus.model_validate(out).to_dict() == out


def test_status_ignores_unknown_fields_but_spec_refuses_them() -> None:
    obj = md()
    obj["status"] = {"phase": "Pending", "fieldFromANewerOperator": 1}
    assert ModelDeployment.from_k8s(obj).status.phase == "Pending"
    err = reject(md(enigne={"kind": "vllm"}))
    assert any(path == "spec.enigne" for path, _ in err.errors)


def test_from_k8s_accepts_read_only_mappings_like_kopf_body() -> None:
    class Frozen(Mapping[str, Any]):
        def __init__(self, d: dict[str, Any]) -> None:
            self._d = d

        def __getitem__(self, k: str) -> Any:
            v = self._d[k]
            return Frozen(v) if isinstance(v, dict) else v

        def __iter__(self) -> Iterator[str]:
            return iter(self._d)

        def __len__(self) -> int:
            return len(self._d)

    raw = md(placement={"tensorParallel": [4, 8]})
    m = ModelDeployment.from_k8s(Frozen(raw))
    assert m.spec.placement.tensor_parallel == [4, 8]


def test_from_k8s_does_not_mutate_its_input() -> None:
    raw = md()
    del raw["kind"]
    snapshot = copy.deepcopy(raw)
    ModelDeployment.model_validate(raw)
    assert raw == snapshot


def test_wrong_kind_or_api_version_is_refused() -> None:
    with pytest.raises(ResourceValidationError, match="expected 'ServingSLO'"):
        ServingSLO.from_k8s(md())
    bad = md()
    bad["apiVersion"] = "archipelago.dev/v1"
    with pytest.raises(ResourceValidationError, match="archipelago.dev/v1alpha1"):
        parse_resource(bad)
    with pytest.raises(ResourceValidationError, match="kind one of"):
        parse_resource({"apiVersion": "archipelago.dev/v1alpha1", "kind": "Pool"})


def test_error_message_names_object_source_and_fields() -> None:
    with pytest.raises(ResourceValidationError) as info:
        ModelDeployment.from_k8s(md(replicas={"min": 3, "max": 2}), source="samples/x.yaml")
    text = str(info.value)
    assert "ModelDeployment llm/llama (samples/x.yaml)" in text
    assert "spec.replicas: replicas.min must be <= replicas.max (got min=3, max=2)" in text
    assert info.value.errors == [("spec.replicas", "replicas.min must be <= replicas.max (got min=3, max=2)")]


# ---------------------------------------------------------------------------------------------
# Rejections: every rule names the field
# ---------------------------------------------------------------------------------------------

BAD_SPECS: list[tuple[str, dict[str, Any], str, str]] = [
    # (id, object, field path expected in the error, text expected in the error)
    ("replicas-min>max", md(replicas={"min": 4, "max": 2}), "spec.replicas", "replicas.min must be <= replicas.max"),
    ("tp-3", md(placement={"tensorParallel": [1, 3]}), "spec.placement", "powers of two"),
    ("tp-6", md(placement={"tensorParallel": [6]}), "spec.placement", "powers of two"),
    ("tp-16", md(placement={"tensorParallel": [16]}), "spec.placement.tensorParallel.0", "less than or equal to 8"),
    ("tp-0", md(placement={"tensorParallel": [0]}), "spec.placement.tensorParallel.0", "greater than or equal to 1"),
    ("tp-dup", md(placement={"tensorParallel": [2, 2]}), "spec.placement", "unique"),
    ("engine-unknown", md(engine={"kind": "tgi"}), "spec.engine.kind", "'vllm' or 'sglang'"),
    ("gmu-0", md(engine={"gpuMemoryUtilization": 0}), "spec.engine.gpuMemoryUtilization", "greater than 0"),
    ("gmu-1.2", md(engine={"gpuMemoryUtilization": 1.2}), "spec.engine.gpuMemoryUtilization", "less than or equal to 1"),
    ("no-slo-ref", {**md(), "spec": {"model": {"name": "x"}}}, "spec.sloRef", "Field required"),
    ("slo-ref-bad", md(sloRef="Interactive!"), "spec.sloRef", "pattern"),
    ("pd-one-replica", md(replicas={"min": 1, "max": 1}, placement={"disaggregation": "prefill-decode"}), "spec",
     "prefill-decode needs replicas.max >= 2"),
    ("kv-heads", md(model={"name": "x", "architecture": {"parametersB": 8, "layers": 32, "hiddenSize": 4096,
                                                          "attentionHeads": 32, "kvHeads": 6}}),
     "spec.model.architecture", "kvHeads must divide attentionHeads"),
    ("moe-topk", md(model={"name": "x", "architecture": {"parametersB": 47, "layers": 32, "hiddenSize": 4096,
                                                          "attentionHeads": 32, "moe": {"experts": 8, "expertsPerToken": 9}}}),
     "spec.model.architecture.moe", "moe.expertsPerToken must be <= moe.experts"),
    ("env-both", md(engine={"env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}),
     "spec.engine.env.0", "set value or valueFrom, not both"),
    ("env-source-none", md(engine={"env": [{"name": "A", "valueFrom": {}}]}), "spec.engine.env.0.valueFrom",
     "exactly one of secretKeyRef"),
    ("quant-unknown", md(model={"name": "x", "quantization": "nf3"}), "spec.model.quantization", "'fp8'"),
    ("attainment-0", slo(attainment=0), "spec.attainment", "greater than 0"),
    ("attainment-1.01", slo(attainment=1.01), "spec.attainment", "less than or equal to 1"),
    ("ttft-0", slo(ttft={"seconds": 0}), "spec.ttft.seconds", "greater than 0"),
    ("tpot-negative", slo(tpot={"seconds": -0.1}), "spec.tpot.seconds", "greater than 0"),
    ("percentile-0", slo(ttft={"seconds": 1, "percentile": 0}), "spec.ttft.percentile", "greater than 0"),
    ("percentile-101", slo(ttft={"seconds": 1, "percentile": 101}), "spec.ttft.percentile", "less than or equal to 100"),
    ("objective-both", slo(objective={"preset": "cost", "weights": {"cost": 1}}), "spec.objective",
     "exactly one of objective.preset or objective.weights"),
    ("objective-none", slo(objective={}), "spec.objective", "exactly one of objective.preset or objective.weights"),
    ("objective-unknown-preset", slo(objective={"preset": "cheap"}), "spec.objective.preset", "'cost'"),
    ("weights-zero", slo(objective={"weights": {"cost": 0, "latency": 0}}), "spec.objective.weights",
     "objective weights must not all be zero"),
    ("weights-negative", slo(objective={"weights": {"cost": -1, "energy": 2}}), "spec.objective.weights.cost",
     "greater than or equal to 0"),
    ("budget-zero", slo(budget={"maxDollarsPerHour": 0}), "spec.budget.maxDollarsPerHour", "greater than 0"),
    ("nodes-min>max", pool(nodes={"min": 5, "max": 2}), "spec.nodes", "nodes.min must be <= nodes.max"),
    ("price-negative", pool(pricing={"onDemandPerGPUHour": -1}), "spec.pricing.onDemandPerGPUHour", "greater than or equal to 0"),
    ("spot-missing", pool(pricing={"useSpot": True}), "spec.pricing", "spotPerGPUHour is not set"),
    ("power-idle>max", pool(power={"idleWatts": 800, "maxWatts": 700}), "spec.power", "power.idleWatts must be <= power.maxWatts"),
    ("selector-empty", pool(nodeSelector={}), "spec.nodeSelector", "nodeSelector must not be empty"),
    ("selector-in-no-values", pool(nodeSelector={"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In"}]}),
     "spec.nodeSelector.matchExpressions.0", "values must be non-empty for operators In/NotIn"),
    ("selector-exists-values", pool(nodeSelector={"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}),
     "spec.nodeSelector.matchExpressions.0", "empty for Exists/DoesNotExist"),
    ("selector-bad-key", pool(nodeSelector={"matchLabels": {"bad key!": "x"}}), "spec.nodeSelector", "matchLabels keys must be valid label keys"),
    ("resource-name", pool(resourceName="intel.com/gpu"), "spec.resourceName", "pattern"),
    ("toleration-exists-value", pool(tolerations=[{"key": "k", "operator": "Exists", "value": "v"}]), "spec.tolerations.0",
     "toleration value must be empty when operator is Exists"),
    ("toleration-no-key", pool(tolerations=[{"operator": "Equal", "value": "v"}]), "spec.tolerations.0",
     "a toleration without a key must use operator Exists"),
    ("toleration-seconds", pool(tolerations=[{"key": "k", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 30}]),
     "spec.tolerations.0", "tolerationSeconds only applies to effect NoExecute"),
    ("gpu-missing", {**pool(), "spec": {"nodeSelector": {"matchLabels": {"a": "b"}}}}, "spec.gpu", "Field required"),
]


@pytest.mark.parametrize(("obj", "field", "text"), [c[1:] for c in BAD_SPECS], ids=[c[0] for c in BAD_SPECS])
def test_invalid_specs_are_rejected_naming_the_field(obj: dict[str, Any], field: str, text: str) -> None:
    err = reject(obj)
    assert any(path == field and text in msg for path, msg in err.errors), err.errors
    assert field in str(err) and text in str(err)


def test_every_cel_rule_has_a_pydantic_twin_with_the_same_message() -> None:
    """Each x-kubernetes-validations message must be produced by pydantic for some bad spec above,
    so the API server (CEL) and the operator (pydantic) refuse the same specs with the same words."""
    messages: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for rule in node.get("x-kubernetes-validations", []):
                messages.add(rule["message"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(generate_crds())
    assert messages, "no CEL rules generated"
    produced: set[str] = set()
    for _id, obj, _field, _text in BAD_SPECS:
        try:
            parse_resource(obj)
        except ResourceValidationError as e:
            produced.update(msg for _p, msg in e.errors)
    missing = [m for m in messages if not any(p.startswith(m) for p in produced)]
    assert not missing, f"CEL rules whose message pydantic never produces in BAD_SPECS: {missing}"


def test_valid_edge_values_are_accepted() -> None:
    ServingSLO.from_k8s(slo(attainment=1.0, ttft={"seconds": 0.001, "percentile": 100}))
    ServingSLO.from_k8s(slo(objective={"weights": {"energy": 0.1}}))
    ModelDeployment.from_k8s(md(replicas={"min": 0, "max": 2}, placement={"tensorParallel": [1, 2, 4, 8],
                                                                           "disaggregation": "prefill-decode"}))
    ModelDeployment.from_k8s(md(engine={"kind": "sglang", "gpuMemoryUtilization": 1}))
    ModelDeployment.from_k8s(md(replicas={"min": 3, "max": 3}))
    GPUPool.from_k8s(pool(nodes={"min": 2, "max": 2}, resourceName="amd.com/gpu"))
    GPUPool.from_k8s(pool(resourceName="nvidia.com/mig-1g.10gb", tolerations=[{"operator": "Exists"}]))


# ---------------------------------------------------------------------------------------------
# set_condition
# ---------------------------------------------------------------------------------------------
T0 = datetime(2025, 1, 31, 12, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


def test_set_condition_appends_new_condition() -> None:
    out = set_condition(None, "Ready", "False", "Planning", "computing a plan", 1, T0)
    assert out == [{"type": "Ready", "status": "False", "reason": "Planning", "message": "computing a plan",
                    "lastTransitionTime": "2025-01-31T12:00:00Z", "observedGeneration": 1}]


def test_set_condition_keeps_transition_time_when_status_unchanged() -> None:
    first = set_condition([], "Ready", "True", "PlanApplied", "3 islands", 1, T0)
    again = set_condition(first, "Ready", "True", "PlanApplied", "4 islands", 2, T1)
    assert again[0]["lastTransitionTime"] == "2025-01-31T12:00:00Z"
    assert again[0]["message"] == "4 islands" and again[0]["observedGeneration"] == 2


def test_set_condition_moves_transition_time_when_status_changes() -> None:
    first = set_condition([], "Ready", "True", "PlanApplied", "", 1, T0)
    flipped = set_condition(first, "Ready", False, "NodeLost", "node gone", 1, T1)
    assert flipped[0]["status"] == "False" and flipped[0]["reason"] == "NodeLost"
    assert flipped[0]["lastTransitionTime"] == "2025-01-31T12:05:00Z"


def test_set_condition_is_pure_and_keeps_order_of_other_conditions() -> None:
    conds = set_condition([], "Planned", "True", "Solved", "", 1, T0)
    conds = set_condition(conds, "Ready", "False", "Rolling", "", 1, T0)
    conds = set_condition(conds, "Feasible", "True", "SLOMet", "", 1, T0)
    snapshot = copy.deepcopy(conds)
    out = set_condition(conds, "Ready", "True", "RolledOut", "", 2, T1)
    assert conds == snapshot
    assert [c["type"] for c in out] == ["Planned", "Ready", "Feasible"]
    assert out[0] == conds[0] and out[2] == conds[2]
    assert get_condition(out, "Ready")["reason"] == "RolledOut" and is_true(out, "Ready")
    assert not is_true(out, "Missing") and get_condition(out, "Missing") is None
    assert [c["type"] for c in remove_condition(out, "Planned")] == ["Ready", "Feasible"]


def test_set_condition_accepts_rfc3339_strings_and_other_timezones() -> None:
    out = set_condition([], "Ready", "Unknown", "Starting", "", None, "2025-01-31T13:00:00+01:00")
    assert out[0]["lastTransitionTime"] == "2025-01-31T12:00:00Z" and "observedGeneration" not in out[0]
    tz = timezone(timedelta(hours=-5))
    out = set_condition([], "Ready", "Unknown", "Starting", "", None, datetime(2025, 1, 31, 7, tzinfo=tz))
    assert out[0]["lastTransitionTime"] == "2025-01-31T12:00:00Z"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"status": "Yes"}, "condition status must be one of"),
        ({"reason": "slo infeasible"}, "condition reason 'slo infeasible' is not valid"),
        ({"reason": ""}, "condition reason"),
        ({"type": ""}, "condition type"),
        ({"now": datetime(2025, 1, 1)}, "no timezone"),
        ({"now": "yesterday"}, "not an RFC 3339 timestamp"),
        ({"generation": -1}, "generation must be >= 0"),
    ],
)
def test_set_condition_rejects_bad_input(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"type": "Ready", "status": "True", "reason": "Ok", "message": "", "generation": 1, "now": T0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        set_condition([], **args)


def test_conditions_from_set_condition_validate_against_the_status_model() -> None:
    conds = set_condition([], "Ready", "True", "PlanApplied", "x" * 40000, 7, T0)
    assert len(conds[0]["message"]) == 32768
    status = ModelDeploymentStatus.model_validate({"conditions": conds})
    assert status.to_dict()["conditions"] == conds


def test_pydantic_errors_are_validation_errors_for_direct_model_use() -> None:
    with pytest.raises(ValidationError, match="replicas.min must be <= replicas.max"):
        ModelDeploymentSpec.model_validate({"model": {"name": "x"}, "sloRef": "s", "replicas": {"min": 2, "max": 1}})
    with pytest.raises(ValidationError, match="attainment"):
        ServingSLOSpec.model_validate({"ttft": {"seconds": 1}, "tpot": {"seconds": 1}, "attainment": 0})
