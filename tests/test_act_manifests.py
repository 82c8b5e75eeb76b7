"""Pure manifest builders: Deployments, Services and routing ConfigMap per island."""

from __future__ import annotations

import json

import pytest

from archipelago.act.engine import EngineConfig, parse_flags
from archipelago.act.manifests import (
    ANN_ISLAND_ID,
    LABEL_ISLAND,
    LABEL_MANAGED_BY,
    LABEL_MODEL,
    IslandRender,
    OwnerRef,
    build_all,
    build_deployment,
    deployment_name,
    dns_label,
    label_value,
    routing_table,
)

OWNER = OwnerRef(name="chat", uid="1234-uid")
POOL_SEL = {"matchLabels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}


def island(**kw) -> IslandRender:
    base = dict(
        model="chat", namespace="llm", island="h100-tp2", pool="h100", gpu_type="H100-SXM", replicas=3,
        engine=EngineConfig(engine="vllm", model="meta-llama/Llama-2-13b-hf", tensor_parallel=2, max_num_seqs=64),
        pool_selector=POOL_SEL, node_names=("gpu-h100-1", "gpu-h100-0"),
        tolerations=({"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"},),
        input_range=(0, 2048), weight=2.0, island_id="llm/chat/h100/tp2",
    )
    base.update(kw)
    return IslandRender(**base)


def test_deployment_requests_tp_gpus_and_runs_engine() -> None:
    d = build_deployment(island(), OWNER)
    assert d["kind"] == "Deployment" and d["metadata"]["name"] == "chat-h100-tp2"
    assert d["spec"]["replicas"] == 3
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert c["command"] == ["vllm", "serve"]
    assert parse_flags(c["args"])["--tensor-parallel-size"] == "2"
    assert c["image"].startswith("vllm/vllm-openai")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["volumes"]
    assert c["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    ann = d["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "8000"
    assert ann[ANN_ISLAND_ID] == "llm/chat/h100/tp2"
    labels = d["spec"]["template"]["metadata"]["labels"]
    assert labels[LABEL_MANAGED_BY] == "archipelago" and labels[LABEL_MODEL] == "chat"
    assert labels[LABEL_ISLAND] == "h100-tp2"
    # selector is a subset of the pod labels
    assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert d["metadata"]["ownerReferences"][0]["uid"] == "1234-uid"
    assert d["metadata"]["ownerReferences"][0]["controller"] is True
    assert d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_affinity_pool_required_nodes_preferred_or_required() -> None:
    d = build_deployment(island(), OWNER)
    aff = d["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    term = aff["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert term["matchExpressions"] == [
        {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]}
    ]
    prefs = aff["preferredDuringSchedulingIgnoredDuringExecution"]
    # the API server allows one value per metadata.name field requirement: one preference per node
    assert [p["preference"]["matchFields"] for p in prefs] == [
        [{"key": "metadata.name", "operator": "In", "values": ["gpu-h100-0"]}],
        [{"key": "metadata.name", "operator": "In", "values": ["gpu-h100-1"]}]]
    d2 = build_deployment(island(node_pinning="required"), OWNER)
    aff2 = d2["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    terms2 = aff2["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert [t["matchFields"][0]["values"] for t in terms2] == [["gpu-h100-0"], ["gpu-h100-1"]]
    assert all(t["matchExpressions"] == term["matchExpressions"] for t in terms2)  # ORed terms keep the pool
    assert "preferredDuringSchedulingIgnoredDuringExecution" not in aff2


def test_tolerations_include_pool_taints_and_gpu_taint() -> None:
    tol = build_deployment(island(), OWNER)["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tol
    assert {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"} in tol


def test_amd_resource_and_sglang() -> None:
    isl = island(gpu_resource="amd.com/gpu", engine=EngineConfig(engine="sglang", model="m", tensor_parallel=8),
                 image="my/sglang:1")
    c = build_deployment(isl, OWNER)["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["amd.com/gpu"] == "8"
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert c["image"] == "my/sglang:1"
    assert c["ports"][0]["containerPort"] == 30000


def test_names_are_deterministic_and_bounded() -> None:
    long_model = "a-very-long-model-deployment-name-that-goes-on-and-on-and-on"
    n1 = deployment_name(long_model, "h100-sxm-tp8-prefill")
    n2 = deployment_name(long_model, "h100-sxm-tp8-decode")
    assert len(n1) <= 63 and len(n2) <= 63 and n1 != n2
    assert n1 == deployment_name(long_model, "h100-sxm-tp8-prefill")
    assert dns_label("Llama_2", "H100") == "llama-2-h100"
    assert dns_label("7b") == "x-7b"
    with pytest.raises(ValueError, match="name"):
        dns_label("--", "")
    assert len(label_value("x" * 100)) <= 63


def test_routing_table_normalises_weights_per_range() -> None:
    a = island(island="h100-tp2", weight=3.0, input_range=(0, 2048))
    b = island(island="a100-tp2", weight=1.0, input_range=(0, 2048), pool="a100")
    c = island(island="h100-tp4", weight=1.0, input_range=(2048, None),
               engine=EngineConfig(engine="vllm", model="m", tensor_parallel=4))
    d = island(island="idle", weight=1.0, replicas=0)
    t = routing_table([a, b, c, d])
    assert [r["minInputTokens"] for r in t] == [0, 2048]
    assert t[1]["maxInputTokens"] is None
    w = {be["island"]: be["weight"] for be in t[0]["backends"]}
    assert w == {"h100-tp2": 0.75, "a100-tp2": 0.25}
    assert t[0]["backends"][0]["service"].endswith(".llm.svc")


def test_build_all_emits_every_object_once_with_owner() -> None:
    a = island(island="h100-tp2")
    b = island(island="a100-tp2", pool="a100")
    objs = build_all([a, b], "chat", "llm", OWNER, plan_hash="abc")
    kinds = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert kinds == [
        ("Deployment", "chat-h100-tp2"), ("Deployment", "chat-a100-tp2"),
        ("Service", "chat-h100-tp2"), ("Service", "chat-a100-tp2"),
        ("Service", "chat-serving"), ("ConfigMap", "chat-routing"),
    ]
    assert all(o["metadata"]["ownerReferences"][0]["name"] == "chat" for o in objs)
    routes = json.loads(objs[-1]["data"]["routes.json"])
    assert routes["model"] == "chat" and len(routes["routes"]) == 1
    with pytest.raises(ValueError, match="same name"):
        build_all([a, a], "chat", "llm", OWNER)


def test_invalid_island_inputs() -> None:
    with pytest.raises(ValueError, match="replicas"):
        island(replicas=-1)
    with pytest.raises(ValueError, match="gpu_resource"):
        island(gpu_resource="intel.com/gpu")
    with pytest.raises(ValueError, match="node_names"):
        island(node_names=(), node_pinning="required")
