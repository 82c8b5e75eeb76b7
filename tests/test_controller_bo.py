"""The operator's BO adapter: synthetic traces carry the workload's rate and lengths; a short outer-loop
run returns a packed plan with its Pareto front."""

from __future__ import annotations

import numpy as np
import pytest

from archipelago.controller.bo import bo_plan, workload_trace
from archipelago.decide.catalog import load_model_catalog
from archipelago.decide.planner import (
    FleetSnapshot,
    ModelRequest,
    NodeSnapshot,
    PlannerConfig,
    PoolSnapshot,
    Workload,
)
from archipelago.decide.sim import SLOTarget


def test_trace_matches_rate_and_lengths() -> None:
    w = Workload(rate_rps=20.0, input_hist=((512, 60.0), (2048, 40.0)), output_mean=100.0)
    tr = workload_trace(w, duration_s=300, seed=1)
    n = len(tr.arrival_s)
    assert abs(n / 300 - 20.0) < 1.0  # Poisson count within ~4 sigma
    inp = np.asarray(tr.input_tokens)
    share_small = float(np.mean(inp < 512))
    assert abs(share_small - 0.6) < 0.03 and inp.max() < 2048
    assert abs(float(np.mean(tr.output_tokens)) - 100.0) < 5.0
    again = workload_trace(w, duration_s=300, seed=1)
    assert np.array_equal(np.asarray(again.input_tokens), inp)  # seeded
    with pytest.raises(ValueError, match="rate_rps"):
        workload_trace(Workload(rate_rps=0.0, input_mean=10, output_mean=10))


def test_short_bo_run_returns_a_packed_plan() -> None:
    model = load_model_catalog().get("meta-llama/Llama-3.1-8B-Instruct")
    fleet = FleetSnapshot((PoolSnapshot("h100", "H100-SXM", 3.99, tuple(NodeSnapshot(f"h{i}", 8, 8) for i in range(2))),))
    req = ModelRequest(key="llm/chat", model=model, slo=SLOTarget(ttft_s=1.0, tpot_s=0.1, attainment=0.9),
                       workload=Workload(rate_rps=4.0, input_mean=1000, output_mean=200), allowed_tp=(1, 2),
                       min_replicas=1)
    p = bo_plan(fleet, [req], None, PlannerConfig(inner_time_limit_s=3, packing_time_limit_s=2), None,
                max_evals=3, max_wall_s=60, trace_s=60)
    assert p.model("llm/chat") is not None and p.model("llm/chat").islands
    assert p.assignments and p.params and len(p.pareto) >= 1
    assert sum(a.gpus for a in p.assignments) == p.gpus
