import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from agents import core
from agents.a2c import A2CConfig, A2CHParams
from learned_optim.registry import make_rule
from meta.metagrad import MetaGradConfig, make_metagrad, unrolled_loss
from meta.pipeline import PipelineConfig


def test_metagrad_matches_finite_difference_on_quadratic():
    rule = make_rule("optim4rl")
    meta = rule.init_meta_params(jax.random.key(0))
    a = jnp.array([1.0, 3.0, 0.5])
    target = jnp.array([0.3, -0.2, 0.1])
    params = jnp.array([1.0, -1.0, 0.5])

    def make_tx(m):
        import optax
        return optax.chain(rule.make_optimizer(m))

    def inner_grad(p, k):
        return a * (p - target) * (1.0 + 0.1 * k)

    def outer(p):
        return 0.5 * jnp.sum(a * (p - target) ** 2)

    def f(flat):
        m = rule.unflatten(flat)
        s = make_tx(m).init(params)
        return unrolled_loss(m, params, s, make_tx, inner_grad, outer, 3)[0]

    flat = rule.flatten(meta)
    g = jax.grad(f)(flat)
    assert float(jnp.linalg.norm(g)) > 0
    d = jax.random.normal(jax.random.key(1), flat.shape)
    d = d / jnp.linalg.norm(d)
    eps = 1e-2
    fd = (f(flat + eps * d) - f(flat - eps * d)) / (2 * eps)
    np.testing.assert_allclose(float(jnp.dot(g, d)), float(fd), rtol=0.05, atol=1e-5)


def _trainer():
    env_pairs = [envs.make("Catch-bsuite")]
    cfg = MetaGradConfig(num_inner=2, meta_lr=3e-3, pipeline=PipelineConfig(num_units=2, reset_interval=8))
    return make_metagrad(cfg, make_rule("optim4rl"), env_pairs,
                         A2CConfig(num_envs=8, num_steps=10, hidden_sizes=(32,)), A2CHParams.default(gamma=0.99),
                         learning_rate=3e-3)


def test_metagrad_deterministic_and_finite():
    tr = _trainer()
    step = jax.jit(tr.step)
    outs = []
    for _ in range(2):
        s = tr.init(jax.random.key(3))
        for _ in range(3):
            s, m = step(s)
        outs.append(tr.rule.flatten(s.meta_params))
        assert bool(m["finite"])
        assert float(m["grad_norm"]) > 0
        np.testing.assert_allclose(core.learning_rate(s.pipes[0].units), 3e-3)  # every unit's optimizer holds it
    np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[1]))


@pytest.mark.slow  # a longer learning check (~50 s on 2 cores)
def test_short_optim4rl_metagrad_run_improves_catch():
    """300 meta-steps (K=4, 4 staggered units) on Catch: an A2C trained with the
    learned rule goes from near-random to clearly better final return."""
    from agents.a2c import make_a2c
    from agents.ppo import final_return

    rule = make_rule("optim4rl")
    hp, lr = A2CHParams.default(gamma=0.99), 3e-3
    acfg = A2CConfig(num_envs=8, num_steps=10, hidden_sizes=(32,))
    cfg = MetaGradConfig(num_inner=4, meta_lr=3e-3, pipeline=PipelineConfig(num_units=4, reset_interval=40))
    env, ep = envs.make("Catch-bsuite")
    tr = make_metagrad(cfg, rule, [(env, ep)], acfg, hp, lr)

    ecfg = A2CConfig(num_envs=8, num_steps=10, hidden_sizes=(32,), total_timesteps=8 * 10 * 200)

    def evaluate(meta):
        ag = make_a2c(ecfg, env, ep, rule.make_optimizer(meta))
        _, m = jax.jit(jax.vmap(ag.train, (0, None, None)))(jax.random.split(jax.random.key(9), 4), hp, lr)
        return float(final_return(m, 0.2).mean())

    s = tr.init(jax.random.key(0))
    before = evaluate(s.meta_params)
    step = jax.jit(tr.step)
    for _ in range(300):
        s, m = step(s)
    after = evaluate(s.meta_params)
    assert before < -0.2, before
    assert after > before + 0.3, (before, after)
