"""Fleet emulator: engines for the operator's Running pods, file_sd targets, Service endpoint map."""

from __future__ import annotations

import asyncio
import copy
import json

import aiohttp
import pytest

from archipelago.act.engine import EngineConfig
from archipelago.act.manifests import IslandRender, OwnerRef, build_deployment, build_island_service
from archipelago.emulate.engine import EmulatorConfigError
from archipelago.emulate.fleet import (
    FleetEmulator,
    pod_engine_argv,
    pod_gpu,
    pod_is_serving,
    read_endpoints,
    service_endpoints,
    spec_for_pod,
    target_labels,
)

H100 = "NVIDIA-H100-80GB-HBM3"


def _island(**kw) -> IslandRender:
    base = dict(model="chat", namespace="llm", island="h100-tp1", pool="h100", gpu_type="H100-SXM", replicas=2,
                engine=EngineConfig(engine="vllm", model="meta-llama/Llama-3.1-8B-Instruct", tensor_parallel=1,
                                    max_num_seqs=32, max_model_len=8192),
                pool_selector={"matchLabels": {"nvidia.com/gpu.product": H100}})
    base.update(kw)
    return IslandRender(**base)


def _pod(isl: IslandRender, name: str, node: str = "gpu-h100-0", phase: str = "Running", uid: str = "") -> dict:
    """A pod as the ReplicaSet controller would create it from the operator's Deployment."""
    dep = build_deployment(isl, OwnerRef("chat", "u1"))
    tpl = copy.deepcopy(dep["spec"]["template"])
    meta = {**tpl["metadata"], "name": name, "namespace": isl.namespace, "uid": uid or f"uid-{name}"}
    return {"metadata": meta, "spec": {**tpl["spec"], "nodeName": node}, "status": {"phase": phase}}


def test_pod_helpers_read_the_operators_manifests() -> None:
    isl = _island()
    pod = _pod(isl, "chat-h100-tp1-abc")
    assert pod_is_serving(pod)
    assert not pod_is_serving({**pod, "status": {"phase": "Pending"}})
    assert not pod_is_serving({**pod, "metadata": {**pod["metadata"], "deletionTimestamp": "2024-01-01T00:00:00Z"}})
    argv = pod_engine_argv(pod)
    assert argv[:3] == ["vllm", "serve", "meta-llama/Llama-3.1-8B-Instruct"]
    assert pod_gpu(pod, {"nvidia.com/gpu.product": H100}) == H100
    assert pod_gpu(pod, {}) == "H100-SXM"  # falls back to the archipelago.dev/gpu-type annotation
    spec = spec_for_pod(pod, {"nvidia.com/gpu.product": H100})
    assert (spec.gpu.name, spec.tp, spec.limits.max_num_seqs, spec.port, spec.host) == ("H100-SXM", 1, 32, 0,
                                                                                      "127.0.0.1")
    assert spec.slowdown == 1.0
    assert spec_for_pod(pod, {"nvidia.com/gpu.product": H100}, slowdown={"H100-SXM": 1.8}).slowdown == 1.8
    assert spec_for_pod(pod, {"nvidia.com/gpu.product": H100}, slowdown={"L4": 2.0}).slowdown == 1.0
    assert target_labels(pod) == {"pod": "chat-h100-tp1-abc", "namespace": "llm", "model": "chat",
                                  "island": "h100-tp1", "node": "gpu-h100-0", "archipelago_dev_model": "chat",
                                  "archipelago_dev_island": "h100-tp1"}
    bare = copy.deepcopy(pod)
    bare["metadata"]["annotations"].pop("archipelago.dev/gpu-type")
    with pytest.raises(EmulatorConfigError, match="no nvidia.com/gpu.product label"):
        spec_for_pod(bare, {})


def test_services_map_to_the_pods_they_select() -> None:
    a, b = _island(), _island(island="a100-tp1", gpu_type="A100-80GB")
    svcs = [build_island_service(a, None), build_island_service(b, None)]
    pods = [(_pod(a, "p1"), "127.0.0.1:1"), (_pod(a, "p2"), "127.0.0.1:2"), (_pod(b, "p3"), "127.0.0.1:3")]
    m = service_endpoints(svcs, pods)
    assert m == {f"{a.name}.llm.svc": ["127.0.0.1:1", "127.0.0.1:2"], f"{b.name}.llm.svc": ["127.0.0.1:3"]}
    other_ns = [(dict(_pod(a, "p4"), metadata={**_pod(a, "p4")["metadata"], "namespace": "x"}), "127.0.0.1:4")]
    assert service_endpoints(svcs[:1], other_ns) == {f"{a.name}.llm.svc": []}


class FakeCoreV1:
    """Collaborator fake of kubernetes.client.CoreV1Api: serves plain dict lists."""

    def __init__(self) -> None:
        self.pods: list[dict] = []
        self.services: list[dict] = []
        self.nodes = [{"metadata": {"name": "gpu-h100-0", "labels": {"nvidia.com/gpu.product": H100}}},
                      {"metadata": {"name": "gpu-l4-0", "labels": {"nvidia.com/gpu.product": "NVIDIA-L4"}}}]
        self.fail = False

    def list_pod_for_all_namespaces(self, label_selector: str) -> dict:
        assert label_selector == "app.kubernetes.io/managed-by=archipelago"
        if self.fail:
            raise ConnectionError("apiserver down")
        return {"items": copy.deepcopy(self.pods)}

    def list_service_for_all_namespaces(self, label_selector: str) -> dict:
        return {"items": copy.deepcopy(self.services)}

    def list_node(self) -> dict:
        return {"items": self.nodes}


