"""Shared pieces of the curvature-based optimizers (``kfac``, ``diag_ggn``):
dense-layer discovery, statistics lookup, health counters, the first-order
treatment of other leaves, the norm constraint and argument checks.

Which parameters count as dense layers
--------------------------------------
Any dict in the parameter tree whose keys are ``{"kernel"}`` or
``{"kernel", "bias"}`` with a 2-D kernel ``[in, out]`` (what ``flax.linen.Dense``
creates). Such a layer needs a ``LayerStats(inputs [B, in], preact_grads
[B, out])`` at the same position of the ``layer_stats`` tree; every other leaf
(e.g. a Gaussian policy's ``log_std``, conv kernels, embeddings) gets a
first-order update (see ``first_order_*``). With a bias, the bias is K-FAC's
"homogeneous coordinate": the layer is treated as one ``[in + 1, out]``
matrix whose last row is the bias.

Supplying ``layer_stats``
-------------------------
Our agents do it for you; in your own loop, ``learned_optim.layer_stats_for``
(or ``learned_optim.layer_stats.dense_layer_stats``) computes them for any flax
model built from ``nn.Dense`` (see ``learned_optim.layer_stats``). Called
without them, ``update`` raises a one-line ``ValueError`` at trace time naming
that helper; ``allow_missing_stats=True`` instead gives a dense layer without
statistics the plain gradient step (``fallback_scale * gradient``, counted in
``health.fallback_updates``), so it never trains as SGD unnoticed.
"""

from __future__ import annotations

from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from learned_optim.context import LayerStats

FIRST_ORDER_MODES = ("sgd", "rms")


# Dense-layer discovery ------------------------------------------------------------


def is_dense(node: Any) -> bool:
    """True for ``{"kernel": [in, out]}`` / ``{"kernel", "bias": [out]}`` dicts."""
    if not hasattr(node, "keys") or not hasattr(node, "__getitem__"):
        return False
    keys = set(node.keys())
    if "kernel" not in keys or not keys <= {"kernel", "bias"}:
        return False
    kernel = node["kernel"]
    if len(getattr(kernel, "shape", ())) != 2:
        return False
    if "bias" in keys:
        bias = node["bias"]
        return tuple(getattr(bias, "shape", ())) == (kernel.shape[1],)
    return True


def flatten_layers(tree: Any) -> Tuple[List[Tuple[Any, Any]], Any]:
    """``[(path, node)]`` where node is a dense-layer dict or another leaf, and
    the treedef to rebuild a tree of per-node values."""
    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_dense)
    return pairs, treedef


