"""NormalizeObservation's numbers against a numpy transcription of purejaxrl.

purejaxrl wrappers.py ``NormalizeVecObservation``: statistics start at mean 0,
var 1, count 1e-4; reset and every step merge the batch of observations
(over envs) into them with the parallel-variance formula::

    delta = batch_mean - mean;  tot = count + batch_count
    mean += delta * batch_count / tot
    M2 = var * count + batch_var * batch_count + delta^2 * count * batch_count / tot
    var = M2 / tot;  count = tot
    obs_out = (obs - mean) / sqrt(var + 1e-8)

after the update. Ours also clips to +-10 (docs/fidelity.md, "Observation
normalisation clips at +-10") and normalises ``info["final_obs"]`` (the
pre-reset observation PPO bootstraps from) with the same statistics.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

import envs
from envs.core import Env
from envs.spaces import Box, Discrete
from envs.wrappers import NormalizeObservation, RunningMeanStd, VecEnv


@struct.dataclass
class DriftState:
    x: jax.Array  # [2]
    t: jax.Array


class DriftEnv(Env):
    """obs = x, random at reset (scale/offset per dimension); each step
    ``x <- 0.9 x + [1, -2] * (1 + action)``; a 3-step time limit, so the
    ``final_obs`` of a truncated episode is never an observation the
    statistics saw. ``params`` scales the reset spread."""

    name = "drift"

    @property
    def default_params(self):
        return jnp.float32(1.0)

    def reset(self, key, params):
        x = jax.random.normal(key, (2,)) * jnp.array([2.0, 0.5]) * params + jnp.array([3.0, -1.0])
        return x, DriftState(x, jnp.int32(0))

    def step(self, key, state, action, params):
        x = 0.9 * state.x + jnp.array([1.0, -2.0]) * (1.0 + action.astype(jnp.float32))
        s = DriftState(x, state.t + 1)
        return x, s, jnp.float32(0.0), jnp.bool_(False), s.t >= 3, {}

    def observation_space(self, params):
        return Box(-jnp.inf, jnp.inf, (2,))

    def action_space(self, params):
        return Discrete(2)


class Reference:
    """purejaxrl NormalizeVecObservation's statistics in float64, plus our clip."""

    def __init__(self, shape):
        self.mean, self.var, self.count = np.zeros(shape), np.ones(shape), 1e-4

    def update(self, batch):
        batch = np.asarray(batch, np.float64)
        b_mean, b_var, b_count = batch.mean(0), batch.var(0), batch.shape[0]
        delta = b_mean - self.mean
        tot = self.count + b_count
        new_mean = self.mean + delta * b_count / tot
        m2 = self.var * self.count + b_var * b_count + np.square(delta) * self.count * b_count / tot
        self.mean, self.var, self.count = new_mean, m2 / tot, tot

    def normalize(self, x, clip=10.0):
        return np.clip((np.asarray(x, np.float64) - self.mean) / np.sqrt(self.var + 1e-8), -clip, clip)


def _pair(n, params=jnp.float32(1.0)):
    env = envs.EpisodeStats(envs.AutoReset(DriftEnv()))
    return VecEnv(env, n), NormalizeObservation(VecEnv(env, n)), params


