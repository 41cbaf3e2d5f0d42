"""The population: optimizer groups, and the member agents of each agent kind.

A population is a tuple of *groups* (``"adam:6,kfac:2"``), each an optimizer
spec with its own stacked agent state (its optimizer state structure stays
fixed). ``make_member_agents`` builds one ``MemberAgent`` per group for PPO
or TD3, and each group's tuned space: a group's learning-rate bounds are its
optimizer's (``learned_optim.registry.info(spec).lr_bounds``; K-FAC wants
larger steps than Adam). Members start at the env preset's learning rate
(written into their optimizer state by ``init``; a tuned ``"lr"`` replaces it).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

from meta.pbt.space import LEARNING_RATE, PPO_SPACE, TD3_SPACE


@dataclasses.dataclass(frozen=True)
class Group:
    spec: str  # optimizer spec for learned_optim.from_spec
    size: int


def parse_groups(text: str, population: Optional[int] = None) -> Tuple[Group, ...]:
    """``"adam:6,kfac:2"`` -> groups. Each group is ``SPEC:N``; settings inside
    a spec keep their commas (``"kfac:lr=0.05,damping=1e-3:2"``). A single
    spec without a count takes the whole ``population``. Checks that the
    counts add up to ``population`` when given."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"--optimizers must be a non-empty list like 'adam:6,kfac:2', got {text!r}")
    groups, pending = [], []
    for token in (t.strip() for t in text.split(",")):
        pending.append(token)
        m = re.match(r"^(.*):\s*(\d+)$", token)
        if m:
            spec = ",".join(pending[:-1] + [m.group(1)])
            groups.append(Group(spec.strip(), int(m.group(2))))
            pending = []
    if pending:
        if groups or population is None:
            raise ValueError(
                f"--optimizers {text!r}: every group needs a member count, e.g. 'adam:6,kfac:2' "
                f"(got {','.join(pending)!r} without one)"
            )
        groups.append(Group(",".join(pending), int(population)))
    for g in groups:
        if g.size < 1:
            raise ValueError(f"--optimizers: group {g.spec!r} has {g.size} members; each needs >= 1")
    total = sum(g.size for g in groups)
    if population is not None and total != population:
        raise ValueError(
            f"--optimizers {text!r} has {total} members but --population is {population}; make them equal"
        )
    return tuple(groups)


class MemberAgent(NamedTuple):
    """What PBT needs of an agent (one member; vmapped by the driver).

    ``init(key, hparams) -> state``; ``run(state, n) -> (state, metrics)``
    with ``metrics["episode_return"] [n]``; ``state`` has ``params``,
    ``opt_state`` (with an injected ``learning_rate`` where ``"lr"`` is
    tuned) and ``hparams`` (a NamedTuple of float arrays) and ``.replace``;
    ``init_opt(params) -> opt_state`` re-initialises the optimizer (used when
    a member copies from another optimizer kind; PBT then writes the
    learning rate).
    ``copy_fields`` are the state fields copied on exploit (e.g. target
    networks of TD3 besides ``params``). ``steps_per_update``: env steps of
    one update (for reporting)."""

    init: Callable
    run: Callable
    init_opt: Callable
    steps_per_update: int
    copy_fields: Tuple[str, ...] = ("params", "opt_state", "hparams")


def td3_available() -> bool:
    try:
        import agents.td3 as td3  # noqa: F401
    except ImportError:
        return False
    return all(hasattr(td3, n) for n in ("make_td3", "TD3Config", "TD3HParams"))


def ppo_member_config(env_name, timesteps, **overrides):
    """``(PPOConfig, hparams dict, lr)`` of PBT's PPO members: the env
    family's preset with ``overrides``; lr annealing is off (PBT schedules the
    learning rate itself). Also what a saved best member is rebuilt from."""
    from agents.presets import resolve_config

    return resolve_config(env_name, total_timesteps=int(timesteps), anneal_lr=False, **overrides)


def _ppo_agents(env_name, env, env_params, txs, timesteps, **overrides):
    """PPO members (``ppo_member_config``)."""
    from agents.ppo import PPOHParams, make_ppo

    cfg, hp, lr = ppo_member_config(env_name, timesteps, **overrides)
    agents = []
    for tx in txs:
        agent = make_ppo(cfg, env, env_params, tx)
        agents.append(MemberAgent(functools.partial(agent.init, learning_rate=lr), agent.run, agent.tx.init,
                                  cfg.batch_size))
    return agents, PPOHParams.default(**hp), cfg.batch_size, cfg.num_updates


def _td3_agents(env_name, env, env_params, txs, timesteps, **overrides):
    """TD3 members (see agents/td3.py): the env family's preset with
    ``overrides`` (``TD3Config`` fields). Target networks travel with the
    weights on exploit (``pbt_copy_fields``); the replay buffer and env state
    stay the member's own."""
    if not td3_available():
        raise ValueError("--agent td3: agents/td3.py with make_td3, TD3Config and TD3HParams is not "
                         "available in this checkout; use --agent ppo")
    from agents import td3
    from agents.presets import resolve_config

    cfg, hp, lr = resolve_config(env_name, agent="td3", total_timesteps=int(timesteps), **overrides)
    agents = []
    for tx in txs:
        agent = td3.make_td3(cfg, env, env_params, tx)
        agents.append(MemberAgent(functools.partial(agent.init, learning_rate=lr), agent.run, agent.init_opt,
                                  cfg.steps_per_update,
                                  ("params", "opt_state", "hparams") + tuple(agent.pbt_copy_fields)))
    return agents, td3.TD3HParams.default(**hp), cfg.steps_per_update, cfg.num_updates


# agent kind -> builder ``(env_name, env, env_params, txs, timesteps, **overrides)
# -> (agents, base_hparams, steps_per_update, num_updates)``, and its tuned space
_BUILDERS: dict = {"ppo": _ppo_agents, "td3": _td3_agents}
_SPACES = {"ppo": PPO_SPACE, "td3": TD3_SPACE}
AGENT_KINDS = tuple(_BUILDERS)


def make_member_agents(agent_kind: str, env_name: str, groups: Sequence[Group], timesteps: int,
                       space_names: Optional[Sequence[str]] = None, **overrides):
    """``(agents, spaces, base_hparams, steps_per_update, num_updates)`` for a
    population of ``agent_kind`` over ``groups``: one ``MemberAgent`` and one
    tuned space (``space_names``, default all; the group's lr bounds) per
    group."""
    import envs
    from agents.presets import make_optimizer
    from learned_optim import registry

    if agent_kind not in AGENT_KINDS:
        raise ValueError(f"--agent {agent_kind!r}; allowed: {', '.join(AGENT_KINDS)}")
    # bad specs fail before the env is built; the agent's reference settings (agents.presets)
    txs = [make_optimizer(g.spec, agent_kind) for g in groups]
    base_space = _SPACES[agent_kind]
    if space_names:
        base_space = base_space.restrict(space_names)
    if LEARNING_RATE in base_space.names:
        for g in groups:
            if registry.info(g.spec).default_lr is None:
                raise ValueError(f"--optimizers {g.spec!r} has no injected learning rate to tune; "
                                 "leave lr out of --tune")
    env, env_params = envs.make(env_name)
    agents, base, steps_per_update, num_updates = _BUILDERS[agent_kind](
        env_name, env, env_params, txs, timesteps, **overrides)
    spaces = tuple(base_space.with_bounds(LEARNING_RATE, *registry.info(g.spec).lr_bounds)
                   if LEARNING_RATE in base_space.names else base_space for g in groups)
    return agents, spaces, base, steps_per_update, num_updates
