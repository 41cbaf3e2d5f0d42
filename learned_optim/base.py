"""The common shape of learned optimizers ("rules") and per-parameter helpers.

A rule is a frozen dataclass of constructor arguments (hidden sizes, input
features, step scales) with two methods::

    meta_params = rule.init_meta_params(key)      # pytree of float32 arrays
    tx = rule.make_optimizer(meta_params)         # optax.GradientTransformationExtraArgs

``meta_params`` may be traced: build the transform *inside* the function that
is ``jax.vmap``-ed over a population of meta-parameters, e.g.::

    def train_one(meta_params, key):
        tx = rule.make_optimizer(meta_params)
        ...
    jax.vmap(train_one)(population, keys)

Per-parameter recurrent state (GRU/LSTM hidden states, momenta) lives in the
optax state, a NamedTuple of arrays shaped like the parameters plus a
trailing feature axis, so it is carried by ``lax.scan`` and swapped by PBT
like any optimizer state.

Parameter trees are expected in the agents' layout
``{"actor": net, "critic": net}`` with ``net = {"Dense_0": {"kernel": [in,
out], "bias": [out]}, ..., ("log_std": [A])}``; a bare ``net`` also works.
``leaf_infos`` reads the per-leaf facts the rules use from the tree's paths.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from typing import Any, ClassVar, Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from learned_optim.context import neutral_key

# kind -> "module:Class"; imported on first use so `import learned_optim` stays light.
RULE_KINDS: Dict[str, str] = {
    "open": "learned_optim.open:OpenRule",
    "optim4rl": "learned_optim.optim4rl:Optim4RLRule",
    "mlp": "learned_optim.rules:MLPRule",
    "gru": "learned_optim.rules:GRURule",
    "lstm": "learned_optim.rules:LSTMRule",
}

NETWORK_PARTS = ("actor", "critic")
NEUTRAL_DORMANCY = 1.0  # a neuron exactly as active as its layer's average


def rule_class(kind: str) -> type:
    """The rule class registered under ``kind`` (see ``RULE_KINDS``)."""
    if kind not in RULE_KINDS:
        raise ValueError(f"unknown learned-optimizer kind {kind!r}; known: {', '.join(sorted(RULE_KINDS))}")
    module, name = RULE_KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)


class LearnedRule:
    """Base of the rule dataclasses: flattening, config round trip, sizes.

    Subclasses are ``@dataclasses.dataclass(frozen=True)`` and define
    ``kind``, ``init_meta_params`` and ``make_optimizer``.
    """

    kind: ClassVar[str] = ""

    def init_meta_params(self, key: jax.Array) -> Any:
        raise NotImplementedError

    def make_optimizer(self, meta_params: Any):
        raise NotImplementedError

    # Shapes and flat vectors --------------------------------------------------

    def meta_params_template(self) -> Any:
        """Tree of ``jax.ShapeDtypeStruct`` of the meta-parameters (nothing computed)."""
        return jax.eval_shape(self.init_meta_params, jax.random.key(0))

    @property
    def num_meta_params(self) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(self.meta_params_template()))

    def flatten(self, meta_params: Any) -> jax.Array:
        """``[num_meta_params]`` float32: leaves in JAX tree order, each raveled in C order."""
        return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(meta_params)])

    def unflatten(self, flat: Any) -> Any:
        """Inverse of ``flatten``: a ``[num_meta_params]`` vector -> meta-param tree."""
        template = self.meta_params_template()
        leaves, treedef = jax.tree.flatten(template)
        flat = jnp.asarray(flat, jnp.float32)
        n = sum(math.prod(x.shape) for x in leaves)
        if flat.shape != (n,):
            raise ValueError(f"{type(self).__name__}: expected a flat vector of {n} floats, got shape {flat.shape}")
        out, start = [], 0
        for leaf in leaves:
            size = math.prod(leaf.shape)
            out.append(flat[start:start + size].reshape(leaf.shape))
            start += size
        return jax.tree.unflatten(treedef, out)

    # Config round trip (for save/load) ----------------------------------------

    def config(self) -> Dict[str, Any]:
        """Constructor arguments as JSON-ready values (tuples as lists)."""
        def plain(v):
            return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "LearnedRule":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config) - fields
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown setting(s) {sorted(unknown)}; allowed: {sorted(fields)}")
        def tupled(v):
            return tuple(tupled(x) for x in v) if isinstance(v, list) else v
        return cls(**{k: tupled(v) for k, v in config.items()})


def check_positive_int(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")


# Per-leaf facts read from tree paths --------------------------------------------


class LeafInfo(NamedTuple):
    """Static facts about one parameter leaf.

    path:       key names from the root, e.g. ``("actor", "Dense_1", "kernel")``.
    part:       ``"actor"`` / ``"critic"`` / ``None`` (a bare network).
    layer:      the layer entry inside the network (``"Dense_1"``, ``"log_std"``) or None.
    layer_prop: index of ``layer`` among the network's entries / (entries - 1):
                dense layers in numeric order, then other entries (``log_std``)
                in name order -- the flax creation order the OPEN weights were
                trained with. 0.0 where there is no layer structure.
    is_actor:   the leaf belongs to the actor network.
    """

    path: Tuple[str, ...]
    part: Optional[str]
    layer: Optional[str]
    layer_prop: float
    is_actor: bool


_DENSE = re.compile(r"Dense_(\d+)")


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _layer_order(name: str):
    m = _DENSE.fullmatch(name)
    return (0, int(m.group(1)), "") if m else (1, 0, name)


def _layer_props(network: Any) -> Dict[str, float]:
    if not isinstance(network, dict):
        return {}
    names = sorted(network, key=_layer_order)
    denom = max(len(names) - 1, 1)
    return {n: i / denom for i, n in enumerate(names)}


def leaf_infos(tree: Any) -> List[LeafInfo]:
    """``LeafInfo`` for each leaf of ``tree``, in ``jax.tree.leaves`` order."""
    root_is_net = isinstance(tree, dict) and any(_DENSE.fullmatch(str(k)) for k in tree)
    infos = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = tuple(_key_name(k) for k in path)
        part, layer, props = None, None, {}
        if names and names[0] in NETWORK_PARTS and isinstance(tree, dict):
            part = names[0]
            layer = names[1] if len(names) > 1 else None
            props = _layer_props(tree[part])
        elif root_is_net and names:
            layer = names[0]
            props = _layer_props(tree)
        infos.append(LeafInfo(names, part, layer, float(props.get(layer, 0.0)), part == "actor"))
    return infos


# Extra arguments -----------------------------------------------------------------


class Context(NamedTuple):
    train_fraction: jax.Array  # float32 scalar
    batch_fraction: jax.Array  # float32 scalar
    key: jax.Array
    layer_stats: Any


def read_context(extra: Dict[str, Any], count: jax.Array) -> Context:
    """The extra arguments of ``learned_optim.context`` with their neutral
    values where missing (fractions 0.0, key from the step count)."""
    def frac(name):
        v = extra.get(name)
        return jnp.zeros((), jnp.float32) if v is None else jnp.asarray(v, jnp.float32).reshape(())
    key = extra.get("key")
    return Context(frac("train_fraction"), frac("batch_fraction"),
                   neutral_key(count) if key is None else key, extra.get("layer_stats"))


# Per-parameter features ----------------------------------------------------------


def second_moment_normalise(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """``x [..., F]`` divided, per feature, by ``sqrt(eps + mean(x**2))`` over
    all leading (per-element) axes of the tensor."""
    axes = tuple(range(x.ndim - 1))
    return x * jax.lax.rsqrt(eps + jnp.mean(jnp.square(x), axis=axes, keepdims=True))


def update_momenta(m: jax.Array, g: jax.Array, betas: Sequence[float]) -> jax.Array:
    """``m [..., K] <- beta_k m + (1 - beta_k) g`` for each beta (no bias correction)."""
    b = jnp.asarray(betas, jnp.float32)
    return b * m + (1.0 - b) * g[..., None].astype(jnp.float32)


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


# Flattening leaves into one batch of elements -------------------------------------


def concat_elements(leaves: Sequence[jax.Array]) -> jax.Array:
    """``[..., F]`` leaves -> ``[N, F]``, N the total number of elements."""
    return jnp.concatenate([x.reshape((-1, x.shape[-1])) for x in leaves], axis=0)


def split_elements(flat: jax.Array, shapes: Sequence[Tuple[int, ...]]) -> List[jax.Array]:
    """Inverse of ``concat_elements``: ``[N, ...]`` -> leaves of ``shape + flat.shape[1:]``."""
    out, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(flat[start:start + size].reshape(tuple(shape) + flat.shape[1:]))
        start += size
    return out


class FlatLayout(NamedTuple):
    """Static layout of all parameter elements laid end to end (``N`` in total).

    shapes:     per-leaf shapes, in tree order.
    segments:   ``[N]`` int32 numpy, the leaf index of each element.
    counts:     ``[L]`` float32 numpy, elements per leaf.
    layer_prop: ``[N]`` float32 numpy.
    is_actor:   ``[N]`` float32 numpy, 1.0 for actor elements.
    """

    shapes: Tuple[Tuple[int, ...], ...]
    segments: np.ndarray
    counts: np.ndarray
    layer_prop: np.ndarray
    is_actor: np.ndarray


def flat_layout(infos: Sequence[LeafInfo], shapes: Sequence[Tuple[int, ...]]) -> FlatLayout:
    sizes = [math.prod(s) for s in shapes]
    rep = lambda vals: np.repeat(np.asarray(vals, np.float32), sizes)  # noqa: E731
    return FlatLayout(
        shapes=tuple(tuple(s) for s in shapes),
        segments=np.repeat(np.arange(len(sizes), dtype=np.int32), sizes),
        counts=np.asarray(sizes, np.float32),
        layer_prop=rep([i.layer_prop for i in infos]),
        is_actor=rep([float(i.is_actor) for i in infos]),
    )


def flat_normalise(x: jax.Array, layout: FlatLayout, eps: float = 1e-5) -> jax.Array:
    """``second_moment_normalise`` of each leaf's rows of ``x [N, F]`` at once."""
    sums = jax.ops.segment_sum(jnp.square(x), layout.segments, num_segments=len(layout.shapes),
                               indices_are_sorted=True)
    mean_sq = sums / layout.counts[:, None]
    return x * jax.lax.rsqrt(eps + mean_sq[layout.segments])


