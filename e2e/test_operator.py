"""The operator end to end on the local control plane (real API server, scheduler, GC; KWOK nodes).

The tests share one operator subprocess and one namespace holding the samples, and run in order:

1. apply the samples -> Deployments with the planned flags and GPU counts, pods Running on nodes
   of the planned GPU types, status and Events written, GPUPool status filled;
2. change a spec (allowed pools) -> re-plan, new islands up before old ones go;
3. delete nodes of a pool -> re-plan within 30 s, nothing of ours left Pending;
4. delete an emitted Deployment -> recreated;
5. an unsatisfiable spec -> Infeasible condition + Warning Event, healthy Deployments untouched;
6. restart the operator mid-rollout -> same plan, no duplicate or orphaned children;
7. delete a ModelDeployment -> children garbage-collected (kube-controller-manager GC).

Operator logs: ``<cluster work dir>/operator-logs/``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

import localcluster as lc
from operator_fixtures import (
    REPO_ROOT,
    OperatorProcess,
    apply_custom,
    condition,
    get_md,
    load_samples,
    our_deployments,
    our_pods,
    service_account_kubeconfig,
    wait_for,
)

MODELS = ("llama-3-1-8b", "llama-3-1-70b", "mixtral-8x7b")
OP_ARGS = ["--timer-interval", "2", "--cooldown", "10", "--plan-time-limit", "10"]
#: short drain after a routing switch (default 30 s), so rollouts complete quickly here
OP_ENV = {"ARCHIPELAGO_DRAIN_S": "2"}


@pytest.fixture(scope="module")
def k8s(api):
    return {"core": client.CoreV1Api(api), "apps": client.AppsV1Api(api), "custom": client.CustomObjectsApi(api)}


@pytest.fixture(scope="module")
def operator(cluster):
    op = OperatorProcess(cluster.kubeconfig, cluster.work_dir / "operator-logs", OP_ARGS, env=OP_ENV)
    try:
        op.start()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    yield op
    op.stop()


@pytest.fixture(scope="module")
def ns(k8s, operator):
    """A namespace with the samples applied (pools are cluster-scoped and shared)."""
    core, custom = k8s["core"], k8s["custom"]
    name = f"op-{secrets.token_hex(3)}"
    core.create_namespace({"metadata": {"name": name}})
    for obj in load_samples(name):
        apply_custom(custom, obj)
    yield name
    with contextlib.suppress(ApiException):
        core.delete_namespace(name)


def _ready(custom, ns, model):
    md = get_md(custom, ns, model)
    c = condition(md, "Available")
    p = condition(md, "Planned")
    return md if (c and c["status"] == "True" and p and p["status"] == "True") else None


def _check_deployments_match_plan(k8s, ns, model, md):
    """Every island of status.plan has its Deployment with the planned replicas, TP flags and GPUs; no extras."""
    apps, custom = k8s["apps"], k8s["custom"]
    islands = md["status"]["plan"]["islands"]
    deps = {d.metadata.name: d for d in our_deployments(apps, ns, model)}
    want = {f"{model}-{i['name']}": i for i in islands}
    assert set(deps) == set(want), f"{model}: Deployments {sorted(deps)} != plan {sorted(want)}"
    engine = md["spec"]["engine"]["kind"]
    pools = {p["metadata"]["name"]: p for p in custom.list_cluster_custom_object(
        "archipelago.dev", "v1alpha1", "gpupools")["items"]}
    for name, isl in want.items():
        d = deps[name]
        assert d.spec.replicas == isl["replicas"], name
        c = d.spec.template.spec.containers[0]
        res = pools[isl["pool"]]["spec"].get("resourceName", "nvidia.com/gpu")
        assert c.resources.limits[res] == str(isl["tp"]), name
        args = c.args
        flag = "--tensor-parallel-size" if engine == "vllm" else "--tp-size"
        assert args[args.index(flag) + 1] == str(isl["tp"]), (name, args)
        mns = isl.get("engineArgs", {}).get("maxNumSeqs")
        if mns:
            f2 = "--max-num-seqs" if engine == "vllm" else "--max-running-requests"
            assert args[args.index(f2) + 1] == str(mns)
    return want, pools


def _pods_on_planned_gpu_types(k8s, ns, model, want, pools):
    core = k8s["core"]
    pods = [p for p in our_pods(core, ns, model) if p.metadata.deletion_timestamp is None]
    nodes = {n.metadata.name: n for n in core.list_node().items}
    by_island = {}
    for p in pods:
        by_island.setdefault(p.metadata.labels["archipelago.dev/island"], []).append(p)
    for dep_name, isl in want.items():
        mine = by_island.get(isl["name"], [])
        running = [p for p in mine if p.status.phase == "Running"]
        if len(running) < isl["replicas"]:
            return False
        sel = pools[isl["pool"]]["spec"]["nodeSelector"].get("matchLabels", {})
        for p in running:
            labels = nodes[p.spec.node_name].metadata.labels
            assert all(labels.get(k) == v for k, v in sel.items()), (
                f"pod {p.metadata.name} of {dep_name} runs on {p.spec.node_name} ({labels.get('nvidia.com/gpu.product')}),"
                f" not in pool {isl['pool']}")
    return True


def _diff(a, b, path=""):
    """Paths where two JSON-like values differ (for failure messages)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            out += _diff(x, y, f"{path}[{i}]")
        return out
    return [] if a == b else [f"{path}: {a!r} -> {b!r}"]


