"""Simulator-calibrated per-replica SLO capacity (a profile table computed from our simulator).

The analytic capacity of :mod:`.capacity` is a queueing approximation; checked against the
discrete-event simulator (``archipelago.decide.sim``) it is optimistic (TPOT p99 10-40 % low near
saturation, and ``perf.saturation_throughput`` ignores KV-cache preemption). This module replaces
it, per candidate (model, GPU, TP, engine limits) and input-length bucket, by the largest request
rate one replica sustains *in the simulator* while meeting the SLO -- the idea of the offline
profiles Mélange (Griggs et al., 2024) and AIBrix build on real GPUs, computed here from the
simulator so it covers every GPU type of the catalogue.

Method, for one (variant, bucket):

1. **Sample** (deterministic, ``seed``): ``n`` requests with prompt lengths in the bucket's
   ``[lo, hi)`` -- a power law on the bucket whose mean is the bucket's mean prompt length
   (``x = lo + (hi-lo) u^a``, ``a = (hi-lo)/(mean-lo) - 1``, mirrored when the mean is above the
   midpoint) -- output lengths from the workload's output-length distribution
   (:func:`output_shape`: 64 quantiles of the histogram, log-uniform within each bin) rescaled to
   the bucket's mean output length, and unit-rate inter-arrival gaps from a Gamma renewal
   process with the per-replica coefficient of variation :func:`per_replica_cv` (the model's
   short-time-scale burstiness ``arrival_cv`` thinned to one replica's share of the stream:
   ``cv_r^2 = 1 + (cv^2 - 1) p`` with ``p = cap/rate`` -- the thinning formula for renewal
   processes -- Poisson when the workload gives no ``arrival_cv``).
2. **Bisect** on the rate ``lam``: the trace at rate ``lam`` is the same sample with gaps divided
   by ``lam`` (common random numbers, so pass/fail is monotone in ``lam`` up to simulation
   effects); a rate *passes* when the one-replica simulation meets the SLO: p-th percentile
   TTFT and TPOT within target and attained fraction >= the SLO's attainment
   (``SimResult.slo_met``). The bracket starts at the analytic capacity (grown x1.6 / shrunk
   x0.6 until it brackets), then geometric bisection until ``hi/lo <= 1 + rel_tol`` or
   ``max_sims`` simulations. The capacity is the largest passing rate.
3. **Cap at a utilisation of the sustained throughput**: the largest passing rate is capped at
   ``max_utilization`` x the replica's sustained throughput for the bucket
   (:func:`saturation_rate`, measured in an overloaded simulation after a warm-up). A replica
   that starts empty first fills its batch (up to ``max_num_seqs``) without queueing, so a
   600-request bisection run is mostly start-up transient and passes rates above saturation: an
   H100 replica of Llama-3.1-8B (1,024-2,048-token prompts, ~380-token answers) "passed"
   6.4 req/s, yet sustains only ~5.2-5.5 req/s and over 600 s at 6.4 req/s its TTFT p90 was 52 s. The cap
   also keeps a replica that mixes buckets stable: the planner adds per-bucket loads
   ``rate_b / cap_b`` linearly, and with ``cap_b <= u * mu_b`` the mix stays at or below
   utilisation ``u`` of its saturation throughput (Kingman: waiting time grows as
   ``rho / (1 - rho)``, so a margin below 1 is needed for a bounded TTFT).

Bounded: at most ``max_sims`` simulations of ``n`` requests each (~5-20 ms each for 600
requests on this machine). Cached by (model, GPU, TP, limits, bucket statistics, output shape,
cv, SLO, sample size, seed) in a :class:`~.capacity.CapacityCache`.

What this does not capture: non-stationary load (the rate of the Azure code trace varies x3-7
between minutes) and the pooling gain of least-loaded routing over several replicas (M/G/c);
the planner's verify-and-repair step (:mod:`.repair`) scores the whole plan on the trace and
corrects per-model headroom for both.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .capacity import Bucket, Capacity, CapacityCache, ReplicaPrediction
from .types import Workload

#: Number of quantiles kept of a workload's output-length distribution.
OUTPUT_QUANTILES = 64


def output_shape(w: Workload, k: int = OUTPUT_QUANTILES) -> tuple[float, ...]:
    """The workload's output-length distribution as ``k`` quantiles normalised to mean 1.

    From ``w.output_hist`` (log-uniform within each bin; the open last bin is closed at twice
    its lower edge), else a log-normal with ``output_mean``/``output_p90`` (sigma 0.8 without a
    p90). Returns a tuple of ``k`` floats > 0, rounded to 3 decimals (a stable cache key)."""
    qs = (np.arange(k) + 0.5) / k
    if w.output_hist:
        edges, counts, lo = [], [], 0.0
        for e, c in w.output_hist:
            hi = e if math.isfinite(e) else 2 * max(lo, 1.0)
            edges.append((max(lo, 0.5), max(hi, lo + 1.0)))
            counts.append(c)
            lo = e
        cum = np.cumsum(counts) / max(1e-12, sum(counts))
        vals = []
        for q in qs:
            i = int(np.searchsorted(cum, q, side="left"))
            i = min(i, len(edges) - 1)
            prev = cum[i - 1] if i else 0.0
            frac = (q - prev) / max(1e-12, cum[i] - prev)
            a, b = edges[i]
            vals.append(math.exp(math.log(a) + frac * (math.log(b) - math.log(a))))
        v = np.asarray(vals)
    else:
        from statistics import NormalDist

        from .capacity import _lognormal_sigma

        mean = float(w.output_mean or 1.0)
        sigma = _lognormal_sigma(mean, w.output_p90)
        v = np.exp(np.array([NormalDist(0.0, sigma).inv_cdf(float(q)) for q in qs]))
    v = v / v.mean()
    return tuple(round(float(x), 3) for x in v)


def per_replica_cv(arrival_cv: float | None, share: float) -> float:
    """Inter-arrival CV seen by one replica that receives ``share`` (0..1] of a renewal stream
    with CV ``arrival_cv`` (None = Poisson): ``sqrt(1 + (cv^2 - 1) * share)`` (random thinning
    of a renewal process; exact in its second moment). Returns a float > 0."""
    if arrival_cv is None:
        return 1.0
    p = min(1.0, max(0.0, share))
    return math.sqrt(max(0.01, 1.0 + (arrival_cv ** 2 - 1.0) * p))


def bucket_sample(b: Bucket, out_shape: tuple[float, ...], cv: float, n: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic calibration sample for bucket ``b``: ``(unit_gaps, input_tokens,
    output_tokens)``, arrays of shape ``(n,)``; gaps have mean 1 s (divide by the rate), inputs in
    ``[max(1, lo), hi)`` with mean ~``b.mean_in``, outputs ``>= 1`` with mean ~``b.mean_out``."""
    rng = np.random.Generator(np.random.PCG64(seed))
    if abs(cv - 1.0) < 1e-9:
        gaps = rng.exponential(1.0, n)
    else:
        shape = 1.0 / (cv * cv)
        gaps = rng.gamma(shape, 1.0 / shape, n)
    gaps = gaps / max(1e-12, gaps.mean())
    lo, hi = max(1.0, b.lo), max(b.hi, max(1.0, b.lo) + 1.0)
    mean = min(max(b.mean_in, lo + 1e-6), hi - 1e-6)
    u = rng.random(n)
    if mean <= (lo + hi) / 2:
        a = (hi - lo) / max(1e-9, mean - lo) - 1.0
        x = lo + (hi - lo) * u ** a
    else:
        a = (hi - lo) / max(1e-9, hi - mean) - 1.0
        x = hi - (hi - lo) * u ** a
    inp = np.clip(np.floor(x), lo, max(lo, hi - 1)).astype(np.int64)
    shape_arr = np.asarray(out_shape, dtype=float)
    out = rng.choice(shape_arr, size=n, replace=True) * b.mean_out
    out = np.maximum(1, np.rint(out)).astype(np.int64)
    return gaps, inp, out


