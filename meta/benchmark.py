"""Optimizers x environments benchmark: one vmapped program per (env,
optimizer) cell, cells in turn, each written to disk as soon as it finishes
so an interrupted benchmark resumes from the cells already done.

With a learning-rate grid (``--tune-lr``) a cell first runs a sweep, the
whole grid x tuning seeds as ONE vmapped program (the learning rate is an
injected hyperparameter, so no recompilation), picks the learning rate by
``select_lr`` and then trains its evaluation seeds, drawn from a key stream
disjoint from the tuning seeds, at that learning rate. Nothing from the sweep
enters the reported returns: reusing the winning sweep runs would bias them
upwards (the best of several noisy estimates).

Used by ``scripts/benchmark.py``; the README's results tables come from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from meta import stats
from meta.report import device_description, fmt_eta, plot_curves, write_json

# Env steps per second of PPO on one CPU core, per env family, for the
# "this will take hours" warning (measured on the project's CI machine).
CPU_STEPS_PER_SECOND = {"brax": 2_000, "minatar": 25_000, "classic": 60_000, "gridworld": 30_000}
# Speed of an optimizer relative to Adam on CPU, for the same estimate (README
# MinAtar table, 3e5 steps, 2 seeds: kfac period 20 0.39x, diag_ggn 0.71x, OPEN 0.23x).
# K-FAC with 3-10 vmapped members measured 0.1-0.25x of Adam (period 20, shared 2-core machine).
CPU_SPEED_FACTOR = {"kfac": 0.15, "diag_ggn": 0.7, "open": 0.25, "open_large": 0.2}

# Learning-rate grid used by --tune-lr when --lr-grid is not given: half-decade
# steps around each optimizer's own default, two on either side.
DEFAULT_LR_GRID = "x0.1,x0.3,x1,x3,x10"
SELECTION_RULE = (
    "highest mean over tuning seeds of the final return (mean episode return over the last 10% of "
    "training); an lr with a diverged seed (non-finite parameters) or a non-finite return is chosen only "
    "if every lr has one; exact ties go to the smaller lr"
)


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
        from learned_optim.spec import split_spec

        return dict(self.by_name).get(split_spec(spec)[0], self.default)

    def __str__(self) -> str:
        return ";".join([str(self.default)] + [f"{n}={g}" for n, g in self.by_name])


def parse_lr_grids(text: str) -> LrGrids:
    """``--lr-grid``: one grid for every optimizer (``parse_lr_grid``), or
    several separated by ``;``, each but one prefixed with the optimizer name
    it is for: ``"3e-4,1e-3,3e-3;lion=3e-5,1e-4,3e-4;kfac=x0.3,x1,x3"``. The
    unnamed grid (default ``DEFAULT_LR_GRID``) serves the other optimizers."""
    from learned_optim.spec import known_optimizers

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
        if name not in known_optimizers():
            raise ValueError(f"--lr-grid {text!r}: unknown optimizer {name!r}; known: {', '.join(known_optimizers())}")
        if name in by_name:
            raise ValueError(f"--lr-grid {text!r} gives two grids for {name!r}")
        by_name[name] = parse_lr_grid(grid)
    if default is None and not by_name:
        parse_lr_grid(text)  # raises the "at least two values" error
    return LrGrids(default or parse_lr_grid(DEFAULT_LR_GRID), tuple(by_name.items()))


def select_lr(lrs: Sequence[float], returns, diverged=None) -> Dict:
    """Picks the learning rate of a sweep by ``SELECTION_RULE``.

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
        at_edge=bool(lrs.size > 1 and lrs[index] in (lrs.min(), lrs.max())), rule=SELECTION_RULE,
    )


