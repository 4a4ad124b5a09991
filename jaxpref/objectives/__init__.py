"""Pure loss functions, one file per family: sft, reward, dpo, ppo.

Losses that feed a training step return `(loss_sum, Stats)`: a sum over examples or tokens and
statistics kept as sums with their counts (and running min / max), so micro-batches, devices
and steps combine into the exact global mean whatever the split.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Stats:
    """means: name -> (sum float32[], count float32[]), reported as sum / count;
    mins / maxs: name -> float32[], reported as is."""

    means: dict
    mins: dict = flax.struct.field(default_factory=dict)
    maxs: dict = flax.struct.field(default_factory=dict)

    def merge(self, other: "Stats") -> "Stats":
        """The statistics of both batches together."""
        add = lambda a, b: (a[0] + b[0], a[1] + b[1])
        return Stats(means={k: add(v, other.means[k]) for k, v in self.means.items()},
                     mins={k: jnp.minimum(v, other.mins[k]) for k, v in self.mins.items()},
                     maxs={k: jnp.maximum(v, other.maxs[k]) for k, v in self.maxs.items()})

    def empty(self) -> "Stats":
        """The identity of `merge` with this structure (zero sums, +/-inf extremes)."""
        zero = lambda x: jnp.zeros_like(x)
        return Stats(means={k: (zero(s), zero(c)) for k, (s, c) in self.means.items()},
                     mins={k: jnp.full_like(v, jnp.inf) for k, v in self.mins.items()},
                     maxs={k: jnp.full_like(v, -jnp.inf) for k, v in self.maxs.items()})

    def report(self) -> dict[str, jax.Array]:
        """name -> value (means divided by their counts; a mean over nothing is 0)."""
        out = {k: s / jnp.maximum(c, 1e-12) for k, (s, c) in self.means.items()}
        return {**out, **self.mins, **self.maxs}


def masked_sum(x, mask):
    """sum(x * mask) in float32 (mask broadcast to x)."""
    return jnp.sum(jnp.asarray(x, jnp.float32) * mask)


def masked_min(x, mask):
    return jnp.min(jnp.where(mask > 0, x, jnp.inf))


def masked_max(x, mask):
    return jnp.max(jnp.where(mask > 0, x, -jnp.inf))
