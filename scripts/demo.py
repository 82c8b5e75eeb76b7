"""Archipelago's main job on this machine: the whole loop on the demo GPU fleet.

1. a real local control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler)
   with KWOK GPU nodes from a fleet file, and the CRDs;
2. a real Prometheus scraping one emulated vLLM/SGLang engine per Running operator pod (the
   fleet emulator: KWOK pods have no processes, so it serves their OpenAI API and /metrics);
3. the operator (``archipelago run``) reading Prometheus and planning islands;
4. the samples (GPU pools, SLOs, three models) applied;
5. an Azure LLM inference trace replayed against Llama-3.1-8B through the routing ConfigMap,
   in phases of low / high / low load, while plan changes and the client-side TTFT / TPOT / SLO
   attainment are printed as they happen.

Ctrl-C (or the end of the phases) stops the replayer, the operator, the fleet emulator,
Prometheus and the cluster, each by its PID; ``--keep-cluster`` leaves the cluster running for
``kubectl`` (``make demo-down`` stops it later). Logs stay under the cluster's run directory.

Trace: Azure LLM inference trace (conversation), Azure/AzurePublicDataset, CC-BY-4.0; Patel et
al., "Splitwise", ISCA 2024 -- read from ``../shared/data/traces``.

Usage: ``python scripts/demo.py [--fleet e2e/fleets/demo.yaml] [--phases 120:0.3,120:2,150:0.3]``.
Exits non-zero, with the failing component's log tail, when something cannot start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "e2e"))

from rich.console import Console  # noqa: E402

import localcluster  # noqa: E402  (e2e/ is not a package)
import prometheus as prom  # noqa: E402
from operator_fixtures import OperatorProcess, stop_process  # noqa: E402

console = Console(width=max(140, Console().width))
TRACE = ROOT.parent / "shared" / "data" / "traces" / "AzureLLMInferenceTrace_conv.csv"
REPLAY_MODEL = "llama-3-1-8b"
NAMESPACE = "llm"


def kubectl(cluster: localcluster.LocalCluster, *args: str, check: bool = True) -> str:
    """Run the cluster's own kubectl with its admin kubeconfig; returns stdout."""
    exe = localcluster.find_binaries(build=False) / "kubectl"
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    out = subprocess.run([str(exe), *args], env=env, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)} failed:\n{out.stderr}")
    return out.stdout


def show(cluster: localcluster.LocalCluster, title: str, *args: str) -> None:
    console.rule(f"[bold]{title}[/]  [dim]kubectl {' '.join(args)}[/]")
    print(kubectl(cluster, *args).rstrip(), flush=True)


def parse_phases(text: str) -> list[tuple[float, float]]:
    """``"120:0.3,120:2"`` -> ``[(120.0, 0.3), (120.0, 2.0)]`` (seconds, rate scale of the trace)."""
    phases = []
    for part in text.split(","):
        try:
            dur, scale = part.split(":")
            phases.append((float(dur), float(scale)))
        except ValueError:
            raise SystemExit(f"--phases: {part!r} is not SECONDS:RATE_SCALE (e.g. 120:0.3,120:2)") from None
    return phases


def plan_rows(md: dict[str, Any]) -> tuple[str, str]:
    """(plan id, one-line description of the islands and predicted figures) of a ModelDeployment."""
    status = md.get("status") or {}
    plan = status.get("plan") or {}
    islands = ", ".join(f"{i['replicas']}x {i['gpu']} TP{i['tp']}" for i in plan.get("islands") or []) or "none"
    pred = plan.get("predicted") or {}
    obs = status.get("observed") or {}
    rps = obs.get("requestsPerSecond")
    load = f"load {rps:.2f} req/s ({obs.get('source', '?')})" if isinstance(rps, int | float) else "load unknown"
    cost = pred.get("dollarsPerHour")
    text = f"{islands}  ${cost:.2f}/h  {load}  phase {status.get('phase', '?')}" if cost is not None else islands
    return plan.get("planId", ""), text


