"""Outer loop: multi-objective Bayesian optimisation (BoTorch qLogNEHVI) over the knobs the inner
loop cannot judge analytically, each candidate evaluated by running the inner loop and scoring
the plan in the trace-driven simulator.

Search space (unit cube, mapped by :data:`DEFAULT_SPACE`): capacity ``headroom`` (fraction of
modelled SLO capacity kept free), ``ttft_scale`` and ``tpot_scale`` (multipliers of the SLO
targets the capacity model plans for -- they absorb burstiness and the queueing
approximation's error), ``log2 max_num_seqs`` and ``log2 max_num_batched_tokens`` (the chunked-
prefill token budget: smaller steps cut the inter-token latency that long prompts inflict on
co-scheduled decodes, at some prefill throughput).

Objectives (all maximised internally): ``-cost`` ($/h), ``attainment`` (minimum over models of
the simulated fraction of requests meeting TTFT and TPOT), ``-power`` (W). The Pareto front is
kept; :func:`choose` picks the operating point for a ServingSLO preference.

Ask/tell boundary: :class:`OuterLoop` generates candidates (pure; seeded) and takes results;
:func:`run_outer_loop` drives it with a budget in evaluations and wall time and is safe to call
from a worker thread or process (no global state besides torch's RNG, seeded per call). Warm
start by passing previous ``observations``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .types import ParetoPoint

#: name -> (low, high, log2?) for each searched parameter.
DEFAULT_SPACE: dict[str, tuple[float, float]] = {
    "headroom": (-0.2, 0.7),
    "ttft_scale": (0.25, 1.5),
    "tpot_scale": (0.5, 1.5),
    "log2_max_num_seqs": (5.0, 9.0),
    "log2_max_num_batched_tokens": (9.0, 13.0),
}


@dataclass
class Observation:
    """One evaluated candidate: ``params`` (real units) and objectives ``cost_per_hour`` ($/h),
    ``attainment`` (0..1) and ``power_w`` (W)."""

    params: dict[str, float]
    cost_per_hour: float
    attainment: float
    power_w: float
    extra: dict[str, Any] = field(default_factory=dict)


class OuterLoop:
    """Ask/tell multi-objective BO with qLogNEHVI (``botorch.acquisition.multi_objective``).

    Args:
        space: parameter bounds (real units), default :data:`DEFAULT_SPACE`.
        seed: seeds the Sobol initial design and acquisition optimisation.
        n_init: Sobol points before the GP is used.
        observations: previous observations (warm start; outside-space params are clipped).
        num_restarts, raw_samples: acquisition optimiser effort (kept small for 2 CPU cores).
    """

    def __init__(self, space: dict[str, tuple[float, float]] | None = None, seed: int = 0, n_init: int = 6,
                 observations: list[Observation] | None = None, num_restarts: int = 4,
                 raw_samples: int = 64) -> None:
        self.space = dict(space or DEFAULT_SPACE)
        self.names = list(self.space)
        self.seed = seed
        self.n_init = n_init
        self.obs: list[Observation] = list(observations or [])
        self.num_restarts = num_restarts
        self.raw_samples = raw_samples
        self._asked = 0
        self._sobol_i = 0

    # -- coordinate maps ---------------------------------------------------------------
    def to_unit(self, params: dict[str, float]) -> np.ndarray:
        """Params (real units) -> point in [0, 1]^d (clipped)."""
        return np.array([min(1.0, max(0.0, (params[n] - lo) / (hi - lo)))
                         for n, (lo, hi) in self.space.items()])

    def from_unit(self, x: np.ndarray) -> dict[str, float]:
        """Point in [0, 1]^d -> params (real units)."""
        return {n: float(lo + (hi - lo) * xi) for (n, (lo, hi)), xi in zip(self.space.items(), x, strict=True)}

    # -- ask / tell ---------------------------------------------------------------------
    def ask(self) -> dict[str, float]:
        """Next candidate (real units): Sobol while fewer than ``n_init`` observations, then the
        maximiser of qLogNEHVI on a GP fitted to the observations."""
        import torch

        self._asked += 1
        if len(self.obs) < self.n_init:
            from torch.quasirandom import SobolEngine

            eng = SobolEngine(len(self.names), scramble=True, seed=self.seed)
            pts = eng.draw(self._sobol_i + 1).numpy()
            self._sobol_i += 1
            return self.from_unit(pts[-1])
        return self.from_unit(self._bo_candidate(torch))

    def tell(self, params: dict[str, float], cost_per_hour: float, attainment: float, power_w: float,
             **extra: Any) -> Observation:
        """Record an evaluation; returns the stored :class:`Observation`."""
        o = Observation(dict(params), float(cost_per_hour), float(attainment), float(power_w), dict(extra))
        self.obs.append(o)
        return o

    def _Y(self) -> np.ndarray:
        return np.array([[-o.cost_per_hour, o.attainment, -o.power_w / 1000.0] for o in self.obs])

    def _bo_candidate(self, torch: Any) -> np.ndarray:
        from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
        from botorch.fit import fit_gpytorch_mll
        from botorch.models import SingleTaskGP
        from botorch.models.transforms.outcome import Standardize
        from botorch.optim import optimize_acqf
        from gpytorch.mlls import ExactMarginalLogLikelihood

        torch.manual_seed(self.seed + len(self.obs))
        X = torch.tensor(np.array([self.to_unit(o.params) for o in self.obs]), dtype=torch.double)
        Yn = self._Y()
        Y = torch.tensor(Yn, dtype=torch.double)
        model = SingleTaskGP(X, Y, outcome_transform=Standardize(m=Y.shape[-1]))
        mll = ExactMarginalLogLikelihood(model.likelihood, model)
        with contextlib.suppress(Exception):  # keep the prior hyper-parameters if fitting fails
            fit_gpytorch_mll(mll)
        ref = torch.tensor([Yn[:, 0].min() - 0.1 * abs(Yn[:, 0].min()) - 1e-3,
                            max(0.0, Yn[:, 1].min() - 0.05),
                            Yn[:, 2].min() - 0.1 * abs(Yn[:, 2].min()) - 1e-3], dtype=torch.double)
        acq = qLogNoisyExpectedHypervolumeImprovement(model=model, ref_point=ref, X_baseline=X,
                                                      prune_baseline=True)
        bounds = torch.stack([torch.zeros(X.shape[-1]), torch.ones(X.shape[-1])]).double()
        cand, _ = optimize_acqf(acq, bounds=bounds, q=1, num_restarts=self.num_restarts,
                                raw_samples=self.raw_samples, options={"seed": self.seed + len(self.obs)})
        return cand.detach().numpy()[0]

    # -- results ------------------------------------------------------------------------
    def pareto(self) -> list[Observation]:
        """Non-dominated observations (min cost, max attainment, min power), by cost."""
        front = []
        for i, a in enumerate(self.obs):
            dom = False
            for j, b in enumerate(self.obs):
                if i == j:
                    continue
                if (b.cost_per_hour <= a.cost_per_hour and b.attainment >= a.attainment
                        and b.power_w <= a.power_w and (b.cost_per_hour < a.cost_per_hour
                                                        or b.attainment > a.attainment or b.power_w < a.power_w)):
                    dom = True
                    break
            if not dom:
                front.append(a)
        return sorted(front, key=lambda o: (o.cost_per_hour, -o.attainment))


def choose(observations: list[Observation], preference: str = "cost", target: float = 0.99) -> Observation | None:
    """Operating point for a ServingSLO preference among ``observations``:

    * ``cost``: cheapest with attainment >= ``target`` (else the highest attainment);
    * ``energy``: lowest power with attainment >= ``target``;
    * ``latency``: highest attainment, then cheapest;
    * ``balanced``: meets ``target`` and minimises cost/min_cost + power/min_power.
    """
    if not observations:
        return None
    ok = [o for o in observations if o.attainment >= target]
    if preference == "latency" or not ok:
        return max(observations, key=lambda o: (round(o.attainment, 4), -o.cost_per_hour))
    if preference == "energy":
        return min(ok, key=lambda o: (o.power_w, o.cost_per_hour))
    if preference == "balanced":
        c0 = min(o.cost_per_hour for o in ok) or 1.0
        w0 = min(o.power_w for o in ok) or 1.0
        return min(ok, key=lambda o: o.cost_per_hour / c0 + o.power_w / w0)
    return min(ok, key=lambda o: (o.cost_per_hour, -o.attainment))


@dataclass
class OuterResult:
    """Outcome of :func:`run_outer_loop`: chosen observation and its plan, the Pareto front (as
    :class:`ParetoPoint`), all observations (for warm starts), evaluations and wall time (s)."""

    chosen: Observation | None
    plan: Any
    pareto: list[ParetoPoint]
    observations: list[Observation]
    evaluations: int
    wall_s: float


def _pareto_points(loop: OuterLoop, chosen: Observation | None) -> list[ParetoPoint]:
    """The loop's Pareto front as :class:`ParetoPoint`, the chosen observation flagged (and appended
    when it is not on the front, e.g. a cheaper point that misses the attainment target)."""
    pts = [ParetoPoint(o.cost_per_hour, o.attainment, o.power_w, o.params, chosen=o is chosen)
           for o in loop.pareto()]
    if chosen is not None and all(not p.chosen for p in pts):
        pts.append(ParetoPoint(chosen.cost_per_hour, chosen.attainment, chosen.power_w, chosen.params, chosen=True))
    return pts


def run_outer_loop(evaluate: Callable[[dict[str, float]], tuple[Any, Any]], *, max_evals: int = 20,
                   max_wall_s: float = 300.0, seed: int = 0, preference: str = "cost", target: float = 0.99,
                   observations: list[Observation] | None = None, n_init: int = 6,
                   initial: list[dict[str, float]] | None = None,
                   progress: Callable[[int, Observation], None] | None = None,
                   space: dict[str, tuple[float, float]] | None = None) -> OuterResult:
    """Run BO for at most ``max_evals`` evaluations and ``max_wall_s`` seconds.

    Args:
        evaluate: ``params -> (plan, score)`` where ``score`` has ``cost_per_hour``,
            ``attainment``, ``power_w`` (e.g. :func:`make_evaluator`).
        initial: points evaluated first (e.g. the inner loop's defaults) -- BO then starts from
            what CP-SAT alone would do.
        observations: warm start (not re-evaluated; their plans are not available).
        progress: called after each evaluation with (index, observation).

    Returns:
        :class:`OuterResult`; the chosen plan is re-evaluated if it came from a warm start.
    """
    t0 = time.perf_counter()
    loop = OuterLoop(space=space, seed=seed, n_init=n_init, observations=observations)
    plans: dict[int, Any] = {}
    evals = 0
    queue = list(initial or [])
    while evals < max_evals and time.perf_counter() - t0 < max_wall_s:
        params = queue.pop(0) if queue else loop.ask()
        pl, sc = evaluate(params)
        o = loop.tell(params, sc.cost_per_hour, sc.attainment, sc.power_w)
        plans[id(o)] = pl
        evals += 1
        if progress:
            progress(evals, o)
    ch = choose(loop.obs, preference, target)
    pl = plans.get(id(ch)) if ch is not None else None
    if ch is not None and pl is None:
        pl, _ = evaluate(ch.params)
    return OuterResult(ch, pl, _pareto_points(loop, ch), loop.obs, evals, time.perf_counter() - t0)


def space_for(requests: list[Any], per_model: bool = True) -> dict[str, tuple[float, float]]:
    """Search space for ``requests``: :data:`DEFAULT_SPACE`, and with ``per_model`` a capacity
    scale ``scale:<ns/name>`` in [0.2, 1.3] per model replacing the global headroom (bursty
    traces need more slack than smooth ones; one global knob over-provisions the smooth)."""
    sp = dict(DEFAULT_SPACE)
    if per_model:
        sp.pop("headroom")
        for r in requests:
            sp[f"scale:{r.key}"] = (0.2, 1.3)
    return sp


def config_from_params(base: Any, params: dict[str, float]) -> Any:
    """Apply outer-loop ``params`` to a :class:`PlannerConfig` (``scale:<key>`` entries become
    ``model_capacity_scale``; ``log2_*`` engine limits are rounded to powers of two)."""
    kw: dict[str, Any] = {}
    scales = {k[6:]: float(v) for k, v in params.items() if k.startswith("scale:")}
    if scales:
        kw["model_capacity_scale"] = scales
    if "headroom" in params:
        kw["headroom"] = float(params["headroom"])
    if "ttft_scale" in params:
        kw["ttft_scale"] = float(params["ttft_scale"])
    if "tpot_scale" in params:
        kw["tpot_scale"] = float(params["tpot_scale"])
    # engine limits are rounded to powers of two: a handful of distinct values keeps the
    # simulator-calibrated capacities (cached per limits) reusable across evaluations
    if "log2_max_num_seqs" in params:
        kw["max_num_seqs"] = int(2 ** round(params["log2_max_num_seqs"]))
    if "log2_max_num_batched_tokens" in params:
        kw["max_num_batched_tokens"] = int(2 ** round(params["log2_max_num_batched_tokens"]))
    mbt = dict(base.model_max_num_batched_tokens)
    mns = dict(base.model_max_num_seqs)
    isl = dict(base.model_max_islands)
    for k, v in params.items():
        name, _, key = k.partition(":")
        if not key:
            continue
        if name == "log2_mbt":
            mbt[key] = int(2 ** round(float(v)))
        elif name == "log2_mns":
            mns[key] = int(2 ** round(float(v)))
        elif name == "islands":
            cap = island_cap(float(v))
            if cap is None:
                isl.pop(key, None)
            else:
                isl[key] = cap
    if mbt != base.model_max_num_batched_tokens:
        kw["model_max_num_batched_tokens"] = mbt
    if mns != base.model_max_num_seqs:
        kw["model_max_num_seqs"] = mns
    if isl != base.model_max_islands:
        kw["model_max_islands"] = isl
    return base.with_(**kw)


#: ``islands:<key>`` values at or above this mean "no cap on the model's islands".
ISLANDS_UNCAPPED = 3


def island_cap(x: float) -> int | None:
    """Island cap encoded by a continuous ``islands:<key>`` parameter: ``floor(x)`` clipped to
    ``>= 1``; values ``>= ISLANDS_UNCAPPED`` mean no cap (None)."""
    k = max(1, int(math.floor(x + 1e-9)))
    return None if k >= ISLANDS_UNCAPPED else k


def grid_key(params: dict[str, float]) -> tuple:
    """The discrete configuration ``params`` map to (engine limits rounded to powers of two,
    island caps floored, other parameters rounded to 3 decimals): two parameter vectors with the
    same key give the same plan, so the structure search does not spend evaluations on both."""
    out = []
    for k in sorted(params):
        v = float(params[k])
        name = k.partition(":")[0]
        if name.startswith("log2"):
            out.append((k, int(round(v))))
        elif name == "islands":
            out.append((k, island_cap(v) or 0))
        else:
            out.append((k, round(v, 3)))
    return tuple(out)


def structure_space(requests: list[Any], *, mbt: tuple[float, float] = (9.0, 13.0),
                    mns: tuple[float, float] | None = (6.0, 9.0),
                    islands: tuple[float, float] = (1.0, ISLANDS_UNCAPPED + 0.999)
                    ) -> dict[str, tuple[float, float]]:
    """Per-model structure search space of :func:`run_structure_search`: what verify-and-repair
    (per-model capacity scales) cannot search --

    * ``log2_mbt:<key>``: log2 of the model's ``max_num_batched_tokens`` (chunked-prefill token
      budget; default 2^9..2^13 = 512..8192 tokens): larger steps raise prefill throughput,
      smaller ones cut the inter-token latency long prompts inflict on co-running decodes;
    * ``log2_mns:<key>``: log2 of ``max_num_seqs`` (default 64..512; None drops it);
    * ``islands:<key>``: island cap (1, 2, or uncapped): consolidation onto fewer islands, i.e.
      fewer whole-replica roundings and least-loaded pooling over more replicas of one island.

    Each changes the simulator-calibrated capacities or the plan's structure, so the inner loop
    cannot judge it analytically. Returns ``{name: (low, high)}`` in real units."""
    sp: dict[str, tuple[float, float]] = {}
    for r in requests:
        sp[f"log2_mbt:{r.key}"] = mbt
        if mns is not None:
            sp[f"log2_mns:{r.key}"] = mns
        sp[f"islands:{r.key}"] = islands
    return sp


def _split(params: dict[str, float], key: str) -> dict[str, float]:
    return {k: v for k, v in params.items() if k.partition(":")[2] == key}


def run_structure_search(evaluate: Callable[[dict[str, float]], tuple[Any, Any]], keys: list[str], *,
                         space: dict[str, tuple[float, float]], max_evals: int = 12,
                         max_wall_s: float = 300.0, seed: int = 0, preference: str = "cost",
                         target: float | dict[str, float] = 0.99,
                         initial: list[dict[str, float]] | None = None,
                         observations: list[Observation] | None = None, n_init: int = 3,
                         progress: Callable[[int, Observation], None] | None = None,
                         num_restarts: int = 2, raw_samples: int = 48) -> OuterResult:
    """Multi-objective BO over per-model structure (:func:`structure_space`), exploiting that a
    plan's cost and power are sums over models and its attainment the minimum over models
    (models are routed and simulated independently; they couple only through pool GPUs).

    One :class:`OuterLoop` (qLogNEHVI on a GP over the model's own parameters; objectives the
    model's $/h, simulated attainment and W) per model; each *joint* evaluation combines one
    candidate per model, runs the inner loop + verify-and-repair once and feeds every model's
    share of the result to its loop -- each evaluation is an observation for every model, so 3
    models learn 3x faster than one GP over the joint space. A candidate whose discrete
    configuration (:func:`grid_key`) a model has already evaluated is replaced by that model's
    next Sobol point. The last evaluation combines every model's chosen point (by
    ``preference`` and its attainment ``target``) if that combination was not evaluated; the
    answer is the joint observation :func:`choose` picks -- so it is never worse than the
    ``initial`` point (e.g. the CP-SAT + repair configuration) by the chosen criterion.

    Args:
        evaluate: ``params -> (plan, score)``; ``score.per_model[key]`` needs ``attainment``,
            ``slo_met`` and optionally ``energy_j``/``horizon_s``; ``plan.model(key)`` gives the
            model's ``cost_per_hour`` and ``power_w`` (e.g. :func:`make_evaluator` with
            ``repair=True``).
        keys: model keys (``ns/name``), as in ``space``'s ``<name>:<key>`` entries.
        space: ``{"<param>:<key>": (low, high)}``.
        max_evals, max_wall_s: budget (evaluations, seconds; checked before each evaluation).
        seed: Sobol / acquisition seed (per model ``seed + index``).
        preference, target: operating point (see :func:`choose`); ``target`` per model or one
            for all.
        initial: joint points evaluated first.
        observations: warm start: joint observations of an earlier run (their ``extra`` must hold
            ``per_model`` as recorded here); not re-evaluated.
        progress: called after each evaluation with ``(index, observation)``.

    Returns:
        :class:`OuterResult` over joint observations (``extra["per_model"]`` per model:
        ``cost_per_hour``, ``attainment``, ``power_w``; ``extra["simulations"]``).
    """
    t0 = time.perf_counter()
    tgt = {k: (target[k] if isinstance(target, dict) else float(target)) for k in keys}
    joint_target = min(tgt.values()) if tgt else 0.99
    loops = {}
    for i, k in enumerate(keys):
        sub = {n: b for n, b in space.items() if n.partition(":")[2] == k}
        loops[k] = OuterLoop(space=sub, seed=seed + i, n_init=n_init, num_restarts=num_restarts,
                             raw_samples=raw_samples)
    joint = OuterLoop(space=space, seed=seed, n_init=n_init, observations=observations)
    seen: dict[str, set] = {k: set() for k in keys}
    for o in joint.obs:
        _tell_models(loops, seen, o, keys)
    plans: dict[int, Any] = {}
    evals = 0
    queue = list(initial or [])
    combined_done = False

    def run_one(params: dict[str, float]) -> None:
        nonlocal evals
        pl, sc = evaluate(params)
        per = _per_model(pl, sc, keys, tgt)
        o = joint.tell(params, sc.cost_per_hour, min((v["attainment"] for v in per.values()), default=0.0),
                       sc.power_w, per_model=per, simulations=int(getattr(sc, "simulations", 1)))
        plans[id(o)] = pl
        _tell_models(loops, seen, o, keys)
        evals += 1
        if progress:
            progress(evals, o)

    evaluated = {grid_key(o.params) for o in joint.obs}
    while evals < max_evals and time.perf_counter() - t0 < max_wall_s:
        if queue:
            params = queue.pop(0)
        elif not combined_done and evals >= 1 and (
                evals == max_evals - 1
                or max_wall_s - (time.perf_counter() - t0) < 2.0 * (time.perf_counter() - t0) / evals):
            combined_done = True
            params = {}
            for k in keys:
                ch = choose(loops[k].obs, preference, tgt[k])
                params.update(ch.params if ch is not None else loops[k].ask())
                if ch is not None and ch.extra.get("scale") is not None:
                    # warm-start repair from the scale that passed for this model's point
                    params[f"scale:{k}"] = float(ch.extra["scale"])
            if grid_key(params) in evaluated:
                continue
        else:
            params = {}
            for k in keys:
                params.update(_ask_new(loops[k], seen[k]))
        evaluated.add(grid_key(params))
        run_one(params)
    ch = choose(joint.obs, preference, joint_target)
    pl = plans.get(id(ch)) if ch is not None else None
    if ch is not None and pl is None:
        pl, _ = evaluate(ch.params)
    return OuterResult(ch, pl, _pareto_points(joint, ch), joint.obs, evals, time.perf_counter() - t0)


def _ask_new(loop: OuterLoop, seen: set, tries: int = 8) -> dict[str, float]:
    """The loop's next candidate; if its discrete configuration was evaluated already, the next
    Sobol point instead (up to ``tries``)."""
    p = loop.ask()
    for _ in range(tries):
        if grid_key(p) not in seen:
            return p
        from torch.quasirandom import SobolEngine

        eng = SobolEngine(len(loop.names), scramble=True, seed=loop.seed)
        loop._sobol_i += 1
        p = loop.from_unit(eng.draw(loop._sobol_i + 1).numpy()[-1])
    return p


def _per_model(plan: Any, score: Any, keys: list[str], tgt: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per-model objectives of a joint evaluation: $/h and W of the model's islands (simulated W
    when the score has energy), and the *effective* attainment: the simulated attainment, capped
    just below the target when the simulator's SLO check fails (percentiles over target or
    requests rejected) or load is unserved, so such points never count as meeting the SLO."""
    out = {}
    for k in keys:
        mp = plan.model(k)
        pm = score.per_model.get(k, {})
        att = float(pm.get("attainment") or 0.0)
        served = mp.served_fraction if mp is not None else 0.0
        if not pm.get("slo_met") or served < 1.0 - 1e-9:
            att = min(att, tgt[k] - 1e-3)
        hz = pm.get("horizon_s") or 0.0
        watts = float(pm["energy_j"]) / hz if pm.get("energy_j") is not None and hz > 0 else (
            float(mp.power_w) if mp is not None else 0.0)
        out[k] = {"cost_per_hour": float(mp.cost_per_hour) if mp is not None else 0.0, "attainment": att,
                  "power_w": watts, "scale": plan.params.get(f"scale:{k}")}
    return out


