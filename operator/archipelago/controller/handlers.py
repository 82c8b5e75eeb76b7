"""kopf handlers: indices (the in-memory snapshot), ModelDeployment / GPUPool / ServingSLO reconciles.

Level-based: every ModelDeployment is reconciled on create/update/resume *and* by a timer
(``timer_interval_s``); each reconcile rebuilds the snapshot from kopf indices (nodes, pods, pools,
SLOs, models, the operator's own Deployments/Services/ConfigMaps -- no cluster listing), asks the
:class:`PlanningService` for the plan in force (re-planning on spec / node / load triggers), then
applies its own part with server-side apply and writes its status once. Handlers are *sync*, so
kopf runs them in its thread pool: the CP-SAT planner never blocks the event loop.

:func:`build_registry` returns a fresh ``kopf.OperatorRegistry`` so tests and the CLI choose what
runs; nothing registers at import time.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import kopf

from archipelago.act.apply import EMITTED_KINDS, Applier, ApplyError
from archipelago.act.manifests import (
    ANN_GPU_TYPE,
    GROUP,
    LABEL_MANAGED_BY,
    LABEL_MODEL,
    LABEL_POOL,
    MANAGED_BY,
    VERSION,
    label_value,
)
from archipelago.api.conditions import set_condition
from archipelago.api.v1alpha1 import (
    GPUPool,
    ModelDeployment,
    ResourceValidationError,
    ServingSLO,
    format_time,
)
from archipelago.controller import reconcile as rc
from archipelago.controller.planning import PlanningService, model_slice
from archipelago.controller.settings import (
    ANN_LAST_APPLIED_HASH,
    APPLIED_OBJECTS,
    PLAN_CHANGES,
    PLAN_COST,
    PROMETHEUS_UP,
    RECONCILE_ERRORS,
    RECONCILE_SECONDS,
    OperatorConfig,
    configure_kopf,
    get_logger,
)
from archipelago.controller.snapshot import (
    FleetView,
    SpecProblem,
    WorkloadChoice,
    build_fleet,
    build_model_request,
    resolve_workload,
)
from archipelago.decide.planner.types import ModelRequest
from archipelago.observe.cluster import current_placement, is_ours, model_pods, pending_pods, pod_gpus
from archipelago.observe.metrics import (
    IslandObservation,
    ObservedWorkload,
    PrometheusUnavailable,
    make_client,
    observe_model,
)

log = get_logger("archipelago.controller")
ANN_PLAN_STATE = "archipelago.dev/plan-state"
OUR_LABELS = {LABEL_MANAGED_BY: MANAGED_BY}


# ------------------------------------------------------------------------------------------------
# runtime state shared by handlers (built at startup, kept in kopf's memo)
# ------------------------------------------------------------------------------------------------


class WorkloadCache:
    """Per-model Prometheus observations, refreshed at most every ``metrics_interval_s``.

    When Prometheus is unreachable the last good observation is kept (stale) and the error returned,
    so the plan does not flip to the workload hint because of an outage.
    """

    def __init__(self, cfg: OperatorConfig, client: Any | None):
        self.cfg, self.client = cfg, client
        self._lock = threading.Lock()
        self._obs: dict[str, tuple[float, ObservedWorkload | None]] = {}
        self._err: dict[str, str | None] = {}

    def get(self, key: str, engine: str, island_quantiles: tuple[float, float] | None = None
            ) -> tuple[ObservedWorkload | None, str | None]:
        """``(observation or None, error message or None)`` for ``namespace/name``; per-island
        latencies at ``island_quantiles`` (the SLO's TTFT and TPOT percentiles as fractions)."""
        if self.client is None:
            return None, None
        now = time.monotonic()
        with self._lock:
            hit = self._obs.get(key)
            if hit is not None and now - hit[0] < self.cfg.metrics_interval_s:
                return hit[1], self._err.get(key)
        ns, name = key.split("/", 1)
        matchers = {self.cfg.metrics_namespace_label: ns, self.cfg.metrics_label: name}
        try:
            obs = observe_model(self.client, engine, matchers, self.cfg.metrics_window_s, self.cfg.latency_quantile,
                                group_label=self.cfg.metrics_island_label or None, island_quantiles=island_quantiles,
                                shape_window_s=self.cfg.metrics_shape_window_s)
            err = None
            PROMETHEUS_UP.set(1)
        except PrometheusUnavailable as e:
            PROMETHEUS_UP.set(0)
            obs, err = (hit[1] if hit else None), str(e)
        except Exception as e:  # noqa: BLE001 - a query bug must not stop planning
            obs, err = (hit[1] if hit else None), f"{type(e).__name__}: {e}"
        with self._lock:
            self._obs[key] = (now, obs)
            self._err[key] = err
        return obs, err


class Runtime:
    """Everything the handlers share: configuration, planner service, applier, catalogues, caches."""

    def __init__(self, cfg: OperatorConfig, applier: Applier, service: PlanningService, gpu_catalog: Any,
                 model_catalog: Any, workloads: WorkloadCache):
        self.cfg, self.applier, self.service = cfg, applier, service
        self.gpu_catalog, self.model_catalog, self.workloads = gpu_catalog, model_catalog, workloads
        self.model_locks: dict[str, threading.Lock] = {}
        self.locks_lock = threading.Lock()
        self.last_resync: dict[str, float] = {}
        self.last_plan_id: dict[str, str] = {}
        self.pending_since: dict[str, float] = {}
        #: (namespace, kind, name) -> (content hash, monotonic time) of our recent applies; covers the
        #: moment between a write and its watch event reaching the index (no double apply/event).
        self.recent_applies: dict[tuple[str, str, str], tuple[str, float]] = {}

    def lock_for(self, key: str) -> threading.Lock:
        with self.locks_lock:
            return self.model_locks.setdefault(key, threading.Lock())


def make_runtime(cfg: OperatorConfig, api_client: Any | None = None) -> Runtime:
    """Build the :class:`Runtime`: kubernetes client (kubeconfig, else in-cluster), catalogues, planner.

    Raises:
        kubernetes.config.ConfigException: no kubeconfig and not in a cluster.
    """
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config

    from archipelago.decide.catalog import load_gpu_catalog, load_model_catalog

    if api_client is None:
        try:
            k8s_config.load_kube_config()
        except Exception:  # noqa: BLE001 - fall back to the service account
            k8s_config.load_incluster_config()
        api_client = k8s.ApiClient()
    prom = make_client(cfg.prometheus_url) if cfg.prometheus_url else None
    bo_fn = None
    if cfg.bo_enabled:
        from functools import partial

        from archipelago.controller.bo import bo_plan

        bo_fn = partial(bo_plan, max_wall_s=cfg.bo_time_budget_s)
    service = PlanningService(cfg, bo_fn=bo_fn)
    return Runtime(cfg, Applier(api_client), service, load_gpu_catalog(), load_model_catalog(),
                   WorkloadCache(cfg, prom))


# ------------------------------------------------------------------------------------------------
# helpers over indices
# ------------------------------------------------------------------------------------------------


def _values(index: Any) -> list[Any]:
    """All values of a kopf index (each key maps to a store of values); retried if mutated meanwhile."""
    for _ in range(5):
        try:
            return [v for key in list(index.keys()) for v in list(index.get(key, []))]
        except RuntimeError:  # changed size during iteration
            time.sleep(0.01)
    return []


def _slim(body: Mapping[str, Any], status_keys: Iterable[str] = ()) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    out = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid", "generation", "labels", "annotations",
                                               "deletionTimestamp", "ownerReferences") if meta.get(k) is not None},
        "spec": dict(body.get("spec") or {}),
    }
    st = body.get("status") or {}
    if status_keys:
        out["status"] = {k: st.get(k) for k in status_keys if k in st}
    else:
        out["status"] = dict(st)
    return _plain(out)


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _now() -> datetime:
    return datetime.now(UTC)


