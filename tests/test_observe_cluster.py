"""GPU inventory from Node and Pod dicts: pools, cordoned/NotReady nodes, our vs others' GPUs."""

from __future__ import annotations

import pytest

from archipelago.observe.cluster import (
    current_placement,
    gpu_usage_by_node,
    group_pools,
    parse_count,
    pending_pods,
    pod_gpus,
    selector_matches,
)

H100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
L4 = {"nvidia.com/gpu.product": "NVIDIA-L4"}


def node(name, labels, gpus, ready=True, cordoned=False, resource="nvidia.com/gpu"):
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {"unschedulable": True} if cordoned else {},
        "status": {"allocatable": {resource: str(gpus), "cpu": "96"},
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def pod(name, node_name, gpus, ours=False, phase="Running", ns="llm", island_id=None, model="chat"):
    labels = {"app.kubernetes.io/managed-by": "archipelago", "archipelago.dev/model": model} if ours else {}
    ann = {"archipelago.dev/island-id": island_id, "archipelago.dev/model-key": f"{ns}/{model}"} if island_id else {}
    return {
        "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": ann},
        "spec": {"nodeName": node_name,
                 "containers": [{"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]},
        "status": {"phase": phase},
    }


SEL = {"h100": {"matchLabels": H100}, "l4": {"matchLabels": L4}}


def test_pools_group_nodes_and_count_gpus() -> None:
    nodes = [node("h1", H100, 8), node("h2", H100, 8, cordoned=True), node("h3", H100, 8, ready=False),
             node("l1", L4, 1), node("cpu", {}, 0)]
    pods = [pod("a", "h1", 2, ours=True, island_id="llm/chat/h100/tp2"), pod("b", "h1", 4),
            pod("c", "h1", 1, phase="Succeeded"), pod("d", "l1", 1)]
    pools, warnings = group_pools(SEL, nodes, pods)
    assert not warnings
    h = pools["h100"]
    assert [n.name for n in h.nodes] == ["h1", "h2", "h3"]
    st = h.status()
    assert st["gpusTotal"] == 24 and st["gpusAllocatable"] == 8
    assert st["gpusUsedByArchipelago"] == 2 and st["gpusUsedByOthers"] == 4
    assert st["gpusFree"] == 2  # only h1 is schedulable: 8 - 2 - 4
    assert st["schedulableNodes"] == 1
    assert any("h2: cordoned" in s for s in st["unschedulableNodes"])
    assert any("h3: NotReady" in s for s in st["unschedulableNodes"])
    snap = h.to_snapshot(gpu="H100-SXM", price_per_gpu_hour=3.99)
    by = {n.name: n for n in snap.nodes}
    assert by["h1"].gpus_free == 4  # our 2 GPUs count as free for the planner, others' 4 do not
    assert not by["h2"].schedulable and by["h2"].gpus_free == 0
    assert pools["l4"].gpus_free == 0


def test_planned_set_turns_unplanned_models_pods_into_others() -> None:
    pods = [pod("a", "h1", 2, ours=True, island_id="x", model="chat"),
            pod("b", "h1", 4, ours=True, island_id="y", model="broken")]
    usage = gpu_usage_by_node(pods, planned={"llm/chat"})
    assert usage["h1"] == (2, 4)


def test_overlapping_selectors_warn_and_assign_once() -> None:
    sel = {"a": {"matchLabels": H100}, "b": {"matchExpressions": [
        {"key": "nvidia.com/gpu.product", "operator": "Exists"}]}}
    pools, warnings = group_pools(sel, [node("h1", H100, 8)], [])
    assert [n.name for n in pools["a"].nodes] == ["h1"] and not pools["b"].nodes
    assert warnings and "h1" in warnings[0]


def test_selector_semantics() -> None:
    assert selector_matches({"matchExpressions": [{"key": "k", "operator": "In", "values": ["1", "2"]}]}, {"k": "2"})
    assert not selector_matches({"matchExpressions": [{"key": "k", "operator": "NotIn", "values": ["2"]}]},
                                {"k": "2"})
    assert selector_matches({"matchExpressions": [{"key": "k", "operator": "DoesNotExist"}]}, {"j": "1"})
    assert not selector_matches({}, {"k": "1"})  # an empty selector claims nothing
    with pytest.raises(ValueError, match="operator"):
        selector_matches({"matchExpressions": [{"key": "k", "operator": "Gt", "values": ["1"]}]}, {"k": "2"})


def test_pod_gpus_and_counts() -> None:
    p = {"spec": {"containers": [{"resources": {"requests": {"amd.com/gpu": "2"}}},
                                 {"resources": {"limits": {"nvidia.com/gpu": 1}}}],
                  "initContainers": [{"resources": {"limits": {"nvidia.com/gpu": "8"}}}]}}
    assert pod_gpus(p) == 8
    assert parse_count("4") == 4 and parse_count(None) == 0
    with pytest.raises(ValueError, match="whole"):
        parse_count("0.5")


def test_current_placement_and_pending() -> None:
    pods = [pod("a", "h1", 2, ours=True, island_id="llm/chat/h100/tp2"),
            pod("b", "h2", 2, ours=True, island_id="llm/chat/h100/tp2"),
            pod("c", None, 2, ours=True, island_id="llm/chat/h100/tp2", phase="Pending"),
            pod("d", "h1", 2)]
    cp = current_placement(pods)
    assert cp.islands == {"llm/chat/h100/tp2": {"a": "h1", "b": "h2"}}
    assert pending_pods(pods) == ["llm/c"]
