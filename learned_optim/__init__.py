"""Optimizers as optax transforms: hand-designed, learned and second-order.

``from_spec("adam:lr=3e-4")`` builds any of them by name; the names and what
is known about each are in ``learned_optim.registry``. The keyword extra
arguments agents pass to every optimizer are documented in
``learned_optim.context``. A learned optimizer is a rule (``OpenRule``,
``Optim4RLRule``, ``MLPRule``, ``GRURule``, ``LSTMRule``) plus a pytree of
meta-parameters; ``save``/``load`` write and read the pair. K-FAC and
diagonal GGN in your own optax loop take ``layer_stats=layer_stats_for(model,
params, x, key)`` at every update.
"""

import runtime  # noqa: F401  (safe XLA flags before JAX starts)
from learned_optim import registry
from learned_optim.context import (
    STAT_KINDS,
    LayerStats,
    get_hyperparam,
    required_stats,
    set_hyperparam,
)
from learned_optim.io import save
from learned_optim.layer_stats import (categorical_sampled_loglik, dense_layer_stats, gaussian_sampled_loglik,
                                       layer_stats_for)
from learned_optim.open import OpenRule, load_open_weights
from learned_optim.optim4rl import Optim4RLRule
from learned_optim.registry import OptimizerInfo, from_spec, info, load, make_rule, names, rule_names
from learned_optim.rule import LearnedRule
from learned_optim.rules import GRURule, LSTMRule, MLPRule

known_optimizers = names  # every optimizer name, sorted (the older name of ``names``)


__all__ = [
    "STAT_KINDS", "LayerStats", "get_hyperparam", "required_stats", "set_hyperparam",
    "registry", "OptimizerInfo", "from_spec", "info", "names", "rule_names", "make_rule", "known_optimizers",
    "save", "load", "load_open_weights",
    "layer_stats_for", "dense_layer_stats", "categorical_sampled_loglik", "gaussian_sampled_loglik",
    "LearnedRule", "OpenRule", "Optim4RLRule", "MLPRule", "GRURule", "LSTMRule",
]