# ------------------------------------------------------------------------------------------------
# the ModelDeployment reconcile
# ------------------------------------------------------------------------------------------------


def gather(rt: Runtime, idx: Mapping[str, Any]) -> tuple[dict[str, ModelDeployment], dict[str, SpecProblem],
                                                          dict[str, GPUPool], dict[str, ServingSLO]]:
    """Parse models, pools and SLOs from the indices; invalid objects become :class:`SpecProblem` entries."""
    pools: dict[str, GPUPool] = {}
    for b in _values(idx["gpupools_idx"]):
        try:
            p = GPUPool.from_k8s(b)
            pools[p.metadata.name or ""] = p
        except ResourceValidationError:
            continue
    slos: dict[str, ServingSLO] = {}
    for b in _values(idx["servingslos_idx"]):
        try:
            s = ServingSLO.from_k8s(b)
            slos[f"{s.metadata.namespace}/{s.metadata.name}"] = s
        except ResourceValidationError:
            continue
    models: dict[str, ModelDeployment] = {}
    problems: dict[str, SpecProblem] = {}
    for b in _values(idx["modeldeployments_idx"]):
        meta = b.get("metadata") or {}
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        if meta.get("deletionTimestamp"):
            continue
        try:
            models[key] = ModelDeployment.from_k8s(b)
        except ResourceValidationError as e:
            problems[key] = SpecProblem("InvalidSpec", str(e))
    return models, problems, pools, slos


