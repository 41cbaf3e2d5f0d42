"""Meta-training learned optimizers with evolution strategies (evosax 0.3).

``make_es(config, rule, evaluation) -> ES`` returns pure functions, like the
other outer loops: ``init(key) -> ESState`` and ``step(state) -> (state,
metrics)``, one generation. The caller jits ``step`` with the ES's
shardings: ``meta.distributed.jit_placed(es.step, es.state_sharding)`` on a
state placed by ``jax.device_put(es.init(key), es.state_sharding)``. A generation asks the ES for a population of
meta-parameter candidates, scores them with ``evaluation`` (the population
axis sharded over the devices of a ``Mesh`` with a ``"pop"`` axis), turns
their returns into fitness and tells the ES. evosax minimises, so it is told
``-fitness``.

Two evaluations: ``lifetime_evaluation`` (here; the default) trains
``seeds`` fresh PPO agents per env with every candidate for a whole lifetime;
``meta.pipeline_es.unit_evaluation`` runs every candidate on the same
pipeline units for a window and carries the units in the ES state.

Fitness of a candidate = mean over envs of (mean over seeds of its return) /
|reference return of that env|. A candidate whose return is NaN or Inf gets
the worst fitness and is counted; it never breaks the generation.

A learned *rule* is anything with ``init_meta_params(key) -> pytree`` and
``make_optimizer(meta_params) -> optax transform`` (see ``learned_optim``).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import envs
from agents.ppo import RETURN_MEASURES, PPOHParams, make_ppo
from meta.distributed import POP, population_mesh, replicated_sharding
from agents.presets import resolve_config

WORST_FITNESS = -1e6  # given to candidates whose return is NaN/Inf
CPU_MEMBER_BATCH = 8  # candidates vmapped together per device on CPU (ESConfig.member_batch None)
INIT_MEANS = ("rule", "zeros")
FITNESS_MEASURES = tuple(RETURN_MEASURES)
COMMON_KEYS = ("none", "all", "pairs")


@dataclasses.dataclass(frozen=True)
class ESConfig:
    """Static settings of an ES meta-training run (``seeds`` and ``timesteps``
    are those of ``lifetime_evaluation``)."""

    envs: Tuple[str, ...] = ("CartPole-v1",)
    algorithm: str = "Open_ES"
    population: int = 8
    generations: int = 16
    sigma: float = 0.03
    lr: float = 0.03
    seeds: int = 2
    timesteps: Optional[int] = 100_000  # None: each env's preset (or recipe) total
    antithetic: bool = True
    reference_returns: Optional[Tuple[float, ...]] = None
    seed: int = 0
    # Candidates trained together (vmapped) on each device; the rest of a
    # device's share runs in turn (lax.map). None: 8 on CPU, where a whole
    # population's optimizer states outgrow the caches (population 32 ran at
    # half the per-step speed of a single run), all at once on accelerators.
    member_batch: Optional[int] = None
    # OPEN's reference settings (the "open-paper" recipe; defaults keep evosax's
    # and ours): sigma and the ES learning rate multiplied by these per
    # generation; Adam's b1 in the ES; the mean's start ("rule": the rule's
    # init, "zeros"); the inner measure ("final_window": the mean return over
    # the last 10% of updates, "last_update": the last update's, as OPEN);
    # which candidates share their inner agents' keys ("none", "all": common
    # random numbers, "pairs": each antithetic pair i, i + P/2 shares one).
    sigma_decay: float = 1.0
    lr_decay: float = 1.0
    adam_b1: float = 0.9
    init_mean: str = "rule"
    fitness_measure: str = "final_window"
    common_keys: str = "none"
    recipe: Optional[str] = None  # the inner PPO's settings: agents.presets.RECIPES (None: the env presets)

    def __post_init__(self):
        object.__setattr__(self, "envs", tuple(self.envs))
        if self.reference_returns is not None:
            object.__setattr__(self, "reference_returns", tuple(float(r) for r in self.reference_returns))
        if not self.envs:
            raise ValueError("ESConfig.envs must name at least one env")
        envs.expand_suites(list(self.envs))
        import evosax.algorithms as algos

        if self.algorithm not in algos.algorithms:
            raise ValueError(
                f"unknown ES algorithm {self.algorithm!r}; allowed: {', '.join(sorted(algos.algorithms))}"
            )
        from agents.presets import check_recipe

        check_recipe(self.recipe)
        if self.recipe is not None:
            for name in self.envs:
                resolve_config(name, recipe=self.recipe)  # every env has a preset in the recipe
        for name in ("population", "generations", "seeds", "timesteps"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.antithetic and self.population % 2:
            raise ValueError(
                f"--population {self.population} is odd; antithetic sampling needs an even population"
            )
        if self.sigma <= 0 or self.lr <= 0:
            raise ValueError(f"--sigma and --lr must be positive, got {self.sigma}, {self.lr}")
        for name, allowed in (("init_mean", INIT_MEANS), ("fitness_measure", FITNESS_MEASURES),
                              ("common_keys", COMMON_KEYS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)!r}; allowed: {', '.join(allowed)}")
        for name in ("sigma_decay", "lr_decay"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.adam_b1 < 1.0:
            raise ValueError(f"--adam-b1 must be in [0, 1), got {self.adam_b1}")
        if self.common_keys == "pairs" and not self.antithetic:
            raise ValueError("--common-keys pairs needs antithetic sampling (pairs i, i + P/2)")
        if self.member_batch is not None and (not isinstance(self.member_batch, int) or self.member_batch < 1):
            raise ValueError(f"member_batch must be a positive integer or None, got {self.member_batch!r}")
        if self.reference_returns is not None and len(self.reference_returns) != len(self.envs):
            raise ValueError(
                f"reference_returns has {len(self.reference_returns)} values for {len(self.envs)} envs"
            )


@struct.dataclass
class ESState:
    es_state: Any
    key: jax.Array  # raw uint32 key data, so checkpoints stay plain arrays
    generation: jax.Array


@struct.dataclass
class CarriedESState(ESState):
    """The state of an ES whose evaluation carries something across
    generations (ES over units: a tuple over envs of pipeline states). Two
    classes, not an empty field, so that checkpoints keep their layout."""

    pipes: Any


class Evaluation(NamedTuple):
    """How a generation's candidates are scored.

    ``evaluate(carried, pop, key, mean, map_population)`` gets the carried
    state, the candidates ``pop`` (leaves ``[P, ...]``), a key, the ES mean
    before this generation's update and ``map_population(fn, pop,
    member_args, shared)`` (runs ``fn(candidate, member_arg, shared)`` for
    every candidate on its device); it returns ``(returns [P, E, S], carried,
    extra metrics)``.
    """

    init: Optional[Callable]  # (key, mean) -> carried state (CarriedESState.pipes); None: nothing carried
    evaluate: Callable
    env_steps_per_generation: int


class ES(NamedTuple):
    config: ESConfig
    init: Callable  # key -> ESState, or CarriedESState when the evaluation carries state
    #                 (the CLI passes jax.random.key(config.seed))
    step: Callable  # ESState -> (ESState, metrics): one generation, pure; jit it (jit_placed)
    mean_meta_params: Callable  # ESState -> the ES mean, the optimizer the run hands out
    fitness_from_returns: Callable  # returns [P, E, S] -> (fitness [P], per-env returns [P, E], NaN count)
    evaluation: Evaluation
    map_population: Callable  # (fn, pop, member_args, shared) -> stacked [P, ...] (make_map_population)
    mesh: Mesh
    state_sharding: NamedSharding  # where the state lives between generations (replicated over the mesh)


def _schedule(value: float, decay: float):
    """``value * decay ** generation`` (OPEN's reference: optax's
    ``exponential_decay`` with ``transition_steps=1``, train.py:815-830);
    constant for ``decay == 1``."""
    if decay == 1.0:
        return optax.constant_schedule(value)
    return optax.exponential_decay(value, transition_steps=1, decay_rate=decay, end_value=0.0)


def make_algorithm(config: ESConfig, template):
    import evosax.algorithms as algos

    cls = algos.algorithms[config.algorithm]
    kwargs = dict(population_size=config.population, solution=template)
    sig = inspect.signature(cls.__init__).parameters
    if "optimizer" in sig:
        kwargs["optimizer"] = optax.adam(_schedule(config.lr, config.lr_decay), b1=config.adam_b1)
    if "std_schedule" in sig:
        kwargs["std_schedule"] = _schedule(config.sigma, config.sigma_decay)
    if "use_antithetic_sampling" in sig:
        kwargs["use_antithetic_sampling"] = config.antithetic
    algo = cls(**kwargs)
    return algo, algo.default_params


def final_return_jnp(metrics: Dict[str, jax.Array], fraction: float = 0.1) -> jax.Array:
    """Like ``agents.ppo.final_return``, in JAX (last axis = iterations)."""
    ret, cnt = metrics["episode_return"], metrics["episodes"].astype(jnp.float32)
    n = ret.shape[-1]
    k = max(1, int(round(n * fraction)))
    r, c = ret[..., -k:], cnt[..., -k:]
    total = c.sum(-1)
    return jnp.where(total > 0, (r * c).sum(-1) / jnp.maximum(total, 1.0), r[..., -1])


def inner_setup(env_name: str, timesteps: Optional[int], recipe: Optional[str] = None):
    """``(env, env_params, config, hparams, lr)`` of the inner PPO agents: the
    env preset's (or ``recipe``'s; ``timesteps`` None: its total), its
    learning rate written into the rule's injected one (Optim4RL; OPEN has
    none)."""
    env, env_params = envs.make(env_name)
    cfg, hp, lr = resolve_config(env_name, recipe=recipe,
                                 total_timesteps=None if timesteps is None else int(timesteps))
    return env, env_params, cfg, PPOHParams.default(**hp), lr


def make_evaluator(config: ESConfig, rule):
    """``evaluate(meta_params, key) -> returns [E, S]``: trains ``seeds`` PPO
    agents per env from scratch with the rule's optimizer."""
    setups = [inner_setup(name, config.timesteps, config.recipe) for name in config.envs]

    def evaluate(meta_params, key):
        out = []
        for e, (env, env_params, cfg, hp, lr) in enumerate(setups):
            agent = make_ppo(cfg, env, env_params, rule.make_optimizer(meta_params))
            keys = jax.random.split(jax.random.fold_in(key, e), config.seeds)
            _, m = jax.vmap(agent.train, in_axes=(0, None, None))(keys, hp, lr)
            out.append(final_return_jnp(m, fraction=RETURN_MEASURES[config.fitness_measure]))
        return jnp.stack(out)

    return evaluate


