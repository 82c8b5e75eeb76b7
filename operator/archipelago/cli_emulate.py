"""``archipelago emulate``, ``archipelago emulate-fleet`` and ``archipelago replay`` (typer commands).

* ``emulate``: one emulated vLLM / SGLang server; takes the real engine command line, e.g.
  ``archipelago emulate --gpu A100-80GB -- vllm serve meta-llama/Llama-3.1-8B-Instruct
  --tensor-parallel-size 1 --port 8000``. :func:`engine_main` is the same entry point for container
  shims (``vllm`` / ``sglang.launch_server`` replaced by the emulator in ``Dockerfile.emulator``).
* ``emulate-fleet``: one emulated engine per Running operator pod of a cluster (kubeconfig), with
  Prometheus file_sd targets and an endpoint map.
* ``replay``: replay an Azure (or generic) trace through a model's routing ConfigMap.

The lead mounts these in :mod:`archipelago.cli`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import typer

__all__ = ["emulate_command", "emulate_fleet_command", "replay_command", "engine_main", "mount",
           "EMULATE_CONTEXT_SETTINGS"]


def _run_until_signal(coro_factory) -> None:
    """Run ``coro_factory(stop_event)`` until SIGINT/SIGTERM sets the event."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await coro_factory(stop)

    asyncio.run(main())


def engine_main(argv: Sequence[str] | None = None, kind: str | None = None) -> int:
    """Entry point for container shims: emulate the engine whose command line is ``argv``.

    Args:
        argv: the engine's arguments (default ``sys.argv[1:]``), e.g. ``["serve", MODEL, "--port", "8000"]``.
        kind: ``vllm`` or ``sglang`` when the shim knows it.

    Returns:
        process exit code: 0 after SIGTERM/SIGINT, 2 on a configuration error (message on stderr).
    """
    from archipelago.emulate.engine import EmulatorConfigError, parse_engine_argv, serve

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        spec = parse_engine_argv(args, kind=kind)
    except EmulatorConfigError as exc:
        print(f"archipelago emulator: {exc}", file=sys.stderr)
        return 2
    _run_until_signal(lambda stop: serve(spec, stop))
    return 0


def emulate_command(
    ctx: typer.Context,
    gpu: str = typer.Option("", "--gpu", help="GPU type: catalogue key (H100-SXM) or nvidia.com/gpu.product value. "
                            "Default: $ARCHIPELAGO_GPU / $ARCHIPELAGO_GPU_PRODUCT."),
    engine: str = typer.Option("", "--engine", help="vllm or sglang (default: from the command line)."),
    speedup: float = typer.Option(0.0, "--speedup", help="Emulated seconds per wall second (default 1 or "
                                  "$ARCHIPELAGO_SPEEDUP)."),
) -> None:
    """Impersonate a vLLM or SGLang server for one pod (OpenAI API, /health, real /metrics).

    Pass the real engine command line after ``--``: ``vllm serve MODEL --tensor-parallel-size N
    --max-num-seqs N --port 8000 ...`` or ``python3 -m sglang.launch_server --model-path M --tp-size N
    --port 30000 ...``. Unknown flags are ignored.
    """
    from archipelago.emulate.engine import EmulatorConfigError, parse_engine_argv, serve

    try:
        spec = parse_engine_argv(list(ctx.args), gpu=gpu or None, kind=engine or None,
                                 speedup=speedup if speedup > 0 else None)
    except EmulatorConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    _run_until_signal(lambda stop: serve(spec, stop))


#: typer/click settings ``emulate`` needs so the engine's own flags pass through to ``ctx.args``.
EMULATE_CONTEXT_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def mount(app: typer.Typer) -> None:
    """Register ``emulate``, ``emulate-fleet`` and ``replay`` on ``app`` (the ``archipelago`` CLI)."""
    app.command("emulate", context_settings=EMULATE_CONTEXT_SETTINGS,
                help="Impersonate a vLLM / SGLang server for one pod (OpenAI API, /health, real /metrics).")(
        emulate_command)
    app.command("emulate-fleet", help="One emulated engine per Running operator pod; Prometheus file_sd targets.")(
        emulate_fleet_command)
    app.command("replay", help="Replay a real trace through the routing ConfigMap; report TTFT/TPOT/attainment.")(
        replay_command)


