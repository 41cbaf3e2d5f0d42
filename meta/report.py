"""Every plot and table of the project, with the JSON/CSV writers of run
outputs (host-side progress helpers live in ``meta.host``).

Plots draw with matplotlib's Agg backend (``pyplot()``) and are written by
``save_figure``; nothing here runs inside ``jit``."""

from __future__ import annotations

import csv
import json
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

from meta import stats


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_jsonable)
    os.replace(tmp, path)


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def write_curve_csv(path: str, steps: Sequence[int], curves: np.ndarray, prefix: str = "seed") -> None:
    """``curves [S, T]`` -> CSV with columns step, seed0..seedS-1, mean, std."""
    curves = np.asarray(curves, np.float64)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["env_steps"] + [f"{prefix}{i}" for i in range(curves.shape[0])] + ["mean", "std"])
        for t, step in enumerate(steps):
            col = curves[:, t]
            w.writerow([int(step)] + [f"{v:.6g}" for v in col] + [f"{np.nanmean(col):.6g}", f"{np.nanstd(col):.6g}"])


def read_curve_csv(path: str) -> Tuple[List[float], List[List[float]]]:
    """``(x [T], curves [S][T])`` from a CSV that ``write_curve_csv`` wrote."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    seeds = [k for k in rows[0] if k.startswith("seed")] if rows else []
    if not seeds:
        raise ValueError(f"{path}: no seed columns (is it a train.py curve.csv?)")
    x = [float(r["env_steps"]) for r in rows]
    return x, [[float(r[s]) for r in rows] for s in seeds]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, dpi: int = 120) -> None:
    """Lays out ``fig``, writes it to ``path`` and closes it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def plot_curves(
    path: str,
    lines: Dict[str, tuple],
    title: str = "",
    xlabel: str = "env steps",
    ylabel: str = "episode return",
) -> None:
    """``lines[label] = (x [T], curves [S, T])``: mean with a shaded min-max
    band over seeds (interquartile band when there are 5 or more)."""
    fig, ax = pyplot().subplots(figsize=(6.4, 4.0))
    for label, (x, curves) in lines.items():
        curves = np.atleast_2d(np.asarray(curves, np.float64))
        mean = np.nanmean(curves, axis=0)
        if curves.shape[0] >= 5:
            lo, hi = np.nanpercentile(curves, 25, axis=0), np.nanpercentile(curves, 75, axis=0)
        else:
            lo, hi = np.nanmin(curves, axis=0), np.nanmax(curves, axis=0)
        (line,) = ax.plot(x, mean, label=f"{label} (n={curves.shape[0]})")
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


# Benchmark tables and plots (``meta.benchmark.write_outputs``) ----------------------------------


def short_label(spec: str) -> str:
    """``open:../x/breakout_OPEN.npy`` -> ``open:breakout_OPEN.npy`` (file paths shortened)."""
    name, sep, arg = spec.partition(":")
    return f"{name}{sep}{os.path.basename(arg)}" if "/" in arg else spec


def fmt_lr(lr: float) -> str:
    """``0.00075`` -> ``7.5e-4``, ``0.05`` -> ``5e-2`` (two significant digits)."""
    mantissa, exponent = f"{lr:.1e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def _lr_cell(row: Dict) -> str:
    if not row["uses_lr"]:
        return "n/a (no injected lr)"
    if row["lr"] is None:
        return "?"
    if not row["lr_tuned"]:
        return fmt_lr(row["lr"])
    return f"{fmt_lr(row['lr'])} (tuned{', grid edge' if row['lr_at_edge'] else ''})"


def optimizer_order(table: Dict[str, List[Dict]]) -> List[str]:
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
    optimizers = optimizer_order(table)
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
                     + " | ".join(_lr_cell(cell[(e, opt)]) if (e, opt) in cell else "–" for e in envs_) + " |")
    return lines + [""]