def _tell_models(loops: dict[str, OuterLoop], seen: dict[str, set], o: Observation, keys: list[str]) -> None:
    per = o.extra.get("per_model", {})
    for k in keys:
        if k not in per:
            continue
        sub = _split(o.params, k)
        names = loops[k].names
        if any(n not in sub for n in names):
            continue  # a warm-start point from another space
        v = per[k]
        loops[k].tell({n: sub[n] for n in names}, v["cost_per_hour"], v["attainment"], v["power_w"],
                      scale=v.get("scale"))
        seen[k].add(grid_key({n: sub[n] for n in names}))


def make_evaluator(fleet: Any, requests: list[Any], traces: dict[str, Any], base_config: Any, *,
                   seed: int = 0, gpu_catalog: Any = None, perf_factory: Any = None,
                   planner: Callable[..., Any] | None = None, cache: Any = None, repair: bool = False
                   ) -> Callable[[dict[str, float]], tuple[Any, Any]]:
    """``params -> (plan, score)``: inner loop with the params applied (no pod packing), scored
    by :func:`archipelago.decide.planner.evaluate.score_plan`. A plan that does not serve
    every model scores attainment = its simulated attainment (unserved models count 0).
    ``cache``: capacity memo shared across evaluations (simulated calibrations).
    ``repair``: run verify-and-repair inside every evaluation (``verify=True`` on the traces,
    starting from ``base_config.model_capacity_scale``): the candidate is then judged at the
    cheapest per-model capacity scales that pass in the simulator. ``score.simulations``
    counts the whole-plan simulations spent (repair rounds + the final score)."""
    from .evaluate import score_plan
    from .planner import plan as run_plan

    planner = planner or run_plan

    def ev(params: dict[str, float]) -> tuple[Any, Any]:
        cfg = config_from_params(base_config, params)
        kw: dict[str, Any] = {"cache": cache} if cache is not None else {}
        if repair:
            cfg = cfg.with_(verify=True)
            kw["traces"] = traces
        pl = planner(fleet, requests, None, cfg, gpu_catalog=gpu_catalog, perf_factory=perf_factory,
                     pack_pods=False, **kw)
        sc = score_plan(pl, requests, traces, fleet, gpu_catalog=gpu_catalog, perf_factory=perf_factory,
                        seed=seed)
        sc.simulations = 1 + int(pl.params.get("verify_rounds", 0)) if repair else 1
        if not math.isfinite(sc.power_w):
            sc.power_w = 0.0
        return pl, sc

    return ev


