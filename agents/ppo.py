"""PPO for discrete and continuous actions, population-vmappable.

Shape follows purejaxrl: one PPO iteration is a rollout ``lax.scan`` over
``num_steps`` followed by ``update_epochs`` x ``num_minibatches`` gradient
steps (nested ``lax.scan``); training is a ``lax.scan`` over iterations.
Static settings live in the frozen ``PPOConfig``; the numbers a population may
vary (and PBT may change) are arrays in ``PPOHParams``. ``init`` and
``update`` are pure, so a population is ``jax.jit(jax.vmap(agent.train))``.

>>> env, env_params = envs.make("CartPole-v1")
>>> agent = make_ppo(PPOConfig(), env, env_params, learned_optim.from_spec("adam"))
>>> hp = PPOHParams.default(lr=2.5e-4)
>>> state, metrics = jax.jit(agent.train)(jax.random.key(0), hp)

The optimizer is injected: any ``optax`` transform; PPO chains
``clip_by_global_norm(max_grad_norm)`` in front of it and calls it with the
extra arguments of ``learned_optim.context`` (``train_fraction``,
``batch_fraction``, ``key`` and, when the optimizer asks, ``layer_stats``).
``hparams.lr`` is written into the optimizer's injected ``learning_rate``
(see ``learned_optim.from_spec``) before every step; optimizers without one
(e.g. OPEN) ignore it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from agents import losses, networks
from agents.hparams import with_defaults
from envs.spaces import Box, Discrete
from envs.wrappers import NormalizeObservation, VecEnv
from learned_optim.context import LayerStats, any_member, get_hyperparam, required_stats, set_hyperparam


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Static PPO settings: everything that fixes shapes or loop lengths."""

    num_envs: int = 4
    num_steps: int = 128
    total_timesteps: int = 500_000
    update_epochs: int = 4
    num_minibatches: int = 4
    hidden_sizes: Tuple[int, ...] = (64, 64)
    activation: str = "tanh"
    max_grad_norm: float = 0.5
    anneal_lr: bool = False
    normalize_obs: bool = False
    normalize_advantages: bool = True
    clip_value: bool = True
    # Rows of each minibatch used for curvature statistics (layer inputs and
    # Fisher pre-activation gradients, K-FAC / diagonal GGN); 0 = all rows.
    # Minibatches are random permutations, so the first rows are a random subset.
    curvature_batch_size: int = 256

    def __post_init__(self):
        for name in ("num_envs", "num_steps", "update_epochs", "num_minibatches"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"PPOConfig.{name} must be a positive integer, got {v!r}")
        if not (isinstance(self.total_timesteps, (int, float)) and self.total_timesteps > 0):
            raise ValueError(f"PPOConfig.total_timesteps must be positive, got {self.total_timesteps!r}")
        if self.total_timesteps < self.batch_size:
            raise ValueError(
                f"PPOConfig.total_timesteps={self.total_timesteps} is less than one iteration "
                f"(num_envs * num_steps = {self.batch_size})"
            )
        if self.batch_size % self.num_minibatches:
            raise ValueError(
                f"PPOConfig: batch num_envs * num_steps = {self.batch_size} does not divide into "
                f"num_minibatches={self.num_minibatches}; choose a divisor of {self.batch_size}"
            )
        if not isinstance(self.curvature_batch_size, int) or self.curvature_batch_size < 0:
            raise ValueError(
                f"PPOConfig.curvature_batch_size must be an integer >= 0 (0 = whole minibatch), "
                f"got {self.curvature_batch_size!r}"
            )
        if self.activation not in networks.ACTIVATIONS:
            raise ValueError(
                f"PPOConfig.activation={self.activation!r}; allowed: {sorted(networks.ACTIVATIONS)}"
            )
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def num_updates(self) -> int:
        return int(self.total_timesteps) // self.batch_size


