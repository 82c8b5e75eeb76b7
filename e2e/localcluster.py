"""A real local Kubernetes control plane with a KWOK GPU fleet, for Archipelago's e2e tests.

No container engine is needed: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
KWOK (which plays the kubelets of fake GPU nodes) run as local processes on 127.0.0.1, each on a
free port, so two clusters can run side by side. The binaries are built from Go modules by
``e2e/build-binaries.sh`` (see ``shared/reference/LOCAL_CLUSTER.md``).

Everything a cluster needs lives in its *run directory* (default
``~/.cache/archipelago/clusters/<name>/``; ``$ARCHIPELAGO_RUN_DIR/<name>/`` when that variable is
set; ``--run-dir`` overrides both)::

    pki/          CA, API server serving cert, service-account key pair, static token file
    kubeconfig    admin kubeconfig (user ``archipelago-admin``, group ``system:masters``)
    kubeconfigs/  kube-controller-manager, kube-scheduler and kwok kubeconfigs
    etcd/         etcd data (wiped on every fresh start)
    logs/         one log per process (the previous start's logs move to logs.prev/)
    state.json    PIDs, ports, binary paths, fleet file

Processes are tracked by PID and stopped by PID (SIGTERM, wait, SIGKILL), after checking that
the PID still runs the binary that was started, never by process name.

CLI::

    python e2e/localcluster.py up [--fleet e2e/fleets/demo.yaml] [--name demo] [--with-prometheus]
    python e2e/localcluster.py down [--name demo] [--purge]
    python e2e/localcluster.py status [--name demo]
    python e2e/localcluster.py kubeconfig [--name demo]
    python e2e/localcluster.py logs [COMPONENT] [--name demo] [--lines 40]

Fleet files (``e2e/fleets/*.yaml``) describe node groups; :func:`fleet_nodes` turns them into
Node manifests carrying GPU capacity (``nvidia.com/gpu`` / ``amd.com/gpu``) and the labels that
NVIDIA GPU Feature Discovery (GFD) or the AMD GPU node labeller would put on real nodes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

E2E_DIR = Path(__file__).resolve().parent
REPO_ROOT = E2E_DIR.parent
CACHE_DIR = Path(os.environ.get("ARCHIPELAGO_CACHE", str(Path.home() / ".cache" / "archipelago")))
BUILD_SCRIPT = E2E_DIR / "build-binaries.sh"
DEFAULT_CRD_DIR = REPO_ROOT / "crds"
DEFAULT_FLEET = E2E_DIR / "fleets" / "demo.yaml"

#: Start order; stop order is the reverse.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok")

#: Annotation KWOK selects its fake nodes by (``--manage-nodes-with-annotation-selector``).
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
#: Label put on every node created from a fleet file; its value is the fleet's name.
FLEET_LABEL = "archipelago.dev/fleet"
#: Label naming the node group (``namePrefix``) a node was created from.
NODE_GROUP_LABEL = "archipelago.dev/node-group"

SERVICE_CIDR = "10.96.0.0/16"  # same default range as kind; virtual, nothing routes it here
SERVICE_IP = "10.96.0.1"  # first address of SERVICE_CIDR: the `kubernetes` Service ClusterIP
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"


# ============================================================================================
# Errors
# ============================================================================================


class FleetError(ValueError):
    """A fleet file (or document) is invalid.

    The message names the file, the line when known, the field path (e.g.
    ``nodeGroups[2].count``) and what to write instead.
    """


class ClusterError(RuntimeError):
    """The local cluster could not be brought up, reached, or stopped.

    Attributes:
        component: the component at fault (``etcd``, ``kube-apiserver``, ..., ``binaries``,
            ``fleet``, ``crds``), or ``""`` when none in particular.
        log_tail: the last lines of that component's log, when there is one.
    """

    def __init__(self, message: str, component: str = "", log_tail: str = "") -> None:
        super().__init__(message)
        self.component = component
        self.log_tail = log_tail

    def report(self) -> str:
        """The message followed by the component's log tail (the text printed on failure)."""
        text = str(self)
        if self.log_tail:
            text += f"\n--- last lines of the {self.component} log ---\n{self.log_tail.rstrip()}\n---"
        return text


