"""ES over pipeline units: fitness from the units' progress, not whole lifetimes.

``meta.es.lifetime_evaluation`` scores a candidate by training fresh agents for
a whole lifetime. ``unit_evaluation`` here is the other evaluation for
``meta.es.make_es``: every env has ``N`` A2C training units
(``meta/pipeline``) carried across generations in the ES state and reset on
their staggered schedule, so the units' ages are spread over the agent
lifetime. One generation:

1. ask the ES for ``P`` candidates; units due for a reset are re-initialised;
2. every candidate drives *the same* units (same parameters, optimizer state,
   env states and keys) for ``window`` A2C updates with its own optimizer;
   its return on env ``e`` is the mean over units of the return of the
   episodes that end inside the window (a unit where none ends counts with
   its previous return, equal for all candidates);
3. fitness and tell as for whole lifetimes (``return / |reference|`` averaged
   over envs; references default to 1); evosax minimises, so ``-fitness``.
   With ``fitness="relative"`` a candidate's score on a unit is its return
   there relative to the ES mean's on the same unit, in units of the
   candidates' spread on it (``relative_scores``): every unit counts alike;
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
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp

import envs
from agents.a2c import A2CConfig, A2CHParams
from meta.es import ESConfig
from meta.pipeline import PipelineConfig, make_pipeline
from meta.units import make_a2c_units


@dataclasses.dataclass(frozen=True)
class PipelineESConfig:
    """``pipeline``: units per env and their reset schedule (in generations);
    ``window``: A2C updates every unit makes per generation."""

    pipeline: PipelineConfig = PipelineConfig(num_units=4, reset_interval=20)
    window: int = 8
    fitness: str = "return"  # UNIT_FITNESS

    def __post_init__(self):
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise ValueError(f"PipelineESConfig.window must be a positive integer, got {self.window!r}")
        if self.fitness not in UNIT_FITNESS:
            raise ValueError(f"--unit-fitness {self.fitness!r}; allowed: {', '.join(UNIT_FITNESS)}")


# What a candidate's score on one unit is. "return": its window return (the
# mean over units then favours the units whose returns spread most, the old
# ones). "relative": its window return minus the ES mean's on the same unit
# (same parameters, state and keys), divided by the spread of the
# candidates' returns on that unit (at least the env's mean spread over units),
# so no unit outweighs the others because of its age.
UNIT_FITNESS = ("return", "relative")
RELATIVE_EPS = 1e-6


def relative_scores(returns: jax.Array, mean_returns: jax.Array) -> jax.Array:
    """``(R[p, e, u] - M[e, u]) / (max(s[e, u], mean_u s[e, u]) + eps)`` with
    ``s[e, u] = std_p R[., e, u]``: candidates' window returns ``[P, E, N]``
    relative to the ES mean's ``[E, N]`` on the same units, per unit in units
    of the candidates' spread there (floored at the env's mean spread). A
    non-finite candidate stays non-finite (``make_es`` marks it bad) and is
    left out of the spread, so it cannot poison the others' scores."""
    returns = jnp.where(jnp.isfinite(returns), returns, jnp.nan)
    spread = jnp.nanstd(returns, axis=0)  # [E, N]
    # A unit whose candidates barely differ (no episode ended in the window) must not
    # turn that noise into large scores: its spread is floored at the env's mean spread.
    spread = jnp.maximum(spread, jnp.nanmean(spread, axis=-1, keepdims=True))
    return (returns - mean_returns[None]) / (spread[None] + RELATIVE_EPS)


class UnitEvaluation(NamedTuple):
    """An ``meta.es.Evaluation`` (the first three fields) plus the window one
    optimizer runs on the units."""

    init: Callable  # (key, mean) -> tuple over envs of PipelineState (units: A2CState, leaves [N, ...])
    evaluate: Callable
    env_steps_per_generation: int
    run_window: Callable  # (meta_params, units per env) -> (window returns [E, N], advanced units)


def unit_evaluation(config: ESConfig, rule, pipeline_config: PipelineESConfig, a2c_config: A2CConfig,
                    hparams: A2CHParams, env_overrides: Optional[Dict[str, Dict[str, Any]]] = None,
                    learning_rate=None) -> UnitEvaluation:
    """Evaluation over pipeline units for ``make_es(config, rule, ...)``; of
    ``config`` it uses the envs and the population (not ``seeds`` or
    ``timesteps``). ``env_overrides``: env name -> ``envs.make`` overrides
    (e.g. ``scale_rewards``); ``learning_rate``: the units' agent learning
    rate (None: the rule's own)."""
    env_overrides = dict(env_overrides or {})
    units = tuple(make_a2c_units(rule, *envs.make(name, **env_overrides.get(name, {})), a2c_config, hparams,
                                 learning_rate) for name in config.envs)
    pipelines = tuple(make_pipeline(pipeline_config.pipeline, u.init) for u in units)

    def run_window(meta_params, units_per_env):
        """``window`` A2C updates of every unit with ``meta_params``' optimizer.
        ``units_per_env``: tuple over envs of units ``[N, ...]``. Returns
        (window returns ``[E, N]``, the advanced units)."""
        returns, advanced = [], []
        for fns, unit_batch in zip(units, units_per_env):
            tx = fns.make_tx(meta_params)
            new, stats = jax.vmap(lambda unit: fns.run(unit, tx, pipeline_config.window))(unit_batch)
            returns.append(stats["window_return"])
            advanced.append(new)
        return jnp.stack(returns), tuple(advanced)

    def init(key, mean):
        keys = jax.random.split(key, len(pipelines))
        return tuple(p.init(k, mean) for p, k in zip(pipelines, keys))

    def evaluate(pipes, pop, key, mean, map_population):
        del key  # common random numbers: every candidate uses the units' own keys
        stepped = [p.maybe_reset(s, mean) for p, s in zip(pipelines, pipes)]
        pipes = [s for s, _ in stepped]
        unit_states = tuple(s.units for s in pipes)
        returns = map_population(lambda m, _, shared: run_window(m, shared)[0], pop, None, unit_states)
        mean_returns, advanced = run_window(mean, unit_states)
        pipes = tuple(p.advance(s, u) for p, s, u in zip(pipelines, pipes, advanced))
        extra = dict(es_mean_return=mean_returns.mean(-1), unit_ages=jnp.stack([s.ages for s in pipes]),
                     resets=jnp.stack([m.sum() for _, m in stepped]), candidate_return=returns.mean(-1))
        if pipeline_config.fitness == "relative":
            returns = relative_scores(returns, mean_returns)
        return returns, pipes, extra

    # Candidates plus the mean, every env and unit, ``window`` rollouts each.
    steps = ((config.population + 1) * len(config.envs) * pipeline_config.pipeline.num_units
             * pipeline_config.window * a2c_config.batch_size)
    return UnitEvaluation(init, evaluate, steps, run_window)
