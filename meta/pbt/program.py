"""Population-based training in one jitted program: PBT, GPBT-PL, PB2 and
mixed-optimizer populations.

A population is stacked along a leading member axis ``[P, ...]`` (per group,
see below). One *round* is ``interval`` agent updates of every member
(``jax.vmap(agent.run)``) followed by a selection step; both are pure and run
inside one ``jax.jit``. Hyperparameters are arrays in ``state.hparams`` (e.g.
``PPOHParams``; PPO writes ``hparams.lr`` into the optimizer's injected
``learning_rate`` every step), so changing them never recompiles.

Building blocks (pure, jittable, population-stacked; ``P`` members, ``H``
tuned hyperparameters):

* exploit -> ``src [P] int32``, the member each one copies from (itself when
  it keeps its weights): ``truncation_select`` (bottom fraction copies a
  random member of the top fraction), ``ttest_select`` (Welch t-test against a
  random member over the recent-returns window), ``tournament_select``
  (binary tournament). A member whose fitness is NaN/Inf (or whose
  parameters are not finite) is always replaced and never a source.
* ``copy_members``: gathers ``params``, ``opt_state`` and ``hparams`` (plus
  any extra fields an agent names) from ``src``.
* explore: ``perturb`` (x0.8 / x1.2 in the hyperparameter's natural scale,
  clipped to bounds) and ``resample_or_perturb`` (each value redrawn from the
  prior with probability ``p``, else perturbed).
* ``gpbt_pl_update``: GPBT-PL pairwise learning (Bai & Cheng 2024).
* ``pb2_propose``: PB2's GP bandit (Parker-Holder et al. 2020) with a
  time-varying kernel and a batch UCB acquisition.

Hyperparameter coordinates. Each tuned hyperparameter has bounds and a scale:
``linear``, ``log`` (lr, entropy coefficient) or ``log1m`` (gamma, GAE lambda:
``log(1 - x)``). The *unit* coordinate ``u in [0, 1]`` is the position of the
transformed value between the transformed bounds; priors are uniform in
``u`` (log-uniform for ``log``), GPBT-PL velocities and PB2's GP live in
``u``. As the map is affine in the transformed value, the GPBT-PL rule in
``u`` is exactly the rule in log space for log-scale hyperparameters.

Mixed-optimizer populations. The population is a tuple of *groups*
(``"adam:6,kfac:2"``), each an optimizer spec with its own stacked agent
state (its optimizer state structure stays fixed). Trace-time Python loops run
over groups, never over members. Exploit copies parameters and
hyperparameters across groups; the receiver copies the source's optimizer
state when both groups have the same spec and re-initialises it from the
copied parameters when they differ. A group may have its own learning-rate
bounds (K-FAC wants larger steps than Adam): a learning rate crossing groups
keeps its unit coordinate (its relative position between the bounds).

Rounds are synchronous: every member is "ready" at every interval.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from runtime.platform import one_matrix_at_a_time

ALGOS = ("pbt", "gpbt", "pb2", "fixed")
EXPLOITS = ("truncation", "ttest", "tournament")
EXPLORES = ("perturb", "resample")
SCALES = ("linear", "log", "log1m")
_TINY = 1e-30


# ---------------------------------------------------------------------------
# Hyperparameter spaces and coordinates
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HParamSpace:
    """Names, bounds and scales of the tuned hyperparameters (fields of the
    agent's hparams NamedTuple; fields not named here are copied, never
    explored)."""

    names: Tuple[str, ...]
    low: Tuple[float, ...]
    high: Tuple[float, ...]
    scale: Tuple[str, ...]

    def __post_init__(self):
        for f in ("names", "low", "high", "scale"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
        object.__setattr__(self, "low", tuple(float(x) for x in self.low))
        object.__setattr__(self, "high", tuple(float(x) for x in self.high))
        n = len(self.names)
        if n == 0:
            raise ValueError("HParamSpace.names must name at least one hyperparameter")
        if not (len(self.low) == len(self.high) == len(self.scale) == n):
            raise ValueError("HParamSpace: names, low, high and scale must have the same length")
        for name, lo, hi, sc in zip(self.names, self.low, self.high, self.scale):
            if sc not in SCALES:
                raise ValueError(f"HParamSpace: scale of {name!r} is {sc!r}; allowed: {', '.join(SCALES)}")
            if not lo < hi:
                raise ValueError(f"HParamSpace: bounds of {name!r} must satisfy low < high, got [{lo}, {hi}]")
            if sc == "log" and lo <= 0:
                raise ValueError(f"HParamSpace: log-scale {name!r} needs low > 0, got {lo}")
            if sc == "log1m" and hi >= 1:
                raise ValueError(f"HParamSpace: log1m-scale {name!r} needs high < 1, got {hi}")

    @classmethod
    def from_dict(cls, d: Dict[str, Tuple[float, float, str]]) -> "HParamSpace":
        names = tuple(d)
        return cls(names, tuple(d[k][0] for k in names), tuple(d[k][1] for k in names),
                   tuple(d[k][2] for k in names))

    def with_bounds(self, name: str, low: float, high: float) -> "HParamSpace":
        if name not in self.names:
            raise ValueError(f"{name!r} is not tuned; tuned: {', '.join(self.names)}")
        i = self.names.index(name)
        lo, hi = list(self.low), list(self.high)
        lo[i], hi[i] = low, high
        return HParamSpace(self.names, tuple(lo), tuple(hi), self.scale)

    def restrict(self, names: Sequence[str]) -> "HParamSpace":
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {unknown}; allowed: {', '.join(self.names)}")
        idx = [self.names.index(n) for n in names]
        return HParamSpace(tuple(names), tuple(self.low[i] for i in idx), tuple(self.high[i] for i in idx),
                           tuple(self.scale[i] for i in idx))

    @property
    def size(self) -> int:
        return len(self.names)

    def codes(self) -> np.ndarray:
        return np.array([SCALES.index(s) for s in self.scale], np.int32)


PPO_SPACE = HParamSpace.from_dict({
    "lr": (1e-5, 1e-2, "log"),
    "ent_coef": (1e-5, 0.1, "log"),
    "clip_eps": (0.05, 0.5, "linear"),
    "gamma": (0.9, 0.9995, "log1m"),
    "gae_lambda": (0.7, 0.999, "log1m"),
    "vf_coef": (0.1, 1.0, "linear"),
})

# TD3 (agents/td3.py): one learning rate for actor and critics; noise scales in
# normalised action units.
TD3_SPACE = HParamSpace.from_dict({
    "lr": (1e-5, 1e-2, "log"),
    "gamma": (0.9, 0.9995, "log1m"),
    "tau": (1e-3, 0.1, "log"),
    "policy_noise": (0.05, 0.5, "linear"),
    "noise_clip": (0.1, 1.0, "linear"),
    "exploration_noise": (0.01, 0.5, "linear"),
})

# Learning-rate bounds by optimizer kind (the rest of the space is shared).
LR_BOUNDS = {"kfac": (1e-3, 0.5), "diag_ggn": (1e-4, 0.3), "sgd": (1e-4, 1.0)}


def lr_bounds_for_spec(spec: str, default: Tuple[float, float]) -> Tuple[float, float]:
    from learned_optim.spec import split_spec

    return LR_BOUNDS.get(split_spec(spec)[0], default)


def _transform(x, codes):
    """Natural -> transformed value (per column; ``codes`` [H] of SCALES)."""
    lin = x
    log = jnp.log(jnp.maximum(x, _TINY))
    log1m = jnp.log(jnp.maximum(1.0 - x, _TINY))
    return jnp.where(codes == 1, log, jnp.where(codes == 2, log1m, lin))


def _untransform(t, codes):
    return jnp.where(codes == 1, jnp.exp(t), jnp.where(codes == 2, 1.0 - jnp.exp(t), t))


def to_unit(h, low, high, codes):
    """Natural hyperparameters ``[..., H]`` -> unit coordinates in [0, 1]."""
    tl, th = _transform(low, codes), _transform(high, codes)
    return (_transform(h, codes) - tl) / (th - tl)


def from_unit(u, low, high, codes):
    """Unit coordinates ``[..., H]`` -> natural values, clipped to the bounds."""
    tl, th = _transform(low, codes), _transform(high, codes)
    h = _untransform(tl + jnp.clip(u, 0.0, 1.0) * (th - tl), codes)
    return jnp.clip(h, low, high)


def hp_matrix(hparams, names: Sequence[str]) -> jax.Array:
    """NamedTuple of ``[P]`` arrays -> ``[P, H]`` float32 (columns ``names``)."""
    return jnp.stack([jnp.asarray(getattr(hparams, n), jnp.float32) for n in names], axis=-1)


def hp_with_matrix(hparams, names: Sequence[str], mat: jax.Array):
    """``hparams`` with the columns of ``mat [P, H]`` written to ``names`` (dtypes kept)."""
    return hparams._replace(**{
        n: mat[..., i].astype(jnp.asarray(getattr(hparams, n)).dtype) for i, n in enumerate(names)
    })


def sample_prior(key, shape, low, high, codes):
    """Uniform in unit coordinates (log-uniform for log scales); ``[*shape, H]``."""
    u = jax.random.uniform(key, tuple(shape) + (low.shape[-1],))
    return from_unit(u, low, high, codes)


# ---------------------------------------------------------------------------
# Exploit: who copies from whom
# ---------------------------------------------------------------------------


def member_fitness(returns_buf: jax.Array, counts: jax.Array) -> jax.Array:
    """Mean of the valid (most recent ``counts``) entries of ``returns_buf [P, W]``;
    NaN/Inf anywhere in the window -> -inf."""
    w = returns_buf.shape[-1]
    valid = jnp.arange(w)[None, :] >= (w - counts[:, None])
    n = jnp.maximum(counts, 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, returns_buf, 0.0), -1) / n
    ok = jnp.all(jnp.where(valid, jnp.isfinite(returns_buf), True), -1) & jnp.isfinite(mean)
    return jnp.where(ok, mean, -jnp.inf)


def _random_other(key, p: int) -> jax.Array:
    """For each member, a uniformly random *other* member ``[P]``."""
    return (jnp.arange(p) + jax.random.randint(key, (p,), 1, max(p, 2))) % p


def _fix_bad(key, src, bad):
    """Members that are bad always get a random good source; a bad member is
    never a source (anyone pointing at one keeps itself). Without any good
    member, everyone keeps itself."""
    p = src.shape[0]
    idx = jnp.arange(p)
    any_good = jnp.any(~bad)
    src = jnp.where(bad[src] & ~bad, idx, src)
    logits = jnp.where(bad, -jnp.inf, 0.0)
    rand_good = jax.random.categorical(key, jnp.broadcast_to(logits, (p, p)), axis=-1)
    need = bad & (bad[src] | (src == idx))
    src = jnp.where(need & any_good, rand_good, src)
    return jnp.where(any_good, src, jnp.where(bad, idx, src)).astype(jnp.int32)


def truncation_select(key, fitness, bad, fraction: float = 0.25) -> jax.Array:
    """Truncation selection. Members ranked by ``fitness [P]`` (ties broken at
    random, bad members last); the bottom ``max(1, floor(fraction * P))``
    copy a uniformly random member of the top as many. Returns ``src [P]``."""
    p = fitness.shape[0]
    n_cut = truncation_count(p, fraction)
    k_tie, k_pick, k_fix = jax.random.split(key, 3)
    f = jnp.where(bad, -jnp.inf, fitness)
    order = jnp.lexsort((jax.random.uniform(k_tie, (p,)), f))  # ascending: worst first
    rank = jnp.zeros((p,), jnp.int32).at[order].set(jnp.arange(p, dtype=jnp.int32))
    bottom = rank < n_cut
    top = (rank >= p - n_cut) & ~bad
    logits = jnp.where(top, 0.0, -jnp.inf)
    pick = jax.random.categorical(k_pick, jnp.broadcast_to(logits, (p, p)), axis=-1)
    src = jnp.where(bottom & jnp.any(top), pick, jnp.arange(p))
    return _fix_bad(k_fix, src, bad)


def truncation_count(p: int, fraction: float) -> int:
    return max(1, min(p // 2, int(math.floor(fraction * p))))


def welch_t_pvalue(mean_a, var_a, n_a, mean_b, var_b, n_b):
    """Two-sided p-value of Welch's t-test (unbiased variances, counts >= 2)."""
    se2 = var_a / n_a + var_b / n_b
    t = (mean_a - mean_b) / jnp.sqrt(jnp.maximum(se2, 1e-30))
    df = se2 ** 2 / jnp.maximum(
        (var_a / n_a) ** 2 / jnp.maximum(n_a - 1, 1) + (var_b / n_b) ** 2 / jnp.maximum(n_b - 1, 1), 1e-30
    )
    x = df / (df + t ** 2)
    p = jax.scipy.special.betainc(df / 2.0, 0.5, jnp.clip(x, 0.0, 1.0))
    # Both windows constant: decided by the means alone.
    return jnp.where(se2 > 0, p, jnp.where(mean_a == mean_b, 1.0, 0.0))