def benchmark_markdown(table: Dict[str, List[Dict]], lr_tuning: Dict[str, Dict[str, Dict]], reference: str,
                       selection_rule: str) -> List[str]:
    """The lines of a benchmark's ``results.md``: the wide summary (several
    envs), then per env its rows (``meta.benchmark.summarise``) and, for tuned
    cells, the lr sweeps (``lr_tuning[env][optimizer]``, chosen lr in bold)."""
    lines = ["# Benchmark results", "",
             f"Final return = mean episode return over the last 10% of training; normalised = mean / "
             f"|mean of `{reference}`| on the same env; speed ratio against `{reference}`. lr: the learning "
             "rate the evaluation seeds trained with (initial value where the preset anneals it).", ""]
    if lr_tuning:
        lines += [f"Tuned learning rates: chosen on tuning seeds disjoint from the evaluation seeds by the "
                  f"{selection_rule}; the evaluation seeds then train at that lr. \"grid edge\": the choice "
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
                         f"{r['iqm']:.2f} | {norm} | {_lr_cell(r)} | {r['steps_per_second']:,.0f} | {ratio} |")
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
    return lines


def plot_lr_sweeps(sweeps: Dict[str, Dict], env: str, path: str) -> None:
    """lr (log axis) -> mean final return ± s.e. over tuning seeds, one line
    per optimizer, the chosen lr ringed."""
    plt = pyplot()
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
    save_figure(fig, path)


def plot_aggregate(records: Sequence[Dict], table: Dict[str, List[Dict]], reference: str, path: str) -> None:
    """Per optimizer: final return / |``reference``'s mean| on each env, mean
    over envs and seeds with a bootstrap 95% interval."""
    optimizers = optimizer_order(table)
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
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 0.5 * len(optimizers) + 1.8))
    y = np.arange(len(optimizers))
    ax.errorbar(means, y, xerr=np.array(errs).T, fmt="o", capsize=4)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()  # first optimizer on top, as in the tables
    ax.set_xlabel(f"return / |{short_label(reference)} mean| per env\n(mean over envs and seeds, bootstrap 95% CI)")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


# Tables of the other command-line tools ----------------------------------------------------------


