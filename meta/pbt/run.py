"""The host loop of a PBT run: validation, compile, rounds, progress,
histories, checkpoints and the result document.

The jitted round (``program``) runs ``interval`` updates of every member plus
selection; between rounds the host only logs, records and checkpoints.

With an output directory a run also writes ``OUT/log.jsonl`` (one row per
round, ``log_rows``; to wandb too with a ``sink``) and, for PPO, saves the
best final member to ``OUT/agent`` in ``meta.experiment``'s layout, so
``metarl-eval OUT`` plays it and ``metarl-pbt --replay OUT`` retrains its
schedule (``meta.pbt.replay``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from meta import checkpoint, distributed
from meta.host import fmt_eta, peak_memory_mb
from meta.report import write_log_rows
from meta.pbt.population import make_member_agents, parse_groups, ppo_member_config
from meta.pbt.program import PBTConfig, make_pbt, population_shardings


def _timed(fn, *args, repeats: int = 3) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) / repeats


def run_pbt(
    agent_kind: str,
    env: str,
    groups,
    algo: str = "pbt",
    population: Optional[int] = None,
    interval: int = 10,
    timesteps: float = 1e5,
    seed: int = 0,
    exploit: str = "truncation",
    explore: str = "perturb",
    out: Optional[str] = None,
    resume: bool = False,
    checkpoint_every: int = 5,
    tune: Optional[Sequence[str]] = None,
    time_selection: bool = True,
    log: Optional[Callable[[str], None]] = print,
    progress: Optional[Callable[[int, int], None]] = None,
    pbt_overrides: Optional[Dict[str, Any]] = None,
    agent_overrides: Optional[Dict[str, Any]] = None,
    sink=None,
) -> Dict[str, Any]:
    """Trains a population with ``algo`` and returns a JSON-able result dict.

    ``groups``: ``"adam:6,kfac:2"`` (or a sequence of ``Group``); one jitted
    step = ``interval`` updates of every member + selection; the host loop
    logs, records per-member histories (return, hyperparameters, lineage =
    the member each one copied from, itself when it kept its weights) and
    checkpoints to ``out/checkpoints`` every ``checkpoint_every`` rounds
    (``resume=True`` continues from the latest). Everything is validated
    before anything compiles. With ``out``: ``out/log.jsonl`` after every
    round (rows also to ``sink``, ``meta.tracking``) and, for PPO, the best
    final member saved to ``out/agent`` (``save_best_member``)."""
    config = PBTConfig(algo=algo, exploit=exploit, explore=explore, interval=int(interval),
                       **(pbt_overrides or {}))
    if isinstance(groups, str):
        groups = parse_groups(groups, population)
    groups = tuple(groups)
    if population is not None and sum(g.size for g in groups) != population:
        raise ValueError(f"groups have {sum(g.size for g in groups)} members but --population is {population}")
    if not (isinstance(timesteps, (int, float)) and timesteps > 0):
        raise ValueError(f"--timesteps must be positive, got {timesteps!r}")
    if checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be >= 1, got {checkpoint_every}")
    agents, spaces, base, steps_per_update, num_updates = make_member_agents(
        agent_kind, env, groups, int(timesteps), tune, **(agent_overrides or {}))
    rounds = num_updates // config.interval
    if rounds < 1:
        raise ValueError(f"--interval {config.interval} is more than the {num_updates} updates that "
                         f"--timesteps {int(timesteps)} gives ({steps_per_update} env steps per update)")
    ckpt_dir = os.path.join(out, "checkpoints") if out else None
    if resume and (ckpt_dir is None or checkpoint.latest_step(ckpt_dir) is None):
        raise ValueError(f"--resume: no checkpoint found in {ckpt_dir!r}")
    pbt = make_pbt(config, agents, groups, spaces, base)
    p = sum(g.size for g in groups)
    names = spaces[0].names
    doc_config = dict(
        agent=agent_kind, env=env, groups=[[g.spec, g.size] for g in groups], seed=int(seed),
        timesteps=int(timesteps), tune=list(names), pbt=dataclasses.asdict(config),
        agent_overrides={k: str(v) for k, v in (agent_overrides or {}).items()},
    )
    # JSON-canonical; the budget is left out so a resumed run may train longer (PPO's
    # train_fraction, which some optimizers read, then follows the new budget).
    doc_config = json.loads(json.dumps(doc_config))
    doc_config.pop("timesteps")

    say = log or (lambda s: None)
    t0 = time.perf_counter()
    state = jax.jit(pbt.init)(jax.random.key(seed))
    mesh = distributed.population_mesh_or_none([g.size for g in groups])
    shardings = population_shardings(state, mesh) if mesh is not None else None
    step = distributed.jit_placed(pbt.step, shardings)
    hist = dict(fitness=[], last_return=[], hparams=[], lineage=[], bad=[])
    start = 0
    if resume:
        start, state, document = checkpoint.restore(ckpt_dir, state, doc_config)
        hist = document["history"]
        say(f"resumed from round {start} in {ckpt_dir}")
    if shardings is not None:
        state = distributed.put(state, shardings)
    elif jax.device_count() > 1:
        say(f"note: group sizes {[g.size for g in groups]} do not divide over {jax.device_count()} devices; "
            "running on one device")
    step = step.lower(state).compile()
    compile_s = time.perf_counter() - t0
    say(f"{algo} ({'pairwise' if algo == 'gpbt' else exploit}/{explore if algo == 'pbt' else '-'}) "
        f"{agent_kind} on {env}: {p} members {[f'{g.spec}:{g.size}' for g in groups]}, {rounds} rounds x "
        f"{config.interval} updates x {steps_per_update} env steps; tuning {', '.join(names)}; "
        f"{jax.device_count() if shardings is not None else 1} device(s); compiled in {compile_s:.1f}s")
    run_s = 0.0
    for r in range(start, rounds):
        t = time.perf_counter()
        state, info = step(state)
        info = jax.device_get(info)
        run_s += time.perf_counter() - t
        hist["fitness"].append(np.asarray(info["fitness"], np.float64).tolist())
        hist["last_return"].append(np.asarray(info["last_return"], np.float64).tolist())
        hist["hparams"].append(np.asarray(info["hparams_used"], np.float64).tolist())
        hist["lineage"].append(np.asarray(info["src"]).astype(int).tolist())
        hist["bad"].append(np.asarray(info["bad"]).astype(bool).tolist())
        fit = np.asarray(info["fitness"], np.float64)
        okf = fit[np.isfinite(fit)]
        done = r + 1 - start
        eta = run_s / done * (rounds - r - 1)
        if progress:
            progress(r + 1, rounds)
        say(f"round {r + 1:4d}/{rounds}  {(r + 1) * config.interval * steps_per_update:>10,d} steps/member  "
            f"return best {okf.max() if okf.size else float('nan'):8.2f} mean "
            f"{okf.mean() if okf.size else float('nan'):8.2f}  replaced {int(np.sum(info['replaced']))}  "
            f"bad {int(np.sum(info['bad']))}  ETA {fmt_eta(eta)}")
        if out and distributed.is_main():
            write_log_rows(out, log_rows(hist, config.interval * steps_per_update, names), LOG_FIELDS, sink)
        if ckpt_dir and ((r + 1) % checkpoint_every == 0 or r + 1 == rounds):
            checkpoint.save(ckpt_dir, r + 1, distributed.to_host(state), {"config": doc_config, "history": hist})

    result = dict(
        config={**doc_config, "timesteps": int(timesteps)}, population=p, rounds=rounds, interval=config.interval,
        steps_per_update=steps_per_update,
        timesteps_per_member=rounds * config.interval * steps_per_update,
        compile_seconds=compile_s, run_seconds=run_s, memory=peak_memory_mb(),
        hparam_names=list(names), hparam_scales=list(spaces[0].scale),
    )
    if hist["fitness"]:
        final = np.asarray(hist["fitness"][-1], np.float64)
        ok = np.isfinite(final)
        result.update(
            final_return=final.tolist(),
            final_return_best=float(final[ok].max()) if ok.any() else float("nan"),
            final_return_mean=float(final[ok].mean()) if ok.any() else float("nan"),
            diverged_members=int((~ok).sum()),
        )
    result["steps"] = [(r + 1) * config.interval * steps_per_update for r in range(len(hist["fitness"]))]
    result["members"] = [
        dict(
            member=i,
            optimizer=groups[int(np.searchsorted(np.cumsum([g.size for g in groups]), i, side="right"))].spec,
            returns=[row[i] for row in hist["fitness"]],
            hparams={n: [row[i][j] for row in hist["hparams"]] for j, n in enumerate(names)},
            lineage=[row[i] for row in hist["lineage"]],
        )
        for i in range(p)
    ]
    if hist["fitness"]:
        result["best_member"] = best_member(hist)
        if out and agent_kind == "ppo":
            host = distributed.to_host(state)  # (every process: arrays may be split over processes)
            save_best_member(os.path.join(out, "agent"), host, result["best_member"], groups, env, int(timesteps),
                             int(seed), agent_overrides or {}, float(result["final_return"][result["best_member"]]),
                             rounds * config.interval)
            say(f"best member {result['best_member']} saved to {os.path.join(out, 'agent')} "
                f"(play it with metarl-eval {out})")
    if time_selection and rounds > start:
        # The selection alone, jitted apart, against the mean wall time of a whole round.
        select_jit = jax.jit(pbt.select)  # (placement as the state has it)
        rets = jnp.asarray(np.asarray(hist["last_return"][-1], np.float32)[:, None].repeat(config.interval, 1))
        t_select = _timed(select_jit, state, rets)
        t_round = run_s / (rounds - start)
        result["selection_seconds_per_round"] = t_select
        result["round_seconds"] = t_round
        result["selection_share"] = min(1.0, t_select / t_round)
        say(f"selection: {t_select * 1e3:.2f} ms per round vs {t_round * 1e3:.1f} ms per whole round "
            f"({100 * result['selection_share']:.2f}%)")
    return result


LOG_FIELDS = ("round", "env_steps", "return_best", "return_mean", "return_min", "replaced", "diverged")


def log_rows(hist: Dict[str, list], steps_per_round: int, names: Sequence[str]) -> list:
    """The ``log.jsonl`` rows of a PBT run from its history: per round the
    best, mean and min fitness over finite members, how many members copied
    another (``replaced``) or were bad, and the tuned values the best member
    trained that round with (``best_NAME``)."""
    rows = []
    for r, (fit, hp, src, bad) in enumerate(zip(hist["fitness"], hist["hparams"], hist["lineage"], hist["bad"])):
        fit = np.asarray(fit, np.float64)
        ok = np.isfinite(fit)
        row = dict(round=r + 1, env_steps=(r + 1) * steps_per_round,
                   return_best=float(fit[ok].max()) if ok.any() else None,
                   return_mean=float(fit[ok].mean()) if ok.any() else None,
                   return_min=float(fit[ok].min()) if ok.any() else None,
                   replaced=int(sum(int(s) != i for i, s in enumerate(src))), diverged=int(np.sum(bad)))
        if ok.any():
            b = int(np.argmax(np.where(ok, fit, -np.inf)))
            row.update({f"best_{n}": float(hp[b][j]) for j, n in enumerate(names)})
        rows.append(row)
    return rows


def best_member(hist: Dict[str, list]) -> int:
    """The member with the highest final fitness among those that are fine
    (finite, not bad) and kept their own weights in the last selection (the
    best one always does; its saved state is then the one that earned the
    fitness). None qualifies -> the highest finite fitness, else member 0."""
    fit = np.asarray(hist["fitness"][-1], np.float64)
    bad = np.asarray(hist["bad"][-1], bool)
    kept = np.asarray(hist["lineage"][-1]) == np.arange(fit.size)
    for ok in (np.isfinite(fit) & ~bad & kept, np.isfinite(fit)):
        if ok.any():
            return int(np.argmax(np.where(ok, fit, -np.inf)))
    return 0


def save_best_member(agent_dir: str, state, member: int, groups, env: str, timesteps: int, seed: int,
                     agent_overrides: Dict[str, Any], final_return: float, updates: int) -> None:
    """Saves PPO member ``member`` of the (host) PBT ``state`` to ``agent_dir``
    (``save_ppo_member``)."""
    offsets = np.cumsum([0] + [g.size for g in groups])
    g = int(np.searchsorted(offsets, member, side="right") - 1)
    local = member - int(offsets[g])
    one = jax.tree.map(lambda x: x[local:local + 1], state.members[g])
    save_ppo_member(agent_dir, one, groups[g].spec, env, timesteps, seed, agent_overrides, final_return, updates,
                    pbt_member=int(member))


def save_ppo_member(agent_dir: str, one, spec: str, env: str, timesteps: int, seed: int,
                    agent_overrides: Dict[str, Any], final_return: float, updates: int, **extra) -> None:
    """Saves one PPO member state (leaves ``[1, ...]``) to ``agent_dir`` as a
    one-seed ``metarl-train`` agent (``meta.experiment.save_agent``): its
    parameters, optimizer state, normaliser and current hyperparameters, with
    a ``run_document`` that rebuilds it (optimizer ``spec``, PBT's PPO member
    config) and ``pbt_updates`` plus ``extra`` added."""
    from agents import core
    from meta.experiment import agent_tree, run_document, save_agent

    cfg, _, preset_lr = ppo_member_config(env, timesteps, **agent_overrides)
    hparams = {k: float(np.asarray(v)[0]) for k, v in one.hparams._asdict().items()}
    lr = core.learning_rate(one)
    lr = preset_lr if lr is None else float(np.asarray(lr)[0])
    document = run_document(env, spec, cfg, hparams, lr, 1, seed)
    document.update(pbt_updates=int(updates), **extra)
    save_agent(agent_dir, int(updates), agent_tree(one), document, [final_return])
