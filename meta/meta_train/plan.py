"""What a meta-training run is: its mode, the mode's options, and the Plan
(validated configs of the pieces) built from them before anything compiles.

Three modes, each with its own options class (the defaults differ by mode):

- ``LifetimeESOptions`` (``--method es``): every candidate trains
  population x seeds x envs PPO agents from scratch; fitness is the final
  return over the reference return (``meta.es.lifetime_evaluation``).
- ``UnitESOptions`` (``--method es --pipeline-units N``): every candidate
  drives the same N A2C units per env for ``inner_steps`` updates; fitness is
  the return of the episodes that end in that window
  (``meta.pipeline_es.unit_evaluation``).
- ``MetaGradOptions`` (``--method metagrad``): K = ``inner_steps`` A2C updates
  per unit with the rule, the gradient of the A2C loss on a fresh rollout
  through the unroll (``meta.metagrad``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar, Dict, NamedTuple, Optional, Union

import envs
from learned_optim import registry

METHODS = ("es", "metagrad")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Settings of every mode: where, which envs, which seed, the final comparison."""

    envs: str = "Catch-bsuite"  # comma-separated env names or suites
    seed: int = 0
    out: str = "runs/meta_train"
    resume: bool = False  # continue from the latest checkpoint in out
    final_seeds: int = 8  # seeds of the final comparison against Adam (0: skip)
    recipe: Optional[str] = None  # a reference's own settings (RECIPES) as the mode's defaults
    # Adam's lrs tuned for the reference and the comparison: 1e-4 to 1e-1 in quarter decades (one
    # vmapped sweep; a half-decade grid left Adam 0.06 below its best on Catch at 1e4 steps)
    adam_lr_grid: str = ",".join(f"{10 ** (e / 4):.2g}" for e in range(-16, -3))
    tune_seeds: int = 8  # seeds of Adam's lr tuning (a key stream apart from every other run's)


@dataclasses.dataclass(frozen=True)
class _OuterLoop:
    rule: str  # a learned rule of learned_optim.registry.rule_names()
    generations: int  # outer steps: ES generations or meta-gradient steps
    checkpoint_every: int  # outer steps between checkpoints


@dataclasses.dataclass(frozen=True)
class _Search(_OuterLoop):
    """ES settings (evosax)."""

    algorithm: str = "Open_ES"
    population: int = 8
    sigma: float = 0.1
    lr: float = 0.05  # ES (outer) learning rate
    no_antithetic: bool = False
    reference_returns: Optional[str] = None  # comma-separated, one per env; None: measured or 1


@dataclasses.dataclass(frozen=True)
class _Units(_OuterLoop):
    """Pipeline units: A2C agents trained by the rule, reset on a staggered schedule."""

    pipeline_units: int = 4  # training units per env
    no_pipeline: bool = False  # all units reset together (ablation)
    agent_lr: float = 3e-3  # agent learning rate given to the rule
    gamma: float = 0.99
    num_envs: int = 8  # A2C envs per unit
    num_steps: int = 10  # A2C rollout length
    hidden: int = 32  # A2C hidden width, one layer
    grad_clip: Optional[float] = None  # A2C elementwise gradient clip (0: none); None: per env (1 on gridworlds)
    eval_timesteps: Optional[float] = None  # A2C env steps per seed in the final comparison; None: one lifetime
    scale_rewards: bool = False  # gridworlds with Optim4RL's per-grid reward scaling (meta-training only)
    # Optim4RL's reference settings (set by --recipe optim4rl-paper)
    spacing: str = "even"  # meta.pipeline.PipelineConfig.spacing of the reset offsets
    respawn_anywhere: bool = False  # gridworld objects respawn on any interior cell (envs.gridworld)
    bootstrap_time_limit: bool = True  # A2C bootstraps V(final obs) at the time limit


@dataclasses.dataclass(frozen=True)
class LifetimeESOptions(_Search):
    """``--method es``: fitness from fresh PPO agents trained for a whole lifetime."""

    MODE: ClassVar[str] = "es"
    LABEL: ClassVar[str] = "ES over whole lifetimes"
    # The main job's defaults: Catch at 1e4 steps, where a tuned Adam is far from Catch's
    # maximum, scored by the mean return over the run (learning fast counts), antithetic pairs
    # on common keys; ~10 minutes on 2 CPU cores (docs/results.md, "the default run").
    rule: str = "open"
    generations: int = 60
    checkpoint_every: int = 10
    lr: float = 0.1  # ES (outer) learning rate
    seeds: int = 2  # PPO seeds per candidate and env
    timesteps: Optional[float] = 1e4  # inner PPO env steps per agent (None: each env's recipe total)
    eval_every: int = 0  # every k generations also train agents with the ES mean (0: off)
    # meta.es.ESConfig's reference settings (set by --recipe open-paper)
    sigma_decay: float = 1.0
    lr_decay: float = 1.0
    adam_b1: float = 0.9
    init_mean: str = "rule"
    fitness_measure: str = "training_mean"  # agents.ppo.RETURN_MEASURES
    common_keys: str = "pairs"  # meta.es.COMMON_KEYS