class PPOHParams(NamedTuple):
    """Per-member hyperparameters (float32 scalars, or ``[P]`` for a population)."""

    lr: jax.Array
    ent_coef: jax.Array
    clip_eps: jax.Array
    gamma: jax.Array
    gae_lambda: jax.Array
    vf_coef: jax.Array

    @classmethod
    def default(cls, **overrides) -> "PPOHParams":
        values = dict(lr=2.5e-4, ent_coef=0.01, clip_eps=0.2, gamma=0.99, gae_lambda=0.95, vf_coef=0.5)
        return with_defaults(cls, values, overrides, "PPO")


# Named presets: (config, hparams). MinAtar follows the OPEN paper's PPO setting.
PRESETS: Dict[str, Tuple[PPOConfig, Dict[str, float]]] = {
    "classic": (PPOConfig(anneal_lr=True), dict(lr=2.5e-4)),
    "minatar": (
        PPOConfig(num_envs=64, num_steps=128, total_timesteps=10_000_000, update_epochs=4,
                  num_minibatches=8, activation="relu", anneal_lr=True),
        dict(lr=3e-3),  # best of 3e-4, 1e-3, 3e-3, 1e-2 on Breakout at 2e6 steps
    ),
    "brax": (
        PPOConfig(num_envs=2048, num_steps=10, total_timesteps=50_000_000, update_epochs=4,
                  num_minibatches=32, hidden_sizes=(256, 256), normalize_obs=True, anneal_lr=False),
        dict(lr=3e-4, ent_coef=0.0, gamma=0.99, gae_lambda=0.95),
    ),
    "gridworld": (PPOConfig(num_envs=64, num_steps=20, total_timesteps=3_000_000, num_minibatches=4,
                            activation="relu"), dict(lr=1e-3, gamma=0.995)),
}


def preset_for(env_name: str) -> str:
    if env_name.endswith("-MinAtar"):
        return "minatar"
    if env_name.startswith("brax/"):
        return "brax"
    if env_name.startswith("gridworld/"):
        return "gridworld"
    return "classic"


@struct.dataclass
class PPOState:
    """Everything one agent carries between iterations (a pytree of arrays)."""

    params: Any  # {"actor": {...}, "critic": {...}}
    opt_state: Any
    env_state: Any
    obs: jax.Array  # [num_envs, *obs_shape]
    key: jax.Array
    hparams: PPOHParams
    update_step: jax.Array  # int32: iterations done
    last_return: jax.Array  # float32: mean return of the latest finished episodes


class Agent(NamedTuple):
    """Pure functions of one agent; vmap them for a population."""

    config: PPOConfig
    init: Callable[[jax.Array, PPOHParams], PPOState]
    update: Callable[[PPOState], Tuple[PPOState, Dict[str, jax.Array]]]
    run: Callable[[PPOState, int], Tuple[PPOState, Dict[str, jax.Array]]]
    train: Callable[[jax.Array, PPOHParams], Tuple[PPOState, Dict[str, jax.Array]]]
    tx: optax.GradientTransformationExtraArgs
    stats_needed: frozenset
    uses_lr: bool  # False: the optimizer has no injected learning rate, hparams.lr is unused
    rollout: Optional[Callable[[PPOState], Tuple[PPOState, Dict[str, jax.Array]]]] = None


