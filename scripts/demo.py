"""Archipelago's main job on this machine: the demo GPU fleet on a real local control plane.

Brings up the local control plane (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler) with KWOK GPU nodes from a fleet file, installs the CRDs, applies the samples
(GPU pools, SLOs, models) and shows the result with kubectl. The cluster keeps running
afterwards so it can be explored (``export KUBECONFIG=...``); ``make demo-down`` stops every
process by PID.

Usage: ``python scripts/demo.py [--fleet e2e/fleets/demo.yaml] [--name demo]``.
Exits non-zero, with the failing component's log tail, when the cluster cannot start.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "e2e"))

import localcluster  # noqa: E402  (e2e/ is not a package)
from rich.console import Console  # noqa: E402

console = Console(width=max(140, Console().width))


def kubectl(cluster: localcluster.LocalCluster, *args: str, check: bool = True) -> str:
    """Run the cluster's own kubectl with its admin kubeconfig; returns stdout."""
    binary = Path(cluster.state()["binaries"]["kubectl"]) if "binaries" in cluster.state() else None
    exe = str(binary) if binary and binary.exists() else str(localcluster.find_binaries(build=False) / "kubectl")
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    out = subprocess.run([exe, *args], env=env, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)} failed:\n{out.stderr}")
    return out.stdout


def show(cluster: localcluster.LocalCluster, title: str, *args: str) -> None:
    console.rule(f"[bold]{title}[/]  [dim]kubectl {' '.join(args)}[/]")
    print(kubectl(cluster, *args).rstrip(), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleet", default=str(ROOT / "e2e" / "fleets" / "demo.yaml"))
    ap.add_argument("--name", default="demo")
    args = ap.parse_args()

    cluster = localcluster.LocalCluster(args.name)
    console.print(f"[bold]Bringing up cluster {args.name!r}[/] with fleet {args.fleet}")
    try:
        timings = cluster.up(args.fleet, crd_dir=ROOT / "crds", with_prometheus=True)
    except (localcluster.ClusterError, localcluster.FleetError) as e:
        console.print(f"[red]cluster failed to start[/]: {e.report() if hasattr(e, 'report') else e}")
        return 1
    console.print(f"up in {timings.total:.1f} s ({'reused' if timings.reused else 'fresh'})")

    kubectl(cluster, "apply", "-k", str(ROOT / "manifests" / "samples"))

    show(cluster, "GPU nodes", "get", "nodes", "-L", "nvidia.com/gpu.product,nvidia.com/gpu.count,amd.com/gpu.product-name",
         "--sort-by=.metadata.name")
    show(cluster, "GPU pools", "get", "gpupools")
    show(cluster, "Serving SLOs", "get", "servingslos", "-A")
    show(cluster, "Model deployments", "get", "modeldeployments", "-A")

    console.rule()
    console.print(f"The cluster keeps running. [bold]export KUBECONFIG={cluster.kubeconfig}[/] to explore; "
                  "[bold]make demo-down[/] stops it.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
