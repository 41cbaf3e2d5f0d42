"""ES over pipeline units: fitness from the units' progress, not whole lifetimes.

``ESTrainer`` (``meta/es.py``) scores a candidate by training fresh agents for
a whole lifetime. Here every env has ``N`` A2C training units (``meta/pipeline``)
carried across generations and reset on their staggered schedule, so the
units' ages are spread over the agent lifetime. One generation:

1. ask the ES for ``P`` candidates; units due for a reset are re-initialised;
2. every candidate drives *the same* units (same parameters, optimizer state,
   env states and keys) for ``window`` A2C updates with its own optimizer;
   its return on env ``e`` is the mean over units of the return of the
   episodes that end inside the window (a unit where none ends counts with
   its previous return, equal for all candidates);
3. fitness and tell as in ``ESTrainer`` (``return / |reference|`` averaged
   over envs; references default to 1); evosax minimises, so ``-fitness``;
4. the carried units advance by ``window`` updates with the ES *mean* (the
   optimizer the run would hand out); the candidates' copies are dropped.

Why the same units and keys for every candidate (common random numbers):
antithetic pairs ``mean +- sigma * eps`` then differ only in their
perturbation, so the difference of their fitness is the ES gradient signal
and not the luck of their envs. Why the mean drives the carried units: the
units should show what the current optimizer does at every age; following
one candidate would bias them towards noise. It costs one extra window
(``P + 1`` runs a generation). The mean's window return is logged for free
as ``es_mean_return``.

The fitness is a return, not the A2C objective: the value of the A2C loss on
a rollout is no measure of performance (advantages are re-estimated by each
candidate's own critic), only its gradient is. Windows must be long enough
for episodes to end (``window * num_steps`` env steps per unit).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import struct

import envs
from agents.a2c import A2CConfig, A2CHParams
from meta.es import ESConfig, ESRunState, ESTrainer
from meta.pipeline import PipelineConfig, make_pipeline
from meta.units import make_a2c_units


@dataclasses.dataclass(frozen=True)
class PipelineESConfig:
    """``pipeline``: units per env and their reset schedule (in generations);
    ``window``: A2C updates every unit makes per generation."""

    pipeline: PipelineConfig = PipelineConfig(num_units=4, reset_interval=20)
    window: int = 8

    def __post_init__(self):
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise ValueError(f"PipelineESConfig.window must be a positive integer, got {self.window!r}")


@struct.dataclass
class PipelineESRunState(ESRunState):
    pipes: Any  # tuple over envs of PipelineState; units are A2CState with leaves [N, ...]


class PipelineESTrainer(ESTrainer):
    """ES over pipeline units. ``config`` supplies the envs, algorithm,
    population, sigma, lr, antithetic sampling, seed and member batching
    (its ``seeds`` and ``timesteps`` are not used)."""

    def __init__(self, config: ESConfig, rule, pipeline_config: PipelineESConfig, a2c_config: A2CConfig,
                 hparams: A2CHParams, reference_returns: Optional[Sequence[float]] = None, mesh=None,
                 env_overrides: Optional[Dict[str, Dict[str, Any]]] = None):
        """``env_overrides``: env name -> ``envs.make`` overrides (e.g. ``scale_rewards``)."""
        self.pipeline_config, self.a2c_config, self.hparams = pipeline_config, a2c_config, hparams
        self.env_overrides = dict(env_overrides or {})
        if reference_returns is None:
            reference_returns = [1.0] * len(config.envs)
        super().__init__(config, rule, reference_returns, mesh)

    def _make_evaluator(self):
        self.units = tuple(make_a2c_units(self.rule, *envs.make(name, **self.env_overrides.get(name, {})),
                                          self.a2c_config, self.hparams)
                           for name in self.config.envs)
        self.pipelines = tuple(make_pipeline(self.pipeline_config.pipeline, u.init) for u in self.units)
        return self.run_window

    def run_window(self, meta_params, units_per_env):
        """``window`` A2C updates of every unit with ``meta_params``' optimizer.
        ``units_per_env``: tuple over envs of units ``[N, ...]``. Returns
        (window returns ``[E, N]``, the advanced units)."""
        returns, advanced = [], []
        for fns, units in zip(self.units, units_per_env):
            tx = fns.make_tx(meta_params)
            new, stats = jax.vmap(lambda unit: fns.run(unit, tx, self.pipeline_config.window))(units)
            returns.append(stats["window_return"])
            advanced.append(new)
        return jnp.stack(returns), tuple(advanced)

    def _init_run(self, k_init, k_run) -> PipelineESRunState:
        k_run, k_pipes = jax.random.split(k_run)
        run = super()._init_run(k_init, k_run)
        mean = self.es.get_mean(run.es_state)
        keys = jax.random.split(k_pipes, len(self.pipelines))
        pipes = tuple(p.init(k, mean) for p, k in zip(self.pipelines, keys))
        return PipelineESRunState(run.es_state, run.key, run.generation, pipes)

    def _evaluate_generation(self, run: PipelineESRunState, pop, key):
        del key  # common random numbers: every candidate uses the units' own keys
        mean = self.es.get_mean(run.es_state)
        stepped = [p.maybe_reset(s, mean) for p, s in zip(self.pipelines, run.pipes)]
        pipes = [s for s, _ in stepped]
        units = tuple(s.units for s in pipes)
        returns = self._map_population(lambda m, _, shared: self.run_window(m, shared)[0], pop, None, units)
        mean_returns, advanced = self.run_window(mean, units)
        pipes = tuple(p.advance(s, u) for p, s, u in zip(self.pipelines, pipes, advanced))
        extra = dict(es_mean_return=mean_returns.mean(-1), unit_ages=jnp.stack([s.ages for s in pipes]),
                     resets=jnp.stack([m.sum() for _, m in stepped]))
        return returns, run.replace(pipes=pipes), extra

    def env_steps_per_generation(self) -> int:
        """Candidates plus the mean, every env and unit, ``window`` rollouts each."""
        n = self.pipeline_config.pipeline.num_units
        return (self.config.population + 1) * len(self.config.envs) * n * self.pipeline_config.window \
            * self.a2c_config.batch_size