def simulated_capacity(perf: Any, limits: Any, b: Bucket, slo: Any, *, analytic: Capacity,
                       out_shape: tuple[float, ...], cv: float = 1.0, n_requests: int = 600,
                       max_sims: int = 12, rel_tol: float = 0.05, seed: int = 0,
                       min_span_s: float = 60.0, max_requests: int = 8000,
                       max_utilization: float = 0.85) -> Capacity:
    """Largest rate (req/s) at which one replica (``perf``, engine ``limits``) serving bucket
    ``b`` meets ``slo`` (a ``sim.SLOTarget``) in the simulator; see the module docstring.

    Args:
        analytic: the analytic :class:`Capacity` (bracket start; returned unchanged when even
            an idle replica misses the SLO or the model does not fit).
        out_shape: :func:`output_shape` of the workload.
        cv: per-replica inter-arrival CV (:func:`per_replica_cv`).
        n_requests, min_span_s, max_requests: a simulation at rate ``lam`` uses the first
            ``min(max_requests, max(n_requests, lam * min_span_s))`` requests of one sample, so
            that it covers at least ``min_span_s`` seconds (steady state, not the start-up
            transient) -- prefixes of one sample keep the common random numbers.
        max_utilization: cap as a fraction of :func:`saturation_rate` (step 3 of the module
            docstring); ``>= 1`` disables the cap.

    Returns:
        :class:`Capacity` with ``binding`` one of ``ttft``, ``tpot``, ``attainment``, ``kv``
        (preemptions seen at the failing rate), ``memory`` (requests rejected), ``saturation``
        (capped at ``max_utilization`` of the saturation throughput), or ``sim-idle`` (the SLO
        fails at 1 % of the analytic capacity); ``at_capacity`` holds the
        simulated percentiles at the capacity (``tau_s``/``rho`` are NaN: not simulated).
    """
    from archipelago.decide import sim
    from archipelago.decide.traces import Trace

    if analytic.rate_rps <= 0:
        return analytic
    n_max = max(n_requests, max_requests)
    gaps, inp, out = bucket_sample(b, out_shape, cv, n_max, seed)
    cum = np.cumsum(gaps)
    cum -= cum[0]
    spec = sim.ReplicaSpec(island="calib", perf=perf, price_per_hour=1.0, limits=limits)
    sims = 0

    def run(lam: float) -> tuple[bool, str, ReplicaPrediction]:
        nonlocal sims
        sims += 1
        k = int(min(n_max, max(n_requests, math.ceil(lam * min_span_s))))
        tr = Trace(arrival_s=cum[:k] / lam, input_tokens=inp[:k], output_tokens=out[:k], source="calibration")
        r = sim.simulate(tr, [spec], sim.RoundRobin(), slo, seed=seed, record_timeseries=False)
        pt = r.percentiles.get("ttft", {})
        pp = r.percentiles.get("tpot", {})
        qt = _pkey(slo.ttft_percentile)
        qp = _pkey(slo.tpot_percentile)
        ttft_q = _quantile(r.ttft_s, slo.ttft_percentile, pt.get(qt))
        tpot_q = _quantile(r.tpot_s, slo.tpot_percentile, pp.get(qp))
        ok = bool(r.slo_met)
        why = ""
        if not ok:
            if r.n_rejected:
                why = "memory"
            elif ttft_q > slo.ttft_s:
                why = "ttft"
            elif tpot_q > slo.tpot_s:
                why = "tpot"
            else:
                why = "attainment"
            if r.preemptions and why != "memory":
                why = "kv"
        pred = ReplicaPrediction(lam, math.nan, float("nan"), math.nan, ttft_q, tpot_q, ok, why)
        return ok, why, pred

    lam = analytic.rate_rps
    ok, why, p = run(lam)
    best: ReplicaPrediction | None = p if ok else None
    lo_lam, hi_lam = (lam, math.inf) if ok else (0.0, lam)
    binding = why or "saturation"
    floor = analytic.rate_rps * 0.01
    while sims < max_sims and (hi_lam == math.inf or lo_lam == 0.0):
        lam = lo_lam * 1.6 if hi_lam == math.inf else hi_lam * 0.6
        if lam < floor:
            return Capacity(0.0, "sim-idle", analytic.idle_ttft_s, analytic.idle_tpot_s, None)
        ok, why, p = run(lam)
        if ok:
            lo_lam, best = lam, p
        else:
            hi_lam, binding = lam, why
    while sims < max_sims and lo_lam > 0 and math.isfinite(hi_lam) and hi_lam / lo_lam > 1 + rel_tol:
        lam = math.sqrt(lo_lam * hi_lam)
        ok, why, p = run(lam)
        if ok:
            lo_lam, best = lam, p
        else:
            hi_lam, binding = lam, why
    if lo_lam <= 0:
        return Capacity(0.0, "sim-idle", analytic.idle_ttft_s, analytic.idle_tpot_s, None)
    if not math.isfinite(hi_lam):
        binding = "bracket"  # passed up to the last rate tried within max_sims
    rate = lo_lam
    mu = (saturation_rate(perf, limits, b, out_shape, offered_rps=2.0 * lo_lam, max_requests=max_requests, seed=seed)
          if max_utilization < 1.0 else math.inf)
    if rate > max_utilization * mu:
        rate, binding = max_utilization * mu, "saturation"
    return Capacity(rate, binding, analytic.idle_ttft_s, analytic.idle_tpot_s, best)


