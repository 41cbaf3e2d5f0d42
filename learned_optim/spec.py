"""Optimizer specs: one string names an optimizer and its settings.

    adam                      Adam, lr 3e-4
    adam:lr=1e-3,eps=1e-5     keyword settings after a colon, comma separated
    rmsprop / sgd / lion / adamw
    kfac:lr=...,damping=...   second-order (see learned_optim.kfac)
    diag_ggn:lr=...,mode=...  diagonal Gauss-Newton (see learned_optim.diag_ggn)
    open:PATH.npy             OPEN with published weights (see learned_optim.open)
    lopt:DIR                  a learned optimizer saved by learned_optim.save
    open / optim4rl / mlp / gru / lstm [:seed=N]   freshly initialised rules

``from_spec`` returns an ``optax.GradientTransformationExtraArgs``. Numeric
hyperparameters of hand-designed optimizers are injected
(``optax.inject_hyperparams``), so ``learning_rate`` lives in the optimizer
state where agents and PBT can change it without recompiling.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Tuple

import optax

# name -> (builder, allowed keyword settings, defaults). Builders of other
# modules are named "module:function" and imported on first use.
_LR_ALIASES = {"lr": "learning_rate"}


def _hand_designed(factory: Callable, defaults: Dict[str, float]):
    def build(**kwargs):
        settings = {**defaults, **kwargs}
        return optax.with_extra_args_support(optax.inject_hyperparams(factory)(**settings))

    return build, tuple(defaults)


_BUILTIN = {
    "adam": _hand_designed(optax.adam, {"learning_rate": 3e-4, "b1": 0.9, "b2": 0.999, "eps": 1e-8}),
    "adamw": _hand_designed(
        optax.adamw, {"learning_rate": 3e-4, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 1e-4}
    ),
    "sgd": _hand_designed(optax.sgd, {"learning_rate": 1e-2, "momentum": 0.0}),
    "rmsprop": _hand_designed(
        optax.rmsprop, {"learning_rate": 3e-4, "decay": 0.99, "eps": 1e-5, "momentum": 0.0}
    ),
    "lion": _hand_designed(optax.lion, {"learning_rate": 3e-5, "b1": 0.9, "b2": 0.99, "weight_decay": 0.0}),
}

# Optimizers implemented in other modules of this package: "module:function";
# the function takes the spec's argument string (after the colon, may be "")
# and returns the transform, raising ValueError on bad settings.
_EXTERNAL: Dict[str, str] = {}


def register(name: str, target: str) -> None:
    """Declares ``name`` as built by ``"module:function"`` (imported lazily)."""
    _EXTERNAL[name] = target


def known_optimizers() -> Tuple[str, ...]:
    return tuple(sorted(set(_BUILTIN) | set(_EXTERNAL)))


def parse_kwargs(arg: str, allowed, spec: str, integer=(), choices=None, aliases=None) -> Dict[str, Any]:
    """``"lr=1e-3,eps=1e-5"`` -> ``{"learning_rate": 1e-3, "eps": 1e-5}``, checked.

    ``allowed``: numeric settings; ``integer``: settings that must be whole
    numbers; ``choices``: ``{setting: allowed strings}``; ``aliases``: short
    names (``lr`` always means ``learning_rate``). Anything else -> a
    ``ValueError`` naming the setting and the allowed ones."""
    choices = choices or {}
    aliases = {**_LR_ALIASES, **(aliases or {})}
    names = tuple(allowed) + tuple(k for k in integer if k not in allowed) + tuple(choices)
    out: Dict[str, Any] = {}
    for item in filter(None, (a.strip() for a in arg.split(","))):
        if "=" not in item:
            raise ValueError(f"optimizer spec {spec!r}: expected key=value, got {item!r}")
        key, value = (s.strip() for s in item.split("=", 1))
        key = aliases.get(key, key)
        if key not in names:
            extra = {a: b for a, b in aliases.items() if b in names}
            hint = f" (aliases: {', '.join(f'{a}={b}' for a, b in extra.items())})" if extra else ""
            raise ValueError(
                f"optimizer spec {spec!r}: unknown setting {key!r}; allowed: {', '.join(names)}{hint}"
            )
        if key in choices:
            if value not in choices[key]:
                raise ValueError(
                    f"optimizer spec {spec!r}: {key}={value!r}; allowed: {', '.join(choices[key])}"
                )
            out[key] = value
            continue
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"optimizer spec {spec!r}: {key}={value!r} is not a number") from None
        if key in integer:
            if not number.is_integer():
                raise ValueError(f"optimizer spec {spec!r}: {key}={value!r} must be an integer")
            number = int(number)
        out[key] = number
    return out


def split_spec(spec: str) -> Tuple[str, str]:
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"optimizer spec must be a non-empty string, got {spec!r}")
    name, _, arg = spec.strip().partition(":")
    return name.strip().lower(), arg


def split_spec_list(text: str) -> Tuple[str, ...]:
    """A comma-separated list of specs, where a spec's own settings may also
    use commas: ``"adam,kfac:period=20,fperiod=2,diag_ggn"`` ->
    ``("adam", "kfac:period=20,fperiod=2", "diag_ggn")``. A ``key=value``
    item without a ``:`` continues the spec before it."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if out and "=" in item and ":" not in item and ":" in out[-1]:
            out[-1] = f"{out[-1]},{item}"
        else:
            out.append(item)
    return tuple(out)


def from_spec(spec: str) -> optax.GradientTransformationExtraArgs:
    """The optax transform that ``spec`` names (see the module docstring)."""
    name, arg = split_spec(spec)
    if name in _BUILTIN:
        build, allowed = _BUILTIN[name]
        return build(**parse_kwargs(arg, allowed, spec))
    if name in _EXTERNAL:
        module, func = _EXTERNAL[name].split(":")
        return getattr(importlib.import_module(module), func)(arg)
    raise ValueError(
        f"unknown optimizer {name!r} in spec {spec!r}; known: {', '.join(known_optimizers())}"
    )


def explicit_learning_rate(spec: str):
    """The learning rate a spec sets explicitly (``adam:lr=1e-3`` -> 1e-3), else None.

    Agents keep the learning rate in their hyperparameters (so populations and
    PBT can vary it) and write it into the optimizer; scripts use this to let
    a spec's own ``lr=`` win over the env preset's default."""
    _, arg = split_spec(spec)
    for item in arg.split(","):
        key, sep, value = item.partition("=")
        if sep and _LR_ALIASES.get(key.strip(), key.strip()) == "learning_rate":
            try:
                return float(value)
            except ValueError:
                return None
    return None


def check_spec(spec: str) -> None:
    """Raises the ValueError ``from_spec`` would, without building anything heavy."""
    from_spec(spec)


# Second-order optimizers (imported on first use).
register("kfac", "learned_optim.kfac:from_spec_arg")          # see learned_optim.kfac
register("diag_ggn", "learned_optim.diag_ggn:from_spec_arg")  # see learned_optim.diag_ggn


def default_learning_rate(spec: str):
    """The learning rate ``spec`` builds with when none is given (its injected
    ``learning_rate``, e.g. 0.05 for ``kfac``), or None for optimizers without
    one (OPEN, learned rules)."""
    import jax.numpy as jnp

    from learned_optim.context import get_hyperparam

    tx = from_spec(spec)
    value = get_hyperparam(tx.init({"w": jnp.zeros((2, 2), jnp.float32)}), "learning_rate")
    return None if value is None else float(value)