@dataclasses.dataclass(frozen=True)
class UnitESOptions(_Search, _Units):
    """``--method es --pipeline-units N``: fitness from a window of the units' training."""

    MODE: ClassVar[str] = "es-pipeline"
    LABEL: ClassVar[str] = "ES over pipeline units (--pipeline-units)"
    rule: str = "optim4rl"
    generations: int = 100
    checkpoint_every: int = 10
    reset_interval: int = 20  # outer steps between two resets of one unit
    inner_steps: int = 8  # A2C updates per unit and generation: the fitness window
    unit_fitness: str = "return"  # meta.pipeline_es.UNIT_FITNESS


@dataclasses.dataclass(frozen=True)
class MetaGradOptions(_Units):
    """``--method metagrad``: the A2C loss's gradient through K unrolled updates."""

    MODE: ClassVar[str] = "metagrad"
    LABEL: ClassVar[str] = "--method metagrad"
    rule: str = "optim4rl"
    generations: int = 300
    checkpoint_every: int = 100
    reset_interval: int = 40
    inner_steps: int = 4  # K: A2C updates per unit unrolled in a meta-step
    meta_lr: float = 3e-3  # Adam meta learning rate
    meta_grad_clip: float = 1.0  # global-norm clip of the meta-gradient


ModeOptions = Union[LifetimeESOptions, UnitESOptions, MetaGradOptions]
MODES = {cls.MODE: cls for cls in (LifetimeESOptions, UnitESOptions, MetaGradOptions)}


def mode_fields(cls) -> Dict[str, Any]:
    """Field name -> default of a mode's options."""
    return {f.name: f.default for f in dataclasses.fields(cls)}


def mode_of(method: str, pipeline_units: Optional[int]) -> str:
    if method not in METHODS:
        raise ValueError(f"--method {method!r}; allowed: {', '.join(METHODS)}")
    if method == "metagrad":
        return "metagrad"
    return "es" if pipeline_units is None else "es-pipeline"


# Recipes: a reference's own meta-training settings as a mode's defaults (a
# flag given on the command line still wins). The inner agents' settings of
# "open-paper" are agents.presets.RECIPES["open-paper"].
#
# "open-paper" (ES over lifetimes): AlexGoldie/rl-learned-optimization @
# b65037b, rl_optimizer/train.py: population 64, sigma = lr = 0.03
# (:710-714), both x 0.999 per generation (:720-721, :815-830), Adam b1 0.99
# (:824), the mean starting at zeros (:764), 512 generations (:708), one
# rollout per candidate (:712), fitness the last update's return (:785)
# divided by PPO_TEMP (configs.py, :908-910), every candidate on the same
# keys (:877-880; on gridworlds each antithetic pair, :850-858).
#
# "optim4rl-paper" (meta-gradients on pipeline units): sail-sg/optim4rl @
# 523d42e, configs/meta_rl_catch.json and meta_rl_sdl.json: every env its own
# agent (num_envs units of one env each: 64 on Catch, 512 on the
# gridworlds), 20-step rollouts, K = 4, reset interval 32 (Catch) / 72
# (gridworlds; the first of each sweep), discount 0.995, agent lr 1e-3 /
# 0.03, elementwise clip none / 1, feature width 256 / 32
# (components/network.py:89-99), meta Adam with global-norm clip 0.5 and lr
# 1e-3 / 1e-4 (the middle of each sweep); offsets int(linspace(0, T-1, N));
# objects respawn anywhere (envs/gridworld.py:285-287); no bootstrap at the
# time limit (agents/A2C.py:89,113).
RECIPES: Dict[str, Dict[str, Any]] = {
    "open-paper": {"es": dict(population=64, sigma=0.03, lr=0.03, sigma_decay=0.999, lr_decay=0.999, adam_b1=0.99,
                              init_mean="zeros", generations=512, seeds=1, timesteps=None,
                              fitness_measure="last_update", common_keys="all")},
    "optim4rl-paper": {"metagrad": dict(num_envs=1, num_steps=20, inner_steps=4, gamma=0.995, meta_grad_clip=0.5,
                                        spacing="linspace", bootstrap_time_limit=False)},
}
_OPTIM4RL_PER_FAMILY = {
    "catch": dict(pipeline_units=64, reset_interval=32, agent_lr=1e-3, grad_clip=0.0, hidden=256, meta_lr=1e-3),
    "gridworld": dict(pipeline_units=512, reset_interval=72, agent_lr=0.03, grad_clip=1.0, hidden=32, meta_lr=1e-4,
                      respawn_anywhere=True),
}


