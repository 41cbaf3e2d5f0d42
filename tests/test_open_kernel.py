"""OPEN's fused CPU kernel (learned_optim/open_kernel.py) against the JAX
network it replaces: values, batching with per-member weights, ragged sizes,
NaN isolation, gradients, bad input, and the transform using it."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learned_optim import open as lo
from learned_optim import open_kernel
from tests.conftest import SHARED

pytestmark = pytest.mark.skipif(not open_kernel.available(),
                                reason="OPEN's CPU kernel is not available here (no compiler, or not x86-64 AVX2)")
BREAKOUT = os.path.join(SHARED, "anchors", "open", "breakout_OPEN.npy")
RUN = open_kernel.fused(lo.open_network)


def KERNEL(prep, h, x, split=15):  # noqa: N802 -- the kernel in open_network's signature
    return RUN(prep, h, x[:split], x[split:])


def _inputs(rule, n, key, scale=1.0):
    kx, kh = jax.random.split(key)
    x = scale * jax.random.normal(kx, (lo.NUM_FEATURES, n))
    h = jnp.tanh(scale * jax.random.normal(kh, (rule.gru_features, n)))
    return h, x


def _random_prep(rule, key):
    mp = rule.init_meta_params(key)
    # flax's default init has zero biases and small outputs: perturb every
    # leaf (biases included) so that a misplaced bias or weight shows, and the
    # gates and LayerNorms see a wide range of values
    leaves, treedef = jax.tree.flatten(mp)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    return lo._prepare(jax.tree.unflatten(treedef, [2.0 * w + 0.5 * jax.random.normal(k, w.shape)
                                                    for w, k in zip(leaves, keys)]))


@pytest.mark.parametrize("rule, n", [(lo.OPEN_SMALL, 1), (lo.OPEN_SMALL, 24), (lo.OPEN_SMALL, 7001),
                                     (lo.OPEN_LARGE, 25), (lo.OPEN_LARGE, 1000)],
                         ids=["small-1", "small-24", "small-7001", "large-25", "large-1000"])
def test_matches_the_jax_network(rule, n):  # one block, a short tail, many blocks over several chunks
    prep = _random_prep(rule, jax.random.key(n))
    h, x = _inputs(rule, n, jax.random.key(100 + n), scale=2.0)
    want_h, want_o = jax.jit(lo.open_network)(prep, h, x)
    got_h, got_o = jax.jit(KERNEL)(prep, h, x)
    assert got_h.shape == want_h.shape and got_o.shape == want_o.shape == (3, n)
    np.testing.assert_allclose(got_h, want_h, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(got_o, want_o, atol=5e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(want_o))) > 0.1  # the check is not on near-zero outputs


def test_published_weights_and_the_lowering_uses_the_kernel():
    _, mp = lo.load_open_weights(BREAKOUT)
    prep = lo._prepare(mp)
    h, x = _inputs(lo.OPEN_SMALL, 5000, jax.random.key(3))
    want = jax.jit(lo.open_network)(prep, h, x)
    got = jax.jit(KERNEL)(prep, h, x)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
    assert open_kernel.TARGET in jax.jit(KERNEL).lower(prep, h, x).as_text()
    assert open_kernel.TARGET not in jax.jit(lo.open_network).lower(prep, h, x).as_text()  # the control


def test_vmap_with_per_member_weights_equals_each_member_alone():
    rule = lo.OPEN_SMALL
    preps = [_random_prep(rule, jax.random.key(i)) for i in range(3)]
    batch = jax.tree.map(lambda *a: jnp.stack(a), *preps)
    h, x = _inputs(rule, 300, jax.random.key(9))
    hs = jnp.stack([h, h * 0.5, -h])
    got_h, got_o = jax.jit(jax.vmap(KERNEL, in_axes=(0, 0, None)))(batch, hs, x)
    for i, prep in enumerate(preps):
        one_h, one_o = jax.jit(KERNEL)(prep, hs[i], x)
        np.testing.assert_array_equal(got_h[i], one_h)  # the same code per element: bit for bit
        np.testing.assert_array_equal(got_o[i], one_o)
        want_h, _ = lo.open_network(prep, hs[i], x)
        np.testing.assert_allclose(got_h[i], want_h, atol=2e-5, rtol=1e-5)


def test_a_nan_stays_in_its_element_and_its_member():
    rule = lo.OPEN_SMALL
    preps = [_random_prep(rule, jax.random.key(i)) for i in range(2)]
    batch = jax.tree.map(lambda *a: jnp.stack(a), *preps)
    h, x = _inputs(rule, 100, jax.random.key(4))
    xs = jnp.stack([x, x.at[5, 37].set(jnp.nan)])
    got_h, got_o = jax.jit(jax.vmap(KERNEL, in_axes=(0, None, 0)))(batch, h, xs)
    bad = np.isnan(np.asarray(got_o[1]))
    assert bad[:, 37].all() and bad.sum() == 3 and np.isnan(np.asarray(got_h[1][:, 37])).all()
    assert np.isfinite(np.asarray(got_o[0])).all() and np.isfinite(np.asarray(got_h[1][:, 36])).all()


def test_gradients_are_the_jax_networks():
    prep = _random_prep(lo.OPEN_SMALL, jax.random.key(5))
    h, x = _inputs(lo.OPEN_SMALL, 50, jax.random.key(6))

    def loss(net):
        return lambda prep, h, x: jnp.sum(jnp.sin(net(prep, h, x)[1])) + jnp.sum(net(prep, h, x)[0] ** 2)

    got = jax.jit(jax.grad(loss(KERNEL), argnums=(0, 1, 2)))(prep, h, x)
    want = jax.jit(jax.grad(loss(lo.open_network), argnums=(0, 1, 2)))(prep, h, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_a_weight_vector_of_the_wrong_size_is_an_error():
    h, x = _inputs(lo.OPEN_SMALL, 30, jax.random.key(0))
    call = jax.ffi.ffi_call(open_kernel.TARGET, (jax.ShapeDtypeStruct(h.shape, jnp.float32),
                                                 jax.ShapeDtypeStruct((3, 30), jnp.float32)))
    with pytest.raises(Exception, match="does not match the sizes"):
        jax.block_until_ready(call(x[:15], x[15:], h, jnp.zeros((17,), jnp.float32)))
    with pytest.raises(Exception, match="differ in N"):
        jax.block_until_ready(call(x[:15], x[15:, :29], h, jnp.zeros((17,), jnp.float32)))


@pytest.mark.parametrize("split", [0, 10, 19])
def test_any_split_of_the_input_rows_gives_the_same_values(split):
    prep = _random_prep(lo.OPEN_SMALL, jax.random.key(11))
    h, x = _inputs(lo.OPEN_SMALL, 77, jax.random.key(12))
    want = jax.jit(KERNEL)(prep, h, x)
    got = jax.jit(lambda p, h, x: KERNEL(p, h, x, split))(prep, h, x)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_the_transform_with_the_kernel_follows_the_jax_path(monkeypatch):
    import optax

    _, mp = lo.load_open_weights(BREAKOUT)
    k = iter(jax.random.split(jax.random.key(0), 8))
    params = {"actor": {"Dense_0": {"kernel": jax.random.normal(next(k), (20, 30)), "bias": jnp.zeros(30)}},
              "critic": {"Dense_0": {"kernel": jax.random.normal(next(k), (20, 10)), "bias": jnp.zeros(10)}}}

    def run(tx):
        state, p = tx.init(params), params
        for i in range(5):
            g = jax.tree.map(lambda w: jnp.cos(w * (i + 1)), p)
            u, state = jax.jit(tx.update)(g, state, p, key=jax.random.key(i), train_fraction=i / 5)
            p = optax.apply_updates(p, u)
        return p

    with_kernel = run(lo.scale_by_open(mp))
    monkeypatch.setattr(open_kernel, "available", lambda: False)  # fused() then gives the JAX path
    without = run(lo.scale_by_open(mp))
    for a, b in zip(jax.tree.leaves(with_kernel), jax.tree.leaves(without)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(with_kernel), jax.tree.leaves(params)))
