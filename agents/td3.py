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
``hparams.lr`` is written into the optimizer's injected ``learning_rate``
before every step (both parts), so PBT changes it without recompiling.

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
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from agents import networks
from agents.hparams import with_defaults
from envs.spaces import Box
from envs.wrappers import VecEnv
from learned_optim.context import LayerStats, any_member, get_hyperparam, required_stats, set_hyperparam
from learned_optim.curvature import gaussian_sampled_loglik

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
        for name in ("num_envs", "buffer_size", "batch_size", "gradient_steps", "policy_delay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TD3Config.{name} must be a positive integer, got {v!r}")
        if not (isinstance(self.total_timesteps, (int, float)) and self.total_timesteps >= self.num_envs):
            raise ValueError(
                f"TD3Config.total_timesteps={self.total_timesteps!r} must be at least one iteration "
                f"(num_envs = {self.num_envs} env steps)"
            )
        if isinstance(self.learning_starts, bool) or not isinstance(self.learning_starts, int) \
                or self.learning_starts < 0:
            raise ValueError(f"TD3Config.learning_starts must be an integer >= 0, got {self.learning_starts!r}")
        if self.buffer_size < self.num_envs:
            raise ValueError(
                f"TD3Config.buffer_size={self.buffer_size} must hold at least one iteration's transitions "
                f"(num_envs={self.num_envs})"
            )
        if not isinstance(self.curvature_batch_size, int) or self.curvature_batch_size < 0:
            raise ValueError(
                f"TD3Config.curvature_batch_size must be an integer >= 0 (0 = whole batch), "
                f"got {self.curvature_batch_size!r}"
            )
        if self.activation not in networks.ACTIVATIONS:
            raise ValueError(
                f"TD3Config.activation={self.activation!r}; allowed: {sorted(networks.ACTIVATIONS)}"
            )
        if not self.max_grad_norm >= 0:
            raise ValueError(f"TD3Config.max_grad_norm must be >= 0, got {self.max_grad_norm!r}")
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))

    @property
    def steps_per_update(self) -> int:
        """Env steps of one iteration."""
        return self.num_envs

    @property
    def num_updates(self) -> int:
        return int(self.total_timesteps) // self.num_envs

    @property
    def curvature_rows(self) -> int:
        rows = self.curvature_batch_size
        return rows if 0 < rows < self.batch_size else self.batch_size


class TD3HParams(NamedTuple):
    """Per-member hyperparameters (float32 scalars, or ``[P]`` for a population).

    lr:                learning rate of both actor and critics (written into the
                       optimizer's injected ``learning_rate``).
    gamma:             discount.
    tau:               Polyak rate of the target networks.
    policy_noise:      std of the target-policy smoothing noise (normalised units).
    noise_clip:        the smoothing noise is clipped to ``[-noise_clip, noise_clip]``.
    exploration_noise: std of the Gaussian noise on the acting policy's actions.
    """

    lr: jax.Array
    gamma: jax.Array
    tau: jax.Array
    policy_noise: jax.Array
    noise_clip: jax.Array
    exploration_noise: jax.Array

    @classmethod
    def default(cls, **overrides) -> "TD3HParams":
        values = dict(lr=1e-3, gamma=0.99, tau=0.005, policy_noise=0.2, noise_clip=0.5, exploration_noise=0.1)
        return with_defaults(cls, values, overrides, "TD3")


# Named presets: (config, hparams). "classic" (Pendulum) is sized for a CPU:
# 64x64 networks reach returns of about -150 in 1-2e4 env steps there;
# "brax" follows the TD3 paper (256x256, 1e6 buffer, 25e3 random steps).
PRESETS: Dict[str, Tuple[TD3Config, Dict[str, float]]] = {
    "classic": (TD3Config(num_envs=4, total_timesteps=50_000, buffer_size=100_000, learning_starts=2_000,
                          gradient_steps=4, hidden_sizes=(64, 64)), dict(lr=1e-3)),
    "brax": (TD3Config(num_envs=16, total_timesteps=1_000_000, buffer_size=1_000_000, learning_starts=25_000,
                       gradient_steps=16, hidden_sizes=(256, 256)), dict(lr=3e-4)),
}


def preset_for(env_name: str) -> str:
    return "brax" if env_name.startswith("brax/") else "classic"


