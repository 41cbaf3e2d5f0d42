"""Optim4RL: the update formula with fixed GRU outputs, gradient clipping,
recurrent state, size and the injected learning rate."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import learned_optim
from learned_optim.optim4rl import Optim4RLRule


def fixed_output_meta(rule, b_m, b_v):
    """Meta-params whose Dense heads ignore the GRU: o_m = b_m, o_v = b_v."""
    mp = rule.init_meta_params(jax.random.key(0))
    zero_head = lambda b: {"params": {"kernel": jnp.zeros((rule.hidden_size, 1)), "bias": jnp.array([b])}}  # noqa: E731
    return {**mp, "m_out": zero_head(b_m), "v_out": zero_head(b_v)}


def test_formula_with_fixed_gru_outputs():
    rule = Optim4RLRule(learning_rate=0.01)
    b_m, b_v = 0.3, -1.2
    tx = rule.make_optimizer(fixed_output_meta(rule, b_m, b_v))
    g = {"w": jnp.array([[0.5, -3.0], [0.0, 1e-4]])}
    u, _ = jax.jit(tx.update)(g, tx.init(g))
    mag = 0.01 * math.exp(0.3) / math.sqrt(math.exp(-1.2) + 1e-8)   # lr * exp(o_m) / sqrt(exp(o_v) + 1e-8)
    np.testing.assert_allclose(u["w"], [[-mag, mag], [0.0, -mag]], rtol=1e-6)


def test_gru_sees_clipped_gradient_and_its_square():
    rule = Optim4RLRule(learning_rate=1.0)
    mp = rule.init_meta_params(jax.random.key(3))
    tx = rule.make_optimizer(mp)
    big = {"w": jnp.array([2.0, -7.0, 0.5])}
    clipped = {"w": jnp.array([1.0, -1.0, 0.5])}
    u_big, s_big = tx.update(big, tx.init(big))
    u_clip, _ = tx.update(clipped, tx.init(clipped))
    np.testing.assert_allclose(u_big["w"], u_clip["w"], rtol=1e-6)
    # against flax directly: m-branch on g, v-branch on g**2, zero initial state,
    # then a second step from the carried GRU states
    gru, head = nn.GRUCell(features=8), nn.Dense(1)
    cm, cv = jnp.zeros((3, 8)), jnp.zeros((3, 8))
    second = {"w": jnp.array([-0.25, 0.75, 3.0])}
    u2, _ = tx.update(second, s_big)
    for step, g in enumerate((clipped["w"], jnp.clip(second["w"], -1, 1))):
        x = g[:, None]
        cm, hm = gru.apply(mp["m_gru"], cm, x)
        cv, hv = gru.apply(mp["v_gru"], cv, x ** 2)
        m = jnp.sign(x) * jnp.exp(head.apply(mp["m_out"], hm))
        v = jnp.exp(head.apply(mp["v_out"], hv))
        got = (u_big, u2)[step]["w"]
        np.testing.assert_allclose(got, -(m / jnp.sqrt(v + 1e-8))[:, 0], rtol=1e-5)


def test_recurrent_state_and_size():
    rule = Optim4RLRule()
    assert rule.num_meta_params == 514
    tx = rule.make_optimizer(rule.init_meta_params(jax.random.key(1)))
    g = {"a": jnp.ones((2, 3)) * 0.3, "b": jnp.full((4,), -0.2)}
    s0 = tx.init(g)
    inner = s0[0]
    assert inner.carry_m.shape == (8, 10) and inner.carry_v.shape == (8, 10)  # flat [H, N]
    u1, s1 = tx.update(g, s0)
    u2, _ = tx.update(g, s1)
    assert float(jnp.abs(s1[0].carry_m[:, :6]).max()) > 0
    with pytest.raises(ValueError, match="tx.init"):
        tx.update(g, tx.init({"a": g["a"]}))
    assert not np.allclose(u1["a"], u2["a"])  # same gradient, different hidden state


def test_learning_rate_is_injected_and_scales_linearly():
    tx = learned_optim.from_spec("optim4rl:lr=2e-3,seed=4")
    g = {"w": jnp.linspace(-1.0, 1.0, 5)}
    s = tx.init(g)
    assert float(learned_optim.get_hyperparam(s, "learning_rate")) == pytest.approx(2e-3)
    u, _ = tx.update(g, s)
    u10, _ = tx.update(g, learned_optim.set_hyperparam(s, "learning_rate", 2e-2))
    np.testing.assert_allclose(u10["w"], 10 * u["w"], rtol=1e-5)
    assert float(jnp.abs(u["w"]).max()) > 0


def test_spec_errors():
    with pytest.raises(ValueError, match="allowed"):
        learned_optim.from_spec("optim4rl:momentum=0.9")
    with pytest.raises(ValueError, match="grad_clip"):
        learned_optim.from_spec("optim4rl:grad_clip=0")
    with pytest.raises(ValueError, match="hidden_size"):
        Optim4RLRule(hidden_size=0)
