"""Pipeline training (Optim4RL): N training units with staggered resets.

A training unit is any pytree (agent params, env state, optimizer state, ...).
``N`` units are stacked on a leading axis and stepped together with ``vmap``.
Unit ``i`` is re-initialised whenever ``step % reset_interval == offset[i]``
with ``offset[i] = i * reset_interval // N`` (``spacing="linspace"``:
``int(linspace(0, reset_interval - 1, N))[i]``, Optim4RL's; ``staggered=False``: all
offsets 0, every unit resets together: the no-pipeline ablation). After the
first ``reset_interval`` steps the units' ages are spread evenly over the
agent lifetime, so every meta-batch mixes early, middle and late training.
Resets happen inside ``jit`` with a mask (``jnp.where`` per leaf); there is
no Python loop over units.

Both meta-training methods use it: ``maybe_reset`` alone (meta-gradient
training steps the units itself, under ``jax.grad``) or ``step`` with a
``step_unit(unit, meta_params) -> (unit, metrics)`` function (ES fitness from
the units' progress).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np


SPACINGS = ("even", "linspace")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    num_units: int = 4
    reset_interval: int = 64
    staggered: bool = True
    # "even": offset i * T // N; "linspace": int(linspace(0, T - 1, N))[i], as
    # Optim4RL's reference spreads its units (the first at 0, the last at T - 1).
    spacing: str = "even"

    def __post_init__(self):
        for name in ("num_units", "reset_interval"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"PipelineConfig.{name} must be a positive integer, got {v!r}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"PipelineConfig.spacing {self.spacing!r}; allowed: {', '.join(SPACINGS)}")

    @property
    def offsets(self) -> np.ndarray:
        """``[N]`` int32 reset offsets within the interval."""
        if not self.staggered:
            return np.zeros(self.num_units, np.int32)
        if self.spacing == "linspace":
            return np.linspace(0, self.reset_interval - 1, self.num_units).astype(np.int32)
        return (np.arange(self.num_units) * self.reset_interval // self.num_units).astype(np.int32)


class PipelineState(NamedTuple):
    units: Any  # pytree, leaves [N, ...]
    ages: jax.Array  # [N] int32: steps since the unit's last (re)initialisation
    step: jax.Array  # int32: pipeline steps done
    key: jax.Array


class Pipeline(NamedTuple):
    config: PipelineConfig
    init: Callable  # (key, meta_params) -> PipelineState
    maybe_reset: Callable  # (state, meta_params) -> (state, reset_mask [N])
    advance: Callable  # (state, new_units) -> state  (ages + 1, step + 1)
    step: Callable  # (state, meta_params) -> (state, metrics)


def select_units(mask: jax.Array, new: Any, old: Any) -> Any:
    """Leafwise ``where(mask[i], new[i], old[i])`` over the leading unit axis."""
    def sel(a, b):
        m = mask.reshape(mask.shape + (1,) * (a.ndim - 1))
        return jnp.where(m, a, b)
    return jax.tree.map(sel, new, old)


def make_pipeline(config: PipelineConfig, init_unit: Callable[[jax.Array, Any], Any],
                  step_unit: Optional[Callable[[Any, Any], Any]] = None) -> Pipeline:
    """``init_unit(key, meta_params) -> unit``; ``step_unit(unit, meta_params) -> (unit, metrics)``."""
    n = config.num_units
    offsets = jnp.asarray(config.offsets)

    def init(key, meta_params=None):
        key, k_units = jax.random.split(key)
        units = jax.vmap(init_unit, (0, None))(jax.random.split(k_units, n), meta_params)
        return PipelineState(units, jnp.zeros((n,), jnp.int32), jnp.zeros((), jnp.int32), key)

    def maybe_reset(state: PipelineState, meta_params=None):
        mask = (state.step % config.reset_interval) == offsets
        mask = jnp.logical_and(mask, state.step > 0)  # units are fresh at step 0
        key, k_units = jax.random.split(state.key)
        fresh = jax.vmap(init_unit, (0, None))(jax.random.split(k_units, n), meta_params)
        units = select_units(mask, fresh, state.units)
        ages = jnp.where(mask, 0, state.ages)
        return state._replace(units=units, ages=ages, key=key), mask

    def advance(state: PipelineState, new_units):
        return state._replace(units=new_units, ages=state.ages + 1, step=state.step + 1)

    def step(state: PipelineState, meta_params=None):
        if step_unit is None:
            raise ValueError("make_pipeline: step() needs step_unit")
        state, mask = maybe_reset(state, meta_params)
        ages = state.ages
        units, metrics = jax.vmap(step_unit, (0, None))(state.units, meta_params)
        metrics = dict(metrics, ages=ages, reset=mask)
        return advance(state, units), metrics

    return Pipeline(config, init, maybe_reset, advance, step)
