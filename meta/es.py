"""Meta-training learned optimizers with evolution strategies (evosax 0.3).

A generation is one jitted program: ask the ES for a population of
meta-parameter candidates, train ``seeds`` PPO agents from scratch with each
candidate on every env (all vmapped; the population axis sharded over the
devices of a ``Mesh`` with a ``"pop"`` axis), turn final returns into
fitness, and tell the ES. evosax minimises, so it is told ``-fitness``.

Fitness of a candidate = mean over envs of (mean over seeds of the final
return) / |reference return of that env|. A candidate whose return is NaN or
Inf gets the worst fitness and is counted; it never breaks the generation.

A learned *rule* is anything with ``init_meta_params(key) -> pytree`` and
``make_optimizer(meta_params) -> optax transform`` (see ``learned_optim``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import envs
from meta.experiment import resolve_config
from agents.ppo import PPOHParams, make_ppo

WORST_FITNESS = -1e6  # given to candidates whose return is NaN/Inf


@dataclasses.dataclass(frozen=True)
class ESConfig:
    """Static settings of an ES meta-training run."""

    envs: Tuple[str, ...] = ("CartPole-v1",)
    algorithm: str = "Open_ES"
    population: int = 8
    generations: int = 16
    sigma: float = 0.03
    lr: float = 0.03
    seeds: int = 2
    timesteps: int = 100_000
    antithetic: bool = True
    reference_returns: Optional[Tuple[float, ...]] = None
    seed: int = 0
    # Candidates trained together (vmapped) on each device; the rest of a
    # device's share runs in turn (lax.map). None: 8 on CPU, where a whole
    # population's optimizer states outgrow the caches (population 32 ran at
    # half the per-step speed of a single run), all at once on accelerators.
    member_batch: Optional[int] = None

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
        for name in ("population", "generations", "seeds", "timesteps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.antithetic and self.population % 2:
            raise ValueError(
                f"--population {self.population} is odd; antithetic sampling needs an even population"
            )
        if self.sigma <= 0 or self.lr <= 0:
            raise ValueError(f"--sigma and --lr must be positive, got {self.sigma}, {self.lr}")
        if self.member_batch is not None and (not isinstance(self.member_batch, int) or self.member_batch < 1):
            raise ValueError(f"member_batch must be a positive integer or None, got {self.member_batch!r}")
        if self.reference_returns is not None and len(self.reference_returns) != len(self.envs):
            raise ValueError(
                f"reference_returns has {len(self.reference_returns)} values for {len(self.envs)} envs"
            )


@struct.dataclass
class ESRunState:
    es_state: Any
    key: jax.Array  # raw uint32 key data, so checkpoints stay plain arrays
    generation: jax.Array


def make_algorithm(config: ESConfig, template):
    import evosax.algorithms as algos

    cls = algos.algorithms[config.algorithm]
    kwargs = dict(population_size=config.population, solution=template)
    import inspect

    sig = inspect.signature(cls.__init__).parameters
    if "optimizer" in sig:
        kwargs["optimizer"] = optax.adam(config.lr)
    if "std_schedule" in sig:
        kwargs["std_schedule"] = optax.constant_schedule(config.sigma)
    if "use_antithetic_sampling" in sig:
        kwargs["use_antithetic_sampling"] = config.antithetic
    es = cls(**kwargs)
    return es, es.default_params


def final_return_jnp(metrics: Dict[str, jax.Array], fraction: float = 0.1) -> jax.Array:
    """Like ``agents.ppo.final_return``, in JAX (last axis = iterations)."""
    ret, cnt = metrics["episode_return"], metrics["episodes"].astype(jnp.float32)
    n = ret.shape[-1]
    k = max(1, int(round(n * fraction)))
    r, c = ret[..., -k:], cnt[..., -k:]
    total = c.sum(-1)
    return jnp.where(total > 0, (r * c).sum(-1) / jnp.maximum(total, 1.0), r[..., -1])


def inner_setup(env_name: str, timesteps: int):
    env, env_params = envs.make(env_name)
    cfg, hp = resolve_config(env_name, total_timesteps=int(timesteps))
    return env, env_params, cfg, PPOHParams.default(**hp)


def make_evaluator(config: ESConfig, rule):
    """``evaluate(meta_params, key) -> returns [E, S]``: trains ``seeds`` PPO
    agents per env from scratch with the rule's optimizer."""
    setups = [inner_setup(name, config.timesteps) for name in config.envs]

    def evaluate(meta_params, key):
        out = []
        for e, (env, env_params, cfg, hp) in enumerate(setups):
            agent = make_ppo(cfg, env, env_params, rule.make_optimizer(meta_params))
            keys = jax.random.split(jax.random.fold_in(key, e), config.seeds)
            _, m = jax.vmap(agent.train, in_axes=(0, None))(keys, hp)
            out.append(final_return_jnp(m))
        return jnp.stack(out)

    return evaluate


def env_steps_per_generation(config: ESConfig) -> int:
    total = 0
    for name in config.envs:
        cfg, _ = resolve_config(name, total_timesteps=int(config.timesteps))
        total += cfg.num_updates * cfg.batch_size
    return total * config.seeds * config.population


