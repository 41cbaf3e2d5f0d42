"""Training PPO over several seeds in one vmapped program, in chunks so a
host loop can report progress between them, and learning-rate sweeps as one
program. Used by ``meta.cli.train``, ``meta.benchmark`` and the final
comparisons of meta-training. Configs come from ``agents.presets``."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import envs
from agents.ppo import PPOConfig, PPOHParams, final_return, make_ppo
from agents.presets import make_optimizer, optimizer_spec as agent_optimizer_spec
from learned_optim import registry
from learned_optim.spec import explicit_learning_rate
from meta.host import chunk_sizes, fmt_eta, peak_memory_mb


def learning_rate_for(optimizer_spec: str, preset_lr: float, lr: Optional[float] = None) -> float:
    """The learning rate to train ``optimizer_spec`` with: an explicit ``lr``
    (e.g. ``--lr``) > the spec's own ``lr=`` > the env preset's ``preset_lr``
    where the registry says it applies (``uses_preset_lr``: the Adam family,
    which the presets were tuned for) > the optimizer's own default (``kfac``
    0.05, ``sgd`` 0.01, ...). Optimizers without an injected learning rate
    (OPEN) get ``preset_lr``, which they leave unused (results report it)."""
    if lr is not None:
        return lr
    spec_lr = explicit_learning_rate(optimizer_spec)
    if spec_lr is not None:
        return spec_lr
    info = registry.info(optimizer_spec)
    if info.uses_preset_lr or info.default_lr is None:
        return preset_lr
    return info.default_lr


# Independent key stream for learning-rate tuning runs (``fold_in`` tag), so
# tuning seeds never coincide with evaluation seeds ``split(key(seed), n)``.
TUNING_STREAM = 0x7475  # "tu"


def evaluation_keys(seed: int, num_seeds: int) -> jax.Array:
    """Keys ``[num_seeds]`` of the evaluation runs (``train_seeds``)."""
    return jax.random.split(jax.random.key(seed), num_seeds)


def tuning_keys(seed: int, num_seeds: int) -> jax.Array:
    """Keys ``[num_seeds]`` of learning-rate tuning runs: a stream disjoint from
    ``evaluation_keys(seed, .)`` (folded in before splitting)."""
    return jax.random.split(jax.random.fold_in(jax.random.key(seed), TUNING_STREAM), num_seeds)


def _train_members(env_name, optimizer_spec, config, hp_pop: PPOHParams, lrs, keys, log, target_chunks, label):
    """Trains ``M`` PPO members (``hp_pop`` leaves, learning rates ``lrs`` and
    ``keys`` are ``[M]``) in one vmapped program, in chunks for progress
    output. Returns the raw arrays (curves/counts/finite ``[M, U]``), timings
    and ``uses_lr``."""
    env, env_params = envs.make(env_name)
    tx = make_optimizer(optimizer_spec, "ppo")
    agent = make_ppo(config, env, env_params, tx)
    num_members = keys.shape[0]

    t0, c0 = time.perf_counter(), time.process_time()
    init = jax.jit(jax.vmap(agent.init))
    state = init(keys, hp_pop, lrs)
    sizes = chunk_sizes(config.num_updates, target_chunks)
    compiled = {}
    for n in sorted(set(sizes)):
        compiled[n] = jax.jit(jax.vmap(agent.run, in_axes=(0, None)), static_argnums=1).lower(state, n).compile()
    jax.block_until_ready(state)
    compile_s, compile_cpu = time.perf_counter() - t0, time.process_time() - c0

    steps_per_update = config.batch_size
    curves, counts, finite = [], [], []
    done_updates, run_s, run_cpu = 0, 0.0, 0.0
    for n in sizes:
        t, c = time.perf_counter(), time.process_time()
        state, m = compiled[n](state)
        m = jax.device_get(m)
        run_s += time.perf_counter() - t
        run_cpu += time.process_time() - c
        done_updates += n
        curves.append(np.asarray(m["episode_return"]))
        counts.append(np.asarray(m["episodes"]))
        finite.append(np.asarray(m["finite"]))
        if log:
            sps = num_members * done_updates * steps_per_update / max(run_s, 1e-9)
            eta = run_s / done_updates * (config.num_updates - done_updates)
            ret = curves[-1][:, -1]
            log(
                f"[{label}] {done_updates * steps_per_update:>10,d}/"
                f"{config.num_updates * steps_per_update:,d} steps  return {np.mean(ret):8.2f} "
                f"(min {np.min(ret):.2f}, max {np.max(ret):.2f})  {sps:,.0f} steps/s  ETA {fmt_eta(eta)}"
            )
    return dict(
        curves=np.concatenate(curves, axis=1),
        counts=np.concatenate(counts, axis=1),
        finite=np.concatenate(finite, axis=1),
        compile_seconds=compile_s,
        run_seconds=run_s,
        # process CPU time (all threads): the cost on a shared machine, where wall time also counts waiting
        compile_cpu_seconds=compile_cpu,
        run_cpu_seconds=run_cpu,
        env_steps_per_second=num_members * config.num_updates * steps_per_update / run_s,
        uses_lr=bool(agent.uses_lr),
    )


def train_seeds(
    env_name: str,
    optimizer_spec: str,
    config: PPOConfig,
    hparams: Dict[str, float],
    num_seeds: int,
    seed: int = 0,
    log: Optional[Callable[[str], None]] = print,
    target_chunks: int = 20,
    learning_rate: Optional[float] = None,
) -> Dict:
    """Trains ``num_seeds`` PPO agents (vmapped) at ``learning_rate`` (None:
    the optimizer's own; see ``learning_rate_for``) and returns a result dict:
    per-seed final returns, learning curves ``[S, U]``, timings, memory and
    ``hparams`` (with the ``lr``)."""
    if num_seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {num_seeds}")
    hp = PPOHParams.default(**hparams)
    hp_pop = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_seeds,)), hp)
    lrs = None if learning_rate is None else jnp.full((num_seeds,), learning_rate, jnp.float32)
    raw = _train_members(env_name, optimizer_spec, config, hp_pop, lrs, evaluation_keys(seed, num_seeds), log,
                         target_chunks, f"{env_name} | {optimizer_spec}")
    if learning_rate is not None:
        hparams = {"lr": learning_rate, **hparams}
    steps_per_update = config.batch_size
    metrics = {"episode_return": raw["curves"], "episodes": raw["counts"]}
    returns = final_return(metrics)
    return {
        "env": env_name,
        "optimizer": optimizer_spec,
        # the spec as built, with PPO's reference settings (agents.presets.OPTIMIZER_DEFAULTS)
        "optimizer_as_built": agent_optimizer_spec(optimizer_spec, "ppo"),
        "seeds": num_seeds,
        "seed": seed,
        "timesteps_per_seed": config.num_updates * steps_per_update,
        "config": dataclasses.asdict(config),
        "hparams": {k: float(v) for k, v in hparams.items()},
        "uses_lr": raw["uses_lr"],
        "final_return": returns.tolist(),
        "final_return_mean": float(np.mean(returns)),
        "diverged_seeds": int(np.sum(~raw["finite"][:, -1])),
        "env_steps_per_second": raw["env_steps_per_second"],
        "compile_seconds": raw["compile_seconds"],
        "run_seconds": raw["run_seconds"],
        "wall_seconds": raw["compile_seconds"] + raw["run_seconds"],
        "compile_cpu_seconds": raw["compile_cpu_seconds"],
        "run_cpu_seconds": raw["run_cpu_seconds"],
        "memory": peak_memory_mb(),
        "steps": (np.arange(1, config.num_updates + 1) * steps_per_update).tolist(),
        "curves": raw["curves"].tolist(),
        "episode_counts": raw["counts"].tolist(),
    }


def train_lr_sweep(
    env_name: str,
    optimizer_spec: str,
    config: PPOConfig,
    hparams: Dict[str, float],
    lrs: Sequence[float],
    num_seeds: int,
    seed: int = 0,
    log: Optional[Callable[[str], None]] = print,
    target_chunks: int = 20,
) -> Dict:
    """A learning-rate sweep as ONE vmapped program: ``len(lrs) x num_seeds``
    members, member ``i * num_seeds + s`` has ``lrs[i]`` and tuning key ``s``
    (``tuning_keys``; the same keys for every lr, so lrs are compared on
    common random numbers). The learning rate is the optimizer's injected
    one, so the grid needs no recompilation; an optimizer without an injected
    learning rate -> ``ValueError``.

    Returns ``final_return [L, S]``, ``diverged [L, S]`` (non-finite parameters
    at the end), ``mean_curves [L, U]`` (learning curve per lr, mean over
    seeds), ``steps [U]`` and timings."""
    lrs = [float(x) for x in lrs]
    if not lrs or any(not np.isfinite(x) or x <= 0 for x in lrs):
        raise ValueError(f"lr grid must be positive finite numbers, got {lrs}")
    if num_seeds < 1:
        raise ValueError(f"--tune-seeds must be >= 1, got {num_seeds}")
    if registry.info(optimizer_spec).default_lr is None:
        raise ValueError(f"optimizer {optimizer_spec!r} has no injected learning rate to tune")
    num_lrs = len(lrs)
    hp = PPOHParams.default(**hparams)
    hp_pop = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_lrs * num_seeds,)), hp)
    lr_pop = jnp.repeat(jnp.asarray(lrs, jnp.float32), num_seeds)
    keys = jnp.tile(tuning_keys(seed, num_seeds), (num_lrs,))
    raw = _train_members(env_name, optimizer_spec, config, hp_pop, lr_pop, keys, log, target_chunks,
                         f"{env_name} | {optimizer_spec} | lr sweep {num_lrs}x{num_seeds}")
    if not raw["uses_lr"]:  # pragma: no cover - the registry said otherwise
        raise ValueError(f"optimizer {optimizer_spec!r} has no injected learning rate")
    metrics = {"episode_return": raw["curves"], "episodes": raw["counts"]}
    returns = final_return(metrics).reshape(num_lrs, num_seeds)
    steps_per_update = config.batch_size
    return {
        "lrs": lrs,
        "optimizer_as_built": agent_optimizer_spec(optimizer_spec, "ppo"),
        "seeds": num_seeds,
        "seed": seed,
        "key_stream": f"split(fold_in(key({seed}), {TUNING_STREAM}), {num_seeds})",
        "timesteps_per_seed": config.num_updates * steps_per_update,
        "final_return": returns.tolist(),
        "diverged": (~raw["finite"][:, -1]).reshape(num_lrs, num_seeds).tolist(),
        "steps": (np.arange(1, config.num_updates + 1) * steps_per_update).tolist(),
        "mean_curves": raw["curves"].reshape(num_lrs, num_seeds, -1).mean(axis=1).tolist(),
        "env_steps_per_second": raw["env_steps_per_second"],
        "compile_seconds": raw["compile_seconds"],
        "run_seconds": raw["run_seconds"],
        "compile_cpu_seconds": raw["compile_cpu_seconds"],
        "run_cpu_seconds": raw["run_cpu_seconds"],
    }