# ============================================================================================
# Fleet files -> Node manifests (pure)
# ============================================================================================

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# Kubernetes resource.Quantity syntax (k8s.io/apimachinery/pkg/api/resource/quantity.go).
_QUANTITY = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)(([eE][+-]?\d+)|[numkMGTPE]|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
_VENDORS = ("nvidia", "amd")
_DEFAULT_RESOURCE = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu"}

_FLEET_KEYS = {"apiVersion", "kind", "name", "description", "gpuTypes", "defaults", "nodeGroups"}
_GPU_TYPE_KEYS = {"vendor", "product", "memoryMiB", "family", "computeCapability", "labels"}
_GROUP_KEYS = {
    "namePrefix", "count", "gpuType", "gpusPerNode", "resourceName", "cpu", "memory", "pods",
    "instanceType", "zone", "zones", "labels", "annotations", "taints", "description",
}
_DEFAULT_KEYS = {"cpu", "memory", "pods", "labels", "annotations", "instanceType", "zone", "zones", "taints"}


def _yaml_lines(node: yaml.Node, path: tuple = ()) -> dict[tuple, int]:
    """Map every field path in a composed YAML node tree to its 1-based line number."""
    out: dict[tuple, int] = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                child = (*path, key_node.value)
                out.update(_yaml_lines(value_node, child))
                out[child] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.update(_yaml_lines(item, (*path, i)))
    return out


class _Ctx:
    """Where a fleet document came from, to make error messages point at file and line."""

    def __init__(self, source: str, lines: Mapping[tuple, int] | None = None) -> None:
        self.source = source
        self.lines = lines or {}

    def fail(self, path: tuple, problem: str, fix: str) -> FleetError:
        where = self.source
        for k in range(len(path), -1, -1):
            if path[:k] in self.lines:
                where += f":{self.lines[path[:k]]}"
                break
        return FleetError(f"{where}: {_fmt_path(path) or '<document>'}: {problem}; {fix}")


def _fmt_path(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def load_fleet(path: str | os.PathLike) -> dict:
    """Read and validate a fleet file.

    Args:
        path: YAML file with ``kind: Fleet`` (see ``e2e/fleets/demo.yaml`` for the format).

    Returns:
        The fleet document as a dict, with ``_source`` (the path) and ``_lines`` (field path ->
        line number) added so that :func:`fleet_nodes` can report errors against the file.

    Raises:
        FleetError: the file is missing, is not YAML, or fails validation; the message names
            the file, line and field.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise FleetError(f"{p}: cannot read fleet file ({e.strerror}); pass an existing file, "
                         f"e.g. {DEFAULT_FLEET.relative_to(REPO_ROOT)}") from e
    try:
        tree = yaml.compose(text)
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise FleetError(f"{p}{line}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from e
    if not isinstance(doc, dict):
        raise FleetError(f"{p}: a fleet file must be a YAML mapping with kind: Fleet and nodeGroups")
    doc["_source"] = str(p)
    doc["_lines"] = _yaml_lines(tree) if tree is not None else {}
    fleet_nodes(doc)  # validate now, so errors surface at load time
    return doc


def _check_keys(ctx: _Ctx, path: tuple, obj: Mapping, allowed: set[str]) -> None:
    for k in obj:
        if k not in allowed:
            raise ctx.fail((*path, k), f"unknown field {k!r}",
                           f"allowed fields are {', '.join(sorted(allowed))}")


def _int(ctx: _Ctx, path: tuple, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ctx.fail(path, f"must be an integer >= {minimum}, got {value!r}",
                       f"write a whole number such as {max(minimum, 1)}")
    return value


def _str(ctx: _Ctx, path: tuple, value: Any, pattern: re.Pattern | None = None, hint: str = "") -> str:
    if not isinstance(value, str) or not value:
        raise ctx.fail(path, f"must be a non-empty string, got {value!r}", hint or "quote the value")
    if pattern is not None and not pattern.match(value):
        raise ctx.fail(path, f"{value!r} is not allowed here", hint)
    return value


def _quantity(ctx: _Ctx, path: tuple, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ctx.fail(path, f"must be a Kubernetes quantity, got {value!r}", 'write e.g. "96" or "768Gi"')
    s = str(value)
    if not _QUANTITY.match(s):
        raise ctx.fail(path, f"{s!r} is not a Kubernetes quantity", 'write e.g. "96", "500m", "768Gi"')
    return s


def _labels(ctx: _Ctx, path: tuple, value: Any, *, values_are_labels: bool = True) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ctx.fail(path, f"must be a mapping of key: value, got {type(value).__name__}",
                       "write e.g. {team: inference}")
    out: dict[str, str] = {}
    for k, v in value.items():
        kp = (*path, k)
        if not isinstance(k, str) or not _label_key_ok(k):
            raise ctx.fail(kp, f"{k!r} is not a valid label/annotation key",
                           "use [prefix/]name with name <= 63 chars of [A-Za-z0-9-_.]")
        if isinstance(v, bool):
            v = "true" if v else "false"
        if not isinstance(v, (str, int, float)):
            raise ctx.fail(kp, f"value must be a string, got {v!r}", "quote the value")
        v = str(v)
        if values_are_labels and (len(v) > 63 or not _LABEL_VALUE.match(v)):
            raise ctx.fail(kp, f"{v!r} is not a valid label value",
                           "use <= 63 chars of [A-Za-z0-9-_.], starting and ending alphanumeric")
        out[k] = v
    return out


def _label_key_ok(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_LABEL_NAME.match(name))


def _taints(ctx: _Ctx, path: tuple, value: Any) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ctx.fail(path, "must be a list of {key, value, effect}",
                       "write e.g. [{key: dedicated, value: inference, effect: NoSchedule}]")
    out = []
    for i, t in enumerate(value):
        tp = (*path, i)
        if not isinstance(t, dict):
            raise ctx.fail(tp, f"must be a mapping, got {t!r}", "write {key: ..., value: ..., effect: ...}")
        _check_keys(ctx, tp, t, {"key", "value", "effect"})
        key = _str(ctx, (*tp, "key"), t.get("key"), hint="every taint needs a key")
        if not _label_key_ok(key):
            raise ctx.fail((*tp, "key"), f"{key!r} is not a valid taint key", "use [prefix/]name")
        effect = t.get("effect")
        if effect not in _TAINT_EFFECTS:
            raise ctx.fail((*tp, "effect"), f"effect {effect!r} is not a taint effect",
                           f"use one of {', '.join(_TAINT_EFFECTS)}")
        taint = {"key": key, "effect": effect}
        if t.get("value") is not None:
            taint["value"] = str(t["value"])
        out.append(taint)
    return out


def _gpu_labels(ctx: _Ctx, path: tuple, gt: Mapping, gpus_per_node: int) -> dict[str, str]:
    """Labels that GFD (NVIDIA) or the AMD GPU node labeller put on a node with these GPUs.

    NVIDIA names follow GPU Feature Discovery (github.com/NVIDIA/k8s-device-plugin, GFD docs
    "Generated Labels"): ``nvidia.com/gpu.product`` (product name with spaces as dashes),
    ``.memory`` (MiB per GPU, as NVML reports), ``.count``, ``.family`` (architecture, lower
    case), ``.compute.major``/``.compute.minor``; ``nvidia.com/gpu.present`` is the GPU
    Operator's NFD rule. AMD names follow ROCm/k8s-device-plugin's node labeller:
    ``amd.com/gpu.product-name``, ``.family``, ``.vram`` (e.g. ``192G``); the GPU count has no
    labeller label, so ``amd.com/gpu.count`` is the harness's own addition.
    """
    vendor = gt["vendor"]
    labels: dict[str, str] = {}
    if vendor == "nvidia":
        labels["nvidia.com/gpu.present"] = "true"
        labels["nvidia.com/gpu.product"] = gt["product"]
        labels["nvidia.com/gpu.count"] = str(gpus_per_node)
        labels["nvidia.com/gpu.replicas"] = "1"
        if gt.get("memoryMiB") is not None:
            labels["nvidia.com/gpu.memory"] = str(gt["memoryMiB"])
        if gt.get("family") is not None:
            labels["nvidia.com/gpu.family"] = gt["family"]
        cc = gt.get("computeCapability")
        if cc is not None:
            m = re.fullmatch(r"(\d+)\.(\d+)", str(cc))
            if not m:
                raise ctx.fail((*path, "computeCapability"), f"{cc!r} is not MAJOR.MINOR",
                               'write it quoted, e.g. "9.0" for Hopper, "8.9" for Ada')
            labels["nvidia.com/gpu.compute.major"] = m.group(1)
            labels["nvidia.com/gpu.compute.minor"] = m.group(2)
    else:
        labels["amd.com/gpu.product-name"] = gt["product"]
        labels["amd.com/gpu.count"] = str(gpus_per_node)
        if gt.get("memoryMiB") is not None:
            labels["amd.com/gpu.vram"] = f"{int(gt['memoryMiB']) // 1024}G"
        if gt.get("family") is not None:
            labels["amd.com/gpu.family"] = gt["family"]
        if gt.get("computeCapability") is not None:
            raise ctx.fail((*path, "computeCapability"), "is an NVIDIA notion",
                           "drop it for vendor: amd (put e.g. amd.com/gpu.device-id under labels)")
    labels.update(gt.get("labels") or {})
    for k, v in labels.items():
        if len(v) > 63 or not _LABEL_VALUE.match(v):
            raise ctx.fail(path, f"label {k}={v!r} is not a valid label value",
                           "product names use dashes instead of spaces, e.g. NVIDIA-H100-80GB-HBM3")
    return labels


def _gpu_types(ctx: _Ctx, value: Any) -> dict[str, dict]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ctx.fail(("gpuTypes",), "must be a mapping from a GPU type key to its description",
                       "write e.g. gpuTypes: {H100-80GB: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3}}")
    out: dict[str, dict] = {}
    for key, gt in value.items():
        p = ("gpuTypes", key)
        if not isinstance(gt, dict):
            raise ctx.fail(p, "must be a mapping", "give at least vendor and product")
        _check_keys(ctx, p, gt, _GPU_TYPE_KEYS)
        vendor = gt.get("vendor")
        if vendor not in _VENDORS:
            raise ctx.fail((*p, "vendor"), f"vendor {vendor!r} is not supported",
                           f"use one of {', '.join(_VENDORS)}")
        product = _str(ctx, (*p, "product"), gt.get("product"),
                       hint="give the product label value, e.g. NVIDIA-H100-80GB-HBM3")
        if gt.get("memoryMiB") is not None:
            _int(ctx, (*p, "memoryMiB"), gt["memoryMiB"], 1)
        if gt.get("family") is not None:
            _str(ctx, (*p, "family"), gt["family"], _LABEL_VALUE, "e.g. hopper, ampere, ada-lovelace")
        out[str(key)] = {**gt, "vendor": vendor, "product": product,
                         "labels": _labels(ctx, (*p, "labels"), gt.get("labels"))}
    return out


def fleet_nodes(fleet_doc: Mapping) -> list[dict]:
    """Turn a fleet document into KWOK Node manifests (pure; no I/O).

    Args:
        fleet_doc: a parsed fleet file (``kind: Fleet``) with ``nodeGroups`` (list), optional
            ``gpuTypes`` (key -> ``{vendor: nvidia|amd, product, memoryMiB, family,
            computeCapability, labels}``) and ``defaults`` (cpu, memory, pods, labels,
            annotations, instanceType, zone/zones, taints applied to every group). Each node
            group has ``namePrefix``, ``count``, optionally ``gpuType`` + ``gpusPerNode``
            (+ ``resourceName``, default ``nvidia.com/gpu`` or ``amd.com/gpu`` by vendor),
            ``cpu``, ``memory`` (Kubernetes quantities), ``pods``, ``instanceType``, ``zone`` or
            ``zones`` (round-robin), ``labels``, ``annotations``, ``taints``.
            ``_source``/``_lines`` (added by :func:`load_fleet`) only improve error messages.

    Returns:
        One dict per node, in file order, named ``<namePrefix>-<i>`` (i from 0), each a full
        ``v1`` Node: labels (hostname, os, arch, ``type: kwok``, fleet/node-group labels,
        instance type, zone, GFD/AMD labeller labels), the ``kwok.x-k8s.io/node: fake``
        annotation (no KWOK taint: pods need not tolerate anything), optional taints, and
        ``status.capacity`` == ``status.allocatable`` with cpu, memory, pods and the GPU resource
        (count of whole GPUs).

    Raises:
        FleetError: on any invalid field, naming file, line, field path and the fix.
    """
    ctx = _Ctx(str(fleet_doc.get("_source", "<fleet>")), fleet_doc.get("_lines"))
    _check_keys(ctx, (), {k: v for k, v in fleet_doc.items() if not str(k).startswith("_")}, _FLEET_KEYS)
    if fleet_doc.get("kind", "Fleet") != "Fleet":
        raise ctx.fail(("kind",), f"kind {fleet_doc.get('kind')!r} is not a fleet file", "write kind: Fleet")
    fleet_name = fleet_doc.get("name", "fleet")
    _str(ctx, ("name",), fleet_name, _DNS_LABEL, "use lower-case letters, digits and dashes")
    gpu_types = _gpu_types(ctx, fleet_doc.get("gpuTypes"))
    defaults = fleet_doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ctx.fail(("defaults",), "must be a mapping", "write e.g. defaults: {pods: 110}")
    _check_keys(ctx, ("defaults",), defaults, _DEFAULT_KEYS)
    groups = fleet_doc.get("nodeGroups")
    if not isinstance(groups, list) or not groups:
        raise ctx.fail(("nodeGroups",), "must be a non-empty list of node groups",
                       "add e.g. nodeGroups: [{namePrefix: cpu, count: 2}]")

    nodes: list[dict] = []
    seen: dict[str, tuple] = {}
    for gi, group in enumerate(groups):
        gp = ("nodeGroups", gi)
        if not isinstance(group, dict):
            raise ctx.fail(gp, "must be a mapping", "give at least namePrefix and count")
        _check_keys(ctx, gp, group, _GROUP_KEYS)
        merged = {**defaults, **group}

        def where(key: str, _gp: tuple = gp, _group: dict = group) -> tuple:
            return (*_gp, key) if key in _group else ("defaults", key)

        prefix = _str(ctx, (*gp, "namePrefix"), group.get("namePrefix"), _DNS_LABEL,
                      "use lower-case letters, digits and dashes (it becomes <namePrefix>-<i>)")
        count = _int(ctx, (*gp, "count"), group.get("count"), 1)
        cpu = _quantity(ctx, where("cpu"), merged.get("cpu", "32"))
        memory = _quantity(ctx, where("memory"), merged.get("memory", "256Gi"))
        pods = _int(ctx, where("pods"), merged.get("pods", 110), 1)
        labels = {**_labels(ctx, ("defaults", "labels"), defaults.get("labels")),
                  **_labels(ctx, (*gp, "labels"), group.get("labels"))}
        annotations = {**_labels(ctx, ("defaults", "annotations"), defaults.get("annotations"),
                                 values_are_labels=False),
                       **_labels(ctx, (*gp, "annotations"), group.get("annotations"), values_are_labels=False)}
        taints = _taints(ctx, where("taints"), merged.get("taints"))
        for scope, sp in ((group, gp), (defaults, ("defaults",))):
            if "zone" in scope and "zones" in scope:
                raise ctx.fail((*sp, "zones"), "both zone and zones are set", "keep one of them")
        if "zone" in group or "zones" in group:  # a group's zone(s) replace the defaults' zone(s)
            merged.pop("zone" if "zones" in group else "zones", None)
        zones: list[str] = []
        if merged.get("zones") is not None:
            zl = merged["zones"]
            if not isinstance(zl, list) or not zl:
                raise ctx.fail(where("zones"), "must be a non-empty list", "write e.g. [zone-a, zone-b]")
            zones = [_str(ctx, (*where("zones"), i), z, _LABEL_VALUE, "use a valid label value")
                     for i, z in enumerate(zl)]
        elif merged.get("zone") is not None:
            zones = [_str(ctx, where("zone"), merged["zone"], _LABEL_VALUE, "use a valid label value")]
        instance_type = merged.get("instanceType")
        if instance_type is not None:
            _str(ctx, where("instanceType"), instance_type, _LABEL_VALUE, "use a valid label value")

        gpu_labels: dict[str, str] = {}
        gpu_resource: tuple[str, int] | None = None
        if group.get("gpuType") is not None:
            key = str(group["gpuType"])
            if key not in gpu_types:
                raise ctx.fail((*gp, "gpuType"), f"GPU type {key!r} is not declared under gpuTypes",
                               f"use one of {', '.join(sorted(gpu_types)) or '(none declared)'}")
            gt = gpu_types[key]
            n_gpu = _int(ctx, (*gp, "gpusPerNode"), group.get("gpusPerNode"), 1)
            resource = group.get("resourceName", _DEFAULT_RESOURCE[gt["vendor"]])
            _str(ctx, (*gp, "resourceName"), resource, hint="e.g. nvidia.com/gpu")
            if "/" not in resource or not _label_key_ok(resource):
                raise ctx.fail((*gp, "resourceName"), f"{resource!r} is not an extended resource name",
                               "use <domain>/<name>, e.g. nvidia.com/gpu")
            gpu_labels = _gpu_labels(ctx, ("gpuTypes", key), gt, n_gpu)
            gpu_resource = (resource, n_gpu)
        elif group.get("gpusPerNode") is not None or group.get("resourceName") is not None:
            raise ctx.fail((*gp, "gpusPerNode"), "is set but the group has no gpuType",
                           "add gpuType: <key of gpuTypes>, or drop gpusPerNode/resourceName")

        for i in range(count):
            name = f"{prefix}-{i}"
            if name in seen:
                raise ctx.fail((*gp, "namePrefix"), f"node name {name} is also produced by "
                               f"{_fmt_path(seen[name])}", "give every node group a distinct namePrefix")
            seen[name] = gp
            node_labels = {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                FLEET_LABEL: fleet_name,
                NODE_GROUP_LABEL: prefix,
            }
            if instance_type:
                node_labels["node.kubernetes.io/instance-type"] = instance_type
            if zones:
                node_labels["topology.kubernetes.io/zone"] = zones[i % len(zones)]
            node_labels.update(gpu_labels)
            node_labels.update(labels)
            capacity = {"cpu": cpu, "memory": memory, "pods": str(pods)}
            if gpu_resource is not None:
                capacity[gpu_resource[0]] = str(gpu_resource[1])
            node: dict[str, Any] = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": node_labels,
                    "annotations": {KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0",
                                    **annotations},
                },
                "spec": {},
                "status": {
                    "capacity": dict(capacity),
                    "allocatable": dict(capacity),
                },
            }
            if taints:
                node["spec"]["taints"] = [dict(t) for t in taints]
            nodes.append(node)
    return nodes


def fleet_summary(nodes: Iterable[Mapping]) -> list[dict]:
    """Aggregate node manifests (or API Node objects as dicts) by GPU product.

    Returns:
        Rows ``{"product", "resource", "nodes", "gpus"}`` sorted by product; CPU-only nodes
        are one row with product ``"(none)"`` and 0 GPUs.
    """
    rows: dict[tuple[str, str], dict] = {}
    for n in nodes:
        labels = (n.get("metadata") or {}).get("labels") or {}
        alloc = (n.get("status") or {}).get("allocatable") or {}
        product = labels.get("nvidia.com/gpu.product") or labels.get("amd.com/gpu.product-name") or "(none)"
        resource = next((r for r in _DEFAULT_RESOURCE.values() if r in alloc), "")
        gpus = int(alloc.get(resource, 0)) if resource else 0
        row = rows.setdefault((product, resource), {"product": product, "resource": resource,
                                                    "nodes": 0, "gpus": 0})
        row["nodes"] += 1
        row["gpus"] += gpus
    return [rows[k] for k in sorted(rows)]


# ============================================================================================
# Binaries
# ============================================================================================


def _other_builds_running() -> list[int]:
    """PIDs of running ``build-binaries.sh`` processes (read from /proc; nothing is signalled)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"build-binaries.sh") for a in argv):
            pids.append(int(d.name))
    return pids