def _diagnose(k8s, ns, model):
    """Conditions, Deployments and pods of ``model`` (for failure messages)."""
    md = get_md(k8s["custom"], ns, model)
    conds = [(c["type"], c["status"], c["reason"], c["message"][:200]) for c in md.get("status", {}).get("conditions", [])]
    deps = [(d.metadata.name, d.spec.replicas, d.status.available_replicas, d.metadata.generation,
             d.status.observed_generation) for d in our_deployments(k8s["apps"], ns, model)]
    pods = [(p.metadata.name, p.status.phase, p.spec.node_name) for p in our_pods(k8s["core"], ns, model)]
    plan = [(i["name"], i["replicas"]) for i in (md.get("status", {}).get("plan") or {}).get("islands", [])]
    return f"plan {plan}\nconditions {conds}\ndeployments {deps}\npods {pods}"


def _settle(k8s, ns, models, timeout=90):
    """Wait until every model is Available with an unchanged plan id and every Deployment of ours is
    rolled out, over three checks 2 s apart (the fleet and the plan have stopped moving)."""
    custom, apps = k8s["custom"], k8s["apps"]
    seen: list = []

    def stable():
        ids = []
        for m in models:
            md = _ready(custom, ns, m)
            if md is None:
                seen.clear()
                return False
            ids.append(md["status"]["plan"]["planId"])
        for d in our_deployments(apps, ns):
            if d.status.observed_generation != d.metadata.generation or (d.status.available_replicas or 0) < d.spec.replicas:
                seen.clear()
                return False
        seen.append(tuple(ids))
        return len(seen) >= 3 and len(set(seen[-3:])) == 1
    wait_for(stable, timeout, f"{models} settled", interval=2.0)


def _events(core, ns, name):
    evs = core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    return [(e.type, e.reason, e.message) for e in evs]


# ------------------------------------------------------------------------------------------------


