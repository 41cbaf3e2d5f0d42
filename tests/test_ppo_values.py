"""PPO's numbers, hand-computed, through the path users run.

A 3-step rollout of 2 envs of a tiny deterministic env goes through the real
agent (``make_ppo`` -> ``rollout`` and ``update``) with a critic whose values we
set by hand, and the agent's trajectory, value loss and gradients are compared
with a numpy transcription of the references:

* purejaxrl ``ppo.py`` ``_calculate_gae``::

      delta = reward + GAMMA * next_value * (1 - done) - value
      gae   = delta + GAMMA * GAE_LAMBDA * (1 - done) * gae
      targets = advantages + values

  and ``_loss_fn``: ``gae = (gae - gae.mean()) / (gae.std() + 1e-8)`` per
  minibatch, ``loss_actor = -min(ratio * gae, clip(ratio) * gae).mean()``,
  ``value_loss = 0.5 * max((v - targets)^2, (v_clipped - targets)^2).mean()``.
* our documented difference (docs/fidelity.md, "Time limits are
  bootstrapped"): where an episode is truncated, not terminated,
  ``gamma * V(final observation)`` is added to that step's reward.

The agent's advantages are internal to ``update``, so they are observed
through the smallest seams ``update`` really calls: its metrics (the loss of
the one minibatch, at the rollout's own parameters) and the gradients it hands
the optimizer (a recording optax transform). With 1 epoch and 1 minibatch the
loss is evaluated at the rollout parameters, so the ratio is 1 and
``value_loss = 0.5 * mean(A^2)``, ``d value_loss / d V_i = -A_i / N`` and the
policy gradient is ``-mean(Ahat_i * grad log pi(a_i))``.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

import envs
from agents import core
from envs.core import Env
from envs.spaces import Box, Discrete
from agents.ppo import PPOConfig, PPOHParams, make_ppo

# A tiny env --------------------------------------------------------------------------


@struct.dataclass
class ToyState:
    t: jax.Array  # steps taken in this episode
    kind: jax.Array  # 0: terminates after 2 steps; 1: runs into the 2-step time limit


class TwoStepEnv(Env):
    """Deterministic: obs ``[1, t, kind * t]`` (kind-independent at reset);
    reward ``1 + t`` (kind 0) or ``0.5 - 1.5 t`` (kind 1), whatever the action;
    kind 0 *terminates* on its 2nd step, kind 1 is *truncated* there (time limit
    ``params`` = 2). ``reset`` gives kind 0; tests set kind 1 in the state."""

    name = "two-step"

    @property
    def default_params(self):
        return jnp.int32(2)

    @staticmethod
    def obs(t, kind):
        t, kind = jnp.asarray(t, jnp.float32), jnp.asarray(kind, jnp.float32)
        return jnp.stack([jnp.ones_like(t), t, kind * t], -1)

    def reset(self, key, params):
        s = ToyState(jnp.int32(0), jnp.int32(0))
        return self.obs(s.t, s.kind), s

    def step(self, key, state, action, params):
        reward = jnp.where(state.kind == 0, 1.0 + state.t, 0.5 - 1.5 * state.t).astype(jnp.float32)
        s = ToyState(state.t + 1, state.kind)
        terminated = (s.kind == 0) & (s.t >= 2)
        truncated = (s.t >= params) & ~terminated
        return self.obs(s.t, s.kind), s, reward, terminated, truncated, {}

    def observation_space(self, params):
        return Box(-10.0, 10.0, (3,))

    def action_space(self, params):
        return Discrete(2)


# The critic is linear (hidden_sizes=()) with weights set by hand: V(o) = W_V . o + B_V.
W_V = np.array([0.2, -0.7, 1.1])
B_V = 0.1


def v_ref(obs):
    return np.asarray(obs, np.float64) @ W_V + B_V


# What the trajectory must be, by hand: [step, env]; env 0 is kind 0, env 1 kind 1.
# env 0: obs t=0, t=1, then (terminated; auto-reset) t=0; last obs t=1.
# env 1: obs t=0, (1, kind 1), then (truncated at the limit; auto-reset to kind 0) t=0.
OBS = np.array([[[1, 0, 0], [1, 0, 0]],
                [[1, 1, 0], [1, 1, 1]],
                [[1, 0, 0], [1, 0, 0]]], np.float64)
LAST_OBS = np.array([[1, 1, 0], [1, 1, 0]], np.float64)
RAW_REWARD = np.array([[1.0, 0.5], [2.0, -1.0], [1.0, 1.0]])
TERMINATED = np.array([[False, False], [True, False], [False, False]])
TRUNCATED = np.array([[False, False], [False, True], [False, False]])
FINAL_OBS_1 = np.array([[1, 2, 0], [1, 2, 2]], np.float64)  # the pre-reset obs at step 1


def reference_rewards(gamma, bootstrap="truncated"):
    """Rewards with the time-limit bootstrap: ``+ gamma * V(final obs)`` where
    ``bootstrap`` says ("truncated": ours; "none"; "done": on terminations too)."""
    r = RAW_REWARD.copy()
    where = {"truncated": TRUNCATED, "none": np.zeros_like(TRUNCATED), "done": TRUNCATED | TERMINATED}[bootstrap]
    r[1] += np.where(where[1], gamma * v_ref(FINAL_OBS_1), 0.0)
    return r


def reference_gae(rewards, values, dones, last_value, gamma, lam):
    """purejaxrl ppo.py ``_calculate_gae``, transcribed (reverse loop)."""
    gae, next_value = np.zeros_like(last_value), last_value
    adv = np.zeros_like(values)
    for t in reversed(range(len(rewards))):
        done = dones[t].astype(np.float64)
        delta = rewards[t] + gamma * next_value * (1 - done) - values[t]
        gae = delta + gamma * lam * (1 - done) * gae
        adv[t], next_value = gae, values[t]
    return adv, adv + values


def reference_advantages(gamma, lam, bootstrap="truncated"):
    return reference_gae(reference_rewards(gamma, bootstrap), v_ref(OBS), TERMINATED | TRUNCATED,
                         v_ref(LAST_OBS), gamma, lam)


# The agent ------------------------------------------------------------------------------


class Recorded(NamedTuple):
    grads: dict


def recording_sgd_zero():
    """An optax transform that keeps the gradients it is given and steps by 0."""

    def init(params):
        return Recorded(jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None, **extra):
        return jax.tree.map(jnp.zeros_like, updates), Recorded(updates)

    return optax.GradientTransformationExtraArgs(init, update)


def config(**overrides):
    base = dict(num_envs=2, num_steps=3, total_timesteps=6, update_epochs=1, num_minibatches=1,
                hidden_sizes=(), max_grad_norm=0.0)
    return PPOConfig(**{**base, **overrides})


@functools.lru_cache(maxsize=None)
def built(normalize_advantages=True, normalize_obs=False):
    """(agent, jitted init with kinds [0, 1] and the hand-set critic, jitted rollout, jitted update)."""
    env = envs.EpisodeStats(envs.AutoReset(TwoStepEnv()))
    cfg = config(normalize_advantages=normalize_advantages, normalize_obs=normalize_obs)
    agent = make_ppo(cfg, env, env.default_params, recording_sgd_zero())

    def with_kinds(es):  # EpisodeStatsState(ToyState), inside NormalizeObservationState with normalize_obs
        if isinstance(es, ToyState):
            return es.replace(kind=jnp.array([0, 1], jnp.int32))
        return es.replace(env_state=with_kinds(es.env_state))

    def init(key, hp):
        s = agent.init(key, hp)
        critic = {"Dense_0": {"kernel": jnp.asarray(W_V, jnp.float32)[:, None],
                              "bias": jnp.full((1,), B_V, jnp.float32)}}
        return s.replace(env_state=with_kinds(s.env_state), params={**s.params, "critic": critic})

    return agent, jax.jit(init), jax.jit(agent.rollout), jax.jit(agent.update)


def hparams(gamma, lam):
    # ent_coef 0: the policy gradient is the surrogate's alone.
    return PPOHParams.default(gamma=gamma, gae_lambda=lam, ent_coef=0.0, vf_coef=0.5)


def run_update(gamma, lam, **flags):
    _, init, rollout, update = built(**flags)
    state = init(jax.random.key(0), hparams(gamma, lam))
    _, traj = rollout(state)
    new_state, metrics = update(state)
    return state, traj, metrics, new_state.opt_state.grads


def critic_grads_ref(adv, vf_coef=0.5):
    """d(vf_coef * value_loss)/d critic at V = old V: ``-vf_coef * mean(A_i * o_i)``."""
    o, a = OBS.reshape(-1, 3), adv.reshape(-1)
    return -vf_coef * (a[:, None] * o).mean(0), -vf_coef * a.mean()


def assert_targets_are(adv, metrics, grads):
    np.testing.assert_allclose(metrics["value_loss"], 0.5 * np.mean(adv**2), rtol=1e-5, atol=1e-6)
    k, b = critic_grads_ref(adv)
    np.testing.assert_allclose(grads["critic"]["Dense_0"]["kernel"][:, 0], k, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["critic"]["Dense_0"]["bias"][0], b, rtol=1e-5, atol=1e-6)


# Tests ------------------------------------------------------------------------------------


def test_rollout_trajectory_and_time_limit_bootstrap_by_hand():
    """The agent's own rollout: obs, V, done and reward; ``gamma * V(final obs)``
    is added at env 1's time limit and not at env 0's termination (nor from the
    post-reset observation)."""
    gamma = 0.8
    _, init, rollout, _ = built()
    state = init(jax.random.key(0), hparams(gamma, 0.5))
    new_state, traj = rollout(state)
    np.testing.assert_allclose(traj["obs"], OBS)
    np.testing.assert_allclose(new_state.obs, LAST_OBS)
    np.testing.assert_allclose(traj["value"], v_ref(OBS), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(traj["done"], TERMINATED | TRUNCATED)
    boot = np.zeros((3, 2))
    boot[1, 1] = v_ref(FINAL_OBS_1[1])  # 1.1: V([1, 2, 2]); V([1, 2, 0]) = -1.1 must not appear
    np.testing.assert_allclose(traj["bootstrap_value"], boot, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(traj["reward"], reference_rewards(gamma), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(traj["reward"][1], [2.0, -1.0 + 0.8 * 1.1], atol=1e-6)  # the same, spelt out


@pytest.mark.parametrize("gamma", [0.8, 0.5])
def test_update_targets_use_gamma(gamma):
    """value loss and critic gradient = those of purejaxrl's GAE targets at this gamma."""
    lam = 0.5
    adv, _ = reference_advantages(gamma, lam)
    assert not np.allclose(adv, reference_advantages(0.99, lam)[0], atol=1e-2)  # the check can tell
    _, _, metrics, grads = run_update(gamma, lam)
    assert_targets_are(adv, metrics, grads)


