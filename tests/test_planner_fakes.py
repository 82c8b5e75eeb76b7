"""Small fakes shared by the planner tests: a linear step-time performance model, GPU and model
specs, and helpers to build fleets. The fake's formulas are simple so tests can compute the
expected answers by hand; the planner's behaviour asserted in the tests is real."""

from __future__ import annotations

from dataclasses import dataclass

from archipelago.decide.planner.types import FleetSnapshot, NodeSnapshot, PoolSnapshot


@dataclass(frozen=True)
class FGPU:
    name: str
    mem_gib: float
    speed: float  # relative compute speed
    bw: float  # relative memory bandwidth
    price: float  # $/GPU-h
    watts: float = 400.0


@dataclass(frozen=True)
class FModel:
    name: str
    weights_gib: float
    kv_gib_per_1k_tokens: float = 0.5
    flops_per_token: float = 1.0


@dataclass(frozen=True)
class FLimits:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None


class FakePerf:
    """step_time(P, B, C) = 5 ms/(bw*tp) * weights/10 + P * 0.02 ms * flops/(speed*tp)
    + B * C * 1e-6 ms/bw ... (all in seconds)."""

    def __init__(self, model: FModel, gpu: FGPU, tp: int, limits: FLimits | None = None):
        self.model, self.gpu, self.tp = model, gpu, tp
        self.limits = limits or FLimits()
        mem = gpu.mem_gib * tp * self.limits.gpu_memory_utilization
        self.free_gib = mem - model.weights_gib
        self.fits = self.free_gib > 1.0
        self.fit_error = None if self.fits else f"{model.name} does not fit {gpu.name} x{tp}"
        self.kv_capacity_tokens = max(0, int(self.free_gib / model.kv_gib_per_1k_tokens * 1000))

    def max_batch(self, avg_ctx: float) -> int:
        return int(min(self.limits.max_num_seqs, self.kv_capacity_tokens // max(1.0, avg_ctx)))

    def step_time(self, prefill_tokens: float, decode_seqs: float, decode_ctx: float) -> float:
        base = 0.004 * self.model.weights_gib / 10 / (self.gpu.bw * self.tp)
        comp = (prefill_tokens + decode_seqs) * 4e-5 * self.model.flops_per_token / (self.gpu.speed * self.tp)
        kv = decode_seqs * decode_ctx * 2e-8 / (self.gpu.bw * self.tp)
        return base + comp + kv

    def prefill_time(self, prompt_tokens: float, batch: int = 1) -> float:
        return self.step_time(prompt_tokens * batch, 0, 0)

    def decode_step_time(self, batch: float, avg_ctx: float) -> float:
        return self.step_time(0, batch, avg_ctx)

    def power_w(self, phase: str = "decode") -> float:
        frac = {"idle": 0.2, "prefill": 1.0, "decode": 0.7}.get(phase, 0.7)
        return self.gpu.watts * frac * self.tp

    def price_per_hour(self, price_per_gpu_hour: float | None = None) -> float:
        return (self.gpu.price if price_per_gpu_hour is None else price_per_gpu_hour) * self.tp


GPUS = {
    "big": FGPU("big", 80, speed=4.0, bw=2.0, price=4.0, watts=700),
    "mid": FGPU("mid", 48, speed=1.5, bw=1.0, price=1.0, watts=350),
    "small": FGPU("small", 24, speed=0.5, bw=0.4, price=0.5, watts=150),
}


class FakeCatalog(dict):
    def get(self, name, default=None):  # noqa: D401 - dict-compatible
        return super().get(name, default)


def fake_perf_factory(model, gpu, tp, limits):
    return FakePerf(model, gpu, tp, limits)


def pool(name: str, gpu: str, nodes: int, gpus_per_node: int = 8, price: float | None = None,
         free: list[int] | None = None) -> PoolSnapshot:
    ns = tuple(NodeSnapshot(f"{name}-n{i}", gpus_per_node,
                            gpus_per_node if free is None else free[i]) for i in range(nodes))
    return PoolSnapshot(name=name, gpu=gpu, price_per_gpu_hour=GPUS[gpu].price if price is None else price,
                        nodes=ns)


def fleet(*pools: PoolSnapshot) -> FleetSnapshot:
    return FleetSnapshot(pools=tuple(pools))
