"""Unit tests for the pure parts of the local-cluster harness (e2e/localcluster.py, e2e/prometheus.py):
fleet files -> KWOK Node manifests, error messages, Prometheus config, PID-based process control."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

E2E = Path(__file__).resolve().parents[1] / "e2e"
if str(E2E) not in sys.path:
    sys.path.insert(0, str(E2E))

import localcluster as lc  # noqa: E402
import prometheus as prom  # noqa: E402


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "fleet.yaml"
    p.write_text(textwrap.dedent(text))
    return p


GPU_TYPES = """
kind: Fleet
name: t
gpuTypes:
  H100:
    vendor: nvidia
    product: NVIDIA-H100-80GB-HBM3
    memoryMiB: 81559
    family: hopper
    computeCapability: "9.0"
  MI300X:
    vendor: amd
    product: AMD_Instinct_MI300X_OAM
    memoryMiB: 196608
    family: AI
"""


def test_small_fleet_nodes_carry_gpu_capacity_and_gfd_labels():
    nodes = lc.fleet_nodes(lc.load_fleet(E2E / "fleets" / "small.yaml"))
    names = [n["metadata"]["name"] for n in nodes]
    assert names == ["h100-0", "h100-1", "a100-0", "a100-1", "l4x1-0", "l4x1-1", "l4x4-0", "cpu-0"]
    h100 = nodes[0]
    labels = h100["metadata"]["labels"]
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert labels["nvidia.com/gpu.count"] == "8"
    assert labels["nvidia.com/gpu.memory"] == "81559"
    assert labels["nvidia.com/gpu.family"] == "hopper"
    assert (labels["nvidia.com/gpu.compute.major"], labels["nvidia.com/gpu.compute.minor"]) == ("9", "0")
    assert labels["kubernetes.io/hostname"] == "h100-0"
    assert labels[lc.FLEET_LABEL] == "small"
    assert h100["metadata"]["annotations"][lc.KWOK_NODE_ANNOTATION] == "fake"
    assert h100["status"]["capacity"] == h100["status"]["allocatable"]
    assert h100["status"]["capacity"]["nvidia.com/gpu"] == "8"
    assert "taints" not in h100["spec"]  # no kwok taint: pods need no toleration
    l4x4 = nodes[6]
    assert l4x4["status"]["allocatable"]["nvidia.com/gpu"] == "4"
    assert l4x4["metadata"]["labels"]["nvidia.com/gpu.compute.minor"] == "9"
    cpu = nodes[-1]
    assert "nvidia.com/gpu" not in cpu["status"]["capacity"]
    assert not any(k.startswith("nvidia.com/") for k in cpu["metadata"]["labels"])


def test_demo_fleet_meets_its_brief():
    nodes = lc.fleet_nodes(lc.load_fleet(E2E / "fleets" / "demo.yaml"))
    assert len(nodes) >= 40
    rows = {r["product"]: r for r in lc.fleet_summary(nodes)}
    gpu_products = [p for p in rows if p != "(none)"]
    assert len(gpu_products) >= 3
    assert rows["NVIDIA-H100-80GB-HBM3"] == {"product": "NVIDIA-H100-80GB-HBM3", "resource": "nvidia.com/gpu",
                                             "nodes": 8, "gpus": 64}
    assert rows["NVIDIA-A100-SXM4-80GB"]["nodes"] == 12 and rows["NVIDIA-A100-SXM4-80GB"]["gpus"] == 96
    l4_shapes = {n["status"]["capacity"]["nvidia.com/gpu"] for n in nodes
                 if n["metadata"]["labels"].get("nvidia.com/gpu.product") == "NVIDIA-L4"}
    assert l4_shapes == {"1", "4"} and rows["NVIDIA-L4"]["nodes"] == 24
    assert rows["(none)"]["nodes"] >= 1
    assert len({n["metadata"]["name"] for n in nodes}) == len(nodes)


def test_amd_vendor_uses_amd_resource_and_labeller_labels(tmp_path):
    p = _write(tmp_path, GPU_TYPES + """
