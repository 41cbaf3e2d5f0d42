"""GPBT-PL: pairwise learning of hyperparameters (Bai & Cheng 2024).

Reference: EMI-Group/gpbt-pl, ``gpbt_pl.py`` at d9f93e14 (a Ray Tune
scheduler). After a round, slow members copy a fast member's weights and
*learn* their hyperparameters from it with a particle-swarm-like velocity,
in natural values (``_explore``, the "learning" branch):

    v' = w1 r1 v_slow + w2 r2 (h_fast - h_slow),  h' = clip(h_slow + v', low, high)

Pairing (``pairing``):

* ``"quantile"`` (default, the official code's ``_checkpoint_or_exploit`` /
  ``_quantiles``): members ranked by fitness; each of the bottom ``q`` picks a
  uniformly random member of the top ``q`` as its fast partner, ``q =
  ceil(fraction * n)`` capped at ``floor(n / 2)`` (fraction 0.25); the rest
  keep their weights and hyperparameters.
* ``"random"`` (the paper's text): members paired at random; in each pair the
  slower copies the faster.

With probability ``resample_prob`` per value the slow member's value is
instead redrawn from the prior, and its velocity is then the fast member's
(the official code deep-copies the fast config, velocities included, and
only the learning branch overwrites it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from meta.pbt.exploit import _all, fix_bad
from meta.pbt.space import from_unit, to_unit

PAIRINGS = ("quantile", "random")


def gpbt_pairs(key, p: int):
    """Random pairing: ``(a, b)`` index arrays of length ``P // 2`` (an odd
    member out sits this round out)."""
    perm = jax.random.permutation(key, p)
    half = p // 2
    return perm[0:2 * half:2], perm[1:2 * half:2]


def _quantile_sources(key, fitness, bad, eligible, fraction):
    """``src [P]``: each of the bottom ``q`` eligible members a random member of
    the top ``q`` (Ray's quantile size over the eligible ones), else itself."""
    p = fitness.shape[0]
    ranked = eligible | bad
    n = jnp.sum(ranked).astype(jnp.int32)
    q = jnp.where(n >= 2, jnp.clip(jnp.ceil(fraction * n).astype(jnp.int32), 1, n // 2), 0)
    k_tie, k_pick = jax.random.split(key)
    f = jnp.where(bad, -jnp.inf, fitness)
    order = jnp.lexsort((jax.random.uniform(k_tie, (p,)), f, ranked))
    rank = jnp.zeros((p,), jnp.int32).at[order].set(jnp.arange(p, dtype=jnp.int32)) - (p - n)
    bottom = ranked & (rank < q)
    top = ranked & (rank >= n - q) & ~bad
    pick = jax.random.categorical(k_pick, jnp.broadcast_to(jnp.where(top, 0.0, -jnp.inf), (p, p)), axis=-1)
    return jnp.where(bottom & jnp.any(top), pick, jnp.arange(p)).astype(jnp.int32)


def _random_pair_sources(key, fitness, bad, eligible):
    p = fitness.shape[0]
    a, b = gpbt_pairs(key, p)
    f = jnp.where(bad, -jnp.inf, fitness)
    both = (eligible[a] | bad[a]) & (eligible[b] | bad[b])
    a_fast = f[a] >= f[b]
    fast = jnp.where(a_fast, a, b)
    slow = jnp.where(a_fast, b, a)
    ok = both & ~bad[fast]
    return jnp.arange(p, dtype=jnp.int32).at[slow].set(jnp.where(ok, fast, slow).astype(jnp.int32))


def gpbt_pl_update(key, fitness, bad, h, velocity, low, high, codes, w1: float = 1.0, w2: float = 1.0,
                   resample_prob: float = 0.25, pairing: str = "quantile", fraction: float = 0.25,
                   eligible=None):
    """One GPBT-PL round on natural hyperparameters ``h [P, H]`` (bounds
    ``low``/``high`` ``[P, H]``, scales ``codes [H]``) and velocities
    ``velocity [P, H]`` (natural units).

    Keys: ``split(key, 5)`` = pairing, r1, r2, bad-member fix, resample.
    ``r1, r2 ~ U(0, 1)`` per member and value. A fast member in another group
    with other bounds (mixed populations) is seen at its unit position within
    the slow member's bounds, and its velocity scaled by the ratio of the
    ranges. Bad members not given a source by the pairing get a random good
    one (``fix_bad``): its hyperparameters, velocity 0.

    Returns ``(src [P], h_new [P, H], velocity_new [P, H])``.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"GPBT-PL pairing {pairing!r}; allowed: {', '.join(PAIRINGS)}")
    p, nh = h.shape
    eligible = _all(p, eligible)
    k_pair, k_r1, k_r2, k_fix, k_res = jax.random.split(key, 5)
    if pairing == "quantile":
        src = _quantile_sources(k_pair, fitness, bad, eligible, fraction)
    else:
        src = _random_pair_sources(k_pair, fitness, bad, eligible)
    slow = src != jnp.arange(p)
    same = jnp.all((low[src] == low) & (high[src] == high), -1, keepdims=True)
    h_fast = jnp.where(same, h[src], from_unit(to_unit(h[src], low[src], high[src], codes), low, high, codes))
    v_fast = jnp.where(same, velocity[src], velocity[src] * (high - low) / (high[src] - low[src]))
    r1 = jax.random.uniform(k_r1, (p, nh))
    r2 = jax.random.uniform(k_r2, (p, nh))
    v_learn = w1 * r1 * velocity + w2 * r2 * (h_fast - h)
    h_learn = jnp.clip(h + v_learn, low, high)
    k_coin, k_prior = jax.random.split(k_res)
    coin = jax.random.uniform(k_coin, (p, nh)) < resample_prob
    h_slow = jnp.where(coin, from_unit(jax.random.uniform(k_prior, (p, nh)), low, high, codes), h_learn)
    v_slow = jnp.where(coin, v_fast, v_learn)
    h_out = jnp.where(slow[:, None], h_slow, h)
    v_out = jnp.where(slow[:, None], v_slow, velocity)
    fixed = fix_bad(k_fix, src, bad)
    reassigned = fixed != src
    same_f = jnp.all((low[fixed] == low) & (high[fixed] == high), -1, keepdims=True)
    h_fixed = jnp.where(same_f, h[fixed],
                        from_unit(to_unit(h[fixed], low[fixed], high[fixed], codes), low, high, codes))
    h_out = jnp.where(reassigned[:, None], h_fixed, h_out)
    v_out = jnp.where(reassigned[:, None], 0.0, v_out)
    return fixed, h_out, v_out
