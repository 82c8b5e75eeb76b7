"""e2e: the control plane itself — components, KWOK GPU nodes, the real scheduler and
controller-manager, and Prometheus. Runs against the local harness or ARCHIPELAGO_KUBECONFIG (kind)."""

from __future__ import annotations

import time

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException
from kubernetes.utils import parse_quantity

import localcluster as lc
import prometheus as prom

pytestmark = pytest.mark.e2e

PAUSE_IMAGE = "registry.k8s.io/pause:3.10"  # real image so the same pods also run on kind


def _gpu_nodes(core) -> list[tuple[str, str, str, int]]:
    """(node, product label, GPU resource, allocatable GPUs) for every Ready node with GPUs."""
    out = []
    for n in core.list_node().items:
        ready = any(c.type == "Ready" and c.status == "True" for c in (n.status.conditions or []))
        alloc = n.status.allocatable or {}
        labels = n.metadata.labels or {}
        for resource, label in (("nvidia.com/gpu", "nvidia.com/gpu.product"),
                                ("amd.com/gpu", "amd.com/gpu.product-name")):
            if ready and int(alloc.get(resource, "0")) > 0:
                out.append((n.metadata.name, labels.get(label, ""), resource, int(alloc[resource])))
    return out


def _gpu_pod(name: str, gpus: int, resource: str = "nvidia.com/gpu", node_selector: dict | None = None) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "e2e-gpu"}},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "nodeSelector": node_selector or {},
            "containers": [{
                "name": "engine",
                "image": PAUSE_IMAGE,
                "resources": {"requests": {"cpu": "100m", resource: str(gpus)},
                              "limits": {resource: str(gpus)}},
            }],
        },
    }


def test_api_server_ready_and_components_healthy(cluster, api):
    method, url, headers, _body, _post = api.param_serialize("GET", "/readyz", query_params=[("verbose", "true")],
                                                             auth_settings=["BearerToken"])
    resp = api.call_api(method, url, headers)
    resp.read()
    assert resp.status == 200 and b"readyz check passed" in resp.data, resp.data[-500:]
    if cluster.local is not None:
        rows = cluster.local.status()
        assert [r["component"] for r in rows] == list(lc.COMPONENTS)
        unhealthy = [f"{r['component']}: {r['detail']}" for r in rows if not (r["alive"] and r["healthy"])]
        assert not unhealthy, unhealthy


def test_fleet_nodes_ready_with_gpu_capacity_and_labels(cluster, core):
    gpu_nodes = _gpu_nodes(core)
    assert gpu_nodes, "no Ready node advertises nvidia.com/gpu or amd.com/gpu"
    for name, product, _resource, _gpus in gpu_nodes:
        assert product, f"GPU node {name} has no GFD product label"
    if cluster.local is None:
        return
    # Local harness: the API objects are exactly what the fleet file describes.
    expected = lc.fleet_nodes(lc.load_fleet(lc.E2E_DIR / "fleets" / "small.yaml")) \
        if cluster.local.state().get("fleet", "").endswith("small.yaml") else None
    if expected is None:
        pytest.fail(f"e2e cluster was started with {cluster.local.state().get('fleet')}, expected small.yaml")
    nodes = {n.metadata.name: n for n in core.list_node(label_selector=f"{lc.FLEET_LABEL}=small").items}
    assert sorted(nodes) == sorted(n["metadata"]["name"] for n in expected)
    for want in expected:
        got = nodes[want["metadata"]["name"]]
        for k, v in want["metadata"]["labels"].items():
            assert got.metadata.labels.get(k) == v, (got.metadata.name, k)
        for k, v in want["status"]["allocatable"].items():  # the server normalises 2048Gi to 2Ti
            assert parse_quantity(got.status.allocatable.get(k)) == parse_quantity(v), (got.metadata.name, k)
        conds = {c.type: c.status for c in got.status.conditions}
        assert conds.get("Ready") == "True"
        assert not got.spec.taints  # KWOK nodes are untainted: ordinary pods land on them


