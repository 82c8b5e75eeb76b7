"""Trace replayer: real request traces through the routing ConfigMap to island endpoints.

:class:`Replayer` sends the requests of a :class:`~archipelago.decide.traces.Trace` (e.g. the Azure
LLM inference traces, Patel et al. "Splitwise", ISCA 2024, CC-BY-4.0) at their arrival times --
after a time window, arrival-rate scaling and an optional speed-up -- as OpenAI ``/v1/completions``
streaming requests:

1. route: the model's routing ConfigMap (``routes.json``, written by the operator:
   ``{"model", "routes": [{"minInputTokens", "maxInputTokens", "backends": [{"service", "port",
   "island", "role", "weight"}]}]}``) maps the prompt length to a range ``[min, max)`` (``max`` null =
   no bound; a length outside every range uses the nearest range, as a gateway's default route
   would) and a backend island Service drawn with the given weights (seeded);
2. endpoint: the Service's live addresses come from the fleet emulator's endpoint map (file or
   ``/endpoints`` URL), or the Service DNS name itself in a real cluster (:class:`DirectEndpoints`);
   the address with the fewest requests in flight gets the request (ties rotate);
3. measure, client side: TTFT (first streamed token), TPOT (``(e2e - TTFT) / (tokens - 1)``),
   end-to-end latency, errors (HTTP status, connection errors, timeouts, no route, no endpoint).

Prompt length is sent as the emulator's ``archipelago_prompt_tokens`` field with a short text, or
(``prompt_mode="ids"``) as a list of token ids for a real engine; the output length as ``max_tokens``
with ``ignore_eos`` (a vLLM sampling extension). The routing table and endpoints are re-read every
``refresh_s`` seconds, so re-plans take effect during a replay.

Speed-up: ``speedup`` divides every arrival time (wall clock) and multiplies measured latencies, to
be used with engines emulated at the same speed-up; ``rate_scale`` (applied to the trace before)
multiplies the arrival rate only.

SLO attainment follows the simulator (:class:`archipelago.decide.sim.SLOTarget`): a request attains
when it completed, TTFT <= ``ttft_s`` and TPOT <= ``tpot_s`` (single-token outputs have no TPOT);
errors count as misses.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from archipelago.decide.sim import SLOTarget
from archipelago.decide.traces import Trace

__all__ = [
    "ReplayError",
    "Backend",
    "Route",
    "RoutingTable",
    "EndpointSource",
    "FileEndpoints",
    "HttpEndpoints",
    "DirectEndpoints",
    "StaticEndpoints",
    "RequestRecord",
    "WindowStats",
    "ReplayResult",
    "Replayer",
    "summarize",
    "phased_trace",
    "routing_from_configmap",
]


class ReplayError(ValueError):
    """Bad replayer input: a malformed routing table or endpoint map (the message names the source and
    field), or bad options."""


# --------------------------------------------------------------------------------------------------
# routing


@dataclass(frozen=True)
class Backend:
    """One island Service a range routes to: ``service`` DNS name, ``port``, ``island`` id, ``weight``."""

    service: str
    port: int
    island: str
    weight: float


@dataclass(frozen=True)
class Route:
    """Prompt lengths ``[lo, hi)`` tokens (``hi`` None = unbounded) and their backends."""

    lo: int
    hi: int | None
    backends: tuple[Backend, ...]


class RoutingTable:
    """The routing ConfigMap's ranges, with weighted backend choice.

    Args:
        routes: :class:`Route` list (any order; must not overlap).
        model: the model (ConfigMap ``model`` field), informational.

    Raises:
        ReplayError: overlapping ranges or a range without backends.
    """

    def __init__(self, routes: Sequence[Route], model: str = "") -> None:
        rs = sorted(routes, key=lambda r: r.lo)
        for a, b in zip(rs, rs[1:], strict=False):
            if a.hi is None or b.lo < a.hi:
                raise ReplayError(f"routing ranges [{a.lo}, {a.hi}) and [{b.lo}, {b.hi}) overlap")
        for r in rs:
            if not r.backends:
                raise ReplayError(f"routing range [{r.lo}, {r.hi}) has no backends")
        self.routes = rs
        self.model = model
        self._los = [r.lo for r in rs]

    @classmethod
    def parse(cls, doc: str | Mapping[str, Any], source: str = "routes.json") -> RoutingTable:
        """Parse the ConfigMap's ``routes.json`` (text or decoded object).

        Raises:
            ReplayError: invalid JSON or a missing / ill-typed field (message names ``source`` and the
                JSON path, e.g. ``routes[1].backends[0].weight``).
        """
        if isinstance(doc, str):
            try:
                doc = json.loads(doc)
            except json.JSONDecodeError as exc:
                raise ReplayError(f"{source}: not valid JSON: {exc}") from None
        if not isinstance(doc, Mapping) or not isinstance(doc.get("routes"), list):
            raise ReplayError(f"{source}: expected an object with a 'routes' list")
        routes = []
        for i, r in enumerate(doc["routes"]):
            where = f"{source}: routes[{i}]"
            if not isinstance(r, Mapping):
                raise ReplayError(f"{where}: expected an object")
            lo, hi = r.get("minInputTokens", 0), r.get("maxInputTokens")
            if isinstance(lo, bool) or not isinstance(lo, int) or lo < 0:
                raise ReplayError(f"{where}.minInputTokens: expected an integer >= 0, got {lo!r}")
            if hi is not None and (isinstance(hi, bool) or not isinstance(hi, int) or hi <= lo):
                raise ReplayError(f"{where}.maxInputTokens: expected null or an integer > minInputTokens, got {hi!r}")
            bs = []
            for j, b in enumerate(r.get("backends") or []):
                bw = f"{where}.backends[{j}]"
                if not isinstance(b, Mapping) or not isinstance(b.get("service"), str):
                    raise ReplayError(f"{bw}.service: expected a Service DNS name")
                port = b.get("port")
                if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                    raise ReplayError(f"{bw}.port: expected a port number, got {port!r}")
                w = b.get("weight", 1.0)
                if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
                    raise ReplayError(f"{bw}.weight: expected a number >= 0, got {w!r}")
                bs.append(Backend(b["service"], port, str(b.get("island", "")), float(w)))
            if bs:
                routes.append(Route(int(lo), None if hi is None else int(hi), tuple(bs)))
        return cls(routes, str(doc.get("model", "")))

    def route_for(self, input_tokens: int) -> Route | None:
        """The range serving a prompt of ``input_tokens`` tokens (nearest range when outside all);
        None when the table is empty."""
        if not self.routes:
            return None
        j = bisect.bisect_right(self._los, input_tokens) - 1
        if j >= 0 and (self.routes[j].hi is None or input_tokens < self.routes[j].hi):
            return self.routes[j]
        best, best_d = self.routes[0], math.inf
        for r in self.routes:
            d = r.lo - input_tokens if input_tokens < r.lo else input_tokens - (r.hi if r.hi is not None else math.inf) + 1
            if d < best_d:
                best, best_d = r, d
        return best

    def choose(self, input_tokens: int, u: float) -> Backend | None:
        """Backend for a prompt of ``input_tokens`` given a uniform draw ``u`` in [0, 1): proportional
        to the weights (equal shares when all are 0). None when no route exists."""
        r = self.route_for(input_tokens)
        if r is None:
            return None
        ws = [b.weight for b in r.backends]
        total = sum(ws)
        if total <= 0:
            return r.backends[min(int(u * len(ws)), len(ws) - 1)]
        acc = 0.0
        for b, w in zip(r.backends, ws, strict=True):
            acc += w / total
            if u < acc:
                return b
        return r.backends[-1]


def routing_from_configmap(core_api: Any, namespace: str, name: str) -> RoutingTable | None:
    """Read ConfigMap ``namespace/name`` key ``routes.json`` through the Kubernetes API.

    Returns:
        the table, or None when the ConfigMap does not exist (yet).

    Raises:
        ReplayError: the ConfigMap exists but ``routes.json`` is missing or malformed.
    """
    try:
        cm = core_api.read_namespaced_config_map(name, namespace)
    except Exception as exc:  # noqa: BLE001 - kubernetes ApiException
        if getattr(exc, "status", None) == 404:
            return None
        raise
    data = cm.data or {}
    if "routes.json" not in data:
        raise ReplayError(f"ConfigMap {namespace}/{name}: no 'routes.json' key; is it the operator's routing ConfigMap?")
    return RoutingTable.parse(data["routes.json"], f"ConfigMap {namespace}/{name} routes.json")


# --------------------------------------------------------------------------------------------------
# endpoints


class EndpointSource:
    """Resolves an island Service to live ``host:port`` addresses. Subclasses implement :meth:`refresh`
    (may do I/O) and :meth:`addresses` (no I/O)."""

    async def refresh(self) -> None:
        """Re-read the endpoint map (no-op by default)."""

    def addresses(self, service: str, port: int) -> list[str]:
        """Addresses serving ``service`` (DNS name as in the routing table)."""
        raise NotImplementedError


class StaticEndpoints(EndpointSource):
    """A fixed ``{service: [host:port]}`` map (tests, or a hand-written file)."""

    def __init__(self, services: Mapping[str, Sequence[str]]) -> None:
        self.services = {k: list(v) for k, v in services.items()}

    def addresses(self, service: str, port: int) -> list[str]:
        return self.services.get(service, [])


class FileEndpoints(StaticEndpoints):
    """The fleet emulator's endpoints JSON file, re-read when it changes."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__({})
        self.path = Path(path)
        self._mtime = -1.0

    async def refresh(self) -> None:
        from archipelago.emulate.fleet import read_endpoints

        try:
            mt = self.path.stat().st_mtime
        except FileNotFoundError:
            self.services = {}
            return
        if mt != self._mtime:
            self.services = read_endpoints(self.path)
            self._mtime = mt


