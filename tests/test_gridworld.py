import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from envs.gridworld import GRIDWORLDS, MOVES, EnvState, Gridworld

NAMES = sorted(GRIDWORLDS)


def _state(agent, objects, present=None, time=0):
    objects = np.asarray(objects, np.int32).reshape(-1, 2)
    if present is None:
        present = np.ones(len(objects), bool)
    return EnvState(
        agent_pos=jnp.asarray(agent, jnp.int32),
        object_pos=jnp.asarray(objects),
        object_present=jnp.asarray(present, bool),
        time=jnp.asarray(time, jnp.int32),
    )


def _action(drow, dcol):
    return jnp.int32([tuple(m) for m in MOVES.tolist()].index((drow, dcol)))


@pytest.mark.parametrize("name", NAMES)
def test_every_gridworld_constructs_with_table_shapes(name):
    env, params = envs.make(f"gridworld/{name}")
    spec = GRIDWORLDS[name]
    obs, state = env.reset(jax.random.key(0), params)
    k = len(spec.objects)
    assert obs.shape == (1 + k, spec.rows, spec.cols) == env.observation_space(params).shape
    assert obs.dtype == jnp.float32
    assert env.action_space(params).n == 9
    # one agent, every object present at distinct interior cells
    np.testing.assert_array_equal(np.asarray(obs).sum(axis=(1, 2)), np.ones(1 + k))
    cells = np.argwhere(np.asarray(obs).any(0))
    assert len(cells) == 1 + k
    assert not np.asarray(obs)[:, [0, -1], :].any() and not np.asarray(obs)[:, :, [0, -1]].any()
    assert int(params.max_steps_in_episode) == spec.horizon


def test_table_orientation_and_reward_scale_attribute():
    env, params = envs.make_bare("gridworld/small_sparse_short")
    assert (env.rows, env.cols) == (5, 10)
    for name, shape in [("small_sparse_long", (3, 10, 5)), ("big_dense_short", (5, 11, 15))]:
        assert Gridworld(name).observation_space(None).shape == shape
    dense, p = envs.make_bare("gridworld/small_dense_long")
    assert dense.reward_scale == 1e3
    np.testing.assert_array_equal(p.object_rewards, [1.0, -1.0])  # not applied by default
    _, p_scaled = envs.make_bare("gridworld/small_dense_long", scale_rewards=True)
    np.testing.assert_array_equal(p_scaled.object_rewards, [1e3, -1e3])


def test_unknown_override_and_name():
    with pytest.raises(ValueError, match="unknown env"):
        envs.make("gridworld/tiny")
    with pytest.raises(ValueError, match="unknown override.*allowed.*horizon"):
        envs.make("gridworld/small_dense_long", size=3)


def test_walls_block_moves():
    env, params = envs.make_bare("gridworld/small_sparse_short")  # 5 x 10
    far = [[3, 8], [3, 7]]  # objects out of the way
    key = jax.random.key(0)
    step = jax.jit(env.step)
    # top-left interior corner: N, W and NW (and the diagonals along the wall) are blocked
    for move in [(-1, 0), (0, -1), (-1, -1), (-1, 1), (1, -1)]:
        _, s, *_ = step(key, _state([1, 1], far), _action(*move), params)
        np.testing.assert_array_equal(s.agent_pos, [1, 1])
    _, s, *_ = step(key, _state([1, 1], far), _action(1, 1), params)
    np.testing.assert_array_equal(s.agent_pos, [2, 2])
    _, s, *_ = step(key, _state([1, 1], far), _action(0, 0), params)
    np.testing.assert_array_equal(s.agent_pos, [1, 1])
    # bottom-right interior corner
    for move in [(1, 0), (0, 1), (1, 1)]:
        _, s, *_ = step(key, _state([3, 8], [[1, 1], [1, 2]]), _action(*move), params)
        np.testing.assert_array_equal(s.agent_pos, [3, 8])