def saturation_rate(perf: Any, limits: Any, b: Bucket, out_shape: tuple[float, ...], *, offered_rps: float,
                    span_s: float = 600.0, max_requests: int = 8000, seed: int = 0) -> float:
    """Sustained throughput (req/s) of one replica serving bucket ``b`` in the simulator, measured
    under overload.

    Poisson arrivals of :func:`bucket_sample` at ``offered_rps`` (choose it above the throughput to
    measure, e.g. twice the rate the SLO bisection passed) for ``span_s`` seconds (shortened so at
    most ``max_requests`` arrive). Output tokens generated in the last two thirds of the span are
    counted (each request's ``output - 1`` decode tokens spread evenly between its first and last
    token), divided by the window and by the sample's mean decode tokens per request: the first
    third is a warm-up, because a replica that starts empty runs with a batch of short, young
    requests that completes faster than the length-biased batch of a long run (a burst of 1,024
    requests overstated it by ~25 %). Counting tokens rather than completions avoids the same bias.

    Returns ``min(offered_rps, sustained rate)`` in req/s (``inf`` when nothing could be measured).
    """
    from archipelago.decide import sim
    from archipelago.decide.traces import Trace

    if not offered_rps > 0:
        return math.inf
    span = min(span_s, max_requests / offered_rps)
    n = int(math.ceil(offered_rps * span * 1.2)) + 16
    gaps, inp, out = bucket_sample(b, out_shape, 1.0, n, seed)
    t = np.cumsum(gaps) / offered_rps
    keep = t < span
    tr = Trace(arrival_s=t[keep], input_tokens=inp[keep], output_tokens=out[keep], source="saturation")
    if len(tr.arrival_s) < 8:
        return math.inf
    spec = sim.ReplicaSpec(island="saturation", perf=perf, price_per_hour=1.0, limits=limits)
    r = sim.simulate(tr, [spec], sim.RoundRobin(), None, seed=seed, record_timeseries=False)
    ok = np.isfinite(r.e2e_s) & np.isfinite(r.ttft_s)
    decode = np.maximum(0.0, tr.output_tokens.astype(float) - 1.0)
    if not ok.any() or decode.mean() <= 0:
        return math.inf
    first, last = (tr.arrival_s + r.ttft_s)[ok], (tr.arrival_s + r.e2e_s)[ok]
    t1, t2 = span / 3.0, span
    overlap = np.clip(np.minimum(last, t2) - np.maximum(first, t1), 0.0, None) / np.maximum(last - first, 1e-9)
    tokens = float((decode[ok] * overlap).sum())
    if tokens <= 0:
        return math.inf
    return min(offered_rps, tokens / (t2 - t1) / float(decode.mean()))


