"""Per-example layer statistics of a flax model: the ``layer_stats`` that
K-FAC and diagonal GGN (``inputs``, ``preact_grads``) and OPEN's dormancy
(``outputs``) consume (``learned_optim.context.LayerStats``).

One function, ``dense_layer_stats``, serves our agents (PPO, A2C, TD3) and
your own flax model alike; the model needs no change. In your own optax loop,
``layer_stats_for`` wraps it for the common losses::

    tx = optax.chain(optax.clip_by_global_norm(1.0), learned_optim.from_spec("kfac"))
    stats = learned_optim.layer_stats_for(model, params, x, key)   # softmax cross-entropy
    updates, opt_state = tx.update(grads, opt_state, params, layer_stats=stats)

(``loss="mse"`` for a squared-error regression; or ``dense_layer_stats(model,
{"params": params}, x, categorical_sampled_loglik, key)`` directly.)

How. Every ``nn.Dense.__call__`` is intercepted (flax's
``nn.intercept_methods``): its input is recorded and a zero perturbation is
added to its output (the pre-activation). The gradient of the summed
sampled-target log-likelihood w.r.t. those perturbations is the per-example
pre-activation gradient (what flax's ``Module.perturb`` gives from inside a
model). Targets are sampled from the model's own predictive distribution, so
the statistics describe the true Fisher (for exponential-family outputs, the
generalised Gauss-Newton matrix); observed labels would give the empirical
Fisher instead.

``outputs`` are a layer's values after its activation, which only the model
knows: a model reports them by sowing them beside the layer,
``self.sow("intermediates", name + OUTPUTS_SUFFIX, h)`` in the module that
owns the ``Dense`` called ``name`` (``agents.networks.MLP`` does). For a layer
the model reports nothing for, ``outputs`` is the ``Dense``'s raw output.

If params nest under a name (``{"actor": ..., "critic": ...}``), build the same
nesting of stats trees: ``{"actor": dense_layer_stats(actor, ...), ...}``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Union

import jax
import jax.numpy as jnp

from learned_optim.context import STAT_KINDS, LayerStats

CURVATURE_KINDS = frozenset({"inputs", "preact_grads"})  # what K-FAC and diagonal GGN ask for
OUTPUTS_SUFFIX = "_outputs"  # a sown entry beside a Dense (collection entries can't reuse its name)

Path = Tuple[str, ...]


def categorical_sampled_loglik(logits: jax.Array, key: jax.Array) -> jax.Array:
    """``[B, C] -> [B]``: log-probability of a label sampled from the model
    itself (the true-Fisher target for a softmax output)."""
    y = jax.lax.stop_gradient(jax.random.categorical(key, logits))
    return jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], axis=-1)[..., 0]


def gaussian_sampled_loglik(mean: jax.Array, key: jax.Array, std: float = 1.0) -> jax.Array:
    """``[B, ...] -> [B]``: Gaussian log-likelihood (up to a constant) of a target
    sampled from ``N(mean, std^2)`` (for a squared-error loss, the Fisher equals
    the Gauss-Newton matrix)."""
    y = jax.lax.stop_gradient(mean + std * jax.random.normal(key, mean.shape))
    return -0.5 * jnp.sum(jnp.square((mean - y) / std).reshape(mean.shape[0], -1), axis=-1)


def dense_layer_stats(
    model: Any,
    variables: Any,
    x: jax.Array,
    sampled_loglik: Optional[Callable[[Any, jax.Array], jax.Array]] = None,
    key: Optional[jax.Array] = None,
    *,
    kinds: Iterable[str] = CURVATURE_KINDS,
    curvature_rows: int = 0,
    **apply_kwargs: Any,
) -> Dict[str, Any]:
    """``layer_stats`` for every ``nn.Dense`` of a flax linen ``model`` on ``x [B, ...]``.

    model:          a ``flax.linen.Module``, called as ``model.apply(variables,
                    x, **apply_kwargs)``; each ``Dense`` once per forward pass.
    sampled_loglik: ``(model_output, key) -> [B]`` per-example log-likelihood
                    of targets sampled from the model (``categorical_sampled_loglik``,
                    ``gaussian_sampled_loglik`` or your own); needed for ``preact_grads``.
    kinds:          the ``LayerStats`` fields to fill (a subset of ``STAT_KINDS``;
                    the rest stay ``None``), e.g. ``required_stats(tx, params)``.
    curvature_rows: ``inputs`` and ``preact_grads`` come from the first
                    ``curvature_rows`` rows of ``x`` (0: all ``B``); ``outputs``
                    always from all ``B`` rows.
    Returns a tree shaped like ``variables["params"]`` down to the dense
    layers, each replaced by ``LayerStats(inputs [R, in], outputs [B, out],
    preact_grads [R, out])`` (the ``LayerStats`` itself for a bare ``nn.Dense``,
    whose params are the layer). One forward-backward pass on the ``R`` rows when
    ``preact_grads`` are asked for, plus one forward pass on all rows when
    ``outputs`` are and ``R < B``. The statistics carry no gradient.
    """
    kinds = frozenset(kinds)
    if kinds - set(STAT_KINDS):
        raise ValueError(f"dense_layer_stats: unknown kinds {sorted(kinds - set(STAT_KINDS))}; "
                         f"allowed: {', '.join(STAT_KINDS)}")
    if "preact_grads" in kinds and (sampled_loglik is None or key is None):
        raise ValueError("dense_layer_stats: preact_grads need sampled_loglik and key")
    n = x.shape[0]
    rows = curvature_rows if 0 < curvature_rows < n else n
    want_outputs = "outputs" in kinds
    inputs, outputs, grads = {}, {}, {}
    if "preact_grads" in kinds:
        with_outputs = want_outputs and rows == n
        inputs, outputs, grads = _fisher_pass(model, variables, x[:rows], sampled_loglik, key, with_outputs,
                                              apply_kwargs)
    if (want_outputs and not outputs) or ("inputs" in kinds and not inputs):
        io_inputs, outputs = _forward_pass(model, variables, x if want_outputs else x[:rows], want_outputs,
                                           apply_kwargs)
        inputs = inputs or {path: a[:rows] for path, a in io_inputs.items()}
    tree: Dict[str, Any] = {}
    for path in inputs or outputs:
        stats = jax.lax.stop_gradient(LayerStats(
            inputs=inputs[path] if "inputs" in kinds else None,
            outputs=outputs[path] if want_outputs else None,
            preact_grads=grads.get(path),
        ))
        if not path:  # the model is a bare nn.Dense: its params are the layer itself
            return stats
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = stats
    return tree


# What a loss's Fisher samples: the model's own predictive distribution.
SAMPLED_LOGLIKS: Dict[str, Callable[[Any, jax.Array], jax.Array]] = {
    "softmax_cross_entropy": categorical_sampled_loglik,  # logits [B, C]
    "mse": gaussian_sampled_loglik,                         # predictions [B, ...]
}


def layer_stats_for(
    model: Any,
    params: Any,
    x: jax.Array,
    key: jax.Array,
    *,
    loss: Union[str, Callable[[Any, jax.Array], jax.Array]] = "softmax_cross_entropy",
    kinds: Iterable[str] = CURVATURE_KINDS,
    curvature_rows: int = 0,
    **apply_kwargs: Any,
) -> Dict[str, Any]:
    """The ``layer_stats`` K-FAC and diagonal GGN need, for your own flax model
    and loss on a batch ``x [B, ...]``: pass the result to ``tx.update(...,
    layer_stats=...)`` at every step (fresh ``key`` each time).

    model:  a ``flax.linen.Module`` whose dense layers are ``nn.Dense`` (any
            activations, nesting, submodules); called as ``model.apply({"params":
            ...}, x, **apply_kwargs)``.
    params: the tree the optimizer updates: the model's params, or the whole
            variables dict ``{"params": ...}`` that ``model.init`` returns (then
            the statistics nest under ``"params"`` too).
    loss:   what the model's output is trained with, which fixes the
            distribution targets are sampled from for the Fisher:
            ``"softmax_cross_entropy"`` (output = logits ``[B, C]``; a label is
            sampled from ``softmax(logits)``) or ``"mse"`` (output = prediction;
            a target is sampled from ``N(prediction, 1)``); or your own
            ``(output, key) -> [B]`` sampled-target log-likelihood.
    kinds, curvature_rows: as in ``dense_layer_stats``.
    Raises ``ValueError`` if the model calls no ``nn.Dense``. The statistics
    carry no gradient; the cost is one extra forward-backward pass."""
    if callable(loss):
        sampled_loglik = loss
    elif loss in SAMPLED_LOGLIKS:
        sampled_loglik = SAMPLED_LOGLIKS[loss]
    else:
        raise ValueError(f"layer_stats_for: loss={loss!r}; allowed: {', '.join(SAMPLED_LOGLIKS)}, "
                         f"or a callable (output, key) -> [B] sampled-target log-likelihood")
    whole = _is_variables(params)
    variables = {**params} if whole else {"params": params}
    stats = dense_layer_stats(model, variables, x, sampled_loglik, key, kinds=kinds,
                              curvature_rows=curvature_rows, **apply_kwargs)
    if not stats:
        raise ValueError(f"layer_stats_for: {type(model).__name__} calls no flax.linen.Dense layer; "
                         f"K-FAC and diagonal GGN precondition nn.Dense layers only")
    return {"params": stats} if whole else stats


def _is_variables(tree: Any) -> bool:
    """A flax variables dict (``{"params": {...}, ...}``) rather than a params tree."""
    return hasattr(tree, "keys") and "params" in tree and hasattr(tree["params"], "keys")


# The passes --------------------------------------------------------------------------


def _apply(model, variables, x, perturbations, with_outputs, apply_kwargs):
    """``model.apply`` recording every ``Dense`` call. Returns ``(output, inputs,
    preacts, outputs)``, the last three ``{path: array}``: each Dense's input,
    its own output plus ``perturbations[path]`` (if given), and (only
    ``with_outputs``) what the model sows as ``<name>_outputs``, else the preact."""
    import flax.linen as nn

    inputs, preacts = {}, {}

    def intercept(next_fun, args, kwargs, context):
        if not (isinstance(context.module, nn.Dense) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        path = tuple(context.module.path)
        if path in inputs:
            raise ValueError(f"dense_layer_stats: layer {'/'.join(path)} is called more than once per forward "
                             f"pass; per-example statistics of shared layers are not supported")
        out = next_fun(*args, **kwargs)
        if perturbations is not None:
            out = out + perturbations[path]
        inputs[path], preacts[path] = args[0], out
        return out

    with nn.intercept_methods(intercept):
        if not with_outputs:
            return model.apply(variables, x, **apply_kwargs), inputs, preacts, {}
        out, state = model.apply(variables, x, mutable=["intermediates"], **apply_kwargs)
    sown = state.get("intermediates", {})
    return out, inputs, preacts, {path: _sown_output(sown, path, value) for path, value in preacts.items()}


def _sown_output(sown: Any, path: Path, default: jax.Array) -> jax.Array:
    node = sown
    for name in path[:-1]:
        node = node.get(name, {}) if hasattr(node, "get") else {}
    value = node.get(path[-1] + OUTPUTS_SUFFIX) if hasattr(node, "get") else None
    return default if value is None else value[-1]  # sow keeps a tuple, one entry per call


def _forward_pass(model, variables, x, with_outputs, apply_kwargs):
    """``(inputs, outputs)`` from one forward pass on ``x``."""
    _, inputs, _, outputs = _apply(model, variables, x, None, with_outputs, apply_kwargs)
    return inputs, outputs


def _fisher_pass(model, variables, x, sampled_loglik, key, with_outputs, apply_kwargs):
    """``(inputs, outputs, preact_grads)`` from one forward-backward pass on ``x``."""
    # The zero perturbations take every Dense's output shape, found by tracing only.
    shapes = jax.eval_shape(lambda: _apply(model, variables, x, None, False, apply_kwargs)[2])
    zeros = {path: jnp.zeros(s.shape, s.dtype) for path, s in shapes.items()}

    def loglik(perturbations):
        out, inputs, _, outputs = _apply(model, variables, x, perturbations, with_outputs, apply_kwargs)
        return jnp.sum(sampled_loglik(out, key)), (inputs, outputs)

    grads, (inputs, outputs) = jax.grad(loglik, has_aux=True)(zeros)
    return inputs, outputs, grads
