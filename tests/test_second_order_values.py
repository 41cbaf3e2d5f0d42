"""Values of K-FAC / diagonal GGN steps on one dense layer against numpy transcriptions.

Everything expected here is computed in float64 numpy from the hand-given
per-example inputs ``a`` and pre-activation gradients ``g``, transcribing
kfac-jax (google-deepmind/kfac-jax, HEAD of the mirror):

* Kronecker factors, bias as a ones column, divided by the batch size:
  ``kfac_jax/_src/curvature_blocks/kronecker_factored.py:452-457``.
* Bias-corrected EMA (``WeightedMovingAverage.update``):
  ``kfac_jax/_src/utils/accumulators.py:67-86`` (weight = d * weight + (1-d),
  value = weighted mean of the batches).
* Negative eigenvalues of a factor clipped at zero (``safe_psd_eigh``):
  ``kfac_jax/_src/utils/math.py:1044-1046``.
* Exact Tikhonov damping in the eigenbasis, ``outer(s_A, s_G) + lambda``:
  ``kfac_jax/_src/curvature_blocks/kronecker_factored.py:274-281``.
* Norm constraint ``min(1, sqrt(c / (lr^2 <u, g>)))``:
  ``kfac_jax/_src/optimizer.py:915-933``.
* Diagonal Fisher ``(a*a)^T (g*g) / N`` and ``1 / (F + lambda)``:
  ``kfac_jax/_src/curvature_blocks/diagonal.py:206`` and ``:96-106``.
* Martens & Grosse (2015) sec. 6.3 pi-corrected factored damping (our
  ``damping_mode="factored"``, documented in ``learned_optim/kfac.py``).

The K-FAC references solve the dense ``(A kron G + lambda I) u = vec(V)``
system (no eigendecomposition), so an error in the eigenbasis algebra shows.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learned_optim.context import LayerStats, set_hyperparam
from learned_optim.diag_ggn import diag_ggn
from learned_optim.kfac import kfac, scale_by_kfac
from learned_optim.layer_stats import layer_stats_for

IN, OUT, N = 3, 2, 5

# Hand-given per-example statistics (rows = examples), float64 references.
A_IN = np.array([[0.5, -1.0, 2.0],
                 [1.5, 0.2, -0.3],
                 [-0.7, 0.9, 0.4],
                 [0.0, -0.5, 1.1],
                 [2.0, 1.0, -1.2]])
G_PRE = np.array([[0.3, -0.8],
                  [-1.1, 0.4],
                  [0.6, 0.9],
                  [-0.2, -0.5],
                  [1.3, 0.1]])
GRAD_K = np.array([[0.4, -0.2], [0.1, 0.7], [-0.9, 0.3]])
GRAD_B = np.array([0.25, -0.6])


def params():
    return {"dense": {"kernel": jnp.zeros((IN, OUT)), "bias": jnp.zeros((OUT,))}}


def grads(k=GRAD_K, b=GRAD_B):
    return {"dense": {"kernel": jnp.asarray(k, jnp.float32), "bias": jnp.asarray(b, jnp.float32)}}


def stats(a=A_IN, g=G_PRE):
    return {"dense": LayerStats(inputs=jnp.asarray(a, jnp.float32), preact_grads=jnp.asarray(g, jnp.float32))}


def vmat(k=GRAD_K, b=GRAD_B):
    """Layer matrix [in + 1, out]: kernel with the bias as last row."""
    return np.concatenate([np.asarray(k, np.float64), np.asarray(b, np.float64)[None]], axis=0)


def batch_factors(a=A_IN, g=G_PRE):
    a1 = np.concatenate([a, np.ones((len(a), 1))], axis=1)
    return a1.T @ a1 / len(a), g.T @ g / len(g)


def psd_clip(m):
    s, q = np.linalg.eigh(m)
    return (q * np.maximum(s, 0.0)) @ q.T


def kron_solve(A, G, V, lam, mode="exact"):
    """Solve the damped Kronecker system for the layer matrix V (row-major vec)."""
    n, o = A.shape[0], G.shape[0]
    if mode == "exact":
        M = np.kron(A, G) + lam * np.eye(n * o)
    else:
        pi = np.sqrt((np.trace(A) / n) / (np.trace(G) / o))
        M = np.kron(A + pi * np.sqrt(lam) * np.eye(n), G + np.sqrt(lam) / pi * np.eye(o))
    return np.linalg.solve(M, V.reshape(-1)).reshape(n, o)


def layer_out(u):
    return np.concatenate([np.asarray(u["dense"]["kernel"], np.float64),
                           np.asarray(u["dense"]["bias"], np.float64)[None]], axis=0)


# (a) clipping of negative factor eigenvalues -------------------------------------------


def indefinite(n, eigvals, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return (q * np.asarray(eigvals, np.float64)) @ q.T


@pytest.mark.parametrize("mode", ["exact", "factored"])
@pytest.mark.parametrize("which", ["a", "g"])
def test_negative_factor_eigenvalues_are_clipped_at_zero(which, mode):
    """A factor EMA that is indefinite (built into the state) is eigendecomposed
    at the refresh and its negative eigenvalues are clipped at 0 before damping,
    as kfac-jax's safe_psd_eigh (utils/math.py:1044-1046)."""
    decay, w0, lam = 0.5, 1.0, 0.05
    A_b, G_b = batch_factors()
    A0 = np.eye(IN + 1) * 0.3
    G0 = np.eye(OUT) * 0.3
    if which == "a":
        A0 = indefinite(IN + 1, [-6.0, 0.5, 1.0, 2.0], seed=1)
    else:
        G0 = indefinite(OUT, [-6.0, 1.5], seed=2)
    tx = scale_by_kfac(damping=lam, ema_decay=decay, inverse_update_period=1, damping_mode=mode)
    state = tx.init(params())
    ls = state.layers["dense"]
    state = state._replace(layers={"dense": ls._replace(
        a_factor=jnp.asarray(A0 * w0, jnp.float32), g_factor=jnp.asarray(G0 * w0, jnp.float32),
        weight=jnp.float32(w0))})
    u, new_state = jax.jit(tx.update)(grads(), state, params(), layer_stats=stats())

    # Bias-corrected EMA (accumulators.py:67-86), then the PSD clip.
    wt = decay * w0 + (1 - decay)
    A = (decay * w0 * A0 + (1 - decay) * A_b) / wt
    G = (decay * w0 * G0 + (1 - decay) * G_b) / wt
    assert np.linalg.eigvalsh(A if which == "a" else G).min() < -1.0  # really indefinite
    new_ls = new_state.layers["dense"]
    np.testing.assert_allclose(np.asarray(new_ls.a_factor) / float(new_ls.weight), A, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new_ls.g_factor) / float(new_ls.weight), G, rtol=1e-5, atol=1e-6)
    expected = kron_solve(psd_clip(A), psd_clip(G), vmat(), lam, mode)
    unclipped = kron_solve(A, G, vmat(), lam, mode) if mode == "exact" else None
    got = layer_out(u)
    np.testing.assert_allclose(
        got, expected, rtol=2e-4, atol=1e-5,
        err_msg="step != solve with the PSD-clipped factors (negative eigenvalues -> 0) plus damping")
    if unclipped is not None:
        assert np.linalg.norm(unclipped - expected) > 0.5 * np.linalg.norm(expected)
    assert int(new_state.health.fallback_updates) == 0