def flat_dormancy(layer_stats: Any, infos: Sequence[LeafInfo], layout: FlatLayout) -> jax.Array:
    """``[N]``: ``leaf_dormancy`` of every leaf laid end to end."""
    if layer_stats is None:
        return jnp.full(layout.segments.shape, NEUTRAL_DORMANCY, jnp.float32)
    return jnp.concatenate([jnp.ravel(leaf_dormancy(layer_stats, i, s)) for i, s in zip(infos, layout.shapes)])


def flatten_elements(leaves: Sequence[jax.Array], trailing: Tuple[int, ...] = ()) -> jax.Array:
    """Leaves of shape ``S_i + trailing`` -> ``[N, *trailing]`` float32."""
    return jnp.concatenate([jnp.reshape(x, (-1,) + trailing).astype(jnp.float32) for x in leaves], axis=0)


# Feature-major recurrent cells ----------------------------------------------------
#
# Learned rules run a small network on every parameter element. Laid out
# feature-major (``[features, N]``), its layers are matmuls ``[out, in] @ [in,
# N]`` and elementwise passes over contiguous ``N``-vectors, which CPU GEMMs
# and XLA's loop emitter handle far better than ``[N, features]`` with its
# short minor axis (measured 2-2.5x on MinAtar-sized agents).


