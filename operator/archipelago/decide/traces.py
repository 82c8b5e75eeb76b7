"""Request traces: arrival times and prompt / output lengths, real or synthetic.

A :class:`Trace` is three aligned 1-D arrays -- arrival time (seconds from the start of the trace,
sorted), input (prompt) tokens and output (generated) tokens per request -- plus a ``source`` label.
It is the input of the trace-driven simulator (:mod:`archipelago.decide.sim`) and, reduced by
:func:`length_histogram`, of the planner (which sees workloads as Prometheus length histograms).

Readers
-------
* :func:`load_azure_csv` -- the Azure LLM inference traces (``TIMESTAMP,ContextTokens,GeneratedTokens``;
  Patel et al., "Splitwise", ISCA 2024; CC-BY-4.0, see ``shared/data/README.md`` for attribution).
* :func:`load_generic` -- CSV or JSON Lines with ``timestamp`` (seconds as a number, or an ISO-8601
  date-time), ``input_tokens``, ``output_tokens``; other columns are ignored.
* :func:`load_trace` -- dispatches on the file's content (first non-blank line), not its name.

All readers rebase time so that the first request arrives at 0 s, sort requests by arrival (stable,
so equal timestamps keep file order), and raise :class:`TraceError` naming the file, the line, the
column and what is accepted when a row is malformed.

Synthetic traces
----------------
:func:`poisson_trace` (exponential inter-arrival times) and :func:`gamma_trace` (gamma inter-arrival
times with a given coefficient of variation -- the burstiness model used by e.g. AlpaServe and
DistServe; ``cv=1`` is Poisson, ``cv>1`` burstier). Lengths are fixed (an int), resampled from an
empirical sample (an array, e.g. a real trace's ``input_tokens``) or drawn by a callable.
"""

from __future__ import annotations

import gzip
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

__all__ = [
    "Trace",
    "TraceError",
    "LengthSpec",
    "load_azure_csv",
    "load_generic",
    "load_trace",
    "poisson_trace",
    "gamma_trace",
    "length_histogram",
    "histogram_edges",
]

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
GENERIC_COLUMNS = ("timestamp", "input_tokens", "output_tokens")
_ACCEPTED_FORMATS = (
    "accepted formats: Azure LLM inference CSV with header 'TIMESTAMP,ContextTokens,GeneratedTokens', "
    "or a generic CSV / JSON Lines file with columns 'timestamp' (seconds or ISO-8601), "
    "'input_tokens', 'output_tokens'"
)


class TraceError(ValueError):
    """A trace file or trace argument is malformed.

    The message names the file, the 1-based line number, the column and what is accepted, e.g.
    ``trace.csv line 17: ContextTokens 'abc' is not a non-negative integer``.
    """


