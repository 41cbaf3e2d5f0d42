"""Every optimizer of the project, by name: the one registry.

``from_spec("kfac:lr=0.1")`` builds one (``learned_optim.spec`` parses the
string); ``info(spec)`` says what the rest of the project needs to know about
it without building anything: the learning rate it builds with, PBT's search
bounds for it, its relative speed on CPU, and for learned rules the rule
class. The names::

    adam adamw sgd rmsprop lion   optax, hyperparameters injected
                                  (``adam:lr=1e-3,b1=0.9,b2=0.999,eps=1e-8``)
    kfac diag_ggn                 second order (``learned_optim.kfac``, ``.diag_ggn``)
    open[:seed=N] | open:NAME     OPEN, fresh or with the published weights shipped
    | open:PATH.npy               with the package (NAME: breakout, freeway,
                                  gridworld) or read from a file
    open_large[:seed=N]           OPEN's larger architecture, fresh
    optim4rl mlp gru lstm         other learned rules, fresh (``:seed=N,...``)
    lopt:DIR                      a learned optimizer written by ``save``

Every transform is an ``optax.GradientTransformationExtraArgs``. Numeric
hyperparameters of the hand-designed ones are injected
(``optax.inject_hyperparams``), so ``learning_rate`` lives in the optimizer
state where agents and PBT can change it without recompiling.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import optax

from learned_optim import diag_ggn, io, kfac, open as open_, optim4rl, rules
from learned_optim.rule import LearnedRule
from learned_optim.spec import parse_kwargs, split_spec

DEFAULT_LR_BOUNDS = (1e-5, 1e-2)


@dataclasses.dataclass(frozen=True)
class OptimizerInfo:
    """What the project knows about one optimizer, before building it.

    name:        the spec's name (``"kfac"`` for ``"kfac:lr=0.1"``).
    build:       ``(arg, spec) -> transform``; ``arg`` is the spec after the
                 colon (may be ""), ``spec`` the whole string, for errors.
                 Bad settings -> ``ValueError``.
    default_lr:  the injected ``learning_rate`` it builds with when the spec
                 gives none; None where there is no injected learning rate
                 (OPEN, the MLP/GRU/LSTM rules: their step size is learned).
    lr_bounds:   PBT's search bounds for its learning rate.
    uses_preset_lr: the env presets' learning rates (tuned for Adam) apply to
                 it when the spec gives none (``meta.experiment.learning_rate_for``);
                 False: it starts from ``default_lr``.
    cpu_speed:   its agent's steps per second relative to Adam's, on CPU
                 (cost estimates).
    rule:        the ``LearnedRule`` class of learned kinds, else None.
    rule_settings: constructor arguments of ``make_rule(name)`` (``open_large``).
    doc:         the spec's form, one line.
    """

    name: str
    build: Callable[[str, str], optax.GradientTransformationExtraArgs]
    default_lr: Optional[float]
    lr_bounds: Tuple[float, float] = DEFAULT_LR_BOUNDS
    uses_preset_lr: bool = False
    cpu_speed: float = 1.0
    rule: Optional[type] = None
    doc: str = ""
    rule_settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# Hand-designed optimizers (optax) ------------------------------------------------


def _hand_designed(factory: Callable, defaults: Dict[str, float]):
    """``(arg, spec) -> transform`` of an optax alias with ``defaults`` injected."""

    def build(arg: str, spec: str) -> optax.GradientTransformationExtraArgs:
        settings = {**defaults, **parse_kwargs(arg, tuple(defaults), spec)}
        return optax.with_extra_args_support(optax.inject_hyperparams(factory)(**settings))

    return build


_ADAM = {"learning_rate": 3e-4, "b1": 0.9, "b2": 0.999, "eps": 1e-8}
_ADAMW = {**_ADAM, "weight_decay": 1e-4}
_SGD = {"learning_rate": 1e-2, "momentum": 0.0}
_RMSPROP = {"learning_rate": 3e-4, "decay": 0.99, "eps": 1e-5, "momentum": 0.0}
_LION = {"learning_rate": 3e-5, "b1": 0.9, "b2": 0.99, "weight_decay": 0.0}


# Learned optimizers ----------------------------------------------------------------


def load(path: str) -> Tuple[LearnedRule, Any]:
    """``(rule, meta_params)`` saved by ``learned_optim.save`` (see ``learned_optim.io``)."""
    path = os.path.abspath(os.fspath(path))
    rule = _saved_rule(path)
    return rule, io.restore_meta_params(path, rule)


def _saved_rule(path: str) -> LearnedRule:
    """The rule described by ``path/metadata.json`` (its meta-parameters are not read)."""
    metadata = io.read_metadata(path)
    try:
        return _rule_class_of_kind(metadata["kind"]).from_config(metadata["config"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"learned optimizer {path!r}: bad rule in {io.METADATA}: {e}") from None


def _build_lopt(arg: str, spec: str) -> optax.GradientTransformationExtraArgs:
    del spec
    if not arg.strip():
        raise ValueError("optimizer spec 'lopt:PATH' needs a path to a directory written by learned_optim.save")
    rule, meta_params = load(arg.strip())
    return rule.make_optimizer(meta_params)


_ENTRIES: Dict[str, OptimizerInfo] = {e.name: e for e in (
    OptimizerInfo("adam", _hand_designed(optax.adam, _ADAM), _ADAM["learning_rate"], uses_preset_lr=True,
                  doc="adam[:lr=3e-4,b1=0.9,b2=0.999,eps=1e-8]"),
    OptimizerInfo("adamw", _hand_designed(optax.adamw, _ADAMW), _ADAMW["learning_rate"], uses_preset_lr=True,
                  doc="adamw[:lr=3e-4,b1=0.9,b2=0.999,eps=1e-8,weight_decay=1e-4]"),
    OptimizerInfo("sgd", _hand_designed(optax.sgd, _SGD), _SGD["learning_rate"], lr_bounds=(1e-4, 1.0),
                  doc="sgd[:lr=1e-2,momentum=0]"),
    OptimizerInfo("rmsprop", _hand_designed(optax.rmsprop, _RMSPROP), _RMSPROP["learning_rate"],
                  doc="rmsprop[:lr=3e-4,decay=0.99,eps=1e-5,momentum=0]"),
    OptimizerInfo("lion", _hand_designed(optax.lion, _LION), _LION["learning_rate"],
                  doc="lion[:lr=3e-5,b1=0.9,b2=0.99,weight_decay=0]"),
    OptimizerInfo("kfac", kfac.from_spec_arg, 0.05, lr_bounds=(1e-3, 0.5), cpu_speed=0.15,
                  doc="kfac[:lr=0.05,damping=1e-3,ema=0.95,norm=1e-3,period=5,fperiod=1,mode=exact|factored,...]"),
    OptimizerInfo("diag_ggn", diag_ggn.from_spec_arg, 0.01, lr_bounds=(1e-4, 0.3), cpu_speed=0.7,
                  doc="diag_ggn[:lr=0.01,damping=1e-3,ema=0.95,norm=1e-3,mode=natural|sqrt,...]"),
    OptimizerInfo("open", open_.from_spec_arg, None, cpu_speed=0.25, rule=open_.OpenRule,
                  doc="open[:seed=N] (fresh) | open:breakout|freeway|gridworld (published, shipped) | open:PATH.npy"),
    OptimizerInfo("open_large", open_.large_from_spec_arg, None, cpu_speed=0.2, rule=open_.OpenRule,
                  rule_settings={"gru_features": 16, "hidden_size": 32}, doc="open_large[:seed=N]"),
    OptimizerInfo("optim4rl", optim4rl.from_spec_arg, optim4rl.Optim4RLRule.learning_rate,
                  rule=optim4rl.Optim4RLRule, doc="optim4rl[:seed=N,lr=1e-3,grad_clip=1,hidden=8]"),
    OptimizerInfo("mlp", rules.spec_builder(rules.MLPRule), None, rule=rules.MLPRule,
                  doc="mlp[:seed=N,hidden=H,step_mult=X,exp_mult=Y]"),
    OptimizerInfo("gru", rules.spec_builder(rules.GRURule), None, rule=rules.GRURule,
                  doc="gru[:seed=N,hidden=H,step_mult=X,exp_mult=Y]"),
    OptimizerInfo("lstm", rules.spec_builder(rules.LSTMRule), None, rule=rules.LSTMRule,
                  doc="lstm[:seed=N,hidden=H,step_mult=X,exp_mult=Y]"),
    OptimizerInfo("lopt", _build_lopt, None, doc="lopt:DIR (written by learned_optim.save)"),
)}


def names() -> Tuple[str, ...]:
    """Every optimizer name, sorted."""
    return tuple(sorted(_ENTRIES))


def rule_names() -> Tuple[str, ...]:
    """The learned rules ``make_rule`` makes fresh: open, open_large, optim4rl, mlp, gru, lstm."""
    return tuple(e.name for e in _ENTRIES.values() if e.rule is not None)


def info(name_or_spec: str) -> OptimizerInfo:
    """The entry of ``"kfac"`` or of a whole spec (``"kfac:lr=1"``); unknown -> ``ValueError``.

    For ``lopt:DIR`` the entry's ``default_lr`` is that of the saved rule
    (read from ``DIR/metadata.json``; an Optim4RL rule has one)."""
    name, arg = split_spec(name_or_spec)
    if name not in _ENTRIES:
        raise ValueError(f"unknown optimizer {name!r} in spec {name_or_spec!r}; known: {', '.join(names())}")
    entry = _ENTRIES[name]
    if name == "lopt" and arg.strip():
        return dataclasses.replace(entry, default_lr=_saved_rule(os.path.abspath(arg.strip())).default_lr)
    return entry


def from_spec(spec: str) -> optax.GradientTransformationExtraArgs:
    """The optax transform that ``spec`` names (see the module docstring)."""
    name, arg = split_spec(spec)
    if name not in _ENTRIES:
        raise ValueError(f"unknown optimizer {name!r} in spec {spec!r}; known: {', '.join(names())}")
    return _ENTRIES[name].build(arg, spec)


def make_rule(name: str) -> LearnedRule:
    """A fresh rule with its default sizes, e.g. ``make_rule("open_large")``."""
    entry = _ENTRIES.get(name)
    if entry is None or entry.rule is None:
        raise ValueError(f"unknown learned rule {name!r}; known: {', '.join(rule_names())}")
    return entry.rule(**entry.rule_settings)


def _rule_class_of_kind(kind: str) -> type:
    """The rule class whose ``kind`` (as saved in metadata) is ``kind``."""
    classes = {e.rule.kind: e.rule for e in _ENTRIES.values() if e.rule is not None}
    if kind not in classes:
        raise ValueError(f"unknown learned-optimizer kind {kind!r}; known: {', '.join(sorted(classes))}")
    return classes[kind]
