"""Trace-driven discrete-event simulator of an LLM inference fleet with continuous batching.

A fleet is a list of replicas (:class:`ReplicaSpec`: island name, performance model, price, engine
limits). A :class:`Router` sends each request of a :class:`~archipelago.decide.traces.Trace` to one
replica at its arrival time; each replica runs a vLLM-v1-like iteration-level scheduler:

* every iteration ("step"), each running sequence in the decode phase emits one token;
* sequences still in prefill get their next prompt chunk, then waiting requests are admitted
  first-come-first-served while ``max_num_seqs`` and the KV cache allow, their prompt chunked under the
  ``max_num_batched_tokens`` budget left after the decode tokens (chunked prefill: prefill chunks
  and decodes share a step). With ``chunked_prefill=False`` a step either prefills whole prompts
  (no decodes, vLLM v0 style) or decodes;
* KV usage is the sum of the context (prompt + generated tokens) held by running sequences, in
  tokens (block granularity is ignored). When the decode tokens of a step do not fit, the most
  recently admitted running sequence is preempted by *recompute*: its KV is freed and it goes back to
  the head of the waiting queue, to re-prefill prompt + generated tokens (vLLM v1's
  ``RECOMPUTE`` preemption, ``Scheduler.schedule``);
* a step lasts ``perf.step_time(prefill_tokens, decode_seqs, mean_decode_context,
  prefill_context_tokens=mean_chunk_offset, prefill_seqs=chunks)`` seconds (the
  :class:`archipelago.decide.perf.PerfModel` signature); the step that completes a sequence's
  prefill emits its first token (TTFT), every later step one more.

Speed: the fleet is simulated with one lazily-advanced event loop per replica. Between events that
change a replica's batch (admission, completion, preemption, an arrival), decode-only stretches of
``k`` steps are advanced in closed form: with ``b`` decoding sequences the context grows by ``b``
tokens per step, step time is taken as affine in the step index between the stretch's first and last
step (exact for the roofline decode model, whose time is affine in context), so
``T(k) = k*a + s*k*(k-1)/2`` and the step at which the stretch crosses a given time solves a
quadratic. Per-sequence token counts are implicit: a replica keeps a decode-step counter ``D`` and
each sequence the value of ``D`` at which it finishes. Decode step times are cached per
``(batch, mean-context bucket)`` with buckets of 16 tokens.

Approximations (documented, deliberate): token-granular KV (no 16-token blocks, no prefix caching);
no CPU swap; the router sees a replica's load at its next step boundary. The longest request is
``max_model_len`` (``EngineLimits.max_model_len``, else ``perf.max_model_len_fit`` -- what the
operator passes as ``--max-model-len`` --, never above the KV capacity): a prompt of that length or
more is *rejected* (vLLM answers HTTP 400) and an output running past it is truncated (vLLM's
``finish_reason="length"``). Without chunked prefill a prompt longer than
``max_num_batched_tokens`` is rejected too. Zero input or output lengths count as 1 token (a
request prefills at least one token and samples one).
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd

from archipelago.decide.traces import Trace

__all__ = [
    "SimError",
    "PerfLike",
    "SLOTarget",
    "ReplicaSpec",
    "Router",
    "RoundRobin",
    "LeastLoaded",
    "LengthRangeRouter",
    "TimeSeries",
    "SimResult",
    "simulate",
]

_NAN = float("nan")
_INF = float("inf")
_CTX_QUANTUM = 16  # context-bucket width in tokens per decoding sequence for the step-time cache

# request states
_WAITING, _PREFILL, _DECODE, _DONE, _REJECTED = 0, 1, 2, 3, 4


class SimError(ValueError):
    """Invalid simulator input: a replica that does not fit, bad router configuration, bad SLO."""


class PerfLike(Protocol):
    """What the simulator uses of :class:`archipelago.decide.perf.PerfModel` (tests may pass fakes).

    ``step_time`` returns seconds; ``kv_capacity_tokens`` is in tokens; ``power_w`` returns the
    whole replica's watts for ``"idle"``, ``"prefill"`` or ``"decode"``; ``price_per_hour`` $/h.
    Optional: ``tp`` (GPUs per replica, default 1), ``limits`` (EngineLimits),
    ``max_model_len_fit`` (tokens), ``fit_error`` (str).
    """

    fits: bool
    kv_capacity_tokens: int

    def step_time(
        self,
        prefill_tokens: int,
        decode_seqs: int,
        decode_context_tokens: float,
        prefill_context_tokens: float = 0.0,
        prefill_seqs: float = 1.0,
    ) -> float: ...

    def power_w(self, phase: Any) -> float: ...

    def price_per_hour(self, price_per_gpu_hour: float | None = None) -> float: ...


@dataclass(frozen=True)
class SLOTarget:
    """Latency service-level objective for the simulated requests.

    A request *attains* the SLO when its TTFT <= ``ttft_s`` and its mean TPOT (inter-token latency,
    ``(e2e - ttft) / (output_tokens - 1)``) <= ``tpot_s`` and, if set, its end-to-end latency <=
    ``e2e_s``. The fleet *meets* the SLO when the ``ttft_percentile`` of TTFT <= ``ttft_s``, the
    ``tpot_percentile`` of TPOT <= ``tpot_s`` and the attained fraction >= ``attainment``.

    Attributes:
        ttft_s: time-to-first-token target, seconds (> 0).
        tpot_s: time-per-output-token target, seconds (> 0).
        e2e_s: optional end-to-end latency target, seconds (> 0).
        ttft_percentile, tpot_percentile: quantiles in (0, 1], e.g. 0.99 for p99.
        attainment: required fraction of requests attaining, in (0, 1].

    Raises:
        SimError: a non-positive target or a fraction outside (0, 1].
    """

    ttft_s: float
    tpot_s: float
    e2e_s: float | None = None
    ttft_percentile: float = 0.99
    tpot_percentile: float = 0.99
    attainment: float = 0.99

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s", "e2e_s"):
            v = getattr(self, name)
            if v is None and name == "e2e_s":
                continue
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise SimError(f"SLOTarget.{name} must be a number of seconds > 0, got {v!r}")
        for name in ("ttft_percentile", "tpot_percentile", "attainment"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0 < v <= 1):
                raise SimError(f"SLOTarget.{name} must be a fraction in (0, 1] (e.g. 0.99), got {v!r}")


@dataclass(frozen=True)
class ReplicaSpec:
    """One serving replica (one engine instance using ``tp`` GPUs) of an island.

    Attributes:
        island: name of the island (GPU type x TP group) the replica belongs to; routers address
            islands by this name.
        perf: a ``PerfModel`` (``archipelago.decide.perf``) for the replica's model, GPU and TP;
            supplies step times, KV capacity (tokens), power (W) and TP degree (``perf.tp``).
        price_per_hour: $/h for the whole replica; ``None`` -> ``perf.price_per_hour()``.
        limits: engine scheduler limits (``EngineLimits``: ``max_num_seqs``,
            ``max_num_batched_tokens``, ``max_model_len``, ``chunked_prefill``); ``None`` ->
            ``perf.limits``. KV capacity always comes from ``perf`` (memory settings live there).
    """

    island: str
    perf: PerfLike
    price_per_hour: float | None = None
    limits: Any = None

    def resolved_limits(self) -> Any:
        """The engine limits in force: ``limits`` or ``perf.limits``.

        Raises:
            SimError: neither is available.
        """
        lim = self.limits if self.limits is not None else getattr(self.perf, "limits", None)
        if lim is None:
            raise SimError(f"replica of island {self.island!r}: give limits= or a perf model with .limits")
        return lim

    def resolved_price(self) -> float:
        """$/h of the replica: ``price_per_hour`` or ``perf.price_per_hour()``."""
        if self.price_per_hour is not None:
            return float(self.price_per_hour)
        return float(self.perf.price_per_hour())


# ----------------------------------------------------------------------------------------------
# Routers


class Router:
    """Chooses a replica for each arriving request.

    Subclasses implement :meth:`bind` (called once per simulation with the fleet and a seeded
    ``numpy.random.Generator``; must reset all state so runs are reproducible) and :meth:`choose`.
    ``load(r)`` returns replica ``r``'s outstanding requests (waiting + running) at the arrival
    time; call it only for the replicas you consider -- it advances that replica's simulation.
    """

    name = "router"

    def bind(self, replicas: Sequence[ReplicaSpec], rng: np.random.Generator) -> None:
        """Prepare for a run over ``replicas``; raises SimError on a configuration that cannot apply."""
        self._n = len(replicas)

    def choose(self, input_tokens: int, load: Callable[[int], int]) -> int:
        """Index of the replica that serves a request with ``input_tokens`` prompt tokens."""
        raise NotImplementedError


class RoundRobin(Router):
    """Cycle through the replicas in fleet order, ignoring load and length."""

    name = "round-robin"

    def bind(self, replicas: Sequence[ReplicaSpec], rng: np.random.Generator) -> None:
        self._n = len(replicas)
        self._next = 0

    def choose(self, input_tokens: int, load: Callable[[int], int]) -> int:
        r = self._next
        self._next = (r + 1) % self._n
        return r


def _least_loaded(idx: Sequence[int], start: int, load: Callable[[int], int]) -> int:
    """Position in ``idx`` of the replica with the fewest outstanding requests; ties -> first from start."""
    n = len(idx)
    best_pos, best = start, load(idx[start])
    if best == 0:
        return best_pos
    for j in range(1, n):
        pos = start + j
        if pos >= n:
            pos -= n
        v = load(idx[pos])
        if v < best:
            best, best_pos = v, pos
            if v == 0:
                break
    return best_pos


class LeastLoaded(Router):
    """Send to the replica with the fewest outstanding (waiting + running) requests.

    Ties go to the first tied replica after the previously chosen one (rotating), so an idle fleet
    is used round-robin rather than piling onto replica 0.
    """

    name = "least-loaded"

    def bind(self, replicas: Sequence[ReplicaSpec], rng: np.random.Generator) -> None:
        self._idx = list(range(len(replicas)))
        self._start = 0

    def choose(self, input_tokens: int, load: Callable[[int], int]) -> int:
        pos = _least_loaded(self._idx, self._start, load)
        self._start = (pos + 1) % len(self._idx)
        return self._idx[pos]


class LengthRangeRouter(Router):
    """Route by prompt length: ranges of input tokens -> islands with traffic weights.

    This is the routing a plan prescribes (the routing ConfigMap of the act layer). A request with
    ``lo <= input_tokens < hi`` goes to one of its range's islands with probability proportional to
    the island's weight (drawn from the run's seeded generator), then to the least-loaded replica of
    that island (ties rotate).

    Args:
        ranges: ``[(lo, hi, {island: weight, ...}), ...]``, ``lo`` inclusive and ``hi`` exclusive
            input tokens (``hi=None`` or ``math.inf`` for no upper bound); ranges must not overlap;
            weights finite and > 0 (they need not sum to 1).
        out_of_range: what to do with a prompt length outside every range: ``"nearest"`` (default)
            uses the closest range by token distance (gaps between ranges and lengths past the ends
            are served, as a gateway's default route would); ``"error"`` raises SimError.

    Raises:
        SimError: empty or overlapping ranges, ``lo >= hi``, bad weights, or (at bind) an island
        name with no replica in the fleet.
    """

    name = "length"

    def __init__(
        self,
        ranges: Sequence[tuple[float, float | None, Mapping[str, float]]],
        out_of_range: str = "nearest",
    ) -> None:
        if out_of_range not in ("nearest", "error"):
            raise SimError(f"out_of_range must be 'nearest' or 'error', got {out_of_range!r}")
        if not ranges:
            raise SimError("LengthRangeRouter needs at least one (lo, hi, {island: weight}) range")
        norm = []
        for i, item in enumerate(ranges):
            try:
                lo, hi, weights = item
            except (TypeError, ValueError):
                raise SimError(f"range #{i}: expected (lo, hi, {{island: weight}}), got {item!r}") from None
            lo = float(lo)
            hi = _INF if hi is None else float(hi)
            if not (lo >= 0 and hi > lo):
                raise SimError(f"range #{i} [{lo:g}, {hi:g}): need 0 <= lo < hi input tokens")
            if not weights:
                raise SimError(f"range #{i} [{lo:g}, {hi:g}): no islands; give {{island: weight}}")
            for isl, w in weights.items():
                if not (isinstance(w, int | float) and math.isfinite(w) and w > 0):
                    raise SimError(f"range #{i} [{lo:g}, {hi:g}): weight of island {isl!r} must be > 0, got {w!r}")
            norm.append((lo, hi, dict(weights)))
        norm.sort(key=lambda x: x[0])
        for (lo1, hi1, _), (lo2, hi2, _) in zip(norm, norm[1:], strict=False):
            if lo2 < hi1:
                raise SimError(f"ranges [{lo1:g}, {hi1:g}) and [{lo2:g}, {hi2:g}) overlap; make them disjoint")
        self.ranges = norm
        self.out_of_range = out_of_range

    def bind(self, replicas: Sequence[ReplicaSpec], rng: np.random.Generator) -> None:
        by_island: dict[str, list[int]] = {}
        for i, rep in enumerate(replicas):
            by_island.setdefault(rep.island, []).append(i)
        self._los = [r[0] for r in self.ranges]
        self._targets = []  # per range: (cumulative weights, [replica index lists], [rotation starts])
        for lo, hi, weights in self.ranges:
            cum, groups = [], []
            total = 0.0
            for isl, w in weights.items():
                if isl not in by_island:
                    raise SimError(
                        f"range [{lo:g}, {hi:g}) routes to island {isl!r}, which has no replica; "
                        f"islands in the fleet: {sorted(by_island)}"
                    )
                total += float(w)
                cum.append(total)
                groups.append(by_island[isl])
            self._targets.append(([c / total for c in cum], groups, [0] * len(groups)))
        self._rng = rng
        self._buf = rng.random(4096)
        self._bufpos = 0

    def _range_of(self, tokens: int) -> int:
        j = bisect_right(self._los, tokens) - 1
        if j >= 0 and tokens < self.ranges[j][1]:
            return j
        if self.out_of_range == "error":
            spans = ", ".join(f"[{lo:g}, {hi:g})" for lo, hi, _ in self.ranges)
            raise SimError(f"prompt of {tokens} tokens is outside every routing range ({spans}); "
                           "cover it or use out_of_range='nearest'")
        best, best_d = 0, _INF
        for k, (lo, hi, _) in enumerate(self.ranges):
            d = lo - tokens if tokens < lo else tokens - hi + 1
            if d < best_d:
                best, best_d = k, d
        return best

    def choose(self, input_tokens: int, load: Callable[[int], int]) -> int:
        cum, groups, starts = self._targets[self._range_of(input_tokens)]
        g = 0
        if len(cum) > 1:
            if self._bufpos >= len(self._buf):
                self._buf = self._rng.random(4096)
                self._bufpos = 0
            u = self._buf[self._bufpos]
            self._bufpos += 1
            g = bisect_right(cum, u)
            if g >= len(cum):
                g = len(cum) - 1
        idx = groups[g]
        pos = _least_loaded(idx, starts[g], load)
        starts[g] = (pos + 1) % len(idx)
        return idx[pos]


# ----------------------------------------------------------------------------------------------
# Replica engine (hot path: plain Python ints/floats and lists)


class _StepTimer:
    """Step times from ``perf.step_time``; decode-only steps cached per (batch, mean-context bucket).

    The decode cache buckets the mean context of the decoding sequences to ``_CTX_QUANTUM`` tokens
    and evaluates the bucket's midpoint (error < 8 tokens of KV read per sequence per step).
    """

    __slots__ = ("perf", "cache")

    def __init__(self, perf: Any) -> None:
        self.perf = perf
        self.cache: dict[tuple[int, int], float] = {}

    def decode(self, b: int, ctx_sum: int) -> float:
        """One decode step of ``b`` sequences holding ``ctx_sum`` KV tokens in total, seconds."""
        bucket = ctx_sum // (_CTX_QUANTUM * b)
        key = (b, bucket)
        v = self.cache.get(key)
        if v is None:
            mean = bucket * _CTX_QUANTUM + _CTX_QUANTUM * 0.5
            v = self._check(self.perf.step_time(0, b, mean), 0, b, mean)
            self.cache[key] = v
        return v

    def mixed(self, p: int, ps: int, p_off_sum: int, b: int, ctx_sum: int) -> float:
        """A step with ``p`` prompt tokens of ``ps`` sequences (cached offsets summing to ``p_off_sum``)
        and ``b`` decode tokens (``ctx_sum`` KV tokens held by those sequences), seconds."""
        mean = ctx_sum / b if b else 0.0
        off = p_off_sum / ps if ps else 0.0
        v = self.perf.step_time(p, b, mean, prefill_context_tokens=off, prefill_seqs=ps if ps else 1)
        return self._check(v, p, b, mean)

    @staticmethod
    def _check(v: Any, p: int, b: int, ctx: float) -> float:
        v = float(v)
        if not (v > 0 and math.isfinite(v)):
            raise SimError(f"perf.step_time({p}, {b}, {ctx:g}) returned {v!r}; a step must take > 0 s")
        return v


class _Requests:
    """Per-request simulation state, as plain lists indexed by request id."""

    def __init__(self, trace: Trace) -> None:
        n = len(trace)
        self.arrival: list[float] = trace.arrival_s.tolist()
        self.prompt: list[int] = [max(1, x) for x in trace.input_tokens.tolist()]
        self.out: list[int] = [max(1, x) for x in trace.output_tokens.tolist()]
        self.state = [_WAITING] * n
        self.gen_prev = [0] * n  # tokens generated before the current residency (preemption)
        self.peff = self.prompt[:]  # tokens to (re)prefill in the current residency
        self.pf_left = [0] * n
        self.pf_done = [0] * n
        self.ds = [0] * n  # decode-step counter value when the current decode phase started
        self.adm = [-1] * n  # admission number of the current residency (-1: not running)
        self.first = [_NAN] * n
        self.finish = [_NAN] * n
        self.replica = [-1] * n
        self.npreempt = [0] * n


class _Replica:
    __slots__ = (
        "idx", "rq", "st", "cap", "max_seqs", "budget", "chunked", "max_len",
        "now", "waiting", "prefilling", "heap", "order", "adm_counter",
        "n_dec", "ctx_sum", "pf_kv", "D", "outstanding",
        "busy_prefill", "busy_decode", "preemptions", "completed", "rejected", "truncated",
        "steps", "gen_tokens", "stepwise",
    )

    def __init__(self, idx: int, spec: ReplicaSpec, rq: _Requests, timer: _StepTimer, stepwise: bool) -> None:
        lim = spec.resolved_limits()
        self.stepwise = stepwise
        self.idx = idx
        self.rq = rq
        self.st = timer
        self.cap = int(spec.perf.kv_capacity_tokens)
        self.max_seqs = int(lim.max_num_seqs)
        self.budget = int(lim.max_num_batched_tokens)
        self.chunked = bool(getattr(lim, "chunked_prefill", True))
        # longest request (prompt + output): --max-model-len, else what the operator would emit
        # (PerfModel.max_model_len_fit = min(model context, KV capacity)); never above the KV capacity
        mml = getattr(lim, "max_model_len", None) or getattr(spec.perf, "max_model_len_fit", None) or self.cap
        self.max_len = min(int(mml), self.cap)
        if self.cap <= 0 or self.max_seqs <= 0 or self.budget <= 0:
            raise SimError(
                f"replica {idx} ({spec.island}): kv_capacity_tokens={self.cap}, max_num_seqs={self.max_seqs}, "
                f"max_num_batched_tokens={self.budget}; all must be > 0"
            )
        self.now = 0.0
        self.waiting: deque[int] = deque()
        self.prefilling: list[int] = []
        self.heap: list[tuple[int, int, int]] = []  # (finish decode-step, admission no, rid)
        self.order: list[tuple[int, int]] = []  # (admission no, rid) in admission order
        self.adm_counter = 0
        self.n_dec = 0
        self.ctx_sum = 0
        self.pf_kv = 0
        self.D = 0
        self.outstanding = 0
        self.busy_prefill = 0.0
        self.busy_decode = 0.0
        self.preemptions = 0
        self.completed = 0
        self.rejected = 0
        self.truncated = 0
        self.steps = 0
        self.gen_tokens = 0

    # -- arrivals ---------------------------------------------------------------------------

    def enqueue(self, rid: int, t: float) -> None:
        rq = self.rq
        rq.replica[rid] = self.idx
        p = rq.prompt[rid]
        n = rq.out[rid]
        if p >= self.max_len or (not self.chunked and p > self.budget):
            rq.state[rid] = _REJECTED  # vLLM answers 400: prompt too long
            self.rejected += 1
            return
        if p + n > self.max_len:
            n = self.max_len - p  # generation stops at max_model_len (finish_reason "length")
            rq.out[rid] = n
            self.truncated += 1
        if not self.chunked and p + n - 1 > self.budget:
            # a recompute after preemption could not be re-prefilled in one step; cap the output
            n = self.budget - p + 1
            rq.out[rid] = n
            self.truncated += 1
        if not self.waiting and self.n_dec == 0 and not self.prefilling and self.now < t:
            self.now = t
        self.waiting.append(rid)
        self.outstanding += 1

    def busy(self) -> bool:
        return bool(self.waiting or self.n_dec or self.prefilling)

    def load_at(self, t: float) -> int:
        if self.now < t:
            self.advance(t)
        return self.outstanding

    # -- scheduling helpers -----------------------------------------------------------------

    def _can_admit(self) -> bool:
        if self.n_dec + len(self.prefilling) >= self.max_seqs:
            return False
        need = self.rq.peff[self.waiting[0]]
        if self.chunked:
            left = self.budget - self.n_dec
            if left <= 0:
                return False
            chunk = need if need < left else left
            return self.ctx_sum + self.pf_kv + self.n_dec + chunk <= self.cap
        return need <= self.budget and self.ctx_sum + self.pf_kv + need <= self.cap

    def _preempt_last(self) -> int:
        """Preempt (recompute) the most recently admitted running sequence; its id, or -1 if none runs."""
        rq = self.rq
        order = self.order
        while order:
            a, rid = order.pop()
            if rq.adm[rid] != a:
                continue
            s = rq.state[rid]
            if s == _PREFILL:
                self.prefilling.remove(rid)
                self.pf_kv -= rq.pf_done[rid]
            elif s == _DECODE:
                steps = self.D - rq.ds[rid]
                g = rq.gen_prev[rid] + 1 + steps
                self.ctx_sum -= rq.peff[rid] + steps
                self.n_dec -= 1
                rq.gen_prev[rid] = g
                rq.peff[rid] = rq.prompt[rid] + g
            else:  # pragma: no cover - order only holds running sequences with a live admission no
                continue
            rq.adm[rid] = -1
            rq.state[rid] = _WAITING
            rq.pf_done[rid] = 0
            rq.npreempt[rid] += 1
            self.waiting.appendleft(rid)
            self.preemptions += 1
            return rid
        return -1

    def _finish(self, rid: int) -> None:
        rq = self.rq
        rq.finish[rid] = self.now
        rq.state[rid] = _DONE
        rq.adm[rid] = -1
        self.outstanding -= 1
        self.completed += 1

    def _pop_done(self) -> None:
        heap, rq, D = self.heap, self.rq, self.D
        while heap and heap[0][0] <= D:
            _, a, rid = heapq.heappop(heap)
            if rq.adm[rid] != a:
                continue  # stale entry of a preempted residency
            self.ctx_sum -= rq.peff[rid] + (D - rq.ds[rid])
            self.n_dec -= 1
            self._finish(rid)
        if len(self.order) > 4 * (self.n_dec + len(self.prefilling)) + 64:
            self.order = [(a, r) for a, r in self.order if rq.adm[r] == a]

    # -- one mixed step (prefill chunks + decodes) ------------------------------------------

    def _mixed_step(self) -> None:
        rq = self.rq
        cap = self.cap
        b = self.n_dec
        while b and self.ctx_sum + self.pf_kv + b > cap:
            self._preempt_last()
            b = self.n_dec
        sched: list[tuple[int, int]] = []
        pf_tok = 0
        pf_off = 0
        if self.chunked:
            room = self.budget - b
            # running partial prefills first, in admission order
            i = 0
            while i < len(self.prefilling) and pf_tok < room:
                rid = self.prefilling[i]
                chunk = min(rq.pf_left[rid], room - pf_tok)
                if self.ctx_sum + self.pf_kv + b + pf_tok + chunk > cap:
                    # no KV for this chunk: preempt from the back (possibly this very sequence; never
                    # one scheduled earlier in this step, as those were admitted before it)
                    victim = self._preempt_last()
                    b = self.n_dec
                    room = self.budget - b
                    if victim == rid or victim < 0:
                        break
                    continue
                sched.append((rid, chunk))
                pf_tok += chunk
                pf_off += rq.pf_done[rid]
                i += 1
            # admissions, FCFS
            waiting = self.waiting
            while waiting and pf_tok < room and b + len(self.prefilling) < self.max_seqs:
                rid = waiting[0]
                need = rq.peff[rid]
                chunk = need if need < room - pf_tok else room - pf_tok
                if self.ctx_sum + self.pf_kv + b + pf_tok + chunk > cap:
                    break
                waiting.popleft()
                self._admit(rid)
                sched.append((rid, chunk))
                pf_tok += chunk
        else:
            waiting = self.waiting
            while waiting and len(self.prefilling) + b < self.max_seqs:
                rid = waiting[0]
                need = rq.peff[rid]
                if pf_tok + need > self.budget or self.ctx_sum + self.pf_kv + pf_tok + need > cap:
                    break
                waiting.popleft()
                self._admit(rid)
                sched.append((rid, need))
                pf_tok += need
            if sched:
                b = 0  # prefill-only step: running decodes pause
        if not sched and b == 0:
            raise SimError(  # pragma: no cover - guarded by the admission rules and rejection at enqueue
                f"replica {self.idx}: scheduler made no progress at t={self.now:.6f}s"
            )
        dt = self.st.mixed(pf_tok, len(sched), pf_off, b, self.ctx_sum)
        self.now += dt
        self.steps += 1
        if pf_tok >= b:
            self.busy_prefill += dt
        else:
            self.busy_decode += dt
        if b:
            self.D += 1
            self.ctx_sum += b
            self.gen_tokens += b
        D = self.D
        for rid, chunk in sched:
            left = rq.pf_left[rid] - chunk
            rq.pf_left[rid] = left
            rq.pf_done[rid] += chunk
            self.pf_kv += chunk
            if left == 0:
                self.prefilling.remove(rid)
                pe = rq.peff[rid]
                self.pf_kv -= pe
                g = rq.gen_prev[rid] + 1
                self.gen_tokens += 1
                if rq.first[rid] != rq.first[rid]:  # NaN: first residency
                    rq.first[rid] = self.now
                if g >= rq.out[rid]:
                    self._finish(rid)
                else:
                    rq.state[rid] = _DECODE
                    rq.ds[rid] = D
                    self.ctx_sum += pe
                    self.n_dec += 1
                    heapq.heappush(self.heap, (D + rq.out[rid] - g, rq.adm[rid], rid))
        if self.heap and self.heap[0][0] <= D:
            self._pop_done()

    def _admit(self, rid: int) -> None:
        rq = self.rq
        a = self.adm_counter
        self.adm_counter = a + 1
        rq.adm[rid] = a
        rq.state[rid] = _PREFILL
        rq.pf_left[rid] = rq.peff[rid]
        rq.pf_done[rid] = 0
        self.order.append((a, rid))
        self.prefilling.append(rid)

    # -- decode-only stretch in closed form ---------------------------------------------------

    def _decode_stretch(self, t: float) -> None:
        b = self.n_dec
        free = self.cap - self.ctx_sum - self.pf_kv
        if free < b:
            self._preempt_last()
            return
        heap, rq = self.heap, self.rq
        while rq.adm[heap[0][2]] != heap[0][1]:
            heapq.heappop(heap)
        kmax = heap[0][0] - self.D
        kkv = free // b
        if kkv < kmax:
            kmax = kkv
        if self.stepwise:
            kmax = 1
        ctx = self.ctx_sum
        a = self.st.decode(b, ctx)
        s = (self.st.decode(b, ctx + b * (kmax - 1)) - a) / (kmax - 1) if kmax > 1 else 0.0
        k = kmax
        delta = t - self.now
        if t != _INF and kmax > 1 and kmax * a + s * kmax * (kmax - 1) * 0.5 > delta:
            # smallest k with T(k) = k*a + s*k*(k-1)/2 >= delta
            if abs(s) <= 1e-12 * a:
                k = int(math.ceil(delta / a))
            else:
                h = a - 0.5 * s
                disc = h * h + 2.0 * s * delta
                k = int(math.ceil((-h + math.sqrt(disc)) / s)) if disc >= 0 else kmax
            if k < 1:
                k = 1
            elif k > kmax:
                k = kmax
            while k > 1 and (k - 1) * a + s * (k - 1) * (k - 2) * 0.5 >= delta:
                k -= 1
            while k < kmax and k * a + s * k * (k - 1) * 0.5 < delta:
                k += 1
        T = k * a + s * k * (k - 1) * 0.5
        self.now += T
        self.busy_decode += T
        self.steps += k
        self.D += k
        self.ctx_sum += b * k
        self.gen_tokens += b * k
        if heap[0][0] <= self.D:
            self._pop_done()

    def advance(self, t: float) -> None:
        """Run every step that starts before ``t`` (seconds)."""
        while self.now < t:
            if self.prefilling or (self.waiting and self._can_admit()):
                self._mixed_step()
            elif self.n_dec:
                self._decode_stretch(t)
            elif self.waiting:  # pragma: no cover - rejection at enqueue makes this unreachable
                raise SimError(f"replica {self.idx}: request {self.waiting[0]} can never be admitted")
            else:
                return


# ----------------------------------------------------------------------------------------------
# Results


@dataclass
class TimeSeries:
    """Fleet-level load sampled every ``step_s`` seconds.

    Attributes (all arrays of shape (m,)):
        time_s: sample times, seconds (end of each bin: ``step_s, 2*step_s, ...``).
        arrivals: requests arriving in ``[time_s - step_s, time_s)``.
        completions: requests finishing in the same bin.
        queue: requests waiting (not admitted or preempted) summed over replicas, at ``time_s``.
        running: requests admitted (prefilling or decoding) summed over replicas, at ``time_s``.
        kv_usage: KV tokens in use / KV capacity, summed over the fleet, at ``time_s`` (0..1).
    """

    step_s: float
    time_s: np.ndarray
    arrivals: np.ndarray
    completions: np.ndarray
    queue: np.ndarray
    running: np.ndarray
    kv_usage: np.ndarray

    def to_frame(self) -> pd.DataFrame:
        """The series as a DataFrame indexed by ``time_s``."""
        return pd.DataFrame(
            {
                "arrivals": self.arrivals,
                "completions": self.completions,
                "queue": self.queue,
                "running": self.running,
                "kv_usage": self.kv_usage,
            },
            index=pd.Index(self.time_s, name="time_s"),
        )


def _pct(x: np.ndarray, q: float) -> float:
    x = x[~np.isnan(x)]
    return float(np.quantile(x, q)) if x.size else _NAN


@dataclass
class SimResult:
    """Outcome of :func:`simulate`.

    Per-request arrays, shape (n,) in trace order: ``ttft_s``, ``tpot_s`` (mean inter-token latency;
    NaN when one output token), ``e2e_s`` (all seconds; NaN for rejected requests), ``replica``
    (index into the fleet), ``output_tokens`` (served, after max_model_len truncation),
    ``preemptions`` (per request), ``attained`` (bool; all False without an SLO).

    Scalars: counts (``n_requests``, ``n_completed``, ``n_rejected``, ``n_truncated``,
    ``preemptions``); ``duration_s`` (trace span), ``makespan_s`` (last completion), ``horizon_s``
    (``max(duration_s, makespan_s)``: the fleet is paid for and powered over it); ``attainment``
    (fraction of all requests attaining the SLO, rejected count as misses; NaN without SLO),
    ``goodput_rps`` (attaining requests / ``duration_s``), ``throughput_rps`` and
    ``output_tokens_per_s`` (completed requests and their output tokens / ``makespan_s``),
    ``gpu_hours`` (sum over replicas of TP x ``horizon_s``/3600), ``cost_usd`` (sum of $/h x
    ``horizon_s``/3600), ``energy_j`` / ``energy_wh`` (per replica: prefill-dominated steps at
    ``perf.power_w("prefill")``, other busy steps at ``power_w("decode")``, idle time within
    ``horizon_s`` at ``power_w("idle")``), percentiles (p50/p90/p99 over completed requests) in
    ``percentiles[metric][q]`` and per-replica arrays ``replica_island``, ``replica_busy_s``,
    ``replica_energy_j``, ``replica_cost_usd``, ``replica_preemptions``, ``replica_completed``.
    """

    ttft_s: np.ndarray
    tpot_s: np.ndarray
    e2e_s: np.ndarray
    replica: np.ndarray
    output_tokens: np.ndarray
    preemptions_per_request: np.ndarray
    attained: np.ndarray
    n_requests: int
    n_completed: int
    n_rejected: int
    n_truncated: int
    preemptions: int
    duration_s: float
    makespan_s: float
    horizon_s: float
    attainment: float
    goodput_rps: float
    throughput_rps: float
    output_tokens_per_s: float
    gpu_hours: float
    cost_usd: float
    energy_j: float
    percentiles: dict[str, dict[str, float]]
    slo: SLOTarget | None
    slo_met: bool | None
    replica_island: list[str]
    replica_busy_s: np.ndarray
    replica_energy_j: np.ndarray
    replica_cost_usd: np.ndarray
    replica_preemptions: np.ndarray
    replica_completed: np.ndarray
    steps: int
    timeseries: TimeSeries | None = None
    router: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def energy_wh(self) -> float:
        """Energy in watt-hours (``energy_j / 3600``)."""
        return self.energy_j / 3600.0

    def summary(self) -> dict[str, Any]:
        """Scalar results as a JSON-ready dict (NaN -> None); latency keys like ``ttft_p99_s``."""
        out: dict[str, Any] = {
            "router": self.router,
            "requests": self.n_requests,
            "completed": self.n_completed,
            "rejected": self.n_rejected,
            "truncated": self.n_truncated,
            "preemptions": self.preemptions,
            "duration_s": self.duration_s,
            "makespan_s": self.makespan_s,
            "horizon_s": self.horizon_s,
            "throughput_rps": self.throughput_rps,
            "output_tokens_per_s": self.output_tokens_per_s,
            "attainment": self.attainment,
            "goodput_rps": self.goodput_rps,
            "slo_met": self.slo_met,
            "gpu_hours": self.gpu_hours,
            "cost_usd": self.cost_usd,
            "energy_j": self.energy_j,
            "energy_wh": self.energy_wh,
            "replicas": len(self.replica_island),
        }
        for metric, qs in self.percentiles.items():
            for q, v in qs.items():
                out[f"{metric}_{q}_s"] = v
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}

    def island_summary(self) -> pd.DataFrame:
        """Per-island totals: replicas, completed requests, busy fraction, preemptions, cost ($), energy (Wh)."""
        df = pd.DataFrame(
            {
                "island": self.replica_island,
                "replicas": 1,
                "completed": self.replica_completed,
                "busy_s": self.replica_busy_s,
                "preemptions": self.replica_preemptions,
                "cost_usd": self.replica_cost_usd,
                "energy_wh": self.replica_energy_j / 3600.0,
            }
        )
        g = df.groupby("island", sort=False).sum()
        g["busy_fraction"] = g["busy_s"] / (g["replicas"] * self.horizon_s) if self.horizon_s > 0 else 0.0
        return g.drop(columns=["busy_s"])


# ----------------------------------------------------------------------------------------------
# Driver


def _sample(reps: list[_Replica], t: float) -> tuple[int, int, float]:
    q = r = 0
    used = cap = 0
    for rep in reps:
        if rep.now < t:
            rep.advance(t)
        q += len(rep.waiting)
        r += rep.n_dec + len(rep.prefilling)
        used += rep.ctx_sum + rep.pf_kv
        cap += rep.cap
    return q, r, used / cap


def simulate(
    trace: Trace,
    replicas: Sequence[ReplicaSpec],
    router: Router | None = None,
    slo: SLOTarget | None = None,
    seed: int = 0,
    record_timeseries: bool = True,
    timeseries_step_s: float = 1.0,
    *,
    exact_steps: bool = False,
) -> SimResult:
    """Simulate serving ``trace`` on a fleet of ``replicas`` behind ``router``.

    Args:
        trace: requests (arrival seconds, prompt and output tokens).
        replicas: the fleet, one entry per replica (list ``[spec] * k`` for k identical replicas).
        router: defaults to :class:`LeastLoaded`. Bound afresh for each run.
        slo: latency targets for attainment, goodput and ``slo_met``; None skips them.
        seed: seeds the ``numpy.random.Generator`` given to the router; equal inputs and seed give
            identical results.
        record_timeseries: sample fleet load every ``timeseries_step_s`` seconds (slightly slower).
        timeseries_step_s: sampling period, seconds (> 0).
        exact_steps: advance decode-only stretches one step at a time instead of in closed form
            (much slower; used to validate the closed form).

    Returns:
        :class:`SimResult`.

    Raises:
        SimError: empty fleet, a replica whose model does not fit (``perf.fits`` false; message
        carries ``perf.fit_error``), bad limits, bad router configuration or step time.
    """
    if not replicas:
        raise SimError("the fleet is empty; give at least one ReplicaSpec")
    if not (math.isfinite(timeseries_step_s) and timeseries_step_s > 0):
        raise SimError(f"timeseries_step_s must be > 0 seconds, got {timeseries_step_s}")
    for i, spec in enumerate(replicas):
        if not getattr(spec.perf, "fits", True):
            raise SimError(
                f"replica {i} (island {spec.island!r}) does not fit: {getattr(spec.perf, 'fit_error', '') or 'no KV room'}"
            )
    router = router if router is not None else LeastLoaded()
    rng = np.random.Generator(np.random.PCG64(seed))
    router.bind(replicas, rng)

    rq = _Requests(trace)
    timers: dict[int, _StepTimer] = {}
    reps: list[_Replica] = []
    for i, spec in enumerate(replicas):
        timer = timers.get(id(spec.perf))
        if timer is None:
            timer = timers[id(spec.perf)] = _StepTimer(spec.perf)
        reps.append(_Replica(i, spec, rq, timer, exact_steps))

    n = len(trace)
    arrival = rq.arrival
    prompt = rq.prompt
    samples: list[tuple[float, int, int, float]] = []
    step = float(timeseries_step_s)
    next_sample = step
    cur_t = 0.0

    def load(r: int) -> int:
        rep = reps[r]
        if rep.now < cur_t:
            rep.advance(cur_t)
        return rep.outstanding

    choose = router.choose
    for i in range(n):
        t = arrival[i]
        if record_timeseries:
            while next_sample <= t:
                samples.append((next_sample, *_sample(reps, next_sample)))
                next_sample += step
        cur_t = t
        r = choose(prompt[i], load)
        if not 0 <= r < len(reps):
            raise SimError(f"router {router.name!r} returned replica {r}; fleet has {len(reps)}")
        rep = reps[r]
        if rep.now < t:
            rep.advance(t)
        rep.enqueue(i, t)
    if record_timeseries:
        # sample until the trace span is covered and every replica has finished its last step
        span = trace.duration_s
        while (
            next_sample <= span + step
            or any(rep.busy() for rep in reps)
            or next_sample - step < max(rep.now for rep in reps)
        ):
            samples.append((next_sample, *_sample(reps, next_sample)))
            next_sample += step
    for rep in reps:
        rep.advance(_INF)

    return _collect(trace, replicas, reps, rq, router, slo, samples, step if record_timeseries else None)


def _collect(
    trace: Trace,
    specs: Sequence[ReplicaSpec],
    reps: list[_Replica],
    rq: _Requests,
    router: Router,
    slo: SLOTarget | None,
    samples: list[tuple[float, int, int, float]],
    step: float | None,
) -> SimResult:
    n = len(trace)
    arr = trace.arrival_s
    first = np.asarray(rq.first, dtype=np.float64)
    finish = np.asarray(rq.finish, dtype=np.float64)
    out = np.asarray(rq.out, dtype=np.int64)
    state = np.asarray(rq.state, dtype=np.int8)
    done = state == _DONE
    ttft = np.where(done, first - arr, _NAN)
    e2e = np.where(done, finish - arr, _NAN)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(done & (out > 1), (finish - first) / np.maximum(out - 1, 1), _NAN)
    n_done = int(done.sum())
    makespan = float(np.nanmax(finish)) if n_done else 0.0
    duration = trace.duration_s
    horizon = max(duration, makespan)

    attained = np.zeros(n, dtype=bool)
    attainment = goodput = _NAN
    slo_met: bool | None = None
    if slo is not None:
        ok = done & (ttft <= slo.ttft_s) & (np.isnan(tpot) | (tpot <= slo.tpot_s))
        if slo.e2e_s is not None:
            ok &= e2e <= slo.e2e_s
        attained = ok
        attainment = float(ok.mean()) if n else _NAN
        span = duration if duration > 0 else makespan
        goodput = float(ok.sum()) / span if span > 0 else _NAN
        if n:
            # rejected requests count as infinitely late in the percentile checks
            t_all = np.where(done, ttft, _INF)
            p_all = np.where(done, np.nan_to_num(tpot, nan=0.0), _INF)
            with np.errstate(invalid="ignore"):  # inf - inf while interpolating -> NaN -> not met
                slo_met = bool(
                    np.quantile(t_all, slo.ttft_percentile) <= slo.ttft_s
                    and np.quantile(p_all, slo.tpot_percentile) <= slo.tpot_s
                    and attainment >= slo.attainment
                )
        else:
            slo_met = True

    pct = {}
    for name, x in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
        pct[name] = {"p50": _pct(x, 0.5), "p90": _pct(x, 0.9), "p99": _pct(x, 0.99), "mean": (
            float(np.nanmean(x)) if np.any(~np.isnan(x)) else _NAN)}

    busy = np.array([r.busy_prefill + r.busy_decode for r in reps])
    energy = np.zeros(len(reps))
    cost = np.zeros(len(reps))
    gpu_hours = 0.0
    power_cache: dict[int, tuple[float, float, float]] = {}
    for i, (spec, r) in enumerate(zip(specs, reps, strict=True)):
        pw = power_cache.get(id(spec.perf))
        if pw is None:
            pw = power_cache[id(spec.perf)] = (
                float(spec.perf.power_w("idle")), float(spec.perf.power_w("prefill")), float(spec.perf.power_w("decode"))
            )
        idle = max(0.0, horizon - busy[i])
        energy[i] = pw[0] * idle + pw[1] * r.busy_prefill + pw[2] * r.busy_decode
        cost[i] = spec.resolved_price() * horizon / 3600.0
        gpu_hours += int(getattr(spec.perf, "tp", 1)) * horizon / 3600.0

    ts = None
    if step is not None:
        times = np.array([s[0] for s in samples], dtype=np.float64)
        edges = np.concatenate([[0.0], times]) if len(times) else np.zeros(1)
        arrivals = np.histogram(arr, bins=edges)[0] if len(times) else np.zeros(0, dtype=np.int64)
        fin = finish[done]
        completions = np.histogram(fin, bins=edges)[0] if len(times) else np.zeros(0, dtype=np.int64)
        ts = TimeSeries(
            step_s=step,
            time_s=times,
            arrivals=arrivals.astype(np.int64),
            completions=completions.astype(np.int64),
            queue=np.array([s[1] for s in samples], dtype=np.int64),
            running=np.array([s[2] for s in samples], dtype=np.int64),
            kv_usage=np.array([s[3] for s in samples], dtype=np.float64),
        )

    out_served = np.where(state == _REJECTED, 0, out)
    return SimResult(
        ttft_s=ttft,
        tpot_s=tpot,
        e2e_s=e2e,
        replica=np.asarray(rq.replica, dtype=np.int32),
        output_tokens=out_served.astype(np.int32),
        preemptions_per_request=np.asarray(rq.npreempt, dtype=np.int32),
        attained=attained,
        n_requests=n,
        n_completed=n_done,
        n_rejected=int((state == _REJECTED).sum()),
        n_truncated=sum(r.truncated for r in reps),
        preemptions=sum(r.preemptions for r in reps),
        duration_s=duration,
        makespan_s=makespan,
        horizon_s=horizon,
        attainment=attainment,
        goodput_rps=goodput,
        throughput_rps=n_done / makespan if makespan > 0 else 0.0,
        output_tokens_per_s=float(out[done].sum()) / makespan if makespan > 0 else 0.0,
        gpu_hours=gpu_hours,
        cost_usd=float(cost.sum()),
        energy_j=float(energy.sum()),
        percentiles=pct,
        slo=slo,
        slo_met=slo_met,
        replica_island=[s.island for s in specs],
        replica_busy_s=busy,
        replica_energy_j=energy,
        replica_cost_usd=cost,
        replica_preemptions=np.array([r.preemptions for r in reps], dtype=np.int64),
        replica_completed=np.array([r.completed for r in reps], dtype=np.int64),
        steps=sum(r.steps for r in reps),
        timeseries=ts,
        router=router.name,
    )
