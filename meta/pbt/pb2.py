"""PB2 (Parker-Holder et al. 2020) as Ray Tune 2.60.0 computes it, in JAX.

The reference is Ray 2.60.0 (wheel commit b7f4259e),
``ray/tune/schedulers/pb2.py`` and ``pb2_utils.py``; ``pb2.py:N`` and
``utils:N`` below are its line numbers. One row of data per member and round
(Ray's ``Trial`` rows, ``pb2.py:185-203``): the time at the end of the round
``t``, the member's fitness at its start ``r`` (Ray's ``R_before``: the
"reward so far" context), the unit hyperparameters used ``x`` and the reward
change ``y`` (per round: every round has the same length, Ray's ``t_change``).
A proposal for a replaced member (``pb2.py:76-165``):

1. ``X = [t, r, x]``; ``t`` and ``r`` min-max normalised over the data
   (``utils:104-110``, ``+ 1e-8`` in the denominator), ``x`` is already the
   position between the bounds (Ray normalises the natural value by the
   bounds; our unit coordinate does the same in the space's scale, log for
   the learning rate). ``y`` standardised (population std ``+ 1e-8``) and
   clipped to ``[-2, 2]`` (``utils:113-116``).
2. A GP with Ray's time-varying kernel ``TV_SquaredExp`` (``utils:9-101``):
   ``k = variance * exp(-|z - z'|^2 / lengthscale) * (1 - epsilon) **
   (|t - t'| / 2)``, where ``z`` is every column but time (reward and
   hyperparameters) and ``lengthscale`` divides the squared distance (no
   ``2 l^2``). Its hyperparameters are fitted by maximising the log marginal
   likelihood in log space within Ray's bounds (variance and lengthscale in
   ``[1e-5, 1e5]``, epsilon in ``[1e-5, 0.5]``) from Ray's start
   ``(1, 1, 0.1)``, one start as sklearn's default ``n_restarts_optimizer=0``
   (``pb2.py:123-129``).
3. The new point's context is the source's last row: its time and its
   ``R_before`` (``pb2.py:216``, normalised like the data, ``pb2.py:121``).
   Without such a row the copied hyperparameters are kept (``pb2.py:240``).
4. Batch selection (GP-BUCB, ``pb2.py:138-155``, ``pb2.py:466-478``): the
   points already chosen this round are "pending": a second GP ``m1`` is
   fitted afresh on the data plus the pending points (the current context,
   ``y = 0``); the first replaced member of a round uses ``m1 = m``.
5. Acquisition (``utils:119-148``): ``mean_m(x) + kappa * var_m1(x)`` (the
   variance, not the std), ``kappa = sqrt(beta)``, ``beta = 0.2 +
   max(0, log(0.4 * n))``, ``n`` the rows of ``m``; maximised over
   ``[0, 1]^H`` (``utils:151-178``).

Deliberate differences, for ``jit`` and float32:

* Noise. Ray 2.60's sklearn GP has a fixed ``alpha = 1e-10`` on the diagonal,
  a float64 jitter; Ray's GPy-based PB2 before it fitted a Gaussian noise
  variance (starting at 1). float32 has no room for 1e-10, so we fit the
  noise variance with the other three, in ``[1e-4, 1e5]`` from 1 (GPy's start).
* Optimisers. Ray: L-BFGS-B (sklearn's ``fmin_l_bfgs_b``) for the kernel and
  10 random starts of L-BFGS-B (200 iterations, numerical gradients) for the
  acquisition. Here: ``FIT_STEPS`` projected Adam steps on the analytic
  log-likelihood gradient, keeping the best value seen (a step to a
  non-finite likelihood is undone and the step size halved), each fit from
  Ray's start as Ray's; for the acquisition, ``num_candidates`` uniform points, then ``ACQ_STARTS`` (Ray's
  10) of the best refined by ``ACQ_STEPS`` projected Adam steps on the exact
  gradient, the best of all kept.
* Data window. Ray keeps the newest 1000 rows (``pb2.py:203``) and then
  ``select_length`` (``utils:181-212``) refits the GP on the newest 200, 210,
  ... rows and keeps the length with the best likelihood: up to 81 GP fits
  per proposal. We keep the newest ``PBTConfig.pb2_history`` rows (a shift
  buffer) and fit on all of them.
* Once per round. Ray refits ``m`` at every explore call; within a round
  its data and its (deterministic) fit are the same, so we fit ``m`` once.
* Cost. Buffers have a fixed size; the GP runs on the smallest of a few
  static sizes (64, 256, ... up to the buffer) that holds every valid row
  (``lax.switch``), so a run pays for the data it has, not for the buffer.
  Each likelihood step is a Cholesky factorisation plus an inverse, ``n^3``:
  on one core of a 2-core CPU, 1.1 ms at ``n = 200`` and 46 ms at
  ``n = 1000``; a proposal for 8 members, 2 replaced (two fits), took 12 ms
  on 64 rows, 145 ms on 200 and 6 s on 1000. Hence the default
  ``PBTConfig.pb2_history = 200`` (the shortest window Ray's
  ``select_length`` ever fits); 1000 is Ray's cap and costs seconds a round.
  Measured against the training (``metarl-pbt --algo pb2 --env CartPole-v1
  --population 8 --interval 10 --timesteps 3e5``, 2 CPU cores): the
  selection is 133 ms of a 412 ms round with 200 rows (32%), 12 ms of 284
  ms with ``--pb2-history 64`` (4%), PBT's 0.75 ms of 283 ms; rounds of
  real workloads (MinAtar, Brax) take seconds, where 200 rows cost a few %.
* Continuity. The maximiser of a smooth, often flat, acquisition moves with
  its inputs by (gradient change) / (curvature), so programs that differ by
  float rounding (sharded over devices or not) agree on proposals to about
  1e-2 of the unit range, not to 1e-5 (Ray's L-BFGS-B would do the same);
  the same program on the same devices is deterministic.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from runtime.platform import one_matrix_at_a_time


class PB2Data(NamedTuple):
    """Observations of PB2, a fixed-size shift buffer (newest last), one row
    per member and round (Ray's data table).

    t [N] float32 time at the end of the round (rounds done); r [N] the
    member's fitness at the start of the round (Ray's ``R_before``); x [N, H]
    unit hyperparameters used during the round; y [N] fitness change over the
    round; member [N] int32 the member (Ray's ``Trial``); valid [N] bool."""

    t: jax.Array
    r: jax.Array
    x: jax.Array
    y: jax.Array
    member: jax.Array
    valid: jax.Array


def pb2_empty(n: int, h: int) -> PB2Data:
    z = jnp.zeros((n,), jnp.float32)
    return PB2Data(z, z, jnp.zeros((n, h), jnp.float32), z, jnp.zeros((n,), jnp.int32), jnp.zeros((n,), bool))


def pb2_record(data: PB2Data, t, r, x, y, ok) -> PB2Data:
    """Appends ``P`` rows, member ``i`` in row ``i``: ``t`` scalar, ``r [P]``,
    ``x [P, H]``, ``y [P]``, ``ok [P]`` (rows with a non-finite value are
    invalid)."""
    p = x.shape[0]
    ok = ok & jnp.isfinite(y) & jnp.isfinite(r) & jnp.all(jnp.isfinite(x), -1)
    new = PB2Data(jnp.full((p,), t, jnp.float32), jnp.where(ok, r, 0.0).astype(jnp.float32),
                  jnp.where(ok[:, None], x, 0.0).astype(jnp.float32), jnp.where(ok, y, 0.0).astype(jnp.float32),
                  jnp.arange(p, dtype=jnp.int32), ok)
    return jax.tree.map(lambda old, n: jnp.concatenate([old, n])[-old.shape[0]:], data, new)


# ---------------------------------------------------------------------------
# Inputs, kernel, likelihood
# ---------------------------------------------------------------------------

NORM_EPS = 1e-8  # utils:108-110 and utils:115
Y_CLIP = 2.0  # utils:116
# log-parameters theta = log(variance, lengthscale, epsilon, noise variance)
THETA_INIT = np.log(np.array([1.0, 1.0, 0.1, 1.0], np.float32))  # pb2.py:123 (noise: GPy's start)
THETA_LOW = np.log(np.array([1e-5, 1e-5, 1e-5, 1e-4], np.float32))  # utils:20-22 (noise: float32 floor)
THETA_HIGH = np.log(np.array([1e5, 1e5, 0.5, 1e5], np.float32))
FIT_STEPS = 60
FIT_LR = 0.1
ACQ_STARTS = 10  # utils:156
ACQ_STEPS = 30
ACQ_LR = 0.05
UCB_C1, UCB_C2 = 0.2, 0.4  # utils:131-132
MIN_BUCKET = 64


def normalise_inputs(data: PB2Data):
    """Ray's GP inputs over the valid rows: ``X [N, 2 + H] = [t, r, x]`` with
    ``t`` and ``r`` min-max normalised, ``y [N]`` standardised and clipped
    (invalid rows: 0). Returns ``(X, y, lo [2], scale [2])``; a context
    ``(t, r)`` normalises as ``((t, r) - lo) / scale``."""
    v = data.valid
    n = jnp.maximum(jnp.sum(v), 1)
    tr = jnp.stack([data.t, data.r], -1)
    lo = jnp.min(jnp.where(v[:, None], tr, jnp.inf), 0)
    hi = jnp.max(jnp.where(v[:, None], tr, -jnp.inf), 0)
    lo, hi = jnp.where(jnp.isfinite(lo), lo, 0.0), jnp.where(jnp.isfinite(hi), hi, 0.0)
    scale = hi - lo + NORM_EPS
    x = jnp.concatenate([(tr - lo) / scale, data.x], -1)
    mean = jnp.sum(jnp.where(v, data.y, 0.0)) / n
    std = jnp.sqrt(jnp.sum(jnp.where(v, (data.y - mean) ** 2, 0.0)) / n)
    y = jnp.clip((data.y - mean) / (std + NORM_EPS), -Y_CLIP, Y_CLIP)
    return jnp.where(v[:, None], x, 0.0), jnp.where(v, y, 0.0), lo, scale


def _distances(x1, x2):
    dt = jnp.abs(x1[:, None, 0] - x2[None, :, 0])
    d2 = jnp.sum((x1[:, None, 1:] - x2[None, :, 1:]) ** 2, -1)
    return dt, d2


def tv_kernel(x1, x2, variance, lengthscale, epsilon):
    """Ray's ``TV_SquaredExp`` (utils:43-75) between ``x1 [N, D]`` and ``x2
    [M, D]``, time in column 0: ``variance * exp(-|z - z'|^2 / lengthscale) *
    (1 - epsilon) ** (|t - t'| / 2)``, ``z`` the other columns. ``[N, M]``."""
    dt, d2 = _distances(x1, x2)
    eps = jnp.clip(epsilon, 1e-5, 0.5)
    return variance * jnp.exp(-d2 / lengthscale) * jnp.exp(0.5 * dt * jnp.log1p(-eps))


# jaxlib 0.10's batched CPU LAPACK can hang when several devices run it at
# once (runtime.platform); a PB2 step may be vmapped or sharded, so every
# factorisation and solve runs one matrix at a time. The wrappers are not
# differentiable: the likelihood's gradient is written out below.
_cholesky = one_matrix_at_a_time(jnp.linalg.cholesky)
_solve_lower = one_matrix_at_a_time(lambda chol, b: jax.scipy.linalg.solve_triangular(chol, b, lower=True))


class GP(NamedTuple):
    """A fitted GP on ``n`` rows (masked): ``theta [4]``, ``alpha = K^-1 y
    [n]`` and ``k_inv [n, n]`` (zero on invalid rows)."""

    theta: jax.Array
    alpha: jax.Array
    k_inv: jax.Array


def _factor(x, valid, theta):
    """Masked ``K = k(X, X) + noise I`` on the valid rows (identity elsewhere),
    its Cholesky factor and inverse, and the kernel's pieces."""
    var, ls, eps, noise = jnp.exp(theta[0]), jnp.exp(theta[1]), jnp.exp(theta[2]), jnp.exp(theta[3])
    m = valid[:, None] & valid[None, :]
    dt, d2 = _distances(x, x)
    kf = jnp.where(m, tv_kernel(x, x, var, ls, eps), 0.0)
    k = kf + jnp.diag(jnp.where(valid, noise, 1.0))
    chol = _cholesky(k)
    l_inv = _solve_lower(chol, jnp.eye(x.shape[0], dtype=x.dtype))
    k_inv = jnp.where(m, l_inv.T @ l_inv, 0.0)
    return chol, k_inv, kf, dt, d2


def gp_log_marginal(x, y, valid, theta):
    """Log marginal likelihood of ``y [N]`` at ``X [N, D]`` (valid rows) under
    the kernel with ``theta = log(variance, lengthscale, epsilon, noise)``:
    ``-y' K^-1 y / 2 - log|K| / 2 - n log(2 pi) / 2``."""
    return _log_marginal_and_grad(x, y, valid, theta)[0]


def _log_marginal_and_grad(x, y, valid, theta):
    chol, k_inv, kf, dt, d2 = _factor(x, valid, theta)
    yv = jnp.where(valid, y, 0.0)
    alpha = k_inv @ yv
    n = jnp.sum(valid)
    lml = -0.5 * yv @ alpha - jnp.sum(jnp.where(valid, jnp.log(jnp.diag(chol)), 0.0)) - 0.5 * n * jnp.log(2 * jnp.pi)
    # d lml / d theta_j = tr((alpha alpha' - K^-1) dK/dtheta_j) / 2
    w = 0.5 * (alpha[:, None] * alpha[None, :] - k_inv)
    ls, eps, noise = jnp.exp(theta[1]), jnp.exp(theta[2]), jnp.exp(theta[3])
    grad = jnp.stack([
        jnp.sum(w * kf),
        jnp.sum(w * kf * d2 / ls),
        jnp.sum(w * kf * (-0.5 * dt) * eps / (1.0 - eps)),
        noise * jnp.sum(jnp.where(valid, jnp.diag(w), 0.0)),
    ])
    return lml, grad, alpha, k_inv


def gp_fit(x, y, valid, steps=FIT_STEPS, theta0=None) -> GP:
    """Maximises the log marginal likelihood over ``theta`` within Ray's
    bounds: ``steps`` (an int or a traced scalar) projected Adam steps in log
    space from ``theta0`` (default Ray's start); returns the ``GP`` at the best
    point evaluated."""
    lo, hi = jnp.asarray(THETA_LOW), jnp.asarray(THETA_HIGH)
    theta0 = jnp.asarray(THETA_INIT if theta0 is None else theta0, jnp.float32)
    n = x.shape[0]
    b1, b2 = 0.9, 0.999

    def body(i, c):
        theta, m, v, lr, best, best_lml = c
        lml, g, alpha, k_inv = _log_marginal_and_grad(x, y, valid, theta)
        ok = jnp.isfinite(lml) & jnp.all(jnp.isfinite(g))
        better = ok & (lml > best_lml)
        best = jax.tree.map(lambda a, b: jnp.where(better, a, b), GP(theta, alpha, k_inv), best)
        best_lml = jnp.where(better, lml, best_lml)
        g = jnp.where(ok, g, 0.0)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        k = (i + 1).astype(jnp.float32)
        step = lr * (m / (1 - b1 ** k)) / (jnp.sqrt(v / (1 - b2 ** k)) + 1e-8)
        # A non-finite likelihood (a failed factorisation) goes back to the best point, with half the step.
        theta = jnp.where(ok, jnp.clip(theta + step, lo, hi), best.theta)
        lr = jnp.where(ok, lr, 0.5 * lr)
        return theta, m, v, lr, best, best_lml

    z = jnp.zeros((4,), jnp.float32)
    start = GP(theta0, jnp.zeros((n,), jnp.float32), jnp.zeros((n, n), jnp.float32))
    c = (theta0, z, z, jnp.float32(FIT_LR), start, jnp.float32(-jnp.inf))
    return jax.lax.fori_loop(0, steps + 1, body, c)[4]


def ucb_kappa(n):
    """Ray's exploration weight for ``n`` data rows (utils:131-134):
    ``sqrt(0.2 + max(0, log(0.4 n)))``."""
    n = jnp.asarray(n, jnp.float32)
    return jnp.sqrt(UCB_C1 + jnp.maximum(0.0, jnp.log(UCB_C2 * jnp.maximum(n, 1e-30))))


def gp_mean(gp: GP, x, valid, xq):
    """Posterior mean at ``xq [Q, D]`` (zero prior mean, as sklearn's)."""
    th = gp.theta
    k = jnp.where(valid[None, :], tv_kernel(xq, x, jnp.exp(th[0]), jnp.exp(th[1]), jnp.exp(th[2])), 0.0)
    return k @ gp.alpha


def gp_variance(gp: GP, x, valid, xq):
    """Posterior variance of the latent function at ``xq [Q, D]`` (no noise
    added, clipped at 0 as sklearn's ``predict``)."""
    th = gp.theta
    k = jnp.where(valid[None, :], tv_kernel(xq, x, jnp.exp(th[0]), jnp.exp(th[1]), jnp.exp(th[2])), 0.0)
    return jnp.maximum(jnp.exp(th[0]) - jnp.sum(k * (k @ gp.k_inv), -1), 0.0)


def acquisition(m: GP, m1: GP, x, valid, valid1, fixed, u, kappa):
    """Ray's UCB (utils:119-148) at unit points ``u [Q, H]`` with context
    ``fixed [2]``: ``mean_m + kappa * var_m1``. ``m`` and ``m1`` share the
    rows ``x``; ``valid``/``valid1`` select each one's."""
    xq = jnp.concatenate([jnp.broadcast_to(fixed, (u.shape[0], 2)), u], -1)
    return gp_mean(m, x, valid, xq) + kappa * gp_variance(m1, x, valid1, xq)


def maximise_acquisition(key, fn, h: int, num_candidates: int, starts: int = ACQ_STARTS,
                         steps: int = ACQ_STEPS):
    """The maximiser of ``fn(u [Q, H]) -> [Q]`` over ``[0, 1]^H``: the best of
    ``num_candidates`` uniform points and of the ``starts`` best of them after
    ``steps`` projected Adam steps. Returns ``u [H]``."""
    cand = jax.random.uniform(key, (num_candidates, h))
    vals = fn(cand)
    starts = min(starts, num_candidates)
    top = jax.lax.top_k(jnp.where(jnp.isfinite(vals), vals, -jnp.inf), starts)[1]
    grad = jax.grad(lambda u: jnp.sum(fn(u)))
    b1, b2 = 0.9, 0.999

    def body(i, c):
        u, m, v = c
        g = grad(u)
        g = jnp.where(jnp.isfinite(g), g, 0.0)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        k = (i + 1).astype(jnp.float32)
        u = jnp.clip(u + ACQ_LR * (m / (1 - b1 ** k)) / (jnp.sqrt(v / (1 - b2 ** k)) + 1e-8), 0.0, 1.0)
        return u, m, v

    u0 = cand[top]
    z = jnp.zeros_like(u0)
    refined = jax.lax.fori_loop(0, steps, body, (u0, z, z))[0]
    allu = jnp.concatenate([cand, refined])
    allv = jnp.concatenate([vals, fn(refined)])
    return allu[jnp.argmax(jnp.where(jnp.isfinite(allv), allv, -jnp.inf))]


# ---------------------------------------------------------------------------
# The proposal
# ---------------------------------------------------------------------------


def _propose_on(key, data: PB2Data, src, replaced, u_default, num_candidates: int):
    """``pb2_propose`` on a buffer of a static size (every valid row in it)."""
    n = data.t.shape[0]
    p, h = u_default.shape
    x_data, y_data, lo, scale = normalise_inputs(data)
    y_all = jnp.concatenate([y_data, jnp.zeros((p,), jnp.float32)])
    kappa = ucb_kappa(jnp.sum(data.valid))
    idx = jnp.arange(n)
    no_gp = GP(jnp.zeros((4,), jnp.float32), jnp.zeros((n + p,), jnp.float32), jnp.zeros((n + p, n + p), jnp.float32))

    # Step 0 fits m on the data; step i + 1 proposes for member i, fitting m1
    # when points are pending (one GP fit in the program: compile time). The
    # GP's rows are the data, then P pending slots (points chosen earlier this
    # round). Member i's values are read and written through one-hot masks,
    # not dynamic indices: the member arrays may be sharded over devices.
    def step(carry, inp):
        pend_u, pending, m = carry
        i, k = inp
        first = i < 0
        hot = jnp.arange(p) == i
        src_i = jnp.sum(jnp.where(hot, src, 0))
        replaced_i = jnp.any(hot & replaced)
        default_i = jnp.sum(jnp.where(hot[:, None], u_default, 0.0), 0)
        # The source's last row gives the context (its time and R_before).
        last = jnp.max(jnp.where(data.valid & (data.member == src_i), idx, -1))
        row = idx == last
        fixed = (jnp.stack([jnp.sum(jnp.where(row, data.t, 0.0)), jnp.sum(jnp.where(row, data.r, 0.0))]) - lo) / scale
        # Pending rows carry the current context (pb2.py:142-144).
        x_all = jnp.concatenate([x_data, jnp.concatenate([jnp.broadcast_to(fixed, (p, 2)), pend_u], -1)])
        valid = jnp.concatenate([data.valid, jnp.zeros((p,), bool)])
        valid1 = jnp.concatenate([data.valid, pending & ~first])
        go = ~first & replaced_i & (last >= 0)
        refit = first | (go & jnp.any(pending))
        fitted = jax.lax.cond(refit, lambda: gp_fit(x_all, y_all, valid1), lambda: no_gp)
        m = jax.tree.map(lambda a, b: jnp.where(first, a, b), fitted, m)
        m1 = jax.tree.map(lambda a, b: jnp.where(refit & ~first, a, b), fitted, m)
        u = jax.lax.cond(go, lambda: maximise_acquisition(
            k, lambda u: acquisition(m, m1, x_all, valid, valid1, fixed, u, kappa), h, num_candidates),
            lambda: default_i)
        # Every replaced member's point joins the pending ones, explored or kept (pb2.py:472-478).
        take = hot & replaced & ~first
        pend_u = jnp.where(take[:, None], u, pend_u)
        return (pend_u, pending | take, m), u

    keys = jax.random.split(key, p + 1)
    steps = jnp.arange(-1, p)
    init = (jnp.zeros((p, h), jnp.float32), jnp.zeros((p,), bool), no_gp)
    _, u_new = jax.lax.scan(step, init, (steps, keys))
    return u_new[1:]


def bucket_sizes(n: int):
    """The static GP sizes for a buffer of ``n`` rows: 64, 256, ... and ``n``
    (few sizes: each is compiled)."""
    sizes, s = [], MIN_BUCKET
    while s < n:
        sizes.append(s)
        s *= 4
    return tuple(sizes) + (n,)


def pb2_propose(key, data: PB2Data, src, replaced, u_default, num_candidates: int = 256):
    """PB2's explore step for every replaced member (in member order): a unit
    point maximising Ray's UCB of the GP on the data at the context of its
    source ``src [P]``, the points chosen before it in this round pending.
    Members not replaced, and replaced ones whose source has no data row,
    keep ``u_default [P, H]`` (the copied values). Returns ``u_new [P, H]``.

    The GP runs on the newest rows of the buffer, in the smallest of
    ``bucket_sizes(N)`` that holds every valid row."""
    n = data.t.shape[0]
    sizes = bucket_sizes(n)
    first = jnp.min(jnp.where(data.valid, jnp.arange(n), n))
    span = n - first
    which = jnp.sum(jnp.asarray(sizes[:-1]) < span).astype(jnp.int32)
    branches = [lambda d, s=s: _propose_on(key, jax.tree.map(lambda a: a[-s:], d), src, replaced, u_default,
                                           num_candidates) for s in sizes]
    return jax.lax.switch(which, branches, data)
