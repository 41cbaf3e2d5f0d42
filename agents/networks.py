"""Networks and action distributions shared by the agents.

``MLP`` names its dense layers ``Dense_0 .. Dense_n`` and, on request, records
what optimizers may ask for (``learned_optim.context.LayerStats``):

* ``"intermediates"`` collection (``mutable=["intermediates"]``): per layer
  ``Dense_i_stats`` a tuple ``((inputs [B, in], outputs [B, out]),)``;
* ``"perturbations"`` collection: ``Dense_i_stats``, a zero ``[B, out]`` added to each layer's
  pre-activation, so ``jax.grad`` w.r.t. it gives per-example gradients of a
  summed loss w.r.t. the pre-activations (flax's ``Module.perturb``).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from runtime.platform import one_matrix_at_a_time

STATS_SUFFIX = "_stats"  # collection entries can't reuse the submodule's own name
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
            inputs = x
            pre = nn.Dense(
                size,
                kernel_init=orthogonal(scale),
                bias_init=nn.initializers.zeros,
                name=f"Dense_{i}",
            )(x)
            pre = self.perturb(f"Dense_{i}{STATS_SUFFIX}", pre)
            x = pre if last else act(pre)
            self.sow("intermediates", f"Dense_{i}{STATS_SUFFIX}", (inputs, x))
        if self.log_std_dim:
            return x, self.param("log_std", nn.initializers.zeros, (self.log_std_dim,))
        return x


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


def by_layer(collection: Optional[Dict[str, Any]], sown: bool = False) -> Dict[str, Any]:
    """Keys ``"Dense_0_stats"`` -> ``"Dense_0"``; sown tuples ``((in, out),)`` unwrapped."""
    return {
        k[: -len(STATS_SUFFIX)]: (v[0] if sown else v)
        for k, v in (collection or {}).items()
        if k.endswith(STATS_SUFFIX)
    }
