"""Per-replica SLO capacity: how many requests/second of one input-length bucket a replica can
serve while its p99 TTFT and TPOT stay within the SLO.

The model (documented in ``docs/planner.md``) combines the performance model's step times with
two queueing approximations:

**Decode / TPOT.** With continuous batching a replica runs back-to-back engine steps of
duration ``tau``. At arrival rate ``lam`` (req/s), prompt mean ``I`` and output mean ``O``
tokens, Little's law gives ``B = lam * O * tau`` sequences decoding and ``P = lam * I * tau``
prompt tokens prefetched per step (chunked prefill), so ``tau`` is the fixed point of
``tau = step_time(P, B, C)`` with ``C = I + O/2`` the mean context. It is solved by the secant
method; no fixed point (the map's slope >= 1) means the replica is saturated. A request's TPOT
averages its ``O`` steps. Its p-th percentile is the larger of (a) the step time at
``B_p = B + z*sqrt(B)`` (Poisson batch) and ``P_p = P + z*I*sqrt(lam*tau/O)`` prompt tokens
per step, and (b) a life-based bound: during the request's decode life ``L = O*tau`` the
``n ~ Poisson(lam*L)`` prompts that arrive are prefilled inside its steps, so
``TPOT_p = t_dec(B_p) + n_p * (step_time(I, B_p) - t_dec(B_p)) / (O - 1)`` with
``n_p = lam*L + z*sqrt(lam*L)``; ``z`` is the normal quantile of the SLO's TPOT percentile.
Checked against the simulator on Poisson traces (``tests/test_planner_inner.py``); under-
prediction near saturation is what the outer loop's ``tpot_scale``/headroom corrects.

**Prefill / TTFT.** Prompts queue for prefill: an M/G/1 queue (Poisson arrivals, general
service) whose service time for an ``I``-token prompt is the idle ``prefill_time(I)`` plus, for
each of its ``I/k`` chunks (``k = min(I, max_num_batched_tokens - B)``, vLLM's token budget
shared with the B decodes), the extra step time of co-running the B decodes. Utilisation ``rho = lam * E[S]``; Pollaczek-Khinchine mean wait
``E[W] = lam * E[S^2] / (2 (1 - rho))``; tail by the exponential approximation
``P(W > t) ~= rho * exp(-rho t / E[W])`` (exact for M/M/1; Kingman's heavy-traffic form), so
``W_q = E[W]/rho * ln(rho / (1 - q))`` for percentile ``q``. TTFT_q = ``W_q + S(I_hi) + tau``
(the prompt at the bucket's upper edge, plus the residual of the running step). ``E[S]``,
``E[S^2]`` assume prompts uniform within the bucket.

The per-replica capacity is the largest ``lam`` (bisection) with TTFT_q <= ttft target,
TPOT_q <= tpot target, ``B_p`` <= ``max_batch(C)`` (KV cache and max_num_seqs) and rho < 1.
Treating an island of ``n`` replicas as ``n`` independent M/G/1 queues (random/round-robin
split) is conservative relative to least-loaded routing (M/G/c).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Protocol

from .types import DEFAULT_INPUT_EDGES, PlannerInputError, Workload


class PerfLike(Protocol):
    """The subset of ``archipelago.decide.perf.PerfModel`` the planner uses (seconds, tokens)."""

    fits: bool

    def max_batch(self, avg_ctx: float) -> int: ...
    def prefill_time(self, prompt_tokens: float, batch: int = 1) -> float: ...
    def decode_step_time(self, batch: float, avg_ctx: float) -> float: ...
    def step_time(self, prefill_tokens: float, decode_seqs: float, decode_ctx: float) -> float: ...


@dataclass(frozen=True)
class Bucket:
    """An input-length bucket of one model's workload.

    ``[lo, hi)`` prompt tokens, ``mean_in`` mean prompt tokens, ``mean_out`` mean generated
    tokens, ``rate_rps`` its request rate (req/s), ``fraction`` its share of the model's
    requests."""

    lo: float
    hi: float
    mean_in: float
    mean_out: float
    rate_rps: float
    fraction: float


def _lognormal_sigma(mean: float, p90: float | None) -> float:
    """Sigma of a log-normal with the given mean and 90th percentile (0.8 if no p90)."""
    if p90 is None or p90 <= 0 or mean <= 0:
        return 0.8
    r = math.log(p90 / mean)
    z = 1.2815515655446004
    disc = z * z - 2 * r
    if r <= 0:
        return 0.2
    if disc <= 0:
        return z
    return max(0.05, z - math.sqrt(disc))


def _hist_from_hint(mean: float, p90: float | None, edges: tuple[float, ...]) -> list[tuple[float, float]]:
    sigma = _lognormal_sigma(mean, p90)
    mu = math.log(max(mean, 1.0)) - sigma * sigma / 2
    nd = NormalDist(mu, sigma)
    out, prev = [], 0.0
    for e in edges:
        c = nd.cdf(math.log(e)) if math.isfinite(e) else 1.0
        out.append((e, max(0.0, c - prev)))
        prev = c
    if prev < 1.0:
        out.append((math.inf, 1.0 - prev))
    return [(e, c) for e, c in out if c > 1e-4]


def _mean_from_hist(hist: tuple[tuple[float, float], ...]) -> float:
    tot, s, lo = 0.0, 0.0, 0.0
    for e, c in hist:
        hi = e if math.isfinite(e) else 2 * max(lo, 1.0)
        s += c * (lo + hi) / 2
        tot += c
        lo = e
    if tot <= 0:
        raise PlannerInputError("histogram has no counts")
    return s / tot


def workload_buckets(w: Workload, max_model_len: float | None = None,
                     edges: tuple[float, ...] | None = None) -> list[Bucket]:
    """Split a :class:`Workload` into input-length :class:`Bucket` s.

    Uses ``w.input_hist`` (or a log-normal fitted to ``input_mean``/``input_p90`` on ``edges``,
    default :data:`DEFAULT_INPUT_EDGES`). An open last bucket ``[e, inf)`` is closed at
    ``max_model_len`` (tokens) or ``2*e``. Output means come from ``output_mean_by_input`` or,
    assuming independence, from the output histogram / ``output_mean``. Raises
    :class:`PlannerInputError` if the histogram is empty. Empty buckets are dropped.
    """
    hist = list(w.input_hist) if w.input_hist else _hist_from_hint(
        float(w.input_mean), w.input_p90, tuple(edges or DEFAULT_INPUT_EDGES))
    total = sum(c for _, c in hist)
    if total <= 0:
        raise PlannerInputError("workload.input_hist has no counts")
    out_mean = (float(w.output_mean) if w.output_mean is not None else _mean_from_hist(w.output_hist))
    buckets, lo = [], 0.0
    for idx, (e, c) in enumerate(hist):
        hi = e
        if not math.isfinite(hi):
            hi = float(max_model_len) if max_model_len else 2 * max(lo, 512.0)
            hi = max(hi, lo + 1)
        if c > 0:
            mi = (w.input_means[idx] if w.input_means is not None and w.input_hist
                  else (lo + hi) / 2)
            mi = min(max(mi, lo), hi)
            mo = (w.output_mean_by_input[idx] if w.output_mean_by_input is not None and w.input_hist
                  else out_mean)
            buckets.append(Bucket(lo=lo, hi=hi, mean_in=max(1.0, mi), mean_out=max(1.0, mo),
                                  rate_rps=w.rate_rps * c / total, fraction=c / total))
        lo = e
    return buckets


@dataclass(frozen=True)
class ReplicaPrediction:
    """Predicted behaviour of one replica at arrival rate ``rate_rps`` of one bucket:
    ``tau_s`` mean step time (s), ``batch`` mean decoding sequences, ``rho`` prefill-server
    utilisation, ``ttft_q_s``/``tpot_q_s`` the SLO-percentile TTFT/TPOT (s), ``ok`` whether a
    steady state exists (else the replica is saturated) and ``binding`` what limits it."""

    rate_rps: float
    tau_s: float
    batch: float
    rho: float
    ttft_q_s: float
    tpot_q_s: float
    ok: bool
    binding: str = ""


@dataclass(frozen=True)
class Capacity:
    """Per-replica SLO capacity for one bucket: ``rate_rps`` (req/s, 0 if unattainable),
    ``binding`` constraint (``ttft``, ``tpot``, ``kv``, ``saturation``, or
    ``ttft-slo``/``tpot-slo``/``memory`` when even an idle replica fails), idle-replica TTFT and
    TPOT (s), and the prediction at capacity."""

    rate_rps: float
    binding: str
    idle_ttft_s: float
    idle_tpot_s: float
    at_capacity: ReplicaPrediction | None


def _service(perf: PerfLike, tokens: float, batch: float, ctx: float, budget: int) -> float:
    """Prefill service time (s) of a ``tokens`` prompt: the idle prefill time plus, per chunk of
    ``min(tokens, budget - batch)`` tokens, the extra step time of co-running ``batch`` decodes."""
    if batch <= 0:
        return float(perf.prefill_time(tokens))
    chunk = max(1.0, min(tokens, budget - batch))
    extra = perf.step_time(chunk, batch, ctx) - perf.step_time(chunk, 0.0, ctx)
    return float(perf.prefill_time(tokens)) + (tokens / chunk) * max(0.0, extra)


def _fixed_point_tau(perf: PerfLike, lam: float, mi: float, mo: float, ctx: float,
                     budget: int) -> float:
    """Mean step time tau (s) solving tau = step_time(min(lam*I*tau, budget), lam*O*tau, C);
    ``inf`` when no fixed point exists (saturated)."""

    def f(t: float) -> float:
        b = max(1.0, lam * mo * t)
        p = min(lam * mi * t, max(0.0, budget - b))
        return perf.step_time(p, b, ctx)

    t0 = perf.decode_step_time(1, ctx)
    g0 = f(t0) - t0
    if abs(g0) <= 1e-9 * max(t0, 1e-9):
        return t0
    t1 = t0 + g0
    for _ in range(40):
        g1 = f(t1) - t1
        if abs(g1) <= 1e-7 * t1 + 1e-12:
            break
        if g1 >= g0 - 1e-15 and g0 > 0:
            return math.inf  # g not decreasing: the step-time map has slope >= 1
        t2 = t1 - g1 * (t1 - t0) / (g1 - g0)
        t0, g0, t1 = t1, g1, max(t2, 1e-9)
        if t1 > 1e4:
            return math.inf
    else:
        return math.inf
    # prefill tokens per step must fit the budget
    b = max(1.0, lam * mo * t1)
    if lam * mi * t1 > max(0.0, budget - b) + 1e-9:
        return math.inf
    return t1


def predict_replica(perf: PerfLike, b: Bucket, lam: float, *, budget: int,
                    ttft_pct: float = 0.99, tpot_pct: float = 0.99) -> ReplicaPrediction:
    """Predict one replica serving bucket ``b`` at ``lam`` req/s (see the module docstring).

    ``budget`` is ``max_num_batched_tokens``; ``ttft_pct``/``tpot_pct`` the SLO percentiles
    (0..1). Returns a :class:`ReplicaPrediction` (``ok=False`` when saturated)."""
    ctx = b.mean_in + b.mean_out / 2
    if lam <= 0:
        tau = perf.decode_step_time(1, ctx)
        s_hi = _service(perf, b.hi, 0.0, ctx, budget)
        return ReplicaPrediction(0.0, tau, 0.0, 0.0, s_hi + tau, tau, True)
    tau = _fixed_point_tau(perf, lam, b.mean_in, b.mean_out, ctx, budget)
    if not math.isfinite(tau):
        return ReplicaPrediction(lam, tau, math.inf, 1.0, math.inf, math.inf, False, "saturation")
    b_mean = lam * b.mean_out * tau
    batch = max(1.0, b_mean)
    z_tpot = NormalDist().inv_cdf(min(max(tpot_pct, 0.5), 0.9999))
    b_q = max(1.0, b_mean + z_tpot * math.sqrt(b_mean))
    p_mean = lam * b.mean_in * tau
    p_q = p_mean + z_tpot * b.mean_in * math.sqrt(lam * tau / max(1.0, b.mean_out))
    p_q = min(p_q, max(0.0, budget - b_q))
    tpot_q = perf.step_time(p_q, b_q, ctx)
    # life-based tail: the prompts arriving during the request's decode life L = O*tau are
    # prefilled in its steps; their count is Poisson(lam*L), each adding the marginal step
    # time of one prompt, spread over the request's O-1 inter-token gaps
    life = b.mean_out * tau
    n_q = lam * life + z_tpot * math.sqrt(lam * life)
    marg = max(0.0, perf.step_time(min(b.mean_in, budget), b_q, ctx) - perf.step_time(0.0, b_q, ctx))
    tpot_life = perf.step_time(0.0, b_q, ctx) + n_q * marg / max(1.0, b.mean_out - 1)
    tpot_q = max(tpot_q, tpot_life)
    kv_ok = b_q <= perf.max_batch(ctx)
    lo_eff = max(1.0, b.lo)
    s_lo = _service(perf, lo_eff, batch, ctx, budget)
    s_mid = _service(perf, b.mean_in, batch, ctx, budget)
    s_hi = _service(perf, b.hi, batch, ctx, budget)
    es = s_mid
    es2 = s_mid * s_mid + (s_hi - s_lo) ** 2 / 12.0
    rho = lam * es
    if rho >= 1.0:
        return ReplicaPrediction(lam, tau, batch, rho, math.inf, tpot_q, False, "saturation")
    q = min(max(ttft_pct, 0.5), 0.9999)
    ew = lam * es2 / (2 * (1 - rho))
    wq = (ew / rho) * math.log(rho / (1 - q)) if rho > (1 - q) and ew > 0 else 0.0
    ttft_q = wq + s_hi + tau
    return ReplicaPrediction(lam, tau, batch, rho, ttft_q, tpot_q, kv_ok, "" if kv_ok else "kv")


def replica_capacity(perf: PerfLike, b: Bucket, *, ttft_s: float, tpot_s: float, budget: int,
                     ttft_pct: float = 0.99, tpot_pct: float = 0.99,
                     rel_tol: float = 0.005) -> Capacity:
    """Largest per-replica rate (req/s) of bucket ``b`` meeting TTFT <= ``ttft_s`` and TPOT <=
    ``tpot_s`` (seconds) at the given percentiles (bisection to ``rel_tol``). Returns a
    :class:`Capacity`; ``rate_rps == 0`` with ``binding`` ``memory``/``ttft-slo``/``tpot-slo``
    when an idle replica cannot meet the SLO."""
    if not getattr(perf, "fits", True):
        return Capacity(0.0, "memory", math.inf, math.inf, None)
    idle = predict_replica(perf, b, 0.0, budget=budget, ttft_pct=ttft_pct, tpot_pct=tpot_pct)
    if perf.max_batch(b.mean_in + b.mean_out / 2) < 1:
        return Capacity(0.0, "memory", idle.ttft_q_s, idle.tpot_q_s, None)
    if idle.ttft_q_s > ttft_s:
        return Capacity(0.0, "ttft-slo", idle.ttft_q_s, idle.tpot_q_s, None)
    if idle.tpot_q_s > tpot_s:
        return Capacity(0.0, "tpot-slo", idle.ttft_q_s, idle.tpot_q_s, None)

    def check(lam: float) -> tuple[bool, str, ReplicaPrediction]:
        p = predict_replica(perf, b, lam, budget=budget, ttft_pct=ttft_pct, tpot_pct=tpot_pct)
        if not p.ok:
            return False, p.binding or "saturation", p
        if p.ttft_q_s > ttft_s:
            return False, "ttft", p
        if p.tpot_q_s > tpot_s:
            return False, "tpot", p
        return True, "", p

    # bracket: start from the serial rate 1 / (S + O * step)
    lo_lam = 0.0
    hi_lam = 1.0 / max(1e-6, idle.ttft_q_s + b.mean_out * idle.tpot_q_s)
    best: ReplicaPrediction | None = None
    binding = "saturation"
    for _ in range(60):
        ok, why, p = check(hi_lam)
        if not ok:
            binding = why
            break
        lo_lam, best = hi_lam, p
        hi_lam *= 2
    else:
        raise RuntimeError("capacity bracket did not close; the performance model returns "
                           "non-increasing step times")
    for _ in range(64):
        if hi_lam - lo_lam <= rel_tol * hi_lam or hi_lam < 1e-9:
            break
        mid = (lo_lam + hi_lam) / 2
        ok, why, p = check(mid)
        if ok:
            lo_lam, best = mid, p
        else:
            hi_lam, binding = mid, why
    if best is None:
        # even a tiny rate fails (e.g. TTFT only met with an empty queue): report that rate
        ok, why, p = check(lo_lam) if lo_lam > 0 else (False, binding, None)
        return Capacity(lo_lam if ok else 0.0, binding, idle.ttft_q_s, idle.tpot_q_s, p)
    return Capacity(lo_lam, binding, idle.ttft_q_s, idle.tpot_q_s, best)


class CapacityCache:
    """Memo of :func:`replica_capacity` keyed by (variant key, bucket, targets, budget).

    The planner evaluates the same (model, GPU, TP, limits, bucket, SLO) repeatedly across
    models sharing a catalogue entry and across outer-loop evaluations; this keeps the inner
    loop within its time budget."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self._d: dict[Any, Capacity] = {}
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0

    def get(self, key: Any, perf: PerfLike, b: Bucket, **kw: Any) -> Capacity:
        """Capacity of ``b`` on ``perf`` (cached under ``key`` + bucket + keyword targets)."""
        k = (key, b.lo, b.hi, round(b.mean_in, 1), round(b.mean_out, 1), tuple(sorted(kw.items())))
        c = self._d.get(k)
        if c is None:
            self.misses += 1
            c = replica_capacity(perf, b, **kw)
            if len(self._d) >= self.max_entries:
                self._d.clear()
            self._d[k] = c
        else:
            self.hits += 1
        return c

    def get_or(self, key: Any, compute: Any) -> Capacity:
        """The entry under ``key``, computing it with ``compute()`` on a miss (used for the
        simulator-calibrated capacities of :mod:`.calibrate`)."""
        c = self._d.get(key)
        if c is None:
            self.misses += 1
            c = compute()
            if len(self._d) >= self.max_entries:
                self._d.clear()
            self._d[key] = c
        else:
            self.hits += 1
        return c
