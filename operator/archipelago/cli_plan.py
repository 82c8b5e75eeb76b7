"""``archipelago plan``: plan islands offline from the same YAML as the CRDs.

Reads GPUPool, ServingSLO and ModelDeployment objects (multi-document YAML, parsed with
``archipelago.api.v1alpha1``), a trace (Azure CSV or any format ``archipelago.decide.traces``
loads) or each ModelDeployment's ``workloadHint``, runs the planner (optionally a baseline, or the
BoTorch outer loop), and prints the plan as rich tables, or JSON with ``--json``.

Without a cluster, each GPUPool's nodes are synthesised: ``spec.nodes.max`` (else ``min``, else
1) nodes of ``spec.nodes.gpusPerNode`` (else 8) free GPUs, named ``<pool>-<i>``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from archipelago.decide.planner.types import (
    FleetSnapshot,
    ModelRequest,
    NodeSnapshot,
    Plan,
    PlannerConfig,
    PoolSnapshot,
    Workload,
)


class PlanInputError(ValueError):
    """Bad CLI input; the message names the file/object and the fix."""


def load_resources(paths: list[Path]) -> tuple[list[Any], list[Any], list[Any]]:
    """Parse every object in the YAML files into (GPUPools, ServingSLOs, ModelDeployments).

    Raises:
        PlanInputError: unreadable file, or an object that is not a v1alpha1 resource (the
            message names file and document index)."""
    from archipelago.api.v1alpha1 import GPUPool, ModelDeployment, ServingSLO, parse_resource

    pools, slos, mds = [], [], []
    for p in paths:
        try:
            docs = list(yaml.safe_load_all(Path(p).read_text()))
        except (OSError, yaml.YAMLError) as e:
            raise PlanInputError(f"{p}: cannot read YAML: {e}") from e
        for i, d in enumerate(docs):
            if d is None or (isinstance(d, dict) and not str(d.get("apiVersion", "")).startswith("archipelago.dev/")):
                continue  # Namespaces, Kustomizations, ... are not planner input
            try:
                r = parse_resource(d, source=f"{p}#{i}")
            except ValueError as e:
                raise PlanInputError(f"{p} document {i}: {e}") from e
            {GPUPool: pools, ServingSLO: slos, ModelDeployment: mds}[type(r)].append(r)
    return pools, slos, mds


def fleet_from_pools(pools: list[Any]) -> FleetSnapshot:
    """Synthesise a :class:`FleetSnapshot` from GPUPool objects (see module docstring)."""
    from archipelago.decide.catalog import load_gpu_catalog

    gc = load_gpu_catalog()
    out = []
    for gp in pools:
        s = gp.spec
        name = gp.metadata.name
        try:
            cat = gc.get(s.gpu.type)
        except Exception as e:
            raise PlanInputError(f"GPUPool {name}: spec.gpu.type: {e}") from e
        price = s.pricing.spot_per_gpu_hour if s.pricing.use_spot else s.pricing.on_demand_per_gpu_hour
        if price is None:
            price = cat.price_per_gpu_hour
        n = s.nodes.max or s.nodes.min or 1
        g = s.nodes.gpus_per_node or 8
        nodes = tuple(NodeSnapshot(f"{name}-{i}", g, g) for i in range(n))
        out.append(PoolSnapshot(name, s.gpu.type, float(price), nodes, power_w=s.power.max_watts))
    return FleetSnapshot(tuple(out))


def requests_from_resources(slos: list[Any], mds: list[Any], workloads: dict[str, Workload]) -> list[ModelRequest]:
    """Build :class:`ModelRequest` s. ``workloads`` maps ``ns/name`` (or ``*``) to a workload;
    otherwise the ModelDeployment's ``workloadHint`` is used.

    Raises:
        PlanInputError: missing SLO, unknown model, or no workload (naming the object and fix)."""
    from archipelago.decide.catalog import load_model_catalog
    from archipelago.decide.perf import EngineLimits
    from archipelago.decide.sim import SLOTarget

    mc = load_model_catalog()
    by_slo = {(s.metadata.namespace or "default", s.metadata.name): s for s in slos}
    reqs = []
    for md in mds:
        ns = md.metadata.namespace or "default"
        key = f"{ns}/{md.metadata.name}"
        s = md.spec
        slo = by_slo.get((ns, s.slo_ref))
        if slo is None:
            raise PlanInputError(f"ModelDeployment {key}: spec.sloRef {s.slo_ref!r} names no ServingSLO in "
                                 f"namespace {ns}; add it to the YAML")
        try:
            model = mc.get(s.model.name)
        except Exception as e:
            raise PlanInputError(f"ModelDeployment {key}: spec.model.name: {e}") from e
        ss = slo.spec
        target = SLOTarget(ttft_s=ss.ttft.seconds, tpot_s=ss.tpot.seconds,
                           ttft_percentile=ss.ttft.percentile / 100.0, tpot_percentile=ss.tpot.percentile / 100.0,
                           attainment=ss.attainment)
        e = s.engine
        limits = EngineLimits(max_num_seqs=e.max_num_seqs or 256, max_num_batched_tokens=e.max_num_batched_tokens or 8192,
                              gpu_memory_utilization=e.gpu_memory_utilization, max_model_len=e.max_model_len,
                              quantization=s.model.quantization)
        wl = workloads.get(key) or workloads.get("*")
        if wl is None:
            h = s.workload_hint
            if h is None:
                raise PlanInputError(f"ModelDeployment {key}: no workload; pass --trace or set spec.workloadHint")
            wl = Workload(rate_rps=h.requests_per_second, input_mean=h.mean_input_tokens,
                          input_p90=getattr(h, "p90_input_tokens", None), output_mean=h.mean_output_tokens)
        pref = ss.objective.preset or "balanced"
        budget = ss.budget
        reqs.append(ModelRequest(
            key=key, model=model, slo=target, workload=wl, engine=e.kind, min_replicas=s.replicas.min,
            max_replicas=s.replicas.max, allowed_pools=tuple(s.placement.allowed_pools),
            allowed_tp=tuple(s.placement.tensor_parallel) or (1, 2, 4, 8), priority=s.priority,
            disaggregation=s.placement.disaggregation, limits=limits, preference=pref,
            max_cost_per_hour=budget.max_dollars_per_hour if budget else None,
            max_power_w=budget.max_watts if budget else None))
    return reqs


def render(plan: Plan, console: Console, score: Any = None, lb: float | None = None) -> None:
    """Print a plan as rich tables."""
    t = Table(title=f"Plan {plan.plan_id}  ${plan.cost_per_hour:.2f}/h  {plan.gpus} GPUs  "
                    f"{plan.power_w / 1000:.1f} kW  ({plan.stats.method}, {plan.stats.status}, "
                    f"{plan.stats.wall_s:.2f}s)")
    for c in ("model", "island", "GPU", "TP", "replicas", "prompt tokens", "share", "util", "p99 TTFT s",
              "p99 TPOT ms", "$/h"):
        t.add_column(c)
    for m in plan.models:
        for i in m.islands:
            hi = "inf" if not math.isfinite(i.input_range[1]) else f"{i.input_range[1]:.0f}"
            t.add_row(m.model, i.pool, i.gpu, str(i.tp), str(i.replicas), f"[{i.input_range[0]:.0f}, {hi})",
                      f"{i.traffic_share:.0%}", f"{i.utilization:.0%}", f"{i.ttft_p99_s:.2f}",
                      f"{i.tpot_p99_s * 1e3:.0f}", f"{i.cost_per_hour:.2f}")
    console.print(t)
    if score is not None:
        s = Table(title="Simulated (trace-driven)")
        for c in ("model", "attainment", "p99 TTFT s", "p99 TPOT ms", "SLO met"):
            s.add_column(c)
        for k, v in score.per_model.items():
            s.add_row(k, f"{v.get('attainment') or 0:.3f}", f"{v.get('ttft_p99_s') or math.nan:.2f}",
                      f"{(v.get('tpot_p99_s') or math.nan) * 1e3:.0f}", str(v.get("slo_met")))
        console.print(s)
    if lb is not None:
        console.print(f"LP lower bound: ${lb:.2f}/h ({plan.cost_per_hour / lb:.2f}x)" if lb > 0 else "")
    if plan.infeasibilities:
        inf = Table(title="Infeasibilities")
        for c in ("model", "constraint", "served", "detail", "suggestion"):
            inf.add_column(c)
        for i in plan.infeasibilities:
            inf.add_row(i.model, i.constraint, f"{i.served_fraction:.0%}", i.detail, i.suggestion)
        console.print(inf)
    console.print(f"pods placed: {len(plan.assignments)}, unplaced: {plan.unplaced_pods}, "
                  f"stranded GPUs: {plan.stranded_gpus}, packing gap: {plan.stats.packing_gap}")


def plot(path: Path, plan: Plan, costs: dict[str, float]) -> None:
    """PNG with the Pareto front (cost vs attainment) and a cost comparison bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    pts = plan.pareto
    a.scatter([p.cost_per_hour for p in pts], [p.attainment for p in pts], label="Pareto front")
    ch = [p for p in pts if p.chosen]
    if ch:
        a.scatter([ch[0].cost_per_hour], [ch[0].attainment], marker="*", s=200, c="red", label="chosen")
    a.set_xlabel("$/h")
    a.set_ylabel("SLO attainment")
    a.legend()
    names = list(costs)
    b.bar(names, [costs[n] for n in names])
    b.set_ylabel("$/h")
    b.set_title("cost by method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _structure_search(fleet: FleetSnapshot, reqs: list[ModelRequest], traces: dict[str, Any], cfg: PlannerConfig,
                      *, bo_evals: int, bo_seconds: float, seed: int, status: Any) -> Plan:
    """``--bo-evals``: CP-SAT + verify-and-repair, then the per-model BO structure search
    (:func:`archipelago.decide.planner.outer.run_per_model_search`) from that plan, each model's
    candidates judged with the other models held fixed; the chosen per-model plans, merged, get
    their pods packed (or, if the search fell back to a joint plan, it is re-planned with pod
    packing at the capacity scales that passed). Returns the plan with the search's
    Pareto front and parameters; never worse than CP-SAT + repair (its plan is the fallback)."""
    import dataclasses

    from archipelago.decide.planner.evaluate import score_plan
    from archipelago.decide.planner.islands import resolve_limits
    from archipelago.decide.planner.outer import (
        config_from_params,
        make_combiner,
        make_model_evaluator,
        run_per_model_search,
        structure_space,
    )
    from archipelago.decide.planner.planner import plan as run_plan

    base = cfg.with_(verify=True)
    status.update("CP-SAT + verify-and-repair (start of the structure search) ...")
    cp = run_plan(fleet, reqs, None, base, traces=traces, pack_pods=False)
    cp_score = score_plan(cp, reqs, traces, fleet, seed=seed)
    scales = {k[6:]: float(v) for k, v in cp.params.items() if k.startswith("scale:")}
    mev = make_model_evaluator(fleet, reqs, traces, base.with_(model_capacity_scale=scales), reference=cp,
                               seed=seed)
    comb = make_combiner(fleet, reqs, traces, base, seed=seed)
    start: dict[str, float] = {}
    for r in reqs:
        start[f"log2_mbt:{r.key}"] = math.log2(max(1, int(resolve_limits(r, cfg).max_num_batched_tokens)))
        start[f"islands:{r.key}"] = 3.5
    res = run_per_model_search(
        mev, comb, [r.key for r in reqs], space=structure_space(reqs, mns=None), max_evals=bo_evals,
        max_wall_s=bo_seconds, seed=seed, preference=reqs[0].preference,
        target={r.key: r.slo.attainment for r in reqs}, initial=[start], fallback=(cp, cp_score),
        progress=lambda k, i, o: status.update(f"structure search {i} ({k}): ${o.cost_per_hour:.2f}/h, "
                                               f"attainment {o.attainment:.3f}"))
    if res.chosen is None or res.plan is None:
        return cp
    if res.plan.params.get("merged_per_model"):
        # the per-model plans, merged: place their pods (re-solving jointly could split traffic differently)
        from archipelago.decide.planner.packing import PackItem, pack

        status.update("packing the chosen plan's pods ...")
        prio = {r.key: r.priority for r in reqs}
        items = [PackItem(i.id, i.pool, i.tp, i.replicas, prio.get(m.model, 0))
                 for m in res.plan.models for i in m.islands]
        packed = pack(fleet, items, cfg, None)
        p = dataclasses.replace(res.plan, assignments=tuple(sorted(packed.assignments, key=lambda a: (a.island, a.pod))),
                                unplaced_pods=packed.unplaced, stranded_gpus=packed.stranded_gpus)
    else:
        chosen_cfg = config_from_params(base, res.chosen.params)
        final_scales = {k[6:]: float(v) for k, v in res.plan.params.items() if k.startswith("scale:")}
        if final_scales:
            chosen_cfg = chosen_cfg.with_(model_capacity_scale=final_scales)
        status.update("re-planning the chosen point with pod packing ...")
        p = run_plan(fleet, reqs, None, chosen_cfg.with_(verify=False))
    params = dict(res.chosen.params)
    params["bo_evaluations"] = float(res.evaluations)
    params["bo_simulations"] = float(res.observations[0].extra.get("search_simulations", 0))
    return dataclasses.replace(p, pareto=tuple(res.pareto), params=params)