def build_requests(rt: Runtime, models: Mapping[str, ModelDeployment], slos: Mapping[str, ServingSLO],
                   pools: Mapping[str, GPUPool]) -> tuple[list[ModelRequest], dict[str, SpecProblem],
                                                          dict[str, tuple[WorkloadChoice | None, ObservedWorkload | None,
                                                                          str | None]]]:
    """ModelRequests for every plannable model; problems for the rest; workload provenance per model."""
    reqs: list[ModelRequest] = []
    problems: dict[str, SpecProblem] = {}
    wl: dict[str, tuple[WorkloadChoice | None, ObservedWorkload | None, str | None]] = {}
    for key, md in sorted(models.items()):
        if md.spec.paused:
            continue
        slo = slos.get(f"{md.metadata.namespace}/{md.spec.slo_ref}")
        quantiles = ((min(0.999, slo.spec.ttft.percentile / 100.0), min(0.999, slo.spec.tpot.percentile / 100.0))
                     if slo is not None else None)
        obs, err = rt.workloads.get(key, md.spec.engine.kind, quantiles)
        try:
            frozen = rt.service.planned_workload(key) if err else None
            if frozen is not None:
                choice = WorkloadChoice(frozen, "prometheus", f"Prometheus unavailable ({err}); keeping the "
                                                              "workload the plan in force was made for")
            else:
                choice = resolve_workload(obs, md, err, backlog_drain_s=rt.cfg.backlog_drain_s)
            wl[key] = (choice, obs, err)
            reqs.append(build_model_request(md, slo, choice.workload, rt.model_catalog, pools.keys()))
        except SpecProblem as e:
            wl.setdefault(key, (None, obs, err))
            problems[key] = e
        except ValueError as e:  # planner input validation (PlannerInputError is a ValueError)
            wl.setdefault(key, (None, obs, err))
            problems[key] = SpecProblem("InvalidSpec", str(e))
    return reqs, problems, wl


def measured_islands(plan: Any, wl: Mapping[str, tuple[WorkloadChoice | None, ObservedWorkload | None, str | None]]
                     ) -> dict[str, IslandObservation]:
    """``{island id: IslandObservation}`` for the islands of ``plan`` (the plan in force) that Prometheus
    reports on, matched by the pods' island label; models whose last query failed are left out (their
    observation is stale)."""
    out: dict[str, IslandObservation] = {}
    if plan is None:
        return out
    for mp in plan.models:
        _, obs, err = wl.get(mp.model, (None, None, None))
        if obs is None or err or not obs.islands:
            continue
        by_label = {o.island: o for o in obs.islands}
        for ip in mp.islands:
            o = by_label.get(label_value(rc.island_name(ip)))
            if o is not None:
                out[ip.id] = o
    return out


def _live_objects(idx: Mapping[str, Any], ns: str, name: str) -> dict[tuple[str, str], dict[str, Any]]:
    live: dict[tuple[str, str], dict[str, Any]] = {}
    for index_name in ("deployments_idx", "services_idx", "configmaps_idx"):
        for o in idx[index_name].get((ns, name), []):
            if (o.get("metadata") or {}).get("deletionTimestamp"):
                continue
            live[(o["kind"], o["metadata"]["name"])] = o
    return live


def _totals(live: Mapping[tuple[str, str], Mapping[str, Any]], fleet: FleetView) -> tuple[int, int, float]:
    prices = {p.name: p.price_per_gpu_hour for p in fleet.fleet.pools}
    reps = gpus = 0
    cost = 0.0
    for (kind, _), o in live.items():
        if kind != "Deployment":
            continue
        avail = int((o.get("status") or {}).get("availableReplicas", 0) or 0)
        tmpl = ((o.get("spec") or {}).get("template") or {})
        per = pod_gpus(tmpl)
        pool = ((o.get("metadata") or {}).get("labels") or {}).get(LABEL_POOL, "")
        reps += avail
        gpus += avail * per
        cost += avail * per * prices.get(pool, 0.0)
    return reps, gpus, cost


