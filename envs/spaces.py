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


def from_gymnax(space: Any, what: str, env_name: str) -> Space:
    """Our space for a gymnax ``space`` (``what``: "observation" or "action").

    gymnax ``Discrete`` -> ``Discrete``, ``Box`` -> ``Box``; anything else
    (``Dict``, ``Tuple``, ...) raises a one-line ``ValueError`` naming the env.
    Bounds are kept as gymnax gives them (they may be traced)."""
    from gymnax.environments import spaces as gymnax_spaces

    if isinstance(space, gymnax_spaces.Discrete):
        return Discrete(int(space.n))
    if isinstance(space, gymnax_spaces.Box):
        return Box(space.low, space.high, tuple(int(d) for d in space.shape))
    kind = type(space).__name__
    raise ValueError(f"gymnax env {env_name!r} has a {kind} {what} space; this project supports Discrete and Box")
