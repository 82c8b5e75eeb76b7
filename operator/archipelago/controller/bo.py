"""The slow loop for the operator: BoTorch outer loop over the planner's knobs, scored on a trace.

:func:`bo_plan` has the fast planner's call shape ``(fleet, models, current, config, previous)`` so
:class:`~archipelago.controller.planning.PlanningService` can run it in its background thread. It

1. turns each model's :class:`Workload` into a synthetic request trace (:func:`workload_trace`):
   Poisson arrivals at the measured / hinted rate; prompt lengths drawn per input-length bucket
   (:func:`archipelago.decide.planner.workload_buckets`, i.e. the Prometheus histogram or a
   log-normal fitted to the hint) uniformly within the bucket; output lengths geometric with the
   bucket's mean (an assumption: Prometheus gives marginal output lengths only);
2. runs ``archipelago.decide.planner.outer.run_outer_loop`` with ``make_evaluator`` (inner loop
   with the candidate knobs, scored by the discrete-event simulator), within a wall-clock budget;
3. re-plans with the chosen knobs *with* pod packing (the evaluator skips packing) and returns that
   plan with the Pareto front attached. The service adopts it only when cheaper by its margin.

The trace is synthetic: it carries the workload's rate and length distribution but not its
burstiness; measured traces would be better where they exist.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from archipelago.decide.planner import plan as fast_plan
from archipelago.decide.planner import workload_buckets
from archipelago.decide.planner.types import (
    CurrentPlacement,
    FleetSnapshot,
    ModelRequest,
    Plan,
    PlannerConfig,
    Workload,
)


def workload_trace(w: Workload, duration_s: float = 120.0, seed: int = 0, max_requests: int = 20_000) -> Any:
    """A synthetic :class:`archipelago.decide.traces.Trace` with ``w``'s rate and length distribution.

    Args:
        w: the workload (rate in requests/s, input histogram or mean/p90, output mean).
        duration_s: trace span, seconds (shortened so that at most ``max_requests`` arrive).
        seed: numpy seed; equal seeds give equal traces.

    Raises:
        ValueError: a workload with a zero request rate (nothing to simulate).
    """
    from archipelago.decide.traces import poisson_trace

    if w.rate_rps <= 0:
        raise ValueError("workload.rate_rps is 0: there is no load to simulate")
    duration = min(duration_s, max_requests / w.rate_rps)
    buckets = workload_buckets(w)
    probs = np.array([b.fraction for b in buckets], dtype=float)
    probs = probs / probs.sum()
    rng_b = np.random.default_rng(seed + 7919)
    chosen: dict[str, np.ndarray] = {}

    def inputs(rng: np.random.Generator, n: int) -> np.ndarray:
        idx = rng_b.choice(len(buckets), size=n, p=probs)
        chosen["idx"] = idx
        lo = np.array([max(1.0, b.lo) for b in buckets])[idx]
        hi = np.array([b.hi if math.isfinite(b.hi) else 2 * max(b.lo, 1.0) for b in buckets])[idx]
        return np.maximum(1, np.floor(lo + rng.random(n) * np.maximum(hi - lo, 1.0)))

    def outputs(rng: np.random.Generator, n: int) -> np.ndarray:
        idx = chosen.get("idx")
        if idx is None or len(idx) != n:
            idx = rng_b.choice(len(buckets), size=n, p=probs)
        mean = np.array([max(1.0, b.mean_out) for b in buckets])[idx]
        return rng.geometric(1.0 / mean)

    return poisson_trace(w.rate_rps, duration, input_tokens=inputs, output_tokens=outputs, seed=seed)


def bo_plan(fleet: FleetSnapshot, models: list[ModelRequest], current: CurrentPlacement | None,
            config: PlannerConfig, previous: Plan | None, *, max_evals: int = 12, max_wall_s: float = 300.0,
            seed: int = 0, trace_s: float = 120.0) -> Plan:
    """Outer-loop plan for ``models`` on ``fleet`` (see module doc).

    Returns:
        The packed plan for the chosen knobs, with ``pareto`` (the front) and ``params`` set.

    Raises:
        RuntimeError: the outer loop chose nothing (no candidate met the attainment target).
    """
    from archipelago.decide.planner.outer import config_from_params, make_evaluator, run_outer_loop, space_for

    served = [m for m in models if m.workload.rate_rps > 0]
    traces = {m.key: workload_trace(m.workload, trace_s, seed) for m in served}
    evaluate = make_evaluator(fleet, served, traces, config, seed=seed)
    prefs = [m.preference for m in served] or ["cost"]
    preference = max(set(prefs), key=prefs.count)
    target = min((float(getattr(m.slo, "attainment", 0.99)) for m in served), default=0.99)
    res = run_outer_loop(evaluate, max_evals=max_evals, max_wall_s=max_wall_s, seed=seed, preference=preference,
                         target=target, space=space_for(served))
    if res.chosen is None:
        raise RuntimeError(f"BO outer loop chose no candidate in {res.evaluations} evaluations "
                           f"({res.wall_s:.0f} s): none met the attainment target {target}")
    cfg = config_from_params(config, res.chosen.params)
    out = fast_plan(fleet, list(models), current, cfg, previous=previous)
    return replace(out, pareto=tuple(res.pareto), params=dict(res.chosen.params))