@dataclasses.dataclass(frozen=True)
class Cell:
    env: str
    optimizer: str
    seeds: int
    timesteps: int
    lr: Optional[float] = None
    seed: int = 0
    # Learning-rate tuning (absolute, ascending grid; None: no tuning).
    lr_grid: Optional[Tuple[float, ...]] = None
    tune_seeds: int = 0
    tune_timesteps: int = 0

    def __post_init__(self):
        if self.lr_grid is not None:
            object.__setattr__(self, "lr_grid", tuple(float(x) for x in self.lr_grid))
            if self.lr is not None:
                raise ValueError("Cell: lr and lr_grid exclude each other (a tuned cell picks its own lr)")
            if self.tune_seeds < 1 or self.tune_timesteps <= 0:
                raise ValueError(f"Cell: a tuned cell needs tune_seeds >= 1 and tune_timesteps > 0, "
                                 f"got {self.tune_seeds}, {self.tune_timesteps}")

    @property
    def name(self) -> str:
        return re.sub(r"[^A-Za-z0-9._=-]+", "_", f"{self.env}__{self.optimizer}")

    @property
    def tuned(self) -> bool:
        return self.lr_grid is not None

    def settings(self) -> Dict:
        """JSON-comparable settings; an untuned cell's are those of benchmarks
        written before tuning existed (so their cells still resume)."""
        d = dataclasses.asdict(self)
        if self.lr_grid is None:
            for k in ("lr_grid", "tune_seeds", "tune_timesteps"):
                d.pop(k)
        else:
            d["lr_grid"] = list(self.lr_grid)
        return d

    def cost(self) -> float:
        """Env steps this cell trains (evaluation seeds plus the sweep)."""
        sweep = len(self.lr_grid) * self.tune_seeds * self.tune_timesteps if self.tuned else 0
        return self.seeds * self.timesteps + sweep


def make_cells(env_names: Sequence[str], specs: Sequence[str], seeds: int, timesteps: float,
               lr: Optional[float] = None, seed: int = 0, lr_grid=None,
               tune_seeds: int = 2, tune_timesteps: Optional[float] = None) -> List[Cell]:
    """One cell per (env, optimizer). With ``lr_grid`` (an ``LrGrid`` for
    every optimizer, or ``LrGrids``) every optimizer with an injected
    learning rate gets its own resolved grid (a relative grid is
    centred on the lr it would train with untuned: a spec's ``lr=``, the env
    preset's lr for Adam-family specs, else the optimizer's default); the
    others (OPEN with weights, ``lopt:``) stay untuned."""
    from meta.experiment import hparams_for_spec, resolve_config
    from learned_optim.spec import default_learning_rate

    if lr_grid is not None and lr is not None:
        raise ValueError("--lr and --tune-lr exclude each other (tuning picks the lr)")
    if isinstance(lr_grid, LrGrid):
        lr_grid = LrGrids(lr_grid)
    injectable = {s: default_learning_rate(s) is not None for s in specs} if lr_grid is not None else {}
    cells = []
    for e in env_names:
        for s in specs:
            if lr_grid is None or not injectable[s]:
                cells.append(Cell(e, s, seeds, int(timesteps), lr, seed))
                continue
            centre = hparams_for_spec(resolve_config(e)[1], s)["lr"]
            grid = lr_grid.for_spec(s).resolve(centre)
            if len(set(grid)) != len(grid):
                raise ValueError(f"--lr-grid {lr_grid} gives repeated learning rates {grid} for {s!r} on {e}")
            cells.append(Cell(e, s, seeds, int(timesteps), None, seed, grid, int(tune_seeds),
                              int(tune_timesteps if tune_timesteps is not None else timesteps)))
    return cells


def check_inputs(env_names: Sequence[str], specs: Sequence[str], seeds: int, timesteps: float) -> None:
    """All validation before anything compiles (``ValueError`` naming the problem)."""
    import envs
    import learned_optim

    if not env_names:
        raise ValueError("--envs names no env")
    if not specs:
        raise ValueError("--optimizers names no optimizer")
    known = envs.known_envs()
    for e in env_names:
        if e not in known:
            raise ValueError(f"unknown env {e!r}; known: {', '.join(known)} (suites: {', '.join(envs.SUITES)})")
    for s in specs:
        learned_optim.from_spec(s)
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if timesteps <= 0:
        raise ValueError(f"--timesteps must be positive, got {timesteps:g}")


def estimate_cpu_seconds(cells: Sequence[Cell]) -> Dict[str, float]:
    """Rough single-core CPU seconds per env for ``cells`` (evaluation plus
    sweeps), from ``CPU_STEPS_PER_SECOND`` and ``CPU_SPEED_FACTOR``."""
    from agents.ppo import preset_for
    from learned_optim.spec import split_spec

    out: Dict[str, float] = {}
    for c in cells:
        sps = CPU_STEPS_PER_SECOND.get(preset_for(c.env), 30_000)
        sps *= CPU_SPEED_FACTOR.get(split_spec(c.optimizer)[0], 1.0)
        out[c.env] = out.get(c.env, 0.0) + c.cost() / sps
    return out


