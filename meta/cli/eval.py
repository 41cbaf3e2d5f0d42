"""Play the agents a run saved, one JSON line per seed.

    metarl-eval runs/train-CartPole-v1-adam                  # 10 sampled episodes per seed
    metarl-eval runs/breakout --episodes 32 --deterministic   # greedy / Gaussian-mean actions
    metarl-eval runs/pbt-pbt-CartPole-v1 --gif cartpole.gif  # also render 200 steps of seed 0

Rebuilds the env, PPO config and networks from RUN_DIR/agent (the document
the training run saved with the agents) and plays --episodes episodes with
every seed's agent, vmapped: one episode per env, observations normalised with
the saved statistics where the run normalised them. Each line holds the mean
and the per-episode returns, and whether actions were the policy's mode
(``"deterministic": true``: argmax of the logits, the mean of a Gaussian) or
sampled from it.

RUN_DIR is any directory holding agent/: a ``metarl-train --out`` directory
(one agent per seed); a ``metarl-pbt --out`` directory (PPO: the best final
member) or its replay/ (the ``--replay`` agent); a ``metarl-meta-train --out``
directory of whole-lifetime ES (the final comparison's agents trained with
the learned optimizer on the first env; further envs in RUN_DIR/agents/ENV).

--gif PATH renders --gif-frames steps of one agent: a GIF through gymnax's
visualiser (classic control needs pygame: ``pip install -e .[render]``), an
HTML page through brax.io.html for Brax envs (PATH ending in .html); other
envs have no renderer (a one-line error). From a checkout,
``python scripts/eval.py`` is the same command.
"""

from __future__ import annotations

import argparse
import json
import sys

from runtime.cache import enable_compilation_cache


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="output directory of metarl-train, metarl-pbt or metarl-meta-train (holds agent/)")
    p.add_argument("--episodes", type=int, default=10, help="episodes per seed (played in parallel)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of the evaluation episodes")
    p.add_argument("--deterministic", action="store_true",
                   help="act with the policy's mode (argmax / Gaussian mean) instead of sampling")
    p.add_argument("--gif", metavar="PATH", default=None,
                   help="also render the agent's play to PATH (.gif for gymnax envs, .html for Brax)")
    p.add_argument("--gif-frames", type=int, default=200, help="env steps rendered with --gif (default 200)")
    p.add_argument("--gif-seed-index", type=int, default=0, help="which seed's agent --gif renders (default 0)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not use the persistent compilation cache (also: METARL_NO_COMPILE_CACHE=1)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    enable_compilation_cache(disable=args.no_compile_cache)
    from meta.saved_agent import evaluate_agent, load_agent  # (JAX starts after the cache is set)
    from meta.render import check_renderable, render

    try:
        if args.episodes < 1:
            raise ValueError(f"--episodes must be >= 1, got {args.episodes}")
        if args.gif is not None and args.gif_frames < 1:
            raise ValueError(f"--gif-frames must be >= 1, got {args.gif_frames}")
        saved = load_agent(args.run_dir)
        if args.gif is not None:
            check_renderable(saved.document["env"], args.gif)  # before anything compiles
            if not 0 <= args.gif_seed_index < saved.document["seeds"]:
                raise ValueError(f"--gif-seed-index must be in [0, {saved.document['seeds']}), "
                                 f"got {args.gif_seed_index}")
        rows = evaluate_agent(saved, episodes=args.episodes, seed=args.seed, deterministic=args.deterministic)
    except ValueError as e:  # (meta.checkpoint.CheckpointError is one)
        print(f"error: {e}", file=sys.stderr)
        return 2
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.gif is not None:
        shown = render(saved, args.gif, frames=args.gif_frames, seed=args.seed, deterministic=args.deterministic,
                       seed_index=args.gif_seed_index)
        print(f"rendered {shown['frames']} steps of seed {shown['seed_index']} ({shown['episodes_ended']} "
              f"episode(s) ended, returns {[round(r, 1) for r in shown['returns']]}) to {shown['path']}",
              file=sys.stderr, flush=True)
    return 0
