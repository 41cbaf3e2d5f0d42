"""PB2 (meta/pbt/pb2.py) point by point against Ray Tune 2.60.0's PB2.

Every reference below is a numpy/scipy transcription of Ray's equations
(``ray/tune/schedulers/pb2.py`` and ``pb2_utils.py`` of the 2.60.0 wheel,
commit b7f4259e; ``pb2.py:N`` / ``utils:N`` are its line numbers), written
here, never our module's output. The one addition to Ray's model, a fitted
noise variance (Ray 2.60 has a fixed 1e-10 jitter, float64 only), is the
fourth entry of ``theta`` here as in the module.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from meta.pbt import pb2
from tests.test_pbt import BEST_X, load_script, toy_pbt

# ---------------------------------------------------------------------------
# Ray's equations in numpy
# ---------------------------------------------------------------------------

RAY_INIT = np.log([1.0, 1.0, 0.1, 1.0])  # variance, lengthscale, epsilon (pb2.py:123); noise: GPy's start
RAY_BOUNDS = list(zip(np.log([1e-5, 1e-5, 1e-5, 1e-4]), np.log([1e5, 1e5, 0.5, 1e5])))  # utils:20-22


def ray_normalize(data, wrt):  # utils:104-110
    return (data - np.min(wrt, axis=0)) / (np.max(wrt, axis=0) - np.min(wrt, axis=0) + 1e-8)


def ray_standardize(y):  # utils:113-116
    return np.clip((y - np.mean(y)) / (np.std(y) + 1e-8), -2, 2)


def ray_table(records, n_h):
    """Ray's ``_explore`` preprocessing (pb2.py:185-203) of records ``(trial,
    time, h tuple, reward)``: per (trial, hparams) group the change of reward
    and of time against the group's previous record; records without a
    previous one, or with a NaN change, are dropped; ``R_before = Reward -
    y``, ``y /= t_change``; the newest 1000. Returns rows ``(trial, time,
    R_before, h..., y)`` sorted by time."""
    order = sorted(range(len(records)), key=lambda i: records[i][1])
    last, rows = {}, []
    for i in order:
        trial, time, h, reward = records[i]
        g = (trial,) + tuple(h)
        if g in last:
            t0, r0 = last[g]
            dy, dt = reward - r0, time - t0
            if dt > 0 and not np.isnan(dy):
                rows.append((trial, time, reward - dy) + tuple(h) + (dy / dt,))
        last[g] = (time, reward)
    return np.array(rows[-1000:], np.float64).reshape(-1, 4 + n_h)


def ray_kernel(x1, x2, variance, lengthscale, epsilon):  # utils:43-75
    epsilon = np.clip(epsilon, 1e-5, 0.5)
    dists = np.abs(x1[:, :1] - x2[:, :1].T)
    sq = np.sum((x1[:, None, 1:] - x2[None, :, 1:]) ** 2, -1)
    return variance * np.exp(-sq / lengthscale) * (1 - epsilon) ** (0.5 * dists)


def ray_lml(theta, x, y):
    """sklearn's log marginal likelihood (the GP of pb2.py:126-129), noise on the diagonal."""
    v, ls, eps, noise = np.exp(theta)
    k = ray_kernel(x, x, v, ls, eps) + noise * np.eye(len(x))
    chol = np.linalg.cholesky(k)
    alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, y))
    return -0.5 * y @ alpha - np.sum(np.log(np.diag(chol))) - 0.5 * len(x) * np.log(2 * np.pi)


def ray_fit(x, y):
    """L-BFGS-B from Ray's start within Ray's bounds (sklearn's fmin_l_bfgs_b), in log space."""
    res = minimize(lambda t: -ray_lml(t, x, y), RAY_INIT, bounds=RAY_BOUNDS, method="L-BFGS-B")
    return res.x


