"""Profiling jitted functions: compile time, step time, FLOPs, MFU and memory.

    report = profile_forward(model, params, batch=8)
    print(format_report(report))

Numbers come from the compiler itself (`compiled.cost_analysis()` for FLOPs,
`compiled.memory_analysis()` for buffers) and wall-clock timing of the compiled function
after warm-up, synchronised with `block_until_ready`.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from .models import VLM, dummy_inputs

# Peak dense bf16 FLOP/s per chip, for MFU. CPU has no meaningful peak: MFU is left out there.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
              "TPU v6e": 918e12}


@dataclasses.dataclass
class ProfileReport:
    name: str
    compile_seconds: float
    step_seconds: float  # median over `iters` runs
    flops: float | None  # per call, from the compiler's cost analysis
    memory_bytes: dict[str, int]  # argument / output / temp / generated-code sizes
    device_kind: str
    num_devices: int

    @property
    def tflops_per_second(self) -> float | None:
        return None if not self.flops else self.flops / self.step_seconds / 1e12

    @property
    def mfu(self) -> float | None:
        peak = PEAK_FLOPS.get(self.device_kind)
        return None if (peak is None or not self.flops) else self.flops / self.step_seconds / (peak * self.num_devices)


def _memory(compiled) -> dict[str, int]:
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return {}
    if m is None:
        return {}
    names = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes")
    return {n.replace("_size_in_bytes", ""): int(getattr(m, n)) for n in names if hasattr(m, n)}


def _flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    return float(ca["flops"]) if ca and "flops" in ca else None


def profile_jitted(name: str, fn, *args, iters: int = 5) -> ProfileReport:
    """Lowers, compiles and times `fn(*args)` (fn already jitted)."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    dev = jax.devices()[0]
    return ProfileReport(name, compile_s, float(np.median(times)), _flops(compiled), _memory(compiled),
                         dev.device_kind, jax.device_count())


def profile_forward(model: VLM, params, batch: int = 8, seq: int | None = None, iters: int = 5) -> ProfileReport:
    """Profile of one jitted forward pass over a dummy batch (one image per row)."""
    px, ids, mask = dummy_inputs(model.config, batch, seq)
    fwd = jax.jit(lambda p, px, ids, mask: model.apply({"params": p}, px, ids, mask).logits)
    return profile_jitted(f"forward B={batch} T={ids.shape[1]}", fwd, params, px, ids, mask, iters=iters)


def format_report(r: ProfileReport) -> str:
    lines = [f"{r.name} on {r.num_devices} x {r.device_kind}",
             f"  compile      {r.compile_seconds:8.2f} s",
             f"  step         {r.step_seconds * 1e3:8.1f} ms (median)"]
    if r.flops:
        lines.append(f"  FLOPs        {r.flops / 1e9:8.2f} GFLOP per call, {r.tflops_per_second:.3f} TFLOP/s")
    if r.mfu is not None:
        lines.append(f"  MFU          {100 * r.mfu:8.1f} %")
    for k, v in r.memory_bytes.items():
        lines.append(f"  memory {k:15s} {v / 2**20:8.1f} MiB")
    return "\n".join(lines)


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
