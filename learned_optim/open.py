"""OPEN (Goldie et al., NeurIPS 2024, arXiv 2407.07082) as an optax transform.

Per parameter element, a GRU followed by an MLP maps 19 input features to
three outputs ``o``; the step is ::

    step = o0 * step_mult * exp(o1 * exp_mult)  +  [actor only] o2 * step_mult * N(0, 1)
    step = step - mean(step over every element of every parameter)
    param <- param - step            (the optax update is -step)

Features (``open_features``), in this order, for a tensor ``p`` with gradient
``g`` and momenta ``m_b = b m_b + (1 - b) g`` (zero-initialised, no bias
correction) for ``b`` in ``BETAS``:

    0      p
    1-6    sign(m_b)
    7-12   log(|m_b| + 1e-13)
    13     sign(g)
    14     log(|g| + 1e-13)
           -- features 0-14 normalised per tensor and per feature by
              x / sqrt(1e-5 + mean(x**2)) over the tensor's elements --
    15     training proportion   (extra arg ``train_fraction``; neutral 0.0)
    16     layer proportion      (from the params tree, see ``layout.LeafInfo``;
                                  ``log_std`` counts as the actor's last entry,
                                  as in the published code; 0.0 without layers)
    17     batch proportion      (extra arg ``batch_fraction``; neutral 0.0)
    18     dormancy              (from ``layer_stats[part][layer].outputs``;
                                  neutral 1.0 for ``log_std`` -- which the
                                  published code also gets -- and when no
                                  statistics are passed)

The noise goes to leaves under the params tree's ``"actor"`` key only. The
GRU hidden state (one ``[H]`` vector per parameter element, zeros at init) is
carried in the optimizer state across all updates.

Published weights: ``load_open_weights(path)`` / ``from_spec("open:PATH.npy")``
read the flat float32 vector of 1211 (GRU 8, MLP 16) or 3571 (GRU 16, MLP 32)
floats, in JAX tree order over ``{"gru_params": GRUCell vars, "params":
Sequential MLP vars}``. The three vectors published with the paper ship with
this package (``learned_optim/weights/open/``, Apache-2.0, with their LICENSE
and provenance): ``from_spec("open:breakout")`` (or ``freeway``,
``gridworld``; ``PUBLISHED_OPEN``) and ``load_published_open_weights(name)``
read them from the installed package, in any working directory.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from typing import Any, ClassVar, NamedTuple, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from learned_optim.cells import GRUWeights, gru_cell, gru_weights
from learned_optim.context import read_context
from learned_optim.features import flat_dormancy, normalise, normalise_by_tensor, update_momenta
from learned_optim.layout import check_flat_state, flat_layout, flat_size, flatten_elements, leaf_infos, split_elements
from learned_optim.rule import LearnedRule, check_positive_int
from learned_optim.spec import parse_kwargs

BETAS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
NUM_FEATURES = 19
NUM_NORMALISED = 15
LOG_EPS = 1e-13


class OpenState(NamedTuple):
    """Per-element state, flat and feature-major (``N`` = number of parameter
    elements, laid end to end in ``jax.tree.leaves`` order, each leaf raveled
    in C order; ``open_state_by_leaf`` gives per-leaf views).

    momenta: ``[6, N]`` float32, one row per beta in ``BETAS``.
    carry:   ``[gru_features, N]`` float32, the GRU hidden state.
    count:   int32 scalar, updates done.

    Why flat and feature-major: the per-element network then runs as a few
    matmuls ``[out, in] @ [in, N]`` and elementwise passes over contiguous
    ``N``-vectors; on CPU this is about 2.5x faster than the ``[N, features]``
    layout (XLA's GEMMs and elementwise loops handle short feature axes badly),
    and nothing is concatenated or split per leaf each step."""

    momenta: jax.Array
    carry: jax.Array
    count: jax.Array

    required_stats = frozenset({"outputs"})  # dormancy needs post-activation outputs


def open_state_by_leaf(state: "OpenState", params: Any) -> Tuple[Any, Any]:
    """``(momenta, carry)`` as trees like ``params`` with leaves ``[*S, 6]`` and
    ``[*S, gru_features]`` (copies, for inspection)."""
    leaves, treedef = jax.tree.flatten(params)
    shapes = [jnp.shape(x) for x in leaves]
    split = lambda a: jax.tree.unflatten(treedef, split_elements(a.T, shapes))  # noqa: E731
    return split(state.momenta), split(state.carry)


def open_features(p, g, momenta, train_fraction, layer_prop, batch_fraction, dorm) -> jax.Array:
    """OPEN's 19 input features for one tensor.

    p, g: ``[*S]``; momenta: ``[*S, 6]`` (already updated with ``g``);
    train_fraction, layer_prop, batch_fraction: scalars; dorm: ``[*S]``.
    Returns ``[*S, 19]`` float32.
    """
    p = jnp.asarray(p, jnp.float32)
    g = jnp.asarray(g, jnp.float32)
    shape = p.shape
    normalised = jnp.concatenate(
        [
            p[..., None],
            jnp.sign(momenta),
            jnp.log(jnp.abs(momenta) + LOG_EPS),
            jnp.sign(g)[..., None],
            jnp.log(jnp.abs(g) + LOG_EPS)[..., None],
        ],
        axis=-1,
    )
    normalised = normalise(normalised, tuple(range(len(shape))))
    const = lambda v: jnp.broadcast_to(jnp.asarray(v, jnp.float32), shape)[..., None]  # noqa: E731
    return jnp.concatenate(
        [normalised, const(train_fraction), const(layer_prop), const(batch_fraction),
         jnp.broadcast_to(dorm, shape).astype(jnp.float32)[..., None]],
        axis=-1,
    )


def _mlp(hidden_size: int) -> nn.Module:
    # Sequential so the parameter names (layers_0, 1, 3, 4, 6) match the published vectors.
    return nn.Sequential([
        nn.Dense(hidden_size), nn.LayerNorm(), nn.relu,
        nn.Dense(hidden_size), nn.LayerNorm(), nn.relu,
        nn.Dense(3),
    ])


@dataclasses.dataclass(frozen=True)
class OpenRule(LearnedRule):
    """OPEN's architecture and step scales.

    gru_features: GRU hidden size (8 published; 16 for the larger variant).
    hidden_size:  width of the two MLP layers (16; 32 larger).
    step_mult, exp_mult: the 0.001 scales of the step formula.
    actor_noise:  add the learned stochastic term to actor parameters.
    """

    kind: ClassVar[str] = "open"

    gru_features: int = 8
    hidden_size: int = 16
    step_mult: float = 0.001
    exp_mult: float = 0.001
    actor_noise: bool = True

    def __post_init__(self):
        check_positive_int("OpenRule", "gru_features", self.gru_features)
        check_positive_int("OpenRule", "hidden_size", self.hidden_size)

    def init_meta_params(self, key: jax.Array) -> Any:
        """``{"gru_params": GRUCell vars, "params": MLP vars}`` (flax default inits)."""
        k_mlp, k_gru = jax.random.split(key)
        gru = nn.GRUCell(features=self.gru_features)
        carry = jnp.zeros((self.gru_features,), jnp.float32)
        return {
            "gru_params": gru.init(k_gru, carry, jnp.zeros((NUM_FEATURES,), jnp.float32)),
            "params": _mlp(self.hidden_size).init(k_mlp, jnp.zeros((self.gru_features,), jnp.float32)),
        }

    def make_optimizer(self, meta_params: Any) -> optax.GradientTransformationExtraArgs:
        return scale_by_open(meta_params, self)


class _Prepared(NamedTuple):
    """OPEN's network weights arranged for the feature-major forward pass."""

    gru: GRUWeights
    layers: Tuple[Tuple[jax.Array, jax.Array, jax.Array, jax.Array], ...]  # (W^T centred, b centred, scale, bias)
    out_w: jax.Array          # [3, hidden]
    out_b: jax.Array          # [3]


def _prepare(meta_params: Any) -> _Prepared:
    """Rearranges the flax parameters once per transform (also when traced).

    A LayerNorm directly after a Dense layer subtracts the mean over the
    layer's outputs, which is linear: it is folded into the Dense weights
    (``W - mean_j W[:, j]``), so the forward pass needs no mean reduction."""
    mlp = meta_params["params"]["params"]
    layers = []
    for dense, norm in (("layers_0", "layers_1"), ("layers_3", "layers_4")):
        w, b = mlp[dense]["kernel"], mlp[dense]["bias"]
        layers.append(((w - jnp.mean(w, axis=1, keepdims=True)).T, b - jnp.mean(b),
                       mlp[norm]["scale"], mlp[norm]["bias"]))
    return _Prepared(gru_weights(meta_params["gru_params"]), tuple(layers),
                     mlp["layers_6"]["kernel"].T, mlp["layers_6"]["bias"])


LAYERNORM_EPS = 1e-6  # flax.linen.LayerNorm's default


def open_network(prep: _Prepared, carry: jax.Array, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """flax ``GRUCell`` then the LayerNorm MLP, on feature-major inputs.

    carry: ``[H, N]``; x: ``[19, N]``. Returns the new carry ``[H, N]`` and
    the outputs ``[3, N]``. Equal (to float rounding) to
    ``mlp.apply(GRUCell.apply(carry.T, x.T)[1]).T`` with the same parameters."""
    h = gru_cell(prep.gru, carry, x)
    y = h
    for w_centred, b_centred, scale, bias in prep.layers:
        a = jnp.dot(w_centred, y) + b_centred[:, None]                 # already mean-free over features
        # the variance as a [1, k] @ [k, N] product: a reduction over a short
        # leading axis is much slower on CPU than this tiny matmul
        var = jnp.dot(jnp.full((1, a.shape[0]), 1.0 / a.shape[0], a.dtype), a * a)
        y = jax.nn.relu(a * jax.lax.rsqrt(var + LAYERNORM_EPS) * scale[:, None] + bias[:, None])
    return h, jnp.dot(prep.out_w, y) + prep.out_b[:, None]


def scale_by_open(meta_params: Any, rule: OpenRule = OpenRule()) -> optax.GradientTransformationExtraArgs:
    """OPEN's update (the optax update is ``-step``); needs ``params``."""
    prep = _prepare(meta_params)

    def init_fn(params):
        n = flat_size(params)
        return OpenState(momenta=jnp.zeros((len(BETAS), n), jnp.float32),
                         carry=jnp.zeros((rule.gru_features, n), jnp.float32),
                         count=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, **extra):
        if params is None:
            raise ValueError("OPEN needs the current params: call tx.update(grads, state, params, ...)")
        ctx = read_context(extra, state.count)
        g_leaves, treedef = jax.tree.flatten(updates)
        p_leaves = treedef.flatten_up_to(params)
        infos = leaf_infos(jax.tree.unflatten(treedef, p_leaves))
        layout = flat_layout(infos, [jnp.shape(g) for g in g_leaves])
        n = layout.size
        check_flat_state("OPEN", state.momenta, n)

        # All elements of all tensors at once, features along the leading axis;
        # ``open_features`` is the per-tensor statement of the same computation.
        g = flatten_elements(g_leaves)                                          # [N]
        p = flatten_elements(p_leaves)                                          # [N]
        # feature-major, like the state: updating through [N, 6] would cost two
        # transposes of the momenta, ~13% of the step on CPU
        m = update_momenta(state.momenta, g, BETAS, axis=0)                     # [6, N]
        x = jnp.concatenate([
            _normalised_features(p, g, m, layout.spans),                        # [15, N]
            jnp.broadcast_to(ctx.train_fraction, (1, n)).astype(jnp.float32),
            jnp.asarray(layout.layer_prop, jnp.float32)[None],
            jnp.broadcast_to(ctx.batch_fraction, (1, n)).astype(jnp.float32),
            flat_dormancy(ctx.layer_stats, infos, layout)[None],
        ])                                                                      # [19, N]
        new_carry, o = open_network(prep, state.carry, x)
        step = o[0] * rule.step_mult * jnp.exp(o[1] * rule.exp_mult)
        if rule.actor_noise and layout.is_actor.any():
            step = step + o[2] * rule.step_mult * _actor_noise(ctx.key, infos, layout.spans)
        step = step - jnp.mean(step)

        out = [(-step[a:b]).reshape(s).astype(jnp.result_type(u))
               for (a, b), s, u in zip(layout.spans, layout.shapes, g_leaves)]
        return jax.tree.unflatten(treedef, out), OpenState(momenta=m, carry=new_carry, count=state.count + 1)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _normalised_features(p: jax.Array, g: jax.Array, m: jax.Array, spans) -> jax.Array:
    """Features 0-14 (``[15, N]``) from ``p, g [N]`` and momenta ``m [6, N]``,
    each normalised per tensor (``spans``: the tensors' element ranges)."""
    logm = jnp.log(jnp.abs(m) + LOG_EPS)                                   # [6, N]
    logg = jnp.log(jnp.abs(g) + LOG_EPS)[None]                             # [1, N]
    raw = jnp.concatenate([p[None], jnp.sign(m), logm, jnp.sign(g)[None], logg], axis=0)
    return normalise_by_tensor(raw, spans, axis=1)


def _actor_noise(key: jax.Array, infos, spans) -> jax.Array:
    """``[N]``: N(0, 1) on actor elements, 0 elsewhere; draws only as many
    normals as there are actor elements."""
    sizes = [int(b - a) for a, b in spans]
    eps = jax.random.normal(key, (sum(s for s, i in zip(sizes, infos) if i.is_actor),), jnp.float32)
    pieces, start = [], 0
    for size, info in zip(sizes, infos):
        if info.is_actor:
            pieces.append(eps[start:start + size])
            start += size
        else:
            pieces.append(jnp.zeros((size,), jnp.float32))
    return jnp.concatenate(pieces)


# Published weights ------------------------------------------------------------------

OPEN_SMALL = OpenRule()
OPEN_LARGE = OpenRule(gru_features=16, hidden_size=32)


def load_open_weights(path: str) -> Tuple[OpenRule, Any]:
    """(rule, meta_params) from a published OPEN ``.npy`` flat vector; the
    size (1211 or 3571 floats) picks the small or large architecture."""
    if not os.path.isfile(path):
        raise ValueError(f"OPEN weights {path!r}: no such file")
    try:
        flat = np.load(path, allow_pickle=False)
    except Exception as e:  # corrupt header, pickled object array, ...
        raise ValueError(f"OPEN weights {path!r}: not a readable .npy array ({e})") from None
    if flat.ndim != 1 or not np.issubdtype(flat.dtype, np.floating):
        raise ValueError(
            f"OPEN weights {path!r}: expected a 1-D float vector, got dtype {flat.dtype} shape {flat.shape}"
        )
    sizes = {OPEN_SMALL.num_meta_params: OPEN_SMALL, OPEN_LARGE.num_meta_params: OPEN_LARGE}
    if flat.shape[0] not in sizes:
        raise ValueError(
            f"OPEN weights {path!r}: {flat.shape[0]} floats; expected "
            + " or ".join(f"{n} ({'small' if r is OPEN_SMALL else 'large'})" for n, r in sizes.items())
        )
    if not np.all(np.isfinite(flat)):
        raise ValueError(f"OPEN weights {path!r}: contains non-finite values")
    rule = sizes[flat.shape[0]]
    return rule, rule.unflatten(flat.astype(np.float32))


# The published vectors shipped as package data: ``weights/open/NAME_OPEN.npy``
# (Goldie et al. 2024, AlexGoldie/rl-learned-optimization, Apache-2.0).
PUBLISHED_OPEN = ("breakout", "freeway", "gridworld")


def load_published_open_weights(name: str) -> Tuple[OpenRule, Any]:
    """(rule, meta_params) of a published OPEN optimizer shipped with the
    package, by name (``PUBLISHED_OPEN``, case-insensitive); unknown ->
    ``ValueError`` listing the names."""
    key = name.strip().lower()
    if key not in PUBLISHED_OPEN:
        raise ValueError(
            f"no published OPEN weights named {name!r}; available: {', '.join(PUBLISHED_OPEN)} "
            f"(a path ending in .npy is also accepted)"
        )
    resource = importlib.resources.files("learned_optim").joinpath("weights", "open", f"{key}_OPEN.npy")
    with importlib.resources.as_file(resource) as path:
        return load_open_weights(os.fspath(path))


# Spec builders (``learned_optim.registry``) -----------------------------------------


def _fresh(rule: OpenRule, arg: str, spec: str):
    seed = int(parse_kwargs(arg, ("seed",), spec).get("seed", 0))
    return rule.make_optimizer(rule.init_meta_params(jax.random.key(seed)))


def _looks_like_path(arg: str) -> bool:
    a = arg.strip()
    return bool(a) and ("=" not in a or a.endswith(".npy") or os.sep in a)


def _is_bare_name(arg: str) -> bool:
    """``breakout`` (a name), not ``x.npy``, ``dir/x``, or ``seed=1``."""
    a = arg.strip()
    return bool(a) and "=" not in a and "/" not in a and os.sep not in a and not a.lower().endswith(".npy")


def from_spec_arg(arg: str, spec: str) -> optax.GradientTransformationExtraArgs:
    """``open:NAME`` (shipped published weights, ``PUBLISHED_OPEN``),
    ``open:PATH.npy`` (weights from a file) or ``open[:seed=N]`` (fresh, small).

    A bare word that is not a shipped name but is an existing file is read as
    a path (as before names existed); otherwise it is a ``ValueError`` listing
    the names."""
    a = arg.strip()
    if _is_bare_name(a) and (a.lower() in PUBLISHED_OPEN or not os.path.isfile(a)):
        try:
            rule, meta_params = load_published_open_weights(a)
        except ValueError as e:
            raise ValueError(f"optimizer spec {spec!r}: {e}") from None
        return rule.make_optimizer(meta_params)
    if _looks_like_path(arg):
        rule, meta_params = load_open_weights(a)
        return rule.make_optimizer(meta_params)
    return _fresh(OPEN_SMALL, arg, spec)


def large_from_spec_arg(arg: str, spec: str) -> optax.GradientTransformationExtraArgs:
    """``open_large[:seed=N]``: fresh larger OPEN (GRU 16, MLP 32; 3571 floats)."""
    return _fresh(OPEN_LARGE, arg, spec)
