"""OPEN: hand-derived features, dormancy and layer proportions, the step
formula's structure (noise only on the actor, mean removal), the published
weights and their loader's errors."""

import glob
import os
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import learned_optim
from learned_optim.context import LayerStats
from learned_optim.features import dormancy, leaf_dormancy, normalise, normalise_by_tensor, update_momenta
from learned_optim.layout import LeafInfo, flat_layout, flatten_elements, leaf_infos
from tests.conftest import SHARED
from learned_optim.open import (BETAS, OPEN_LARGE, OPEN_SMALL, OpenRule, load_open_weights, open_features,
                                open_network, open_state_by_leaf)

ANCHORS = sorted(glob.glob(os.path.join(SHARED, "anchors", "open", "*.npy")))


def tiny_params(continuous=False):
    k = iter(jax.random.split(jax.random.key(0), 16))
    n = lambda s: jax.random.normal(next(k), s) * 0.5  # noqa: E731
    actor = {"Dense_0": {"kernel": n((3, 4)), "bias": n((4,))},
             "Dense_1": {"kernel": n((4, 2)), "bias": n((2,))}}
    if continuous:
        actor["log_std"] = n((2,))
    critic = {"Dense_0": {"kernel": n((3, 4)), "bias": n((4,))},
              "Dense_1": {"kernel": n((4, 4)), "bias": n((4,))},
              "Dense_2": {"kernel": n((4, 1)), "bias": n((1,))}}
    return {"actor": actor, "critic": critic}


def tiny_stats(params, key=jax.random.key(7)):
    out = {}
    for part, layers in params.items():
        out[part] = {}
        for name, layer in layers.items():
            if name.startswith("Dense_"):
                key, k = jax.random.split(key)
                out[part][name] = LayerStats(outputs=jax.random.normal(k, (5, layer["kernel"].shape[1])))
    return out


def like(params, key):
    leaves, tree = jax.tree.flatten(params)
    return jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) for k, x in zip(jax.random.split(key, len(leaves)), leaves)])


def test_features_by_hand_on_a_tiny_tensor():
    p = jnp.array([3.0, -4.0])
    g = jnp.array([2.0, -0.5])
    m = update_momenta(jnp.zeros((2, 6)), g, BETAS)  # first step: m_b = (1 - b) g
    f = np.asarray(open_features(p, g, m, 0.3, 0.5, 0.25, jnp.array([1.5, 0.5])))
    assert f.shape == (2, 19)

    def norm(col):  # x / sqrt(1e-5 + mean(x^2)) over the two elements
        return [x / math.sqrt(1e-5 + (col[0] ** 2 + col[1] ** 2) / 2) for x in col]

    expected = [norm([3.0, -4.0])]                                       # param
    expected += [norm([1.0, -1.0])] * 6                                  # sign of each momentum
    expected += [norm([math.log((1 - b) * 2.0 + 1e-13), math.log((1 - b) * 0.5 + 1e-13)]) for b in BETAS]
    expected += [norm([1.0, -1.0]), norm([math.log(2.0 + 1e-13), math.log(0.5 + 1e-13)])]
    expected += [[0.3, 0.3], [0.5, 0.5], [0.25, 0.25], [1.5, 0.5]]     # train, layer, batch, dormancy
    np.testing.assert_allclose(f, np.array(expected).T, rtol=1e-5, atol=1e-6)
    # spot values: 3 / sqrt(12.5), and log(0.45) / sqrt(1e-5 + mean(log(1.8)^2, log(0.45)^2))
    assert f[0, 0] == pytest.approx(0.848528, abs=1e-5)
    assert f[1, 7] == pytest.approx(math.log(0.45) / math.sqrt(1e-5 + (math.log(1.8) ** 2 + math.log(0.45) ** 2) / 2), rel=1e-5)


def test_momenta_follow_ema_without_bias_correction():
    m = jnp.zeros((1, 6))
    for g in (1.0, -2.0):
        m = update_momenta(m, jnp.array([g]), BETAS)
    want = [b * (1 - b) * 1.0 + (1 - b) * -2.0 for b in BETAS]
    np.testing.assert_allclose(m[0], want, rtol=5e-4)  # float32: 1 - 0.9999


