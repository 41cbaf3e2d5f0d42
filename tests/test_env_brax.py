"""Brax adapter. Brax compiles slowly on CPU, so the default tests compile one
function once (inverted_pendulum, the cheapest env) and check everything on
its output; the other envs and backends are compiled only under ``slow``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from envs.brax_env import BACKENDS, DEFAULT_BACKEND

NAME = "brax/inverted_pendulum"
STEPS = 20
LIMIT = 6


@pytest.fixture(scope="module")
def rollout():
    """Two envs, vmapped with their own params, ``STEPS`` steps through
    ``envs.make``'s wrappers (ClipAction, AutoReset, EpisodeStats).

    Env 0: time limit ``LIMIT``, zero force (the pole stays up that long).
    Env 1: time limit 1000, action 3.0 (clipped to full force; it falls).
    """
    env, params = envs.make(NAME, max_steps_in_episode=LIMIT)
    batch_params = params.replace(max_steps_in_episode=jnp.array([LIMIT, 1000], jnp.int32))
    actions = jnp.array([[0.0], [3.0]], jnp.float32)

    def run(key, params, action):
        key_reset, key_steps = jax.random.split(key)
        obs0, state = env.reset(key_reset, params)

        def body(state, k):
            obs, state, reward, term, trunc, info = env.step(k, state, action, params)
            return state, (obs, reward, term, trunc, info)

        state, out = jax.lax.scan(body, state, jax.random.split(key_steps, STEPS))
        return obs0, state, out

    keys = jax.random.split(jax.random.key(0), 2)
    return jax.jit(jax.vmap(run))(keys, batch_params, actions)


def test_every_brax_env_constructs():
    for name in envs.BRAX_ENVS:
        env, params = envs.make_bare(f"brax/{name}")
        assert env.backend == DEFAULT_BACKEND
        assert env.action_space(params).shape == (env.action_size,) and env.action_size >= 1
        assert int(params.max_steps_in_episode) == 1000


def test_reset_and_step_shapes_and_stable_dtypes():
    env, params = envs.make_bare(NAME)
    assert env.observation_space(params).shape == (4,)
    space = env.action_space(params)
    assert space.shape == (1,) and (space.low, space.high) == (-1.0, 1.0)
    obs, state = jax.eval_shape(env.reset, jax.random.key(0), params)
    out = jax.eval_shape(env.step, jax.random.key(1), state, jnp.zeros(1, jnp.float32), params)
    obs2, state2, reward, term, trunc, info = out
    assert obs.shape == obs2.shape == (4,) and obs.dtype == obs2.dtype == jnp.float32
    assert reward.shape == () and reward.dtype == jnp.float32
    assert term.dtype == jnp.bool_ and trunc.dtype == jnp.bool_
    assert set(info) == {"discount"} and info["discount"].dtype == jnp.float32
    # a scan carry: same structure, shapes, dtypes and no weak types
    assert jax.tree.structure(state) == jax.tree.structure(state2)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state2)):
        assert (a.shape, a.dtype, a.weak_type) == (b.shape, b.dtype, b.weak_type)
        assert not a.weak_type


def test_jit_vmap_rollout_outputs(rollout):
    obs0, state, (obs, reward, term, trunc, info) = rollout
    assert obs0.shape == (2, 4) and obs.shape == (2, STEPS, 4) and obs.dtype == jnp.float32
    assert np.isfinite(np.asarray(obs)).all()
    np.testing.assert_allclose(reward, 1.0)  # inverted_pendulum pays 1 per step
    assert reward.dtype == jnp.float32 and term.dtype == jnp.bool_ and trunc.dtype == jnp.bool_
    assert np.abs(np.asarray(obs0)).max() <= 0.01 + 1e-6  # Brax's reset noise
    assert not np.array_equal(obs0[0], obs0[1])  # the two envs got different keys


def test_truncation_at_max_steps_override(rollout):
    _, _, (obs, reward, term, trunc, info) = rollout
    term, trunc = np.asarray(term[0]), np.asarray(trunc[0])
    assert not term.any()
    np.testing.assert_array_equal(np.nonzero(trunc)[0], np.arange(LIMIT - 1, STEPS, LIMIT))
    np.testing.assert_allclose(info["discount"][0], 1.0)  # truncation still bootstraps
    lengths = np.asarray(info["returned_episode_length"][0])[trunc]
    np.testing.assert_array_equal(lengths, LIMIT)


def test_termination_from_brax_done_and_auto_reset(rollout):
    _, _, (obs, reward, term, trunc, info) = rollout
    term, trunc = np.asarray(term[1]), np.asarray(trunc[1])
    assert term.sum() >= 2 and not trunc.any()
    np.testing.assert_array_equal(np.asarray(info["discount"][1]), 1.0 - term)
    final_angle = np.abs(np.asarray(info["final_obs"][1])[term, 1])
    assert (final_angle > 0.2).all()  # Brax's termination rule for this env
    # the observation after a terminal step is a fresh start
    assert (np.abs(np.asarray(obs[1])[term]) <= 0.01 + 1e-6).all()
    assert np.asarray(info["returned_episode"][1])[term].all()


def test_unknown_backend_and_override_errors():
    with pytest.raises(ValueError, match="allowed backends: " + ", ".join(BACKENDS)):
        envs.make(NAME, backend="tpu_magic")
    with pytest.raises(ValueError, match="unknown override.*allowed"):
        envs.make(NAME, episode_len=10)
    with pytest.raises(ValueError, match="max_steps_in_episode"):
        envs.make(NAME, max_steps_in_episode=0)


def test_backend_override_is_used():
    env, params = envs.make("brax/ant", backend="spring")
    assert env.unwrapped.backend == "spring" and env.unwrapped._env.backend == "spring"
    assert env.observation_space(params).shape == (27,) and env.action_space(params).shape == (8,)


def _compile_and_run(name, backend, steps=3):
    env, params = envs.make(name, backend=backend)
    space = env.action_space(params)

    def run(key):
        _, state = env.reset(key, params)

        def body(state, k):
            obs, state, r, term, trunc, info = env.step(k, state, space.sample(k), params)
            return state, (obs, r)

        return jax.lax.scan(body, state, jax.random.split(key, steps))[1]

    obs, r = jax.jit(run)(jax.random.key(0))
    assert obs.shape == (steps,) + env.observation_space(params).shape
    assert np.isfinite(np.asarray(obs)).all() and np.isfinite(np.asarray(r)).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in envs.BRAX_ENVS if n != "inverted_pendulum"])
def test_every_brax_env_runs(name):
    _compile_and_run(f"brax/{name}", DEFAULT_BACKEND)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_runs(backend):
    _compile_and_run(NAME, backend)