def path_str(path: Sequence[Any]) -> str:
    names = (str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
    return "/".join(names) or "<root>"


def layer_dims(node: Any) -> Tuple[int, int, bool]:
    """``(in, out, has_bias)`` of a dense-layer dict."""
    n_in, n_out = node["kernel"].shape
    return int(n_in), int(n_out), "bias" in node


def layer_matrix(node: Any) -> jax.Array:
    """Dense layer dict -> ``[in (+1), out]``: the kernel with the bias as last row."""
    kernel = node["kernel"]
    if "bias" in node:
        return jnp.concatenate([kernel, node["bias"][None, :].astype(kernel.dtype)], axis=0)
    return kernel


def unlayer_matrix(matrix: jax.Array, like: Any) -> Any:
    """Inverse of ``layer_matrix``: a dict structured like ``like``."""
    n_in = like["kernel"].shape[0]
    parts = {"kernel": matrix[:n_in], "bias": matrix[n_in] if matrix.shape[0] > n_in else None}

    def pick(path, x):
        return parts[path[-1].key].astype(x.dtype)

    return jax.tree_util.tree_map_with_path(pick, like)


# Statistics lookup and validation ---------------------------------------------------


def missing_stats_message(who: str, what: str = "update() got no layer_stats") -> str:
    """The one-line error for missing statistics: names the helper and the opt-out."""
    name = who.removeprefix("scale_by_")
    return (
        f"{who}: {what}, so it would train as plain SGD; in your own loop pass "
        f"layer_stats=learned_optim.layer_stats_for(model, params, x, key) at every step (built on "
        f"learned_optim.dense_layer_stats; our agents pass it themselves), or build the optimizer with "
        f"allow_missing_stats=True (spec '{name}:allow_missing_stats=1') to take plain gradient steps where "
        f"statistics are missing"
    )


def has_layer_stats(layer_stats: Any, path: Sequence[Any]) -> bool:
    """Whether ``layer_stats`` holds a ``LayerStats`` with inputs and preact_grads at ``path``."""
    stats = None if layer_stats is None else _lookup(layer_stats, path)
    return isinstance(stats, LayerStats) and stats.inputs is not None and stats.preact_grads is not None


def missing_layers(layer_stats: Any, pairs, allow_missing: bool) -> List[bool]:
    """Per ``(path, node)``: a dense layer without statistics, which may then take
    a plain gradient step (``allow_missing``); all False otherwise (the lookup
    raises later)."""
    if not allow_missing:
        return [False] * len(pairs)
    return [is_dense(node) and not has_layer_stats(layer_stats, path) for path, node in pairs]


def check_has_dense(pairs, who: str, allow_missing: bool) -> None:
    """A params tree without dense layers would take first-order steps only:
    a ``ValueError`` at trace time unless ``allow_missing``."""
    if not allow_missing and not any(is_dense(node) for _, node in pairs):
        name = who.removeprefix("scale_by_")
        raise ValueError(
            f"{who}: the params tree has no dense layers ({{'kernel': [in, out], 'bias': [out]}} dicts, as "
            f"flax.linen.Dense makes), so every leaf would take a plain first-order step; build it with "
            f"allow_missing_stats=True (spec '{name}:allow_missing_stats=1') if that is what you want"
        )


def _lookup(tree: Any, path: Sequence[Any]) -> Any:
    node = tree
    for k in path:
        if node is None:
            return None
        if hasattr(k, "key"):
            node = node.get(k.key) if hasattr(node, "get") else None
        elif hasattr(k, "idx"):
            node = node[k.idx] if isinstance(node, (list, tuple)) and k.idx < len(node) else None
        elif hasattr(k, "name"):
            node = getattr(node, k.name, None)
        else:
            return None
    return node


def layer_inputs_and_grads(
    layer_stats: Any, path: Sequence[Any], node: Any, who: str
) -> Tuple[jax.Array, jax.Array]:
    """``(inputs [N, in (+1)], preact_grads [N, out])`` for the dense layer at
    ``path`` (leading axes flattened into ``N``; a ones column appended to the
    inputs when the layer has a bias). Raises ``ValueError`` at trace time if
    they are missing or mis-shaped."""
    if layer_stats is None:
        raise ValueError(missing_stats_message(who))
    stats = _lookup(layer_stats, path)
    where = path_str(path)
    if not isinstance(stats, LayerStats) or stats.inputs is None or stats.preact_grads is None:
        raise ValueError(missing_stats_message(
            who, f"layer_stats has no LayerStats with inputs and preact_grads for dense layer {where!r} "
                 f"(found {type(stats).__name__})"))
    n_in, n_out, has_bias = layer_dims(node)
    a, g = jnp.asarray(stats.inputs), jnp.asarray(stats.preact_grads)
    if a.ndim < 1 or a.shape[-1] != n_in:
        raise ValueError(f"{who}: layer_stats[{where!r}].inputs has shape {a.shape}; expected [B, {n_in}]")
    if g.ndim < 1 or g.shape[-1] != n_out:
        raise ValueError(
            f"{who}: layer_stats[{where!r}].preact_grads has shape {g.shape}; expected [B, {n_out}]"
        )
    if a.shape[:-1] != g.shape[:-1]:
        raise ValueError(
            f"{who}: layer_stats[{where!r}] inputs {a.shape} and preact_grads {g.shape} disagree on the "
            f"batch axes"
        )
    a = a.reshape((-1, n_in)).astype(jnp.float32)
    g = g.reshape((-1, n_out)).astype(jnp.float32)
    if has_bias:
        a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)
    return a, g


def all_finite(*xs: jax.Array) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))


# Health counters ---------------------------------------------------------------------


class CurvatureHealth(NamedTuple):
    """int32 counters of the safety nets (all zero in a healthy run).

    skipped_stats:         layer-steps whose batch statistics were not finite;
                           the curvature estimate was left unchanged.
    failed_factorizations: layer-refreshes whose eigendecomposition was not
                           finite; the previous one was kept (K-FAC only).
    fallback_updates:      layer-steps whose preconditioned step was not
                           finite (or the damping was <= 0 / not finite); the
                           safe first-order step was used instead.
    """

    skipped_stats: jax.Array
    failed_factorizations: jax.Array
    fallback_updates: jax.Array

    @classmethod
    def zeros(cls) -> "CurvatureHealth":
        z = jnp.zeros((), jnp.int32)
        return cls(z, z, z)


def count(flags: Sequence[jax.Array]) -> jax.Array:
    if not flags:
        return jnp.zeros((), jnp.int32)
    return jnp.sum(jnp.stack([jnp.asarray(f, jnp.int32) for f in flags])).astype(jnp.int32)


# First-order treatment of non-dense leaves ----------------------------------------


class FirstOrderState(NamedTuple):
    """State of a non-dense leaf: ``nu`` is the EMA of squared gradients
    (used by ``first_order="rms"``; kept, and zero, under ``"sgd"`` so the
    state structure does not depend on the mode)."""

    nu: jax.Array


def first_order_init(x: jax.Array) -> FirstOrderState:
    return FirstOrderState(nu=jnp.zeros(jnp.shape(x), jnp.float32))


def first_order_update(
    g: jax.Array, state: FirstOrderState, mode: str, decay: float = 0.99, eps: float = 1e-8
) -> Tuple[jax.Array, FirstOrderState]:
    """``"sgd"``: the gradient unchanged (it is then scaled by the learning rate
    like every other step). ``"rms"``: ``g / (sqrt(nu) + eps)`` with ``nu`` a
    bias-uncorrected EMA of ``g**2`` (RMSprop)."""
    if mode == "sgd":
        return g, state
    nu = decay * state.nu + (1.0 - decay) * jnp.square(g.astype(jnp.float32))
    return (g / (jnp.sqrt(nu) + eps)).astype(g.dtype), FirstOrderState(nu=nu)


