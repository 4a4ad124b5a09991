"""Measuring jitted programs: compile time, step time, FLOPs, MFU, per-device memory, collectives,
traces; and TPU topologies for ahead-of-time compiles on a CPU host.

    m = measure(jitted_fn, args, iters=5)          # args: arrays or ShapeDtypeStructs with shardings
    m = measure(jitted_fn, abstract_args, run=False)   # compile only (an AOT topology's devices)

The trainers' real steps are built by jaxpref.train.program; `jaxpref profile` drives both. Numbers
come from the compiler (`memory_analysis()` per device, `cost_analysis()` FLOPs, the optimised HLO's
collectives) and from wall-clock timing of the compiled program after warm-up, synchronised with
`block_until_ready`.

FLOPs: the analytic count (`vision_flops`, `text_flops`: 2 per multiply-add of every matmul,
attention included, from the config) is what MFU uses. XLA's `cost_analysis` counts the body of a
`lax.scan` once, not once per iteration, so for jaxpref's scanned layer stacks it reports roughly
one layer's worth; both are reported, with their ratio. On an unscanned (one-layer) model the two
agree to within the elementwise work XLA also counts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from .models.config import VLMConfig

GiB = 2**30

# Peak dense bf16 FLOP/s and memory per device, by the name JAX reports (`device.device_kind`).
# A v5p reports itself as "TPU v5", a v5e as "TPU v5 lite", a v6e as "TPU v6 lite". A v4 chip is
# one device (megacore); a v4 topology compiled ahead of time lists each of its two cores as a device.
DEVICES: dict[str, tuple[float, float]] = {
    "TPU v4": (275e12, 32 * GiB),
    "TPU v5 lite": (197e12, 16 * GiB),
    "TPU v5": (459e12, 95 * GiB),
    "TPU v6 lite": (918e12, 32 * GiB),
    "NVIDIA H100": (989e12, 80e9),
    "NVIDIA H200": (989e12, 141e9),
}
SLICE_NAMES = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}


def device_spec(kind: str) -> tuple[float, float] | None:
    """(peak FLOP/s, memory bytes) of a device kind; the NVIDIA names carry their memory size as a
    suffix ("NVIDIA H100 80GB HBM3"), so those match by prefix."""
    if kind in DEVICES:
        return DEVICES[kind]
    return next((v for k, v in DEVICES.items() if k.startswith("NVIDIA") and kind.startswith(k)), None)


def device_memory_bytes(device, devices_per_chip: int = 1) -> int | None:
    """What one device can hold: its allocator's limit when it reports one, else the table's chip
    memory / `devices_per_chip` (2 on a v4 topology compiled ahead of time: each core a device); on a
    CPU, the host's RAM (simulated devices share it)."""
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
        if limit:
            return int(limit)
    except Exception:  # AOT topology devices and some backends have no allocator
        pass
    if device.platform == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    spec = device_spec(device.device_kind)
    return None if spec is None else int(spec[1] / devices_per_chip)


def count_chips(devices) -> int:
    """Chips, not cores: devices sharing their coordinates are cores of one chip (a v4 topology)."""
    coords = {tuple(d.coords) for d in devices if getattr(d, "coords", None) is not None}
    return len(coords) or len(devices)


# ---------------------------------------------------------------------------
# analytic FLOPs (2 per multiply-add)


def vision_flops(config: VLMConfig, images: int) -> float:
    """The vision tower and projector over `images` images."""
    v, e = config.vision, config.text.hidden_size
    p, dv = v.num_positions, v.hidden_size
    layer = 2 * p * dv * (4 * dv + 2 * v.intermediate_size) + 4 * p * p * dv
    tower = v.num_patches * 2 * v.patch_size ** 2 * 3 * dv + v.num_hidden_layers * layer
    n = config.num_image_tokens
    proj = 2 * n * dv * e + (2 * n * e * e if config.projector == "mlp" else 0)
    return float(images * (tower + proj))


