"""The common rule interface (traced meta-params, populations), the generic
MLP/GRU/LSTM rules, and save/load of learned optimizers."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import learned_optim
from learned_optim import registry
from learned_optim.context import Context, LayerStats
from learned_optim.features import update_momenta
from learned_optim.layout import flat_layout, leaf_infos
from learned_optim.open import OPEN_SMALL
from learned_optim.optim4rl import Optim4RLRule
from learned_optim.rules import GRURule, LSTMRule, MLPRule

RULES = {
    "open": OPEN_SMALL,
    "optim4rl": Optim4RLRule(),
    "mlp": MLPRule(hidden_sizes=(8,)),
    "gru": GRURule(hidden_size=4, head_sizes=(), features=("param", "grad", "momenta", "sign_log", "time")),
    "lstm": LSTMRule(hidden_size=4, features=("grad", "rms", "layer", "dormancy", "actor")),
}


def params_of(key):
    ks = jax.random.split(key, 5)
    return {
        "actor": {"Dense_0": {"kernel": jax.random.normal(ks[0], (3, 4)), "bias": jnp.zeros(4)},
                  "Dense_1": {"kernel": jax.random.normal(ks[1], (4, 2)), "bias": jax.random.normal(ks[2], (2,))}},
        "critic": {"Dense_0": {"kernel": jax.random.normal(ks[3], (3, 1)), "bias": jax.random.normal(ks[4], (1,))}},
    }


def extra_of(params, key):
    stats = {part: {name: LayerStats(outputs=jax.random.normal(jax.random.fold_in(key, i), (6, layer["kernel"].shape[1])))
                    for i, (name, layer) in enumerate(layers.items())}
             for part, layers in params.items()}
    return dict(train_fraction=jnp.float32(0.25), batch_fraction=jnp.float32(1.0), key=key, layer_stats=stats)


def stack(trees):
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def population(rule, n):
    """``n`` distinct meta-param trees stacked on a leading axis (no compilation)."""
    flat = np.asarray(rule.flatten(rule.init_meta_params(jax.random.key(0))))
    noise = np.random.default_rng(0).normal(size=(n, flat.size)).astype(np.float32) * 0.3
    return stack([jax.tree.map(np.asarray, rule.unflatten(flat + e)) for e in noise])


def grads_of(params):
    return jax.tree.map(lambda p: jnp.cos(3.0 * p) + 0.1, params)


_CACHE = {}


def _step_for(rule):
    """One update of a fresh optimizer built from (possibly traced) meta-params;
    the same function object per rule, so jit caches it."""
    if rule not in _CACHE:
        def f(meta_params, params, key):
            tx = rule.make_optimizer(meta_params)
            return tx.update(grads_of(params), tx.init(params), params, **extra_of(params, key))
        _CACHE[rule] = f
    return _CACHE[rule]


@pytest.mark.parametrize("kind", sorted(RULES))
def test_population_of_meta_params_vmaps_like_a_loop(kind):
    rule = RULES[kind]
    pop = population(rule, 3)
    keys = jax.random.split(jax.random.key(1), 3)
    params = stack([params_of(k) for k in keys])
    f = _step_for(rule)
    u_pop, s_pop = jax.jit(jax.vmap(f))(pop, params, keys)
    single = jax.jit(f)
    for i in range(3):
        u_i, s_i = single(*jax.tree.map(lambda x: x[i], (pop, params, keys)))
        for a, b in zip(jax.tree.leaves((u_i, s_i)), jax.tree.leaves((u_pop, s_pop))):
            np.testing.assert_allclose(a, b[i], rtol=2e-5, atol=1e-9)
    # members differ (the meta-params really are per member)
    first = np.asarray(jax.tree.leaves(u_pop)[0])
    assert not np.allclose(first[0], first[1])


@pytest.mark.parametrize("kind", sorted(RULES))
def test_flatten_round_trip_and_kind(kind):
    rule = RULES[kind]
    mp = rule.init_meta_params(jax.random.key(2))
    flat = rule.flatten(mp)
    assert flat.shape == (rule.num_meta_params,) and flat.dtype == jnp.float32
    back = rule.unflatten(flat)
    assert jax.tree.structure(back) == jax.tree.structure(mp)
    np.testing.assert_array_equal(rule.flatten(back), flat)
    assert registry.info(rule.kind).rule is type(rule)
    assert type(rule).from_config(json.loads(json.dumps(rule.config()))) == rule


def test_generic_step_formula_with_fixed_outputs():
    rule = MLPRule(hidden_sizes=(), features=("grad",), step_mult=0.01, exp_mult=0.5)
    mp = rule.init_meta_params(jax.random.key(0))
    mp = jax.tree.map(jnp.zeros_like, mp)
    mp["params"]["Dense_0"]["bias"] = jnp.array([2.0, -1.0])  # d = 2, s = -1 everywhere
    tx = rule.make_optimizer(mp)
    g = {"w": jnp.array([1.0, -5.0, 0.0])}
    u, _ = tx.update(g, tx.init(g))
    np.testing.assert_allclose(u["w"], -2.0 * 0.01 * np.exp(-0.5) * np.ones(3), rtol=1e-6)


def test_generic_features_by_hand():
    rule = MLPRule(features=("grad", "momenta", "rms", "time", "layer", "actor"), betas=(0.5,), rms_beta=0.75)
    assert rule.num_features == 1 + 1 + 2 + 2 + 1 + 1
    g = jnp.array([1.0, -3.0])
    m = update_momenta(jnp.zeros((2, 1)), g, (0.5,))          # [0.5, -1.5]
    v = 0.25 * g ** 2                                               # [0.25, 2.25]
    ctx = Context(jnp.float32(0.2), jnp.float32(0.6), jax.random.key(0), None)
    infos = leaf_infos({"actor": {"Dense_0": {"bias": g}, "Dense_1": {"bias": g}, "Dense_2": {"bias": g}}})
    infos = infos[1:2]  # one tensor: actor/Dense_1/bias, layer proportion 1/2
    f = np.asarray(rule._features(None, g, m, v, ctx, infos, flat_layout(infos, [(2,)])))
    norm = lambda a, b: np.array([a, b]) / np.sqrt(1e-5 + (a * a + b * b) / 2)  # noqa: E731
    r = 1 / np.sqrt(np.array([0.25, 2.25]) + 1e-8)                  # [2, 2/3]
    expected = np.stack([norm(1.0, -3.0), norm(0.5, -1.5), norm(1.0 * r[0], -3.0 * r[1]),
                         norm(0.5 * r[0], -1.5 * r[1]), [0.2, 0.2], [0.6, 0.6], [0.5, 0.5], [1.0, 1.0]], axis=1)
    np.testing.assert_allclose(f, expected, rtol=1e-5)


def test_generic_rule_state_and_stats_requests():
    p = params_of(jax.random.key(0))
    lstm = RULES["lstm"]
    tx = lstm.make_optimizer(lstm.init_meta_params(jax.random.key(1)))
    s = tx.init(p)
    assert learned_optim.required_stats(tx, p) == {"outputs"}
    assert s.momenta is not None and s.rms["actor"]["Dense_0"]["kernel"].shape == (3, 4)
    assert len(s.carry) == 2 and s.carry[1]["critic"]["Dense_0"]["bias"].shape == (1, 4)
    u, s2 = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, p), s, p, **extra_of(p, jax.random.key(2)))
    assert float(jnp.abs(s2.carry[0]["actor"]["Dense_0"]["bias"]).max()) > 0
    gru = RULES["gru"]
    assert learned_optim.required_stats(gru.make_optimizer(gru.init_meta_params(jax.random.key(0))), p) == frozenset()
    mlp = MLPRule(features=("grad",))
    tx = mlp.make_optimizer(mlp.init_meta_params(jax.random.key(0)))
    s = tx.init(p)
    assert s.momenta is None and s.rms is None and s.carry == ()
    jax.jit(tx.update)(p, s)  # no params, no extra args: fine without the "param" feature
    with pytest.raises(ValueError, match="params"):
        tx2 = MLPRule().make_optimizer(MLPRule().init_meta_params(jax.random.key(0)))
        jax.eval_shape(tx2.update, p, tx2.init(p))


@pytest.mark.parametrize("bad", [dict(features=("grad", "nope")), dict(features=()), dict(betas=(1.5,)),
                                 dict(hidden_sizes=(0,)), dict(features=("grad", "grad"))])
def test_generic_rule_config_errors(bad):
    with pytest.raises(ValueError):
        MLPRule(**bad)


def test_specs_for_generic_rules():
    p = params_of(jax.random.key(0))
    for spec in ("mlp", "gru:hidden=4,seed=2", "lstm:step_mult=0.01"):
        tx = learned_optim.from_spec(spec)
        u, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, p), tx.init(p), p)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
    with pytest.raises(ValueError, match="allowed"):
        learned_optim.from_spec("gru:width=3")
    for name in ("open", "open_large", "optim4rl", "mlp", "gru", "lstm", "lopt"):
        assert name in learned_optim.known_optimizers()


def test_registry_facts_without_building(tmp_path):
    from learned_optim.open import OPEN_LARGE

    assert registry.info("kfac:lr=1") is registry.info("kfac")
    assert registry.info("kfac").lr_bounds == (1e-3, 0.5) and registry.info("sgd").lr_bounds == (1e-4, 1.0)
    assert registry.info("adam").lr_bounds == registry.DEFAULT_LR_BOUNDS == (1e-5, 1e-2)
    assert [registry.info(n).cpu_speed for n in ("kfac", "diag_ggn", "open", "open_large", "adam")] == [
        0.15, 0.7, 0.25, 0.2, 1.0]
    assert [registry.info(n).default_lr for n in ("adam", "sgd", "lion", "kfac", "diag_ggn", "optim4rl")] == [
        3e-4, 1e-2, 3e-5, 0.05, 0.01, 1e-3]
    assert registry.info("open").default_lr is None and registry.info("lopt").default_lr is None
    with pytest.raises(ValueError, match="unknown optimizer 'nope'.*adam"):
        registry.info("nope:lr=1")
    assert registry.rule_names() == ("open", "open_large", "optim4rl", "mlp", "gru", "lstm")
    assert registry.make_rule("open_large") == OPEN_LARGE and registry.make_rule("gru") == GRURule()
    with pytest.raises(ValueError, match="unknown learned rule 'lopt'"):
        registry.make_rule("lopt")
    # a saved rule's own default lr (Optim4RL injects one; the MLP rule has none)
    rule = Optim4RLRule(learning_rate=2e-3)
    path = learned_optim.save(str(tmp_path / "o4rl"), rule, rule.init_meta_params(jax.random.key(0)))
    assert registry.info(f"lopt:{path}").default_lr == 2e-3
    path = learned_optim.save(str(tmp_path / "mlp"), RULES["mlp"], RULES["mlp"].init_meta_params(jax.random.key(0)))
    assert registry.info(f"lopt:{path}").default_lr is None


# Save / load -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(RULES))
def test_save_load_round_trip_gives_identical_updates(tmp_path, kind):
    rule = RULES[kind]
    mp = rule.init_meta_params(jax.random.key(11))
    path = learned_optim.save(str(tmp_path / kind), rule, mp)
    with open(os.path.join(path, "metadata.json")) as f:
        meta = json.load(f)
    assert meta["kind"] == kind and meta["format_version"] == 1 and meta["num_meta_params"] == rule.num_meta_params
    rule2, mp2 = learned_optim.load(path)
    assert rule2 == rule
    p = params_of(jax.random.key(4))
    f = jax.jit(_step_for(rule))
    u1, _ = f(mp, p, jax.random.key(5))
    u2, _ = f(mp2, p, jax.random.key(5))  # same rule (equal dataclass), reloaded meta-params
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
        np.testing.assert_array_equal(a, b)
    tx3 = learned_optim.from_spec(f"lopt:{path}")
    u3, _ = jax.jit(tx3.update)(grads_of(p), tx3.init(p), p, **extra_of(p, jax.random.key(5)))
    # A different program (meta-parameters baked in as constants): XLA may fuse
    # differently, so compare to float32 rounding of the update's scale.
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u3)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(a))) + 1e-12)


@pytest.fixture
def saved(tmp_path):
    rule = RULES["gru"]
    return learned_optim.save(str(tmp_path / "opt"), rule, rule.init_meta_params(jax.random.key(0)))


def _files(root):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.parametrize("damage", [
    "missing_dir", "is_file", "no_metadata", "bad_json", "wrong_format", "unknown_kind", "bad_config",
    "no_checkpoint", "truncated_checkpoint", "wrong_architecture",
])
def test_load_errors_name_the_path_and_the_problem(saved, tmp_path, damage):
    path = saved
    meta_file = os.path.join(saved, "metadata.json")
    meta = json.load(open(meta_file))
    expect = {"missing_dir": "no such directory", "is_file": "not a directory", "no_metadata": "missing metadata.json",
              "bad_json": "not readable JSON", "wrong_format": "format", "unknown_kind": "unknown learned-optimizer kind",
              "bad_config": "bad rule", "no_checkpoint": "missing checkpoint", "truncated_checkpoint": "cannot restore",
              "wrong_architecture": "cannot restore|does not match"}[damage]
    if damage == "missing_dir":
        path = str(tmp_path / "nothing_here")
    elif damage == "is_file":
        path = meta_file
    elif damage == "no_metadata":
        os.remove(meta_file)
    elif damage == "bad_json":
        open(meta_file, "w").write('{"format": "learned_optim.rule", ')
    elif damage == "wrong_format":
        json.dump({**meta, "format_version": 99}, open(meta_file, "w"))
    elif damage == "unknown_kind":
        json.dump({**meta, "kind": "transformer"}, open(meta_file, "w"))
    elif damage == "bad_config":
        json.dump({**meta, "config": {**meta["config"], "hidden_size": -3}}, open(meta_file, "w"))
    elif damage == "no_checkpoint":
        import shutil
        shutil.rmtree(os.path.join(saved, "meta_params"))
    elif damage == "truncated_checkpoint":
        for f in _files(os.path.join(saved, "meta_params")):
            with open(f, "r+b") as fh:
                fh.truncate(max(os.path.getsize(f) // 3, 1))
    elif damage == "wrong_architecture":
        json.dump({**meta, "config": {**meta["config"], "hidden_size": 5}}, open(meta_file, "w"))
    with pytest.raises(ValueError, match=expect) as info:
        learned_optim.from_spec(f"lopt:{path}")
    assert os.path.abspath(path) in str(info.value)


def test_save_refuses_to_clobber_and_checks_shapes(tmp_path, saved):
    rule = RULES["gru"]
    mp = rule.init_meta_params(jax.random.key(1))
    with pytest.raises(ValueError, match="exists"):
        learned_optim.save(saved, rule, mp)
    learned_optim.save(saved, rule, mp, overwrite=True)
    np.testing.assert_array_equal(rule.flatten(learned_optim.load(saved)[1]), rule.flatten(mp))
    other = tmp_path / "someone_elses"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing"):
        learned_optim.save(str(other), rule, mp, overwrite=True)
    pop = population(rule, 2)
    with pytest.raises(ValueError, match="population"):
        learned_optim.save(str(tmp_path / "pop"), rule, pop)
    with pytest.raises(ValueError, match="lopt:PATH"):
        learned_optim.from_spec("lopt:")


def test_split_spec_list_keeps_a_specs_own_comma_settings():
    from learned_optim.spec import split_spec_list

    assert split_spec_list("adam, kfac:period=20,fperiod=2,diag_ggn,open:x.npy,lion:lr=1e-4,b1=0.9") == (
        "adam", "kfac:period=20,fperiod=2", "diag_ggn", "open:x.npy", "lion:lr=1e-4,b1=0.9")
    assert split_spec_list("adam,,sgd") == ("adam", "sgd")
    # A key=value item with no spec before it is left alone (from_spec then rejects it clearly).
    assert split_spec_list("lr=1e-3,adam") == ("lr=1e-3", "adam")


def test_shipped_meta_trained_rule_loads_and_steps():
    """learned/optim4rl_catch_pipeline (a meta-trained Optim4RL) loads as an
    optax transform and gives finite steps against the gradient's sign."""
    import os

    import jax.numpy as jnp
    import numpy as np

    import learned_optim
    from tests.conftest import ROOT

    tx = learned_optim.from_spec("lopt:" + os.path.join(ROOT, "learned", "optim4rl_catch_pipeline"))
    params = {"w": jnp.zeros((4, 3))}
    grads = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3) + 0.05}
    updates, _ = tx.update(grads, tx.init(params), params)
    u = np.asarray(updates["w"])
    assert np.all(np.isfinite(u)) and np.all(np.sign(u) == -np.sign(np.asarray(grads["w"])))
