"""One ModelDeployment's part of the plan -> objects to apply / delete, status and Events (pure).

Everything here is a pure function of parsed specs, the planner's ``Plan`` and live objects (dicts
from kopf indices), so it is unit-tested without a cluster:

* :func:`renders_for_model` -- ``ModelPlan`` islands -> :class:`IslandRender` (engine flags, GPUs,
  nodes, pool selector and tolerations) and the routing table.
* :func:`rollout` -- desired objects vs live ones -> what to apply and what to delete. New islands
  are applied first; islands the plan dropped (and shrinking islands' surplus replicas) are only
  removed once every desired Deployment is available, so a model never drops below the capacity of
  the plan it is leaving. Objects are re-applied only when missing or drifted (content hash).
* :func:`build_status` / :func:`condition_events` -- status (one write) with conditions Planned,
  Available, SLOAtRisk, Infeasible, Degraded, and the Events for condition transitions.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from archipelago.act.apply import deployment_available
from archipelago.act.engine import EngineConfig
from archipelago.act.manifests import (
    ANN_NODES,
    ANN_PLAN_HASH,
    IslandRender,
    OwnerRef,
    build_all,
    dns_label,
)
from archipelago.api.conditions import get_condition, set_condition
from archipelago.api.v1alpha1 import GPUPool, ModelDeployment, ServingSLO
from archipelago.controller.settings import ANN_LAST_APPLIED_HASH, ANN_ROUTES_SWITCHED_AT, ANN_TEMPLATE_HASH
from archipelago.decide.planner.types import IslandPlan, ModelPlan, Plan
from archipelago.observe.metrics import ObservedWorkload

CONDITION_TYPES = ("Planned", "Available", "SLOAtRisk", "Infeasible", "Degraded")
#: Condition states that deserve a Warning Event (type -> status that is bad).
_BAD = {"Planned": "False", "Available": "False", "SLOAtRisk": "True", "Infeasible": "True", "Degraded": "True"}


def island_name(ip: IslandPlan) -> str:
    """Short, stable island name within a model: ``<pool>-tp<N>[-<role>]`` (DNS label)."""
    parts = [ip.pool, f"tp{ip.tp}"] + ([ip.role] if ip.role != "mixed" else [])
    return dns_label(*parts, max_len=40)


def model_plan_id(mp: ModelPlan) -> str:
    """16-hex SHA-256 of one model's decision: its islands (id, GPU, TP, replicas, role, input ranges
    and shares rounded to 1 %, engine settings). Node placement and other models are left out, so the
    id changes only when this model's islands do."""
    dec = sorted(
        (i.id, i.gpu, i.tp, i.replicas, i.role, [(r.lo, r.hi, round(r.share, 2)) for r in i.ranges],
         [i.engine.max_num_seqs, i.engine.gpu_memory_utilization, i.engine.max_model_len,
          i.engine.max_num_batched_tokens])
        for i in mp.islands if i.replicas > 0)
    return hashlib.sha256(json.dumps(dec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tokens(x: float) -> int | None:
    return None if math.isinf(x) else int(round(x))


def renders_for_model(md: ModelDeployment, mp: ModelPlan, plan: Plan, pools: Mapping[str, GPUPool],
                      node_pinning: str = "preferred") -> tuple[list[IslandRender], list[dict[str, Any]]]:
    """Islands of one model as :class:`IslandRender` plus the routing table for its ConfigMap.

    Engine settings: TP from the plan; ``maxNumSeqs``, ``gpuMemoryUtilization``, ``maxModelLen``,
    ``maxNumBatchedTokens`` from the spec when set there, else the planner's choice; quantisation,
    image, extra args and env from the spec. Node names from the plan's pod assignments. Islands
    with 0 replicas are dropped.

    Raises:
        ValueError: the plan names a pool that has no GPUPool (a planner/snapshot mismatch).
    """
    ns, name = md.metadata.namespace or "default", md.metadata.name or ""
    eng = md.spec.engine
    nodes_by_island: dict[str, list[str]] = {}
    for a in plan.assignments:
        nodes_by_island.setdefault(a.island, []).append(a.node)
    renders: list[IslandRender] = []
    names: dict[str, str] = {}
    moe = md.spec.model.architecture is not None and md.spec.model.architecture.moe is not None
    for ip in mp.islands:
        if ip.replicas <= 0:
            continue
        pool = pools.get(ip.pool)
        if pool is None:
            raise ValueError(f"plan island {ip.id!r} names pool {ip.pool!r}, which has no GPUPool")
        cfg = EngineConfig(
            engine=eng.kind,
            model=md.spec.model.name,
            tensor_parallel=ip.tp,
            expert_parallel=moe and ip.tp > 1,
            max_num_seqs=eng.max_num_seqs or ip.engine.max_num_seqs,
            max_num_batched_tokens=eng.max_num_batched_tokens or ip.engine.max_num_batched_tokens,
            gpu_memory_utilization=eng.gpu_memory_utilization or ip.engine.gpu_memory_utilization,
            max_model_len=eng.max_model_len or ip.engine.max_model_len,
            quantization=md.spec.model.quantization,
            extra_args=tuple(eng.extra_args),
        )
        short = island_name(ip)
        names[ip.id] = short
        nodes = tuple(sorted(set(nodes_by_island.get(ip.id, []))))
        lo, hi = ip.input_range
        renders.append(IslandRender(
            model=name, namespace=ns, island=short, pool=ip.pool, gpu_type=ip.gpu, replicas=ip.replicas,
            engine=cfg, image=eng.image or "", gpu_resource=pool.spec.resource_name,
            node_names=nodes, node_pinning=node_pinning if nodes else "none",  # type: ignore[arg-type]
            pool_selector=pool.spec.node_selector.to_dict(),
            tolerations=tuple(t.to_dict() for t in pool.spec.tolerations),
            role=ip.role, input_range=(max(0, int(lo)), _tokens(hi) if _tokens(hi) and _tokens(hi) > int(lo) else None),
            weight=ip.traffic_share, env=tuple(e.to_dict() for e in eng.env), plan_hash=model_plan_id(mp),
            island_id=ip.id,
        ))
    routes: list[dict[str, Any]] = []
    by_name = {r.island: r for r in renders}
    for lo, hi, weights in mp.routing:
        backends = []
        total = sum(w for iid, w in weights.items() if names.get(iid) in by_name)
        for iid, w in sorted(weights.items()):
            short = names.get(iid)
            if short is None or short not in by_name or w <= 0:
                continue
            r = by_name[short]
            backends.append({"service": f"{r.name}.{ns}.svc", "port": r.engine.serving_port, "island": short,
                             "role": r.role, "weight": round(w / total, 6) if total > 0 else 0.0})
        if backends:
            routes.append({"minInputTokens": int(lo), "maxInputTokens": _tokens(hi), "backends": backends})
    return renders, routes


def content_hash(obj: Mapping[str, Any]) -> str:
    """16-hex SHA-256 of what matters in an object (JSON, keys sorted).

    Left out, so that they alone never cause a write (and a rolling restart of healthy pods): the
    hash annotation itself, the plan id and planned-node annotations, and *preferred* node affinity
    (the packing's node choice; it only steers scheduling of new pods and is refreshed whenever the
    Deployment is written for another reason). Required node pinning is part of the hash.
    """
    o = json.loads(json.dumps(obj, sort_keys=True))
    ann = o.get("metadata", {}).get("annotations") or {}
    for k in (ANN_LAST_APPLIED_HASH, ANN_PLAN_HASH, ANN_NODES, ANN_ROUTES_SWITCHED_AT):
        ann.pop(k, None)
    aff = (((o.get("spec") or {}).get("template") or {}).get("spec") or {}).get("affinity") or {}
    (aff.get("nodeAffinity") or {}).pop("preferredDuringSchedulingIgnoredDuringExecution", None)
    return hashlib.sha256(json.dumps(o, sort_keys=True).encode()).hexdigest()[:16]


def stamp(obj: dict[str, Any]) -> dict[str, Any]:
    """Add the content-hash annotation to ``obj`` (in place) and return it; Deployments also get
    ``archipelago.dev/template-hash`` (:func:`spec_hash`), compared with the live object's to tell a
    replica or metadata change from one that needs new pods (the live ``spec`` itself carries
    server-side defaults, so it never hashes like the desired one)."""
    ann = obj["metadata"].setdefault("annotations", {})
    if obj.get("kind") == "Deployment":
        ann[ANN_TEMPLATE_HASH] = spec_hash(obj)
    ann[ANN_LAST_APPLIED_HASH] = content_hash(obj)
    return obj


def desired_objects(md: ModelDeployment, renders: Sequence[IslandRender], routes: list[dict[str, Any]],
                    plan_id: str) -> list[dict[str, Any]]:
    """All objects of the model, owner-referenced to the ModelDeployment and hash-stamped."""
    owner = OwnerRef(name=md.metadata.name or "", uid=md.metadata.uid or "")
    objs = build_all(list(renders), md.metadata.name or "", md.metadata.namespace or "default", owner,
                     plan_hash=plan_id, routes=routes)
    return [stamp(o) for o in objs]


@dataclass
class RolloutStep:
    """What one reconcile does to a model's objects.

    Attributes:
        apply: objects to server-side apply (Deployments first).
        delete: ``(kind, name, uid)`` of objects to delete.
        waiting: Deployments (names) not yet available, which hold back removals.
        retained: names of old Deployments kept until the new islands are available and drained.
        draining_s: seconds left of the drain after the routing switch (0 when not draining).
        complete: True when every desired Deployment is available and nothing old remains.
    """

    apply: list[dict[str, Any]] = field(default_factory=list)
    delete: list[tuple[str, str, str]] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    retained: list[str] = field(default_factory=list)
    draining_s: float = 0.0
    complete: bool = False


def _live_hash(obj: Mapping[str, Any] | None) -> str | None:
    if not obj:
        return None
    return ((obj.get("metadata") or {}).get("annotations") or {}).get(ANN_LAST_APPLIED_HASH)


def _pref_path(o: Mapping[str, Any]) -> dict[str, Any]:
    pod = ((o.get("spec") or {}).get("template") or {}).get("spec") or {}
    return (pod.get("affinity") or {}).get("nodeAffinity") or {}


def spec_hash(o: Mapping[str, Any]) -> str:
    """Hash of a Deployment's ``spec`` without its replica count and its preferred node affinity: what,
    when it changes, needs new pods."""
    spec = json.loads(json.dumps(o.get("spec") or {}, sort_keys=True))
    spec.pop("replicas", None)
    aff = ((spec.get("template") or {}).get("spec") or {}).get("affinity") or {}
    (aff.get("nodeAffinity") or {}).pop("preferredDuringSchedulingIgnoredDuringExecution", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def keep_live_node_preference(obj: dict[str, Any], live: Mapping[str, Any]) -> dict[str, Any]:
    """When a Deployment is re-applied for metadata or its replica count only (its spec, replicas and
    preferred node affinity aside, is unchanged), keep the live preferred node affinity so that the
    write does not roll its pods: scaling an island from 3 to 4 replicas changes the packing's node
    choice, and writing it into the pod template replaced every running pod of the island (seen in
    the demo: an overloaded L4 pod aborted 53 requests when its grace period ran out). New replicas
    are scheduled anywhere in the pool the required affinity allows."""
    mine = ((obj.get("metadata") or {}).get("annotations") or {}).get(ANN_TEMPLATE_HASH) or spec_hash(obj)
    theirs = ((live.get("metadata") or {}).get("annotations") or {}).get(ANN_TEMPLATE_HASH) or spec_hash(live)
    if mine != theirs:
        return obj
    live_pref = _pref_path(live).get("preferredDuringSchedulingIgnoredDuringExecution")
    out = json.loads(json.dumps(obj))
    na = out["spec"]["template"]["spec"].setdefault("affinity", {}).setdefault("nodeAffinity", {})
    if live_pref:
        na["preferredDuringSchedulingIgnoredDuringExecution"] = live_pref
    else:
        na.pop("preferredDuringSchedulingIgnoredDuringExecution", None)
    return out


def _with_replicas(d: Mapping[str, Any], replicas: int) -> dict[str, Any]:
    o = json.loads(json.dumps(d))
    o["spec"]["replicas"] = replicas
    return stamp(o)


def _switched_at(obj: Mapping[str, Any] | None) -> float | None:
    raw = ((obj or {}).get("metadata", {}).get("annotations") or {}).get(ANN_ROUTES_SWITCHED_AT)
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def rollout(desired: Sequence[dict[str, Any]], live: Mapping[tuple[str, str], Mapping[str, Any]],
            force_apply: bool = False, *, now: float | None = None, drain_s: float = 0.0) -> RolloutStep:
    """Plan the writes of one reconcile for one model.

    Args:
        desired: objects from :func:`desired_objects`.
        live: ``{(kind, name): live object}`` of the model's objects that exist (Deployments with status).
        force_apply: re-apply every desired object even if its hash matches (periodic resync).
        now: wall-clock time, unix seconds (default ``time.time()``).
        drain_s: seconds between the routing switch and the removal of what the old routes used.

    Rules: (1) missing or changed desired objects are applied; (2) a desired Deployment that shrinks
    keeps its live replica count until every desired Deployment is available and the routes have
    drained; (3) live objects not desired are deleted only then (else they are retained); (4) an
    existing routing ConfigMap is switched to the new routes only once every desired Deployment is
    available, so traffic never goes to islands that cannot serve yet; the switch stamps the
    ConfigMap with its time (annotation ``archipelago.dev/routes-switched-at``), and (2)/(3) wait
    ``drain_s`` after it, so routers re-read the routes and requests in flight finish before the old
    pods go (a ConfigMap without the stamp counts as switched long ago).
    A Deployment counts as available when its live template is the desired one (content hash, up to
    a held-back replica count) and ``deployment_available`` holds.
    """
    now = time.time() if now is None else now
    step = RolloutStep()
    want = {(o["kind"], o["metadata"]["name"]): o for o in desired}
    held: dict[str, dict[str, Any]] = {}
    not_ready = []
    for d in (o for o in desired if o["kind"] == "Deployment"):
        name = d["metadata"]["name"]
        lv = live.get(("Deployment", name))
        if lv is None:
            not_ready.append(name)
            continue
        live_reps = int((lv.get("spec") or {}).get("replicas", 0) or 0)
        want_reps = int(d["spec"]["replicas"])
        if live_reps > want_reps:
            held[name] = _with_replicas(d, live_reps)
        ok_hashes = {_live_hash(d)} | ({_live_hash(held[name])} if name in held else set())
        if _live_hash(lv) not in ok_hashes or not deployment_available(lv, min(live_reps, want_reps)):
            not_ready.append(name)
    step.waiting = sorted(not_ready)
    all_ready = not not_ready
    # routes in force: the live ConfigMap already carries the desired routes (or there is none to switch)
    drained = all_ready
    for key, o in want.items():
        if key[0] != "ConfigMap":
            continue
        lv = live.get(key)
        if lv is None or _live_hash(lv) != _live_hash(o):
            drained = False if lv is not None else drained
            continue
        t = _switched_at(lv)
        if t is not None and now - t < drain_s:
            drained = False
            step.draining_s = max(step.draining_s, drain_s - (now - t))
    for key, o in want.items():
        lv = live.get(key)
        if key[0] == "ConfigMap" and lv is not None and _live_hash(lv) != _live_hash(o):
            if not all_ready:
                continue  # keep routing to the islands that serve now until the new ones are available
            o = json.loads(json.dumps(o))
            o["metadata"]["annotations"][ANN_ROUTES_SWITCHED_AT] = f"{now:.3f}"
            if drain_s > 0:
                step.draining_s = max(step.draining_s, drain_s)
        elif key[0] == "ConfigMap" and lv is not None and _switched_at(lv) is not None:
            o = json.loads(json.dumps(o))  # a re-apply keeps the switch time
            o["metadata"]["annotations"][ANN_ROUTES_SWITCHED_AT] = lv["metadata"]["annotations"][ANN_ROUTES_SWITCHED_AT]
        obj = held[key[1]] if (key[0] == "Deployment" and key[1] in held and not drained) else o
        if force_apply or lv is None or _live_hash(lv) != _live_hash(obj):
            if key[0] == "Deployment" and lv is not None:
                obj = keep_live_node_preference(obj, lv)
            step.apply.append(obj)
    for key, lv in sorted(live.items()):
        if key in want:
            continue
        uid = (lv.get("metadata") or {}).get("uid", "")
        if drained:
            step.delete.append((key[0], key[1], uid))
        elif key[0] == "Deployment":
            step.retained.append(key[1])
    step.complete = drained and not step.delete and not step.retained and not step.apply
    return step


# ----------------------------------------------------------------------------------------------
# status
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelFacts:
    """What a reconcile learned about one model, input to :func:`build_status`.

    Attributes:
        planned: True when the model has a plan in force (islands applied or being applied).
        plan_reason / plan_message: reason and message for the Planned condition.
        infeasible: ``(reason, message)`` when the SLO cannot be met (fully or partly), else None.
        available: every desired Deployment is available; waiting: names still coming up.
        pending_pods: our pods of this model that are Pending and unbound.
        degraded: ``(reason, message)`` when something needs an admin's attention, else None.
        slo_at_risk: ``(status, reason, message)`` for SLOAtRisk.
    """

    planned: bool
    plan_reason: str
    plan_message: str
    infeasible: tuple[str, str] | None = None
    available: bool = False
    waiting: list[str] = field(default_factory=list)
    pending_pods: list[str] = field(default_factory=list)
    degraded: tuple[str, str] | None = None
    slo_at_risk: tuple[str, str, str] = ("Unknown", "NoLatencyMetrics", "no latency metrics yet")


def slo_risk(observed: ObservedWorkload | None, slo: ServingSLO | None, mp: ModelPlan | None
             ) -> tuple[str, str, str]:
    """SLOAtRisk condition ``(status, reason, message)`` from measured and predicted tail latency.

    True when measured TTFT or inter-token latency at the measured quantile exceeds the SLO target, or
    (without measurements) the plan's predicted p99 exceeds it; False when measured within target;
    Unknown when neither is available.
    """
    if slo is None:
        return ("Unknown", "SLONotFound", "no ServingSLO to compare with")
    t_ttft, t_tpot = slo.spec.ttft.seconds, slo.spec.tpot.seconds
    if observed is not None and (observed.ttft_p_s is not None or observed.itl_p_s is not None):
        q = int(round(observed.quantile * 100))
        over = []
        if observed.ttft_p_s is not None and observed.ttft_p_s > t_ttft:
            over.append(f"measured p{q} TTFT {observed.ttft_p_s:.3f}s > {t_ttft}s")
        if observed.itl_p_s is not None and observed.itl_p_s > t_tpot:
            over.append(f"measured p{q} inter-token latency {observed.itl_p_s:.4f}s > {t_tpot}s")
        if over:
            return ("True", "ObservedLatencyAboveSLO", "; ".join(over))
        return ("False", "WithinSLO", f"measured p{q} latency within the SLO")
    if mp is not None and mp.islands:
        over = []
        if mp.ttft_p99_s > t_ttft:
            over.append(f"predicted p99 TTFT {mp.ttft_p99_s:.3f}s > {t_ttft}s")
        if mp.tpot_p99_s > t_tpot:
            over.append(f"predicted p99 TPOT {mp.tpot_p99_s:.4f}s > {t_tpot}s")
        if over:
            return ("True", "PredictedLatencyAboveSLO", "; ".join(over))
        return ("Unknown", "NoLatencyMetrics", "no latency metrics yet; the plan predicts the SLO is met")
    return ("Unknown", "NoLatencyMetrics", "no latency metrics and no plan")


def _num(x: float | None) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), 6)


def plan_status(mp: ModelPlan, plan: Plan, planned_at: datetime, renders: Sequence[IslandRender]) -> dict[str, Any]:
    """``status.plan`` (camelCase, the api ``Plan`` shape) for one model; ``planId`` is
    :func:`model_plan_id` (the fleet plan's id changes with any model)."""
    by_id = {r.island_id: r for r in renders}
    islands = []
    for ip in mp.islands:
        if ip.replicas <= 0:
            continue
        r = by_id.get(ip.id)
        lo, hi = ip.input_range
        tr: dict[str, Any] = {"min": max(0, int(lo))}
        if _tokens(hi) is not None and _tokens(hi) > int(lo):  # type: ignore[operator]
            tr["max"] = _tokens(hi)
        eargs: dict[str, Any] = {}
        if r is not None:
            e = r.engine
            eargs = {k: v for k, v in {
                "maxNumSeqs": e.max_num_seqs, "maxNumBatchedTokens": e.max_num_batched_tokens,
                "gpuMemoryUtilization": e.gpu_memory_utilization, "maxModelLen": e.max_model_len,
                "quantization": e.quantization}.items() if v is not None}
        islands.append({
            "name": island_name(ip), "pool": ip.pool, "gpu": ip.gpu, "tp": ip.tp, "replicas": ip.replicas,
            "role": ip.role, "inputTokens": tr, "trafficShare": round(min(1.0, max(0.0, ip.traffic_share)), 6),
            "engineArgs": eargs,
        })
    predicted = {k: v for k, v in {
        "dollarsPerHour": _num(mp.cost_per_hour), "ttftP99Seconds": _num(mp.ttft_p99_s),
        "tpotP99Seconds": _num(mp.tpot_p99_s),
        "attainment": _num(min(1.0, max(0.0, mp.attainment))) if mp.attainment is not None else None,
        "watts": _num(mp.power_w)}.items() if v is not None}
    pareto = []
    for p in plan.pareto[:64]:
        pt = {"dollarsPerHour": _num(p.cost_per_hour), "attainment": _num(min(1.0, max(0.0, p.attainment))),
              "watts": _num(p.power_w), "chosen": bool(p.chosen)}
        pareto.append({k: v for k, v in pt.items() if v is not None})
    from archipelago.api.v1alpha1 import format_time

    return {"islands": islands, "predicted": predicted, "paretoFront": pareto,
            "planTime": format_time(planned_at), "planId": model_plan_id(mp)}


def build_status(old_status: Mapping[str, Any] | None, generation: int | None, now: datetime, facts: ModelFacts,
                 plan_block: dict[str, Any] | None, observed_block: dict[str, Any] | None,
                 totals: tuple[int, int, float] | None) -> dict[str, Any]:
    """The whole ``status`` of a ModelDeployment (one write).

    Args:
        old_status: current ``status`` (conditions keep their lastTransitionTime when unchanged).
        generation: ``metadata.generation`` the status reflects.
        now: aware datetime for new transitions.
        facts: :class:`ModelFacts`.
        plan_block: ``status.plan`` from :func:`plan_status`, or None to keep the old one.
        observed_block: ``status.observed`` or None to keep the old one.
        totals: ``(replicas, gpus, dollars_per_hour)`` of running islands, or None.
    """
    old = dict(old_status or {})
    conds = list(old.get("conditions") or [])
    conds = set_condition(conds, "Planned", facts.planned, facts.plan_reason, facts.plan_message, generation, now)
    if facts.available:
        conds = set_condition(conds, "Available", True, "AllIslandsAvailable",
                              "every island's Deployment has all replicas available", generation, now)
    else:
        why = "no plan in force" if not facts.planned else f"waiting for {', '.join(facts.waiting) or 'Deployments'}"
        if facts.pending_pods:
            why += f"; {len(facts.pending_pods)} pod(s) Pending: {', '.join(facts.pending_pods[:5])}"
        conds = set_condition(conds, "Available", False, "RollingOut" if facts.planned else "NotPlanned", why,
                              generation, now)
    st, reason, msg = facts.slo_at_risk
    conds = set_condition(conds, "SLOAtRisk", st, reason, msg, generation, now)  # type: ignore[arg-type]
    if facts.infeasible:
        conds = set_condition(conds, "Infeasible", True, facts.infeasible[0], facts.infeasible[1], generation, now)
    else:
        conds = set_condition(conds, "Infeasible", False, "Feasible", "the SLO can be met with the fleet",
                              generation, now)
    if facts.degraded:
        conds = set_condition(conds, "Degraded", True, facts.degraded[0], facts.degraded[1], generation, now)
    else:
        conds = set_condition(conds, "Degraded", False, "Healthy", "nothing needs attention", generation, now)
    if facts.infeasible and not facts.planned:
        phase = "Infeasible"
    elif facts.degraded or (facts.infeasible and facts.planned):
        phase = "Degraded"
    elif facts.available and facts.planned:
        phase = "Ready"
    elif facts.planned:
        phase = "Planning"
    else:
        phase = "Pending"
    out: dict[str, Any] = {"phase": phase, "conditions": conds, "observedGeneration": generation}
    out["plan"] = plan_block if plan_block is not None else old.get("plan")
    out["observed"] = observed_block if observed_block is not None else old.get("observed")
    if totals is not None:
        out["replicas"], out["gpus"], out["dollarsPerHour"] = totals[0], totals[1], round(totals[2], 4)
    return {k: v for k, v in out.items() if v is not None}


def status_changed(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether writing ``new`` would change anything (ignores key order)."""
    def norm(x: Any) -> str:
        return json.dumps(x, sort_keys=True, default=str)
    old = dict(old or {})
    return any(norm(old.get(k)) != norm(v) for k, v in new.items())


def condition_events(old: Iterable[Mapping[str, Any]] | None, new: Iterable[Mapping[str, Any]]
                     ) -> list[tuple[str, str, str]]:
    """Events ``(type, reason, message)`` for conditions whose status or reason changed.

    Bad states (Planned/Available False, SLOAtRisk/Infeasible/Degraded True) are ``Warning`` events;
    recoveries and other transitions are ``Normal``. ``Available=False/RollingOut`` is not an event
    (the Deployment events say it), nor is any Unknown state.
    """
    out = []
    for c in new:
        t = c.get("type")
        prev = get_condition(old, t) if t else None
        if prev is not None and prev.get("status") == c.get("status") and prev.get("reason") == c.get("reason"):
            continue
        if c.get("status") == "Unknown" or (t == "Available" and c.get("reason") == "RollingOut"):
            continue
        if prev is None and c.get("status") != _BAD.get(t):
            continue  # a first good state is not news
        kind = "Warning" if c.get("status") == _BAD.get(t) else "Normal"
        out.append((kind, str(c.get("reason")), f"{t}={c.get('status')}: {c.get('message', '')}"))
    return out


def infeasibility_for(plan: Plan, key: str, attainment: float = 1.0) -> tuple[str, str] | None:
    """``(reason, message)`` summarising the plan's infeasibility notes for model ``key`` when the load it
    still serves is below the SLO's ``attainment`` target (a fraction: the SLO cannot be met); None
    otherwise. Notes that drop less than ``1 - attainment`` of the requests are reported by
    :func:`partial_notes` instead."""
    notes = [i for i in plan.infeasibilities if i.model == key]
    bad = [i for i in notes if i.served_fraction < attainment - 1e-9]
    if not bad:
        return None
    reason_map = {"memory": "ModelDoesNotFit", "ttft-slo": "TTFTUnattainable", "tpot-slo": "TPOTUnattainable",
                  "pool-capacity": "InsufficientGPUs", "max-replicas": "MaxReplicasTooLow",
                  "min-replicas": "MinReplicasUnplaceable", "packing": "GPUsFragmented", "budget": "OverBudget",
                  "unsupported": "Unsupported"}
    first = bad[0]
    served = min(i.served_fraction for i in bad)
    msg = "; ".join(f"{i.constraint}: {i.detail} (fix: {i.suggestion})" for i in bad)
    return reason_map.get(first.constraint, "SLOInfeasible"), f"serves {served:.2%} of the load; {msg}"


def partial_notes(plan: Plan, key: str) -> str:
    """One-line summary of the planner's notes for ``key`` (unserved slices within the SLO's allowance,
    unsupported options), for the Planned condition's message; empty when there are none."""
    notes = [i for i in plan.infeasibilities if i.model == key]
    return "; ".join(f"{i.constraint} ({i.served_fraction:.2%} served): {i.detail}" for i in notes)