def ray_predict(theta, x, y, xq):
    """sklearn's predict: mean and latent variance (clipped at 0)."""
    v, ls, eps, noise = np.exp(theta)
    k = ray_kernel(x, x, v, ls, eps) + noise * np.eye(len(x))
    ks = ray_kernel(xq, x, v, ls, eps)
    mean = ks @ np.linalg.solve(k, y)
    var = v - np.sum(ks * np.linalg.solve(k, ks.T).T, -1)
    return mean, np.maximum(var, 0.0)


def ray_kappa(n):  # utils:131-134
    return np.sqrt(0.2 + max(0.0, np.log(0.4 * n)))


def ray_ucb(theta_m, x, y, theta_m1, x1, y1, fixed, u):
    """utils:119-148: mean of m + kappa * variance of m1 at [fixed, u]."""
    xq = np.concatenate([np.broadcast_to(fixed, (len(u), 2)), u], -1)
    return ray_predict(theta_m, x, y, xq)[0] + ray_kappa(len(x)) * ray_predict(theta_m1, x1, y1, xq)[1]


# ---------------------------------------------------------------------------
# (a) inputs: [t, R_before, h], min-max normalised; y standardised and clipped
# ---------------------------------------------------------------------------


def hand_table():
    """Four members, 1 hyperparameter in [0, 10], synchronous rounds at times
    10, 20, 30, 40 (Ray's time attribute; ours counts rounds). Member 2 copies
    member 0 at time 20 (Ray adds the copied reward as a record with the new
    hparams, pb2.py:229-238); member 3's reward at time 30 is NaN (a bad
    member); member 1 jumps (an outlier the clipping cuts)."""
    low, high = 0.0, 10.0
    h = {0: [2.0] * 4, 1: [7.0] * 4, 2: [5.0, 5.0, 9.0, 9.0], 3: [1.0] * 4}
    reward = {0: [1.0, 3.0, 6.0, 7.0], 1: [2.0, 2.5, 40.0, 41.0], 2: [0.5, 1.0, 4.0, 4.5], 3: [0.0, 0.2, np.nan, 1.0]}
    records = []
    for k in range(4):
        for m in range(4):
            records.append((m, 10.0 * (k + 1), (h[m][k],), reward[m][k]))
    # member 2 copies member 0 after time 20, with h = 9: the copy's record
    records.append((2, 20.0, (9.0,), reward[0][1]))
    return records, h, reward, (low, high)


def ours_from_table(h, reward, bounds):
    """Our rows for the same run, as ``_exploit_and_record`` makes them: after
    round k (>= 1) each member's fitness change, its start fitness (member
    2's after its copy: member 0's), its unit hyperparameter."""
    low, high = bounds
    data = pb2.pb2_empty(32, 1)
    start = {m: reward[m][0] for m in range(4)}
    for k in range(1, 4):
        fit = np.array([reward[m][k] for m in range(4)], np.float32)
        r = np.array([start[m] for m in range(4)], np.float32)
        u = np.array([[(h[m][k] - low) / (high - low)] for m in range(4)], np.float32)
        ok = np.isfinite(fit) & np.isfinite(r)
        data = pb2.pb2_record(data, float(k + 1), jnp.asarray(r), jnp.asarray(u), jnp.asarray(fit - r),
                              jnp.asarray(ok))
        start = {m: reward[m][k] for m in range(4)}
        if k == 1:
            start[2] = reward[0][1]  # the copy
    return data