@dataclass
class Trace:
    """A request trace: one entry per request, sorted by arrival time.

    Attributes:
        arrival_s: float64 array, shape (n,), seconds since the start of the trace, non-decreasing.
        input_tokens: int32 array, shape (n,), prompt tokens per request (>= 0).
        output_tokens: int32 array, shape (n,), generated tokens per request (>= 0).
        source: free-text provenance (file path, generator parameters, window applied).
        span_s: the observation span in seconds, or None to use the last arrival time. Set by
            :meth:`window` and the synthetic generators so that the rate of a sparse trace is not
            overestimated; must be >= the last arrival when given.

    Raises:
        TraceError: arrays of different lengths, not 1-D, unsorted or negative arrivals, negative
            or non-finite token counts, or a span shorter than the last arrival.
    """

    arrival_s: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    source: str = "in-memory"
    span_s: float | None = None

    def __post_init__(self) -> None:
        arr = np.asarray(self.arrival_s, dtype=np.float64)
        inp = np.asarray(self.input_tokens)
        out = np.asarray(self.output_tokens)
        for name, a in (("arrival_s", arr), ("input_tokens", inp), ("output_tokens", out)):
            if a.ndim != 1:
                raise TraceError(f"Trace.{name} must be a 1-D array, got shape {a.shape}")
        if not (len(arr) == len(inp) == len(out)):
            raise TraceError(
                f"Trace arrays differ in length: arrival_s {len(arr)}, input_tokens {len(inp)}, "
                f"output_tokens {len(out)}; give one entry per request in each"
            )
        if len(arr):
            if not np.all(np.isfinite(arr)):
                raise TraceError("Trace.arrival_s contains NaN or infinity; give finite seconds")
            if arr[0] < 0:
                raise TraceError(f"Trace.arrival_s starts at {arr[0]} s; arrivals must be >= 0 s")
            if np.any(np.diff(arr) < 0):
                i = int(np.argmax(np.diff(arr) < 0)) + 1
                raise TraceError(
                    f"Trace.arrival_s is not sorted (entry {i}: {arr[i]} s < {arr[i - 1]} s); "
                    "sort requests by arrival"
                )
        for name, a in (("input_tokens", inp), ("output_tokens", out)):
            if len(a) and (
                not np.all(np.isfinite(a)) or np.any(a < 0) or np.any(a != np.floor(a))
                or np.any(a > np.iinfo(np.int32).max)
            ):
                raise TraceError(f"Trace.{name} must hold non-negative integers (token counts)")
        self.arrival_s = arr
        self.input_tokens = inp.astype(np.int32)
        self.output_tokens = out.astype(np.int32)
        if self.span_s is not None:
            span = float(self.span_s)
            if not math.isfinite(span) or span < 0:
                raise TraceError(f"Trace.span_s must be a finite number of seconds >= 0, got {self.span_s}")
            if len(arr) and span < arr[-1]:
                raise TraceError(f"Trace.span_s {span} s is shorter than the last arrival {arr[-1]} s")
            self.span_s = span

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    @property
    def duration_s(self) -> float:
        """Observation span in seconds: ``span_s`` if set, else the last arrival time (0.0 if empty)."""
        if self.span_s is not None:
            return self.span_s
        return float(self.arrival_s[-1]) if len(self) else 0.0

    @property
    def rate_rps(self) -> float:
        """Mean arrival rate in requests/s: ``len / duration_s``; 0.0 for an empty or zero-span trace."""
        d = self.duration_s
        return len(self) / d if d > 0 else 0.0

    def window(self, start_s: float, end_s: float) -> Trace:
        """The requests arriving in ``[start_s, end_s)``, rebased so that ``start_s`` becomes 0 s.

        ``end_s`` may be ``math.inf`` (to the end). The result's ``span_s`` is
        ``min(end_s, duration_s) - start_s``, so rates stay correct for sparse windows.

        Raises:
            TraceError: ``start_s < 0``, ``end_s <= start_s`` or a NaN bound.
        """
        start_s, end_s = float(start_s), float(end_s)
        if math.isnan(start_s) or math.isnan(end_s) or start_s < 0 or end_s <= start_s:
            raise TraceError(
                f"trace window [{start_s}, {end_s}) is invalid; need 0 <= start < end (seconds)"
            )
        lo = int(np.searchsorted(self.arrival_s, start_s, side="left"))
        hi = int(np.searchsorted(self.arrival_s, end_s, side="left"))
        span = max(0.0, min(end_s, self.duration_s) - start_s)
        arr = self.arrival_s[lo:hi] - start_s
        if len(arr):
            span = max(span, float(arr[-1]))
        return Trace(
            arrival_s=arr,
            input_tokens=self.input_tokens[lo:hi].copy(),
            output_tokens=self.output_tokens[lo:hi].copy(),
            source=f"{self.source}[{start_s:g}s:{end_s:g}s]",
            span_s=span,
        )

    def scale_rate(self, factor: float) -> Trace:
        """Compress (factor > 1) or stretch (factor < 1) time: ``arrival_s / factor``.

        The request mix (lengths, order, burst structure) is unchanged; the arrival rate is
        multiplied by ``factor`` and the duration divided by it. ``factor=2`` gives twice the
        requests/s over half the time. To keep the duration and add requests, concatenate shifted
        copies instead.

        Raises:
            TraceError: ``factor`` not a finite number > 0.
        """
        factor = float(factor)
        if not math.isfinite(factor) or factor <= 0:
            raise TraceError(f"rate scale factor must be a finite number > 0, got {factor}")
        return Trace(
            arrival_s=self.arrival_s / factor,
            input_tokens=self.input_tokens.copy(),
            output_tokens=self.output_tokens.copy(),
            source=f"{self.source}x{factor:g}",
            span_s=None if self.span_s is None else self.span_s / factor,
        )

    def to_frame(self) -> pd.DataFrame:
        """The trace as a DataFrame with columns ``arrival_s, input_tokens, output_tokens``."""
        return pd.DataFrame(
            {"arrival_s": self.arrival_s, "input_tokens": self.input_tokens, "output_tokens": self.output_tokens}
        )


