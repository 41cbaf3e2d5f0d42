import dataclasses
import os
import subprocess
import sys
import textwrap
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import envs
import learned_optim
from agents.ppo import PPOConfig, PPOHParams, final_return, make_ppo
from tests.conftest import ROOT

TINY = PPOConfig(num_envs=4, num_steps=16, total_timesteps=4 * 16 * 3, update_epochs=2, num_minibatches=2,
                 hidden_sizes=(16, 16))


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="does not divide into num_minibatches"):
        PPOConfig(num_envs=4, num_steps=10, num_minibatches=3)
    with pytest.raises(ValueError, match="total_timesteps must be positive"):
        PPOConfig(total_timesteps=0)
    with pytest.raises(ValueError, match="activation"):
        PPOConfig(activation="sigmoidish")
    with pytest.raises(ValueError, match="unknown PPO hyperparameter"):
        PPOHParams.default(learning_rate=1e-3)


def test_update_structure_stable_and_deterministic():
    env, p = envs.make("CartPole-v1")
    agent = make_ppo(TINY, env, p, learned_optim.from_spec("adam"))
    assert agent.stats_needed == frozenset() and agent.uses_lr
    s0 = agent.init(jax.random.key(0), PPOHParams.default())
    s1, m = jax.jit(agent.update)(s0)
    assert jax.tree.structure(s0) == jax.tree.structure(s1)
    for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1)):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert set(s1.params) == {"actor", "critic"} and int(s1.update_step) == 1
    s1b, _ = jax.jit(agent.update)(agent.init(jax.random.key(0), PPOHParams.default()))
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s1b.params)):
        np.testing.assert_array_equal(a, b)
    s1c, _ = jax.jit(agent.update)(agent.init(jax.random.key(1), PPOHParams.default()))
    assert not np.allclose(s1.params["actor"]["Dense_0"]["kernel"], s1c.params["actor"]["Dense_0"]["kernel"])


def test_continuous_actor_has_log_std_and_trains():
    env, p = envs.make("Pendulum-v1")
    agent = make_ppo(TINY, env, p, learned_optim.from_spec("adam:lr=1e-3"))
    s, m = jax.jit(agent.train)(jax.random.key(0), PPOHParams.default())
    assert s.params["actor"]["log_std"].shape == (1,)
    assert np.all(np.isfinite(m["policy_loss"]))


class _Recorder(NamedTuple):
    """Test optimizer state: asks for all statistics and records what came."""

    count: jax.Array
    seen: dict
    required_stats = frozenset({"inputs", "outputs", "preact_grads"})


def _recording_optimizer():
    def init(params):
        return _Recorder(jnp.zeros((), jnp.int32), {"tf": jnp.zeros(()), "bf": jnp.zeros(()), "in0": jnp.zeros(()),
                                                     "out_last": jnp.zeros(()), "g0": jnp.zeros(()),
                                                     "out_rows": jnp.zeros(()), "g_rows": jnp.zeros(())})

    def update(updates, state, params=None, *, layer_stats, train_fraction, batch_fraction, key, **_):
        a0 = layer_stats["actor"]["Dense_0"]
        seen = {
            "tf": jnp.asarray(train_fraction, jnp.float32), "bf": jnp.asarray(batch_fraction, jnp.float32),
            "in0": jnp.asarray(a0.inputs.shape[0] * 1000 + a0.inputs.shape[1], jnp.float32),
            "out_last": jnp.asarray(layer_stats["critic"]["Dense_2"].outputs.shape[1], jnp.float32),
            "out_rows": jnp.asarray(layer_stats["critic"]["Dense_2"].outputs.shape[0], jnp.float32),
            "g_rows": jnp.asarray(a0.preact_grads.shape[0], jnp.float32),
            "g0": jnp.abs(a0.preact_grads).sum(),
        }
        return jax.tree.map(lambda g: -1e-3 * g, updates), _Recorder(state.count + 1, seen)

    return optax.GradientTransformationExtraArgs(init, update)