def test_inputs_and_targets_are_rays_normalised_table():
    records, h, reward, bounds = hand_table()
    table = ray_table(records, 1)
    # Ray's X and y (pb2.py:111-119): time and R_before by their own range, h by the bounds.
    xr = table[:, 1:4]
    limits = np.concatenate([np.stack([xr[:, :2].max(0), xr[:, :2].min(0)]), np.array([[bounds[1]], [bounds[0]]])], 1)
    x_ray = ray_normalize(xr, limits)
    y_ray = ray_standardize(table[:, 4])
    assert np.any(np.abs((table[:, 4] - table[:, 4].mean()) / table[:, 4].std()) > 2)  # the clip matters here
    data = ours_from_table(h, reward, bounds)
    x, y, lo, scale = (np.asarray(a) for a in pb2.normalise_inputs(data))
    v = np.asarray(data.valid)
    assert v.sum() == len(table) == 10  # 12 rows, member 3's NaN rows dropped (its round 3 and round 4)
    key_ours = np.lexsort((np.asarray(data.member)[v], np.asarray(data.t)[v]))
    key_ray = np.lexsort((table[:, 0], table[:, 1]))
    np.testing.assert_allclose(x[v][key_ours], x_ray[key_ray], atol=1e-6)
    np.testing.assert_allclose(y[v][key_ours], y_ray[key_ray], atol=1e-5)
    assert np.all(y[~v] == 0) and np.all(x[~v] == 0)
    # The context of a new point: the source's last row's time and R_before (pb2.py:216, 121).
    last0 = table[table[:, 0] == 0][-1]
    fixed_ray = ray_normalize(last0[1:3], xr[:, :2])
    np.testing.assert_allclose((np.array([4.0, reward[0][2]]) - lo) / scale, fixed_ray, atol=1e-6)


# ---------------------------------------------------------------------------
# (b) kernel, (c) log marginal likelihood
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("variance,lengthscale,epsilon", [(1.0, 1.0, 0.1), (2.5, 0.3, 0.4), (0.7, 4.0, 0.9)])
def test_kernel_is_rays_tv_squared_exp(variance, lengthscale, epsilon):
    rng = np.random.default_rng(1)
    x1, x2 = rng.uniform(size=(7, 4)), rng.uniform(size=(5, 4))
    ours = np.asarray(pb2.tv_kernel(jnp.asarray(x1, jnp.float32), jnp.asarray(x2, jnp.float32), variance,
                                    lengthscale, epsilon))
    np.testing.assert_allclose(ours, ray_kernel(x1, x2, variance, lengthscale, epsilon), rtol=2e-5, atol=1e-7)
    # The lengthscale divides the squared distance (no 2 l^2), time decays (1 - eps)^(|dt| / 2).
    a, b = np.array([[0.0, 0.0, 0.0]]), np.array([[1.0, 1.0, 0.0]])
    k = float(pb2.tv_kernel(jnp.asarray(a), jnp.asarray(b), 1.0, 2.0, 0.36)[0, 0])
    np.testing.assert_allclose(k, np.exp(-1.0 / 2.0) * 0.8, rtol=1e-6)


