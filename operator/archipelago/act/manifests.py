"""Pure manifest builders: islands of a plan -> Deployments, Services and a routing ConfigMap.

Nothing here talks to a cluster; every function returns plain ``dict`` manifests ready for
server-side apply (:mod:`archipelago.act.apply`). Inputs are small frozen dataclasses
(:class:`IslandRender`, :class:`OwnerRef`) that the controller fills from the planner's ``Plan``
and the ModelDeployment / GPUPool specs, so these builders are unit-tested without kopf,
kubernetes or the planner.

Conventions (all names are deterministic, DNS-1123/1035 labels of at most 63 characters):

* Deployment and island Service: ``<model>-<island>`` (hash-suffixed when too long).
* Model Service: ``<model>-serving``; routing ConfigMap: ``<model>-routing``.
* Labels ``app.kubernetes.io/managed-by=archipelago``, ``archipelago.dev/model``,
  ``archipelago.dev/island``, ``archipelago.dev/pool``, ``archipelago.dev/role``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from archipelago.act.engine import DEFAULT_IMAGES, HEALTH_PATH, METRICS_PATH, EngineConfig, container_command

GROUP = "archipelago.dev"
VERSION = "v1alpha1"
MANAGED_BY = "archipelago"

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MODEL = f"{GROUP}/model"
LABEL_ISLAND = f"{GROUP}/island"
LABEL_POOL = f"{GROUP}/pool"
LABEL_ROLE = f"{GROUP}/role"
LABEL_ENTRY = f"{GROUP}/entry"
ANN_PLAN_HASH = f"{GROUP}/plan-hash"
ANN_GPU_TYPE = f"{GROUP}/gpu-type"
ANN_NODES = f"{GROUP}/planned-nodes"
ANN_INPUT_RANGE = f"{GROUP}/input-range"
ANN_ISLAND_ID = f"{GROUP}/island-id"
ANN_MODEL_KEY = f"{GROUP}/model-key"

Role = Literal["mixed", "prefill", "decode"]
NodePinning = Literal["required", "preferred", "none"]

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


# --------------------------------------------------------------------------------------------
# names and labels
# --------------------------------------------------------------------------------------------


def dns_label(*parts: str, max_len: int = 63) -> str:
    """Join ``parts`` into a DNS-1035 label (lower-case alphanumerics and ``-``, starts with a letter).

    Deterministic: when the joined name is longer than ``max_len`` (<= 63) characters, it is cut and
    an 8-hex-digit SHA-256 suffix of the full name is appended so distinct inputs stay distinct.

    Raises:
        ValueError: when no part contains a single alphanumeric character.
    """
    raw = "-".join(p for p in parts if p)
    s = re.sub(r"[^a-z0-9-]+", "-", raw.lower())
    s = re.sub(r"-{2,}", "-", s).strip("-")
    if not s:
        raise ValueError(f"name: cannot build a Kubernetes name from {parts!r}; use alphanumeric names")
    if not s[0].isalpha():
        s = "x-" + s
    if len(s) > max_len:
        digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
        s = s[: max_len - 9].rstrip("-") + "-" + digest
    assert _DNS_LABEL.match(s) and len(s) <= max_len, s
    return s


def label_value(value: str) -> str:
    """Make ``value`` a valid label value (<= 63 chars, alphanumerics, ``-_.``, alnum at both ends).

    Long or invalid values are shortened deterministically with a SHA-256 suffix.
    """
    if len(value) <= 63 and _LABEL_VALUE.match(value):
        return value
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", value).strip("-_.")
    if len(s) > 63 or s != value:
        digest = hashlib.sha256(value.encode()).hexdigest()[:8]
        s = (s[:54].strip("-_.") + "-" + digest) if s else digest
    return s


def deployment_name(model: str, island: str) -> str:
    """Name of the Deployment (and island Service) of ``island`` of ModelDeployment ``model``."""
    return dns_label(model, island)


def model_service_name(model: str) -> str:
    """Name of the Service that fronts all entry islands of ModelDeployment ``model``."""
    return dns_label(model, "serving")


def routing_configmap_name(model: str) -> str:
    """Name of the routing ConfigMap of ModelDeployment ``model``."""
    return dns_label(model, "routing")


def selector_labels(model: str, island: str | None = None) -> dict[str, str]:
    """Labels that select the pods of ``model`` (and of one ``island`` when given)."""
    out = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_MODEL: label_value(model)}
    if island is not None:
        out[LABEL_ISLAND] = label_value(island)
    return out


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OwnerRef:
    """The ModelDeployment that owns the emitted objects (for garbage collection).

    Attributes:
        name: ModelDeployment name.
        uid: its ``metadata.uid``.
        kind / api_version: defaults are the Archipelago CRD.
    """

    name: str
    uid: str
    kind: str = "ModelDeployment"
    api_version: str = f"{GROUP}/{VERSION}"

    def as_dict(self) -> dict[str, Any]:
        """``metadata.ownerReferences`` item: controller owner, blocks foreground deletion."""
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


@dataclass(frozen=True)
class IslandRender:
    """Everything needed to render one island (GPU type x TP x replicas) of one model.

    Attributes:
        model: ModelDeployment name (also the ``archipelago.dev/model`` label).
        namespace: namespace of the ModelDeployment and of everything emitted.
        island: stable island id within the model (e.g. ``h100-tp2-r0``); part of the names.
        pool: GPUPool name the island runs in.
        gpu_type: GPU catalogue key (e.g. ``H100-SXM``), recorded as an annotation.
        replicas: number of replicas (pods), >= 0.
        engine: engine command-line settings (:class:`EngineConfig`); TP lives there.
        image: container image; empty means the engine default (FACTS.md).
        gpu_resource: extended resource name, ``nvidia.com/gpu`` or ``amd.com/gpu``.
        gpus_per_replica: GPUs per pod; None means ``TP x PP`` from ``engine``.
        node_names: nodes the packing chose (``metadata.name``); empty means "anywhere in the pool".
        node_pinning: ``required`` (pods may only run on ``node_names``), ``preferred``
            (scheduler prefers them, falls back to the rest of the pool), or ``none``.
        pool_selector: the pool's label selector as ``{"matchLabels": {...}, "matchExpressions": [...]}``;
            always a hard requirement so pods never leave the pool.
        tolerations: Kubernetes tolerations for the pool's taints.
        role: ``mixed`` (prefill+decode), ``prefill`` or ``decode``.
        input_range: ``(min_tokens, max_tokens or None)`` of prompt lengths routed to this island.
        weight: share of that range's traffic sent to this island (>= 0; normalised per range).
        cpu / memory: container requests (Kubernetes quantities); limits for memory equal requests.
        shm_size: size limit of the in-memory ``/dev/shm`` volume (quantity).
        env: environment variables as core/v1 EnvVar dicts (``name`` with ``value`` or ``valueFrom``).
        priority_class_name: Kubernetes PriorityClass for the pods, or None.
        plan_hash: short hash of the plan this island belongs to (annotation, for humans and tests).
        extra_labels: labels added to the Deployment and its pods.
        island_id: the planner's island id (``ns/model/pool/tpN[/role]``), recorded as the pod
            annotation ``archipelago.dev/island-id`` so the next snapshot knows the current placement.
    """

    model: str
    namespace: str
    island: str
    pool: str
    gpu_type: str
    replicas: int
    engine: EngineConfig
    image: str = ""
    gpu_resource: str = "nvidia.com/gpu"
    gpus_per_replica: int | None = None
    node_names: tuple[str, ...] = ()
    node_pinning: NodePinning = "preferred"
    pool_selector: Mapping[str, Any] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    role: Role = "mixed"
    input_range: tuple[int, int | None] = (0, None)
    weight: float = 1.0
    cpu: str = "4"
    memory: str = "32Gi"
    shm_size: str = "16Gi"
    env: tuple[Mapping[str, Any], ...] = ()
    priority_class_name: str | None = None
    plan_hash: str = ""
    extra_labels: Mapping[str, str] = field(default_factory=dict)
    island_id: str = ""

    def __post_init__(self) -> None:
        if self.replicas < 0:
            raise ValueError(f"replicas: {self.replicas} must be >= 0 (island {self.island!r})")
        if not re.match(r"^(nvidia\.com/(gpu|mig-[0-9]+g\.[0-9]+gb)|amd\.com/gpu)$", self.gpu_resource):
            raise ValueError(
                f"gpu_resource: {self.gpu_resource!r} is not supported; use nvidia.com/gpu, "
                "a MIG profile (nvidia.com/mig-1g.10gb) or amd.com/gpu"
            )
        if self.role not in ("mixed", "prefill", "decode"):
            raise ValueError(f"role: {self.role!r} must be mixed, prefill or decode")
        if self.weight < 0:
            raise ValueError(f"weight: {self.weight} must be >= 0 (island {self.island!r})")
        lo, hi = self.input_range
        if lo < 0 or (hi is not None and hi <= lo):
            raise ValueError(f"input_range: {self.input_range!r} must satisfy 0 <= min < max")
        if self.node_pinning == "required" and not self.node_names:
            raise ValueError("node_names: empty while node_pinning is 'required'; give nodes or use 'preferred'")

    @property
    def gpus(self) -> int:
        """GPUs per replica (pod)."""
        if self.gpus_per_replica is not None:
            return self.gpus_per_replica
        return self.engine.tensor_parallel * self.engine.pipeline_parallel

    @property
    def name(self) -> str:
        """Deployment / island Service name."""
        return deployment_name(self.model, self.island)

    @property
    def is_entry(self) -> bool:
        """Whether clients reach this island directly (mixed and prefill islands)."""
        return self.role in ("mixed", "prefill")


# --------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------


def _meta(name: str, namespace: str, labels: Mapping[str, str], owner: OwnerRef | None,
          annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if annotations:
        meta["annotations"] = dict(annotations)
    if owner is not None:
        meta["ownerReferences"] = [owner.as_dict()]
    return meta


def island_labels(isl: IslandRender) -> dict[str, str]:
    """All labels of an island's Deployment and pods."""
    labels = {
        **{k: label_value(v) for k, v in isl.extra_labels.items()},
        **selector_labels(isl.model, isl.island),
        LABEL_NAME: isl.engine.engine,
        LABEL_INSTANCE: label_value(isl.model),
        LABEL_COMPONENT: "inference-server",
        LABEL_POOL: label_value(isl.pool),
        LABEL_ROLE: isl.role,
    }
    if isl.is_entry:
        labels[LABEL_ENTRY] = "true"
    return labels