# ---------------------------------------------------------------------------------------------
# Round 4: per-model evaluation (each model's candidate judged with the other models held fixed)
# ---------------------------------------------------------------------------------------------
def fleet_without(fleet: Any, reserved: dict[str, int]) -> Any:
    """Copy of ``fleet`` (:class:`~.types.FleetSnapshot`) in which ``reserved`` GPUs per pool
    (``{pool_name: gpus}``, e.g. those the other models' islands use) are withheld, by lowering
    each pool's ``max_gpus`` to ``gpus_free - reserved`` (never below 0).

    Raises:
        KeyError: a pool in ``reserved`` the fleet does not have."""
    import dataclasses

    names = {p.name for p in fleet.pools}
    for k in reserved:
        if k not in names:
            raise KeyError(f"fleet_without: reserved pool {k!r} not in the fleet (pools: {sorted(names)})")
    pools = tuple(dataclasses.replace(p, max_gpus=max(0, p.gpus_free - int(reserved.get(p.name, 0))))
                  if reserved.get(p.name) else p for p in fleet.pools)
    return dataclasses.replace(fleet, pools=pools)


def gpus_by_pool(plan: Any, exclude: str | None = None) -> dict[str, int]:
    """GPUs per pool (``{pool: tp x replicas summed}``) of ``plan``'s islands, leaving out the
    islands of model ``exclude`` (a model key)."""
    out: dict[str, int] = {}
    for m in plan.models:
        if m.model == exclude:
            continue
        for i in m.islands:
            out[i.pool] = out.get(i.pool, 0) + int(i.tp) * int(i.replicas)
    return out