def test_dormancy_by_hand():
    outputs = jnp.array([[1.0, 0.0, 3.0], [-1.0, 0.0, 1.0]])   # mean |.| per neuron: 1, 0, 2; layer mean 1
    np.testing.assert_allclose(dormancy(outputs), [1.0, 0.0, 2.0], atol=1e-9)
    info = LeafInfo(("actor", "Dense_0", "kernel"), "actor", "Dense_0", 0.0, True)
    d = leaf_dormancy({"actor": {"Dense_0": LayerStats(outputs=outputs)}}, info, (2, 3))
    np.testing.assert_allclose(d, [[1.0, 0.0, 2.0]] * 2, atol=1e-9)  # kernel entry -> its output neuron
    assert float(leaf_dormancy(None, info, (2, 3))[0, 0]) == 1.0  # neutral without stats
    with pytest.raises(ValueError, match="actor/Dense_0/kernel"):
        leaf_dormancy({"actor": {"Dense_0": LayerStats(outputs=outputs)}}, info, (3, 2))


def test_layer_proportions_from_the_params_tree():
    infos = {i.path: i for i in leaf_infos(tiny_params(continuous=True))}
    prop = {p: round(i.layer_prop, 6) for p, i in infos.items()}
    # actor: Dense_0, Dense_1, log_std -> 0, 1/2, 1 (log_std counts, as in the published code)
    assert prop[("actor", "Dense_0", "kernel")] == 0.0
    assert prop[("actor", "Dense_1", "bias")] == 0.5
    assert prop[("actor", "log_std")] == 1.0
    # critic counted on its own: 0, 1/2, 1
    assert [prop[("critic", f"Dense_{i}", "kernel")] for i in range(3)] == [0.0, 0.5, 1.0]
    assert infos[("actor", "log_std")].is_actor and not infos[("critic", "Dense_0", "bias")].is_actor
    # numeric order (Dense_10 after Dense_2), and a bare network
    bare = {f"Dense_{i}": {"bias": jnp.zeros(1)} for i in (0, 2, 10)}
    assert [round(i.layer_prop, 3) for i in leaf_infos(bare)] == [0.0, 1.0, 0.5]  # leaves sort as 0, 10, 2


def reference_update(rule, meta_params, grads, params, stats, train_fraction, batch_fraction):
    """Per-tensor OPEN without noise, written leaf by leaf (as the published code does)."""
    gru, mlp = nn.GRUCell(features=rule.gru_features), nn.Sequential(
        [nn.Dense(rule.hidden_size), nn.LayerNorm(), nn.relu, nn.Dense(rule.hidden_size), nn.LayerNorm(),
         nn.relu, nn.Dense(3)])
    infos = leaf_infos(params)
    steps = []
    for info, g, p in zip(infos, jax.tree.leaves(grads), jax.tree.leaves(params)):
        m = update_momenta(jnp.zeros(p.shape + (6,)), g, BETAS)
        x = open_features(p, g, m, train_fraction, info.layer_prop, batch_fraction,
                          leaf_dormancy(stats, info, p.shape))
        _, h = gru.apply(meta_params["gru_params"], jnp.zeros(p.shape + (rule.gru_features,)), x)
        o = mlp.apply(meta_params["params"], h)
        steps.append(o[..., 0] * 0.001 * jnp.exp(o[..., 1] * 0.001))
    mean = jnp.concatenate([s.ravel() for s in steps]).mean()
    return [-(s - mean) for s in steps]


@pytest.mark.parametrize("rule", [OpenRule(actor_noise=False), OpenRule(gru_features=16, hidden_size=32, actor_noise=False)])
def test_transform_matches_per_tensor_reference(rule):
    params = tiny_params(continuous=True)
    grads = like(params, jax.random.key(1))
    stats = tiny_stats(params)
    mp = rule.init_meta_params(jax.random.key(2))
    tx = rule.make_optimizer(mp)
    upd = jax.jit(lambda tf, st: tx.update(grads, tx.init(params), params, train_fraction=tf,
                                           batch_fraction=1.0, layer_stats=st, key=jax.random.key(3))[0])
    u = upd(0.4, stats)
    ref = jax.jit(reference_update, static_argnums=0)(rule, mp, grads, params, stats, 0.4, 1.0)
    for a, b in zip(jax.tree.leaves(u), ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8)
    # dormancy and the training fraction reach the network: changing either changes the update
    for other in (upd(0.9, stats), upd(0.4, tiny_stats(params, jax.random.key(99)))):
        assert not np.allclose(jax.tree.leaves(u)[0], jax.tree.leaves(other)[0], rtol=0, atol=1e-10)


