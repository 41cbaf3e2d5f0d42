"""GPBT-PL: pairwise learning of hyperparameters (Bai & Cheng 2024).

Members are paired at random; in each pair the slower learner copies the
faster one's weights and moves its hyperparameters toward the faster one's
with a particle-swarm-like velocity, in unit coordinates (``space``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from meta.pbt.exploit import fix_bad


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
    fixed = fix_bad(k_fix, src, bad)
    reassigned = fixed != src
    u_out = jnp.where(reassigned[:, None], u[fixed], u_out)
    v_out = jnp.where(reassigned[:, None], 0.0, v_out)
    return fixed, u_out, v_out
