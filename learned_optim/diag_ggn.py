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

Non-dense leaves, the norm constraint, the safety nets and missing
statistics (a one-line ``ValueError`` naming ``learned_optim.layer_stats_for``,
unless ``allow_missing_stats=True``, spec ``diag_ggn:allow_missing_stats=1``)
are as in ``learned_optim.kfac`` (there is no factorisation here, so
``health.failed_factorizations`` stays 0).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from learned_optim import curvature as cv
from learned_optim.second_order import (SPEC_NUMBERS, CurvatureState, check_common, effective_damping,
                                        first_order_leaf, layerwise_transform, missing_stats_step, safe_step)
from learned_optim.spec import parse_kwargs

MODES = ("natural", "sqrt")
_WHO = "scale_by_diag_ggn"


class DiagGGNLayerState(NamedTuple):
    """``diag``: ``[n, out]`` EMA sum of the Fisher diagonal of the layer
    matrix (``n = in + 1`` with a bias); ``weight``: ``[]`` EMA of weights
    (the estimate is ``diag / weight``)."""

    diag: jax.Array
    weight: jax.Array


class ScaleByDiagGGNState(CurvatureState):
    """``count`` (int32), ``layers`` (tree like params: ``DiagGGNLayerState``
    per dense layer, ``curvature.FirstOrderState`` per other leaf),
    ``health`` (``curvature.CurvatureHealth``)."""

    __slots__ = ()


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
    allow_missing_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Preconditions dense layers by the damped Fisher diagonal (see module
    docstring); ``update`` needs ``layer_stats`` (``allow_missing_stats``: a
    layer without them takes ``fallback_scale * gradient``, counted in
    ``health.fallback_updates``). ``learning_rate`` is used only by the norm
    constraint. Returns steps with the gradient's sign."""
    _check_static(mode, first_order, min_damping, fallback_scale, allow_missing_stats)
    allow_missing = bool(allow_missing_stats)

    def layer_steps(pairs, layer_states, state, layer_stats):
        decay = jnp.asarray(ema_decay, jnp.float32)
        lam, lam_ok = effective_damping(damping, min_damping)
        outs, new_states, skipped, fell_back = [], [], [], []
        missing = cv.missing_layers(layer_stats, pairs, allow_missing)
        for (path, node), ls, miss in zip(pairs, layer_states, missing):
            if not cv.is_dense(node):
                first_order_leaf(node, ls, first_order, outs, new_states)
                continue
            if miss:
                outs.append(cv.unlayer_matrix(missing_stats_step(cv.layer_matrix(node), fallback_scale), node))
                new_states.append(ls)
                fell_back.append(jnp.asarray(True))
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
            u, ok = safe_step(v / (curv + lam), v, lam_ok, fallback_scale)
            outs.append(cv.unlayer_matrix(u, node))
            new_states.append(ls)
            skipped.append(~ok_stats)
            fell_back.append(~ok)
        return outs, new_states, cv.next_health(state.health, skipped, fell_back)

    return layerwise_transform(_WHO, ScaleByDiagGGNState, _init_layer, _is_layer_state, layer_steps,
                               norm_constraint, learning_rate, allow_missing)


def _check_static(mode, first_order, min_damping, fallback_scale, allow_missing_stats=False):
    if mode not in MODES:
        raise ValueError(f"diag_ggn: mode={mode!r}; allowed: {', '.join(MODES)}")
    check_common("diag_ggn", first_order, min_damping, fallback_scale, allow_missing_stats)


def _diag_ggn_chain(learning_rate, damping, ema_decay, norm_constraint, mode, first_order,
                    min_damping, fallback_scale, allow_missing_stats=False):
    return optax.chain(
        scale_by_diag_ggn(
            damping=damping, ema_decay=ema_decay, mode=mode, first_order=first_order,
            norm_constraint=norm_constraint, learning_rate=learning_rate, min_damping=min_damping,
            fallback_scale=fallback_scale, allow_missing_stats=allow_missing_stats,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


_STATIC = ("mode", "first_order", "min_damping", "fallback_scale", "allow_missing_stats")


def diag_ggn(
    learning_rate: float = 0.01,
    damping: float = 1e-3,
    ema_decay: float = 0.95,
    norm_constraint: float = 1e-3,
    mode: str = "natural",
    first_order: str = "sgd",
    min_damping: float = 1e-8,
    fallback_scale: float = 1.0,
    allow_missing_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Diagonal GGN: ``-learning_rate * scale_by_diag_ggn(...)``, with
    ``learning_rate``, ``damping``, ``ema_decay``, ``norm_constraint`` injected
    (``norm_constraint=0`` disables it). ``allow_missing_stats``: see
    ``scale_by_diag_ggn``. ``ValueError`` on bad settings."""
    cv.check_injected("diag_ggn", learning_rate, damping, ema_decay, norm_constraint)
    _check_static(mode, first_order, min_damping, fallback_scale, allow_missing_stats)
    return optax.inject_hyperparams(_diag_ggn_chain, static_args=_STATIC)(
        learning_rate=learning_rate, damping=damping, ema_decay=ema_decay,
        norm_constraint=norm_constraint, mode=mode, first_order=first_order,
        min_damping=min_damping, fallback_scale=fallback_scale,
        allow_missing_stats=bool(allow_missing_stats),
    )


SPEC_ALIASES = {"lr": "learning_rate", "ema": "ema_decay", "norm": "norm_constraint"}


def from_spec_arg(arg: str, spec: str) -> optax.GradientTransformationExtraArgs:
    """``diag_ggn:lr=0.01,damping=1e-3,ema_decay=0.95,norm_constraint=1e-3,
    mode=natural|sqrt,first_order=sgd|rms,min_damping=1e-8,allow_missing_stats=0|1``
    (aliases: ema, norm)."""
    kwargs = parse_kwargs(
        arg,
        SPEC_NUMBERS,
        integer=("allow_missing_stats",),
        choices={"mode": MODES, "first_order": cv.FIRST_ORDER_MODES},
        aliases=SPEC_ALIASES,
        spec=spec,
    )
    return diag_ggn(**kwargs)
