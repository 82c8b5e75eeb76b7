"""Planner benchmark on the Azure LLM inference traces.

Fleet: five GPU types (H100-SXM, A100-80GB, L40S, A10G, L4) with catalogue prices. Models:
Llama-3.1-8B (code trace), Llama-3.1-70B (conversation trace) and the MoE Qwen3-30B-A3B
(conversation trace, a later window), rate-scaled so the fleet is stressed. Every method's plan
is scored by the same trace-driven simulator (``archipelago.decide.sim``).

Rows (every plan scored by the same simulator on the same traces):
* ``<method> one-shot, analytic``: the plan from the analytic queueing capacity, no headroom;
* ``<method> calibrated + repair``: capacities calibrated per (model, GPU, TP, bucket) in the
  simulator (``capacity_model="simulated"``) and verify-and-repair of per-model headroom against
  the traces (``verify=True``) -- the same procedure for the planner and every baseline;
* ``BO + CP-SAT``: the per-model structure search (round 4,
  :func:`~archipelago.decide.planner.outer.run_per_model_search`, qLogNEHVI per model) over
  per-model ``max_num_batched_tokens`` and island caps -- what verify-and-repair cannot search.
  Each candidate is judged for its model alone with the other models held fixed (their GPUs in
  CP-SAT + repair's plan withheld; per-model verify-and-repair warm-started at CP-SAT + repair's
  scale, scored on the model's trace); then every model's cheapest passing setting is combined
  and checked by a joint CP-SAT + verify-and-repair; if that misses the target, CP-SAT + repair's
  own plan is kept. The simulations each method spent are reported in single-model simulations;
* LP lower bounds over all variants with the calibrated capacities (at the scales CP-SAT +
  repair settled on, and without headroom) -- bounds relative to those capacities.

Usage: ``python bench/bench_planner.py [--window 1200] [--evals 5] [--bo-sims 150] [--json out.json]``.
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
from archipelago.decide.planner.capacity import CapacityCache
from archipelago.decide.planner.evaluate import score_plan
from archipelago.decide.planner.outer import (
    make_combiner,
    make_model_evaluator,
    pool_slack,
    run_per_model_search,
    structure_space,
)
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
    missed = any(i.constraint == "slo-attainment" for i in plan.infeasibilities)
    return {"method": name, "cost_per_hour": plan.cost_per_hour, "gpus": plan.gpus,
            "attainment": score.attainment, "ttft_p99_s": ttft, "tpot_p99_s": tpot,
            "power_kw": score.power_w / 1000.0, "plan_s": wall, "params": dict(plan.params),
            "served": min((m.served_fraction for m in plan.models), default=0.0),
            "per_model_attainment": {k: v.get("attainment") for k, v in score.per_model.items()},
            "met": (score.attainment >= slo.attainment and not missed),
            "islands": [(i.id, i.replicas) for i in plan.islands]}


def scales_of(plan) -> dict[str, float]:
    """Per-model capacity scales verify-and-repair settled on (``scale:<key>`` params)."""
    return {k[6:]: float(v) for k, v in plan.params.items() if k.startswith("scale:")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--window", type=float, default=1200.0, help="trace window, seconds")
    ap.add_argument("--evals", type=int, default=5,
                    help="BO candidates per model (each = CP-SAT + repair of that model alone + score)")
    ap.add_argument("--bo-sims", type=int, default=150,
                    help="BO budget in single-model simulations (a whole-plan simulation of 3 models = 3)")
    ap.add_argument("--bo-seconds", type=float, default=220.0, help="BO wall-time budget, s")
    ap.add_argument("--verify-iters", type=int, default=8, help="verify-and-repair rounds per method")
    ap.add_argument("--ttft", type=float, default=3.0)
    ap.add_argument("--tpot", type=float, default=0.15)
    ap.add_argument("--target", type=float, default=0.99)
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    con = Console(width=170)
    slo = SLOTarget(ttft_s=args.ttft, tpot_s=args.tpot, attainment=args.target)
    fleet = build_fleet()
    reqs, traces = build_workload(args.window, slo)
    base = PlannerConfig(seed=args.seed)
    cal = base.with_(capacity_model="simulated", verify=True, verify_max_iters=args.verify_iters)
    cache = CapacityCache()
    rows = []
    t_start = time.perf_counter()
    with con.status("running methods ...") as st:
        # calibration of every variant once (shared by all methods and the bound), timed apart
        st.update("calibrating capacities in the simulator")
        t0 = time.perf_counter()
        lb1 = lower_bound(fleet, reqs, cal.with_(verify=False), cache=cache)
        calib_s = time.perf_counter() - t0
        for name in ("cpsat", "homogeneous", "melange", "greedy"):
            st.update(f"{name}: one shot (analytic capacity)")
            t0 = time.perf_counter()
            pl = run_baseline(name, fleet, reqs, base)
            wall = time.perf_counter() - t0
            sc = score_plan(pl, reqs, traces, fleet)
            rows.append(row(f"{name} one-shot, analytic", pl, sc, wall, slo))
            st.update(f"{name}: simulated capacity + verify-and-repair")
            t0 = time.perf_counter()
            pl = run_baseline(name, fleet, reqs, cal, traces=traces, cache=cache)
            wall = time.perf_counter() - t0
            sc = score_plan(pl, reqs, traces, fleet)
            r = row(f"{name} calibrated + repair", pl, sc, wall, slo)
            r["scales"] = scales_of(pl)
            # single-model simulations: (repair rounds + final score) x models
            r["simulations"] = (int(pl.params.get("verify_rounds", 0)) + 1) * len(reqs)
            rows.append(r)
            if name == "cpsat":
                cp_plan = (pl, sc)
        cp = next(r for r in rows if r["method"] == "cpsat calibrated + repair")
        keys = [r.key for r in reqs]
        st.update("BO + CP-SAT (per-model structure search)")
        # pool slack of CP-SAT + repair's plan: models interact only through pool GPU limits
        slack = pool_slack(fleet, cp_plan[0])
        mev = make_model_evaluator(fleet, reqs, traces, cal.with_(model_capacity_scale=cp["scales"]),
                                   reference=cp_plan[0], seed=args.seed, cache=cache)
        comb = make_combiner(fleet, reqs, traces, cal, seed=args.seed, cache=cache)
        start = {}
        for k in keys:  # CP-SAT + repair's own configuration: vLLM limits of the requests, no island cap
            start.update({f"log2_mbt:{k}": 11.0, f"islands:{k}": 3.5})
        # initial design per model: CP-SAT + repair's own point, then the neighbouring chunk budgets
        design = [start] + [{**start, **{f"log2_mbt:{k}": e for k in keys}} for e in (12.0, 10.0)]
        t0 = time.perf_counter()
        res = run_per_model_search(
            mev, comb, keys, space=structure_space(reqs, mns=None), max_evals=args.evals,
            max_sims=args.bo_sims, max_wall_s=args.bo_seconds, seed=args.seed, target=args.target,
            initial=design, n_init=3, fallback=cp_plan,
            progress=lambda k, i, o: st.update(f"BO eval {i} ({k}): ${o.cost_per_hour:.2f}/h "
                                               f"attainment {o.attainment:.3f}"))
        bo_wall = time.perf_counter() - t0
        bo_sims = int(res.observations[0].extra.get("search_simulations", 0))
        if res.plan is not None:
            sc = score_plan(res.plan, reqs, traces, fleet)
            fell_back = bool(res.chosen.extra.get("fallback"))
            r = row(f"BO + CP-SAT + repair (per-model search, {res.evaluations} evals"
                    f"{', fell back to CP-SAT+repair' if fell_back else ''})", res.plan, sc,
                    bo_wall + cp["plan_s"], slo)
            r["evaluations"] = res.evaluations
            r["simulations"] = bo_sims + cp["simulations"]
            r["bo_params"] = res.chosen.params
            r["pool_slack"] = slack
            r["per_model_observations"] = {
                k: [{"params": o.params, "cost_per_hour": o.cost_per_hour, "attainment": o.attainment,
                     "scale": o.extra.get("scale"), "simulations": o.extra.get("simulations")} for o in obs]
                for k, obs in res.observations[0].extra["per_model_observations"].items()}
            r["joint"] = [{"params": o.params, "cost_per_hour": o.cost_per_hour, "attainment": o.attainment,
                           "fallback": bool(o.extra.get("fallback"))} for o in res.observations]
            rows.append(r)
        st.update("LP lower bounds")
        lb2 = lower_bound(fleet, reqs, cal.with_(verify=False, model_capacity_scale=cp["scales"]), cache=cache)
    for name, v in (("LP bound, calibrated capacity, scales of CP-SAT+repair", lb2),
                    ("LP bound, calibrated capacity, no headroom", lb1)):
        rows.append({"method": name, "cost_per_hour": v, "gpus": None, "attainment": None, "ttft_p99_s": None,
                     "tpot_p99_s": None, "power_kw": None, "plan_s": None, "params": {}})
    homog = next(r for r in rows if r["method"] == "homogeneous calibrated + repair")
    mel = next(r for r in rows if r["method"] == "melange calibrated + repair")
    t = Table(title=f"Planner benchmark: SLO TTFT p99 <= {args.ttft}s, TPOT p99 <= {args.tpot * 1e3:.0f} ms, "
                    f"attainment >= {args.target:.0%}; window {args.window:.0f}s")
    for c in ("method", "$/h", "GPUs", "attainment", "met", "p99 TTFT s", "p99 TPOT ms", "kW", "plan s", "sims",
              "x homog.", "x Melange", "x LB"):
        t.add_column(c, justify="right" if c != "method" else "left")

    def f(v, fmt):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    for r in rows:
        c = r["cost_per_hour"]
        t.add_row(r["method"], f(c, ".2f"), f(r["gpus"], "d"), f(r["attainment"], ".3f"),
                  "-" if "met" not in r else ("yes" if r["met"] else "NO"),
                  f(r["ttft_p99_s"], ".2f"), f(None if r["tpot_p99_s"] is None else r["tpot_p99_s"] * 1e3, ".0f"),
                  f(r["power_kw"], ".1f"), f(r["plan_s"], ".1f"), f(r.get("simulations"), "d"),
                  f(c / homog["cost_per_hour"], ".2f"),
                  f(c / mel["cost_per_hour"], ".2f"), f(c / lb2 if lb2 else math.nan, ".2f"))
    con.print(t)
    con.print("sims = single-model simulations (repair rounds + scoring; one whole-plan simulation of the 3 "
              "models counts 3)")
    bo = next((r for r in rows if r["method"].startswith("BO")), None)
    if bo is not None:
        con.print("pool GPUs used by CP-SAT + repair / free: "
                  + ", ".join(f"{k} {u}/{f}" for k, (u, f) in bo["pool_slack"].items()))
        for k, obs in bo["per_model_observations"].items():
            con.print(f"{k}: " + "; ".join(
                f"mbt {2 ** round(o['params'][f'log2_mbt:{k}'])} isl {o['params'][f'islands:{k}']:.1f} "
                f"${o['cost_per_hour']:.2f} a={o['attainment']:.3f}" for o in obs))
    con.print(f"simulator calibration of all {cache.misses} (variant, bucket) capacities: {calib_s:.1f} s "
              f"(cached, shared by every method); total bench {time.perf_counter() - t_start:.0f} s")
    con.print("[bold]Traces:[/bold]")
    con.print(attribution())
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args), "calibration_s": calib_s},
                                              indent=2, default=str))


if __name__ == "__main__":
    main()
