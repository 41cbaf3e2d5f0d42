"""Optimizers as optax transforms: hand-designed, learned and second-order.

``from_spec("adam:lr=3e-4")`` builds any of them by name; see
``learned_optim.spec``. The keyword extra arguments agents pass to every
optimizer are documented in ``learned_optim.context``.
"""

import runtime  # noqa: F401  (safe XLA flags before JAX starts)
from learned_optim.context import (
    STAT_KINDS,
    LayerStats,
    get_hyperparam,
    required_stats,
    set_hyperparam,
)
from learned_optim.spec import from_spec, known_optimizers, register

# Learned optimizers (modules imported on first use, so this import stays light).
register("open", "learned_optim.open:from_spec_arg")              # open:PATH.npy | open[:seed=N]
register("open_large", "learned_optim.open:large_from_spec_arg")  # open_large[:seed=N]
register("optim4rl", "learned_optim.optim4rl:from_spec_arg")
register("mlp", "learned_optim.rules:mlp_from_spec_arg")
register("gru", "learned_optim.rules:gru_from_spec_arg")
register("lstm", "learned_optim.rules:lstm_from_spec_arg")
register("lopt", "learned_optim.io:from_spec_arg")                # lopt:DIR from learned_optim.save


def save(path, rule, meta_params, overwrite=False):
    """Saves a learned optimizer (see ``learned_optim.io.save``)."""
    from learned_optim.io import save as _save

    return _save(path, rule, meta_params, overwrite=overwrite)


def load(path):
    """``(rule, meta_params)`` saved by ``save`` (see ``learned_optim.io.load``)."""
    from learned_optim.io import load as _load

    return _load(path)


_LAZY = {
    "OpenRule": "learned_optim.open", "load_open_weights": "learned_optim.open",
    "Optim4RLRule": "learned_optim.optim4rl",
    "MLPRule": "learned_optim.rules", "GRURule": "learned_optim.rules", "LSTMRule": "learned_optim.rules",
    "LearnedRule": "learned_optim.base",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'learned_optim' has no attribute {name!r}")


__all__ = [
    "STAT_KINDS", "LayerStats", "get_hyperparam", "required_stats", "set_hyperparam",
    "from_spec", "known_optimizers", "register", "save", "load", *_LAZY,
]
