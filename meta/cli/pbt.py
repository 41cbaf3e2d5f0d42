"""Population-based training of RL agents: PBT, GPBT-PL, PB2, or a fixed baseline.

    python scripts/pbt.py                                   # PBT, PPO on CartPole, 8 Adam members
    python scripts/pbt.py --algo gpbt --population 8 --timesteps 2e5 --out runs/gpbt
    python scripts/pbt.py --algo pbt --optimizers adam:6,kfac:2 --population 8
    python scripts/pbt.py --algo fixed ...                  # same population, fixed random hparams
    python scripts/pbt.py --agent td3 --env Pendulum-v1 --optimizers adam:6,kfac:2 \
        --timesteps 2e4 --interval 200 --window 1             # TD3; a round = one 200-step episode per env

One jitted step = --interval agent updates of every member (vmapped) +
selection. --timesteps are env steps per member. Writes to --out:
results.json (best and mean final return, per-member histories of return,
hyperparameters and lineage), log.jsonl (one row per round; also to Weights &
Biases with --wandb PROJECT, the [wandb] extra), ALGO_returns.png,
ALGO_hparams.png, checkpoints/ (continue with --resume) and, for PPO, agent/:
the best final member (play it with ``metarl-eval OUT``).

    metarl-pbt --replay OUT     # retrain the best member's schedule alone

--replay trains one agent from scratch on the best final member's
hyperparameter schedule, followed back through every copy (lineage), for
the same rounds of --interval updates, the values changed at the same
boundaries; writes OUT/replay/results.json (the replay's return beside the
member's) and OUT/replay/agent. Other flags are ignored with --replay.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from tqdm import tqdm

import envs  # sets safe XLA flags before JAX starts
from meta import distributed, pbt
from meta.checkpoint import latest_step
from meta.report import plot_history, write_json
from meta.tracking import open_sink, require_wandb


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", default="pbt", help="pbt, gpbt (GPBT-PL), pb2, fixed (no selection)")
    p.add_argument("--exploit", default="truncation", help="pbt/pb2 exploit: truncation, ttest, tournament")
    p.add_argument("--explore", default="perturb",
                   help="pbt explore: perturb (x0.8 or x1.2), resample (redraw from the prior), resample_or_perturb "
                        "(Ray Tune's: redraw with --resample-prob, else perturb)")
    p.add_argument("--agent", default="ppo", help="ppo or td3")
    p.add_argument("--env", default="CartPole-v1")
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--optimizers", default=None,
                   help="groups SPEC:N, e.g. adam:6,kfac:2 (default: adam:POPULATION)")
    p.add_argument("--interval", type=int, default=10, help="agent updates between selections")
    p.add_argument("--timesteps", type=float, default=2e5, help="env steps per member")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tune", default=None, help="comma-separated hyperparameters to tune (default: all known)")
    p.add_argument("--truncation-fraction", type=float, default=None,
                   help=f"truncation: the bottom fraction copies the top (default {pbt.PBTConfig.truncation_fraction})")
    p.add_argument("--ttest-alpha", type=float, default=None,
                   help=f"ttest: level of Welch's test (default {pbt.PBTConfig.ttest_alpha})")
    p.add_argument("--resample-prob", type=float, default=None,
                   help=f"resample_or_perturb and gpbt: per-value redraw probability "
                        f"(default {pbt.PBTConfig.resample_prob})")
    p.add_argument("--gpbt-pairing", default=None,
                   help="gpbt: quantile (the official code's: the bottom 25%% learn from a random top-25%% member; "
                        "default) or random (the paper's text: random pairs)")
    p.add_argument("--pb2-history", type=int, default=None,
                   help=f"pb2: data rows the GP fits, newest kept (default {pbt.PBTConfig.pb2_history}, the "
                        f"shortest window Ray's PB2 fits; its cost grows as rows^3)")
    p.add_argument("--window", type=int, default=None,
                   help=f"fitness window: returns of the latest finished episodes kept per member "
                        f"(default {pbt.PBTConfig.window})")
    p.add_argument("--num-envs", type=int, default=None, help="envs per member (PPO, TD3)")
    p.add_argument("--num-steps", type=int, default=None, help="PPO rollout length")
    p.add_argument("--out", default=None, help="output directory (default runs/pbt-ALGO-ENV)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--checkpoint-every", type=int, default=5, help="rounds between checkpoints")
    p.add_argument("--no-time-selection", action="store_true", help="skip timing selection apart from training")
    p.add_argument("--replay", metavar="RUN_DIR", default=None,
                   help="retrain the best final member of the PBT run in RUN_DIR on its lineage's schedule")
    p.add_argument("--wandb", metavar="PROJECT", default=None,
                   help="also log OUT/log.jsonl's rows to this Weights & Biases project (the [wandb] extra)")
    return p.parse_args(argv)


def replay_main(run_dir: str) -> int:
    from meta.pbt.replay import read_history, replay

    try:
        read_history(run_dir)  # a one-line error before anything compiles
        doc = replay(run_dir, log=lambda s: print(s, flush=True))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"replay of member {doc['member']}: return {doc['replay_return']:.2f} beside the member's "
          f"{doc['member_return']:.2f} ({doc['updates']} updates, {doc['wall_seconds']:.1f}s); "
          f"written to {os.path.join(run_dir, 'replay', 'results.json')}", flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from runtime.cache import enable_compilation_cache

    enable_compilation_cache()  # persistent compilation cache (METARL_NO_COMPILE_CACHE=1: off)
    if args.replay is not None:
        return replay_main(args.replay)
    out = args.out or os.path.join("runs", f"pbt-{args.algo}-{args.env.replace('/', '_')}")
    try:
        if args.wandb:
            require_wandb()
        distributed.start_cli()
        envs.expand_suites([args.env])
        if args.population < 1:
            raise ValueError(f"--population must be >= 1, got {args.population}")
        groups = pbt.parse_groups(args.optimizers or f"adam:{args.population}", args.population)
        overrides = {k: v for k, v in dict(num_envs=args.num_envs, num_steps=args.num_steps).items()
                     if v is not None}
        pbt_overrides = {k: v for k, v in dict(
            truncation_fraction=args.truncation_fraction, resample_prob=args.resample_prob, window=args.window,
            ttest_alpha=args.ttest_alpha, gpbt_pairing=args.gpbt_pairing,
            pb2_history=args.pb2_history).items() if v is not None}
        tune = [t.strip() for t in args.tune.split(",")] if args.tune else None
        kwargs = dict(
            agent_kind=args.agent, env=args.env, groups=groups, algo=args.algo, population=args.population,
            interval=args.interval, timesteps=args.timesteps, seed=args.seed, exploit=args.exploit,
            explore=args.explore, out=out, resume=args.resume, checkpoint_every=args.checkpoint_every,
            tune=tune, time_selection=not args.no_time_selection, pbt_overrides=pbt_overrides,
            agent_overrides=overrides,
        )
        # Validate everything (configs, groups, env, optimizers, agent) before compiling.
        pbt.PBTConfig(algo=args.algo, exploit=args.exploit, explore=args.explore, interval=args.interval,
                      **pbt_overrides)
        if args.resume:
            if latest_step(os.path.join(out, "checkpoints")) is None:
                raise ValueError(f"--resume: no checkpoint found in {os.path.join(out, 'checkpoints')!r}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    os.makedirs(out, exist_ok=True)
    try:
        sink = open_sink(args.wandb, out, "metarl-pbt", vars(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bar = tqdm(total=1, desc=f"{args.algo} rounds", file=sys.stderr, disable=not sys.stderr.isatty())

    def progress(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()

    say = (lambda s: tqdm.write(s)) if sys.stderr.isatty() else (lambda s: print(s, flush=True))
    try:
        result = pbt.run_pbt(log=say, progress=progress, sink=sink, **kwargs)
    except ValueError as e:  # raised by validation inside run_pbt before anything compiles
        bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if sink is not None:
            sink.finish()
    bar.close()
    if not distributed.is_main():
        return 0
    write_json(os.path.join(out, "results.json"), result)
    plot_history(os.path.join(out, f"{args.algo}_"), result)
    fr = np.asarray(result.get("final_return", []), np.float64)
    print(
        f"final return (recent window): best {result.get('final_return_best', float('nan')):.2f}, mean "
        f"{result.get('final_return_mean', float('nan')):.2f}, per member {np.round(fr, 1).tolist()}; "
        f"diverged {result.get('diverged_members', 0)}; run {result['run_seconds']:.1f}s, compile "
        f"{result['compile_seconds']:.1f}s; output in {out}",
        flush=True,
    )
    return 0
