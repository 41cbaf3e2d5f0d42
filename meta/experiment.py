"""Training PPO over several seeds in one vmapped program, in chunks so a
host loop can report progress between them, and learning-rate sweeps as one
program. Used by ``meta.cli.train``, ``meta.benchmark`` and the final
comparisons of meta-training. Configs come from ``agents.presets``.

A run given a ``run_dir`` (``metarl-train --out``) also keeps its state:

* ``RUN_DIR/checkpoints/``: the whole vmapped training state and the curves so
  far, at chunk boundaries (``meta.checkpoint``); ``resume=True`` continues
  from the latest to the same results, bit for bit, as an uninterrupted run.
* ``RUN_DIR/agent/``: the final agent of every seed (``agent_tree``: network
  parameters, optimizer state, observation/reward normaliser statistics,
  hyperparameters) with the document that built it (``run_document``), which
  ``meta.saved_agent.load_agent`` rebuilds and ``evaluate_agent`` plays.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import envs
import learned_optim
from agents.ppo import PPOConfig, PPOHParams, final_return, make_ppo, measure_fraction
from agents.presets import make_optimizer, optimizer_spec as agent_optimizer_spec
from learned_optim import registry
from learned_optim.spec import explicit_learning_rate
from meta import checkpoint
from meta.host import chunk_sizes, fmt_eta, peak_memory_mb
from meta.report import write_log_rows

CHECKPOINT_DIR = "checkpoints"  # RUN_DIR/checkpoints: resumable training state
# Default cadence: the first chunk boundary after every this many seconds of the
# host loop, and the end (each save costs ~0.05-0.2 s; every chunk would cost
# more than training itself on short runs).
CHECKPOINT_SECONDS = 30.0
AGENT_DIR = "agent"  # RUN_DIR/agent: the final agents and the document that built them


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


def update_chunks(num_updates: int, target_chunks: int = 20, checkpoint_every: Optional[int] = None,
                  start: int = 0) -> List[int]:
    """Chunk sizes of a run of ``num_updates`` from update ``start``: the
    ``chunk_sizes`` of ``target_chunks`` progress chunks, or chunks of
    ``checkpoint_every`` updates where that is shorter, so that checkpoints fall
    on chunk boundaries. At most two distinct sizes (each compiles once), a
    third only where a run resumes off the current boundaries."""
    sizes = chunk_sizes(num_updates, target_chunks)
    if checkpoint_every is not None and sizes and checkpoint_every < sizes[0]:
        sizes = [checkpoint_every] * (num_updates // checkpoint_every)
        if num_updates % checkpoint_every:
            sizes.append(num_updates % checkpoint_every)
    bounds = np.cumsum(sizes).tolist()
    rest = [b for b in bounds if b > start]
    return np.diff([start] + rest).astype(int).tolist()


def _is_checkpoint(done: int, previous: int, every: Optional[int], total: int, since_last: float) -> bool:
    """A checkpoint after ``done`` updates: at the first chunk boundary at or
    past each multiple of ``every`` (None: ``CHECKPOINT_SECONDS`` after the
    last one), and at the end."""
    if done == total:
        return True
    return since_last >= CHECKPOINT_SECONDS if every is None else done // every > previous // every


def _train_members(env_name, optimizer_spec, config, hp_pop: PPOHParams, lrs, keys, log, target_chunks, label,
                   checkpoint_dir: Optional[str] = None, checkpoint_every: Optional[int] = None,
                   resume: bool = False, document: Optional[Dict[str, Any]] = None,
                   on_chunk: Optional[Callable[[Dict[str, np.ndarray]], None]] = None):
    """Trains ``M`` PPO members (``hp_pop`` leaves, learning rates ``lrs`` and
    ``keys`` are ``[M]``) in one vmapped program, in chunks for progress
    output. Returns the raw arrays (curves/counts/finite ``[M, U]``), the final
    state, timings and ``uses_lr``.

    With ``checkpoint_dir``: the state and the curves so far are saved there
    (with ``{"config": document}``) every ``checkpoint_every`` updates (None:
    at the first chunk boundary after every ``CHECKPOINT_SECONDS``) and at the
    end; ``resume`` continues from the latest checkpoint (``CheckpointError``
    when there is none or its config differs from ``document``). ``on_chunk``
    gets the curves/counts/finite so far (``[M, updates done]``) after every
    chunk."""
    env, env_params = envs.make(env_name)
    tx = make_optimizer(optimizer_spec, "ppo")
    agent = make_ppo(config, env, env_params, tx)
    num_members = keys.shape[0]
    total = config.num_updates

    t0, c0 = time.perf_counter(), time.process_time()
    init = jax.vmap(agent.init)
    history = dict(curves=np.zeros((num_members, 0), np.float32), counts=np.zeros((num_members, 0), np.int32),
                   finite=np.zeros((num_members, 0), bool))
    start, run_before = 0, 0.0
    if resume:
        # Settings first (a clear error before anything compiles), then the arrays.
        step, stored = checkpoint.read_document(checkpoint_dir)
        checkpoint.check_config(checkpoint_dir, stored, document)
        like = jax.eval_shape(init, keys, hp_pop, lrs)
        target = dict(state=like, **{k: np.zeros((num_members, step), v.dtype) for k, v in history.items()})
        start, restored, stored = checkpoint.restore(checkpoint_dir, target, document, step=step)
        state = restored.pop("state")
        history = {k: np.asarray(v) for k, v in restored.items()}
        run_before = float(stored.get("run_seconds", 0.0))
        if log:
            log(f"[{label}] resumed at update {start}/{total} from {checkpoint_dir}")
    else:
        state = jax.jit(init)(keys, hp_pop, lrs)
    sizes = update_chunks(total, target_chunks, checkpoint_every, start)
    compiled = {}
    for n in sorted(set(sizes)):
        compiled[n] = jax.jit(jax.vmap(agent.run, in_axes=(0, None)), static_argnums=1).lower(state, n).compile()
    jax.block_until_ready(state)
    compile_s, compile_cpu = time.perf_counter() - t0, time.process_time() - c0

    steps_per_update = config.batch_size
    curves, counts, finite = [history["curves"]], [history["counts"]], [history["finite"]]
    done_updates, run_s, run_cpu = start, 0.0, 0.0
    last_save = time.perf_counter()
    for n in sizes:
        t, c = time.perf_counter(), time.process_time()
        state, m = compiled[n](state)
        m = jax.device_get(m)
        run_s += time.perf_counter() - t
        run_cpu += time.process_time() - c
        previous, done_updates = done_updates, done_updates + n
        curves.append(np.asarray(m["episode_return"]))
        counts.append(np.asarray(m["episodes"]))
        finite.append(np.asarray(m["finite"]))
        so_far = None
        if on_chunk is not None:
            so_far = dict(curves=np.concatenate(curves, axis=1), counts=np.concatenate(counts, axis=1),
                          finite=np.concatenate(finite, axis=1))
            on_chunk(so_far)
        if checkpoint_dir and _is_checkpoint(done_updates, previous, checkpoint_every, total,
                                             time.perf_counter() - last_save):
            so_far = so_far or dict(curves=np.concatenate(curves, axis=1), counts=np.concatenate(counts, axis=1),
                                    finite=np.concatenate(finite, axis=1))
            checkpoint.save(checkpoint_dir, done_updates, dict(state=state, **so_far),
                            {"config": document, "run_seconds": run_before + run_s})
            last_save = time.perf_counter()
        if log:
            sps = num_members * (done_updates - start) * steps_per_update / max(run_s, 1e-9)
            eta = run_s / (done_updates - start) * (total - done_updates)
            ret = curves[-1][:, -1]
            log(
                f"[{label}] {done_updates * steps_per_update:>10,d}/"
                f"{total * steps_per_update:,d} steps  return {np.mean(ret):8.2f} "
                f"(min {np.min(ret):.2f}, max {np.max(ret):.2f})  {sps:,.0f} steps/s  ETA {fmt_eta(eta)}"
            )
    trained = num_members * (total - start) * steps_per_update
    return dict(
        curves=np.concatenate(curves, axis=1),
        counts=np.concatenate(counts, axis=1),
        finite=np.concatenate(finite, axis=1),
        state=state,
        resumed_from_update=start,
        compile_seconds=compile_s,
        run_seconds=run_s,
        # process CPU time (all threads): the cost on a shared machine, where wall time also counts waiting
        compile_cpu_seconds=compile_cpu,
        run_cpu_seconds=run_cpu,
        env_steps_per_second=trained / run_s if run_s > 0 else 0.0,
        uses_lr=bool(agent.uses_lr),
    )


LOG_FIELDS = ("update", "env_steps", "return_mean", "return_min", "return_max", "episodes")


def log_rows(curves: np.ndarray, counts: np.ndarray, steps_per_update: int) -> List[Dict[str, Any]]:
    """The ``log.jsonl`` rows of a ``train_seeds`` run: one per update, from
    its curves ``[S, U]`` (each seed's return of the episodes that ended in
    that update, the latest one carried where none did) and episode counts
    ``[S, U]``: mean, min and max over seeds, episodes ended over seeds."""
    curves, counts = np.asarray(curves, np.float64), np.asarray(counts)
    return [dict(update=u + 1, env_steps=(u + 1) * steps_per_update, return_mean=float(np.mean(curves[:, u])),
                 return_min=float(np.min(curves[:, u])), return_max=float(np.max(curves[:, u])),
                 episodes=int(np.sum(counts[:, u])))
            for u in range(curves.shape[1])]


def save_agent(agent_dir: str, step: int, tree: Dict[str, Any], document: Dict[str, Any],
               final_return: Sequence[float]) -> None:
    """Saves agents (``agent_tree``, leaves ``[S, ...]``) with the
    ``run_document`` that rebuilds them to ``agent_dir`` (replacing what was
    there): the layout ``load_agent`` reads, for train, PBT and ES runs."""
    if os.path.isdir(agent_dir):
        shutil.rmtree(agent_dir)  # (a resumed run rewrites its own agent)
    checkpoint.save(agent_dir, step, tree, {"config": document, "final_return": [float(x) for x in final_return]})


def run_document(env_name: str, optimizer_spec: str, config: PPOConfig, hparams: Dict[str, float],
                 learning_rate: Optional[float], num_seeds: int, seed: int) -> Dict[str, Any]:
    """Everything that builds and determines a ``train_seeds`` run, JSON-canonical:
    the config a checkpoint must match to be resumed and the one ``load_agent``
    rebuilds a saved agent from (env, optimizer spec as built, PPO config,
    hyperparameter overrides, learning rate, seeds)."""
    doc = dict(
        agent="ppo", env=env_name, optimizer=optimizer_spec,
        optimizer_as_built=agent_optimizer_spec(optimizer_spec, "ppo"),
        ppo_config=dataclasses.asdict(config), hparams={k: float(v) for k, v in hparams.items()},
        learning_rate=None if learning_rate is None else float(learning_rate), seeds=int(num_seeds), seed=int(seed),
    )
    return json.loads(json.dumps(doc))


def normalizer_state(env_state) -> Dict[str, Any]:
    """The running statistics of the normalising wrappers around a ``VecEnv``
    state (``obs_rms`` of ``NormalizeObservation``, ``return_rms`` of
    ``NormalizeReward``; each only where configured)."""
    out = {}
    while any(hasattr(env_state, n) for n in ("obs_rms", "return_rms")):
        out.update({n: getattr(env_state, n) for n in ("obs_rms", "return_rms") if hasattr(env_state, n)})
        env_state = env_state.env_state
    return out


def agent_tree(state) -> Dict[str, Any]:
    """What a saved agent holds of a (vmapped) PPO state, every leaf ``[S, ...]``:
    ``params``, ``opt_state``, ``hparams``, ``update_step`` and, where the config
    normalises, ``normalizer`` (``normalizer_state``)."""
    tree = dict(params=state.params, opt_state=state.opt_state, hparams=state.hparams, update_step=state.update_step)
    norm = normalizer_state(state.env_state)
    if norm:
        tree["normalizer"] = norm
    return tree


def population_from_document(document: Dict[str, Any]):
    """``(agent, env, env_params, config, keys, hp_pop, lrs)`` that ``document``
    (``run_document``) describes."""
    config = PPOConfig(**document["ppo_config"])
    env, env_params = envs.make(document["env"])
    agent = make_ppo(config, env, env_params, learned_optim.from_spec(document["optimizer_as_built"]))
    num_seeds = document["seeds"]
    hp_pop = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_seeds,)), PPOHParams.default(**document["hparams"]))
    lr = document["learning_rate"]
    lrs = None if lr is None else jnp.full((num_seeds,), lr, jnp.float32)
    return agent, env, env_params, config, evaluation_keys(document["seed"], num_seeds), hp_pop, lrs


def _fresh_dir(path: str, log) -> None:
    """Removes a previous run's ``path`` (a fresh run must not resume from, or
    leave behind, another run's state)."""
    if os.path.isdir(path) and os.listdir(path):
        shutil.rmtree(path)
        if log:
            log(f"note: removed the previous run's {path} (fresh run; pass --resume to continue one)")


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
    run_dir: Optional[str] = None,
    checkpoint_every: Optional[int] = None,
    resume: bool = False,
    agent_dir: Optional[str] = None,
    sink=None,
) -> Dict:
    """Trains ``num_seeds`` PPO agents (vmapped) at ``learning_rate`` (None:
    the optimizer's own; see ``learning_rate_for``) and returns a result dict:
    per-seed final returns, learning curves ``[S, U]``, timings, memory and
    ``hparams`` (with the ``lr``).

    With ``run_dir``: checkpoints to ``run_dir/checkpoints`` every
    ``checkpoint_every`` updates (None: at the first progress chunk boundary
    after every ``CHECKPOINT_SECONDS`` of training) and at the end, and saves
    the final agents to ``run_dir/agent``;
    ``resume`` continues from the latest checkpoint (``CheckpointError`` when
    there is none or it was written with other settings). A resumed run's
    curves equal an uninterrupted one's. A run with ``run_dir`` also writes
    ``run_dir/log.jsonl`` (``log_rows``: one row per update, after every
    chunk) and hands the rows to ``sink`` (``meta.tracking``, ``--wandb``).

    ``agent_dir`` (without ``run_dir``): only save the final agents there
    (the evaluation agents of meta-training)."""
    if num_seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {num_seeds}")
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or checkpoint_every < 1):
        raise ValueError(f"--checkpoint-every must be >= 1, got {checkpoint_every}")
    if resume and run_dir is None:
        raise ValueError("resume needs a run directory (--out)")
    hp = PPOHParams.default(**hparams)
    hp_pop = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_seeds,)), hp)
    lrs = None if learning_rate is None else jnp.full((num_seeds,), learning_rate, jnp.float32)
    document = run_document(env_name, optimizer_spec, config, hparams, learning_rate, num_seeds, seed)
    ckpt_dir, on_chunk = None, None
    if run_dir is not None:
        ckpt_dir, agent_dir = os.path.join(run_dir, CHECKPOINT_DIR), os.path.join(run_dir, AGENT_DIR)
        if not resume:
            _fresh_dir(ckpt_dir, log)
            _fresh_dir(agent_dir, log)

        def write_log(so_far):
            write_log_rows(run_dir, log_rows(so_far["curves"], so_far["counts"], config.batch_size), LOG_FIELDS,
                           sink)

        on_chunk = write_log
    raw = _train_members(env_name, optimizer_spec, config, hp_pop, lrs, evaluation_keys(seed, num_seeds), log,
                         target_chunks, f"{env_name} | {optimizer_spec}", checkpoint_dir=ckpt_dir,
                         checkpoint_every=checkpoint_every, resume=resume, document=document, on_chunk=on_chunk)
    if learning_rate is not None:
        hparams = {"lr": learning_rate, **hparams}
    steps_per_update = config.batch_size
    metrics = {"episode_return": raw["curves"], "episodes": raw["counts"]}
    returns = final_return(metrics)
    if agent_dir is not None:
        save_agent(agent_dir, config.num_updates, agent_tree(raw["state"]), document, returns.tolist())
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
        "resumed_from_update": raw["resumed_from_update"],
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
    measure: str = "final_window",
) -> Dict:
    """A learning-rate sweep as ONE vmapped program: ``len(lrs) x num_seeds``
    members, member ``i * num_seeds + s`` has ``lrs[i]`` and tuning key ``s``
    (``tuning_keys``; the same keys for every lr, so lrs are compared on
    common random numbers). The learning rate is the optimizer's injected
    one, so the grid needs no recompilation; an optimizer without an injected
    learning rate -> ``ValueError``.

    Returns ``final_return [L, S]`` (by ``measure``, one of
    ``agents.ppo.RETURN_MEASURES``), ``diverged [L, S]`` (non-finite parameters
    at the end), ``mean_curves [L, U]`` (learning curve per lr, mean over
    seeds), ``steps [U]`` and timings."""
    lrs = [float(x) for x in lrs]
    if not lrs or any(not np.isfinite(x) or x <= 0 for x in lrs):
        raise ValueError(f"lr grid must be positive finite numbers, got {lrs}")
    if num_seeds < 1:
        raise ValueError(f"--tune-seeds must be >= 1, got {num_seeds}")
    if registry.info(optimizer_spec).default_lr is None:
        raise ValueError(f"optimizer {optimizer_spec!r} has no injected learning rate to tune")
    fraction = measure_fraction(measure)
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
    returns = final_return(metrics, fraction).reshape(num_lrs, num_seeds)
    steps_per_update = config.batch_size
    return {
        "lrs": lrs,
        "optimizer_as_built": agent_optimizer_spec(optimizer_spec, "ppo"),
        "seeds": num_seeds,
        "seed": seed,
        "key_stream": f"split(fold_in(key({seed}), {TUNING_STREAM}), {num_seeds})",
        "measure": measure,
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
