"""Planner benchmark on the Azure LLM inference traces.

Fleet: five GPU types (H100-SXM, A100-80GB, L40S, A10G, L4) with catalogue prices. Models:
Llama-3.1-8B (code trace), Llama-3.1-70B (conversation trace) and the MoE Qwen3-30B-A3B
(conversation trace, a later window), rate-scaled so the fleet is stressed. Every method's plan
is scored by the same trace-driven simulator (``archipelago.decide.sim``).

Rows:
* ``<method> (as planned)``: the plan at the default capacity model (headroom 0), one shot;
* ``<method> @>=99%``: the cheapest plan of that method whose simulated SLO attainment is
  >= the target, found by raising the capacity headroom on a fixed grid (same grid for all);
* ``BO + CP-SAT``: the outer loop (qLogNEHVI) over headroom, TTFT/TPOT scales and max_num_seqs,
  started from the CP-SAT default, with a budget of ``--evals`` evaluations;
* ``LP lower bound``: LP relaxation at the chosen BO point's capacity parameters (a bound
  relative to the capacity model, not to the simulator).

Usage: ``python bench/bench_planner.py [--window 1200] [--evals 24] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from archipelago.decide.catalog import load_gpu_catalog, load_model_catalog
from archipelago.decide.perf import EngineLimits
from archipelago.decide.planner.baselines import lower_bound, run_baseline
from archipelago.decide.planner.evaluate import score_plan
from archipelago.decide.planner.outer import config_from_params, make_evaluator, run_outer_loop, space_for
from archipelago.decide.planner.types import (
    FleetSnapshot,
    ModelRequest,
    NodeSnapshot,
    PlannerConfig,
    PoolSnapshot,
    Workload,
)
from archipelago.decide.sim import SLOTarget
from archipelago.decide.traces import load_azure_csv

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared").resolve()
if not SHARED.exists():
    SHARED = Path("/work/shared")
TRACES = SHARED / "data" / "traces"
HEADROOMS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def attribution() -> str:
    """The traces' attribution section of shared/data/README.md (kept wherever results are shown)."""
    text = (SHARED / "data" / "README.md").read_text()
    m = re.search(r"## traces/.*?(?=\n## )", text, re.S)
    return m.group(0).strip() if m else text


def build_fleet() -> FleetSnapshot:
    gc = load_gpu_catalog()

    def pool(name: str, gpu: str, nodes: int, per_node: int = 8) -> PoolSnapshot:
        return PoolSnapshot(name, gpu, gc.get(gpu).price_per_gpu_hour,
                            tuple(NodeSnapshot(f"{name}-{i}", per_node, per_node) for i in range(nodes)))

    # ample inventory of every type, so the comparison is about which GPUs to buy, not which are left
    return FleetSnapshot((pool("h100", "H100-SXM", 16), pool("a100", "A100-80GB", 16), pool("l40s", "L40S", 16),
                          pool("a10g", "A10G", 24, 4), pool("l4", "L4", 16)))


def build_workload(window_s: float, slo: SLOTarget):
    mc = load_model_catalog()
    code = load_azure_csv(TRACES / "AzureLLMInferenceTrace_code.csv")
    conv = load_azure_csv(TRACES / "AzureLLMInferenceTrace_conv.csv")
    traces = {
        "bench/llama-8b": code.window(0, window_s).scale_rate(4.0),
        "bench/llama-70b": conv.window(0, window_s).scale_rate(1.0),
        "bench/qwen3-moe": conv.window(window_s, 2 * window_s).scale_rate(2.0),
    }
    models = {"bench/llama-8b": "meta-llama/Llama-3.1-8B-Instruct",
              "bench/llama-70b": "meta-llama/Llama-3.1-70B-Instruct",
              "bench/qwen3-moe": "Qwen/Qwen3-30B-A3B"}
    reqs = []
    for key, t in traces.items():
        wl = Workload.from_arrays(t.arrival_s, t.input_tokens, t.output_tokens)
        reqs.append(ModelRequest(key, mc.get(models[key]), slo, wl, limits=EngineLimits(max_num_batched_tokens=2048)))
    return reqs, traces


def row(name, plan, score, wall, slo, ref=None):
    ttft = max((score.p99(k, "ttft") for k in score.per_model), default=math.nan)
    tpot = max((score.p99(k, "tpot") for k in score.per_model), default=math.nan)
    return {"method": name, "cost_per_hour": plan.cost_per_hour, "gpus": plan.gpus,
            "attainment": score.attainment, "ttft_p99_s": ttft, "tpot_p99_s": tpot,
            "power_kw": score.power_w / 1000.0, "plan_s": wall, "params": dict(plan.params),
            "served": min((m.served_fraction for m in plan.models), default=0.0)}


