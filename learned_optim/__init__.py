"""Optimizers as optax transforms: hand-designed, learned and second-order.

``from_spec("adam:lr=3e-4")`` builds any of them by name; see
``learned_optim.spec``. The keyword extra arguments agents pass to every
optimizer are documented in ``learned_optim.context``.
"""

from envs import _platform  # noqa: F401  (safe XLA flags before JAX starts)
from learned_optim.context import (
    STAT_KINDS,
    LayerStats,
    get_hyperparam,
    required_stats,
    set_hyperparam,
)
from learned_optim.spec import from_spec, known_optimizers, register

__all__ = [
    "STAT_KINDS", "LayerStats", "get_hyperparam", "required_stats", "set_hyperparam",
    "from_spec", "known_optimizers", "register",
]
