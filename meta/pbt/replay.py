"""Replay of a PBT run's winning schedule: ``metarl-pbt --replay RUN_DIR``.

The best final member of a PBT run (``results.json``'s ``best_member``) owes
its weights to a chain of members: in each round its weights were trained by
one member with that member's hyperparameters, and after the round a member
that copied (exploit) took over those weights. ``lineage_path`` follows that
chain backwards through every copy; ``traced_schedule`` reads the
hyperparameters each link trained with. ``replay`` then trains ONE fresh
agent for the same rounds of ``interval`` updates, writing round ``r``'s
values into its state before round ``r`` (the boundaries at which PBT changed
them), switching optimizer where the chain crossed optimizer groups (a fresh
optimizer state, as a PBT copy across kinds gets), and measures its fitness
as PBT did: the mean return of its latest ``window`` finished episodes.

History layout (``meta.pbt.run``): ``members[i]["hparams"][name][r]`` the
values member ``i`` trained round ``r`` with; ``members[i]["lineage"][r]``
the member whose weights ``i`` holds after round ``r``'s selection (``i``
itself when it kept its own).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

REPLAY_DIR = "replay"  # RUN_DIR/replay/results.json (and agent/ for PPO)
REPLAY_STREAM = 0x7270  # "rp": the replay's key stream, apart from the run's own


def read_history(run_dir: str) -> Dict[str, Any]:
    """``run_dir/results.json`` of a finished PBT run; a missing directory or
    one without per-round hyperparameters and lineage -> one-line ``ValueError``."""
    if not os.path.isdir(run_dir):
        raise ValueError(f"--replay: run directory {run_dir!r} does not exist")
    path = os.path.join(run_dir, "results.json")
    hint = f"run metarl-pbt --out {run_dir} to completion first"
    if not os.path.isfile(path):
        raise ValueError(f"--replay: {run_dir!r} holds no PBT history (no results.json; {hint})")
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--replay: cannot read {path!r} ({e})") from None
    members = result.get("members") if isinstance(result, dict) else None
    if (not members or not result.get("rounds") or "hparam_names" not in result
            or not all(m.get("lineage") and m.get("hparams") for m in members)):
        raise ValueError(f"--replay: {path!r} is not a PBT run with a history (per-round hyperparameters and "
                         f"lineage of every member; {hint})")
    return result


def lineage_path(lineages: Sequence[Sequence[int]], member: int) -> List[int]:
    """``[m_0, ..., m_{R-1}]``: the member whose training in round ``r``
    produced the weights that ``member`` holds at the end. ``lineages[i][r]``
    is member ``i``'s source after round ``r``; the chain is followed backwards:
    ``m_{R-1} = member``, ``m_{r-1} = lineages[m_r][r-1]``."""
    rounds = len(lineages[member])
    path = [int(member)]
    for r in range(rounds - 1, 0, -1):
        path.append(int(lineages[path[-1]][r - 1]))
    return path[::-1]


def traced_schedule(result: Dict[str, Any], member: int) -> Dict[str, Any]:
    """The hyperparameter schedule ``member`` was trained on: ``path``
    (``lineage_path``), ``hparams [R, H]`` (row ``r``: the values of the
    member that trained round ``r``), ``names``, the optimizer ``group`` index
    per round and the chain's per-round fitness ``returns [R]``."""
    members = result["members"]
    names = list(result["hparam_names"])
    path = lineage_path([m["lineage"] for m in members], member)
    hparams = np.array([[members[m]["hparams"][n][r] for n in names] for r, m in enumerate(path)], np.float64)
    specs = [g[0] for g in result["config"]["groups"]]
    sizes = np.cumsum([g[1] for g in result["config"]["groups"]])
    group = [int(np.searchsorted(sizes, m, side="right")) for m in path]
    returns = [members[m]["returns"][r] for r, m in enumerate(path)]
    return dict(path=path, names=names, hparams=hparams, group=group, specs=specs, returns=returns)


def _override(value: str):
    """``agent_overrides`` are stored as strings (``results.json``'s config)."""
    for kind in (int, float):
        try:
            return kind(value)
        except (TypeError, ValueError):
            pass
    return value


def _episodes(metrics) -> tuple:
    """Finished episodes of one member's round in time order: ``(returns, done)`` flat."""
    if "env_episode_return" in metrics:
        return (np.asarray(metrics["env_episode_return"], np.float64).reshape(-1),
                np.asarray(metrics["env_episode_done"], bool).reshape(-1))
    ret = np.asarray(metrics["episode_return"], np.float64).reshape(-1)
    done = np.asarray(metrics["episodes"]).reshape(-1) > 0 if "episodes" in metrics else np.ones(ret.shape, bool)
    return ret, done


