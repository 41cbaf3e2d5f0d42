"""K-FAC and diagonal GGN against hand-built Fishers on a 2-layer MLP.

Reference values come from per-example statistics derived by hand (the
backward pass of a tanh MLP with a softmax output, written out) and from the
dense Fisher, built explicitly and solved with numpy in float64.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import learned_optim
from learned_optim import curvature as cv
from learned_optim.layer_stats import categorical_sampled_loglik, dense_layer_stats
from learned_optim.context import LayerStats, set_hyperparam
from learned_optim.diag_ggn import diag_ggn, scale_by_diag_ggn
from learned_optim.kfac import kfac, scale_by_kfac

IN, HID, OUT, B = 3, 4, 2, 6


def make_params(key, log_std=True):
    ks = jax.random.split(key, 4)
    n = jax.random.normal
    p = {
        "Dense_0": {"kernel": n(ks[0], (IN, HID)), "bias": 0.1 * n(ks[1], (HID,))},
        "Dense_1": {"kernel": n(ks[2], (HID, OUT)), "bias": 0.1 * n(ks[3], (OUT,))},
    }
    if log_std:
        p["log_std"] = jnp.array([0.3, -0.2])
    return p


def hand_stats(params, x, key):
    """Per-example inputs and d log p(y_i | x_i) / d pre-activation, y_i ~ p(. | x_i)."""
    w0, b0 = params["Dense_0"]["kernel"], params["Dense_0"]["bias"]
    w1, b1 = params["Dense_1"]["kernel"], params["Dense_1"]["bias"]
    h = jnp.tanh(x @ w0 + b0)
    logits = h @ w1 + b1
    y = jax.random.categorical(key, logits)
    d1 = jax.nn.one_hot(y, OUT) - jax.nn.softmax(logits)  # d log softmax_y / d logits
    d0 = (d1 @ w1.T) * (1.0 - h**2)  # back through the kernel and tanh
    stats = {"Dense_0": LayerStats(inputs=x, preact_grads=d0),
             "Dense_1": LayerStats(inputs=h, preact_grads=d1)}
    return stats, y


def batch(key, n=B):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (n, IN)), ky


def grads_like(params, key):
    leaves, tree = jax.tree.flatten(params)
    ks = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) for k, x in zip(ks, leaves)])


def aug(a):
    a = np.asarray(a, np.float64)
    return np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)


def factors(st):
    a, g = aug(st.inputs), np.asarray(st.preact_grads, np.float64)
    return a.T @ a / len(a), g.T @ g / len(g)


def layer_vec(node):
    """[kernel; bias] flattened row-major: the order kron(A, G) acts on."""
    kernel, bias = np.asarray(node["kernel"], np.float64), np.asarray(node["bias"], np.float64)
    return np.concatenate([kernel, bias[None]]).reshape(-1)


def from_vec(vec, node):
    m = vec.reshape(node["kernel"].shape[0] + 1, -1)
    return {"kernel": m[:-1], "bias": m[-1]}


def block_diag(*blocks):
    n = sum(b.shape[0] for b in blocks)
    out, i = np.zeros((n, n)), 0
    for b in blocks:
        out[i:i + len(b), i:i + len(b)] = b
        i += len(b)
    return out


LAYERS = ("Dense_0", "Dense_1")


def dense_kfac_step(stats, grads, damping, mode="exact"):
    """(block-diag Kronecker Fisher + damping I)^-1 g, densely, float64."""
    blocks = []
    for name in LAYERS:
        a, g = factors(stats[name])
        if mode == "exact":
            blocks.append(np.kron(a, g) + damping * np.eye(a.shape[0] * g.shape[0]))
        else:
            pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
            blocks.append(np.kron(a + pi * np.sqrt(damping) * np.eye(len(a)),
                                  g + np.sqrt(damping) / pi * np.eye(len(g))))
    vec = np.concatenate([layer_vec(grads[n]) for n in LAYERS])
    sol = np.linalg.solve(block_diag(*blocks), vec)
    sizes = np.cumsum([0] + [layer_vec(grads[n]).size for n in LAYERS])
    return {n: from_vec(sol[sizes[i]:sizes[i + 1]], grads[n]) for i, n in enumerate(LAYERS)}


def assert_tree_close(actual, expected, rtol=1e-4, atol=1e-6):
    for n in expected:
        for k in expected[n]:
            np.testing.assert_allclose(
                np.asarray(actual[n][k]), expected[n][k], rtol=rtol, atol=atol, err_msg=f"{n}/{k}")


@pytest.fixture(scope="module")
def setup():
    params = make_params(jax.random.key(0))
    x, ky = batch(jax.random.key(1))
    stats, y = hand_stats(params, x, ky)
    grads = grads_like(params, jax.random.key(2))
    return params, x, y, stats, grads


# Hand statistics are what they claim to be -----------------------------------------


def test_hand_stats_are_per_example_loglik_gradients(setup):
    params, x, y, stats, _ = setup

    def loglik_i(p, xi, yi):
        h = jnp.tanh(xi @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        return jax.nn.log_softmax(h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"])[yi]

    per_example = jax.vmap(jax.grad(loglik_i), in_axes=(None, 0, 0))(params, x, y)
    for name in LAYERS:
        a, g = aug(stats[name].inputs), np.asarray(stats[name].preact_grads)
        outer = np.einsum("bi,bj->bij", a, g)  # d loglik_i / d [kernel; bias] = a_i g_i^T
        np.testing.assert_allclose(outer[:, :-1], per_example[name]["kernel"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(outer[:, -1], per_example[name]["bias"], rtol=1e-5, atol=1e-6)


def test_dense_layer_stats_helper_matches_hand_stats(setup):
    params, x, _, stats, _ = setup

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(OUT, name="Dense_1")(jnp.tanh(nn.Dense(HID, name="Dense_0")(x)))

    flax_params = {k: params[k] for k in LAYERS}
    _, ky = batch(jax.random.key(1))
    stats_fn = lambda p, x: dense_layer_stats(  # noqa: E731
        MLP(), {"params": p}, x, categorical_sampled_loglik, ky)
    got = jax.jit(stats_fn)(flax_params, x)
    assert set(got) == set(LAYERS)
    for name in LAYERS:
        np.testing.assert_allclose(got[name].inputs, stats[name].inputs, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[name].preact_grads, stats[name].preact_grads, rtol=1e-5, atol=1e-6)


# K-FAC ------------------------------------------------------------------------------


def test_factors_equal_exact_kronecker_factors_and_ema(setup):
    params, _, _, stats, grads = setup
    decay = 0.8
    tx = scale_by_kfac(damping=1e-2, ema_decay=decay, inverse_update_period=1)
    state = tx.init(params)
    upd = jax.jit(tx.update)
    _, s1 = upd(grads, state, params, layer_stats=stats)
    x2, k2 = batch(jax.random.key(7))
    stats2, _ = hand_stats(params, x2, k2)
    _, s2 = upd(grads, s1, params, layer_stats=stats2)
    for name in LAYERS:
        a1, g1 = factors(stats[name])
        a2, g2 = factors(stats2[name])
        ls = s1.layers[name]
        np.testing.assert_allclose(ls.a_factor / ls.weight, a1, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ls.g_factor / ls.weight, g1, rtol=1e-5, atol=1e-7)
        ls = s2.layers[name]  # bias-corrected EMA: (d A1 + A2) / (d + 1)
        a_ema, g_ema = (decay * a1 + a2) / (decay + 1), (decay * g1 + g2) / (decay + 1)
        np.testing.assert_allclose(ls.a_factor / ls.weight, a_ema, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ls.g_factor / ls.weight, g_ema, rtol=1e-5, atol=1e-7)
        # The refresh's eigendecomposition reconstructs the estimate.
        rebuilt = (ls.a_eigvecs * ls.a_eigvals) @ ls.a_eigvecs.T
        np.testing.assert_allclose(rebuilt, a_ema, rtol=1e-4, atol=1e-5)


def test_single_example_kronecker_is_exact_fisher(setup):
    """With one example the Kronecker product is the exact per-example Fisher."""
    params, x, y, stats, _ = setup
    one = {n: LayerStats(inputs=s.inputs[:1], preact_grads=s.preact_grads[:1]) for n, s in stats.items()}
    for name in LAYERS:
        a, g = factors(one[name])
        v = np.kron(aug(one[name].inputs)[0], np.asarray(one[name].preact_grads[0], np.float64))
        np.testing.assert_allclose(np.kron(a, g), np.outer(v, v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["exact", "factored"])
@pytest.mark.parametrize("damping", [1e-2, 1.0])
def test_step_equals_dense_damped_kronecker_solve(setup, mode, damping):
    params, _, _, stats, grads = setup
    tx = scale_by_kfac(damping=damping, damping_mode=mode, inverse_update_period=4)
    u, state = jax.jit(tx.update)(grads, tx.init(params), params, layer_stats=stats)
    assert_tree_close(u, dense_kfac_step(stats, grads, damping, mode), rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(u["log_std"], grads["log_std"])  # first-order "sgd": unchanged
    assert int(state.health.fallback_updates) == 0 and int(state.health.failed_factorizations) == 0


def test_kfac_alias_scales_by_minus_lr_and_first_order_rms(setup):
    params, _, _, stats, grads = setup
    tx = kfac(learning_rate=0.3, damping=1e-2, norm_constraint=0.0, first_order="rms")
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params, layer_stats=stats)
    ref = dense_kfac_step(stats, grads, 1e-2)
    assert_tree_close(u, {n: {k: -0.3 * v for k, v in ref[n].items()} for n in ref}, rtol=2e-4, atol=1e-5)
    # RMS first step: g / sqrt(0.01 g^2) = 10 sign(g).
    np.testing.assert_allclose(u["log_std"], -0.3 * 10 * np.sign(grads["log_std"]), rtol=1e-4)


def test_large_damping_tends_to_gradient_over_damping(setup):
    params, _, _, stats, grads = setup
    for mode in ("exact", "factored"):
        tx = scale_by_kfac(damping=1e8, damping_mode=mode)  # factored: error ~ 1/sqrt(damping)
        u, _ = jax.jit(tx.update)(grads, tx.init(params), params, layer_stats=stats)
        for name in LAYERS:
            for k in ("kernel", "bias"):
                np.testing.assert_allclose(u[name][k] * 1e8, grads[name][k], rtol=1e-3, atol=1e-4)
    # ...and small damping does not (the curvature matters).
    tx = scale_by_kfac(damping=1e-2)
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params, layer_stats=stats)
    assert not np.allclose(u["Dense_0"]["kernel"] * 1e-2, grads["Dense_0"]["kernel"], rtol=0.1)


def test_singular_curvature_tiny_damping_is_finite(setup):
    params, _, _, stats, grads = setup
    zero_in = dict(stats, Dense_0=stats["Dense_0"]._replace(inputs=jnp.zeros((B, IN))))
    tx = scale_by_kfac(damping=1e-30)
    u, s = jax.jit(tx.update)(grads, tx.init(params), params, layer_stats=zero_in)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(u))
    assert int(s.health.fallback_updates) == 0  # min_damping=1e-8 keeps it well posed

    # Zero curvature and zero damping (floor switched off): 0/0 in every entry,
    # the safe first-order step replaces it and is counted.
    zero = {n: LayerStats(inputs=jnp.zeros_like(st.inputs), preact_grads=jnp.zeros_like(st.preact_grads))
            for n, st in stats.items()}
    tx = scale_by_kfac(damping=0.0, min_damping=0.0)
    u, s = jax.jit(tx.update)(grads, tx.init(params), params, layer_stats=zero)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(u))
    for name in LAYERS:
        np.testing.assert_allclose(u[name]["kernel"], grads[name]["kernel"])
    assert int(s.health.fallback_updates) == 2


def test_non_finite_stats_and_damping_are_contained(setup):
    params, _, _, stats, grads = setup
    tx = kfac(learning_rate=0.1, damping=1e-2)
    s0 = tx.init(params)
    _, s1 = jax.jit(tx.update)(grads, s0, params, layer_stats=stats)
    nan_grads = stats["Dense_1"].preact_grads.at[0, 0].set(jnp.nan)
    bad = dict(stats, Dense_1=stats["Dense_1"]._replace(preact_grads=nan_grads))
    u, s2 = jax.jit(tx.update)(grads, s1, params, layer_stats=bad)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(u))
    inner1, inner2 = s1.inner_state[0], s2.inner_state[0]
    np.testing.assert_array_equal(inner2.layers["Dense_1"].g_factor, inner1.layers["Dense_1"].g_factor)
    assert int(inner2.health.skipped_stats) == 1
    # A NaN damping written by an outer loop: every dense layer falls back.
    s_nan = set_hyperparam(s1, "damping", jnp.nan)
    u, s3 = jax.jit(tx.update)(grads, s_nan, params, layer_stats=stats)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(u))
    assert int(s3.inner_state[0].health.fallback_updates) == 2


def test_inverse_refresh_exactly_every_period(setup):
    params, _, _, _, grads = setup
    period = 3
    tx = scale_by_kfac(damping=1e-2, inverse_update_period=period)
    upd = jax.jit(tx.update)
    state = tx.init(params)
    prev = state.layers["Dense_0"]
    refreshed_at, refresh_state = [], None
    for step in range(8):
        x, k = batch(jax.random.key(100 + step))
        stats, _ = hand_stats(params, x, k)
        u, state = upd(grads, state, params, layer_stats=stats)
        cur = state.layers["Dense_0"]
        if not np.array_equal(cur.a_eigvals, prev.a_eigvals):
            refreshed_at.append(step)
            refresh_state = cur
        else:
            np.testing.assert_array_equal(cur.a_eigvecs, prev.a_eigvecs)
            np.testing.assert_array_equal(cur.g_eigvals, prev.g_eigvals)
            # Between refreshes the step uses the factors of the last refresh.
            a_old = refresh_state.a_factor / refresh_state.weight
            rebuilt = (cur.a_eigvecs * cur.a_eigvals) @ cur.a_eigvecs.T
            np.testing.assert_allclose(rebuilt, a_old, rtol=1e-4, atol=1e-5)
            assert not np.allclose(cur.a_factor / cur.weight, a_old, rtol=1e-3)
        prev = cur
    assert refreshed_at == [0, 3, 6]


def test_factors_update_exactly_every_factor_period(setup):
    """factor_update_period=k: the EMAs take a minibatch's statistics at steps
    0, k, 2k, ... only (inside a real cond), with the usual bias-corrected EMA."""
    params, _, _, _, grads = setup
    decay = 0.8
    tx = scale_by_kfac(damping=1e-2, ema_decay=decay, inverse_update_period=1, factor_update_period=3)
    upd = jax.jit(tx.update)
    state = tx.init(params)
    used = []
    for step in range(7):
        x, k = batch(jax.random.key(300 + step))
        stats, _ = hand_stats(params, x, k)
        _, new = upd(grads, state, params, layer_stats=stats)
        old_ls, new_ls = state.layers["Dense_0"], new.layers["Dense_0"]
        if not np.array_equal(new_ls.a_factor, old_ls.a_factor):
            used.append(step)
            a, _ = factors(stats["Dense_0"])
            np.testing.assert_allclose(new_ls.a_factor, decay * old_ls.a_factor + (1 - decay) * a, rtol=1e-5, atol=1e-7)
        else:
            np.testing.assert_array_equal(new_ls.g_factor, old_ls.g_factor)
            assert float(new_ls.weight) == float(old_ls.weight)
        state = new
    assert used == [0, 3, 6]
    jaxpr = jax.make_jaxpr(tx.update)(grads, tx.init(params), params, layer_stats=stats).jaxpr
    assert [e.primitive.name for e in jaxpr.eqns].count("cond") == 2  # factors, and the refresh
    with pytest.raises(ValueError, match="factor_update_period"):
        learned_optim.from_spec("kfac:fperiod=0")
    assert learned_optim.from_spec("kfac:fperiod=2,period=20") is not None


def test_norm_constraint_bounds_the_step(setup):
    params, _, _, stats, grads = setup
    lr, c = 0.5, 1e-4
    tx_free = kfac(learning_rate=lr, damping=1e-2, norm_constraint=0.0)
    free, _ = jax.jit(tx_free.update)(grads, tx_free.init(params), params, layer_stats=stats)
    tx = kfac(learning_rate=lr, damping=1e-2, norm_constraint=c)
    capped, _ = jax.jit(tx.update)(grads, tx.init(params), params, layer_stats=stats)
    def dot(u):
        return sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(grads)))

    ratio = np.asarray(capped["Dense_0"]["kernel"]) / np.asarray(free["Dense_0"]["kernel"])
    coef = float(ratio.flat[0])
    np.testing.assert_allclose(ratio, coef, rtol=1e-4)  # a pure rescaling of the whole step
    # free = -lr u with u = (F + damping)^-1 g; the capped step's squared curvature
    # norm is lr^2 coef^2 u.g = -lr coef^2 free.g, which must be c.
    assert -lr * dot(free) > c and coef < 1  # the constraint is active here
    np.testing.assert_allclose(-lr * coef**2 * dot(free), c, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(capped["log_std"]) / np.asarray(free["log_std"]), coef, rtol=1e-4)


# Diagonal GGN -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["natural", "sqrt"])
def test_diag_ggn_equals_diagonal_of_dense_empirical_fisher(setup, mode):
    params, _, _, stats, grads = setup
    damping = 1e-2
    # Dense Fisher of all dense parameters from per-example gradients v_i.
    per_example = np.concatenate([
        np.einsum("bi,bj->bij", aug(stats[n].inputs), np.float64(stats[n].preact_grads)).reshape(B, -1)
        for n in LAYERS], axis=1)
    fisher = per_example.T @ per_example / B
    diag = np.diag(fisher)
    tx = scale_by_diag_ggn(damping=damping, mode=mode)
    u, state = jax.jit(tx.update)(grads, tx.init(params), params, layer_stats=stats)
    got = np.concatenate(
        [np.asarray(state.layers[n].diag / state.layers[n].weight).reshape(-1) for n in LAYERS])
    np.testing.assert_allclose(got, diag, rtol=1e-5, atol=1e-8)
    g = np.concatenate([layer_vec(grads[n]) for n in LAYERS])
    curv = diag if mode == "natural" else np.sqrt(diag)
    step = g / (curv + damping)
    sizes = np.cumsum([0] + [layer_vec(grads[n]).size for n in LAYERS])
    assert_tree_close(u, {n: from_vec(step[sizes[i]:sizes[i + 1]], grads[n]) for i, n in enumerate(LAYERS)})
    np.testing.assert_allclose(u["log_std"], grads["log_std"])


def test_diag_ggn_safety_nets(setup):
    params, _, _, stats, grads = setup
    zero = {n: LayerStats(inputs=jnp.zeros_like(st.inputs), preact_grads=jnp.zeros_like(st.preact_grads))
            for n, st in stats.items()}
    tx = scale_by_diag_ggn(damping=0.0, min_damping=0.0)
    u, s = jax.jit(tx.update)(grads, tx.init(params), params, layer_stats=zero)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(u)) and int(s.health.fallback_updates) == 2
    u, s = jax.jit(scale_by_diag_ggn(damping=1e-30).update)(grads, tx.init(params), params, layer_stats=zero)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(u)) and int(s.health.fallback_updates) == 0
    nan = {n: st._replace(inputs=st.inputs.at[0, 0].set(jnp.inf)) for n, st in stats.items()}
    u, s = jax.jit(tx.update)(grads, tx.init(params), params, layer_stats=nan)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(u)) and int(s.health.skipped_stats) == 2


# Population, scan, errors -----------------------------------------------------------


@pytest.mark.parametrize("make", [kfac, diag_ggn], ids=["kfac", "diag_ggn"])
def test_vmap_members_with_different_damping_and_lr_equal_loop(make):
    tx = make(learning_rate=0.1, damping=1e-2)
    keys = jax.random.split(jax.random.key(5), 3)
    dampings, lrs = [1e-3, 1e-1, 3.0], [0.05, 0.1, 0.2]
    params = [make_params(k) for k in keys]
    stats = [hand_stats(p, *batch(jax.random.fold_in(k, 1)))[0] for p, k in zip(params, keys)]
    grads = [grads_like(p, jax.random.fold_in(k, 2)) for p, k in zip(params, keys)]
    states = [set_hyperparam(set_hyperparam(tx.init(p), "damping", d), "learning_rate", lr)
              for p, d, lr in zip(params, dampings, lrs)]

    def two_steps(g, s, p, st):
        u, s = tx.update(g, s, p, layer_stats=st)
        p = optax.apply_updates(p, u)
        u, s = tx.update(g, s, p, layer_stats=st)
        return u, s

    stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)  # noqa: E731
    u_v, s_v = jax.jit(jax.vmap(two_steps))(stack(grads), stack(states), stack(params), stack(stats))
    np.testing.assert_allclose(s_v.hyperparams["damping"], dampings, rtol=1e-6)
    for i in range(3):
        u_i, _ = jax.jit(two_steps)(grads[i], states[i], params[i], stats[i])
        for a, b in zip(jax.tree.leaves(u_i), jax.tree.leaves(u_v)):
            np.testing.assert_allclose(b[i], a, rtol=1e-4, atol=1e-6)
    # Same params/grads/stats, different hyperparameters -> different steps.
    same = jax.jit(jax.vmap(two_steps, in_axes=(None, 0, None, None)))(grads[0], stack([
        set_hyperparam(s, "learning_rate", 0.1) for s in states]), params[0], stats[0])[0]
    k = np.asarray(same["Dense_0"]["kernel"])
    assert not np.allclose(k[0], k[1], rtol=1e-2) and not np.allclose(k[1], k[2], rtol=1e-2)


@pytest.mark.parametrize("spec", ["kfac:lr=0.1,damping=0.01,period=2,mode=factored",
                                  "diag_ggn:lr=0.1,mode=sqrt,damping=1e-4"])
def test_inside_lax_scan_equals_python_loop(spec):
    tx = learned_optim.from_spec(spec)
    params = make_params(jax.random.key(3))
    grads = grads_like(params, jax.random.key(4))
    xs = jax.random.normal(jax.random.key(6), (5, B, IN))
    ks = jax.random.split(jax.random.key(8), 5)

    def step(carry, inp):
        p, s = carry
        x, k = inp
        stats, _ = hand_stats(p, x, k)
        u, s = tx.update(grads, s, p, layer_stats=stats, train_fraction=jnp.float32(0.5))
        return (optax.apply_updates(p, u), s), None

    (p_scan, s_scan), _ = jax.jit(lambda c: jax.lax.scan(step, c, (xs, ks)))((params, tx.init(params)))
    carry = (params, tx.init(params))
    jstep = jax.jit(step)
    for i in range(5):
        carry, _ = jstep(carry, (xs[i], ks[i]))
    for a, b in zip(jax.tree.leaves((p_scan, s_scan)), jax.tree.leaves(carry)):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not np.allclose(p_scan["Dense_0"]["kernel"], params["Dense_0"]["kernel"])


@pytest.mark.parametrize("name", ["kfac", "diag_ggn"])
def test_clear_errors(setup, name):
    params, _, _, stats, grads = setup
    tx = learned_optim.from_spec(name)
    assert learned_optim.required_stats(tx, params) == frozenset({"inputs", "preact_grads"})
    state = tx.init(params)
    with pytest.raises(ValueError, match="layer_stats=.*dense_layer_stats"):
        jax.jit(tx.update)(grads, state, params)
    partial = {"Dense_0": stats["Dense_0"]}
    with pytest.raises(ValueError, match="Dense_1"):
        tx.update(grads, state, params, layer_stats=partial)
    wrong = dict(stats, Dense_1=stats["Dense_1"]._replace(inputs=jnp.zeros((B, HID + 1))))
    with pytest.raises(ValueError, match=r"Dense_1.*inputs has shape"):
        tx.update(grads, state, params, layer_stats=wrong)
    with pytest.raises(ValueError, match="unknown setting 'bogus'"):
        learned_optim.from_spec(f"{name}:bogus=1")
    with pytest.raises(ValueError, match="damping"):
        learned_optim.from_spec(f"{name}:damping=-1")
    with pytest.raises(ValueError, match="ema_decay"):
        learned_optim.from_spec(f"{name}:ema_decay=1.5")
    with pytest.raises(ValueError, match="allowed"):
        learned_optim.from_spec(f"{name}:first_order=adam")


def test_kfac_specific_config_errors():
    with pytest.raises(ValueError, match="inverse_update_period"):
        learned_optim.from_spec("kfac:period=0")
    with pytest.raises(ValueError, match="inverse_update_period.*integer"):
        learned_optim.from_spec("kfac:period=2.5")
    with pytest.raises(ValueError, match="damping_mode.*exact, factored"):
        learned_optim.from_spec("kfac:mode=pi")
    with pytest.raises(ValueError, match="mode.*natural, sqrt"):
        learned_optim.from_spec("diag_ggn:mode=exact")


def test_vmapped_refresh_is_a_real_branch_and_keeps_each_members_schedule(setup):
    """Under vmap the refresh stays a ``cond`` (eigh only inside it), and members
    whose counters differ still refresh exactly on their own steps."""
    params, _, _, stats, grads = setup
    tx = scale_by_kfac(damping=1e-2, inverse_update_period=3)
    stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)  # noqa: E731
    state = stack([tx.init(params)] * 2)
    state = state._replace(count=jnp.array([0, 1], jnp.int32))  # member 1 is one step ahead
    upd = jax.vmap(lambda s, st: tx.update(grads, s, params, layer_stats=st))

    jaxpr = jax.make_jaxpr(upd)(state, stack([stats] * 2)).jaxpr
    top = [e.primitive.name for e in jaxpr.eqns]
    assert "cond" in top and "eigh" not in top
    cond = next(e for e in jaxpr.eqns if e.primitive.name == "cond")
    assert cond.invars[0].aval.shape == ()  # an unbatched predicate: not turned into a select
    assert any("eigh" in str(b) for b in cond.params["branches"])

    upd = jax.jit(upd)
    changed = {0: [], 1: []}
    for step in range(7):
        x, k = batch(jax.random.key(200 + step))
        st, _ = hand_stats(params, x, k)
        _, new = upd(state, stack([st] * 2))
        for m in (0, 1):
            if not np.array_equal(new.layers["Dense_1"].g_eigvals[m], state.layers["Dense_1"].g_eigvals[m]):
                changed[m].append(step)
        state = new
    assert changed == {0: [0, 3, 6], 1: [2, 5]}  # member 1's counts are 1..7: due at 3 and 6


def test_own_training_loop_with_nested_flax_model():
    """The documented recipe: stats from ``dense_layer_stats`` for a model with a
    nested submodule fit the params tree, and the step is the dense K-FAC solve."""

    class Head(nn.Module):
        @nn.compact
        def __call__(self, h):
            return nn.Dense(OUT, name="out")(h)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Head(name="head")(jnp.tanh(nn.Dense(HID, name="body")(x)))

    model = Net()
    x, _ = batch(jax.random.key(11))
    params = model.init(jax.random.key(12), x)["params"]
    y = jax.random.randint(jax.random.key(13), (B,), 0, OUT)

    def loss(p):
        logp = jax.nn.log_softmax(model.apply({"params": p}, x))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1))

    grads = jax.grad(loss)(params)
    key = jax.random.key(14)
    stats = dense_layer_stats(model, {"params": params}, x, categorical_sampled_loglik, key)
    assert set(stats) == {"body", "head"} and set(stats["head"]) == {"out"}
    tx = scale_by_kfac(damping=1e-2)
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params, layer_stats=stats)
    flat = {"Dense_0": stats["body"], "Dense_1": stats["head"]["out"]}
    ref = dense_kfac_step(flat, {"Dense_0": grads["body"], "Dense_1": grads["head"]["out"]}, 1e-2)
    assert_tree_close({"Dense_0": u["body"], "Dense_1": u["head"]["out"]}, ref, rtol=2e-4, atol=1e-5)