def cpu_budget_warning(cells: Sequence[Cell]) -> Optional[str]:
    """A warning (text) when a CPU run will take hours, with a suggested budget."""
    import jax

    if jax.devices()[0].platform != "cpu":
        return None
    slow = []
    for e, seconds in estimate_cpu_seconds(cells).items():
        hours = seconds / 3600
        if hours > 1.0:
            steps = max(c.timesteps for c in cells if c.env == e)
            slow.append(f"{e}: ~{hours:.1f} h on CPU (suggest --timesteps {steps / hours:.0e} for about an hour)")
    return ("warning: " + "; ".join(slow)) if slow else None


def _load_checked(path: str, settings: Dict) -> Optional[Dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rec = json.load(f)
    if rec.get("settings") != settings:
        raise ValueError(
            f"{path} was run with settings {rec.get('settings')}, not {settings}; "
            "use another --out or delete that file"
        )
    return rec


def run_cells(cells: Sequence[Cell], out: str, train: Optional[Callable] = None,
              sweep: Optional[Callable] = None, log: Callable[[str], None] = print) -> List[Dict]:
    """Runs every cell not already finished in ``out/cells/`` and returns all
    records. A finished cell with different settings -> ``ValueError``.

    A tuned cell writes its sweep to ``cells/NAME.tune.json`` as soon as it
    is done (an interrupted benchmark reuses it) and its record carries
    ``lr_tuning``: the grid, final returns ``[L, S]``, mean return per lr, the
    chosen lr and the rule. ``train``/``sweep`` default to
    ``meta.experiment.train_seeds``/``train_lr_sweep`` (tests pass fakes)."""
    from meta.experiment import hparams_for_spec, resolve_config, train_lr_sweep, train_seeds

    train = train or train_seeds
    sweep = sweep or train_lr_sweep
    os.makedirs(os.path.join(out, "cells"), exist_ok=True)
    records, todo = [], []
    for cell in cells:
        path = os.path.join(out, "cells", cell.name + ".json")
        rec = _load_checked(path, cell.settings())
        if rec is not None:
            records.append(rec)
            log(f"[{cell.env} | {cell.optimizer}] done earlier, skipped")
        else:
            todo.append((cell, path))
    t0, done_cost = time.perf_counter(), 0.0
    total_cost = sum(c.cost() for c, _ in todo)
    for i, (cell, path) in enumerate(todo):
        config, hp = resolve_config(cell.env, total_timesteps=int(cell.timesteps))
        tuning = None
        if cell.tuned:
            tune_path = os.path.join(out, "cells", cell.name + ".tune.json")
            tune = _load_checked(tune_path, cell.settings())
            if tune is None:
                tune_config, tune_hp = resolve_config(cell.env, total_timesteps=int(cell.tune_timesteps))
                tune = sweep(cell.env, cell.optimizer, tune_config, hparams_for_spec(tune_hp, cell.optimizer),
                             cell.lr_grid, cell.tune_seeds, seed=cell.seed, log=log)
                tune["settings"] = cell.settings()
                write_json(tune_path, tune)
            else:
                log(f"[{cell.env} | {cell.optimizer}] lr sweep done earlier, reused")
            choice = select_lr(tune["lrs"], tune["final_return"], tune.get("diverged"))
            tuning = {k: v for k, v in tune.items() if k != "settings"}
            tuning.update(chosen_lr=choice["lr"], chosen_index=choice["index"], mean_return=choice["mean_return"],
                          stderr=choice["stderr"], valid=choice["valid"], at_edge=choice["at_edge"],
                          rule=choice["rule"])
            log(f"[{cell.env} | {cell.optimizer}] lr sweep: "
                + ", ".join(f"{lr:.3g}: {m:.2f}" for lr, m in zip(tune["lrs"], choice["mean_return"]))
                + f" -> lr {choice['lr']:.3g}" + (" (edge of the grid)" if choice["at_edge"] else ""))
            hp = hparams_for_spec(hp, cell.optimizer, choice["lr"])
        else:
            hp = hparams_for_spec(hp, cell.optimizer, cell.lr)
        res = train(cell.env, cell.optimizer, config, hp, cell.seeds, seed=cell.seed, log=log)
        if tuning is not None:
            res["lr_tuning"] = tuning
        res["settings"] = cell.settings()
        res["device"] = device_description()
        write_json(path, res)
        records.append(res)
        done_cost += cell.cost()
        eta = (time.perf_counter() - t0) / done_cost * (total_cost - done_cost)
        log(f"cell {i + 1}/{len(todo)} done: {cell.env} | {cell.optimizer}: final return "
            f"{res['final_return_mean']:.2f}; benchmark ETA {fmt_eta(eta)}")
    order = {c.name: i for i, c in enumerate(cells)}
    return sorted(records, key=lambda r: order[Cell(**r["settings"]).name])


def _uses_lr(rec: Dict) -> bool:
    if "uses_lr" in rec:
        return bool(rec["uses_lr"])
    from learned_optim.spec import default_learning_rate  # records written before uses_lr existed

    return default_learning_rate(rec["optimizer"]) is not None


def summarise(records: Sequence[Dict], reference: str) -> Dict[str, List[Dict]]:
    """Per env, one row per optimizer: mean, s.e., IQM of the final return,
    return normalised by the ``reference`` optimizer's mean, speed and its
    ratio to the reference."""
    by_env: Dict[str, List[Dict]] = {}
    for r in records:
        by_env.setdefault(r["env"], []).append(r)
    table = {}
    for env, recs in by_env.items():
        ref = next((r for r in recs if r["optimizer"] == reference), None)
        ref_mean = None if ref is None else float(np.mean(ref["final_return"]))
        ref_sps = None if ref is None else ref["env_steps_per_second"]
        rows = []
        for r in recs:
            x = np.asarray(r["final_return"], np.float64)
            rows.append(dict(
                optimizer=r["optimizer"], seeds=len(x), mean=float(np.mean(x)), stderr=stats.stderr(x),
                iqm=stats.iqm(x),
                normalised=(float(np.mean(x)) / abs(ref_mean)) if ref_mean not in (None, 0.0) else None,
                steps_per_second=r["env_steps_per_second"],
                speed_ratio=(r["env_steps_per_second"] / ref_sps) if ref_sps else None,
                compile_seconds=r["compile_seconds"], timesteps=r["timesteps_per_seed"],
                **_lr_fields(r),
            ))
        table[env] = rows
    return table


def _lr_fields(rec: Dict) -> Dict:
    """The learning rate a record's evaluation trained with and how it was chosen."""
    uses_lr = _uses_lr(rec)
    tuning = rec.get("lr_tuning")
    lr = rec.get("hparams", {}).get("lr") if uses_lr else None
    return dict(lr=lr, uses_lr=uses_lr, lr_tuned=tuning is not None,
                lr_grid=tuning["lrs"] if tuning else None,
                lr_at_edge=bool(tuning["at_edge"]) if tuning else None)


def _optimizer_order(table: Dict[str, List[Dict]]) -> List[str]:
    """Optimizers in table order: each at its earliest row position in any env
    (an env may lack some optimizers), ties in order of first appearance."""
    optimizers = list(dict.fromkeys(r["optimizer"] for rows in table.values() for r in rows))
    position = {o: min(i for rows in table.values() for i, r in enumerate(rows) if r["optimizer"] == o)
                for o in optimizers}
    return sorted(optimizers, key=lambda o: position[o])


def summary_markdown(table: Dict[str, List[Dict]], reference: str) -> List[str]:
    """Two wide tables, optimizers x envs: final return mean ± s.e. with the
    mean speed ratio to ``reference``, and the learning rate per cell."""
    envs_ = list(table)
    optimizers = _optimizer_order(table)
    cell = {(env, r["optimizer"]): r for env, rows in table.items() for r in rows}
    short = [e.replace("-MinAtar", "") for e in envs_]
    lines = ["## Summary", "", "| optimizer | " + " | ".join(short) + f" | speed vs {short_label(reference)} (mean) |",
             "|---|" + "---:|" * (len(envs_) + 1)]
    for opt in optimizers:
        vals = [cell.get((e, opt)) for e in envs_]
        ratios = [v["speed_ratio"] for v in vals if v is not None and v["speed_ratio"] is not None]
        speed = f"{np.mean(ratios):.2f}x" if ratios else "n/a"
        lines.append(f"| {short_label(opt)} | " + " | ".join(
            f"{v['mean']:.2f} ± {v['stderr']:.2f}" if v else "–" for v in vals) + f" | {speed} |")
    lines += ["", "| lr | " + " | ".join(short) + " |", "|---|" + "---:|" * len(envs_)]
    for opt in optimizers:
        lines.append(f"| {short_label(opt)} | "
                     + " | ".join(_fmt_lr(cell[(e, opt)]) if (e, opt) in cell else "–" for e in envs_) + " |")
    return lines + [""]


def fmt_lr(lr: float) -> str:
    """``0.00075`` -> ``7.5e-4``, ``0.05`` -> ``5e-2`` (two significant digits)."""
    mantissa, exponent = f"{lr:.1e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def _fmt_lr(row: Dict) -> str:
    if not row["uses_lr"]:
        return "n/a (no injected lr)"
    if row["lr"] is None:
        return "?"
    if not row["lr_tuned"]:
        return fmt_lr(row["lr"])
    return f"{fmt_lr(row['lr'])} (tuned{', grid edge' if row['lr_at_edge'] else ''})"


def _env_file(prefix: str, env: str) -> str:
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9._-]+', '_', env)}.png"


