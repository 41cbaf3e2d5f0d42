"""The GRU cell every learned rule uses (OPEN, Optim4RL, ``GRURule``).

Parameters are a flax ``nn.GRUCell``'s (so published weights and flax inits
load as they are); the forward pass is written here once, feature-major:
``[features, N]`` over the ``N`` parameter elements. Laid out so, its layers
are matmuls ``[out, in] @ [in, N]`` and elementwise passes over contiguous
``N``-vectors, which CPU GEMMs and XLA's loop emitter handle far better than
``[N, features]`` with its short minor axis (measured 2-2.5x on
MinAtar-sized agents).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class GRUWeights(NamedTuple):
    """A flax ``GRUCell``'s parameters arranged for ``gru_cell``."""

    w_in: jax.Array      # [3H, I]  gates in order reset, update, candidate
    b_in: jax.Array      # [3H]
    w_hidden: jax.Array  # [3H, H]
    b_hn: jax.Array      # [H]      hidden-side bias of the candidate gate


def gru_weights(gru_params: Any) -> GRUWeights:
    """From flax ``GRUCell`` variables ``{"params": {"ir", "iz", "in", "hr", "hz", "hn"}}``."""
    p = gru_params["params"]
    return GRUWeights(
        w_in=jnp.concatenate([p[f"i{g}"]["kernel"] for g in "rzn"], axis=1).T,
        b_in=jnp.concatenate([p[f"i{g}"]["bias"] for g in "rzn"]),
        w_hidden=jnp.concatenate([p[f"h{g}"]["kernel"] for g in "rzn"], axis=1).T,
        b_hn=p["hn"]["bias"],
    )


def gru_cell(w: GRUWeights, carry: jax.Array, x: jax.Array) -> jax.Array:
    """flax ``GRUCell`` on feature-major data: ``carry [H, N]``, ``x [I, N]`` ->
    new carry ``[H, N]`` (= the cell's output); equal to
    ``GRUCell.apply(params, carry.T, x.T)[0].T`` up to float rounding."""
    hsize = carry.shape[0]
    gi = jnp.dot(w.w_in, x) + w.b_in[:, None]                            # [3H, N]
    gh = jnp.dot(w.w_hidden, carry)                                      # [3H, N]
    rz = jax.nn.sigmoid(gi[:2 * hsize] + gh[:2 * hsize])
    n = jnp.tanh(gi[2 * hsize:] + rz[:hsize] * (gh[2 * hsize:] + w.b_hn[:, None]))
    return n + rz[hsize:] * (carry - n)                                  # (1 - z) n + z h
