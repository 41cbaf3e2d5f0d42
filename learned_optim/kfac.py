"""K-FAC as an optax transform that lives inside a jitted, vmapped agent.

``kfac(learning_rate, damping, ...)`` is ``chain(scale_by_kfac(...),
scale_by_learning_rate(learning_rate))`` built with
``optax.inject_hyperparams``: ``learning_rate``, ``damping``, ``ema_decay``
and ``norm_constraint`` are arrays in ``state.hyperparams``, so they can
differ between population members under ``jax.vmap`` and PBT can change
them without recompiling. Spec: ``kfac:lr=0.05,damping=1e-3,...`` (see
``from_spec_arg``).

Statistics
----------
``update`` needs the keyword argument ``layer_stats`` (``learned_optim.context``):
for every dense layer, per-example ``inputs [B, in]`` and ``preact_grads
[B, out]`` (gradients of the log-likelihood of targets sampled from the
model, not divided by ``B``). Our agents supply it because the state asks for
it (``ScaleByKFACState.required_stats``). In your own loop, for a flax model
made of ``nn.Dense`` layers::

    tx = kfac(learning_rate=0.05, damping=1e-3)
    opt_state = tx.init(params)
    grads = jax.grad(loss_fn)(params, x, y)
    stats = learned_optim.layer_stats_for(model, params, x, key)   # loss="mse" for regression
    updates, opt_state = tx.update(grads, opt_state, params, layer_stats=stats)

(``layer_stats_for`` wraps ``dense_layer_stats``, which intercepts each
``nn.Dense`` call: it records the input and differentiates through a zero
perturbation added to the output, like flax's ``Module.perturb``; see
``learned_optim.layer_stats``.) Without ``layer_stats``, ``update`` raises a
one-line ``ValueError`` naming that helper, at trace time; so does a params
tree with no dense layers. ``allow_missing_stats=True`` (spec
``kfac:allow_missing_stats=1``) instead gives each dense layer without
statistics the plain gradient step ``fallback_scale * gradient`` (its factors
unchanged), counted in ``state.health.fallback_updates``.

What it computes, per dense layer (``learned_optim.curvature`` says which
parameters count as dense)
-----------------------------------------------------------------------------
With ``a_i = [inputs_i, 1]`` (``[in + 1]``, the 1 is the bias's homogeneous
coordinate) and ``g_i = preact_grads_i`` (``[out]``) for the ``N`` examples
of the minibatch, the Kronecker factors are

    A = 1/N sum_i a_i a_i^T   [in + 1, in + 1]      G = 1/N sum_i g_i g_i^T   [out, out]

and the layer's Fisher block (over the ``[in + 1, out]`` matrix ``W`` = kernel
with the bias as last row, flattened row-major) is approximated by
``A kron G``. Because the agents' ``preact_grads`` are gradients of the
log-likelihood of targets *sampled from the model*, this is the true Fisher
(= generalised Gauss-Newton for softmax / Gaussian outputs), not the
empirical Fisher. The factors are exponential moving averages with decay
``ema_decay``, bias-corrected (divided by the EMA of the weights, as
kfac-jax's ``WeightedMovingAverage``), so the first step already uses a
properly scaled estimate.

Every ``inverse_update_period`` steps (at steps 0, T, 2T, ...; inside
``lax.cond``) both factors are eigendecomposed, ``A = Q_A S_A Q_A^T``,
``G = Q_G S_G Q_G^T``. Between refreshes the stored eigenbases are used with
the *current* damping, so changing the damping acts at once. The step is

    U = Q_A [(Q_A^T V Q_G) / D] Q_G^T,        V = the layer's gradient [in + 1, out]

with, for ``damping_mode="exact"`` (default), ``D = s_A s_G^T + lambda``: the
exact solution of ``(A kron G + lambda I) u = v`` (Tikhonov damping of the
Kronecker approximation, as kfac-jax's eigendecomposition-based blocks do);
for ``damping_mode="factored"``, ``D = (s_A + pi sqrt(lambda)) (s_G +
sqrt(lambda) / pi)^T`` with ``pi = sqrt((tr A / dim A) / (tr G / dim G))``:
Martens & Grosse's pi-corrected factored damping, i.e. the inverse of
``(A + pi sqrt(lambda) I) kron (G + sqrt(lambda) / pi I)``. ``lambda`` is
``max(damping, min_damping)``.

Non-dense leaves (e.g. a Gaussian policy's state-independent ``log_std``)
get a first-order step: ``first_order="sgd"`` (default) passes the gradient
through unchanged (then scaled by ``-learning_rate`` like everything else);
``"rms"`` divides it by the root of an EMA of its square (RMSprop).

Optional norm constraint (kfac-jax's): with ``norm_constraint = c > 0`` the
whole step ``lr * u`` is scaled down so that ``lr^2 u.g`` (the approximate
squared Fisher norm of the step, a KL bound for policies) is at most ``c``.

Safety nets: nothing here can turn finite gradients into NaN/Inf.
* Non-finite batch statistics of a layer: its factor EMAs are not updated
  (``state.health.skipped_stats`` += 1).
* Non-finite eigendecomposition at a refresh: the previous one is kept
  (``failed_factorizations`` += 1); the initial one is the identity basis with
  zero eigenvalues (step = gradient / damping).
* Non-finite preconditioned step, or a damping that is <= 0 or not finite
  (possible only with ``min_damping=0``, or a NaN set by an outer loop): that
  layer's step is ``fallback_scale * gradient`` (``fallback_updates`` += 1).
The defaults make the last one practically unreachable: ``min_damping=1e-8``
bounds every eigenvalue of the damped curvature away from zero.

Cost and vmap: the eigendecompositions dominate the cost (``[in+1]^2`` and
``[out]^2`` per layer). A plain ``lax.cond`` on a vmapped step counter would
become a ``select`` and run them every step; ``any_member`` keeps the branch
real under ``jax.vmap`` (a custom batching rule reduces the per-member
predicate with ``any``), so a population whose counters agree pays for them
once every ``inverse_update_period`` steps, and each member still refreshes
exactly on its own schedule.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from runtime.platform import one_matrix_at_a_time
from learned_optim import curvature as cv
from learned_optim.context import any_member
from learned_optim.second_order import (SPEC_NUMBERS, CurvatureState, check_common, effective_damping,
                                        first_order_leaf, layerwise_transform, missing_stats_step, safe_step)
from learned_optim.spec import parse_kwargs

DAMPING_MODES = ("exact", "factored")
_WHO = "scale_by_kfac"


class KFACLayerState(NamedTuple):
    """Curvature of one dense layer (``n = in + 1`` with a bias, else ``in``).

    a_factor:  ``[n, n]``    EMA sum of A (divide by ``weight`` for the estimate)
    g_factor:  ``[out, out]`` EMA sum of G
    weight:    ``[]``         EMA of the weights (bias correction)
    a_eigvecs: ``[n, n]``, a_eigvals: ``[n]``        last refresh of A / weight
    g_eigvecs: ``[out, out]``, g_eigvals: ``[out]``  last refresh of G / weight
    """

    a_factor: jax.Array
    g_factor: jax.Array
    weight: jax.Array
    a_eigvecs: jax.Array
    a_eigvals: jax.Array
    g_eigvecs: jax.Array
    g_eigvals: jax.Array


class ScaleByKFACState(CurvatureState):
    """``count``: steps done (int32). ``layers``: a tree like params where each
    dense layer dict is a ``KFACLayerState`` and every other leaf a
    ``curvature.FirstOrderState``. ``health``: ``curvature.CurvatureHealth``."""

    __slots__ = ()


def _is_layer_state(x: Any) -> bool:
    return isinstance(x, (KFACLayerState, cv.FirstOrderState))


def _init_layer(node: Any) -> KFACLayerState:
    n_in, n_out, has_bias = cv.layer_dims(node)
    n = n_in + int(has_bias)
    f32 = jnp.float32
    return KFACLayerState(
        a_factor=jnp.zeros((n, n), f32),
        g_factor=jnp.zeros((n_out, n_out), f32),
        weight=jnp.zeros((), f32),
        a_eigvecs=jnp.eye(n, dtype=f32),
        a_eigvals=jnp.zeros((n,), f32),
        g_eigvecs=jnp.eye(n_out, dtype=f32),
        g_eigvals=jnp.zeros((n_out,), f32),
    )


_eigh = one_matrix_at_a_time(lambda m: tuple(jnp.linalg.eigh(m)))


def _safe_eigh(matrix: jax.Array):
    vals, vecs = _eigh(0.5 * (matrix + matrix.T))
    return vals, vecs, cv.all_finite(vals, vecs)


def _after(previous: Optional[jax.Array], x: jax.Array) -> jax.Array:
    """``x`` (unchanged in value), computed only once the eigenvalues
    ``previous`` are. A real data dependency: XLA's CPU runtime orders work by
    buffers, so ``lax.optimization_barrier`` would not serialise the calls;
    ``0 * finite`` is not folded away for floats."""
    if previous is None:
        return x
    first = previous[..., 0]
    return x + 0.0 * jnp.where(jnp.isfinite(first), first, 0.0)[..., None, None]


def _refresh(layers):
    """Eigendecomposes every layer's current factor estimates; keeps the old
    decomposition where the new one is not finite. Returns (layers, failures).

    jaxlib's CPU LAPACK kernels split a batched (vmapped) eigh over XLA's
    intra-op thread pool and block until the pieces finish; several of them
    running at once (inside a ``lax.cond`` branch, or one per device) can
    block every pool thread and hang forever on a 2-core machine (seen with
    PPO on CartPole). So a vmapped population runs each eigh one matrix at a
    time (``_eigh``, ``runtime.platform.one_matrix_at_a_time``), and the layers'
    eigendecompositions are chained one after another (``_after``). The
    matrices are small, so running them in sequence costs little.
    """
    out, failed, previous = [], [], None
    for ls in layers:
        if not isinstance(ls, KFACLayerState):
            out.append(ls)
            continue
        w = jnp.maximum(ls.weight, 1e-30)
        sa, qa, ok_a = _safe_eigh(_after(previous, ls.a_factor / w))
        sg, qg, ok_g = _safe_eigh(_after(sa, ls.g_factor / w))
        previous = sg
        ok = ok_a & ok_g
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        out.append(ls._replace(
            a_eigvecs=keep(qa, ls.a_eigvecs), a_eigvals=keep(sa, ls.a_eigvals),
            g_eigvecs=keep(qg, ls.g_eigvecs), g_eigvals=keep(sg, ls.g_eigvals),
        ))
        failed.append(~ok)
    return out, cv.count(failed)


def _denominator(ls: KFACLayerState, damping: jax.Array, mode: str) -> jax.Array:
    sa = jnp.maximum(ls.a_eigvals, 0.0)
    sg = jnp.maximum(ls.g_eigvals, 0.0)
    if mode == "exact":
        return sa[:, None] * sg[None, :] + damping
    mean_a = jnp.mean(sa)
    mean_g = jnp.mean(sg)
    pi = jnp.sqrt(mean_a / jnp.maximum(mean_g, 1e-30))
    pi = jnp.where((mean_a > 1e-30) & (mean_g > 1e-30) & jnp.isfinite(pi), pi, 1.0)
    root = jnp.sqrt(damping)
    return (sa + pi * root)[:, None] * (sg + root / pi)[None, :]


def kfac_precondition(ls: KFACLayerState, v: jax.Array, damping: jax.Array, mode: str) -> jax.Array:
    """The damped K-FAC step for one layer: ``v [n, out] -> [n, out]`` (see
    the module docstring for ``D``)."""
    qa, qg = ls.a_eigvecs, ls.g_eigvecs
    rotated = qa.T @ v.astype(jnp.float32) @ qg
    return qa @ (rotated / _denominator(ls, damping, mode)) @ qg.T


def scale_by_kfac(
    damping: float = 1e-3,
    ema_decay: float = 0.95,
    inverse_update_period: int = 5,
    damping_mode: str = "exact",
    first_order: str = "sgd",
    norm_constraint: float = 0.0,
    learning_rate: float = 1.0,
    min_damping: float = 1e-8,
    fallback_scale: float = 1.0,
    factor_update_period: int = 1,
    allow_missing_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Preconditions the gradient with damped block-diagonal K-FAC.

    ``update(grads, state, params=None, *, layer_stats, **ignored)``: needs
    ``layer_stats`` (see ``learned_optim.context``) for every dense layer
    (``allow_missing_stats``: a layer without them takes ``fallback_scale *
    gradient``, counted in ``health.fallback_updates``).
    ``learning_rate`` is used only by the norm constraint (the step itself is
    not scaled: chain ``scale_by_learning_rate``, or use ``kfac``). Returns
    ``+F^-1 g`` (same sign as the gradient).
    """
    _check_static(inverse_update_period, damping_mode, first_order, min_damping, fallback_scale,
                  factor_update_period, allow_missing_stats)
    allow_missing = bool(allow_missing_stats)
    period = int(inverse_update_period)
    fperiod = int(factor_update_period)

    def layer_steps(pairs, layer_states, state, layer_stats):
        decay = jnp.asarray(ema_decay, jnp.float32)
        missing = cv.missing_layers(layer_stats, pairs, allow_missing)  # static, per layer

        # 1. Factor EMAs from this minibatch's per-example statistics, every
        #    ``factor_update_period`` steps of each member's own count.
        stats_due = (state.count % fperiod) == 0

        def update_factors(states):
            out, skipped = [], []
            for (path, node), ls, miss in zip(pairs, states, missing):
                if not cv.is_dense(node) or miss:
                    out.append(ls)
                    continue
                a, g = cv.layer_inputs_and_grads(layer_stats, path, node, _WHO)
                n = a.shape[0]
                a_batch = a.T @ a / n
                g_batch = g.T @ g / n
                ok = cv.all_finite(a_batch, g_batch)
                use = ok & stats_due
                out.append(ls._replace(
                    a_factor=jnp.where(use, decay * ls.a_factor + (1 - decay) * a_batch, ls.a_factor),
                    g_factor=jnp.where(use, decay * ls.g_factor + (1 - decay) * g_batch, ls.g_factor),
                    weight=jnp.where(use, decay * ls.weight + (1 - decay), ls.weight),
                ))
                skipped.append(~ok & stats_due)
            return out, cv.count(skipped)

        if fperiod == 1:
            new_states, skipped = update_factors(layer_states)
        else:
            for (path, node), miss in zip(pairs, missing):  # missing statistics: an error at trace time
                if cv.is_dense(node) and not miss:
                    cv.layer_inputs_and_grads(layer_stats, path, node, _WHO)
            new_states, skipped = jax.lax.cond(
                any_member(stats_due), update_factors,
                lambda st: (list(st), jnp.zeros((), jnp.int32)), list(layer_states))

        # 2. Eigendecompositions at steps 0, T, 2T, ... of each member's own count.
        due = (state.count % period) == 0

        def refresh_due(layers):
            refreshed, failed = _refresh(layers)
            keep = lambda new, old: jnp.where(due, new, old)  # noqa: E731
            return jax.tree.map(keep, refreshed, layers), jnp.where(due, failed, 0)

        new_states, failed = jax.lax.cond(
            any_member(due), refresh_due, lambda s: (s, jnp.zeros((), jnp.int32)), new_states
        )

        # 3. Damped preconditioning; first-order steps for other leaves.
        lam, lam_ok = effective_damping(damping, min_damping)
        outs, fell_back, final_states = [], [], []
        for (path, node), ls, miss in zip(pairs, new_states, missing):
            if not cv.is_dense(node):
                first_order_leaf(node, ls, first_order, outs, final_states)
                continue
            v = cv.layer_matrix(node)
            if miss:
                outs.append(cv.unlayer_matrix(missing_stats_step(v, fallback_scale), node))
                final_states.append(ls)
                fell_back.append(jnp.asarray(True))
                continue
            u, ok = safe_step(kfac_precondition(ls, v, lam, damping_mode), v, lam_ok, fallback_scale)
            outs.append(cv.unlayer_matrix(u, node))
            final_states.append(ls)
            fell_back.append(~ok)
        return outs, final_states, cv.next_health(state.health, [skipped], fell_back, failed)

    return layerwise_transform(_WHO, ScaleByKFACState, _init_layer, _is_layer_state, layer_steps,
                               norm_constraint, learning_rate, allow_missing)


