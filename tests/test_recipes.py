"""The "open-paper" recipe: OPEN's own PPO and ES settings, against a
transcription of its reference (AlexGoldie/rl-learned-optimization @ b65037b,
``rl_optimizer/configs.py`` and ``rl_optimizer/train.py``; file:line by each
constant). Nothing expected here is read from the module under test."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import envs
from agents import core
from agents.ppo import PPOConfig, PPOHParams, make_ppo
from agents.presets import resolve_config
from meta.distributed import jit_placed
from meta.es import ESConfig, candidate_keys, make_es
from tests.test_es_values import VectorRule, linear_evaluation

# configs.py:44-62 ("breakout"), :105-124 ("gridworld"), :81-104 ("ant"); HSIZE is
# the width of both hidden layers (train.py:67-100).
REF_BREAKOUT = dict(num_envs=64, num_steps=128, total_timesteps=500_000, update_epochs=4, num_minibatches=8,
                    hidden_sizes=(64, 64), activation="relu", max_grad_norm=0.5)
REF_BREAKOUT_HP = dict(gamma=0.99, gae_lambda=0.95, clip_eps=0.2, ent_coef=0.01, vf_coef=0.5)
REF_FREEWAY_STEPS = 10_000_000  # configs.py:27
REF_GRID = dict(num_envs=1024, num_steps=20, total_timesteps=30_000_000, update_epochs=2, num_minibatches=16,
                hidden_sizes=(16, 16), activation="tanh", max_grad_norm=0.5)
REF_GRID_LR = 1e-4  # configs.py:106
REF_ANT = dict(num_envs=2048, num_steps=10, total_timesteps=50_000_000, update_epochs=4, num_minibatches=32,
               hidden_sizes=(64, 64), activation="tanh", normalize_obs=True)
REF_PPO_TEMP = {"Breakout-MinAtar": 50.0822, "Freeway-MinAtar": 61.8369, "Asterix-MinAtar": 15.0353,
                "SpaceInvaders-MinAtar": 167.0913, "brax/ant": 6517.31}  # configs.py:58, :39, :19, :77, :103


def _fields(cfg, names):
    return {k: getattr(cfg, k) for k in names}


def test_open_paper_ppo_settings_are_the_references():
    cfg, hp, _ = resolve_config("Breakout-MinAtar", recipe="open-paper")
    assert _fields(cfg, REF_BREAKOUT) == REF_BREAKOUT
    assert {k: hp[k] for k in REF_BREAKOUT_HP} == REF_BREAKOUT_HP
    assert cfg.clip_per_network and cfg.train_fraction_to_one  # train.py:460-461, :438-441
    assert resolve_config("Freeway-MinAtar", recipe="open-paper").config.total_timesteps == REF_FREEWAY_STEPS
    g, _, lr = resolve_config("gridworld/small_dense_short", recipe="open-paper")
    assert _fields(g, REF_GRID) == REF_GRID and lr == REF_GRID_LR
    assert _fields(resolve_config("brax/ant", recipe="open-paper").config, REF_ANT) == REF_ANT
    # A user's setting still wins over the recipe's per-env one.
    assert resolve_config("Breakout-MinAtar", recipe="open-paper", total_timesteps=81920).config.total_timesteps == 81920
    from agents.presets import recipe_reference_return

    for name, ref in REF_PPO_TEMP.items():
        assert recipe_reference_return("open-paper", name) == ref


def test_recipe_errors_name_what_is_allowed():
    with pytest.raises(ValueError, match="unknown PPO recipe 'nope'; allowed: open-paper"):
        resolve_config("Breakout-MinAtar", recipe="nope")
    with pytest.raises(ValueError, match=r"unknown PPO preset 'classic' in recipe 'open-paper'; allowed: "
                                         r"\['brax', 'gridworld', 'minatar'\]"):
        resolve_config("CartPole-v1", recipe="open-paper")
    with pytest.raises(ValueError, match="in recipe 'open-paper'"):
        ESConfig(envs=("CartPole-v1",), recipe="open-paper")


def test_clipping_each_network_by_its_own_norm():
    """Actor and critic clipped apart (train.py:460-461) vs one global norm."""
    g = {"actor": {"w": jnp.array([3.0, 4.0])}, "critic": {"w": jnp.array([0.3, 0.0])}}  # norms 5 and 0.3
    tx = core.with_clipping(optax.identity(), 0.5, per_network=True)
    out, _ = tx.update(g, tx.init(g))
    np.testing.assert_allclose(out["actor"]["w"], np.array([3.0, 4.0]) * 0.5 / 5.0, rtol=1e-6)
    np.testing.assert_allclose(out["critic"]["w"], [0.3, 0.0], rtol=1e-6)  # under its own limit: untouched
    joint = core.with_clipping(optax.identity(), 0.5)
    out, _ = joint.update(g, joint.init(g))
    total = np.sqrt(25.0 + 0.09)
    np.testing.assert_allclose(out["critic"]["w"], np.array([0.3, 0.0]) * 0.5 / total, rtol=1e-6)


def _fraction_probe():
    """An optimizer that changes nothing and keeps every train_fraction it was given."""

    def init(params):
        return jnp.full((64,), -1.0), jnp.zeros((), jnp.int32)

    def update(updates, state, params=None, *, train_fraction=None, **extra):
        seen, n = state
        return jax.tree.map(jnp.zeros_like, updates), (seen.at[n].set(train_fraction), n + 1)

    return optax.GradientTransformationExtraArgs(init, update)


@pytest.mark.parametrize("to_one", [False, True])
def test_training_proportion_reaches_one_at_the_last_update(to_one):
    """OPEN's training proportion (iteration // (MB x EPOCHS)) / (NUM_UPDATES - 1),
    train.py:438-441: u / (U - 1) at every minibatch step of update u."""
    env, env_params = envs.make("CartPole-v1")
    u, epochs, mbs = 3, 2, 2
    cfg = PPOConfig(num_envs=2, num_steps=8, total_timesteps=2 * 8 * u, update_epochs=epochs, num_minibatches=mbs,
                    train_fraction_to_one=to_one, hidden_sizes=(8,))
    agent = make_ppo(cfg, env, env_params, _fraction_probe())
    state, _ = jax.jit(agent.train)(jax.random.key(0), PPOHParams.default(), None)
    leaves = [x for x in jax.tree.leaves(state.opt_state) if x.shape == (64,)]
    seen = np.asarray(leaves[0])[: u * epochs * mbs]
    denom = (u - 1) if to_one else u
    expected = np.repeat(np.arange(u) / denom, epochs * mbs)
    np.testing.assert_allclose(seen, expected, rtol=1e-6)


def _es(**kw):
    cfg = ESConfig(envs=("CartPole-v1",), population=8, sigma=0.03, lr=0.03, seeds=1, timesteps=1024, **kw)
    return make_es(cfg, VectorRule(), evaluation=linear_evaluation(), reference_returns=[1.0])


def test_es_sigma_and_lr_decay_per_generation_and_zero_mean():
    """train.py:764 (mean at zeros), :815-830 (lr and sigma x 0.999 per
    generation, Adam b1 0.99): sigma decays by 0.999 per generation."""
    es = _es(sigma_decay=0.999, lr_decay=0.999, adam_b1=0.99, init_mean="zeros")
    state = jax.device_put(es.init(jax.random.key(0)), es.state_sharding)
    np.testing.assert_array_equal(np.asarray(es.mean_meta_params(state)["w"]), 0.0)
    step = jit_placed(es.step, es.state_sharding)
    for k in range(1, 4):
        state, m = step(state)
        # the population this generation was drawn with the previous sigma
        pop, mean = np.asarray(m["pop"]), np.asarray(m["mean"])
        z_std = np.abs(pop - mean).max(0)
        assert np.all(z_std > 0)
        # evosax's tell sets std = schedule(generation counter before it counts this generation),
        # in the reference as here (it runs the same Open_ES): one generation behind.
        np.testing.assert_allclose(float(state.es_state.std), 0.03 * 0.999 ** (k - 1), rtol=1e-6)
    # Adam's first-moment decay: the mean's k-th step matches optax.adam(lr_k, b1=0.99) on the same gradients.
    const = _es()
    s0 = jax.device_put(const.init(jax.random.key(0)), const.state_sharding)
    s1, _ = jit_placed(const.step, const.state_sharding)(s0)
    np.testing.assert_allclose(float(s1.es_state.std), 0.03, rtol=1e-6)  # no decay by default


def test_es_adam_b1_reaches_the_mean_update():
    """Two generations on the same linear fitness: the second step is the
    bias-corrected Adam step (Kingma & Ba alg. 1) of the two gradients with
    the given b1, at the decayed learning rate."""
    moves = {}
    for b1, decay in ((0.9, 1.0), (0.99, 0.5)):
        es = _es(adam_b1=b1, lr_decay=decay)
        state = jax.device_put(es.init(jax.random.key(1)), es.state_sharding)
        step = jit_placed(es.step, es.state_sharding)
        m0 = np.asarray(es.mean_meta_params(state)["w"], np.float64)
        grads, means = [], [m0]
        for _ in range(2):
            state, met = step(state)
            pop, mean, fit = (np.asarray(met[k], np.float64) for k in ("pop", "mean", "fitness"))
            ranks = np.argsort(np.argsort(-fit)).astype(np.float64)
            w = ranks / (len(fit) - 1) - 0.5
            grads.append(w @ ((pop - mean) / 0.03) / (len(fit) * 0.03))
            means.append(np.asarray(es.mean_meta_params(state)["w"], np.float64))
        m1 = (1 - b1) * grads[0]
        m2 = b1 * m1 + (1 - b1) * grads[1]
        v1 = 0.001 * grads[0] ** 2
        v2 = 0.999 * v1 + 0.001 * grads[1] ** 2
        # the second step's lr is 0.03 * decay ** 1
        step2 = 0.03 * decay * (m2 / (1 - b1 ** 2)) / (np.sqrt(v2 / (1 - 0.999 ** 2)) + 1e-8)
        np.testing.assert_allclose(means[2] - means[1], -step2, rtol=1e-4, atol=1e-7)
        moves[b1] = means[2] - means[1]
    assert not np.allclose(moves[0.9], moves[0.99])


def test_candidate_keys_common_and_pairs():
    key = jax.random.key(3)
    data = lambda k: np.asarray(jax.random.key_data(k))  # noqa: E731
    none, all_, pairs = (data(candidate_keys(key, 8, c)) for c in ("none", "all", "pairs"))
    assert len({tuple(r) for r in none}) == 8
    assert len({tuple(r) for r in all_}) == 1
    np.testing.assert_array_equal(pairs[:4], pairs[4:])  # antithetic pair i, i + P/2 (train.py:850-858, 877-880)
    assert len({tuple(r) for r in pairs[:4]}) == 4
    with pytest.raises(ValueError, match="--common-keys 'some'; allowed: none, all, pairs"):
        ESConfig(envs=("CartPole-v1",), common_keys="some")
    with pytest.raises(ValueError, match="needs antithetic"):
        ESConfig(envs=("CartPole-v1",), common_keys="pairs", antithetic=False)


# ---------------------------------------------------------------------------
# "optim4rl-paper": sail-sg/optim4rl @ 523d42e
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("anywhere", [False, True])
def test_gridworld_respawn_rule(anywhere):
    """envs/gridworld.py:285-287 of the reference: a respawning object lands on
    a uniform choice of *every* non-wall cell (:46-47, :236), the agent's
    included; ours by default never lands on the agent or a present object."""
    from envs.gridworld import EnvState, Gridworld

    env = Gridworld("small_sparse_short", respawn_anywhere=anywhere)  # 5 x 10 with walls: 3 x 8 interior
    params = env.default_params.replace(respawn_probs=jnp.ones(2, jnp.float32))
    state = EnvState(agent_pos=jnp.array([2, 4], jnp.int32), object_pos=jnp.array([[1, 1], [3, 8]], jnp.int32),
                     object_present=jnp.array([False, True]), time=jnp.zeros((), jnp.int32))
    step = jax.jit(jax.vmap(lambda k: env.step(k, state, 0, params)[1]))
    nxt = step(jax.random.split(jax.random.key(0), 4000))
    pos = np.asarray(nxt.object_pos[:, 0])
    assert np.asarray(nxt.object_present[:, 0]).all()
    on_agent = np.mean(np.all(pos == [2, 4], axis=1))
    on_other = np.mean(np.all(pos == [3, 8], axis=1))
    interior = (pos[:, 0] >= 1) & (pos[:, 0] <= 3) & (pos[:, 1] >= 1) & (pos[:, 1] <= 8)
    assert interior.all()
    if anywhere:  # 1/24 each, 4000 draws: 167 expected, s.d. 12.6
        assert 0.030 < on_agent < 0.054 and 0.030 < on_other < 0.054
        assert len({tuple(p) for p in pos}) == 24
    else:
        assert on_agent == 0 and on_other == 0
        assert len({tuple(p) for p in pos}) == 22


def test_a2c_time_limit_bootstrap_can_be_off():
    """Optim4RL's A2C zeroes the discount at any done (agents/A2C.py:89,113): no
    gamma * V(final obs) at the time limit. Ours adds it unless told not to."""
    from agents.a2c import A2CConfig, A2CHParams, make_a2c

    env, env_params = envs.make("gridworld/small_dense_short", horizon=3)
    trajs = {}
    for boot in (True, False):
        cfg = A2CConfig(num_envs=4, num_steps=6, total_timesteps=24, hidden_sizes=(8,), bootstrap_time_limit=boot)
        agent = make_a2c(cfg, env, env_params, optax.sgd(0.0))
        state = agent.init(jax.random.key(0), A2CHParams.default(), None)
        _, trajs[boot] = jax.jit(agent.rollout)(state)
    r_on, r_off = np.asarray(trajs[True]["reward"]), np.asarray(trajs[False]["reward"])
    done = np.asarray(trajs[False]["done"])
    assert done[2].all() and done[5].all()  # every env hits the 3-step limit at steps 3 and 6
    assert set(np.unique(r_off)) <= {-1.0, 0.0, 1.0}  # raw object rewards only
    np.testing.assert_array_equal(r_on[~done], r_off[~done])
    assert np.abs(r_on[done] - r_off[done]).min() > 0  # gamma * V(final obs) != 0 for an untrained critic


def test_pipeline_offsets_spacing():
    """Units at int(linspace(0, T - 1, N)) (Optim4RL) or i * T // N (ours)."""
    from meta.pipeline import PipelineConfig

    np.testing.assert_array_equal(PipelineConfig(4, 32, spacing="linspace").offsets, [0, 10, 20, 31])
    np.testing.assert_array_equal(PipelineConfig(4, 32).offsets, [0, 8, 16, 24])
    np.testing.assert_array_equal(PipelineConfig(64, 32, spacing="linspace").offsets,
                                  np.linspace(0, 31, 64).astype(int))
    with pytest.raises(ValueError, match="spacing 'odd'; allowed: even, linspace"):
        PipelineConfig(4, 32, spacing="odd")