def population_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()), ("pop",))


class ESTrainer:
    """Builds the jitted generation step for ``config`` and ``rule``."""

    def __init__(self, config: ESConfig, rule, reference_returns: Sequence[float], mesh: Optional[Mesh] = None):
        self.config, self.rule = config, rule
        self.reference = jnp.asarray(np.maximum(np.abs(np.asarray(reference_returns, np.float32)), 1e-6))
        self.mesh = mesh or population_mesh()
        n_dev = self.mesh.devices.size
        if config.population % n_dev:
            raise ValueError(
                f"--population {config.population} does not divide over {n_dev} devices; "
                f"use a multiple of {n_dev}"
            )
        self.template = rule.init_meta_params(jax.random.key(config.seed))
        self.es, self.es_params = make_algorithm(config, self.template)
        self.evaluate = self._make_evaluator()
        self.generation_step = jax.jit(self._generation)

    def _make_evaluator(self):
        return make_evaluator(self.config, self.rule)

    def init(self) -> ESRunState:
        key = jax.random.key(self.config.seed)
        k_init, k_run = jax.random.split(key)
        return self.place(self._init_run(k_init, k_run))

    def _init_run(self, k_init, k_run) -> ESRunState:
        es_state = self.es.init(k_init, self.template, self.es_params)
        # evosax starts some fields as Python scalars (weakly typed); make them
        # plain arrays so the jitted generation does not recompile after step 1.
        es_state = jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.asarray(x).dtype), es_state)
        return ESRunState(es_state, jax.random.key_data(k_run), jnp.zeros((), jnp.int32))

    def place(self, run: ESRunState) -> ESRunState:
        """Replicates the run state over the mesh, as the generation step returns it
        (same placement in and out: no recompilation between generations)."""
        return jax.device_put(run, NamedSharding(self.mesh, PartitionSpec()))

    def fitness_from_returns(self, returns):
        """returns ``[P, E, S]`` -> (fitness [P], mean returns [P, E], nan count)."""
        per_env = returns.mean(-1)
        bad = ~jnp.all(jnp.isfinite(per_env), axis=-1)
        fitness = jnp.mean(per_env / self.reference, axis=-1)
        fitness = jnp.where(bad, WORST_FITNESS, fitness)
        return fitness, per_env, bad.sum().astype(jnp.int32)

    def _generation(self, run: ESRunState):
        key = jax.random.fold_in(jax.random.wrap_key_data(run.key), run.generation)
        k_ask, k_eval, k_tell = jax.random.split(key, 3)
        pop, es_state = self.es.ask(k_ask, run.es_state, self.es_params)
        returns, run, extra = self._evaluate_generation(run, pop, k_eval)  # returns [P, E, S]
        fitness, per_env, nans = self.fitness_from_returns(returns)
        es_state, _ = self.es.tell(k_tell, pop, -fitness, es_state, self.es_params)
        metrics = dict(fitness=fitness, returns=per_env, nan_count=nans, **extra)
        # Keep dtypes exactly as they came in (evosax's std schedule is weakly typed).
        es_state = jax.tree.map(lambda new, old: jnp.asarray(new, dtype=old.dtype), es_state, run.es_state)
        return run.replace(es_state=es_state, generation=run.generation + 1), metrics

    def _evaluate_generation(self, run: ESRunState, pop, key):
        """Returns ``(returns [P, E, S], run, extra metrics)``. Here: every
        candidate trains fresh agents from its own keys; ``run`` is unchanged."""
        keys = jax.random.key_data(jax.random.split(key, self.config.population))
        evaluate = lambda m, k, _: self.evaluate(m, jax.random.wrap_key_data(k))  # noqa: E731
        return self._map_population(evaluate, pop, keys, ()), run, {}

    def _map_population(self, fn, pop, member_args, shared):
        """``fn(candidate, member_arg, shared)`` for every candidate, stacked on
        a leading ``[P]`` axis. Each device runs its own slice of the population
        (``shard_map`` over the ``"pop"`` axis; ``shared`` is replicated): no
        communication inside the training loops, one gather at the end."""

        batch = self.config.member_batch
        if batch is None:
            batch = 8 if self.mesh.devices.flat[0].platform == "cpu" else None

        def local(pop, member_args, shared):
            n = jax.tree.leaves(pop)[0].shape[0]
            if batch is None or batch >= n:
                return jax.vmap(fn, (0, 0, None))(pop, member_args, shared)
            return jax.lax.map(lambda a: fn(a[0], a[1], shared), (pop, member_args), batch_size=batch)

        spec = PartitionSpec("pop")
        # check_vma=False: the inner scans start from per-member constants (env
        # resets), which shard_map's replication checker would reject.
        return jax.shard_map(local, mesh=self.mesh, in_specs=(spec, spec, PartitionSpec()), out_specs=spec,
                             check_vma=False)(pop, member_args, shared)

    def mean_meta_params(self, run: ESRunState):
        return self.es.get_mean(run.es_state)
