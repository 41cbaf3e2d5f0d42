"""K-FAC inside the vmapped PPO agent (statistics supplied by the agent).

Also the regression test for a hang: on a 2-core CPU, several batched
(vmapped) LAPACK eigendecompositions running at once inside a ``lax.cond``
branch blocked every thread of XLA's pool and PPO + K-FAC over 2 seeds hung
forever (hidden width 64 was enough). ``learned_optim.kfac`` chains its
eigendecompositions; this runs the case in a subprocess under a timeout.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from tests.conftest import ROOT

SCRIPT = textwrap.dedent(
    """
    import json
    import envs, jax, jax.numpy as jnp, numpy as np
    import learned_optim
    from learned_optim.curvature import CurvatureHealth
    from agents.ppo import PPOConfig, PPOHParams, make_ppo

    env, p = envs.make("CartPole-v1")
    cfg = PPOConfig(num_envs=4, num_steps=32, total_timesteps=4 * 32 * 4, update_epochs=2,
                    num_minibatches=2, hidden_sizes=(64, 64))
    agent = make_ppo(cfg, env, p, learned_optim.from_spec("kfac:lr=0.01,period=1"))
    hp = jax.tree.map(lambda x: jnp.broadcast_to(x, (2,)), PPOHParams.default())
    keys = jax.random.split(jax.random.key(0), 2)
    lrs = jnp.full((2,), 0.05)
    init = jax.jit(jax.vmap(agent.init))(keys, hp, lrs)
    state, m = jax.jit(jax.vmap(agent.train))(keys, hp, lrs)
    health = [x for x in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, CurvatureHealth))
              if isinstance(x, CurvatureHealth)]
    kernel = lambda s: s.params["actor"]["Dense_0"]["kernel"]
    moved = float(jnp.abs(kernel(state) - kernel(init)).max())
    print(json.dumps(dict(
        stats=sorted(agent.stats_needed), finite=bool(np.all(m["finite"])), moved=moved,
        health=[[int(v) for v in np.ravel(f)] for h in health for f in h],
        lr=np.asarray(learned_optim.get_hyperparam(state.opt_state, "learning_rate")).tolist(),
    )))
    """
)


def test_kfac_in_vmapped_ppo_runs_finite_without_hanging():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=240,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["stats"] == ["inputs", "preact_grads"]
    assert out["finite"] and out["moved"] > 1e-4
    assert out["health"] and all(v == 0 for counters in out["health"] for v in counters), out["health"]
    assert np.allclose(out["lr"], [0.05, 0.05])  # train's learning_rate, written over the spec's 0.01