def test_layer_stats_and_context_reach_optimizers_that_ask():
    env, p = envs.make("CartPole-v1")
    agent = make_ppo(TINY, env, p, _recording_optimizer())
    assert agent.stats_needed == {"inputs", "outputs", "preact_grads"}
    s = agent.init(jax.random.key(0), PPOHParams.default())
    s, _ = jax.jit(agent.update)(s)
    s, _ = jax.jit(agent.update)(s)
    rec = s.opt_state[1]
    assert int(rec.count) == 2 * TINY.update_epochs * TINY.num_minibatches
    np.testing.assert_allclose(rec.seen["tf"], 1 / TINY.num_updates)  # second iteration
    np.testing.assert_allclose(rec.seen["bf"], 1.0)  # last epoch
    assert int(rec.seen["in0"]) == TINY.minibatch_size * 1000 + 4  # [B, obs_dim]
    assert int(rec.seen["out_last"]) == 1  # critic output layer
    assert float(rec.seen["g0"]) > 0
    # Curvature statistics on the first rows only; dormancy outputs on all rows.
    sub = dataclasses.replace(TINY, curvature_batch_size=8)
    s = make_ppo(sub, env, p, _recording_optimizer()).init(jax.random.key(0), PPOHParams.default())
    s, _ = jax.jit(make_ppo(sub, env, p, _recording_optimizer()).update)(s)
    rec = s.opt_state[1]
    assert int(rec.seen["in0"]) == 8 * 1000 + 4 and int(rec.seen["g_rows"]) == 8
    assert int(rec.seen["out_rows"]) == TINY.minibatch_size
    with pytest.raises(ValueError, match="curvature_batch_size"):
        dataclasses.replace(TINY, curvature_batch_size=-1)


def test_time_limits_are_bootstrapped_only_where_truncated():
    """Pendulum always ends by its 200-step time limit: V(final obs) is folded
    into the reward exactly at those steps, the same with and without vmap
    (the branch is a real ``cond`` on ``any_member``)."""
    env, env_params = envs.make("Pendulum-v1")
    cfg = PPOConfig(num_envs=2, num_steps=256, total_timesteps=512, num_minibatches=2)
    agent = make_ppo(cfg, env, env_params, learned_optim.from_spec("adam"))
    hp = PPOHParams.default(gamma=0.9)
    state = agent.init(jax.random.key(0), hp)
    _, traj = jax.jit(agent.rollout)(state)
    boot, trunc = np.asarray(traj["bootstrap_value"]), np.zeros((256, 2), bool)
    trunc[199] = True
    assert np.all(boot[~trunc] == 0.0)
    assert np.all(np.abs(boot[trunc]) > 0.0)
    raw = np.asarray(traj["reward"]) - 0.9 * boot
    assert raw.min() >= -16.3 and raw.max() <= 0.0  # Pendulum's own reward range
    assert np.asarray(traj["done"])[199].all()
    # A population of two: member 1 is the same agent, so its trajectory matches.
    pair = jax.tree.map(lambda a, b: jnp.stack([a, b]), agent.init(jax.random.key(1), hp), state)
    _, traj2 = jax.jit(jax.vmap(agent.rollout))(pair)
    np.testing.assert_allclose(traj2["bootstrap_value"][1], boot, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(traj2["reward"][1], traj["reward"], rtol=1e-5, atol=1e-6)


def test_hparams_differ_per_member_under_vmap():
    """lr=0 must leave the policy untouched while lr>0 changes it, in one vmapped call
    (the learning rates written into the optimizer states by ``init``)."""
    from agents import core

    env, p = envs.make("CartPole-v1")
    agent = make_ppo(TINY, env, p, learned_optim.from_spec("adam"))
    hp = jax.tree.map(lambda x: jnp.broadcast_to(x, (2,)), PPOHParams.default())
    keys = jnp.stack([jax.random.key(0), jax.random.key(0)])
    s0 = jax.vmap(agent.init)(keys, hp, jnp.array([0.0, 1e-3]))
    np.testing.assert_array_equal(core.learning_rate(s0), np.array([0.0, 1e-3], np.float32))
    s1, m = jax.jit(jax.vmap(agent.run, in_axes=(0, None)), static_argnums=1)(s0, 2)
    k0, k1 = s0.params["actor"]["Dense_0"]["kernel"], s1.params["actor"]["Dense_0"]["kernel"]
    np.testing.assert_array_equal(k0[0], k1[0])
    assert not np.allclose(k0[1], k1[1])
    assert m["episode_return"].shape == (2, 2)


def test_anneal_lr_steps_at_the_annealed_rate_and_keeps_the_base():
    """With ``anneal_lr`` iteration ``k`` steps at ``base * (1 - k / num_updates)``
    (the same as writing that rate into a non-annealing agent) and the state
    keeps ``base``."""
    from agents import core

    env, p = envs.make("CartPole-v1")
    tx = learned_optim.from_spec("adam")
    annealed = make_ppo(dataclasses.replace(TINY, anneal_lr=True), env, p, tx)
    plain = make_ppo(TINY, env, p, tx)
    hp, base = PPOHParams.default(), jnp.float32(1e-3)
    a = annealed.init(jax.random.key(0), hp, base)
    b = plain.init(jax.random.key(0), hp, base)
    for k in range(TINY.num_updates):
        b = core.with_learning_rate(b, base * (1.0 - jnp.float32(k) / TINY.num_updates))
        a, _ = jax.jit(annealed.update)(a)
        b, _ = jax.jit(plain.update)(b)
        assert float(core.learning_rate(a)) == float(base)
        for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.params["actor"]["Dense_0"]["kernel"],
                              plain.init(jax.random.key(0), hp, base).params["actor"]["Dense_0"]["kernel"])