def test_eight_gpu_pod_lands_on_an_eight_gpu_node_and_runs(core, namespace):
    candidates = [(n, p, r, g) for n, p, r, g in _gpu_nodes(core) if g >= 8 and r == "nvidia.com/gpu"]
    assert candidates, "the fleet needs an NVIDIA node with >= 8 GPUs"
    _node, product, resource, _ = candidates[0]
    core.create_namespaced_pod(namespace, _gpu_pod("gpu8", 8, resource, {"nvidia.com/gpu.product": product}))

    def running():
        pod = core.read_namespaced_pod("gpu8", namespace)
        return pod if pod.status.phase == "Running" else None

    pod = lc.wait_for(running, 90, what="pod gpu8 Running")
    node = core.read_node(pod.spec.node_name)
    assert node.metadata.labels["nvidia.com/gpu.product"] == product
    assert int(node.status.allocatable[resource]) >= 8
    ready = {c.type: c.status for c in pod.status.conditions}
    assert ready.get("PodScheduled") == "True" and ready.get("Ready") == "True"


def test_gpu_requests_are_accounted_per_node(core, namespace):
    """Two 8-GPU pods pinned to one 8-GPU node: the scheduler places one and keeps the other Pending."""
    candidates = [(n, g) for n, _p, r, g in _gpu_nodes(core) if g == 8 and r == "nvidia.com/gpu"]
    assert candidates, "the fleet needs an NVIDIA node with exactly 8 GPUs"
    node = candidates[0][0]
    sel = {"kubernetes.io/hostname": node}
    core.create_namespaced_pod(namespace, _gpu_pod("first", 8, node_selector=sel))
    lc.wait_for(lambda: core.read_namespaced_pod("first", namespace).status.phase == "Running", 90,
                what="pod first Running")
    core.create_namespaced_pod(namespace, _gpu_pod("second", 8, node_selector=sel))
    msg = lc.wait_for(lambda: _failed_scheduling(core, namespace, "second"), 60,
                      what="FailedScheduling event for pod second")
    assert "Insufficient nvidia.com/gpu" in msg
    assert core.read_namespaced_pod("second", namespace).spec.node_name is None


def _failed_scheduling(core, namespace: str, pod: str) -> str | None:
    events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={pod}").items
    for e in events:
        if e.reason == "FailedScheduling":
            return e.message
    return None


def test_pod_larger_than_any_node_stays_pending_with_failed_scheduling(core, namespace):
    biggest = max(g for _n, _p, r, g in _gpu_nodes(core) if r == "nvidia.com/gpu")
    core.create_namespaced_pod(namespace, _gpu_pod("too-big", biggest + 1))
    msg = lc.wait_for(lambda: _failed_scheduling(core, namespace, "too-big"), 60,
                      what="FailedScheduling event for pod too-big")
    assert "Insufficient nvidia.com/gpu" in msg, msg
    time.sleep(1)
    pod = core.read_namespaced_pod("too-big", namespace)
    assert pod.status.phase == "Pending" and pod.spec.node_name is None
    cond = {c.type: c for c in pod.status.conditions or []}
    assert cond["PodScheduled"].status == "False" and cond["PodScheduled"].reason == "Unschedulable"


def test_deployment_controller_creates_running_gpu_pods(api, core, namespace):
    apps = client.AppsV1Api(api)
    tmpl = _gpu_pod("x", 1, node_selector={"nvidia.com/gpu.present": "true"})
    apps.create_namespaced_deployment(namespace, {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "island"},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "island"}},
                 "template": {"metadata": {"labels": {"app": "island"}}, "spec": tmpl["spec"]}},
    })

    def available():
        d = apps.read_namespaced_deployment("island", namespace)
        return d if (d.status.available_replicas or 0) == 3 else None

    lc.wait_for(available, 120, what="Deployment island with 3 available replicas")
    pods = core.list_namespaced_pod(namespace, label_selector="app=island").items
    assert len(pods) == 3 and all(p.status.phase == "Running" for p in pods)
    # Garbage collection (owner references) removes the pods with the Deployment.
    apps.delete_namespaced_deployment("island", namespace, propagation_policy="Foreground")
    lc.wait_for(lambda: not core.list_namespaced_pod(namespace, label_selector="app=island").items, 90,
                what="pods of the deleted Deployment to go away")