def pool_slack(fleet: Any, plan: Any) -> dict[str, tuple[int, int]]:
    """``{pool: (gpus used by plan, gpus free)}``: how far the plan is from the pool GPU limits
    through which models interact (when used < free everywhere, per-model plans compose)."""
    used = gpus_by_pool(plan)
    return {p.name: (used.get(p.name, 0), p.gpus_free) for p in fleet.pools}


def make_model_evaluator(fleet: Any, requests: list[Any], traces: dict[str, Any], base_config: Any, *,
                         reference: Any = None, seed: int = 0, gpu_catalog: Any = None, perf_factory: Any = None,
                         planner: Callable[..., Any] | None = None, cache: Any = None
                         ) -> Callable[[str, dict[str, float]], tuple[Any, Any]]:
    """``(model_key, params) -> (plan, score)``: plan **one** model with ``params`` (its
    ``log2_mbt:<key>``, ``log2_mns:<key>``, ``islands:<key>`` entries; others are ignored)
    applied, the other models held fixed: their GPUs in the ``reference`` plan (e.g. CP-SAT +
    repair's) are withheld from the pools (:func:`fleet_without`). The model alone is planned with
    verify-and-repair on its own trace (capacity scale started at
    ``base_config.model_capacity_scale[key]``), so its $/h and attainment no longer depend on the
    other models' settings (round 3's joint repair returned the cheapest round in which *all*
    models passed, which made per-model costs noisy). Then scored by
    :func:`~.evaluate.score_plan` on that model's trace only.

    ``score.simulations`` counts single-model simulations (repair rounds + the final score);
    one whole-plan simulation of N models is N single-model simulations.

    Raises:
        KeyError: unknown model key or a model without a trace."""
    from .evaluate import score_plan
    from .planner import plan as run_plan

    planner = planner or run_plan
    by_key = {r.key: r for r in requests}

    def ev(key: str, params: dict[str, float]) -> tuple[Any, Any]:
        if key not in by_key:
            raise KeyError(f"make_model_evaluator: unknown model {key!r} (models: {sorted(by_key)})")
        req = by_key[key]
        own = {k: v for k, v in params.items() if k.partition(":")[2] == key}
        cfg = config_from_params(base_config, own).with_(verify=True)
        fl = fleet_without(fleet, gpus_by_pool(reference, exclude=key)) if reference is not None else fleet
        tr = {key: traces[key]}
        kw: dict[str, Any] = {"cache": cache} if cache is not None else {}
        pl = planner(fl, [req], None, cfg, gpu_catalog=gpu_catalog, perf_factory=perf_factory,
                     pack_pods=False, traces=tr, **kw)
        sc = score_plan(pl, [req], tr, fl, gpu_catalog=gpu_catalog, perf_factory=perf_factory, seed=seed)
        sc.simulations = 1 + int(pl.params.get("verify_rounds", 0))
        if not math.isfinite(sc.power_w):
            sc.power_w = 0.0
        return pl, sc

    return ev


