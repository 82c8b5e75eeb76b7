"""``archipelago run``: start the operator (kopf, programmatically, in asyncio).

The lead mounts :func:`run_command` as ``archipelago run``. Flags mirror ``kopf run``:
``--namespace`` (repeatable) or ``--all-namespaces``; ``--peering NAME`` (kopf peering for more
than one replica; needs the peering CRDs from ``manifests/``) or ``--standalone``;
``--liveness URL`` (kopf's liveness endpoint, e.g. ``http://0.0.0.0:8080/healthz``);
``--metrics-port`` (the operator's own Prometheus metrics). Every :class:`OperatorConfig` knob
can also be set by an ``ARCHIPELAGO_*`` environment variable.
"""

from __future__ import annotations

import asyncio

import typer


def run_command(
    namespace: list[str] = typer.Option([], "--namespace", "-n", help="Namespace(s) to serve (repeatable)."),
    all_namespaces: bool = typer.Option(False, "--all-namespaces", "-A", help="Serve every namespace."),
    peering: str = typer.Option("archipelago", "--peering", help="kopf peering name (one active replica at a time)."),
    standalone: bool = typer.Option(False, "--standalone", help="Run without peering (a single replica)."),
    metrics_port: int = typer.Option(9090, "--metrics-port", help="Port of the operator's /metrics (0 = off)."),
    liveness: str = typer.Option("", "--liveness", help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz."),
    prometheus_url: str = typer.Option(None, "--prometheus-url", help="Prometheus with the engines' metrics "
                                       "(env ARCHIPELAGO_PROMETHEUS_URL); empty: workload hints only."),
    timer_interval: float = typer.Option(None, "--timer-interval", help="Reconcile timer period, seconds."),
    cooldown: float = typer.Option(None, "--cooldown", help="Minimum seconds between load-triggered re-plans."),
    plan_time_limit: float = typer.Option(None, "--plan-time-limit", help="CP-SAT time limit per solve, seconds."),
    headroom: float = typer.Option(None, "--capacity-headroom", help="Fraction of each island's modelled SLO "
                                   "capacity kept free (env ARCHIPELAGO_CAPACITY_HEADROOM; default 0.1)."),
    bo: bool = typer.Option(None, "--bo/--no-bo", help="Run the BO outer loop in the background."),
    node_pinning: str = typer.Option(None, "--node-pinning", help="preferred | required | none."),
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING, ERROR."),
) -> None:
    """Start the Archipelago operator: reconcile GPUPools, ServingSLOs and ModelDeployments."""
    import kopf
    from prometheus_client import start_http_server

    from archipelago.controller.handlers import build_registry
    from archipelago.controller.settings import REGISTRY, OperatorConfig, configure_logging, get_logger

    if bool(namespace) == bool(all_namespaces):
        raise typer.BadParameter("give --namespace NAME (repeatable) or --all-namespaces, not both or neither")
    configure_logging(log_level)
    try:
        cfg = OperatorConfig.from_env(
            prometheus_url=prometheus_url, timer_interval_s=timer_interval, cooldown_s=cooldown,
            plan_time_limit_s=plan_time_limit, capacity_headroom=headroom, bo_enabled=bo, node_pinning=node_pinning,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    log = get_logger("archipelago.run")
    if metrics_port:
        start_http_server(metrics_port, registry=REGISTRY)
    registry = build_registry(cfg)
    memo = kopf.Memo(standalone=standalone, peering=None if standalone else peering, namespaces=list(namespace))
    log.info("starting operator", namespaces=namespace or "*", standalone=standalone, peering=peering,
             metrics_port=metrics_port, liveness=liveness or None)
    asyncio.run(kopf.operator(
        registry=registry,
        clusterwide=all_namespaces,
        namespaces=namespace,
        standalone=standalone,
        peering_name=None if standalone else peering,
        liveness_endpoint=liveness or None,
        memo=memo,
    ))


def main() -> None:
    """``python -m archipelago.cli_run ...``: the same command without the top-level CLI."""
    typer.run(run_command)


if __name__ == "__main__":  # pragma: no cover
    main()
