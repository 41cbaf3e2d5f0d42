import jax.numpy as jnp
import numpy as np

from agents import losses


def test_gae_matches_hand_computation():
    # T=3, B=1; episode ends after step 1 (index 1).
    r = jnp.array([[1.0], [2.0], [3.0]])
    v = jnp.array([[0.5], [1.0], [1.5]])
    d = jnp.array([[False], [True], [False]])
    last = jnp.array([2.0])
    g, lam = 0.9, 0.8
    adv, tgt = losses.gae(r, v, d, last, g, lam)
    d2 = 3.0 + g * 2.0 - 1.5
    d1 = 2.0 - 1.0  # no bootstrap after a terminal step
    d0 = 1.0 + g * 1.0 - 0.5
    a2 = d2
    a1 = d1  # the trace is cut at the episode end
    a0 = d0 + g * lam * a1
    np.testing.assert_allclose(adv[:, 0], [a0, a1, a2], rtol=1e-6)
    np.testing.assert_allclose(tgt[:, 0], np.array([a0, a1, a2]) + np.array([0.5, 1.0, 1.5]), rtol=1e-6)


def test_ppo_loss_hand_values():
    logp = jnp.log(jnp.array([0.5, 0.2]))
    old = jnp.log(jnp.array([0.25, 0.4]))  # ratios 2.0 and 0.5
    adv = jnp.array([1.0, -1.0])
    value, old_value, targets = jnp.array([1.0, 0.0]), jnp.array([0.0, 0.0]), jnp.array([2.0, 1.0])
    ent = jnp.array([0.3, 0.5])
    total, aux = losses.ppo_loss(logp, old, adv, value, old_value, targets, ent, 0.2, 0.5, 0.01,
                                 normalize_advantages=False, clip_value=True)
    # sample 0: min(2*1, 1.2*1)=1.2 ; sample 1: min(0.5*-1, 0.8*-1) = -0.8
    np.testing.assert_allclose(aux["policy_loss"], -(1.2 - 0.8) / 2, rtol=1e-6)
    # value: sample 0: unclipped (1-2)^2=1, clipped 0.2 -> (0.2-2)^2=3.24 -> 3.24; sample 1: (0-1)^2=1 both
    np.testing.assert_allclose(aux["value_loss"], 0.5 * (3.24 + 1.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(aux["entropy"], 0.4, rtol=1e-6)
    np.testing.assert_allclose(total, aux["policy_loss"] + 0.5 * aux["value_loss"] - 0.01 * 0.4, rtol=1e-6)
    np.testing.assert_allclose(aux["clip_fraction"], 1.0)
