"""GPU inventory of the cluster from Node and Pod objects (as plain dicts, e.g. kopf index bodies).

Pure functions: nodes are grouped into GPUPools by the pools' label selectors; each node's GPUs
come from ``status.allocatable`` (``nvidia.com/gpu`` or ``amd.com/gpu``); GPUs requested by pods
bound to the node (``spec.nodeName``, phase not Succeeded/Failed) are split into Archipelago's own
(label ``app.kubernetes.io/managed-by=archipelago``) and other workloads'. Cordoned
(``spec.unschedulable``) and NotReady nodes are marked unschedulable, and their GPUs are not
counted as free.

The result converts to the planner's input types (:class:`NodeSnapshot`, :class:`PoolSnapshot`,
:class:`CurrentPlacement`) and to a GPUPool ``status`` dict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from archipelago.act.manifests import (
    ANN_ISLAND_ID,
    ANN_MODEL_KEY,
    LABEL_ISLAND,
    LABEL_MANAGED_BY,
    LABEL_MODEL,
    MANAGED_BY,
)
from archipelago.decide.planner.types import CurrentPlacement, NodeSnapshot, PoolSnapshot

GPU_RESOURCES = ("nvidia.com/gpu", "amd.com/gpu")


def parse_count(q: Any) -> int:
    """Parse an integer Kubernetes quantity (``"8"``, ``8``, ``"8k"`` is rejected) of GPUs.

    Raises:
        ValueError: for a non-integer GPU quantity (GPUs are whole devices).
    """
    if q is None:
        return 0
    if isinstance(q, int):
        return q
    s = str(q).strip()
    try:
        return int(s)
    except ValueError:
        f = float(s)  # e.g. "8.0"
        if f != int(f):
            raise ValueError(f"GPU quantity {q!r} is not a whole number") from None
        return int(f)


def _labels(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics (``matchLabels`` AND ``matchExpressions``).

    An empty or None selector matches nothing (a pool must say which nodes it holds).

    Raises:
        ValueError: on an unknown operator.
    """
    if not selector:
        return False
    ml = selector.get("matchLabels") or {}
    me = selector.get("matchExpressions") or []
    if not ml and not me:
        return False
    for k, v in ml.items():
        if labels.get(k) != str(v):
            return False
    for e in me:
        key, op, values = e.get("key"), e.get("operator"), [str(x) for x in (e.get("values") or [])]
        if op == "In":
            if labels.get(key) not in values:
                return False
        elif op == "NotIn":
            if key in labels and labels[key] in values:
                return False
        elif op == "Exists":
            if key not in labels:
                return False
        elif op == "DoesNotExist":
            if key in labels:
                return False
        else:
            raise ValueError(f"selector.matchExpressions: unknown operator {op!r} (In, NotIn, Exists, DoesNotExist)")
    return True