def _core_api(kubeconfig: str | None):
    from kubernetes import client, config

    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig)
    else:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
    return client.CoreV1Api()


def emulate_fleet_command(
    run_dir: Path = typer.Option(..., "--run-dir", help="Cluster run directory; targets go to "
                                 "<run-dir>/prometheus/targets, the endpoint map to <run-dir>/emulator/endpoints.json."),
    kubeconfig: str = typer.Option("", "--kubeconfig", help="Kubeconfig (default: <run-dir>/kubeconfig if present, "
                                   "else in-cluster / ~/.kube/config)."),
    namespace: str = typer.Option("", "--namespace", "-n", help="Only this namespace (default: all)."),
    speedup: float = typer.Option(1.0, "--speedup", help="Emulated seconds per wall second for every engine."),
    poll: float = typer.Option(2.0, "--poll", help="Seconds between pod polls."),
    admin_port: int = typer.Option(-1, "--admin-port", help="Serve GET /endpoints on this port (0: any, -1: off)."),
    slowdown: list[str] = typer.Option([], "--slowdown", help="GPU=FACTOR (repeatable): engines on that GPU type "
                                       "(catalogue name, e.g. H100-SXM) run FACTOR times slower than the performance "
                                       "model -- fault injection for the operator's SLO feedback."),
) -> None:
    """Run one emulated engine per Running operator pod (KWOK fleets have no processes)."""
    from archipelago.emulate.fleet import FleetEmulator

    slow: dict[str, float] = {}
    for item in slowdown:
        gpu, sep, factor = item.partition("=")
        try:
            slow[gpu.strip()] = float(factor)
            if not sep or not gpu.strip() or slow[gpu.strip()] <= 0:
                raise ValueError
        except ValueError:
            raise typer.BadParameter(f"{item!r}: use GPU=FACTOR with a factor > 0, e.g. H100-SXM=1.8",
                                     param_hint="--slowdown") from None

    kc = kubeconfig or (str(run_dir / "kubeconfig") if (run_dir / "kubeconfig").is_file() else None)
    api = _core_api(kc)
    fe = FleetEmulator(api, run_dir / "prometheus" / "targets", endpoints_file=run_dir / "emulator" / "endpoints.json",
                       namespace=namespace or None, speedup=speedup, poll_s=poll,
                       admin_port=None if admin_port < 0 else admin_port, log=lambda s: typer.echo(s),
                       slowdown=slow)
    _run_until_signal(fe.run)


