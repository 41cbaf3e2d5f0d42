"""What every agent shares: the protocol, the actor-critic networks, the
injected-optimizer plumbing, hyperparameter types and the training scans.

The protocol. ``make_<agent>(config, env, env_params, tx)`` returns an
``Agent`` (or a subclass with extra pure functions) of pure functions::

    state = agent.init(key, hparams, learning_rate=None)   # hparams: the agent's *HParams of float32 arrays
    state, metrics = agent.update(state)                   # one iteration
    state, metrics = agent.run(state, n)                   # n iterations in one lax.scan; metrics [n]
    state, metrics = agent.train(key, hparams, learning_rate=None)  # config.num_updates iterations from scratch

so a population is ``jax.jit(jax.vmap(agent.train))(keys, hparams, lrs)``.
Params are ``{"actor": ..., "critic": ...}``; every optimizer call passes the
extra arguments of ``learned_optim.context`` and, when the optimizer asks
(``stats_needed``), per-layer ``layer_stats`` from
``learned_optim.layer_stats.dense_layer_stats``.

The learning rate has one owner: the optimizer's injected ``learning_rate``
in ``state.opt_state`` (``optax.inject_hyperparams``). ``learning_rate``
reads it and ``with_learning_rate`` writes it (PBT does both between rounds);
``init``/``train`` write their ``learning_rate`` argument (a float, or one
per member under ``vmap``) into the fresh state, None keeping the
optimizer's own. Optimizers without one (OPEN) have none to read or write
(``uses_lr`` False).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from agents import networks
from envs.spaces import Box, Discrete
from learned_optim.context import get_hyperparam, required_stats, set_hyperparam
from learned_optim.layer_stats import dense_layer_stats, gaussian_sampled_loglik


@dataclasses.dataclass(frozen=True)
class Agent:
    """Pure functions of one agent; vmap them for a population."""

    config: Any
    init: Callable[..., Any]  # (key, hparams, learning_rate=None) -> state
    update: Callable[[Any], Tuple[Any, Dict[str, jax.Array]]]  # state -> (state, metrics)
    run: Callable[[Any, int], Tuple[Any, Dict[str, jax.Array]]]  # (state, n static) -> metrics [n]
    train: Callable[..., Tuple[Any, Dict[str, jax.Array]]]  # (key, hparams, learning_rate=None) -> (state, metrics)
    tx: optax.GradientTransformationExtraArgs  # the transform applied (clipping in front when configured)
    stats_needed: frozenset  # the LayerStats kinds the optimizer asks for
    uses_lr: bool  # False: the optimizer has no injected learning rate (``learning_rate(state)`` is None)


@struct.dataclass
class ActorCriticState:
    """Everything an on-policy agent (PPO, A2C) carries between iterations."""

    params: Any  # {"actor": {...}, "critic": {...}}
    opt_state: Any
    env_state: Any
    obs: jax.Array  # [num_envs, *obs_shape]
    key: jax.Array
    hparams: Any
    update_step: jax.Array  # int32: iterations done
    last_return: jax.Array  # float32: mean return of the latest finished episodes


# Hyperparameters --------------------------------------------------------------------


def with_defaults(cls, defaults: Dict[str, float], overrides: Dict[str, float], agent: str):
    """``cls(**defaults updated by overrides)`` as float32 arrays; an unknown
    name -> ``ValueError`` listing the allowed ones."""
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise ValueError(f"unknown {agent} hyperparameter(s) {sorted(unknown)}; allowed: {sorted(defaults)}")
    values = {**defaults, **overrides}
    return cls(**{k: jnp.asarray(v, jnp.float32) for k, v in values.items()})


def hparams_type(name: str, agent: str, defaults: Dict[str, float], module: str, doc: str):
    """A NamedTuple type ``name`` with the fields of ``defaults`` (float32
    scalars, or ``[P]`` for a population, so PBT can change them inside ``jit``)
    and ``default(**overrides)``, which fills in ``defaults``."""
    def default(cls, **overrides):
        """The default hyperparameters with ``overrides`` (by name) applied."""
        return with_defaults(cls, defaults, overrides, agent)

    cls = collections.namedtuple(name, tuple(defaults), module=module)
    cls.__doc__ = doc
    cls.DEFAULTS = dict(defaults)
    cls.default = classmethod(default)
    return cls


def as_float32(hparams):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), hparams)


# Config checks ------------------------------------------------------------------------


def check_positive_ints(config, *names: str) -> None:
    for name in names:
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive integer, got {v!r}")


def check_timesteps(config, steps_per_update: int, what: str) -> None:
    """``total_timesteps`` positive and at least one iteration (``what``)."""
    t = config.total_timesteps
    who = type(config).__name__
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
        raise ValueError(f"{who}.total_timesteps must be positive, got {t!r}")
    if t < steps_per_update:
        raise ValueError(f"{who}.total_timesteps={t} is less than one iteration ({what} = {steps_per_update})")


def check_network(config) -> None:
    """``activation``, ``max_grad_norm`` and ``curvature_batch_size`` (where the
    config has one); ``hidden_sizes`` becomes a tuple of ints."""
    who = type(config).__name__
    if config.activation not in networks.ACTIVATIONS:
        raise ValueError(f"{who}.activation={config.activation!r}; allowed: {sorted(networks.ACTIVATIONS)}")
    if not config.max_grad_norm >= 0:
        raise ValueError(f"{who}.max_grad_norm must be >= 0 (0 = no clipping), got {config.max_grad_norm!r}")
    if not getattr(config, "grad_clip", 0.0) >= 0:
        raise ValueError(f"{who}.grad_clip must be >= 0 (0 = no clipping), got {config.grad_clip!r}")
    rows = getattr(config, "curvature_batch_size", 0)
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ValueError(f"{who}.curvature_batch_size must be an integer >= 0 (0 = all rows), got {rows!r}")
    object.__setattr__(config, "hidden_sizes", tuple(int(h) for h in config.hidden_sizes))


class OnPolicyConfig:
    """What the configs of PPO and A2C share (mixed into their frozen
    dataclasses, which have ``num_envs``, ``num_steps``, ``total_timesteps`` and
    the ``check_network`` fields): one iteration is a ``num_steps``-step
    rollout of ``num_envs`` envs."""

    def __post_init__(self):
        check_positive_ints(self, "num_envs", "num_steps")
        check_timesteps(self, self.batch_size, "num_envs * num_steps")
        check_network(self)

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return int(self.total_timesteps) // self.batch_size


# Networks -------------------------------------------------------------------------------


def actor_and_critic(config, act_dim: int, log_std_dim: int = 0) -> Tuple[networks.MLP, networks.MLP]:
    """The two MLPs of ``config.hidden_sizes``: actor out ``act_dim`` (small
    init; ``log_std_dim > 0``: Gaussian log-std too), critic out 1."""
    actor = networks.MLP(config.hidden_sizes, act_dim, config.activation, out_scale=0.01, log_std_dim=log_std_dim)
    critic = networks.MLP(config.hidden_sizes, 1, config.activation, out_scale=1.0)
    return actor, critic


@dataclasses.dataclass(frozen=True)
class ActorCritic:
    """A stochastic policy and a state-value critic on flattened observations
    (PPO, A2C): discrete actions -> categorical, a ``Box`` -> diagonal Gaussian."""

    actor: networks.MLP
    critic: networks.MLP
    obs_shape: Tuple[int, ...]
    discrete: bool

    def init_params(self, key: jax.Array):
        k_a, k_c = jax.random.split(key)
        dummy = jnp.zeros((1, math.prod(self.obs_shape)), jnp.float32)
        return {"actor": self.actor.init(k_a, dummy)["params"], "critic": self.critic.init(k_c, dummy)["params"]}

    def policy(self, actor_params, obs: jax.Array) -> networks.ActionDistribution:
        """The action distribution at ``obs [N, ...]``."""
        return networks.action_distribution(self.actor.apply({"params": actor_params}, networks.flat(obs)),
                                            self.discrete)

    def value(self, critic_params, obs: jax.Array) -> jax.Array:
        """``V(obs)``, ``[N]``."""
        return self.critic.apply({"params": critic_params}, networks.flat(obs))[..., 0]

    def layer_stats(self, params, obs: jax.Array, key: jax.Array, kinds, rows: int):
        """``{"actor": ..., "critic": ...}`` ``layer_stats`` of ``kinds`` on ``obs
        [N, ...]``; curvature from the first ``rows`` (0: all). The Fisher's
        targets: actions sampled from the policy itself; values ``V + N(0, 1)``."""
        k_a, k_v = jax.random.split(key)
        x = networks.flat(obs)

        def actor_loglik(out, k):
            dist = networks.action_distribution(out, self.discrete)
            return dist.log_prob(jax.lax.stop_gradient(dist.sample(k)))

        def critic_loglik(out, k):
            return gaussian_sampled_loglik(out[..., 0], k)

        return {
            part: dense_layer_stats(net, {"params": params[part]}, x, loglik, k, kinds=kinds, curvature_rows=rows)
            for part, net, loglik, k in (("actor", self.actor, actor_loglik, k_a),
                                         ("critic", self.critic, critic_loglik, k_v))
        }


def make_actor_critic(config, env, env_params) -> ActorCritic:
    """The ``ActorCritic`` for ``env``'s spaces (``config``: hidden_sizes, activation)."""
    action_space = env.action_space(env_params)
    discrete = isinstance(action_space, Discrete)
    if not discrete and not isinstance(action_space, Box):
        raise ValueError(f"unsupported action space {action_space!r}")
    act_dim = action_space.n if discrete else int(action_space.shape[0])
    actor, critic = actor_and_critic(config, act_dim, log_std_dim=0 if discrete else act_dim)
    return ActorCritic(actor, critic, tuple(env.observation_space(env_params).shape), discrete)


