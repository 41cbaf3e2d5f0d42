"""Train fresh A2C agents with several optimizers on several envs (same seeds).

    metarl-eval-a2c --envs Catch-bsuite,CartPole-v1 \
        --optimizers adam:lr=1e-3,adam:lr=3e-3,adam:lr=1e-2,lopt:runs/o4rl-catch/optimizer \
        --lr 3e-3 --seeds 8 --timesteps 16000 --out runs/eval-catch

For learned optimizers (meta-trained with ``scripts/meta_train.py``) and Adam
learning-rate sweeps: every (env, optimizer) cell trains ``--seeds`` agents
vmapped, from the same seeds. A spec's own ``lr=`` is the agent learning
rate for that cell, else ``--lr`` (A2C writes it into the optimizer's
injected learning rate; use the lr the rule was meta-trained with). The
optimizers get A2C's reference settings where a spec sets none (Optim4RL's:
optax's defaults, ``agents.presets.OPTIMIZER_DEFAULTS``) and, on the
gridworlds, Optim4RL's elementwise gradient clip at 1 (``--grad-clip``).
Writes DIR/results.json and DIR/results.md (final return: mean over the last
10% of updates, mean ± s.e. over seeds; the best cell per env in bold).
From a checkout, ``python scripts/eval_a2c.py`` is the same command.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import envs
import learned_optim
from agents.a2c import A2CConfig, A2CHParams
from agents.presets import a2c_grad_clip
from learned_optim.spec import explicit_learning_rate
from meta.report import best_per_env_markdown, write_json
from meta.units import train_a2c_seeds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", default="Catch-bsuite", help="comma-separated env names or suites")
    p.add_argument("--optimizers", default="adam", help="comma-separated optimizer specs (lopt:DIR for learned)")
    p.add_argument("--lr", type=float, default=3e-3, help="agent learning rate where a spec sets none")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timesteps", type=float, default=16000, help="env steps per agent")
    p.add_argument("--num-envs", type=int, default=8)
    p.add_argument("--num-steps", type=int, default=10)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--grad-clip", type=float, default=None,
                   help="elementwise gradient clip in front of every optimizer (default: the env family's A2C "
                        "preset: 1 on the gridworlds, as Optim4RL's a2c_grid.json; none elsewhere; 0 = none)")
    p.add_argument("--out", default="runs/eval_a2c")
    return p.parse_args(argv)


def build(args):
    """(env names, specs, A2C config) from the flags; bad input -> ``ValueError``."""
    names = envs.expand_suites(args.envs)
    specs = [s.strip() for s in args.optimizers.split(",") if s.strip()]  # one argument per spec
    if not specs:
        raise ValueError("--optimizers names no optimizer")
    for s in specs:
        learned_optim.from_spec(s)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if args.grad_clip is not None and not args.grad_clip >= 0:
        raise ValueError(f"--grad-clip must be >= 0 (0 = none), got {args.grad_clip}")
    config = A2CConfig(num_envs=args.num_envs, num_steps=args.num_steps, hidden_sizes=(args.hidden,),
                       total_timesteps=int(args.timesteps))
    return names, specs, config


def main(argv=None) -> int:
    args = parse_args(argv)
    from runtime.cache import enable_compilation_cache

    enable_compilation_cache()  # persistent compilation cache (METARL_NO_COMPILE_CACHE=1: off)
    try:
        names, specs, config = build(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    results = []
    for name in names:
        clip = a2c_grad_clip(name) if args.grad_clip is None else args.grad_clip
        env_config = dataclasses.replace(config, grad_clip=clip)
        for spec in specs:
            lr = explicit_learning_rate(spec) or args.lr
            t0 = time.perf_counter()
            res = train_a2c_seeds(name, spec, env_config, A2CHParams.default(gamma=args.gamma), args.seeds,
                                  seed=args.seed, learning_rate=lr)
            res["seconds"] = time.perf_counter() - t0
            res.pop("curves")
            res.pop("steps")
            results.append(res)
            print(f"{name:32s} {spec:48s} lr {lr:<8g} clip {clip:<4g} final return {res['final_return_mean']:9.3f} ± "
                  f"{res['final_return_se']:.3f}  ({res['seconds']:.0f}s)", flush=True)
            write_json(os.path.join(args.out, "results.json"), dict(args=vars(args), results=results))
    header = (f"A2C ({config.num_envs} envs x {config.num_steps} steps, hidden {args.hidden}, gamma {args.gamma}), "
              f"{args.seeds} seeds, {config.num_updates * config.batch_size:,d} env steps per agent.")
    lines = best_per_env_markdown(header, names, results)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