def ttest_select(key, returns_buf, counts, bad, alpha: float = 0.05) -> jax.Array:
    """Each member compares its recent returns (window ``returns_buf [P, W]``,
    ``counts [P]`` valid entries at the end) with a random other member's and
    copies it when that one's mean is higher and Welch's t-test rejects
    equality at level ``alpha`` (two-sided). Needs >= 2 returns on both sides."""
    p, w = returns_buf.shape
    k_other, k_fix = jax.random.split(key)
    other = _random_other(k_other, p)
    valid = jnp.arange(w)[None, :] >= (w - counts[:, None])
    n = counts.astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, returns_buf, 0.0), -1) / jnp.maximum(n, 1.0)
    var = jnp.sum(jnp.where(valid, (returns_buf - mean[:, None]) ** 2, 0.0), -1) / jnp.maximum(n - 1, 1.0)
    pval = welch_t_pvalue(mean[other], var[other], n[other], mean, var, n)
    better = (mean[other] > mean) & (pval < alpha) & (counts >= 2) & (counts[other] >= 2) & ~bad[other]
    src = jnp.where(better, other, jnp.arange(p))
    return _fix_bad(k_fix, src, bad)


def tournament_select(key, fitness, bad) -> jax.Array:
    """Binary tournament: each member meets a random other member and copies
    it when that one's fitness is strictly higher."""
    p = fitness.shape[0]
    k_other, k_fix = jax.random.split(key)
    other = _random_other(k_other, p)
    f = jnp.where(bad, -jnp.inf, fitness)
    src = jnp.where(f[other] > f, other, jnp.arange(p))
    return _fix_bad(k_fix, src, bad)


