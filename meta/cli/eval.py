"""Play the agents a ``metarl-train`` run saved, one JSON line per seed.

    metarl-eval runs/train-CartPole-v1-adam                  # 10 sampled episodes per seed
    metarl-eval runs/breakout --episodes 32 --deterministic   # greedy / Gaussian-mean actions

Rebuilds the env, PPO config and networks from RUN_DIR/agent (the document
the training run saved with the agents) and plays --episodes episodes with
every seed's agent, vmapped: one episode per env, observations normalised with
the saved statistics where the run normalised them. Each line holds the mean
and the per-episode returns, and whether actions were the policy's mode
(``"deterministic": true``: argmax of the logits, the mean of a Gaussian) or
sampled from it. PBT and ES outputs hold no such agent. From a checkout,
``python scripts/eval.py`` is the same command.
"""

from __future__ import annotations

import argparse
import json
import sys

from runtime.cache import enable_compilation_cache


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="output directory of metarl-train (holds agent/)")
    p.add_argument("--episodes", type=int, default=10, help="episodes per seed (played in parallel)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of the evaluation episodes")
    p.add_argument("--deterministic", action="store_true",
                   help="act with the policy's mode (argmax / Gaussian mean) instead of sampling")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not use the persistent compilation cache (also: METARL_NO_COMPILE_CACHE=1)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    enable_compilation_cache(disable=args.no_compile_cache)
    from meta.experiment import evaluate_agent, load_agent  # (JAX starts after the cache is set)

    try:
        if args.episodes < 1:
            raise ValueError(f"--episodes must be >= 1, got {args.episodes}")
        saved = load_agent(args.run_dir)
        rows = evaluate_agent(saved, episodes=args.episodes, seed=args.seed, deterministic=args.deterministic)
    except ValueError as e:  # (meta.checkpoint.CheckpointError is one)
        print(f"error: {e}", file=sys.stderr)
        return 2
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0
