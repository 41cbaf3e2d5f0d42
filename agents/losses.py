"""Advantage estimation and the PPO loss, as pure functions on ``[T, B]`` arrays."""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp


def gae(
    rewards: jax.Array,
    values: jax.Array,
    dones: jax.Array,
    last_value: jax.Array,
    gamma: jax.Array,
    lam: jax.Array,
) -> Tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation.

    rewards, values, dones: ``[T, B]``; ``dones[t]`` is True when the episode
    ended at step t (no bootstrap from ``values[t+1]``). Truncation is handled
    by the caller by folding ``gamma * V(final_obs)`` into ``rewards[t]``.
    last_value: ``[B]`` value of the observation after the last step.
    Returns ``(advantages [T, B], targets [T, B])`` with targets = adv + values.
    """
    not_done = 1.0 - dones.astype(values.dtype)
    next_values = jnp.concatenate([values[1:], last_value[None]], axis=0)
    deltas = rewards + gamma * next_values * not_done - values

    def step(carry, xs):
        delta, nd = xs
        adv = delta + gamma * lam * nd * carry
        return adv, adv

    _, adv = jax.lax.scan(step, jnp.zeros_like(last_value), (deltas, not_done), reverse=True)
    return adv, adv + values


def ppo_loss(
    log_prob: jax.Array,
    old_log_prob: jax.Array,
    advantages: jax.Array,
    value: jax.Array,
    old_value: jax.Array,
    targets: jax.Array,
    entropy: jax.Array,
    clip_eps: jax.Array,
    vf_coef: jax.Array,
    ent_coef: jax.Array,
    normalize_advantages: bool = True,
    clip_value: bool = True,
):
    """Clipped-surrogate PPO loss on a minibatch (all arrays ``[N]``).

    Returns ``(total, aux)`` with aux = dict(policy_loss, value_loss, entropy,
    approx_kl, clip_fraction).
    """
    if normalize_advantages:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    log_ratio = log_prob - old_log_prob
    ratio = jnp.exp(log_ratio)
    surrogate = jnp.minimum(
        ratio * advantages, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    )
    policy_loss = -surrogate.mean()
    if clip_value:
        clipped = old_value + jnp.clip(value - old_value, -clip_eps, clip_eps)
        value_loss = 0.5 * jnp.maximum((value - targets) ** 2, (clipped - targets) ** 2).mean()
    else:
        value_loss = 0.5 * ((value - targets) ** 2).mean()
    ent = entropy.mean()
    total = policy_loss + vf_coef * value_loss - ent_coef * ent
    aux = {
        "policy_loss": policy_loss,
        "value_loss": value_loss,
        "entropy": ent,
        "approx_kl": ((ratio - 1.0) - log_ratio).mean(),
        "clip_fraction": (jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32).mean(),
    }
    return total, aux
