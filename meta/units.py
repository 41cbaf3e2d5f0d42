"""A2C agents as pipeline training units, trained by a learned rule.

Both pipeline meta-trainers use these pieces: the meta-gradient trainer
(``meta/metagrad.py``) differentiates through ``run`` with a transform built
from traced meta-parameters; ES over pipeline units (``meta/pipeline_es.py``)
runs every candidate's transform on the same units and scores the returns of
the episodes that end inside the window. ``train_a2c_seeds`` trains fresh
A2C agents with any optimizer spec (final comparisons, lr sweeps, transfer).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from agents import core
from agents.a2c import A2CAgent, A2CConfig, A2CHParams, A2CState, make_a2c


class A2CUnits(NamedTuple):
    agent: A2CAgent
    init: Callable  # (key, meta_params) -> A2CState, optimizer state from the rule's transform
    make_tx: Callable  # meta_params -> the transform the agent applies (global-norm clip in front if configured)
    run: Callable  # (unit, tx, num_updates) -> (unit, stats); differentiable in tx's meta-parameters


def make_a2c_units(rule, env, env_params, a2c_config: A2CConfig, hparams: A2CHParams,
                   learning_rate=None) -> A2CUnits:
    """``rule``: anything with ``init_meta_params(key)`` and ``make_optimizer(meta_params)``
    (a ``learned_optim`` rule); ``env, env_params`` from ``envs.make``.
    ``learning_rate`` (None: the rule's own) is written into every fresh
    unit's optimizer state, where the rule has an injected one (Optim4RL)."""
    template = jax.eval_shape(rule.init_meta_params, jax.random.key(0))
    template_tx = rule.make_optimizer(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), template))
    agent = make_a2c(a2c_config, env, env_params, template_tx)

    def make_tx(meta_params):
        return agent.wrap_tx(rule.make_optimizer(meta_params))

    def init(key, meta_params):
        st = agent.init(key, hparams)
        return core.with_learning_rate(st.replace(opt_state=make_tx(meta_params).init(st.params)), learning_rate)

    def update(st: A2CState, tx):
        st, traj = agent.rollout(st)
        key, k_opt = jax.random.split(st.key)
        params, opt_state, aux = agent.update_with(st.params, st.opt_state, traj, st.obs, st.hparams, tx,
                                                   st.update_step, k_opt)
        done = traj["episode_done"]
        n_done = done.sum()
        return_sum = jnp.sum(traj["episode_return"] * done)
        last_return = jnp.where(n_done > 0, return_sum / jnp.maximum(n_done, 1), st.last_return)
        st = st.replace(params=params, opt_state=opt_state, key=key, update_step=st.update_step + 1,
                        last_return=last_return)
        return st, dict(return_sum=return_sum, episodes=n_done.astype(jnp.float32), entropy=aux["entropy"])

    def run(unit: A2CState, tx, num_updates: int):
        """``num_updates`` A2C updates (rollout + one step of ``tx``). Stats:
        ``window_return`` = mean return of the episodes that ended in these
        rollouts (the unit's previous ``last_return`` when none ended),
        ``episodes`` = how many ended, ``entropy`` = mean policy entropy."""
        start_return = unit.last_return
        unit, stats = jax.lax.scan(lambda s, _: update(s, tx), unit, None, num_updates)
        episodes = stats["episodes"].sum()
        window_return = jnp.where(episodes > 0, stats["return_sum"].sum() / jnp.maximum(episodes, 1.0),
                                  start_return)
        return unit, dict(window_return=window_return, episodes=episodes, entropy=stats["entropy"].mean())

    return A2CUnits(agent, init, make_tx, run)


def lifetime_env_steps(reset_interval: int, rollouts_per_step: int, a2c_config: A2CConfig) -> int:
    """Env steps one pipeline unit takes between two resets."""
    return reset_interval * rollouts_per_step * a2c_config.batch_size