def replay(run_dir: str, member: Optional[int] = None, log=print) -> Dict[str, Any]:
    """Retrains ``member`` (default: the run's ``best_member``) of the PBT run
    in ``run_dir`` from scratch on its lineage-traced schedule and writes
    ``run_dir/replay/results.json``; returns that document. Bad input ->
    one-line ``ValueError`` before anything compiles."""
    from meta.pbt.population import Group, make_member_agents
    from meta.pbt.space import member_matrix, with_member_matrix

    result = read_history(run_dir)
    config, members = result["config"], result["members"]
    if member is None:
        member = result.get("best_member")
    if member is None:  # (runs from before best_member was recorded)
        final = np.asarray(result.get("final_return", [m["returns"][-1] for m in members]), np.float64)
        member = int(np.argmax(np.where(np.isfinite(final), final, -np.inf)))
    if not 0 <= int(member) < len(members):
        raise ValueError(f"--replay: member {member} is not in the population of {len(members)}")
    member = int(member)
    sched = traced_schedule(result, member)
    groups = tuple(Group(spec, int(size)) for spec, size in config["groups"])
    overrides = {k: _override(v) for k, v in (config.get("agent_overrides") or {}).items()}
    agents, spaces, base, steps_per_update, _ = make_member_agents(
        config["agent"], config["env"], groups, int(config["timesteps"]), config.get("tune"), **overrides)
    names = list(spaces[0].names)
    if names != sched["names"]:
        raise ValueError(f"--replay: the run tuned {sched['names']} but its config now gives {names}")
    interval, rounds = int(result["interval"]), int(result["rounds"])
    window = int(config["pbt"]["window"])

    say = log or (lambda s: None)
    t0 = time.perf_counter()
    key = jax.random.fold_in(jax.random.key(int(config["seed"])), REPLAY_STREAM)
    hp = jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.float32), (1,)), base)
    g = sched["group"][0]
    state = jax.jit(jax.vmap(agents[g].init))(key[None], hp)
    # One program per optimizer group on the chain (compiled on first use).
    runs = {k: jax.jit(jax.vmap(lambda s, a=agents[k]: a.run(s, interval))) for k in set(sched["group"])}
    inits = {k: jax.jit(jax.vmap(agents[k].init_opt)) for k in set(sched["group"])}
    write = jax.jit(lambda s, h: with_member_matrix(s, names, h))
    read = jax.jit(lambda s: member_matrix(s, names))
    say(f"replay of member {member} of {run_dir}: {rounds} rounds x {interval} updates on its lineage "
        f"{sched['path']}")

    applied, fitness, returns = [], [], np.zeros((0,), np.float64)
    for r in range(rounds):
        k = sched["group"][r]
        if k != g and groups[k].spec != groups[g].spec:
            # The chain crossed to another optimizer kind: PBT re-initialises the optimizer state from the
            # copied parameters (meta.pbt.program.copy_members), and so does the replay.
            state = state.replace(opt_state=inits[k](state.params))
        g = k
        state = write(state, jnp.asarray(sched["hparams"][r][None], jnp.float32))
        applied.append(np.asarray(read(state), np.float64)[0].tolist())
        state, metrics = runs[k](state)
        ret, done = _episodes(jax.device_get(metrics))
        returns = np.concatenate([returns, ret[done]])[-window:]
        fitness.append(float(np.mean(returns)) if returns.size else None)
    seconds = time.perf_counter() - t0

    original = float(result["final_return"][member]) if "final_return" in result else sched["returns"][-1]
    doc = dict(
        run_dir=run_dir, member=member, member_return=original,
        replay_return=fitness[-1], fitness="mean return of the latest finished episodes, window "
                                           f"{window} (as PBT's selection)",
        rounds=rounds, interval=interval, updates=rounds * interval,
        env_steps=rounds * interval * steps_per_update, lineage=sched["path"],
        optimizer_per_round=[groups[k].spec for k in sched["group"]], hparam_names=names,
        schedule={n: sched["hparams"][:, j].tolist() for j, n in enumerate(names)},
        applied={n: [row[j] for row in applied] for j, n in enumerate(names)},
        replay_returns=fitness, lineage_returns=sched["returns"],
        key=f"fold_in(key({int(config['seed'])}), {REPLAY_STREAM})",
        wall_seconds=seconds,  # compile included
    )
    out = os.path.join(run_dir, REPLAY_DIR)
    os.makedirs(out, exist_ok=True)
    from meta.report import write_json

    write_json(os.path.join(out, "results.json"), doc)
    if config["agent"] == "ppo":
        from meta.pbt.run import save_ppo_member

        # RUN_DIR/replay/agent: metarl-eval RUN_DIR/replay plays the replayed agent.
        save_ppo_member(os.path.join(out, "agent"), jax.device_get(state), groups[g].spec, config["env"],
                        int(config["timesteps"]), int(config["seed"]), overrides,
                        fitness[-1] if fitness[-1] is not None else float("nan"), rounds * interval,
                        replay_of_member=member)
    return doc