def test_samples_planned_and_running(k8s, ns, operator):
    custom, core = k8s["custom"], k8s["core"]
    t0 = time.monotonic()
    for m in MODELS:
        md = wait_for(lambda m=m: _ready(custom, ns, m), 180, f"{m} Planned and Available\n{operator.tail(30)}")
        want, pools = _check_deployments_match_plan(k8s, ns, m, md)
        wait_for(lambda m=m, want=want, pools=pools: _pods_on_planned_gpu_types(k8s, ns, m, want, pools), 60,
                 f"{m} pods Running on nodes of the planned pools")
        gen = md["metadata"]["generation"]
        for c in md["status"]["conditions"]:
            assert c["observedGeneration"] == gen and c["lastTransitionTime"] and c["reason"]
        assert md["status"]["observedGeneration"] == gen
        assert md["status"]["phase"] in ("Ready", "Degraded")
        assert md["status"]["plan"]["planId"] and md["status"]["plan"]["predicted"]["dollarsPerHour"] > 0
        assert md["status"]["observed"]["source"] == "hint"
        assert any(r == "CreatedIsland" for _, r, _ in _events(core, ns, m)), _events(core, ns, m)
    gpu_types = {i["gpu"] for m in MODELS for i in get_md(custom, ns, m)["status"]["plan"]["islands"]}
    print(f"samples Ready in {time.monotonic() - t0:.1f}s on GPU types {sorted(gpu_types)}")
    pools = custom.list_cluster_custom_object("archipelago.dev", "v1alpha1", "gpupools")["items"]
    used = sum((p.get("status") or {}).get("gpusUsedByArchipelago", 0) for p in pools)
    planned = sum(i["tp"] * i["replicas"] for m in MODELS for i in get_md(custom, ns, m)["status"]["plan"]["islands"])
    wait_for(lambda: sum((p.get("status") or {}).get("gpusUsedByArchipelago", 0) for p in custom.list_cluster_custom_object(
        "archipelago.dev", "v1alpha1", "gpupools")["items"]) == planned, 30,
        f"GPUPool status gpusUsedByArchipelago == {planned} (was {used})")
    for p in custom.list_cluster_custom_object("archipelago.dev", "v1alpha1", "gpupools")["items"]:
        st = p["status"]
        assert st["gpusTotal"] >= st["gpusFree"] + st["gpusUsedByArchipelago"] + st["gpusUsedByOthers"] - 0
        assert condition(p, "Ready")["status"] == "True"


def test_spec_change_replans(k8s, ns, operator):
    custom = k8s["custom"]
    m = "llama-3-1-8b"
    md = get_md(custom, ns, m)
    old_pools = {i["pool"] for i in md["status"]["plan"]["islands"]}
    allowed = [p for p in md["spec"]["placement"]["allowedPools"] if p not in old_pools]
    assert allowed, f"no other pool to move {m} to (plan uses {old_pools})"
    custom.patch_namespaced_custom_object("archipelago.dev", "v1alpha1", ns, "modeldeployments", m,
                                          {"spec": {"placement": {"allowedPools": allowed}}})
    new = wait_for(lambda: (lambda d: d if d["status"].get("observedGeneration") == d["metadata"]["generation"]
                            and {i["pool"] for i in d["status"]["plan"]["islands"]} <= set(allowed)
                            and condition(d, "Available")["status"] == "True" else None)(get_md(custom, ns, m)),
                   120, f"{m} re-planned onto {allowed} and Available")
    want, pools = _check_deployments_match_plan(k8s, ns, m, new)
    assert not any(d.metadata.labels["archipelago.dev/pool"] in old_pools
                   for d in our_deployments(k8s["apps"], ns, m))


#: Infeasible=True reasons of a model the rest of the fleet cannot carry (higher-priority models took the GPUs)
SHORTAGE_REASONS = ("InsufficientGPUs", "NoCapacity")


