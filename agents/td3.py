"""TD3 (twin delayed DDPG) for continuous actions, population-vmappable.

Fujimoto et al. 2018: twin critics and the minimum of their targets, target
policy smoothing, delayed actor and target updates, with a replay buffer that
lives in the agent state (arrays, so ``jax.vmap`` batches whole populations).

One *update* (iteration) is one env step of each of ``num_envs`` envs (the
transitions go to the buffer) followed by ``gradient_steps`` gradient steps
(``lax.scan``); training is a ``lax.scan`` over iterations. Static settings
live in the frozen ``TD3Config``; what a population may vary (and PBT may
change) are arrays in ``TD3HParams``.

>>> env, env_params = envs.make("Pendulum-v1")
>>> agent = make_td3(TD3Config(), env, env_params, learned_optim.from_spec("adam"))
>>> state, metrics = jax.jit(agent.train)(jax.random.key(0), TD3HParams.default())

Actions. The actor outputs ``tanh`` of its last layer: actions in normalised
units ``[-1, 1]``, mapped affinely onto the env's action box only when the
env is stepped. The buffer stores normalised actions and every noise scale
(``exploration_noise``, ``policy_noise``, ``noise_clip``) is in these units.

Time limits. ``terminated`` and ``truncated`` stay apart: the buffer stores the
true next observation of a finished episode (``info["final_obs"]``) and only
``terminated`` stops bootstrapping, so Pendulum's 200-step limit is
bootstrapped through.

Optimizers. Any ``optax`` transform (``learned_optim.from_spec``), one state
per part: ``opt_state = {"actor": tx.init({"actor": actor_params}),
"critic": vmap(tx.init)({"critic": q_params})}``. The two critics are one
parameter tree with a leading axis of 2 (``params["critic"]``), evaluated with
``jax.vmap``; the optimizer is vmapped over that axis too, so each critic has
its own optimizer state in which its layers are ordinary 2-D dense layers (K-FAC
and diagonal GGN precondition them; learned rules see an ``"actor"`` or
``"critic"`` network as in PPO). Every call passes the extra arguments of
``learned_optim.context``: ``train_fraction`` (iterations done / total),
``batch_fraction`` (position of the gradient step within the iteration),
``key`` and, only when ``required_stats`` asks, ``layer_stats``.
The learning rate is the optimizer's injected ``learning_rate``, the same in
both parts' states (``agents.core.learning_rate`` / ``with_learning_rate``;
``init``/``train`` take it as an optional third argument), so PBT changes it
without recompiling.

Curvature statistics (K-FAC, diagonal GGN), per-example pre-activation
gradients of a sampled-target log-likelihood on the gradient step's batch:

* critics: the Gaussian regression Fisher, target ``y ~ N(Q_i(s, a), 1)`` for
  each critic ``i`` (for a squared-error loss this is the Gauss-Newton matrix);
* actor: the deterministic policy has no likelihood of its own; we use the
  Gauss-Newton matrix of its output, i.e. the Fisher of the Gaussian
  exploration policy ``N(pi(s), I)`` in normalised action units (target
  ``y ~ N(tanh(z), 1)``, so the tanh's Jacobian is included). It measures how
  much a parameter step moves the actions, which is what the actor loss
  ``-Q1(s, pi(s))`` acts through, and it is positive semi-definite and
  independent of the critic's errors (the empirical Fisher of the actor loss
  is not, and degenerates where the critic is flat).

Both come from ``learned_optim.layer_stats.dense_layer_stats``; the skeleton
shared with PPO and A2C is ``agents.core``, the buffer ``agents.replay_buffer``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp
from flax import struct

from agents import core, networks, replay_buffer
from envs.spaces import Box
from envs.wrappers import VecEnv
from learned_optim.context import any_member
from learned_optim.layer_stats import dense_layer_stats, gaussian_sampled_loglik

NUM_CRITICS = 2


@dataclasses.dataclass(frozen=True)
class TD3Config:
    """Static TD3 settings: everything that fixes shapes or loop lengths.

    One iteration = ``num_envs`` env steps + ``gradient_steps`` gradient
    steps (update-to-data ratio ``gradient_steps / num_envs``). The first
    ``learning_starts`` env steps use uniformly random actions and no training.
    """

    num_envs: int = 4
    total_timesteps: int = 50_000
    buffer_size: int = 100_000
    batch_size: int = 256
    learning_starts: int = 2_000
    gradient_steps: int = 4
    policy_delay: int = 2
    hidden_sizes: Tuple[int, ...] = (256, 256)
    activation: str = "relu"
    max_grad_norm: float = 0.0  # 0 = no global-norm clipping in front of the optimizer
    # Rows of each batch used for curvature statistics (layer inputs and Fisher
    # pre-activation gradients, K-FAC / diagonal GGN); 0 = all rows. Batches
    # are uniform random draws, so the first rows are a random subset.
    curvature_batch_size: int = 0

    def __post_init__(self):
        core.check_positive_ints(self, "num_envs", "buffer_size", "batch_size", "gradient_steps", "policy_delay")
        core.check_timesteps(self, self.num_envs, "num_envs")
        if isinstance(self.learning_starts, bool) or not isinstance(self.learning_starts, int) \
                or self.learning_starts < 0:
            raise ValueError(f"TD3Config.learning_starts must be an integer >= 0, got {self.learning_starts!r}")
        if self.buffer_size < self.num_envs:
            raise ValueError(
                f"TD3Config.buffer_size={self.buffer_size} must hold at least one iteration's transitions "
                f"(num_envs={self.num_envs})"
            )
        core.check_network(self)

    @property
    def steps_per_update(self) -> int:
        """Env steps of one iteration."""
        return self.num_envs

    @property
    def num_updates(self) -> int:
        return int(self.total_timesteps) // self.num_envs


TD3HParams = core.hparams_type(
    "TD3HParams", "TD3", dict(gamma=0.99, tau=0.005, policy_noise=0.2, noise_clip=0.5,
                              exploration_noise=0.1), __name__,
    """Per-member TD3 hyperparameters (float32 scalars, or ``[P]`` for a population).

    gamma:             discount.
    tau:               Polyak rate of the target networks.
    policy_noise:      std of the target-policy smoothing noise (normalised units).
    noise_clip:        the smoothing noise is clipped to ``[-noise_clip, noise_clip]``.
    exploration_noise: std of the Gaussian noise on the acting policy's actions.
    """)


# ---------------------------------------------------------------------------
# Pure pieces (hand-checkable)
# ---------------------------------------------------------------------------


def td_target(reward, terminated, next_q1, next_q2, gamma):
    """Clipped double-Q target ``r + gamma * (1 - terminated) * min(Q1', Q2')``; all ``[B]``."""
    not_done = 1.0 - terminated.astype(jnp.float32)
    return reward + gamma * not_done * jnp.minimum(next_q1, next_q2)


def smoothed_target_action(target_action, noise, policy_noise, noise_clip):
    """Target policy smoothing in normalised units: ``clip(a' + clip(policy_noise
    * noise, -noise_clip, noise_clip), -1, 1)``; ``noise`` standard normal, shapes ``[B, A]``."""
    eps = jnp.clip(policy_noise * noise, -noise_clip, noise_clip)
    return jnp.clip(target_action + eps, -1.0, 1.0)


def polyak(target, online, tau):
    """``(1 - tau) * target + tau * online`` leaf by leaf (dtypes of ``target`` kept)."""
    return jax.tree.map(lambda t, o: ((1.0 - tau) * t + tau * o).astype(t.dtype), target, online)


# ---------------------------------------------------------------------------
# Agent
# ---------------------------------------------------------------------------


@struct.dataclass
class TD3State:
    """Everything one agent carries between iterations (a pytree of arrays)."""

    params: Any  # {"actor": {...}, "critic": {...} with a leading axis of NUM_CRITICS}
    target_params: Any  # same structure
    opt_state: Any  # {"actor": ..., "critic": ... (leading axis NUM_CRITICS)}
    buffer: replay_buffer.ReplayBuffer
    env_state: Any
    obs: jax.Array  # [num_envs, *obs_shape]
    key: jax.Array
    hparams: Any  # TD3HParams
    update_step: jax.Array  # int32: iterations done
    grad_step: jax.Array  # int32: critic gradient steps done
    last_return: jax.Array  # float32: mean return of the latest finished episodes


@dataclasses.dataclass(frozen=True)
class TD3Agent(core.Agent):
    """``core.Agent`` (``tx`` is the transform applied to each part) plus:"""

    init_opt: Callable[[Any], Any]  # params -> opt_state (both parts)
    act: Callable[[Any, jax.Array], jax.Array]  # (actor params, obs [N, ...]) -> normalised actions [N, A]
    q_values: Callable[[Any, jax.Array, jax.Array], jax.Array]  # (critic params, obs, action) -> [2, N]
    pbt_copy_fields: Tuple[str, ...] = ("target_params",)  # travel with params when PBT copies a member


def make_td3(config: TD3Config, env, env_params, tx) -> TD3Agent:
    """Builds the TD3 agent for ``env`` (from ``envs.make``; a ``Box`` action
    space) and optax transform ``tx``."""
    vec_env = VecEnv(env, config.num_envs)
    action_space = env.action_space(env_params)
    if not isinstance(action_space, Box):
        raise ValueError(f"TD3 needs a continuous (Box) action space; the env has {action_space!r}")
    obs_shape = tuple(env.observation_space(env_params).shape)
    obs_dim = math.prod(obs_shape)
    act_dim = int(math.prod(action_space.shape))
    actor, critic = core.actor_and_critic(config, act_dim)
    full_tx = core.with_clipping(tx, config.max_grad_norm)
    flat = networks.flat

    def to_env_action(a):
        """Normalised ``[-1, 1]`` actions -> the env's box."""
        low = jnp.broadcast_to(jnp.asarray(action_space.low, jnp.float32), action_space.shape)
        high = jnp.broadcast_to(jnp.asarray(action_space.high, jnp.float32), action_space.shape)
        return low + 0.5 * (a.reshape((a.shape[0],) + tuple(action_space.shape)) + 1.0) * (high - low)

    def act(actor_params, obs):
        return jnp.tanh(actor.apply({"params": actor_params}, flat(obs)))

    def q_single(q_params, obs, action):
        return critic.apply({"params": q_params}, jnp.concatenate([flat(obs), action], -1))[..., 0]

    def q_values(critic_params, obs, action):
        return jax.vmap(q_single, in_axes=(0, None, None))(critic_params, obs, action)

    def init_params(key):
        k_a, k_c = jax.random.split(key)
        dummy_obs = jnp.zeros((1, obs_dim), jnp.float32)
        dummy_x = jnp.zeros((1, obs_dim + act_dim), jnp.float32)
        critics = jax.vmap(lambda k: critic.init(k, dummy_x)["params"])(jax.random.split(k_c, NUM_CRITICS))
        return {"actor": actor.init(k_a, dummy_obs)["params"], "critic": critics}

    def init_opt(params):
        return {
            "actor": full_tx.init({"actor": params["actor"]}),
            "critic": jax.vmap(lambda q: full_tx.init({"critic": q}))(params["critic"]),
        }

    params_shape = jax.eval_shape(init_params, jax.random.key(0))
    q_shape = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), params_shape["critic"])
    stats_needed, uses_lr = core.optimizer_needs(full_tx, {"actor": params_shape["actor"]}, {"critic": q_shape})

    def layer_stats(net, params, x, key, sampled_loglik):
        return dense_layer_stats(net, {"params": params}, x, sampled_loglik, key, kinds=stats_needed,
                                 curvature_rows=config.curvature_batch_size)

    def actor_loglik(out, key):  # Gaussian exploration-policy Fisher (module docstring)
        return gaussian_sampled_loglik(jnp.tanh(out), key)

    def transition_example():
        f32 = jnp.float32
        return dict(obs=jnp.zeros(obs_shape, f32), action=jnp.zeros((act_dim,), f32), reward=jnp.zeros((), f32),
                    next_obs=jnp.zeros(obs_shape, f32), terminated=jnp.zeros((), f32))

    def init(key: jax.Array, hparams, learning_rate=None) -> TD3State:
        k_params, k_env, k_state = jax.random.split(key, 3)
        params = init_params(k_params)
        obs, env_state = vec_env.reset(k_env, env_params)
        return core.with_learning_rate(TD3State(
            params=params,
            target_params=params,
            opt_state=init_opt(params),
            buffer=replay_buffer.init(transition_example(), config.buffer_size),
            env_state=env_state,
            obs=obs,
            key=k_state,
            hparams=core.as_float32(hparams),
            update_step=jnp.zeros((), jnp.int32),
            grad_step=jnp.zeros((), jnp.int32),
            last_return=jnp.zeros((), jnp.float32),
        ), learning_rate)

    # Optimizer steps (one part each) ------------------------------------------------

    def part_step(part, params, opt_state, grads, stats, extra):
        """One step of ``full_tx`` on ``{part: params}`` (the critic's is vmapped over the twins)."""
        if stats is not None:
            extra = dict(extra, layer_stats={part: stats})
        new, opt_state = core.optimizer_step(full_tx, {part: params}, opt_state, {part: grads}, **extra)
        return new[part], opt_state

    # Losses ----------------------------------------------------------------------

    def critic_loss(q_params, obs, action, target):
        """Mean squared TD error of one critic on ``[B]`` targets."""
        q = q_single(q_params, obs, action)
        return jnp.mean((q - target) ** 2), q

    def actor_loss(actor_params, q1_params, obs):
        """``-mean Q1(s, pi(s))`` (TD3 differentiates through the first critic only)."""
        return -jnp.mean(q_single(q1_params, obs, act(actor_params, obs)))

    critic_grad = jax.vmap(jax.grad(critic_loss, has_aux=True), in_axes=(0, None, None, None))
    actor_grad = jax.value_and_grad(actor_loss)

    def gradient_step(carry, i, buffer, hp, train_fraction):
        """One critic step; the actor and target step every ``policy_delay``-th."""
        params, target_params, opt_state, grad_step, key = carry
        key, k_batch, k_smooth, k_copt, k_cstats, k_aopt, k_astats = jax.random.split(key, 7)
        batch = replay_buffer.sample(buffer, k_batch, config.batch_size)
        batch_fraction = i.astype(jnp.float32) / max(config.gradient_steps - 1, 1)

        # Critics: clipped double-Q target with target policy smoothing.
        next_a = smoothed_target_action(
            act(target_params["actor"], batch["next_obs"]),
            jax.random.normal(k_smooth, batch["action"].shape), hp.policy_noise, hp.noise_clip)
        next_q = q_values(target_params["critic"], batch["next_obs"], next_a)
        target = jax.lax.stop_gradient(td_target(batch["reward"], batch["terminated"], next_q[0], next_q[1],
                                                 hp.gamma))
        c_grads, q = critic_grad(params["critic"], batch["obs"], batch["action"], target)
        c_stats = None
        if stats_needed:
            x = jnp.concatenate([flat(batch["obs"]), batch["action"]], -1)
            c_stats = jax.vmap(lambda p, k: layer_stats(critic, p, x, k, gaussian_sampled_loglik))(
                params["critic"], jax.random.split(k_cstats, NUM_CRITICS))

        def critic_step(q_params, q_opt, grads, stats, k):
            extra = dict(train_fraction=train_fraction, batch_fraction=batch_fraction, key=k)
            return part_step("critic", q_params, q_opt, grads, stats, extra)

        critics, c_opt = jax.vmap(critic_step)(params["critic"], opt_state["critic"], c_grads, c_stats,
                                               jax.random.split(k_copt, NUM_CRITICS))
        critic_loss_value = jnp.mean((q - target[None]) ** 2, axis=-1).sum()
        grad_step = grad_step + 1
        params = {**params, "critic": critics}
        opt_state = {**opt_state, "critic": c_opt}

        # Actor and targets, delayed. Every member of a population counts the same
        # steps, so ``any_member`` keeps this a real branch under vmap.
        due = (grad_step % config.policy_delay) == 0

        def actor_and_targets(operand):
            params, target_params, a_opt = operand
            a_loss, a_grads = actor_grad(params["actor"], jax.lax.stop_gradient(
                jax.tree.map(lambda x: x[0], params["critic"])), batch["obs"])
            a_stats = None
            if stats_needed:
                a_stats = layer_stats(actor, params["actor"], flat(batch["obs"]), k_astats, actor_loglik)
            extra = dict(train_fraction=train_fraction, batch_fraction=batch_fraction, key=k_aopt)
            new_actor, new_a_opt = part_step("actor", params["actor"], a_opt, a_grads, a_stats, extra)
            new_params = {**params, "actor": new_actor}
            new_targets = polyak(target_params, new_params, hp.tau)
            pick = lambda new, old: jax.tree.map(lambda n, o: jnp.where(due, n, o), new, old)  # noqa: E731
            return (pick(new_params, params), pick(new_targets, target_params), pick(new_a_opt, a_opt),
                    jnp.where(due, a_loss, 0.0))

        def skip(operand):
            params, target_params, a_opt = operand
            return params, target_params, a_opt, jnp.zeros((), jnp.float32)

        params, target_params, a_opt, a_loss = jax.lax.cond(
            any_member(due), actor_and_targets, skip, (params, target_params, opt_state["actor"]))
        opt_state = {**opt_state, "actor": a_opt}
        aux = dict(critic_loss=critic_loss_value, actor_loss=a_loss, actor_updated=due.astype(jnp.float32),
                   q_mean=jnp.mean(q))
        return (params, target_params, opt_state, grad_step, key), aux

    # Update ------------------------------------------------------------------------

    def update(state: TD3State):
        hp = state.hparams
        key, k_act, k_noise, k_random, k_env, k_train = jax.random.split(state.key, 6)

        # Act: random before learning_starts, then the policy plus Gaussian noise.
        steps_before = state.update_step * config.num_envs
        policy_a = act(state.params["actor"], state.obs)
        noisy = jnp.clip(policy_a + hp.exploration_noise * jax.random.normal(k_noise, policy_a.shape), -1.0, 1.0)
        random_a = jax.random.uniform(k_random, policy_a.shape, jnp.float32, -1.0, 1.0)
        action = jnp.where(steps_before < config.learning_starts, random_a, noisy)
        next_obs, env_state, reward, terminated, truncated, info = vec_env.step(
            k_env, state.env_state, to_env_action(action), env_params)
        # The true next observation (before any auto-reset); only termination
        # stops bootstrapping, truncation does not.
        buffer = replay_buffer.add(state.buffer, dict(
            obs=state.obs, action=action, reward=reward,
            next_obs=info["final_obs"], terminated=terminated.astype(jnp.float32)))

        # Train (once learning_starts env steps are in the buffer).
        train_fraction = state.update_step.astype(jnp.float32) / max(config.num_updates, 1)
        ready = steps_before + config.num_envs >= config.learning_starts

        def train_phase(operand):
            params, target_params, opt_state, grad_step = operand
            (p, t, o, g, _), aux = jax.lax.scan(
                lambda c, i: gradient_step(c, i, buffer, hp, train_fraction),
                (params, target_params, opt_state, grad_step, k_train),
                jnp.arange(config.gradient_steps))
            n_actor = jnp.sum(aux["actor_updated"])
            summary = dict(critic_loss=jnp.mean(aux["critic_loss"]), q_mean=jnp.mean(aux["q_mean"]),
                           actor_loss=jnp.sum(aux["actor_loss"]) / jnp.maximum(n_actor, 1.0))
            pick = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ready, n, o), new, old)  # noqa: E731
            return pick((p, t, o, g), operand), jax.tree.map(lambda x: jnp.where(ready, x, 0.0), summary)

        def no_train(operand):
            z = jnp.zeros((), jnp.float32)
            return operand, dict(critic_loss=z, q_mean=z, actor_loss=z)

        (params, target_params, opt_state, grad_step), summary = jax.lax.cond(
            any_member(ready), train_phase, no_train,
            (state.params, state.target_params, state.opt_state, state.grad_step))

        episodes = core.episode_metrics(info["returned_episode_return"], info["returned_episode"],
                                        state.last_return)
        last_return = episodes["episode_return"]
        metrics = dict(summary, **episodes, trained=ready, finite=core.all_finite(params))
        new_state = state.replace(
            params=params, target_params=target_params, opt_state=opt_state, buffer=buffer,
            env_state=env_state, obs=next_obs, key=key, update_step=state.update_step + 1,
            grad_step=grad_step, last_return=last_return,
        )
        return new_state, metrics

    run, train = core.make_run_train(init, update, config.num_updates)
    return TD3Agent(config, init, update, run, train, full_tx, stats_needed, uses_lr, init_opt, act, q_values)