def run_per_model_search(evaluate_model: Callable[[str, dict[str, float]], tuple[Any, Any]],
                         combine: Callable[[dict[str, float]], tuple[Any, Any]], keys: list[str], *,
                         space: dict[str, tuple[float, float]], max_evals: int = 4,
                         max_sims: int | None = None, max_wall_s: float = 300.0, seed: int = 0,
                         preference: str = "cost", target: float | dict[str, float] = 0.99,
                         initial: dict[str, float] | list[dict[str, float]] | None = None, n_init: int = 2,
                         fallback: tuple[Any, Any] | None = None,
                         progress: Callable[[str, int, Observation], None] | None = None,
                         num_restarts: int = 2, raw_samples: int = 48) -> OuterResult:
    """Per-model structure search (round 4): one qLogNEHVI :class:`OuterLoop` per model over its
    own parameters of ``space`` (:func:`structure_space`), every candidate evaluated **for that
    model alone** by ``evaluate_model`` (e.g. :func:`make_model_evaluator`: the other models held
    fixed, per-model verify-and-repair), so each GP sees the model's own $/h, attainment and W.
    Then each model's chosen point (:func:`choose` with ``preference`` and its ``target``) is
    combined and checked jointly by ``combine`` (e.g. :func:`make_evaluator` with
    ``repair=True`` warm-started at each model's passing capacity scale: a final joint CP-SAT +
    verify, which keeps the joint plan feasible in the pools).

    Models take turns (round robin), one candidate each per round; a candidate whose discrete
    configuration (:func:`grid_key`) the model already evaluated is replaced by the next Sobol
    point. ``initial`` (joint params, or a list of them: an initial design, e.g. CP-SAT + repair's
    configuration first) gives each model's first candidates (round i uses ``initial[i]``); the
    GP takes over after ``n_init`` observations.

    Args:
        evaluate_model: ``(key, params) -> (plan, score)``; the plan's ``model(key)`` gives $/h
            and W, ``score.per_model[key]`` ``attainment``/``slo_met`` (see :func:`_per_model`),
            ``score.simulations`` the simulations spent.
        combine: joint ``(params, model_plans) -> (plan, score)``; ``params`` hold every
            model's chosen parameters and ``scale:<key>`` (the capacity scale that passed for
            it), ``model_plans`` ``{key: plan}`` the per-model plans of the chosen points that
            met their target (e.g. :func:`make_combiner`, which merges them when they fit).
        keys: model keys.
        max_evals: candidates per model (rounds). max_sims: stop starting rounds once this
            many simulations (as counted by the evaluators) are spent (None: no limit).
        max_wall_s: wall budget, s (checked before each candidate; the combination always runs).
        fallback: ``(plan, score)`` of a joint plan to return if the combination misses the
            target (e.g. CP-SAT + repair's own plan), so the answer is never worse than it.

    Returns:
        :class:`OuterResult` over joint observations: the combination (and ``fallback`` if
        given); ``extra["per_model_observations"]`` maps each key to its per-model
        observations, ``extra["simulations"]`` the simulations of that joint evaluation and
        ``extra["search_simulations"]`` those spent in all (per-model candidates + combination;
        not counting ``fallback``); ``evaluations`` = per-model candidates evaluated (+1 for
        the combination).
    """
    t0 = time.perf_counter()
    tgt = {k: (target[k] if isinstance(target, dict) else float(target)) for k in keys}
    loops: dict[str, OuterLoop] = {}
    for i, k in enumerate(keys):
        sub = {n: b for n, b in space.items() if n.partition(":")[2] == k}
        loops[k] = OuterLoop(space=sub, seed=seed + i, n_init=n_init, num_restarts=num_restarts,
                             raw_samples=raw_samples)
    seen: dict[str, set] = {k: set() for k in keys}
    inits = [initial] if isinstance(initial, dict) else list(initial or [])
    model_plans: dict[int, Any] = {}
    chosen_plans: dict[str, Any] = {}
    sims = 0
    evals = 0
    for rnd in range(max_evals):
        if time.perf_counter() - t0 >= max_wall_s or (max_sims is not None and sims >= max_sims):
            break
        for k in keys:
            if time.perf_counter() - t0 >= max_wall_s:
                break
            lp = loops[k]
            if rnd < len(inits) and all(n in inits[rnd] for n in lp.names):
                p = {n: float(inits[rnd][n]) for n in lp.names}
            else:
                p = _ask_new(lp, seen[k])
            if grid_key(p) in seen[k]:
                continue
            pl, sc = evaluate_model(k, p)
            per = _per_model(pl, sc, [k], {k: tgt[k]})[k]
            o = lp.tell(p, per["cost_per_hour"], per["attainment"], per["power_w"], scale=per["scale"],
                        simulations=int(getattr(sc, "simulations", 1)))
            model_plans[id(o)] = pl
            seen[k].add(grid_key(p))
            sims += int(getattr(sc, "simulations", 1))
            evals += 1
            if progress:
                progress(k, evals, o)
    params: dict[str, float] = {}
    for k in keys:
        ch = choose(loops[k].obs, preference, tgt[k])
        if ch is None:  # nothing evaluated for this model (wall budget): its first initial point
            params.update({n: float(inits[0][n]) for n in loops[k].names} if inits else loops[k].ask())
            continue
        params.update(ch.params)
        if ch.extra.get("scale") is not None:
            params[f"scale:{k}"] = float(ch.extra["scale"])
        if ch.attainment >= tgt[k] and id(ch) in model_plans:
            chosen_plans[k] = model_plans[id(ch)]
    pl, sc = combine(params, chosen_plans)
    csims = int(getattr(sc, "simulations", 1))
    sims += csims
    evals += 1
    per = _per_model(pl, sc, keys, tgt)
    joint = OuterLoop(space=space, seed=seed, n_init=n_init)
    o = joint.tell(params, sc.cost_per_hour, min((v["attainment"] for v in per.values()), default=0.0),
                   sc.power_w, per_model=per, simulations=csims)
    plans: dict[int, Any] = {id(o): pl}
    if fallback is not None:
        fpl, fsc = fallback
        fper = _per_model(fpl, fsc, keys, tgt)
        fo = joint.tell(dict(inits[0]) if inits else {}, fsc.cost_per_hour,
                        min((v["attainment"] for v in fper.values()), default=0.0), fsc.power_w,
                        per_model=fper, simulations=0, fallback=True)
        plans[id(fo)] = fpl
    joint_target = min(tgt.values()) if tgt else 0.99
    ch = choose(joint.obs, preference, joint_target)
    for ob in joint.obs:
        ob.extra["per_model_observations"] = {k: loops[k].obs for k in keys}
        ob.extra["search_simulations"] = sims
    return OuterResult(ch, plans.get(id(ch)) if ch is not None else None, _pareto_points(joint, ch), joint.obs, evals,
                       time.perf_counter() - t0)


