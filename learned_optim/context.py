"""What the agent tells an optimizer about where training is.

Every optimizer in the project is an ``optax.GradientTransformationExtraArgs``.
Our agents call ``tx.update(grads, opt_state, params, **extra_args)`` with the
keyword extra arguments below; transforms take what they need and ignore the
rest (plain optax transforms get them dropped by
``optax.with_extra_args_support``). Used outside our agents, a missing
argument falls back to the neutral value given here.

Always passed (cheap):

``train_fraction``  float32 scalar in [0, 1]: fraction of training done. In
                    PPO, ``update_index / num_updates``, shared by every
                    minibatch step of one iteration. Neutral: 0.0.
``batch_fraction``  float32 scalar in [0, 1]: position of the current epoch
                    within the iteration, ``epoch / max(num_epochs - 1, 1)``.
                    Neutral: 0.0.
``key``             a PRNG key for stochastic updates, fresh every call.
                    Neutral: a fixed key derived from the state's step count.

Passed only when the optimizer asks (see ``required_stats``):

``layer_stats``     a tree shaped like ``params`` down to the dense layers,
                    where each layer's ``{"kernel": [in, out], "bias": [out]}``
                    dict is replaced by a ``LayerStats`` of per-example arrays
                    for the current minibatch (``B`` rows). Fields that were
                    not requested are ``None``.

How an optimizer asks: its state (a NamedTuple) carries a class attribute
``required_stats`` with a subset of ``STAT_KINDS``. ``required_stats(tx,
params)`` finds these anywhere inside the state (also inside ``optax.chain``
and ``inject_hyperparams``), so Adam's users pay nothing.
"""

from __future__ import annotations

from typing import Any, Dict, FrozenSet, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

STAT_KINDS = ("inputs", "outputs", "preact_grads")


class LayerStats(NamedTuple):
    """Per-example statistics of one dense layer on a minibatch of ``B`` rows.

    inputs:       ``[B, in]``  the layer's input (K-FAC's factor A).
    outputs:      ``[B, out]`` the layer's output after its activation (for the
                  last layer, its raw output); OPEN's dormancy comes from it.
    preact_grads: ``[B, out]`` per-example gradient of the sampled-target
                  log-likelihood (Fisher) w.r.t. the layer's pre-activation,
                  *not* divided by ``B`` (K-FAC's factor G).
    """

    inputs: Optional[jax.Array] = None
    outputs: Optional[jax.Array] = None
    preact_grads: Optional[jax.Array] = None


def _has_request(x: Any) -> bool:
    return isinstance(getattr(type(x), "required_stats", None), (frozenset, tuple, set))


def required_stats(tx: optax.GradientTransformation, params: Any) -> FrozenSet[str]:
    """The statistics kinds ``tx`` asks for (a subset of ``STAT_KINDS``)."""
    state = jax.eval_shape(tx.init, params)
    found: set = set()
    for leaf in jax.tree_util.tree_leaves(state, is_leaf=_has_request):
        if _has_request(leaf):
            found |= set(type(leaf).required_stats)
    unknown = found - set(STAT_KINDS)
    if unknown:
        raise ValueError(f"optimizer asks for unknown statistics {sorted(unknown)}; known: {STAT_KINDS}")
    return frozenset(found)


def _is_injected(x: Any) -> bool:
    return isinstance(x, optax.InjectHyperparamsState) or (
        hasattr(x, "hyperparams") and isinstance(getattr(x, "hyperparams"), dict)
    )


def get_hyperparam(opt_state: Any, name: str) -> Optional[jax.Array]:
    """The first injected hyperparameter ``name`` found in ``opt_state`` (or None)."""
    for leaf in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_injected):
        if _is_injected(leaf) and name in leaf.hyperparams:
            return leaf.hyperparams[name]
    return None


def set_hyperparam(opt_state: Any, name: str, value: jax.Array) -> Any:
    """``opt_state`` with every injected hyperparameter ``name`` set to ``value``
    (dtype and shape kept, so scan carries stay stable; a scalar fills a
    batched one, e.g. TD3's twin critics). No-op where there is none."""

    def _set(x):
        if _is_injected(x) and name in x.hyperparams:
            old = x.hyperparams[name]
            new = jnp.asarray(value, dtype=jnp.asarray(old).dtype)
            shape = jnp.shape(old)
            new = jnp.broadcast_to(new, shape) if new.ndim == 0 else new.reshape(shape)
            return x._replace(hyperparams={**x.hyperparams, name: new})
        return x

    return jax.tree_util.tree_map(_set, opt_state, is_leaf=_is_injected)


def neutral_key(count: jax.Array) -> jax.Array:
    """Key used when the caller passes none: deterministic in the step count."""
    return jax.random.fold_in(jax.random.key(0), jnp.asarray(count, jnp.uint32))


class Context(NamedTuple):
    """The extra arguments a learned rule reads, neutral values filled in."""

    train_fraction: jax.Array  # float32 scalar
    batch_fraction: jax.Array  # float32 scalar
    key: jax.Array             # a PRNG key
    layer_stats: Any           # a tree of ``LayerStats``, or None


def read_context(extra: Dict[str, Any], count: jax.Array) -> Context:
    """The extra arguments above from ``extra`` (``update``'s keyword
    arguments), with their neutral values where missing (fractions 0.0, key
    from the int32 step ``count``)."""
    def frac(name):
        v = extra.get(name)
        return jnp.zeros((), jnp.float32) if v is None else jnp.asarray(v, jnp.float32).reshape(())
    key = extra.get("key")
    return Context(frac("train_fraction"), frac("batch_fraction"),
                   neutral_key(count) if key is None else key, extra.get("layer_stats"))


@jax.custom_batching.custom_vmap
def any_member(pred: jax.Array) -> jax.Array:
    """``pred`` itself; under ``jax.vmap``, whether it holds for *any* member,
    unbatched. A ``lax.cond`` on a batched predicate runs both branches for
    everyone (it becomes a ``select``); on this one it stays a real branch, so
    a vmapped population pays for rare work (K-FAC's eigendecompositions, PPO's
    values of time-limit observations) only at steps where some member needs
    it. The branch then selects per member, so each keeps its own schedule."""
    return pred


@any_member.def_vmap
def _any_member_rule(axis_size, in_batched, pred):
    del axis_size
    return any_member(jnp.any(pred) if in_batched[0] else pred), False