def env_steps_per_generation(config: ESConfig) -> int:
    total = 0
    for name in config.envs:
        cfg = inner_setup(name, config.timesteps, config.recipe)[2]
        total += cfg.num_updates * cfg.batch_size
    return total * config.seeds * config.population


def candidate_keys(key, population: int, common: str = "none"):
    """One key per candidate for its inner agents: all different ("none"),
    all the same ("all", common random numbers, as OPEN's reference on
    MinAtar), or shared by each antithetic pair ``i, i + P/2`` ("pairs", as
    its reference on gridworlds, train.py:850-858 and 877-880)."""
    if common == "all":
        return jnp.broadcast_to(key, (population,))
    if common == "pairs":
        half = jax.random.split(key, population // 2)
        return jnp.concatenate([half, half])
    return jax.random.split(key, population)


def lifetime_evaluation(config: ESConfig, rule) -> Evaluation:
    """Every candidate trains fresh agents (``make_evaluator``) from its own
    keys; nothing is carried between generations."""
    train = make_evaluator(config, rule)

    def evaluate(carried, pop, key, mean, map_population):
        del mean
        keys = jax.random.key_data(candidate_keys(key, config.population, config.common_keys))
        returns = map_population(lambda m, k, _: train(m, jax.random.wrap_key_data(k)), pop, keys, ())
        return returns, carried, {}

    return Evaluation(None, evaluate, env_steps_per_generation(config))


def make_map_population(mesh: Mesh, member_batch: Optional[int]) -> Callable:
    """``map_population(fn, pop, member_args, shared)``: ``fn(candidate,
    member_arg, shared)`` for every candidate, stacked on a leading ``[P]``
    axis. Each device runs its own slice of the population (``shard_map``
    over the ``"pop"`` axis; ``shared`` is replicated): no communication
    inside the training loops, one gather at the end. Within a device,
    ``member_batch`` candidates at a time are vmapped (None: 8 on CPU, all
    on accelerators)."""
    # None: decided by the platform the program is lowered for, not the mesh's
    # devices, so that one exported program is right everywhere.

    def map_population(fn, pop, member_args, shared):
        def whole(pop, member_args, shared):
            return jax.vmap(fn, (0, 0, None))(pop, member_args, shared)

        def in_turn(batch):
            def run(pop, member_args, shared):
                return jax.lax.map(lambda a: fn(a[0], a[1], shared), (pop, member_args), batch_size=batch)

            return run

        def local(pop, member_args, shared):
            n = jax.tree.leaves(pop)[0].shape[0]
            if member_batch is not None:
                return (whole if member_batch >= n else in_turn(member_batch))(pop, member_args, shared)
            if n <= CPU_MEMBER_BATCH:
                return whole(pop, member_args, shared)
            # CPU: 8 at a time; every other backend: the whole share at once. One
            # program, the branch chosen when it is lowered (an export for cuda
            # or tpu from a CPU machine keeps the population batched).
            return jax.lax.platform_dependent(pop, member_args, shared, cpu=in_turn(CPU_MEMBER_BATCH),
                                              default=whole)

        spec = PartitionSpec(POP)
        # check_vma=False: the inner scans start from per-member constants (env
        # resets), which shard_map's replication checker would reject.
        # The candidates come in whole and the results go out whole (gathered), so
        # that ask, fitness and tell run whole on every device: no sum split over
        # devices, whose order would depend on the collectives (in-process or gloo
        # across processes), and a result independent of the device layout.
        gathered = NamedSharding(mesh, PartitionSpec())
        pop = jax.lax.with_sharding_constraint(pop, gathered)
        out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, PartitionSpec()), out_specs=spec,
                            check_vma=False)(pop, member_args, shared)
        return jax.lax.with_sharding_constraint(out, gathered)

    return map_population


