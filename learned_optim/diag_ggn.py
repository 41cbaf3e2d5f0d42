"""Diagonal Gauss-Newton / Fisher preconditioning as an optax transform.

``diag_ggn(learning_rate, damping, ...)`` is ``chain(scale_by_diag_ggn(...),
scale_by_learning_rate(learning_rate))`` built with
``optax.inject_hyperparams`` (``learning_rate``, ``damping``, ``ema_decay``,
``norm_constraint`` in ``state.hyperparams``). Spec:
``diag_ggn:lr=0.01,damping=1e-3,mode=natural|sqrt,...``.

Per dense layer, from the same ``layer_stats`` as K-FAC (``a_i = [inputs_i,
1]``, ``g_i = preact_grads_i``; see ``learned_optim.curvature``): the exact
diagonal of the Fisher of the ``[in + 1, out]`` layer matrix (kernel with the
bias as last row),

    F[k, j] = 1/N sum_i a_i[k]^2 g_i[j]^2,

i.e. the diagonal of ``1/N sum_i vec(a_i g_i^T) vec(a_i g_i^T)^T``: no
Kronecker approximation, but no off-diagonal terms either. With targets
sampled from the model (as our agents do) it is the true Fisher's
(= GGN's) diagonal. It is an EMA (decay ``ema_decay``, bias-corrected) and the
step is

    mode="natural" (default):  v / (F + lambda)
    mode="sqrt":               v / (sqrt(F) + lambda)   (Adam-like scale invariance)

with ``lambda = max(damping, min_damping)``. ``"natural"`` is the damped
diagonal natural-gradient step (``lambda`` in Fisher units, like K-FAC's
damping); ``"sqrt"`` behaves like Adam with the per-example Fisher diagonal
in place of the squared mean gradient (``lambda`` plays Adam's eps).

Non-dense leaves, the norm constraint and the safety nets are as in
``learned_optim.kfac`` (there is no factorisation here, so
``health.failed_factorizations`` stays 0).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from learned_optim import curvature as cv

MODES = ("natural", "sqrt")
_WHO = "scale_by_diag_ggn"


class DiagGGNLayerState(NamedTuple):
    """``diag``: ``[n, out]`` EMA sum of the Fisher diagonal of the layer
    matrix (``n = in + 1`` with a bias); ``weight``: ``[]`` EMA of weights
    (the estimate is ``diag / weight``)."""

    diag: jax.Array
    weight: jax.Array


class ScaleByDiagGGNState(NamedTuple):
    """``count`` (int32), ``layers`` (tree like params: ``DiagGGNLayerState``
    per dense layer, ``curvature.FirstOrderState`` per other leaf),
    ``health`` (``curvature.CurvatureHealth``)."""

    count: jax.Array
    layers: Any
    health: cv.CurvatureHealth

    required_stats = frozenset({"inputs", "preact_grads"})


def _is_layer_state(x: Any) -> bool:
    return isinstance(x, (DiagGGNLayerState, cv.FirstOrderState))


def _init_layer(node: Any) -> DiagGGNLayerState:
    n_in, n_out, has_bias = cv.layer_dims(node)
    return DiagGGNLayerState(
        diag=jnp.zeros((n_in + int(has_bias), n_out), jnp.float32), weight=jnp.zeros((), jnp.float32)
    )


def scale_by_diag_ggn(
    damping: float = 1e-3,
    ema_decay: float = 0.95,
    mode: str = "natural",
    first_order: str = "sgd",
    norm_constraint: float = 0.0,
    learning_rate: float = 1.0,
    min_damping: float = 1e-8,
    fallback_scale: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
    """Preconditions dense layers by the damped Fisher diagonal (see module
    docstring); ``update`` needs ``layer_stats``. ``learning_rate`` is used only
    by the norm constraint. Returns steps with the gradient's sign."""
    _check_static(mode, first_order, min_damping, fallback_scale)

    def init_fn(params):
        return ScaleByDiagGGNState(
            count=jnp.zeros((), jnp.int32),
            layers=cv.init_layer_states(params, _init_layer),
            health=cv.CurvatureHealth.zeros(),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params
        pairs, treedef, layer_states = cv.pair_layer_states(updates, state.layers, _is_layer_state, _WHO)
        layer_stats = extra_args.get("layer_stats")
        decay = jnp.asarray(ema_decay, jnp.float32)
        lam = jnp.maximum(jnp.asarray(damping, jnp.float32), jnp.float32(min_damping))
        lam_ok = jnp.isfinite(lam) & (lam > 0)

        outs, new_states, skipped, fell_back = [], [], [], []
        for (path, node), ls in zip(pairs, layer_states):
            if not cv.is_dense(node):
                u, ls = cv.first_order_update(node, ls, first_order)
                outs.append(u)
                new_states.append(ls)
                continue
            a, g = cv.layer_inputs_and_grads(layer_stats, path, node, _WHO)
            batch = jnp.square(a).T @ jnp.square(g) / a.shape[0]
            ok_stats = cv.all_finite(batch)
            ls = DiagGGNLayerState(
                diag=jnp.where(ok_stats, decay * ls.diag + (1 - decay) * batch, ls.diag),
                weight=jnp.where(ok_stats, decay * ls.weight + (1 - decay), ls.weight),
            )
            fisher = jnp.maximum(ls.diag / jnp.maximum(ls.weight, 1e-30), 0.0)
            curv = fisher if mode == "natural" else jnp.sqrt(fisher)
            v = cv.layer_matrix(node).astype(jnp.float32)
            u = v / (curv + lam)
            ok = lam_ok & cv.all_finite(u)
            u = jnp.where(ok, u, fallback_scale * v)
            outs.append(cv.unlayer_matrix(u, node))
            new_states.append(ls)
            skipped.append(~ok_stats)
            fell_back.append(~ok)

        new_state = ScaleByDiagGGNState(
            count=optax.safe_increment(state.count),
            layers=jax.tree_util.tree_unflatten(treedef, new_states),
            health=cv.next_health(state.health, skipped, fell_back),
        )
        return cv.finish_steps(outs, pairs, treedef, norm_constraint, learning_rate), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_static(mode, first_order, min_damping, fallback_scale):
    if mode not in MODES:
        raise ValueError(f"diag_ggn: mode={mode!r}; allowed: {', '.join(MODES)}")
    cv.check_first_order(first_order, "diag_ggn")
    cv.check_number("min_damping", min_damping, "diag_ggn")
    cv.check_number("fallback_scale", fallback_scale, "diag_ggn")


def _diag_ggn_chain(learning_rate, damping, ema_decay, norm_constraint, mode, first_order,
                    min_damping, fallback_scale):
    return optax.chain(
        scale_by_diag_ggn(
            damping=damping, ema_decay=ema_decay, mode=mode, first_order=first_order,
            norm_constraint=norm_constraint, learning_rate=learning_rate, min_damping=min_damping,
            fallback_scale=fallback_scale,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


_STATIC = ("mode", "first_order", "min_damping", "fallback_scale")


def diag_ggn(
    learning_rate: float = 0.01,
    damping: float = 1e-3,
    ema_decay: float = 0.95,
    norm_constraint: float = 1e-3,
    mode: str = "natural",
    first_order: str = "sgd",
    min_damping: float = 1e-8,
    fallback_scale: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
    """Diagonal GGN: ``-learning_rate * scale_by_diag_ggn(...)``, with
    ``learning_rate``, ``damping``, ``ema_decay``, ``norm_constraint`` injected
    (``norm_constraint=0`` disables it). ``ValueError`` on bad settings."""
    cv.check_injected("diag_ggn", learning_rate, damping, ema_decay, norm_constraint)
    _check_static(mode, first_order, min_damping, fallback_scale)
    return optax.inject_hyperparams(_diag_ggn_chain, static_args=_STATIC)(
        learning_rate=learning_rate, damping=damping, ema_decay=ema_decay,
        norm_constraint=norm_constraint, mode=mode, first_order=first_order,
        min_damping=min_damping, fallback_scale=fallback_scale,
    )


SPEC_ALIASES = {"lr": "learning_rate", "ema": "ema_decay", "norm": "norm_constraint"}


def from_spec_arg(arg: str) -> optax.GradientTransformationExtraArgs:
    """``diag_ggn:lr=0.01,damping=1e-3,ema_decay=0.95,norm_constraint=1e-3,
    mode=natural|sqrt,first_order=sgd|rms,min_damping=1e-8`` (aliases: ema, norm)."""
    from learned_optim.spec import parse_kwargs

    kwargs = parse_kwargs(
        arg,
        ("learning_rate", "damping", "ema_decay", "norm_constraint", "min_damping", "fallback_scale"),
        choices={"mode": MODES, "first_order": cv.FIRST_ORDER_MODES},
        aliases=SPEC_ALIASES,
        spec=f"diag_ggn:{arg}",
    )
    return diag_ggn(**kwargs)