def resolve_config(env_name: str, preset: Optional[str] = None, **overrides) -> Tuple[TD3Config, Dict[str, float]]:
    """(config, hparams-dict) for ``env_name``: the preset with ``overrides``
    (config fields and hyperparameters by name; None values ignored) applied."""
    name = preset or preset_for(env_name)
    if name not in PRESETS:
        raise ValueError(f"unknown TD3 preset {name!r}; allowed: {sorted(PRESETS)}")
    config, hp = PRESETS[name]
    cfg_fields = {f.name for f in dataclasses.fields(TD3Config)}
    unknown = set(overrides) - cfg_fields - set(TD3HParams._fields)
    if unknown:
        raise ValueError(f"unknown TD3 setting(s) {sorted(unknown)}; allowed: "
                         f"{sorted(cfg_fields | set(TD3HParams._fields))}")
    cfg_over = {k: v for k, v in overrides.items() if k in cfg_fields and v is not None}
    hp_over = {k: v for k, v in overrides.items() if k in TD3HParams._fields and v is not None}
    return dataclasses.replace(config, **cfg_over), {**hp, **hp_over}


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
# Replay buffer
# ---------------------------------------------------------------------------


@struct.dataclass
class ReplayBuffer:
    """A ring buffer of transitions. ``data``: dict of ``[capacity, ...]``
    arrays; ``ptr``: int32 row written next; ``size``: int32 rows filled."""

    data: Dict[str, jax.Array]
    ptr: jax.Array
    size: jax.Array

    @property
    def capacity(self) -> int:
        return jax.tree.leaves(self.data)[0].shape[0]