def test_node_loss_replans_within_30s(k8s, ns, operator, cluster, api):
    """The pool with the most of our GPUs loses all its nodes: within 30 s every affected model is re-planned
    onto the remaining pools or, when what remains cannot carry it (the small fleet after losing a whole
    type: higher-priority models take the GPUs), reported Planned=False, Infeasible=True/InsufficientGPUs, with its Deployments
    kept; at least one model moves, and the moved ones roll out again."""
    custom, core, apps = k8s["custom"], k8s["core"], k8s["apps"]
    # the pool with the most of our GPUs loses all its nodes
    plans = {m: get_md(custom, ns, m)["status"]["plan"] for m in MODELS}
    per_pool: dict[str, int] = {}
    for p in plans.values():
        for i in p["islands"]:
            per_pool[i["pool"]] = per_pool.get(i["pool"], 0) + i["tp"] * i["replicas"]
    victim = max(per_pool, key=per_pool.get)
    pool = custom.get_cluster_custom_object("archipelago.dev", "v1alpha1", "gpupools", victim)
    sel = ",".join(f"{k}={v}" for k, v in pool["spec"]["nodeSelector"]["matchLabels"].items())
    nodes = [n.metadata.name for n in core.list_node(label_selector=sel).items]
    affected = [m for m, p in plans.items() if any(i["pool"] == victim for i in p["islands"])]
    before = {m: plans[m]["planId"] for m in affected}
    deps_before = {m: sorted(d.metadata.name for d in our_deployments(apps, ns, m)) for m in affected}
    states: dict[str, str] = {}
    t0 = time.monotonic()
    for n in nodes:
        core.delete_node(n)
    try:
        def reaction(m: str) -> str | None:
            d = get_md(custom, ns, m)
            pl, planned, infeasible = d["status"]["plan"], condition(d, "Planned") or {}, condition(d, "Infeasible") or {}
            states[m] = f"planId {pl['planId']}, pools {sorted({i['pool'] for i in pl['islands']})}, " \
                        f"Planned={planned.get('status')}/{planned.get('reason')}, " \
                        f"Infeasible={infeasible.get('status')}/{infeasible.get('reason')}"
            if pl["planId"] != before[m] and not any(i["pool"] == victim for i in pl["islands"]):
                return "moved"
            if (planned.get("status") == "False" and infeasible.get("status") == "True"
                    and infeasible.get("reason") in SHORTAGE_REASONS):
                return "short"
            return None

        def replanned():
            out = {m: reaction(m) for m in affected}
            return out if all(out.values()) and "moved" in out.values() else None
        try:
            outcome = wait_for(replanned, 30, f"re-plan of {affected} away from pool {victim} after deleting {nodes}")
        except AssertionError as e:
            raise AssertionError(f"{e}; states: {states}") from None
        dt = time.monotonic() - t0
        print(f"node loss ({victim}: {nodes}) -> re-planned in {dt:.1f}s: {outcome}")
        moved = [m for m, r in outcome.items() if r == "moved"]
        for m in (m for m, r in outcome.items() if r == "short"):
            # what the fleet cannot carry is reported, and nothing of it is deleted because of it
            msg = condition(get_md(custom, ns, m), "Infeasible")["message"]
            assert "serves 0.00% of the load" in msg and "pool-capacity" in msg, msg
            assert sorted(d.metadata.name for d in our_deployments(apps, ns, m)) == deps_before[m]

        def settled():
            pending = [p.metadata.name for p in our_pods(core, ns) if p.status.phase == "Pending"
                       and p.metadata.deletion_timestamp is None and p.metadata.labels.get("archipelago.dev/model")
                       in moved]
            if pending:
                return None
            return all(_ready(custom, ns, m) for m in moved)
        wait_for(settled, 90, f"no Pending pods of {moved} and they are Available again")
        for m in moved:
            _check_deployments_match_plan(k8s, ns, m, get_md(custom, ns, m))
    finally:
        fleet = lc.load_fleet(os.environ.get("ARCHIPELAGO_E2E_FLEET", str(lc.E2E_DIR / "fleets" / "small.yaml")))
        nodes_back = lc.fleet_nodes(fleet)
        lc.sync_nodes(api, nodes_back, fleet["name"])
        lc.wait_nodes_ready(api, [n["metadata"]["name"] for n in nodes_back], 60)
        _settle(k8s, ns, MODELS)


def test_deleted_deployment_is_recreated(k8s, ns, operator):
    apps = k8s["apps"]
    m = "llama-3-1-70b"
    dep = our_deployments(apps, ns, m)[0]
    apps.delete_namespaced_deployment(dep.metadata.name, ns)
    wait_for(lambda: any(d.metadata.name == dep.metadata.name and d.metadata.uid != dep.metadata.uid
                         for d in our_deployments(apps, ns, m)), 30, f"{dep.metadata.name} recreated")