def speed_markdown(rows: Sequence[Dict]) -> List[str]:
    """``meta.cli.speed``'s table: one row per optimizer (``env_steps_per_second``,
    ``ratio`` and ``cpu_ratio`` to the first, ``compile_s``, ``program_mb``)."""
    lines = ["| optimizer | env steps/s | ratio to " + rows[0]["optimizer"]
             + " | ratio by CPU time | compile s | program memory MiB |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        mem = f"{r['program_mb']:.1f}" if r["program_mb"] is not None else "n/a"
        lines.append(f"| {r['optimizer']} | {r['env_steps_per_second']:,.0f} | {r['ratio']:.2f}x | "
                     f"{r['cpu_ratio']:.2f}x | {r['compile_s']:.1f} | {mem} |")
    return lines


def best_per_env_markdown(header: str, env_names: Sequence[str], results: Sequence[Dict]) -> List[str]:
    """``meta.cli.eval_a2c``'s table: env, optimizer, lr, final return mean ±
    s.e. per result (``env``, ``optimizer``, ``lr``, ``final_return_mean``,
    ``final_return_se``), the best cell of each env in bold."""
    lines = [header, "", "| env | optimizer | lr | final return (mean ± s.e.) |", "|---|---|---|---|"]
    for name in env_names:
        cells = [r for r in results if r["env"] == name]
        best = int(np.argmax([r["final_return_mean"] for r in cells]))
        for i, r in enumerate(cells):
            v = f"{r['final_return_mean']:.2f} ± {r['final_return_se']:.2f}"
            lines.append(f"| {name} | {r['optimizer']} | {r['lr']:g} | {'**' + v + '**' if i == best else v} |")
    return lines


# ---------------------------------------------------------------------------
# PBT runs (meta.pbt.run_pbt's result)
# ---------------------------------------------------------------------------


def plot_history(path_prefix: str, result: Dict) -> None:
    """``PREFIX_returns.png`` (every member's return, best and mean) and
    ``PREFIX_hparams.png`` (every member's hyperparameter schedule) of a PBT
    result (``meta.pbt.run_pbt``)."""
    plt = pyplot()
    steps = np.asarray(result["steps"])
    if steps.size == 0:
        return
    rets = np.array([m["returns"] for m in result["members"]], np.float64)  # [P, R]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for row in rets:
        ax.plot(steps, row, lw=0.8, alpha=0.5, label=None)
    with np.errstate(all="ignore"):
        ax.plot(steps, np.nanmax(np.where(np.isfinite(rets), rets, np.nan), 0), "k-", lw=2, label="best")
        ax.plot(steps, np.nanmean(np.where(np.isfinite(rets), rets, np.nan), 0), "k--", lw=2, label="mean")
    ax.set_xlabel("env steps per member")
    ax.set_ylabel("recent return")
    ax.set_title(f"{result['config']['pbt']['algo']} on {result['config']['env']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path_prefix + "returns.png", dpi=120)

    names, scales = result["hparam_names"], result["hparam_scales"]
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for j, (n, sc) in enumerate(zip(names, scales)):
        ax = axes[j // cols][j % cols]
        for m in result["members"]:
            vals = np.asarray(m["hparams"][n])
            ax.plot(steps, 1 - vals if sc == "log1m" else vals, lw=0.9, alpha=0.7)
        ax.set_title(f"1 - {n}" if sc == "log1m" else n, fontsize=9)
        if sc in ("log", "log1m"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for j in range(len(names), rows * cols):
        axes[j // cols][j % cols].axis("off")
    save_figure(fig, path_prefix + "hparams.png", dpi=110)


# ---------------------------------------------------------------------------
# Run logs (every CLI's log.jsonl) and meta-training plots (fitness / objective, summary table)
# ---------------------------------------------------------------------------


def write_log_rows(out: str, rows: Sequence[Dict], fields: Sequence[str], sink=None) -> None:
    """``out/log.jsonl`` (every key of every row) and ``out/log.csv`` (the
    columns ``fields``), each written to a temporary file and renamed. The
    metrics log of every run (train, PBT, meta-training); a ``sink``
    (``meta.tracking.WandbSink``, ``--wandb``) gets the rows it has not seen."""
    with open(os.path.join(out, "log.jsonl.tmp"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(os.path.join(out, "log.jsonl.tmp"), os.path.join(out, "log.jsonl"))
    with open(os.path.join(out, "log.csv.tmp"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    os.replace(os.path.join(out, "log.csv.tmp"), os.path.join(out, "log.csv"))
    if sink is not None:
        sink.log_rows(rows)


def plot_fitness(out: str, rows: Sequence[Dict]) -> None:
    """``out/fitness.png``: population mean and min-max fitness per ES
    generation, and the ES mean's own fitness where it was evaluated."""
    g = [r["generation"] for r in rows]
    fig, ax = pyplot().subplots(figsize=(6.4, 4.0))
    ax.plot(g, [r["fitness_mean"] for r in rows], label="population mean")
    ax.fill_between(g, [r["fitness_min"] for r in rows], [r["fitness_max"] for r in rows], alpha=0.2,
                    label="population min-max")
    ev = [(r["generation"], r["es_mean_fitness"]) for r in rows if r.get("es_mean_fitness") is not None]
    if ev:
        ax.plot(*zip(*ev), "o-" if len(ev) < 30 else "-", label="ES mean (evaluated)")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (return / reference)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, os.path.join(out, "fitness.png"), dpi=120)


def plot_objective(out: str, rows: Sequence[Dict]) -> None:
    """``out/objective.png``: unit return and meta loss per meta-gradient step."""
    x = np.array([r["meta_step"] for r in rows])
    plot_curves(os.path.join(out, "objective.png"),
                {"unit return": (x, np.array([[r["unit_return"] for r in rows]])),
                 "meta loss": (x, np.array([[r["meta_loss"] for r in rows]]))},
                title="pipeline meta-gradient", xlabel="meta-step", ylabel="value")


def comparison_table(results: Sequence[Tuple[str, str, Sequence[float]]], value: str = "final return") -> List[str]:
    """Markdown lines of a final comparison: ``results`` = (env, optimizer
    label, ``value`` per seed) -> mean ± s.e. and the per-seed values."""
    lines = [f"| env | optimizer | {value} (mean ± s.e.) | per seed |", "|---|---|---|---|"]
    for name, label, fr in results:
        fr = np.asarray(fr, np.float64)
        lines.append(f"| {name} | {label} | {fr.mean():.3f} ± {stats.stderr(fr):.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in fr)} |")
    return lines
