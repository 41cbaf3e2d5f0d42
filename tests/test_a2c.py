import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
import learned_optim
from agents import core
from agents.a2c import A2CConfig, A2CHParams, make_a2c
from agents.ppo import final_return


def test_bad_config_raises():
    with pytest.raises(ValueError, match="num_steps"):
        A2CConfig(num_steps=0)
    with pytest.raises(ValueError, match="lr_typo"):
        A2CHParams.default(lr_typo=1.0)


def test_a2c_learns_catch_and_vmaps():
    env, env_params = envs.make("Catch-bsuite")
    cfg = A2CConfig(num_envs=16, num_steps=20, total_timesteps=16 * 20 * 150)
    agent = make_a2c(cfg, env, env_params, learned_optim.from_spec("adam"))
    hp = A2CHParams.default(gamma=0.99)
    keys = jax.random.split(jax.random.key(0), 2)
    hps = jax.tree.map(lambda x: jnp.stack([x, x]), hp)
    state, metrics = jax.jit(jax.vmap(agent.train))(keys, hps, jnp.array([3e-3, 3e-3]))
    assert metrics["episode_return"].shape == (2, cfg.num_updates)
    np.testing.assert_allclose(core.learning_rate(state), 3e-3)  # the optimizer state holds it
    early = np.asarray(metrics["episode_return"][:, 5:15]).mean()
    final = final_return(metrics, 0.1)
    # random policy on Catch: about -0.6; learned: close to +1.
    assert early < 0.0
    assert np.all(final > 0.5), final
    assert bool(jnp.all(metrics["finite"]))