def test_noise_only_on_actor_and_mean_removed():
    params = tiny_params(continuous=True)
    grads = like(params, jax.random.key(1))
    tx = OPEN_SMALL.make_optimizer(OPEN_SMALL.init_meta_params(jax.random.key(5)))
    state = tx.init(params)
    upd = jax.jit(tx.update)
    kw = dict(train_fraction=0.2, batch_fraction=0.0, layer_stats=tiny_stats(params))
    u1, _ = upd(grads, state, params, key=jax.random.key(10), **kw)
    u1b, _ = upd(grads, state, params, key=jax.random.key(10), **kw)
    u2, _ = upd(grads, state, params, key=jax.random.key(11), **kw)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u1b)):
        np.testing.assert_array_equal(a, b)  # same key, same update
    # another key: actor elements move by different amounts; critic elements all by the
    # same constant (only the global mean, which includes the actor's noise, changed)
    d_actor = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(u1["actor"]), jax.tree.leaves(u2["actor"]))])
    d_critic = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(u1["critic"]), jax.tree.leaves(u2["critic"]))])
    assert np.ptp(d_actor) > 1e-6
    assert np.ptp(d_critic) < 1e-9 * max(1.0, np.abs(d_actor).max() * 1e3)
    # mean removal over all parameters together
    for u in (u1, u2):
        flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(u)])
        assert abs(flat.sum()) < 1e-5 * np.abs(flat).sum()
        assert abs(np.concatenate([np.ravel(x) for x in jax.tree.leaves(u["actor"])]).sum()) > 1e-7


def test_state_carries_momenta_and_gru_state():
    params = tiny_params()
    grads = like(params, jax.random.key(1))
    tx = OPEN_SMALL.make_optimizer(OPEN_SMALL.init_meta_params(jax.random.key(5)))
    s0 = tx.init(params)
    n = sum(x.size for x in jax.tree.leaves(params))
    assert s0.carry.shape == (8, n) and s0.momenta.shape == (6, n)  # flat, feature-major
    assert open_state_by_leaf(s0, params)[1]["critic"]["Dense_1"]["kernel"].shape == (4, 4, 8)
    upd = jax.jit(tx.update)
    _, s1 = upd(grads, s0, params)  # no extra args: neutral context
    momenta, carry = open_state_by_leaf(s1, params)
    np.testing.assert_allclose(momenta["actor"]["Dense_0"]["bias"][:, 0], 0.9 * grads["actor"]["Dense_0"]["bias"], rtol=1e-6)
    np.testing.assert_allclose(momenta["critic"]["Dense_2"]["kernel"][..., 5],
                               (1 - BETAS[5]) * grads["critic"]["Dense_2"]["kernel"], rtol=1e-3)
    assert float(jnp.abs(carry["actor"]["Dense_0"]["kernel"]).max()) > 0
    u_fresh, _ = upd(grads, s0, params, key=jax.random.key(0))
    u_carried, _ = upd(grads, s1._replace(momenta=s0.momenta), params, key=jax.random.key(0))
    assert not np.allclose(u_fresh["critic"]["Dense_0"]["kernel"], u_carried["critic"]["Dense_0"]["kernel"])
    assert int(s1.count) == 1 and learned_optim.required_stats(tx, params) == {"outputs"}
    with pytest.raises(ValueError, match="params"):
        jax.eval_shape(tx.update, grads, s0)
    with pytest.raises(ValueError, match="tx.init"):  # a state made for other params
        jax.eval_shape(tx.update, grads, tx.init(params["actor"]), params)


@pytest.mark.parametrize("rule", [OPEN_SMALL, OPEN_LARGE])
def test_feature_major_network_equals_flax(rule):
    mp = rule.init_meta_params(jax.random.key(3))
    # published-like scales: random LayerNorm scales/biases, not flax's ones/zeros
    mp = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.3 * jax.random.normal(jax.random.key(len(str(path))), x.shape)
        if "layers_1" in str(path) or "layers_4" in str(path) or "hn" in str(path) else x, mp)
    k1, k2 = jax.random.split(jax.random.key(4))
    x = jax.random.normal(k1, (37, 19))
    c = 0.5 * jax.random.normal(k2, (37, rule.gru_features))
    gru = nn.GRUCell(features=rule.gru_features)
    mlp = nn.Sequential([nn.Dense(rule.hidden_size), nn.LayerNorm(), nn.relu,
                         nn.Dense(rule.hidden_size), nn.LayerNorm(), nn.relu, nn.Dense(3)])
    want_c, h = gru.apply(mp["gru_params"], c, x)
    want_o = mlp.apply(mp["params"], h)
    from learned_optim.open import _prepare
    got_c, got_o = open_network(_prepare(mp), c.T, x.T)
    np.testing.assert_allclose(got_c.T, want_c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_o.T, want_o, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not ANCHORS, reason="OPEN reference weights not present")