@pytest.mark.parametrize("lam", [0.5, 0.0, 1.0])
def test_update_targets_use_gae_lambda(lam):
    gamma = 0.8
    adv, _ = reference_advantages(gamma, lam)
    for other in {0.0, 0.5, 0.95, 1.0} - {lam}:
        assert not np.allclose(adv, reference_advantages(gamma, other)[0], atol=1e-2)
    # by hand at lam = 0.5: env 0's first advantage carries 0.8 * 0.5 of the next one
    if lam == 0.5:
        np.testing.assert_allclose(adv[:, 0], [0.38 + 0.4 * 2.4, 2.4, 0.38], rtol=1e-9)
        np.testing.assert_allclose(adv[:, 1], [0.76 + 0.4 * (-0.82), -0.82, 0.38], rtol=1e-9)
    _, _, metrics, grads = run_update(gamma, lam)
    assert_targets_are(adv, metrics, grads)


def test_update_targets_bootstrap_only_at_the_time_limit():
    gamma, lam = 0.8, 0.5
    adv, _ = reference_advantages(gamma, lam, "truncated")
    for wrong in ("none", "done"):
        assert not np.allclose(adv, reference_advantages(gamma, lam, wrong)[0], atol=1e-2)
    _, _, metrics, grads = run_update(gamma, lam)
    assert_targets_are(adv, metrics, grads)