class Replay:
    """The trace replayer in a background thread, printing one line per window."""

    def __init__(self, kubeconfig: Path, endpoints: Path, phases: list[tuple[float, float]],
                 ttft_s: float, tpot_s: float) -> None:
        from kubernetes import client, config

        from archipelago.decide.sim import SLOTarget
        from archipelago.decide.traces import load_azure_csv
        from archipelago.emulate.replay import FileEndpoints, Replayer, phased_trace, routing_from_configmap

        api = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
        self.phases = phases
        trace = phased_trace(load_azure_csv(TRACE), phases, start_s=60.0)
        self.replayer = Replayer(trace, lambda: routing_from_configmap(api, NAMESPACE, f"{REPLAY_MODEL}-routing"),
                                 FileEndpoints(endpoints), slo=SLOTarget(ttft_s=ttft_s, tpot_s=tpot_s),
                                 window_s=10.0, on_window=self._print, timeout_s=120)
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.result = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _scale_at(self, t: float) -> float:
        for dur, scale in self.phases:
            if t < dur:
                return scale
            t -= dur
        return self.phases[-1][1]

    def _print(self, w: Any) -> None:
        s = w.summary
        att = s.get("attainment")
        ttft, tpot = s.get("ttft_s") or {}, s.get("tpot_s") or {}
        errs = sum((s.get("errors") or {}).values())
        console.print(
            f"[cyan]replay {w.end_s:5.0f}s[/] x{self._scale_at(w.start_s):.1f} rate  sent {w.sent:4d}  "
            f"done {s.get('requests', 0):4d}  TTFT p90 {ttft.get('p90', float('nan')):6.2f}s  "
            f"TPOT p90 {1000 * tpot.get('p90', float('nan')):6.1f}ms  "
            f"attainment {'-' if att is None else f'{att:.3f}'}  errors {errs}",
            highlight=False)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.stop_event = asyncio.Event()
        self.result = self.loop.run_until_complete(self.replayer.run(self.stop_event))

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        if self.stop_event is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleet", default=str(ROOT / "e2e" / "fleets" / "demo.yaml"))
    ap.add_argument("--name", default="demo")
    ap.add_argument("--phases", default="120:0.3,120:2,150:0.3",
                    help="replay phases SECONDS:RATE_SCALE,... of the Azure conversation trace (~5.4 req/s at 1)")
    ap.add_argument("--keep-cluster", action="store_true", help="leave the cluster running at the end")
    args = ap.parse_args()
    phases = parse_phases(args.phases)
    if not TRACE.is_file():
        console.print(f"[red]the Azure trace is missing[/]: {TRACE} (shared/ must sit beside the clone)")
        return 1

    cluster = localcluster.LocalCluster(args.name)
    work = cluster.run_dir / "loop"
    stack: list[tuple[str, Any]] = []  # (name, stop callable), stopped in reverse order
    interrupted = False

    def on_sigterm(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        console.print(f"[bold]Bringing up cluster {args.name!r}[/] with fleet {args.fleet}")
        try:
            t = cluster.up(args.fleet, crd_dir=ROOT / "crds")
        except (localcluster.ClusterError, localcluster.FleetError) as e:
            console.print(f"[red]cluster failed to start[/]: {e.report() if hasattr(e, 'report') else e}")
            return 1
        if not args.keep_cluster:
            stack.append(("cluster", lambda: cluster.down(quiet=True)))
        console.print(f"cluster up in {t.total:.1f} s; KUBECONFIG={cluster.kubeconfig}")

        work.mkdir(parents=True, exist_ok=True)
        p = prom.start_prometheus(work, scrape_interval="2s")
        stack.append(("prometheus", lambda: prom.stop_prometheus(work)))
        console.print(f"Prometheus {p.url} (pid {p.pid})")

        fleet_log = open(work / "fleet-emulator.log", "ab")  # noqa: SIM115 - closed at the end
        stack.append(("fleet-emulator log", fleet_log.close))
        fleet = subprocess.Popen(
            [sys.executable, "-m", "archipelago.cli_emulate", "emulate-fleet", "--run-dir", str(work),
             "--kubeconfig", str(cluster.kubeconfig), "--poll", "1"],
            stdout=fleet_log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        stack.append(("fleet emulator", lambda: stop_process(fleet)))
        console.print(f"fleet emulator pid {fleet.pid} (log {work / 'fleet-emulator.log'})")

        op = OperatorProcess(cluster.kubeconfig, work, ["--timer-interval", "2", "--cooldown", "30",
                                                        "--plan-time-limit", "5", "--prometheus-url", p.url],
                             env={"ARCHIPELAGO_METRICS_WINDOW_S": "30", "ARCHIPELAGO_METRICS_INTERVAL_S": "5",
                                  "ARCHIPELAGO_SCALE_DOWN_WINDOW_S": "60", "ARCHIPELAGO_DRAIN_S": "20",
                                  "ARCHIPELAGO_METRICS_SHAPE_WINDOW_S": "120"})
        op.start()
        stack.append(("operator", op.stop))
        console.print(f"operator pid {op.pid} (log {op.log_path})")

        kubectl(cluster, "apply", "-k", str(ROOT / "manifests" / "samples"))
        console.print("applied manifests/samples (GPU pools H100 / A100-80GB / L4, SLOs, 3 models)")

        seen: dict[str, str] = {}

        def poll_plans() -> None:
            import json

            items = json.loads(kubectl(cluster, "get", "modeldeployments", "-n", NAMESPACE, "-o", "json"))["items"]
            for md in items:
                name = md["metadata"]["name"]
                pid, text = plan_rows(md)
                if pid and seen.get(name) != pid:
                    verb = "planned" if name not in seen else "[bold yellow]re-planned[/]"
                    console.print(f"[green]{time.strftime('%H:%M:%S')}[/] {name} {verb}: {text}", highlight=False)
                    seen[name] = pid

        deadline = time.monotonic() + 180
        while len(seen) < 3 and time.monotonic() < deadline:
            poll_plans()
            time.sleep(2)
        show(cluster, "Model deployments", "get", "modeldeployments", "-n", NAMESPACE)
        show(cluster, "Serving Deployments", "get", "deployments", "-n", NAMESPACE, "-o", "wide")
        show(cluster, "Pods on GPU nodes", "get", "pods", "-n", NAMESPACE, "-o", "wide")
        show(cluster, "GPU pools", "get", "gpupools")

        endpoints = work / "emulator" / "endpoints.json"
        deadline = time.monotonic() + 120
        while not endpoints.is_file() and time.monotonic() < deadline:
            time.sleep(1)
        import yaml

        slo = yaml.safe_load((ROOT / "manifests" / "samples" / "servingslo-interactive.yaml").read_text())["spec"]
        console.rule(f"[bold]Replaying the Azure conversation trace against {REPLAY_MODEL}[/]: phases {args.phases}")
        replay = Replay(cluster.kubeconfig, endpoints, phases, slo["ttft"]["seconds"], slo["tpot"]["seconds"])
        replay.start()
        stack.append(("replayer", replay.stop))
        while replay.thread.is_alive():
            poll_plans()
            time.sleep(2)
        if replay.result is not None:
            console.print(replay.result.table(f"client-side results for {REPLAY_MODEL} (whole replay)"))
        show(cluster, "Model deployments", "get", "modeldeployments", "-n", NAMESPACE)
        show(cluster, "Events", "get", "events", "-n", NAMESPACE, "--field-selector",
             "involvedObject.kind=ModelDeployment", "--sort-by=.lastTimestamp")
    except KeyboardInterrupt:
        interrupted = True
        console.print("\n[yellow]interrupted: stopping everything[/]")
    finally:
        for name, stop in reversed(stack):
            with contextlib.suppress(Exception):
                stop()
                console.print(f"stopped {name}")
        if args.keep_cluster:
            console.print(f"The cluster keeps running: export KUBECONFIG={cluster.kubeconfig}; make demo-down stops it.")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