def replay_command(
    trace: Path = typer.Option(..., "--trace", help="Azure LLM inference CSV or generic CSV/JSONL trace."),
    model: str = typer.Option(..., "--model", help="ModelDeployment name; its routing ConfigMap is <model>-routing."),
    namespace: str = typer.Option("default", "--namespace", "-n", help="Namespace of the ModelDeployment."),
    routes: Path = typer.Option(None, "--routes", help="Read routes.json from this file instead of the ConfigMap."),
    endpoints: str = typer.Option("", "--endpoints", help="Fleet emulator endpoint map: a JSON file or an http:// URL. "
                                  "Empty: use Service DNS names (real cluster)."),
    kubeconfig: str = typer.Option("", "--kubeconfig", help="Kubeconfig for reading the ConfigMap."),
    start: float = typer.Option(0.0, "--start", help="Trace window start, seconds from the first request."),
    duration: float = typer.Option(120.0, "--duration", help="Trace window length, seconds (of the original trace)."),
    rate_scale: float = typer.Option(1.0, "--rate-scale", help="Multiply the arrival rate (compresses time)."),
    speedup: float = typer.Option(1.0, "--speedup", help="Replay faster; latencies are scaled back (use with "
                                  "engines emulated at the same --speedup)."),
    ttft: float = typer.Option(2.0, "--ttft-slo", help="TTFT target, seconds."),
    tpot: float = typer.Option(0.1, "--tpot-slo", help="TPOT (inter-token latency) target, seconds."),
    seed: int = typer.Option(0, "--seed"),
    window: float = typer.Option(10.0, "--window", help="Progress line every this many seconds."),
    json_out: Path = typer.Option(None, "--json", help="Write the summary and per-window stats as JSON here."),
    served_model: str = typer.Option("", "--served-model", help="'model' field to send (default: omitted)."),
    prompt_mode: str = typer.Option("field", "--prompt-mode", help="field (emulator extension) or ids (token ids)."),
) -> None:
    """Replay a real trace through the routing ConfigMap to the island endpoints; report TTFT/TPOT/attainment."""
    from rich.console import Console

    from archipelago.decide.sim import SLOTarget
    from archipelago.decide.traces import TraceError, load_trace
    from archipelago.emulate.replay import (
        DirectEndpoints,
        FileEndpoints,
        HttpEndpoints,
        Replayer,
        ReplayError,
        RoutingTable,
        routing_from_configmap,
    )

    console = Console()
    try:
        tr = load_trace(trace).window(start, start + duration)
        if rate_scale != 1.0:
            tr = tr.scale_rate(rate_scale)
    except TraceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if routes is not None:
        text = routes.read_text()

        def routing():
            return RoutingTable.parse(text, str(routes))
    else:
        api = _core_api(kubeconfig or None)
        cm = f"{model}-routing"

        def routing():
            return routing_from_configmap(api, namespace, cm)
    if not endpoints:
        ep = DirectEndpoints()
    elif endpoints.startswith(("http://", "https://")):
        ep = HttpEndpoints(endpoints)
    else:
        ep = FileEndpoints(endpoints)

    def progress(w) -> None:
        s = w.summary
        att = "-" if s["attainment"] is None else f"{100 * s['attainment']:5.1f}%"
        t99 = s["ttft_s"]["p99"]
        p99 = s["tpot_s"]["p99"]
        console.print(
            f"[{w.end_s:7.1f}s] sent {w.sent:4d} done {s['requests']:4d} in-flight {w.in_flight:4d} "
            f"attainment {att} TTFT p99 {('-' if t99 is None else f'{t99:.2f}s')} "
            f"TPOT p99 {('-' if p99 is None else f'{1000 * p99:.0f}ms')} errors {s['errors'] or 0} "
            f"islands {s['by_island']}"
        )

    try:
        rp = Replayer(tr, routing, ep, slo=SLOTarget(ttft_s=ttft, tpot_s=tpot), speedup=speedup, seed=seed,
                      window_s=window, on_window=progress, model=served_model or None, prompt_mode=prompt_mode)
    except ReplayError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    console.print(f"replaying {len(tr)} requests of {tr.source} ({tr.rate_rps:.2f} req/s over {tr.duration_s:.0f} s)")
    result_box = {}

    async def go(stop):
        result_box["r"] = await rp.run(stop)

    _run_until_signal(go)
    res = result_box["r"]
    console.print(res.table(f"replay of {tr.source}"))
    if json_out is not None:
        json_out.write_text(json.dumps(res.to_json(), indent=1))
        console.print(f"wrote {json_out}")


def _standalone_app() -> typer.Typer:
    """A Typer app with only these commands (``python -m archipelago.cli_emulate ...``), for subprocesses
    started before the top-level CLI mounts them."""
    app = typer.Typer(add_completion=False, no_args_is_help=True)
    mount(app)
    return app


if __name__ == "__main__":  # pragma: no cover
    _standalone_app()()