class HttpEndpoints(StaticEndpoints):
    """The fleet emulator's ``GET /endpoints`` URL (keeps the last map when it cannot be reached)."""

    def __init__(self, url: str, session: aiohttp.ClientSession | None = None) -> None:
        super().__init__({})
        self.url = url
        self.session = session

    async def refresh(self) -> None:
        if self.session is None:
            return
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with self.session.get(self.url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                doc = await r.json()
                if isinstance(doc, dict) and isinstance(doc.get("services"), dict):
                    self.services = {str(k): [str(a) for a in v] for k, v in doc["services"].items()}


class DirectEndpoints(EndpointSource):
    """In a real cluster: the Service DNS name itself (kube-proxy balances)."""

    def addresses(self, service: str, port: int) -> list[str]:
        return [f"{service}:{port}"]


# --------------------------------------------------------------------------------------------------
# records and summaries


@dataclass
class RequestRecord:
    """One replayed request. Times in (emulated) seconds; ``arrival_s`` is the trace time, ``sent_s``
    and ``done_s`` are seconds since the replay started (wall x latency scale).

    ``status``: ``ok``, ``http_<code>``, ``connect_error``, ``timeout``, ``stream_error``, ``no_route``,
    ``no_endpoint``.
    """

    index: int
    arrival_s: float
    input_tokens: int
    output_tokens: int
    island: str = ""
    endpoint: str = ""
    status: str = "pending"
    sent_s: float = math.nan
    done_s: float = math.nan
    ttft_s: float = math.nan
    tpot_s: float = math.nan
    e2e_s: float = math.nan
    completion_tokens: int = 0
    error: str = ""


def _attained(r: RequestRecord, slo: SLOTarget | None) -> bool:
    if r.status != "ok" or slo is None:
        return False
    ok = r.ttft_s <= slo.ttft_s and (math.isnan(r.tpot_s) or r.tpot_s <= slo.tpot_s)
    if slo.e2e_s is not None:
        ok = ok and r.e2e_s <= slo.e2e_s
    return ok


def _pcts(x: np.ndarray) -> dict[str, float | None]:
    x = x[~np.isnan(x)]
    if not x.size:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    return {"p50": float(np.quantile(x, 0.5)), "p90": float(np.quantile(x, 0.9)),
            "p99": float(np.quantile(x, 0.99)), "mean": float(x.mean())}


def summarize(records: Sequence[RequestRecord], slo: SLOTarget | None = None) -> dict[str, Any]:
    """Client-side summary of finished records.

    Returns:
        ``{"requests", "ok", "errors": {status: count}, "attainment" (None without SLO or requests),
        "ttft_s": {p50, p90, p99, mean}, "tpot_s": {...}, "e2e_s": {...}, "by_island": {island: count}}``;
        latencies in seconds over the ``ok`` requests.
    """
    done = [r for r in records if r.status != "pending"]
    ok = [r for r in done if r.status == "ok"]
    errors: dict[str, int] = {}
    for r in done:
        if r.status != "ok":
            errors[r.status] = errors.get(r.status, 0) + 1
    by_island: dict[str, int] = {}
    for r in ok:
        by_island[r.island] = by_island.get(r.island, 0) + 1
    att = None
    if slo is not None and done:
        att = sum(_attained(r, slo) for r in done) / len(done)
    return {
        "requests": len(done),
        "ok": len(ok),
        "errors": errors,
        "attainment": att,
        "ttft_s": _pcts(np.array([r.ttft_s for r in ok], dtype=float)),
        "tpot_s": _pcts(np.array([r.tpot_s for r in ok], dtype=float)),
        "e2e_s": _pcts(np.array([r.e2e_s for r in ok], dtype=float)),
        "by_island": by_island,
    }


@dataclass
class WindowStats:
    """Requests that finished in ``[start_s, end_s)`` of the replay clock (seconds), with their summary
    (see :func:`summarize`), the number sent in the window and in flight at its end."""

    start_s: float
    end_s: float
    sent: int
    in_flight: int
    summary: dict[str, Any]


@dataclass
class ReplayResult:
    """All records, the overall summary and the per-window stats of one replay."""

    records: list[RequestRecord]
    summary: dict[str, Any]
    windows: list[WindowStats] = field(default_factory=list)
    duration_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict: ``summary``, ``windows`` and ``duration_s`` (records omitted)."""
        return {"summary": self.summary, "duration_s": self.duration_s,
                "windows": [asdict(w) for w in self.windows]}

    def table(self, title: str = "replay") -> Any:
        """A ``rich.table.Table`` of the summary (counts, attainment, TTFT/TPOT/e2e percentiles, errors)."""
        from rich.table import Table

        s = self.summary
        t = Table(title=title)
        t.add_column("metric")
        t.add_column("p50", justify="right")
        t.add_column("p90", justify="right")
        t.add_column("p99", justify="right")
        for key, name in (("ttft_s", "TTFT (s)"), ("tpot_s", "TPOT (s)"), ("e2e_s", "e2e (s)")):
            v = s[key]
            t.add_row(name, *[("-" if v[q] is None else f"{v[q]:.3f}") for q in ("p50", "p90", "p99")])
        att = "-" if s["attainment"] is None else f"{100 * s['attainment']:.1f} %"
        t.caption = (f"{s['requests']} requests, {s['ok']} ok, SLO attainment {att}, errors "
                     f"{s['errors'] or 'none'}, islands {s['by_island']}")
        return t


def phased_trace(base: Trace, phases: Sequence[tuple[float, float]], start_s: float = 0.0) -> Trace:
    """A trace whose arrival rate changes by phase: consecutive windows of ``base`` replayed at
    ``rate_scale`` x their original rate.

    Args:
        base: the real trace.
        phases: ``[(duration_s, rate_scale), ...]``; phase ``k`` lasts ``duration_s`` seconds and replays the
            next ``duration_s * rate_scale`` seconds of ``base`` compressed by ``rate_scale``.
        start_s: where in ``base`` to start, seconds.

    Returns:
        the concatenated :class:`Trace` (``span_s`` = sum of durations).

    Raises:
        ReplayError: a non-positive duration or scale, or ``base`` too short for the phases.
    """
    arr, inp, out = [], [], []
    t_out = 0.0
    t_in = float(start_s)
    for i, (dur, scale) in enumerate(phases):
        if not (dur > 0 and scale > 0):
            raise ReplayError(f"phases[{i}]: duration and rate scale must be > 0, got ({dur}, {scale})")
        span = dur * scale
        if t_in + span > base.duration_s + 1e-9:
            raise ReplayError(
                f"phases[{i}]: needs base trace seconds [{t_in:g}, {t_in + span:g}) but {base.source} spans "
                f"{base.duration_s:g} s; shorten the phases or lower the rate scale"
            )
        w = base.window(t_in, t_in + span).scale_rate(scale)
        arr.append(w.arrival_s + t_out)
        inp.append(w.input_tokens)
        out.append(w.output_tokens)
        t_in += span
        t_out += dur
    desc = ",".join(f"{d:g}s@x{s:g}" for d, s in phases)
    return Trace(np.concatenate(arr) if arr else np.zeros(0), np.concatenate(inp) if inp else np.zeros(0, int),
                 np.concatenate(out) if out else np.zeros(0, int), source=f"{base.source}[{desc}]", span_s=t_out)


# --------------------------------------------------------------------------------------------------
# the replayer


class Replayer:
    """Replays a trace through a routing table to endpoints (module docstring).

    Args:
        trace: requests to send (already windowed / rate-scaled).
        routing: callable returning the current :class:`RoutingTable` (or None while none exists);
            called every ``refresh_s`` seconds (may block briefly; runs in a thread).
        endpoints: an :class:`EndpointSource`.
        slo: targets for attainment (None: no attainment).
        speedup: divides arrival times, multiplies measured latencies (> 0).
        seed: seeds the weighted backend choice.
        timeout_s: per-request wall timeout, seconds.
        refresh_s: routing / endpoint refresh period, wall seconds.
        window_s: period of :class:`WindowStats` callbacks, replay seconds (wall x speedup).
        on_window: called with each :class:`WindowStats` (e.g. to print progress).
        model: ``model`` field to send (None: omitted; the emulator accepts that).
        prompt_mode: ``field`` (``archipelago_prompt_tokens``) or ``ids`` (token-id list, exact on real engines).
        max_in_flight: cap on concurrent requests (later arrivals wait; counts toward their latency).

    Raises:
        ReplayError: bad options.
    """

    def __init__(self, trace: Trace, routing: Callable[[], RoutingTable | None], endpoints: EndpointSource, *,
                 slo: SLOTarget | None = None, speedup: float = 1.0, seed: int = 0, timeout_s: float = 600.0,
                 refresh_s: float = 2.0, window_s: float = 10.0,
                 on_window: Callable[[WindowStats], None] | None = None, model: str | None = None,
                 prompt_mode: str = "field", max_in_flight: int = 4096) -> None:
        if not speedup > 0:
            raise ReplayError(f"speedup must be > 0, got {speedup}")
        if prompt_mode not in ("field", "ids"):
            raise ReplayError(f"prompt_mode must be 'field' or 'ids', got {prompt_mode!r}")
        if not (timeout_s > 0 and refresh_s > 0 and window_s > 0 and max_in_flight >= 1):
            raise ReplayError("timeout_s, refresh_s, window_s must be > 0 and max_in_flight >= 1")
        self.trace = trace
        self.routing_fn = routing
        self.endpoints = endpoints
        self.slo = slo
        self.speedup = float(speedup)
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.timeout_s = timeout_s
        self.refresh_s = refresh_s
        self.window_s = window_s
        self.on_window = on_window
        self.model = model
        self.prompt_mode = prompt_mode
        self.max_in_flight = max_in_flight
        self.table: RoutingTable | None = None
        self.records = [RequestRecord(i, float(a), int(p), int(o)) for i, (a, p, o) in
                        enumerate(zip(trace.arrival_s, trace.input_tokens, trace.output_tokens, strict=True))]
        self._inflight: dict[str, int] = {}
        self._rot = 0
        self._t0 = 0.0
        self.routing_error: str | None = None

    def clock(self) -> float:
        """Replay seconds since the start (wall x speedup)."""
        return (time.monotonic() - self._t0) * self.speedup

    async def _refresh(self) -> None:
        try:
            self.table = await asyncio.to_thread(self.routing_fn)
            self.routing_error = None
        except Exception as exc:  # noqa: BLE001 - keep the last table; report
            self.routing_error = str(exc)
        with contextlib.suppress(Exception):
            await self.endpoints.refresh()

    def _pick(self, addrs: list[str]) -> str:
        n = len(addrs)
        start = self._rot % n
        self._rot += 1
        best, best_v = addrs[start], self._inflight.get(addrs[start], 0)
        for k in range(1, n):
            a = addrs[(start + k) % n]
            v = self._inflight.get(a, 0)
            if v < best_v:
                best, best_v = a, v
        return best

    def _body(self, r: RequestRecord) -> dict[str, Any]:
        p = max(1, r.input_tokens)
        body: dict[str, Any] = {"max_tokens": max(1, r.output_tokens), "ignore_eos": True, "stream": True,
                                "stream_options": {"include_usage": True}, "temperature": 0.0}
        if self.prompt_mode == "ids":
            body["prompt"] = [100] * p
        else:
            body["prompt"] = "replayed request"
            body["archipelago_prompt_tokens"] = p
        if self.model:
            body["model"] = self.model
        return body

    async def _send(self, session: aiohttp.ClientSession, r: RequestRecord, sem: asyncio.Semaphore) -> None:
        async with sem:
            table = self.table
            b = table.choose(r.input_tokens, float(self.rng.random())) if table is not None else None
            r.sent_s = self.clock()
            if b is None:
                r.status, r.done_s = "no_route", r.sent_s
                r.error = self.routing_error or "no routing table yet"
                return
            r.island = b.island
            addrs = self.endpoints.addresses(b.service, b.port)
            if not addrs:
                r.status, r.done_s, r.error = "no_endpoint", r.sent_s, f"no live endpoint for {b.service}"
                return
            addr = self._pick(addrs)
            r.endpoint = addr
            self._inflight[addr] = self._inflight.get(addr, 0) + 1
            t_send = time.monotonic()
            first = last = None
            tokens = 0
            usage_tokens = None
            try:
                async with session.post(f"http://{addr}/v1/completions", json=self._body(r),
                                        timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                    if resp.status != 200:
                        r.status = f"http_{resp.status}"
                        r.error = (await resp.text())[:300]
                    else:
                        async for raw in resp.content:
                            line = raw.strip()
                            if not line.startswith(b"data:"):
                                continue
                            data = line[5:].strip()
                            if data == b"[DONE]":
                                break
                            try:
                                d = json.loads(data)
                            except json.JSONDecodeError:
                                continue
                            if d.get("usage"):
                                usage_tokens = int(d["usage"].get("completion_tokens", 0))
                            for c in d.get("choices") or []:
                                if c.get("text"):
                                    now = time.monotonic()
                                    if first is None:
                                        first = now
                                    last = now
                                    tokens += 1
                        if first is None:
                            r.status, r.error = "stream_error", "stream ended without tokens"
                        else:
                            r.status = "ok"
            except TimeoutError:
                r.status, r.error = "timeout", f"no answer within {self.timeout_s:g} s"
            except aiohttp.ClientError as exc:
                r.status, r.error = "connect_error", str(exc)[:300]
            finally:
                self._inflight[addr] -= 1
            sc = self.speedup
            r.done_s = self.clock()
            if r.status == "ok":
                n = usage_tokens if usage_tokens else tokens
                r.completion_tokens = n
                r.ttft_s = (first - t_send) * sc
                r.e2e_s = (last - t_send) * sc
                r.tpot_s = (r.e2e_s - r.ttft_s) / (n - 1) if n > 1 else math.nan

    async def run(self, stop: asyncio.Event | None = None) -> ReplayResult:
        """Replay the whole trace (or until ``stop`` is set); waits for requests in flight.

        Returns:
            :class:`ReplayResult` with every record, the summary and the window stats.
        """
        stop = stop or asyncio.Event()
        self._t0 = time.monotonic()
        await self._refresh()
        windows: list[WindowStats] = []
        sem = asyncio.Semaphore(self.max_in_flight)
        conn = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(connector=conn) as session:
            if isinstance(self.endpoints, HttpEndpoints) and self.endpoints.session is None:
                self.endpoints.session = session
                await self.endpoints.refresh()
            tasks: list[asyncio.Task] = []
            done_flag = asyncio.Event()

            async def refresher() -> None:
                while not done_flag.is_set():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(done_flag.wait(), timeout=self.refresh_s)
                    await self._refresh()

            async def reporter() -> None:
                start = 0.0
                while not done_flag.is_set():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(done_flag.wait(), timeout=self.window_s / self.speedup)
                    end = self.clock()
                    fin = [r for r in self.records if r.status != "pending" and start <= r.done_s < end]
                    sent = sum(1 for r in self.records if start <= r.sent_s < end)
                    infl = sum(1 for r in self.records if r.status == "pending" and not math.isnan(r.sent_s))
                    w = WindowStats(start, end, sent, infl, summarize(fin, self.slo))
                    windows.append(w)
                    if self.on_window is not None:
                        self.on_window(w)
                    start = end

            bg = [asyncio.create_task(refresher()), asyncio.create_task(reporter())]
            try:
                for r in self.records:
                    due = r.arrival_s / self.speedup
                    delay = self._t0 + due - time.monotonic()
                    if delay > 0:
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(stop.wait(), timeout=delay)
                    if stop.is_set():
                        break
                    tasks.append(asyncio.create_task(self._send(session, r, sem)))
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                for t in tasks:
                    t.cancel()
                done_flag.set()
                for t in bg:
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
        return ReplayResult(records=self.records, summary=summarize(self.records, self.slo), windows=windows,
                            duration_s=self.clock())
