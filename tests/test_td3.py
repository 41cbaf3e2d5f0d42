"""TD3 (agents/td3.py): pure pieces against hand values, replay buffer, the
delayed actor update, time limits, vmap, optimizer injection, learning."""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import envs
import learned_optim
from agents import core, presets, replay_buffer, td3
from agents.td3 import TD3Config, TD3HParams, make_td3

# One gradient step per iteration, so the delayed actor update is visible step by step.
TINY = TD3Config(num_envs=2, total_timesteps=2 * 40, buffer_size=64, batch_size=16, learning_starts=4,
                 gradient_steps=1, policy_delay=2, hidden_sizes=(8, 8))


@pytest.fixture(scope="module")
def pendulum():
    return envs.make("Pendulum-v1")


def leaves(tree):
    def raw(x):
        return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    return [np.asarray(raw(x)) for x in jax.tree.leaves(tree)]


def trees_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))


# ---------------------------------------------------------------------------
# Config and errors
# ---------------------------------------------------------------------------


def test_config_and_hparam_errors_are_clear():
    with pytest.raises(ValueError, match="num_envs"):
        TD3Config(num_envs=0)
    with pytest.raises(ValueError, match="buffer_size"):
        TD3Config(num_envs=8, buffer_size=4)
    with pytest.raises(ValueError, match="learning_starts"):
        TD3Config(learning_starts=-1)
    with pytest.raises(ValueError, match="activation"):
        TD3Config(activation="sigmoidish")
    with pytest.raises(ValueError, match="policy_delay"):
        TD3Config(policy_delay=0)
    with pytest.raises(ValueError, match="unknown TD3 hyperparameter"):
        TD3HParams.default(learning_rate=1e-3)
    with pytest.raises(ValueError, match="unknown TD3 setting"):
        presets.resolve_config("Pendulum-v1", agent="td3", num_steps=4)
    env, p = envs.make("CartPole-v1")
    with pytest.raises(ValueError, match="continuous"):
        make_td3(TINY, env, p, learned_optim.from_spec("adam"))
    cfg, hp, lr = presets.resolve_config("Pendulum-v1", agent="td3", total_timesteps=1000, lr=3e-4)
    assert cfg.total_timesteps == 1000 and cfg.hidden_sizes == (64, 64) and lr == 3e-4
    assert presets.resolve_config("Pendulum-v1", agent="td3").lr == 1e-3 and "lr" not in hp
    assert cfg.num_updates == 1000 // cfg.num_envs and cfg.steps_per_update == cfg.num_envs


# ---------------------------------------------------------------------------
# Pure pieces, by hand
# ---------------------------------------------------------------------------


def test_td_target_takes_min_of_twins_and_stops_only_at_termination():
    r = jnp.array([1.0, -2.0, 0.5])
    term = jnp.array([0.0, 0.0, 1.0])
    q1 = jnp.array([10.0, -4.0, 100.0])
    q2 = jnp.array([8.0, -3.0, 50.0])
    y = td3.td_target(r, term, q1, q2, 0.9)
    # 1 + 0.9 * min(10, 8); -2 + 0.9 * min(-4, -3); terminated: reward only.
    np.testing.assert_allclose(y, [1.0 + 7.2, -2.0 - 3.6, 0.5], rtol=1e-6)


def test_target_policy_smoothing_clips_noise_then_action():
    a = jnp.array([[0.0, 0.9, -0.95]])
    eps = jnp.array([[1.0, 1.0, -10.0]])
    out = td3.smoothed_target_action(a, eps, policy_noise=0.2, noise_clip=0.5)
    # noise 0.2 -> 0.2; 0.9 + 0.2 -> clipped to 1; -10 * 0.2 = -2 -> noise clip -0.5 -> -1.45 -> -1.
    np.testing.assert_allclose(out, [[0.2, 1.0, -1.0]], rtol=1e-6)
    out = td3.smoothed_target_action(jnp.array([[0.1]]), jnp.array([[3.0]]), 0.2, 0.5)
    np.testing.assert_allclose(out, [[0.6]], rtol=1e-6)  # 0.6 noise clipped to 0.5