def train_a2c_seeds(env_name: str, optimizer_spec: str, a2c_config: A2CConfig, hparams: A2CHParams,
                    num_seeds: int, seed: int = 0, learning_rate: Optional[float] = None) -> Dict[str, Any]:
    """Trains ``num_seeds`` fresh A2C agents (vmapped) on ``env_name`` with the
    optimizer ``optimizer_spec`` (e.g. ``adam:lr=3e-3``, ``lopt:DIR``) for
    ``a2c_config.total_timesteps`` steps, ``learning_rate`` written into the
    optimizer's injected learning rate (None: the spec's own). Returns
    per-seed final returns (mean over the last 10% of updates), curves
    ``[S, U]`` and their env steps; ``lr`` is the learning rate asked for,
    as the float32 the optimizer holds (None: none asked, the optimizer's own)."""
    import envs
    from agents.ppo import final_return
    from agents.presets import make_optimizer, optimizer_spec as agent_optimizer_spec

    if num_seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {num_seeds}")
    env, env_params = envs.make(env_name)
    agent = make_a2c(a2c_config, env, env_params, make_optimizer(optimizer_spec, "a2c"))
    keys = jax.random.split(jax.random.key(seed), num_seeds)
    _, m = jax.jit(jax.vmap(agent.train, (0, None, None)))(keys, hparams, learning_rate)
    m = jax.device_get(m)
    fr = np.asarray(final_return(m, 0.1), np.float64)
    steps = (np.arange(1, a2c_config.num_updates + 1) * a2c_config.batch_size).tolist()
    return dict(env=env_name, optimizer=optimizer_spec, optimizer_as_built=agent_optimizer_spec(optimizer_spec, "a2c"),
                lr=None if learning_rate is None else float(np.float32(learning_rate)), seeds=num_seeds, seed=seed,
                timesteps_per_seed=a2c_config.num_updates * a2c_config.batch_size,
                config=dataclasses.asdict(a2c_config), final_return=fr.tolist(),
                final_return_mean=float(fr.mean()),
                final_return_se=float(fr.std(ddof=1) / np.sqrt(len(fr))) if len(fr) > 1 else 0.0,
                diverged_seeds=int(np.sum(~np.asarray(m["finite"])[:, -1])),
                steps=steps, curves=np.asarray(m["episode_return"]).tolist())


def train_a2c_lr_sweep(env_name: str, optimizer_spec: str, a2c_config: A2CConfig, hparams: A2CHParams,
                       lrs, num_seeds: int, seed: int = 0) -> Dict[str, Any]:
    """An A2C learning-rate sweep as one vmapped program: ``len(lrs) x
    num_seeds`` fresh agents, lr ``lrs[i]`` on keys ``split(key(seed),
    num_seeds)`` (the same keys for every lr). Returns ``final_return [L, S]``
    (mean over the last 10% of updates), ``diverged [L, S]`` and ``lrs``."""
    import envs
    from agents.ppo import final_return
    from agents.presets import make_optimizer

    lrs = [float(x) for x in lrs]
    env, env_params = envs.make(env_name)
    agent = make_a2c(a2c_config, env, env_params, make_optimizer(optimizer_spec, "a2c"))
    keys = jnp.tile(jax.random.split(jax.random.key(seed), num_seeds), (len(lrs),))
    lr_pop = jnp.repeat(jnp.asarray(lrs, jnp.float32), num_seeds)
    _, m = jax.jit(jax.vmap(agent.train, (0, None, 0)))(keys, hparams, lr_pop)
    m = jax.device_get(m)
    fr = np.asarray(final_return(m, 0.1), np.float64).reshape(len(lrs), num_seeds)
    diverged = ~np.asarray(m["finite"])[:, -1].reshape(len(lrs), num_seeds)
    return dict(lrs=lrs, final_return=fr.tolist(), diverged=diverged.tolist(), seeds=num_seeds, seed=seed,
                key_stream=f"split(key({seed}), {num_seeds})")