def test_unsatisfiable_spec_is_infeasible_and_healthy_untouched(k8s, ns, operator):
    custom, apps, core = k8s["custom"], k8s["apps"], k8s["core"]
    _settle(k8s, ns, MODELS)
    deps0 = our_deployments(apps, ns)
    snapshot = {d.metadata.name: (d.metadata.uid, d.metadata.generation) for d in deps0}
    specs0 = {d.metadata.name: apps.api_client.sanitize_for_serialization(d.spec) for d in deps0}
    impossible = {"apiVersion": "archipelago.dev/v1alpha1", "kind": "ServingSLO",
                  "metadata": {"name": "impossible", "namespace": ns},
                  "spec": {"ttft": {"seconds": 0.0001}, "tpot": {"seconds": 0.00001}}}
    apply_custom(custom, impossible)
    md = {"apiVersion": "archipelago.dev/v1alpha1", "kind": "ModelDeployment",
          "metadata": {"name": "too-fast", "namespace": ns},
          "spec": {"model": {"name": "meta-llama/Llama-3.1-70B-Instruct"}, "sloRef": "impossible",
                   "replicas": {"min": 1, "max": 2},
                   "workloadHint": {"requestsPerSecond": 50, "meanInputTokens": 4000, "meanOutputTokens": 500}}}
    apply_custom(custom, md)
    got = wait_for(lambda: (lambda d: d if (condition(d, "Infeasible") or {}).get("status") == "True" else None)(
        get_md(custom, ns, "too-fast")), 60, "too-fast Infeasible=True")
    assert got["status"]["phase"] in ("Infeasible", "Degraded")
    wait_for(lambda: any(t == "Warning" for t, _, _ in _events(core, ns, "too-fast")), 30, "a Warning Event")
    # an existing model's SLO made unsatisfiable: its Deployments stay as they are
    custom.patch_namespaced_custom_object("archipelago.dev", "v1alpha1", ns, "modeldeployments", "llama-3-1-8b",
                                          {"spec": {"sloRef": "impossible"}})
    wait_for(lambda: (condition(get_md(custom, ns, "llama-3-1-8b"), "Infeasible") or {}).get("status") == "True",
             60, "llama-3-1-8b Infeasible=True")
    time.sleep(5)
    after = {d.metadata.name: (d.metadata.uid, d.metadata.generation) for d in our_deployments(apps, ns)
             if d.metadata.labels["archipelago.dev/model"] != "too-fast"}
    if after != snapshot:
        diffs = {}
        for d in our_deployments(apps, ns):
            name = d.metadata.name
            if name in specs0:
                now = apps.api_client.sanitize_for_serialization(d.spec)
                diffs[name] = (_diff(specs0[name], now), d.metadata.annotations.get("deployment.kubernetes.io/revision"),
                               _events(core, ns, name)[-5:])
        pytest.fail(f"healthy Deployments changed:\nbefore {snapshot}\nafter {after}\nspec diffs {diffs}")
    custom.patch_namespaced_custom_object("archipelago.dev", "v1alpha1", ns, "modeldeployments", "llama-3-1-8b",
                                          {"spec": {"sloRef": "interactive"}})
    custom.delete_namespaced_custom_object("archipelago.dev", "v1alpha1", ns, "modeldeployments", "too-fast")
    wait_for(lambda: _ready(custom, ns, "llama-3-1-8b"), 60, "llama-3-1-8b Available again")