def recipe_defaults(recipe: Optional[str], mode: str, env_names) -> Dict[str, Any]:
    """The option values ``recipe`` sets for ``mode`` on ``env_names`` (a
    ``ValueError`` naming what is allowed for an unknown recipe, a mode it has
    no settings for, or envs outside its reference's)."""
    if recipe is None:
        return {}
    if recipe not in RECIPES:
        raise ValueError(f"--recipe {recipe!r}; allowed: {', '.join(RECIPES)}")
    if mode not in RECIPES[recipe]:
        labels = ", ".join(MODES[m].LABEL for m in RECIPES[recipe])
        raise ValueError(f"--recipe {recipe} sets {labels}, not {MODES[mode].LABEL}")
    out = dict(RECIPES[recipe][mode])
    names = list(envs.expand_suites(env_names))
    if recipe == "open-paper":
        from agents.presets import recipe_reference_return

        for name in names:  # an env outside the recipe's families fails here with the allowed ones
            from agents.presets import resolve_config

            resolve_config(name, recipe=recipe)
        if all(n in envs.GRIDWORLD_ENVS for n in names):
            out["common_keys"] = "pairs"
        refs = [recipe_reference_return(recipe, n) for n in names]
        if all(r is not None for r in refs):
            out["reference_returns"] = ",".join(f"{r:g}" for r in refs)
    if recipe == "optim4rl-paper":
        fams = {"catch" if n == "Catch-bsuite" else "gridworld" if n in envs.GRIDWORLD_ENVS else n for n in names}
        if len(fams) != 1 or not fams <= set(_OPTIM4RL_PER_FAMILY):
            raise ValueError(f"--recipe optim4rl-paper: envs must be Catch-bsuite or gridworlds (one family), "
                             f"got {', '.join(names)}")
        out.update(_OPTIM4RL_PER_FAMILY[fams.pop()])
    return out


def mode_options(mode: str, given: Dict[str, Any]) -> ModeOptions:
    """The options of ``mode`` from ``given`` (field -> value, None where not
    set: the recipe's value if ``given["recipe"]`` names one, else the mode's
    default). A value set for a field of another mode only is a
    ``ValueError`` naming the modes it belongs to."""
    cls = MODES[mode]
    own = mode_fields(cls)
    for name in sorted(set().union(*map(mode_fields, MODES.values())) - set(own)):
        if given.get(name) is not None:
            where = [m.LABEL for m in MODES.values() if name in mode_fields(m)]
            raise ValueError(f"--{name.replace('_', '-')} does not apply to {cls.LABEL}; "
                             f"it belongs to {' / '.join(where)}")
    base = recipe_defaults(given.get("recipe"), mode, given.get("envs") or RunOptions.envs)
    return cls(**{**base, **{k: v for k, v in given.items() if k in own and v is not None}})


class Plan(NamedTuple):
    """Everything a run needs, validated before anything compiles."""

    run: RunOptions
    options: ModeOptions
    rule: Any
    envs: tuple  # env names, suites expanded
    es: Any = None  # meta.es.ESConfig (ES modes)
    pipeline_es: Any = None  # meta.pipeline_es.PipelineESConfig
    metagrad: Any = None  # meta.metagrad.MetaGradConfig
    a2c: Any = None  # agents.a2c.A2CConfig of the units (total_timesteps = one unit lifetime)
    hparams: Any = None  # agents.a2c.A2CHParams
    learning_rate: Any = None  # the units' agent learning rate (--agent-lr), written into their optimizer state
    env_overrides: Any = None  # env name -> envs.make overrides for meta-training (pipeline modes)

    @property
    def mode(self) -> str:
        return self.options.MODE

    @property
    def pipeline(self):
        """The units' PipelineConfig (pipeline modes)."""
        return self.metagrad.pipeline if self.mode == "metagrad" else self.pipeline_es.pipeline


