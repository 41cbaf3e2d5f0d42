"""A2C (synchronous advantage actor-critic), population-vmappable like PPO.

One update = an ``num_steps``-step rollout of ``num_envs`` envs (``lax.scan``),
GAE advantages, then ONE gradient step on ::

    loss = -mean(logp(a) * adv) + vf_coef * 0.5 * mean((V - target)^2) - ent_coef * mean(H)

Static settings live in the frozen ``A2CConfig``; the numbers a population may
vary are arrays in ``A2CHParams``. The optimizer is injected and called with
the extra arguments of ``learned_optim.context`` (``train_fraction``,
``batch_fraction``, ``key``); ``hparams.lr`` is written into its injected
``learning_rate`` when it has one.

For meta-gradients the update is also exposed as pure pieces that take the
optimizer as an argument (``update_with``), so a learned optimizer built from
traced meta-parameters can be differentiated through::

    state, traj = agent.rollout(state)                       # no gradient through sampling
    loss, aux = agent.loss(params, traj, last_obs, hparams)  # differentiable in params
    params, opt_state = agent.update_with(params, opt_state, traj, last_obs, hparams, tx, step)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from agents import losses, networks
from agents.hparams import with_defaults
from envs.spaces import Box, Discrete
from envs.wrappers import VecEnv
from learned_optim.context import get_hyperparam, required_stats, set_hyperparam


@dataclasses.dataclass(frozen=True)
class A2CConfig:
    """Static A2C settings (shapes and loop lengths)."""

    num_envs: int = 16
    num_steps: int = 20
    total_timesteps: int = 200_000
    hidden_sizes: Tuple[int, ...] = (64, 64)
    activation: str = "relu"
    max_grad_norm: float = 0.0  # 0 = no global-norm clipping in front of the optimizer
    normalize_advantages: bool = False

    def __post_init__(self):
        for name in ("num_envs", "num_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"A2CConfig.{name} must be a positive integer, got {v!r}")
        if not (isinstance(self.total_timesteps, (int, float)) and self.total_timesteps >= self.batch_size):
            raise ValueError(
                f"A2CConfig.total_timesteps={self.total_timesteps!r} must be at least one update "
                f"(num_envs * num_steps = {self.batch_size})"
            )
        if self.activation not in networks.ACTIVATIONS:
            raise ValueError(f"A2CConfig.activation={self.activation!r}; allowed: {sorted(networks.ACTIVATIONS)}")
        if self.max_grad_norm < 0:
            raise ValueError(f"A2CConfig.max_grad_norm must be >= 0, got {self.max_grad_norm!r}")
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return int(self.total_timesteps) // self.batch_size


class A2CHParams(NamedTuple):
    """Per-member hyperparameters (float32 scalars, or ``[P]`` for a population)."""

    lr: jax.Array
    ent_coef: jax.Array
    gamma: jax.Array
    gae_lambda: jax.Array
    vf_coef: jax.Array

    @classmethod
    def default(cls, **overrides) -> "A2CHParams":
        # Optim4RL's gridworld A2C: discount 0.995, GAE 0.95, entropy 0.01, critic 0.5.
        values = dict(lr=1e-3, ent_coef=0.01, gamma=0.995, gae_lambda=0.95, vf_coef=0.5)
        return with_defaults(cls, values, overrides, "A2C")


@struct.dataclass
class A2CState:
    params: Any  # {"actor": ..., "critic": ...}
    opt_state: Any
    env_state: Any
    obs: jax.Array  # [num_envs, *obs_shape]
    key: jax.Array
    hparams: A2CHParams
    update_step: jax.Array  # int32
    last_return: jax.Array  # float32


class A2CAgent(NamedTuple):
    config: A2CConfig
    init: Callable
    update: Callable
    run: Callable
    train: Callable
    tx: optax.GradientTransformationExtraArgs
    stats_needed: frozenset
    uses_lr: bool
    rollout: Callable
    loss: Callable
    update_with: Callable
    init_params: Callable
    wrap_tx: Callable  # tx -> the chain actually applied (global-norm clip in front when configured)
    reset_env: Callable  # key -> (obs, env_state)


def make_a2c(config: A2CConfig, env, env_params, tx: optax.GradientTransformation) -> A2CAgent:
    """Builds the A2C agent for ``env`` (from ``envs.make``) and optimizer ``tx``."""
    vec_env = VecEnv(env, config.num_envs)
    action_space = env.action_space(env_params)
    obs_shape = tuple(env.observation_space(env_params).shape)
    discrete = isinstance(action_space, Discrete)
    if not discrete and not isinstance(action_space, Box):
        raise ValueError(f"unsupported action space {action_space!r}")
    act_dim = action_space.n if discrete else int(action_space.shape[0])
    actor = networks.MLP(config.hidden_sizes, act_dim, config.activation, out_scale=0.01,
                         log_std_dim=0 if discrete else act_dim)
    critic = networks.MLP(config.hidden_sizes, 1, config.activation, out_scale=1.0)

    def wrap_tx(t):
        if config.max_grad_norm > 0:
            return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), t)
        return t

    full_tx = wrap_tx(tx)

    def flat(obs):
        return obs.reshape((obs.shape[0], -1)).astype(jnp.float32)

    def dist_fns(actor_out):
        if discrete:
            return (lambda k: networks.categorical_sample(k, actor_out),
                    lambda a: networks.categorical_log_prob(actor_out, a),
                    lambda: networks.categorical_entropy(actor_out))
        mean, log_std = actor_out
        return (lambda k: networks.gaussian_sample(k, mean, log_std),
                lambda a: networks.gaussian_log_prob(mean, log_std, a),
                lambda: networks.gaussian_entropy(mean, log_std))

    def policy(actor_params, obs):
        return actor.apply({"params": actor_params}, flat(obs))

    def value_fn(critic_params, obs):
        return critic.apply({"params": critic_params}, flat(obs))[..., 0]

    def init_params(key):
        k_a, k_c = jax.random.split(key)
        dummy = jnp.zeros((1, math.prod(obs_shape)), jnp.float32)
        return {"actor": actor.init(k_a, dummy)["params"], "critic": critic.init(k_c, dummy)["params"]}

    params_shape = jax.eval_shape(init_params, jax.random.key(0))
    stats_needed = required_stats(full_tx, params_shape)
    if stats_needed:
        raise ValueError(f"A2C does not compute layer statistics; the optimizer asks for {sorted(stats_needed)}")
    injected_lr = get_hyperparam(jax.eval_shape(full_tx.init, params_shape), "learning_rate")

    def reset_env(key):
        return vec_env.reset(key, env_params)

    def init(key, hparams: A2CHParams) -> A2CState:
        k_params, k_env, k_state = jax.random.split(key, 3)
        params = init_params(k_params)
        obs, env_state = reset_env(k_env)
        return A2CState(params=params, opt_state=full_tx.init(params), env_state=env_state, obs=obs,
                        key=k_state, hparams=jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), hparams),
                        update_step=jnp.zeros((), jnp.int32), last_return=jnp.zeros((), jnp.float32))

    def rollout(state: A2CState):
        """``num_steps`` steps of every env with ``state.params``. Returns the new
        state and the trajectory ``[num_steps, num_envs, ...]`` (stop-gradient:
        the loss recomputes log-probs and values from params). Truncations are
        bootstrapped by folding ``gamma * V(final obs)`` into the reward."""
        params = jax.lax.stop_gradient(state.params)
        gamma = state.hparams.gamma

        def env_step(carry, _):
            env_state, obs, key = carry
            key, k_act, k_env = jax.random.split(key, 3)
            sample, _, _ = dist_fns(policy(params["actor"], obs))
            action = sample(k_act)
            next_obs, env_state, reward, terminated, truncated, info = vec_env.step(k_env, env_state, action, env_params)
            boot = jnp.where(truncated, value_fn(params["critic"], info["final_obs"]), 0.0)
            tr = dict(obs=obs, action=action, reward=reward + gamma * boot,
                      done=jnp.logical_or(terminated, truncated),
                      episode_return=info["returned_episode_return"], episode_done=info["returned_episode"])
            return (env_state, next_obs, key), tr

        (env_state, obs, key), traj = jax.lax.scan(env_step, (state.env_state, state.obs, state.key), None,
                                                   config.num_steps)
        return state.replace(env_state=env_state, obs=obs, key=key), traj

    def loss(params, traj, last_obs, hp: A2CHParams):
        """A2C loss on a trajectory ``[T, B]``; differentiable in ``params``
        (advantages and targets are computed from the current critic and
        stopped). Returns ``(loss, aux)``."""
        T, B = traj["action"].shape[:2]
        obs = traj["obs"].reshape((T * B,) + traj["obs"].shape[2:])
        actor_out = policy(params["actor"], obs)
        _, log_prob, entropy = dist_fns(actor_out)
        logp = log_prob(traj["action"].reshape((T * B,) + traj["action"].shape[2:])).reshape(T, B)
        value = value_fn(params["critic"], obs).reshape(T, B)
        last_value = value_fn(params["critic"], last_obs)
        adv, targets = losses.gae(traj["reward"], jax.lax.stop_gradient(value), traj["done"],
                                  jax.lax.stop_gradient(last_value), hp.gamma, hp.gae_lambda)
        adv = jax.lax.stop_gradient(adv)
        targets = jax.lax.stop_gradient(targets)
        if config.normalize_advantages:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        pg_loss = -jnp.mean(logp * adv)
        v_loss = 0.5 * jnp.mean((value - targets) ** 2)
        ent = jnp.mean(entropy())
        total = pg_loss + hp.vf_coef * v_loss - hp.ent_coef * ent
        return total, dict(pg_loss=pg_loss, v_loss=v_loss, entropy=ent)

    grad_fn = jax.grad(loss, has_aux=True)

    def update_with(params, opt_state, traj, last_obs, hp: A2CHParams, tx_applied, update_step, key):
        """One gradient step with ``tx_applied`` (already wrapped, e.g. ``wrap_tx(tx)``).
        Pure in all arguments, so it can be differentiated through."""
        grads, aux = grad_fn(params, traj, last_obs, hp)
        train_fraction = update_step.astype(jnp.float32) / max(config.num_updates, 1)
        opt_state = set_hyperparam(opt_state, "learning_rate", hp.lr)
        upd, opt_state = tx_applied.update(grads, opt_state, params, train_fraction=train_fraction,
                                           batch_fraction=jnp.zeros((), jnp.float32), key=key)
        return optax.apply_updates(params, upd), opt_state, aux

    def episode_stats(traj, prev):
        n_done = traj["episode_done"].sum()
        mean_ret = jnp.sum(traj["episode_return"] * traj["episode_done"]) / jnp.maximum(n_done, 1)
        return jnp.where(n_done > 0, mean_ret, prev), n_done.astype(jnp.int32)

    def update(state: A2CState):
        state, traj = rollout(state)
        key, k_opt = jax.random.split(state.key)
        params, opt_state, aux = update_with(state.params, state.opt_state, traj, state.obs, state.hparams,
                                             full_tx, state.update_step, k_opt)
        last_return, n_done = episode_stats(traj, state.last_return)
        metrics = dict(aux)
        metrics.update(episode_return=last_return, episodes=n_done,
                       finite=jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)])))
        return state.replace(params=params, opt_state=opt_state, key=key, update_step=state.update_step + 1,
                             last_return=last_return), metrics

    def run(state: A2CState, num_updates: int):
        return jax.lax.scan(lambda s, _: update(s), state, None, num_updates)

    def train(key, hparams: A2CHParams):
        return run(init(key, hparams), config.num_updates)

    return A2CAgent(config, init, update, run, train, full_tx, stats_needed, injected_lr is not None,
                    rollout, loss, update_with, init_params, wrap_tx, reset_env)
