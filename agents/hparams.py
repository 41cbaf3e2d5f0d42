"""Shared helper for the agents' hyperparameter NamedTuples (``PPOHParams``,
``A2CHParams``, ...): float32 arrays so a population can vary them and PBT can
change them inside ``jit`` without recompiling."""

from __future__ import annotations

from typing import Dict

import jax.numpy as jnp


def with_defaults(cls, defaults: Dict[str, float], overrides: Dict[str, float], agent: str):
    """``cls(**defaults updated by overrides)`` as float32 arrays; an unknown
    name -> ``ValueError`` listing the allowed ones."""
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise ValueError(f"unknown {agent} hyperparameter(s) {sorted(unknown)}; allowed: {sorted(defaults)}")
    values = {**defaults, **overrides}
    return cls(**{k: jnp.asarray(v, jnp.float32) for k, v in values.items()})