def _at_least_one(options, names):
    for name in names:
        if getattr(options, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(options, name)}")


def build(run: RunOptions, options: ModeOptions) -> Plan:
    """Validates everything and returns the run's Plan before anything compiles."""
    if options.rule not in registry.rule_names():
        raise ValueError(f"unknown rule {options.rule!r}; allowed: {', '.join(registry.rule_names())}")
    _at_least_one(options, ("generations", "checkpoint_every"))
    if run.final_seeds < 0:
        raise ValueError(f"--final-seeds must be >= 0, got {run.final_seeds}")
    adam_grid(run)  # a bad --adam-lr-grid fails here
    if run.tune_seeds < 1:
        raise ValueError(f"--tune-seeds must be >= 1, got {run.tune_seeds}")
    names = tuple(envs.expand_suites(run.envs))
    plan = dict(run=run, options=options, rule=registry.make_rule(options.rule), envs=names)
    if options.MODE in ("es", "es-pipeline"):
        plan["es"] = _es_config(run, options, names)
    if options.MODE in ("es-pipeline", "metagrad"):
        plan.update(_pipeline_plan(options, names))
    if run.resume:
        from meta.checkpoint import latest_step

        if latest_step(os.path.join(run.out, "checkpoints")) is None:
            raise ValueError(f"--resume: no checkpoint found in {os.path.join(run.out, 'checkpoints')!r}")
    return Plan(**plan)


MIN_ADAM_GRID = 4  # a tuned baseline: at least this many learning rates


def adam_grid(run: RunOptions):
    """``--adam-lr-grid`` as a ``meta.lr_tuning.LrGrid`` (absolute values or
    x-multipliers of each env preset's lr), at least ``MIN_ADAM_GRID`` values."""
    from meta.lr_tuning import parse_lr_grid

    try:
        grid = parse_lr_grid(run.adam_lr_grid)
    except ValueError as e:
        raise ValueError(str(e).replace("--lr-grid", "--adam-lr-grid")) from None
    if len(grid.values) < MIN_ADAM_GRID:
        raise ValueError(f"--adam-lr-grid {run.adam_lr_grid!r} has {len(grid.values)} values; a tuned Adam needs "
                         f"at least {MIN_ADAM_GRID} (e.g. {RunOptions.adam_lr_grid})")
    return grid


def _es_config(run: RunOptions, options, names):
    from meta.es import ESConfig

    refs = None
    if options.reference_returns:
        try:
            refs = tuple(float(x) for x in options.reference_returns.split(","))
        except ValueError:
            raise ValueError(f"--reference-returns must be numbers, got {options.reference_returns!r}") from None
    extra = {}
    if options.MODE == "es":
        if options.timesteps is not None and options.timesteps <= 0:
            raise ValueError(f"--timesteps must be positive, got {options.timesteps:g}")
        extra = dict(seeds=options.seeds, timesteps=None if options.timesteps is None else int(options.timesteps),
                     sigma_decay=options.sigma_decay, lr_decay=options.lr_decay, adam_b1=options.adam_b1,
                     init_mean=options.init_mean, fitness_measure=options.fitness_measure,
                     common_keys=options.common_keys, recipe=run.recipe)
    return ESConfig(envs=names, algorithm=options.algorithm, population=options.population,
                    generations=options.generations, sigma=options.sigma, lr=options.lr,
                    antithetic=not options.no_antithetic, reference_returns=refs, seed=run.seed, **extra)


