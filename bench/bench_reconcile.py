"""Reconcile latency of the operator: apply the samples -> Deployments created -> all Available.

Brings up (or reuses) a local control plane with a KWOK GPU fleet (``e2e/localcluster.py``), starts
``archipelago run`` as a subprocess (tracked by PID, log kept under ``.run/bench/``), then per run:
creates a fresh namespace, server-side applies the sample GPUPools / ServingSLOs /
ModelDeployments (``manifests/samples``), and measures wall time from the apply until

* every ModelDeployment has at least one Deployment (``created``), and
* every ModelDeployment reports ``Available=True`` (``available``; KWOK pods become Ready at once,
  so this is the operator's and the control plane's latency, not model loading).

The operator's own metrics give the planner's solve time. Results: a table on stdout and JSON in
``--out`` (default ``.run/bench/reconcile.json``).

The samples' workload hints are statistics of the Azure LLM inference traces (Patel et al.,
"Splitwise", ISCA 2024; Azure/AzurePublicDataset, CC-BY-4.0) -- see ``shared/data/README.md``.

Usage: ``python bench/bench_reconcile.py [--runs 3] [--fleet e2e/fleets/small.yaml] [--keep]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "e2e"))

import localcluster as lc  # noqa: E402
from operator_fixtures import (  # noqa: E402
    OperatorProcess,
    apply_custom,
    condition,
    get_md,
    load_samples,
    our_deployments,
)

ATTRIBUTION = ("Workload hints: Azure LLM inference traces (Patel et al., 'Splitwise', ISCA 2024; "
               "Azure/AzurePublicDataset, CC-BY-4.0)")


def _metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+([0-9.eE+-]+)$", line)
            if m:
                total += float(m.group(2))
    return total


def run_once(apis: dict, op: OperatorProcess, timeout: float) -> dict:
    from kubernetes.client.rest import ApiException

    core, apps, custom = apis["core"], apis["apps"], apis["custom"]
    ns = f"bench-{int(time.time() * 1000) % 10_000_000}"
    core.create_namespace({"metadata": {"name": ns}})
    objs = load_samples(ns)
    models = [o["metadata"]["name"] for o in objs if o["kind"] == "ModelDeployment"]
    before = op.metrics()
    t0 = time.perf_counter()
    for o in objs:
        apply_custom(custom, o)
    t_apply = time.perf_counter() - t0
    created: dict[str, float] = {}
    available: dict[str, float] = {}
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline and len(available) < len(models):
        now = time.perf_counter() - t0
        for m in models:
            if m not in created and our_deployments(apps, ns, m):
                created[m] = now
            if m not in available:
                c = condition(get_md(custom, ns, m), "Available")
                if c and c["status"] == "True":
                    available[m] = now
        time.sleep(0.05)
    after = op.metrics()
    solves = _metric_sum(after, "archipelago_solve_seconds_sum") - _metric_sum(before, "archipelago_solve_seconds_sum")
    plans = _metric_sum(after, "archipelago_plans_total") - _metric_sum(before, "archipelago_plans_total")
    islands = {m: [f"{i['gpu']}xTP{i['tp']}x{i['replicas']}" for i in
                   (get_md(custom, ns, m).get("status", {}).get("plan") or {}).get("islands", [])] for m in models}
    for m in models:
        with contextlib.suppress(ApiException):
            custom.delete_namespaced_custom_object("archipelago.dev", "v1alpha1", ns, "modeldeployments", m)
    core.delete_namespace(ns)
    gone = time.perf_counter() + 120
    while time.perf_counter() < gone:
        try:
            core.read_namespace(ns)
            time.sleep(0.5)
        except ApiException:
            break
    return {
        "namespace": ns, "apply_s": round(t_apply, 3),
        "created_s": round(max(created.values()), 3) if len(created) == len(models) else None,
        "available_s": round(max(available.values()), 3) if len(available) == len(models) else None,
        "per_model_created_s": {k: round(v, 3) for k, v in created.items()},
        "per_model_available_s": {k: round(v, 3) for k, v in available.items()},
        "planner_runs": plans, "planner_solve_s": round(solves, 3), "islands": islands,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--fleet", default=str(ROOT / "e2e" / "fleets" / "small.yaml"))
    ap.add_argument("--name", default="bench", help="local cluster name")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds allowed per run")
    ap.add_argument("--out", default=str(ROOT / ".run" / "bench" / "reconcile.json"))
    ap.add_argument("--keep", action="store_true", help="leave the cluster running")
    args = ap.parse_args()

    from kubernetes import client, config
    from rich.console import Console
    from rich.table import Table

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cluster = lc.LocalCluster(args.name)
    timings = cluster.up(args.fleet, reuse=True)
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    apis = {"core": client.CoreV1Api(api), "apps": client.AppsV1Api(api), "custom": client.CustomObjectsApi(api)}
    op = OperatorProcess(cluster.kubeconfig, out.parent, ["--timer-interval", "2", "--plan-time-limit", "10"])
    results = []
    try:
        op.start()
        for _ in range(args.runs):
            results.append(run_once(apis, op, args.timeout))
    finally:
        op.stop()
        api.close()
        if not args.keep:
            cluster.down(quiet=True)
    ok_c = [r["created_s"] for r in results if r["created_s"] is not None]
    ok_a = [r["available_s"] for r in results if r["available_s"] is not None]
    summary = {
        "fleet": Path(args.fleet).name, "runs": len(results), "cluster_up_s": round(timings.total, 2),
        "median_created_s": statistics.median(ok_c) if ok_c else None,
        "median_available_s": statistics.median(ok_a) if ok_a else None,
        "failed_runs": sum(1 for r in results if r["available_s"] is None),
        "operator_log": str(op.log_path), "attribution": ATTRIBUTION, "results": results,
    }
    out.write_text(json.dumps(summary, indent=2))
    t = Table(title=f"Reconcile latency: samples applied -> Deployments ({summary['fleet']})")
    for col in ("run", "created (s)", "available (s)", "planner runs", "solve (s)", "islands"):
        t.add_column(col)
    for i, r in enumerate(results, 1):
        t.add_row(str(i), str(r["created_s"]), str(r["available_s"]), f"{r['planner_runs']:.0f}",
                  str(r["planner_solve_s"]), "; ".join(f"{m}: {','.join(v)}" for m, v in r["islands"].items()))
    c = Console()
    c.print(t)
    c.print(f"median created {summary['median_created_s']} s, available {summary['median_available_s']} s; "
            f"JSON in {out}\n{ATTRIBUTION}")
    return 0 if summary["failed_runs"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
