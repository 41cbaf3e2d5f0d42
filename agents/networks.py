"""Networks and action distributions shared by the agents.

``MLP`` names its dense layers ``Dense_0 .. Dense_n`` and sows each layer's
post-activation output (``"intermediates"`` collection, entry
``Dense_i_outputs``) so ``learned_optim.layer_stats.dense_layer_stats`` can
report it as ``LayerStats.outputs`` (OPEN's dormancy); layer inputs and
pre-activation gradients need nothing from the model.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from learned_optim.layer_stats import OUTPUTS_SUFFIX
from runtime.platform import one_matrix_at_a_time

ACTIVATIONS = {"tanh": nn.tanh, "relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu}


def orthogonal(scale: float = 1.0):
    """``flax.linen.initializers.orthogonal(scale)`` whose QR never runs batched.

    Under ``jax.vmap`` (a population, seeds) flax's initializer becomes one
    batched LAPACK QR, which can hang jaxlib 0.10's CPU thread pool
    (``runtime.platform.one_matrix_at_a_time`` says how). Here a vmapped init
    maps the QR over the batch one matrix at a time (``lax.map``), which gives
    the same matrices and costs nothing that matters (it runs once, at init)."""
    base = nn.initializers.orthogonal(scale)

    def init(key, shape, dtype=jnp.float32):
        typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        impl = jax.random.key_impl(key) if typed else None

        def one(key_data):
            k = jax.random.wrap_key_data(key_data, impl=impl) if typed else key_data
            return base(k, shape, dtype)

        return one_matrix_at_a_time(one)(jax.random.key_data(key) if typed else key)

    return init


class MLP(nn.Module):
    """Dense layers ``hidden_sizes + (out_size,)``; orthogonal init (scale
    sqrt(2) hidden, ``out_scale`` last), zero biases."""

    hidden_sizes: Sequence[int]
    out_size: int
    activation: str = "tanh"
    out_scale: float = 0.01
    log_std_dim: int = 0  # > 0: also a state-independent log-std parameter

    @nn.compact
    def __call__(self, x: jax.Array):
        """``x [B, in] -> [B, out_size]`` (and ``log_std [log_std_dim]`` if asked)."""
        act = ACTIVATIONS[self.activation]
        sizes = tuple(self.hidden_sizes) + (self.out_size,)
        for i, size in enumerate(sizes):
            last = i == len(sizes) - 1
            scale = self.out_scale if last else np.sqrt(2.0)
            pre = nn.Dense(
                size,
                kernel_init=orthogonal(scale),
                bias_init=nn.initializers.zeros,
                name=f"Dense_{i}",
            )(x)
            x = pre if last else act(pre)
            self.sow("intermediates", f"Dense_{i}{OUTPUTS_SUFFIX}", x)
        if self.log_std_dim:
            return x, self.param("log_std", nn.initializers.zeros, (self.log_std_dim,))
        return x


def flat(obs: jax.Array) -> jax.Array:
    """Observations ``[N, ...]`` as the networks' float32 input ``[N, prod(...)]``."""
    return obs.reshape((obs.shape[0], -1)).astype(jnp.float32)


# Distributions, written out (no distrax dependency) ---------------------------------


def categorical_sample(key, logits):
    return jax.random.categorical(key, logits).astype(jnp.int32)


def categorical_log_prob(logits, actions):
    logp = jax.nn.log_softmax(logits)
    return jnp.take_along_axis(logp, actions[..., None].astype(jnp.int32), axis=-1)[..., 0]


def categorical_entropy(logits):
    logp = jax.nn.log_softmax(logits)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def gaussian_sample(key, mean, log_std):
    return mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)


def gaussian_log_prob(mean, log_std, actions):
    z = (actions - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z**2 - log_std - 0.5 * jnp.log(2 * jnp.pi), axis=-1)


def gaussian_entropy(mean, log_std):
    return jnp.sum(log_std + 0.5 * (1.0 + jnp.log(2 * jnp.pi)), axis=-1) * jnp.ones(mean.shape[:-1])


class ActionDistribution(NamedTuple):
    """The policy's distribution over actions for a batch of ``N`` observations."""

    sample: Callable[[jax.Array], jax.Array]  # key -> actions [N] (int32) or [N, A]
    log_prob: Callable[[jax.Array], jax.Array]  # actions -> [N]
    entropy: Callable[[], jax.Array]  # () -> [N]


def action_distribution(actor_out, discrete: bool) -> ActionDistribution:
    """Categorical over ``logits [N, C]`` (``discrete``), else a diagonal Gaussian
    over ``actor_out = (mean [N, A], log_std [A])``."""
    if discrete:
        return ActionDistribution(lambda k: categorical_sample(k, actor_out),
                                  lambda a: categorical_log_prob(actor_out, a),
                                  lambda: categorical_entropy(actor_out))
    mean, log_std = actor_out
    return ActionDistribution(lambda k: gaussian_sample(k, mean, log_std),
                              lambda a: gaussian_log_prob(mean, log_std, a),
                              lambda: gaussian_entropy(mean, log_std))
