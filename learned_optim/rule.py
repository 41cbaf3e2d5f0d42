"""The common shape of learned optimizers ("rules").

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
optax state, a NamedTuple of arrays, so it is carried by ``lax.scan`` and
swapped by PBT like any optimizer state. The rules themselves are listed in
``learned_optim.registry``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np


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

    @property
    def default_lr(self) -> Optional[float]:
        """The injected ``learning_rate`` its transform starts with, or None
        where the rule has none (its step size is learned)."""
        return None

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