def reconcile_model(rt: Runtime, body: Mapping[str, Any], idx: Mapping[str, Any], reason: str
                    ) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """Reconcile one ModelDeployment. Returns ``(new status or None when unchanged, annotations to set)``;
    the annotation ``archipelago.dev/plan-state`` persists the model's part of the plan in force and the
    digest of its inputs, so a restarted operator adopts the same plan (see ``PlanningService``).

    Never raises for bad specs or infeasible plans (conditions + Events instead); API errors on
    writes raise ``kopf.TemporaryError`` so kopf retries.
    """
    meta = body.get("metadata") or {}
    ns, name = meta.get("namespace") or "default", meta.get("name") or ""
    key = f"{ns}/{name}"
    gen = meta.get("generation")
    old_status = _plain(body.get("status") or {})
    now = _now()
    events: list[tuple[str, str, str]] = []
    annotations: dict[str, str] = {}
    t0 = time.perf_counter()
    with rt.lock_for(key):
        models, invalid, pools, slos = gather(rt, idx)
        md = models.get(key)
        if md is None:
            prob = invalid.get(key) or SpecProblem("InvalidSpec", "the object could not be parsed")
            facts = rc.ModelFacts(planned=False, plan_reason=prob.reason, plan_message=str(prob)[:2000],
                                  degraded=(prob.reason, str(prob)[:2000]))
            return _finish(body, old_status, gen, now, facts, None, None, None, events), annotations
        if md.spec.paused:
            facts = rc.ModelFacts(planned=bool(old_status.get("plan")), plan_reason="Paused",
                                  plan_message="spec.paused is true: re-planning stopped, Deployments kept as they are",
                                  available=rc.get_condition(old_status.get("conditions"), "Available") is not None
                                  and rc.get_condition(old_status.get("conditions"), "Available").get("status") == "True")
            return _finish(body, old_status, gen, now, facts, None, None, None, events), annotations

        reqs, problems, wl = build_requests(rt, models, slos, pools)
        planned_keys = {r.key for r in reqs}
        nodes = _values(idx["nodes_idx"])
        pods = _values(idx["pods_idx"])
        fleet = build_fleet(pools, nodes, pods, rt.gpu_catalog, planned=planned_keys)
        choice, observed, prom_err = wl.get(key, (None, None, None))
        live = _live_objects(idx, ns, name)
        totals = _totals(live, fleet)
        slo = slos.get(f"{ns}/{md.spec.slo_ref}")
        observed_block = _observed_block(choice, observed)
        degraded = (("PrometheusUnavailable", f"{prom_err}; keeping the last good plan") if prom_err else None)

        if key in problems:
            prob = problems[key]
            facts = rc.ModelFacts(planned=False, plan_reason=prob.reason, plan_message=str(prob)[:2000],
                                  degraded=(prob.reason, str(prob)[:2000]),
                                  slo_at_risk=rc.slo_risk(observed, slo, None))
            if prob.reason == "NoWorkload":
                facts.infeasible = None
            return _finish(body, old_status, gen, now, facts, None, observed_block, totals, events), annotations

        def fleet_for(keys: set[str]) -> Any:
            return build_fleet(pools, nodes, pods, rt.gpu_catalog, planned=keys).fleet

        outcome = rt.service.ensure_plan(fleet.fleet, fleet.fingerprint(), reqs, current_placement(pods),
                                         force=(reason == "update" and _generation_changed(old_status, gen)),
                                         fleet_for=fleet_for, restore=lambda: _persisted_plans(idx),
                                         measured=measured_islands(rt.service.last_plan, wl))
        for note in outcome.corrections:
            if note.startswith(f"{key}/"):
                events.append(("Warning", "CapacityCorrected", note[len(key) + 1:]))
        if outcome.plan is not None:
            state = _plan_state(outcome, key)
            if ((meta.get("annotations") or {}).get(ANN_PLAN_STATE)) != state:
                annotations[ANN_PLAN_STATE] = state
            if outcome.replanned:
                _persist_others(rt, idx, outcome, skip=key)
        plan = outcome.plan
        mp = plan.model(key) if plan is not None else None
        if plan is None or mp is None or not any(i.replicas > 0 for i in mp.islands):
            infeas = rc.infeasibility_for(plan, key, 1.0) if plan is not None else None
            if plan is None:
                msg = outcome.error or "no plan yet"
                facts = rc.ModelFacts(planned=False, plan_reason="PlannerError" if outcome.error else "NoPlan",
                                      plan_message=msg, degraded=("PlannerError", msg) if outcome.error else degraded)
            else:
                infeas = infeas or ("NoCapacity", "the plan has no island for this model; existing Deployments are kept")
                facts = rc.ModelFacts(planned=False, plan_reason="Infeasible", plan_message=infeas[1][:2000],
                                      infeasible=infeas, degraded=degraded,
                                      slo_at_risk=rc.slo_risk(observed, slo, None))
            return _finish(body, old_status, gen, now, facts, None, observed_block, totals, events), annotations

        renders, routes = rc.renders_for_model(md, mp, plan, pools, rt.cfg.node_pinning)
        mpid = rc.model_plan_id(mp)
        desired = rc.desired_objects(md, renders, routes, mpid)
        resync_due = time.monotonic() - rt.last_resync.get(key, 0.0) >= rt.cfg.resync_s
        step = rc.rollout(desired, live, force_apply=resync_due, drain_s=rt.cfg.drain_s)
        try:
            for obj in step.apply:
                okey = (ns, obj["kind"], obj["metadata"]["name"])
                existed = (obj["kind"], obj["metadata"]["name"]) in live
                h = obj["metadata"]["annotations"].get(ANN_LAST_APPLIED_HASH, "")
                recent = rt.recent_applies.get(okey)
                if not existed and not resync_due and recent and recent[0] == h and time.monotonic() - recent[1] < 15:
                    continue  # written moments ago; the watch event has not reached the index yet
                rt.applier.apply(obj)
                rt.recent_applies[okey] = (h, time.monotonic())
                APPLIED_OBJECTS.labels(obj["kind"]).inc()
                if obj["kind"] == "Deployment" and not existed:
                    c = obj["spec"]["template"]["spec"]["containers"][0]
                    gpus = next((v for k, v in c["resources"]["limits"].items() if k.endswith("gpu") or "mig" in k), "?")
                    events.append(("Normal", "CreatedIsland",
                                   f"Deployment {obj['metadata']['name']}: {obj['metadata']['annotations'][ANN_GPU_TYPE]}"
                                   f" x TP{gpus} x {obj['spec']['replicas']} replicas"))
            for kind, oname, uid in step.delete:
                if rt.applier.delete(kind, ns, oname, uid) and kind == "Deployment":
                    events.append(("Normal", "RemovedIsland", f"Deployment {oname}: no longer in the plan "
                                                              "(its replacement islands are available)"))
        except ApplyError as e:
            RECONCILE_ERRORS.labels("ModelDeployment", "ApplyError").inc()
            raise kopf.TemporaryError(str(e), delay=10) from e
        if resync_due:
            rt.last_resync[key] = time.monotonic()

        prev_id = rt.last_plan_id.get(key) or (old_status.get("plan") or {}).get("planId")
        if prev_id != mpid:
            if prev_id:
                PLAN_CHANGES.labels(ns, name).inc()
                events.append(("Normal", "Replanned", f"plan {mpid} ({outcome.plan_trigger}): "
                               + ", ".join(f"{r.island}={r.gpu_type}xTP{r.engine.tensor_parallel}x{r.replicas}"
                                           for r in renders)))
            rt.last_plan_id[key] = mpid
        PLAN_COST.labels(ns, name).set(mp.cost_per_hour)

        pend = pending_pods(model_pods(pods, ns, name))
        if pend:
            rt.pending_since.setdefault(key, time.monotonic())
        else:
            rt.pending_since.pop(key, None)
        if pend and time.monotonic() - rt.pending_since[key] > rt.cfg.rollout_timeout_s:
            degraded = ("RolloutBlocked", f"{len(pend)} pod(s) Pending for over {int(rt.cfg.rollout_timeout_s)}s: "
                                          f"{', '.join(pend[:5])}; check GPU capacity of the planned pools "
                                          "(kubectl describe pod) or cordoned nodes")
        infeas = rc.infeasibility_for(plan, key, slo.spec.attainment if slo else 1.0)
        msg = f"plan {mpid} (trigger {outcome.plan_trigger}); " + (choice.message if choice else "")
        corr = {iid[len(key) + 1:]: f for iid, f in rt.service.capacity_corrections.items() if iid.startswith(f"{key}/")}
        if corr:
            msg += "; capacity corrected after measured SLO breaches: " + ", ".join(
                f"{i} x{f:.2f}" for i, f in sorted(corr.items()))
        notes = rc.partial_notes(plan, key)
        if notes:
            msg += f"; planner notes: {notes}"
        if outcome.error:
            msg += f"; last re-plan failed, keeping this plan: {outcome.error}"
            degraded = degraded or ("PlannerError", outcome.error)
        if step.retained and step.waiting:
            msg += f"; keeping {', '.join(step.retained)} until {', '.join(step.waiting)} are available"
        elif step.retained or step.draining_s > 0:
            msg += (f"; routes switched, draining {', '.join(step.retained) or 'released replicas'} for "
                    f"{step.draining_s:.0f}s more")
        facts = rc.ModelFacts(planned=True, plan_reason="PlanApplied", plan_message=msg[:4000],
                              infeasible=infeas, available=not step.waiting and not step.retained,
                              waiting=step.waiting, pending_pods=pend, degraded=degraded,
                              slo_at_risk=rc.slo_risk(observed, slo, mp))
        planned_at = datetime.fromtimestamp(outcome.planned_at or time.time(), UTC)
        plan_block = rc.plan_status(mp, plan, planned_at, renders)
        old_plan = old_status.get("plan") or {}
        if old_plan.get("planId") == mpid and old_plan.get("planTime"):
            plan_block["planTime"] = old_plan["planTime"]  # same plan: do not rewrite status for the timestamp
        out = _finish(body, old_status, gen, now, facts, plan_block, observed_block, totals, events)
    RECONCILE_SECONDS.observe(time.perf_counter() - t0)
    return out, annotations