def test_pick_up_gives_reward_and_removes_object():
    env, params = envs.make_bare("gridworld/small_dense_short")  # 6 x 8, objects +1 and -1
    params = params.replace(respawn_probs=jnp.zeros(2), terminate_probs=jnp.zeros(2))
    state = _state([2, 2], [[2, 3], [4, 4]])
    step = jax.jit(env.step)
    obs, s, r, term, trunc, info = step(jax.random.key(0), state, _action(0, 1), params)
    assert float(r) == 1.0 and not bool(term) and not bool(trunc)
    np.testing.assert_array_equal(s.agent_pos, [2, 3])
    np.testing.assert_array_equal(s.object_present, [False, True])
    assert obs[0, 2, 3] == 1 and obs[1].sum() == 0 and obs[2, 4, 4] == 1
    assert float(info["discount"]) == 1.0
    # staying on the emptied cell gives nothing
    _, s, r, *_ = step(jax.random.key(1), s, _action(0, 0), params)
    assert float(r) == 0.0
    # the negative object, diagonally
    _, s2, r, *_ = step(jax.random.key(2), _state([3, 3], [[1, 1], [4, 4]]), _action(1, 1), params)
    assert float(r) == -1.0
    np.testing.assert_array_equal(s2.object_present, [True, False])


def test_termination_probabilities_zero_and_one():
    env, params = envs.make_bare("gridworld/big_dense_long")
    state = _state([5, 5], [[5, 6], [9, 9], [8, 8], [7, 7]])
    keys = jax.random.split(jax.random.key(0), 400)
    run = jax.jit(jax.vmap(env.step, in_axes=(0, None, None, None)))
    for p, expect in [(0.0, False), (1.0, True)]:
        prm = params.replace(terminate_probs=jnp.full(4, p, jnp.float32))
        _, _, r, term, trunc, info = run(keys, state, _action(0, 1), prm)
        assert np.all(np.asarray(term) == expect) and not np.asarray(trunc).any()
        np.testing.assert_allclose(info["discount"], 0.0 if expect else 1.0)
        np.testing.assert_allclose(r, 1.0)
    # moving without picking anything up never terminates, even with probability 1
    prm = params.replace(terminate_probs=jnp.ones(4, jnp.float32))
    _, _, r, term, *_ = run(keys, state, _action(-1, 0), prm)
    assert not np.asarray(term).any() and np.all(np.asarray(r) == 0)
    # the table's -1 objects end the episode about half the time
    state = _state([5, 5], [[1, 1], [2, 2], [5, 6], [7, 7]])
    _, _, r, term, *_ = run(keys, state, _action(0, 1), params)
    assert np.all(np.asarray(r) == -1.0) and 0.35 < np.asarray(term).mean() < 0.65


def test_respawn_at_free_cells():
    env, params = envs.make_bare("gridworld/small_dense_long")  # 8 x 6
    prm = params.replace(respawn_probs=jnp.ones(2, jnp.float32))
    state = _state([3, 3], [[1, 1], [2, 2]], present=[False, False])
    keys = jax.random.split(jax.random.key(0), 200)
    step = jax.jit(jax.vmap(env.step, in_axes=(0, None, None, None)))
    _, s, *_ = step(keys, state, _action(0, 0), prm)
    assert np.asarray(s.object_present).all()
    pos = np.asarray(s.object_pos)
    assert not (pos == [3, 3]).all(-1).any()  # not on the agent
    assert not (pos[:, 0] == pos[:, 1]).all(-1).any()  # not on each other
    assert env.walls[pos[..., 0], pos[..., 1]].sum() == 0  # not in walls
    assert len({tuple(p) for p in pos.reshape(-1, 2)}) > 10  # spread around
    # respawn probability 0: stays absent
    prm0 = params.replace(respawn_probs=jnp.zeros(2, jnp.float32))
    _, s, *_ = env.step(jax.random.key(1), state, _action(0, 0), prm0)
    assert not np.asarray(s.object_present).any()