def _policy_grads_ref(state, traj, adv_used):
    """-mean(A_i * d log pi(a_i | o_i)) for the linear softmax actor (ent_coef 0, ratio 1)."""
    w = np.asarray(state.params["actor"]["Dense_0"]["kernel"], np.float64)
    b = np.asarray(state.params["actor"]["Dense_0"]["bias"], np.float64)
    o = OBS.reshape(-1, 3)
    logits = o @ w + b
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dlogp = np.eye(2)[np.asarray(traj["action"]).reshape(-1)] - p  # d log softmax[a] / d logits
    a = adv_used.reshape(-1)
    return -np.einsum("n,ni,nj->ij", a, o, dlogp) / len(a), -(a[:, None] * dlogp).mean(0)


def _normalised(adv):
    """purejaxrl ppo.py _loss_fn: ``(gae - gae.mean()) / (gae.std() + 1e-8)``."""
    return (adv - adv.mean()) / (adv.std() + 1e-8)


def test_advantages_are_normalised_in_the_loss():
    """Default (purejaxrl): the policy gradient is that of the normalised
    advantages, not of the raw ones; at ratio 1 the policy loss is -mean(Ahat) = 0."""
    gamma, lam = 0.8, 0.5
    adv, _ = reference_advantages(gamma, lam)
    state, traj, metrics, grads = run_update(gamma, lam)
    kn, bn = _policy_grads_ref(state, traj, _normalised(adv))
    kr, br = _policy_grads_ref(state, traj, adv)
    assert np.abs(kn - kr).max() > 1e-2  # the two are far apart here
    np.testing.assert_allclose(grads["actor"]["Dense_0"]["kernel"], kn, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads["actor"]["Dense_0"]["bias"], bn, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["policy_loss"], 0.0, atol=1e-6)
    assert abs(adv.mean()) > 0.1  # so the raw advantages would give a clearly non-zero loss
    np.testing.assert_allclose(metrics["approx_kl"], 0.0, atol=1e-6)  # the ratio really was 1


