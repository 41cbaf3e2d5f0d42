"""Explore: new hyperparameters for the members that copied another one.

``h [P, H]`` natural values, clipped to ``[low, high]``; see ``space`` for
the scales (``codes``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from meta.pbt.space import from_unit


def perturb(key, h, low, high, codes, factors=(0.8, 1.2)):
    """Multiplies each value (``1 - x`` for log1m scales) by a random factor of
    ``factors``, clipped to ``[low, high]``. ``h [P, H]``."""
    f = jnp.asarray(factors, jnp.float32)[jax.random.randint(key, h.shape, 0, len(factors))]
    new = jnp.where(codes == 2, 1.0 - (1.0 - h) * f, h * f)
    return jnp.clip(new, low, high)


def resample(key, h, low, high, codes):
    """Every value redrawn from the prior (uniform in unit coordinates): the
    paper's "resample" explore (Jaderberg et al. 2017, sec. 4)."""
    return from_unit(jax.random.uniform(key, h.shape), low, high, codes)


def resample_or_perturb(key, h, low, high, codes, prob: float = 0.25, factors=(0.8, 1.2)):
    """Ray Tune's explore (``pbt.py`` ``_explore``): each value is redrawn from
    the prior with probability ``prob``, else perturbed."""
    k_coin, k_prior, k_pert = jax.random.split(key, 3)
    coin = jax.random.uniform(k_coin, h.shape) < prob
    return jnp.where(coin, resample(k_prior, h, low, high, codes), perturb(k_pert, h, low, high, codes, factors))