def node_ready(node: Mapping[str, Any]) -> bool:
    """True when the node's ``Ready`` condition is ``True``."""
    for c in (node.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


def node_gpus(node: Mapping[str, Any]) -> tuple[str | None, int]:
    """``(resource name, allocatable GPUs)`` of a node; ``(None, 0)`` for a node without GPUs."""
    alloc = (node.get("status") or {}).get("allocatable") or {}
    for r in GPU_RESOURCES:
        n = parse_count(alloc.get(r))
        if n > 0:
            return r, n
    return None, 0


def pod_gpus(pod: Mapping[str, Any]) -> int:
    """GPUs a pod holds: sum over containers of requests (or limits) of a GPU resource, or the largest
    init container request when that is larger (Kubernetes effective request rule)."""
    spec = pod.get("spec") or {}

    def c_gpus(c: Mapping[str, Any]) -> int:
        res = c.get("resources") or {}
        req = res.get("requests") or {}
        lim = res.get("limits") or {}
        return sum(parse_count(req.get(r, lim.get(r))) for r in GPU_RESOURCES)

    main = sum(c_gpus(c) for c in spec.get("containers") or [])
    init = max((c_gpus(c) for c in spec.get("initContainers") or []), default=0)
    return max(main, init)


def pod_active(pod: Mapping[str, Any]) -> bool:
    """A pod holds its resources until it is Succeeded or Failed."""
    return (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


def is_ours(obj: Mapping[str, Any]) -> bool:
    """Whether the object carries ``app.kubernetes.io/managed-by=archipelago``."""
    return _labels(obj).get(LABEL_MANAGED_BY) == MANAGED_BY


@dataclass(frozen=True)
class NodeInventory:
    """One GPU node.

    Attributes:
        name: node name; labels: node labels; gpu_resource: ``nvidia.com/gpu`` / ``amd.com/gpu``.
        allocatable: allocatable GPUs; used_by_us / used_by_others: GPUs held by Archipelago's pods /
            by other pods; schedulable: not cordoned and Ready; reason: why not schedulable.
    """

    name: str
    labels: Mapping[str, str]
    gpu_resource: str | None
    allocatable: int
    used_by_us: int
    used_by_others: int
    schedulable: bool
    reason: str = ""

    @property
    def free(self) -> int:
        """GPUs neither we nor others hold (0 on unschedulable nodes)."""
        if not self.schedulable:
            return 0
        return max(0, self.allocatable - self.used_by_us - self.used_by_others)

    def to_snapshot(self) -> NodeSnapshot:
        """Planner view: our own GPUs count as free (the planner may keep or move our pods)."""
        free_for_planner = max(0, self.allocatable - self.used_by_others) if self.schedulable else 0
        return NodeSnapshot(
            name=self.name,
            gpus_allocatable=self.allocatable,
            gpus_free=min(free_for_planner, self.allocatable),
            labels=dict(self.labels),
            schedulable=self.schedulable,
        )


@dataclass(frozen=True)
class PoolInventory:
    """Nodes of one GPUPool and GPU totals (GPUs).

    ``gpus_total`` counts all matching nodes; ``gpus_allocatable`` only schedulable ones;
    ``gpus_free`` = allocatable minus used by anyone on schedulable nodes.
    """

    name: str
    nodes: tuple[NodeInventory, ...] = field(default_factory=tuple)

    @property
    def gpus_total(self) -> int:
        return sum(n.allocatable for n in self.nodes)

    @property
    def gpus_allocatable(self) -> int:
        return sum(n.allocatable for n in self.nodes if n.schedulable)

    @property
    def gpus_used_by_us(self) -> int:
        return sum(n.used_by_us for n in self.nodes)

    @property
    def gpus_used_by_others(self) -> int:
        return sum(n.used_by_others for n in self.nodes)

    @property
    def gpus_free(self) -> int:
        return sum(n.free for n in self.nodes)

    def status(self) -> dict[str, Any]:
        """GPUPool ``status`` fields (camelCase): node counts and GPU totals."""
        return {
            "nodes": len(self.nodes),
            "schedulableNodes": sum(1 for n in self.nodes if n.schedulable),
            "nodeNames": sorted(n.name for n in self.nodes),
            "gpusTotal": self.gpus_total,
            "gpusAllocatable": self.gpus_allocatable,
            "gpusFree": self.gpus_free,
            "gpusUsedByArchipelago": self.gpus_used_by_us,
            "gpusUsedByOthers": self.gpus_used_by_others,
            "unschedulableNodes": sorted(f"{n.name}: {n.reason}" for n in self.nodes if not n.schedulable),
        }

    def to_snapshot(self, gpu: str, price_per_gpu_hour: float, power_w: float | None = None,
                    max_gpus: int | None = None) -> PoolSnapshot:
        """Planner view of the pool (GPU catalogue key and price come from the GPUPool spec)."""
        return PoolSnapshot(
            name=self.name,
            gpu=gpu,
            price_per_gpu_hour=price_per_gpu_hour,
            nodes=tuple(n.to_snapshot() for n in sorted(self.nodes, key=lambda n: n.name)),
            power_w=power_w,
            max_gpus=max_gpus,
        )


def pod_model_key(pod: Mapping[str, Any]) -> str | None:
    """``namespace/model`` of one of our pods (annotation ``archipelago.dev/model-key`` or the labels)."""
    meta = pod.get("metadata") or {}
    key = (meta.get("annotations") or {}).get(ANN_MODEL_KEY)
    if key:
        return key
    model = _labels(pod).get(LABEL_MODEL)
    return f"{meta.get('namespace')}/{model}" if model else None


def gpu_usage_by_node(pods: Iterable[Mapping[str, Any]], planned: set[str] | None = None
                      ) -> dict[str, tuple[int, int]]:
    """``{node: (GPUs held by our pods, GPUs held by other pods)}`` over active, bound pods.

    When ``planned`` (a set of ``namespace/model`` keys) is given, our pods of models *not* in it
    (e.g. a model whose spec became invalid and whose Deployments are kept as they are) count as
    "others": the planner must not hand their GPUs to another model.
    """
    out: dict[str, list[int]] = {}
    for p in pods:
        node = (p.get("spec") or {}).get("nodeName")
        if not node or not pod_active(p):
            continue
        g = pod_gpus(p)
        if g <= 0:
            continue
        ours = is_ours(p) and (planned is None or pod_model_key(p) in planned)
        slot = out.setdefault(node, [0, 0])
        slot[0 if ours else 1] += g
    return {k: (v[0], v[1]) for k, v in out.items()}


def inventory(node: Mapping[str, Any], usage: Mapping[str, tuple[int, int]]) -> NodeInventory:
    """A :class:`NodeInventory` from a Node dict and :func:`gpu_usage_by_node` output."""
    name = node["metadata"]["name"]
    res, alloc = node_gpus(node)
    ours, others = usage.get(name, (0, 0))
    reasons = []
    if (node.get("spec") or {}).get("unschedulable"):
        reasons.append("cordoned")
    if not node_ready(node):
        reasons.append("NotReady")
    if (node.get("metadata") or {}).get("deletionTimestamp"):
        reasons.append("being deleted")
    return NodeInventory(
        name=name,
        labels=_labels(node),
        gpu_resource=res,
        allocatable=alloc,
        used_by_us=ours,
        used_by_others=others,
        schedulable=not reasons,
        reason=", ".join(reasons),
    )


def group_pools(pool_selectors: Mapping[str, Mapping[str, Any]], nodes: Iterable[Mapping[str, Any]],
                pods: Iterable[Mapping[str, Any]], planned: set[str] | None = None
                ) -> tuple[dict[str, PoolInventory], list[str]]:
    """Group GPU nodes into pools.

    Args:
        pool_selectors: ``{pool name: label selector}`` from the GPUPool specs.
        nodes, pods: Node and Pod dicts (e.g. from kopf indices).

    Returns:
        ``(pools, warnings)``. A node matched by several pools joins the alphabetically first one, and
        a warning names the node and the pools (fix the selectors so they are disjoint). Nodes
        without GPUs are ignored.
    """
    pods = list(pods)
    usage = gpu_usage_by_node(pods, planned)
    members: dict[str, list[NodeInventory]] = {p: [] for p in pool_selectors}
    warnings: list[str] = []
    for node in nodes:
        inv = inventory(node, usage)
        if inv.gpu_resource is None:
            continue
        matched = sorted(p for p, sel in pool_selectors.items() if selector_matches(sel, inv.labels))
        if not matched:
            continue
        if len(matched) > 1:
            warnings.append(f"node {inv.name} matches pools {matched}; counted in {matched[0]} only "
                            "(make the GPUPool nodeSelectors disjoint)")
        members[matched[0]].append(inv)
    return {p: PoolInventory(p, tuple(sorted(v, key=lambda n: n.name))) for p, v in members.items()}, warnings


def current_placement(pods: Iterable[Mapping[str, Any]]) -> CurrentPlacement:
    """Our running/pending-but-bound pods per planner island id (annotation ``archipelago.dev/island-id``
    on the pod template), as the planner's :class:`CurrentPlacement`."""
    out: dict[str, dict[str, str]] = {}
    for p in pods:
        if not is_ours(p) or not pod_active(p):
            continue
        meta = p.get("metadata") or {}
        iid = (meta.get("annotations") or {}).get(ANN_ISLAND_ID)
        node = (p.get("spec") or {}).get("nodeName")
        if iid and node and not meta.get("deletionTimestamp"):
            out.setdefault(iid, {})[meta["name"]] = node
    return CurrentPlacement(out)


def model_pods(pods: Iterable[Mapping[str, Any]], namespace: str, model: str) -> list[Mapping[str, Any]]:
    """Our pods of ModelDeployment ``namespace/model``."""
    out = []
    for p in pods:
        meta = p.get("metadata") or {}
        if meta.get("namespace") == namespace and is_ours(p) and _labels(p).get(LABEL_MODEL) == model:
            out.append(p)
    return out


def pending_pods(pods: Iterable[Mapping[str, Any]]) -> list[str]:
    """Names of our pods that are Pending and not bound to a node (``namespace/name``)."""
    out = []
    for p in pods:
        if not is_ours(p):
            continue
        st = p.get("status") or {}
        if st.get("phase") == "Pending" and not (p.get("spec") or {}).get("nodeName"):
            m = p["metadata"]
            out.append(f"{m.get('namespace')}/{m['name']}")
    return sorted(out)


__all__ = [
    "ANN_ISLAND_ID",
    "ANN_MODEL_KEY",
    "LABEL_ISLAND",
    "NodeInventory",
    "PoolInventory",
    "current_placement",
    "group_pools",
    "gpu_usage_by_node",
    "inventory",
    "model_pods",
    "node_gpus",
    "node_ready",
    "parse_count",
    "pending_pods",
    "pod_gpus",
    "pod_model_key",
    "selector_matches",
]