def selector_to_node_requirements(selector: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Convert a label selector (``matchLabels`` / ``matchExpressions``) to node-selector requirements.

    ``matchLabels: {k: v}`` becomes ``{key: k, operator: In, values: [v]}``; expressions with
    ``In``, ``NotIn``, ``Exists``, ``DoesNotExist`` are kept (node affinity accepts the same operators).

    Raises:
        ValueError: on an unknown operator, naming it.
    """
    reqs: list[dict[str, Any]] = []
    for k, v in sorted((selector.get("matchLabels") or {}).items()):
        reqs.append({"key": k, "operator": "In", "values": [str(v)]})
    for e in selector.get("matchExpressions") or []:
        op = e.get("operator")
        if op not in ("In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"):
            raise ValueError(f"selector.matchExpressions: operator {op!r} is not valid for node affinity")
        r: dict[str, Any] = {"key": e["key"], "operator": op}
        if op not in ("Exists", "DoesNotExist"):
            r["values"] = [str(x) for x in e.get("values") or []]
        reqs.append(r)
    return reqs


def node_affinity(isl: IslandRender) -> dict[str, Any] | None:
    """Node affinity of an island: the pool's selector always; the chosen nodes as ``node_pinning`` says.

    The API server accepts a single value per ``matchFields`` requirement on ``metadata.name``, so
    chosen nodes become one term each: ORed ``nodeSelectorTerms`` (each with the pool's expressions)
    when pinning is ``required``, one weight-100 preference per node when ``preferred``.
    """
    pool_reqs = selector_to_node_requirements(isl.pool_selector)
    names = sorted(set(isl.node_names))

    def by_name(n: str) -> list[dict[str, Any]]:
        return [{"key": "metadata.name", "operator": "In", "values": [n]}]

    out: dict[str, Any] = {}
    if names and isl.node_pinning == "required":
        terms = [{**({"matchExpressions": pool_reqs} if pool_reqs else {}), "matchFields": by_name(n)} for n in names]
        out["requiredDuringSchedulingIgnoredDuringExecution"] = {"nodeSelectorTerms": terms}
    elif pool_reqs:
        out["requiredDuringSchedulingIgnoredDuringExecution"] = {"nodeSelectorTerms": [{"matchExpressions": pool_reqs}]}
    if names and isl.node_pinning == "preferred":
        out["preferredDuringSchedulingIgnoredDuringExecution"] = [
            {"weight": 100, "preference": {"matchFields": by_name(n)}} for n in names
        ]
    return out or None


def tolerations(isl: IslandRender) -> list[dict[str, Any]]:
    """The pool's tolerations plus the usual GPU taint (``<gpu_resource>:NoSchedule``), deduplicated."""
    out: list[dict[str, Any]] = [{"key": isl.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]
    for t in isl.tolerations:
        d = dict(t)
        if d not in out:
            out.append(d)
    return out


def build_deployment(isl: IslandRender, owner: OwnerRef | None) -> dict[str, Any]:
    """The Deployment of one island.

    Shape: ``replicas`` pods, each one container running the engine (:mod:`archipelago.act.engine`)
    with ``<gpu_resource>: gpus`` in requests and limits, ``/health`` startup/readiness/liveness probes,
    ``/dev/shm`` as a ``Memory`` emptyDir, the serving port named ``http``, Prometheus scrape
    annotations, node affinity to the pool (and the chosen nodes), tolerations for the pool's taints.
    Rolling updates surge one pod and never take one away first (``maxUnavailable: 0``), so an
    in-place change of an island never lowers its serving capacity.
    """
    cfg = isl.engine
    port = cfg.serving_port
    command, args = container_command(cfg)
    labels = island_labels(isl)
    gpus = str(isl.gpus)
    lo, hi = isl.input_range
    annotations = {
        ANN_GPU_TYPE: isl.gpu_type,
        ANN_INPUT_RANGE: f"{lo}-{'' if hi is None else hi}",
    }
    if isl.plan_hash:
        annotations[ANN_PLAN_HASH] = isl.plan_hash
    if isl.node_names:
        annotations[ANN_NODES] = ",".join(sorted(set(isl.node_names)))
    pod_annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": METRICS_PATH,
        ANN_GPU_TYPE: isl.gpu_type,
        ANN_MODEL_KEY: f"{isl.namespace}/{isl.model}",
    }
    if isl.island_id:
        pod_annotations[ANN_ISLAND_ID] = isl.island_id
        annotations[ANN_ISLAND_ID] = isl.island_id
    container: dict[str, Any] = {
        "name": "engine",
        "image": isl.image or DEFAULT_IMAGES[cfg.engine],
        "command": command,
        "args": args,
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "env": [dict(e) for e in isl.env],
        "resources": {
            "requests": {"cpu": isl.cpu, "memory": isl.memory, isl.gpu_resource: gpus},
            "limits": {"memory": isl.memory, isl.gpu_resource: gpus},
        },
        "startupProbe": {
            "httpGet": {"path": HEALTH_PATH, "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 180,  # model download + load may take up to 30 min
        },
        "readinessProbe": {
            "httpGet": {"path": HEALTH_PATH, "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": HEALTH_PATH, "port": "http"},
            "periodSeconds": 15,
            "failureThreshold": 4,
        },
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if not container["env"]:
        del container["env"]
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": isl.shm_size}}],
        "tolerations": tolerations(isl),
        "terminationGracePeriodSeconds": 60,
    }
    aff = node_affinity(isl)
    if aff:
        pod_spec["affinity"] = {"nodeAffinity": aff}
    if isl.priority_class_name:
        pod_spec["priorityClassName"] = isl.priority_class_name
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(isl.name, isl.namespace, labels, owner, annotations),
        "spec": {
            "replicas": isl.replicas,
            "selector": {"matchLabels": selector_labels(isl.model, isl.island)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": labels, "annotations": pod_annotations},
                "spec": pod_spec,
            },
        },
    }


def build_island_service(isl: IslandRender, owner: OwnerRef | None) -> dict[str, Any]:
    """ClusterIP Service in front of one island's pods (port ``http`` -> engine port)."""
    port = isl.engine.serving_port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(isl.name, isl.namespace, island_labels(isl), owner),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(isl.model, isl.island),
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def build_model_service(model: str, namespace: str, port: int, owner: OwnerRef | None) -> dict[str, Any]:
    """ClusterIP Service over all entry islands (mixed / prefill) of ``model`` on ``port``."""
    labels = {**selector_labels(model), LABEL_INSTANCE: label_value(model), LABEL_COMPONENT: "model-endpoint"}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(model_service_name(model), namespace, labels, owner),
        "spec": {
            "type": "ClusterIP",
            "selector": {**selector_labels(model), LABEL_ENTRY: "true"},
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def routing_table(islands: Sequence[IslandRender]) -> list[dict[str, Any]]:
    """Input-length ranges -> island Services and weights.

    Returns a list sorted by ``minInputTokens``; each item is
    ``{"minInputTokens": int, "maxInputTokens": int | None, "backends": [{"service", "port",
    "island", "role", "weight"}]}`` with weights normalised to sum to 1 within the range (equal
    shares when all weights are 0). Only entry islands (mixed / prefill) appear as backends; islands
    with 0 replicas are left out.
    """
    ranges: dict[tuple[int, int | None], list[IslandRender]] = {}
    for isl in islands:
        if isl.is_entry and isl.replicas > 0:
            ranges.setdefault(isl.input_range, []).append(isl)
    table = []
    for (lo, hi), members in sorted(ranges.items(), key=lambda kv: (kv[0][0], kv[0][1] or 1 << 62)):
        total = sum(m.weight for m in members)
        backends = []
        for m in sorted(members, key=lambda m: m.island):
            w = m.weight / total if total > 0 else 1.0 / len(members)
            backends.append(
                {
                    "service": f"{m.name}.{m.namespace}.svc",
                    "port": m.engine.serving_port,
                    "island": m.island,
                    "role": m.role,
                    "weight": round(w, 6),
                }
            )
        table.append({"minInputTokens": lo, "maxInputTokens": hi, "backends": backends})
    return table


def build_routing_configmap(model: str, namespace: str, islands: Sequence[IslandRender],
                            owner: OwnerRef | None, plan_hash: str = "",
                            routes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """ConfigMap ``<model>-routing`` with ``routes.json``: ``routes`` when given (same shape as
    :func:`routing_table`), else the :func:`routing_table` of the islands."""
    ann = {ANN_PLAN_HASH: plan_hash} if plan_hash else None
    labels = {**selector_labels(model), LABEL_COMPONENT: "routing"}
    doc = {"model": model, "routes": routing_table(islands) if routes is None else routes}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(routing_configmap_name(model), namespace, labels, owner, ann),
        "data": {"routes.json": json.dumps(doc, indent=2, sort_keys=True)},
    }


def build_all(islands: Sequence[IslandRender], model: str, namespace: str, owner: OwnerRef | None,
              plan_hash: str = "", routes: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every object of one model's plan: per island a Deployment and a Service, then the model
    Service (when at least one island exists) and the routing ConfigMap. Order: Deployments first.

    Raises:
        ValueError: when two islands map to the same Deployment name, or islands belong to another
            model/namespace than ``model``/``namespace``.
    """
    seen: dict[str, str] = {}
    for isl in islands:
        if isl.model != model or isl.namespace != namespace:
            raise ValueError(f"island {isl.island!r}: belongs to {isl.namespace}/{isl.model}, not {namespace}/{model}")
        if isl.name in seen:
            raise ValueError(f"island ids {seen[isl.name]!r} and {isl.island!r} map to the same name {isl.name!r}")
        seen[isl.name] = isl.island
    objs: list[dict[str, Any]] = [build_deployment(i, owner) for i in islands]
    objs += [build_island_service(i, owner) for i in islands]
    if islands:
        objs.append(build_model_service(model, namespace, islands[0].engine.serving_port, owner))
    objs.append(build_routing_configmap(model, namespace, islands, owner, plan_hash, routes))
    return objs
