"""Wrappers over the env API: episode statistics, auto-reset, action clipping,
vectorisation and observation and reward normalisation.

Per-env wrappers keep their own state in a ``flax.struct`` dataclass around the
inner state; ``VecEnv`` batches ``num_envs`` copies with ``jax.vmap``, and
``NormalizeObservation`` and ``NormalizeReward`` (which share running
statistics across the batch, as purejaxrl and Brax do) work on a ``VecEnv``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from envs.core import Env, Wrapper
from envs.spaces import Box


class AutoReset(Wrapper):
    """Resets the episode when it ends; the last observation of the finished
    episode goes to ``info["final_obs"]`` (needed to bootstrap on truncation)."""

    def step(self, key, state, action, params):
        key_step, key_reset = jax.random.split(key)
        obs, next_state, reward, terminated, truncated, info = self._env.step(
            key_step, state, action, params
        )
        done = jnp.logical_or(terminated, truncated)
        obs_reset, state_reset = self._env.reset(key_reset, params)
        pick = lambda a, b: jnp.where(done, a, b).astype(jnp.result_type(b))  # noqa: E731
        new_state = jax.tree.map(pick, state_reset, next_state)
        new_obs = jax.tree.map(pick, obs_reset, obs)
        info = {**info, "final_obs": obs}
        return new_obs, new_state, reward, terminated, truncated, info


@struct.dataclass
class EpisodeStatsState:
    env_state: Any
    episode_return: jax.Array
    episode_length: jax.Array
    returned_episode_return: jax.Array
    returned_episode_length: jax.Array


class EpisodeStats(Wrapper):
    """Tracks undiscounted episode return and length.

    ``info["returned_episode"]`` is True on the step an episode ends, and
    ``info["returned_episode_return"]`` holds the return of the last finished
    episode. Put it outside ``AutoReset`` so the counters survive the reset.
    """

    def reset(self, key, params):
        obs, env_state = self._env.reset(key, params)
        zero_f, zero_i = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
        return obs, EpisodeStatsState(env_state, zero_f, zero_i, zero_f, zero_i)

    def step(self, key, state, action, params):
        obs, env_state, reward, terminated, truncated, info = self._env.step(
            key, state.env_state, action, params
        )
        done = jnp.logical_or(terminated, truncated)
        ep_ret = state.episode_return + reward
        ep_len = state.episode_length + 1
        new_state = EpisodeStatsState(
            env_state=env_state,
            episode_return=jnp.where(done, 0.0, ep_ret),
            episode_length=jnp.where(done, 0, ep_len),
            returned_episode_return=jnp.where(done, ep_ret, state.returned_episode_return),
            returned_episode_length=jnp.where(done, ep_len, state.returned_episode_length),
        )
        info = {
            **info,
            "returned_episode": done,
            "returned_episode_return": new_state.returned_episode_return,
            "returned_episode_length": new_state.returned_episode_length,
        }
        return obs, new_state, reward, terminated, truncated, info


class ClipAction(Wrapper):
    """Clips continuous actions to the action box before stepping."""

    def step(self, key, state, action, params):
        space = self._env.action_space(params)
        if isinstance(space, Box):
            action = jnp.clip(action, space.low, space.high)
        return self._env.step(key, state, action, params)


class VecEnv(Wrapper):
    """``num_envs`` copies of an env, batched with ``jax.vmap``.

    ``reset(key, params)`` and ``step(key, state, action, params)`` take one
    key (split inside) and batched states/actions of leading size ``num_envs``.
    """

    def __init__(self, env: Env, num_envs: int):
        super().__init__(env)
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.num_envs = int(num_envs)

    def reset(self, key, params):
        keys = jax.random.split(key, self.num_envs)
        return jax.vmap(self._env.reset, in_axes=(0, None))(keys, params)

    def step(self, key, state, action, params):
        keys = jax.random.split(key, self.num_envs)
        return jax.vmap(self._env.step, in_axes=(0, 0, 0, None))(keys, state, action, params)


def _require_vec_env(env, who: str) -> None:
    if not isinstance(env, VecEnv) and not hasattr(env, "num_envs"):
        raise ValueError(f"{who} wraps a VecEnv (it shares statistics over envs)")


@struct.dataclass
class RunningMeanStd:
    mean: jax.Array
    var: jax.Array
    count: jax.Array

    @classmethod
    def create(cls, shape) -> "RunningMeanStd":
        return cls(jnp.zeros(shape, jnp.float32), jnp.ones(shape, jnp.float32), jnp.float32(1e-4))

    def update(self, batch: jax.Array) -> "RunningMeanStd":
        """Parallel (Chan et al.) update from a batch ``[N, *shape]``."""
        b_mean = jnp.mean(batch, axis=0)
        b_var = jnp.var(batch, axis=0)
        b_count = jnp.float32(batch.shape[0])
        delta = b_mean - self.mean
        total = self.count + b_count
        mean = self.mean + delta * b_count / total
        m2 = self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total
        return RunningMeanStd(mean, m2 / total, total)

    def normalize(self, x: jax.Array, clip: float = 10.0) -> jax.Array:
        return jnp.clip((x - self.mean) / jnp.sqrt(self.var + 1e-8), -clip, clip)


@struct.dataclass
class NormalizeObservationState:
    env_state: Any
    obs_rms: RunningMeanStd


class NormalizeObservation(Wrapper):
    """Normalises observations of a ``VecEnv`` by running mean and variance
    shared over the whole batch of envs. ``info["final_obs"]`` is normalised
    with the same statistics."""

    def __init__(self, env: VecEnv, clip: float = 10.0):
        _require_vec_env(env, "NormalizeObservation")
        super().__init__(env)
        self.clip = clip

    def reset(self, key, params):
        obs, env_state = self._env.reset(key, params)
        rms = RunningMeanStd.create(obs.shape[1:]).update(obs)
        return rms.normalize(obs, self.clip), NormalizeObservationState(env_state, rms)

    def step(self, key, state, action, params):
        obs, env_state, reward, terminated, truncated, info = self._env.step(
            key, state.env_state, action, params
        )
        rms = state.obs_rms.update(obs)
        if "final_obs" in info:
            info = {**info, "final_obs": rms.normalize(info["final_obs"], self.clip)}
        return (
            rms.normalize(obs, self.clip),
            NormalizeObservationState(env_state, rms),
            reward,
            terminated,
            truncated,
            info,
        )


@struct.dataclass
class NormalizeRewardState:
    env_state: Any
    return_rms: RunningMeanStd  # statistics of the discounted return, shape []
    returns: jax.Array  # [num_envs] discounted return so far of each env


class NormalizeReward(Wrapper):
    """Divides rewards of a ``VecEnv`` by the running standard deviation of the
    discounted return, as purejaxrl's ``NormalizeVecReward`` (wrappers.py,
    used by ppo_continuous_action.py on Brax) and gym's ``NormalizeReward`` do::

        G <- G * gamma * (1 - done) + r;   r_out = r / sqrt(Var[G] + 1e-8)

    with ``Var[G]`` updated from the batch of ``G`` at every step (no mean is
    removed from rewards). ``done`` is ``terminated or truncated``. Episode
    statistics (``EpisodeStats``, inside the ``VecEnv``) stay on the raw rewards."""

    def __init__(self, env: VecEnv, gamma: float = 0.99):
        _require_vec_env(env, "NormalizeReward")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"NormalizeReward: gamma must be in [0, 1], got {gamma!r}")
        super().__init__(env)
        self.gamma = float(gamma)

    def reset(self, key, params):
        obs, env_state = self._env.reset(key, params)
        returns = jnp.zeros((obs.shape[0],), jnp.float32)
        return obs, NormalizeRewardState(env_state, RunningMeanStd.create(()), returns)

    def step(self, key, state, action, params):
        obs, env_state, reward, terminated, truncated, info = self._env.step(
            key, state.env_state, action, params
        )
        done = jnp.logical_or(terminated, truncated).astype(jnp.float32)
        returns = state.returns * self.gamma * (1.0 - done) + reward
        rms = state.return_rms.update(returns)
        reward = reward / jnp.sqrt(rms.var + 1e-8)
        return obs, NormalizeRewardState(env_state, rms, returns), reward, terminated, truncated, info