def test_log_marginal_likelihood_and_its_gradient():
    rng = np.random.default_rng(2)
    n, pad = 30, 6
    x = rng.uniform(size=(n, 3))
    y = np.sin(4 * x[:, 1]) + 0.1 * rng.normal(size=n)
    # padding rows (invalid, anywhere) change nothing
    xp = np.concatenate([x[:10], rng.uniform(size=(pad, 3)), x[10:]])
    yp = np.concatenate([y[:10], rng.normal(size=pad), y[10:]])
    vp = np.concatenate([np.ones(10, bool), np.zeros(pad, bool), np.ones(n - 10, bool)])
    args = [jnp.asarray(a, jnp.float32) for a in (xp, yp)] + [jnp.asarray(vp)]
    for theta in (RAY_INIT, np.log([2.0, 0.2, 0.3, 0.05])):
        ours = float(pb2.gp_log_marginal(*args, jnp.asarray(theta, jnp.float32)))
        np.testing.assert_allclose(ours, ray_lml(theta, x, y), rtol=1e-4)
        _, g, _, _ = pb2._log_marginal_and_grad(*args, jnp.asarray(theta, jnp.float32))
        fd = [(ray_lml(theta + 1e-5 * e, x, y) - ray_lml(theta - 1e-5 * e, x, y)) / 2e-5 for e in np.eye(4)]
        np.testing.assert_allclose(np.asarray(g), fd, rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------------------
# (d) the fit
# ---------------------------------------------------------------------------


def test_fit_reaches_the_marginal_likelihood_optimum():
    """A sample of the GP with known hyperparameters: the fit improves the
    likelihood over Ray's start and lands at scipy's L-BFGS-B optimum."""
    rng = np.random.default_rng(0)
    n = 60
    x = rng.uniform(size=(n, 3))
    truth = np.log([1.5, 0.3, 0.2, 0.05])
    k = ray_kernel(x, x, *np.exp(truth[:3])) + np.exp(truth[3]) * np.eye(n)
    y = np.linalg.cholesky(k) @ rng.normal(size=n)
    ref = ray_fit(x, y)
    assert np.all(np.abs(ref[[0, 1, 3]] - truth[[0, 1, 3]]) < np.log(2.0))  # the data do determine them
    gp = jax.jit(pb2.gp_fit)(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), jnp.ones(n, bool))
    theta = np.asarray(gp.theta, np.float64)
    assert ray_lml(theta, x, y) > ray_lml(RAY_INIT, x, y) + 30
    assert ray_lml(theta, x, y) > ray_lml(ref, x, y) - 0.05
    np.testing.assert_allclose(np.exp(theta), np.exp(ref), rtol=0.15)
    # The fitted GP's pieces are those of its hyperparameters.
    v, ls, eps, noise = np.exp(theta)
    kk = ray_kernel(x, x, v, ls, eps) + noise * np.eye(n)
    np.testing.assert_allclose(np.asarray(gp.alpha), np.linalg.solve(kk, y), rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------------------
# (e) kappa
# ---------------------------------------------------------------------------


def test_kappa_grows_with_the_data_as_rays_beta():
    ns = np.array([1, 2, 3, 10, 64, 200, 1000])
    np.testing.assert_allclose(np.asarray(pb2.ucb_kappa(jnp.asarray(ns))), [ray_kappa(n) for n in ns], rtol=1e-6)
    assert float(pb2.ucb_kappa(2)) == pytest.approx(np.sqrt(0.2))  # log(0.8) < 0: beta = c1


# ---------------------------------------------------------------------------
# (f) acquisition, its maximiser and the pending points
# ---------------------------------------------------------------------------


def one_dim_data(n_rounds=6, p=8, seed=0):
    """1 hyperparameter, the reward change peaks at u = 0.3."""
    rng = np.random.default_rng(seed)
    data = pb2.pb2_empty(64, 1)
    r = rng.uniform(0, 1, p)
    for k in range(n_rounds):
        u = rng.uniform(size=(p, 1))
        dy = 1.0 - 10.0 * (u[:, 0] - 0.3) ** 2 + 0.05 * rng.normal(size=p)
        data = pb2.pb2_record(data, float(k + 1), jnp.asarray(r, jnp.float32), jnp.asarray(u, jnp.float32),
                              jnp.asarray(dy, jnp.float32), jnp.ones(p, bool))
        r = r + dy
    return data


def ray_inputs(data):
    """Ray's X, y of our rows (the valid ones), in numpy."""
    v = np.asarray(data.valid)
    t, r, u, y = (np.asarray(a, np.float64)[v] for a in (data.t, data.r, data.x, data.y))
    tr = np.stack([t, r], 1)
    return np.concatenate([ray_normalize(tr, tr), u], 1), ray_standardize(y), tr, np.asarray(data.member)[v]


def test_acquisition_maximiser_on_a_grid():
    """Given the hyperparameters, our acquisition is Ray's and its maximiser
    is the grid's best."""
    data = one_dim_data()
    x, y, tr, _ = ray_inputs(data)
    theta = np.log([1.2, 0.5, 0.1, 0.02])
    fixed = x[-1, :2]
    n = len(x)
    xj, yj, vj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), jnp.ones(n, bool)
    _, _, alpha, k_inv = pb2._log_marginal_and_grad(xj, yj, vj, jnp.asarray(theta, jnp.float32))
    gp = pb2.GP(jnp.asarray(theta, jnp.float32), alpha, k_inv)
    grid = np.linspace(0, 1, 2001)[:, None]
    ref = ray_ucb(theta, x, y, theta, x, y, fixed, grid)
    fn = lambda u: pb2.acquisition(gp, gp, xj, vj, vj, jnp.asarray(fixed, jnp.float32), u, pb2.ucb_kappa(n))  # noqa
    np.testing.assert_allclose(np.asarray(fn(jnp.asarray(grid[::50], jnp.float32))), ref[::50], rtol=1e-3, atol=1e-3)
    u = np.asarray(pb2.maximise_acquisition(jax.random.key(0), fn, 1, 16))
    assert abs(u[0] - grid[np.argmax(ref), 0]) < 5e-3
    assert abs(u[0] - 0.3) < 0.1  # the known optimum of the reward change


