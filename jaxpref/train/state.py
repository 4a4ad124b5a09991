"""The train state and the generic update step every algorithm's step is made of.

    state = init_state(params, tx, seed, shardings)          # params already on the mesh
    step = jit_train_step(partial(train_step, loss_fn=..., tx=tx, schedule=..., count_tokens=...), shardings, mesh)
    state, metrics = step(state, batch)                      # batch: dict of [A, B, ...] arrays

A loss function is `loss_fn(params, micro_batch) -> (loss_sum, Stats)` (jaxpref.objectives): the
sum of the per-example (or per-token) losses and statistics kept as sums with counts. The step
accumulates gradients of the sums over the A micro-batches inside the jit (a `lax.scan`), then
divides by the total count: the gradient of the exact mean over the global batch, whatever A.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpref.objectives import Stats
from jaxpref.sharding import on_mesh, placed_shapes

BATCH_AXES = ("data", "fsdp")


@flax.struct.dataclass
class TrainState:
    step: Any  # int32[]: optimizer steps taken
    params: Any  # float32 master parameters
    opt_state: Any  # optax state (AdamW moments mirror params)
    rng: Any  # uint32[2]: raw key data (jax.random.wrap_key_data), for algorithms that sample


def train_step(state: TrainState, batch: dict, frozen=None, *, loss_fn: Callable, tx: optax.GradientTransformation,
               schedule: Callable, count_tokens: Callable, loss_rng: bool = False) -> tuple[TrainState, dict]:
    """One optimizer step on `batch` (dict of arrays [A, B, ...]: A micro-batches of B rows).

    `frozen`: parameters the loss reads but never trains (DPO's reference model), passed to it as
    `loss_fn(params, micro_batch, frozen=frozen)`; None for losses that need none.

    Returns the new state and metrics: the loss function's statistics over the whole batch,
    grad_norm (before clipping), learning_rate (at the new step, as transformers logs it) and
    num_tokens (count_tokens(batch): the tokens the model read in this step).

    loss_rng: the loss also takes `rng=` (uint32[2] key data, e.g. for dropout): micro-batch i of step s
    gets fold_in(fold_in(state.rng, s), i), so a resumed run draws the same.
    """
    if frozen is not None:
        loss_fn = partial(loss_fn, frozen=frozen)
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_at(params, mb, i):
        if not loss_rng:
            return loss_fn(params, mb)
        return loss_fn(params, mb, rng=jax.random.key_data(jax.random.fold_in(step_key, i)))

    grad_fn = jax.grad(loss_at, has_aux=True)
    first = jax.tree.map(lambda x: x[0], batch)
    shapes = jax.eval_shape(lambda: loss_at(state.params, first, 0)[1])
    stats0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes).empty()
    grads0 = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    accum = jax.tree.leaves(batch)[0].shape[0]

    def micro(carry, xs):
        grads, stats = carry
        mb, i = xs
        g, s = grad_fn(state.params, mb, i)
        return (jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g), stats.merge(s)), None

    (grads, stats), _ = jax.lax.scan(micro, (grads0, stats0), (batch, jnp.arange(accum)))
    count = stats.means["loss"][1]
    grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1e-12), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = {**stats.report(), "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(new.step),
               "num_tokens": count_tokens(batch)}
    return new, metrics


def eval_step(params, batch: dict, frozen=None, *, loss_fn: Callable) -> Stats:
    """Statistics of one evaluation batch (dict of arrays [B, ...]); `frozen` as in train_step."""
    return (loss_fn(params, batch) if frozen is None else loss_fn(params, batch, frozen=frozen))[1]


# ---------------------------------------------------------------------------
# shardings and jit


def _path_key(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def mirror_shardings(tree, param_shardings, mesh: Mesh):
    """Shardings for a tree whose array leaves mirror parameters (optimizer moments): a leaf whose
    path ends with a parameter's path gets that parameter's sharding; anything else is replicated."""
    by_path = {_path_key(p): s for p, s in jax.tree_util.tree_leaves_with_path(param_shardings)}
    replicated = NamedSharding(mesh, P())

    def pick(path, _):
        key = _path_key(path)
        return next((by_path[key[i:]] for i in range(len(key)) if key[i:] in by_path), replicated)

    return jax.tree_util.tree_map_with_path(pick, tree)


def state_shardings(param_shardings, abstract_params, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """A TrainState of NamedShardings: params as given, optimizer state mirroring them, the rest replicated."""
    replicated = NamedSharding(mesh, P())
    opt = mirror_shardings(jax.eval_shape(tx.init, abstract_params), param_shardings, mesh)
    return TrainState(step=replicated, params=param_shardings, opt_state=opt, rng=replicated)


def init_state(params, tx: optax.GradientTransformation, seed: int, shardings: TrainState) -> TrainState:
    """Step 0: optimizer state created directly on its shards."""
    def init(params):
        rng = jax.random.key_data(jax.random.key(seed))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)

    return jax.jit(init, out_shardings=shardings)(params)


def abstract_state(shardings: TrainState, params_like, tx) -> TrainState:
    """ShapeDtypeStructs with shardings for restoring a TrainState onto `shardings`' mesh."""
    shapes = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                                                 rng=jax.random.key_data(jax.random.key(0))), params_like)
    return placed_shapes(shapes, shardings)


def micro_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Train batches [A, B, ...]: B over the batch axes."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Eval batches [B, ...]: B over the batch axes."""
    return NamedSharding(mesh, P(BATCH_AXES))


def jit_train_step(step_fn: Callable, shardings: TrainState, mesh: Mesh, frozen_shardings=None):
    """step_fn(state, batch) jitted: explicit in/out shardings, the state donated, activations
    sharded over the batch axes (jaxpref.sharding.on_mesh). With `frozen_shardings` the jitted
    function is step_fn(state, batch, frozen)."""
    replicated = NamedSharding(mesh, P())
    extra = () if frozen_shardings is None else (frozen_shardings,)
    return jax.jit(on_mesh(step_fn, mesh), in_shardings=(shardings, micro_batch_sharding(mesh), *extra),
                   out_shardings=(shardings, replicated), donate_argnums=0)


def jit_eval_step(eval_fn: Callable, param_shardings, mesh: Mesh, frozen_shardings=None):
    """eval_fn(params, batch) jitted with explicit shardings; statistics replicated. With
    `frozen_shardings` the jitted function is eval_fn(params, batch, frozen)."""
    extra = () if frozen_shardings is None else (frozen_shardings,)
    return jax.jit(on_mesh(eval_fn, mesh), in_shardings=(param_shardings, batch_sharding(mesh), *extra),
                   out_shardings=NamedSharding(mesh, P()))
