"""A2C (synchronous advantage actor-critic), population-vmappable like PPO.

One update = an ``num_steps``-step rollout of ``num_envs`` envs (``lax.scan``),
GAE advantages, then ONE gradient step on ::

    loss = -mean(logp(a) * adv) + vf_coef * 0.5 * mean((V - target)^2) - ent_coef * mean(H)

Static settings live in the frozen ``A2CConfig``; the numbers a population may
vary are arrays in ``A2CHParams``. The optimizer is injected and called with
the extra arguments of ``learned_optim.context`` (``train_fraction``,
``batch_fraction``, ``key`` and, when it asks, ``layer_stats`` of the whole
rollout). The learning rate is the optimizer's injected ``learning_rate`` in
``state.opt_state`` (``init``/``train`` take it as an optional third
argument; ``agents.core.learning_rate`` reads it). The skeleton shared with
PPO and TD3 is ``agents.core``.

For meta-gradients the update is also exposed as pure pieces that take the
optimizer as an argument (``update_with``), so a learned optimizer built from
traced meta-parameters can be differentiated through::

    state, traj = agent.rollout(state)                       # no gradient through sampling
    loss, aux = agent.loss(params, traj, last_obs, hparams)  # differentiable in params
    params, opt_state = agent.update_with(params, opt_state, traj, last_obs, hparams, tx, step)
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Tuple

import jax
import jax.numpy as jnp

from agents import core, losses
from envs.wrappers import VecEnv


@dataclasses.dataclass(frozen=True)
class A2CConfig(core.OnPolicyConfig):
    """Static A2C settings (shapes and loop lengths)."""

    num_envs: int = 16
    num_steps: int = 20
    total_timesteps: int = 200_000
    hidden_sizes: Tuple[int, ...] = (64, 64)
    activation: str = "relu"
    max_grad_norm: float = 0.0  # 0 = no global-norm clipping in front of the optimizer
    grad_clip: float = 0.0  # > 0: every gradient element clipped to [-grad_clip, grad_clip] first (Optim4RL)
    normalize_advantages: bool = False
    # Rows of each rollout (num_envs * num_steps) used for curvature statistics; 0 = all.
    curvature_batch_size: int = 0
    # Truncation at the time limit bootstraps gamma * V(final obs) (default);
    # False treats it as a terminal state, as Optim4RL's A2C does (its done
    # done flag zeroes the discount at either, sail-sg/optim4rl agents/A2C.py:89,113).
    bootstrap_time_limit: bool = True


# Optim4RL's gridworld A2C: discount 0.995, GAE 0.95, entropy 0.01, critic 0.5.
A2CHParams = core.hparams_type(
    "A2CHParams", "A2C", dict(ent_coef=0.01, gamma=0.995, gae_lambda=0.95, vf_coef=0.5),
    __name__, "Per-member A2C hyperparameters (float32 scalars, or ``[P]`` for a population).")

A2CState = core.ActorCriticState


@dataclasses.dataclass(frozen=True)
class A2CAgent(core.Agent):
    """``core.Agent`` plus the pieces meta-gradient training differentiates through."""

    rollout: Callable  # state -> (state, trajectory [T, B, ...])
    loss: Callable  # (params, traj, last_obs, hparams) -> (loss, aux)
    update_with: Callable  # (params, opt_state, traj, last_obs, hparams, tx, step, key) -> (params, opt_state, aux)
    init_params: Callable  # key -> params
    wrap_tx: Callable  # tx -> the chain actually applied (global-norm clip in front when configured)
    reset_env: Callable  # key -> (obs, env_state)


def make_a2c(config: A2CConfig, env, env_params, tx) -> A2CAgent:
    """Builds the A2C agent for ``env`` (from ``envs.make``) and optax transform ``tx``."""
    vec_env = VecEnv(env, config.num_envs)
    ac = core.make_actor_critic(config, env, env_params)

    def wrap_tx(t):
        return core.with_clipping(t, config.max_grad_norm, config.grad_clip)

    full_tx = wrap_tx(tx)
    stats_needed, uses_lr = core.optimizer_needs(full_tx, jax.eval_shape(ac.init_params, jax.random.key(0)))

    def reset_env(key):
        return vec_env.reset(key, env_params)

    def init(key, hparams, learning_rate=None) -> A2CState:
        k_params, k_env, k_state = jax.random.split(key, 3)
        params = ac.init_params(k_params)
        obs, env_state = reset_env(k_env)
        state = A2CState(params=params, opt_state=full_tx.init(params), env_state=env_state, obs=obs,
                         key=k_state, hparams=core.as_float32(hparams),
                         update_step=jnp.zeros((), jnp.int32), last_return=jnp.zeros((), jnp.float32))
        return core.with_learning_rate(state, learning_rate)

    def rollout(state: A2CState):
        """``num_steps`` steps of every env with ``state.params``. Returns the new
        state and the trajectory ``[num_steps, num_envs, ...]`` (stop-gradient:
        the loss recomputes log-probs and values from params). Truncations are
        bootstrapped by folding ``gamma * V(final obs)`` into the reward
        (unless ``config.bootstrap_time_limit`` is False)."""
        params = jax.lax.stop_gradient(state.params)
        gamma = state.hparams.gamma

        def env_step(carry, _):
            env_state, obs, key = carry
            key, k_act, k_env = jax.random.split(key, 3)
            action = ac.policy(params["actor"], obs).sample(k_act)
            next_obs, env_state, reward, terminated, truncated, info = vec_env.step(k_env, env_state, action, env_params)
            boot = (jnp.where(truncated, ac.value(params["critic"], info["final_obs"]), 0.0)
                    if config.bootstrap_time_limit else jnp.zeros_like(reward))
            tr = dict(obs=obs, action=action, reward=reward + gamma * boot,
                      done=jnp.logical_or(terminated, truncated),
                      episode_return=info["returned_episode_return"], episode_done=info["returned_episode"])
            return (env_state, next_obs, key), tr

        (env_state, obs, key), traj = jax.lax.scan(env_step, (state.env_state, state.obs, state.key), None,
                                                   config.num_steps)
        return state.replace(env_state=env_state, obs=obs, key=key), traj

    def flat_obs(traj):
        T, B = traj["action"].shape[:2]
        return traj["obs"].reshape((T * B,) + traj["obs"].shape[2:])

    def loss(params, traj, last_obs, hp):
        """A2C loss on a trajectory ``[T, B]``; differentiable in ``params``
        (advantages and targets are computed from the current critic and
        stopped). Returns ``(loss, aux)``."""
        T, B = traj["action"].shape[:2]
        obs = flat_obs(traj)
        dist = ac.policy(params["actor"], obs)
        logp = dist.log_prob(traj["action"].reshape((T * B,) + traj["action"].shape[2:])).reshape(T, B)
        value = ac.value(params["critic"], obs).reshape(T, B)
        last_value = ac.value(params["critic"], last_obs)
        adv, targets = losses.gae(traj["reward"], jax.lax.stop_gradient(value), traj["done"],
                                  jax.lax.stop_gradient(last_value), hp.gamma, hp.gae_lambda)
        adv = jax.lax.stop_gradient(adv)
        targets = jax.lax.stop_gradient(targets)
        if config.normalize_advantages:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        pg_loss = -jnp.mean(logp * adv)
        v_loss = 0.5 * jnp.mean((value - targets) ** 2)
        ent = jnp.mean(dist.entropy())
        total = pg_loss + hp.vf_coef * v_loss - hp.ent_coef * ent
        return total, dict(pg_loss=pg_loss, v_loss=v_loss, entropy=ent)

    grad_fn = jax.grad(loss, has_aux=True)

    def update_with(params, opt_state, traj, last_obs, hp, tx_applied, update_step, key):
        """One gradient step with ``tx_applied`` (already wrapped, e.g. ``wrap_tx(tx)``).
        Pure in all arguments, so it can be differentiated through."""
        grads, aux = grad_fn(params, traj, last_obs, hp)
        extra = dict(train_fraction=update_step.astype(jnp.float32) / max(config.num_updates, 1),
                     batch_fraction=jnp.zeros((), jnp.float32), key=key)
        if stats_needed:
            extra["key"], k_stats = jax.random.split(key)
            extra["layer_stats"] = ac.layer_stats(params, flat_obs(traj), k_stats, stats_needed,
                                                  config.curvature_batch_size)
        params, opt_state = core.optimizer_step(tx_applied, params, opt_state, grads, **extra)
        return params, opt_state, aux

    def update(state: A2CState):
        state, traj = rollout(state)
        key, k_opt = jax.random.split(state.key)
        params, opt_state, aux = update_with(state.params, state.opt_state, traj, state.obs, state.hparams,
                                             full_tx, state.update_step, k_opt)
        episodes = core.episode_metrics(traj["episode_return"], traj["episode_done"], state.last_return)
        last_return = episodes["episode_return"]
        metrics = dict(aux, **episodes, finite=core.all_finite(params))
        return state.replace(params=params, opt_state=opt_state, key=key, update_step=state.update_step + 1,
                             last_return=last_return), metrics

    run, train = core.make_run_train(init, update, config.num_updates)
    return A2CAgent(config, init, update, run, train, full_tx, stats_needed, uses_lr,
                    rollout, loss, update_with, ac.init_params, wrap_tx, reset_env)
