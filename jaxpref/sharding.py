"""One mesh for everything: axes (data, fsdp, tensor), one logical-axis rules table.

Models only name their axes (jaxpref/models/layers.py); this table says where each name goes.
This module imports nothing of jaxpref: a model is anything with `init` and `example_inputs()`
(jaxpref.models.VLM).
A mesh axis is dropped from a parameter's spec when the dimension does not divide by its size
(e.g. one MQA key/value head over tensor=2 stays replicated), so every preset fits every mesh.

    mesh = make_mesh(data=-1, fsdp=4, tensor=2)     # -1 absorbs the remaining devices
    params = shard_params(model, params, mesh)       # or init_sharded(model, rng, mesh)
    batch = jax.device_put(batch, batch_sharding(mesh))
    step = jax.jit(on_mesh(step_fn, mesh), ...)      # activations constrained while it traces

Activations: the models call `constrain(x, ("batch", "length", "act_heads", None))` at every layer;
it is a no-op unless a function is being traced under `activation_sharding(mesh)` (what `on_mesh`
wraps a step in), and then pins the batch over (data, fsdp) and heads / MLP / vocabulary over
tensor. Without it XLA is free to keep the whole batch on every chip and all-reduce partial sums
of fsdp-sharded matmuls, which is what it does: per-chip temporaries then stop shrinking with the
slice.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),  # the model width of an activation: whole on every chip (weights carry fsdp)
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # weights
    ("embed", "fsdp"),  # model width: FSDP shards parameters along it
    ("mlp", "tensor"),  # MLP width: Megatron-style column/row split
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),  # the scanned layer stack
    ("norm", None),
    ("patch", None),
    ("channels", None),
    ("position", None),
    ("score", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A Mesh over (data, fsdp, tensor). One size may be -1 to absorb the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide by fsdp*tensor*data = {known} (without the -1 axis)")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
                         f"but {len(devices)} are available")
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # non-TPU topologies mesh_utils cannot arrange: keep the given order
        arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, MESH_AXES)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=LOGICAL_RULES) -> P:
    """PartitionSpec for an array whose dims carry `names`, under `rules` on `mesh`.

    A mesh axis is used at most once per array, only if its size is > 1 and divides the dim.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        keep = []
        for ax in axes:
            n = mesh.shape[ax]
            if ax in used or n == 1 or dim % (n * math.prod(mesh.shape[a] for a in keep)):
                continue
            keep.append(ax)
        used.update(keep)
        spec.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*spec)


def _boxed_shapes(model) -> dict:
    """The params tree of `model` as ShapeDtypeStructs still boxed with their logical names."""
    return jax.eval_shape(model.init, jax.random.key(0), *model.example_inputs())["params"]


def param_shapes(model) -> dict:
    """The params tree of `model` as jax.ShapeDtypeStruct, without allocating anything."""
    return nn.meta.unbox(_boxed_shapes(model))


def placed_shapes(shapes, shardings):
    """The ShapeDtypeStructs of `shapes` carrying `shardings` (abstract arguments to lower a program
    with, or a target to restore onto)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def logical_axes(model) -> dict:
    """The params tree of `model` with each leaf replaced by its tuple of logical axis names."""
    boxed = _boxed_shapes(model)
    return jax.tree.map(lambda b: tuple(b.names) if isinstance(b, nn.LogicallyPartitioned) else (None,) * b.ndim,
                        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def param_shardings(model, mesh: Mesh, rules=LOGICAL_RULES) -> dict:
    """NamedSharding for every parameter of `model`."""
    shapes = param_shapes(model)
    axes = logical_axes(model)
    return jax.tree.map(lambda names, s: NamedSharding(mesh, logical_to_spec(names, s.shape, mesh, rules)),
                        axes, shapes, is_leaf=lambda x: isinstance(x, tuple))


def shard_params(model, params, mesh: Mesh, rules=LOGICAL_RULES):
    """Places a params tree onto the mesh (one device_put per leaf)."""
    return jax.device_put(params, param_shardings(model, mesh, rules))


def init_sharded(model, rng, mesh: Mesh, rules=LOGICAL_RULES):
    """Random params created directly on their shards: init is jitted with out_shardings,
    so no device ever holds a full copy of the model."""
    px, ids, mask = model.example_inputs()
    shardings = param_shardings(model, mesh, rules)

    def init(rng):
        return nn.meta.unbox(model.init(rng, px, ids, mask)["params"])

    return jax.jit(init, out_shardings=shardings)(rng)


# ---------------------------------------------------------------------------
# activations

_ACTIVATIONS: contextvars.ContextVar = contextvars.ContextVar("jaxpref_activation_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=LOGICAL_RULES):
    """While active, `constrain` pins activations onto `mesh` by `rules` (enter it around tracing)."""
    token = _ACTIVATIONS.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def on_mesh(fn: Callable, mesh: Mesh, rules=LOGICAL_RULES) -> Callable:
    """`fn` traced under activation_sharding(mesh): wrap a step in it before jax.jit."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_sharding(mesh, rules):
            return fn(*args, **kwargs)

    return wrapped


def constrain(x, names: Sequence[str | None]):
    """x with a sharding constraint from its dims' logical `names` (see activation_sharding); x itself
    when no mesh is active, or when the mesh has a single device."""
    active = _ACTIVATIONS.get()
    if active is None or x is None:
        return x
    mesh, rules = active
    if mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch arrays: leading dim over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
