"""Benchmark optimizers x environments with PPO: tables and plots.

    metarl-benchmark --envs minatar --optimizers adam,rmsprop,kfac,diag_ggn,open:../shared/anchors/open/breakout_OPEN.npy \\
        --seeds 4 --timesteps 1e6 --out runs/bench-minatar
    metarl-benchmark --envs CartPole-v1,Catch-bsuite --optimizers adam,sgd --seeds 2 --timesteps 5e4
    metarl-benchmark --envs minatar --optimizers adam,rmsprop,lion --tune-lr --tune-seeds 2 \\
        --seeds 3 --timesteps 5e5 --out runs/bench-tuned

Envs are names or suites (minatar, classic, bsuite, brax, gridworlds);
optimizers are specs as in ``learned_optim.from_spec``. Every (env,
optimizer) cell trains all its seeds vmapped in one program with the env's
PPO preset (OPEN-paper settings for MinAtar, Brax settings for Brax); cells
run in turn. A finished cell is written to DIR/cells/ at once, so running the
same command again resumes with the cells not yet done.

Writes DIR/results.json (every cell: per-seed final returns, learning
curves, env steps/s, compile seconds, peak memory, device), DIR/results.md
(per env: mean ± s.e., IQM, return normalised by --reference, speed ratio),
DIR/curves_ENV.png and DIR/aggregate.png (normalised returns across envs,
bootstrap 95% CIs).

--tune-lr: every optimizer with an injected learning rate (adam, rmsprop,
lion, sgd, kfac, diag_ggn, ...) first runs a learning-rate sweep per env, the
whole grid x --tune-seeds as one vmapped program, on tuning seeds disjoint
from the evaluation seeds; the lr with the best mean final return over the
tuning seeds wins (ties to the smaller lr; lrs with a diverged seed lose) and
the evaluation seeds train at it. --lr-grid gives absolute values
(1e-4,3e-4,1e-3) or multipliers of each optimizer's default lr
(x0.1,x0.3,x1,x3,x10, the default); the default is the lr the optimizer trains
with untuned (the preset's lr for adam/adamw, else the optimizer's own or the
spec's lr=). Grids for single optimizers follow after ';' with their name:
--lr-grid '3e-4,1e-3,3e-3,1e-2;lion=3e-5,1e-4,3e-4,1e-3;kfac=x0.3,x1,x3'. Optimizers without an injected lr (open:PATH.npy, lopt:DIR) run
as they are; the table says so. Sweeps are written to DIR/cells/*.tune.json
and reused on resume.

--report-only rebuilds the outputs from every finished cell in DIR/cells
(e.g. a benchmark run in parts with different --envs/--optimizers).

From a checkout, ``python scripts/benchmark.py`` is the same command.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

import envs
from learned_optim.spec import split_spec_list
from meta import benchmark, distributed
from meta.lr_tuning import DEFAULT_LR_GRID, parse_lr_grids


def _report_only(a) -> int:
    """Outputs from every cell in ``a.out``; the order follows --envs and
    --optimizers where they name the cells' envs and optimizers."""
    records = benchmark.load_records(a.out)
    envs_given = envs.expand_suites([e for e in a.envs.split(",") if e.strip()])
    specs_given = list(split_spec_list(a.optimizers))

    def rank(x, order):
        return order.index(x) if x in order else len(order)

    records.sort(key=lambda r: (rank(r["env"], envs_given), r["env"], rank(r["optimizer"], specs_given)))
    present = list(dict.fromkeys(r["optimizer"] for r in records))
    reference = a.reference or (specs_given[0] if specs_given and specs_given[0] in present else present[0])
    if reference not in present:
        raise ValueError(f"--reference {reference!r} is not among the cells' optimizers {present}")
    benchmark.write_outputs(records, a.out, reference)
    with open(os.path.join(a.out, "results.md")) as f:
        print(f.read())
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", default="CartPole-v1,Catch-bsuite", help="comma-separated env names or suites")
    p.add_argument("--optimizers", default="adam,rmsprop,diag_ggn", help="comma-separated optimizer specs")
    p.add_argument("--seeds", type=int, default=2, help="seeds per cell (vmapped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timesteps", type=float, default=5e4, help="env steps per seed")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate for every optimizer (default: spec lr=, Adam's preset lr, or the optimizer's own)")
    p.add_argument("--tune-lr", action="store_true",
                   help="learning-rate sweep per (env, optimizer) before the evaluation seeds")
    p.add_argument("--lr-grid", default=None,
                   help=f"with --tune-lr: absolute lrs (1e-4,3e-4,1e-3) or multipliers of each optimizer's "
                        f"default (default {DEFAULT_LR_GRID}); per optimizer: "
                        f"'3e-4,1e-3,3e-3;lion=3e-5,1e-4,3e-4;kfac=x0.3,x1,x3'")
    p.add_argument("--tune-seeds", type=int, default=None, help="with --tune-lr: tuning seeds per lr (default 2)")
    p.add_argument("--tune-timesteps", type=float, default=None,
                   help="with --tune-lr: env steps per tuning run (default: --timesteps)")
    p.add_argument("--reference", default=None, help="optimizer spec to normalise by (default: the first)")
    p.add_argument("--report-only", action="store_true",
                   help="write results from every finished cell in --out without training")
    p.add_argument("--dry-run", action="store_true", help="print the cells, lr grids and cost estimate; train nothing")
    p.add_argument("--out", default="runs/benchmark")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    from runtime.cache import enable_compilation_cache

    enable_compilation_cache()  # persistent compilation cache (METARL_NO_COMPILE_CACHE=1: off)
    if a.report_only:
        try:
            return _report_only(a)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        distributed.start_cli()  # several processes: JAX_COORDINATOR_ADDRESS etc. (only process 0 prints)
        env_names = envs.expand_suites([e for e in a.envs.split(",") if e.strip()])
        specs = list(split_spec_list(a.optimizers))
        benchmark.check_inputs(env_names, specs, a.seeds, a.timesteps)
        reference = a.reference or specs[0]
        if reference not in specs:
            raise ValueError(f"--reference {reference!r} is not one of --optimizers {specs}")
        grid = None
        if a.tune_lr:
            grid = parse_lr_grids(a.lr_grid if a.lr_grid is not None else DEFAULT_LR_GRID)
            a.tune_seeds = 2 if a.tune_seeds is None else a.tune_seeds
            if a.tune_seeds < 1:
                raise ValueError(f"--tune-seeds must be >= 1, got {a.tune_seeds}")
            if a.tune_timesteps is not None and a.tune_timesteps <= 0:
                raise ValueError(f"--tune-timesteps must be positive, got {a.tune_timesteps:g}")
        else:
            given = [f for f, v in (("--lr-grid", a.lr_grid), ("--tune-seeds", a.tune_seeds),
                                    ("--tune-timesteps", a.tune_timesteps)) if v is not None]
            if given:
                raise ValueError(f"{', '.join(given)} only works with --tune-lr")
        cells = benchmark.make_cells(env_names, specs, a.seeds, a.timesteps, a.lr, a.seed, grid,
                                     a.tune_seeds, a.tune_timesteps)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warning = benchmark.cpu_budget_warning(cells)
    if warning:
        print(warning, flush=True)
    if jax.devices()[0].platform == "cpu":
        est = sum(benchmark.estimate_cpu_seconds(cells).values())
        print(f"rough estimate: {est / 3600:.1f} h of one CPU core for training, plus about a minute of "
              f"compilation per program ({sum(2 if c.tuned else 1 for c in cells)} programs)", flush=True)
    print(f"benchmark: {len(env_names)} env(s) x {len(specs)} optimizer(s), {a.seeds} seeds x "
          f"{int(a.timesteps):,} steps per cell; output in {a.out}", flush=True)
    for c in cells:
        if c.tuned:
            print(f"  {c.env} | {c.optimizer}: lr sweep over {', '.join(f'{x:.3g}' for x in c.lr_grid)} "
                  f"({c.tune_seeds} tuning seeds x {c.tune_timesteps:,} steps each)", flush=True)
        elif grid is not None:
            print(f"  {c.env} | {c.optimizer}: no injected learning rate, run as it is", flush=True)
    if a.dry_run:
        return 0
    try:
        records = benchmark.run_cells(cells, a.out, log=lambda m: print(m, flush=True))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    benchmark.write_outputs(records, a.out, reference)
    if not distributed.is_main():  # process 0 wrote the outputs
        return 0
    with open(os.path.join(a.out, "results.md")) as f:
        print("\n" + f.read())
    return 0