def text_flops(config: VLMConfig, rows: int, tokens: int, context: int | None = None,
               head_positions: int | None = None, head_width: int | None = None) -> float:
    """The decoder over `rows` x `tokens` new tokens, each attending to `context` keys (default
    `tokens`), and the head at `head_positions` of them (default all) with `head_width` outputs
    (default the vocabulary; 1 for a scalar head)."""
    t = config.text
    e = t.hidden_size
    context = tokens if context is None else context
    q_o = 2 * 2 * e * t.num_attention_heads * t.head_dim
    kv = 2 * 2 * e * t.num_key_value_heads * t.head_dim
    attn = 2 * 2 * context * t.num_attention_heads * t.head_dim
    layers = t.num_hidden_layers * (q_o + kv + attn + 3 * 2 * e * t.intermediate_size)
    head = 2 * e * (t.vocab_size if head_width is None else head_width)
    return float(rows * (tokens * layers + (tokens if head_positions is None else head_positions) * head))


def forward_flops(config: VLMConfig, batch: int, seq: int, images_per_row: int = 1) -> float:
    """One forward pass over `batch` rows of `seq` tokens with `images_per_row` images, the LM head at
    every position."""
    return vision_flops(config, batch * images_per_row) + text_flops(config, batch, seq)


# ---------------------------------------------------------------------------
# what the compiler says


def memory(compiled) -> dict[str, int]:
    """Per-device bytes: argument, output, temp, generated_code, alias ({} where not implemented)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return {}
    if m is None:
        return {}
    names = ("argument", "output", "temp", "generated_code", "alias")
    return {n: int(getattr(m, f"{n}_size_in_bytes")) for n in names if hasattr(m, f"{n}_size_in_bytes")}


def per_device_bytes(mem: dict[str, int]) -> int:
    """Arguments + outputs + temporaries - what outputs alias of donated arguments."""
    return mem.get("argument", 0) + mem.get("output", 0) + mem.get("temp", 0) - mem.get("alias", 0)


def xla_flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    return float(ca["flops"]) if ca and "flops" in ca else None


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"=\s*[^=]*?\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                         r"(?:-start)?\(")


def collectives(compiled) -> dict[str, int]:
    """How many of each collective the optimised program holds (async start/done pairs once)."""
    try:
        text = compiled.as_text()
    except Exception:
        return {}
    counts = dict.fromkeys(COLLECTIVES, 0)
    for m in _COLLECTIVE.finditer(text or ""):
        counts[m.group(1)] += 1
    return {k: v for k, v in counts.items() if v}


def matmul_peak(dtype=jnp.float32, n: int = 2048, iters: int = 5) -> float:
    """FLOP/s of one large jitted matmul on the default backend: the CPU's reference peak for MFU,
    measured in the same run as the step it judges (simulated devices share it)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    best = min(_timed(lambda: f(a)) for _ in range(iters))
    return 2 * n**3 / best


def _timed(call) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------
# measuring one program


@dataclasses.dataclass
class Measurement:
    compile_seconds: float
    memory: dict[str, int]  # per device
    xla_flops: float | None
    collectives: dict[str, int]
    step_seconds: list[float] = dataclasses.field(default_factory=list)  # timed calls after warm-up
    out_of_memory: str | None = None  # the compiler's refusal, when the program cannot fit the device

    @property
    def per_device_bytes(self) -> int:
        return per_device_bytes(self.memory)

    @property
    def median(self) -> float | None:
        return statistics.median(self.step_seconds) if self.step_seconds else None


def concrete(abstract):
    """Arrays for a tree of ShapeDtypeStructs, placed on their shardings: floats 0, integers 1 (a valid
    token id and an attended mask), so a step runs without data or weights."""
    def make(s):
        value = np.zeros(s.shape, s.dtype) if jnp.issubdtype(s.dtype, jnp.floating) else np.ones(s.shape, s.dtype)
        return jax.device_put(value, s.sharding) if getattr(s, "sharding", None) is not None else jnp.asarray(value)

    return jax.tree.map(make, abstract)


