"""The frame K-FAC and diagonal GGN share: state, init, update, safe steps.

Both keep one curvature state per dense layer (and a first-order state per
other leaf), read the agents' ``layer_stats``, precondition each dense
layer's ``[in + 1, out]`` gradient matrix, fall back to a scaled gradient
where that is not finite, and apply the optional norm constraint
(``learned_optim.curvature`` has the per-layer helpers).
"""

from __future__ import annotations

from typing import Any, Callable, List, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import optax

from learned_optim import curvature as cv

# The numeric settings both specs accept (``kfac:lr=...``, ``diag_ggn:lr=...``).
SPEC_NUMBERS = ("learning_rate", "damping", "ema_decay", "norm_constraint", "min_damping", "fallback_scale")


class CurvatureState(NamedTuple):
    """``count``: steps done (int32). ``layers``: a tree like params where each
    dense layer dict is the optimizer's layer state and every other leaf a
    ``curvature.FirstOrderState``. ``health``: ``curvature.CurvatureHealth``."""

    count: jax.Array
    layers: Any
    health: cv.CurvatureHealth

    required_stats = frozenset({"inputs", "preact_grads"})


# ``(pairs, layer_states, state, layer_stats) -> (outs, new_layer_states, health)``:
# one update of every layer, ``pairs`` the ``(path, node)`` of each gradient
# node (dense layer dict or other leaf), ``outs`` their steps.
LayerSteps = Callable[[List[Tuple[Any, Any]], List[Any], CurvatureState, Any],
                      Tuple[List[Any], List[Any], cv.CurvatureHealth]]


def layerwise_transform(
    who: str,
    state_cls: type,
    init_dense: Callable[[Any], Any],
    is_layer_state: Callable[[Any], bool],
    layer_steps: LayerSteps,
    norm_constraint: Any,
    learning_rate: Any,
    allow_missing_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """The optax transform around ``layer_steps`` (``state_cls``: a
    ``CurvatureState`` subclass; ``init_dense(layer dict)`` a dense layer's
    initial state). Its updates have the gradient's sign. A params tree
    without dense layers is a ``ValueError`` unless ``allow_missing_stats``."""

    def init_fn(params):
        return state_cls(
            count=jnp.zeros((), jnp.int32),
            layers=cv.init_layer_states(params, init_dense),
            health=cv.CurvatureHealth.zeros(),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params
        pairs, treedef, layer_states = cv.pair_layer_states(updates, state.layers, is_layer_state, who)
        cv.check_has_dense(pairs, who, allow_missing_stats)
        outs, new_states, health = layer_steps(pairs, layer_states, state, extra_args.get("layer_stats"))
        new_state = state_cls(
            count=optax.safe_increment(state.count),
            layers=jax.tree_util.tree_unflatten(treedef, new_states),
            health=health,
        )
        return cv.finish_steps(outs, pairs, treedef, norm_constraint, learning_rate), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def effective_damping(damping: Any, min_damping: float) -> Tuple[jax.Array, jax.Array]:
    """``(lambda, ok)``: ``max(damping, min_damping)`` float32 and whether it is
    finite and positive (a NaN set by an outer loop is not)."""
    lam = jnp.maximum(jnp.asarray(damping, jnp.float32), jnp.float32(min_damping))
    return lam, jnp.isfinite(lam) & (lam > 0)


def safe_step(u: jax.Array, v: jax.Array, damping_ok: jax.Array, fallback_scale: float):
    """``(step, ok)``: the preconditioned ``u`` where it and the damping are
    fine, else ``fallback_scale * v`` (``v`` the gradient matrix)."""
    ok = damping_ok & cv.all_finite(u)
    return jnp.where(ok, u, fallback_scale * v.astype(jnp.float32)), ok


def missing_stats_step(v: jax.Array, fallback_scale: float) -> jax.Array:
    """A dense layer's step without statistics (``allow_missing_stats``): the
    plain gradient matrix ``v`` times ``fallback_scale``."""
    return fallback_scale * v.astype(jnp.float32)


def check_common(who: str, first_order: str, min_damping: float, fallback_scale: float,
                 allow_missing_stats: Any = False) -> None:
    """Checks the static settings both optimizers take."""
    if not isinstance(allow_missing_stats, (bool, int)) or allow_missing_stats not in (0, 1):
        raise ValueError(f"{who}: allow_missing_stats must be True/False (spec: 1/0), got {allow_missing_stats!r}")
    cv.check_first_order(first_order, who)
    cv.check_number("min_damping", min_damping, who)
    cv.check_number("fallback_scale", fallback_scale, who)


def first_order_leaf(node: Any, ls: Any, first_order: str, outs: List[Any], states: List[Any]) -> None:
    """Appends a non-dense leaf's first-order step and state."""
    u, ls = cv.first_order_update(node, ls, first_order)
    outs.append(u)
    states.append(ls)