# ---------------------------------------------------------------------------
# Explore
# ---------------------------------------------------------------------------


def perturb(key, h, low, high, codes, factors=(0.8, 1.2)):
    """Multiplies each value (``1 - x`` for log1m scales) by a random factor of
    ``factors``, clipped to ``[low, high]``. ``h [P, H]``."""
    f = jnp.asarray(factors, jnp.float32)[jax.random.randint(key, h.shape, 0, len(factors))]
    new = jnp.where(codes == 2, 1.0 - (1.0 - h) * f, h * f)
    return jnp.clip(new, low, high)


def resample_or_perturb(key, h, low, high, codes, prob: float = 0.25, factors=(0.8, 1.2)):
    """Each value is redrawn from the prior with probability ``prob``, else perturbed."""
    k_coin, k_prior, k_pert = jax.random.split(key, 3)
    coin = jax.random.uniform(k_coin, h.shape) < prob
    fresh = from_unit(jax.random.uniform(k_prior, h.shape), low, high, codes)
    return jnp.where(coin, fresh, perturb(k_pert, h, low, high, codes, factors))


# ---------------------------------------------------------------------------
# GPBT-PL
# ---------------------------------------------------------------------------


def gpbt_pairs(key, p: int):
    """Random pairing: ``(a, b)`` index arrays of length ``P // 2`` (an odd
    member out sits this round out)."""
    perm = jax.random.permutation(key, p)
    half = p // 2
    return perm[0:2 * half:2], perm[1:2 * half:2]


