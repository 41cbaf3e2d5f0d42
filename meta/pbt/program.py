"""The PBT program: one round (train, then select) as pure functions.

A population is stacked along a leading member axis ``[P, ...]`` (per group,
``population``). One *round* is ``interval`` agent updates of every member
(``jax.vmap(agent.run)``) followed by a selection step; both are pure and run
inside one ``jax.jit``. Tuned hyperparameters are arrays: fields of
``state.hparams`` (e.g. ``PPOHParams``) and ``"lr"``, the optimizer's injected
``learning_rate`` in ``state.opt_state`` (``space.member_matrix`` reads them,
``space.with_member_matrix`` writes them), so changing them never recompiles.

Mixed-optimizer populations: trace-time Python loops run over groups, never
over members. Exploit copies parameters and hyperparameters across groups;
the receiver copies the source's optimizer state when both groups have the
same spec and re-initialises it from the copied parameters when they differ.
A learning rate crossing groups with other bounds keeps its unit coordinate
(its relative position between the bounds).

Rounds are synchronous: every member is "ready" at every interval.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from meta import distributed
from meta.pbt.exploit import member_fitness
from meta.pbt.pb2 import PB2Data, pb2_empty
from meta.pbt.population import Group, MemberAgent
from meta.pbt.select import ALGORITHMS, ALGOS, EXPLOITS, EXPLORES, Round
from meta.pbt.space import (LEARNING_RATE, HParamSpace, from_unit, member_matrix, sample_prior, to_unit,
                            with_member_matrix)


@dataclasses.dataclass(frozen=True)
class PBTConfig:
    """Static settings of a PBT run."""

    algo: str = "pbt"
    exploit: str = "truncation"
    explore: str = "perturb"
    interval: int = 10  # agent updates per round
    window: int = 10  # returns of the latest finished episodes kept per member (the fitness window)
    truncation_fraction: float = 0.2  # Jaderberg et al.: the bottom 20% copy the top 20%
    ttest_alpha: float = 0.05
    resample_prob: float = 0.25  # resample_or_perturb's and GPBT-PL's per-value redraw probability
    perturb_factors: Tuple[float, ...] = (0.8, 1.2)
    gpbt_w1: float = 1.0  # inertia weight (the authors' default)
    gpbt_w2: float = 1.0  # weight of the pull toward the faster member
    gpbt_pairing: str = "quantile"  # the official code's; "random": the paper's text
    gpbt_quantile: float = 0.25  # the official code's quantile_fraction
    pb2_history: int = 200  # PB2's data rows kept, newest first (Ray keeps 1000; see meta/pbt/pb2.py)
    pb2_candidates: int = 256  # random points scored before the acquisition's gradient refinement

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"--algo {self.algo!r}; allowed: {', '.join(ALGOS)}")
        if self.exploit not in EXPLOITS:
            raise ValueError(f"--exploit {self.exploit!r}; allowed: {', '.join(EXPLOITS)}")
        if self.explore not in EXPLORES:
            raise ValueError(f"--explore {self.explore!r}; allowed: {', '.join(EXPLORES)}")
        for f in ("interval", "window", "pb2_history", "pb2_candidates"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ValueError(f"PBTConfig.{f} (--{f.replace('_', '-')}) must be a positive integer, "
                                 f"got {getattr(self, f)!r}")
        from meta.pbt.gpbt import PAIRINGS

        if self.gpbt_pairing not in PAIRINGS:
            raise ValueError(f"--gpbt-pairing {self.gpbt_pairing!r}; allowed: {', '.join(PAIRINGS)}")
        if not 0 < self.gpbt_quantile <= 0.5:
            raise ValueError(f"--gpbt-quantile must be in (0, 0.5], got {self.gpbt_quantile}")
        if not 0 < self.truncation_fraction <= 0.5:
            raise ValueError(f"--truncation-fraction must be in (0, 0.5], got {self.truncation_fraction}")
        if not 0 < self.ttest_alpha < 1:
            raise ValueError(f"--ttest-alpha must be in (0, 1), got {self.ttest_alpha}")
        if not 0 <= self.resample_prob <= 1:
            raise ValueError(f"--resample-prob must be in [0, 1], got {self.resample_prob}")
        object.__setattr__(self, "perturb_factors", tuple(float(f) for f in self.perturb_factors))


@struct.dataclass
class PBTState:
    """Population state: ``members`` is a tuple with one stacked agent state
    per group; the rest is over all ``P`` members in group order."""

    members: Tuple[Any, ...]
    returns_buf: jax.Array  # [P, W] returns of the latest finished episodes, newest last
    returns_count: jax.Array  # [P] int32 valid entries at the end of returns_buf (0 after a copy)
    prev_fitness: jax.Array  # [P] fitness at the end of the previous round (after copying)
    velocity: jax.Array  # [P, H] GPBT-PL velocities (unit coordinates)
    pb2: PB2Data
    key: jax.Array  # raw uint32 key data
    round: jax.Array  # int32 rounds done


class PBT(NamedTuple):
    """Pure functions of a PBT run (``jax.jit`` them; ``step`` = ``train``
    then ``select``)."""

    init: Callable[[jax.Array], PBTState]
    train: Callable[[PBTState], Tuple[PBTState, jax.Array]]
    select: Callable[[PBTState, jax.Array], Tuple[PBTState, Dict[str, jax.Array]]]
    step: Callable[[PBTState], Tuple[PBTState, Dict[str, jax.Array]]]
    hparams_matrix: Callable[[PBTState], jax.Array]
    groups: Tuple[Group, ...]
    spaces: Tuple[HParamSpace, ...]
    hparam_fields: Tuple[str, ...]  # the agent's hparams fields (the learning rate is not one)


def _concat(trees):
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *trees)


def _take(tree, idx):
    return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), tree)


def _finite_members(tree) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    ok = jnp.ones((leaves[0].shape[0],), bool) if leaves else None
    for x in leaves:
        ok = ok & jnp.all(jnp.isfinite(x.reshape((x.shape[0], -1))), axis=-1)
    return ok


def _episodes_of(metrics):
    """``(returns, done)`` ``[M, K]``: the finished episodes of ``M`` members'
    ``interval`` updates, in time order. From the agents' per-env
    ``env_episode_return``/``env_episode_done`` (``agents.core.episode_metrics``);
    an agent that reports only ``episode_return`` (and maybe ``episodes``)
    counts each update's value as one episode (where ``episodes > 0``)."""
    ret = jnp.asarray(metrics["episode_return"], jnp.float32)
    m = ret.shape[0]
    if "env_episode_return" in metrics:
        return (metrics["env_episode_return"].reshape((m, -1)).astype(jnp.float32),
                metrics["env_episode_done"].reshape((m, -1)).astype(bool))
    done = metrics["episodes"] > 0 if "episodes" in metrics else jnp.ones(ret.shape, bool)
    return ret.reshape((m, -1)), done.reshape((m, -1))