def measure(fn, args: tuple, *, run: bool = True, iters: int = 5, warmup: int = 1, trace_dir: str | None = None,
            donates_first: bool = False) -> Measurement:
    """Compiles jitted `fn` for `args` and, with `run`, times `iters` calls after `warmup` (on arrays made
    by `concrete` where args are abstract). `donates_first`: fn returns a new first argument in place of
    its donated one (a train state), which the next call takes. `trace_dir`: a jax.profiler trace of
    the timed calls."""
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    try:
        compiled = lowered.compile()
    except Exception as e:  # a TPU compiler refuses a program that cannot fit its HBM
        oom = out_of_memory(str(e), argument_bytes(args))
        if oom is None:
            raise
        return Measurement(time.perf_counter() - t0, oom, None, {}, out_of_memory=str(e).splitlines()[0][:400])
    m = Measurement(time.perf_counter() - t0, memory(compiled), xla_flops(compiled), collectives(compiled))
    if not run:
        return m
    args = tuple(concrete(a) if _abstract(a) else a for a in args)

    def call():
        nonlocal args
        out = compiled(*args)
        if donates_first:
            args = (out[0],) + args[1:]
        return out

    for _ in range(warmup):
        jax.block_until_ready(call())
    if trace_dir:
        with jax.profiler.trace(trace_dir):
            m.step_seconds = [_timed(call) for _ in range(iters)]
    else:
        m.step_seconds = [_timed(call) for _ in range(iters)]
    return m


def argument_bytes(args) -> int:
    """Bytes of `args` one device holds (each leaf's shard under its sharding; whole when it has none)."""
    total = 0
    for x in jax.tree.leaves(args):
        shape = x.shape
        sharding = getattr(x, "sharding", None)
        if sharding is not None:
            shape = sharding.shard_shape(shape)
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def out_of_memory(message: str, arguments: int) -> dict[str, int] | None:
    """Per-device memory read off a TPU compiler's RESOURCE_EXHAUSTED message (None: another error):
    the temporaries it asked for, with the arguments' shards."""
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None
    m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", message)
    if m:
        return {"argument": arguments, "temp": int(float(m.group(1)) * _UNITS[m.group(2)])}
    m = re.search(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm", message)
    if m:
        used = int(float(m.group(1)) * _UNITS[m.group(2)])
        return {"argument": arguments, "temp": max(used - arguments, 0)}
    return {"argument": arguments}


def _abstract(tree) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------
# TPU topologies on a CPU host (needs libtpu: pip install 'jaxpref[tpu]')


class TopologyError(RuntimeError):
    """A TPU topology that cannot be described here (no libtpu, an unknown name, a held lock)."""


def topology_name(spec: str) -> str:
    """"v5e:4x4" as given; a slice name "v5e-16" / "v5p-32" / "v4-16" -> its topology. The number in a
    v4 or v5p slice name counts TensorCores (two per chip), in a v5e or v6e name chips."""
    if ":" in spec:
        return spec
    m = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", spec)
    if not m:
        raise TopologyError(f"topology {spec!r}: give a slice (v5e-16, v5p-32, v4-16, v6e-8) or a topology "
                            f"(v5e:4x4, v5p:2x2x4)")
    gen, n = m.group(1), int(m.group(2))
    chips = n // 2 if gen in ("v4", "v5p") else n
    if gen in ("v5e", "v6e"):
        shapes = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
    else:
        shapes = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
                  512: "8x8x8"}
    if chips not in shapes:
        per = 2 if gen in ("v4", "v5p") else 1
        sizes = ", ".join(f"{gen}-{c * per}" for c in shapes)
        raise TopologyError(f"topology {spec!r}: no {gen} slice of {chips} chips; sizes: {sizes}")
    return f"{gen}:{shapes[chips]}"


def topology_devices(spec: str):
    """Devices of a TPU topology ("v5p:4x4x4", "v5e-16"), without TPUs attached. Call with
    jax_platforms=cpu; another process's libtpu lock is not in the way of an AOT compile
    (ALLOW_MULTIPLE_LIBTPU_LOAD=1 is set unless the environment says otherwise)."""
    name = topology_name(spec)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if importlib.util.find_spec("libtpu") is None:
        raise TopologyError("AOT compiles for a TPU topology need libtpu: pip install 'jaxpref[tpu]'")
    try:
        from jax.experimental.topologies import get_topology_desc

        return get_topology_desc(platform="tpu", topology_name=name).devices
    except Exception as e:
        if "lockfile" in str(e).lower():
            raise TopologyError("libtpu's lock (/tmp/libtpu_lockfile) is held by another process: wait for it, "
                                "or set ALLOW_MULTIPLE_LIBTPU_LOAD=1 (ahead-of-time compiles never touch a TPU)") from e
        raise TopologyError(f"cannot describe TPU topology {name!r}: {type(e).__name__}: {e}") from e
