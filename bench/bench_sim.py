"""Simulator speed on the full one-hour Azure conversation trace (19,366 requests).

Runs the discrete-event simulator (:mod:`archipelago.decide.sim`) with the real performance model
on 16-replica fleets and prints wall time and simulated requests per wall-clock second. Target:
<= 5 s per full-trace run on the project's 2-core machine (the simulator sits inside the planner's
optimisation loop).

Usage: ``.venv/bin/python bench/bench_sim.py [--repeat 3] [--quick]``

Trace: Azure LLM inference trace (conversation), Azure/AzurePublicDataset
``data/AzureLLMInferenceTrace_conv.csv``, CC-BY-4.0 (Patel et al., "Splitwise", ISCA 2024); see
``shared/data/README.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from archipelago.decide.catalog import load_gpu_catalog, load_model_catalog  # noqa: E402
from archipelago.decide.perf import EngineLimits, PerfModel  # noqa: E402
from archipelago.decide.sim import (  # noqa: E402
    LeastLoaded,
    LengthRangeRouter,
    ReplicaSpec,
    RoundRobin,
    SLOTarget,
    simulate,
)
from archipelago.decide.traces import load_trace  # noqa: E402

TRACE = ROOT.parent / "shared" / "data" / "traces" / "AzureLLMInferenceTrace_conv.csv"
ATTRIBUTION = (
    "Trace: AzureLLMInferenceTrace_conv.csv, Azure/AzurePublicDataset, CC-BY-4.0 "
    "(Patel et al., \"Splitwise: Efficient Generative LLM Inference Using Phase Splitting\", ISCA 2024)."
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the median wall time is reported")
    ap.add_argument("--quick", action="store_true", help="only the headline case, one run")
    args = ap.parse_args()
    console = Console(width=150)
    if not TRACE.exists():
        console.print(f"trace not found: {TRACE}")
        return 1

    t0 = time.perf_counter()
    trace = load_trace(TRACE)
    load_s = time.perf_counter() - t0
    gpus, models = load_gpu_catalog(), load_model_catalog()
    pm8 = PerfModel(models["meta-llama/Llama-3.1-8B-Instruct"], gpus["A100-80GB"], 1, EngineLimits())
    pm8_l4 = PerfModel(models["meta-llama/Llama-3.1-8B-Instruct"], gpus["L4"], 1, EngineLimits(max_num_seqs=128))
    pm70 = PerfModel(models["meta-llama/Llama-3.1-70B-Instruct"], gpus["H100-SXM"], 4, EngineLimits())
    slo = SLOTarget(ttft_s=2.0, tpot_s=0.1)

    a100 = [ReplicaSpec("a100", pm8)] * 16
    mixed = [ReplicaSpec("l4", pm8_l4)] * 8 + [ReplicaSpec("a100", pm8)] * 8
    cases = [
        ("8B x16 A100, least-loaded, timeseries", trace, a100, LeastLoaded, True),
        ("8B x16 A100, least-loaded", trace, a100, LeastLoaded, False),
        ("8B x16 A100, round-robin", trace, a100, RoundRobin, False),
        ("8B 8 L4 + 8 A100, length ranges", trace, mixed,
         lambda: LengthRangeRouter([(0, 1024, {"l4": 1.0}), (1024, None, {"a100": 1.0})]), False),
        ("70B TP4 x16 H100, least-loaded", trace, [ReplicaSpec("h100x4", pm70)] * 16, LeastLoaded, False),
        ("8B x16 A100, 4x rate", trace.scale_rate(4.0), a100, LeastLoaded, False),
        ("8B x16 A100, 16x rate (overload)", trace.scale_rate(16.0), a100, LeastLoaded, False),
    ]
    if args.quick:
        cases, args.repeat = cases[:1], 1

    table = Table(title=f"Simulator speed: {len(trace):,} requests, {trace.duration_s:,.0f} s trace "
                        f"(loaded in {load_s:.2f} s)")
    for col in ("case", "wall s", "sim req/s", "steps", "preempt", "TTFT p99 s", "TPOT p99 s", "attain", "$"):
        table.add_column(col, justify="left" if col == "case" else "right")
    worst = 0.0
    for name, tr, fleet, make_router, ts in cases:
        walls = []
        res = None
        for _ in range(max(1, args.repeat)):
            t = time.perf_counter()
            res = simulate(tr, fleet, make_router(), slo=slo, record_timeseries=ts)
            walls.append(time.perf_counter() - t)
        wall = statistics.median(walls)
        worst = max(worst, wall)
        s = res.summary()
        table.add_row(name, f"{wall:.2f}", f"{len(tr) / wall:,.0f}", f"{res.steps:,}", str(res.preemptions),
                      f"{s['ttft_p99_s']:.3g}", f"{s['tpot_p99_s']:.3g}", f"{s['attainment']:.3f}",
                      f"{s['cost_usd']:.1f}")
        console.print(f"{name}: {wall:.2f} s ({len(tr) / wall:,.0f} simulated requests/s)")
    console.print(table)
    console.print(f"slowest case: {worst:.2f} s (target <= 5 s)")
    console.print(ATTRIBUTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