def test_fleet_emulator_serves_running_pods_and_forgets_deleted_ones(tmp_path) -> None:
    isl = _island()
    api = FakeCoreV1()
    api.services = [build_island_service(isl, None)]
    targets = tmp_path / "prometheus" / "targets"
    epfile = tmp_path / "emulator" / "endpoints.json"
    logs: list[str] = []
    fe = FleetEmulator(api, targets, endpoints_file=epfile, log=logs.append)
    svc = f"{isl.name}.llm.svc"

    async def go():
        api.pods = [_pod(isl, "p1"), _pod(isl, "p2", phase="Pending")]
        ch = await fe.sync_once()
        assert ch.started == ["llm/p1"] and not ch.stopped
        addr = fe.endpoints()["services"][svc]
        assert len(addr) == 1
        doc = json.loads((targets / "emu-llm-p1.json").read_text())
        assert doc == [{"targets": addr, "labels": target_labels(api.pods[0])}]
        assert read_endpoints(epfile) == {svc: addr}
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{addr[0]}/metrics") as r:
                assert r.status == 200 and "vllm:num_requests_running" in await r.text()
            # p2 starts running (on an L4 node); an unfittable pod is reported once
            api.pods[1]["status"]["phase"] = "Running"
            api.pods[1]["spec"]["nodeName"] = "gpu-l4-0"
            big = _island(island="big", engine=EngineConfig(engine="vllm", model="meta-llama/Llama-3.1-70B-Instruct"))
            api.pods.append(_pod(big, "p3", node="gpu-l4-0"))
            ch = await fe.sync_once()
            assert ch.started == ["llm/p2"] and list(ch.failed) == ["llm/p3"]
            assert "does not start" in ch.failed["llm/p3"]
            assert fe.pods[next(u for u in fe.pods if fe.pods[u].key == "llm/p2")].engine.spec.gpu.name == "L4"
            assert len(read_endpoints(epfile)[svc]) == 2
            assert (await fe.sync_once()).failed == {}  # not retried every poll
            # API outage: keep serving
            api.fail = True
            ch = await fe.sync_once()
            assert not ch.stopped and len(fe.pods) == 2 and "listing pods failed" in logs[-1]
            api.fail = False
            # p1 deleted: it leaves the endpoints and targets at once; its idle engine stops
            api.pods = api.pods[1:]
            ch = await fe.sync_once()
            assert ch.stopped == ["llm/p1"]
            assert not (targets / "emu-llm-p1.json").exists() and (targets / "emu-llm-p2.json").exists()
            assert addr[0] not in read_endpoints(epfile)[svc]
            for _ in range(40):
                if not fe._draining:  # noqa: SLF001
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(aiohttp.ClientError):
                async with s.get(f"http://{addr[0]}/health") as r:
                    pass
        await fe.close()
        assert not list(targets.glob("*.json"))
        assert read_endpoints(epfile) == {svc: []}

    asyncio.run(go())


def test_a_deleted_pod_finishes_its_requests_in_flight_then_stops(tmp_path) -> None:
    """Graceful termination: new requests go elsewhere at once, the ones in flight complete."""
    isl = _island()
    api = FakeCoreV1()
    api.services = [build_island_service(isl, None)]
    logs: list[str] = []
    fe = FleetEmulator(api, tmp_path / "targets", endpoints_file=tmp_path / "ep.json", log=logs.append,
                       speedup=10.0, grace_s=30.0)

    async def go():
        api.pods = [_pod(isl, "p1")]
        await fe.sync_once()
        addr = next(iter(fe.pods.values())).address
        async with aiohttp.ClientSession() as s:
            body = {"prompt": "hi", "max_tokens": 300, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            async with s.post(f"http://{addr}/v1/completions", json=body) as r:
                assert r.status == 200
                first = await r.content.readline()
                assert first.startswith(b"data:")
                api.pods = []
                ch = await fe.sync_once()  # the pod is deleted while the request streams
                assert ch.stopped == ["llm/p1"] and fe.endpoints()["services"][f"{isl.name}.llm.svc"] == []
                rest = await r.read()
            assert rest.rstrip().endswith(b"data: [DONE]")
            text = first + rest
            usage = [json.loads(x[5:]) for x in text.split(b"\n") if x.startswith(b"data: {") and b'"usage"' in x]
            assert usage and usage[-1]["usage"]["completion_tokens"] == 300
            for _ in range(40):
                if not fe._draining:  # noqa: SLF001
                    break
                await asyncio.sleep(0.05)
            assert not fe._draining and "aborted" not in logs[-1]  # noqa: SLF001
            with pytest.raises(aiohttp.ClientError):
                async with s.get(f"http://{addr}/health") as r:
                    pass
        await fe.close()

    asyncio.run(go())