def test_horizon_truncation_and_override():
    env, params = envs.make_bare("gridworld/small_sparse_short", horizon=5)
    assert int(params.max_steps_in_episode) == 5
    params = params.replace(terminate_probs=jnp.zeros(2, jnp.float32))
    _, state = env.reset(jax.random.key(0), params)

    def body(s, k):
        _, s, r, term, trunc, _ = env.step(k, s, jnp.int32(0), params)
        return s, trunc

    _, trunc = jax.lax.scan(body, state, jax.random.split(jax.random.key(1), 5))
    np.testing.assert_array_equal(trunc, [False] * 4 + [True])
    # through make: AutoReset starts a new episode after the truncation
    env, params = envs.make("gridworld/small_sparse_short", horizon=3)
    params = params.replace(terminate_probs=jnp.zeros(2, jnp.float32))
    _, state = env.reset(jax.random.key(0), params)

    def body2(s, k):
        _, s, r, term, trunc, info = env.step(k, s, jnp.int32(0), params)
        return s, (trunc, info["returned_episode_length"])

    _, (trunc, lengths) = jax.lax.scan(body2, state, jax.random.split(jax.random.key(2), 9))
    np.testing.assert_array_equal(np.nonzero(np.asarray(trunc))[0], [2, 5, 8])
    np.testing.assert_array_equal(np.asarray(lengths)[np.asarray(trunc)], 3)


def _random_rollout(env, params, steps, key):
    _, state = env.reset(key, params)
    space = env.action_space(params)

    def body(s, k):
        ka, ks = jax.random.split(k)
        _, s, r, term, trunc, info = env.step(ks, s, space.sample(ka), params)
        return s, (r, term, trunc, info)

    return jax.lax.scan(body, state, jax.random.split(key, steps))


@pytest.mark.parametrize("name", ["small_dense_short", "big_sparse_long"])
def test_random_policy_rollout_jit_vmap(name):
    env, params = envs.make(f"gridworld/{name}")
    run = jax.jit(jax.vmap(lambda k: _random_rollout(env, params, 300, k)))
    final, (r, term, trunc, info) = run(jax.random.split(jax.random.key(0), 4))
    r = np.asarray(r)
    assert r.shape == (4, 300) and r.dtype == np.float32
    assert np.isfinite(r).all() and set(np.unique(r)) <= {-1.0, 0.0, 1.0}
    assert (r != 0).any()  # a random walker does bump into objects
    rets = np.asarray(info["returned_episode_return"])[np.asarray(info["returned_episode"])]
    assert np.isfinite(rets).all() and np.abs(rets).max() <= GRIDWORLDS[name].horizon
    assert np.asarray(trunc | term).any()


def test_state_dtypes_stable_and_vmap_matches_loop():
    env, params = envs.make_bare("gridworld/big_dense_short")
    obs, state = env.reset(jax.random.key(0), params)
    step = jax.jit(env.step)
    obs2, state2, r, term, trunc, info = step(jax.random.key(1), state, jnp.int32(3), params)
    assert jax.tree.structure(state) == jax.tree.structure(state2)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state2)):
        assert a.dtype == b.dtype and a.shape == b.shape and not a.weak_type and not b.weak_type
    assert r.dtype == jnp.float32 and not r.weak_type
    assert term.dtype == jnp.bool_ and trunc.dtype == jnp.bool_
    assert info["discount"].dtype == jnp.float32

    keys = jax.random.split(jax.random.key(2), 3)
    actions = jnp.array([1, 4, 8], jnp.int32)
    _, states = jax.vmap(env.reset, in_axes=(0, None))(keys, params)
    batched = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))(keys, states, actions, params)
    for i in range(3):
        single = step(keys[i], jax.tree.map(lambda x: x[i], states), actions[i], params)
        for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(batched)):
            np.testing.assert_array_equal(a, np.asarray(b)[i])
    # params can be batched too (a population of envs with different horizons)
    horizons = jnp.array([1, 2, 3], jnp.int32)
    many = jax.vmap(lambda h: params.replace(max_steps_in_episode=h))(horizons)
    out = jax.jit(jax.vmap(env.step, in_axes=(0, None, None, 0)))(keys, state, jnp.int32(0), many)
    np.testing.assert_array_equal(out[4], [True, False, False])
