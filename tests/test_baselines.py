"""Baselines as the references run them: each agent's optimizer settings
(PPO's Adam eps 1e-5 as purejaxrl/CleanRL, TD3's as the TD3 authors' PyTorch
Adam, A2C's as Optim4RL's optax defaults and gridworld gradient clip), and
purejaxrl's reward normalisation on Brax. Expected values are transcribed
from the references' formulas, not read from the code under test."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import envs
import learned_optim
from agents import core
from agents.ppo import PPOHParams, make_ppo
from agents.presets import OPTIMIZER_DEFAULTS, make_optimizer, optimizer_spec, resolve_config
from learned_optim.context import get_hyperparam
from learned_optim.spec import with_defaults


@pytest.mark.parametrize("spec, expected", [
    ("adam", "adam:eps=1e-05"),
    ("adam:lr=3e-3", "adam:lr=3e-3,eps=1e-05"),
    (" ADAM: lr=1e-3 ", "adam:lr=1e-3,eps=1e-05"),
    ("adam:eps=1e-8", "adam:eps=1e-8"),  # the spec's own setting wins
    ("kfac", "kfac"),
    ("open:x.npy", "open:x.npy"),  # a path argument is left alone
])
def test_with_defaults(spec, expected):
    assert with_defaults(spec, {"adam": {"eps": 1e-5}}) == expected


def _one_step(tx, g, lr):
    """The update of one step of ``tx`` at learning rate ``lr`` on gradient ``g``."""
    params = {"w": jnp.zeros_like(g)}
    state = tx.init(params)
    state = learned_optim.set_hyperparam(state, "learning_rate", jnp.float32(lr))
    updates, _ = tx.update({"w": g}, state, params)
    return np.asarray(updates["w"])


def _adam_first_step(g, lr, eps, b1=0.9, b2=0.999):
    """Kingma & Ba's Adam, step 1: m = (1-b1) g, v = (1-b2) g^2, bias-corrected."""
    m_hat = (1 - b1) * g / (1 - b1)
    v_hat = (1 - b2) * g**2 / (1 - b2)
    return -lr * m_hat / (np.sqrt(v_hat) + eps)


def test_ppo_adam_has_eps_1e5_td3_keeps_1e8():
    # A gradient of 1e-6 tells the two epsilons apart by a factor of ~10.
    g = np.array([1e-6, -3e-6, 2e-4], np.float32)
    ppo = _one_step(make_optimizer("adam", "ppo"), jnp.asarray(g), 1e-3)
    td3 = _one_step(make_optimizer("adam", "td3"), jnp.asarray(g), 1e-3)
    plain = _one_step(learned_optim.from_spec("adam"), jnp.asarray(g), 1e-3)  # optax's default
    np.testing.assert_allclose(ppo, _adam_first_step(g, 1e-3, 1e-5), rtol=1e-4)
    np.testing.assert_allclose(td3, _adam_first_step(g, 1e-3, 1e-8), rtol=1e-4)
    np.testing.assert_allclose(plain, td3, rtol=1e-6)
    assert abs(ppo[0]) < 0.2 * abs(td3[0])
    # The spec's own eps wins over the agent's default.
    mine = _one_step(make_optimizer("adam:eps=1e-8", "ppo"), jnp.asarray(g), 1e-3)
    np.testing.assert_allclose(mine, td3, rtol=1e-6)


def test_a2c_rmsprop_as_optim4rl_builds_it():
    """Optim4RL builds optax.rmsprop(learning_rate): decay 0.9, eps 1e-8 inside the root."""
    g = np.array([1e-3, -2.0, 5e-5], np.float32)
    got = _one_step(make_optimizer("rmsprop", "a2c"), jnp.asarray(g), 1e-2)
    nu = (1 - 0.9) * g**2
    np.testing.assert_allclose(got, -1e-2 * g / np.sqrt(nu + 1e-8), rtol=1e-4)
    assert optimizer_spec("rmsprop:decay=0.99", "a2c") == "rmsprop:decay=0.99,eps=1e-08"


def test_every_agent_has_defaults_and_unknown_agent_is_an_error():
    assert set(OPTIMIZER_DEFAULTS) == {"ppo", "td3", "a2c"}
    with pytest.raises(ValueError, match="unknown agent"):
        optimizer_spec("adam", "dqn")


def test_ppo_agent_opt_state_holds_the_reference_eps():
    """What the scripts build (``make_optimizer``) reaches the agent's state."""
    env, params = envs.make("CartPole-v1")
    cfg, hp, lr = resolve_config("CartPole-v1", num_envs=2, num_steps=8, total_timesteps=16, num_minibatches=1)
    agent = make_ppo(cfg, env, params, make_optimizer("adam", "ppo"))
    state = agent.init(jax.random.key(0), PPOHParams.default(**hp), lr)
    assert float(get_hyperparam(state.opt_state, "eps")) == pytest.approx(1e-5)


