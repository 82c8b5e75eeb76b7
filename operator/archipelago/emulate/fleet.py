"""Fleet emulator: one emulated engine per Running operator pod, Prometheus targets, endpoint map.

On the KWOK fleet pods have no processes. :class:`FleetEmulator` polls the API server for pods
labelled ``app.kubernetes.io/managed-by=archipelago`` and, for every Running pod (bound to a node,
not being deleted), runs an :class:`~archipelago.emulate.engine.EmulatedEngine` on a loopback port
in the current asyncio loop:

* engine kind and flags from the pod's ``engine`` container ``command`` + ``args`` (the real vLLM /
  SGLang command line the operator rendered, parsed by :func:`~archipelago.emulate.engine.parse_engine_argv`);
* GPU type from the pod's node label ``nvidia.com/gpu.product`` (or ``amd.com/gpu.product-name``),
  falling back to the pod annotation ``archipelago.dev/gpu-type``;
* a Prometheus file-based service-discovery target file ``<targets_dir>/emu-<namespace>-<pod>.json``
  with labels ``pod``, ``namespace``, ``model``, ``island`` (pod labels ``archipelago.dev/model`` /
  ``archipelago.dev/island``), plus ``archipelago_dev_model`` / ``archipelago_dev_island`` -- the names a
  ``kubernetes_sd`` + ``labelmap`` scrape config gives the same pod labels in a real cluster (the
  operator's default ``metrics_label``);
* an endpoint map, island Service (``<name>.<namespace>.svc``) -> live ``127.0.0.1:port`` addresses,
  written to a JSON file and served on ``GET /endpoints`` of an optional admin port, for the trace
  replayer (Services select pods by labels, exactly as kube-proxy would).

Pods that stop running or disappear leave the endpoint map and Prometheus' targets at once, and
their engine finishes the requests it holds for up to ``grace_s`` seconds before it stops (as a
pod's ``terminationGracePeriodSeconds``: kube-proxy stops sending new connections to a terminating
pod while the server drains). Pods whose
engine cannot start (model does not fit, unknown GPU) are reported once and skipped, as a real engine
would crash-loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web

from archipelago.emulate.engine import EmulatedEngine, EmulatorConfigError, EngineSpec, parse_engine_argv

__all__ = [
    "MANAGED_SELECTOR",
    "FleetChange",
    "EmulatedPod",
    "FleetEmulator",
    "pod_engine_argv",
    "pod_gpu",
    "pod_is_serving",
    "spec_for_pod",
    "target_labels",
    "service_endpoints",
    "write_target_file",
    "read_endpoints",
]

MANAGED_SELECTOR = "app.kubernetes.io/managed-by=archipelago"
LABEL_MODEL = "archipelago.dev/model"
LABEL_ISLAND = "archipelago.dev/island"
GPU_PRODUCT_LABELS = ("nvidia.com/gpu.product", "amd.com/gpu.product-name")
GPU_TYPE_ANNOTATION = "archipelago.dev/gpu-type"


# --------------------------------------------------------------------------------------------------
# pure helpers over plain dict manifests (camelCase, as the API server returns them)


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def pod_key(pod: Mapping[str, Any]) -> str:
    """``namespace/name`` of a pod."""
    m = _meta(pod)
    return f"{m.get('namespace', '')}/{m.get('name', '')}"


def pod_is_serving(pod: Mapping[str, Any]) -> bool:
    """True when the pod should have an engine: phase Running, bound to a node, not being deleted."""
    st = pod.get("status") or {}
    return (
        st.get("phase") == "Running"
        and bool((pod.get("spec") or {}).get("nodeName"))
        and not _meta(pod).get("deletionTimestamp")
    )


def pod_engine_argv(pod: Mapping[str, Any]) -> list[str]:
    """The engine command line of a pod: ``command + args`` of the container named ``engine`` (else the
    first container whose command mentions vllm or sglang, else the first container).

    Raises:
        EmulatorConfigError: the pod has no containers or no command.
    """
    containers = (pod.get("spec") or {}).get("containers") or []
    if not containers:
        raise EmulatorConfigError(f"pod {pod_key(pod)} has no containers")
    chosen = next((c for c in containers if c.get("name") == "engine"), None)
    if chosen is None:
        chosen = next((c for c in containers
                       if any(("vllm" in str(x) or "sglang" in str(x)) for x in (c.get("command") or []))),
                      containers[0])
    argv = [str(x) for x in (chosen.get("command") or [])] + [str(x) for x in (chosen.get("args") or [])]
    if not argv:
        raise EmulatorConfigError(
            f"pod {pod_key(pod)} container {chosen.get('name')!r} has no command/args; expected `vllm serve ...` "
            "or `python3 -m sglang.launch_server ...`"
        )
    return argv


def pod_gpu(pod: Mapping[str, Any], node_labels: Mapping[str, str] | None) -> str | None:
    """GPU product of the pod's node (``nvidia.com/gpu.product`` / ``amd.com/gpu.product-name``), else the
    pod annotation ``archipelago.dev/gpu-type``, else None."""
    for k in GPU_PRODUCT_LABELS:
        v = (node_labels or {}).get(k)
        if v:
            return str(v)
    ann = _meta(pod).get("annotations") or {}
    return ann.get(GPU_TYPE_ANNOTATION) or None


def spec_for_pod(pod: Mapping[str, Any], node_labels: Mapping[str, str] | None, *, host: str = "127.0.0.1",
                 speedup: float = 1.0, models_path: str | Path | None = None,
                 gpus_path: str | Path | None = None, slowdown: Mapping[str, float] | None = None) -> EngineSpec:
    """The :class:`EngineSpec` that emulates ``pod`` on its node, listening on ``host`` at a free port;
    ``slowdown`` maps GPU catalogue names (``H100-SXM``) to ``EngineSpec.slowdown`` factors.

    Raises:
        EmulatorConfigError: no command, no GPU type known for the node, unknown model, model does not fit.
    """
    gpu = pod_gpu(pod, node_labels)
    if gpu is None:
        node = (pod.get("spec") or {}).get("nodeName")
        raise EmulatorConfigError(
            f"pod {pod_key(pod)}: node {node!r} has no nvidia.com/gpu.product label and the pod has no "
            f"{GPU_TYPE_ANNOTATION} annotation; label the node with its GPU product"
        )
    spec = parse_engine_argv(pod_engine_argv(pod), env={}, gpu=gpu, host=host, port=0, speedup=speedup,
                             models_path=models_path, gpus_path=gpus_path)
    factor = (slowdown or {}).get(spec.gpu.name, 1.0)
    return spec if factor == 1.0 else replace(spec, slowdown=float(factor))


def target_labels(pod: Mapping[str, Any]) -> dict[str, str]:
    """file_sd labels of a pod's target: ``pod``, ``namespace``, ``model``, ``island`` (+ their
    ``archipelago_dev_*`` forms and ``node``)."""
    m = _meta(pod)
    labels = m.get("labels") or {}
    out = {
        "pod": str(m.get("name", "")),
        "namespace": str(m.get("namespace", "")),
        "model": str(labels.get(LABEL_MODEL, "")),
        "island": str(labels.get(LABEL_ISLAND, "")),
        "node": str((pod.get("spec") or {}).get("nodeName") or ""),
    }
    out["archipelago_dev_model"] = out["model"]
    out["archipelago_dev_island"] = out["island"]
    return out


def service_endpoints(services: Iterable[Mapping[str, Any]], pods: Iterable[tuple[Mapping[str, Any], str]]
                      ) -> dict[str, list[str]]:
    """Map each Service (``<name>.<namespace>.svc``) to the addresses of the pods it selects.

    Args:
        services: Service manifests (``spec.selector`` is a label map; empty selectors select nothing,
            as in Kubernetes).
        pods: ``(pod manifest, "host:port")`` of the pods being served.

    Returns:
        ``{service: sorted addresses}``; Services selecting no served pod map to ``[]``.
    """
    plist = list(pods)
    out: dict[str, list[str]] = {}
    for svc in services:
        m = _meta(svc)
        sel = (svc.get("spec") or {}).get("selector") or {}
        key = f"{m.get('name')}.{m.get('namespace')}.svc"
        addrs = []
        if sel:
            for pod, addr in plist:
                pm = _meta(pod)
                if pm.get("namespace") != m.get("namespace"):
                    continue
                pl = pm.get("labels") or {}
                if all(pl.get(k) == v for k, v in sel.items()):
                    addrs.append(addr)
        out[key] = sorted(addrs)
    return out


def write_target_file(targets_dir: str | os.PathLike, name: str, targets: list[str],
                      labels: Mapping[str, str]) -> Path:
    """Atomically write one Prometheus file_sd group ``[{"targets": [...], "labels": {...}}]`` to
    ``<targets_dir>/<name>.json`` (via a dot-file not matched by ``*.json``)."""
    d = Path(targets_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.json"
    tmp = d / f".{name}.json.tmp"
    tmp.write_text(json.dumps([{"targets": list(targets), "labels": dict(labels)}], indent=1))
    tmp.replace(path)
    return path


def _write_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    tmp.replace(path)


def read_endpoints(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read the ``services`` map of an endpoints file written by :class:`FleetEmulator`.

    Raises:
        ValueError: the file is not JSON or has no ``services`` object (names the file).
        OSError: unreadable file.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc}); expected the fleet emulator's endpoints file") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("services"), dict):
        raise ValueError(f"{p}: expected an object with a 'services' map of Service -> [host:port]")
    return {str(k): [str(a) for a in v] for k, v in doc["services"].items()}


# --------------------------------------------------------------------------------------------------
# the emulator


@dataclass
class EmulatedPod:
    """A pod being served: its manifest, engine and target file."""

    key: str
    uid: str
    pod: dict[str, Any]
    engine: EmulatedEngine
    address: str
    target_file: Path


@dataclass
class FleetChange:
    """What one :meth:`FleetEmulator.sync_once` did: ``started``/``stopped`` pod keys, ``failed``
    ``{pod key: reason}`` (first failure only)."""

    started: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class FleetEmulator:
    """Runs one emulated engine per Running operator pod (module docstring).

    Args:
        core_api: a ``kubernetes.client.CoreV1Api`` (its calls run in worker threads).
        targets_dir: Prometheus file_sd directory (``<run_dir>/prometheus/targets``).
        endpoints_file: where to write the Service -> endpoints JSON (None: not written).
        namespace: watch one namespace (None: all).
        selector: pod label selector.
        host: loopback address the engines bind.
        speedup: emulated seconds per wall second for every engine.
        poll_s: seconds between API polls (> 0).
        admin_port: serve ``GET /endpoints`` and ``GET /pods`` here (None: no admin server; 0: any port).
        models_path / gpus_path: catalogue files (default: the policies directory).
        log: callable taking one line of text (default ``print``).
        grace_s: seconds an engine whose pod went away keeps serving its in-flight requests (>= 0;
            Kubernetes' default ``terminationGracePeriodSeconds`` is 30).
        slowdown: ``{GPU catalogue name: factor}``: engines on that GPU run their steps this many times
            slower than the performance model (fault injection, see ``EngineSpec.slowdown``).

    Raises:
        ValueError: ``poll_s`` <= 0, ``speedup`` <= 0 or ``grace_s`` < 0.
    """

    def __init__(self, core_api: Any, targets_dir: str | os.PathLike, *, endpoints_file: str | os.PathLike | None = None,
                 namespace: str | None = None, selector: str = MANAGED_SELECTOR, host: str = "127.0.0.1",
                 speedup: float = 1.0, poll_s: float = 2.0, admin_port: int | None = None,
                 models_path: str | Path | None = None, gpus_path: str | Path | None = None,
                 log: Callable[[str], None] = print, grace_s: float = 30.0,
                 slowdown: Mapping[str, float] | None = None) -> None:
        if not poll_s > 0:
            raise ValueError(f"poll_s must be > 0 seconds, got {poll_s}")
        if not grace_s >= 0:
            raise ValueError(f"grace_s must be >= 0 seconds, got {grace_s}")
        if not speedup > 0:
            raise ValueError(f"speedup must be > 0, got {speedup}")
        self.slowdown = dict(slowdown or {})
        for g, f in self.slowdown.items():
            if not f > 0:
                raise ValueError(f"slowdown[{g!r}] must be > 0, got {f}")
        self.api = core_api
        self.targets_dir = Path(targets_dir)
        self.endpoints_file = Path(endpoints_file) if endpoints_file else None
        self.namespace = namespace
        self.selector = selector
        self.host = host
        self.speedup = speedup
        self.poll_s = poll_s
        self.admin_port = admin_port
        self.models_path = models_path
        self.gpus_path = gpus_path
        self.log = log
        self.grace_s = float(grace_s)
        self.pods: dict[str, EmulatedPod] = {}  # by uid
        self._draining: dict[str, asyncio.Task] = {}  # uid -> task stopping a departed pod's engine
        self._failed: dict[str, str] = {}  # uid -> reason
        self._node_labels: dict[str, dict[str, str]] = {}
        self._services: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self.last_error: str | None = None

    # -- API reads (threads) --------------------------------------------------------------------

    def _serialize(self, obj: Any) -> Any:
        client = getattr(self.api, "api_client", None)
        if client is not None and hasattr(client, "sanitize_for_serialization"):
            return client.sanitize_for_serialization(obj)
        return obj

    def _list(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        if self.namespace:
            pods = self.api.list_namespaced_pod(self.namespace, label_selector=self.selector)
            svcs = self.api.list_namespaced_service(self.namespace, label_selector=self.selector)
        else:
            pods = self.api.list_pod_for_all_namespaces(label_selector=self.selector)
            svcs = self.api.list_service_for_all_namespaces(label_selector=self.selector)
        p = self._serialize(pods)
        s = self._serialize(svcs)
        return list(p.get("items") or []), list(s.get("items") or [])

    def _nodes(self) -> dict[str, dict[str, str]]:
        nodes = self._serialize(self.api.list_node())
        return {n["metadata"]["name"]: dict(n["metadata"].get("labels") or {}) for n in nodes.get("items") or []}

    # -- reconcile ------------------------------------------------------------------------------

    async def sync_once(self) -> FleetChange:
        """One poll: start engines for new Running pods, stop engines of pods gone or not Running,
        rewrite the endpoint map. API errors are logged and leave the served set unchanged.

        Returns:
            :class:`FleetChange`.
        """
        change = FleetChange()
        try:
            pods, services = await asyncio.to_thread(self._list)
        except Exception as exc:  # noqa: BLE001 - API outage: keep serving what runs
            msg = f"fleet emulator: listing pods failed: {exc}"
            if msg != self.last_error:
                self.log(msg)
            self.last_error = msg
            return change
        self.last_error = None
        self._services = services
        want = {}
        for pod in pods:
            if pod_is_serving(pod):
                want[_meta(pod).get("uid") or pod_key(pod)] = pod
        for uid in list(self.pods):
            if uid not in want:
                ep = self.pods.pop(uid)
                with contextlib.suppress(FileNotFoundError):
                    ep.target_file.unlink()
                self._draining[uid] = asyncio.get_running_loop().create_task(self._drain(ep))
                change.stopped.append(ep.key)
        new_nodes = {(p.get("spec") or {}).get("nodeName") for p in want.values()} - set(self._node_labels)
        if new_nodes:
            try:
                self._node_labels = await asyncio.to_thread(self._nodes)
            except Exception as exc:  # noqa: BLE001
                self.log(f"fleet emulator: listing nodes failed: {exc}")
        for uid, pod in want.items():
            if uid in self.pods or uid in self._failed:
                continue
            key = pod_key(pod)
            node = (pod.get("spec") or {}).get("nodeName")
            try:
                spec = spec_for_pod(pod, self._node_labels.get(node), host=self.host, speedup=self.speedup,
                                    models_path=self.models_path, gpus_path=self.gpus_path, slowdown=self.slowdown)
                eng = EmulatedEngine(spec)
                port = await eng.start()
            except (EmulatorConfigError, ValueError, OSError) as exc:
                self._failed[uid] = str(exc)
                change.failed[key] = str(exc)
                self.log(f"fleet emulator: cannot emulate pod {key}: {exc}")
                continue
            addr = f"{self.host}:{port}"
            m = _meta(pod)
            tf = write_target_file(self.targets_dir, f"emu-{m.get('namespace')}-{m.get('name')}", [addr],
                                   target_labels(pod))
            self.pods[uid] = EmulatedPod(key=key, uid=uid, pod=pod, engine=eng, address=addr, target_file=tf)
            change.started.append(key)
            self.log(f"fleet emulator: serving {key} ({spec.kind} {spec.served_model_name}, {spec.tp}x "
                     f"{spec.gpu.name}) on {addr}")
        self._failed = {u: r for u, r in self._failed.items() if u in want}
        self._write_endpoints()
        return change

    async def _stop_pod(self, uid: str) -> None:
        ep = self.pods.get(uid)
        if ep is None:
            return
        with contextlib.suppress(FileNotFoundError):
            ep.target_file.unlink()
        await ep.engine.stop()
        self.log(f"fleet emulator: stopped {ep.key} ({ep.address})")

    async def _drain(self, ep: EmulatedPod) -> None:
        """Stop a departed pod's engine once it holds no request, or after ``grace_s`` seconds (or when
        the fleet emulator closes)."""
        t_end = time.monotonic() + self.grace_s
        try:
            while ep.engine.scheduler.has_work() and time.monotonic() < t_end:
                await asyncio.sleep(0.25)
        finally:
            left = ep.engine.scheduler.num_running + ep.engine.scheduler.num_waiting
            await ep.engine.stop()
            self._draining.pop(ep.uid, None)
            self.log(f"fleet emulator: stopped {ep.key} ({ep.address})"
                     + (f", aborted {left} requests in flight" if left else ""))

    # -- endpoint map ---------------------------------------------------------------------------

    def endpoints(self) -> dict[str, Any]:
        """``{"updated": unix seconds, "services": {svc: [addr]}, "pods": [{namespace, pod, model, island,
        address, gpu, tp, engine}]}``."""
        served = [(ep.pod, ep.address) for ep in self.pods.values()]
        pods = []
        for ep in self.pods.values():
            lab = target_labels(ep.pod)
            s = ep.engine.spec
            pods.append({"namespace": lab["namespace"], "pod": lab["pod"], "model": lab["model"],
                         "island": lab["island"], "address": ep.address, "gpu": s.gpu.name, "tp": s.tp,
                         "engine": s.kind})
        return {"updated": time.time(), "services": service_endpoints(self._services, served),
                "pods": sorted(pods, key=lambda d: (d["namespace"], d["pod"]))}

    def _write_endpoints(self) -> None:
        if self.endpoints_file is not None:
            _write_json(self.endpoints_file, self.endpoints())

    async def _admin(self) -> None:
        app = web.Application()

        async def endpoints(_: web.Request) -> web.Response:
            return web.json_response(self.endpoints())

        app.router.add_get("/endpoints", endpoints)
        app.router.add_get("/pods", endpoints)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.admin_port or 0)
        await site.start()
        socks = getattr(site._server, "sockets", None) or []  # noqa: SLF001
        if socks:
            self.admin_port = int(socks[0].getsockname()[1])
            self.log(f"fleet emulator: endpoint map on http://{self.host}:{self.admin_port}/endpoints")

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Poll every ``poll_s`` seconds until ``stop`` is set; then stop every engine (:meth:`close`)."""
        stop = stop or asyncio.Event()
        if self.admin_port is not None:
            await self._admin()
        try:
            while not stop.is_set():
                await self.sync_once()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.poll_s)
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop every engine, remove their target files, clear the endpoint map and the admin server."""
        for uid in list(self.pods):
            await self._stop_pod(uid)
            self.pods.pop(uid, None)
        for task in list(self._draining.values()):
            task.cancel()
        for ep_task in list(self._draining.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await ep_task
        self._write_endpoints()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
