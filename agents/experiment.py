"""Training PPO over several seeds in one vmapped program, in chunks so a
host loop can report progress between them. Used by scripts/train.py and
scripts/benchmark.py."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

import envs
import learned_optim
from agents.ppo import PPOConfig, PPOHParams, final_return, make_ppo, PRESETS, preset_for
from meta.report import chunk_sizes, fmt_eta, peak_memory_mb


def resolve_config(env_name: str, preset: Optional[str] = None, **overrides):
    """(config, hparams-dict) for ``env_name``: the env family's preset with
    ``overrides`` applied (config fields and hyperparameters by name)."""
    name = preset or preset_for(env_name)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    config, hp = PRESETS[name]
    cfg_fields = {f.name for f in dataclasses.fields(PPOConfig)}
    hp_fields = set(PPOHParams._fields)
    cfg_over = {k: v for k, v in overrides.items() if k in cfg_fields and v is not None}
    hp_over = {k: v for k, v in overrides.items() if k in hp_fields and v is not None}
    unknown = set(overrides) - cfg_fields - hp_fields
    if unknown:
        raise ValueError(f"unknown setting(s) {sorted(unknown)}")
    return dataclasses.replace(config, **cfg_over), {**hp, **hp_over}


# The env presets' learning rates were tuned for Adam.
PRESET_LR_OPTIMIZERS = ("adam", "adamw")


def hparams_for_spec(hparams: Dict[str, float], optimizer_spec: str, lr: Optional[float] = None):
    """Learning rate precedence: an explicit ``lr`` (e.g. ``--lr``) > the spec's
    own ``lr=`` > the preset's default for Adam-family specs (the presets were
    tuned for Adam) > the optimizer's own default (``kfac`` 0.05, ``sgd``
    0.01, ...). Optimizers without a learning rate (OPEN) leave it unused."""
    from learned_optim.spec import default_learning_rate, explicit_learning_rate, split_spec

    spec_lr = explicit_learning_rate(optimizer_spec)
    chosen = lr if lr is not None else spec_lr
    if chosen is None and split_spec(optimizer_spec)[0] not in PRESET_LR_OPTIMIZERS:
        chosen = default_learning_rate(optimizer_spec)
    return {**hparams, "lr": chosen} if chosen is not None else dict(hparams)


def train_seeds(
    env_name: str,
    optimizer_spec: str,
    config: PPOConfig,
    hparams: Dict[str, float],
    num_seeds: int,
    seed: int = 0,
    log: Optional[Callable[[str], None]] = print,
    target_chunks: int = 20,
) -> Dict:
    """Trains ``num_seeds`` PPO agents (vmapped) and returns a result dict:
    per-seed final returns, learning curves ``[S, U]``, timings and memory."""
    if num_seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {num_seeds}")
    env, env_params = envs.make(env_name)
    tx = learned_optim.from_spec(optimizer_spec)
    agent = make_ppo(config, env, env_params, tx)
    hp = PPOHParams.default(**hparams)
    hp_pop = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_seeds,)), hp)
    keys = jax.random.split(jax.random.key(seed), num_seeds)

    t0 = time.perf_counter()
    init = jax.jit(jax.vmap(agent.init))
    state = init(keys, hp_pop)
    sizes = chunk_sizes(config.num_updates, target_chunks)
    compiled = {}
    for n in sorted(set(sizes)):
        compiled[n] = jax.jit(jax.vmap(agent.run, in_axes=(0, None)), static_argnums=1).lower(state, n).compile()
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0

    steps_per_update = config.batch_size
    curves, counts, finite = [], [], []
    done_updates, run_s = 0, 0.0
    for n in sizes:
        t = time.perf_counter()
        state, m = compiled[n](state)
        m = jax.device_get(m)
        run_s += time.perf_counter() - t
        done_updates += n
        curves.append(np.asarray(m["episode_return"]))
        counts.append(np.asarray(m["episodes"]))
        finite.append(np.asarray(m["finite"]))
        if log:
            sps = num_seeds * done_updates * steps_per_update / max(run_s, 1e-9)
            eta = run_s / done_updates * (config.num_updates - done_updates)
            ret = curves[-1][:, -1]
            log(
                f"[{env_name} | {optimizer_spec}] {done_updates * steps_per_update:>10,d}/"
                f"{config.num_updates * steps_per_update:,d} steps  return {np.mean(ret):8.2f} "
                f"(min {np.min(ret):.2f}, max {np.max(ret):.2f})  {sps:,.0f} steps/s  ETA {fmt_eta(eta)}"
            )
    curves = np.concatenate(curves, axis=1)
    counts = np.concatenate(counts, axis=1)
    finite = np.concatenate(finite, axis=1)
    metrics = {"episode_return": curves, "episodes": counts}
    total_steps = num_seeds * config.num_updates * steps_per_update
    return {
        "env": env_name,
        "optimizer": optimizer_spec,
        "seeds": num_seeds,
        "seed": seed,
        "timesteps_per_seed": config.num_updates * steps_per_update,
        "config": dataclasses.asdict(config),
        "hparams": {k: float(v) for k, v in hparams.items()},
        "final_return": final_return(metrics).tolist(),
        "final_return_mean": float(np.mean(final_return(metrics))),
        "diverged_seeds": int(np.sum(~finite[:, -1])),
        "env_steps_per_second": total_steps / run_s,
        "compile_seconds": compile_s,
        "run_seconds": run_s,
        "wall_seconds": compile_s + run_s,
        "memory": peak_memory_mb(),
        "steps": (np.arange(1, config.num_updates + 1) * steps_per_update).tolist(),
        "curves": curves.tolist(),
        "episode_counts": counts.tolist(),
    }