class GRUWeights(NamedTuple):
    """A flax ``GRUCell``'s parameters arranged for ``gru_feature_major``."""

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


def gru_feature_major(w: GRUWeights, carry: jax.Array, x: jax.Array) -> jax.Array:
    """flax ``GRUCell`` on feature-major data: ``carry [H, N]``, ``x [I, N]`` ->
    new carry ``[H, N]`` (= the cell's output); equal to
    ``GRUCell.apply(params, carry.T, x.T)[0].T`` up to float rounding."""
    hsize = carry.shape[0]
    gi = jnp.dot(w.w_in, x) + w.b_in[:, None]                            # [3H, N]
    gh = jnp.dot(w.w_hidden, carry)                                      # [3H, N]
    rz = jax.nn.sigmoid(gi[:2 * hsize] + gh[:2 * hsize])
    n = jnp.tanh(gi[2 * hsize:] + rz[:hsize] * (gh[2 * hsize:] + w.b_hn[:, None]))
    return n + rz[hsize:] * (carry - n)                                  # (1 - z) n + z h


def flat_size(tree: Any) -> int:
    """Number of elements of all leaves of ``tree``."""
    return sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(tree))


def check_flat_state(who: str, state_rows: jax.Array, n: int) -> None:
    """A flat ``[F, N]`` state must match the params it is used with."""
    if state_rows.shape[-1] != n:
        raise ValueError(f"{who} state holds {state_rows.shape[-1]} elements but the params have {n}; "
                         "initialise the state with tx.init(params) for these params")