def make_combiner(fleet: Any, requests: list[Any], traces: dict[str, Any], base_config: Any, *, seed: int = 0,
                  gpu_catalog: Any = None, perf_factory: Any = None, cache: Any = None,
                  planner: Callable[..., Any] | None = None) -> Callable[[dict[str, float]], tuple[Any, Any]]:
    """The joint check of :func:`run_per_model_search`: ``(params, model_plans) -> (plan, score)``
    with every model's chosen structure parameters and ``scale:<key>`` (the capacity scale at
    which its per-model repair passed), and the per-model plans of those points.

    1. The per-model plans merged (:func:`merge_model_plans`; only if they fit the pools
       together), simulated jointly: if every model meets its SLO, that is the answer.
       (Measured on the benchmark: a joint CP-SAT at the same settings and scales built the
       same islands but a different traffic split among them -- equal-cost optima -- and
       missed the SLO for Llama-70B, 0.933 vs 0.998; so merging, not re-solving, is what
       makes per-model evaluation compose.)
    2. Else one joint CP-SAT at exactly those scales (no repair), simulated.
    3. Else a joint verify-and-repair starting from those scales (:func:`make_evaluator` with
       ``repair=True``).

    ``score.simulations`` counts single-model simulations (models x whole-plan simulations)."""
    plain = make_evaluator(fleet, requests, traces, base_config.with_(verify=False), seed=seed,
                           gpu_catalog=gpu_catalog, perf_factory=perf_factory, planner=planner, cache=cache)
    repaired = make_evaluator(fleet, requests, traces, base_config, seed=seed, gpu_catalog=gpu_catalog,
                              perf_factory=perf_factory, planner=planner, cache=cache, repair=True)
    n = len(requests)

    def comb(params: dict[str, float], model_plans: dict[str, Any] | None = None) -> tuple[Any, Any]:
        from .evaluate import attach_score, score_plan

        spent = 0
        merged = merge_model_plans(fleet, requests, model_plans or {})
        if merged is not None:
            sc = score_plan(merged, requests, traces, fleet, gpu_catalog=gpu_catalog, perf_factory=perf_factory,
                            seed=seed)
            spent += n
            if _all_pass(merged, sc):
                sc.simulations = spent
                return attach_score(merged, sc), sc
        pl, sc = plain(params)
        spent += n
        if _all_pass(pl, sc):
            sc.simulations = spent
            return attach_score(pl, sc), sc
        pl2, sc2 = repaired(params)
        sc2.simulations = spent + n * int(sc2.simulations)
        return pl2, sc2

    def _all_pass(pl: Any, sc: Any) -> bool:
        return all(bool(sc.per_model.get(r.key, {}).get("slo_met"))
                 and float(sc.per_model.get(r.key, {}).get("attainment") or 0.0) >= r.slo.attainment - 1e-12
                 and (pl.model(r.key) is not None and pl.model(r.key).served_fraction >= 1.0 - 1e-9)
                   for r in requests)

    return comb