def _plan_state(outcome: Any, key: str) -> str:
    return json.dumps({"digest": outcome.digest, "slice": model_slice(outcome.plan, key)}, sort_keys=True)


def _persist_others(rt: Runtime, idx: Mapping[str, Any], outcome: Any, skip: str) -> None:
    """After a re-plan, write every other ModelDeployment's plan-state annotation at once (metadata only),
    so that the persisted plan is consistent across models should the operator restart now."""
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    api = k8s.CustomObjectsApi(rt.applier.api_client)
    for b in _values(idx["modeldeployments_idx"]):
        meta = b.get("metadata") or {}
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        if key == skip or meta.get("deletionTimestamp"):
            continue
        state = _plan_state(outcome, key)
        if (meta.get("annotations") or {}).get(ANN_PLAN_STATE) == state:
            continue
        try:
            api.patch_namespaced_custom_object(GROUP, VERSION, meta["namespace"], "modeldeployments", meta["name"],
                                               {"metadata": {"annotations": {ANN_PLAN_STATE: state}}},
                                               _content_type="application/merge-patch+json", _preload_content=False)
        except ApiException as e:
            log.warning("could not persist plan state", object=key, status=e.status)


def _persisted_plans(idx: Mapping[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{namespace/name: (digest, model slice)}`` from the ModelDeployments' plan-state annotations."""
    out = {}
    for b in _values(idx["modeldeployments_idx"]):
        meta = b.get("metadata") or {}
        raw = (meta.get("annotations") or {}).get(ANN_PLAN_STATE)
        if raw:
            d = json.loads(raw)
            out[f"{meta.get('namespace')}/{meta.get('name')}"] = (d["digest"], d["slice"])
    return out


def _generation_changed(old_status: Mapping[str, Any], gen: int | None) -> bool:
    return gen is not None and old_status.get("observedGeneration") != gen


def _observed_block(choice: WorkloadChoice | None, observed: ObservedWorkload | None) -> dict[str, Any] | None:
    if choice is None and observed is None:
        return None
    out: dict[str, Any] = {}
    if choice is not None:
        # the measured arrival rate (the planned rate may add a backlog to drain, see resolve_workload)
        measured = observed.request_rate if (observed is not None and choice.source != "hint"
                                             and observed.request_rate is not None) else choice.workload.rate_rps
        out["requestsPerSecond"] = round(measured, 6)
        out["source"] = "hint" if choice.source == "hint" else "prometheus"
    else:
        out["source"] = "none"
    if observed is not None:
        if observed.ttft_p_s is not None:
            out["ttftP99Seconds"] = round(observed.ttft_p_s, 6)
        if observed.itl_p_s is not None:
            out["tpotP99Seconds"] = round(observed.itl_p_s, 6)
    return out


def _finish(body: Mapping[str, Any], old_status: Mapping[str, Any], gen: int | None, now: datetime,
            facts: rc.ModelFacts, plan_block: dict[str, Any] | None, observed_block: dict[str, Any] | None,
            totals: tuple[int, int, float] | None, events: list[tuple[str, str, str]]) -> dict[str, Any] | None:
    new = rc.build_status(old_status, gen, now, facts, plan_block, observed_block, totals)
    for etype, reason, message in events + rc.condition_events(old_status.get("conditions"), new["conditions"]):
        kopf.event(body, type=etype, reason=reason, message=message[:1024])
    return new if rc.status_changed(old_status, new) else None


# ------------------------------------------------------------------------------------------------
# GPUPool and ServingSLO status
# ------------------------------------------------------------------------------------------------


def reconcile_pool(rt: Runtime, body: Mapping[str, Any], idx: Mapping[str, Any]) -> dict[str, Any] | None:
    """GPUPool status: nodes, GPUs total/allocatable/free/used by Archipelago/used by others, conditions."""
    name = (body.get("metadata") or {}).get("name") or ""
    gen = (body.get("metadata") or {}).get("generation")
    old = _plain(body.get("status") or {})
    now = _now()
    try:
        pool = GPUPool.from_k8s(body)
    except ResourceValidationError as e:
        conds = set_condition(old.get("conditions"), "Ready", False, "InvalidSpec", str(e)[:2000], gen, now)
        new = {"conditions": conds, "observedGeneration": gen}
    else:
        fleet = build_fleet({name: pool}, _values(idx["nodes_idx"]), _values(idx["pods_idx"]), rt.gpu_catalog)
        inv = fleet.inventories[name].status()
        new = {k: inv[k] for k in ("nodes", "gpusTotal", "gpusAllocatable", "gpusFree", "gpusUsedByArchipelago",
                                   "gpusUsedByOthers")}
        new["nodes"] = inv["schedulableNodes"]
        prob = fleet.problems.get(name)
        if prob:
            conds = set_condition(old.get("conditions"), "Ready", False, prob[0], prob[1], gen, now)
        else:
            msg = f"{inv['schedulableNodes']}/{inv['nodes']} nodes schedulable, {inv['gpusFree']} GPUs free"
            if inv["unschedulableNodes"]:
                msg += "; unschedulable: " + "; ".join(inv["unschedulableNodes"][:10])
            conds = set_condition(old.get("conditions"), "Ready", True, "NodesFound", msg, gen, now)
        new["conditions"], new["observedGeneration"] = conds, gen
    for etype, reason, message in rc.condition_events(old.get("conditions"), new["conditions"]):
        kopf.event(body, type=etype, reason=reason, message=message[:1024])
    return new if rc.status_changed(old, new) else None


def reconcile_slo(body: Mapping[str, Any], idx: Mapping[str, Any]) -> dict[str, Any] | None:
    """ServingSLO status: the ModelDeployments bound to it and a Valid condition."""
    meta = body.get("metadata") or {}
    ns, name, gen = meta.get("namespace"), meta.get("name"), meta.get("generation")
    old = _plain(body.get("status") or {})
    bound = sorted(
        (m.get("metadata") or {}).get("name") for m in _values(idx["modeldeployments_idx"])
        if (m.get("metadata") or {}).get("namespace") == ns and (m.get("spec") or {}).get("sloRef") == name
    )
    try:
        ServingSLO.from_k8s(body)
        conds = set_condition(old.get("conditions"), "Valid", True, "Valid", f"{len(bound)} model(s) bound", gen,
                              _now())
    except ResourceValidationError as e:
        conds = set_condition(old.get("conditions"), "Valid", False, "InvalidSpec", str(e)[:2000], gen, _now())
    new = {"conditions": conds, "observedGeneration": gen, "boundModels": bound}
    return new if rc.status_changed(old, new) else None


def ensure_peering(api_client: Any, name: str, namespaces: list[str]) -> None:
    """Create the kopf peering object ``name`` if missing: ``ClusterKopfPeering`` for a cluster-wide
    operator, a ``KopfPeering`` per namespace otherwise (kopf only patches an existing one).

    Raises:
        kopf.PermanentError: the kopf peering CRDs are not installed (install ``manifests/`` or run
            with ``--standalone``).
    """
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    api = k8s.CustomObjectsApi(api_client)
    body = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}}
    try:
        if not namespaces:
            api.create_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", body, _preload_content=False)
        for ns in namespaces:
            api.create_namespaced_custom_object("kopf.dev", "v1", ns, "kopfpeerings",
                                                {**body, "kind": "KopfPeering"}, _preload_content=False)
    except ApiException as e:
        if e.status == 409:
            return
        if e.status == 404:
            raise kopf.PermanentError("kopf peering CRDs (kopf.dev) are not installed: apply manifests/ "
                                      "(kubectl apply -k manifests/) or run with --standalone") from e
        raise