def make_es(config: ESConfig, rule, evaluation: Optional[Evaluation] = None,
            reference_returns: Optional[Sequence[float]] = None, mesh: Optional[Mesh] = None) -> ES:
    """ES over ``rule``'s meta-parameters. ``evaluation``: default
    ``lifetime_evaluation(config, rule)``. ``reference_returns``: one per env
    (default ``config.reference_returns``, else 1). ``mesh``: the devices to
    shard the population over (default all; their number must divide it)."""
    if evaluation is None:
        evaluation = lifetime_evaluation(config, rule)
    if reference_returns is None:
        reference_returns = config.reference_returns or [1.0] * len(config.envs)
    reference = jnp.asarray(np.maximum(np.abs(np.asarray(reference_returns, np.float32)), 1e-6))
    mesh = population_mesh(config.population, None if mesh is None else list(mesh.devices.flat))
    # The ES needs a concrete solution for its shapes; init draws the real start from its key.
    algo, algo_params = make_algorithm(config, rule.init_meta_params(jax.random.key(config.seed)))
    map_population = make_map_population(mesh, config.member_batch)

    def init(key) -> ESState:
        k_init, k_run = jax.random.split(key)
        start = rule.init_meta_params(key)
        if config.init_mean == "zeros":  # OPEN's reference starts the mean at zeros (train.py:764)
            start = jax.tree.map(jnp.zeros_like, start)
        es_state = algo.init(k_init, start, algo_params)
        # evosax starts some fields as Python scalars (weakly typed); make them
        # plain arrays so the jitted generation does not recompile after step 1.
        es_state = jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.asarray(x).dtype), es_state)
        if evaluation.init is None:
            return ESState(es_state, jax.random.key_data(k_run), jnp.zeros((), jnp.int32))
        k_run, k_carried = jax.random.split(k_run)
        pipes = evaluation.init(k_carried, algo.get_mean(es_state))
        return CarriedESState(es_state, jax.random.key_data(k_run), jnp.zeros((), jnp.int32), pipes)

    def fitness_from_returns(returns):
        per_env = returns.mean(-1)
        bad = ~jnp.all(jnp.isfinite(per_env), axis=-1)
        fitness = jnp.mean(per_env / reference, axis=-1)
        fitness = jnp.where(bad, WORST_FITNESS, fitness)
        return fitness, per_env, bad.sum().astype(jnp.int32)

    def step(state: ESState):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.generation)
        k_ask, k_eval, k_tell = jax.random.split(key, 3)
        pop, es_state = algo.ask(k_ask, state.es_state, algo_params)
        carried = () if evaluation.init is None else state.pipes
        returns, carried, extra = evaluation.evaluate(carried, pop, k_eval, algo.get_mean(state.es_state),
                                                      map_population)
        fitness, per_env, nans = fitness_from_returns(returns)
        es_state, _ = algo.tell(k_tell, pop, -fitness, es_state, algo_params)
        metrics = dict(fitness=fitness, returns=per_env, nan_count=nans, **extra)
        # Keep dtypes exactly as they came in (evosax's std schedule is weakly typed).
        es_state = jax.tree.map(lambda new, old: jnp.asarray(new, dtype=old.dtype), es_state, state.es_state)
        state = state.replace(es_state=es_state, generation=state.generation + 1)
        return (state if evaluation.init is None else state.replace(pipes=carried)), metrics

    def mean_meta_params(state: ESState):
        return algo.get_mean(state.es_state)

    return ES(config, init, step, mean_meta_params, fitness_from_returns, evaluation, map_population, mesh,
              replicated_sharding(mesh))