def _pipeline_plan(options, names):
    from agents.a2c import A2CConfig, A2CHParams
    from meta.metagrad import MetaGradConfig
    from meta.pipeline import PipelineConfig
    from meta.pipeline_es import PipelineESConfig
    from meta.units import lifetime_env_steps

    _at_least_one(options, ("pipeline_units", "reset_interval", "inner_steps", "num_envs", "num_steps", "hidden"))
    for name in ("agent_lr", "meta_lr", "meta_grad_clip"):
        if getattr(options, name, None) is not None and not getattr(options, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(options, name)}")
    update = options.num_envs * options.num_steps
    if options.eval_timesteps is not None and options.eval_timesteps < update:
        raise ValueError(f"--eval-timesteps must be at least one A2C update ({update} steps), "
                         f"got {options.eval_timesteps:g}")
    pipe = PipelineConfig(num_units=options.pipeline_units, reset_interval=options.reset_interval,
                          staggered=not options.no_pipeline, spacing=options.spacing)
    # One rollout per inner update, plus metagrad's fresh rollout for the meta-objective.
    rollouts = options.inner_steps + (options.MODE == "metagrad")
    from agents.presets import a2c_grad_clip

    if options.grad_clip is not None and not options.grad_clip >= 0:
        raise ValueError(f"--grad-clip must be >= 0 (0 = none), got {options.grad_clip}")
    # Optim4RL's elementwise clip on the gridworlds (agents.presets.A2C_PRESETS) unless --grad-clip says
    clip = a2c_grad_clip(names) if options.grad_clip is None else options.grad_clip
    a2c = A2CConfig(num_envs=options.num_envs, num_steps=options.num_steps, hidden_sizes=(options.hidden,),
                    grad_clip=clip, bootstrap_time_limit=options.bootstrap_time_limit)
    a2c = dataclasses.replace(a2c, total_timesteps=lifetime_env_steps(options.reset_interval, rollouts, a2c))
    out = dict(a2c=a2c, hparams=A2CHParams.default(gamma=options.gamma), learning_rate=options.agent_lr,
               env_overrides=_env_overrides(options.scale_rewards, names, options.respawn_anywhere))
    if options.MODE == "metagrad":
        out["metagrad"] = MetaGradConfig(num_inner=options.inner_steps, meta_lr=options.meta_lr,
                                         meta_grad_clip=options.meta_grad_clip, pipeline=pipe)
    else:
        out["pipeline_es"] = PipelineESConfig(pipeline=pipe, window=options.inner_steps, fitness=options.unit_fitness)
    return out


def _env_overrides(scale_rewards: bool, names, respawn_anywhere: bool = False) -> Dict[str, Dict[str, Any]]:
    """``envs.make`` overrides per env for meta-training: ``scale_rewards``
    turns on the reward scaling of every gridworld among ``names``,
    ``respawn_anywhere`` the reference's respawn rule."""
    wanted = dict(scale_rewards=scale_rewards, respawn_anywhere=respawn_anywhere)
    wanted = {k: True for k, v in wanted.items() if v}
    if not wanted:
        return {}
    grids = [n for n in names if n in envs.GRIDWORLD_ENVS]
    if not grids:
        flags = " / ".join(f"--{k.replace('_', '-')}" for k in wanted)
        raise ValueError(f"{flags} applies to gridworld envs ({', '.join(envs.GRIDWORLD_ENVS)}); "
                         f"none among {', '.join(names)}")
    return {n: dict(wanted) for n in grids}


def _without_defaults(config) -> Dict[str, Any]:
    """``asdict(config)`` less the fields added since checkpoints were first
    written, where they keep their defaults (so those checkpoints still
    resume)."""
    d = dataclasses.asdict(config)
    for f in dataclasses.fields(config):
        if f.name in _ADDED_FIELDS and d.get(f.name) == f.default:
            d.pop(f.name)
    return d


_ADDED_FIELDS = {"sigma_decay", "lr_decay", "adam_b1", "init_mean", "fitness_measure", "common_keys", "recipe",
                 "spacing", "bootstrap_time_limit", "fitness"}


def _es_document(config) -> Dict[str, Any]:
    d = _without_defaults(config)
    d.pop("generations")  # a resumed run may ask for more generations
    return d


def plan_document(plan: Plan) -> Dict[str, Any]:
    """The settings a checkpoint must match to be resumed (not the number of
    outer steps, the output or the final comparison). Keys as written by
    earlier versions, so their checkpoints still resume."""
    rule = plan.options.rule
    if plan.mode == "es":
        return json.loads(json.dumps(dict(_es_document(plan.es), rule=rule)))
    d = dict(method=plan.mode, rule=rule, envs=list(plan.envs), a2c=_without_defaults(plan.a2c),
             hparams=dict(lr=float(plan.learning_rate),
                          **{k: float(v) for k, v in plan.hparams._asdict().items()}))
    if plan.env_overrides:  # only when set, so checkpoints of earlier runs still resume
        d["env_overrides"] = plan.env_overrides
    if plan.mode == "metagrad":
        d["metagrad"] = dict(dataclasses.asdict(plan.metagrad), pipeline=_without_defaults(plan.metagrad.pipeline))
    else:
        es = dict(_es_document(plan.es), rule=rule)
        for unused in ("seeds", "timesteps"):
            es.pop(unused)
        d.update(es=es, pipeline_es=dict(_without_defaults(plan.pipeline_es),
                                         pipeline=_without_defaults(plan.pipeline_es.pipeline)))
    return json.loads(json.dumps(d))
