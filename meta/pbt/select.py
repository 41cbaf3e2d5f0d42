"""Selection after a round, by name: one table of algorithms, one of exploit
rules, one of explore rules.

An algorithm is two steps around the copying of weights (``program``):
``exploit(key, config, rnd) -> Choice`` decides who copies from whom (and
updates the algorithm's own state: GPBT-PL velocities, PB2's data), and
``explore(key, config, rnd, choice, h_copied) -> h [P, H]`` proposes the
hyperparameters of the members that copied (kept only where a member was
replaced). ``config`` is a ``PBTConfig``; its ``exploit`` and ``explore``
names pick the rules of ``pbt`` (``pb2`` uses the exploit rule and its own
explore).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from meta.pbt.exploit import tournament_select, truncation_select, ttest_select
from meta.pbt.explore import perturb, resample, resample_or_perturb
from meta.pbt.gpbt import gpbt_pl_update
from meta.pbt.pb2 import PB2Data, pb2_propose, pb2_record
from meta.pbt.space import from_unit, to_unit


class Round(NamedTuple):
    """What selection sees of a round: ``state`` (a ``PBTState`` after
    training), ``fitness [P]``, ``bad [P]`` (never a source), ``u [P, H]`` and
    ``h [P, H]`` the unit and natural hyperparameters used during the round, the bounds ``low``, ``high``
    ``[P, H]`` and scale ``codes [H]`` of every member, and ``eligible [P]``:
    the members with evidence since their last copy (the others are neither
    compared nor copied this round)."""

    state: Any
    fitness: jax.Array
    bad: jax.Array
    u: jax.Array
    h: jax.Array
    low: jax.Array
    high: jax.Array
    codes: jax.Array
    eligible: jax.Array


class Choice(NamedTuple):
    """``src [P] int32`` (each member's source; itself when kept), the
    velocities ``[P, H]`` and PB2 data after the round, and GPBT-PL's learned
    natural hyperparameters ``h_next [P, H]`` (None for the others)."""

    src: jax.Array
    velocity: jax.Array
    pb2: PB2Data
    h_next: Optional[jax.Array] = None


class Algorithm(NamedTuple):
    exploit: Callable[..., Choice]
    explore: Callable[..., jax.Array]


# Exploit rules: (key, config, rnd) -> src [P].
EXPLOIT_RULES = {
    "truncation": lambda key, config, rnd: truncation_select(key, rnd.fitness, rnd.bad, config.truncation_fraction,
                                                             rnd.eligible),
    "ttest": lambda key, config, rnd: ttest_select(key, rnd.state.returns_buf, rnd.state.returns_count, rnd.bad,
                                                   config.ttest_alpha, rnd.eligible),
    "tournament": lambda key, config, rnd: tournament_select(key, rnd.fitness, rnd.bad, rnd.eligible),
}

# Explore rules: (key, config, h [P, H], low, high, codes) -> h [P, H].
EXPLORE_RULES = {
    "perturb": lambda key, config, h, low, high, codes: perturb(key, h, low, high, codes, config.perturb_factors),
    "resample": lambda key, config, h, low, high, codes: resample(key, h, low, high, codes),
    "resample_or_perturb": lambda key, config, h, low, high, codes: resample_or_perturb(
        key, h, low, high, codes, config.resample_prob, config.perturb_factors),
}


def _keep_all(key, config, rnd: Round) -> Choice:
    src = jnp.arange(rnd.fitness.shape[0], dtype=jnp.int32)
    return Choice(src, rnd.state.velocity, rnd.state.pb2)


def _reset_replaced(velocity, src):
    """Velocities of replaced members restart at 0 (all but GPBT-PL)."""
    replaced = src != jnp.arange(src.shape[0], dtype=jnp.int32)
    return jnp.where(replaced[:, None], 0.0, velocity)


def _exploit_by_rule(key, config, rnd: Round) -> Choice:
    src = EXPLOIT_RULES[config.exploit](key, config, rnd)
    return Choice(src, _reset_replaced(rnd.state.velocity, src), rnd.state.pb2)


def _exploit_and_record(key, config, rnd: Round) -> Choice:
    """The exploit rule, and PB2 records the round as Ray's rows: the time at
    its end (rounds done), each member's fitness at its start (``R_before``:
    its own, or its source's after a copy), the unit hyperparameters used and
    the fitness change over the round (round 0 has no start fitness)."""
    choice = _exploit_by_rule(key, config, rnd)
    state = rnd.state
    improvement = rnd.fitness - state.prev_fitness
    # A member without a finished episode this round reports no result (its fitness is inherited).
    ok = ~rnd.bad & rnd.eligible & jnp.isfinite(state.prev_fitness) & (state.round > 0)
    t_end = (state.round + 1).astype(jnp.float32)
    return choice._replace(pb2=pb2_record(state.pb2, t_end, state.prev_fitness, rnd.u, improvement, ok))


def _gpbt_exploit(key, config, rnd: Round) -> Choice:
    src, h_next, velocity = gpbt_pl_update(key, rnd.fitness, rnd.bad, rnd.h, rnd.state.velocity, rnd.low, rnd.high,
                                           rnd.codes, config.gpbt_w1, config.gpbt_w2, config.resample_prob,
                                           config.gpbt_pairing, config.gpbt_quantile, rnd.eligible)
    return Choice(src, velocity, rnd.state.pb2, h_next)


def _keep_hparams(key, config, rnd: Round, choice: Choice, h_copied):
    return h_copied


def _explore_by_rule(key, config, rnd: Round, choice: Choice, h_copied):
    return EXPLORE_RULES[config.explore](key, config, h_copied, rnd.low, rnd.high, rnd.codes)


def _gpbt_explore(key, config, rnd: Round, choice: Choice, h_copied):
    return choice.h_next


def _pb2_explore(key, config, rnd: Round, choice: Choice, h_copied):
    replaced = choice.src != jnp.arange(choice.src.shape[0], dtype=jnp.int32)
    u_new = pb2_propose(key, choice.pb2, choice.src, replaced, to_unit(h_copied, rnd.low, rnd.high, rnd.codes),
                        config.pb2_candidates)
    return from_unit(u_new, rnd.low, rnd.high, rnd.codes)


ALGORITHMS = {
    "pbt": Algorithm(_exploit_by_rule, _explore_by_rule),
    "gpbt": Algorithm(_gpbt_exploit, _gpbt_explore),
    "pb2": Algorithm(_exploit_and_record, _pb2_explore),
    "fixed": Algorithm(_keep_all, _keep_hparams),
}

ALGOS = tuple(ALGORITHMS)
EXPLOITS = tuple(EXPLOIT_RULES)
EXPLORES = tuple(EXPLORE_RULES)