def propose_two_copies_of_member_0(data):
    """Members 6 and 7 copy member 0 in one round; the others are kept."""
    p = 8
    src = jnp.array([0, 1, 2, 3, 4, 5, 0, 0], jnp.int32)
    u = jax.jit(pb2.pb2_propose, static_argnums=5)(jax.random.key(3), data, src, jnp.arange(p) >= 6,
                                                    jnp.full((p, 1), 0.9), 256)
    u = np.asarray(u)
    np.testing.assert_array_equal(u[:6], np.float32(0.9))  # the others keep the copied values
    return u[6, 0], u[7, 0]


def ray_batch_reference(data, u_first):
    """Ray's two proposals' acquisitions on a grid: the first with m1 = m, the
    second with m1 refitted on the data plus the first point pending (the
    same context, y = 0; pb2.py:138-155). Returns the grid, both UCBs and the
    latent variance at the first point under m and under m1."""
    x, y, tr, member = ray_inputs(data)
    fixed = ray_normalize(tr[np.flatnonzero(member == 0)[-1]], tr)  # the source's last row
    grid = np.linspace(0, 1, 1001)[:, None]
    theta = ray_fit(x, y)
    ucb0 = ray_ucb(theta, x, y, theta, x, y, fixed, grid)
    xq = np.concatenate([fixed, [u_first]])[None]
    x1, y1 = np.concatenate([x, xq]), np.concatenate([y, [0.0]])
    theta1 = ray_fit(x1, y1)
    ucb1 = ray_ucb(theta, x, y, theta1, x1, y1, fixed, grid)
    return grid[:, 0], ucb0, ucb1, ray_predict(theta, x, y, xq)[1][0], ray_predict(theta1, x1, y1, xq)[1][0]


def assert_maximises(u, grid, ucb):
    at_u = np.interp(u, grid, ucb)
    assert at_u >= ucb.max() - 0.01 * (ucb.max() - ucb.min()), (u, grid[np.argmax(ucb)])
    assert abs(u - grid[np.argmax(ucb)]) < 0.03


def test_batch_proposal_maximises_rays_ucb():
    """Both points maximise Ray's UCB, the second with the first pending; on
    this problem both sit at the known optimum of the reward change (0.3):
    the mean dominates."""
    data = one_dim_data()
    u6, u7 = propose_two_copies_of_member_0(data)
    grid, ucb0, ucb1, _, _ = ray_batch_reference(data, u6)
    assert_maximises(u6, grid, ucb0)
    assert_maximises(u7, grid, ucb1)
    assert abs(u6 - 0.3) < 0.1 and abs(u7 - 0.3) < 0.1


