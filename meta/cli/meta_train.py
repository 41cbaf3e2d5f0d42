"""Meta-train a learned optimizer: ES over whole lifetimes, ES over pipeline
units, or pipeline meta-gradients (Optim4RL style).

    python scripts/meta_train.py                       # small default: a fresh OPEN on Catch, ~10 min on 2 CPU cores
    python scripts/meta_train.py --rule open --envs Breakout-MinAtar --population 32 \\
        --generations 200 --timesteps 1e6 --out runs/open-breakout
    python scripts/meta_train.py --method metagrad --envs Catch-bsuite --pipeline-units 4 \\
        --reset-interval 40 --meta-steps 800 --out runs/o4rl-catch      # Optim4RL, meta-gradients
    python scripts/meta_train.py --method es --pipeline-units 4 --reset-interval 20 \\
        --generations 200 --out runs/o4rl-es                             # ES, fitness from pipeline units
    ... --no-pipeline            # ablation: every unit resets on the same meta-step

Three modes (``meta.meta_train.plan``):
- ``--method es`` without ``--pipeline-units`` (the default): every candidate
  trains population x seeds x envs PPO agents from scratch in one jitted,
  vmapped program (population axis sharded over all devices); fitness is the
  return by ``--fitness-measure`` over a tuned Adam's (Adam's lr tuned over
  ``--adam-lr-grid`` on ``--tune-seeds`` seeds of their own, by the same
  measure, before the first generation; ``references.json``).
- ``--method es --pipeline-units N``: every candidate drives the same N A2C
  units per env for ``--inner-steps`` updates; fitness is the return of the
  episodes that end in that window (``meta/pipeline_es.py``). The units are
  carried across generations (advanced by the ES mean) and reset every
  ``--reset-interval`` generations, staggered.
- ``--method metagrad``: K = ``--inner-steps`` A2C updates per unit with the
  rule, A2C loss on a fresh rollout, gradient through the unroll, clip+Adam
  (``meta/metagrad.py``); units reset every ``--reset-interval`` meta-steps.

Flags that belong to another mode are rejected; defaults that differ by mode
(rule, generations, checkpoint interval, ...) are those of the mode's options
class. Writes to --out: log.jsonl, log.csv, fitness.png (ES) or
objective.png (metagrad), checkpoints/ (resume with --resume; pipeline units
included, so a resumed run continues bit for bit), optimizer/ (the current
ES mean or meta-parameters; use it as ``lopt:DIR/optimizer``), and at the
end summary.md, summary.json and comparison.png (learned optimizer vs Adam at
its tuned lr on the training envs, on evaluation seeds apart from the tuning
seeds: PPO for whole-lifetime ES, by the fitness measure; A2C for the
pipeline modes, by the final return). Whole-lifetime
ES also saves the final comparison's PPO agents trained with the learned
optimizer: DIR/agent for the first env (``metarl-eval DIR`` plays them), and
DIR/agents/ENV/agent for every further env. --wandb PROJECT sends
log.jsonl's rows to Weights & Biases too (the [wandb] extra).

Why the default is Catch with sigma 0.1: a freshly initialised OPEN on
CartPole makes every candidate collapse to the same one-sided policy (all
fitnesses equal to three decimals at sigma 0.03, so ES has no signal), while
on Catch (9-step episodes, learnable in 2e4 steps) candidates differ and the
mean fitness climbs within a few generations.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional, Sequence

from agents.ppo import RETURN_MEASURE_WORDS
from learned_optim import registry
from meta import distributed
from meta.meta_train.plan import (METHODS, LifetimeESOptions as ES, MetaGradOptions as MG, RunOptions,
                                  UnitESOptions as UES, mode_of, mode_options)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The flags as given; a mode's own flags stay None where not set (``options`` fills them in)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a, run = p.add_argument, RunOptions
    a("--method", default="es", help=f"one of {', '.join(METHODS)}")
    a("--rule", default=None,
      help=f"learned rule: {', '.join(registry.rule_names())} (default: {ES.rule}; {UES.rule} with pipeline units)")
    a("--envs", default=run.envs, help="comma-separated env names or suites")
    a("--generations", "--meta-steps", dest="generations", type=int, default=None,
      help=f"outer steps: ES generations or meta-gradient steps (default: {ES.generations} ES, "
           f"{UES.generations} ES on units, {MG.generations} metagrad)")
    a("--seed", type=int, default=run.seed)
    a("--out", default=run.out)
    a("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    a("--checkpoint-every", type=int, default=None,
      help=f"outer steps between checkpoints (default: {ES.checkpoint_every} / {UES.checkpoint_every} / "
           f"{MG.checkpoint_every})")
    a("--final-seeds", type=int, default=run.final_seeds, help="seeds for the final comparison against Adam (0: skip)")
    a("--adam-lr-grid", default=run.adam_lr_grid,
      help="Adam's learning rates, tuned on --tune-seeds seeds apart from the evaluation seeds, for ES's "
           "reference return and the final comparison: absolute values or x-multipliers of the env preset's "
           f"lr, at least 4 (default {run.adam_lr_grid})")
    a("--tune-seeds", type=int, default=run.tune_seeds, help=f"seeds per lr of Adam's tuning (default {run.tune_seeds})")
    a("--recipe", default=None,
      help="a reference's own settings as the defaults (flags given still win): open-paper (OPEN's ES and "
           "PPO, --method es), optim4rl-paper (Optim4RL's pipeline, --method metagrad); see docs/fidelity.md")
    a("--wandb", metavar="PROJECT", default=None,
      help="also log OUT/log.jsonl's rows to this Weights & Biases project (the [wandb] extra)")
    g = p.add_argument_group("ES (--method es)").add_argument
    g("--algorithm", default=None, help=f"any evosax 0.3 algorithm name (default {ES.algorithm})")
    g("--population", type=int, default=None, help=f"(default {ES.population})")
    g("--sigma", type=float, default=None, help=f"(default {ES.sigma})")
    g("--lr", type=float, default=None, help=f"ES (outer) learning rate (default {ES.lr})")
    g("--no-antithetic", action="store_true", default=None)
    g("--reference-returns", default=None,
      help="comma-separated return per env for normalising fitness (default: Adam's, at its lr tuned over "
           "--adam-lr-grid, for whole lifetimes; 1 for pipeline units)")
    g = p.add_argument_group("ES over whole lifetimes (--method es without --pipeline-units)").add_argument
    g("--seeds", type=int, default=None, help=f"PPO seeds per candidate and env (default {ES.seeds})")
    g("--fitness-measure", default=None,
      help=f"what fitness and the final comparison measure: {', '.join(RETURN_MEASURE_WORDS)} "
           f"(default {ES.fitness_measure}: " + RETURN_MEASURE_WORDS[ES.fitness_measure] + ")")
    g("--common-keys", default=None,
      help=f"candidates' PPO keys: none (each its own), all (every candidate the same), pairs (each antithetic "
           f"pair the same) (default {ES.common_keys})")
    g("--timesteps", type=float, default=None, help=f"inner PPO env steps per agent (default {ES.timesteps:g})")
    g("--eval-every", type=int, default=None,
      help="every k generations also train agents with the ES mean and log its return (0: off)")
    g = p.add_argument_group("pipeline units (--method metagrad, or --method es --pipeline-units N)").add_argument
    g("--pipeline-units", type=int, default=None, help=f"training units per env (default {MG.pipeline_units} "
                                                        "for metagrad)")
    g("--reset-interval", type=int, default=None,
      help=f"outer steps between two resets of one unit (default {MG.reset_interval} metagrad, "
           f"{UES.reset_interval} ES)")
    g("--no-pipeline", action="store_true", default=None, help="all units reset together (ablation)")
    g("--inner-steps", type=int, default=None,
      help=f"A2C updates per unit and outer step: K for metagrad ({MG.inner_steps}), the fitness window for ES "
           f"({UES.inner_steps})")
    g("--unit-fitness", default=None,
      help="ES over units: a candidate's score per unit, 'return' (its window return) or 'relative' (minus the "
           "ES mean's on the same unit, over the candidates' spread there: every unit counts alike) "
           f"(default {UES.unit_fitness})")
    g("--agent-lr", type=float, default=None, help=f"agent learning rate given to the rule ({MG.agent_lr:g})")
    g("--gamma", type=float, default=None, help=f"(default {MG.gamma})")
    g("--num-envs", type=int, default=None, help=f"A2C envs per unit (default {MG.num_envs})")
    g("--num-steps", type=int, default=None, help=f"A2C rollout length (default {MG.num_steps})")
    g("--hidden", type=int, default=None, help=f"A2C hidden width, one layer (default {MG.hidden})")
    g("--grad-clip", type=float, default=None,
      help="A2C elementwise gradient clip, 0 = none (default: Optim4RL's 1 on gridworlds, else none)")
    g("--scale-rewards", action="store_true", default=None,
      help="meta-train on gridworlds with Optim4RL's per-grid reward scaling (Gridworld.reward_scale; "
           "logged unit returns are then scaled too); the final comparison uses the raw rewards")
    g("--eval-timesteps", type=float, default=None,
      help="A2C env steps per seed in the final comparison (default: one unit lifetime)")
    g = p.add_argument_group("meta-gradients (--method metagrad)").add_argument
    g("--meta-lr", type=float, default=None, help=f"Adam meta learning rate (default {MG.meta_lr:g})")
    g("--meta-grad-clip", type=float, default=None,
      help=f"global-norm clip of the meta-gradient ({MG.meta_grad_clip})")
    return p.parse_args(argv)


def options(args: argparse.Namespace):
    """``(RunOptions, the mode's options)`` from the parsed flags; a flag of
    another mode or an unknown method -> ``ValueError``."""
    given = vars(args)
    run = RunOptions(**{f.name: given[f.name] for f in dataclasses.fields(RunOptions)})
    return run, mode_options(mode_of(args.method, args.pipeline_units), given)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from runtime.cache import enable_compilation_cache

    enable_compilation_cache()  # persistent compilation cache (METARL_NO_COMPILE_CACHE=1: off)
    from meta.checkpoint import CheckpointError
    from meta.meta_train import build, run
    from meta.tracking import open_sink, require_wandb

    try:
        if args.wandb:
            require_wandb()
        distributed.start_cli()
        plan = build(*options(args))
        sink = open_sink(args.wandb, plan.run.out, "metarl-meta-train", vars(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run(plan, sink=sink)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if sink is not None:
            sink.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