def test_ppo_learns_cartpole():
    """4 vmapped seeds, 1e5 steps: random play scores ~22; PPO must be far above."""
    env, p = envs.make("CartPole-v1")
    cfg = PPOConfig(total_timesteps=100_000, anneal_lr=True)
    agent = make_ppo(cfg, env, p, learned_optim.from_spec("adam:lr=2.5e-4"))
    hp = jax.tree.map(lambda x: jnp.broadcast_to(x, (4,)), PPOHParams.default())
    _, m = jax.jit(jax.vmap(agent.train, in_axes=(0, 0, None)))(jax.random.split(jax.random.key(0), 4), hp, 2.5e-4)
    fr = final_return(m)
    assert fr.shape == (4,)
    assert fr.mean() > 150, fr


def test_xla_flag_set_and_user_flag_respected():
    code = "import os, envs; print(os.environ.get('XLA_FLAGS', ''))"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "--xla_cpu_enable_concurrency_optimized_scheduler=false" in out.stdout
    env["XLA_FLAGS"] = "--xla_cpu_enable_concurrency_optimized_scheduler=true --xla_dump_to=/dev/null"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == env["XLA_FLAGS"]


def test_one_blas_thread_by_default_and_user_setting_respected():
    code = "import os, envs; print(os.environ.get('OPENBLAS_NUM_THREADS'))"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "1", out.stderr[-2000:]
    env["OPENBLAS_NUM_THREADS"] = "3"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "3", out.stderr[-2000:]


def test_vmapped_population_does_not_deadlock_on_cpu():
    """Regression for the jaxlib CPU deadlock (DESIGN.md): a fresh process
    inits and trains a vmapped population of 4 with orthogonal init; it must
    finish well inside the timeout."""
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, envs, learned_optim
        from agents.ppo import PPOConfig, PPOHParams, make_ppo
        env, p = envs.make("Breakout-MinAtar")
        cfg = PPOConfig(num_envs=8, num_steps=16, total_timesteps=8 * 16 * 2, num_minibatches=2)
        agent = make_ppo(cfg, env, p, learned_optim.from_spec("adam"))
        hp = jax.tree.map(lambda x: jnp.broadcast_to(x, (4,)), PPOHParams.default())
        s = jax.jit(jax.vmap(agent.init))(jax.random.split(jax.random.key(0), 4), hp)
        s, m = jax.jit(jax.vmap(agent.run, in_axes=(0, None)), static_argnums=1)(s, 2)
        print("OK", m["episode_return"].shape)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OK (4, 2)" in out.stdout


def test_minatar_rollout_buffer_keeps_binary_observations_as_bool():
    """MinAtar's 0/1 maps are stored as bool (lossless, 4x less memory traffic
    when minibatches are shuffled); the networks still see the same floats."""
    env, p = envs.make("Breakout-MinAtar")
    assert env.binary_observations and not getattr(envs.make("CartPole-v1")[0], "binary_observations")
    cfg = PPOConfig(num_envs=2, num_steps=8, total_timesteps=2 * 8 * 2, num_minibatches=2)
    agent = make_ppo(cfg, env, p, learned_optim.from_spec("adam"))
    state = agent.init(jax.random.key(0), PPOHParams.default())
    _, traj = jax.jit(agent.rollout)(state)
    assert traj["obs"].dtype == jnp.bool_
    first = jax.jit(env.reset)(jax.random.key(1), p)[0]
    assert first.dtype == jnp.float32 and set(np.unique(np.asarray(first))) <= {0.0, 1.0}