def test_pending_point_spreads_the_batch():
    """Data on [0.35, 0.65] only, a small oscillating reward change: the
    first point goes where the variance is (the edge); pending, it takes the
    variance there away and the second point goes elsewhere -- both Ray's
    maximisers."""
    rng = np.random.default_rng(0)
    data = pb2.pb2_empty(64, 1)
    r = rng.uniform(0, 1, 8)
    for k in range(2):
        u = rng.uniform(0.35, 0.65, size=(8, 1))
        dy = 0.3 * np.sin(12 * u[:, 0]) + 0.05 * rng.normal(size=8)
        data = pb2.pb2_record(data, float(k + 1), jnp.asarray(r, jnp.float32), jnp.asarray(u, jnp.float32),
                              jnp.asarray(dy, jnp.float32), jnp.ones(8, bool))
        r = r + dy
    u6, u7 = propose_two_copies_of_member_0(data)
    grid, ucb0, ucb1, var_m, var_m1 = ray_batch_reference(data, u6)
    assert_maximises(u6, grid, ucb0)
    assert_maximises(u7, grid, ucb1)
    assert var_m1 < 0.1 * var_m
    assert u6 > 0.9 and abs(u7 - u6) > 0.1


def test_no_data_row_of_the_source_keeps_the_copy():
    """Ray explores only when the source has a row (pb2.py:206-241)."""
    data = pb2.pb2_empty(64, 2)
    u = pb2.pb2_propose(jax.random.key(0), data, jnp.array([1, 1]), jnp.array([True, False]), jnp.full((2, 2), 0.4))
    np.testing.assert_array_equal(np.asarray(u), np.float32(0.4))


# ---------------------------------------------------------------------------
# (g) whole runs
# ---------------------------------------------------------------------------


def test_toy_round_records_rays_rows_and_explores():
    """Rounds of the toy PBT (tests/test_pbt.py): each row is (rounds done,
    fitness at the start of the round -- the source's after a copy --, unit
    hparams used, fitness change); replaced members get a new point once
    their source has a row, inside the bounds."""
    prog = toy_pbt("pb2", interval=2, window=2)
    state = jax.jit(prog.init)(jax.random.key(5))
    step = jax.jit(prog.step)
    prev = None
    for r in range(6):
        state, info = step(state)
        d = state.pb2
        rows = np.flatnonzero(np.asarray(d.t) == r + 1)
        if r == 0:
            assert not np.asarray(d.valid).any()
        else:
            assert len(rows) == 8 and np.asarray(d.valid)[rows].all()
            start = np.asarray(prev["fitness"])[np.asarray(prev["src"])]
            np.testing.assert_allclose(np.asarray(d.r)[rows], start, rtol=1e-6)
            np.testing.assert_allclose(np.asarray(d.y)[rows], np.asarray(info["fitness"]) - start, rtol=1e-5,
                                       atol=1e-5)
            np.testing.assert_array_equal(np.asarray(d.member)[rows], np.arange(8))
            rep = np.asarray(info["replaced"])
            assert rep.any()
            h_next, h_used = np.asarray(info["hparams_next"]), np.asarray(info["hparams_used"])
            src = np.asarray(info["src"])
            assert np.all(np.abs(h_next[rep] - h_used[src[rep]]).max(-1) > 0)  # explored, not copied
        prev = info
    h = np.asarray(prog.hparams_matrix(state))
    assert np.all((h[:, 0] >= 0) & (h[:, 0] <= 1)) and np.all((h[:, 1] >= 1e-4) & (h[:, 1] <= 1e-1))
    assert step._cache_size() == 1
    assert abs(np.median(h[:, 0]) - BEST_X) < 0.3


def test_script_tiny_cartpole_pb2(tmp_path):
    """scripts/pbt.py --algo pb2 with test_pbt.py's tiny CartPole settings."""
    out = str(tmp_path / "run")
    args = ["--algo", "pb2", "--env", "CartPole-v1", "--population", "4", "--optimizers", "adam:4",
            "--interval", "4", "--seed", "0", "--checkpoint-every", "3", "--timesteps", "2e4", "--out", out]
    assert load_script().main(args) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["rounds"] == 9 and res["diverged_members"] == 0
    assert res["final_return_best"] > 9.0 and np.isfinite(res["final_return_mean"])
    assert any(s != m["member"] for m in res["members"] for s in m["lineage"])
    assert 0 <= res["selection_share"] < 0.5