def merge_model_plans(fleet: Any, requests: list[Any], model_plans: dict[str, Any]) -> Any:
    """One :class:`~.types.Plan` from per-model plans ``{key: Plan}`` (each planned for its
    model alone, e.g. by :func:`make_model_evaluator`), or None when a model has no plan or the
    islands together do not fit the pools: per pool and TP level t, the GPUs of islands with
    TP >= t must fit ``gpus_free_in_blocks(t)`` (the inner loop's pool constraint). Models are
    routed and simulated independently, so the merged plan's per-model behaviour is exactly
    each per-model plan's. No pods are placed (``assignments`` empty; pack afterwards)."""
    import dataclasses

    from .types import Plan

    if not requests or any(r.key not in model_plans for r in requests):
        return None
    models = []
    for r in requests:
        mp = model_plans[r.key].model(r.key)
        if mp is None:
            return None
        models.append(mp)
    for pool in fleet.pools:
        isl = [i for m in models for i in m.islands if i.pool == pool.name]
        for t in sorted({int(i.tp) for i in isl}):
            need = sum(int(i.tp) * int(i.replicas) for i in isl if int(i.tp) >= t)
            if need > pool.gpus_free_in_blocks(t):
                return None
    parts = [model_plans[r.key] for r in requests]
    params: dict[str, float] = {}
    for r, p in zip(requests, parts, strict=True):
        params.update({k: v for k, v in p.params.items() if k.partition(":")[2] == r.key})
    params["merged_per_model"] = 1.0
    stats = dataclasses.replace(parts[0].stats, note="merged from per-model plans (structure search)")
    return Plan(models=tuple(models), assignments=(), cost_per_hour=sum(m.cost_per_hour for m in models),
                power_w=sum(m.power_w for m in models),
                infeasibilities=tuple(i for p in parts for i in p.infeasibilities), stats=stats, params=params)
