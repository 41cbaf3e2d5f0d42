"""Action and observation spaces (static, hashable descriptions)."""

from __future__ import annotations

import dataclasses
from typing import Any, Tuple, Union

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Discrete:
    """``n`` actions, ``0 .. n-1``, as int32 scalars."""

    n: int

    @property
    def shape(self) -> Tuple[int, ...]:
        return ()

    def sample(self, key: jax.Array) -> jax.Array:
        return jax.random.randint(key, (), 0, self.n, dtype=jnp.int32)


@dataclasses.dataclass(frozen=True)
class Box:
    """A float box ``low <= x <= high`` of the given shape. Bounds are floats
    or arrays broadcastable to ``shape`` (possibly traced, when they depend on
    env params), so compare spaces by ``shape`` and type, not by bounds."""

    low: Any
    high: Any
    shape: Tuple[int, ...]

    def sample(self, key: jax.Array) -> jax.Array:
        low = jnp.broadcast_to(jnp.asarray(self.low, jnp.float32), self.shape)
        high = jnp.broadcast_to(jnp.asarray(self.high, jnp.float32), self.shape)
        return jax.random.uniform(key, self.shape, jnp.float32, low, high)


Space = Union[Discrete, Box]
