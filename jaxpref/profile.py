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
    flops: float | None  # per call (forward_flops for a forward pass; else the compiler's count)
    memory_bytes: dict[str, int]  # argument / output / temp / generated-code sizes
    device_kind: str
    num_devices: int
    compiler_flops: float | None = None  # XLA cost analysis (scan bodies counted once)

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


def forward_flops(config, batch: int, seq: int, images_per_row: int = 1) -> float:
    """Matmul FLOPs of one forward pass (2 per multiply-add), counted from the config.

    XLA's cost analysis counts a scanned layer stack's loop body once, not once per layer, so
    step FLOPs and MFU use this count; `ProfileReport.compiler_flops` keeps the compiler's.
    """
    v, t = config.vision, config.text
    p, dv = v.num_positions, v.hidden_size
    vision_layer = 2 * p * dv * (4 * dv + 2 * v.intermediate_size) + 4 * p * p * dv
    vision = v.num_patches * 2 * v.patch_size ** 2 * 3 * dv + v.num_hidden_layers * vision_layer
    n, e = config.num_image_tokens, t.hidden_size
    proj = 2 * n * dv * e + (2 * n * e * e if config.projector == "mlp" else 0)
    q_o = 2 * 2 * e * t.num_attention_heads * t.head_dim
    kv = 2 * 2 * e * t.num_key_value_heads * t.head_dim
    attn = 2 * 2 * seq * t.num_attention_heads * t.head_dim
    text_token = t.num_hidden_layers * (q_o + kv + attn + 3 * 2 * e * t.intermediate_size) + 2 * e * t.vocab_size
    return float(batch * images_per_row * (vision + proj) + batch * seq * text_token)


def _flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    return float(ca["flops"]) if ca and "flops" in ca else None


def profile_jitted(name: str, fn, *args, iters: int = 5, flops: float | None = None) -> ProfileReport:
    """Lowers, compiles and times `fn(*args)` (fn already jitted). `flops`: the analytic count, if known."""
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
    xla_flops = _flops(compiled)
    return ProfileReport(name, compile_s, float(np.median(times)), flops or xla_flops, _memory(compiled),
                         dev.device_kind, jax.device_count(), xla_flops)


def profile_forward(model: VLM, params, batch: int = 8, seq: int | None = None, iters: int = 5) -> ProfileReport:
    """Profile of one jitted forward pass over a dummy batch (one image per row)."""
    px, ids, mask = dummy_inputs(model.config, batch, seq)
    fwd = jax.jit(lambda p, px, ids, mask: model.apply({"params": p}, px, ids, mask).logits)
    return profile_jitted(f"forward B={batch} T={ids.shape[1]}", fwd, params, px, ids, mask, iters=iters,
                          flops=forward_flops(model.config, batch, ids.shape[1]))


def format_report(r: ProfileReport) -> str:
    lines = [f"{r.name} on {r.num_devices} x {r.device_kind}",
             f"  compile      {r.compile_seconds:8.2f} s",
             f"  step         {r.step_seconds * 1e3:8.1f} ms (median)"]
    if r.flops:
        lines.append(f"  FLOPs        {r.flops / 1e9:8.2f} GFLOP per call, {r.tflops_per_second:.3f} TFLOP/s")
    if r.compiler_flops and r.compiler_flops != r.flops:
        lines.append(f"  (XLA's count {r.compiler_flops / 1e9:.2f} GFLOP: a scanned layer stack is counted once)")
    if r.mfu is not None:
        lines.append(f"  MFU          {100 * r.mfu:8.1f} %")
    for k, v in r.memory_bytes.items():
        lines.append(f"  memory {k:15s} {v / 2**20:8.1f} MiB")
    return "\n".join(lines)


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ---------------------------------------------------------------------------
# Ahead-of-time compilation for a TPU topology, on a CPU host (needs libtpu: pip install 'jaxpref[tpu]')


@dataclasses.dataclass
class AOTReport:
    name: str
    topology: str
    num_chips: int
    mesh: dict[str, int]
    compile_seconds: float
    flops: float  # per call, whole program (all chips), from forward_flops
    memory_bytes: dict[str, int]  # per chip

    @property
    def per_chip_bytes(self) -> int:
        m = self.memory_bytes
        return m.get("argument", 0) + m.get("output", 0) + m.get("temp", 0) - m.get("alias", 0)


def topology_devices(topology: str):
    """Devices of a TPU topology such as "v5p:4x4x4" or "v5e:2x2", without TPUs attached."""
    try:
        from jax.experimental.topologies import get_topology_desc

        return get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception as e:  # no libtpu, or an unknown topology name
        raise RuntimeError(f"cannot describe TPU topology {topology!r} ({type(e).__name__}: {e}); AOT compiles need "
                           f"libtpu: pip install 'jaxpref[tpu]'") from e


def aot_forward(model: VLM, topology: str, *, data: int = -1, fsdp: int = 1, tensor: int = 1, batch: int = 8,
                seq: int | None = None) -> AOTReport:
    """Compiles the jitted, sharded forward pass for `topology` without running it.

    Parameters and batch are abstract (`jax.ShapeDtypeStruct` with shardings on the topology's
    mesh), so nothing is allocated: a 7B model compiles on a laptop.
    """
    from jax.sharding import NamedSharding

    from .models.hf import param_shapes
    from .sharding import batch_sharding, make_mesh, param_shardings

    devices = topology_devices(topology)
    mesh = make_mesh(data=data, fsdp=fsdp, tensor=tensor, devices=devices)
    shardings = param_shardings(model, mesh)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            param_shapes(model), shardings)
    px, ids, mask = dummy_inputs(model.config, batch, seq)
    a = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding(mesh, x.ndim))
    fwd = jax.jit(lambda p, px, ids, mask: model.apply({"params": p}, px, ids, mask).logits,
                  out_shardings=NamedSharding(mesh, batch_sharding(mesh, 3).spec))
    t0 = time.perf_counter()
    compiled = fwd.lower(abstract, a(px), a(ids), a(mask)).compile()
    secs = time.perf_counter() - t0
    mem = _memory(compiled)
    try:
        mem["alias"] = int(compiled.memory_analysis().alias_size_in_bytes)
    except Exception:
        pass
    return AOTReport(f"forward B={batch} T={ids.shape[1]}", topology, len(devices), dict(mesh.shape), secs,
                     forward_flops(model.config, batch, ids.shape[1]), mem)


def format_aot(r: AOTReport) -> str:
    mesh = " x ".join(f"{k}={v}" for k, v in r.mesh.items())
    lines = [f"{r.name}: AOT for {r.topology} ({r.num_chips} chips, mesh {mesh})",
             f"  compile      {r.compile_seconds:8.2f} s"]
    if r.flops:
        lines.append(f"  FLOPs        {r.flops / 1e12:8.3f} TFLOP per call")
    for k, v in r.memory_bytes.items():
        lines.append(f"  memory {k:15s} {v / 2**30:8.3f} GiB per chip")
    lines.append(f"  total        {r.per_chip_bytes / 2**30:8.3f} GiB per chip (arguments + outputs + temporaries)")
    return "\n".join(lines)
