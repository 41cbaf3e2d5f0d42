"""Train PPO on one env with one optimizer over N seeds (vmapped).

    metarl-train                                   # CartPole, adam, 4 seeds
    metarl-train --env Breakout-MinAtar --optimizer adam:lr=5e-3 \
        --seeds 8 --timesteps 5e6 --out runs/breakout

Writes DIR/results.json, DIR/curve.csv and DIR/curve.png, the final agent of
every seed to DIR/agent/ (play it with ``metarl-eval DIR``) and checkpoints to
DIR/checkpoints/ (every --checkpoint-every updates; by default at the first
progress chunk boundary after every 30 s, and at the end). A killed run
continues with the same command plus ``--resume``, to the same results as an
uninterrupted run. DIR/log.jsonl holds one row per update (mean/min/max
return over seeds); ``--wandb PROJECT`` sends the same rows to Weights &
Biases (``pip install -e .[wandb]``). From a checkout,
``python scripts/train.py`` is the same command.
"""

from __future__ import annotations

import argparse
import os
import sys

import envs
import learned_optim
from agents.presets import resolve_config
from meta.checkpoint import CheckpointError, latest_step
from meta.experiment import CHECKPOINT_DIR, learning_rate_for, train_seeds
from meta.report import plot_curves, write_curve_csv, write_json
from meta.tracking import open_sink, require_wandb
from runtime.cache import enable_compilation_cache


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="CartPole-v1", help="env name (see envs.known_envs())")
    p.add_argument("--optimizer", default="adam", help="optimizer spec, e.g. adam:lr=3e-4, rmsprop, lion, open:PATH.npy")
    p.add_argument("--seeds", type=int, default=4, help="number of seeds, trained vmapped")
    p.add_argument("--seed", type=int, default=0, help="base PRNG seed")
    p.add_argument("--timesteps", type=float, default=None, help="env steps per seed (default: the preset's: 5e5 classic, 1e7 MinAtar)")
    p.add_argument("--preset", default=None, help="PPO preset: classic, minatar, brax, gridworld (default: by env)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the spec's lr=, else the env preset's for Adam, else the optimizer's own); written into the optimizer's injected learning_rate")
    p.add_argument("--ent-coef", type=float, default=None)
    p.add_argument("--clip-eps", type=float, default=None)
    p.add_argument("--gamma", type=float, default=None)
    p.add_argument("--gae-lambda", type=float, default=None)
    p.add_argument("--vf-coef", type=float, default=None)
    p.add_argument("--num-envs", type=int, default=None)
    p.add_argument("--num-steps", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="PPO update epochs")
    p.add_argument("--minibatches", type=int, default=None)
    p.add_argument("--hidden", type=str, default=None, help="hidden sizes, e.g. 64,64")
    p.add_argument("--activation", default=None)
    p.add_argument("--curvature-batch-size", type=int, default=None,
                   help="rows of each minibatch that K-FAC / diag_ggn take curvature statistics from (0 = all; default 256)")
    p.add_argument("--out", default=None, help="output directory (default runs/train-ENV-OPT)")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="updates between checkpoints in OUT/checkpoints (default: the first progress chunk "
                        "boundary after every 30 s, and the end; more updates than a chunk (1/20 of the run): "
                        "the first chunk boundary past each multiple)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out (same settings as the run that wrote it)")
    p.add_argument("--wandb", metavar="PROJECT", default=None,
                   help="also log DIR/log.jsonl's rows to this Weights & Biases project (the [wandb] extra; "
                        "WANDB_MODE=offline: no network)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not use the persistent compilation cache (also: METARL_NO_COMPILE_CACHE=1)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    enable_compilation_cache(disable=args.no_compile_cache)
    try:
        if args.wandb:
            require_wandb()
        envs.expand_suites([args.env])
        learned_optim.from_spec(args.optimizer)
        timesteps = args.timesteps
        if timesteps is not None and timesteps <= 0:
            raise ValueError(f"--timesteps must be positive, got {args.timesteps:g}")
        hidden = tuple(int(h) for h in args.hidden.split(",")) if args.hidden else None
        config, hparams, preset_lr = resolve_config(
            args.env, args.preset,
            total_timesteps=int(timesteps) if timesteps is not None else None,
            num_envs=args.num_envs, num_steps=args.num_steps, update_epochs=args.epochs,
            num_minibatches=args.minibatches, hidden_sizes=hidden, activation=args.activation,
            ent_coef=args.ent_coef, clip_eps=args.clip_eps, gamma=args.gamma,
            gae_lambda=args.gae_lambda, vf_coef=args.vf_coef, curvature_batch_size=args.curvature_batch_size,
        )
        lr = learning_rate_for(args.optimizer, preset_lr, args.lr)
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        if args.checkpoint_every is not None and args.checkpoint_every < 1:
            raise ValueError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
        safe_opt = args.optimizer.replace("/", "_").replace(":", "-").replace(",", "_")
        out = args.out or os.path.join("runs", f"train-{args.env}-{safe_opt}")
        if args.resume and latest_step(os.path.join(out, CHECKPOINT_DIR)) is None:
            raise ValueError(f"--resume: no checkpoint found in {os.path.join(out, CHECKPOINT_DIR)!r}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    os.makedirs(out, exist_ok=True)
    try:
        sink = open_sink(args.wandb, out, "metarl-train", vars(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"PPO on {args.env} with {args.optimizer}: {args.seeds} seeds x {config.num_updates * config.batch_size:,d} "
        f"steps ({config.num_envs} envs x {config.num_steps} steps, {config.update_epochs} epochs x "
        f"{config.num_minibatches} minibatches); output in {out}",
        flush=True,
    )
    try:
        result = train_seeds(args.env, args.optimizer, config, hparams, args.seeds, args.seed,
                             log=lambda s: print(s, flush=True), learning_rate=lr, run_dir=out,
                             checkpoint_every=args.checkpoint_every, resume=args.resume, sink=sink)
    except CheckpointError as e:  # --resume with other settings, or unreadable checkpoint files
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if sink is not None:
            sink.finish()
    write_json(os.path.join(out, "results.json"), result)
    write_curve_csv(os.path.join(out, "curve.csv"), result["steps"], result["curves"])
    plot_curves(
        os.path.join(out, "curve.png"),
        {args.optimizer: (result["steps"], result["curves"])},
        title=f"PPO on {args.env}",
    )
    fr = result["final_return"]
    print(
        f"final return (mean of last 10% of training): {sum(fr) / len(fr):.2f} "
        f"per seed {[round(x, 2) for x in fr]}; {result['env_steps_per_second']:,.0f} env steps/s "
        f"(compile {result['compile_seconds']:.1f}s, run {result['run_seconds']:.1f}s); "
        f"peak RSS {result['memory']['host_peak_rss_mb']:.0f} MiB; agents saved to {os.path.join(out, 'agent')}"
    )
    return 0