# The injected optimizer ---------------------------------------------------------------------


def clip_each_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm(max_norm)`` applied to each top-level entry
    of a dict of updates on its own (``{"actor": ..., "critic": ...}``: each
    network clipped by its own norm, as OPEN's reference clips its separate
    actor and critic gradients, rl_optimizer/train.py:460-461)."""
    inner = optax.clip_by_global_norm(max_norm)

    def update(updates, state, params=None):
        if not isinstance(updates, Mapping):
            raise ValueError(f"clip_each_by_global_norm needs a dict of updates, got {type(updates).__name__}")
        return {k: inner.update(v, inner.init(v))[0] for k, v in updates.items()}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def with_clipping(tx: optax.GradientTransformation, max_grad_norm: float, grad_clip: float = 0.0,
                  per_network: bool = False):
    """``tx`` with ``clip_by_global_norm(max_grad_norm)`` (over the whole tree,
    or per top-level network with ``per_network``) and elementwise
    ``clip(grad_clip)`` chained in front (each only where > 0)."""
    norm_clip = clip_each_by_global_norm if per_network else optax.clip_by_global_norm
    front = ([optax.clip(grad_clip)] if grad_clip > 0 else []) + (
        [norm_clip(max_grad_norm)] if max_grad_norm > 0 else [])
    return optax.chain(*front, tx) if front else tx


def optimizer_needs(tx: optax.GradientTransformation, *param_shapes) -> Tuple[frozenset, bool]:
    """``(stats_needed, uses_lr)`` of ``tx`` applied to each of ``param_shapes``
    (trees of ``ShapeDtypeStruct``; ``uses_lr``: it has an injected learning rate)."""
    stats = frozenset().union(*(required_stats(tx, p) for p in param_shapes))
    uses_lr = get_hyperparam(jax.eval_shape(tx.init, param_shapes[0]), "learning_rate") is not None
    return stats, uses_lr


def optimizer_step(tx, params, opt_state, grads, **extra_args):
    """One step of ``tx`` (at the learning rate in ``opt_state``): ``(params, opt_state)``."""
    updates, opt_state = tx.update(grads, opt_state, params, **extra_args)
    return optax.apply_updates(params, updates), opt_state


def learning_rate(state) -> Optional[jax.Array]:
    """The injected ``learning_rate`` of ``state.opt_state`` (float32 scalar per
    member; the first found: TD3's parts hold equal ones), or None when the
    optimizer has none."""
    return get_hyperparam(state.opt_state, "learning_rate")


def with_learning_rate(state, lr):
    """``state`` with every injected ``learning_rate`` of its ``opt_state`` set
    to ``lr`` (dtype and shape kept). ``lr`` None, or an optimizer without an
    injected learning rate: ``state`` itself."""
    if lr is None:
        return state
    return state.replace(opt_state=set_hyperparam(state.opt_state, "learning_rate", lr))


# Metrics and loops ------------------------------------------------------------------------------


def all_finite(tree) -> jax.Array:
    """bool scalar: every leaf of ``tree`` finite."""
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def episode_summary(returns: jax.Array, dones: jax.Array, last_return: jax.Array):
    """``(mean return of the episodes that finished, else last_return; their count int32)``."""
    n_done = dones.sum()
    mean_ret = jnp.sum(returns * dones) / jnp.maximum(n_done, 1)
    return jnp.where(n_done > 0, mean_ret, last_return), n_done.astype(jnp.int32)


def episode_metrics(returns: jax.Array, dones: jax.Array, last_return: jax.Array) -> dict:
    """An update's episode metrics from ``returns``/``dones`` ``[T, N]`` (or
    ``[N]``): ``episode_return`` (mean return of the episodes that finished,
    else ``last_return``), ``episodes`` (their count) and, per env,
    ``env_episode_return [N]`` (the return of its last episode that finished in
    this update, 0 where none did) with ``env_episode_done [N]`` (whether one
    did): the individual episode returns PBT's selection compares."""
    mean_ret, n_done = episode_summary(returns, dones, last_return)
    r = returns.reshape((-1,) + returns.shape[-1:])
    d = dones.reshape((-1,) + dones.shape[-1:]).astype(bool)
    t = r.shape[0]
    last = t - 1 - jnp.argmax(d[::-1], axis=0)  # index of the last finished step per env
    done_env = jnp.any(d, axis=0)
    ret_env = jnp.take_along_axis(r, last[None, :], axis=0)[0]
    return dict(episode_return=mean_ret, episodes=n_done,
                env_episode_return=jnp.where(done_env, ret_env, 0.0).astype(jnp.float32),
                env_episode_done=done_env)


def make_run_train(init: Callable, update: Callable, num_updates: int):
    """``(run, train)``: ``run(state, n)`` is ``n`` (static) updates in one
    ``lax.scan`` (metrics ``[n]``); ``train(key, hparams, learning_rate=None)``
    runs ``num_updates`` from ``init``."""

    def run(state, n: int):
        return jax.lax.scan(lambda s, _: update(s), state, None, n)

    def train(key: jax.Array, hparams, learning_rate=None):
        return run(init(key, hparams, learning_rate), num_updates)

    return run, train