def write_outputs(records: Sequence[Dict], out: str, reference: str) -> Dict[str, List[Dict]]:
    """``results.json``, ``results.md``, one learning-curve PNG per env and
    ``aggregate.png`` (normalised returns with bootstrap 95% intervals);
    with tuned cells also ``lr_tuning`` in ``results.json`` (per env and
    optimizer: grid, mean return per lr, chosen lr), a sweep table per env in
    ``results.md`` and ``lr_sweep_ENV.png`` (lr -> mean return)."""
    table = summarise(records, reference)
    lr_tuning: Dict[str, Dict[str, Dict]] = {}
    for rec in records:
        t = rec.get("lr_tuning")
        if t:
            lr_tuning.setdefault(rec["env"], {})[rec["optimizer"]] = dict(
                lrs=t["lrs"], mean_return=t["mean_return"], stderr=t["stderr"], chosen_lr=t["chosen_lr"],
                at_edge=t["at_edge"], tune_seeds=t["seeds"], tune_timesteps=t["timesteps_per_seed"])
    write_json(os.path.join(out, "results.json"),
               dict(reference=reference, cells=list(records), table=table, lr_tuning=lr_tuning,
                    lr_selection_rule=SELECTION_RULE if lr_tuning else None))
    lines = ["# Benchmark results", "",
             f"Final return = mean episode return over the last 10% of training; normalised = mean / "
             f"|mean of `{reference}`| on the same env; speed ratio against `{reference}`. lr: the learning "
             "rate the evaluation seeds trained with (initial value where the preset anneals it).", ""]
    if lr_tuning:
        lines += [f"Tuned learning rates: chosen on tuning seeds disjoint from the evaluation seeds by the "
                  f"{SELECTION_RULE}; the evaluation seeds then train at that lr. \"grid edge\": the choice "
                  "is the smallest or largest lr of its grid (the grid may be too narrow).", ""]
    if len(table) > 1:
        lines += summary_markdown(table, reference)
    for env, rows in table.items():
        lines += [f"## {env}", "",
                  "| optimizer | seeds | mean ± s.e. | IQM | normalised | lr | env steps/s | speed ratio |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            norm = f"{r['normalised']:.2f}" if r["normalised"] is not None else "n/a"
            ratio = f"{r['speed_ratio']:.2f}x" if r["speed_ratio"] is not None else "n/a"
            lines.append(f"| {r['optimizer']} | {r['seeds']} | {r['mean']:.2f} ± {r['stderr']:.2f} | "
                         f"{r['iqm']:.2f} | {norm} | {_fmt_lr(r)} | {r['steps_per_second']:,.0f} | {ratio} |")
        lines.append("")
        if env in lr_tuning:
            any_t = next(iter(lr_tuning[env].values()))
            lines += [f"lr sweeps on {env}: mean final return over {any_t['tune_seeds']} tuning seeds x "
                      f"{any_t['tune_timesteps']:,} steps per lr (chosen in bold)", "",
                      "| optimizer | lr: mean return |", "|---|---|"]
            for opt, t in lr_tuning[env].items():
                cells_txt = " · ".join(
                    (f"**{fmt_lr(lr)}: {m:.2f}**" if lr == t["chosen_lr"] else f"{fmt_lr(lr)}: {m:.2f}")
                    for lr, m in zip(t["lrs"], t["mean_return"]))
                lines.append(f"| {opt} | {cells_txt} |")
            lines.append("")
            _sweep_plot(lr_tuning[env], env, os.path.join(out, _env_file("lr_sweep", env)))
        curves = {rec["optimizer"]: (np.asarray(rec["steps"]), np.asarray(rec["curves"]))
                  for rec in records if rec["env"] == env}
        plot_curves(os.path.join(out, _env_file("curves", env)), curves, title=env)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))
    _aggregate_plot(records, table, reference, os.path.join(out, "aggregate.png"))
    return table


