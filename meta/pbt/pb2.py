"""PB2: a GP bandit over unit hyperparameters (Parker-Holder et al. 2020).

The GP models the return improvement of a round as a function of the unit
hyperparameters used during it and of time (a time-varying kernel); new
points for the replaced members maximise a batch UCB acquisition.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from runtime.platform import one_matrix_at_a_time


class PB2Data(NamedTuple):
    """Observations of PB2, a fixed-size shift buffer (newest last).

    t [N] float32 round index; x [N, H] unit hyperparameters used during the
    round; y [N] return improvement over the round; valid [N] bool."""

    t: jax.Array
    x: jax.Array
    y: jax.Array
    valid: jax.Array


def pb2_empty(n: int, h: int) -> PB2Data:
    return PB2Data(jnp.zeros((n,), jnp.float32), jnp.zeros((n, h), jnp.float32),
                   jnp.zeros((n,), jnp.float32), jnp.zeros((n,), bool))


def pb2_record(data: PB2Data, t, x, y, ok) -> PB2Data:
    """Appends ``P`` rows (``t`` scalar, ``x [P, H]``, ``y [P]``, ``ok [P]``)."""
    p = x.shape[0]
    ok = ok & jnp.isfinite(y) & jnp.all(jnp.isfinite(x), -1)
    new = PB2Data(jnp.full((p,), t, jnp.float32), x.astype(jnp.float32),
                  jnp.where(ok, y, 0.0).astype(jnp.float32), ok)
    return jax.tree.map(lambda old, n: jnp.concatenate([old, n])[-old.shape[0]:], data, new)


# Kernel hyperparameter grid, chosen by marginal likelihood at every proposal.
_PB2_LENGTHSCALES = (0.1, 0.2, 0.4, 0.8)
_PB2_EPS = (0.01, 0.1, 0.3)
_PB2_NOISE = (0.01, 0.1)


def tv_kernel(t1, x1, t2, x2, lengthscale, eps):
    """Time-varying squared-exponential kernel (Bogunovic et al. 2016, as in
    PB2): ``exp(-|x - x'|^2 / (2 l^2)) * (1 - eps) ** (|t - t'| / 2)``."""
    d2 = jnp.sum((x1[:, None, :] - x2[None, :, :]) ** 2, -1)
    dt = jnp.abs(t1[:, None] - t2[None, :])
    return jnp.exp(-0.5 * d2 / lengthscale ** 2) * jnp.exp(0.5 * dt * jnp.log1p(-eps))


# jaxlib 0.10's batched CPU LAPACK can hang when several devices run it at
# once (runtime.platform); the hyperparameter grid below is vmapped, and a PB2
# step may itself be vmapped or sharded, so every factorisation and solve runs
# one matrix at a time.
_cholesky = one_matrix_at_a_time(jnp.linalg.cholesky)
_cho_solve = one_matrix_at_a_time(lambda chol, b: jax.scipy.linalg.cho_solve((chol, True), b))
_solve_lower = one_matrix_at_a_time(lambda chol, b: jax.scipy.linalg.solve_triangular(chol, b, lower=True))


def _gp_parts(t, x, y, valid, lengthscale, eps, noise):
    m = valid[:, None] & valid[None, :]
    k = jnp.where(m, tv_kernel(t, x, t, x, lengthscale, eps), 0.0)
    k = k + jnp.diag(jnp.where(valid, noise, 1.0))
    chol = _cholesky(k)
    yv = jnp.where(valid, y, 0.0)
    alpha = _cho_solve(chol, yv)
    return chol, alpha, yv


def _gp_log_marginal(t, x, y, valid, lengthscale, eps, noise):
    chol, alpha, yv = _gp_parts(t, x, y, valid, lengthscale, eps, noise)
    return -0.5 * yv @ alpha - jnp.sum(jnp.log(jnp.diag(chol)))


def pb2_propose(key, data: PB2Data, t_next, replaced, u_default, num_candidates: int = 256,
                kappa: float = 1.5):
    """PB2's explore step: for every replaced member a new unit point that
    maximises ``UCB = mean + kappa * std`` of a GP on the normalised return
    improvements, at time ``t_next``, over ``num_candidates`` uniform random
    points in ``[0, 1]^H``. Kernel hyperparameters (length scale, time decay
    ``eps``, noise) are the marginal-likelihood best of a small grid. Several
    replaced members in one round are chosen in turn; each chosen point joins
    the data as pending (GP-BUCB: its std shrinks, its mean does not move), so
    the batch spreads out. ``u_default [P, H]`` is kept for the others.

    Returns ``u_new [P, H]``.
    """
    p, h = u_default.shape
    n_valid = jnp.sum(data.valid)
    yv = jnp.where(data.valid, data.y, 0.0)
    mean_y = jnp.sum(yv) / jnp.maximum(n_valid, 1)
    std_y = jnp.sqrt(jnp.sum(jnp.where(data.valid, (data.y - mean_y) ** 2, 0.0)) / jnp.maximum(n_valid, 1))
    y = jnp.where(data.valid, (data.y - mean_y) / jnp.maximum(std_y, 1e-8), 0.0)

    grid = np.array([(l, e, s) for l in _PB2_LENGTHSCALES for e in _PB2_EPS for s in _PB2_NOISE], np.float32)
    lml = jax.vmap(lambda g: _gp_log_marginal(data.t, data.x, y, data.valid, g[0], g[1], g[2]))(grid)
    best = jnp.asarray(grid)[jnp.argmax(jnp.where(jnp.isfinite(lml), lml, -jnp.inf))]
    ls, eps, noise = best[0], best[1], best[2]

    # Data + P pending slots (filled as members are chosen).
    t_all = jnp.concatenate([data.t, jnp.full((p,), t_next, jnp.float32)])
    x_all = jnp.concatenate([data.x, jnp.zeros((p, h), jnp.float32)])
    y_all = jnp.concatenate([y, jnp.zeros((p,), jnp.float32)])
    v_all = jnp.concatenate([data.valid, jnp.zeros((p,), bool)])
    n = data.t.shape[0]
    _, alpha_real, _ = _gp_parts(data.t, data.x, y, data.valid, ls, eps, noise)

    def choose(carry, inp):
        x_all, v_all = carry
        i, k = inp
        cand = jax.random.uniform(k, (num_candidates, h))
        tc = jnp.full((num_candidates,), t_next, jnp.float32)
        # Mean from the real data only (pending points do not move it).
        k_real = jnp.where(data.valid[None, :], tv_kernel(tc, cand, data.t, data.x, ls, eps), 0.0)
        mu = k_real @ alpha_real
        # Std from real + pending data.
        m = v_all[:, None] & v_all[None, :]
        kk = jnp.where(m, tv_kernel(t_all, x_all, t_all, x_all, ls, eps), 0.0) + jnp.diag(
            jnp.where(v_all, noise, 1.0))
        chol = _cholesky(kk)
        ks = jnp.where(v_all[None, :], tv_kernel(tc, cand, t_all, x_all, ls, eps), 0.0)
        w = _solve_lower(chol, ks.T)
        var = jnp.maximum(1.0 - jnp.sum(w ** 2, 0), 1e-12)
        ucb = mu + kappa * jnp.sqrt(var)
        choice = cand[jnp.argmax(ucb)]
        take = replaced[i]
        x_all = x_all.at[n + i].set(jnp.where(take, choice, x_all[n + i]))
        v_all = v_all.at[n + i].set(take)
        return (x_all, v_all), jnp.where(take, choice, u_default[i])

    keys = jax.random.split(key, p)
    _, u_new = jax.lax.scan(choose, (x_all, v_all), (jnp.arange(p), keys))
    return u_new
