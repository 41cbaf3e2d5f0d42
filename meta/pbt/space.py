"""Tuned hyperparameters: names, bounds and scales, and their unit coordinates.

Each tuned hyperparameter has bounds and a scale: ``linear``, ``log`` (lr,
entropy coefficient) or ``log1m`` (gamma, GAE lambda: ``log(1 - x)``). The
*unit* coordinate ``u in [0, 1]`` is the position of the transformed value
between the transformed bounds; priors are uniform in ``u`` (log-uniform for
``log``), GPBT-PL velocities and PB2's GP live in ``u``. As the map is affine
in the transformed value, the GPBT-PL rule in ``u`` is exactly the rule in log
space for log-scale hyperparameters.

The tuned ``"lr"`` (``LEARNING_RATE``) is the optimizer's injected learning
rate in each member's ``opt_state`` (read and written with
``agents.core.learning_rate`` / ``with_learning_rate``); every other tuned
name is a field of the member's ``hparams``.

Arrays: ``h [P, H]`` natural values of ``P`` members and ``H`` tuned
hyperparameters; ``low``, ``high`` ``[H]`` or ``[P, H]``; ``codes [H]`` int32
indices into ``SCALES``.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from agents import core

LEARNING_RATE = "lr"  # the tuned name of the optimizer's injected learning rate
SCALES = ("linear", "log", "log1m")
_TINY = 1e-30


@dataclasses.dataclass(frozen=True)
class HParamSpace:
    """Names, bounds and scales of the tuned hyperparameters (``"lr"``, the
    optimizer's learning rate, and fields of the agent's hparams NamedTuple;
    fields not named here are copied, never explored)."""

    names: Tuple[str, ...]
    low: Tuple[float, ...]
    high: Tuple[float, ...]
    scale: Tuple[str, ...]

    def __post_init__(self):
        for f in ("names", "low", "high", "scale"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
        object.__setattr__(self, "low", tuple(float(x) for x in self.low))
        object.__setattr__(self, "high", tuple(float(x) for x in self.high))
        n = len(self.names)
        if n == 0:
            raise ValueError("HParamSpace.names must name at least one hyperparameter")
        if not (len(self.low) == len(self.high) == len(self.scale) == n):
            raise ValueError("HParamSpace: names, low, high and scale must have the same length")
        for name, lo, hi, sc in zip(self.names, self.low, self.high, self.scale):
            if sc not in SCALES:
                raise ValueError(f"HParamSpace: scale of {name!r} is {sc!r}; allowed: {', '.join(SCALES)}")
            if not lo < hi:
                raise ValueError(f"HParamSpace: bounds of {name!r} must satisfy low < high, got [{lo}, {hi}]")
            if sc == "log" and lo <= 0:
                raise ValueError(f"HParamSpace: log-scale {name!r} needs low > 0, got {lo}")
            if sc == "log1m" and hi >= 1:
                raise ValueError(f"HParamSpace: log1m-scale {name!r} needs high < 1, got {hi}")

    @classmethod
    def from_dict(cls, d: Dict[str, Tuple[float, float, str]]) -> "HParamSpace":
        names = tuple(d)
        return cls(names, tuple(d[k][0] for k in names), tuple(d[k][1] for k in names),
                   tuple(d[k][2] for k in names))

    def with_bounds(self, name: str, low: float, high: float) -> "HParamSpace":
        if name not in self.names:
            raise ValueError(f"{name!r} is not tuned; tuned: {', '.join(self.names)}")
        i = self.names.index(name)
        lo, hi = list(self.low), list(self.high)
        lo[i], hi[i] = low, high
        return HParamSpace(self.names, tuple(lo), tuple(hi), self.scale)

    def restrict(self, names: Sequence[str]) -> "HParamSpace":
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {unknown}; allowed: {', '.join(self.names)}")
        idx = [self.names.index(n) for n in names]
        return HParamSpace(tuple(names), tuple(self.low[i] for i in idx), tuple(self.high[i] for i in idx),
                           tuple(self.scale[i] for i in idx))

    @property
    def size(self) -> int:
        return len(self.names)

    def codes(self) -> np.ndarray:
        return np.array([SCALES.index(s) for s in self.scale], np.int32)


PPO_SPACE = HParamSpace.from_dict({
    "lr": (1e-5, 1e-2, "log"),
    "ent_coef": (1e-5, 0.1, "log"),
    "clip_eps": (0.05, 0.5, "linear"),
    "gamma": (0.9, 0.9995, "log1m"),
    "gae_lambda": (0.7, 0.999, "log1m"),
    "vf_coef": (0.1, 1.0, "linear"),
})

# TD3 (agents/td3.py): one learning rate for actor and critics; noise scales in
# normalised action units.
TD3_SPACE = HParamSpace.from_dict({
    "lr": (1e-5, 1e-2, "log"),
    "gamma": (0.9, 0.9995, "log1m"),
    "tau": (1e-3, 0.1, "log"),
    "policy_noise": (0.05, 0.5, "linear"),
    "noise_clip": (0.1, 1.0, "linear"),
    "exploration_noise": (0.01, 0.5, "linear"),
})


def _transform(x, codes):
    """Natural -> transformed value (per column; ``codes`` [H] of SCALES)."""
    lin = x
    log = jnp.log(jnp.maximum(x, _TINY))
    log1m = jnp.log(jnp.maximum(1.0 - x, _TINY))
    return jnp.where(codes == 1, log, jnp.where(codes == 2, log1m, lin))


def _untransform(t, codes):
    return jnp.where(codes == 1, jnp.exp(t), jnp.where(codes == 2, 1.0 - jnp.exp(t), t))


def to_unit(h, low, high, codes):
    """Natural hyperparameters ``[..., H]`` -> unit coordinates in [0, 1]."""
    tl, th = _transform(low, codes), _transform(high, codes)
    return (_transform(h, codes) - tl) / (th - tl)


def from_unit(u, low, high, codes):
    """Unit coordinates ``[..., H]`` -> natural values, clipped to the bounds."""
    tl, th = _transform(low, codes), _transform(high, codes)
    h = _untransform(tl + jnp.clip(u, 0.0, 1.0) * (th - tl), codes)
    return jnp.clip(h, low, high)


def member_matrix(states, names: Sequence[str]) -> jax.Array:
    """Stacked member states (leaves ``[P, ...]``) -> their tuned values
    ``[P, H]`` float32 (columns ``names``). No injected learning rate where
    ``"lr"`` is tuned -> ``ValueError`` (at trace time)."""
    columns = []
    for n in names:
        if n == LEARNING_RATE:
            lr = core.learning_rate(states)
            if lr is None:
                raise ValueError("'lr' is tuned but the optimizer has no injected learning rate; "
                                 "tune without it (--tune ...)")
            columns.append(lr)
        else:
            columns.append(getattr(states.hparams, n))
    return jnp.stack([jnp.asarray(c, jnp.float32) for c in columns], axis=-1)


def with_member_matrix(states, names: Sequence[str], mat: jax.Array):
    """Stacked member states with the columns of ``mat [P, H]`` written to
    ``names``: hparams fields (dtypes kept) and the learning rate (into every
    optimizer state of each member)."""
    hparams = states.hparams
    states = states.replace(hparams=hparams._replace(**{
        n: mat[..., i].astype(jnp.asarray(getattr(hparams, n)).dtype)
        for i, n in enumerate(names) if n != LEARNING_RATE
    }))
    if LEARNING_RATE in names:
        states = jax.vmap(core.with_learning_rate)(states, mat[..., list(names).index(LEARNING_RATE)])
    return states


def sample_prior(key, shape, low, high, codes):
    """Uniform in unit coordinates (log-uniform for log scales); ``[*shape, H]``."""
    u = jax.random.uniform(key, tuple(shape) + (low.shape[-1],))
    return from_unit(u, low, high, codes)