# ------------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------------

INDEX_NAMES = ("nodes_idx", "pods_idx", "gpupools_idx", "servingslos_idx", "modeldeployments_idx",
               "deployments_idx", "services_idx", "configmaps_idx")


def _idx(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {n: kwargs[n] for n in INDEX_NAMES}


def _write_status(patch: Any, new: dict[str, Any] | None) -> None:
    if new is not None:
        for k, v in new.items():
            patch.status[k] = v


def build_registry(cfg: OperatorConfig, runtime_factory: Any = None) -> kopf.OperatorRegistry:
    """A kopf registry with every index and handler of the operator.

    Args:
        cfg: operator configuration (timer intervals).
        runtime_factory: ``callable(cfg) -> Runtime``; default :func:`make_runtime`.
    """
    reg = kopf.OperatorRegistry()
    factory = runtime_factory or make_runtime
    state: dict[str, Runtime] = {}

    def rt() -> Runtime:
        return state["rt"]

    # credentials: kubeconfig / in-cluster service account through the kubernetes client
    kopf.on.login(registry=reg)(kopf.login_via_client)

    @kopf.on.startup(registry=reg, id="startup")
    def startup(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
        configure_kopf(settings, cfg, standalone=getattr(memo, "standalone", False),
                       peering=getattr(memo, "peering", None))
        state["rt"] = factory(cfg)
        if not getattr(memo, "standalone", False):
            ensure_peering(state["rt"].applier.api_client, settings.peering.name,
                           list(getattr(memo, "namespaces", None) or []))
        log.info("operator started", config={k: v for k, v in vars(cfg).items()})

    # ---- indices (the snapshot in memory) -------------------------------------------------------
    @kopf.index("", "v1", "nodes", registry=reg, id="nodes_idx")
    def nodes_idx(name: str, body: Any, **_: Any) -> Any:
        return {name: _slim(body, ("allocatable", "capacity", "conditions"))}

    @kopf.index("", "v1", "pods", registry=reg, id="pods_idx")
    def pods_idx(namespace: str, name: str, body: Any, **_: Any) -> Any:
        if not is_ours(body) and pod_gpus(body) <= 0:
            return None
        b = _slim(body, ("phase", "conditions"))
        return {(namespace, name): b}

    @kopf.index(GROUP, VERSION, "gpupools", registry=reg, id="gpupools_idx")
    def gpupools_idx(name: str, body: Any, **_: Any) -> Any:
        return {name: _plain(dict(body))}

    @kopf.index(GROUP, VERSION, "servingslos", registry=reg, id="servingslos_idx")
    def servingslos_idx(namespace: str, name: str, body: Any, **_: Any) -> Any:
        return {(namespace, name): _plain(dict(body))}

    @kopf.index(GROUP, VERSION, "modeldeployments", registry=reg, id="modeldeployments_idx")
    def modeldeployments_idx(namespace: str, name: str, body: Any, **_: Any) -> Any:
        return {(namespace, name): _plain(dict(body))}

    def _owned(kind: str, status_keys: tuple[str, ...]) -> Any:
        def fn(namespace: str, body: Any, labels: Mapping[str, str], **_: Any) -> Any:
            model = labels.get(LABEL_MODEL)
            if not model:
                return None
            b = _slim(body, status_keys)
            b["kind"] = kind
            return {(namespace, model): b}
        return fn

    kopf.index("apps", "v1", "deployments", labels=OUR_LABELS, registry=reg, id="deployments_idx")(
        _owned("Deployment", ("observedGeneration", "replicas", "updatedReplicas", "availableReplicas",
                              "readyReplicas", "conditions")))
    kopf.index("", "v1", "services", labels=OUR_LABELS, registry=reg, id="services_idx")(_owned("Service", ()))
    kopf.index("", "v1", "configmaps", labels=OUR_LABELS, registry=reg, id="configmaps_idx")(
        _owned("ConfigMap", ()))

    # ---- ModelDeployment ----------------------------------------------------------------------
    def md_handler(reason: str) -> Any:
        def fn(body: Any, patch: Any, **kwargs: Any) -> None:
            try:
                status, annotations = reconcile_model(rt(), body, _idx(kwargs), reason)
                _write_status(patch, status)
                for k, v in annotations.items():
                    patch.metadata.annotations[k] = v
            except kopf.TemporaryError:
                raise
            except Exception as e:
                RECONCILE_ERRORS.labels("ModelDeployment", type(e).__name__).inc()
                log.exception("reconcile failed", object=f"{body['metadata'].get('namespace')}/{body['metadata']['name']}")
                kopf.event(body, type="Warning", reason="ReconcileError", message=f"{type(e).__name__}: {e}"[:1024])
                raise kopf.TemporaryError(f"{type(e).__name__}: {e}", delay=15) from e
        return fn

    md = (GROUP, VERSION, "modeldeployments")
    kopf.on.create(*md, registry=reg, id="md-create")(md_handler("create"))
    kopf.on.update(*md, registry=reg, id="md-update", field="spec")(md_handler("update"))
    kopf.on.resume(*md, registry=reg, id="md-resume")(md_handler("resume"))
    kopf.timer(*md, registry=reg, id="md-timer", interval=cfg.timer_interval_s, initial_delay=cfg.timer_interval_s)(
        md_handler("timer"))

    @kopf.on.delete(*md, registry=reg, id="md-delete", optional=True)
    def md_delete(namespace: str, name: str, **_: Any) -> None:
        r = state.get("rt")
        if r is not None:
            key = f"{namespace}/{name}"
            r.last_plan_id.pop(key, None)
            r.pending_since.pop(key, None)
        log.info("ModelDeployment deleted; its objects are garbage-collected by ownerReferences",
                 object=f"{namespace}/{name}")

    # ---- GPUPool ----------------------------------------------------------------------------------
    def pool_handler(body: Any, patch: Any, **kwargs: Any) -> None:
        _write_status(patch, reconcile_pool(rt(), body, _idx(kwargs)))

    gp = (GROUP, VERSION, "gpupools")
    kopf.on.resume(*gp, registry=reg, id="pool-resume")(pool_handler)
    kopf.on.create(*gp, registry=reg, id="pool-create")(pool_handler)
    kopf.on.update(*gp, registry=reg, id="pool-update", field="spec")(pool_handler)
    kopf.timer(*gp, registry=reg, id="pool-timer", interval=max(cfg.timer_interval_s, 5.0))(pool_handler)

    # ---- ServingSLO -----------------------------------------------------------------------------
    def slo_handler(body: Any, patch: Any, **kwargs: Any) -> None:
        _write_status(patch, reconcile_slo(body, _idx(kwargs)))

    sl = (GROUP, VERSION, "servingslos")
    kopf.on.resume(*sl, registry=reg, id="slo-resume")(slo_handler)
    kopf.on.create(*sl, registry=reg, id="slo-create")(slo_handler)
    kopf.on.update(*sl, registry=reg, id="slo-update", field="spec")(slo_handler)
    kopf.timer(*sl, registry=reg, id="slo-timer", interval=max(cfg.timer_interval_s * 6, 30.0))(slo_handler)
    return reg


__all__ = ["EMITTED_KINDS", "Runtime", "WorkloadCache", "build_registry", "format_time", "make_runtime",
           "reconcile_model", "reconcile_pool", "reconcile_slo"]