def test_polyak_by_hand_keeps_dtypes():
    target = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(0.0)}
    online = {"w": jnp.array([3.0, 0.0]), "b": jnp.array(10.0)}
    out = td3.polyak(target, online, jnp.float32(0.25))
    np.testing.assert_allclose(out["w"], [1.5, 1.5])
    np.testing.assert_allclose(out["b"], 2.5)
    assert out["w"].dtype == jnp.float32


def test_replay_buffer_add_wraps_around_and_samples_filled_rows():
    buf = replay_buffer.init({"x": jnp.zeros((2,)), "t": jnp.zeros(())}, capacity=5)
    assert buf.capacity == 5 and int(buf.size) == 0
    buf = replay_buffer.add(buf, {"x": jnp.arange(6.0).reshape(3, 2), "t": jnp.array([1.0, 2.0, 3.0])})
    assert int(buf.ptr) == 3 and int(buf.size) == 3
    # Only the 3 filled rows are ever drawn.
    s = replay_buffer.sample(buf, jax.random.key(0), 200)
    assert set(np.asarray(s["t"]).tolist()) == {1.0, 2.0, 3.0}
    np.testing.assert_array_equal(np.asarray(s["x"])[:, 0] / 2 + 1, np.asarray(s["t"]))  # rows stay whole
    buf = replay_buffer.add(buf, {"x": 10 + jnp.arange(8.0).reshape(4, 2), "t": jnp.array([4.0, 5.0, 6.0, 7.0])})
    # Rows 3, 4, 0, 1 written: the two oldest (t=1, 2) overwritten.
    assert int(buf.ptr) == 2 and int(buf.size) == 5
    np.testing.assert_array_equal(buf.data["t"], [6.0, 7.0, 3.0, 4.0, 5.0])
    np.testing.assert_array_equal(buf.data["x"][0], [14.0, 15.0])
    s = replay_buffer.sample(buf, jax.random.key(1), 300)
    assert set(np.asarray(s["t"]).tolist()) == {3.0, 4.0, 5.0, 6.0, 7.0}


# ---------------------------------------------------------------------------
# The agent (one compiled one-iteration step shared by several tests)
# ---------------------------------------------------------------------------


class Compiled(NamedTuple):
    agent: td3.TD3Agent
    init: object
    step: object  # jit(run(., 1))
    pop_init: object
    pop_step: object


@pytest.fixture(scope="module")
def tiny(pendulum):
    env, p = pendulum
    agent = make_td3(TINY, env, p, learned_optim.from_spec("adam:lr=1e-3"))
    one = lambda s: agent.run(s, 1)  # noqa: E731
    return Compiled(agent, jax.jit(agent.init), jax.jit(one), jax.jit(jax.vmap(agent.init)),
                    jax.jit(jax.vmap(one)))


def run_loop(step, state, n):
    ms = []
    for _ in range(n):
        state, m = step(state)
        ms.append(m)
    return state, jax.tree.map(lambda *x: np.concatenate([np.asarray(v) for v in x], -1), *ms)


def test_state_structure_stable_and_deterministic(tiny):
    agent = tiny.agent
    assert agent.stats_needed == frozenset() and agent.uses_lr
    s0 = tiny.init(jax.random.key(0), TD3HParams.default())
    s1, m = run_loop(tiny.step, s0, 6)
    assert jax.tree.structure(s0) == jax.tree.structure(s1)
    for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1)):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert set(s1.params) == {"actor", "critic"}
    assert s1.params["critic"]["Dense_0"]["kernel"].shape == (2, 3 + 1, 8)  # twin critics on (obs, action)
    assert m["episode_return"].shape == (6,) and m["episode_return"].dtype == np.float32
    assert int(s1.update_step) == 6 and int(s1.buffer.size) == 12
    # learning_starts=4 env steps = 2 iterations of 2 envs: trained from the second on.
    np.testing.assert_array_equal(m["trained"], [False, True, True, True, True, True])
    assert int(s1.grad_step) == 5
    # Same key -> same result; another key -> other weights.
    s1b, _ = run_loop(tiny.step, tiny.init(jax.random.key(0), TD3HParams.default()), 6)
    assert trees_equal(s1, s1b)
    s1c, _ = run_loop(tiny.step, tiny.init(jax.random.key(1), TD3HParams.default()), 6)
    assert not np.allclose(s1.params["actor"]["Dense_0"]["kernel"], s1c.params["actor"]["Dense_0"]["kernel"])