def calibrated(name, fleet, reqs, traces, target, base):
    """Cheapest headroom on the grid whose simulated attainment >= target."""
    tot = 0.0
    last = None
    for h in HEADROOMS:
        t0 = time.perf_counter()
        pl = run_baseline(name, fleet, reqs, base.with_(headroom=h))
        tot += time.perf_counter() - t0
        sc = score_plan(pl, reqs, traces, fleet)
        last = (pl, sc)
        if sc.attainment >= target and min(m.served_fraction for m in pl.models) >= 1.0 - 1e-9:
            return pl, sc, tot, h
    return last[0], last[1], tot, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--window", type=float, default=1200.0, help="trace window, seconds")
    ap.add_argument("--evals", type=int, default=30, help="BO evaluations")
    ap.add_argument("--bo-seconds", type=float, default=420.0, help="BO wall-time budget, s")
    ap.add_argument("--ttft", type=float, default=3.0)
    ap.add_argument("--tpot", type=float, default=0.15)
    ap.add_argument("--target", type=float, default=0.99)
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    con = Console(width=160)
    slo = SLOTarget(ttft_s=args.ttft, tpot_s=args.tpot, attainment=args.target)
    fleet = build_fleet()
    reqs, traces = build_workload(args.window, slo)
    base = PlannerConfig(seed=args.seed)
    rows = []
    with con.status("running methods ...") as st:
        for name in ("cpsat", "homogeneous", "melange", "greedy"):
            st.update(f"{name}: as planned")
            t0 = time.perf_counter()
            pl = run_baseline(name, fleet, reqs, base)
            wall = time.perf_counter() - t0
            sc = score_plan(pl, reqs, traces, fleet)
            rows.append(row(f"{name} (as planned)", pl, sc, wall, slo))
            st.update(f"{name}: calibrating headroom")
            pl, sc, wall, h = calibrated(name, fleet, reqs, traces, args.target, base)
            r = row(f"{name} @>={args.target:.0%}", pl, sc, wall, slo)
            r["calibrated_headroom"] = h
            rows.append(r)
        st.update("BO + CP-SAT")
        ev = make_evaluator(fleet, reqs, traces, base, seed=args.seed)
        space = space_for(reqs)
        h_cal = next((r.get("calibrated_headroom") for r in rows if r["method"].startswith("cpsat @")), None)
        start = {"ttft_scale": 1.0, "tpot_scale": 1.0, "log2_max_num_seqs": 8.0,
                 "log2_max_num_batched_tokens": 11.0}
        initial = [{**start, **{f"scale:{r.key}": 1.0 for r in reqs}}]
        if h_cal is not None:  # warm start from what CP-SAT alone found (the fast loop's answer)
            initial.append({**start, **{f"scale:{r.key}": 1.0 - h_cal for r in reqs}})
        t0 = time.perf_counter()
        res = run_outer_loop(ev, max_evals=args.evals, max_wall_s=args.bo_seconds, seed=args.seed,
                             target=args.target, space=space, initial=initial, n_init=len(initial) + 6,
                             progress=lambda i, o: st.update(
                                 f"BO eval {i}: ${o.cost_per_hour:.2f}/h attainment {o.attainment:.3f}"))
        bo_wall = time.perf_counter() - t0
        if res.plan is not None:
            sc = score_plan(res.plan, reqs, traces, fleet)
            r = row("BO + CP-SAT", res.plan, sc, bo_wall, slo)
            r["evaluations"] = res.evaluations
            rows.append(r)
            cfg = config_from_params(base, res.chosen.params)
        else:
            cfg = base
        lb = lower_bound(fleet, reqs, cfg)
        rows.append({"method": "LP lower bound (at BO point)", "cost_per_hour": lb, "gpus": None,
                     "attainment": None, "ttft_p99_s": None, "tpot_p99_s": None, "power_kw": None,
                     "plan_s": None, "params": {}})
    homog = next(r for r in rows if r["method"].startswith("homogeneous @"))
    t = Table(title=f"Planner benchmark: SLO TTFT p99 <= {args.ttft}s, TPOT p99 <= {args.tpot * 1e3:.0f} ms, "
                    f"attainment >= {args.target:.0%}; window {args.window:.0f}s")
    for c in ("method", "$/h", "GPUs", "served", "attainment", "p99 TTFT s", "p99 TPOT ms", "kW", "plan s",
              "x homog."):
        t.add_column(c, justify="right" if c != "method" else "left")

    def f(v, fmt):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    for r in rows:
        ratio = r["cost_per_hour"] / homog["cost_per_hour"] if homog["cost_per_hour"] else math.nan
        t.add_row(r["method"], f(r["cost_per_hour"], ".2f"), f(r["gpus"], "d"), f(r.get("served"), ".3f"),
                  f(r["attainment"], ".3f"),
                  f(r["ttft_p99_s"], ".2f"), f(None if r["tpot_p99_s"] is None else r["tpot_p99_s"] * 1e3, ".0f"),
                  f(r["power_kw"], ".1f"), f(r["plan_s"], ".2f"), f(ratio, ".2f"))
    con.print(t)
    con.print("[bold]Traces:[/bold]")
    con.print(attribution())
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2, default=str))


if __name__ == "__main__":
    main()
