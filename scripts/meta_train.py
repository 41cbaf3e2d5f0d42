#!/usr/bin/env python
"""Meta-train a learned optimizer with evolution strategies (evosax).

    python scripts/meta_train.py                       # small default: a fresh OPEN on Catch, ~10 min on 2 CPU cores
    python scripts/meta_train.py --rule open --envs Breakout-MinAtar --population 32 \
        --generations 200 --timesteps 1e6 --out runs/open-breakout

Each generation trains population x seeds x envs PPO agents from scratch in
one jitted, vmapped program (population axis sharded over all devices).
Writes to --out: log.jsonl, log.csv, fitness.png, checkpoints/ (resume with
--resume), optimizer/ (the current ES mean; use it as ``lopt:DIR/optimizer``),
and at the end summary.md and comparison.png (learned optimizer vs Adam).

Why the default is Catch with sigma 0.1: a freshly initialised OPEN on
CartPole makes every candidate collapse to the same one-sided policy (all
fitnesses equal to three decimals at sigma 0.03, so ES has no signal), while
on Catch (9-step episodes, learnable in 2e4 steps) candidates differ and the
mean fitness climbs within a few generations.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import envs  # noqa: E402  (safe XLA flags before JAX starts)
from meta import distributed  # noqa: E402

RULES = ("open", "open_large", "optim4rl", "mlp", "gru", "lstm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rule", default="open", help=f"learned rule: {', '.join(RULES)}")
    p.add_argument("--envs", default="Catch-bsuite", help="comma-separated env names or suites")
    p.add_argument("--algorithm", default="Open_ES", help="any evosax 0.3 algorithm name")
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--generations", type=int, default=12)
    p.add_argument("--sigma", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=0.05, help="ES (outer) learning rate")
    p.add_argument("--seeds", type=int, default=2, help="PPO seeds per candidate and env")
    p.add_argument("--timesteps", type=float, default=2e4, help="inner PPO env steps per agent")
    p.add_argument("--reference-returns", default=None,
                   help="comma-separated return per env for normalising fitness (default: measured with Adam)")
    p.add_argument("--no-antithetic", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/meta_train")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--checkpoint-every", type=int, default=2, help="generations between checkpoints")
    p.add_argument("--eval-every", type=int, default=0,
                   help="every k generations also train agents with the ES mean and log its return (0: off)")
    p.add_argument("--final-seeds", type=int, default=4, help="seeds for the final comparison against Adam (0: skip)")
    return p.parse_args(argv)


def make_rule(name):
    """A fresh rule of kind ``name`` with its default sizes."""
    from learned_optim.base import rule_class
    from learned_optim.open import OPEN_LARGE

    return OPEN_LARGE if name == "open_large" else rule_class(name)()


def build(args):
    """Validates everything and returns (ESConfig, rule) before anything compiles."""
    from meta.es import ESConfig

    if args.rule not in RULES:
        raise ValueError(f"unknown rule {args.rule!r}; allowed: {', '.join(RULES)}")
    refs = None
    if args.reference_returns:
        try:
            refs = tuple(float(x) for x in args.reference_returns.split(","))
        except ValueError:
            raise ValueError(f"--reference-returns must be numbers, got {args.reference_returns!r}") from None
    if args.timesteps <= 0:
        raise ValueError(f"--timesteps must be positive, got {args.timesteps:g}")
    config = ESConfig(
        envs=tuple(envs.expand_suites(args.envs)), algorithm=args.algorithm, population=args.population,
        generations=args.generations, sigma=args.sigma, lr=args.lr, seeds=args.seeds,
        timesteps=int(args.timesteps), antithetic=not args.no_antithetic, reference_returns=refs, seed=args.seed,
    )
    rule = make_rule(args.rule)
    if args.resume:
        from meta.checkpoint import latest_step

        if latest_step(os.path.join(args.out, "checkpoints")) is None:
            raise ValueError(f"--resume: no checkpoint found in {os.path.join(args.out, 'checkpoints')!r}")
    return config, rule


def config_document(config, rule_name):
    d = dataclasses.asdict(config)
    d["rule"] = rule_name
    d.pop("generations")  # a resumed run may ask for more generations
    return json.loads(json.dumps(d))


def measure_references(config, log):
    from agents.experiment import resolve_config, train_seeds

    refs = []
    for name in config.envs:
        cfg, hp = resolve_config(name, total_timesteps=config.timesteps)
        res = train_seeds(name, "adam", cfg, hp, config.seeds, seed=config.seed + 10_000, log=None)
        refs.append(res["final_return_mean"])
        log(f"reference return of Adam on {name}: {refs[-1]:.2f} ({config.seeds} seeds, {config.timesteps:,d} steps)")
    return refs


LOG_FIELDS = ["generation", "fitness_mean", "fitness_max", "fitness_min", "nan_count", "sigma", "seconds",
              "env_steps_per_second", "mean_candidate_return", "es_mean_return"]


def write_logs(out, rows):
    from meta.report import write_json  # noqa: F401

    with open(os.path.join(out, "log.jsonl.tmp"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(os.path.join(out, "log.jsonl.tmp"), os.path.join(out, "log.jsonl"))
    with open(os.path.join(out, "log.csv.tmp"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    os.replace(os.path.join(out, "log.csv.tmp"), os.path.join(out, "log.csv"))


def plot_fitness(out, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = [r["generation"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(g, [r["fitness_mean"] for r in rows], label="population mean")
    ax.fill_between(g, [r["fitness_min"] for r in rows], [r["fitness_max"] for r in rows], alpha=0.2,
                    label="population min-max")
    ev = [(r["generation"], r["es_mean_fitness"]) for r in rows if r.get("es_mean_fitness") is not None]
    if ev:
        ax.plot(*zip(*ev), "o-", label="ES mean (evaluated)")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (return / reference)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "fitness.png"), dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    distributed.maybe_initialize()
    try:
        config, rule = build(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import jax
    import numpy as np
    from tqdm import tqdm

    import learned_optim
    from meta import checkpoint
    from meta.es import ESTrainer, env_steps_per_generation

    out = args.out
    os.makedirs(out, exist_ok=True)
    ckpt_dir = os.path.join(out, "checkpoints")
    say = lambda s: tqdm.write(s) if sys.stderr.isatty() else print(s, flush=True)  # noqa: E731
    doc_config = config_document(config, args.rule)

    rows, start = [], 0
    if args.resume:
        with open(os.path.join(out, "references.json")) as f:
            refs = json.load(f)["reference_returns"]
    else:
        refs = list(config.reference_returns) if config.reference_returns else measure_references(config, say)
        with open(os.path.join(out, "references.json"), "w") as f:
            json.dump({"envs": list(config.envs), "reference_returns": refs}, f, indent=2)

    trainer = ESTrainer(config, rule, refs)
    run = trainer.init()
    if args.resume:
        try:
            step, run, document = checkpoint.restore(ckpt_dir, run, doc_config)
            run = trainer.place(run)
        except checkpoint.CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        rows = document["logs"][:step]
        start = step
        say(f"resumed from generation {step} in {ckpt_dir}")

    steps_per_gen = env_steps_per_generation(config)
    say(
        f"ES ({config.algorithm}) over {args.rule}: population {config.population} x {config.seeds} seeds x "
        f"{len(config.envs)} env(s) {list(config.envs)}, {config.timesteps:,d} steps per agent "
        f"({steps_per_gen:,d} env steps per generation), {jax.device_count()} device(s); output in {out}"
    )
    evaluate_mean = jax.jit(trainer.evaluate)
    bar = tqdm(total=config.generations, initial=start, desc="generations", file=sys.stderr,
               disable=not sys.stderr.isatty())
    for gen in range(start, config.generations):
        t0 = time.perf_counter()
        run, m = trainer.generation_step(run)
        m = jax.device_get(m)
        seconds = time.perf_counter() - t0
        fit = np.asarray(m["fitness"], np.float64)
        ok = fit[fit > -1e5]
        row = dict(
            generation=gen + 1,
            fitness_mean=float(ok.mean()) if ok.size else float("nan"),
            fitness_max=float(fit.max()),
            fitness_min=float(ok.min()) if ok.size else float("nan"),
            nan_count=int(m["nan_count"]),
            sigma=float(getattr(run.es_state, "std", np.nan)) if np.ndim(getattr(run.es_state, "std", 0)) == 0
            else float(np.mean(run.es_state.std)),
            seconds=seconds,
            env_steps_per_second=steps_per_gen / seconds,
            mean_candidate_return=[float(x) for x in np.nanmean(m["returns"], axis=0)],
            es_mean_return=None,
            es_mean_fitness=None,
        )
        if args.eval_every and (gen + 1) % args.eval_every == 0:
            r = np.asarray(evaluate_mean(trainer.mean_meta_params(run), jax.random.key(gen)))
            row["es_mean_return"] = [float(x) for x in r.mean(-1)]
            row["es_mean_fitness"] = float(np.mean(r.mean(-1) / np.maximum(np.abs(refs), 1e-6)))
        rows.append(row)
        bar.update(1)
        bar.set_postfix(best=f"{row['fitness_max']:.3f}", mean=f"{row['fitness_mean']:.3f}")
        say(
            f"gen {gen + 1:4d}/{config.generations}  fitness mean {row['fitness_mean']:.3f}  max "
            f"{row['fitness_max']:.3f}  min {row['fitness_min']:.3f}  NaN {row['nan_count']}  "
            f"{seconds:.1f}s  {row['env_steps_per_second']:,.0f} env steps/s"
            + (f"  ES-mean fitness {row['es_mean_fitness']:.3f}" if row["es_mean_fitness"] is not None else "")
        )
        write_logs(out, rows)
        last = gen + 1 == config.generations
        if (gen + 1) % args.checkpoint_every == 0 or last:
            checkpoint.save(ckpt_dir, gen + 1, run, {"config": doc_config, "logs": rows})
            learned_optim.save(os.path.join(out, "optimizer"), rule,
                               jax.device_get(trainer.mean_meta_params(run)), overwrite=True)
            plot_fitness(out, rows)
    bar.close()
    if start >= config.generations:
        say(f"nothing to do: the checkpoint is already at generation {start}")
    if args.final_seeds > 0:
        compare_with_adam(out, config, args.final_seeds, say)
    return 0


def compare_with_adam(out, config, seeds, say):
    """Learned optimizer (ES mean) vs Adam on the training envs, same seeds."""
    import numpy as np

    from agents.experiment import resolve_config, train_seeds
    from meta.report import plot_curves

    lines = ["| env | optimizer | final return (mean ± s.e.) | per seed |", "|---|---|---|---|"]
    curves = {}
    spec_lopt = "lopt:" + os.path.join(out, "optimizer")
    for name in config.envs:
        cfg, hp = resolve_config(name, total_timesteps=config.timesteps)
        for spec in ("adam", spec_lopt):
            res = train_seeds(name, spec, cfg, hp, seeds, seed=config.seed + 20_000, log=None)
            fr = np.asarray(res["final_return"])
            label = "learned (ES mean)" if spec.startswith("lopt:") else "adam"
            lines.append(f"| {name} | {label} | {fr.mean():.2f} ± {fr.std(ddof=1) / np.sqrt(len(fr)) if len(fr) > 1 else 0:.2f} "
                         f"| {', '.join(f'{x:.1f}' for x in fr)} |")
            curves[f"{name}: {label}"] = (res["steps"], res["curves"])
            say(f"final comparison on {name}: {label} {fr.mean():.2f}")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(f"# Learned optimizer vs Adam\n\n{seeds} seeds, {config.timesteps:,d} env steps per agent, "
                f"the settings used in meta-training.\n\n" + "\n".join(lines) + "\n")
    plot_curves(os.path.join(out, "comparison.png"), curves, title="learned optimizer vs Adam")


if __name__ == "__main__":
    sys.exit(main())