def test_delayed_actor_and_target_updates(tiny):
    """policy_delay=2, one gradient step per iteration: odd steps move only the
    critics; even steps also the actor, and then the targets become exactly
    polyak(targets, new params, tau)."""
    s0 = tiny.init(jax.random.key(0), TD3HParams.default(tau=0.3))
    assert trees_equal(s0.target_params, s0.params)
    s1, m1 = tiny.step(s0)  # before learning_starts: nothing trains
    assert int(s1.grad_step) == 0 and trees_equal(s1.params, s0.params)
    s2, m2 = tiny.step(s1)  # critic step 1
    assert int(s2.grad_step) == 1 and float(m2["actor_loss"][0]) == 0.0
    assert trees_equal(s2.params["actor"], s1.params["actor"])
    assert trees_equal(s2.target_params, s1.target_params)
    assert not np.allclose(s2.params["critic"]["Dense_2"]["kernel"], s1.params["critic"]["Dense_2"]["kernel"])
    s3, m3 = tiny.step(s2)  # critic step 2: actor and targets too
    assert int(s3.grad_step) == 2 and float(m3["actor_loss"][0]) != 0.0
    assert not np.allclose(s3.params["actor"]["Dense_2"]["kernel"], s2.params["actor"]["Dense_2"]["kernel"])
    expected = jax.tree.map(lambda t, o: 0.7 * t + 0.3 * o, s2.target_params, s3.params)
    for a, b in zip(leaves(s3.target_params), leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    s4, _ = tiny.step(s3)  # critic step 3: actor and targets wait
    assert trees_equal(s4.params["actor"], s3.params["actor"]) and trees_equal(s4.target_params, s3.target_params)


def test_time_limit_is_bootstrapped_not_terminal(tiny):
    """Pendulum only ends at its 200-step limit: the buffer stores the true last
    observation as next_obs there (not the reset observation) and never marks
    a transition terminal."""
    s, m = run_loop(tiny.step, tiny.init(jax.random.key(0), TD3HParams.default()), 200)
    d = jax.tree.map(np.asarray, s.buffer.data)
    assert np.all(d["terminated"] == 0.0)
    cap, ptr = TINY.buffer_size, int(s.buffer.ptr)
    last = [(ptr - 2) % cap, (ptr - 1) % cap]  # step 200 of both envs
    prev = [(ptr - 4) % cap, (ptr - 3) % cap]  # step 199
    np.testing.assert_array_equal(d["next_obs"][prev], d["obs"][last])  # inside the episode
    assert not np.allclose(d["next_obs"][last], np.asarray(s.obs))  # the final obs, not the fresh episode's
    assert np.allclose(d["next_obs"][last][:, 0] ** 2 + d["next_obs"][last][:, 1] ** 2, 1.0, atol=1e-5)
    assert np.all(m["episodes"][:199] == 0) and m["episodes"][199] == 2
    assert m["episode_return"][199] < -1.0 and m["episode_return"][198] == 0.0


def test_vmap_over_members_equals_a_loop_and_hparams_are_per_member(tiny):
    hps = jax.tree.map(lambda x: jnp.broadcast_to(x, (3,)), TD3HParams.default())._replace(
        tau=jnp.array([0.005, 0.01, 0.02]))
    lrs = jnp.array([0.0, 1e-3, 3e-3])
    keys = jax.random.split(jax.random.key(3), 3)
    s0 = tiny.pop_init(keys, hps, lrs)
    pop, m = run_loop(tiny.pop_step, s0, 5)
    for i in range(3):
        one, mi = run_loop(tiny.step, tiny.init(keys[i], jax.tree.map(lambda x: x[i], hps), lrs[i]), 5)
        for a, b in zip(leaves(one), leaves(jax.tree.map(lambda x: x[i], pop))):
            if np.issubdtype(a.dtype, np.floating):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
            else:
                np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(mi["critic_loss"], m["critic_loss"][i], rtol=1e-4, atol=1e-5)
    # lr = 0 leaves member 0's weights where they were; the others moved.
    for part in ("actor", "critic"):
        k0, k1 = s0.params[part]["Dense_1"]["kernel"], pop.params[part]["Dense_1"]["kernel"]
        np.testing.assert_array_equal(k0[0], k1[0])
        assert not np.allclose(k0[1], k1[1]) and not np.allclose(k0[2], k1[2])


class _Recorder(NamedTuple):
    """Test optimizer state: asks for all statistics and records what came."""

    count: jax.Array
    seen: dict
    required_stats = frozenset({"inputs", "outputs", "preact_grads"})


def _recording_optimizer():
    names = ("part", "tf", "bf", "in0", "in_last", "out0_rows", "g_rows", "g_last", "g_norm", "last_out")

    def init(params):
        return _Recorder(jnp.zeros((), jnp.int32), {n: jnp.zeros(()) for n in names})

    def update(updates, state, params=None, *, layer_stats, train_fraction, batch_fraction, key, **_):
        (part, stats), = layer_stats.items()
        first, last = stats["Dense_0"], stats["Dense_2"]
        f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
        seen = dict(
            part=f(1.0 if part == "actor" else 2.0), tf=f(train_fraction), bf=f(batch_fraction),
            in0=f(first.inputs.shape[0] * 1000 + first.inputs.shape[1]), in_last=f(last.inputs.shape[1]),
            out0_rows=f(first.outputs.shape[0]), g_rows=f(first.preact_grads.shape[0]),
            g_last=f(last.preact_grads.shape[1]), g_norm=jnp.abs(first.preact_grads).sum(),
            last_out=jnp.abs(last.outputs).sum(),
        )
        return jax.tree.map(lambda g: -1e-3 * g, updates), _Recorder(state.count + 1, seen)

    return optax.GradientTransformationExtraArgs(init, update)


def test_layer_stats_and_context_reach_both_parts(pendulum):
    env, p = pendulum
    cfg = dataclasses.replace(TINY, learning_starts=0, gradient_steps=4, curvature_batch_size=8)
    agent = make_td3(cfg, env, p, _recording_optimizer())
    assert agent.stats_needed == {"inputs", "outputs", "preact_grads"}
    s, _ = jax.jit(lambda k, h: agent.run(agent.init(k, h), 2))(jax.random.key(0), TD3HParams.default())
    actor, critic = s.opt_state["actor"], s.opt_state["critic"]
    # 2 iterations x 4 gradient steps: the critics every step, the actor every 2nd.
    assert int(actor.count) == 4 and np.asarray(critic.count).tolist() == [8, 8]
    a, c = actor.seen, jax.tree.map(lambda x: x[1], critic.seen)  # critic 1 of the twin axis
    assert float(a["part"]) == 1.0 and float(c["part"]) == 2.0
    np.testing.assert_allclose(a["tf"], 1 / cfg.num_updates)  # second iteration
    np.testing.assert_allclose(c["bf"], 1.0)  # last gradient step of the iteration
    np.testing.assert_allclose(a["bf"], 1.0)
    assert int(a["in0"]) == 8 * 1000 + 3 and int(c["in0"]) == 8 * 1000 + 4  # obs / (obs, action); 8 rows
    assert int(a["in_last"]) == 8 and int(c["g_last"]) == 1 and int(a["g_last"]) == 1
    assert int(a["out0_rows"]) == cfg.batch_size and int(c["out0_rows"]) == cfg.batch_size  # dormancy: all rows
    assert int(a["g_rows"]) == 8 and float(a["g_norm"]) > 0 and float(c["g_norm"]) > 0


# diag_ggn shares the statistics path with kfac and is vmapped over members in test_kfac.py
@pytest.mark.parametrize("spec", ["kfac", pytest.param("diag_ggn", marks=pytest.mark.slow)])
def test_curvature_optimizers_run_finite_in_a_vmapped_population(pendulum, spec):
    env, p = pendulum
    cfg = dataclasses.replace(TINY, learning_starts=16, total_timesteps=2 * 30)
    agent = make_td3(cfg, env, p, learned_optim.from_spec(spec))
    assert agent.stats_needed == {"inputs", "preact_grads"} and agent.uses_lr
    hp = jax.tree.map(lambda x: jnp.broadcast_to(x, (2,)), TD3HParams.default())
    first, (s, m) = jax.jit(jax.vmap(lambda k, h: (agent.init(k, h).params, agent.train(k, h, 0.05))))(
        jax.random.split(jax.random.key(0), 2), hp)
    assert np.asarray(m["finite"]).all() and np.isfinite(np.asarray(m["critic_loss"])).all()
    for part in ("actor", "critic"):
        curv = s.opt_state[part].inner_state[0]  # scale_by_* state inside inject_hyperparams' chain
        health = curv.health
        assert all(int(np.sum(h)) == 0 for h in health), health
        assert not np.allclose(s.params[part]["Dense_0"]["kernel"], first[part]["Dense_0"]["kernel"])
    assert float(np.asarray(s.opt_state["critic"].hyperparams["learning_rate"]).min()) == pytest.approx(0.05)
    np.testing.assert_allclose(core.learning_rate(s), 0.05)  # the actor's, equal to the critics'


def test_pbt_copies_targets_with_weights_and_reinits_other_kinds(pendulum):
    """The PBT adapter: TD3 members copy params, targets, opt_state and
    hparams; init_opt rebuilds an optimizer state of the agent's own layout."""
    from meta import pbt

    groups = pbt.parse_groups("adam:2,kfac:2", 4)
    agents, spaces, base, spu, n_up = pbt.make_member_agents(
        "td3", "Pendulum-v1", groups, 400, None, hidden_sizes=(8, 8), learning_starts=8, buffer_size=64,
        batch_size=8, gradient_steps=1)
    assert spu == 4 and n_up == 100 and "target_params" in agents[0].copy_fields
    assert spaces[0].names == ("lr", "gamma", "tau", "policy_noise", "noise_clip", "exploration_noise")
    from learned_optim import registry

    assert spaces[1].low[0] == registry.info("kfac").lr_bounds[0]  # per-kind lr bounds
    shape = jax.eval_shape(agents[1].init, jax.random.key(0), base)
    assert jax.tree.structure(jax.eval_shape(agents[1].init_opt, shape.params)) == \
        jax.tree.structure(shape.opt_state)


@pytest.mark.slow
def test_td3_learns_pendulum_slow():
    """Two seeds, 2e4 env steps: random play scores about -1200..-1400 on
    Pendulum; TD3 must be near the solved level (about -150)."""
    env, p = envs.make("Pendulum-v1")
    cfg, hp, lr = presets.resolve_config("Pendulum-v1", agent="td3", total_timesteps=20_000)
    agent = make_td3(cfg, env, p, learned_optim.from_spec("adam"))
    hps = jax.tree.map(lambda x: jnp.broadcast_to(x, (2,)), TD3HParams.default(**hp))
    _, m = jax.jit(jax.vmap(agent.train, in_axes=(0, 0, None)))(jax.random.split(jax.random.key(0), 2), hps, lr)
    ret = np.asarray(m["episode_return"])
    final = ret[:, [-1, -201, -401]].mean(1)  # each seed's last three episodes (of 4 envs each)
    assert np.asarray(m["finite"]).all() and final.mean() > -350, final


def test_td3_learns_pendulum():
    """One seed, 1e4 env steps of the Pendulum preset (about 50 s on 2 busy
    cores): a broken TD3 stays at random play's -1200..-1600."""
    env, p = envs.make("Pendulum-v1")
    cfg, hp, lr = presets.resolve_config("Pendulum-v1", agent="td3", total_timesteps=10_000)
    agent = make_td3(cfg, env, p, learned_optim.from_spec("adam"))
    _, m = jax.jit(agent.train)(jax.random.key(0), TD3HParams.default(**hp), lr)
    ret = np.asarray(m["episode_return"])
    assert np.asarray(m["finite"]).all()
    # Every env finishes an episode every 200 iterations (Pendulum's time limit).
    ends = np.flatnonzero(np.asarray(m["episodes"]))
    np.testing.assert_array_equal(ends, np.arange(199, cfg.num_updates, 200))
    episodes = ret[ends]
    assert episodes[:2].max() < -900  # the first (random-action) episodes really are bad
    assert episodes[-3:].mean() > -500, episodes
