"""Real-time-steppable continuous-batching scheduler of one emulated engine replica.

The emulated vLLM / SGLang server (:mod:`archipelago.emulate.engine`) must batch and queue like the
trace-driven simulator (:mod:`archipelago.decide.sim`), but it receives requests one by one over
HTTP and must emit each token at its own time. The simulator's replica engine is private and runs
over a whole :class:`~archipelago.decide.traces.Trace` with closed-form decode stretches, so this
module re-implements the *same scheduling rules* one iteration at a time, with explicit per-request
token counts:

* every iteration ("step"), each running sequence in the decode phase emits one token;
* sequences still in prefill get their next prompt chunk first (admission order), then waiting
  requests are admitted first-come-first-served while ``max_num_seqs`` and the KV cache allow,
  their prompt chunked under the ``max_num_batched_tokens`` budget left after the decode tokens
  (vLLM v1 chunked prefill). With ``chunked_prefill=False`` a step either prefills whole prompts
  (decodes pause) or decodes;
* KV usage is the context (prompt + generated tokens) held by running sequences, in tokens. When the
  decode tokens of a step do not fit, the most recently admitted running sequence is preempted by
  *recompute* (vLLM v1 ``RECOMPUTE``): its KV is freed and it goes back to the head of the queue to
  re-prefill prompt + generated tokens. Tokens already emitted stay emitted;
* a step lasts ``perf.step_time(prefill_tokens, decode_seqs, mean_decode_context,
  prefill_context_tokens=mean_chunk_offset, prefill_seqs=chunks)`` seconds; the step that completes a
  sequence's prefill emits its first token (TTFT), every later step one more;
* admission checks as in the simulator: a prompt reaching ``max_model_len`` or a request whose prompt
  plus output cannot fit in the KV cache is rejected; an output longer than ``max_model_len - prompt``
  is truncated.

The class is pure (no clock, no asyncio): :meth:`BatchScheduler.schedule` plans the next step and its
duration, :meth:`BatchScheduler.complete` applies it at a given end time. The asyncio engine sleeps
in between; tests drive it in virtual time and compare with :func:`archipelago.decide.sim.simulate`.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "RequestRejected",
    "EmuRequest",
    "StepPlan",
    "StepOutcome",
    "BatchScheduler",
    "WAITING",
    "PREFILL",
    "DECODE",
    "DONE",
    "ABORTED",
]

WAITING, PREFILL, DECODE, DONE, ABORTED = "waiting", "prefill", "decode", "done", "aborted"


class RequestRejected(ValueError):
    """The engine refuses a request (HTTP 400 in vLLM): prompt too long for ``max_model_len`` or the
    request cannot fit in the KV cache. The message says which limit and by how much."""


@dataclass(eq=False)
class EmuRequest:
    """One request inside the emulated engine.

    Attributes:
        rid: request id (string, unique per engine).
        prompt_tokens: prompt length, tokens (>= 1).
        max_output_tokens: tokens to generate (>= 1), after ``max_model_len`` truncation.
        arrival: arrival time on the engine clock, seconds.
        stop_at_end: True when the output length came from the engine default (emulating an EOS
            token: finish reason ``stop``); False when it is the request's ``max_tokens`` (``length``).
        state: ``waiting`` / ``prefill`` / ``decode`` / ``done`` / ``aborted``.
        generated: output tokens emitted so far.
        peff: tokens to prefill in the current residency (prompt, or prompt + generated after a
            preemption).
        pf_done: tokens of ``peff`` already prefilled.
        kv: KV-cache tokens held while decoding.
        first_scheduled / first_token / last_token / prev_token / finished: engine-clock seconds
            (None until they happen); ``prev_token`` is the token before ``last_token``.
        preemptions: times this request was preempted.
        truncated: the output was cut to fit ``max_model_len``.
        finish_reason: ``length``, ``stop`` or ``abort`` once finished.
    """

    rid: str
    prompt_tokens: int
    max_output_tokens: int
    arrival: float
    stop_at_end: bool = False
    state: str = WAITING
    generated: int = 0
    peff: int = 0
    pf_done: int = 0
    kv: int = 0
    adm: int = -1
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    prev_token: float | None = None
    finished: float | None = None
    preemptions: int = 0
    truncated: bool = False
    finish_reason: str | None = None
    listener: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.peff == 0:
            self.peff = self.prompt_tokens


@dataclass
class StepPlan:
    """One planned engine iteration.

    Attributes:
        prefill: ``[(request, chunk_tokens), ...]`` prompt chunks in this step.
        decode: requests decoding one token in this step.
        duration: step time from the performance model, seconds (> 0).
        prefill_tokens: sum of the chunks, tokens.
        admitted: requests admitted from the queue by this step (their ``first_scheduled`` is set by
            :meth:`BatchScheduler.schedule` when it is given ``now``).
    """

    prefill: list[tuple[EmuRequest, int]]
    decode: list[EmuRequest]
    duration: float
    prefill_tokens: int
    admitted: list[EmuRequest] = field(default_factory=list)


@dataclass
class StepOutcome:
    """What a completed step produced (all lists may be empty).

    Attributes:
        tokens: requests that emitted exactly one token at the step's end.
        first_tokens: the subset of ``tokens`` that emitted their first token (first residency).
        finished: requests that finished at the step's end.
        preempted: requests preempted while planning this step (already back in the queue).
    """

    tokens: list[EmuRequest]
    first_tokens: list[EmuRequest]
    finished: list[EmuRequest]
    preempted: list[EmuRequest]


class BatchScheduler:
    """vLLM-v1-like iteration-level scheduler of one replica (rules in the module docstring).

    Args:
        perf: a :class:`~archipelago.decide.perf.PerfModel` (``step_time``, ``kv_capacity_tokens``,
            ``fits``, ``fit_error``, ``limits``).
        limits: engine limits (:class:`~archipelago.decide.perf.EngineLimits`); default ``perf.limits``.

    Raises:
        ValueError: the replica does not fit (``perf.fit_error``) or a limit is not positive.
    """

    def __init__(self, perf: Any, limits: Any = None) -> None:
        if not getattr(perf, "fits", True):
            raise ValueError(f"the model does not fit this replica: {getattr(perf, 'fit_error', '')}")
        lim = limits if limits is not None else perf.limits
        self.perf = perf
        self.cap = int(perf.kv_capacity_tokens)
        self.max_seqs = int(lim.max_num_seqs)
        self.budget = int(lim.max_num_batched_tokens)
        self.chunked = bool(getattr(lim, "chunked_prefill", True))
        mml = getattr(lim, "max_model_len", None)
        self.max_len = int(mml) if mml else 0
        if self.cap <= 0 or self.max_seqs <= 0 or self.budget <= 0:
            raise ValueError(
                f"kv_capacity_tokens={self.cap}, max_num_seqs={self.max_seqs}, "
                f"max_num_batched_tokens={self.budget}: all must be > 0"
            )
        self.waiting: deque[EmuRequest] = deque()
        self.running: list[EmuRequest] = []  # admission order (prefilling and decoding)
        self.ctx_sum = 0  # KV tokens held by decoding sequences
        self.pf_kv = 0  # KV tokens written so far by prefilling sequences
        self._adm = 0
        self.preemptions = 0
        self.steps = 0
        self._preempted: list[EmuRequest] = []
        self._admitted: list[EmuRequest] = []

    # -- admission ------------------------------------------------------------------------------

    def check(self, prompt_tokens: int, output_tokens: int) -> tuple[int, bool]:
        """Validate a request's shape; returns ``(output tokens after truncation, truncated)``.

        Raises:
            RequestRejected: prompt >= ``max_model_len``, or prompt + output > KV capacity, or (without
                chunked prefill) prompt + output - 1 > ``max_num_batched_tokens``.
        """
        p, n = max(1, int(prompt_tokens)), max(1, int(output_tokens))
        truncated = False
        if self.max_len:
            if p >= self.max_len:
                raise RequestRejected(
                    f"This model's maximum context length is {self.max_len} tokens. However, your prompt has "
                    f"{p} tokens; shorten the prompt"
                )
            if p + n > self.max_len:
                n, truncated = self.max_len - p, True
        if p + n > self.cap:
            raise RequestRejected(
                f"prompt ({p}) + output ({n}) tokens exceed the KV cache of this replica ({self.cap} tokens)"
            )
        if not self.chunked and p + n - 1 > self.budget:
            raise RequestRejected(
                f"prompt ({p}) + output ({n}) - 1 tokens exceed max_num_batched_tokens ({self.budget}) "
                "without chunked prefill"
            )
        return n, truncated

    def submit(self, req: EmuRequest) -> None:
        """Queue ``req`` (FCFS). Applies :meth:`check` (may truncate ``max_output_tokens``).

        Raises:
            RequestRejected: see :meth:`check`; the request is then not queued.
        """
        n, truncated = self.check(req.prompt_tokens, req.max_output_tokens)
        req.prompt_tokens = max(1, int(req.prompt_tokens))
        req.peff = req.prompt_tokens
        req.max_output_tokens, req.truncated = n, truncated
        req.state = WAITING
        self.waiting.append(req)

    def abort(self, req: EmuRequest, now: float) -> bool:
        """Remove ``req`` wherever it is (client went away); frees its KV. Returns False if already done."""
        if req.state in (DONE, ABORTED):
            return False
        if req.state == WAITING:
            with contextlib.suppress(ValueError):
                self.waiting.remove(req)
        else:
            self._release(req)
        req.state, req.finished, req.finish_reason = ABORTED, now, "abort"
        return True

    # -- state ----------------------------------------------------------------------------------

    def has_work(self) -> bool:
        """True while any request waits or runs."""
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        """Requests admitted to the batch (prefilling or decoding)."""
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """Requests queued (never admitted, or preempted)."""
        return len(self.waiting)

    @property
    def kv_usage(self) -> float:
        """Fraction of the KV cache in use, 0..1 (vLLM ``kv_cache_usage_perc``, SGLang ``token_usage``)."""
        return (self.ctx_sum + self.pf_kv) / self.cap

    # -- internals ------------------------------------------------------------------------------

    def _release(self, req: EmuRequest) -> None:
        self.running.remove(req)
        if req.state == PREFILL:
            self.pf_kv -= req.pf_done
        elif req.state == DECODE:
            self.ctx_sum -= req.kv
        req.kv = 0
        req.pf_done = 0
        req.adm = -1

    def _preempt_last(self) -> EmuRequest | None:
        if not self.running:
            return None
        req = self.running[-1]
        self._release(req)
        req.peff = req.prompt_tokens + req.generated
        req.state = WAITING
        req.preemptions += 1
        self.waiting.appendleft(req)
        self.preemptions += 1
        self._preempted.append(req)
        return req

    def _admit(self, req: EmuRequest, now: float | None) -> None:
        req.adm = self._adm
        self._adm += 1
        req.state = PREFILL
        req.pf_done = 0
        if req.first_scheduled is None and now is not None:
            req.first_scheduled = now
        self.running.append(req)
        self._admitted.append(req)

    def _decoders(self) -> list[EmuRequest]:
        return [r for r in self.running if r.state == DECODE]

    # -- one step -------------------------------------------------------------------------------

    def schedule(self, now: float | None = None) -> StepPlan | None:
        """Plan the next iteration (may preempt and admit). ``now`` stamps first scheduling, seconds
        (None: the caller stamps ``plan.admitted`` itself).

        Returns:
            the :class:`StepPlan`, or None when there is nothing to run.

        Raises:
            ValueError: the performance model returned a non-positive or non-finite step time.
        """
        cap = self.cap
        self._admitted = []
        dec = self._decoders()
        while dec and self.ctx_sum + self.pf_kv + len(dec) > cap:
            self._preempt_last()
            dec = self._decoders()
        b = len(dec)
        sched: list[tuple[EmuRequest, int]] = []
        pf_tok = 0
        pf_off = 0
        if self.chunked:
            room = self.budget - b
            pre = [r for r in self.running if r.state == PREFILL]
            i = 0
            while i < len(pre) and pf_tok < room:
                r = pre[i]
                chunk = min(r.peff - r.pf_done, room - pf_tok)
                if self.ctx_sum + self.pf_kv + b + pf_tok + chunk > cap:
                    victim = self._preempt_last()
                    dec = self._decoders()
                    b = len(dec)
                    room = self.budget - b
                    if victim is r or victim is None:
                        break
                    if victim in pre:
                        pre.remove(victim)
                    continue
                sched.append((r, chunk))
                pf_tok += chunk
                pf_off += r.pf_done
                i += 1
            while self.waiting and pf_tok < room and len(self.running) < self.max_seqs:
                r = self.waiting[0]
                chunk = min(r.peff, room - pf_tok)
                if self.ctx_sum + self.pf_kv + b + pf_tok + chunk > cap:
                    break
                self.waiting.popleft()
                self._admit(r, now)
                sched.append((r, chunk))
                pf_tok += chunk
        else:
            while self.waiting and len(self.running) < self.max_seqs:
                r = self.waiting[0]
                need = r.peff
                if pf_tok + need > self.budget or self.ctx_sum + self.pf_kv + pf_tok + need > cap:
                    break
                self.waiting.popleft()
                self._admit(r, now)
                sched.append((r, need))
                pf_tok += need
            if sched:
                dec, b = [], 0  # prefill-only step: running decodes pause
        if not sched and b == 0:
            return None
        mean_ctx = self.ctx_sum / b if b else 0.0
        ps = len(sched)
        off = pf_off / ps if ps else 0.0
        dt = float(self.perf.step_time(pf_tok, b, mean_ctx, prefill_context_tokens=off, prefill_seqs=ps if ps else 1))
        if not (dt > 0 and math.isfinite(dt)):
            raise ValueError(f"perf.step_time({pf_tok}, {b}, {mean_ctx:g}) returned {dt!r}; a step must take > 0 s")
        return StepPlan(prefill=sched, decode=dec, duration=dt, prefill_tokens=pf_tok, admitted=self._admitted)

    def complete(self, plan: StepPlan, t_end: float) -> StepOutcome:
        """Apply ``plan`` as finished at ``t_end`` (seconds): emit tokens, finish and move sequences.

        Requests aborted while the step ran are skipped.
        """
        self.steps += 1
        tokens: list[EmuRequest] = []
        first: list[EmuRequest] = []
        finished: list[EmuRequest] = []
        for r in plan.decode:
            if r.state != DECODE:
                continue
            r.kv += 1
            self.ctx_sum += 1
            self._emit(r, t_end, tokens)
            if r.generated >= r.max_output_tokens:
                self._finish(r, t_end, finished)
        for r, chunk in plan.prefill:
            if r.state != PREFILL:
                continue
            r.pf_done += chunk
            self.pf_kv += chunk
            if r.pf_done >= r.peff:
                self.pf_kv -= r.pf_done
                r.pf_done = 0
                if r.first_token is None:
                    first.append(r)
                self._emit(r, t_end, tokens)
                if r.generated >= r.max_output_tokens:
                    self.running.remove(r)
                    r.adm = -1
                    r.state = DONE
                    r.finished = t_end
                    r.finish_reason = "stop" if r.stop_at_end else "length"
                    finished.append(r)
                else:
                    r.state = DECODE
                    r.kv = r.peff
                    self.ctx_sum += r.peff
        pre, self._preempted = self._preempted, []
        return StepOutcome(tokens=tokens, first_tokens=first, finished=finished, preempted=pre)

    @staticmethod
    def _emit(r: EmuRequest, t: float, out: list[EmuRequest]) -> None:
        r.generated += 1
        if r.first_token is None:
            r.first_token = t
        r.prev_token, r.last_token = r.last_token, t
        out.append(r)

    def _finish(self, r: EmuRequest, t: float, out: list[EmuRequest]) -> None:
        self._release(r)
        r.state = DONE
        r.finished = t
        r.finish_reason = "stop" if r.stop_at_end else "length"
        out.append(r)

    # -- offline driver (tests, calibration) --------------------------------------------------------

    def run_virtual(self, arrivals: Iterable[tuple[float, int, int]]) -> list[EmuRequest]:
        """Serve ``(arrival_s, prompt_tokens, output_tokens)`` requests in virtual time, step by step.

        The same loop as the real-time engine with the clock replaced by the step durations: a step
        starts at ``max(end of previous step, now)``; requests arriving while a step runs are
        admitted at the next step boundary. Rejected requests are returned with state ``waiting``
        and ``finish_reason='rejected'``.

        Returns:
            the requests in input order, with their timestamps filled in.
        """
        items = sorted(enumerate(arrivals), key=lambda x: x[1][0])
        reqs: list[EmuRequest | None] = [None] * len(items)
        t = 0.0
        k = 0
        n = len(items)
        while k < n or self.has_work():
            if not self.has_work() and k < n:
                t = max(t, items[k][1][0])
            while k < n and items[k][1][0] <= t:
                idx, (a, p, o) = items[k]
                req = EmuRequest(rid=str(idx), prompt_tokens=int(p), max_output_tokens=int(o), arrival=float(a))
                reqs[idx] = req
                try:
                    self.submit(req)
                except RequestRejected:
                    req.finish_reason = "rejected"
                k += 1
            plan = self.schedule(t)
            if plan is None:
                if k < n:
                    t = max(t, items[k][1][0])
                    continue
                break
            t += plan.duration
            self.complete(plan, t)
        return [r for r in reqs if r is not None]