def find_binaries(build: bool = True, wait_for_build: float = 3600.0) -> Path:
    """Locate (and if needed build) the control-plane binaries.

    Order: ``$ARCHIPELAGO_BIN_DIR`` if set (must hold every binary); else run
    ``e2e/build-binaries.sh``, which returns its cached directory in well under a second when the
    pinned binaries exist and otherwise builds them (20-40 min cold on 2 cores). If another
    ``build-binaries.sh`` is already running, wait for it (up to ``wait_for_build`` s) instead of
    starting a second build.

    Args:
        build: when False, never start a build; fail if the binaries are not there.
        wait_for_build: seconds to wait for a build already under way.

    Returns:
        The directory holding etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
        kubectl and kwok.

    Raises:
        ClusterError (component ``binaries``): not found, or the build failed (with its output).
    """
    env_dir = os.environ.get("ARCHIPELAGO_BIN_DIR")
    if env_dir:
        d = Path(env_dir)
        missing = [b for b in BINARIES if not os.access(d / b, os.X_OK)]
        if missing:
            raise ClusterError(f"ARCHIPELAGO_BIN_DIR={d} lacks {', '.join(missing)}; unset it to build "
                               f"them with e2e/build-binaries.sh", "binaries")
        return d
    deadline = time.monotonic() + wait_for_build
    while _other_builds_running():
        if time.monotonic() > deadline:
            raise ClusterError(f"another e2e/build-binaries.sh is still running after {wait_for_build:.0f} s "
                               f"(PIDs {_other_builds_running()}); wait for it or set ARCHIPELAGO_BIN_DIR",
                               "binaries")
        time.sleep(10)
    cached = CACHE_DIR / "bin-dir"  # written by scripts/setup.sh
    if not build:
        if cached.exists():
            d = Path(cached.read_text().strip())
            if all(os.access(d / b, os.X_OK) for b in BINARIES):
                return d
        raise ClusterError("control-plane binaries not found and build=False; run `bash e2e/build-binaries.sh` "
                           "(or `make setup`)", "binaries")
    try:
        proc = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True,
                              timeout=wait_for_build)
    except subprocess.TimeoutExpired as e:
        raise ClusterError(f"e2e/build-binaries.sh took longer than {wait_for_build:.0f} s", "binaries") from e
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise ClusterError(f"e2e/build-binaries.sh failed (exit {proc.returncode}); the control plane cannot "
                           f"start without kube-apiserver, etcd, ... and kwok", "binaries",
                           log_tail="\n".join((proc.stderr or "").splitlines()[-30:]))
    d = Path(lines[-1])
    missing = [b for b in BINARIES if not os.access(d / b, os.X_OK)]
    if missing:
        raise ClusterError(f"e2e/build-binaries.sh printed {d}, which lacks {', '.join(missing)}", "binaries")
    return d


