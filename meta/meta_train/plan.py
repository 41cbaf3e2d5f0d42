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
    final_seeds: int = 4  # seeds of the final comparison against Adam (0: skip)


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


@dataclasses.dataclass(frozen=True)
class LifetimeESOptions(_Search):
    """``--method es``: fitness from fresh PPO agents trained for a whole lifetime."""

    MODE: ClassVar[str] = "es"
    LABEL: ClassVar[str] = "ES over whole lifetimes"
    rule: str = "open"
    generations: int = 12
    checkpoint_every: int = 2
    seeds: int = 2  # PPO seeds per candidate and env
    timesteps: float = 2e4  # inner PPO env steps per agent
    eval_every: int = 0  # every k generations also train agents with the ES mean (0: off)


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


def mode_options(mode: str, given: Dict[str, Any]) -> ModeOptions:
    """The options of ``mode`` from ``given`` (field -> value, None where not
    set: the mode's default). A value set for a field of another mode only is
    a ``ValueError`` naming the modes it belongs to."""
    cls = MODES[mode]
    own = mode_fields(cls)
    for name in sorted(set().union(*map(mode_fields, MODES.values())) - set(own)):
        if given.get(name) is not None:
            where = [m.LABEL for m in MODES.values() if name in mode_fields(m)]
            raise ValueError(f"--{name.replace('_', '-')} does not apply to {cls.LABEL}; "
                             f"it belongs to {' / '.join(where)}")
    return cls(**{k: v for k, v in given.items() if k in own and v is not None})


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
        if options.timesteps <= 0:
            raise ValueError(f"--timesteps must be positive, got {options.timesteps:g}")
        extra = dict(seeds=options.seeds, timesteps=int(options.timesteps))
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
                          staggered=not options.no_pipeline)
    # One rollout per inner update, plus metagrad's fresh rollout for the meta-objective.
    rollouts = options.inner_steps + (options.MODE == "metagrad")
    from agents.presets import a2c_grad_clip

    if options.grad_clip is not None and not options.grad_clip >= 0:
        raise ValueError(f"--grad-clip must be >= 0 (0 = none), got {options.grad_clip}")
    # Optim4RL's elementwise clip on the gridworlds (agents.presets.A2C_PRESETS) unless --grad-clip says
    clip = a2c_grad_clip(names) if options.grad_clip is None else options.grad_clip
    a2c = A2CConfig(num_envs=options.num_envs, num_steps=options.num_steps, hidden_sizes=(options.hidden,),
                    grad_clip=clip)
    a2c = dataclasses.replace(a2c, total_timesteps=lifetime_env_steps(options.reset_interval, rollouts, a2c))
    out = dict(a2c=a2c, hparams=A2CHParams.default(gamma=options.gamma), learning_rate=options.agent_lr,
               env_overrides=_env_overrides(options.scale_rewards, names))
    if options.MODE == "metagrad":
        out["metagrad"] = MetaGradConfig(num_inner=options.inner_steps, meta_lr=options.meta_lr,
                                         meta_grad_clip=options.meta_grad_clip, pipeline=pipe)
    else:
        out["pipeline_es"] = PipelineESConfig(pipeline=pipe, window=options.inner_steps)
    return out


def _env_overrides(scale_rewards: bool, names) -> Dict[str, Dict[str, Any]]:
    """``envs.make`` overrides per env for meta-training: ``scale_rewards``
    turns on the reward scaling of every gridworld among ``names``."""
    if not scale_rewards:
        return {}
    grids = [n for n in names if n in envs.GRIDWORLD_ENVS]
    if not grids:
        raise ValueError(f"--scale-rewards applies to gridworld envs ({', '.join(envs.GRIDWORLD_ENVS)}); "
                         f"none among {', '.join(names)}")
    return {n: dict(scale_rewards=True) for n in grids}


def _es_document(config) -> Dict[str, Any]:
    d = dataclasses.asdict(config)
    d.pop("generations")  # a resumed run may ask for more generations
    return d


def plan_document(plan: Plan) -> Dict[str, Any]:
    """The settings a checkpoint must match to be resumed (not the number of
    outer steps, the output or the final comparison). Keys as written by
    earlier versions, so their checkpoints still resume."""
    rule = plan.options.rule
    if plan.mode == "es":
        return json.loads(json.dumps(dict(_es_document(plan.es), rule=rule)))
    d = dict(method=plan.mode, rule=rule, envs=list(plan.envs), a2c=dataclasses.asdict(plan.a2c),
             hparams=dict(lr=float(plan.learning_rate),
                          **{k: float(v) for k, v in plan.hparams._asdict().items()}))
    if plan.env_overrides:  # only when set, so checkpoints of earlier runs still resume
        d["env_overrides"] = plan.env_overrides
    if plan.mode == "metagrad":
        d["metagrad"] = dataclasses.asdict(plan.metagrad)
    else:
        es = dict(_es_document(plan.es), rule=rule)
        for unused in ("seeds", "timesteps"):
            es.pop(unused)
        d.update(es=es, pipeline_es=dataclasses.asdict(plan.pipeline_es))
    return json.loads(json.dumps(d))