def test_running_statistics_and_normalised_obs_match_purejaxrl():
    n, steps = 5, 8
    raw, norm, params = _pair(n)
    raw_step, norm_step = jax.jit(raw.step), jax.jit(norm.step)
    obs_r, s_r = raw.reset(jax.random.key(0), params)
    obs_n, s_n = norm.reset(jax.random.key(0), params)
    ref = Reference((2,))
    ref.update(obs_r)
    np.testing.assert_allclose(obs_n, ref.normalize(obs_r), rtol=1e-4, atol=1e-5)
    rng = np.random.default_rng(0)
    truncations = 0
    for t in range(steps):
        a = jnp.asarray(rng.integers(0, 2, n), jnp.int32)
        k = jax.random.key(t + 1)
        obs_r, s_r, _, _, trunc, info_r = raw_step(k, s_r, a, params)
        obs_n, s_n, _, _, trunc_n, info_n = norm_step(k, s_n, a, params)
        np.testing.assert_array_equal(trunc, trunc_n)
        truncations += int(np.asarray(trunc).sum())
        ref.update(obs_r)
        rms = s_n.obs_rms
        np.testing.assert_allclose(rms.mean, ref.mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(rms.var, ref.var, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(rms.count, ref.count, rtol=1e-6)
        np.testing.assert_allclose(obs_n, ref.normalize(obs_r), rtol=1e-4, atol=1e-4)
        # final_obs: the raw pre-reset obs, normalised with the statistics of this very step
        final = ref.normalize(info_r["final_obs"])
        np.testing.assert_allclose(info_n["final_obs"], final, rtol=1e-4, atol=1e-4)
        if trunc.any():
            # the check can tell raw from normalised final obs
            assert np.abs(final - np.asarray(info_r["final_obs"]))[np.asarray(trunc)].max() > 0.5
    assert truncations == 2 * n  # time limits at steps 3 and 6: final_obs differed from obs there


def test_final_obs_is_normalised_with_the_updated_statistics_not_the_previous_ones():
    """At a step with a truncation, final_obs uses the statistics that include
    this step's observations (the same ones as the returned obs)."""
    n = 4
    raw, norm, params = _pair(n)
    _, s_r = raw.reset(jax.random.key(3), params)
    _, s_n = norm.reset(jax.random.key(3), params)
    a = jnp.zeros(n, jnp.int32)
    for t in range(3):  # the 3rd step hits the time limit
        k = jax.random.key(10 + t)
        before = s_n.obs_rms
        obs_r, s_r, _, _, trunc, info_r = raw.step(k, s_r, a, params)
        obs_n, s_n, _, _, _, info_n = norm.step(k, s_n, a, params)
    assert np.asarray(trunc).all()
    after = s_n.obs_rms
    f = np.asarray(info_r["final_obs"], np.float64)
    with_after = np.clip((f - after.mean) / np.sqrt(np.asarray(after.var, np.float64) + 1e-8), -10, 10)
    with_before = np.clip((f - before.mean) / np.sqrt(np.asarray(before.var, np.float64) + 1e-8), -10, 10)
    assert np.abs(with_after - with_before).max() > 0.05
    np.testing.assert_allclose(info_n["final_obs"], with_after, rtol=1e-4, atol=1e-4)
    # and the returned (post-reset) obs with the same statistics
    np.testing.assert_allclose(obs_n, np.clip((np.asarray(obs_r, np.float64) - after.mean)
                                              / np.sqrt(np.asarray(after.var, np.float64) + 1e-8), -10, 10),
                               rtol=1e-4, atol=1e-4)


class OutlierEnv(Env):
    """The state is the observation (``[0]`` at reset; the test writes the
    outlier into the state); a step returns it unchanged, truncated, with a
    ``final_obs`` of ``1e4``."""

    name = "outlier"

    @property
    def default_params(self):
        return jnp.float32(0.0)

    def reset(self, key, params):
        return jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.float32)

    def step(self, key, state, action, params):
        return state, state, jnp.float32(0.0), jnp.bool_(False), jnp.bool_(True), {"final_obs": jnp.full((1,), 1e4)}

    def observation_space(self, params):
        return Box(-jnp.inf, jnp.inf, (1,))

    def action_space(self, params):
        return Discrete(2)


def test_normalised_obs_and_final_obs_are_clipped_at_10():
    """One outlier among 200 envs sits ~14 std above the batch mean, and a final
    obs of 1e4 far more: both come out at +10 (gym/CleanRL clip; purejaxrl has none)."""
    n = 200
    norm = NormalizeObservation(VecEnv(OutlierEnv(), n))
    _, s = norm.reset(jax.random.key(0), 0.0)
    x = np.zeros((n, 1), np.float32)
    x[0] = 1000.0
    s = s.replace(env_state=jnp.asarray(x))
    obs, s, _, _, _, info = norm.step(jax.random.key(1), s, jnp.zeros(n, jnp.int32), 0.0)
    ref = Reference((1,))
    ref.update(np.zeros((n, 1)))
    ref.update(x)
    unclipped = (x[0, 0] - ref.mean[0]) / np.sqrt(ref.var[0] + 1e-8)
    assert unclipped > 12  # purejaxrl's value, without the clip
    np.testing.assert_allclose(obs[0, 0], 10.0)
    np.testing.assert_allclose(obs[1:, 0], ref.normalize(x[1:])[:, 0], rtol=1e-4)
    np.testing.assert_allclose(info["final_obs"], 10.0)
    # a custom clip is honoured
    norm5 = NormalizeObservation(VecEnv(OutlierEnv(), n), clip=5.0)
    _, s5 = norm5.reset(jax.random.key(0), 0.0)
    obs5, *_ = norm5.step(jax.random.key(1), s5.replace(env_state=jnp.asarray(x)), jnp.zeros(n, jnp.int32), 0.0)
    np.testing.assert_allclose(obs5[0, 0], 5.0)


def test_epsilon_is_inside_the_square_root():
    """``(x - mean) / sqrt(var + 1e-8)``: at var 0 a difference of 3e-5 gives 0.3
    (``/ (sqrt(var) + 1e-8)`` would give 3000, clipped to 10)."""
    rms = RunningMeanStd(jnp.zeros((2,)), jnp.array([0.0, 4.0]), jnp.float32(10.0))
    out = rms.normalize(jnp.array([[3e-5, 3.0]]))
    np.testing.assert_allclose(out, [[0.3, 3.0 / np.sqrt(4.0 + 1e-8)]], rtol=1e-4)
