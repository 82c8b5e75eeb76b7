"""``archipelago simulate``: score a fleet on a request trace with the discrete-event simulator.

Mount with ``app.command("simulate")(simulate_command)``. Example::

    archipelago simulate --fleet policies/examples/fleet-sim.yaml \\
        --trace ../shared/data/traces/AzureLLMInferenceTrace_conv.csv --window 0:600 \\
        --ttft 2 --tpot 0.1 --router length --plot out/

Fleet file (YAML): a mapping with an optional ``model`` (Hugging Face id or catalogue alias; the
``--model`` flag overrides it) and ``islands``, a list (a bare list of islands is accepted too).
Each island::

    name: a100-short        # optional, default "<gpu>-tp<tp>"; unique
    gpu: A100-80GB          # GPU catalogue key (policies/gpus.yaml)
    tp: 1                   # tensor-parallel degree (GPUs per replica), default 1
    replicas: 4             # engine replicas, default 1 (0 allowed: island present but empty)
    price_per_gpu_hour: 2.21        # optional, $ per GPU-hour; default the catalogue price
    max_num_seqs: 256               # optional engine limits (vLLM flag names, see EngineLimits)
    max_num_batched_tokens: 8192
    gpu_memory_utilization: 0.9
    max_model_len: null
    kv_cache_dtype: null
    quantization: null
    chunked_prefill: true
    input_range: [0, 2048]  # optional prompt-length range [lo, hi) for --router length; hi null = open
    weight: 1.0             # traffic share among islands with the same input_range

Errors in any input (trace row, fleet field, unknown GPU/model, a replica that does not fit, an
invalid ServingSLO) print a message naming the file, line or field and what is accepted, and exit
with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from archipelago.decide.sim import (
    LeastLoaded,
    LengthRangeRouter,
    ReplicaSpec,
    RoundRobin,
    Router,
    SimError,
    SimResult,
    SLOTarget,
    simulate,
)
from archipelago.decide.traces import Trace, TraceError, load_trace

__all__ = ["simulate_command", "load_fleet", "Fleet", "FleetError", "load_slo", "make_router", "parse_window"]

ISLAND_KEYS = {
    "name", "gpu", "tp", "replicas", "price_per_gpu_hour", "max_num_seqs", "max_num_batched_tokens",
    "gpu_memory_utilization", "max_model_len", "kv_cache_dtype", "quantization", "chunked_prefill",
    "input_range", "weight",
}
_LIMIT_KEYS = (
    "max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization", "max_model_len", "kv_cache_dtype",
    "quantization", "chunked_prefill",
)
ROUTERS = ("rr", "round-robin", "least-loaded", "ll", "length")


class FleetError(ValueError):
    """A fleet file, SLO file or command-line value that cannot be used (message names file/line/field)."""


class _LineDict(dict):
    """A YAML mapping that remembers its 1-based line in the file."""

    line = 0


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LineDict:
    d = _LineDict(loader.construct_mapping(node, deep=True))
    d.line = node.start_mark.line + 1
    return d


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FleetError(f"{path}: {what} file not found")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise FleetError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except UnicodeDecodeError as exc:
        raise FleetError(f"{path}: not UTF-8 text ({exc})") from None


@dataclass
class Fleet:
    """A fleet read from a fleet file.

    Attributes:
        model: the model's catalogue id.
        replicas: one :class:`ReplicaSpec` per replica, islands in file order.
        islands: per island ``{"name", "gpu", "tp", "replicas", "price_per_hour", "kv_capacity_tokens"}``.
        ranges: ``(lo, hi, {island: weight})`` for :class:`LengthRangeRouter`, built from the islands'
            ``input_range`` / ``weight``; empty if no island gives a range.
    """

    model: str
    replicas: list[ReplicaSpec]
    islands: list[dict[str, Any]]
    ranges: list[tuple[float, float | None, dict[str, float]]]


def _num(v: Any, where: str, *, integer: bool = False, minimum: float | None = None, allow_none: bool = False) -> Any:
    if v is None and allow_none:
        return None
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    if ok and integer and float(v) != int(v):
        ok = False
    if ok and minimum is not None and v < minimum:
        ok = False
    if not ok:
        kind = "an integer" if integer else "a number"
        bound = f" >= {minimum:g}" if minimum is not None else ""
        raise FleetError(f"{where}: {v!r} is not {kind}{bound}")
    return int(v) if integer else float(v)


def load_fleet(path: str | Path, model: str | None = None) -> Fleet:
    """Read a fleet file (see module docstring) into replicas with their performance models.

    Args:
        path: YAML fleet file.
        model: model id overriding the file's ``model`` field.

    Returns:
        :class:`Fleet`.

    Raises:
        FleetError: missing/invalid file or field, unknown GPU or model (lists the accepted names),
            invalid engine limits, a replica that does not fit (with the performance model's reason),
            overlapping input ranges. Messages name the file, line and field.
    """
    from archipelago.decide.catalog import (
        CatalogError,
        CatalogFileError,
        load_gpu_catalog,
        load_model_catalog,
    )
    from archipelago.decide.perf import EngineLimits, PerfModel

    p = Path(path)
    doc = _read_yaml(p, "fleet")
    islands_raw: Any
    if isinstance(doc, list):
        islands_raw, file_model, top_line = doc, None, 1
    elif isinstance(doc, dict):
        unknown = set(doc) - {"model", "islands"}
        if unknown:
            raise FleetError(f"{p} line {getattr(doc, 'line', 1)}: unknown top-level field(s) {sorted(unknown)}; "
                             "accepted: model, islands")
        islands_raw, file_model, top_line = doc.get("islands"), doc.get("model"), getattr(doc, "line", 1)
    else:
        raise FleetError(f"{p}: expected a mapping with 'model' and 'islands' (or a list of islands)")
    if not isinstance(islands_raw, list) or not islands_raw:
        raise FleetError(f"{p} line {top_line}: 'islands' must be a non-empty list of islands (gpu, tp, replicas, ...)")
    model_name = model or file_model
    if not model_name:
        raise FleetError(f"{p}: no model; give --model NAME or a top-level 'model:' field")
    try:
        gpus = load_gpu_catalog()
        models = load_model_catalog()
        mspec = models.get(str(model_name))
    except CatalogError as exc:
        src = "--model" if model else f"{p} field model"
        raise FleetError(f"{src}: {exc}") from None
    except CatalogFileError as exc:
        raise FleetError(str(exc)) from None

    replicas: list[ReplicaSpec] = []
    islands: list[dict[str, Any]] = []
    names: set[str] = set()
    by_range: dict[tuple[float, float | None], dict[str, float]] = {}
    for i, isl in enumerate(islands_raw):
        line = getattr(isl, "line", 0)
        at = f"{p} line {line}: islands[{i}]" if line else f"{p}: islands[{i}]"
        if not isinstance(isl, dict):
            raise FleetError(f"{at}: expected a mapping with gpu, tp, replicas, ...; got {isl!r}")
        unknown = set(isl) - ISLAND_KEYS
        if unknown:
            raise FleetError(f"{at}: unknown field(s) {sorted(unknown)}; accepted: {', '.join(sorted(ISLAND_KEYS))}")
        if "gpu" not in isl:
            raise FleetError(f"{at}: missing field 'gpu'; known GPUs: {', '.join(gpus.names())}")
        try:
            gspec = gpus.get(str(isl["gpu"]))
        except CatalogError as exc:
            raise FleetError(f"{at}.gpu: {exc}") from None
        tp = _num(isl.get("tp", 1), f"{at}.tp", integer=True, minimum=1)
        n_rep = _num(isl.get("replicas", 1), f"{at}.replicas", integer=True, minimum=0)
        name = str(isl.get("name") or f"{gspec.name}-tp{tp}")
        if name in names:
            raise FleetError(f"{at}.name: island name {name!r} is used twice; give each island a unique name")
        names.add(name)
        lim_kwargs = {k: isl[k] for k in _LIMIT_KEYS if k in isl}
        try:
            limits = EngineLimits(**lim_kwargs)
        except (TypeError, ValueError) as exc:
            raise FleetError(f"{at}: {exc}") from None
        try:
            perf = PerfModel(mspec, gspec, tp, limits)
        except ValueError as exc:
            raise FleetError(f"{at}: {exc}") from None
        if not perf.fits:
            raise FleetError(f"{at} ({name}: {model_name} on {tp}x {gspec.name}) does not fit: {perf.fit_error}")
        try:
            price = perf.price_per_hour(
                _num(isl.get("price_per_gpu_hour"), f"{at}.price_per_gpu_hour", minimum=0, allow_none=True)
            )
        except ValueError as exc:
            raise FleetError(f"{at}.price_per_gpu_hour: {exc}") from None
        spec = ReplicaSpec(island=name, perf=perf, price_per_hour=price, limits=limits)
        replicas.extend([spec] * n_rep)
        islands.append({"name": name, "gpu": gspec.name, "tp": tp, "replicas": n_rep, "price_per_hour": price,
                        "kv_capacity_tokens": perf.kv_capacity_tokens})
        rng = isl.get("input_range")
        if rng is not None:
            if not (isinstance(rng, list) and len(rng) == 2):
                raise FleetError(f"{at}.input_range: expected [lo, hi] prompt tokens (hi may be null), got {rng!r}")
            lo = _num(rng[0], f"{at}.input_range[0]", minimum=0)
            hi = _num(rng[1], f"{at}.input_range[1]", minimum=0, allow_none=True)
            if hi is not None and hi <= lo:
                raise FleetError(f"{at}.input_range: need lo < hi, got {rng!r}")
            w = _num(isl.get("weight", 1.0), f"{at}.weight", minimum=0)
            if w <= 0:
                raise FleetError(f"{at}.weight: must be > 0, got {w}")
            if n_rep > 0:
                by_range.setdefault((lo, hi), {})[name] = w
        elif "weight" in isl:
            raise FleetError(f"{at}.weight: given without input_range; add input_range: [lo, hi]")
    if not replicas:
        raise FleetError(f"{p}: the fleet has no replicas; set replicas >= 1 on at least one island")
    ranges = [(lo, hi, w) for (lo, hi), w in sorted(by_range.items(), key=lambda kv: kv[0][0])]
    return Fleet(model=mspec.name, replicas=replicas,
                 islands=islands, ranges=ranges)


def load_slo(path: str | Path) -> SLOTarget:
    """Read a ServingSLO YAML (``spec.ttft.seconds``, ``spec.tpot.seconds``, optional ``spec.e2e``,
    ``spec.attainment``; percentiles in (0, 100]) into an :class:`SLOTarget`.

    Raises:
        FleetError: missing file, bad YAML or an invalid ServingSLO (names the fields).
    """
    from archipelago.api.v1alpha1 import ServingSLO

    p = Path(path)
    doc = _read_yaml(p, "ServingSLO")
    if not isinstance(doc, dict):
        raise FleetError(f"{p}: expected a ServingSLO mapping (apiVersion, kind, metadata, spec)")
    try:
        slo = ServingSLO.from_k8s(doc, source=str(p))
    except ValueError as exc:
        raise FleetError(str(exc)) from None
    s = slo.spec
    try:
        return SLOTarget(
            ttft_s=s.ttft.seconds,
            tpot_s=s.tpot.seconds,
            e2e_s=s.e2e.seconds if s.e2e is not None else None,
            ttft_percentile=s.ttft.percentile / 100.0,
            tpot_percentile=s.tpot.percentile / 100.0,
            attainment=s.attainment,
        )
    except SimError as exc:
        raise FleetError(f"{p}: {exc}") from None


def make_router(name: str, fleet: Fleet) -> Router:
    """Router for a ``--router`` value: ``rr``/``round-robin``, ``least-loaded``/``ll`` or ``length``.

    Raises:
        FleetError: unknown name, or ``length`` with no island ``input_range`` in the fleet.
    """
    key = name.strip().lower()
    if key in ("rr", "round-robin"):
        return RoundRobin()
    if key in ("least-loaded", "ll"):
        return LeastLoaded()
    if key == "length":
        if not fleet.ranges:
            raise FleetError("--router length: no island of the fleet has input_range: [lo, hi]; add ranges or "
                             "use --router least-loaded")
        try:
            return LengthRangeRouter(fleet.ranges)
        except SimError as exc:
            raise FleetError(f"--router length: {exc}") from None
    raise FleetError(f"--router {name!r} is unknown; use one of: rr, least-loaded, length")


def parse_window(text: str) -> tuple[float, float]:
    """``"START:END"`` seconds -> (start, end); either side may be empty (0 / to the end).

    Raises:
        FleetError: not two numbers separated by ':' or END <= START.
    """
    parts = text.split(":")
    if len(parts) != 2:
        raise FleetError(f"--window {text!r}: expected START:END in seconds, e.g. 0:600")
    try:
        start = float(parts[0]) if parts[0].strip() else 0.0
        end = float(parts[1]) if parts[1].strip() else math.inf
    except ValueError:
        raise FleetError(f"--window {text!r}: START and END must be numbers of seconds, e.g. 0:600") from None
    if not (start >= 0 and end > start):
        raise FleetError(f"--window {text!r}: need 0 <= START < END")
    return start, end


def _fmt(v: Any, unit: str = "", digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}{unit}" if abs(v) < 10**digits else f"{v:,.0f}{unit}"
    return f"{v}{unit}"


def _print_tables(console: Console, res: SimResult, fleet: Fleet, trace: Trace) -> None:
    s = res.summary()
    t = Table(title=escape(f"{fleet.model} on {len(res.replica_island)} replicas, trace {Path(trace.source).name}"))
    t.add_column("metric")
    t.add_column("p50", justify="right")
    t.add_column("p90", justify="right")
    t.add_column("p99", justify="right")
    t.add_column("mean", justify="right")
    for m, label in (("ttft", "TTFT (s)"), ("tpot", "TPOT (s)"), ("e2e", "e2e latency (s)")):
        q = res.percentiles[m]
        t.add_row(label, _fmt(q["p50"]), _fmt(q["p90"]), _fmt(q["p99"]), _fmt(q["mean"]))
    console.print(t)
    k = Table(title="Fleet results", show_header=False)
    k.add_column("quantity")
    k.add_column("value", justify="right")
    rows = [
        ("requests (completed / rejected)", f"{s['requests']} ({s['completed']} / {s['rejected']})"),
        ("trace span / makespan", f"{_fmt(s['duration_s'], ' s', 4)} / {_fmt(s['makespan_s'], ' s', 4)}"),
        ("offered load", _fmt(trace.rate_rps, " req/s")),
        ("throughput", f"{_fmt(s['throughput_rps'], ' req/s')}, {_fmt(s['output_tokens_per_s'], ' tok/s')}"),
        ("preemptions", str(s["preemptions"])),
    ]
    if res.slo is not None:
        sl = res.slo
        rows += [
            ("SLO", f"TTFT<={sl.ttft_s:g}s p{sl.ttft_percentile * 100:g}, TPOT<={sl.tpot_s:g}s "
                    f"p{sl.tpot_percentile * 100:g}" + (f", e2e<={sl.e2e_s:g}s" if sl.e2e_s else "")
                    + f", attainment>={sl.attainment:g}"),
            ("SLO attainment", _fmt(s["attainment"])),
            ("goodput", _fmt(s["goodput_rps"], " req/s")),
            ("SLO met", _fmt(s["slo_met"])),
        ]
    hours = s["horizon_s"] / 3600.0 if s["horizon_s"] else 0.0
    rows += [
        ("cost", f"${s['cost_usd']:.2f}" + (f" (${s['cost_usd'] / hours:.2f}/h)" if hours > 0 else "")),
        ("GPU-hours", _fmt(s["gpu_hours"])),
        ("energy", f"{_fmt(s['energy_wh'], ' Wh')}" + (f" (mean {s['energy_j'] / s['horizon_s']:.0f} W)"
                                                         if s["horizon_s"] else "")),
    ]
    for a, b in rows:
        k.add_row(a, b)
    console.print(k)
    isl = res.island_summary()
    it = Table(title="Islands")
    for c in ("island", "replicas", "completed", "busy", "preemptions", "cost $", "energy Wh"):
        it.add_column(c, justify="left" if c == "island" else "right")
    for name, row in isl.iterrows():
        it.add_row(escape(str(name)), str(int(row["replicas"])), str(int(row["completed"])), f"{row['busy_fraction']:.0%}",
                   str(int(row["preemptions"])), f"{row['cost_usd']:.2f}", f"{row['energy_wh']:.0f}")
    console.print(it)


def _plot(res: SimResult, outdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    slo_lines = {"ttft": res.slo.ttft_s if res.slo else None, "tpot": res.slo.tpot_s if res.slo else None,
                 "e2e": res.slo.e2e_s if res.slo else None}
    for ax, (key, arr, label) in zip(
        axes, (("ttft", res.ttft_s, "TTFT (s)"), ("tpot", res.tpot_s, "TPOT (s)"), ("e2e", res.e2e_s, "e2e latency (s)")),
        strict=True,
    ):
        x = np.sort(arr[~np.isnan(arr)])
        if x.size:
            ax.plot(x, np.arange(1, x.size + 1) / x.size, lw=1.5)
            if x[0] > 0:
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
                ax.xaxis.set_minor_formatter(NullFormatter())
        if slo_lines[key]:
            ax.axvline(slo_lines[key], color="red", ls="--", lw=1, label="SLO")
            ax.legend(loc="lower right")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(True, alpha=0.3)
    fig.suptitle("Latency CDFs")
    fig.tight_layout()
    p = outdir / "latency_cdf.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    ts = res.timeseries
    if ts is not None and len(ts.time_s):
        fig, axes = plt.subplots(3, 1, figsize=(11, 7), sharex=True)
        axes[0].plot(ts.time_s, ts.arrivals / ts.step_s, lw=0.8, label="arrivals")
        axes[0].plot(ts.time_s, ts.completions / ts.step_s, lw=0.8, label="completions")
        axes[0].set_ylabel("req/s")
        axes[0].legend(loc="upper right")
        axes[1].plot(ts.time_s, ts.running, lw=0.8, label="running")
        axes[1].plot(ts.time_s, ts.queue, lw=0.8, label="waiting")
        axes[1].set_ylabel("requests (fleet)")
        axes[1].legend(loc="upper right")
        axes[2].plot(ts.time_s, ts.kv_usage * 100, lw=0.8, color="tab:purple")
        axes[2].set_ylabel("KV cache used (%)")
        axes[2].set_xlabel("time (s)")
        for ax in axes:
            ax.grid(True, alpha=0.3)
        fig.suptitle("Load over time")
        fig.tight_layout()
        p = outdir / "load.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def simulate_command(
    fleet: Path = typer.Option(..., "--fleet", help="Fleet YAML: model and islands (gpu, tp, replicas, ...)."),
    trace: Path = typer.Option(..., "--trace", help="Trace file: Azure LLM inference CSV, or CSV/JSONL with "
                               "timestamp, input_tokens, output_tokens."),
    model: str | None = typer.Option(None, "--model", help="Model id (catalogue); overrides the fleet file's model."),
    window: str | None = typer.Option(None, "--window", help="Trace window START:END in seconds, e.g. 0:600."),
    rate_scale: float = typer.Option(1.0, "--rate-scale", help="Multiply the arrival rate (compresses time)."),
    slo_file: Path | None = typer.Option(None, "--slo", help="ServingSLO YAML (spec.ttft/tpot.seconds, spec.attainment)."),
    ttft: float | None = typer.Option(None, "--ttft", help="TTFT target, seconds (overrides --slo)."),
    tpot: float | None = typer.Option(None, "--tpot", help="TPOT target, seconds (overrides --slo)."),
    router: str = typer.Option("least-loaded", "--router", help="rr | least-loaded | length."),
    seed: int = typer.Option(0, "--seed", help="Seed of the router's random weights."),
    plot: Path | None = typer.Option(None, "--plot", help="Directory for PNG plots (latency CDFs, load)."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON instead of tables."),
    timeseries_step: float = typer.Option(1.0, "--timeseries-step", help="Load sampling period, seconds."),
) -> None:
    """Simulate serving a trace on a fleet and report TTFT/TPOT/e2e percentiles, SLO attainment,
    goodput, cost and energy."""
    try:
        fl = load_fleet(fleet, model)
        tr = load_trace(trace)
        if window:
            start, end = parse_window(window)
            tr = tr.window(start, end)
        if rate_scale != 1.0:
            tr = tr.scale_rate(rate_scale)
        slo = load_slo(slo_file) if slo_file else None
        if ttft is not None or tpot is not None:
            if slo is None:
                if ttft is None or tpot is None:
                    raise FleetError("give both --ttft and --tpot (seconds), or an --slo file")
                slo = SLOTarget(ttft_s=ttft, tpot_s=tpot)
            else:  # flags override the file's targets, keeping its percentiles and attainment
                slo = dataclasses.replace(
                    slo,
                    ttft_s=ttft if ttft is not None else slo.ttft_s,
                    tpot_s=tpot if tpot is not None else slo.tpot_s,
                )
        rt = make_router(router, fl)
        res = simulate(tr, fl.replicas, rt, slo=slo, seed=seed, record_timeseries=True,
                       timeseries_step_s=timeseries_step)
    except (FleetError, TraceError, SimError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if json_out:
        out = {"model": fl.model, "trace": tr.source, "summary": res.summary(),
               "islands": res.island_summary().reset_index().to_dict(orient="records")}
        typer.echo(json.dumps(out, indent=2))
    else:
        _print_tables(Console(), res, fl, tr)
    if plot is not None:
        for pth in _plot(res, plot):
            typer.echo(f"wrote {pth}", err=json_out)
