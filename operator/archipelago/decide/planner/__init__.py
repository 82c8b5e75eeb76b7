"""The planner: islands (GPU type x TP x replicas), workload mapping and pod packing.

Inner loop (OR-Tools CP-SAT, :mod:`.islands`, :mod:`.packing`), outer loop (BoTorch qLogNEHVI,
:mod:`.outer`), baselines and the LP lower bound (:mod:`.baselines`), simulator scoring
(:mod:`.evaluate`). Pure code: no kopf, kubernetes or network imports. See ``docs/planner.md``.
"""

from .capacity import Bucket, Capacity, CapacityCache, predict_replica, replica_capacity, workload_buckets
from .planner import apply_hysteresis, plan, plan_still_valid
from .types import (
    CurrentPlacement,
    EngineSettings,
    FleetSnapshot,
    Infeasibility,
    IslandPlan,
    ModelPlan,
    ModelRequest,
    NodeSnapshot,
    ParetoPoint,
    Plan,
    PlannerConfig,
    PlannerInputError,
    PodAssignment,
    PoolSnapshot,
    RangeShare,
    SolveStats,
    Workload,
    island_id,
)

__all__ = [
    "Bucket", "Capacity", "CapacityCache", "CurrentPlacement", "EngineSettings", "FleetSnapshot",
    "Infeasibility", "IslandPlan", "ModelPlan", "ModelRequest", "NodeSnapshot", "ParetoPoint", "Plan",
    "PlannerConfig", "PlannerInputError", "PodAssignment", "PoolSnapshot", "RangeShare", "SolveStats",
    "Workload", "apply_hysteresis", "island_id", "plan", "plan_still_valid", "predict_replica",
    "replica_capacity", "workload_buckets",
]
