"""The eight LPG / Optim4RL gridworlds, in pure JAX.

Oh et al. 2020 (LPG, arXiv 2007.08794) introduced them; Optim4RL (Lan et al.
2024, arXiv 2302.01470) meta-trains on six of them. Each is a rectangle of
``rows x cols`` cells *including* a one-cell wall border, with a few objects.
An object is ``(reward, termination probability on pick-up, respawn
probability per step)``.

Dynamics of one ``step``:

1. The agent moves (action 0 stays; 1..8 are the king moves N, NE, E, SE, S,
   SW, W, NW, with N = row - 1). A move whose target cell is a wall leaves the
   agent where it was (a diagonal move along a wall is blocked as a whole).
2. If the agent now stands on a present object it picks it up: the reward is
   the object's reward, the object disappears, and with the object's
   termination probability the episode ends (``terminated``).
3. Every absent object (including one picked up this step, as in the
   reference code) respawns with its respawn probability at a uniformly random
   free cell: not a wall, not the agent's cell, not a present object's cell.
   Objects therefore never share a cell. (``respawn_anywhere=True``: any
   interior cell, as the reference code does.)
4. The step counter increases; ``truncated`` is set when it reaches
   ``params.max_steps_in_episode`` (the horizon, 50 or 500) unless the episode
   terminated on the same step.

``reset`` places the agent and every object (all present) at distinct cells
drawn uniformly among the free interior cells, as LPG and Optim4RL do.

Observation: float32 binary maps of shape ``(1 + num_objects, rows, cols)``,
channels first; channel 0 is the agent, channel ``1 + k`` object ``k``
(empty while the object is absent). Row 0 is the top wall, so a
``small_sparse_short`` observation is ``(3, 5, 10)``: 5 rows by 10 columns,
the grid exactly as the table writes it.

Rewards are not scaled by default. ``Gridworld.reward_scale`` keeps the
reward scaling Optim4RL used when meta-training on each grid; pass
``scale_rewards=True`` to multiply object rewards by it.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from envs.core import Env
from envs.spaces import Box, Discrete


class GridSpec(NamedTuple):
    """Static description of one gridworld (from the Optim4RL/LPG table)."""

    rows: int  # including the wall border
    cols: int
    objects: Tuple[Tuple[float, float, float], ...]  # (reward, terminate_prob, respawn_prob)
    horizon: int
    reward_scale: float  # Optim4RL's reward scaling; 1.0 where the table says "-"


_SPARSE = ((1.0, 0.0, 0.05), (-1.0, 0.5, 0.05))
_DENSE = ((1.0, 0.0, 0.5), (-1.0, 0.5, 0.5))
_BIG_SPARSE = (_SPARSE[0], _SPARSE[0], _SPARSE[1], _SPARSE[1])
_BIG_DENSE = (_DENSE[0], _DENSE[0], _DENSE[1], _DENSE[1])

GRIDWORLDS: Dict[str, GridSpec] = {
    # small_sparse_* were not used for meta-training (scaling "-"): stored as 1.0.
    "small_sparse_short": GridSpec(5, 10, _SPARSE, 50, 1.0),
    "small_sparse_long": GridSpec(10, 5, _SPARSE, 500, 1.0),
    "small_dense_short": GridSpec(6, 8, _DENSE, 50, 1e2),
    "small_dense_long": GridSpec(8, 6, _DENSE, 500, 1e3),
    "big_sparse_short": GridSpec(12, 14, _BIG_SPARSE, 50, 1e2),
    "big_sparse_long": GridSpec(14, 12, _BIG_SPARSE, 500, 1e1),
    "big_dense_short": GridSpec(11, 15, _BIG_DENSE, 50, 1e1),
    "big_dense_long": GridSpec(15, 11, _BIG_DENSE, 500, 1e0),
}

# Row/column offsets of the 9 actions: stay, then N, NE, E, SE, S, SW, W, NW.
MOVES = np.array(
    [[0, 0], [-1, 0], [-1, 1], [0, 1], [1, 1], [1, 0], [1, -1], [0, -1], [-1, -1]], np.int32
)
NUM_ACTIONS = len(MOVES)


@struct.dataclass
class EnvState:
    agent_pos: jax.Array  # int32 [2], (row, col)
    object_pos: jax.Array  # int32 [K, 2]; meaningless while the object is absent
    object_present: jax.Array  # bool [K]
    time: jax.Array  # int32 [], steps taken in this episode


@struct.dataclass
class EnvParams:
    object_rewards: jax.Array  # float32 [K]
    terminate_probs: jax.Array  # float32 [K], chance that picking the object up ends the episode
    respawn_probs: jax.Array  # float32 [K], chance per step that an absent object reappears
    max_steps_in_episode: jax.Array  # int32 [], the horizon


class Gridworld(Env):
    """One of the eight named gridworlds; stateless (state and params are pytrees).

    Overrides: ``horizon`` (alias ``max_steps_in_episode``), the episode
    length; ``scale_rewards`` (default False) multiplies object rewards by
    ``reward_scale``; ``respawn_anywhere`` (default False) respawns an object
    at any interior cell, the agent's and present objects' included, as
    Optim4RL's reference does (sail-sg/optim4rl envs/gridworld.py:285-287,
    a uniform choice from every non-wall cell, :46-47 and :236).
    """

    OVERRIDES = ("horizon", "max_steps_in_episode", "scale_rewards", "respawn_anywhere")

    def __init__(self, name: str, **overrides):
        if name not in GRIDWORLDS:
            raise ValueError(f"unknown gridworld {name!r}; known: {', '.join(GRIDWORLDS)}")
        unknown = sorted(set(overrides) - set(self.OVERRIDES))
        if unknown:
            raise ValueError(
                f"unknown override(s) {unknown} for gridworld {name!r}; "
                f"allowed: {list(self.OVERRIDES)}"
            )
        horizon = overrides.get("horizon")
        max_steps_in_episode = overrides.get("max_steps_in_episode")
        scale_rewards = overrides.get("scale_rewards", False)
        self.respawn_anywhere = bool(overrides.get("respawn_anywhere", False))
        if horizon is not None and max_steps_in_episode is not None:
            raise ValueError("give either horizon or max_steps_in_episode, not both")
        spec = GRIDWORLDS[name]
        horizon = spec.horizon if horizon is None else horizon
        horizon = horizon if max_steps_in_episode is None else max_steps_in_episode
        if int(horizon) < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.name = f"gridworld/{name}"
        self.spec = spec
        self.rows, self.cols = spec.rows, spec.cols
        self.num_objects = len(spec.objects)
        self.horizon = int(horizon)
        self.reward_scale = float(spec.reward_scale)
        self.scale_rewards = bool(scale_rewards)
        walls = np.zeros((self.rows, self.cols), bool)
        walls[0, :] = walls[-1, :] = walls[:, 0] = walls[:, -1] = True
        self.walls = walls
        self.free_cells = np.argwhere(~walls).astype(np.int32)  # [F, 2], row-major

    @property
    def default_params(self) -> EnvParams:
        objects = np.asarray(self.spec.objects, np.float32)
        rewards = objects[:, 0] * (self.reward_scale if self.scale_rewards else 1.0)
        return EnvParams(
            object_rewards=jnp.asarray(rewards, jnp.float32),
            terminate_probs=jnp.asarray(objects[:, 1], jnp.float32),
            respawn_probs=jnp.asarray(objects[:, 2], jnp.float32),
            max_steps_in_episode=jnp.asarray(self.horizon, jnp.int32),
        )

    def observation_space(self, params) -> Box:
        return Box(0.0, 1.0, (1 + self.num_objects, self.rows, self.cols))

    def action_space(self, params) -> Discrete:
        return Discrete(NUM_ACTIONS)

    def get_obs(self, state: EnvState) -> jax.Array:
        """Binary maps ``[1 + K, rows, cols]`` (agent first, then objects)."""
        obs = jnp.zeros((1 + self.num_objects, self.rows, self.cols), jnp.float32)
        obs = obs.at[0, state.agent_pos[0], state.agent_pos[1]].set(1.0)
        channels = jnp.arange(1, 1 + self.num_objects)
        return obs.at[channels, state.object_pos[:, 0], state.object_pos[:, 1]].set(
            state.object_present.astype(jnp.float32)
        )

    def reset(self, key, params):
        # Distinct cells, uniformly: the top 1 + K of one uniform draw per free cell
        # (cheaper than choice(replace=False), which permutes all cells; reset
        # runs on every step under AutoReset).
        noise = jax.random.uniform(key, (len(self.free_cells),))
        _, idx = jax.lax.top_k(noise, 1 + self.num_objects)
        pos = jnp.asarray(self.free_cells)[idx]
        state = EnvState(
            agent_pos=pos[0],
            object_pos=pos[1:],
            object_present=jnp.ones((self.num_objects,), bool),
            time=jnp.zeros((), jnp.int32),
        )
        return self.get_obs(state), state

    def step(self, key, state, action, params):
        key_term, key_respawn = jax.random.split(key)
        walls = jnp.asarray(self.walls)
        limit = jnp.array([self.rows - 1, self.cols - 1], jnp.int32)

        target = jnp.clip(state.agent_pos + jnp.asarray(MOVES)[jnp.asarray(action, jnp.int32)], 0, limit)
        agent_pos = jnp.where(walls[target[0], target[1]], state.agent_pos, target)

        picked = state.object_present & jnp.all(state.object_pos == agent_pos, axis=-1)
        reward = jnp.sum(jnp.where(picked, params.object_rewards, 0.0)).astype(jnp.float32)
        ends = jax.random.uniform(key_term, (self.num_objects,)) < params.terminate_probs
        terminated = jnp.any(picked & ends)
        present = state.object_present & ~picked

        # Respawn one object at a time so two objects never land on one cell
        # (respawn_anywhere: any interior cell, as the reference).
        occupied = walls.astype(jnp.int32)
        if not self.respawn_anywhere:
            occupied = occupied.at[agent_pos[0], agent_pos[1]].add(1)
            occupied = occupied.at[state.object_pos[:, 0], state.object_pos[:, 1]].add(
                present.astype(jnp.int32)
            )

        def respawn_one(occupied, inputs):
            key_k, pos, is_present, prob = inputs
            key_coin, key_cell = jax.random.split(key_k)
            respawn = ~is_present & (jax.random.uniform(key_coin) < prob)
            # The j-th free cell, j uniform: one random number instead of a categorical.
            free = (occupied.reshape(-1) == 0).astype(jnp.int32)
            j = jax.random.randint(key_cell, (), 0, jnp.sum(free), jnp.int32)
            cell = jnp.argmax(jnp.cumsum(free) > j).astype(jnp.int32)
            new_pos = jnp.stack([cell // self.cols, cell % self.cols])
            if not self.respawn_anywhere:
                occupied = occupied.at[new_pos[0], new_pos[1]].add(respawn.astype(jnp.int32))
            return occupied, (jnp.where(respawn, new_pos, pos), is_present | respawn)

        keys = jax.random.split(key_respawn, self.num_objects)
        _, (object_pos, present) = jax.lax.scan(
            respawn_one, occupied, (keys, state.object_pos, present, params.respawn_probs)
        )

        time = state.time + 1
        truncated = (time >= params.max_steps_in_episode) & ~terminated
        next_state = EnvState(agent_pos, object_pos, present, time)
        info = {"discount": 1.0 - terminated.astype(jnp.float32)}
        return self.get_obs(next_state), next_state, reward, terminated, truncated, info