# (b) one K-FAC step ---------------------------------------------------------------------


@pytest.mark.parametrize("mode,lam", [("exact", 1e-2), ("exact", 0.3), ("factored", 1e-2), ("factored", 0.3)])
def test_one_kfac_step_equals_kronecker_transcription(mode, lam):
    """First step of ``kfac(lr)``: A = E[a a^T] with the bias column, G = E[g g^T]
    (per-example g not divided by N, factors divided by N as kronecker_factored.py:456-457),
    bias correction makes the first EMA equal the batch factors; the step is
    -lr (A kron G + lam I)^-1 vec(V) (exact) or the pi-damped factored inverse."""
    lr = 0.3
    tx = kfac(learning_rate=lr, damping=lam, damping_mode=mode, norm_constraint=0.0, ema_decay=0.9)
    u, _ = jax.jit(tx.update)(grads(), tx.init(params()), params(), layer_stats=stats())
    A, G = batch_factors()
    expected = -lr * kron_solve(A, G, vmat(), lam, mode)
    np.testing.assert_allclose(layer_out(u), expected, rtol=2e-4, atol=1e-6)


def test_kfac_ema_stale_eigenbasis_and_current_damping():
    """Three steps, inverse_update_period=2: step 0 refreshes on batch 1; step 1
    updates the EMA but keeps the step-0 eigenbasis with the *current* damping;
    step 2 refreshes on the bias-corrected EMA of the three batches."""
    lr, decay = 0.1, 0.8
    tx = kfac(learning_rate=lr, damping=0.05, ema_decay=decay, inverse_update_period=2, norm_constraint=0.0)
    upd = jax.jit(tx.update)
    rng = np.random.default_rng(3)
    batches = [(rng.normal(size=(N, IN)), rng.normal(size=(N, OUT)) * s) for s in (1.0, 2.0, 0.5)]
    vs = [(rng.normal(size=(IN, OUT)), rng.normal(size=OUT)) for _ in range(3)]
    lams = [0.05, 0.4, 0.02]
    state = tx.init(params())
    got = []
    for (a, g), (k, b), lam in zip(batches, vs, lams):
        state = set_hyperparam(state, "damping", lam)
        u, state = upd(grads(k, b), state, params(), layer_stats=stats(a, g))
        got.append(layer_out(u))
    F = [batch_factors(a, g) for a, g in batches]
    # step 0 and (stale basis) step 1: factors of batch 1 only
    np.testing.assert_allclose(got[0], -lr * kron_solve(*F[0], vmat(*vs[0]), lams[0]), rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(got[1], -lr * kron_solve(*F[0], vmat(*vs[1]), lams[1]), rtol=2e-4, atol=1e-6,
                               err_msg="step 1 must use the step-0 eigenbasis with the current damping")
    w = np.array([(1 - decay) * decay ** (2 - t) for t in range(3)])
    A = sum(wi * f[0] for wi, f in zip(w, F)) / w.sum()
    G = sum(wi * f[1] for wi, f in zip(w, F)) / w.sum()
    np.testing.assert_allclose(got[2], -lr * kron_solve(A, G, vmat(*vs[2]), lams[2]), rtol=2e-4, atol=1e-6)


def test_kfac_norm_constraint_value():
    """optimizer.py:925-930: step scaled by min(1, sqrt(c / (lr^2 u.g)))."""
    lr, lam, c = 0.5, 0.05, 1e-3
    tx = kfac(learning_rate=lr, damping=lam, norm_constraint=c)
    u, _ = jax.jit(tx.update)(grads(), tx.init(params()), params(), layer_stats=stats())
    A, G = batch_factors()
    pre = kron_solve(A, G, vmat(), lam)
    sq = lr ** 2 * np.sum(pre * vmat())
    coef = min(1.0, np.sqrt(c / sq))
    assert coef < 0.5  # the constraint is active
    np.testing.assert_allclose(layer_out(u), -lr * coef * pre, rtol=2e-4, atol=1e-7)


# (c) diagonal GGN -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["natural", "sqrt"])
def test_diag_ggn_two_steps_equal_transcription(mode):
    """F = (a*a)^T (g*g) / N (diagonal.py:206) with the bias column, bias-corrected
    EMA, step -lr V / (F + lam) (natural; diagonal.py:96-106) or -lr V / (sqrt(F) + lam)."""
    lr, lam, decay = 0.2, 0.03, 0.7
    tx = diag_ggn(learning_rate=lr, damping=lam, ema_decay=decay, mode=mode, norm_constraint=0.0)
    upd = jax.jit(tx.update)
    rng = np.random.default_rng(4)
    batches = [(A_IN, G_PRE), (rng.normal(size=(7, IN)), 1.5 * rng.normal(size=(7, OUT)))]
    vs = [(GRAD_K, GRAD_B), (rng.normal(size=(IN, OUT)), rng.normal(size=OUT))]
    state = tx.init(params())
    diags = []
    for t, ((a, g), (k, b)) in enumerate(zip(batches, vs)):
        u, state = upd(grads(k, b), state, params(), layer_stats=stats(a, g))
        a1 = np.concatenate([a, np.ones((len(a), 1))], axis=1)
        diags.append((a1 ** 2).T @ (g ** 2) / len(a))
        w = np.array([(1 - decay) * decay ** (t - s) for s in range(t + 1)])
        F = sum(wi * d for wi, d in zip(w, diags)) / w.sum()
        curv = F if mode == "natural" else np.sqrt(F)
        np.testing.assert_allclose(layer_out(u), -lr * vmat(k, b) / (curv + lam), rtol=2e-4, atol=1e-7,
                                   err_msg=f"step {t}")


# layer_stats: per-example, not averaged ---------------------------------------------------


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(OUT)(x)


def test_layer_stats_for_mse_gives_unit_variance_per_example_grads():
    """For loss="mse" the target is y ~ N(mean, 1) and d log p / d mean = y - mean:
    per example, unit variance (not scaled by 1/B), independent of the params."""
    model = Linear()
    x = jax.random.normal(jax.random.key(0), (4000, IN))
    p = model.init(jax.random.key(1), x)["params"]
    st = jax.jit(lambda p, x, k: layer_stats_for(model, p, x, k, loss="mse"))(p, x, jax.random.key(2))
    ls = jax.tree.leaves(st, is_leaf=lambda z: isinstance(z, LayerStats))[0]
    g = np.asarray(ls.preact_grads)
    np.testing.assert_allclose(np.asarray(ls.inputs), np.asarray(x))
    assert g.shape == (4000, OUT)
    np.testing.assert_allclose(g.var(axis=0), 1.0, atol=0.1)
    np.testing.assert_allclose(g.mean(axis=0), 0.0, atol=0.1)
    p2 = jax.tree.map(lambda z: z + 3.0, p)
    st2 = layer_stats_for(model, p2, x, jax.random.key(2), loss="mse")
    g2 = jax.tree.leaves(st2, is_leaf=lambda z: isinstance(z, LayerStats))[0].preact_grads
    np.testing.assert_allclose(np.asarray(g2), g, rtol=1e-4, atol=1e-4)


def test_layer_stats_for_a_bare_dense_model():
    model = nn.Dense(OUT)
    x = jax.random.normal(jax.random.key(0), (8, IN))
    p = model.init(jax.random.key(1), x)["params"]
    st = layer_stats_for(model, p, x, jax.random.key(2), loss="mse")
    ls = jax.tree.leaves(st, is_leaf=lambda z: isinstance(z, LayerStats))[0]
    np.testing.assert_allclose(np.asarray(ls.inputs), np.asarray(x))
    # ... and K-FAC takes a preconditioned (not a plain gradient) step with them.
    tx = kfac(0.1)
    state = tx.init(p)
    g = jax.tree.map(jnp.ones_like, p)
    upd, _ = tx.update(g, state, p, layer_stats=st)
    assert not np.allclose(np.asarray(upd["kernel"]), -0.1 * np.ones((IN, OUT)))
    assert np.all(np.isfinite(np.asarray(upd["kernel"])))