def test_advantages_raw_when_normalisation_is_off():
    gamma, lam = 0.8, 0.5
    adv, _ = reference_advantages(gamma, lam)
    state, traj, metrics, grads = run_update(gamma, lam, normalize_advantages=False)
    kr, br = _policy_grads_ref(state, traj, adv)
    np.testing.assert_allclose(grads["actor"]["Dense_0"]["kernel"], kr, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads["actor"]["Dense_0"]["bias"], br, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["policy_loss"], -adv.mean(), rtol=1e-5)
    assert_targets_are(adv, metrics, grads)  # value targets are never normalised


def test_normalize_obs_bootstraps_from_the_normalised_final_obs():
    """With ``normalize_obs`` the critic sees normalised observations, so
    V(final obs) must be computed on the final obs normalised with the same
    running statistics (purejaxrl NormalizeVecObservation, our clip at 10)."""
    gamma = 0.8
    _, init, rollout, _ = built(normalize_obs=True)
    state = init(jax.random.key(0), hparams(gamma, 0.5))
    _, traj = rollout(state)

    mean, var, count = np.zeros(3), np.ones(3), 1e-4

    def update(batch):
        nonlocal mean, var, count
        b_mean, b_var, b_count = batch.mean(0), batch.var(0), batch.shape[0]
        delta, tot = b_mean - mean, count + b_count
        mean = mean + delta * b_count / tot
        var = (var * count + b_var * b_count + delta**2 * count * b_count / tot) / tot
        count = tot

    def normalize(x):
        return np.clip((x - mean) / np.sqrt(var + 1e-8), -10.0, 10.0)

    # The normalised obs the agent saw at each step: reset obs, then each step's returned obs.
    seen = []
    update(OBS[0])
    seen.append(normalize(OBS[0]))
    for t in range(3):
        update(OBS[t + 1] if t < 2 else LAST_OBS)
        if t == 1:
            final_norm = normalize(FINAL_OBS_1)
        if t < 2:
            seen.append(normalize(OBS[t + 1]))
    np.testing.assert_allclose(traj["obs"], np.stack(seen), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(traj["value"], v_ref(np.stack(seen)), rtol=1e-4, atol=1e-4)
    boot = np.zeros((3, 2))
    boot[1, 1] = v_ref(final_norm[1])
    assert abs(boot[1, 1] - v_ref(FINAL_OBS_1[1])) > 0.5  # raw final obs would give another value
    np.testing.assert_allclose(traj["bootstrap_value"], boot, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(traj["reward"], RAW_REWARD + gamma * boot, rtol=1e-4, atol=1e-4)


# Continuous actions: it must learn ----------------------------------------------------------


class TargetBandit(Env):
    """One-step episodes; obs ``[1]``; action in [-2, 2]; reward ``-(a - 0.7)^2``.
    The optimal mean action is 0.7 (the actor starts at mean ~0, std 1)."""

    name = "target-bandit"
    target = 0.7

    @property
    def default_params(self):
        return jnp.int32(0)

    def reset(self, key, params):
        return jnp.ones((1,), jnp.float32), jnp.int32(0)

    def step(self, key, state, action, params):
        reward = -jnp.sum((action - self.target) ** 2)
        return jnp.ones((1,), jnp.float32), state, reward, jnp.bool_(True), jnp.bool_(False), {}

    def observation_space(self, params):
        return Box(-1.0, 1.0, (1,))

    def action_space(self, params):
        return Box(-2.0, 2.0, (1,))


def test_continuous_ppo_moves_its_mean_action_to_the_optimum():
    """A broken Gaussian actor (sampling, log-prob or the mean's gradient) does
    not get from 0 to 0.7 in 40 updates of 64 steps."""
    env = envs.EpisodeStats(envs.AutoReset(envs.ClipAction(TargetBandit())))
    cfg = PPOConfig(num_envs=16, num_steps=4, total_timesteps=16 * 4 * 40, update_epochs=4, num_minibatches=2,
                    hidden_sizes=(16,))
    agent = make_ppo(cfg, env, env.default_params, optax.adam(1e-2))
    state, metrics = jax.jit(agent.train)(jax.random.key(0), PPOHParams.default(ent_coef=0.0))
    ac = core.make_actor_critic(cfg, env, env.default_params)
    mean, log_std = ac.actor.apply({"params": state.params["actor"]}, jnp.ones((1, 1)))
    assert abs(float(mean[0, 0]) - TargetBandit.target) < 0.1, (mean, log_std)
    # expected return -((mu - 0.7)^2 + sigma^2): -1.49 at the start (mu 0, sigma 1);
    # the mean and the std must both have been learnt to come near 0
    ret = np.asarray(metrics["episode_return"])
    assert ret[-5:].mean() > -0.1, ret


def test_binary_observations_stored_as_float_when_normalised():
    """MinAtar observations are stored as bool to save memory, but normalised
    ones are not binary: storing them as bool trains on other inputs than the
    policy acted on."""
    env, params = envs.make("Breakout-MinAtar")
    for normalize, dtype in ((False, jnp.bool_), (True, jnp.float32)):
        cfg = config(num_envs=2, num_steps=2, total_timesteps=4, normalize_obs=normalize, hidden_sizes=(8,))
        agent = make_ppo(cfg, env, params, optax.adam(1e-3))
        state = agent.init(jax.random.key(0), PPOHParams.default())
        _, traj = jax.jit(agent.rollout)(state)
        assert traj["obs"].dtype == dtype, (normalize, traj["obs"].dtype)
