"""Adapter from gymnax 1.x environments to the project's env API."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from envs.core import Env
from envs.spaces import Box, Discrete

GYMNAX_ENVS = (
    "CartPole-v1",
    "Acrobot-v1",
    "Pendulum-v1",
    "MountainCar-v0",
    "MountainCarContinuous-v0",
    "Asterix-MinAtar",
    "Breakout-MinAtar",
    "Freeway-MinAtar",
    "SpaceInvaders-MinAtar",
    "Catch-bsuite",
    "DeepSea-bsuite",
)


def _strong(tree):
    """Leaves as strongly typed arrays, so scan carries keep one dtype."""
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.asarray(x).dtype), tree)


class GymnaxEnv(Env):
    """Wraps a gymnax env without its built-in auto-reset.

    gymnax 1.x ``step`` returns six values and resets by itself; we call its
    ``step_env`` and ``is_truncated`` instead so resetting is done once, by
    ``envs.wrappers.AutoReset``, for every env family alike.
    """

    def __init__(self, name: str, **params_overrides):
        import gymnax

        self.name = name
        self._env, params = gymnax.make(name)
        fields = {f.name for f in dataclasses.fields(params)}
        unknown = sorted(set(params_overrides) - fields)
        if unknown:
            raise ValueError(
                f"unknown override(s) {unknown} for env {name!r}; allowed: {sorted(fields)}"
            )
        self._params = params.replace(**params_overrides) if params_overrides else params
        # MinAtar observations are 0/1 channel maps (returned as float32 like every
        # env's); agents may store them compactly (PPO's rollout buffer keeps bool).
        self.binary_observations = name.endswith("-MinAtar")

    @property
    def default_params(self):
        return self._params

    def reset(self, key, params):
        obs, state = self._env.reset_env(key, params)
        return obs.astype(jnp.float32), _strong(state)

    def step(self, key, state, action, params):
        obs, state, reward, terminated, info = self._env.step_env(key, state, action, params)
        truncated = jnp.logical_and(
            self._env.is_truncated(state, params), jnp.logical_not(terminated)
        )
        info = {"discount": jnp.asarray(info.get("discount", 1.0 - terminated), jnp.float32)}
        return (
            jax.lax.stop_gradient(obs).astype(jnp.float32),
            _strong(state),
            jnp.asarray(reward, jnp.float32),
            jnp.asarray(terminated, bool),
            jnp.asarray(truncated, bool),
            info,
        )

    def observation_space(self, params):
        space = self._env.observation_space(params)
        return Box(-jnp.inf, jnp.inf, tuple(space.shape))

    def action_space(self, params):
        space = self._env.action_space(params)
        if hasattr(space, "n"):
            return Discrete(int(space.n))
        # Bounds may depend on (traced) params, e.g. Pendulum's max_torque.
        return Box(space.low, space.high, tuple(space.shape))