@pytest.mark.parametrize("path", ANCHORS)
def test_published_weights(path):
    flat = np.load(path)
    rule, mp = load_open_weights(path)
    assert rule == OPEN_SMALL and flat.shape == (1211,)
    shapes = jax.tree.map(np.shape, mp)
    assert shapes["gru_params"]["params"]["ir"]["kernel"] == (19, 8)
    assert shapes["gru_params"]["params"]["hn"]["bias"] == (8,) and "bias" not in shapes["gru_params"]["params"]["hr"]
    assert shapes["params"]["params"]["layers_4"]["scale"] == (16,)
    assert shapes["params"]["params"]["layers_6"]["kernel"] == (16, 3)
    np.testing.assert_array_equal(np.asarray(rule.flatten(mp)), flat)  # round trip
    # first leaf in tree order is the GRU's hn bias
    np.testing.assert_array_equal(mp["gru_params"]["params"]["hn"]["bias"], flat[:8])
    tx = learned_optim.from_spec(f"open:{path}")
    params = tiny_params()
    u, _ = jax.jit(tx.update)(like(params, jax.random.key(1)), tx.init(params), params,
                              train_fraction=0.5, batch_fraction=0.0, key=jax.random.key(2),
                              layer_stats=tiny_stats(params))
    flat_u = np.concatenate([np.ravel(x) for x in jax.tree.leaves(u)])
    assert np.all(np.isfinite(flat_u)) and np.abs(flat_u).max() > 1e-6
    assert np.abs(flat_u).max() < 0.1  # steps are on the 1e-3 scale


def test_large_vector_loads_as_large_variant(tmp_path):
    assert OPEN_LARGE.num_meta_params == 3571 and OPEN_SMALL.num_meta_params == 1211
    vec = np.random.default_rng(0).normal(size=3571).astype(np.float32) * 0.1
    path = tmp_path / "large.npy"
    np.save(path, vec)
    rule, mp = load_open_weights(str(path))
    assert rule == OPEN_LARGE and mp["gru_params"]["params"]["iz"]["kernel"].shape == (19, 16)
    np.testing.assert_array_equal(rule.flatten(mp), vec)
    tx = learned_optim.from_spec(f"open:{path}")
    params = tiny_params()
    assert open_state_by_leaf(tx.init(params), params)[1]["actor"]["Dense_0"]["bias"].shape == (4, 16)


@pytest.mark.parametrize("case", ["missing", "wrong_length", "two_d", "ints", "pickled", "garbage", "nan"])
def test_loader_errors_name_the_path(tmp_path, case):
    path = str(tmp_path / f"{case}.npy")
    if case == "wrong_length":
        np.save(path, np.zeros(1210, np.float32))
    elif case == "two_d":
        np.save(path, np.zeros((1, 1211), np.float32))
    elif case == "ints":
        np.save(path, np.zeros(1211, np.int32))
    elif case == "pickled":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif case == "garbage":
        with open(path, "wb") as f:
            f.write(b"not a numpy file at all")
    elif case == "nan":
        np.save(path, np.full(1211, np.nan, np.float32))
    with pytest.raises(ValueError, match=str(tmp_path)):
        learned_optim.from_spec(f"open:{path}")


def test_fresh_specs():
    params = tiny_params()
    g = like(params, jax.random.key(1))

    def first_update(spec):
        tx = learned_optim.from_spec(spec)
        return np.asarray(jax.jit(tx.update)(g, tx.init(params), params, key=jax.random.key(0))[0]["critic"]["Dense_0"]["bias"])

    np.testing.assert_array_equal(first_update("open"), first_update("open:seed=0"))
    assert not np.allclose(first_update("open:seed=0"), first_update("open:seed=1"))
    tx = learned_optim.from_spec("open_large:seed=2")
    assert tx.init(params).carry.shape == (16, sum(x.size for x in jax.tree.leaves(params)))
    with pytest.raises(ValueError, match="seed"):
        learned_optim.from_spec("open_large:sed=2")
    with pytest.raises(ValueError):
        OpenRule(gru_features=0)


def test_flat_normalisation_is_per_tensor():
    a, b = jnp.array([[1.0, 2.0], [3.0, -4.0]]), jnp.array([0.5, -0.1, 7.0])
    infos = leaf_infos({"a": a, "b": b})
    layout = flat_layout(infos, [a.shape, b.shape])
    x = jnp.stack([flatten_elements([a, b]), flatten_elements([a, b]) ** 2], axis=-1)  # [7, 2]
    got = normalise_by_tensor(x, layout.spans, axis=0)
    want = jnp.concatenate([normalise(x[:4], (0,)), normalise(x[4:], (0,))])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert float(got[0, 0]) == pytest.approx(1.0 / math.sqrt(1e-5 + 30.0 / 4), rel=1e-6)
