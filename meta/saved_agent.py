"""Saved agents: ``load_agent(RUN_DIR)`` rebuilds the env, PPO config and
networks from the document ``meta.experiment.save_agent`` wrote to
``RUN_DIR/agent`` (train, PBT and ES runs) and restores the agents into them;
``policy`` and ``evaluate_agent`` play them (``metarl-eval``)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from agents import core, networks
from agents.ppo import PPOConfig
from meta import checkpoint
from meta.experiment import AGENT_DIR, agent_tree, population_from_document

EVALUATION_STREAM = 0x6576  # "ev": keys of evaluation episodes, apart from the training keys


@dataclasses.dataclass(frozen=True)
class SavedAgent:
    """A trained population rebuilt from ``RUN_DIR/agent`` (``load_agent``)."""

    document: Dict[str, Any]  # run_document of the run that trained it
    config: PPOConfig
    env: Any
    env_params: Any
    actor_critic: core.ActorCritic
    tree: Dict[str, Any]  # agent_tree, every leaf [S, ...]
    obs_clip: float  # NormalizeObservation's clip (used where the config normalises observations)


def load_agent(run_dir: str) -> SavedAgent:
    """Rebuilds the env, PPO config and networks from the document saved in
    ``run_dir/agent`` and restores the agents into them. A missing directory,
    or one without a saved PPO agent -> ``ValueError``."""
    if not os.path.isdir(run_dir):
        raise ValueError(f"run directory {run_dir!r} does not exist")
    agent_dir = os.path.join(run_dir, AGENT_DIR)
    if checkpoint.latest_step(agent_dir) is None:
        raise ValueError(f"{run_dir!r} holds no saved agent ({agent_dir!r} is missing or empty; metarl-train, "
                         "metarl-pbt with PPO and whole-lifetime ES metarl-meta-train save one there)")
    step, stored = checkpoint.read_document(agent_dir)
    document = stored.get("config") or {}
    if document.get("agent") != "ppo":
        raise ValueError(f"{agent_dir!r} holds a {document.get('agent')!r} agent; metarl-eval plays PPO agents "
                         "(saved by metarl-train, metarl-pbt, metarl-meta-train)")
    agent, env, env_params, config, keys, hp_pop, lrs = population_from_document(document)
    target = agent_tree(jax.eval_shape(jax.vmap(agent.init), keys, hp_pop, lrs))
    _, tree, _ = checkpoint.restore(agent_dir, target, document, step=step)
    from envs.wrappers import NormalizeObservation, VecEnv

    clip = NormalizeObservation(VecEnv(env, 1)).clip
    return SavedAgent(document, config, env, env_params, core.make_actor_critic(config, env, env_params), tree, clip)


def policy(saved: SavedAgent, deterministic: bool = False) -> Callable:
    """``act(params, normalizer, obs [N, ...], key) -> actions [N, ...]`` of a
    saved agent (one seed's ``params``/``normalizer``): observations
    normalised with the saved statistics, frozen; the policy's mode
    (``deterministic``: argmax of the logits, or the Gaussian mean) or a sample."""
    ac = saved.actor_critic

    def act(params, norm, obs, key):
        if "obs_rms" in norm:
            obs = norm["obs_rms"].normalize(obs, saved.obs_clip)
        out = ac.actor.apply({"params": params["actor"]}, networks.flat(obs))
        if not deterministic:
            return networks.action_distribution(out, ac.discrete).sample(key)
        return jnp.argmax(out, axis=-1).astype(jnp.int32) if ac.discrete else out[0]

    return act


def evaluate_agent(saved: SavedAgent, episodes: int = 10, seed: int = 0, deterministic: bool = False,
                   max_steps: int = 100_000) -> List[Dict[str, Any]]:
    """Plays ``episodes`` episodes (one per env, vmapped) with each saved agent
    and returns one dict per seed: ``mean_return`` and ``returns [episodes]``
    (None where an episode did not end within ``max_steps`` steps). Actions
    are the policy's mode (``deterministic``: argmax of the logits, or the
    Gaussian mean) or samples from it; observations are normalised with the
    saved statistics, frozen."""
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"--episodes must be a positive integer, got {episodes!r}")
    from envs.wrappers import VecEnv

    vec = VecEnv(saved.env, episodes)
    env_params = saved.env_params
    act = policy(saved, deterministic)

    def play(params, norm, key):
        k_reset, key = jax.random.split(key)
        obs, env_state = vec.reset(k_reset, env_params)

        def running(carry):
            t, _, _, _, done, _ = carry
            return (t < max_steps) & ~jnp.all(done)

        def step(carry):
            t, obs, env_state, key, done, ret = carry
            key, k_act, k_env = jax.random.split(key, 3)
            obs, env_state, _, _, _, info = vec.step(k_env, env_state, act(params, norm, obs, k_act), env_params)
            ended = info["returned_episode"]
            ret = jnp.where(ended & ~done, info["returned_episode_return"], ret)
            return t + 1, obs, env_state, key, done | ended, ret

        carry = (jnp.int32(0), obs, env_state, key, jnp.zeros((episodes,), bool),
                 jnp.zeros((episodes,), jnp.float32))
        *_, done, ret = jax.lax.while_loop(running, step, carry)
        return ret, done

    num_seeds = saved.document["seeds"]
    keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), EVALUATION_STREAM), num_seeds)
    rets, done = jax.device_get(jax.jit(jax.vmap(play))(saved.tree["params"], saved.tree.get("normalizer", {}), keys))
    mode = ("greedy" if saved.actor_critic.discrete else "mean") if deterministic else "sampled"
    out = []
    for i in range(num_seeds):
        finished = [float(r) for r, d in zip(rets[i], done[i]) if d]
        out.append(dict(
            env=saved.document["env"], optimizer=saved.document["optimizer"], seed_index=i,
            train_seed=saved.document["seed"], episodes=episodes,
            mean_return=float(np.mean(finished)) if finished else None,
            returns=[float(r) if d else None for r, d in zip(rets[i], done[i])],
            unfinished=int(episodes - len(finished)), deterministic=bool(deterministic), actions=mode,
            eval_seed=seed,
        ))
    return out
