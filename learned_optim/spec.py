"""Optimizer specs: one string names an optimizer and its settings.

    adam                      a name (``learned_optim.registry.names()``)
    adam:lr=1e-3,eps=1e-5     keyword settings after a colon, comma separated
    open:PATH.npy / lopt:DIR  or a path, for optimizers read from files
    open:breakout             or a name the optimizer knows (shipped weights)

This module only parses such strings; ``learned_optim.registry`` knows the
optimizers and builds them (``learned_optim.from_spec``).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

_LR_ALIASES = {"lr": "learning_rate"}


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


def with_defaults(spec: str, defaults: Mapping[str, Mapping[str, float]]) -> str:
    """``spec`` with the settings ``defaults[name]`` gives for its optimizer
    added where the spec sets none: with ``{"adam": {"eps": 1e-5}}``,
    ``"adam"`` -> ``"adam:eps=1e-05"``, ``"adam:lr=3e-3"`` ->
    ``"adam:lr=3e-3,eps=1e-05"``, ``"adam:eps=1e-8"`` unchanged. Optimizers
    ``defaults`` does not name, and path arguments (``open:PATH``), are
    returned as they are."""
    name, arg = split_spec(spec)
    extra = defaults.get(name)
    if not extra or ("=" not in arg and arg.strip()):
        return spec.strip()
    given = {_LR_ALIASES.get(k.strip(), k.strip()) for k, sep, _ in (i.partition("=") for i in arg.split(",")) if sep}
    added = [f"{k}={v!r}" for k, v in extra.items() if k not in given]
    if not added:
        return spec.strip()
    items = [i.strip() for i in arg.split(",") if i.strip()] + added
    return f"{name}:{','.join(items)}"


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
