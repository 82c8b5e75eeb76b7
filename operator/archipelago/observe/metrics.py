"""Workload and latency of one model from Prometheus (vLLM and SGLang metric names).

:func:`observe_model` runs a fixed set of PromQL queries over a configurable window through
``prometheus-api-client`` and returns an :class:`ObservedWorkload`. Rules:

* A missing series means **unknown** (``None``), never zero. A series that exists and shows no
  traffic is a real zero. ``histogram_quantile`` over no observations (NaN) is unknown too.
* Prometheus unreachable (connection refused, timeout, HTTP 5xx) raises
  :class:`PrometheusUnavailable`, which the controller turns into a Warning Event and a condition
  while it keeps the last good plan. A query Prometheus rejects (HTTP 4xx) raises
  :class:`MetricsQueryError` (a bug in a query or a selector, not an outage).

Metric names (``shared/reference/FACTS.md``): vLLM v1 ``vllm:request_success_total``,
``vllm:request_prompt_tokens`` / ``vllm:request_generation_tokens`` (histograms, tokens),
``vllm:prompt_tokens_total`` / ``vllm:generation_tokens_total``,
``vllm:time_to_first_token_seconds``, ``vllm:inter_token_latency_seconds`` (older
``vllm:time_per_output_token_seconds``), ``vllm:kv_cache_usage_perc`` (older
``vllm:gpu_cache_usage_perc``), ``vllm:num_requests_running`` / ``vllm:num_requests_waiting``.
SGLang ``sglang:num_requests_total``, ``sglang:prompt_tokens_total``,
``sglang:generation_tokens_total``, ``sglang:time_to_first_token_seconds``,
``sglang:inter_token_latency_seconds``, ``sglang:token_usage``, ``sglang:num_running_reqs``,
``sglang:num_queue_reqs`` (SGLang exports no prompt/generation length histograms).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import requests
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
from urllib3.util.retry import Retry

EngineName = Literal["vllm", "sglang"]


class PrometheusUnavailable(RuntimeError):
    """Prometheus could not be reached (connection error, timeout, HTTP 5xx). Keep the last plan."""


class MetricsQueryError(RuntimeError):
    """Prometheus rejected a query (HTTP 4xx): a bad selector or metric name, not an outage."""


@dataclass(frozen=True)
class EngineMetricNames:
    """Metric names of one engine. Each entry is a tuple of alternatives tried in order."""

    requests_total: tuple[str, ...]
    prompt_tokens_total: tuple[str, ...]
    generation_tokens_total: tuple[str, ...]
    prompt_len_hist: tuple[str, ...]
    output_len_hist: tuple[str, ...]
    ttft_hist: tuple[str, ...]
    itl_hist: tuple[str, ...]
    kv_usage: tuple[str, ...]
    running: tuple[str, ...]
    waiting: tuple[str, ...]


METRIC_NAMES: dict[str, EngineMetricNames] = {
    "vllm": EngineMetricNames(
        requests_total=("vllm:request_success_total",),
        prompt_tokens_total=("vllm:prompt_tokens_total",),
        generation_tokens_total=("vllm:generation_tokens_total",),
        prompt_len_hist=("vllm:request_prompt_tokens",),
        output_len_hist=("vllm:request_generation_tokens",),
        ttft_hist=("vllm:time_to_first_token_seconds",),
        itl_hist=("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
        kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        running=("vllm:num_requests_running",),
        waiting=("vllm:num_requests_waiting",),
    ),
    "sglang": EngineMetricNames(
        requests_total=("sglang:num_requests_total",),
        prompt_tokens_total=("sglang:prompt_tokens_total",),
        generation_tokens_total=("sglang:generation_tokens_total",),
        prompt_len_hist=(),
        output_len_hist=(),
        ttft_hist=("sglang:time_to_first_token_seconds",),
        itl_hist=("sglang:inter_token_latency_seconds",),
        kv_usage=("sglang:token_usage",),
        running=("sglang:num_running_reqs",),
        waiting=("sglang:num_queue_reqs",),
    ),
}


@dataclass(frozen=True)
class HistogramBucket:
    """One bucket of a length histogram: observations with ``lo < x <= hi`` (tokens), ``count`` of them
    in the window (may be fractional: Prometheus ``increase`` extrapolates)."""

    lo: float
    hi: float
    count: float


@dataclass(frozen=True)
class IslandObservation:
    """Measured service of one island (one value of the island label) over the query window.

    Attributes:
        island: the island label value (``<pool>-tp<N>``, as on the pods).
        completion_rate: finished requests per second (None when unknown).
        ttft_p_s / itl_p_s: TTFT and inter-token latency at the asked quantiles (seconds; None when
            the island served nothing in the window or the series are missing).
        waiting: requests queued now, summed over the island's replicas.
        waiting_delta: growth of that queue over the window (negative: a backlog is draining).
        running: requests in the running batch now, summed over replicas.
        running_delta: growth of the running batch over the window.
        itl_mean_s: mean inter-token latency over the window (histogram sum / count, seconds).
    """

    island: str
    completion_rate: float | None = None
    ttft_p_s: float | None = None
    itl_p_s: float | None = None
    waiting: float | None = None
    waiting_delta: float | None = None
    running: float | None = None
    running_delta: float | None = None
    itl_mean_s: float | None = None


@dataclass(frozen=True)
class ObservedWorkload:
    """What Prometheus says about one model over ``window_s`` seconds. ``None`` means unknown.

    Attributes:
        engine: ``vllm`` or ``sglang``.
        window_s: the query window (seconds).
        request_rate: arrival rate, requests/s: finished requests per second plus the growth of the
            requests in the system (waiting + running) over the window divided by the window
            (flow conservation; equals the completion rate in steady state).
        completion_rate: finished requests per second.
        prompt_tokens_mean / output_tokens_mean: mean prompt / generated tokens per request.
        prompt_len_buckets / output_len_buckets: per-bucket request counts of prompt / output lengths.
        ttft_p_s / itl_p_s: TTFT and inter-token latency at ``quantile`` (seconds).
        quantile: the latency quantile asked for (e.g. 0.99).
        kv_cache_usage: mean KV-cache usage over replicas (0-1).
        running / waiting: requests running / queued, summed over replicas.
        output_mean_by_prompt_bucket: mean generated tokens per request for each bucket of
            ``prompt_len_buckets`` (same order), estimated from per-island series (see
            :func:`output_means_by_prompt_bucket`); None unless at least two islands report. Not
            listed in ``unknown``: it refines the global mean and is optional.
        shape_window_s: the window of the lengths, histograms and output means (seconds; None means
            ``window_s``).
        islands: per-island service (:class:`IslandObservation`), when a ``group_label`` was given
            (None otherwise); the operator compares it with the SLO to correct capacities it
            over-estimated.
        unknown: names of the figures that are unknown, for the status message.
    """

    engine: str
    window_s: float
    quantile: float
    request_rate: float | None = None
    completion_rate: float | None = None
    prompt_tokens_mean: float | None = None
    output_tokens_mean: float | None = None
    prompt_len_buckets: tuple[HistogramBucket, ...] | None = None
    output_len_buckets: tuple[HistogramBucket, ...] | None = None
    ttft_p_s: float | None = None
    itl_p_s: float | None = None
    kv_cache_usage: float | None = None
    running: float | None = None
    waiting: float | None = None
    unknown: tuple[str, ...] = field(default_factory=tuple)
    output_mean_by_prompt_bucket: tuple[float, ...] | None = None
    islands: tuple[IslandObservation, ...] | None = None
    shape_window_s: float | None = None

    @property
    def has_load(self) -> bool:
        """True when the figures a planner needs (rate and mean lengths) are all known."""
        return None not in (self.request_rate, self.prompt_tokens_mean, self.output_tokens_mean)


def selector(matchers: Mapping[str, str]) -> str:
    """PromQL label selector body ``{a="x",b="y"}`` with values escaped; ``""`` when empty."""
    if not matchers:
        return ""
    parts = []
    for k, v in sorted(matchers.items()):
        ev = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        parts.append(f'{k}="{ev}"')
    return "{" + ",".join(parts) + "}"


def _window(window_s: float) -> str:
    if window_s < 1:
        raise ValueError(f"window_s: {window_s} must be >= 1 second")
    return f"{int(round(window_s))}s"


def make_client(url: str, timeout_s: float = 5.0) -> PrometheusConnect:
    """A ``PrometheusConnect`` with a short timeout and one retry, so an outage is noticed in seconds."""
    retry = Retry(total=1, backoff_factor=0.2, status_forcelist=[502, 503, 504])
    return PrometheusConnect(url=url, disable_ssl=True, retry=retry, timeout=timeout_s)


_M = "\x00METRIC\x00"  # placeholder for the metric name in query templates (selectors contain braces)
QueryFn = Callable[[str], list[dict[str, Any]]]


def _wrap_query(client: Any) -> QueryFn:
    def q(promql: str) -> list[dict[str, Any]]:
        try:
            return client.custom_query(promql)
        except PrometheusApiClientException as e:
            msg = str(e)
            if "HTTP Status Code 4" in msg:
                raise MetricsQueryError(f"Prometheus rejected query {promql!r}: {msg[:300]}") from e
            raise PrometheusUnavailable(f"Prometheus at {getattr(client, 'url', '?')} failed: {msg[:300]}") from e
        except requests.RequestException as e:
            raise PrometheusUnavailable(
                f"Prometheus at {getattr(client, 'url', '?')} is unreachable: {type(e).__name__}: {str(e)[:200]}"
            ) from e

    return q


def _scalar(result: list[dict[str, Any]]) -> float | None:
    """The single value of an aggregated instant query; ``None`` for no series or NaN."""
    if not result:
        return None
    try:
        v = float(result[0]["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return None if math.isnan(v) or math.isinf(v) else v


def _first_known(q: QueryFn, names: tuple[str, ...], template: str) -> float | None:
    for name in names:
        v = _scalar(q(template.replace(_M, name)))
        if v is not None:
            return v
    return None


def _buckets(result: list[dict[str, Any]]) -> tuple[HistogramBucket, ...] | None:
    """Cumulative ``le`` counts (one series per ``le``) -> per-bucket counts. ``None`` if no series."""
    pts: list[tuple[float, float]] = []
    for s in result:
        le = s.get("metric", {}).get("le")
        if le is None:
            continue
        try:
            hi = float(le)
            c = float(s["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        if math.isnan(c):
            continue
        pts.append((hi, c))
    if not pts:
        return None
    pts.sort()
    out = []
    lo, prev = 0.0, 0.0
    for hi, c in pts:
        out.append(HistogramBucket(lo=lo, hi=hi, count=max(0.0, c - prev)))
        lo, prev = hi, max(prev, c)
    return tuple(out)


def output_means_by_prompt_bucket(prompt_buckets: tuple[HistogramBucket, ...],
                                  per_group: Mapping[str, tuple[tuple[HistogramBucket, ...], float]],
                                  overall_mean: float) -> tuple[float, ...] | None:
    """Mean output length (tokens) per prompt-length bucket from per-group (per-island) series.

    Engines export prompt- and output-length histograms separately, so the correlation between them
    (on the Azure conversation trace, 1-2k-token prompts get ~380-token answers and >2k-token prompts
    ~70) is invisible in one model-wide pair. The operator routes prompt-length ranges to different
    islands, so each island's mean output is the mean over the prompt buckets it serves; a bucket gets
    the request-weighted mean of the islands that served it: ``out_b = sum_i c_ib m_i / sum_i c_ib``
    (``c_ib`` requests of island ``i`` in bucket ``b``, ``m_i`` its generated tokens per request).
    Buckets no island served get ``overall_mean``.

    Args:
        prompt_buckets: the model-wide prompt-length histogram (defines the bucket order).
        per_group: ``{group: (its prompt-length histogram, its mean generated tokens per request)}``.
        overall_mean: the model-wide mean generated tokens per request.

    Returns:
        a tuple aligned with ``prompt_buckets``, or None when fewer than two groups have requests (one
        island's mean is just the model-wide mean).
    """
    groups = {g: v for g, v in per_group.items() if sum(b.count for b in v[0]) > 0 and v[1] > 0}
    if len(groups) < 2:
        return None
    out = []
    for pb in prompt_buckets:
        num = den = 0.0
        for hist, m in groups.values():
            c = sum(b.count for b in hist if b.hi == pb.hi)
            num += c * m
            den += c
        out.append(num / den if den > 0 else overall_mean)
    return tuple(out)


def observe_model(client: Any, engine: str, matchers: Mapping[str, str], window_s: float = 300.0,
                  quantile: float = 0.99, group_label: str | None = None,
                  island_quantiles: tuple[float, float] | None = None,
                  shape_window_s: float | None = None) -> ObservedWorkload:
    """Query workload and latency of one model.

    Args:
        client: a ``PrometheusConnect`` (or any object with ``custom_query(str) -> list``).
        engine: ``vllm`` or ``sglang`` (chooses the metric names).
        matchers: exact label matchers selecting the model's series, e.g.
            ``{"namespace": "llm", "archipelago_dev_model": "chat"}`` or ``{"model_name": "..."}``.
        window_s: rate/increase window in seconds (>= 1).
        quantile: latency quantile in (0, 1), e.g. 0.99 for p99.
        group_label: label that tells the model's islands apart (e.g. ``archipelago_dev_island``);
            when given, per-island series estimate ``output_mean_by_prompt_bucket`` and give
            ``islands`` (per-island service).
        island_quantiles: ``(TTFT quantile, inter-token latency quantile)`` of the per-island
            latencies, in (0, 1) -- the SLO's percentiles; default ``(quantile, quantile)``.
        shape_window_s: window of the workload's *shape* -- mean lengths, length histograms, output
            means per prompt bucket -- in seconds; ``max(window_s, shape_window_s)`` is used (default
            ``window_s``). The rate needs a short window to follow load steps; the shape of a
            stationary mix is better estimated over a longer one (30 s windows of a 10 req/s trace
            swung per-bucket output means between ~150 and ~390 tokens in the loop e2e).

    Raises:
        PrometheusUnavailable: Prometheus unreachable or failing (5xx).
        MetricsQueryError: a query was rejected (4xx).
        ValueError: unknown engine, bad window or quantile.
    """
    if engine not in METRIC_NAMES:
        raise ValueError(f"engine: {engine!r} has no metric names; use vllm or sglang")
    iq = island_quantiles or (quantile, quantile)
    for qv in (quantile, *iq):
        if not 0.0 < qv < 1.0:
            raise ValueError(f"quantile: {qv} must be in (0, 1)")
    if group_label and not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", group_label):
        raise ValueError(f"group_label: {group_label!r} is not a Prometheus label name")
    names = METRIC_NAMES[engine]
    sel = selector(matchers)
    w = _window(window_s)
    q = _wrap_query(client)

    completion_rate = _first_known(q, names.requests_total, f"sum(rate({_M}{sel}[{w}]))")
    # arrivals = completions + growth of the requests in the system (flow conservation): under
    # overload the completion rate alone understates demand, and planning on it never catches up
    d_wait = _first_known(q, names.waiting, f"sum(delta({_M}{sel}[{w}]))")
    d_run = _first_known(q, names.running, f"sum(delta({_M}{sel}[{w}]))")
    rate = completion_rate
    if rate is not None and d_wait is not None:
        rate = rate + max(0.0, d_wait + (d_run or 0.0)) / float(window_s)
    shape_s = max(float(window_s), float(shape_window_s or 0.0))
    ws = _window(shape_s)
    inc_req = _first_known(q, names.requests_total, f"sum(increase({_M}{sel}[{ws}]))")
    inc_prompt = _first_known(q, names.prompt_tokens_total, f"sum(increase({_M}{sel}[{ws}]))")
    inc_gen = _first_known(q, names.generation_tokens_total, f"sum(increase({_M}{sel}[{ws}]))")

    def mean(tokens: float | None) -> float | None:
        if tokens is None or inc_req is None or inc_req <= 0:
            return None
        return tokens / inc_req

    def hist(hnames: tuple[str, ...]) -> tuple[HistogramBucket, ...] | None:
        for name in hnames:
            b = _buckets(q(f"sum by (le) (increase({name}_bucket{sel}[{ws}]))"))
            if b is not None:
                return b
        return None

    def hq(hnames: tuple[str, ...]) -> float | None:
        return _first_known(
            q, hnames, f"histogram_quantile({quantile}, sum by (le) (rate({_M}_bucket{sel}[{w}])))"
        )

    obs: dict[str, Any] = {
        "request_rate": rate,
        "completion_rate": completion_rate,
        "prompt_tokens_mean": mean(inc_prompt),
        "output_tokens_mean": mean(inc_gen),
        "prompt_len_buckets": hist(names.prompt_len_hist),
        "output_len_buckets": hist(names.output_len_hist),
        "ttft_p_s": hq(names.ttft_hist),
        "itl_p_s": hq(names.itl_hist),
        "kv_cache_usage": _first_known(q, names.kv_usage, f"avg({_M}{sel})"),
        "running": _first_known(q, names.running, f"sum({_M}{sel})"),
        "waiting": _first_known(q, names.waiting, f"sum({_M}{sel})"),
    }
    unknown = tuple(k for k, v in obs.items() if v is None)
    by_bucket = None
    if group_label and obs["prompt_len_buckets"] and obs["output_tokens_mean"] and names.prompt_len_hist:
        by_bucket = _output_by_bucket(q, names, sel, ws, group_label, obs["prompt_len_buckets"],
                                      obs["output_tokens_mean"])
    islands = _islands(q, names, sel, w, group_label, iq) if group_label else None
    return ObservedWorkload(engine=engine, window_s=float(window_s), quantile=quantile, unknown=unknown,
                            output_mean_by_prompt_bucket=by_bucket, islands=islands, shape_window_s=shape_s, **obs)


def _per_group(q: QueryFn, names: tuple[str, ...], template: str, group: str) -> dict[str, float]:
    """``{group value: number}`` from the first metric name that has series (NaN/Inf values left out)."""
    for name in names:
        rows = q(template.replace(_M, name))
        if not rows:
            continue
        out: dict[str, float] = {}
        for r in rows:
            g = (r.get("metric") or {}).get(group)
            v = _scalar([r])
            if g is not None and v is not None:
                out[str(g)] = v
        return out
    return {}


def _islands(q: QueryFn, names: EngineMetricNames, sel: str, w: str, group: str,
             quantiles: tuple[float, float]) -> tuple[IslandObservation, ...]:
    done = _per_group(q, names.requests_total, f"sum by ({group}) (rate({_M}{sel}[{w}]))", group)
    hq = "histogram_quantile({q}, sum by ({g}, le) (rate({m}_bucket{sel}[{w}])))"
    ttft = _per_group(q, names.ttft_hist, hq.format(q=quantiles[0], g=group, m=_M, sel=sel, w=w), group)
    itl = _per_group(q, names.itl_hist, hq.format(q=quantiles[1], g=group, m=_M, sel=sel, w=w), group)
    waiting = _per_group(q, names.waiting, f"sum by ({group}) ({_M}{sel})", group)
    d_wait = _per_group(q, names.waiting, f"sum by ({group}) (delta({_M}{sel}[{w}]))", group)
    running = _per_group(q, names.running, f"sum by ({group}) ({_M}{sel})", group)
    d_run = _per_group(q, names.running, f"sum by ({group}) (delta({_M}{sel}[{w}]))", group)
    itl_mean = _per_group(q, names.itl_hist, f"sum by ({group}) (rate({_M}_sum{sel}[{w}])) / "
                                             f"sum by ({group}) (rate({_M}_count{sel}[{w}]))", group)
    keys = sorted(set(done) | set(ttft) | set(itl) | set(waiting))
    return tuple(IslandObservation(k, done.get(k), ttft.get(k), itl.get(k), waiting.get(k), d_wait.get(k),
                                   running.get(k), d_run.get(k), itl_mean.get(k)) for k in keys)


def _output_by_bucket(q: QueryFn, names: EngineMetricNames, sel: str, w: str, group: str,
                      prompt_buckets: tuple[HistogramBucket, ...], overall: float) -> tuple[float, ...] | None:
    hists: dict[str, list[dict[str, Any]]] = {}
    for r in q(f"sum by ({group}, le) (increase({names.prompt_len_hist[0]}_bucket{sel}[{w}]))"):
        g = (r.get("metric") or {}).get(group)
        if g is not None:
            hists.setdefault(str(g), []).append(r)
    gens = _per_group(q, names.generation_tokens_total[:1], f"sum by ({group}) (increase({_M}{sel}[{w}]))", group)
    reqs = _per_group(q, names.requests_total[:1], f"sum by ({group}) (increase({_M}{sel}[{w}]))", group)
    per: dict[str, tuple[tuple[HistogramBucket, ...], float]] = {}
    for g, rows in hists.items():
        b = _buckets(rows)
        n, tok = reqs.get(g), gens.get(g)
        if b is not None and n and tok is not None and n > 0:
            per[g] = (b, tok / n)
    return output_means_by_prompt_bucket(prompt_buckets, per, overall)


def bucket_mean(buckets: tuple[HistogramBucket, ...]) -> float | None:
    """Mean of a length histogram using bucket midpoints (the ``+Inf`` bucket counts at its lower edge).

    Returns None when the histogram holds no observations.
    """
    total = sum(b.count for b in buckets)
    if total <= 0:
        return None
    s = 0.0
    for b in buckets:
        mid = b.lo if math.isinf(b.hi) else (b.lo + b.hi) / 2.0
        s += mid * b.count
    return s / total
