"""Learning-rate tuning for the benchmark: grids (absolute or relative to an
optimizer's default lr, one per optimizer name) and the rule that picks an lr
from a sweep's final returns.

Used by ``meta.benchmark``; a sweep itself runs as one vmapped program
(``meta.experiment.train_lr_sweep``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from learned_optim import registry
from learned_optim.spec import split_spec
from meta import stats

# Learning-rate grid used by --tune-lr when --lr-grid is not given: half-decade
# steps around each optimizer's own default, two on either side.
DEFAULT_LR_GRID = "x0.1,x0.3,x1,x3,x10"
SELECTION_RULE_TEMPLATE = (
    "highest mean over tuning seeds of the {measure}; an lr with a diverged seed (non-finite parameters) "
    "or a non-finite return is chosen only if every lr has one; exact ties go to the smaller lr"
)
SELECTION_RULE = SELECTION_RULE_TEMPLATE.format(
    measure="final return (mean episode return over the last 10% of training)")


@dataclasses.dataclass(frozen=True)
class LrGrid:
    """A learning-rate grid: absolute values, or (``relative``) multipliers of
    each optimizer's default learning rate."""

    values: Tuple[float, ...]
    relative: bool = False

    def resolve(self, default_lr: float) -> Tuple[float, ...]:
        """The absolute, ascending grid for an optimizer whose default is ``default_lr``
        (values rounded to 6 significant digits so 3e-3 * 0.3 prints as 0.0009)."""
        vals = [v * default_lr if self.relative else v for v in self.values]
        return tuple(sorted(float(f"{v:.6g}") for v in vals))

    def __str__(self) -> str:
        return ",".join(f"x{v:g}" if self.relative else f"{v:g}" for v in self.values)


def parse_lr_grid(text: str) -> LrGrid:
    """``"1e-4,3e-4,1e-3"`` (absolute) or ``"x0.1,x0.3,x1,x3"`` (multipliers of
    each optimizer's default learning rate) -> ``LrGrid``; at least two
    distinct positive finite values, not mixed -> else ``ValueError``."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if len(items) < 2:
        raise ValueError(f"--lr-grid needs at least two values, got {text!r} "
                         "(e.g. 1e-4,3e-4,1e-3 or x0.3,x1,x3)")
    relative = [t.lower().startswith("x") for t in items]
    if any(relative) and not all(relative):
        raise ValueError(f"--lr-grid {text!r} mixes absolute values and x-multipliers; use one kind")
    values = []
    for t in items:
        try:
            v = float(t[1:] if relative[0] else t)
        except ValueError:
            raise ValueError(f"--lr-grid {text!r}: {t!r} is not a number"
                             + (" (multipliers are written x0.3)" if relative[0] else "")) from None
        if not np.isfinite(v) or v <= 0:
            raise ValueError(f"--lr-grid {text!r}: {t!r} must be positive and finite")
        values.append(v)
    if len(set(values)) != len(values):
        raise ValueError(f"--lr-grid {text!r} repeats a value")
    return LrGrid(tuple(values), relative[0])


@dataclasses.dataclass(frozen=True)
class LrGrids:
    """Grids per optimizer: ``by_name`` maps optimizer names (``lion``,
    ``kfac``: the part of a spec before the colon) to their grid, ``default``
    serves every other optimizer."""

    default: LrGrid
    by_name: Tuple[Tuple[str, LrGrid], ...] = ()

    def for_spec(self, spec: str) -> LrGrid:
        return dict(self.by_name).get(split_spec(spec)[0], self.default)

    def __str__(self) -> str:
        return ";".join([str(self.default)] + [f"{n}={g}" for n, g in self.by_name])


def parse_lr_grids(text: str) -> LrGrids:
    """``--lr-grid``: one grid for every optimizer (``parse_lr_grid``), or
    several separated by ``;``, each but one prefixed with the optimizer name
    it is for: ``"3e-4,1e-3,3e-3;lion=3e-5,1e-4,3e-4;kfac=x0.3,x1,x3"``. The
    unnamed grid (default ``DEFAULT_LR_GRID``) serves the other optimizers."""
    default, by_name = None, {}
    for part in filter(None, (p.strip() for p in str(text).split(";"))):
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)", part)
        if m is None:
            if default is not None:
                raise ValueError(f"--lr-grid {text!r} has two grids without an optimizer name; "
                                 "write name=grid for all but one")
            default = parse_lr_grid(part)
            continue
        name, grid = m.group(1).lower(), m.group(2)
        if name not in registry.names():
            raise ValueError(f"--lr-grid {text!r}: unknown optimizer {name!r}; known: {', '.join(registry.names())}")
        if name in by_name:
            raise ValueError(f"--lr-grid {text!r} gives two grids for {name!r}")
        by_name[name] = parse_lr_grid(grid)
    if default is None and not by_name:
        parse_lr_grid(text)  # raises the "at least two values" error
    return LrGrids(default or parse_lr_grid(DEFAULT_LR_GRID), tuple(by_name.items()))


def select_lr(lrs: Sequence[float], returns, diverged=None, measure_words: Optional[str] = None) -> Dict:
    """Picks the learning rate of a sweep by ``SELECTION_RULE`` (the returns
    measured as ``measure_words`` says where given).

    ``lrs [L]``; ``returns [L, S]`` final returns per lr and tuning seed;
    ``diverged [L, S]`` bools (optional). Returns ``index`` and ``lr`` of the
    choice, ``mean_return [L]`` and ``stderr [L]`` over seeds, ``valid [L]``,
    ``at_edge`` (the choice is the smallest or largest lr of the grid, which
    may be too narrow) and ``rule``."""
    lrs = np.asarray(lrs, np.float64)
    returns = np.asarray(returns, np.float64)
    if returns.ndim != 2 or returns.shape[0] != lrs.size or returns.shape[1] < 1:
        raise ValueError(f"returns must be [L={lrs.size}, S>=1], got shape {returns.shape}")
    diverged = np.zeros(returns.shape, bool) if diverged is None else np.asarray(diverged, bool)
    means = returns.mean(axis=1)
    valid = np.isfinite(means) & ~diverged.any(axis=1)
    # candidates in ascending lr so that argmax (first maximum) breaks ties to the smaller lr
    order = np.argsort(lrs, kind="stable")
    pool = valid[order] if valid.any() else np.ones(lrs.size, bool)
    score = np.where(pool, np.where(np.isfinite(means[order]), means[order], -np.inf), -np.inf)
    index = int(order[int(np.argmax(score))])
    return dict(
        index=index, lr=float(lrs[index]), mean_return=means.tolist(),
        stderr=[stats.stderr(r) for r in returns], valid=valid.tolist(),
        at_edge=bool(lrs.size > 1 and lrs[index] in (lrs.min(), lrs.max())),
        rule=SELECTION_RULE if measure_words is None else SELECTION_RULE_TEMPLATE.format(measure=measure_words),
    )
