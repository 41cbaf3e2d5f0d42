"""Where each parameter element sits: per-leaf facts and the flat layout.

Parameter trees are expected in the agents' layout ``{"actor": net,
"critic": net}`` with ``net = {"Dense_0": {"kernel": [in, out], "bias":
[out]}, ..., ("log_std": [A])}``; a bare ``net`` also works. ``leaf_infos``
reads the per-leaf facts the learned rules use from the tree's paths.

Learned rules run one small network on every parameter element, so they lay
all ``N`` elements of all leaves end to end (``jax.tree.leaves`` order, each
leaf raveled in C order): ``FlatLayout`` records where each leaf's elements
are.
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

NETWORK_PARTS = ("actor", "critic")


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


def key_name(k: Any) -> str:
    """The name of one ``jax.tree_util`` path entry (dict key, attribute, index)."""
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
        names = tuple(key_name(k) for k in path)
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


# All elements laid end to end -----------------------------------------------------


class FlatLayout(NamedTuple):
    """Static layout of all parameter elements laid end to end (``N`` in total).

    shapes:     per-leaf shapes, in tree order.
    spans:      per-leaf ``(start, end)`` element ranges, in tree order.
    layer_prop: ``[N]`` float32 numpy.
    is_actor:   ``[N]`` float32 numpy, 1.0 for actor elements.
    """

    shapes: Tuple[Tuple[int, ...], ...]
    spans: Tuple[Tuple[int, int], ...]
    layer_prop: np.ndarray
    is_actor: np.ndarray

    @property
    def size(self) -> int:
        """``N``, the number of elements."""
        return self.spans[-1][1] if self.spans else 0


def flat_layout(infos: Sequence[LeafInfo], shapes: Sequence[Tuple[int, ...]]) -> FlatLayout:
    sizes = [math.prod(s) for s in shapes]
    ends = np.cumsum(sizes, dtype=np.int64)
    rep = lambda vals: np.repeat(np.asarray(vals, np.float32), sizes)  # noqa: E731
    return FlatLayout(
        shapes=tuple(tuple(s) for s in shapes),
        spans=tuple((int(e - n), int(e)) for n, e in zip(sizes, ends)),
        layer_prop=rep([i.layer_prop for i in infos]),
        is_actor=rep([float(i.is_actor) for i in infos]),
    )


def flatten_elements(leaves: Sequence[jax.Array], trailing: Tuple[int, ...] = ()) -> jax.Array:
    """Leaves of shape ``S_i + trailing`` -> ``[N, *trailing]`` float32."""
    return jnp.concatenate([jnp.reshape(x, (-1,) + trailing).astype(jnp.float32) for x in leaves], axis=0)


def split_elements(flat: jax.Array, shapes: Sequence[Tuple[int, ...]]) -> List[jax.Array]:
    """Inverse of ``flatten_elements``: ``[N, ...]`` -> leaves of ``shape + flat.shape[1:]``."""
    out, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(flat[start:start + size].reshape(tuple(shape) + flat.shape[1:]))
        start += size
    return out


def flat_size(tree: Any) -> int:
    """Number of elements of all leaves of ``tree``."""
    return sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(tree))


def check_flat_state(who: str, state_rows: jax.Array, n: int) -> None:
    """A flat ``[F, N]`` state must match the ``N``-element params it is used with."""
    if state_rows.shape[-1] != n:
        raise ValueError(f"{who} state holds {state_rows.shape[-1]} elements but the params have {n}; "
                         "initialise the state with tx.init(params) for these params")