def _pkey(q: float) -> str:
    return f"p{round(q * 100):d}"


def _quantile(x: np.ndarray, q: float, given: float | None) -> float:
    if given is not None and not (isinstance(given, float) and math.isnan(given)):
        return float(given)
    v = np.asarray(x, dtype=float)
    v = v[np.isfinite(v)]
    return float(np.quantile(v, q)) if v.size else 0.0


def calibrated_capacity(cache: CapacityCache, key: Any, perf: Any, limits: Any, b: Bucket, slo: Any, *,
                        analytic: Capacity, out_shape: tuple[float, ...], cv: float, n_requests: int,
                        max_sims: int, rel_tol: float, seed: int, max_utilization: float = 0.85) -> Capacity:
    """:func:`simulated_capacity` memoised in ``cache`` under ``key`` (model, GPU, TP, limits)
    plus the bucket statistics, output shape, cv, SLO and calibration settings."""
    k = ("sim", key, b.lo, b.hi, round(b.mean_in, 1), round(b.mean_out, 1), hash(out_shape), round(cv, 2),
         slo.ttft_s, slo.tpot_s, slo.ttft_percentile, slo.tpot_percentile, slo.attainment,
         n_requests, max_sims, rel_tol, seed, round(analytic.rate_rps, 6), max_utilization)
    return cache.get_or(k, lambda: simulated_capacity(
        perf, limits, b, slo, analytic=analytic, out_shape=out_shape, cv=cv, n_requests=n_requests,
        max_sims=max_sims, rel_tol=rel_tol, seed=seed, max_utilization=max_utilization))
