#!/usr/bin/env python
"""Benchmark optimizers x environments with PPO: tables and plots.

    python scripts/benchmark.py --envs minatar --optimizers adam,rmsprop,kfac,diag_ggn,open:../shared/anchors/open/breakout_OPEN.npy \\
        --seeds 4 --timesteps 1e6 --out runs/bench-minatar
    python scripts/benchmark.py --envs CartPole-v1,Catch-bsuite --optimizers adam,sgd --seeds 2 --timesteps 5e4

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
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import envs  # noqa: E402  (sets safe XLA flags before JAX starts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", default="CartPole-v1,Catch-bsuite", help="comma-separated env names or suites")
    p.add_argument("--optimizers", default="adam,rmsprop,diag_ggn", help="comma-separated optimizer specs")
    p.add_argument("--seeds", type=int, default=2, help="seeds per cell (vmapped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timesteps", type=float, default=5e4, help="env steps per seed")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate for every optimizer (default: spec lr=, Adam's preset lr, or the optimizer's own)")
    p.add_argument("--reference", default=None, help="optimizer spec to normalise by (default: the first)")
    p.add_argument("--out", default="runs/benchmark")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    from meta import benchmark

    try:
        env_names = envs.expand_suites([e for e in a.envs.split(",") if e.strip()])
        specs = [s.strip() for s in a.optimizers.split(",") if s.strip()]
        benchmark.check_inputs(env_names, specs, a.seeds, a.timesteps)
        reference = a.reference or specs[0]
        if reference not in specs:
            raise ValueError(f"--reference {reference!r} is not one of --optimizers {specs}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warning = benchmark.cpu_budget_warning(env_names, specs, a.seeds, a.timesteps)
    if warning:
        print(warning, flush=True)
    cells = [benchmark.Cell(e, s, a.seeds, int(a.timesteps), a.lr, a.seed) for e in env_names for s in specs]
    print(f"benchmark: {len(env_names)} env(s) x {len(specs)} optimizer(s), {a.seeds} seeds x "
          f"{int(a.timesteps):,} steps per cell; output in {a.out}", flush=True)
    try:
        records = benchmark.run_cells(cells, a.out, log=lambda m: print(m, flush=True))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    benchmark.write_outputs(records, a.out, reference)
    with open(os.path.join(a.out, "results.md")) as f:
        print("\n" + f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