# ----------------------------------------------------------------------------------------------
# Readers


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")  # noqa: SIM115 - caller closes


def _check_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise TraceError(f"{p}: trace file not found")
    if not p.is_file():
        raise TraceError(f"{p}: not a regular file; give a trace CSV or JSONL file")
    return p


def _read_csv_str(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """All cells as stripped strings, plus the 1-based file line of each data row (blank rows dropped)."""
    try:
        df = pd.read_csv(
            path, dtype=str, keep_default_na=False, skip_blank_lines=False, skipinitialspace=True
        )
    except pd.errors.EmptyDataError:
        raise TraceError(f"{path}: file is empty; {_ACCEPTED_FORMATS}") from None
    except pd.errors.ParserError as exc:
        raise TraceError(f"{path}: not a well-formed CSV ({exc}); {_ACCEPTED_FORMATS}") from None
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not UTF-8 text ({exc}); {_ACCEPTED_FORMATS}") from None
    df.columns = [str(c).strip() for c in df.columns]
    lines = np.arange(len(df), dtype=np.int64) + 2  # header is line 1
    if len(df):
        blank = (df == "").all(axis=1).to_numpy()
        if blank.any():
            df = df.loc[~blank].reset_index(drop=True)
            lines = lines[~blank]
    df = df.apply(lambda s: s.str.strip())
    return df, lines


def _parse_counts(values: pd.Series, lines: np.ndarray, path: Path, column: str) -> np.ndarray:
    """Strings -> int32 token counts; raises TraceError at the first cell that is not an integer >= 0."""
    num = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(num) | (num < 0) | (num != np.floor(num)) | (num > np.iinfo(np.int32).max)
    if bad.any():
        i = int(np.argmax(bad))
        raise TraceError(
            f"{path} line {lines[i]}: {column} {values.iloc[i]!r} is not a non-negative integer "
            f"(token count, e.g. 512)"
        )
    return num.astype(np.int32)


def _parse_iso(values: pd.Series, lines: np.ndarray, path: Path, column: str, example: str) -> np.ndarray:
    """ISO-8601 strings -> seconds (float64, absolute epoch); naive times are taken as UTC."""
    try:
        ts = pd.to_datetime(values, format="ISO8601", errors="coerce", utc=True)
    except (ValueError, TypeError):  # pragma: no cover - errors="coerce" handles per-cell failures
        ts = pd.Series([pd.to_datetime(v, errors="coerce", utc=True) for v in values])
    bad = ts.isna().to_numpy()
    if bad.any():
        i = int(np.argmax(bad))
        raise TraceError(
            f"{path} line {lines[i]}: {column} {values.iloc[i]!r} is not a date-time; accepted: ISO-8601 "
            f"like {example!r}"
        )
    ns = ts.to_numpy(dtype="datetime64[ns]").astype(np.int64)
    return (ns - ns.min()).astype(np.float64) / 1e9 if len(ns) else np.zeros(0)


def _build(arrival: np.ndarray, inp: np.ndarray, out: np.ndarray, source: str) -> Trace:
    if len(arrival):
        order = np.argsort(arrival, kind="stable")
        arrival = arrival[order] - arrival[order[0]]
        inp, out = inp[order], out[order]
    return Trace(arrival_s=arrival, input_tokens=inp, output_tokens=out, source=source)


def load_azure_csv(path: str | Path) -> Trace:
    """Read an Azure LLM inference trace CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``).

    Timestamps look like ``2023-11-16 18:17:03.9799600`` (7 fractional digits; parsed to the
    nanosecond); arrivals are rebased to the first request. Files ending in ``.gz`` are decompressed.
    Source: Azure/AzurePublicDataset ``data/AzureLLMInferenceTrace_{code,conv}.csv`` (CC-BY-4.0).

    Returns:
        Trace with ``source`` = the path.

    Raises:
        TraceError: missing file, missing columns, or a malformed cell (names file, line, column).
    """
    p = _check_file(path)
    df, lines = _read_csv_str(p)
    missing = [c for c in AZURE_COLUMNS if c not in df.columns]
    if missing:
        raise TraceError(
            f"{p} line 1: missing column(s) {', '.join(missing)} in header {list(df.columns)}; "
            f"an Azure trace has header 'TIMESTAMP,ContextTokens,GeneratedTokens'"
        )
    arrival = _parse_iso(df["TIMESTAMP"], lines, p, "TIMESTAMP", "2023-11-16 18:17:03.9799600")
    inp = _parse_counts(df["ContextTokens"], lines, p, "ContextTokens")
    out = _parse_counts(df["GeneratedTokens"], lines, p, "GeneratedTokens")
    return _build(arrival, inp, out, str(p))


def _parse_timestamps(values: pd.Series, lines: np.ndarray, path: Path, column: str) -> np.ndarray:
    """Seconds (numbers) or ISO-8601 date-times, decided by the first row; mixing is an error."""
    if not len(values):
        return np.zeros(0)
    num = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    if np.isfinite(num[0]):
        bad = ~np.isfinite(num)
        if bad.any():
            i = int(np.argmax(bad))
            raise TraceError(
                f"{path} line {lines[i]}: {column} {values.iloc[i]!r} is not a number of seconds; "
                f"this file's first row uses seconds, so every row must (e.g. 12.5)"
            )
        return num
    return _parse_iso(values, lines, path, column, "2024-05-01T12:00:00.250Z")


def _generic_frame(df: pd.DataFrame, lines: np.ndarray, p: Path, first_line: int) -> Trace:
    missing = [c for c in GENERIC_COLUMNS if c not in df.columns]
    if missing:
        raise TraceError(
            f"{p} line {first_line}: missing column(s) {', '.join(missing)} (have {list(df.columns)}); "
            f"{_ACCEPTED_FORMATS}"
        )
    arrival = _parse_timestamps(df["timestamp"], lines, p, "timestamp")
    inp = _parse_counts(df["input_tokens"], lines, p, "input_tokens")
    out = _parse_counts(df["output_tokens"], lines, p, "output_tokens")
    return _build(arrival, inp, out, str(p))


def _read_jsonl(p: Path) -> tuple[pd.DataFrame, np.ndarray]:
    rows: list[dict] = []
    lines: list[int] = []
    with _open_text(p) as fh:
        for n, raw in enumerate(fh, start=1):
            text = raw.strip()
            if not text:
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TraceError(f"{p} line {n}: not valid JSON ({exc.msg}); each line must be one object "
                                 f'like {{"timestamp": 0.5, "input_tokens": 512, "output_tokens": 128}}') from None
            if not isinstance(obj, dict):
                raise TraceError(f"{p} line {n}: expected a JSON object, got {type(obj).__name__}")
            for key in GENERIC_COLUMNS:
                if key not in obj or obj[key] is None:
                    raise TraceError(f"{p} line {n}: missing field {key!r}; {_ACCEPTED_FORMATS}")
            rows.append({k: str(obj[k]) if not isinstance(obj[k], str) else obj[k].strip() for k in GENERIC_COLUMNS})
            lines.append(n)
    if not rows:
        raise TraceError(f"{p}: no requests in file; {_ACCEPTED_FORMATS}")
    return pd.DataFrame(rows, columns=list(GENERIC_COLUMNS)), np.asarray(lines, dtype=np.int64)


def _first_line(p: Path) -> tuple[int, str]:
    try:
        with _open_text(p) as fh:
            for n, raw in enumerate(fh, start=1):
                if raw.strip():
                    return n, raw.strip()
    except UnicodeDecodeError as exc:
        raise TraceError(f"{p}: not UTF-8 text ({exc}); {_ACCEPTED_FORMATS}") from None
    raise TraceError(f"{p}: file is empty; {_ACCEPTED_FORMATS}")


def load_generic(path: str | Path) -> Trace:
    """Read a generic trace: CSV with a header, or JSON Lines (one object per line).

    Columns/fields: ``timestamp`` (seconds as a number, or ISO-8601 date-time; the first row
    decides which, and all rows must agree), ``input_tokens`` and ``output_tokens`` (integers >= 0).
    Extra columns are ignored. Arrivals are rebased to the first request and sorted (stable).
    JSON Lines is recognised by a first non-blank line starting with ``{``.

    Raises:
        TraceError: missing file / columns, bad JSON, or a malformed cell (names file, line, column).
    """
    p = _check_file(path)
    n, first = _first_line(p)
    if first.startswith("{"):
        df, lines = _read_jsonl(p)
        return _generic_frame(df, lines, p, lines[0])
    df, lines = _read_csv_str(p)
    return _generic_frame(df, lines, p, n)


def load_trace(path: str | Path) -> Trace:
    """Read a trace file, choosing the reader from its content (not its name).

    A CSV whose header has ``TIMESTAMP``, ``ContextTokens`` and ``GeneratedTokens`` is read by
    :func:`load_azure_csv`; a CSV with ``timestamp, input_tokens, output_tokens`` or a JSON Lines
    file by :func:`load_generic`.

    Raises:
        TraceError: unknown format (message lists the accepted ones) or any reader error.
    """
    p = _check_file(path)
    n, first = _first_line(p)
    if first.startswith("{"):
        return load_generic(p)
    header = {c.strip().strip('"') for c in first.split(",")}
    if set(AZURE_COLUMNS) <= header:
        return load_azure_csv(p)
    if set(GENERIC_COLUMNS) <= header:
        return load_generic(p)
    raise TraceError(f"{p} line {n}: unrecognised header {first[:120]!r}; {_ACCEPTED_FORMATS}")


# ----------------------------------------------------------------------------------------------
# Synthetic traces

LengthSpec = int | Sequence[int] | np.ndarray | Callable[[np.random.Generator, int], np.ndarray]
"""Token lengths for synthetic traces: an int (every request), an array-like sample to resample
uniformly with replacement (an empirical distribution), or ``f(rng, n) -> int array of shape (n,)``."""


def _lengths(spec: LengthSpec, rng: np.random.Generator, n: int, name: str) -> np.ndarray:
    if isinstance(spec, bool):
        raise TraceError(f"{name} must be an int, an array of ints or a callable, got a bool")
    if isinstance(spec, int | np.integer):
        if spec < 0:
            raise TraceError(f"{name} must be >= 0 tokens, got {spec}")
        return np.full(n, int(spec), dtype=np.int32)
    if callable(spec):
        vals = np.asarray(spec(rng, n))
        if vals.shape != (n,):
            raise TraceError(f"{name} callable returned shape {vals.shape}, expected ({n},)")
    else:
        sample = np.asarray(spec)
        if sample.ndim != 1 or sample.size == 0:
            raise TraceError(f"{name} sample must be a non-empty 1-D array of token counts")
        vals = rng.choice(sample, size=n, replace=True)
    if n and (not np.all(np.isfinite(vals)) or np.any(vals < 0)):
        raise TraceError(f"{name} produced negative or non-finite token counts")
    return np.rint(vals).astype(np.int32)


def _renewal_arrivals(gap: Callable[[int], np.ndarray], rate_rps: float, duration_s: float) -> np.ndarray:
    chunk = max(16, int(rate_rps * duration_s * 1.1) + 16)
    parts: list[np.ndarray] = []
    t = 0.0
    while t < duration_s:
        times = t + np.cumsum(gap(chunk))
        parts.append(times)
        t = float(times[-1])
    arr = np.concatenate(parts) if parts else np.zeros(0)
    return arr[arr < duration_s]


def _check_rate(rate_rps: float, duration_s: float) -> None:
    if not (math.isfinite(rate_rps) and rate_rps > 0):
        raise TraceError(f"rate_rps must be a finite number > 0 requests/s, got {rate_rps}")
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise TraceError(f"duration_s must be a finite number > 0 seconds, got {duration_s}")


def poisson_trace(
    rate_rps: float,
    duration_s: float,
    input_tokens: LengthSpec = 1024,
    output_tokens: LengthSpec = 128,
    seed: int = 0,
) -> Trace:
    """Open-loop Poisson arrivals (exponential inter-arrival times with mean ``1/rate_rps`` s).

    Args:
        rate_rps: mean arrival rate, requests/s.
        duration_s: span in seconds; arrivals fall in ``[0, duration_s)``.
        input_tokens / output_tokens: see :data:`LengthSpec`.
        seed: seed of the ``numpy.random.Generator``; equal seeds give equal traces.

    Raises:
        TraceError: non-positive rate or duration, bad length spec.
    """
    return gamma_trace(rate_rps, 1.0, duration_s, input_tokens, output_tokens, seed, _label="poisson")


def gamma_trace(
    rate_rps: float,
    cv: float,
    duration_s: float,
    input_tokens: LengthSpec = 1024,
    output_tokens: LengthSpec = 128,
    seed: int = 0,
    *,
    _label: str = "gamma",
) -> Trace:
    """Gamma-renewal arrivals: inter-arrival times ~ Gamma(shape=1/cv^2, scale=cv^2/rate_rps).

    Mean gap ``1/rate_rps`` s and coefficient of variation ``cv`` (std/mean); ``cv=1`` is Poisson,
    ``cv>1`` bursty, ``cv<1`` smoother (the burstiness model of AlpaServe, OSDI 2023).

    Raises:
        TraceError: non-positive rate, cv or duration, bad length spec.
    """
    _check_rate(rate_rps, duration_s)
    if not (math.isfinite(cv) and cv > 0):
        raise TraceError(f"cv must be a finite number > 0, got {cv}")
    rng = np.random.Generator(np.random.PCG64(seed))
    if cv == 1.0:
        arrival = _renewal_arrivals(lambda n: rng.exponential(1.0 / rate_rps, n), rate_rps, duration_s)
    else:
        shape = 1.0 / (cv * cv)
        scale = 1.0 / (rate_rps * shape)
        arrival = _renewal_arrivals(lambda n: rng.gamma(shape, scale, n), rate_rps, duration_s)
    n = len(arrival)
    inp = _lengths(input_tokens, rng, n, "input_tokens")
    out = _lengths(output_tokens, rng, n, "output_tokens")
    src = f"{_label}(rate={rate_rps:g}/s" + ("" if _label == "poisson" else f", cv={cv:g}") + f", seed={seed})"
    return Trace(arrival_s=arrival, input_tokens=inp, output_tokens=out, source=src, span_s=float(duration_s))


# ----------------------------------------------------------------------------------------------
# Histograms (the planner's view of a workload)


def histogram_edges(bucket_edges: Sequence[float] | np.ndarray) -> np.ndarray:
    """Validated Prometheus ``le`` upper bounds, with ``+Inf`` appended if absent (float64).

    Raises:
        TraceError: empty, NaN or not strictly increasing edges.
    """
    le = np.asarray(bucket_edges, dtype=np.float64)
    if le.ndim != 1 or le.size == 0 or np.any(np.isnan(le)):
        raise TraceError("bucket_edges must be a non-empty 1-D list of numbers (Prometheus 'le' bounds)")
    if np.any(np.diff(le) <= 0):
        raise TraceError(f"bucket_edges must be strictly increasing, got {le.tolist()}")
    if not np.isinf(le[-1]):
        le = np.append(le, np.inf)
    return le


def length_histogram(
    trace: Trace,
    bucket_edges: Sequence[float] | np.ndarray,
    *,
    which: Literal["input", "output"] = "input",
    cumulative: bool = False,
) -> np.ndarray:
    """Requests per length bucket, in the shape Prometheus histograms use.

    ``bucket_edges`` are the ``le`` upper bounds of ``vllm:request_prompt_tokens_bucket``
    (``which="input"``) or ``vllm:request_generation_tokens_bucket`` (``which="output"``);
    ``+Inf`` is appended if absent. Bucket ``i`` counts requests with
    ``le[i-1] < tokens <= le[i]`` (``le[-1]`` = -inf), as Prometheus does.

    Returns:
        int64 array aligned with :func:`histogram_edges` ``(bucket_edges)``: per-bucket counts, or
        Prometheus' cumulative ``le`` counts when ``cumulative=True`` (last entry = ``len(trace)``).

    Raises:
        TraceError: bad edges or ``which``.
    """
    le = histogram_edges(bucket_edges)
    if which == "input":
        vals = trace.input_tokens
    elif which == "output":
        vals = trace.output_tokens
    else:
        raise TraceError(f"which must be 'input' or 'output', got {which!r}")
    idx = np.searchsorted(le, vals, side="left")  # first edge >= value
    counts = np.bincount(idx, minlength=len(le)).astype(np.int64)
    return np.cumsum(counts) if cumulative else counts