def make_ppo(config: PPOConfig, env, env_params, tx: optax.GradientTransformation) -> Agent:
    """Builds the PPO agent for ``env`` (from ``envs.make``) and optimizer ``tx``."""
    vec_env = VecEnv(env, config.num_envs)
    if config.normalize_obs:
        vec_env = NormalizeObservation(vec_env)
    action_space = env.action_space(env_params)
    obs_shape = tuple(env.observation_space(env_params).shape)
    discrete = isinstance(action_space, Discrete)
    if not discrete and not isinstance(action_space, Box):
        raise ValueError(f"unsupported action space {action_space!r}")
    act_dim = action_space.n if discrete else int(action_space.shape[0])
    actor = networks.MLP(
        config.hidden_sizes, act_dim, config.activation, out_scale=0.01,
        log_std_dim=0 if discrete else act_dim,
    )
    critic = networks.MLP(config.hidden_sizes, 1, config.activation, out_scale=1.0)
    full_tx = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), tx)

    # Binary observations (MinAtar) are stored as bool in the rollout buffer: 4x
    # less memory traffic when minibatches are shuffled; networks see float32.
    store_dtype = jnp.bool_ if getattr(env, "binary_observations", False) else None

    def flat(obs):
        return obs.reshape((obs.shape[0], -1)).astype(jnp.float32)

    def policy(actor_params, obs):
        return actor.apply({"params": actor_params}, flat(obs))

    def dist_fns(actor_out):
        if discrete:
            return (
                lambda k: networks.categorical_sample(k, actor_out),
                lambda a: networks.categorical_log_prob(actor_out, a),
                lambda: networks.categorical_entropy(actor_out),
            )
        mean, log_std = actor_out
        return (
            lambda k: networks.gaussian_sample(k, mean, log_std),
            lambda a: networks.gaussian_log_prob(mean, log_std, a),
            lambda: networks.gaussian_entropy(mean, log_std),
        )

    def value_fn(critic_params, obs):
        return critic.apply({"params": critic_params}, flat(obs))[..., 0]

    def init_params(key):
        k_a, k_c = jax.random.split(key)
        dummy = jnp.zeros((1, math.prod(obs_shape)), jnp.float32)
        return {
            "actor": actor.init(k_a, dummy)["params"],
            "critic": critic.init(k_c, dummy)["params"],
        }

    params_shape = jax.eval_shape(init_params, jax.random.key(0))
    stats_needed = required_stats(full_tx, params_shape)
    injected_lr = get_hyperparam(jax.eval_shape(full_tx.init, params_shape), "learning_rate")

    def init(key: jax.Array, hparams: PPOHParams) -> PPOState:
        k_params, k_env, k_state = jax.random.split(key, 3)
        params = init_params(k_params)
        opt_state = full_tx.init(params)
        obs, env_state = vec_env.reset(k_env, env_params)
        return PPOState(
            params=params,
            opt_state=opt_state,
            env_state=env_state,
            obs=obs,
            key=k_state,
            hparams=jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), hparams),
            update_step=jnp.zeros((), jnp.int32),
            last_return=jnp.zeros((), jnp.float32),
        )

    # Rollout -----------------------------------------------------------------

    def rollout(state: PPOState):
        """``num_steps`` env steps of every env; returns the new state and the
        trajectory ``[num_steps, num_envs, ...]``. Time limits are bootstrapped:
        where an episode was truncated, ``gamma * V(final obs)`` is folded into
        the reward (``bootstrap_value`` holds ``V(final obs)``, 0 elsewhere)."""
        gamma = state.hparams.gamma

        def env_step(carry, _):
            env_state, obs, key = carry
            key, k_act, k_env = jax.random.split(key, 3)
            actor_out = policy(state.params["actor"], obs)
            sample, log_prob, _ = dist_fns(actor_out)
            action = sample(k_act)
            logp = log_prob(action)
            value = value_fn(state.params["critic"], obs)
            next_obs, env_state, reward, terminated, truncated, info = vec_env.step(
                k_env, env_state, action, env_params
            )
            # The critic sees a final observation only at steps where some env (of
            # any member) hit its time limit: a real branch, not a select.
            boot = jax.lax.cond(
                any_member(jnp.any(truncated)),
                lambda o: jnp.where(truncated, value_fn(state.params["critic"], o), 0.0),
                lambda o: jnp.zeros(truncated.shape, jnp.float32),
                info["final_obs"],
            )
            transition = dict(
                obs=obs if store_dtype is None else obs.astype(store_dtype), action=action, log_prob=logp, value=value,
                reward=reward + gamma * boot, bootstrap_value=boot,
                done=jnp.logical_or(terminated, truncated),
                episode_return=info["returned_episode_return"],
                episode_done=info["returned_episode"],
            )
            return (env_state, next_obs, key), transition

        (env_state, obs, key), traj = jax.lax.scan(
            env_step, (state.env_state, state.obs, state.key), None, config.num_steps
        )
        return state.replace(env_state=env_state, obs=obs, key=key), traj

    # Statistics for optimizers that ask (LayerStats) ---------------------------

    want_io = bool(stats_needed & {"inputs", "outputs"})

    def layer_stats(params, obs, key, sown):
        """Per-layer ``LayerStats`` of what the optimizer asked for: post-activation
        ``outputs`` (dormancy) over the whole minibatch; ``inputs`` and
        ``preact_grads`` (curvature) over its first ``curvature_batch_size`` rows.
        ``sown``: the layers' ``(inputs, outputs)`` recorded by the loss's own
        forward pass (``loss_fn``), so they cost no extra pass."""
        rows = config.curvature_batch_size
        curv_rows = rows if 0 < rows < obs.shape[0] else obs.shape[0]
        stats = {}
        grads = {}
        if "preact_grads" in stats_needed:
            grads = fisher_preact_grads(params, obs[:curv_rows], key)
        for part in ("actor", "critic"):
            stats[part] = {}
            for layer in params[part]:
                if not layer.startswith("Dense_"):
                    continue
                inputs, outputs = sown.get(part, {}).get(layer, (None, None))
                stats[part][layer] = LayerStats(
                    inputs=inputs[:curv_rows] if "inputs" in stats_needed else None,
                    outputs=outputs if "outputs" in stats_needed else None,
                    preact_grads=grads.get(part, {}).get(layer),
                )
        return stats

    def fisher_preact_grads(params, obs, key):
        """Per-example gradients of the sampled-target log-likelihood w.r.t.
        every dense pre-activation: actions sampled from the policy itself,
        value targets ``V + N(0, 1)`` (unit-variance Gaussian likelihood)."""
        x = flat(obs)
        k_a, k_v = jax.random.split(key)
        a_pert = jax.tree.map(jnp.zeros_like, jax.eval_shape(
            lambda: actor.init(jax.random.key(0), x)["perturbations"]))
        c_pert = jax.tree.map(jnp.zeros_like, jax.eval_shape(
            lambda: critic.init(jax.random.key(0), x)["perturbations"]))

        def loglik(perts):
            out = actor.apply({"params": params["actor"], "perturbations": perts[0]}, x)
            sample, log_prob, _ = dist_fns(out)
            a = jax.lax.stop_gradient(sample(k_a))
            v = critic.apply({"params": params["critic"], "perturbations": perts[1]}, x)[..., 0]
            y = jax.lax.stop_gradient(v + jax.random.normal(k_v, v.shape))
            return jnp.sum(log_prob(a)) - 0.5 * jnp.sum((v - y) ** 2)

        g_actor, g_critic = jax.grad(loglik)((a_pert, c_pert))
        return {"actor": networks.by_layer(g_actor), "critic": networks.by_layer(g_critic)}

    # Update ------------------------------------------------------------------

    def loss_fn(params, batch, hp: PPOHParams):
        """PPO loss; aux = (metrics, sown), where ``sown`` holds every dense
        layer's ``(inputs, outputs)`` from this forward pass when the optimizer
        asked for layer inputs or outputs (else ``{}``)."""
        x = flat(batch["obs"])
        if want_io:
            actor_out, a_vars = actor.apply({"params": params["actor"]}, x, mutable=["intermediates"])
            value, c_vars = critic.apply({"params": params["critic"]}, x, mutable=["intermediates"])
            sown = jax.lax.stop_gradient({
                "actor": networks.by_layer(a_vars["intermediates"], sown=True),
                "critic": networks.by_layer(c_vars["intermediates"], sown=True),
            })
        else:
            actor_out = actor.apply({"params": params["actor"]}, x)
            value = critic.apply({"params": params["critic"]}, x)
            sown = {}
        _, log_prob, entropy = dist_fns(actor_out)
        loss, metrics = losses.ppo_loss(
            log_prob(batch["action"]), batch["log_prob"], batch["advantages"], value[..., 0],
            batch["value"], batch["targets"], entropy(), hp.clip_eps, hp.vf_coef, hp.ent_coef,
            config.normalize_advantages, config.clip_value,
        )
        return loss, (metrics, sown)

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def update(state: PPOState):
        state, traj = rollout(state)
        hp = state.hparams
        last_value = value_fn(state.params["critic"], state.obs)
        advantages, targets = losses.gae(
            traj["reward"], traj["value"], traj["done"], last_value, hp.gamma, hp.gae_lambda
        )
        batch = dict(
            obs=traj["obs"], action=traj["action"], log_prob=traj["log_prob"], value=traj["value"],
            advantages=advantages, targets=targets,
        )
        batch = jax.tree.map(lambda x: x.reshape((config.batch_size,) + x.shape[2:]), batch)
        train_fraction = state.update_step.astype(jnp.float32) / config.num_updates
        lr = hp.lr * (1.0 - train_fraction) if config.anneal_lr else hp.lr

        def epoch_step(carry, epoch):
            params, opt_state, key = carry
            key, k_perm = jax.random.split(key)
            perm = jax.random.permutation(k_perm, config.batch_size)
            minibatches = jax.tree.map(
                lambda x: jnp.take(x, perm, axis=0).reshape(
                    (config.num_minibatches, config.minibatch_size) + x.shape[1:]
                ),
                batch,
            )
            batch_fraction = epoch.astype(jnp.float32) / max(config.update_epochs - 1, 1)

            def minibatch_step(carry, mb):
                params, opt_state, key = carry
                key, k_opt, k_stats = jax.random.split(key, 3)
                grads, (aux, sown) = grad_fn(params, mb, hp)
                extra = dict(train_fraction=train_fraction, batch_fraction=batch_fraction, key=k_opt)
                if stats_needed:
                    extra["layer_stats"] = layer_stats(params, mb["obs"], k_stats, sown)
                opt_state = set_hyperparam(opt_state, "learning_rate", lr)
                upd, opt_state = full_tx.update(grads, opt_state, params, **extra)
                params = optax.apply_updates(params, upd)
                return (params, opt_state, key), aux

            (params, opt_state, key), aux = jax.lax.scan(
                minibatch_step, (params, opt_state, key), minibatches
            )
            return (params, opt_state, key), aux

        key, k_epochs = jax.random.split(state.key)
        (params, opt_state, _), aux = jax.lax.scan(
            epoch_step, (state.params, state.opt_state, k_epochs), jnp.arange(config.update_epochs)
        )
        n_done = traj["episode_done"].sum()
        mean_ret = jnp.sum(traj["episode_return"] * traj["episode_done"]) / jnp.maximum(n_done, 1)
        last_return = jnp.where(n_done > 0, mean_ret, state.last_return)
        metrics = {k: v.mean() for k, v in aux.items()}
        metrics.update(
            episode_return=last_return,
            episodes=n_done.astype(jnp.int32),
            finite=jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)])),
        )
        new_state = state.replace(
            params=params, opt_state=opt_state, key=key,
            update_step=state.update_step + 1, last_return=last_return,
        )
        return new_state, metrics

    def run(state: PPOState, num_updates: int):
        """``num_updates`` iterations (static) in one ``lax.scan``; metrics ``[num_updates]``."""
        return jax.lax.scan(lambda s, _: update(s), state, None, num_updates)

    def train(key: jax.Array, hparams: PPOHParams):
        """Whole training from scratch: ``config.num_updates`` iterations."""
        return run(init(key, hparams), config.num_updates)

    return Agent(config, init, update, run, train, full_tx, stats_needed, injected_lr is not None, rollout)


def final_return(metrics: Dict[str, Any], fraction: float = 0.1):
    """Mean episode return over the last ``fraction`` of iterations, weighted
    by the episodes that finished in each (last axis = iterations)."""
    import numpy as np

    ret = np.asarray(metrics["episode_return"], np.float64)
    cnt = np.asarray(metrics["episodes"], np.float64)
    n = ret.shape[-1]
    k = max(1, int(round(n * fraction)))
    r, c = ret[..., -k:], cnt[..., -k:]
    total = c.sum(-1)
    weighted = (r * c).sum(-1) / np.maximum(total, 1)
    return np.where(total > 0, weighted, r[..., -1])