def gpbt_pl_update(key, fitness, bad, u, velocity, w1: float = 1.0, w2: float = 1.0,
                   resample_prob: float = 0.0):
    """One GPBT-PL round on unit coordinates ``u [P, H]`` and velocities
    ``velocity [P, H]``.

    Members are paired at random (``gpbt_pairs`` with the first key of
    ``split(key, 5)``); in each pair the slower learner (lower fitness) copies
    the faster one's weights and moves its own hyperparameters by
    ``v' = w1 r1 v + w2 r2 (u_fast - u_slow)``, ``u' = clip(u_slow + v', 0, 1)``
    with ``r1, r2 ~ U(0, 1)`` of shape ``[P // 2, H]`` (keys 2 and 3 of the
    split); ``v'`` becomes its velocity. As in the authors' implementation,
    each value is instead redrawn from the prior with probability
    ``resample_prob`` (key 5; velocity reset to 0 there), the population's
    only source of new values. The faster member is unchanged. Bad members
    not fixed by their pair get a random good source (key 4) and its
    hyperparameters, velocity 0.

    Returns ``(src [P], u_new [P, H], velocity_new [P, H])``.
    """
    p, h = u.shape
    k_pair, k_r1, k_r2, k_fix, k_res = jax.random.split(key, 5)
    a, b = gpbt_pairs(k_pair, p)
    f = jnp.where(bad, -jnp.inf, fitness)
    a_fast = f[a] >= f[b]
    fast = jnp.where(a_fast, a, b)
    slow = jnp.where(a_fast, b, a)
    r1 = jax.random.uniform(k_r1, (p // 2, h))
    r2 = jax.random.uniform(k_r2, (p // 2, h))
    v_new = w1 * r1 * velocity[slow] + w2 * r2 * (u[fast] - u[slow])
    u_slow = jnp.clip(u[slow] + v_new, 0.0, 1.0)
    k_coin, k_prior = jax.random.split(k_res)
    coin = jax.random.uniform(k_coin, (p // 2, h)) < resample_prob
    u_slow = jnp.where(coin, jax.random.uniform(k_prior, (p // 2, h)), u_slow)
    v_new = jnp.where(coin, 0.0, v_new)
    fast_ok = ~bad[fast]
    src = jnp.arange(p).at[slow].set(jnp.where(fast_ok, fast, slow))
    u_out = u.at[slow].set(jnp.where(fast_ok[:, None], u_slow, u[slow]))
    v_out = velocity.at[slow].set(jnp.where(fast_ok[:, None], v_new, velocity[slow]))
    fixed = _fix_bad(k_fix, src, bad)
    reassigned = fixed != src
    u_out = jnp.where(reassigned[:, None], u[fixed], u_out)
    v_out = jnp.where(reassigned[:, None], 0.0, v_out)
    return fixed, u_out, v_out


# ---------------------------------------------------------------------------
# PB2: GP bandit with a time-varying kernel
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Groups and agents
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Group:
    spec: str  # optimizer spec for learned_optim.from_spec
    size: int


def parse_groups(text: str, population: Optional[int] = None) -> Tuple[Group, ...]:
    """``"adam:6,kfac:2"`` -> groups. Each group is ``SPEC:N``; settings inside
    a spec keep their commas (``"kfac:lr=0.05,damping=1e-3:2"``). A single
    spec without a count takes the whole ``population``. Checks that the
    counts add up to ``population`` when given."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"--optimizers must be a non-empty list like 'adam:6,kfac:2', got {text!r}")
    groups, pending = [], []
    for token in (t.strip() for t in text.split(",")):
        pending.append(token)
        m = re.match(r"^(.*):\s*(\d+)$", token)
        if m:
            spec = ",".join(pending[:-1] + [m.group(1)])
            groups.append(Group(spec.strip(), int(m.group(2))))
            pending = []
    if pending:
        if groups or population is None:
            raise ValueError(
                f"--optimizers {text!r}: every group needs a member count, e.g. 'adam:6,kfac:2' "
                f"(got {','.join(pending)!r} without one)"
            )
        groups.append(Group(",".join(pending), int(population)))
    for g in groups:
        if g.size < 1:
            raise ValueError(f"--optimizers: group {g.spec!r} has {g.size} members; each needs >= 1")
    total = sum(g.size for g in groups)
    if population is not None and total != population:
        raise ValueError(
            f"--optimizers {text!r} has {total} members but --population is {population}; make them equal"
        )
    return tuple(groups)


class MemberAgent(NamedTuple):
    """What PBT needs of an agent (one member; vmapped by the driver).

    ``init(key, hparams) -> state``; ``run(state, n) -> (state, metrics)``
    with ``metrics["episode_return"] [n]``; ``state`` has ``params``,
    ``opt_state`` and ``hparams`` (a NamedTuple of float arrays) and
    ``.replace``; ``init_opt(params) -> opt_state`` re-initialises the
    optimizer (used when a member copies from another optimizer kind).
    ``copy_fields`` are the state fields copied on exploit (e.g. target
    networks of TD3 besides ``params``). ``steps_per_update``: env steps of
    one update (for reporting)."""

    init: Callable
    run: Callable
    init_opt: Callable
    steps_per_update: int
    copy_fields: Tuple[str, ...] = ("params", "opt_state", "hparams")


@dataclasses.dataclass(frozen=True)
class PBTConfig:
    """Static settings of a PBT run."""

    algo: str = "pbt"
    exploit: str = "truncation"
    explore: str = "perturb"
    interval: int = 10  # agent updates per round
    window: int = 10  # recent per-update returns kept per member
    truncation_fraction: float = 0.25
    ttest_alpha: float = 0.05
    resample_prob: float = 0.25
    perturb_factors: Tuple[float, ...] = (0.8, 1.2)
    gpbt_w1: float = 1.0  # inertia weight (the authors' default)
    gpbt_w2: float = 1.0  # weight of the pull toward the faster member
    pb2_history_rounds: int = 8  # PB2 keeps P * this many observations
    pb2_candidates: int = 256
    pb2_kappa: float = 1.5

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"--algo {self.algo!r}; allowed: {', '.join(ALGOS)}")
        if self.exploit not in EXPLOITS:
            raise ValueError(f"--exploit {self.exploit!r}; allowed: {', '.join(EXPLOITS)}")
        if self.explore not in EXPLORES:
            raise ValueError(f"--explore {self.explore!r}; allowed: {', '.join(EXPLORES)}")
        for f in ("interval", "window", "pb2_history_rounds", "pb2_candidates"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ValueError(f"PBTConfig.{f} (--{f.replace('_', '-')}) must be a positive integer, "
                                 f"got {getattr(self, f)!r}")
        if not 0 < self.truncation_fraction <= 0.5:
            raise ValueError(f"--truncation-fraction must be in (0, 0.5], got {self.truncation_fraction}")
        if not 0 < self.ttest_alpha < 1:
            raise ValueError(f"--ttest-alpha must be in (0, 1), got {self.ttest_alpha}")
        if not 0 <= self.resample_prob <= 1:
            raise ValueError(f"--resample-prob must be in [0, 1], got {self.resample_prob}")
        object.__setattr__(self, "perturb_factors", tuple(float(f) for f in self.perturb_factors))


@struct.dataclass
class PBTState:
    """Population state: ``members`` is a tuple with one stacked agent state
    per group; the rest is over all ``P`` members in group order."""

    members: Tuple[Any, ...]
    returns_buf: jax.Array  # [P, W] recent per-update returns, newest last
    returns_count: jax.Array  # [P] int32 valid entries at the end of returns_buf
    prev_fitness: jax.Array  # [P] fitness at the end of the previous round (after copying)
    velocity: jax.Array  # [P, H] GPBT-PL velocities (unit coordinates)
    pb2: PB2Data
    key: jax.Array  # raw uint32 key data
    round: jax.Array  # int32 rounds done


class PBT(NamedTuple):
    """Pure functions of a PBT run (``jax.jit`` them; ``step`` = ``train``
    then ``select``)."""

    init: Callable[[jax.Array], PBTState]
    train: Callable[[PBTState], Tuple[PBTState, jax.Array]]
    select: Callable[[PBTState, jax.Array], Tuple[PBTState, Dict[str, jax.Array]]]
    step: Callable[[PBTState], Tuple[PBTState, Dict[str, jax.Array]]]
    hparams_matrix: Callable[[PBTState], jax.Array]
    groups: Tuple[Group, ...]
    spaces: Tuple[HParamSpace, ...]
    hparam_fields: Tuple[str, ...]


def _concat(trees):
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *trees)


def _take(tree, idx):
    return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), tree)


def _finite_members(tree) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    ok = jnp.ones((leaves[0].shape[0],), bool) if leaves else None
    for x in leaves:
        ok = ok & jnp.all(jnp.isfinite(x.reshape((x.shape[0], -1))), axis=-1)
    return ok


def make_pbt(config: PBTConfig, agents: Sequence[MemberAgent], groups: Sequence[Group],
             spaces: Sequence[HParamSpace], base_hparams, seed_hparams: Optional[Dict[str, Any]] = None) -> PBT:
    """Builds the PBT program.

    ``agents[g]`` / ``groups[g]`` / ``spaces[g]``: the agent, optimizer group
    and tuned space of each group (spaces share names and scales; bounds may
    differ). ``base_hparams``: the agent's hparams NamedTuple (scalars) with
    the values of the untuned fields. Initial tuned values are drawn from the
    prior (the same draw for every ``algo`` with the same seed, so ``fixed``
    is the matching baseline).
    """
    groups, spaces = tuple(groups), tuple(spaces)
    if not (len(agents) == len(groups) == len(spaces)) or not groups:
        raise ValueError("make_pbt: agents, groups and spaces must have one entry per group")
    names, codes_np = spaces[0].names, spaces[0].codes()
    for s in spaces:
        if s.names != names or s.scale != spaces[0].scale:
            raise ValueError("make_pbt: every group must tune the same hyperparameters with the same scales")
    missing = [n for n in names if n not in base_hparams._fields]
    if missing:
        raise ValueError(f"tuned hyperparameter(s) {missing} are not fields of {type(base_hparams).__name__}; "
                         f"allowed: {', '.join(base_hparams._fields)}")
    sizes = [g.size for g in groups]
    p = sum(sizes)
    if p < 2 and config.algo != "fixed":
        raise ValueError(f"--population {p}: {config.algo} needs at least 2 members")
    offsets = np.cumsum([0] + sizes)
    h = len(names)
    group_of = jnp.asarray(np.repeat(np.arange(len(groups)), sizes), jnp.int32)
    low = jnp.asarray(np.repeat(np.array([s.low for s in spaces], np.float32), sizes, axis=0))  # [P, H]
    high = jnp.asarray(np.repeat(np.array([s.high for s in spaces], np.float32), sizes, axis=0))
    codes = jnp.asarray(codes_np)
    n_hist = p * config.pb2_history_rounds
    interval = config.interval

    def hparams_matrix(state: PBTState) -> jax.Array:
        return jnp.concatenate([hp_matrix(m.hparams, names) for m in state.members])

    def init(key) -> PBTState:
        k_hp, k_members, k_run = jax.random.split(key, 3)
        tuned = sample_prior(k_hp, (p,), low, high, codes)
        members = []
        for g, agent in enumerate(agents):
            sl = slice(offsets[g], offsets[g + 1])
            hp = jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.float32), (sizes[g],)), base_hparams)
            hp = hp_with_matrix(hp, names, tuned[sl])
            keys = jax.random.split(jax.random.fold_in(k_members, g), sizes[g])
            members.append(jax.vmap(agent.init)(keys, hp))
        return PBTState(
            members=tuple(members),
            returns_buf=jnp.zeros((p, config.window), jnp.float32),
            returns_count=jnp.zeros((p,), jnp.int32),
            prev_fitness=jnp.zeros((p,), jnp.float32),
            velocity=jnp.zeros((p, h), jnp.float32),
            pb2=pb2_empty(n_hist, h),
            key=jax.random.key_data(k_run),
            round=jnp.zeros((), jnp.int32),
        )

    def train(state: PBTState):
        """``interval`` updates of every member; returns (state, returns [P, interval])."""
        members, rets = [], []
        for agent, m in zip(agents, state.members):
            m, metrics = jax.vmap(lambda s: agent.run(s, interval))(m)
            members.append(m)
            rets.append(jnp.asarray(metrics["episode_return"], jnp.float32))
        rets = jnp.concatenate(rets)
        buf = jnp.concatenate([state.returns_buf, rets], axis=1)[:, -config.window:]
        count = jnp.minimum(state.returns_count + interval, config.window)
        return state.replace(members=tuple(members), returns_buf=buf, returns_count=count), rets

    def copy_members(members, src):
        """Every member takes ``copy_fields`` of member ``src`` (global
        indices); optimizer states are copied within a kind, re-initialised
        across kinds; tuned hparams crossing groups keep their unit position."""
        out = []
        for g, (agent, m) in enumerate(zip(agents, members)):
            sl = slice(offsets[g], offsets[g + 1])
            s_g = src[sl]
            new = {}
            for f in agent.copy_fields:
                if f in ("opt_state", "hparams"):
                    continue
                new[f] = _take(_concat([getattr(mm, f) for mm in members]), s_g)
            if "hparams" in agent.copy_fields:
                hp = _take(_concat([mm.hparams for mm in members]), s_g)
                h_src, h_dst_low, h_dst_high = hp_matrix(hp, names), low[sl], high[sl]
                same = jnp.all((low[s_g] == h_dst_low) & (high[s_g] == h_dst_high), -1, keepdims=True)
                mapped = from_unit(to_unit(h_src, low[s_g], high[s_g], codes), h_dst_low, h_dst_high, codes)
                new["hparams"] = hp_with_matrix(hp, names, jnp.where(same, h_src, mapped))
            if "opt_state" in agent.copy_fields:
                params = new.get("params", m.params)
                opt = jax.vmap(agent.init_opt)(params)
                for s, other in enumerate(members):
                    if groups[s].spec != groups[g].spec:
                        continue
                    local = jnp.clip(s_g - offsets[s], 0, sizes[s] - 1)
                    from_s = (group_of[s_g] == s)
                    cand = _take(other.opt_state, local)
                    opt = jax.tree.map(
                        lambda c, o: jnp.where(from_s.reshape((-1,) + (1,) * (c.ndim - 1)), c, o), cand, opt)
                new["opt_state"] = opt
            out.append(m.replace(**new))
        return tuple(out)

    def select(state: PBTState, rets):
        """Exploit + explore after a round. ``rets [P, interval]`` the round's returns."""
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.round)
        k_sel, k_exp = jax.random.split(key)
        fitness = member_fitness(state.returns_buf, state.returns_count)
        finite = jnp.concatenate([_finite_members(m.params) for m in state.members])
        bad = ~jnp.isfinite(fitness) | ~finite
        h_before = hparams_matrix(state)
        u_before = to_unit(h_before, low, high, codes)
        idx = jnp.arange(p, dtype=jnp.int32)
        velocity, pb2 = state.velocity, state.pb2
        if config.algo == "fixed":
            src = idx
        elif config.algo == "gpbt":
            src, u_gpbt, velocity = gpbt_pl_update(k_sel, fitness, bad, u_before, state.velocity,
                                                   config.gpbt_w1, config.gpbt_w2, config.resample_prob)
        elif config.exploit == "truncation":
            src = truncation_select(k_sel, fitness, bad, config.truncation_fraction)
        elif config.exploit == "ttest":
            src = ttest_select(k_sel, state.returns_buf, state.returns_count, bad, config.ttest_alpha)
        else:
            src = tournament_select(k_sel, fitness, bad)
        replaced = src != idx

        if config.algo == "pb2":
            improvement = fitness - state.prev_fitness
            ok = ~bad & jnp.isfinite(state.prev_fitness) & (state.round > 0)
            pb2 = pb2_record(state.pb2, state.round.astype(jnp.float32), u_before, improvement, ok)

        members = copy_members(state.members, src)
        h_copied = jnp.concatenate([hp_matrix(m.hparams, names) for m in members])
        if config.algo == "fixed":
            h_new = h_copied
        elif config.algo == "gpbt":
            h_new = jnp.where(replaced[:, None], from_unit(u_gpbt, low, high, codes), h_copied)
        elif config.algo == "pb2":
            u_new = pb2_propose(k_exp, pb2, state.round.astype(jnp.float32) + 1.0, replaced,
                                to_unit(h_copied, low, high, codes), config.pb2_candidates, config.pb2_kappa)
            h_new = jnp.where(replaced[:, None], from_unit(u_new, low, high, codes), h_copied)
        else:
            if config.explore == "perturb":
                explored = perturb(k_exp, h_copied, low, high, codes, config.perturb_factors)
            else:
                explored = resample_or_perturb(k_exp, h_copied, low, high, codes, config.resample_prob,
                                               config.perturb_factors)
            h_new = jnp.where(replaced[:, None], explored, h_copied)
        members = tuple(
            m.replace(hparams=hp_with_matrix(m.hparams, names, h_new[offsets[g]:offsets[g + 1]]))
            for g, m in enumerate(members)
        )
        if config.algo != "gpbt":
            velocity = jnp.where(replaced[:, None], 0.0, velocity)
        new_state = state.replace(
            members=members,
            returns_buf=state.returns_buf[src],
            returns_count=state.returns_count[src],
            prev_fitness=jnp.where(bad[src], 0.0, fitness[src]),
            velocity=velocity,
            pb2=pb2,
            round=state.round + 1,
        )
        info = dict(
            fitness=fitness, last_return=rets[:, -1], bad=bad, src=src, replaced=replaced,
            hparams_used=h_before, hparams_next=h_new,
        )
        return new_state, info

    def step(state: PBTState):
        state, rets = train(state)
        return select(state, rets)

    return PBT(init, train, select, step, hparams_matrix, groups, spaces, tuple(base_hparams._fields))


# ---------------------------------------------------------------------------
# Agents for the driver
# ---------------------------------------------------------------------------

AGENT_KINDS = ("ppo", "td3")


def td3_available() -> bool:
    try:
        import agents.td3 as td3  # noqa: F401
    except ImportError:
        return False
    return all(hasattr(td3, n) for n in ("make_td3", "TD3Config", "TD3HParams"))


def make_member_agents(agent_kind: str, env_name: str, groups: Sequence[Group], timesteps: int,
                       space_names: Optional[Sequence[str]] = None, **overrides):
    """``(agents, spaces, base_hparams, steps_per_update, num_updates)`` for a
    PPO or TD3 population over ``groups``. PPO's lr annealing is off (PBT
    schedules the learning rate itself)."""
    import envs
    import learned_optim

    if agent_kind not in AGENT_KINDS:
        raise ValueError(f"--agent {agent_kind!r}; allowed: {', '.join(AGENT_KINDS)}")
    for g in groups:
        learned_optim.spec.check_spec(g.spec)
    env, env_params = envs.make(env_name)
    if agent_kind == "ppo":
        from meta.experiment import resolve_config
        from agents.ppo import PPOHParams, make_ppo

        cfg, hp = resolve_config(env_name, total_timesteps=int(timesteps), anneal_lr=False, **overrides)
        base = PPOHParams.default(**hp)
        base_space = PPO_SPACE
        agents = []
        for g in groups:
            agent = make_ppo(cfg, env, env_params, learned_optim.from_spec(g.spec))
            agents.append(MemberAgent(agent.init, agent.run, agent.tx.init, cfg.batch_size))
        steps_per_update, num_updates = cfg.batch_size, cfg.num_updates
    else:
        if not td3_available():
            raise ValueError("--agent td3: agents/td3.py with make_td3, TD3Config and TD3HParams is not "
                             "available in this checkout; use --agent ppo")
        agents, base, base_space, steps_per_update, num_updates = _td3_agents(env_name, env, env_params, groups,
                                                                              timesteps, **overrides)
    if space_names:
        base_space = base_space.restrict(space_names)
    spaces = []
    for g in groups:
        s = base_space
        if "lr" in s.names:
            i = s.names.index("lr")
            s = s.with_bounds("lr", *lr_bounds_for_spec(g.spec, (s.low[i], s.high[i])))
        spaces.append(s)
    return agents, tuple(spaces), base, steps_per_update, num_updates


def _td3_agents(env_name, env, env_params, groups, timesteps, **overrides):
    """TD3 members (see agents/td3.py): the env family's preset with
    ``overrides`` (``TD3Config`` fields). Target networks travel with the
    weights on exploit (``pbt_copy_fields``); the replay buffer and env state
    stay the member's own."""
    import learned_optim
    from agents import td3

    cfg, hp = td3.resolve_config(env_name, total_timesteps=int(timesteps), **overrides)
    base = td3.TD3HParams.default(**hp)
    agents = []
    for g in groups:
        agent = td3.make_td3(cfg, env, env_params, learned_optim.from_spec(g.spec))
        agents.append(MemberAgent(agent.init, agent.run, agent.init_opt, cfg.steps_per_update,
                                  ("params", "opt_state", "hparams") + tuple(agent.pbt_copy_fields)))
    return agents, base, TD3_SPACE, cfg.steps_per_update, cfg.num_updates


# ---------------------------------------------------------------------------
# Checkpoint helpers (typed PRNG keys <-> raw key data)
# ---------------------------------------------------------------------------


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_saveable(tree):
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def from_saveable(raw, template):
    return jax.tree.map(lambda r, t: jax.random.wrap_key_data(r) if _is_key(t) else jnp.asarray(r, t.dtype),
                        raw, template)


# ---------------------------------------------------------------------------
# Sharding the population over devices
# ---------------------------------------------------------------------------


def population_mesh(groups: Sequence[Group]):
    """A ``Mesh`` with a ``"pop"`` axis over all devices when every group's
    size divides over them; None on one device or when they do not divide."""
    from jax.sharding import Mesh

    n = jax.device_count()
    if n < 2 or any(g.size % n for g in groups):
        return None
    return Mesh(np.array(jax.devices()), ("pop",))


def population_shardings(state: PBTState, mesh):
    """Shardings for ``state``: every member axis split over ``"pop"`` (each
    device trains its slice of every group), PB2 data, key and round counter
    replicated. Selection gathers across devices; XLA inserts the
    collectives."""
    from jax.sharding import NamedSharding, PartitionSpec

    pop, rep = NamedSharding(mesh, PartitionSpec("pop")), NamedSharding(mesh, PartitionSpec())
    return state.replace(
        members=tuple(jax.tree.map(lambda _: pop, m) for m in state.members),
        returns_buf=pop, returns_count=pop, prev_fitness=pop, velocity=pop,
        pb2=jax.tree.map(lambda _: rep, state.pb2), key=rep, round=rep,
    )


def jit_step(program: "PBT", shardings=None):
    """``jax.jit(program.step)``; with ``shardings`` (from
    ``population_shardings``) the state keeps its placement from round to
    round, so the step compiles once."""
    if shardings is None:
        return jax.jit(program.step)
    from jax.sharding import NamedSharding, PartitionSpec

    rep = NamedSharding(shardings.key.mesh, PartitionSpec())
    return jax.jit(program.step, in_shardings=(shardings,), out_shardings=(shardings, rep))


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def _timed(fn, *args, repeats: int = 3) -> float:
    import time

    jax.block_until_ready(fn(*args))  # compile + warm up
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) / repeats


def run_pbt(
    agent_kind: str,
    env: str,
    groups,
    algo: str = "pbt",
    population: Optional[int] = None,
    interval: int = 10,
    timesteps: float = 1e5,
    seed: int = 0,
    exploit: str = "truncation",
    explore: str = "perturb",
    out: Optional[str] = None,
    resume: bool = False,
    checkpoint_every: int = 5,
    tune: Optional[Sequence[str]] = None,
    time_selection: bool = True,
    log: Optional[Callable[[str], None]] = print,
    progress: Optional[Callable[[int, int], None]] = None,
    pbt_overrides: Optional[Dict[str, Any]] = None,
    agent_overrides: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Trains a population with ``algo`` and returns a JSON-able result dict.

    ``groups``: ``"adam:6,kfac:2"`` (or a sequence of ``Group``); one jitted
    step = ``interval`` updates of every member + selection; the host loop
    logs, records per-member histories (return, hyperparameters, lineage =
    the member each one copied from, itself when it kept its weights) and
    checkpoints to ``out/checkpoints`` every ``checkpoint_every`` rounds
    (``resume=True`` continues from the latest). Everything is validated
    before anything compiles."""
    import json
    import os
    import time

    from meta import checkpoint
    from meta.report import fmt_eta, peak_memory_mb

    config = PBTConfig(algo=algo, exploit=exploit, explore=explore, interval=int(interval),
                       **(pbt_overrides or {}))
    if isinstance(groups, str):
        groups = parse_groups(groups, population)
    groups = tuple(groups)
    if population is not None and sum(g.size for g in groups) != population:
        raise ValueError(f"groups have {sum(g.size for g in groups)} members but --population is {population}")
    if not (isinstance(timesteps, (int, float)) and timesteps > 0):
        raise ValueError(f"--timesteps must be positive, got {timesteps!r}")
    if checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be >= 1, got {checkpoint_every}")
    agents, spaces, base, steps_per_update, num_updates = make_member_agents(
        agent_kind, env, groups, int(timesteps), tune, **(agent_overrides or {}))
    rounds = num_updates // config.interval
    if rounds < 1:
        raise ValueError(f"--interval {config.interval} is more than the {num_updates} updates that "
                         f"--timesteps {int(timesteps)} gives ({steps_per_update} env steps per update)")
    ckpt_dir = os.path.join(out, "checkpoints") if out else None
    if resume and (ckpt_dir is None or checkpoint.latest_step(ckpt_dir) is None):
        raise ValueError(f"--resume: no checkpoint found in {ckpt_dir!r}")
    pbt = make_pbt(config, agents, groups, spaces, base)
    p = sum(g.size for g in groups)
    names = spaces[0].names
    doc_config = dict(
        agent=agent_kind, env=env, groups=[[g.spec, g.size] for g in groups], seed=int(seed),
        timesteps=int(timesteps), tune=list(names), pbt=dataclasses.asdict(config),
        agent_overrides={k: str(v) for k, v in (agent_overrides or {}).items()},
    )
    # JSON-canonical; the budget is left out so a resumed run may train longer (PPO's
    # train_fraction, which some optimizers read, then follows the new budget).
    doc_config = json.loads(json.dumps(doc_config))
    doc_config.pop("timesteps")

    say = log or (lambda s: None)
    t0 = time.perf_counter()
    state = jax.jit(pbt.init)(jax.random.key(seed))
    mesh = population_mesh(groups)
    shardings = population_shardings(state, mesh) if mesh is not None else None
    step = jit_step(pbt, shardings)
    hist = dict(fitness=[], last_return=[], hparams=[], lineage=[], bad=[])
    start = 0
    if resume:
        template = to_saveable(state)
        start, raw, document = checkpoint.restore(ckpt_dir, template, doc_config)
        state = from_saveable(raw, state)
        hist = document["history"]
        say(f"resumed from round {start} in {ckpt_dir}")
    if shardings is not None:
        state = jax.device_put(state, shardings)
    elif jax.device_count() > 1:
        say(f"note: group sizes {[g.size for g in groups]} do not divide over {jax.device_count()} devices; "
            "running on one device")
    step = step.lower(state).compile()
    compile_s = time.perf_counter() - t0
    say(f"{algo} ({'pairwise' if algo == 'gpbt' else exploit}/{explore if algo == 'pbt' else '-'}) "
        f"{agent_kind} on {env}: {p} members {[f'{g.spec}:{g.size}' for g in groups]}, {rounds} rounds x "
        f"{config.interval} updates x {steps_per_update} env steps; tuning {', '.join(names)}; "
        f"{jax.device_count() if shardings is not None else 1} device(s); compiled in {compile_s:.1f}s")
    run_s = 0.0
    for r in range(start, rounds):
        t = time.perf_counter()
        state, info = step(state)
        info = jax.device_get(info)
        run_s += time.perf_counter() - t
        hist["fitness"].append(np.asarray(info["fitness"], np.float64).tolist())
        hist["last_return"].append(np.asarray(info["last_return"], np.float64).tolist())
        hist["hparams"].append(np.asarray(info["hparams_used"], np.float64).tolist())
        hist["lineage"].append(np.asarray(info["src"]).astype(int).tolist())
        hist["bad"].append(np.asarray(info["bad"]).astype(bool).tolist())
        fit = np.asarray(info["fitness"], np.float64)
        okf = fit[np.isfinite(fit)]
        done = r + 1 - start
        eta = run_s / done * (rounds - r - 1)
        if progress:
            progress(r + 1, rounds)
        say(f"round {r + 1:4d}/{rounds}  {(r + 1) * config.interval * steps_per_update:>10,d} steps/member  "
            f"return best {okf.max() if okf.size else float('nan'):8.2f} mean "
            f"{okf.mean() if okf.size else float('nan'):8.2f}  replaced {int(np.sum(info['replaced']))}  "
            f"bad {int(np.sum(info['bad']))}  ETA {fmt_eta(eta)}")
        if ckpt_dir and ((r + 1) % checkpoint_every == 0 or r + 1 == rounds):
            checkpoint.save(ckpt_dir, r + 1, to_saveable(state), {"config": doc_config, "history": hist})

    result = dict(
        config={**doc_config, "timesteps": int(timesteps)}, population=p, rounds=rounds, interval=config.interval,
        steps_per_update=steps_per_update,
        timesteps_per_member=rounds * config.interval * steps_per_update,
        compile_seconds=compile_s, run_seconds=run_s, memory=peak_memory_mb(),
        hparam_names=list(names), hparam_scales=list(spaces[0].scale),
    )
    if hist["fitness"]:
        final = np.asarray(hist["fitness"][-1], np.float64)
        ok = np.isfinite(final)
        result.update(
            final_return=final.tolist(),
            final_return_best=float(final[ok].max()) if ok.any() else float("nan"),
            final_return_mean=float(final[ok].mean()) if ok.any() else float("nan"),
            diverged_members=int((~ok).sum()),
        )
    result["steps"] = [(r + 1) * config.interval * steps_per_update for r in range(len(hist["fitness"]))]
    result["members"] = [
        dict(
            member=i,
            optimizer=groups[int(np.searchsorted(np.cumsum([g.size for g in groups]), i, side="right"))].spec,
            returns=[row[i] for row in hist["fitness"]],
            hparams={n: [row[i][j] for row in hist["hparams"]] for j, n in enumerate(names)},
            lineage=[row[i] for row in hist["lineage"]],
        )
        for i in range(p)
    ]
    if time_selection and rounds > start:
        # The selection alone, jitted apart, against the mean wall time of a whole round.
        select_jit = jax.jit(pbt.select)  # (placement as the state has it)
        rets = jnp.asarray(np.asarray(hist["last_return"][-1], np.float32)[:, None].repeat(config.interval, 1))
        t_select = _timed(select_jit, state, rets)
        t_round = run_s / (rounds - start)
        result["selection_seconds_per_round"] = t_select
        result["round_seconds"] = t_round
        result["selection_share"] = min(1.0, t_select / t_round)
        say(f"selection: {t_select * 1e3:.2f} ms per round vs {t_round * 1e3:.1f} ms per whole round "
            f"({100 * result['selection_share']:.2f}%)")
    return result


def plot_history(path_prefix: str, result: Dict[str, Any]) -> None:
    """``PREFIX_returns.png`` (every member's return, best and mean) and
    ``PREFIX_hparams.png`` (every member's hyperparameter schedule)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.asarray(result["steps"])
    if steps.size == 0:
        return
    rets = np.array([m["returns"] for m in result["members"]], np.float64)  # [P, R]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, row in enumerate(rets):
        ax.plot(steps, row, lw=0.8, alpha=0.5, label=None)
    with np.errstate(all="ignore"):
        ax.plot(steps, np.nanmax(np.where(np.isfinite(rets), rets, np.nan), 0), "k-", lw=2, label="best")
        ax.plot(steps, np.nanmean(np.where(np.isfinite(rets), rets, np.nan), 0), "k--", lw=2, label="mean")
    ax.set_xlabel("env steps per member")
    ax.set_ylabel("recent return")
    ax.set_title(f"{result['config']['pbt']['algo']} on {result['config']['env']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_prefix + "returns.png", dpi=120)
    plt.close(fig)

    names, scales = result["hparam_names"], result["hparam_scales"]
    cols = min(3, len(names))
    rows = int(math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for j, (n, sc) in enumerate(zip(names, scales)):
        ax = axes[j // cols][j % cols]
        for m in result["members"]:
            vals = np.asarray(m["hparams"][n])
            ax.plot(steps, 1 - vals if sc == "log1m" else vals, lw=0.9, alpha=0.7)
        ax.set_title(f"1 - {n}" if sc == "log1m" else n, fontsize=9)
        if sc in ("log", "log1m"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for j in range(len(names), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    fig.savefig(path_prefix + "hparams.png", dpi=110)
    plt.close(fig)