def _plan(argv):
    from meta.cli.meta_train import options, parse_args
    from meta.meta_train import build

    return build(*options(parse_args(argv)))


def test_recipes_resolve_to_the_references_settings():
    p = _plan(["--recipe", "open-paper", "--envs", "Breakout-MinAtar"])
    es = p.es
    # train.py:708-724, :764, :785, :815-830, :877-880; configs.py:58
    assert (es.population, es.sigma, es.lr, es.sigma_decay, es.lr_decay, es.adam_b1) == (64, 0.03, 0.03, 0.999,
                                                                                         0.999, 0.99)
    assert (es.generations, es.seeds, es.init_mean, es.fitness_measure, es.common_keys) == (
        512, 1, "zeros", "last_update", "all")
    assert es.reference_returns == (50.0822,) and es.timesteps is None and es.recipe == "open-paper"
    # a flag given wins over the recipe
    assert _plan(["--recipe", "open-paper", "--envs", "Breakout-MinAtar", "--population", "8"]).es.population == 8
    # configs/meta_rl_catch.json; components/network.py:97-98 (D256)
    c = _plan(["--recipe", "optim4rl-paper", "--method", "metagrad", "--envs", "Catch-bsuite"])
    assert (c.pipeline.num_units, c.pipeline.reset_interval, c.pipeline.spacing) == (64, 32, "linspace")
    assert (c.a2c.num_envs, c.a2c.num_steps, c.a2c.hidden_sizes, c.a2c.grad_clip) == (1, 20, (256,), 0.0)
    assert not c.a2c.bootstrap_time_limit and c.metagrad.num_inner == 4 and c.learning_rate == 1e-3
    assert float(c.hparams.gamma) == pytest.approx(0.995)
    # configs/meta_rl_sdl.json; components/network.py:91-92 (D32)
    g = _plan(["--recipe", "optim4rl-paper", "--method", "metagrad", "--envs", "gridworld/small_dense_long"])
    assert (g.pipeline.num_units, g.pipeline.reset_interval, g.a2c.hidden_sizes, g.a2c.grad_clip) == (
        512, 72, (32,), 1.0)
    assert g.learning_rate == 0.03 and g.env_overrides == {"gridworld/small_dense_long": {"respawn_anywhere": True}}


