"""PPO for discrete and continuous actions, population-vmappable.

Shape follows purejaxrl: one PPO iteration is a rollout ``lax.scan`` over
``num_steps`` followed by ``update_epochs`` x ``num_minibatches`` gradient
steps (nested ``lax.scan``); training is a ``lax.scan`` over iterations.
Static settings live in the frozen ``PPOConfig``; the numbers a population may
vary (and PBT may change) are arrays in ``PPOHParams``. ``init`` and
``update`` are pure, so a population is ``jax.jit(jax.vmap(agent.train))``.

>>> env, env_params = envs.make("CartPole-v1")
>>> agent = make_ppo(PPOConfig(), env, env_params, learned_optim.from_spec("adam"))
>>> state, metrics = jax.jit(agent.train)(jax.random.key(0), PPOHParams.default(), 2.5e-4)

The optimizer is injected: any ``optax`` transform; PPO chains
``clip_by_global_norm(max_grad_norm)`` in front of it and calls it with the
extra arguments of ``learned_optim.context`` (``train_fraction``,
``batch_fraction``, ``key`` and, when the optimizer asks, ``layer_stats``).
The learning rate is the optimizer's injected ``learning_rate`` in
``state.opt_state`` (``agents.core.learning_rate``; ``train``'s third argument
sets it, None keeps the spec's); with ``anneal_lr`` each iteration steps at
``base * (1 - train_fraction)`` and puts ``base`` back afterwards. Optimizers
without one (e.g. OPEN) are not annealed. The skeleton shared with A2C and TD3
is ``agents.core``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp

from agents import core, losses
from envs.wrappers import NormalizeObservation, NormalizeReward, VecEnv
from learned_optim.context import any_member


@dataclasses.dataclass(frozen=True)
class PPOConfig(core.OnPolicyConfig):
    """Static PPO settings: everything that fixes shapes or loop lengths."""

    num_envs: int = 4
    num_steps: int = 128
    total_timesteps: int = 500_000
    update_epochs: int = 4
    num_minibatches: int = 4
    hidden_sizes: Tuple[int, ...] = (64, 64)
    activation: str = "tanh"
    max_grad_norm: float = 0.5  # 0 = no global-norm clipping in front of the optimizer
    anneal_lr: bool = False
    normalize_obs: bool = False
    # Rewards divided by the running std of the discounted return (purejaxrl's
    # NormalizeVecReward, on for Brax); its discount is reward_norm_gamma, fixed
    # at build time (purejaxrl: the agent's GAMMA; ours may vary per member).
    normalize_rewards: bool = False
    reward_norm_gamma: float = 0.99
    normalize_advantages: bool = True
    clip_value: bool = True
    # Rows of each minibatch used for curvature statistics (layer inputs and
    # Fisher pre-activation gradients, K-FAC / diagonal GGN); 0 = all rows.
    # Minibatches are random permutations, so the first rows are a random subset.
    curvature_batch_size: int = 256
    # OPEN's reference settings (agents.presets "open-paper"): the actor's and
    # the critic's gradients clipped by max_grad_norm each on its own (default:
    # one norm over both, as purejaxrl's single network); the optimizer's
    # train_fraction u / (U - 1), reaching 1 at the last update (default
    # u / U, the fraction the learning rate anneals by).
    clip_per_network: bool = False
    train_fraction_to_one: bool = False

    def __post_init__(self):
        super().__post_init__()
        core.check_positive_ints(self, "update_epochs", "num_minibatches")
        if not 0.0 <= self.reward_norm_gamma <= 1.0:
            raise ValueError(f"PPOConfig.reward_norm_gamma must be in [0, 1], got {self.reward_norm_gamma!r}")
        if self.batch_size % self.num_minibatches:
            raise ValueError(
                f"PPOConfig: batch num_envs * num_steps = {self.batch_size} does not divide into "
                f"num_minibatches={self.num_minibatches}; choose a divisor of {self.batch_size}"
            )

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches


PPOHParams = core.hparams_type(
    "PPOHParams", "PPO", dict(ent_coef=0.01, clip_eps=0.2, gamma=0.99, gae_lambda=0.95, vf_coef=0.5),
    __name__, "Per-member PPO hyperparameters (float32 scalars, or ``[P]`` for a population).")

PPOState = core.ActorCriticState


@dataclasses.dataclass(frozen=True)
class PPOAgent(core.Agent):
    """``core.Agent`` plus ``rollout(state) -> (state, trajectory)``."""

    rollout: Callable[[PPOState], Tuple[PPOState, Dict[str, jax.Array]]] = None


def make_ppo(config: PPOConfig, env, env_params, tx) -> PPOAgent:
    """Builds the PPO agent for ``env`` (from ``envs.make``) and optax transform ``tx``."""
    vec_env = VecEnv(env, config.num_envs)
    if config.normalize_obs:
        vec_env = NormalizeObservation(vec_env)
    if config.normalize_rewards:
        vec_env = NormalizeReward(vec_env, config.reward_norm_gamma)
    ac = core.make_actor_critic(config, env, env_params)
    full_tx = core.with_clipping(tx, config.max_grad_norm, per_network=config.clip_per_network)
    stats_needed, uses_lr = core.optimizer_needs(full_tx, jax.eval_shape(ac.init_params, jax.random.key(0)))

    # Binary observations (MinAtar) are stored as bool in the rollout buffer: 4x
    # less memory traffic when minibatches are shuffled; networks see float32.
    # Not when they are normalised: the normalised values are no longer binary.
    store_dtype = jnp.bool_ if getattr(env, "binary_observations", False) and not config.normalize_obs else None

    def init(key: jax.Array, hparams, learning_rate=None) -> PPOState:
        k_params, k_env, k_state = jax.random.split(key, 3)
        params = ac.init_params(k_params)
        obs, env_state = vec_env.reset(k_env, env_params)
        state = PPOState(params=params, opt_state=full_tx.init(params), env_state=env_state, obs=obs, key=k_state,
                         hparams=core.as_float32(hparams), update_step=jnp.zeros((), jnp.int32),
                         last_return=jnp.zeros((), jnp.float32))
        return core.with_learning_rate(state, learning_rate)

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
            dist = ac.policy(state.params["actor"], obs)
            action = dist.sample(k_act)
            logp = dist.log_prob(action)
            value = ac.value(state.params["critic"], obs)
            next_obs, env_state, reward, terminated, truncated, info = vec_env.step(
                k_env, env_state, action, env_params
            )
            # The critic sees a final observation only at steps where some env (of
            # any member) hit its time limit: a real branch, not a select.
            boot = jax.lax.cond(
                any_member(jnp.any(truncated)),
                lambda o: jnp.where(truncated, ac.value(state.params["critic"], o), 0.0),
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

    # Update ------------------------------------------------------------------

    def loss_fn(params, batch, hp):
        """PPO loss on a minibatch ``[N, ...]``; aux = metrics."""
        dist = ac.policy(params["actor"], batch["obs"])
        value = ac.value(params["critic"], batch["obs"])
        return losses.ppo_loss(
            dist.log_prob(batch["action"]), batch["log_prob"], batch["advantages"], value,
            batch["value"], batch["targets"], dist.entropy(), hp.clip_eps, hp.vf_coef, hp.ent_coef,
            config.normalize_advantages, config.clip_value,
        )

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def update(state: PPOState):
        state, traj = rollout(state)
        hp = state.hparams
        last_value = ac.value(state.params["critic"], state.obs)
        advantages, targets = losses.gae(
            traj["reward"], traj["value"], traj["done"], last_value, hp.gamma, hp.gae_lambda
        )
        batch = dict(
            obs=traj["obs"], action=traj["action"], log_prob=traj["log_prob"], value=traj["value"],
            advantages=advantages, targets=targets,
        )
        batch = jax.tree.map(lambda x: x.reshape((config.batch_size,) + x.shape[2:]), batch)
        train_fraction = state.update_step.astype(jnp.float32) / config.num_updates
        opt_train_fraction = (state.update_step.astype(jnp.float32) / max(config.num_updates - 1, 1)
                              if config.train_fraction_to_one else train_fraction)
        # Annealing: this iteration's steps use base * (1 - train_fraction); the
        # base stays the state's learning rate (restored after the steps).
        base_lr = core.learning_rate(state) if config.anneal_lr else None
        annealed = state if base_lr is None else core.with_learning_rate(state, base_lr * (1.0 - train_fraction))

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
                grads, aux = grad_fn(params, mb, hp)
                extra = dict(train_fraction=opt_train_fraction, batch_fraction=batch_fraction, key=k_opt)
                if stats_needed:
                    extra["layer_stats"] = ac.layer_stats(params, mb["obs"], k_stats, stats_needed,
                                                          config.curvature_batch_size)
                params, opt_state = core.optimizer_step(full_tx, params, opt_state, grads, **extra)
                return (params, opt_state, key), aux

            return jax.lax.scan(minibatch_step, (params, opt_state, key), minibatches)

        key, k_epochs = jax.random.split(state.key)
        (params, opt_state, _), aux = jax.lax.scan(
            epoch_step, (state.params, annealed.opt_state, k_epochs), jnp.arange(config.update_epochs)
        )
        episodes = core.episode_metrics(traj["episode_return"], traj["episode_done"], state.last_return)
        last_return = episodes["episode_return"]
        metrics = {k: v.mean() for k, v in aux.items()}
        metrics.update(episodes, finite=core.all_finite(params))
        new_state = state.replace(
            params=params, opt_state=opt_state, key=key,
            update_step=state.update_step + 1, last_return=last_return,
        )
        return core.with_learning_rate(new_state, base_lr), metrics

    run, train = core.make_run_train(init, update, config.num_updates)
    return PPOAgent(config, init, update, run, train, full_tx, stats_needed, uses_lr, rollout)


# How a run's learning curve becomes one number (ES fitness, the final
# comparison against Adam): the fraction of the last iterations whose finished
# episodes are averaged. "training_mean" (every episode that finished during
# training) rewards learning fast; "final_window" rewards where a run ends.
RETURN_MEASURES = {"final_window": 0.1, "last_update": 0.0, "training_mean": 1.0}
RETURN_MEASURE_WORDS = {
    "final_window": "final return (mean episode return over the last 10% of training)",
    "last_update": "the last update's mean episode return",
    "training_mean": "mean return over the whole run (every episode that finished during training)",
}


def measure_fraction(measure: str) -> float:
    """``RETURN_MEASURES[measure]``; an unknown name -> ``ValueError`` naming the allowed ones."""
    if measure not in RETURN_MEASURES:
        raise ValueError(f"return measure {measure!r}; allowed: {', '.join(RETURN_MEASURES)}")
    return RETURN_MEASURES[measure]


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