def short_label(spec: str) -> str:
    """``open:../x/breakout_OPEN.npy`` -> ``open:breakout_OPEN.npy`` (file paths shortened)."""
    name, sep, arg = spec.partition(":")
    return f"{name}{sep}{os.path.basename(arg)}" if "/" in arg else spec


def _sweep_plot(sweeps: Dict[str, Dict], env: str, path: str) -> None:
    """lr (log axis) -> mean final return ± s.e. over tuning seeds, one line
    per optimizer, the chosen lr ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for opt, t in sweeps.items():
        line = ax.errorbar(t["lrs"], t["mean_return"], yerr=t["stderr"], marker="o", capsize=3,
                           label=short_label(opt))
        i = t["lrs"].index(t["chosen_lr"])
        ax.plot([t["chosen_lr"]], [t["mean_return"][i]], "o", ms=12, mfc="none",
                color=line.lines[0].get_color())
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (initial)")
    ax.set_ylabel("final return, mean ± s.e. over tuning seeds")
    ax.set_title(f"{env}: lr sweeps (chosen lr ringed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_records(out: str) -> List[Dict]:
    """Every finished cell in ``out/cells/`` (e.g. halves of a benchmark run
    apart and copied together), in env then file order."""
    folder = os.path.join(out, "cells")
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} does not exist; nothing to report")
    recs = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json") and not name.endswith(".tune.json"):
            with open(os.path.join(folder, name)) as f:
                recs.append(json.load(f))
    if not recs:
        raise ValueError(f"{folder} holds no finished cell")
    return recs


def _aggregate_plot(records, table, reference, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optimizers = _optimizer_order(table)
    means, errs, labels = [], [], []
    for opt in optimizers:
        vals = []
        covered = sum(any(r["env"] == env and r["optimizer"] == opt for r in records) for env in table)
        # an optimizer run on fewer envs than the others is averaged over those only: say so
        labels.append(short_label(opt) + (f"\n({covered} of {len(table)} envs)" if covered < len(table) else ""))
        for env in table:
            ref = next((r for r in records if r["env"] == env and r["optimizer"] == reference), None)
            rec = next((r for r in records if r["env"] == env and r["optimizer"] == opt), None)
            if ref is None or rec is None or np.mean(ref["final_return"]) == 0:
                continue
            vals += list(np.asarray(rec["final_return"]) / abs(np.mean(ref["final_return"])))
        if not vals:
            means.append(np.nan)
            errs.append((0.0, 0.0))
            continue
        m = float(np.mean(vals))
        lo, hi = stats.bootstrap_ci(vals)
        means.append(m)
        errs.append((m - lo, hi - m))
    fig, ax = plt.subplots(figsize=(7.0, 0.5 * len(optimizers) + 1.8))
    y = np.arange(len(optimizers))
    ax.errorbar(means, y, xerr=np.array(errs).T, fmt="o", capsize=4)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()  # first optimizer on top, as in the tables
    ax.set_xlabel(f"return / |{short_label(reference)} mean| per env\n(mean over envs and seeds, bootstrap 95% CI)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