def _check_static(inverse_update_period, damping_mode, first_order, min_damping, fallback_scale,
                  factor_update_period=1, allow_missing_stats=False):
    for name, v in (("inverse_update_period", inverse_update_period), ("factor_update_period", factor_update_period)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"kfac: {name} must be an integer >= 1, got {v!r}")
    if damping_mode not in DAMPING_MODES:
        raise ValueError(f"kfac: damping_mode={damping_mode!r}; allowed: {', '.join(DAMPING_MODES)}")
    check_common("kfac", first_order, min_damping, fallback_scale, allow_missing_stats)


def _kfac_chain(learning_rate, damping, ema_decay, norm_constraint, inverse_update_period,
                damping_mode, first_order, min_damping, fallback_scale, factor_update_period,
                allow_missing_stats=False):
    return optax.chain(
        scale_by_kfac(
            damping=damping, ema_decay=ema_decay, inverse_update_period=inverse_update_period,
            damping_mode=damping_mode, first_order=first_order, norm_constraint=norm_constraint,
            learning_rate=learning_rate, min_damping=min_damping, fallback_scale=fallback_scale,
            factor_update_period=factor_update_period, allow_missing_stats=allow_missing_stats,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


_STATIC = ("inverse_update_period", "damping_mode", "first_order", "min_damping", "fallback_scale",
           "factor_update_period", "allow_missing_stats")


def kfac(
    learning_rate: float = 0.05,
    damping: float = 1e-3,
    ema_decay: float = 0.95,
    norm_constraint: float = 1e-3,
    inverse_update_period: int = 5,
    damping_mode: str = "exact",
    first_order: str = "sgd",
    min_damping: float = 1e-8,
    fallback_scale: float = 1.0,
    factor_update_period: int = 1,
    allow_missing_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """K-FAC: ``-learning_rate * scale_by_kfac(...)``, hyperparameters injected.

    ``learning_rate``, ``damping``, ``ema_decay`` and ``norm_constraint`` live
    in ``state.hyperparams`` (float32); the rest is static. ``norm_constraint
    = 0`` disables the constraint. ``allow_missing_stats``: see
    ``scale_by_kfac`` (default: missing ``layer_stats`` is an error). Raises
    ``ValueError`` on bad settings.
    """
    cv.check_injected("kfac", learning_rate, damping, ema_decay, norm_constraint)
    _check_static(inverse_update_period, damping_mode, first_order, min_damping, fallback_scale,
                  factor_update_period, allow_missing_stats)
    return optax.inject_hyperparams(_kfac_chain, static_args=_STATIC)(
        learning_rate=learning_rate, damping=damping, ema_decay=ema_decay,
        norm_constraint=norm_constraint, inverse_update_period=inverse_update_period,
        damping_mode=damping_mode, first_order=first_order, min_damping=min_damping,
        fallback_scale=fallback_scale, factor_update_period=factor_update_period,
        allow_missing_stats=bool(allow_missing_stats),
    )


SPEC_ALIASES = {"lr": "learning_rate", "ema": "ema_decay", "period": "inverse_update_period",
                "norm": "norm_constraint", "mode": "damping_mode", "fperiod": "factor_update_period"}


def from_spec_arg(arg: str, spec: str) -> optax.GradientTransformationExtraArgs:
    """``kfac:lr=0.05,damping=1e-3,ema_decay=0.95,norm_constraint=1e-3,
    inverse_update_period=5,factor_update_period=1,damping_mode=exact|factored,
    first_order=sgd|rms,min_damping=1e-8,allow_missing_stats=0|1`` (aliases: ema,
    period, fperiod, norm, mode)."""
    kwargs = parse_kwargs(
        arg,
        SPEC_NUMBERS,
        integer=("inverse_update_period", "factor_update_period", "allow_missing_stats"),
        choices={"damping_mode": DAMPING_MODES, "first_order": cv.FIRST_ORDER_MODES},
        aliases=SPEC_ALIASES,
        spec=spec,
    )
    return kfac(**kwargs)
