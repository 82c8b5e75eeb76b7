"""The sample manifests in manifests/samples/ load through the pydantic models and fit together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from archipelago.api import GPUPool, ModelDeployment, ServingSLO, parse_resource

SAMPLES = Path(__file__).resolve().parents[1] / "manifests" / "samples"


def load(name: str) -> list[dict[str, Any]]:
    path = SAMPLES / name
    try:
        return [d for d in yaml.safe_load_all(path.read_text()) if d]
    except yaml.YAMLError as exc:
        raise AssertionError(f"{path}: not valid YAML: {exc}") from exc


def kustomization() -> dict[str, Any]:
    (k,) = load("kustomization.yaml")
    return k


def resources() -> list[tuple[str, Any]]:
    out = []
    for name in kustomization()["resources"]:
        for doc in load(name):
            if doc.get("apiVersion") == "archipelago.dev/v1alpha1":
                out.append((name, parse_resource(doc, source=f"manifests/samples/{name}")))
    return out


def test_kustomization_lists_exactly_the_sample_files() -> None:
    k = kustomization()
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    listed = k["resources"]
    assert len(listed) == len(set(listed))
    on_disk = sorted(p.name for p in SAMPLES.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk, "kustomization.yaml and the files in manifests/samples/ differ"


@pytest.mark.parametrize("name", sorted(p.name for p in SAMPLES.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_each_sample_parses(name: str) -> None:
    docs = load(name)
    assert len(docs) == 1, f"{name}: one resource per file"
    doc = docs[0]
    if doc["kind"] == "Namespace":
        assert doc["metadata"]["name"] == "llm"
        return
    obj = parse_resource(doc, source=name)
    assert obj.to_k8s()["kind"] == doc["kind"]
    if isinstance(obj, GPUPool):
        assert obj.metadata.namespace is None, f"{name}: GPUPool is cluster-scoped"
    else:
        assert obj.metadata.namespace == "llm", f"{name}: namespaced samples live in namespace llm"


def test_samples_cover_the_documented_fleet() -> None:
    objs = [o for _n, o in resources()]
    pools = {o.metadata.name: o for o in objs if isinstance(o, GPUPool)}
    slos = {o.metadata.name: o for o in objs if isinstance(o, ServingSLO)}
    models = {o.metadata.name: o for o in objs if isinstance(o, ModelDeployment)}

    products = {p.spec.node_selector.match_labels.get("nvidia.com/gpu.product") for p in pools.values()}
    products |= {v for p in pools.values() for e in p.spec.node_selector.match_expressions for v in e.values}
    assert {"NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB", "NVIDIA-L4"} <= products

    assert len(slos) >= 2
    chat = slos["interactive"].spec
    assert chat.ttft.seconds == 1.0 and chat.ttft.percentile == 90
    assert chat.tpot.seconds == 0.1 and chat.tpot.percentile == 90
    assert slos["batch"].spec.ttft.seconds > chat.ttft.seconds and slos["batch"].spec.e2e is not None

    assert models["llama-3-1-8b"].spec.engine.kind == "vllm"
    big = models["llama-3-1-70b"].spec
    assert big.engine.kind == "vllm" and big.placement.tensor_parallel == [4, 8]
    moe = models["mixtral-8x7b"].spec
    assert moe.engine.kind == "sglang"
    assert moe.model.architecture is not None and moe.model.architecture.moe is not None
    assert (moe.model.architecture.moe.experts, moe.model.architecture.moe.experts_per_token) == (8, 2)


def test_sample_references_resolve() -> None:
    objs = [o for _n, o in resources()]
    pools = {o.metadata.name for o in objs if isinstance(o, GPUPool)}
    slos = {(o.metadata.namespace, o.metadata.name) for o in objs if isinstance(o, ServingSLO)}
    for o in objs:
        if isinstance(o, ModelDeployment):
            assert (o.metadata.namespace, o.spec.slo_ref) in slos, f"{o.metadata.name}: sloRef {o.spec.slo_ref} not found"
            missing = set(o.spec.placement.allowed_pools) - pools
            assert not missing, f"{o.metadata.name}: allowedPools {missing} are not sample GPUPools"