def push_episodes(buf, count, returns, done):
    """Appends each member's finished-episode returns to its window.

    ``buf [P, W]`` holds the latest ``count [P]`` finished-episode returns at
    its end (oldest first); ``returns``/``done`` ``[P, K]`` are the new
    episodes in time order, where ``done`` marks the real ones. Returns the
    new ``(buf, count)``: the newest ``min(count + sum(done), W)`` returns."""
    w = buf.shape[1]
    valid_old = jnp.arange(w)[None, :] >= (w - count[:, None])
    vals = jnp.concatenate([buf, returns.astype(buf.dtype)], axis=1)
    valid = jnp.concatenate([valid_old, done.astype(bool)], axis=1)
    # Stable: invalid entries first, valid ones after them in their order.
    order = jnp.argsort(valid.astype(jnp.int32), axis=1, stable=True)
    vals = jnp.take_along_axis(vals, order, axis=1)[:, -w:]
    n = jnp.minimum(count + jnp.sum(done, axis=1).astype(jnp.int32), w)
    return jnp.where(jnp.arange(w)[None, :] >= (w - n[:, None]), vals, 0.0), n.astype(jnp.int32)


def make_pbt(config: PBTConfig, agents: Sequence[MemberAgent], groups: Sequence[Group],
             spaces: Sequence[HParamSpace], base_hparams) -> PBT:
    """Builds the PBT program.

    ``agents[g]`` / ``groups[g]`` / ``spaces[g]``: the agent, optimizer group
    and tuned space of each group (spaces share names and scales; bounds may
    differ; ``"lr"`` is the optimizer's injected learning rate).
    ``base_hparams``: the agent's hparams NamedTuple (scalars) with the values
    of the untuned fields. Initial tuned values are drawn from the
    prior (the same draw for every ``algo`` with the same seed, so ``fixed``
    is the matching baseline).
    """
    groups, spaces = tuple(groups), tuple(spaces)
    if not (len(agents) == len(groups) == len(spaces)) or not groups:
        raise ValueError("make_pbt: agents, groups and spaces must have one entry per group")
    names, codes_np = spaces[0].names, spaces[0].codes()
    for s in spaces:
        if s.names != names or s.scale != spaces[0].scale:
            raise ValueError("make_pbt: every group must tune the same hyperparameters with the same scales")
    missing = [n for n in names if n not in base_hparams._fields and n != LEARNING_RATE]
    if missing:
        raise ValueError(f"tuned hyperparameter(s) {missing} are not fields of {type(base_hparams).__name__}; "
                         f"allowed: {', '.join((LEARNING_RATE,) + base_hparams._fields)}")
    sizes = [g.size for g in groups]
    p = sum(sizes)
    if p < 2 and config.algo != "fixed":
        raise ValueError(f"--population {p}: {config.algo} needs at least 2 members")
    offsets = np.cumsum([0] + sizes)
    h = len(names)
    group_of = jnp.asarray(np.repeat(np.arange(len(groups)), sizes), jnp.int32)
    low = jnp.asarray(np.repeat(np.array([s.low for s in spaces], np.float32), sizes, axis=0))  # [P, H]
    high = jnp.asarray(np.repeat(np.array([s.high for s in spaces], np.float32), sizes, axis=0))
    codes = jnp.asarray(codes_np)
    n_hist = config.pb2_history
    interval = config.interval

    def hparams_matrix(state: PBTState) -> jax.Array:
        return jnp.concatenate([member_matrix(m, names) for m in state.members])

    def init(key) -> PBTState:
        k_hp, k_members, k_run = jax.random.split(key, 3)
        tuned = sample_prior(k_hp, (p,), low, high, codes)
        members = []
        for g, agent in enumerate(agents):
            sl = slice(offsets[g], offsets[g + 1])
            hp = jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.float32), (sizes[g],)), base_hparams)
            keys = jax.random.split(jax.random.fold_in(k_members, g), sizes[g])
            members.append(with_member_matrix(jax.vmap(agent.init)(keys, hp), names, tuned[sl]))
        return PBTState(
            members=tuple(members),
            returns_buf=jnp.zeros((p, config.window), jnp.float32),
            returns_count=jnp.zeros((p,), jnp.int32),
            prev_fitness=jnp.zeros((p,), jnp.float32),
            velocity=jnp.zeros((p, h), jnp.float32),
            pb2=pb2_empty(n_hist, h),
            key=jax.random.key_data(k_run),
            round=jnp.zeros((), jnp.int32),
        )

    def train(state: PBTState):
        """``interval`` updates of every member; returns (state, returns [P, interval])."""
        members, rets, ep_ret, ep_done = [], [], [], []
        for agent, m in zip(agents, state.members):
            m, metrics = jax.vmap(lambda s: agent.run(s, interval))(m)
            members.append(m)
            rets.append(jnp.asarray(metrics["episode_return"], jnp.float32))
            r, d = _episodes_of(metrics)
            ep_ret.append(r)
            ep_done.append(d)
        rets = jnp.concatenate(rets)
        buf, count = push_episodes(state.returns_buf, state.returns_count, jnp.concatenate(ep_ret),
                                   jnp.concatenate(ep_done))
        return state.replace(members=tuple(members), returns_buf=buf, returns_count=count), rets

    def copy_members(members, src):
        """Every member takes ``copy_fields`` of member ``src`` (global
        indices); optimizer states are copied within a kind, re-initialised
        across kinds; tuned values (the learning rate with the hparams)
        crossing groups keep their unit position."""
        out = []
        h_all = jnp.concatenate([member_matrix(mm, names) for mm in members])
        for g, (agent, m) in enumerate(zip(agents, members)):
            sl = slice(offsets[g], offsets[g + 1])
            s_g = src[sl]
            new = {}
            for f in agent.copy_fields:
                if f in ("opt_state", "hparams"):
                    continue
                new[f] = _take(_concat([getattr(mm, f) for mm in members]), s_g)
            h_g = h_all[sl]  # without "hparams" in copy_fields a member keeps its own tuned values
            if "hparams" in agent.copy_fields:
                new["hparams"] = _take(_concat([mm.hparams for mm in members]), s_g)
                h_src, h_dst_low, h_dst_high = h_all[s_g], low[sl], high[sl]
                same = jnp.all((low[s_g] == h_dst_low) & (high[s_g] == h_dst_high), -1, keepdims=True)
                mapped = from_unit(to_unit(h_src, low[s_g], high[s_g], codes), h_dst_low, h_dst_high, codes)
                h_g = jnp.where(same, h_src, mapped)
            if "opt_state" in agent.copy_fields:
                params = new.get("params", m.params)
                opt = jax.vmap(agent.init_opt)(params)
                for s, other in enumerate(members):
                    if groups[s].spec != groups[g].spec:
                        continue
                    local = jnp.clip(s_g - offsets[s], 0, sizes[s] - 1)
                    from_s = (group_of[s_g] == s)
                    cand = _take(other.opt_state, local)
                    opt = jax.tree.map(
                        lambda c, o: jnp.where(from_s.reshape((-1,) + (1,) * (c.ndim - 1)), c, o), cand, opt)
                new["opt_state"] = opt
            out.append(with_member_matrix(m.replace(**new), names, h_g))
        return tuple(out)

    algorithm = ALGORITHMS[config.algo]

    def select(state: PBTState, rets):
        """Exploit + explore after a round. ``rets [P, interval]`` the round's returns."""
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.round)
        k_sel, k_exp = jax.random.split(key)
        # A member without a finished episode since its last copy reports the
        # fitness it inherited and sits the round out (no evidence yet).
        fitness = member_fitness(state.returns_buf, state.returns_count, state.prev_fitness)
        eligible = state.returns_count >= 1
        finite = jnp.concatenate([_finite_members(m.params) for m in state.members])
        bad = ~jnp.isfinite(fitness) | ~finite
        h_before = hparams_matrix(state)
        rnd = Round(state=state, fitness=fitness, bad=bad, u=to_unit(h_before, low, high, codes), h=h_before,
                    low=low, high=high, codes=codes, eligible=eligible)
        choice = algorithm.exploit(k_sel, config, rnd)
        src = choice.src
        replaced = src != jnp.arange(p, dtype=jnp.int32)
        members = copy_members(state.members, src)
        h_copied = jnp.concatenate([member_matrix(m, names) for m in members])
        h_new = jnp.where(replaced[:, None], algorithm.explore(k_exp, config, rnd, choice, h_copied), h_copied)
        members = tuple(with_member_matrix(m, names, h_new[offsets[g]:offsets[g + 1]]) for g, m in enumerate(members))
        new_state = state.replace(
            members=members,
            # A copier's record restarts: it is judged on its own episodes from now on.
            returns_count=jnp.where(replaced, 0, state.returns_count),
            prev_fitness=jnp.where(bad[src], 0.0, fitness[src]),
            velocity=choice.velocity,
            pb2=choice.pb2,
            round=state.round + 1,
        )
        info = dict(
            fitness=fitness, last_return=rets[:, -1], bad=bad, src=src, replaced=replaced, eligible=eligible,
            hparams_used=h_before, hparams_next=h_new,
        )
        return new_state, info

    def step(state: PBTState):
        state, rets = train(state)
        return select(state, rets)

    return PBT(init, train, select, step, hparams_matrix, groups, spaces, tuple(base_hparams._fields))


def population_shardings(state: PBTState, mesh):
    """Shardings for ``state`` on ``mesh`` (``distributed.population_mesh``):
    every member axis split over ``"pop"`` (each device trains its slice of
    every group), PB2 data, key and round counter replicated. Selection
    gathers across devices; XLA inserts the collectives. Jit the step with
    ``distributed.jit_placed(program.step, shardings)``."""
    pop, rep = distributed.split_sharding(mesh), distributed.replicated_sharding(mesh)
    return state.replace(
        members=tuple(jax.tree.map(lambda _: pop, m) for m in state.members),
        returns_buf=pop, returns_count=pop, prev_fitness=pop, velocity=pop,
        pb2=jax.tree.map(lambda _: rep, state.pb2), key=rep, round=rep,
    )