def buffer_init(example: Dict[str, jax.Array], capacity: int) -> ReplayBuffer:
    """An empty buffer for transitions shaped like ``example`` (one transition, no batch axis)."""
    data = jax.tree.map(lambda x: jnp.zeros((capacity,) + jnp.shape(x), jnp.asarray(x).dtype), example)
    return ReplayBuffer(data, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def buffer_add(buf: ReplayBuffer, batch: Dict[str, jax.Array]) -> ReplayBuffer:
    """Writes ``N <= capacity`` transitions (``[N, ...]``) at the ring position, overwriting the oldest."""
    cap = buf.capacity
    n = jax.tree.leaves(batch)[0].shape[0]
    rows = (buf.ptr + jnp.arange(n, dtype=jnp.int32)) % cap
    data = jax.tree.map(lambda d, x: d.at[rows].set(x.astype(d.dtype)), buf.data, batch)
    return ReplayBuffer(data, (buf.ptr + n) % cap, jnp.minimum(buf.size + n, cap).astype(jnp.int32))


def buffer_sample(buf: ReplayBuffer, key: jax.Array, n: int) -> Dict[str, jax.Array]:
    """``n`` transitions drawn uniformly (with replacement) from the filled rows; ``[n, ...]``."""
    rows = jax.random.randint(key, (n,), 0, jnp.maximum(buf.size, 1))
    return jax.tree.map(lambda d: jnp.take(d, rows, axis=0), buf.data)


# ---------------------------------------------------------------------------
# Per-layer statistics of an MLP
# ---------------------------------------------------------------------------


def mlp_layer_stats(net: networks.MLP, params, x, key, want: frozenset, rows: int,
                    sampled_loglik: Callable[[jax.Array, jax.Array], jax.Array]) -> Dict[str, LayerStats]:
    """``{"Dense_i": LayerStats}`` for ``networks.MLP`` ``net`` on ``x [B, in]``.

    Only the kinds in ``want`` are filled: ``outputs`` (post-activation, all
    ``B`` rows), ``inputs`` and ``preact_grads`` (first ``rows`` rows; the
    per-example gradients of ``sum(sampled_loglik(net(x), key))`` w.r.t. each
    pre-activation, through the MLP's zero ``perturbations``)."""
    curv_x = x[:rows]
    sown, grads = {}, {}
    if "preact_grads" in want:
        pert = jax.tree.map(jnp.zeros_like, jax.eval_shape(
            lambda: net.init(jax.random.key(0), curv_x)["perturbations"]))

        def loglik(pert):
            out, variables = net.apply({"params": params, "perturbations": pert}, curv_x,
                                       mutable=["intermediates"])
            return jnp.sum(sampled_loglik(out, key)), variables["intermediates"]

        g, inter = jax.grad(loglik, has_aux=True)(pert)
        grads = networks.by_layer(g)
        if "outputs" not in want or rows == x.shape[0]:
            sown = networks.by_layer(inter, sown=True)
    if want & {"inputs", "outputs"} and not sown:
        io_x = x if "outputs" in want else curv_x
        _, variables = net.apply({"params": params}, io_x, mutable=["intermediates"])
        sown = networks.by_layer(variables["intermediates"], sown=True)
    stats = {}
    for layer in params:
        if not layer.startswith("Dense_"):
            continue
        inputs, outputs = sown.get(layer, (None, None))
        stats[layer] = LayerStats(
            inputs=inputs[:rows] if "inputs" in want else None,
            outputs=outputs if "outputs" in want else None,
            preact_grads=grads.get(layer),
        )
    return stats


# ---------------------------------------------------------------------------
# Agent
# ---------------------------------------------------------------------------


@struct.dataclass
class TD3State:
    """Everything one agent carries between iterations (a pytree of arrays)."""

    params: Any  # {"actor": {...}, "critic": {...} with a leading axis of NUM_CRITICS}
    target_params: Any  # same structure
    opt_state: Any  # {"actor": ..., "critic": ... (leading axis NUM_CRITICS)}
    buffer: ReplayBuffer
    env_state: Any
    obs: jax.Array  # [num_envs, *obs_shape]
    key: jax.Array
    hparams: TD3HParams
    update_step: jax.Array  # int32: iterations done
    grad_step: jax.Array  # int32: critic gradient steps done
    last_return: jax.Array  # float32: mean return of the latest finished episodes


class TD3Agent(NamedTuple):
    """Pure functions of one agent; vmap them for a population."""

    config: TD3Config
    init: Callable[[jax.Array, TD3HParams], TD3State]
    update: Callable[[TD3State], Tuple[TD3State, Dict[str, jax.Array]]]
    run: Callable[[TD3State, int], Tuple[TD3State, Dict[str, jax.Array]]]
    train: Callable[[jax.Array, TD3HParams], Tuple[TD3State, Dict[str, jax.Array]]]
    tx: optax.GradientTransformationExtraArgs  # the transform applied to each part
    init_opt: Callable[[Any], Any]  # params -> opt_state (both parts)
    stats_needed: frozenset
    uses_lr: bool  # False: the optimizer has no injected learning rate, hparams.lr is unused
    act: Callable[[Any, jax.Array], jax.Array]  # (actor params, obs [N, ...]) -> normalised actions [N, A]
    q_values: Callable[[Any, jax.Array, jax.Array], jax.Array]  # (critic params, obs, action) -> [2, N]
    pbt_copy_fields: Tuple[str, ...] = ("target_params",)  # travel with params when PBT copies a member


def make_td3(config: TD3Config, env, env_params, tx: optax.GradientTransformation) -> TD3Agent:
    """Builds the TD3 agent for ``env`` (from ``envs.make``; a ``Box`` action
    space) and optimizer ``tx``."""
    vec_env = VecEnv(env, config.num_envs)
    action_space = env.action_space(env_params)
    if not isinstance(action_space, Box):
        raise ValueError(f"TD3 needs a continuous (Box) action space; the env has {action_space!r}")
    obs_shape = tuple(env.observation_space(env_params).shape)
    obs_dim = math.prod(obs_shape)
    act_dim = int(math.prod(action_space.shape))
    actor = networks.MLP(config.hidden_sizes, act_dim, config.activation, out_scale=0.01)
    critic = networks.MLP(config.hidden_sizes, 1, config.activation, out_scale=1.0)
    full_tx = tx
    if config.max_grad_norm > 0:
        full_tx = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), tx)

    def flat(obs):
        return obs.reshape((obs.shape[0], -1)).astype(jnp.float32)

    def to_env_action(a):
        """Normalised ``[-1, 1]`` actions -> the env's box."""
        space = env.action_space(env_params)
        low = jnp.broadcast_to(jnp.asarray(space.low, jnp.float32), space.shape)
        high = jnp.broadcast_to(jnp.asarray(space.high, jnp.float32), space.shape)
        return low + 0.5 * (a.reshape((a.shape[0],) + tuple(space.shape)) + 1.0) * (high - low)

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
    stats_needed = required_stats(full_tx, {"actor": params_shape["actor"]}) | required_stats(
        full_tx, {"critic": q_shape})
    injected_lr = get_hyperparam(jax.eval_shape(full_tx.init, {"actor": params_shape["actor"]}), "learning_rate")
    rows = config.curvature_rows

    def actor_loglik(out, key):  # Gaussian exploration-policy Fisher (module docstring)
        return gaussian_sampled_loglik(jnp.tanh(out), key)

    def transition_example():
        f32 = jnp.float32
        return dict(obs=jnp.zeros(obs_shape, f32), action=jnp.zeros((act_dim,), f32), reward=jnp.zeros((), f32),
                    next_obs=jnp.zeros(obs_shape, f32), terminated=jnp.zeros((), f32))

    def init(key: jax.Array, hparams: TD3HParams) -> TD3State:
        k_params, k_env, k_state = jax.random.split(key, 3)
        params = init_params(k_params)
        obs, env_state = vec_env.reset(k_env, env_params)
        return TD3State(
            params=params,
            target_params=params,
            opt_state=init_opt(params),
            buffer=buffer_init(transition_example(), config.buffer_size),
            env_state=env_state,
            obs=obs,
            key=k_state,
            hparams=jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), hparams),
            update_step=jnp.zeros((), jnp.int32),
            grad_step=jnp.zeros((), jnp.int32),
            last_return=jnp.zeros((), jnp.float32),
        )

    # Optimizer steps -----------------------------------------------------------

    def actor_step(params, opt_state, grads, stats, lr, extra):
        opt_state = set_hyperparam(opt_state, "learning_rate", lr)
        if stats is not None:
            extra = dict(extra, layer_stats={"actor": stats})
        upd, opt_state = full_tx.update({"actor": grads}, opt_state, {"actor": params}, **extra)
        return optax.apply_updates(params, upd["actor"]), opt_state

    def critic_step(params, opt_state, grads, stats, key, lr, train_fraction, batch_fraction):
        """One critic's step (vmapped over the critics)."""
        opt_state = set_hyperparam(opt_state, "learning_rate", lr)
        extra = dict(train_fraction=train_fraction, batch_fraction=batch_fraction, key=key)
        if stats is not None:
            extra["layer_stats"] = {"critic": stats}
        upd, opt_state = full_tx.update({"critic": grads}, opt_state, {"critic": params}, **extra)
        return optax.apply_updates(params, upd["critic"]), opt_state

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
        batch = buffer_sample(buffer, k_batch, config.batch_size)
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
            c_stats = jax.vmap(lambda p, k: mlp_layer_stats(critic, p, x, k, stats_needed, rows,
                                                            gaussian_sampled_loglik))(
                params["critic"], jax.random.split(k_cstats, NUM_CRITICS))
        critics, c_opt = jax.vmap(critic_step, in_axes=(0, 0, 0, 0, 0, None, None, None))(
            params["critic"], opt_state["critic"], c_grads, c_stats, jax.random.split(k_copt, NUM_CRITICS),
            hp.lr, train_fraction, batch_fraction)
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
                a_stats = mlp_layer_stats(actor, params["actor"], flat(batch["obs"]), k_astats, stats_needed,
                                          rows, actor_loglik)
            extra = dict(train_fraction=train_fraction, batch_fraction=batch_fraction, key=k_aopt)
            new_actor, new_a_opt = actor_step(params["actor"], a_opt, a_grads, a_stats, hp.lr, extra)
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
        buffer = buffer_add(state.buffer, dict(
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

        done = info["returned_episode"]
        n_done = done.sum()
        mean_ret = jnp.sum(info["returned_episode_return"] * done) / jnp.maximum(n_done, 1)
        last_return = jnp.where(n_done > 0, mean_ret, state.last_return)
        metrics = dict(summary)
        metrics.update(
            episode_return=last_return,
            episodes=n_done.astype(jnp.int32),
            trained=ready,
            finite=jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)])),
        )
        new_state = state.replace(
            params=params, target_params=target_params, opt_state=opt_state, buffer=buffer,
            env_state=env_state, obs=next_obs, key=key, update_step=state.update_step + 1,
            grad_step=grad_step, last_return=last_return,
        )
        return new_state, metrics

    def run(state: TD3State, num_updates: int):
        """``num_updates`` iterations (static) in one ``lax.scan``; metrics ``[num_updates]``."""
        return jax.lax.scan(lambda s, _: update(s), state, None, num_updates)

    def train(key: jax.Array, hparams: TD3HParams):
        """Whole training from scratch: ``config.num_updates`` iterations."""
        return run(init(key, hparams), config.num_updates)

    return TD3Agent(config, init, update, run, train, full_tx, init_opt, stats_needed, injected_lr is not None,
                    act, q_values)