def test_a2c_gridworld_clips_each_gradient_element():
    assert resolve_config("gridworld/small_dense_short", agent="a2c").config.grad_clip == 1.0
    assert resolve_config("Catch-bsuite", agent="a2c").config.grad_clip == 0.0
    tx = core.with_clipping(optax.sgd(1.0), 0.0, 1.0)
    g = jnp.array([5.0, -0.5, -3.0])
    upd, _ = tx.update(g, tx.init(g))
    np.testing.assert_allclose(upd, [-1.0, 0.5, 1.0])
    # with a global-norm clip too: elementwise first, then the norm of the clipped vector
    tx = core.with_clipping(optax.sgd(1.0), 0.5, 1.0)
    upd, _ = tx.update(g, tx.init(g))
    clipped = np.array([1.0, -0.5, -1.0])
    np.testing.assert_allclose(upd, -clipped * 0.5 / np.linalg.norm(clipped), rtol=1e-6)


def test_normalize_reward_matches_purejaxrl_formula():
    """purejaxrl wrappers.py NormalizeVecReward: G = G * gamma * (1 - done) + r,
    running (Chan) variance of the batch of G, r / sqrt(var + 1e-8)."""
    env, params = envs.make("CartPole-v1")
    n, steps, gamma = 4, 60, 0.9
    raw = envs.VecEnv(env, n)
    norm = envs.NormalizeReward(envs.VecEnv(env, n), gamma)
    _, s_raw = raw.reset(jax.random.key(0), params)
    _, s_norm = norm.reset(jax.random.key(0), params)
    mean, var, count, G = 0.0, 1.0, 1e-4, np.zeros(n)
    rng = np.random.default_rng(0)
    dones = 0
    for t in range(steps):
        a = jnp.asarray(rng.integers(0, 2, n), jnp.int32)
        k = jax.random.key(t + 1)
        _, s_raw, r, term, trunc, _ = raw.step(k, s_raw, a, params)
        _, s_norm, r_norm, *_ = norm.step(k, s_norm, a, params)
        done = np.asarray(term | trunc, np.float64)
        dones += int(done.sum())
        G = G * gamma * (1 - done) + np.asarray(r, np.float64)
        b_mean, b_var, b_count = G.mean(), G.var(), n
        delta, tot = b_mean - mean, count + b_count
        mean, var = mean + delta * b_count / tot, (var * count + b_var * b_count + delta**2 * count * b_count / tot) / tot
        count = tot
        np.testing.assert_allclose(r_norm, np.asarray(r) / np.sqrt(var + 1e-8), rtol=1e-4)
    assert dones > 0  # episodes ended, so the (1 - done) reset was exercised


def test_brax_preset_normalises_rewards_like_purejaxrl():
    assert resolve_config("brax/ant").config.normalize_rewards
    assert not resolve_config("CartPole-v1").config.normalize_rewards
    assert not resolve_config("Breakout-MinAtar").config.normalize_rewards
    env, params = envs.make("CartPole-v1")
    cfg, hp, lr = resolve_config("CartPole-v1", num_envs=2, num_steps=8, total_timesteps=16, num_minibatches=1,
                                 normalize_rewards=True)
    agent = make_ppo(cfg, env, params, make_optimizer("adam", "ppo"))
    state = agent.init(jax.random.key(0), PPOHParams.default(**hp), lr)
    assert isinstance(state.env_state, envs.wrappers.NormalizeRewardState)
    with pytest.raises(ValueError, match="reward_norm_gamma"):
        resolve_config("CartPole-v1", reward_norm_gamma=1.5)


@pytest.mark.parametrize("flags, clip", [([], 1.0), (["--grad-clip", "0"], 0.0), (["--grad-clip", "0.5"], 0.5)])
def test_meta_train_units_get_the_gridworld_clip_unless_told(flags, clip, tmp_path):
    from meta.cli import meta_train
    from meta.meta_train.plan import build

    args = meta_train.parse_args(["--method", "metagrad", "--envs", "gridworld/small_dense_short",
                                  "--out", str(tmp_path), *flags])
    assert build(*meta_train.options(args)).a2c.grad_clip == clip
    args = meta_train.parse_args(["--method", "metagrad", "--envs", "Catch-bsuite", "--out", str(tmp_path)])
    assert build(*meta_train.options(args)).a2c.grad_clip == 0.0
