import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from envs.wrappers import RunningMeanStd

GYMNAX = ["CartPole-v1", "Acrobot-v1", "Pendulum-v1", "Asterix-MinAtar", "Breakout-MinAtar",
          "Freeway-MinAtar", "SpaceInvaders-MinAtar", "Catch-bsuite"]


@pytest.mark.parametrize("name", GYMNAX)
def test_gymnax_envs_reset_and_step(name):
    env, params = envs.make(name)
    obs, state = env.reset(jax.random.key(0), params)
    assert obs.shape == env.observation_space(params).shape and obs.dtype == jnp.float32
    action = env.action_space(params).sample(jax.random.key(1))
    obs2, state2, reward, term, trunc, info = jax.jit(env.step)(jax.random.key(2), state, action, params)
    assert obs2.shape == obs.shape and reward.dtype == jnp.float32
    assert term.dtype == jnp.bool_ and trunc.dtype == jnp.bool_
    # state structure and dtypes are stable across reset/step (scan carries)
    assert jax.tree.structure(state) == jax.tree.structure(state2)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state2)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.weak_type == b.weak_type


def test_unknown_env_lists_known_names():
    with pytest.raises(ValueError, match="known envs:.*CartPole-v1"):
        envs.make("CartPol-v1")
    with pytest.raises(ValueError, match="unknown override"):
        envs.make("CartPole-v1", max_step=3)


def _random_rollout(env, params, steps, key):
    obs, state = env.reset(key, params)

    def body(carry, k):
        state = carry
        ka, ks = jax.random.split(k)
        a = env.action_space(params).sample(ka)
        obs, state, r, term, trunc, info = env.step(ks, state, a, params)
        return state, (r, term, trunc, info)

    return jax.lax.scan(body, state, jax.random.split(key, steps))


def test_truncation_kept_apart_from_termination():
    # Pendulum never terminates: every episode end must be a truncation at the limit.
    env, params = envs.make("Pendulum-v1", max_steps_in_episode=7)
    _, (r, term, trunc, info) = jax.jit(lambda k: _random_rollout(env, params, 30, k))(jax.random.key(0))
    assert not bool(term.any())
    np.testing.assert_array_equal(np.nonzero(np.asarray(trunc))[0], [6, 13, 20, 27])
    lengths = np.asarray(info["returned_episode_length"])[np.asarray(info["returned_episode"])]
    np.testing.assert_array_equal(lengths, 7)


def test_cartpole_terminates_and_episode_stats_add_up():
    env, params = envs.make("CartPole-v1")
    _, (r, term, trunc, info) = jax.jit(lambda k: _random_rollout(env, params, 200, k))(jax.random.key(1))
    term, done = np.asarray(term), np.asarray(info["returned_episode"])
    assert term.sum() >= 3 and not np.asarray(trunc).any()
    # CartPole: reward 1 per step, so each finished episode's return equals its length
    ends = np.nonzero(done)[0]
    rets = np.asarray(info["returned_episode_return"])[ends]
    starts = np.concatenate([[-1], ends[:-1]])
    np.testing.assert_allclose(rets, ends - starts)


def test_auto_reset_keeps_final_obs():
    env, params = envs.make("CartPole-v1")
    _, state = env.reset(jax.random.key(0), params)
    state = state.replace(env_state=state.env_state.replace(theta=jnp.float32(0.5)))  # past the limit
    obs, new_state, _, term, _, info = env.step(jax.random.key(1), state, jnp.int32(0), params)
    assert bool(term)
    assert float(info["final_obs"][2]) > 0.2  # the terminal angle
    assert abs(float(obs[2])) < 0.06  # a fresh start
    assert int(new_state.episode_length) == 0


def test_clip_action_and_vec_env():
    env, params = envs.make("Pendulum-v1")
    vec = envs.VecEnv(env, 3)
    obs, state = vec.reset(jax.random.key(0), params)
    assert obs.shape == (3, 3)
    big = jnp.full((3, 1), 100.0)
    _, _, r_big, *_ = vec.step(jax.random.key(1), state, big, params)
    _, _, r_max, *_ = vec.step(jax.random.key(1), state, jnp.full((3, 1), 2.0), params)
    np.testing.assert_allclose(r_big, r_max)  # clipped to max_torque=2


def test_normalize_observation_running_stats():
    rms = RunningMeanStd.create((2,))
    data = np.random.default_rng(0).normal([3.0, -1.0], [2.0, 0.5], size=(4000, 2)).astype(np.float32)
    for chunk in np.split(data, 8):
        rms = rms.update(jnp.asarray(chunk))
    np.testing.assert_allclose(rms.mean, data.mean(0), atol=1e-3)
    np.testing.assert_allclose(rms.var, data.var(0), rtol=1e-2)
    env, params = envs.make("CartPole-v1")
    norm = envs.NormalizeObservation(envs.VecEnv(env, 8))
    obs, state = norm.reset(jax.random.key(0), params)
    obs, state, *_ = norm.step(jax.random.key(1), state, jnp.zeros(8, jnp.int32), params)
    assert obs.shape == (8, 4) and float(state.obs_rms.count) > 15


def test_expand_suites():
    assert envs.expand_suites("minatar") == list(envs.SUITES["minatar"])
    with pytest.raises(ValueError):
        envs.expand_suites("minatar,nope")
