"""Operator configuration, kopf settings, structured logs and the operator's own Prometheus metrics.

* :class:`OperatorConfig` -- every knob of the controller, from the ``archipelago run`` command line
  or ``ARCHIPELAGO_*`` environment variables (:meth:`OperatorConfig.from_env`).
* :func:`configure_kopf` -- kopf's state lives under ``archipelago.dev``: finalizer
  ``archipelago.dev/finalizer``, progress and diff-base annotations ``archipelago.dev/*``, peering
  name ``archipelago``; sync handlers run in a bounded thread pool (never on the event loop).
* :func:`configure_logging` -- structlog JSON lines on stderr (also used for kopf's stdlib logs).
* ``PLANS_TOTAL``, ``SOLVE_SECONDS``, ``RECONCILE_ERRORS``, ``PLAN_CHANGES``, ... --
  ``prometheus_client`` metrics served by ``archipelago run --metrics-port``.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, fields
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

DOMAIN = "archipelago.dev"
FINALIZER = f"{DOMAIN}/finalizer"
PEERING_NAME = "archipelago"
ANN_LAST_APPLIED_HASH = f"{DOMAIN}/spec-hash"
#: hash of a Deployment's spec without replicas and preferred node affinity (what needs new pods when it changes)
ANN_TEMPLATE_HASH = f"{DOMAIN}/template-hash"
#: unix time at which the routing ConfigMap last switched to new routes (drain before removals)
ANN_ROUTES_SWITCHED_AT = f"{DOMAIN}/routes-switched-at"

# ------------------------------------------------------------------------------------------------
# Metrics (own registry so tests and multiple operators in one process do not collide)
# ------------------------------------------------------------------------------------------------
REGISTRY = CollectorRegistry(auto_describe=True)
PLANS_TOTAL = Counter(
    "archipelago_plans_total", "Planner runs, by trigger (spec, nodes, load, bo) and result (feasible, infeasible, error).",
    ["trigger", "result"], registry=REGISTRY,
)
SOLVE_SECONDS = Histogram(
    "archipelago_solve_seconds", "Wall time of one planner run (fast inner loop or BO outer loop), seconds.",
    ["loop"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900), registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "archipelago_reconcile_errors_total", "Reconcile errors, by resource kind and reason.",
    ["kind", "reason"], registry=REGISTRY,
)
PLAN_CHANGES = Counter(
    "archipelago_plan_changes_total", "Times a model's plan (islands or placement) changed.",
    ["namespace", "model"], registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "archipelago_reconcile_seconds", "Wall time of one ModelDeployment reconcile, seconds.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=REGISTRY,
)
APPLIED_OBJECTS = Counter(
    "archipelago_applied_objects_total", "Objects written by server-side apply, by kind.", ["kind"], registry=REGISTRY,
)
PLAN_COST = Gauge(
    "archipelago_plan_dollars_per_hour", "Predicted cost of a model's running plan, $/h.",
    ["namespace", "model"], registry=REGISTRY,
)
PROMETHEUS_UP = Gauge(
    "archipelago_prometheus_up", "1 when the last workload query reached Prometheus, else 0.", registry=REGISTRY,
)


def _env_bool(v: str) -> bool:
    return v.strip().lower() in ("1", "true", "yes", "on")


@dataclass
class OperatorConfig:
    """Knobs of the controller. Units in the names: seconds (``_s``), fractions, $/h.

    Attributes:
        prometheus_url: Prometheus base URL for workload metrics; empty disables metrics (hints only).
        metrics_window_s: rate/increase window of the workload queries, seconds.
        metrics_shape_window_s: window of the workload's shape (mean lengths, length histograms, output
            means per prompt range), seconds; the larger of this and ``metrics_window_s`` is used (a
            stationary mix is estimated better over a longer window than the rate needs).
        latency_quantile: quantile of the observed TTFT / inter-token latency (0.99 = p99).
        metrics_interval_s: how often a model's workload is re-queried, seconds.
        timer_interval_s: period of the level-based reconcile timer of every ModelDeployment and GPUPool.
        cooldown_s: minimum time between load-triggered re-plans (spec and node changes bypass it).
        load_hysteresis: relative change of a model's request rate that triggers a load re-plan (0.2 = 20 %).
        plan_time_limit_s: CP-SAT wall-clock limit of the fast inner loop per solve, seconds.
        capacity_headroom: fraction of each island's modelled SLO capacity the plan keeps free (0.1 =
            islands are planned at up to 90 % of it; ``PlannerConfig.headroom``). The capacity is the
            rate at which the SLO percentile sits exactly at its target, so a plan at 100 % of it meets
            the SLO only if the model and the measured workload are exact; in the loop e2e a plan with
            every island at 99-100 % held the per-request TPOT p90 at 0.101-0.103 s against 0.1 s.
            Like a Horizontal Pod Autoscaler's target utilisation below 100 %. 0 plans at capacity.
        capacity_model: per-replica capacity the fast loop plans with: ``simulated`` (calibrated by
            bisection in the discrete-event simulator, cached across plans; the analytic queueing
            approximation alone over-promises 2-5x on bursty traffic, see docs/planner.md) or
            ``analytic`` (faster, optimistic).
        bo_enabled: run the BoTorch outer loop in the background after a fast plan.
        bo_margin: adopt the BO plan when it is cheaper by at least this fraction (0.05 = 5 %).
        bo_time_budget_s: wall-clock budget of one BO run, seconds.
        node_pinning: ``preferred`` (pods prefer the nodes the packing chose, may use the rest of the
            pool) or ``required`` (pods may only run there) or ``none``.
        resync_s: re-apply every emitted object at least this often (repairs manual edits), seconds.
        rollout_timeout_s: after this long a blocked rollout (new islands not available) is reported
            as Degraded/RolloutBlocked, seconds.
        drain_s: after the routing ConfigMap switches to new islands, old islands (and replicas a
            shrinking island gives up) keep running this long so that routers pick up the new routes
            and requests in flight finish, seconds.
        backlog_drain_s: requests queued in the engines are planned for as extra load spread over this
            many seconds (``rate + waiting / backlog_drain_s``), so a fleet that fell behind gets the
            capacity to catch up; 0 plans for the arrival rate alone.
        scale_down_window_s: the request rate a model is planned for is the highest rate observed over
            this window (scale-up follows a rise at once, scale-down waits until the rate stayed low
            for the whole window; the Kubernetes HPA's ``scaleDown.stabilizationWindowSeconds``,
            default 300 s there too); 0 plans for the latest rate.
        load_up_z: a rise of a model's request rate triggers ``load-up`` only when it is also this many
            standard deviations of Poisson counting noise over the metrics window (3 = 3 sigma).
        slo_breach_tolerance: an island *breaches* its SLO when its measured TTFT or inter-token
            latency at the SLO's percentile exceeds the target by more than this fraction (0.05 = 5 %);
            a breach the plan did not predict lowers that island's modelled capacity and re-plans
            (trigger ``slo``, see ``archipelago.controller.planning``).
        capacity_correction_ttl_s: how long such a capacity correction is applied to later plans,
            seconds (0 = until the model's spec changes).
        max_workers: kopf's thread pool size for sync handlers.
        metrics_label: Prometheus label holding the ModelDeployment name on engine series
            (the scrape config's relabelling of the pod label ``archipelago.dev/model``).
        metrics_namespace_label: Prometheus label holding the namespace.
        metrics_island_label: Prometheus label holding the island (relabelled pod label
            ``archipelago.dev/island``); per-island series give the mean output length per prompt
            range (engines export the two length histograms separately). Empty disables it.
    """

    prometheus_url: str = ""
    metrics_window_s: float = 300.0
    metrics_shape_window_s: float = 600.0
    latency_quantile: float = 0.99
    metrics_interval_s: float = 30.0
    timer_interval_s: float = 5.0
    cooldown_s: float = 120.0
    load_hysteresis: float = 0.2
    plan_time_limit_s: float = 10.0
    capacity_headroom: float = 0.1
    capacity_model: str = "simulated"
    bo_enabled: bool = False
    bo_margin: float = 0.05
    bo_time_budget_s: float = 300.0
    node_pinning: str = "preferred"
    resync_s: float = 600.0
    rollout_timeout_s: float = 300.0
    drain_s: float = 30.0
    backlog_drain_s: float = 60.0
    scale_down_window_s: float = 300.0
    load_up_z: float = 3.0
    slo_breach_tolerance: float = 0.05
    capacity_correction_ttl_s: float = 1800.0
    max_workers: int = 4
    metrics_label: str = "archipelago_dev_model"
    metrics_namespace_label: str = "namespace"
    metrics_island_label: str = "archipelago_dev_island"

    def __post_init__(self) -> None:
        if self.capacity_model not in ("simulated", "analytic"):
            raise ValueError(f"capacity_model: {self.capacity_model!r}; use simulated or analytic")
        if self.node_pinning not in ("preferred", "required", "none"):
            raise ValueError(f"node_pinning: {self.node_pinning!r}; use preferred, required or none")
        for name in ("metrics_window_s", "metrics_interval_s", "timer_interval_s", "plan_time_limit_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if not 0 < self.latency_quantile < 1:
            raise ValueError(f"latency_quantile: {self.latency_quantile} must be in (0, 1)")
        if self.load_hysteresis < 0 or self.bo_margin < 0 or self.cooldown_s < 0:
            raise ValueError("load_hysteresis, bo_margin and cooldown_s must be >= 0")
        if self.drain_s < 0 or self.scale_down_window_s < 0 or self.backlog_drain_s < 0:
            raise ValueError("drain_s, scale_down_window_s and backlog_drain_s must be >= 0 seconds")
        if not 0 <= self.capacity_headroom < 0.9:
            raise ValueError(f"capacity_headroom: {self.capacity_headroom} must be in [0, 0.9) "
                             "(fraction of modelled capacity kept free, e.g. 0.1)")
        if self.slo_breach_tolerance < 0 or self.capacity_correction_ttl_s < 0 or self.load_up_z < 0:
            raise ValueError("slo_breach_tolerance, capacity_correction_ttl_s and load_up_z must be >= 0")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> OperatorConfig:
        """Read ``ARCHIPELAGO_<FIELD_IN_UPPER_CASE>`` variables (e.g. ``ARCHIPELAGO_PROMETHEUS_URL``),
        then apply ``overrides`` (non-None values only).

        Raises:
            ValueError: a variable that does not parse, naming it.
        """
        env = dict(os.environ if env is None else env)
        kw: dict[str, Any] = {}
        for f in fields(cls):
            var = f"ARCHIPELAGO_{f.name.upper()}"
            if var not in env:
                continue
            raw = env[var]
            try:
                if f.type in ("bool", bool):
                    kw[f.name] = _env_bool(raw)
                elif f.type in ("int", int):
                    kw[f.name] = int(raw)
                elif f.type in ("float", float):
                    kw[f.name] = float(raw)
                else:
                    kw[f.name] = raw
            except ValueError:
                raise ValueError(f"{var}={raw!r} does not parse as {f.type}") from None
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


def configure_logging(level: str = "INFO") -> None:
    """structlog JSON lines to stderr; stdlib logging (kopf, kubernetes) goes through the same renderer."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    for noisy in ("urllib3", "kubernetes.client.rest", "asyncio", "kopf.objects"):
        # kopf.objects logs every successful timer/handler run at INFO: only warnings unless DEBUG
        logging.getLogger(noisy).setLevel(lvl if lvl <= logging.DEBUG else max(lvl, logging.WARNING))


def get_logger(name: str = "archipelago") -> Any:
    """A structlog logger bound to ``name``."""
    return structlog.get_logger(name)


def configure_kopf(settings: Any, cfg: OperatorConfig, *, standalone: bool = False, peering: str | None = None) -> None:
    """Apply Archipelago's kopf settings to ``settings`` (a ``kopf.OperatorSettings``).

    Finalizer, progress storage and diff-base under ``archipelago.dev``; sync handlers in a thread
    pool of ``cfg.max_workers``; Events posted at INFO and above; peering ``archipelago`` unless
    ``standalone`` (one replica) -- with more than one replica only the peer with the highest
    priority handles objects.
    """
    import kopf  # imported here so the pure parts of this module import without kopf

    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=DOMAIN)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=DOMAIN, key="last-handled-configuration"
    )
    settings.execution.max_workers = cfg.max_workers
    # kopf turns its per-object log lines into Events from this level on; keep Events for what an admin
    # can act on (handler failures) -- the operator posts its own Events explicitly (kopf.event)
    settings.posting.level = logging.WARNING
    settings.posting.enabled = True
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 30
    settings.peering.name = peering or PEERING_NAME
    settings.peering.standalone = standalone
    settings.peering.mandatory = not standalone