def check_first_order(mode: str, who: str) -> None:
    if mode not in FIRST_ORDER_MODES:
        raise ValueError(f"{who}: first_order={mode!r}; allowed: {', '.join(FIRST_ORDER_MODES)}")


# Norm constraint ---------------------------------------------------------------------


def norm_constraint_scale(
    updates: Sequence[jax.Array], grads: Sequence[jax.Array], norm_constraint, learning_rate
) -> jax.Array:
    """kfac-jax's norm constraint: the factor ``min(1, sqrt(c / (lr^2 u.g)))``
    that keeps the approximate squared curvature norm of the step ``lr * u``
    (``lr^2 u^T F u ~ lr^2 u.g``, as ``u ~ F^-1 g``) below ``c``. ``c <= 0``
    switches it off (factor 1)."""
    c = jnp.asarray(norm_constraint, jnp.float32)
    lr = jnp.abs(jnp.asarray(learning_rate, jnp.float32))
    sq = sum(jnp.vdot(u.astype(jnp.float32), g.astype(jnp.float32)) for u, g in zip(updates, grads))
    sq = jnp.abs(jnp.asarray(sq, jnp.float32)) * jnp.square(lr)
    scale = jnp.minimum(1.0, jnp.sqrt(jnp.maximum(c, 0.0) / jnp.maximum(sq, 1e-30)))
    return jnp.where((c > 0) & jnp.isfinite(scale), scale, 1.0)


# Scaffolding shared by the curvature transforms ---------------------------------------


def init_layer_states(params: Any, init_dense: Callable[[Any], Any]) -> Any:
    """Per-layer states in the layer tree of ``params``: ``init_dense(node)``
    for dense layers, ``first_order_init`` for other leaves."""
    pairs, treedef = flatten_layers(params)
    states = [init_dense(n) if is_dense(n) else first_order_init(n) for _, n in pairs]
    return jax.tree_util.tree_unflatten(treedef, states)


def pair_layer_states(updates: Any, layers: Any, is_layer_state: Callable[[Any], bool], who: str):
    """``(pairs, treedef, layer_states)``: the layers of ``updates`` beside
    their states; a state made for another parameter tree -> ``ValueError``."""
    pairs, treedef = flatten_layers(updates)
    layer_states = jax.tree_util.tree_leaves(layers, is_leaf=is_layer_state)
    if len(layer_states) != len(pairs):
        raise ValueError(f"{who}: the state was made for a different parameter tree")
    return pairs, treedef, layer_states


def finish_steps(outs: List[Any], pairs, treedef, norm_constraint, learning_rate) -> Any:
    """The per-layer steps ``outs`` scaled by the norm constraint, as a tree."""
    scale = norm_constraint_scale(
        jax.tree_util.tree_leaves(outs), jax.tree_util.tree_leaves([n for _, n in pairs]),
        norm_constraint, learning_rate,
    )
    outs = [jax.tree.map(lambda x: (x * scale).astype(x.dtype), o) for o in outs]
    return jax.tree_util.tree_unflatten(treedef, outs)


def next_health(health: CurvatureHealth, skipped, fell_back, failed=None) -> CurvatureHealth:
    return CurvatureHealth(
        skipped_stats=health.skipped_stats + count(skipped),
        failed_factorizations=health.failed_factorizations + (0 if failed is None else failed),
        fallback_updates=health.fallback_updates + count(fell_back),
    )


# Argument checks of the public factories ---------------------------------------------


def check_injected(who: str, learning_rate, damping, ema_decay, norm_constraint) -> None:
    """Checks the injected hyperparameters shared by K-FAC and diagonal GGN."""
    if not callable(learning_rate):
        check_number("learning_rate", learning_rate, who)
    check_number("damping", damping, who)
    check_number("ema_decay", ema_decay, who, 0.0, 1.0)
    check_number("norm_constraint", norm_constraint, who)


def check_number(name: str, value: Any, who: str, low: float = 0.0, high: Optional[float] = None,
                 low_inclusive: bool = True, high_inclusive: bool = False) -> None:
    """Checks a Python-number setting (traced values and schedules pass)."""
    if callable(value):
        return
    if isinstance(value, (jax.Array, np.ndarray)):
        if np.ndim(value) != 0:
            return  # a population's worth of values
        try:
            value = float(value)
        except TypeError:  # traced: checked where it is made, if anywhere
            return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{who}: {name} must be a number, got {value!r}")
    bad_low = value < low if low_inclusive else value <= low
    bad_high = high is not None and (value > high if high_inclusive else value >= high)
    if bad_low or bad_high or not np.isfinite(value):
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive else ")"
        rng = f"{lo}{low:g}, {high:g}{hi}" if high is not None else f"{lo}{low:g}, inf)"
        raise ValueError(f"{who}: {name}={value!r} is outside {rng}")