# ============================================================================================
# Processes (tracked by PID; stopped by PID)
# ============================================================================================

# Processes started by this Python process: PID -> (Popen, argv[0]). A child's PID cannot be
# reused before it is reaped, so for these Popen.poll() is authoritative.
_CHILDREN: dict[int, tuple[subprocess.Popen, str]] = {}


def _pid_cmd0(pid: int) -> str | None:
    """argv[0] of a live, non-zombie process, or None.

    /proc/<pid>/cmdline reads empty for a moment while a process is inside execve(2) (the
    parent of a vfork'ed child resumes before the new argv is mapped), so an empty answer is
    retried for up to 0.5 s before it counts as "not our program".
    """
    known = _CHILDREN.get(pid)
    if known is not None:
        return known[1] if known[0].poll() is None else None
    for _ in range(50):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return None
            cmd0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, IndexError):
            return None
        if cmd0:
            return cmd0
        time.sleep(0.01)
    return ""


def pid_alive(pid: int | None, cmd0: str | None = None) -> bool:
    """Whether ``pid`` is a live process (not a zombie) running ``cmd0`` (when given)."""
    if not pid:
        return False
    actual = _pid_cmd0(pid)
    return actual is not None and (cmd0 is None or actual == cmd0)


def start_process(name: str, argv: list[str], log_path: Path, env: Mapping[str, str] | None = None) -> int:
    """Start ``argv`` detached (own session) with stdout+stderr appended to ``log_path``.

    Returns:
        The PID. The process survives this Python process (the CLI exits after ``up``).

    Raises:
        ClusterError: the binary cannot be executed.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"### {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=dict(env) if env is not None else None,
                                    close_fds=True)
        except OSError as e:
            raise ClusterError(f"cannot start {name} ({argv[0]}): {e}", name) from e
    _CHILDREN[proc.pid] = (proc, argv[0])
    return proc.pid


def stop_process(pid: int | None, cmd0: str | None = None, timeout: float = 10.0) -> bool:
    """Stop one process by PID: SIGTERM, wait up to ``timeout`` s, then SIGKILL.

    Nothing is signalled when the PID is gone or now runs a different program than ``cmd0``
    (PID reuse). Returns True when a signal was sent.
    """
    if not pid_alive(pid, cmd0):
        known = _CHILDREN.get(pid or -1)
        if known is not None and known[0].poll() is not None:
            del _CHILDREN[pid]  # reaped
        return False
    assert pid is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid, cmd0):
        time.sleep(0.1)
    if pid_alive(pid, cmd0):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        end = time.monotonic() + 5
        while time.monotonic() < end and pid_alive(pid, cmd0):
            time.sleep(0.05)
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child[0].wait(timeout=1)
    return True


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (kernel-assigned, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a text file ('' when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def http_get(url: str, *, token: str | None = None, cafile: Path | None = None, insecure: bool = False,
             timeout: float = 3.0) -> tuple[int, str]:
    """GET ``url``; returns (HTTP status, body). Connection errors give (0, reason)."""
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    ctx = None
    if url.startswith("https"):
        if insecure:
            ctx = ssl._create_unverified_context()  # component self-signed serving certs
        else:
            ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError, ssl.SSLError) as e:
        return 0, str(getattr(e, "reason", e))


# ============================================================================================
# The cluster
# ============================================================================================


def default_run_dir(name: str) -> Path:
    """``$ARCHIPELAGO_RUN_DIR/<name>`` if that variable is set, else ``~/.cache/archipelago/clusters/<name>``."""
    base = os.environ.get("ARCHIPELAGO_RUN_DIR")
    return (Path(base) if base else CACHE_DIR / "clusters") / name


@dataclass
class Timings:
    """Seconds spent in each phase of :meth:`LocalCluster.up` (wall clock)."""

    phases: dict[str, float] = field(default_factory=dict)
    reused: bool = False
    #: what :func:`sync_nodes` did: created / kept / replaced / deleted node counts
    nodes: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.phases.values())


class LocalCluster:
    """One local control plane with a KWOK fleet, living in ``run_dir``.

    Args:
        name: cluster name (DNS label); selects the default run directory.
        run_dir: override the run directory.
        bin_dir: directory with the binaries (default: :func:`find_binaries`).

    Typical use::

        c = LocalCluster("demo")
        c.up(fleet="e2e/fleets/demo.yaml")   # -> Timings
        c.kubeconfig                         # admin kubeconfig path
        c.down()
    """

    def __init__(self, name: str = "demo", run_dir: str | os.PathLike | None = None,
                 bin_dir: str | os.PathLike | None = None) -> None:
        if not _DNS_LABEL.match(name):
            raise ClusterError(f"cluster name {name!r} must be lower-case letters, digits and dashes")
        self.name = name
        self.run_dir = Path(run_dir) if run_dir else default_run_dir(name)
        self._bin_dir = Path(bin_dir) if bin_dir else None
        self.pki = self.run_dir / "pki"
        self.logs = self.run_dir / "logs"
        self.state_path = self.run_dir / "state.json"
        self.kubeconfig = self.run_dir / "kubeconfig"

    # ---------------------------------------------------------------- state
    def state(self) -> dict:
        """Contents of state.json ({} when there is none)."""
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}

    def _save(self, state: dict) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
        tmp.replace(self.state_path)

    @property
    def bin_dir(self) -> Path:
        if self._bin_dir is None:
            self._bin_dir = find_binaries()
        return self._bin_dir

    def log_path(self, component: str) -> Path:
        """Log file of a component (``etcd``, ..., ``kwok``, ``prometheus``)."""
        return self.logs / f"{component}.log"

    def log_tail(self, component: str, lines: int = 40) -> str:
        return tail(self.log_path(component), lines)

    # ---------------------------------------------------------------- pki, kubeconfigs
    def _openssl(self, *args: str) -> None:
        proc = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=self.pki)
        if proc.returncode != 0:
            raise ClusterError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.strip()[-500:]}", "pki")

    def _ensure_pki(self) -> dict[str, str]:
        """Create CA, serving cert, SA key pair and tokens once; returns user -> token."""
        self.pki.mkdir(parents=True, exist_ok=True)
        os.chmod(self.pki, 0o700)
        if shutil.which("openssl") is None:
            raise ClusterError("the openssl CLI is missing; install it (apt-get install openssl)", "pki")
        cnf = self.pki / "openssl.cnf"
        if not (self.pki / "apiserver.crt").exists():
            cnf.write_text(
                "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = archipelago-local\n"
                "[v3_ca]\nbasicConstraints = critical,CA:TRUE\n"
                "keyUsage = critical,keyCertSign,cRLSign,digitalSignature\nsubjectKeyIdentifier = hash\n"
                "[v3_server]\nbasicConstraints = critical,CA:FALSE\n"
                "keyUsage = critical,digitalSignature,keyEncipherment\nextendedKeyUsage = serverAuth\n"
                "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid,issuer\nsubjectAltName = @alt\n"
                f"[alt]\nIP.1 = 127.0.0.1\nIP.2 = {SERVICE_IP}\nDNS.1 = localhost\nDNS.2 = kubernetes\n"
                "DNS.3 = kubernetes.default\nDNS.4 = kubernetes.default.svc\n"
                "DNS.5 = kubernetes.default.svc.cluster.local\n")
            self._openssl("req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", "ca.key",
                          "-out", "ca.crt", "-days", "3650", "-config", "openssl.cnf", "-extensions", "v3_ca",
                          "-subj", f"/CN=archipelago-local-ca-{self.name}")
            self._openssl("req", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", "apiserver.key",
                          "-out", "apiserver.csr", "-config", "openssl.cnf", "-subj", "/CN=kube-apiserver")
            self._openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                          "-CAcreateserial", "-out", "apiserver.crt", "-days", "3650",
                          "-extfile", "openssl.cnf", "-extensions", "v3_server")
        if not (self.pki / "sa.pub").exists():
            self._openssl("genrsa", "-out", "sa.key", "2048")
            self._openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        tokens_path = self.pki / "tokens.json"
        if tokens_path.exists():
            tokens = json.loads(tokens_path.read_text())
        else:
            tokens = {u: secrets.token_hex(24) for u in ("admin", "kcm", "scheduler", "kwok")}
            tokens_path.write_text(json.dumps(tokens))
            os.chmod(tokens_path, 0o600)
        # token,user,uid,"group1,group2"  (kube-apiserver --token-auth-file format)
        rows = [
            f'{tokens["admin"]},archipelago-admin,archipelago-admin,"system:masters"',
            f"{tokens['kcm']},system:kube-controller-manager,system:kube-controller-manager",
            f"{tokens['scheduler']},system:kube-scheduler,system:kube-scheduler",
            f'{tokens["kwok"]},kwok-controller,kwok-controller,"system:masters"',
        ]
        (self.pki / "tokens.csv").write_text("\n".join(rows) + "\n")
        os.chmod(self.pki / "tokens.csv", 0o600)
        return tokens

    def _write_kubeconfig(self, path: Path, user: str, token: str, port: int) -> None:
        import base64

        ca = base64.b64encode((self.pki / "ca.crt").read_bytes()).decode()
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": self.name, "cluster": {"server": f"https://127.0.0.1:{port}",
                                                         "certificate-authority-data": ca}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": self.name, "context": {"cluster": self.name, "user": user}}],
            "current-context": self.name,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        os.chmod(path, 0o600)

    # ---------------------------------------------------------------- component command lines
    def _argv(self, component: str, ports: Mapping[str, int]) -> list[str]:
        b = self.bin_dir
        kc = self.run_dir / "kubeconfigs"
        if component == "etcd":
            client, peer = f"http://127.0.0.1:{ports['etcd']}", f"http://127.0.0.1:{ports['etcd-peer']}"
            return [str(b / "etcd"), "--name", self.name, "--data-dir", str(self.run_dir / "etcd"),
                    "--listen-client-urls", client, "--advertise-client-urls", client,
                    "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", f"{self.name}={peer}", "--initial-cluster-state", "new",
                    "--unsafe-no-fsync", "--snapshot-count", "10000", "--log-level", "warn"]
        if component == "kube-apiserver":
            return [str(b / "kube-apiserver"),
                    "--etcd-servers", f"http://127.0.0.1:{ports['etcd']}",
                    "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
                    "--secure-port", str(ports["kube-apiserver"]),
                    "--tls-cert-file", str(self.pki / "apiserver.crt"),
                    "--tls-private-key-file", str(self.pki / "apiserver.key"),
                    "--client-ca-file", str(self.pki / "ca.crt"),
                    "--token-auth-file", str(self.pki / "tokens.csv"),
                    "--service-account-issuer", SA_ISSUER,
                    "--service-account-key-file", str(self.pki / "sa.pub"),
                    "--service-account-signing-key-file", str(self.pki / "sa.key"),
                    "--service-cluster-ip-range", SERVICE_CIDR,
                    "--authorization-mode", "RBAC",
                    "--allow-privileged=true",
                    # The `kubernetes` Service would point at 127.0.0.1, which Endpoints refuse;
                    # nothing here routes Service IPs anyway.
                    "--endpoint-reconciler-type", "none",
                    "--profiling=false",
                    "--v=1"]
        if component == "kube-controller-manager":
            return [str(b / "kube-controller-manager"),
                    "--kubeconfig", str(kc / "kube-controller-manager.kubeconfig"),
                    "--bind-address", "127.0.0.1", "--secure-port", str(ports["kube-controller-manager"]),
                    "--service-account-private-key-file", str(self.pki / "sa.key"),
                    "--root-ca-file", str(self.pki / "ca.crt"),
                    "--cluster-signing-cert-file", str(self.pki / "ca.crt"),
                    "--cluster-signing-key-file", str(self.pki / "ca.key"),
                    "--use-service-account-credentials=true",
                    "--leader-elect=false",
                    "--controllers=*",
                    "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
                    "--kube-api-qps=100", "--kube-api-burst=200",
                    "--v=1"]
        if component == "kube-scheduler":
            cfg = self.run_dir / "kube-scheduler.yaml"
            cfg.write_text(yaml.safe_dump({
                "apiVersion": "kubescheduler.config.k8s.io/v1",
                "kind": "KubeSchedulerConfiguration",
                "clientConnection": {"kubeconfig": str(kc / "kube-scheduler.kubeconfig"),
                                     "qps": 100, "burst": 200},
                "leaderElection": {"leaderElect": False},
            }, sort_keys=False))
            return [str(b / "kube-scheduler"), "--config", str(cfg),
                    "--bind-address", "127.0.0.1", "--secure-port", str(ports["kube-scheduler"]),
                    "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
                    "--v=1"]
        if component == "kwok":
            cfg = self.run_dir / "kwok.yaml"
            # An explicit (empty-stage) config keeps ~/.kwok/kwok.yaml of the user out of the test
            # cluster; with no Stage objects kwok uses its default stages (nodes Ready with leases,
            # pods Running).
            cfg.write_text(yaml.safe_dump({
                "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
                "kind": "KwokConfiguration",
                "options": {"nodeLeaseDurationSeconds": 40},
            }, sort_keys=False))
            return [str(b / "kwok"), "--config", str(cfg),
                    "--kubeconfig", str(kc / "kwok.kubeconfig"),
                    "--manage-all-nodes=false",
                    f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                    "--server-address", f"127.0.0.1:{ports['kwok']}"]
        raise ValueError(component)

    # ---------------------------------------------------------------- health
    def _token(self) -> str:
        return json.loads((self.pki / "tokens.json").read_text())["admin"]

    def health(self, component: str, ports: Mapping[str, int]) -> tuple[bool, str]:
        """Probe one component's health endpoint. Returns (healthy, detail)."""
        if component == "etcd":
            code, body = http_get(f"http://127.0.0.1:{ports['etcd']}/health")
            return code == 200 and '"true"' in body, body.strip()[:200]
        if component == "kube-apiserver":
            code, body = http_get(f"https://127.0.0.1:{ports['kube-apiserver']}/readyz",
                                  token=self._token(), cafile=self.pki / "ca.crt")
            return code == 200, body.strip()[-300:]
        if component in ("kube-controller-manager", "kube-scheduler"):
            code, body = http_get(f"https://127.0.0.1:{ports[component]}/healthz", insecure=True)
            return code == 200, body.strip()[:200]
        if component == "kwok":
            code, body = http_get(f"http://127.0.0.1:{ports['kwok']}/healthz")
            return code == 200, body.strip()[:200]
        raise ValueError(component)

    def _wait_healthy(self, component: str, pid: int, cmd0: str, ports: Mapping[str, int],
                      timeout: float) -> None:
        deadline = time.monotonic() + timeout
        detail = ""
        while time.monotonic() < deadline:
            if not pid_alive(pid, cmd0):
                raise ClusterError(f"{component} exited during start-up", component,
                                   self.log_tail(component, 40))
            ok, detail = self.health(component, ports)
            if ok:
                return
            time.sleep(0.25)
        raise ClusterError(f"{component} not healthy after {timeout:.0f} s (last answer: {detail!r})",
                           component, self.log_tail(component, 40))

    def running(self) -> bool:
        """True when state.json lists every component and all of them are alive and healthy."""
        st = self.state()
        procs, ports = st.get("processes", {}), st.get("ports", {})
        for c in COMPONENTS:
            p = procs.get(c) or {}
            if not pid_alive(p.get("pid"), p.get("cmd0")):
                return False
        try:
            return all(self.health(c, ports)[0] for c in COMPONENTS)
        except (KeyError, OSError, ValueError):
            return False

    # ---------------------------------------------------------------- up / down
    def up(self, fleet: str | os.PathLike | None = DEFAULT_FLEET, *, crd_dir: str | os.PathLike | None = None,
           with_prometheus: bool = False, timeout: float = 180.0, reuse: bool = True) -> Timings:
        """Start (or reuse) the cluster, create the fleet's nodes, install the CRDs.

        Args:
            fleet: fleet file; None creates no nodes.
            crd_dir: directory whose ``*.yaml`` CustomResourceDefinitions are installed
                (default ``crds/``; missing or empty is allowed).
            with_prometheus: also start Prometheus (``e2e/prometheus.py``) in the run dir.
            timeout: seconds allowed for each wait (component health, namespace, nodes, CRDs).
            reuse: when every recorded process is alive and healthy, keep them (only the fleet and
                CRDs are re-applied); False forces a fresh start.

        Returns:
            :class:`Timings` of the phases, ``reused`` telling whether processes were kept.

        Raises:
            ClusterError: with the failing component and its log tail; processes started by this
                call are stopped again (their logs stay in ``logs/``).
            FleetError: the fleet file is invalid (nothing is started).
        """
        timings = Timings()
        t0 = time.monotonic()

        def lap(phase: str) -> None:
            nonlocal t0
            now = time.monotonic()
            timings.phases[phase] = round(now - t0, 3)
            t0 = now

        fleet_doc = load_fleet(fleet) if fleet else None
        nodes = fleet_nodes(fleet_doc) if fleet_doc else []
        crd_path = Path(crd_dir) if crd_dir else DEFAULT_CRD_DIR
        lap("fleet")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if reuse and self.running():
            timings.reused = True
            lap("reuse-check")
        else:
            self.down(quiet=True)
            self._bin_dir = self._bin_dir or find_binaries()
            lap("binaries")
            try:
                self._start(timeout, lap)
            except BaseException:
                self.down(quiet=True)
                raise
        try:
            api = self.api_client()
            lap("python-client")
            try:
                self._wait_default_namespace(api, timeout)
                lap("default-serviceaccount")
                if fleet_doc is not None:
                    timings.nodes = sync_nodes(api, nodes, fleet_doc.get("name", "fleet"), timeout)
                    lap("create-nodes")
                    wait_nodes_ready(api, [n["metadata"]["name"] for n in nodes], timeout,
                                     log_hint=self.log_tail("kwok", 30))
                    lap("nodes-ready")
                install_crds(api, crd_path, timeout)
                lap("crds")
            finally:
                api.close()
            st = self.state()
            st["fleet"] = str(Path(fleet).resolve()) if fleet else None
            st["nodes"] = len(nodes)
            self._save(st)
            if with_prometheus:
                import prometheus as prom  # e2e/prometheus.py

                prom.start_prometheus(self.run_dir, timeout=timeout)
                lap("prometheus")
        except BaseException:
            if not timings.reused:
                self.down(quiet=True)
            raise
        return timings

    def _start(self, timeout: float, lap) -> None:
        # Fresh etcd (a new cluster every start); previous logs kept one generation back.
        shutil.rmtree(self.run_dir / "etcd", ignore_errors=True)
        if self.logs.exists():
            prev = self.run_dir / "logs.prev"
            shutil.rmtree(prev, ignore_errors=True)
            self.logs.rename(prev)
        self.logs.mkdir(parents=True, exist_ok=True)
        tokens = self._ensure_pki()
        lap("pki")
        names = ["etcd", "etcd-peer", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"]
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        api_port = ports["kube-apiserver"]
        self._write_kubeconfig(self.kubeconfig, "archipelago-admin", tokens["admin"], api_port)
        kc = self.run_dir / "kubeconfigs"
        self._write_kubeconfig(kc / "kube-controller-manager.kubeconfig", "system:kube-controller-manager",
                               tokens["kcm"], api_port)
        self._write_kubeconfig(kc / "kube-scheduler.kubeconfig", "system:kube-scheduler",
                               tokens["scheduler"], api_port)
        self._write_kubeconfig(kc / "kwok.kubeconfig", "kwok-controller", tokens["kwok"], api_port)
        state = {"name": self.name, "run_dir": str(self.run_dir), "bin_dir": str(self.bin_dir),
                 "ports": ports, "processes": {}, "kubeconfig": str(self.kubeconfig),
                 "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "ETCDCTL_API")}

        def launch(component: str) -> tuple[int, str]:
            argv = self._argv(component, ports)
            pid = start_process(component, argv, self.log_path(component), env)
            state["processes"][component] = {"pid": pid, "cmd0": argv[0]}
            self._save(state)
            return pid, argv[0]

        pid, cmd0 = launch("etcd")
        self._wait_healthy("etcd", pid, cmd0, ports, timeout)
        lap("etcd")
        pid, cmd0 = launch("kube-apiserver")
        self._wait_healthy("kube-apiserver", pid, cmd0, ports, timeout)
        lap("kube-apiserver")
        started = [(c, *launch(c)) for c in ("kube-controller-manager", "kube-scheduler", "kwok")]
        for c, pid, cmd0 in started:
            self._wait_healthy(c, pid, cmd0, ports, timeout)
        lap("kcm+scheduler+kwok")

    def _wait_default_namespace(self, api, timeout: float) -> None:
        """Wait for namespace ``default`` and its ServiceAccount ``default`` (made by the kcm)."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        core = client.CoreV1Api(api)
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                core.read_namespace("default")
                core.read_namespaced_service_account("default", "default")
                return
            except ApiException as e:
                last = f"{e.status} {e.reason}"
            time.sleep(0.25)
        raise ClusterError(f"ServiceAccount default/default did not appear within {timeout:.0f} s ({last}); "
                           "the serviceaccount controller of kube-controller-manager is not working",
                           "kube-controller-manager", self.log_tail("kube-controller-manager", 40))

    def api_client(self):
        """A ``kubernetes.client.ApiClient`` for the admin kubeconfig (close it when done)."""
        from kubernetes import config

        if not self.kubeconfig.exists():
            raise ClusterError(f"no kubeconfig at {self.kubeconfig}; run `localcluster.py up --name {self.name}`")
        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def down(self, *, purge: bool = False, quiet: bool = False) -> list[str]:
        """Stop every recorded process (Prometheus first, etcd last) by PID.

        Args:
            purge: also delete the run directory (certs, logs, data).
            quiet: do not print.

        Returns:
            Names of the components that were running and got signalled.
        """
        st = self.state()
        stopped = []
        try:
            import prometheus as prom

            if prom.stop_prometheus(self.run_dir):
                stopped.append("prometheus")
        except ImportError:
            pass
        procs = st.get("processes", {})
        for c in reversed(COMPONENTS):
            p = procs.get(c) or {}
            if stop_process(p.get("pid"), p.get("cmd0"), timeout=10.0 if c != "etcd" else 15.0):
                stopped.append(c)
        if st:
            st["processes"] = {}
            st["stopped_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            with contextlib.suppress(OSError):
                self._save(st)
        if purge:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if not quiet:
            print(f"{self.name}: stopped {', '.join(stopped) or 'nothing (not running)'}"
                  + ("; run dir removed" if purge else f"; logs kept in {self.logs}"))
        return stopped

    def status(self) -> list[dict]:
        """One row per component: ``component, pid, port, alive, healthy, detail``."""
        st = self.state()
        ports = st.get("ports", {})
        rows = []
        for c in COMPONENTS:
            p = (st.get("processes") or {}).get(c) or {}
            alive = pid_alive(p.get("pid"), p.get("cmd0"))
            healthy, detail = (False, "")
            if alive:
                try:
                    healthy, detail = self.health(c, ports)
                except (KeyError, OSError) as e:
                    detail = str(e)
            rows.append({"component": c, "pid": p.get("pid"), "port": ports.get(c), "alive": alive,
                         "healthy": healthy, "detail": detail if not healthy else ""})
        return rows


# ============================================================================================
# API helpers (used by `up`, the e2e fixtures and kind.sh's pytest run)
# ============================================================================================


def _node_matches(existing, want: dict) -> bool:
    """Whether an API Node already has the labels, annotations, taints and GPU/cpu/memory/pods
    capacity of a fleet manifest (quantities compared by value: the server turns 2048Gi into 2Ti)."""
    from kubernetes.utils import parse_quantity

    labels = existing.metadata.labels or {}
    if any(labels.get(k) != v for k, v in want["metadata"]["labels"].items()):
        return False
    if any(k.startswith(("nvidia.com/", "amd.com/")) and k not in want["metadata"]["labels"] for k in labels):
        return False
    ann = existing.metadata.annotations or {}
    if any(ann.get(k) != v for k, v in want["metadata"]["annotations"].items()):
        return False
    taints = sorted((t.key, t.value or "", t.effect) for t in (existing.spec.taints or []))
    if taints != sorted((t["key"], t.get("value", ""), t["effect"]) for t in want["spec"].get("taints", [])):
        return False
    for field_name in ("capacity", "allocatable"):
        have = getattr(existing.status, field_name) or {}
        wanted = want["status"][field_name]
        if set(have) - {"ephemeral-storage", "hugepages-1Gi", "hugepages-2Mi"} != set(wanted):
            return False
        if any(parse_quantity(have[k]) != parse_quantity(v) for k, v in wanted.items()):
            return False
    return True


def sync_nodes(api, nodes: list[dict], fleet_name: str, timeout: float = 60.0) -> dict[str, int]:
    """Make the cluster's fleet nodes exactly ``nodes``.

    Nodes are created with their status (create keeps status.capacity/allocatable; should an
    API server drop it, the status subresource is patched). An existing node that already
    matches its manifest is kept (with its pods); one that differs is deleted and re-created;
    nodes carrying the ``archipelago.dev/fleet`` label (any fleet) that are not in ``nodes`` are
    deleted. Nodes without that label are never touched.

    Args:
        api: ``kubernetes.client.ApiClient``.
        nodes: manifests from :func:`fleet_nodes`.
        fleet_name: the fleet's name (for messages).
        timeout: seconds to wait for a deleted node to disappear before re-creating it.

    Returns:
        Counts ``{"created", "kept", "replaced", "deleted"}``.

    Raises:
        ClusterError (component ``fleet``): the API server refused a node.
    """
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(api)
    existing = {n.metadata.name: n for n in core.list_node(label_selector=FLEET_LABEL).items}
    counts = {"created": 0, "kept": 0, "replaced": 0, "deleted": 0}
    wanted = {n["metadata"]["name"] for n in nodes}
    for name in sorted(set(existing) - wanted):
        with contextlib.suppress(ApiException):
            core.delete_node(name)
            counts["deleted"] += 1
    for node in nodes:
        name = node["metadata"]["name"]
        if name in existing:
            if _node_matches(existing[name], node):
                counts["kept"] += 1
                continue
            with contextlib.suppress(ApiException):
                core.delete_node(name)
            counts["replaced"] += 1
        deadline = time.monotonic() + timeout
        while True:
            try:
                created = core.create_node(node)
                break
            except ApiException as e:
                if e.status == 409 and time.monotonic() < deadline:  # the old node is still going away
                    time.sleep(0.2)
                    continue
                raise ClusterError(f"fleet {fleet_name}: creating node {name} failed: {e.status} "
                                   f"{api_message(e)}", "fleet") from e
        if name not in existing:
            counts["created"] += 1
        alloc = (created.status.allocatable if created.status else None) or {}
        if any(r not in alloc for r in node["status"]["allocatable"]):
            core.patch_node_status(name, {"status": {k: node["status"][k] for k in ("capacity", "allocatable")}})
    return counts


def wait_nodes_ready(api, names: list[str], timeout: float, log_hint: str = "") -> None:
    """Wait until every named node has condition Ready=True (set by KWOK's node stages).

    Raises:
        ClusterError (component ``kwok``): some nodes are not Ready in time; names them.
    """
    from kubernetes import client

    core = client.CoreV1Api(api)
    want = set(names)
    deadline = time.monotonic() + timeout
    not_ready = want
    while time.monotonic() < deadline:
        ready = set()
        for n in core.list_node().items:
            conds = {c.type: c.status for c in (n.status.conditions or [])}
            if conds.get("Ready") == "True":
                ready.add(n.metadata.name)
        not_ready = want - ready
        if not not_ready:
            return
        time.sleep(0.5)
    shown = ", ".join(sorted(not_ready)[:10]) + (" ..." if len(not_ready) > 10 else "")
    raise ClusterError(f"{len(not_ready)} of {len(want)} fleet nodes not Ready after {timeout:.0f} s: {shown}",
                       "kwok", log_hint)


def load_crds(crd_dir: str | os.PathLike) -> list[dict]:
    """All CustomResourceDefinition documents in ``crd_dir/*.yaml`` (sorted by file name).

    Raises:
        ClusterError (component ``crds``): a file is not valid YAML.
    """
    out = []
    for path in sorted(Path(crd_dir).glob("*.yaml")):
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as e:
            raise ClusterError(f"{path}: not valid YAML: {e}", "crds") from e
        out.extend(d for d in docs if isinstance(d, dict) and d.get("kind") == "CustomResourceDefinition")
    return out


def install_crds(api, crd_dir: str | os.PathLike, timeout: float = 60.0) -> list[str]:
    """Create or replace every CRD in ``crd_dir`` and wait until each is Established.

    Returns:
        Names of the CRDs installed (empty when the directory has none).

    Raises:
        ClusterError (component ``crds``): the API server refused a CRD (its message is
            included) or one is not Established/NamesAccepted within ``timeout`` s.
    """
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    ext = client.ApiextensionsV1Api(api)
    names = []
    for crd in load_crds(crd_dir):
        name = crd["metadata"]["name"]
        names.append(name)
        try:
            ext.create_custom_resource_definition(crd)
        except ApiException as e:
            if e.status != 409:
                raise ClusterError(f"CRD {name} refused: {e.status} {api_message(e)}", "crds") from e
            current = ext.read_custom_resource_definition(name)
            body = json.loads(json.dumps(crd))
            body["metadata"]["resourceVersion"] = current.metadata.resource_version
            try:
                ext.replace_custom_resource_definition(name, body)
            except ApiException as e2:
                raise ClusterError(f"CRD {name} update refused: {e2.status} {api_message(e2)}", "crds") from e2
    deadline = time.monotonic() + timeout
    pending = list(names)
    while pending and time.monotonic() < deadline:
        still = []
        for name in pending:
            crd = ext.read_custom_resource_definition(name)
            conds = {c.type: c.status for c in (crd.status.conditions or [])} if crd.status else {}
            if conds.get("Established") != "True" or conds.get("NamesAccepted") != "True":
                still.append(name)
        pending = still
        if pending:
            time.sleep(0.25)
    if pending:
        raise ClusterError(f"CRDs not Established after {timeout:.0f} s: {', '.join(pending)}", "crds")
    # Established does not mean discoverable yet: clients that resolve resources through discovery
    # (kubectl, dynamic clients, kopf) fail with "couldn't find resource" for a moment afterwards.
    pending_gv = {}
    for crd in load_crds(crd_dir):
        for v in crd["spec"]["versions"]:
            if v.get("served", True):
                gv = f"/apis/{crd['spec']['group']}/{v['name']}"
                pending_gv.setdefault(gv, set()).add(crd["spec"]["names"]["plural"])
    while pending_gv and time.monotonic() < deadline:
        for gv in list(pending_gv):
            served = {r.get("name") for r in (get_json(api, gv) or {}).get("resources", [])}
            if pending_gv[gv] <= served:
                del pending_gv[gv]
        if pending_gv:
            time.sleep(0.25)
    if pending_gv:
        raise ClusterError(f"CRDs Established but not in discovery after {timeout:.0f} s: {pending_gv}", "crds")
    return names


def get_json(api, path: str) -> dict | None:
    """GET ``path`` (e.g. ``/apis/archipelago.dev/v1alpha1``) with the client's credentials.

    Returns:
        The decoded JSON body, or None for a non-200 answer.
    """
    method, url, headers, _body, _post = api.param_serialize("GET", path, auth_settings=["BearerToken"])
    resp = api.call_api(method, url, headers)
    resp.read()
    if resp.status != 200:
        return None
    return json.loads(resp.data)


def wait_for(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    """Poll ``predicate()`` until it returns something truthy and return that.

    Raises:
        TimeoutError: after ``timeout`` seconds, naming ``what`` and the last value seen.
    """
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def api_message(e) -> str:
    """The ``message`` of a Kubernetes Status body in an ApiException (or its raw body)."""
    try:
        return json.loads(e.body).get("message", e.body)
    except (TypeError, ValueError):
        return str(e.body)


# ============================================================================================
# CLI
# ============================================================================================


def _cli() -> None:  # pragma: no cover - exercised by hand and by docs/local-cluster.md
    import typer
    from rich.console import Console
    from rich.table import Table

    app = typer.Typer(add_completion=False, no_args_is_help=True,
                      help="Local Kubernetes control plane with a KWOK GPU fleet (Archipelago e2e).")
    console = Console()
    err = Console(stderr=True)
    name_opt = typer.Option("demo", "--name", "-n", help="cluster name (selects the run dir)")
    run_dir_opt = typer.Option(None, "--run-dir", help="run directory (default ~/.cache/archipelago/clusters/<name>)")

    def fail(e: Exception) -> None:
        print(f"error: {e.report() if isinstance(e, ClusterError) else e}", file=sys.stderr)
        raise typer.Exit(1)

    @app.command()
    def up(fleet: Path = typer.Option(DEFAULT_FLEET, "--fleet", "-f", help="fleet file (YAML, kind: Fleet)"),
           name: str = name_opt, run_dir: Path | None = run_dir_opt,
           with_prometheus: bool = typer.Option(False, "--with-prometheus", help="also start Prometheus"),
           crds: Path = typer.Option(DEFAULT_CRD_DIR, "--crds", help="directory of CRD *.yaml to install"),
           fresh: bool = typer.Option(False, "--fresh", help="restart even if a healthy cluster runs"),
           timeout: float = typer.Option(180.0, help="seconds allowed per wait")) -> None:
        """Start the cluster (or reuse a healthy one), create fleet nodes, install CRDs."""
        c = LocalCluster(name, run_dir)
        try:
            t = c.up(fleet, crd_dir=crds, with_prometheus=with_prometheus, timeout=timeout, reuse=not fresh)
        except (ClusterError, FleetError) as e:
            fail(e)
            return
        st = c.state()
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in t.phases.items())
        console.print(f"[green]{name} is up[/] ({'reused running processes; ' if t.reused else ''}"
                      f"{t.total:.1f} s: {phases})")
        sync = ", ".join(f"{k} {v}" for k, v in t.nodes.items() if v)
        console.print(f"  API server  https://127.0.0.1:{st['ports']['kube-apiserver']}  "
                      f"fleet nodes {st.get('nodes', 0)} ({sync or 'none'})")
        if with_prometheus:
            import prometheus as prom

            console.print(f"  Prometheus  {prom.prometheus_url(c.run_dir)}")
        console.print(f"  export KUBECONFIG={c.kubeconfig}")

    @app.command()
    def down(name: str = name_opt, run_dir: Path | None = run_dir_opt,
             purge: bool = typer.Option(False, "--purge", help="also delete the run dir (certs, logs)")) -> None:
        """Stop every process of the cluster by PID (logs stay unless --purge)."""
        LocalCluster(name, run_dir).down(purge=purge)

    @app.command()
    def status(name: str = name_opt, run_dir: Path | None = run_dir_opt) -> None:
        """Components (PID, port, health) and the fleet's GPUs by product."""
        c = LocalCluster(name, run_dir)
        if not c.state():
            err.print(f"{name}: no state in {c.run_dir} (never started)")
            raise typer.Exit(1)
        t = Table(title=f"cluster {name} ({c.run_dir})")
        for col in ("component", "pid", "port", "alive", "healthy", "detail"):
            t.add_column(col)
        rows = c.status()
        import prometheus as prom

        rows.append(prom.prometheus_status(c.run_dir))
        for r in rows:
            t.add_row(r["component"], str(r["pid"] or "-"), str(r["port"] or "-"),
                      "yes" if r["alive"] else "no", "yes" if r["healthy"] else "no", r["detail"][:60])
        console.print(t)
        if not all(r["healthy"] for r in rows[:-1]):
            raise typer.Exit(1)
        from kubernetes import client

        api = c.api_client()
        try:
            nodes = [api.sanitize_for_serialization(n) for n in client.CoreV1Api(api).list_node().items]
        finally:
            api.close()
        g = Table(title=f"{len(nodes)} nodes")
        for col in ("GPU product", "resource", "nodes", "GPUs"):
            g.add_column(col)
        for r in fleet_summary(nodes):
            g.add_row(r["product"], r["resource"] or "-", str(r["nodes"]), str(r["gpus"]))
        console.print(g)
        console.print(f"KUBECONFIG={c.kubeconfig}")

    @app.command()
    def kubeconfig(name: str = name_opt, run_dir: Path | None = run_dir_opt) -> None:
        """Print the admin kubeconfig path."""
        c = LocalCluster(name, run_dir)
        if not c.kubeconfig.exists():
            err.print(f"{name}: no kubeconfig in {c.run_dir}; run `up` first")
            raise typer.Exit(1)
        print(c.kubeconfig)

    @app.command()
    def logs(component: str = typer.Argument(None, help="etcd, kube-apiserver, kube-controller-manager, "
                                                        "kube-scheduler, kwok or prometheus (default: all)"),
             name: str = name_opt, run_dir: Path | None = run_dir_opt,
             lines: int = typer.Option(40, "--lines", "-l", help="lines per log")) -> None:
        """Print the tail of each component's log."""
        c = LocalCluster(name, run_dir)
        comps = [component] if component else [*COMPONENTS, "prometheus"]
        for comp in comps:
            p = c.log_path(comp)
            if not p.exists():
                if component:
                    err.print(f"no log {p}")
                    raise typer.Exit(1)
                continue
            console.rule(f"{comp}  ({p})")
            print(c.log_tail(comp, lines))

    app()


if __name__ == "__main__":
    # prometheus.py imports this module as `localcluster`; make that the same module object.
    sys.modules.setdefault("localcluster", sys.modules[__name__])
    _cli()