def plan_command(
    resources: list[Path] = typer.Argument(..., help="YAML files with GPUPool, ServingSLO, ModelDeployment objects"),
    trace: Path | None = typer.Option(None, help="trace file used as every model's workload (and for scoring)"),
    window: str | None = typer.Option(None, help="trace window START:END seconds"),
    rate_scale: float = typer.Option(1.0, help="multiply the trace's arrival rate"),
    baseline: str | None = typer.Option(None, help="homogeneous | melange | greedy instead of the planner"),
    bo_evals: int = typer.Option(0, help="BoTorch structure-search candidates per model (per-model "
                                 "max_num_batched_tokens and island cap, each with verify-and-repair; needs "
                                 "--trace; 0 = inner loop only)"),
    bo_seconds: float = typer.Option(300.0, help="outer-loop wall-time budget, s"),
    headroom: float = typer.Option(0.0, help="fraction of modelled capacity kept free"),
    time_limit: float = typer.Option(10.0, help="CP-SAT time limit per solve, s"),
    calibrate: bool = typer.Option(False, "--calibrate", help="calibrate per-replica capacities in the simulator "
                                   "(slower, cached; see docs/planner.md)"),
    verify: bool = typer.Option(False, "--verify", help="verify the plan in the simulator (on --trace, else a "
                                "synthetic trace from the workload) and repair per-model headroom"),
    seed: int = typer.Option(0, help="solver and BO seed"),
    plot_path: Path | None = typer.Option(None, "--plot", help="write Pareto front + cost comparison PNG"),
    json_out: bool = typer.Option(False, "--json", help="print the plan as JSON"),
) -> None:
    """Plan islands (GPU type x TP x replicas), routing and pod placement for the given resources."""
    from archipelago.decide.planner.baselines import lower_bound, run_baseline

    console = Console(stderr=json_out)
    try:
        pools, slos, mds = load_resources(resources)
        if not pools or not mds:
            raise PlanInputError("need at least one GPUPool and one ModelDeployment in the YAML")
        fleet = fleet_from_pools(pools)
        workloads: dict[str, Workload] = {}
        tr = None
        if trace is not None:
            from archipelago.decide.traces import load_trace

            tr = load_trace(trace)
            if window:
                a, _, b = window.partition(":")
                tr = tr.window(float(a), float(b))
            if rate_scale != 1.0:
                tr = tr.scale_rate(rate_scale)
            workloads["*"] = Workload.from_arrays(tr.arrival_s, tr.input_tokens, tr.output_tokens)
        reqs = requests_from_resources(slos, mds, workloads)
    except (PlanInputError, ValueError, OSError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    cfg = PlannerConfig(seed=seed, headroom=headroom, inner_time_limit_s=time_limit,
                        capacity_model="simulated" if calibrate else "analytic", verify=verify)
    traces = {r.key: tr for r in reqs} if tr is not None else None
    vkw = {"traces": traces} if verify else {}
    score = None
    with console.status("planning ...") as st:
        if baseline:
            try:
                p = run_baseline(baseline, fleet, reqs, cfg, **vkw)
            except ValueError as e:
                console.print(f"[red]error:[/red] {e}")
                raise typer.Exit(2) from None
        elif bo_evals > 0 and traces:
            p = _structure_search(fleet, reqs, traces, cfg, bo_evals=bo_evals, bo_seconds=bo_seconds, seed=seed,
                                  status=st)
        else:
            from archipelago.decide.planner.planner import plan as run_plan

            p = run_plan(fleet, reqs, None, cfg, **vkw,
                         **({"progress": lambda i, r: st.update(f"verify round {i}: ${r.cost_per_hour:.2f}/h, "
                                                                f"attainment {min(r.attainment.values()):.3f}")}
                            if verify else {}))
        if traces:
            from archipelago.decide.planner.evaluate import attach_score, score_plan

            st.update("simulating ...")
            score = score_plan(p, reqs, traces, fleet, seed=seed)
            p = attach_score(p, score)
        scales = {k[6:]: float(v) for k, v in p.params.items() if k.startswith("scale:")}
        lb = lower_bound(fleet, reqs, cfg.with_(verify=False, model_capacity_scale=scales or cfg.model_capacity_scale))
        costs = {}
        if plot_path is not None:
            st.update("baselines for the plot ...")
            costs = {"plan": p.cost_per_hour}
            for b in ("homogeneous", "melange", "greedy"):
                costs[b] = run_baseline(b, fleet, reqs, cfg, **vkw).cost_per_hour
            costs["LP bound"] = lb
    if plot_path is not None:
        plot(plot_path, p, costs)
    if json_out:
        d = p.to_dict()
        d["lowerBound"] = lb
        if score is not None:
            d["simulated"] = score.per_model
        print(json.dumps(d, indent=2, default=str))
    else:
        render(p, console, score, lb)
    if not p.feasible:
        raise typer.Exit(1)


app = typer.Typer(add_completion=False)
app.command("plan")(plan_command)

if __name__ == "__main__":
    app()