@pytest.mark.parametrize("argv,message", [
    (["--recipe", "nope"], "--recipe 'nope'; allowed: open-paper, optim4rl-paper"),
    (["--recipe", "optim4rl-paper", "--envs", "Catch-bsuite"], "sets --method metagrad, not ES over whole"),
    (["--recipe", "optim4rl-paper", "--method", "metagrad", "--envs", "CartPole-v1"],
     "envs must be Catch-bsuite or gridworlds"),
    (["--recipe", "open-paper", "--envs", "CartPole-v1"], "in recipe 'open-paper'"),
])
def test_recipe_errors(argv, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        _plan(argv)


def test_default_plans_keep_their_checkpoint_documents():
    """Fields added for the recipes stay out of a default run's resume document,
    so checkpoints written before them still resume."""
    from meta.meta_train import plan_document

    for argv in (["--envs", "CartPole-v1"], ["--method", "metagrad", "--envs", "Catch-bsuite"]):
        doc = json_text(plan_document(_plan(argv)))
        for name in ("sigma_decay", "recipe", "spacing", "bootstrap_time_limit"):
            assert name not in doc, (argv, name)
    # the main job sets common keys (antithetic pairs) and the training-mean fitness itself
    doc = plan_document(_plan(["--envs", "CartPole-v1"]))
    assert (doc["common_keys"], doc["fitness_measure"]) == ("pairs", "training_mean")
    assert "common_keys" not in json_text(plan_document(_plan(["--method", "metagrad", "--envs", "Catch-bsuite"])))
    doc = json_text(plan_document(_plan(["--recipe", "optim4rl-paper", "--method", "metagrad", "--envs",
                                         "Catch-bsuite"])))
    assert "spacing" in doc and "bootstrap_time_limit" in doc


def json_text(d):
    import json

    return json.dumps(d)


def test_small_brax_envs_get_the_cpu_sized_preset():
    from agents.presets import preset_for

    for name in ("brax/inverted_pendulum", "brax/inverted_double_pendulum", "brax/reacher"):
        cfg = resolve_config(name).config
        assert preset_for(name) == "brax_small" and (cfg.num_envs, cfg.num_steps) == (64, 32)
        assert cfg.normalize_obs and cfg.normalize_rewards
    assert preset_for("brax/ant") == "brax" and resolve_config("brax/ant").config.num_envs == 2048
