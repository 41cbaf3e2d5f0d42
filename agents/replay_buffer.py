"""A uniform-sampling ring buffer of transitions that lives in the agent
state: arrays only, so ``jax.vmap`` batches a population's buffers and
``lax.scan`` carries them (used by TD3)::

    buf = replay_buffer.init(example_transition, capacity)
    buf = replay_buffer.add(buf, transitions)       # leaves [N, ...]
    batch = replay_buffer.sample(buf, key, 256)     # leaves [256, ...]
"""

from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class ReplayBuffer:
    """``data``: dict of ``[capacity, ...]`` arrays; ``ptr``: int32 row written
    next; ``size``: int32 rows filled."""

    data: Dict[str, jax.Array]
    ptr: jax.Array
    size: jax.Array

    @property
    def capacity(self) -> int:
        return jax.tree.leaves(self.data)[0].shape[0]


def init(example: Dict[str, jax.Array], capacity: int) -> ReplayBuffer:
    """An empty buffer for transitions shaped like ``example`` (one transition, no batch axis)."""
    data = jax.tree.map(lambda x: jnp.zeros((capacity,) + jnp.shape(x), jnp.asarray(x).dtype), example)
    return ReplayBuffer(data, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def add(buf: ReplayBuffer, batch: Dict[str, jax.Array]) -> ReplayBuffer:
    """Writes ``N <= capacity`` transitions (``[N, ...]``) at the ring position, overwriting the oldest."""
    cap = buf.capacity
    n = jax.tree.leaves(batch)[0].shape[0]
    rows = (buf.ptr + jnp.arange(n, dtype=jnp.int32)) % cap
    data = jax.tree.map(lambda d, x: d.at[rows].set(x.astype(d.dtype)), buf.data, batch)
    return ReplayBuffer(data, (buf.ptr + n) % cap, jnp.minimum(buf.size + n, cap).astype(jnp.int32))


def sample(buf: ReplayBuffer, key: jax.Array, n: int) -> Dict[str, jax.Array]:
    """``n`` transitions drawn uniformly (with replacement) from the filled rows; ``[n, ...]``."""
    rows = jax.random.randint(key, (n,), 0, jnp.maximum(buf.size, 1))
    return jax.tree.map(lambda d: jnp.take(d, rows, axis=0), buf.data)
