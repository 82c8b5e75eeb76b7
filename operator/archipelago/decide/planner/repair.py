"""Verify-and-repair: score a plan in the trace-driven simulator and correct per-model headroom.

The inner loop sizes islands from per-replica capacities (analytic or simulator-calibrated for
one replica on stationary arrivals). What no per-replica number captures -- non-stationary load
(the Azure code trace's rate varies x3-7 between minutes), the pooling gain of least-loaded
routing over an island's replicas (M/G/c), the interaction of buckets sharing an island -- is
judged by simulating the whole plan on the workload (the trace when given, else a synthetic
trace built from the workload histograms, :func:`synthetic_trace`).

Algorithm (:func:`verify_and_repair`), per model ``m`` a capacity scale ``s_m`` (multiplies all
of the model's per-replica capacities; ``1 - s_m`` is its headroom), starting at 1:

1. plan with the current scales (CP-SAT), simulate every model on its trace;
2. a model *passes* when its simulated attainment >= SLO attainment + ``verify_margin`` and the
   simulator reports its TTFT/TPOT percentiles within target (``SimResult.slo_met``);
3. per model, keep the largest passing scale ``P_m`` and the smallest failing scale ``F_m``;
   next scale: ``sqrt(P_m F_m)`` when both are known (bisection); after a failure only,
   ``s * clamp(sqrt((1 - a*) / (1 - a)), 0.5, 0.92)`` with ``a`` the simulated attainment and
   ``a*`` the target (a bigger shortfall, a bigger step); after a pass only (``verify_trim``),
   ``s * clamp(sqrt((1 - a*) / max(1 - a, 1e-3)), 1.08, 1.4)`` -- the model is over-provisioned,
   give capacity back;
4. stop when every model has converged (``F_m / P_m <= 1.08``, or it passes and trimming is
   off) or after ``verify_max_iters`` rounds. The final plan uses every model's ``P_m`` (one
   more round if that combination was not simulated yet); the cheapest plan in which all
   models passed is returned. If none passed, the plan with the highest minimum attainment is
   returned with an ``slo-attainment`` :class:`~.types.Infeasibility` per failing model.

Models are simulated independently (each on its own trace, as the gateway routes per model), so
the per-model searches do not interfere except through shared pool GPUs. Bounded: at most
``verify_max_iters`` (+1) plans and simulations. Deterministic: CP-SAT seeds and deterministic
time limits, simulator seed, fixed synthetic-trace seed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .capacity import workload_buckets
from .types import FleetSnapshot, Infeasibility, ModelRequest, Plan, PlannerConfig, Workload


def synthetic_trace(w: Workload, n: int, seed: int = 0, max_model_len: float | None = None) -> Any:
    """A ``Trace`` of ``n`` requests drawn from workload ``w``: Gamma-renewal arrivals at
    ``w.rate_rps`` with CV ``w.arrival_cv`` (Poisson if None), prompts per input bucket in
    proportion to its count (:func:`.calibrate.bucket_sample` within the bucket) and outputs
    from the output-length distribution scaled to the bucket's mean output. Deterministic in
    ``seed``.

    Raises:
        PlannerInputError: the workload has no counts; ValueError for ``n < 2`` or rate 0."""
    from archipelago.decide.traces import Trace

    from .calibrate import bucket_sample, output_shape

    if n < 2 or w.rate_rps <= 0:
        raise ValueError(f"synthetic_trace: need n >= 2 and a positive rate (n={n}, rate={w.rate_rps})")
    rng = np.random.Generator(np.random.PCG64(seed))
    cv = w.arrival_cv or 1.0
    if abs(cv - 1.0) < 1e-9:
        gaps = rng.exponential(1.0 / w.rate_rps, n)
    else:
        k = 1.0 / (cv * cv)
        gaps = rng.gamma(k, 1.0 / (k * w.rate_rps), n)
    arrival = np.cumsum(gaps) - gaps[0]
    shape = output_shape(w)
    buckets = workload_buckets(w, max_model_len=max_model_len)
    counts = rng.multinomial(n, [b.fraction for b in buckets])
    ins, outs = [], []
    for i, (b, c) in enumerate(zip(buckets, counts, strict=True)):
        if c:
            _, inp, out = bucket_sample(b, shape, 1.0, int(c), seed + 1 + i)
            ins.append(inp)
            outs.append(out)
    inp = np.concatenate(ins)
    out = np.concatenate(outs)
    perm = rng.permutation(n)
    return Trace(arrival_s=arrival, input_tokens=inp[perm], output_tokens=out[perm],
                 source=f"synthetic(workload, n={n}, seed={seed})", span_s=float(arrival[-1]))


def traces_for(requests: list[ModelRequest], config: PlannerConfig, traces: dict[str, Any] | None) -> dict[str, Any]:
    """``{model_key: Trace}``: the given trace of each model, else :func:`synthetic_trace` of its
    workload (``config.verify_requests`` requests, seed ``config.seed``)."""
    out = dict(traces or {})
    for r in requests:
        if r.key not in out:
            mml = getattr(r.limits, "max_model_len", None) if r.limits is not None else None
            out[r.key] = synthetic_trace(r.workload, config.verify_requests, seed=config.seed, max_model_len=mml)
    return out


@dataclasses.dataclass
class RepairRound:
    """One verify round: the per-model ``scales`` used, the plan's $/h, per-model simulated
    ``attainment`` and ``passed``."""

    scales: dict[str, float]
    cost_per_hour: float
    attainment: dict[str, float]
    passed: dict[str, bool]


def verify_and_repair(run: Callable[[PlannerConfig], Plan], requests: list[ModelRequest], fleet: FleetSnapshot,
                      config: PlannerConfig, *, traces: dict[str, Any] | None = None, gpu_catalog: Any = None,
                      perf_factory: Callable[..., Any] | None = None,
                      progress: Callable[[int, RepairRound], None] | None = None
                      ) -> tuple[Plan, PlannerConfig, list[RepairRound]]:
    """Run ``run(config)`` (any planner or baseline: the inner loop, Mélange-style, greedy ...)
    with per-model capacity scales repaired against the simulator; see the module docstring.

    Args:
        run: ``config -> Plan``; must honour ``config.model_capacity_scale``.
        requests, fleet: as for :func:`~.planner.plan`.
        config: ``verify_max_iters``, ``verify_trim``, ``verify_margin``, ``verify_requests``,
            start scales from ``model_capacity_scale``.
        traces: ``{model_key: Trace}``; missing models get a synthetic trace.
        progress: called after each round.

    Returns:
        ``(plan, config_used, rounds)``: the chosen plan with simulated attainment attached,
        ``params`` recording ``scale:<model>`` and ``verify_rounds``, and ``stats.note``
        extended; the config that produced it; the rounds' history.
    """
    from .evaluate import attach_score, score_plan

    tr = traces_for(requests, config, traces)
    keys = [r.key for r in requests]
    target = {r.key: min(1.0, float(getattr(r.slo, "attainment", 0.99)) + config.verify_margin) for r in requests}
    s = {k: float(config.model_capacity_scale.get(k, 1.0)) for k in keys}
    P: dict[str, float] = {}
    F: dict[str, float] = {}
    rounds: list[RepairRound] = []
    results: list[tuple[Plan, Any, PlannerConfig, dict[str, bool]]] = []
    seen: set[tuple] = set()
    budget = config.verify_max_iters

    def evaluate(scales: dict[str, float]) -> dict[str, bool]:
        cfg = config.with_(model_capacity_scale=dict(scales), verify=False)
        pl = run(cfg)
        sc = score_plan(pl, requests, tr, fleet, gpu_catalog=gpu_catalog, perf_factory=perf_factory,
                        seed=config.seed)
        att, ok = {}, {}
        for k in keys:
            pm = sc.per_model.get(k, {})
            att[k] = float(pm.get("attainment") or 0.0)
            mplan = pl.model(k)
            served = mplan.served_fraction if mplan is not None else 0.0
            ok[k] = bool(pm.get("slo_met")) and att[k] >= target[k] - 1e-12 and served >= 1.0 - 1e-9
        rd = RepairRound(dict(scales), pl.cost_per_hour, att, ok)
        rounds.append(rd)
        results.append((pl, sc, cfg, ok))
        seen.add(tuple(round(scales[k], 6) for k in keys))
        if progress:
            progress(len(rounds), rd)
        return ok

    for _ in range(budget):
        ok = evaluate(s)
        rd = rounds[-1]
        nxt = dict(s)
        for k in keys:
            if ok[k]:
                P[k] = max(P.get(k, 0.0), s[k])
            else:
                F[k] = min(F.get(k, math.inf), s[k])
            if k in P and k in F:
                nxt[k] = P[k] if F[k] / P[k] <= 1.08 else math.sqrt(P[k] * F[k])
            elif k in F:
                a = rd.attainment[k]
                step = math.sqrt(max(1e-6, 1.0 - target[k]) / max(1e-6, 1.0 - a))
                nxt[k] = F[k] * min(0.92, max(0.5, step))
            elif config.verify_trim:
                a = rd.attainment[k]
                step = math.sqrt(max(1e-6, 1.0 - target[k]) / max(1e-3, 1.0 - a))
                nxt[k] = P[k] * min(1.4, max(1.08, step))
        converged = all((k in P and k in F and F[k] / P[k] <= 1.08) or (k in P and not config.verify_trim)
                        for k in keys)
        if converged or nxt == s:
            break
        s = nxt
    final = {k: P.get(k, s[k]) for k in keys}
    if all(k in P for k in keys) and tuple(round(final[k], 6) for k in keys) not in seen:
        evaluate(final)
    passing = [r for r in results if all(r[3].values())]
    if passing:
        pl, sc, cfg, ok = min(passing, key=lambda r: (r[0].cost_per_hour, r[0].plan_id))
    else:
        pl, sc, cfg, ok = max(results, key=lambda r: (r[1].attainment, -r[0].cost_per_hour))
    pl = attach_score(pl, sc)
    notes = list(pl.infeasibilities)
    for k in keys:
        if not ok[k]:
            pm = sc.per_model.get(k, {})
            att = pm.get("attainment") or 0.0
            why = (f"simulated SLO attainment {att:.3f} (target {target[k]:.3f})" if att < target[k] else
                   f"simulated attainment {att:.3f} meets {target[k]:.3f} but the simulator's SLO check fails "
                   f"(TTFT/TPOT percentile over target or requests rejected: ttft p99 {pm.get('ttft_p99_s')}, "
                   f"tpot p99 {pm.get('tpot_p99_s')}, rejected {pm.get('rejected')})")
            notes.append(Infeasibility(
                k, "slo-attainment",
                f"{why} after {len(rounds)} verify rounds "
                f"(capacity scale {cfg.model_capacity_scale.get(k, 1.0):.2f})",
                "raise verify_max_iters, allow faster GPUs / higher TP, or relax the SLO", served_fraction=1.0))
    params = dict(pl.params)
    params.update({f"scale:{k}": float(cfg.model_capacity_scale.get(k, 1.0)) for k in keys})
    params["verify_rounds"] = float(len(rounds))
    params["sim_attainment"] = float(sc.attainment)
    stats = dataclasses.replace(pl.stats, note=(pl.stats.note + f"; verify-and-repair: {len(rounds)} rounds, "
                                                f"simulated attainment {sc.attainment:.3f}").lstrip("; "))
    pl = dataclasses.replace(pl, infeasibilities=tuple(notes), params=params, stats=stats)
    return pl, cfg, rounds