nodeGroups:
  - {namePrefix: mi, count: 1, gpuType: MI300X, gpusPerNode: 8}
""")
    (node,) = lc.fleet_nodes(lc.load_fleet(p))
    labels = node["metadata"]["labels"]
    assert node["status"]["capacity"]["amd.com/gpu"] == "8"
    assert "nvidia.com/gpu" not in node["status"]["capacity"]
    assert labels["amd.com/gpu.product-name"] == "AMD_Instinct_MI300X_OAM"
    assert labels["amd.com/gpu.vram"] == "192G"
    assert labels["amd.com/gpu.family"] == "AI"


def test_defaults_merge_zones_round_robin_and_taints(tmp_path):
    p = _write(tmp_path, GPU_TYPES + """
defaults:
  cpu: "64"
  zones: [za, zb, zc]
  labels: {team: infer, tier: base}
nodeGroups:
  - namePrefix: h
    count: 4
    gpuType: H100
    gpusPerNode: 8
    labels: {tier: gold}
    taints: [{key: dedicated, value: llm, effect: NoSchedule}]
  - namePrefix: c
    count: 2
    zone: zq
    cpu: 8
    resourceName: ignored-when-no-gpu
""")
    with pytest.raises(lc.FleetError, match=r"nodeGroups\[1\]\.gpusPerNode: is set but the group has no gpuType"):
        lc.load_fleet(p)
    p.write_text(p.read_text().replace("    resourceName: ignored-when-no-gpu\n", ""))
    nodes = lc.fleet_nodes(lc.load_fleet(p))
    zones = [n["metadata"]["labels"]["topology.kubernetes.io/zone"] for n in nodes]
    assert zones == ["za", "zb", "zc", "za", "zq", "zq"]
    h0 = nodes[0]
    assert h0["metadata"]["labels"]["team"] == "infer" and h0["metadata"]["labels"]["tier"] == "gold"
    assert h0["spec"]["taints"] == [{"key": "dedicated", "effect": "NoSchedule", "value": "llm"}]
    assert h0["status"]["capacity"]["cpu"] == "64"
    assert nodes[4]["status"]["capacity"]["cpu"] == "8"
    assert "taints" not in nodes[4]["spec"]


@pytest.mark.parametrize(
    ("groups", "pattern"),
    [
        ("  - {namePrefix: h, count: 0, gpuType: H100, gpusPerNode: 8}",
         r"fleet\.yaml:\d+: nodeGroups\[0\]\.count: must be an integer >= 1, got 0"),
        ("  - {namePrefix: h, count: 1, gpuType: B200, gpusPerNode: 8}",
         r"nodeGroups\[0\]\.gpuType: GPU type 'B200' is not declared under gpuTypes; use one of H100, MI300X"),
        ("  - {namePrefix: h, count: 1, gpuType: H100}",
         r"nodeGroups\[0\]\.gpusPerNode: must be an integer >= 1, got None"),
        ("  - {namePrefix: h, count: 1, cpu: lots}", r"nodeGroups\[0\]\.cpu: 'lots' is not a Kubernetes quantity"),
        ("  - {namePrefix: H_100, count: 1}", r"nodeGroups\[0\]\.namePrefix: 'H_100' is not allowed here"),
        ("  - {namePrefix: h, count: 1, gpus: 8}", r"nodeGroups\[0\]\.gpus: unknown field 'gpus'"),
        ("  - {namePrefix: h, count: 2}\n  - {namePrefix: h, count: 1}",
         r"nodeGroups\[1\]\.namePrefix: node name h-0 is also produced by nodeGroups\[0\]"),
        ("  - {namePrefix: h, count: 1, taints: [{key: a, effect: Never}]}",
         r"taints\[0\]\.effect: effect 'Never' is not a taint effect; use one of NoSchedule"),
        ("  - {namePrefix: h, count: 1, labels: {a: 'has space'}}", r"labels\.a: 'has space' is not a valid label value"),
    ],
)
def test_bad_fleet_groups_name_field_and_fix(tmp_path, groups, pattern):
    p = _write(tmp_path, GPU_TYPES + "nodeGroups:\n" + groups + "\n")
    with pytest.raises(lc.FleetError, match=pattern):
        lc.load_fleet(p)


def test_error_points_at_the_offending_line(tmp_path):
    text = GPU_TYPES + "nodeGroups:\n  - namePrefix: h\n    count: 1\n    gpuType: H100\n    gpusPerNode: -2\n"
    p = _write(tmp_path, text)
    line = text.splitlines().index("    gpusPerNode: -2") + 1
    with pytest.raises(lc.FleetError) as ei:
        lc.load_fleet(p)
    assert str(ei.value).startswith(f"{p}:{line}: nodeGroups[0].gpusPerNode: must be an integer >= 1, got -2")


def test_bad_gpu_type_and_document_errors(tmp_path):
    bad_cc = GPU_TYPES.replace('computeCapability: "9.0"', "computeCapability: nine") + \
        "nodeGroups:\n  - {namePrefix: h, count: 1, gpuType: H100, gpusPerNode: 8}\n"
    with pytest.raises(lc.FleetError, match=r"gpuTypes\.H100\.computeCapability: 'nine' is not MAJOR\.MINOR"):
        lc.load_fleet(_write(tmp_path, bad_cc))
    spaced = GPU_TYPES.replace("NVIDIA-H100-80GB-HBM3", "NVIDIA H100 80GB HBM3") + \
        "nodeGroups:\n  - {namePrefix: h, count: 1, gpuType: H100, gpusPerNode: 8}\n"
    with pytest.raises(lc.FleetError, match=r"nvidia\.com/gpu\.product='NVIDIA H100 80GB HBM3' is not a valid label"):
        lc.load_fleet(_write(tmp_path, spaced))
    with pytest.raises(lc.FleetError, match=r"vendor 'intel' is not supported; use one of nvidia, amd"):
        lc.load_fleet(_write(tmp_path, GPU_TYPES.replace("vendor: amd", "vendor: intel") + "nodeGroups: []\n"))
    with pytest.raises(lc.FleetError, match=r"nodeGroups: must be a non-empty list"):
        lc.load_fleet(_write(tmp_path, GPU_TYPES))
    with pytest.raises(lc.FleetError, match=r"kind 'Pool' is not a fleet file; write kind: Fleet"):
        lc.load_fleet(_write(tmp_path, GPU_TYPES.replace("kind: Fleet", "kind: Pool")))
    with pytest.raises(lc.FleetError, match=r"fleet\.yaml:2: not valid YAML \(mapping values are not allowed"):
        lc.load_fleet(_write(tmp_path, "kind: Fleet\nname: a: b\nnodeGroups: []\n"))
    with pytest.raises(lc.FleetError, match=r"cannot read fleet file"):
        lc.load_fleet(tmp_path / "missing.yaml")


def test_fleet_nodes_accepts_a_plain_dict_without_source():
    doc = {"kind": "Fleet", "name": "x", "nodeGroups": [{"namePrefix": "c", "count": 2, "cpu": "4"}]}
    nodes = lc.fleet_nodes(doc)
    assert [n["metadata"]["name"] for n in nodes] == ["c-0", "c-1"]
    with pytest.raises(lc.FleetError, match=r"^<fleet>: nodeGroups\[0\]\.count"):
        lc.fleet_nodes({"kind": "Fleet", "nodeGroups": [{"namePrefix": "c", "count": "2"}]})


def test_prometheus_config_has_self_and_file_sd_jobs(tmp_path):
    cfg = prom.prometheus_config(tmp_path, 9999, [{"job_name": "extra", "static_configs": [{"targets": ["a:1"]}]}])
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert list(jobs) == ["prometheus", prom.FILE_SD_JOB, "extra"]
    assert jobs["prometheus"]["static_configs"][0]["targets"] == ["127.0.0.1:9999"]
    assert jobs[prom.FILE_SD_JOB]["file_sd_configs"][0]["files"] == [
        str(tmp_path.resolve() / "prometheus" / "targets" / "*.json")]
    with pytest.raises(ValueError, match="already used"):
        prom.prometheus_config(tmp_path, 1, [{"job_name": "prometheus"}])
    with pytest.raises(ValueError, match="has no job_name"):
        prom.prometheus_config(tmp_path, 1, [{"static_configs": []}])


def test_write_targets_is_file_sd_format(tmp_path):
    path = prom.write_targets(tmp_path, "pod-a", ["127.0.0.1:8000"], {"pod": "pod-a"})
    assert path == tmp_path / "prometheus" / "targets" / "pod-a.json"
    assert json.loads(path.read_text()) == [{"targets": ["127.0.0.1:8000"], "labels": {"pod": "pod-a"}}]
    assert [p.name for p in path.parent.iterdir()] == ["pod-a.json"]  # no temp file left behind


def test_free_ports_are_distinct_and_bindable():
    import socket

    ports = lc.free_ports(6)
    assert len(set(ports)) == 6
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_processes_are_stopped_by_pid_and_pid_reuse_is_guarded(tmp_path):
    sleep = shutil.which("sleep")
    assert sleep
    log = tmp_path / "logs" / "sleep.log"
    pid = lc.start_process("sleep", [sleep, "60"], log)
    assert lc.pid_alive(pid, sleep)
    # A PID now running a different program than recorded is left alone.
    assert lc.stop_process(pid, cmd0="/usr/bin/not-sleep") is False
    assert lc.pid_alive(pid, sleep)
    assert lc.stop_process(pid, cmd0=sleep, timeout=5) is True
    assert not lc.pid_alive(pid, sleep)
    assert lc.stop_process(pid, cmd0=sleep) is False  # already gone
    assert "starting: " in log.read_text()


def test_foreign_process_is_checked_through_proc_and_zombies_count_as_dead():
    import subprocess

    sleep = shutil.which("sleep")
    proc = subprocess.Popen([sleep, "60"])  # not started by the harness: not in its child table
    try:
        assert lc.pid_alive(proc.pid, sleep)
        assert not lc.pid_alive(proc.pid, "/bin/true")
        assert lc.stop_process(proc.pid, cmd0=sleep, timeout=5) is True
        assert not lc.pid_alive(proc.pid)  # a zombie until reaped below
    finally:
        proc.kill()
        proc.wait()


def test_process_ignoring_sigterm_is_killed(tmp_path):
    sh = shutil.which("sh")
    pid = lc.start_process("stubborn", [sh, "-c", "trap '' TERM; while :; do sleep 0.1; done"],
                           tmp_path / "s.log")
    assert lc.stop_process(pid, cmd0=sh, timeout=0.5) is True
    assert not lc.pid_alive(pid, sh)


def test_tail_and_cluster_error_report(tmp_path):
    f = tmp_path / "x.log"
    f.write_text("".join(f"line {i}\n" for i in range(100)))
    assert lc.tail(f, 3) == "line 97\nline 98\nline 99"
    assert lc.tail(tmp_path / "none.log") == ""
    e = lc.ClusterError("etcd exited", "etcd", "boom")
    assert e.report() == "etcd exited\n--- last lines of the etcd log ---\nboom\n---"


def test_down_without_state_is_a_noop(tmp_path):
    c = lc.LocalCluster("nothing", run_dir=tmp_path / "r")
    assert c.down(quiet=True) == []
    assert c.status()[0] == {"component": "etcd", "pid": None, "port": None, "alive": False,
                             "healthy": False, "detail": ""}
    with pytest.raises(lc.ClusterError, match="must be lower-case"):
        lc.LocalCluster("Bad_Name")
