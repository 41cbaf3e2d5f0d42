"""Per-parameter input features of the learned rules: the one per-tensor
normalisation, momenta and dormancy.

Shapes: ``S`` a leaf's shape, ``N`` all elements of all leaves laid end to
end (``learned_optim.layout``), ``F``/``K`` feature and momentum axes.
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import jax
import jax.numpy as jnp

from learned_optim.layout import FlatLayout, LeafInfo

NORM_EPS = 1e-5
NEUTRAL_DORMANCY = 1.0  # a neuron exactly as active as its layer's average


# Normalisation ----------------------------------------------------------------------


def normalise(x: jax.Array, axes: Tuple[int, ...], eps: float = NORM_EPS) -> jax.Array:
    """``x / sqrt(eps + mean(x**2))``, the mean over ``axes`` (one tensor's
    elements), separately along every other axis (the features).

    ``x [*S, F]`` with ``axes = range(len(S))``, or feature-major ``x [F, n]``
    with ``axes = (1,)``."""
    return x * jax.lax.rsqrt(eps + jnp.mean(jnp.square(x), axis=axes, keepdims=True))


def normalise_by_tensor(x: jax.Array, spans: Sequence[Tuple[int, int]], axis: int) -> jax.Array:
    """``normalise`` of each tensor's elements of ``x``, all tensors laid end
    to end along ``axis`` (``[N, F]`` with ``axis=0`` or ``[F, N]`` with
    ``axis=1``); ``spans`` are the tensors' static ``(start, end)`` ranges.

    Each tensor's slice is scaled by its own statistics and the pieces
    concatenated, which XLA writes in one pass (cheaper than a segment sum
    whose per-tensor scales are gathered back over all ``N`` elements)."""
    pieces = [normalise(jax.lax.slice_in_dim(x, a, b, axis=axis), (axis,)) for a, b in spans]
    return jnp.concatenate(pieces, axis=axis)


# Momenta ------------------------------------------------------------------------------


def update_momenta(m: jax.Array, g: jax.Array, betas: Sequence[float], axis: int = -1) -> jax.Array:
    """``m_k <- beta_k m_k + (1 - beta_k) g`` for each beta (no bias correction).

    ``g`` any shape; ``m`` like ``g`` with a ``K = len(betas)`` axis at
    ``axis`` (``[*S, K]`` by default, feature-major ``[K, N]`` with
    ``axis=0``). float32."""
    shape = [1] * m.ndim
    shape[axis] = len(betas)
    b = jnp.asarray(betas, jnp.float32).reshape(shape)
    return b * m + (1.0 - b) * jnp.expand_dims(g.astype(jnp.float32), axis)


# Dormancy -----------------------------------------------------------------------------


def dormancy(outputs: jax.Array) -> jax.Array:
    """Per-neuron activity relative to its layer: ``[B, out] -> [out]``,
    ``a_j / mean_j(a_j)`` with ``a_j = mean_B |out_j| + 1e-11``."""
    a = jnp.mean(jnp.abs(outputs.astype(jnp.float32)), axis=tuple(range(outputs.ndim - 1))) + 1e-11
    return a / jnp.sum(jnp.abs(a)) * a.shape[-1]


def leaf_dormancy(layer_stats: Any, info: LeafInfo, shape: Tuple[int, ...]) -> jax.Array:
    """Dormancy broadcast to a leaf of ``shape`` (a kernel entry takes its
    output neuron's value, a bias likewise); ``NEUTRAL_DORMANCY`` where the
    leaf has no dense layer or no ``outputs`` statistics were passed."""
    stats = None
    if layer_stats is not None and info.layer is not None:
        node = layer_stats.get(info.part, None) if info.part is not None else layer_stats
        stats = node.get(info.layer) if isinstance(node, dict) else None
    outputs = getattr(stats, "outputs", None)
    if outputs is None:
        return jnp.full(shape, NEUTRAL_DORMANCY, jnp.float32)
    d = dormancy(outputs)
    if not shape or shape[-1] != d.shape[-1]:
        raise ValueError(
            f"layer_stats for {'/'.join(info.path)}: outputs have {d.shape[-1]} neurons but the "
            f"parameter has shape {shape}"
        )
    return jnp.broadcast_to(d, shape)


def flat_dormancy(layer_stats: Any, infos: Sequence[LeafInfo], layout: FlatLayout) -> jax.Array:
    """``[N]``: ``leaf_dormancy`` of every leaf laid end to end."""
    if layer_stats is None:
        return jnp.full((layout.size,), NEUTRAL_DORMANCY, jnp.float32)
    return jnp.concatenate([jnp.ravel(leaf_dormancy(layer_stats, i, s)) for i, s in zip(infos, layout.shapes)])
