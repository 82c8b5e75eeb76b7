"""Outer loop (ask/tell BO, Pareto front, operating point), baselines, and simulator scoring with
the real catalogue, performance model and simulator."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from archipelago.decide.planner.outer import (
    Observation,
    OuterLoop,
    choose,
    config_from_params,
    run_outer_loop,
)
from archipelago.decide.planner.types import PlannerConfig


def _toy(params):
    """Cost falls with headroom going down; attainment rises with headroom (a known trade-off)."""
    h = params["headroom"]
    cost = 10.0 * (1.0 + h) + params["ttft_scale"]
    att = 1.0 / (1.0 + math.exp(-12 * (h - 0.2)))
    return None, SimpleNamespace(cost_per_hour=cost, attainment=att, power_w=100 * cost)


def test_pareto_front_is_non_dominated_and_choose_respects_target():
    obs = [Observation({"a": 0}, 10, 0.95, 1000), Observation({"a": 1}, 12, 0.995, 1100),
           Observation({"a": 2}, 13, 0.99, 1200), Observation({"a": 3}, 20, 0.999, 900)]
    loop = OuterLoop(observations=obs)
    front = loop.pareto()
    assert obs[2] not in front and obs[1] in front and obs[0] in front
    assert choose(obs, "cost", 0.99) is obs[1]
    assert choose(obs, "energy", 0.99) is obs[3]
    assert choose(obs, "latency", 0.99) is obs[3]
    assert choose([obs[0]], "cost", 0.99) is obs[0]  # nothing meets the target: best attainment


@pytest.mark.slow
def test_run_outer_loop_is_seeded_bounded_and_warm_startable():
    space = {"headroom": (-0.2, 0.7), "ttft_scale": (0.25, 1.5)}
    r1 = run_outer_loop(_toy, max_evals=7, seed=3, n_init=4, space=space, target=0.9)
    r2 = run_outer_loop(_toy, max_evals=7, seed=3, n_init=4, space=space, target=0.9)
    assert r1.evaluations == 7 and len(r1.observations) == 7
    assert [o.params for o in r1.observations] == [o.params for o in r2.observations]
    assert r1.chosen is not None and r1.chosen.attainment >= 0.9
    assert sum(p.chosen for p in r1.pareto) == 1
    # warm start: previous observations are kept and not re-evaluated
    r3 = run_outer_loop(_toy, max_evals=2, seed=3, n_init=4, space=space, target=0.9,
                        observations=r1.observations)
    assert len(r3.observations) == 9 and r3.evaluations == 2
    assert r3.chosen.cost_per_hour <= r1.chosen.cost_per_hour + 1e-9


def test_config_from_params_maps_units():
    cfg = config_from_params(PlannerConfig(), {"headroom": 0.25, "log2_max_num_seqs": 7.0,
                                               "log2_max_num_batched_tokens": 11.0, "tpot_scale": 0.8})
    assert cfg.headroom == 0.25 and cfg.max_num_seqs == 128 and cfg.max_num_batched_tokens == 2048
    assert cfg.tpot_scale == 0.8


@pytest.fixture(scope="module")
def real_setup():
    from archipelago.decide.catalog import load_gpu_catalog, load_model_catalog
    from archipelago.decide.planner.types import (
        FleetSnapshot,
        ModelRequest,
        NodeSnapshot,
        PoolSnapshot,
        Workload,
    )
    from archipelago.decide.sim import SLOTarget
    from archipelago.decide.traces import poisson_trace

    gc, mc = load_gpu_catalog(), load_model_catalog()

    def pool(name, gpu, n):
        return PoolSnapshot(name, gpu, gc.get(gpu).price_per_gpu_hour,
                            tuple(NodeSnapshot(f"{name}-{i}", 8, 8) for i in range(n)))

    fleet = FleetSnapshot((pool("l4", "L4", 2), pool("a100", "A100-80GB", 1), pool("l40s", "L40S", 2)))
    tr = poisson_trace(6.0, 120, input_tokens=1024, output_tokens=128, seed=1)
    wl = Workload.from_arrays(tr.arrival_s, tr.input_tokens, tr.output_tokens)
    req = ModelRequest("ns/llama8b", mc.get("meta-llama/Llama-3.1-8B-Instruct"), SLOTarget(ttft_s=2.0, tpot_s=0.1),
                       wl)
    return fleet, [req], {"ns/llama8b": tr}


def test_planner_and_baselines_scored_by_the_simulator(real_setup):
    from archipelago.decide.planner.baselines import lower_bound, run_baseline
    from archipelago.decide.planner.evaluate import score_plan

    fleet, reqs, traces = real_setup
    cfg = PlannerConfig(headroom=0.2)
    plans = {n: run_baseline(n, fleet, reqs, cfg) for n in ("cpsat", "homogeneous", "melange", "greedy")}
    lb = lower_bound(fleet, reqs, cfg)
    for name, p in plans.items():
        assert p.feasible, (name, p.infeasibilities)
        assert p.cost_per_hour >= lb - 1e-6, name
        s = score_plan(p, reqs, traces, fleet)
        assert 0.0 <= s.attainment <= 1.0 and s.power_w > 0
        assert s.per_model["ns/llama8b"]["requests"] == len(traces["ns/llama8b"])
    # the planner's ILP optimum is never more expensive than the heuristics' under the same model
    assert plans["cpsat"].cost_per_hour <= min(plans["greedy"].cost_per_hour,
                                               plans["homogeneous"].cost_per_hour,
                                               plans["melange"].cost_per_hour) + 1e-6
    # a plan at 20 % headroom serves this light Poisson load within the SLO in the simulator
    assert score_plan(plans["cpsat"], reqs, traces, fleet).attainment >= 0.95
