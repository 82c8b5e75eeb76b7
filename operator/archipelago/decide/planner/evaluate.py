"""Score a :class:`~archipelago.decide.planner.types.Plan` in the trace-driven simulator
(``archipelago.decide.sim``): every island becomes ``replicas`` x ``ReplicaSpec`` and the plan's
routing table a ``LengthRangeRouter``; each model is simulated on its own trace against its SLO.
Every method (planner, outer loop, baselines) is scored by this one function.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .islands import default_limits, default_perf_factory
from .types import FleetSnapshot, ModelRequest, Plan


@dataclass
class PlanScore:
    """Simulated outcome of a plan.

    ``cost_per_hour`` ($/h of the planned replicas); ``attainment`` the minimum over models of
    the fraction of requests meeting TTFT and TPOT (0 for a model without islands);
    ``power_w`` fleet average power (W) over the simulated horizon; ``per_model[key]`` the
    simulator's ``summary()`` plus ``slo_met``; ``slo_met`` all models meet their SLO
    (percentiles and attainment); ``simulations`` the whole-plan simulations spent to produce
    and score the plan (1 for a plain score; verify-and-repair rounds + 1 for repaired plans)."""

    cost_per_hour: float
    attainment: float
    power_w: float
    slo_met: bool
    per_model: dict[str, dict[str, Any]] = field(default_factory=dict)
    simulations: int = 1

    def p99(self, key: str, metric: str) -> float:
        """p99 of ``metric`` (``ttft`` or ``tpot``) for model ``key`` in seconds (NaN if absent)."""
        v = self.per_model.get(key, {}).get(f"{metric}_p99_s")
        return math.nan if v is None else float(v)


def island_limits(req: ModelRequest, engine: Any) -> Any:
    """The request's ``EngineLimits`` with an island's engine settings applied."""
    base = req.limits if req.limits is not None else default_limits()
    return dataclasses.replace(base, max_num_seqs=engine.max_num_seqs,
                               gpu_memory_utilization=engine.gpu_memory_utilization,
                               max_model_len=engine.max_model_len,
                               max_num_batched_tokens=engine.max_num_batched_tokens)


def score_plan(plan: Plan, requests: list[ModelRequest], traces: dict[str, Any], fleet: FleetSnapshot, *,
               gpu_catalog: Any = None, perf_factory: Callable[..., Any] | None = None,
               seed: int = 0) -> PlanScore:
    """Simulate ``plan`` for every model with a trace in ``traces`` (``{model_key: Trace}``).

    Raises:
        KeyError: a model without a trace.
    """
    from archipelago.decide import sim

    if gpu_catalog is None:
        from archipelago.decide.catalog import load_gpu_catalog

        gpu_catalog = load_gpu_catalog()
    factory = perf_factory or default_perf_factory()
    per_model: dict[str, dict[str, Any]] = {}
    att_min, energy_w, ok = 1.0, 0.0, True
    for req in requests:
        trace = traces[req.key]
        mp = plan.model(req.key)
        slo = sim.SLOTarget(ttft_s=req.slo.ttft_s, tpot_s=req.slo.tpot_s,
                            e2e_s=getattr(req.slo, "e2e_s", None),
                            ttft_percentile=req.slo.ttft_percentile, tpot_percentile=req.slo.tpot_percentile,
                            attainment=req.slo.attainment)
        if mp is None or not mp.islands:
            per_model[req.key] = {"attainment": 0.0, "slo_met": False, "replicas": 0}
            att_min, ok = 0.0, False
            continue
        reps = []
        for isl in mp.islands:
            gpu = gpu_catalog.get(fleet.pool(isl.pool).gpu)
            lim = island_limits(req, isl.engine)
            perf = factory(req.model, gpu, isl.tp, lim)
            spec = sim.ReplicaSpec(island=isl.id, perf=perf, price_per_hour=isl.cost_per_hour / isl.replicas,
                                   limits=lim)
            reps += [spec] * isl.replicas
        ranges = [(lo, hi, w) for lo, hi, w in mp.routing]
        if ranges:
            ranges[-1] = (ranges[-1][0], math.inf, ranges[-1][2])
        router = sim.LengthRangeRouter(ranges) if ranges else sim.LeastLoaded()
        res = sim.simulate(trace, reps, router, slo, seed=seed, record_timeseries=False)
        s = res.summary()
        per_model[req.key] = s
        att = float(res.attainment) if not math.isnan(res.attainment) else 0.0
        att_min = min(att_min, att)
        ok &= bool(res.slo_met)
        if res.horizon_s > 0:
            energy_w += res.energy_j / res.horizon_s
    return PlanScore(plan.cost_per_hour, att_min, energy_w, ok, per_model)


def attach_score(plan: Plan, score: PlanScore) -> Plan:
    """Copy of ``plan`` with each model's simulated attainment filled in."""
    models = tuple(dataclasses.replace(m, attainment=score.per_model.get(m.model, {}).get("attainment"))
                   for m in plan.models)
    return dataclasses.replace(plan, models=models)
