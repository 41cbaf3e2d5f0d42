#!/usr/bin/env python
"""Meta-train a learned optimizer: ES over whole lifetimes, ES over pipeline
units, or pipeline meta-gradients (Optim4RL style).

    python scripts/meta_train.py                       # small default: a fresh OPEN on Catch, ~10 min on 2 CPU cores
    python scripts/meta_train.py --rule open --envs Breakout-MinAtar --population 32 \
        --generations 200 --timesteps 1e6 --out runs/open-breakout
    python scripts/meta_train.py --method metagrad --envs Catch-bsuite --pipeline-units 4 \
        --reset-interval 40 --meta-steps 800 --out runs/o4rl-catch      # Optim4RL, meta-gradients
    python scripts/meta_train.py --method es --pipeline-units 4 --reset-interval 20 \
        --generations 200 --out runs/o4rl-es                             # ES, fitness from pipeline units
    ... --no-pipeline            # ablation: every unit resets on the same meta-step

Three modes:
- ``--method es`` without ``--pipeline-units`` (the default): every candidate
  trains population x seeds x envs PPO agents from scratch in one jitted,
  vmapped program (population axis sharded over all devices); fitness is the
  final return over the reference return.
- ``--method es --pipeline-units N``: every candidate drives the same N A2C
  units per env for ``--inner-steps`` updates; fitness is the return of the
  episodes that end in that window (``meta/pipeline_es.py``). The units are
  carried across generations (advanced by the ES mean) and reset every
  ``--reset-interval`` generations, staggered.
- ``--method metagrad``: K = ``--inner-steps`` A2C updates per unit with the
  rule, A2C loss on a fresh rollout, gradient through the unroll, clip+Adam
  (``meta/metagrad.py``); units reset every ``--reset-interval`` meta-steps.

Flags that belong to another mode are rejected. Defaults that differ by mode
(rule, generations, checkpoint interval, ...) are listed in MODE_DEFAULTS.
Writes to --out: log.jsonl, log.csv, fitness.png (ES) or objective.png
(metagrad), checkpoints/ (resume with --resume; pipeline units included, so
a resumed run continues bit for bit), optimizer/ (the current ES mean or
meta-parameters; use it as ``lopt:DIR/optimizer``), and at the end
summary.md and comparison.png (learned optimizer vs Adam on the training
envs: PPO for whole-lifetime ES, A2C for the pipeline modes).

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
from typing import Any, Callable, Dict, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import envs  # noqa: E402  (safe XLA flags before JAX starts)
from meta import distributed  # noqa: E402

RULES = ("open", "open_large", "optim4rl", "mlp", "gru", "lstm")
METHODS = ("es", "metagrad")

_PIPELINE = dict(rule="optim4rl", pipeline_units=4, no_pipeline=False, agent_lr=3e-3, gamma=0.99, num_envs=8,
                 num_steps=10, hidden=32, eval_timesteps=None, scale_rewards=False)
_ES = dict(algorithm="Open_ES", population=8, sigma=0.1, lr=0.05, no_antithetic=False, reference_returns=None)
# Per mode: every flag it accepts and its default there (None where the value is derived).
MODE_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "es": dict(_ES, rule="open", generations=12, checkpoint_every=2, seeds=2, timesteps=2e4, eval_every=0),
    "es-pipeline": dict(_ES, **_PIPELINE, generations=100, checkpoint_every=10, reset_interval=20, inner_steps=8),
    "metagrad": dict(_PIPELINE, generations=300, checkpoint_every=100, reset_interval=40, inner_steps=4,
                     meta_lr=3e-3, meta_grad_clip=1.0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--method", default="es", help=f"one of {', '.join(METHODS)}")
    a("--rule", default=None, help=f"learned rule: {', '.join(RULES)} (default: open; optim4rl with pipeline units)")
    a("--envs", default="Catch-bsuite", help="comma-separated env names or suites")
    a("--generations", "--meta-steps", dest="generations", type=int, default=None,
      help="outer steps: ES generations or meta-gradient steps (default: 12 ES, 100 ES on units, 300 metagrad)")
    a("--seed", type=int, default=0)
    a("--out", default="runs/meta_train")
    a("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    a("--checkpoint-every", type=int, default=None, help="outer steps between checkpoints (default: 2 / 10 / 100)")
    a("--final-seeds", type=int, default=4, help="seeds for the final comparison against Adam (0: skip)")
    g = p.add_argument_group("ES (--method es)")
    g.add_argument("--algorithm", default=None, help="any evosax 0.3 algorithm name (default Open_ES)")
    g.add_argument("--population", type=int, default=None, help="(default 8)")
    g.add_argument("--sigma", type=float, default=None, help="(default 0.1)")
    g.add_argument("--lr", type=float, default=None, help="ES (outer) learning rate (default 0.05)")
    g.add_argument("--no-antithetic", action="store_true", default=None)
    g.add_argument("--reference-returns", default=None,
                   help="comma-separated return per env for normalising fitness (default: measured with Adam "
                        "for whole lifetimes, 1 for pipeline units)")
    g = p.add_argument_group("ES over whole lifetimes (--method es without --pipeline-units)")
    g.add_argument("--seeds", type=int, default=None, help="PPO seeds per candidate and env (default 2)")
    g.add_argument("--timesteps", type=float, default=None, help="inner PPO env steps per agent (default 2e4)")
    g.add_argument("--eval-every", type=int, default=None,
                   help="every k generations also train agents with the ES mean and log its return (0: off)")
    g = p.add_argument_group("pipeline units (--method metagrad, or --method es --pipeline-units N)")
    g.add_argument("--pipeline-units", type=int, default=None, help="training units per env (default 4 for metagrad)")
    g.add_argument("--reset-interval", type=int, default=None,
                   help="outer steps between two resets of one unit (default 40 metagrad, 20 ES)")
    g.add_argument("--no-pipeline", action="store_true", default=None, help="all units reset together (ablation)")
    g.add_argument("--inner-steps", type=int, default=None,
                   help="A2C updates per unit and outer step: K for metagrad (4), the fitness window for ES (8)")
    g.add_argument("--agent-lr", type=float, default=None, help="agent learning rate given to the rule (3e-3)")
    g.add_argument("--gamma", type=float, default=None, help="(default 0.99)")
    g.add_argument("--num-envs", type=int, default=None, help="A2C envs per unit (default 8)")
    g.add_argument("--num-steps", type=int, default=None, help="A2C rollout length (default 10)")
    g.add_argument("--hidden", type=int, default=None, help="A2C hidden width, one layer (default 32)")
    g.add_argument("--scale-rewards", action="store_true", default=None,
                   help="meta-train on gridworlds with Optim4RL's per-grid reward scaling (Gridworld.reward_scale; "
                        "logged unit returns are then scaled too); the final comparison uses the raw rewards")
    g.add_argument("--eval-timesteps", type=float, default=None,
                   help="A2C env steps per seed in the final comparison (default: one unit lifetime)")
    g = p.add_argument_group("meta-gradients (--method metagrad)")
    g.add_argument("--meta-lr", type=float, default=None, help="Adam meta learning rate (default 3e-3)")
    g.add_argument("--meta-grad-clip", type=float, default=None, help="global-norm clip of the meta-gradient (1.0)")
    return p.parse_args(argv)


def resolve_mode(args) -> str:
    """Checks --method and mode-specific flags, fills in the mode's defaults
    (in place) and returns the mode: "es", "es-pipeline" or "metagrad"."""
    if args.method not in METHODS:
        raise ValueError(f"--method {args.method!r}; allowed: {', '.join(METHODS)}")
    if args.method == "metagrad":
        mode = "metagrad"
    else:
        mode = "es" if args.pipeline_units is None else "es-pipeline"
    defaults = MODE_DEFAULTS[mode]
    every = set().union(*MODE_DEFAULTS.values())
    for name in sorted(every - set(defaults)):
        if getattr(args, name) is not None:
            where = [m for m in MODE_DEFAULTS if name in MODE_DEFAULTS[m]]
            raise ValueError(f"--{name.replace('_', '-')} does not apply to {mode_label(mode)}; "
                             f"it belongs to {' / '.join(mode_label(m) for m in where)}")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return mode


def mode_label(mode):
    return {"es": "ES over whole lifetimes", "es-pipeline": "ES over pipeline units (--pipeline-units)",
            "metagrad": "--method metagrad"}[mode]


def make_rule(name):
    """A fresh rule of kind ``name`` with its default sizes."""
    from learned_optim.base import rule_class
    from learned_optim.open import OPEN_LARGE

    return OPEN_LARGE if name == "open_large" else rule_class(name)()


class Plan(NamedTuple):
    """Everything a run needs, validated before anything compiles."""

    mode: str
    rule: Any
    envs: tuple  # env names, suites expanded
    es: Any = None  # meta.es.ESConfig (ES modes)
    pipeline_es: Any = None  # meta.pipeline_es.PipelineESConfig
    metagrad: Any = None  # meta.metagrad.MetaGradConfig
    a2c: Any = None  # agents.a2c.A2CConfig of the units (total_timesteps = one unit lifetime)
    hparams: Any = None  # agents.a2c.A2CHParams
    env_overrides: Any = None  # env name -> envs.make overrides for meta-training (pipeline modes)


def build(args) -> Plan:
    """Validates everything and returns the run's Plan before anything compiles."""
    mode = resolve_mode(args)
    if args.rule not in RULES:
        raise ValueError(f"unknown rule {args.rule!r}; allowed: {', '.join(RULES)}")
    for name in ("generations", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.final_seeds < 0:
        raise ValueError(f"--final-seeds must be >= 0, got {args.final_seeds}")
    names = tuple(envs.expand_suites(args.envs))
    plan = dict(mode=mode, rule=make_rule(args.rule), envs=names)
    if mode in ("es", "es-pipeline"):
        plan["es"] = es_config(args, names, mode)
    if mode in ("es-pipeline", "metagrad"):
        plan.update(pipeline_plan(args, mode))
    if args.resume:
        from meta.checkpoint import latest_step

        if latest_step(os.path.join(args.out, "checkpoints")) is None:
            raise ValueError(f"--resume: no checkpoint found in {os.path.join(args.out, 'checkpoints')!r}")
    return Plan(**plan)


def es_config(args, names, mode):
    from meta.es import ESConfig

    refs = None
    if args.reference_returns:
        try:
            refs = tuple(float(x) for x in args.reference_returns.split(","))
        except ValueError:
            raise ValueError(f"--reference-returns must be numbers, got {args.reference_returns!r}") from None
    extra = {}
    if mode == "es":
        if args.timesteps <= 0:
            raise ValueError(f"--timesteps must be positive, got {args.timesteps:g}")
        extra = dict(seeds=args.seeds, timesteps=int(args.timesteps))
    return ESConfig(envs=names, algorithm=args.algorithm, population=args.population, generations=args.generations,
                    sigma=args.sigma, lr=args.lr, antithetic=not args.no_antithetic, reference_returns=refs,
                    seed=args.seed, **extra)


def pipeline_plan(args, mode):
    from agents.a2c import A2CConfig, A2CHParams
    from meta.metagrad import MetaGradConfig
    from meta.pipeline import PipelineConfig
    from meta.pipeline_es import PipelineESConfig
    from meta.units import lifetime_env_steps

    for name in ("pipeline_units", "reset_interval", "inner_steps", "num_envs", "num_steps", "hidden"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("agent_lr", "meta_lr", "meta_grad_clip"):
        if getattr(args, name, None) is not None and not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.eval_timesteps is not None and args.eval_timesteps < args.num_envs * args.num_steps:
        raise ValueError(f"--eval-timesteps must be at least one A2C update ({args.num_envs * args.num_steps} "
                         f"steps), got {args.eval_timesteps:g}")
    pipe = PipelineConfig(num_units=args.pipeline_units, reset_interval=args.reset_interval,
                          staggered=not args.no_pipeline)
    # One rollout per inner update, plus metagrad's fresh rollout for the meta-objective.
    rollouts = args.inner_steps + (mode == "metagrad")
    a2c = A2CConfig(num_envs=args.num_envs, num_steps=args.num_steps, hidden_sizes=(args.hidden,))
    a2c = dataclasses.replace(a2c, total_timesteps=lifetime_env_steps(args.reset_interval, rollouts, a2c))
    out = dict(a2c=a2c, hparams=A2CHParams.default(lr=args.agent_lr, gamma=args.gamma),
               env_overrides=env_overrides(args, envs.expand_suites(args.envs)))
    if mode == "metagrad":
        out["metagrad"] = MetaGradConfig(num_inner=args.inner_steps, meta_lr=args.meta_lr,
                                         meta_grad_clip=args.meta_grad_clip, pipeline=pipe)
    else:
        out["pipeline_es"] = PipelineESConfig(pipeline=pipe, window=args.inner_steps)
    return out


def env_overrides(args, names) -> Dict[str, Dict[str, Any]]:
    """``envs.make`` overrides per env for meta-training: ``--scale-rewards``
    turns on the reward scaling of every gridworld among ``names``."""
    if not args.scale_rewards:
        return {}
    grids = [n for n in names if n in envs.GRIDWORLD_ENVS]
    if not grids:
        raise ValueError(f"--scale-rewards applies to gridworld envs ({', '.join(envs.GRIDWORLD_ENVS)}); "
                         f"none among {', '.join(names)}")
    return {n: dict(scale_rewards=True) for n in grids}


def config_document(config, rule_name):
    d = dataclasses.asdict(config)
    d["rule"] = rule_name
    d.pop("generations")  # a resumed run may ask for more generations
    return json.loads(json.dumps(d))


def plan_document(plan: Plan, args) -> Dict[str, Any]:
    """The settings a checkpoint must match to be resumed (not the number of
    outer steps, the output or the final comparison)."""
    if plan.mode == "es":
        return config_document(plan.es, args.rule)  # unchanged, so older checkpoints still resume
    d = dict(method=plan.mode, rule=args.rule, envs=list(plan.envs), a2c=dataclasses.asdict(plan.a2c),
             hparams={k: float(v) for k, v in plan.hparams._asdict().items()})
    if plan.env_overrides:  # only when set, so checkpoints of earlier runs still resume
        d["env_overrides"] = plan.env_overrides
    if plan.mode == "metagrad":
        d["metagrad"] = dataclasses.asdict(plan.metagrad)
    else:
        es = config_document(plan.es, args.rule)
        for unused in ("seeds", "timesteps"):
            es.pop(unused)
        d.update(es=es, pipeline_es=dataclasses.asdict(plan.pipeline_es))
    return json.loads(json.dumps(d))


def measure_references(config, log):
    from meta.experiment import resolve_config, train_seeds

    refs = []
    for name in config.envs:
        cfg, hp = resolve_config(name, total_timesteps=config.timesteps)
        res = train_seeds(name, "adam", cfg, hp, config.seeds, seed=config.seed + 10_000, log=None)
        refs.append(res["final_return_mean"])
        log(f"reference return of Adam on {name}: {refs[-1]:.2f} ({config.seeds} seeds, {config.timesteps:,d} steps)")
    return refs


LOG_FIELDS = ["generation", "fitness_mean", "fitness_max", "fitness_min", "nan_count", "sigma", "seconds",
              "env_steps_per_second", "mean_candidate_return", "es_mean_return"]
METAGRAD_FIELDS = ["meta_step", "meta_loss", "unit_return", "grad_norm", "seconds", "env_steps_per_second"]


def write_logs(out, rows, fields=LOG_FIELDS):
    with open(os.path.join(out, "log.jsonl.tmp"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(os.path.join(out, "log.jsonl.tmp"), os.path.join(out, "log.jsonl"))
    with open(os.path.join(out, "log.csv.tmp"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
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
        ax.plot(*zip(*ev), "o-" if len(ev) < 30 else "-", label="ES mean (evaluated)")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (return / reference)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "fitness.png"), dpi=120)
    plt.close(fig)


def plot_objective(out, rows):
    import numpy as np

    from meta.report import plot_curves

    x = np.array([r["meta_step"] for r in rows])
    plot_curves(os.path.join(out, "objective.png"),
                {"unit return": (x, np.array([[r["unit_return"] for r in rows]])),
                 "meta loss": (x, np.array([[r["meta_loss"] for r in rows]]))},
                title="pipeline meta-gradient", xlabel="meta-step", ylabel="value")


class Driver(NamedTuple):
    """What the host loop needs from one mode."""

    init: Callable  # () -> state
    step: Callable  # state -> (state, metrics), jitted
    place: Callable  # restored state -> state placed as the step expects
    meta_params: Callable  # state -> meta-parameters handed out as the optimizer
    row: Callable  # (outer step, metrics, seconds) -> log row
    line: Callable  # row -> progress line
    plot: Callable  # (out, rows) -> None
    fields: list  # log.csv columns
    describe: str


def es_driver(plan: Plan, refs, args) -> Driver:
    import jax
    import numpy as np

    if plan.mode == "es":
        from meta.es import ESTrainer, env_steps_per_generation

        trainer = ESTrainer(plan.es, plan.rule, refs)
        steps_per_gen = env_steps_per_generation(plan.es)
        what = (f"{plan.es.seeds} seeds x {len(plan.es.envs)} env(s) {list(plan.es.envs)}, "
                f"{plan.es.timesteps:,d} steps per agent")
        evaluate_mean = jax.jit(trainer.evaluate)
    else:
        from meta.pipeline_es import PipelineESTrainer

        trainer = PipelineESTrainer(plan.es, plan.rule, plan.pipeline_es, plan.a2c, plan.hparams, refs,
                                    env_overrides=plan.env_overrides)
        steps_per_gen = trainer.env_steps_per_generation()
        pc = plan.pipeline_es.pipeline
        what = (f"{pc.num_units} pipeline units x {len(plan.es.envs)} env(s) {list(plan.es.envs)}, "
                f"window {plan.pipeline_es.window} A2C updates, reset every {pc.reset_interval} generations "
                f"({'staggered' if pc.staggered else 'all together'})")
    ref_scale = np.maximum(np.abs(np.asarray(refs, np.float64)), 1e-6)

    def row(gen, m, seconds):
        fit = np.asarray(m["fitness"], np.float64)
        ok = fit[fit > -1e5]
        r = dict(generation=gen + 1, fitness_mean=float(ok.mean()) if ok.size else float("nan"),
                 fitness_max=float(fit.max()), fitness_min=float(ok.min()) if ok.size else float("nan"),
                 nan_count=int(m["nan_count"]), sigma=float(np.mean(m["sigma"])), seconds=seconds,
                 env_steps_per_second=steps_per_gen / seconds,
                 mean_candidate_return=[float(x) for x in np.nanmean(m["returns"], axis=0)],
                 es_mean_return=None, es_mean_fitness=None)
        if "es_mean_return" in m:  # pipeline units: the mean's own window, free
            r["es_mean_return"] = [float(x) for x in m["es_mean_return"]]
        elif args.eval_every and (gen + 1) % args.eval_every == 0:
            r["es_mean_return"] = [float(x) for x in np.asarray(m["es_mean_eval"]).mean(-1)]
        if r["es_mean_return"] is not None:
            r["es_mean_fitness"] = float(np.mean(np.asarray(r["es_mean_return"]) / ref_scale))
        return r

    step_jit = trainer.generation_step

    def step(run):
        run, m = step_jit(run)
        m = dict(jax.device_get(m), sigma=jax.device_get(getattr(run.es_state, "std", np.nan)))
        gen = int(run.generation)
        if plan.mode == "es" and args.eval_every and gen % args.eval_every == 0:
            m["es_mean_eval"] = jax.device_get(evaluate_mean(trainer.mean_meta_params(run), jax.random.key(gen - 1)))
        return run, m

    def line(r):
        return (f"gen {r['generation']:4d}/{args.generations}  fitness mean {r['fitness_mean']:.3f}  max "
                f"{r['fitness_max']:.3f}  min {r['fitness_min']:.3f}  NaN {r['nan_count']}  "
                f"{r['seconds']:.1f}s  {r['env_steps_per_second']:,.0f} env steps/s"
                + (f"  ES-mean fitness {r['es_mean_fitness']:.3f}" if r["es_mean_fitness"] is not None else ""))

    describe = (f"ES ({plan.es.algorithm}) over {args.rule}: population {plan.es.population} x {what} "
                f"({steps_per_gen:,d} env steps per generation), {jax.device_count()} device(s); output in {args.out}")
    return Driver(trainer.init, step, trainer.place, trainer.mean_meta_params, row, line, plot_fitness, LOG_FIELDS,
                  describe)


def metagrad_driver(plan: Plan, args) -> Driver:
    import jax
    import numpy as np

    from meta.metagrad import make_metagrad

    cfg = plan.metagrad
    trainer = make_metagrad(cfg, plan.rule, [envs.make(n, **plan.env_overrides.get(n, {})) for n in plan.envs],
                            plan.a2c, plan.hparams)
    n_env = len(plan.envs)
    steps = n_env * cfg.pipeline.num_units * (cfg.num_inner + 1) * plan.a2c.batch_size
    step_jit = jax.jit(trainer.step)

    def step(state):
        state, m = step_jit(state)
        return state, jax.device_get(m)

    def row(i, m, seconds):
        return dict(meta_step=i + 1, meta_loss=float(m["meta_loss"]), unit_return=float(np.mean(m["unit_returns"])),
                    grad_norm=float(m["grad_norm"]), seconds=seconds, env_steps_per_second=steps / seconds)

    def line(r):
        return (f"meta-step {r['meta_step']:5d}/{args.generations}  loss {r['meta_loss']:.4f}  unit return "
                f"{r['unit_return']:.3f}  grad norm {r['grad_norm']:.3g}  {r['env_steps_per_second']:,.0f} env steps/s")

    pc = cfg.pipeline
    describe = (f"meta-gradients over {args.rule}: {pc.num_units} units x {n_env} env(s) {list(plan.envs)}, "
                f"K={cfg.num_inner}, reset every {pc.reset_interval} meta-steps "
                f"({'staggered' if pc.staggered else 'all together'}), {steps:,d} env steps per meta-step; "
                f"output in {args.out}")
    return Driver(lambda: trainer.init(jax.random.key(args.seed)), step, lambda s: s, lambda s: s.meta_params,
                  row, line, plot_objective, METAGRAD_FIELDS, describe)


def main(argv=None) -> int:
    args = parse_args(argv)
    distributed.maybe_initialize()
    try:
        plan = build(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import jax
    from tqdm import tqdm

    import learned_optim
    from meta import checkpoint

    out = args.out
    os.makedirs(out, exist_ok=True)
    ckpt_dir = os.path.join(out, "checkpoints")
    say = lambda s: tqdm.write(s) if sys.stderr.isatty() else print(s, flush=True)  # noqa: E731
    doc_config = plan_document(plan, args)

    if plan.mode == "metagrad":
        driver = metagrad_driver(plan, args)
    else:
        if args.resume:
            with open(os.path.join(out, "references.json")) as f:
                refs = json.load(f)["reference_returns"]
        else:
            if plan.es.reference_returns:
                refs = list(plan.es.reference_returns)
            elif plan.mode == "es":
                refs = measure_references(plan.es, say)
            else:
                refs = [1.0] * len(plan.es.envs)
            with open(os.path.join(out, "references.json"), "w") as f:
                json.dump({"envs": list(plan.es.envs), "reference_returns": refs}, f, indent=2)
        driver = es_driver(plan, refs, args)

    state = driver.init()
    rows, start = [], 0
    if args.resume:
        try:
            start, state, document = checkpoint.restore(ckpt_dir, state, doc_config)
        except checkpoint.CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        state = driver.place(state)
        rows = document["logs"][:start]
        say(f"resumed from generation {start} in {ckpt_dir}")

    say(driver.describe)
    bar = tqdm(total=args.generations, initial=start, desc="outer steps", file=sys.stderr,
               disable=not sys.stderr.isatty())
    for gen in range(start, args.generations):
        t0 = time.perf_counter()
        state, m = driver.step(state)
        row = driver.row(gen, m, time.perf_counter() - t0)
        rows.append(row)
        bar.update(1)
        last = gen + 1 == args.generations
        if plan.mode != "metagrad" or (gen + 1) % 20 == 0 or last:
            say(driver.line(row))
        if (gen + 1) % args.checkpoint_every == 0 or last:
            write_logs(out, rows, driver.fields)
            checkpoint.save(ckpt_dir, gen + 1, state, {"config": doc_config, "logs": rows})
            learned_optim.save(os.path.join(out, "optimizer"), plan.rule,
                               jax.device_get(driver.meta_params(state)), overwrite=True)
            driver.plot(out, rows)
        elif plan.mode != "metagrad":
            write_logs(out, rows, driver.fields)
    bar.close()
    if start >= args.generations:
        say(f"nothing to do: the checkpoint is already at generation {start}")
    if args.final_seeds > 0:
        if plan.mode == "es":
            compare_with_adam(out, plan.es, args.final_seeds, say)
        else:
            compare_a2c_with_adam(out, plan, args, say)
    return 0


def _summary_row(name, label, fr):
    import numpy as np

    se = fr.std(ddof=1) / np.sqrt(len(fr)) if len(fr) > 1 else 0
    return f"| {name} | {label} | {fr.mean():.2f} ± {se:.2f} | {', '.join(f'{x:.2f}' for x in fr)} |"


SUMMARY_HEADER = ["| env | optimizer | final return (mean ± s.e.) | per seed |", "|---|---|---|---|"]


def compare_with_adam(out, config, seeds, say):
    """Learned optimizer (ES mean) vs Adam on the training envs, same seeds."""
    import numpy as np

    from meta.experiment import resolve_config, train_seeds
    from meta.report import plot_curves

    lines = list(SUMMARY_HEADER)
    curves = {}
    spec_lopt = "lopt:" + os.path.join(out, "optimizer")
    for name in config.envs:
        cfg, hp = resolve_config(name, total_timesteps=config.timesteps)
        for spec in ("adam", spec_lopt):
            res = train_seeds(name, spec, cfg, hp, seeds, seed=config.seed + 20_000, log=None)
            fr = np.asarray(res["final_return"])
            label = "learned (ES mean)" if spec.startswith("lopt:") else "adam"
            lines.append(_summary_row(name, label, fr))
            curves[f"{name}: {label}"] = (res["steps"], res["curves"])
            say(f"final comparison on {name}: {label} {fr.mean():.2f}")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(f"# Learned optimizer vs Adam\n\n{seeds} seeds, {config.timesteps:,d} env steps per agent, "
                f"the settings used in meta-training.\n\n" + "\n".join(lines) + "\n")
    plot_curves(os.path.join(out, "comparison.png"), curves, title="learned optimizer vs Adam")


def compare_a2c_with_adam(out, plan: Plan, args, say):
    """Fresh A2C agents with the learned optimizer and with Adam (the same
    agent learning rate, not tuned for Adam), same seeds, on the training envs."""
    import numpy as np

    from meta.report import plot_curves
    from meta.units import train_a2c_seeds

    a2c = plan.a2c
    if args.eval_timesteps is not None:
        a2c = dataclasses.replace(a2c, total_timesteps=int(args.eval_timesteps))
    steps = a2c.num_updates * a2c.batch_size
    lines = list(SUMMARY_HEADER)
    curves = {}
    learned = "learned" if plan.mode == "metagrad" else "learned (ES mean)"
    for name in plan.envs:
        for spec, label in (("adam", "adam"), ("lopt:" + os.path.join(out, "optimizer"), learned)):
            res = train_a2c_seeds(name, spec, a2c, plan.hparams, args.final_seeds, seed=args.seed + 20_000)
            fr = np.asarray(res["final_return"])
            lines.append(_summary_row(name, label, fr))
            curves[f"{name}: {label}"] = (res["steps"], res["curves"])
            say(f"final comparison on {name}: {label} {fr.mean():.2f}")
    pc = plan.metagrad.pipeline if plan.mode == "metagrad" else plan.pipeline_es.pipeline
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(f"# Learned optimizer vs Adam (A2C)\n\n{mode_label(plan.mode)}, rule {args.rule}, "
                f"{pc.num_units} units, reset interval {pc.reset_interval}, pipeline "
                f"{'on (staggered)' if pc.staggered else 'off (all units reset together)'}, "
                f"{args.generations} outer steps.\n\nA2C ({a2c.num_envs} envs x {a2c.num_steps} steps, hidden "
                f"{a2c.hidden_sizes}), {args.final_seeds} seeds, {steps:,d} env steps per agent, agent lr "
                f"{float(plan.hparams.lr):g} for both"
                + (", meta-trained with scaled rewards, compared on the raw rewards" if plan.env_overrides else "")
                + ".\n\n" + "\n".join(lines) + "\n")
    plot_curves(os.path.join(out, "comparison.png"), curves, title="learned optimizer vs Adam (A2C)")


if __name__ == "__main__":
    sys.exit(main())
