"""One battery every optimizer in the registry must pass (optax style).

Add a spec string to SPECS when a new optimizer lands. Optimizers that ask for
layer statistics get synthetic ``LayerStats`` for the 2-layer test network.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import learned_optim
from learned_optim.context import LayerStats
from tests.conftest import SHARED

SPECS = [
    "adam",
    "adam:lr=1e-3,eps=1e-5",
    "adamw",
    "sgd:lr=0.1,momentum=0.9",
    "rmsprop",
    "lion",
    "kfac",
    "kfac:lr=0.1,damping=1e-2,inverse_update_period=2,damping_mode=factored,first_order=rms",
    "diag_ggn",
    "diag_ggn:lr=1e-3,mode=sqrt,damping=1e-8,norm_constraint=0",
    # learned optimizers, freshly initialised (published OPEN weights below when present)
    "optim4rl:seed=1",
    "mlp",
    "gru:hidden=4",
    "lstm:hidden=4",
]
_OPEN_NPY = os.path.join(SHARED, "anchors", "open", "breakout_OPEN.npy")
SPECS.append(f"open:{_OPEN_NPY}" if os.path.exists(_OPEN_NPY) else "open")

B = 8


def make_params(key):
    ks = jax.random.split(key, 6)
    n = lambda k, s: jax.random.normal(k, s) * 0.3  # noqa: E731
    return {
        "actor": {"Dense_0": {"kernel": n(ks[0], (3, 5)), "bias": n(ks[1], (5,))},
                  "Dense_1": {"kernel": n(ks[2], (5, 2)), "bias": jnp.zeros(2)}},
        "critic": {"Dense_0": {"kernel": n(ks[3], (3, 4)), "bias": jnp.zeros(4)},
                   "Dense_1": {"kernel": n(ks[4], (4, 1)), "bias": n(ks[5], (1,))}},
    }


def make_extra(tx, params, key):
    k_stats, k_opt = jax.random.split(key)
    extra = dict(train_fraction=jnp.float32(0.3), batch_fraction=jnp.float32(0.5), key=k_opt)
    if learned_optim.required_stats(tx, params):
        stats = {}
        for part, layers in params.items():
            stats[part] = {}
            for name, layer in layers.items():
                k_stats, k1, k2, k3 = jax.random.split(k_stats, 4)
                n_in, n_out = layer["kernel"].shape
                stats[part][name] = LayerStats(
                    inputs=jax.random.normal(k1, (B, n_in)),
                    outputs=jax.nn.relu(jax.random.normal(k2, (B, n_out))),
                    preact_grads=jax.random.normal(k3, (B, n_out)),
                )
        extra["layer_stats"] = stats
    return extra


def grads_like(params, key):
    leaves, tree = jax.tree.flatten(params)
    ks = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) for k, x in zip(ks, leaves)])


def _assert_same_structure(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert jnp.shape(x) == jnp.shape(y) and jnp.result_type(x) == jnp.result_type(y), (x, y)


@pytest.fixture(params=SPECS)
def spec(request):
    return request.param


def test_jit_no_recompile_and_finite(spec):
    tx = learned_optim.from_spec(spec)
    params = make_params(jax.random.key(0))
    state = tx.init(params)
    upd = jax.jit(tx.update)
    for i in range(3):
        g = grads_like(params, jax.random.key(10 + i))
        u, new_state = upd(g, state, params, **make_extra(tx, params, jax.random.key(i)))
        _assert_same_structure(state, new_state)
        _assert_same_structure(u, params)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
        params, state = optax.apply_updates(params, u), new_state
    assert upd._cache_size() == 1, "update recompiled on a later call"
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(u))


def test_stable_under_cond_and_unknown_extra_args(spec):
    tx = learned_optim.from_spec(spec)
    params = make_params(jax.random.key(0))
    state = tx.init(params)
    extra = make_extra(tx, params, jax.random.key(1))
    g = grads_like(params, jax.random.key(2))

    @jax.jit
    def f(flag, state):
        def do(s):
            return tx.update(g, s, params, some_unknown_arg=jnp.ones(3), **extra)[1]

        return jax.lax.cond(flag, do, lambda s: s, state)

    s1 = f(True, state)
    _assert_same_structure(state, s1)
    s2 = f(False, s1)
    _assert_same_structure(state, s2)


def test_vmap_over_three_members_equals_loop(spec):
    tx = learned_optim.from_spec(spec)
    keys = jax.random.split(jax.random.key(3), 3)
    params = [make_params(k) for k in keys]
    grads = [grads_like(p, jax.random.fold_in(k, 1)) for p, k in zip(params, keys)]
    extras = [make_extra(tx, p, jax.random.fold_in(k, 2)) for p, k in zip(params, keys)]
    states = [tx.init(p) for p in params]

    def step(g, s, p, e):
        u, s = tx.update(g, s, p, **e)
        u2, s = tx.update(g, s, optax.apply_updates(p, u), **e)
        return u2, s

    stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)  # noqa: E731
    u_v, s_v = jax.jit(jax.vmap(step))(stack(grads), stack(states), stack(params), stack(extras))
    for i in range(3):
        u_i, s_i = jax.jit(step)(grads[i], states[i], params[i], extras[i])
        for a, b in zip(jax.tree.leaves(u_i), jax.tree.leaves(u_v)):
            np.testing.assert_allclose(a, b[i], rtol=2e-5, atol=1e-6)


def test_chains_with_clipping(spec):
    tx = optax.chain(optax.clip_by_global_norm(0.5), learned_optim.from_spec(spec))
    params = make_params(jax.random.key(0))
    state = tx.init(params)
    g = jax.tree.map(lambda x: 1e3 * x, grads_like(params, jax.random.key(4)))
    u, state2 = jax.jit(tx.update)(g, state, params, **make_extra(tx, params, jax.random.key(5)))
    _assert_same_structure(state, state2)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