def test_prometheus_answers_queries_and_reads_file_sd_targets(prometheus_server, cluster):
    url = prometheus_server.url

    def self_up():
        res = prom.query(url, 'up{job="prometheus"}')
        return res if res and res[0]["value"][1] == "1" else None

    res = lc.wait_for(self_up, 60, interval=1, what='up{job="prometheus"} == 1')
    assert res[0]["metric"]["instance"] == f"127.0.0.1:{prometheus_server.port}"
    # file_sd: a target file dropped into <run_dir>/prometheus/targets is scraped.
    prom.write_targets(cluster.work_dir, "selftest", [f"127.0.0.1:{prometheus_server.port}"],
                       {"pod": "selftest"})

    def file_sd_up():
        res = prom.query(url, f'up{{job="{prom.FILE_SD_JOB}",pod="selftest"}}')
        return res if res and res[0]["value"][1] == "1" else None

    lc.wait_for(file_sd_up, 60, interval=1, what="file_sd target scraped")
    with pytest.raises(prom.PrometheusError, match="parse error"):
        prom.query(url, "up{")


def test_unknown_node_selector_is_unschedulable_not_an_error(core, namespace):
    core.create_namespaced_pod(namespace, _gpu_pod("no-b200", 1, node_selector={
        "nvidia.com/gpu.product": "NVIDIA-B200"}))
    msg = lc.wait_for(lambda: _failed_scheduling(core, namespace, "no-b200"), 60,
                      what="FailedScheduling event for pod no-b200")
    assert "didn't match Pod's node affinity/selector" in msg, msg
    with pytest.raises(ApiException) as ei:
        core.create_namespaced_pod(namespace, _gpu_pod("half-gpu", 1) | {"spec": {
            "containers": [{"name": "c", "image": PAUSE_IMAGE,
                            "resources": {"requests": {"nvidia.com/gpu": "1"},
                                          "limits": {"nvidia.com/gpu": "2"}}}]}})
    assert ei.value.status == 422
    assert "must be equal to" in lc.api_message(ei.value)


def _local_only(cluster) -> lc.LocalCluster:
    if cluster.local is None:
        pytest.skip("exercises the local harness itself; the cluster under test is external (kind)")
    return cluster.local


def test_second_cluster_runs_alongside_and_up_is_idempotent(cluster, tmp_path):
    first = _local_only(cluster)
    second = lc.LocalCluster("e2e-second", run_dir=tmp_path / "second", bin_dir=first.bin_dir)
    empty_crds = tmp_path / "no-crds"
    empty_crds.mkdir()
    try:
        t1 = second.up(None, crd_dir=empty_crds, timeout=120)
        assert not t1.reused
        ports1, ports2 = first.state()["ports"], second.state()["ports"]
        assert not set(ports1.values()) & set(ports2.values())
        pids = {c: p["pid"] for c, p in second.state()["processes"].items()}
        t2 = second.up(None, crd_dir=empty_crds, timeout=120)  # healthy -> reused, same processes
        assert t2.reused
        assert {c: p["pid"] for c, p in second.state()["processes"].items()} == pids
        assert all(r["healthy"] for r in first.status()), first.status()
    finally:
        stopped = second.down(quiet=True)
    assert stopped == list(reversed(lc.COMPONENTS))
    assert not any(lc.pid_alive(p) for p in pids.values())
    assert second.log_path("kube-apiserver").stat().st_size > 0  # logs stay after down
    assert all(r["healthy"] for r in first.status())  # the session's cluster was not disturbed


def test_failed_start_reports_component_log_and_stops_everything(cluster, tmp_path):
    first = _local_only(cluster)
    fake = tmp_path / "bin"
    fake.mkdir()
    for b in lc.BINARIES:
        if b != "kube-apiserver":
            (fake / b).symlink_to(first.bin_dir / b)
    apiserver = fake / "kube-apiserver"
    apiserver.write_text("#!/bin/sh\necho 'simulated: cannot reach etcd' >&2\nexit 1\n")
    apiserver.chmod(0o755)
    broken = lc.LocalCluster("e2e-broken", run_dir=tmp_path / "broken", bin_dir=fake)
    with pytest.raises(lc.ClusterError) as ei:
        broken.up(None, timeout=30)
    assert ei.value.component == "kube-apiserver"
    assert "kube-apiserver exited during start-up" in str(ei.value)
    assert "simulated: cannot reach etcd" in ei.value.report()
    assert broken.log_path("etcd").exists() and broken.state()["processes"] == {}
    assert _processes_mentioning(str(broken.run_dir)) == []  # etcd (started first) was stopped again


def _processes_mentioning(text: str) -> list[int]:
    """PIDs of live processes whose command line contains ``text`` (read from /proc)."""
    from pathlib import Path

    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text.encode() in (d / "cmdline").read_bytes() and lc.pid_alive(int(d.name)):
                    out.append(int(d.name))
            except OSError:
                continue
    return out
