"""Optimizers x environments benchmark: one vmapped program per (env,
optimizer) cell, cells in turn, each written to disk as soon as it finishes
so an interrupted benchmark resumes from the cells already done.

With a learning-rate grid (``--tune-lr``) a cell first runs a sweep, the
whole grid x tuning seeds as ONE vmapped program (the learning rate is an
injected hyperparameter, so no recompilation), picks the learning rate by
``meta.lr_tuning.select_lr`` and then trains its evaluation seeds, drawn
from a key stream disjoint from the tuning seeds, at that learning rate.
Nothing from the sweep enters the reported returns: reusing the winning
sweep runs would bias them upwards (the best of several noisy estimates).

Used by ``meta.cli.benchmark``; the README's results tables come from it
(rendered by ``meta.report``).

Over several processes (``jax.distributed``, ``meta.distributed.start_cli``)
every process trains every cell on its own first device, the same program
from the same keys, so the records equal one process's; only process 0
writes ``cells/`` and the outputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

import envs
import learned_optim
from agents.presets import preset_for, resolve_config
from learned_optim import registry
from meta import distributed, report, stats
from meta.experiment import learning_rate_for, train_lr_sweep, train_seeds
from meta.host import device_description, fmt_eta
from meta.lr_tuning import SELECTION_RULE, LrGrid, LrGrids, select_lr
from meta.report import write_json

# Env steps per second of PPO on one CPU core, per env family, for the
# "this will take hours" warning (measured on the project's CI machine);
# each optimizer's speed relative to Adam is ``registry.info(spec).cpu_speed``.
CPU_STEPS_PER_SECOND = {"brax": 2_000, "brax_small": 30_000, "minatar": 25_000, "classic": 60_000, "gridworld": 30_000}


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
    if lr_grid is not None and lr is not None:
        raise ValueError("--lr and --tune-lr exclude each other (tuning picks the lr)")
    if isinstance(lr_grid, LrGrid):
        lr_grid = LrGrids(lr_grid)
    injectable = {s: registry.info(s).default_lr is not None for s in specs} if lr_grid is not None else {}
    cells = []
    for e in env_names:
        for s in specs:
            if lr_grid is None or not injectable[s]:
                cells.append(Cell(e, s, seeds, int(timesteps), lr, seed))
                continue
            centre = learning_rate_for(s, resolve_config(e).lr)
            grid = lr_grid.for_spec(s).resolve(centre)
            if len(set(grid)) != len(grid):
                raise ValueError(f"--lr-grid {lr_grid} gives repeated learning rates {grid} for {s!r} on {e}")
            cells.append(Cell(e, s, seeds, int(timesteps), None, seed, grid, int(tune_seeds),
                              int(tune_timesteps if tune_timesteps is not None else timesteps)))
    return cells


def check_inputs(env_names: Sequence[str], specs: Sequence[str], seeds: int, timesteps: float) -> None:
    """All validation before anything compiles (``ValueError`` naming the problem)."""
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
    sweeps), from ``CPU_STEPS_PER_SECOND`` and each optimizer's ``cpu_speed``
    in the registry."""
    out: Dict[str, float] = {}
    for c in cells:
        sps = CPU_STEPS_PER_SECOND.get(preset_for(c.env), 30_000)
        sps *= registry.info(c.optimizer).cpu_speed
        out[c.env] = out.get(c.env, 0.0) + c.cost() / sps
    return out


def cpu_budget_warning(cells: Sequence[Cell]) -> Optional[str]:
    """A warning (text) when a CPU run will take hours, with a suggested budget."""
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
        config, hp, preset_lr = resolve_config(cell.env, total_timesteps=int(cell.timesteps))
        tuning = None
        if cell.tuned:
            tune_path = os.path.join(out, "cells", cell.name + ".tune.json")
            tune = _load_checked(tune_path, cell.settings())
            if tune is None:
                tune_config, tune_hp, _ = resolve_config(cell.env, total_timesteps=int(cell.tune_timesteps))
                tune = sweep(cell.env, cell.optimizer, tune_config, tune_hp, cell.lr_grid, cell.tune_seeds,
                             seed=cell.seed, log=log)
                tune["settings"] = cell.settings()
                if distributed.is_main():
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
            lr = choice["lr"]
        else:
            lr = learning_rate_for(cell.optimizer, preset_lr, cell.lr)
        res = train(cell.env, cell.optimizer, config, hp, cell.seeds, seed=cell.seed, log=log, learning_rate=lr)
        if tuning is not None:
            res["lr_tuning"] = tuning
        res["settings"] = cell.settings()
        res["device"] = device_description()
        if distributed.is_main():
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
    return registry.info(rec["optimizer"]).default_lr is not None  # records written before uses_lr existed


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


def _lr_tuning_summary(records: Sequence[Dict]) -> Dict[str, Dict[str, Dict]]:
    """Per env and optimizer of the tuned records: grid, mean return per lr, chosen lr."""
    lr_tuning: Dict[str, Dict[str, Dict]] = {}
    for rec in records:
        t = rec.get("lr_tuning")
        if t:
            lr_tuning.setdefault(rec["env"], {})[rec["optimizer"]] = dict(
                lrs=t["lrs"], mean_return=t["mean_return"], stderr=t["stderr"], chosen_lr=t["chosen_lr"],
                at_edge=t["at_edge"], tune_seeds=t["seeds"], tune_timesteps=t["timesteps_per_seed"])
    return lr_tuning


def _env_file(prefix: str, env: str) -> str:
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9._-]+', '_', env)}.png"


def write_outputs(records: Sequence[Dict], out: str, reference: str) -> Dict[str, List[Dict]]:
    """``results.json``, ``results.md``, one learning-curve PNG per env and
    ``aggregate.png`` (normalised returns with bootstrap 95% intervals);
    with tuned cells also ``lr_tuning`` in ``results.json`` (per env and
    optimizer: grid, mean return per lr, chosen lr), a sweep table per env in
    ``results.md`` and ``lr_sweep_ENV.png`` (lr -> mean return)."""
    table = summarise(records, reference)
    if not distributed.is_main():  # process 0 writes
        return table
    lr_tuning = _lr_tuning_summary(records)
    write_json(os.path.join(out, "results.json"),
               dict(reference=reference, cells=list(records), table=table, lr_tuning=lr_tuning,
                    lr_selection_rule=SELECTION_RULE if lr_tuning else None))
    for env in table:
        if env in lr_tuning:
            report.plot_lr_sweeps(lr_tuning[env], env, os.path.join(out, _env_file("lr_sweep", env)))
        curves = {rec["optimizer"]: (np.asarray(rec["steps"]), np.asarray(rec["curves"]))
                  for rec in records if rec["env"] == env}
        report.plot_curves(os.path.join(out, _env_file("curves", env)), curves, title=env)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(report.benchmark_markdown(table, lr_tuning, reference, SELECTION_RULE)))
    report.plot_aggregate(records, table, reference, os.path.join(out, "aggregate.png"))
    return table


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