def test_restart_mid_rollout_same_plan_no_duplicates(k8s, ns, operator):
    custom, apps, core = k8s["custom"], k8s["apps"], k8s["core"]
    m = "llama-3-1-8b"
    md = get_md(custom, ns, m)
    pools = md["spec"]["placement"]["allowedPools"]
    used = {i["pool"] for i in md["status"]["plan"]["islands"]}
    target = [p for p in ["l4", "a100-80gb", "h100"] if p not in used][:1] or pools[:1]
    custom.patch_namespaced_custom_object("archipelago.dev", "v1alpha1", ns, "modeldeployments", m,
                                          {"spec": {"placement": {"allowedPools": target}}})
    # mid-rollout: the new plan is in status but not yet Available
    wait_for(lambda: get_md(custom, ns, m)["status"].get("observedGeneration") == get_md(custom, ns, m)["metadata"][
        "generation"], 30, "new generation observed")
    plan_before = get_md(custom, ns, m)["status"]["plan"]["planId"]
    operator.stop(kill=True)
    operator.start()
    try:
        wait_for(lambda: _ready(custom, ns, m), 120, f"{m} Available after the restart")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{_diagnose(k8s, ns, m)}\n{operator.tail(20)}") from None
    _settle(k8s, ns, [m])
    md2 = get_md(custom, ns, m)
    assert md2["status"]["plan"]["planId"] == plan_before, "the restarted operator chose another plan"
    want, _ = _check_deployments_match_plan(k8s, ns, m, md2)
    # no orphans: every Deployment of ours belongs to a live ModelDeployment and to its plan
    live_mds = {d["metadata"]["name"]: d for d in custom.list_namespaced_custom_object(
        "archipelago.dev", "v1alpha1", ns, "modeldeployments")["items"]}
    for d in our_deployments(apps, ns):
        owner = d.metadata.labels["archipelago.dev/model"]
        assert owner in live_mds, f"orphan {d.metadata.name}"
        names = {f"{owner}-{i['name']}" for i in live_mds[owner]["status"]["plan"]["islands"]}
        assert d.metadata.name in names or not _ready(custom, ns, owner), f"stray {d.metadata.name}"
    pods = [p for p in our_pods(core, ns, m) if p.metadata.deletion_timestamp is None]
    assert len(pods) == sum(i["replicas"] for i in want.values()), [p.metadata.name for p in pods]


def test_delete_model_garbage_collects_children(k8s, ns, operator):
    custom, apps, core = k8s["custom"], k8s["apps"], k8s["core"]
    m = "mixtral-8x7b"
    assert our_deployments(apps, ns, m) or condition(get_md(custom, ns, m), "Infeasible")["status"] == "True"
    custom.delete_namespaced_custom_object("archipelago.dev", "v1alpha1", ns, "modeldeployments", m)
    sel = f"app.kubernetes.io/managed-by=archipelago,archipelago.dev/model={m}"
    wait_for(lambda: not apps.list_namespaced_deployment(ns, label_selector=sel).items
             and not core.list_namespaced_service(ns, label_selector=sel).items
             and not core.list_namespaced_config_map(ns, label_selector=sel).items,
             90, f"{m}'s Deployments, Services and ConfigMap garbage-collected")
    assert "archipelago_plans_total" in operator.metrics()


def test_install_manifests_and_run_with_their_rbac(k8s, cluster, operator):
    """`kubectl apply -k manifests/` installs; the operator then works with only the ServiceAccount's RBAC
    (least privilege is sufficient) and with kopf peering (it creates its ClusterKopfPeering)."""
    import subprocess

    if cluster.kubectl is None:
        pytest.fail("no kubectl binary for this cluster", pytrace=False)
    operator.stop()  # one operator at a time
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    out = subprocess.run([cluster.kubectl, "apply", "--server-side", "--force-conflicts", "-k",
                          str(REPO_ROOT / "manifests")], env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    kc = service_account_kubeconfig(cluster.kubectl, cluster.kubeconfig, "archipelago-system", "archipelago-operator",
                                    cluster.work_dir / "sa-kubeconfig")
    op = OperatorProcess(kc, cluster.work_dir / "operator-logs", OP_ARGS, standalone=False, env=OP_ENV)
    core, custom = k8s["core"], k8s["custom"]
    name = f"rbac-{secrets.token_hex(3)}"
    core.create_namespace({"metadata": {"name": name}})
    try:
        op.start()
        for obj in load_samples(name):
            if obj["kind"] != "GPUPool" and obj["metadata"]["name"] in ("interactive", "llama-3-1-8b"):
                apply_custom(custom, obj)
        md = wait_for(lambda: _ready(custom, name, "llama-3-1-8b"), 120,
                      f"llama-3-1-8b Available with the ServiceAccount's RBAC\n{op.tail(40)}")
        _check_deployments_match_plan(k8s, name, "llama-3-1-8b", md)
        peering = custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", "archipelago")
        assert peering["status"], "kopf did not write its keep-alive into the peering object"
        forbidden = [line for line in op.tail(400).splitlines() if "forbidden" in line.lower()]
        assert not forbidden, forbidden[:3]
    finally:
        op.stop()
        with contextlib.suppress(ApiException):
            core.delete_namespace(name)
