"""Optimizers x environments benchmark: one vmapped program per (env,
optimizer) cell, cells in turn, each written to disk as soon as it finishes
so an interrupted benchmark resumes from the cells already done.

Used by ``scripts/benchmark.py``; the README's results tables come from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from meta import stats
from meta.report import device_description, fmt_eta, plot_curves, write_json

# Env steps per second of PPO on one CPU core, per env family, for the
# "this will take hours" warning (measured on the project's CI machine).
CPU_STEPS_PER_SECOND = {"brax": 2_000, "minatar": 25_000, "classic": 60_000, "gridworld": 30_000}


@dataclasses.dataclass(frozen=True)
class Cell:
    env: str
    optimizer: str
    seeds: int
    timesteps: int
    lr: Optional[float] = None
    seed: int = 0

    @property
    def name(self) -> str:
        return re.sub(r"[^A-Za-z0-9._=-]+", "_", f"{self.env}__{self.optimizer}")

    def settings(self) -> Dict:
        return dataclasses.asdict(self)


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


def cpu_budget_warning(env_names: Sequence[str], specs: Sequence[str], seeds: int, timesteps: float) -> Optional[str]:
    """A warning (text) when a CPU run will take hours, with a suggested budget."""
    import jax

    from agents.ppo import preset_for

    if jax.devices()[0].platform != "cpu":
        return None
    slow = []
    for e in env_names:
        sps = CPU_STEPS_PER_SECOND.get(preset_for(e), 30_000)
        hours = len(specs) * seeds * timesteps / sps / 3600
        if hours > 1.0:
            suggest = 3600 * sps / max(len(specs) * seeds, 1)
            slow.append(f"{e}: ~{hours:.1f} h on CPU (suggest --timesteps {suggest:.0e} for about an hour)")
    return ("warning: " + "; ".join(slow)) if slow else None


def run_cells(cells: Sequence[Cell], out: str, train: Optional[Callable] = None,
              log: Callable[[str], None] = print) -> List[Dict]:
    """Runs every cell not already finished in ``out/cells/`` and returns all
    records. A finished cell with different settings -> ``ValueError``."""
    from agents.experiment import hparams_for_spec, resolve_config, train_seeds

    train = train or train_seeds
    os.makedirs(os.path.join(out, "cells"), exist_ok=True)
    records, todo = [], []
    for cell in cells:
        path = os.path.join(out, "cells", cell.name + ".json")
        if os.path.exists(path):
            with open(path) as f:
                rec = json.load(f)
            if rec.get("settings") != cell.settings():
                raise ValueError(
                    f"{path} was run with settings {rec.get('settings')}, not {cell.settings()}; "
                    "use another --out or delete that file"
                )
            records.append(rec)
            log(f"[{cell.env} | {cell.optimizer}] done earlier, skipped")
        else:
            todo.append((cell, path))
    t0 = time.perf_counter()
    for i, (cell, path) in enumerate(todo):
        config, hp = resolve_config(cell.env, total_timesteps=int(cell.timesteps))
        hp = hparams_for_spec(hp, cell.optimizer, cell.lr)
        res = train(cell.env, cell.optimizer, config, hp, cell.seeds, seed=cell.seed, log=log)
        res["settings"] = cell.settings()
        res["device"] = device_description()
        write_json(path, res)
        records.append(res)
        done = i + 1
        eta = (time.perf_counter() - t0) / done * (len(todo) - done)
        log(f"cell {done}/{len(todo)} done: {cell.env} | {cell.optimizer}: final return "
            f"{res['final_return_mean']:.2f}; benchmark ETA {fmt_eta(eta)}")
    order = {c.name: i for i, c in enumerate(cells)}
    return sorted(records, key=lambda r: order[Cell(**r["settings"]).name])


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
            ))
        table[env] = rows
    return table


def write_outputs(records: Sequence[Dict], out: str, reference: str) -> Dict[str, List[Dict]]:
    """``results.json``, ``results.md``, one learning-curve PNG per env and
    ``aggregate.png`` (normalised returns with bootstrap 95% intervals)."""
    table = summarise(records, reference)
    write_json(os.path.join(out, "results.json"), dict(reference=reference, cells=list(records), table=table))
    lines = ["# Benchmark results", "",
             f"Final return = mean episode return over the last 10% of training; normalised = mean / "
             f"|mean of `{reference}`| on the same env; speed ratio against `{reference}`.", ""]
    for env, rows in table.items():
        lines += [f"## {env}", "",
                  "| optimizer | seeds | mean ± s.e. | IQM | normalised | env steps/s | speed ratio |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            norm = f"{r['normalised']:.2f}" if r["normalised"] is not None else "n/a"
            ratio = f"{r['speed_ratio']:.2f}x" if r["speed_ratio"] is not None else "n/a"
            lines.append(f"| {r['optimizer']} | {r['seeds']} | {r['mean']:.2f} ± {r['stderr']:.2f} | "
                         f"{r['iqm']:.2f} | {norm} | {r['steps_per_second']:,.0f} | {ratio} |")
        lines.append("")
        curves = {rec["optimizer"]: (np.asarray(rec["steps"]), np.asarray(rec["curves"]))
                  for rec in records if rec["env"] == env}
        plot_curves(os.path.join(out, f"curves_{re.sub(r'[^A-Za-z0-9._-]+', '_', env)}.png"), curves, title=env)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))
    _aggregate_plot(records, table, reference, os.path.join(out, "aggregate.png"))
    return table


def short_label(spec: str) -> str:
    """``open:../x/breakout_OPEN.npy`` -> ``open:breakout_OPEN.npy`` (file paths shortened)."""
    name, sep, arg = spec.partition(":")
    return f"{name}{sep}{os.path.basename(arg)}" if "/" in arg else spec


def _aggregate_plot(records, table, reference, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optimizers = list(dict.fromkeys(r["optimizer"] for r in records))
    means, errs = [], []
    for opt in optimizers:
        vals = []
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
    ax.set_yticks(y, [short_label(o) for o in optimizers])
    ax.set_xlabel(f"return / |{short_label(reference)} mean| per env\n(mean over envs and seeds, bootstrap 95% CI)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
