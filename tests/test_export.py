"""The programs users run on accelerators, exported for CUDA and TPU without
one (``jax.export``): they lower, carry no CPU-only custom call, and the
population's linear algebra stays batched there (the CPU workaround
``runtime.platform.one_matrix_at_a_time`` is the CPU branch only)."""

import re

import jax
import jax.numpy as jnp
import pytest

import envs
import learned_optim
from agents.ppo import PPOConfig, PPOHParams, make_ppo

MEMBERS = 4
LINALG = re.compile(r"syevd|geqrf|orgqr|potrf|Eigh|Qr|Cholesky|lapack", re.I)


def _custom_calls(text):
    out = []
    for line in text.splitlines():
        m = re.search(r'call_target_name = "(\w+)"', line) or re.search(r"stablehlo\.custom_call @(\w+)", line)
        if m:
            out.append((m.group(1), line))
    return out


def _ppo_update_export(spec, platform):
    env, params = envs.make("CartPole-v1")
    cfg = PPOConfig(num_envs=4, num_steps=16, total_timesteps=4 * 16 * 4, update_epochs=1, num_minibatches=2,
                    hidden_sizes=(16, 16))
    agent = make_ppo(cfg, env, params, learned_optim.from_spec(spec))
    keys = jax.random.split(jax.random.key(0), MEMBERS)
    hp = jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.float32), (MEMBERS,)), PPOHParams.default())
    state = jax.eval_shape(jax.vmap(agent.init), keys, hp)
    exported = jax.export.export(jax.jit(jax.vmap(agent.update)), platforms=[platform])(state)
    return exported.mlir_module()


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("spec", ["adam", "open", "kfac", "diag_ggn", "optim4rl"])
def test_vmapped_ppo_update_exports_for_accelerators(spec, platform):
    text = _ppo_update_export(spec, platform)
    calls = _custom_calls(text)
    cpu_only = [name for name, _ in calls if name.startswith("lapack_") or "cpu" in name.lower()]
    assert not cpu_only, cpu_only
    linalg = [line for name, line in calls if LINALG.search(name)]
    if spec == "kfac":
        assert linalg, "K-FAC's eigendecompositions are missing from the exported program"
    for line in linalg:  # every factorisation runs on the whole population at once
        operand = re.search(r":\s*\(tensor<([0-9x]+)x[a-z0-9]+>", line)
        assert operand and operand.group(1).split("x")[0] == str(MEMBERS), line[-200:]
    print(spec, platform, sorted({n for n, _ in calls}), f"{len(linalg)} batched linear-algebra calls")


def test_cpu_export_keeps_the_one_matrix_at_a_time_workaround():
    """On CPU (jaxlib 0.10's blocking batched LAPACK) the same program maps
    over members: the factorisations see one matrix each."""
    text = _ppo_update_export("kfac", "cpu")
    linalg = [line for name, line in _custom_calls(text) if LINALG.search(name)]
    assert linalg and "stablehlo.while" in text
    for line in linalg:
        operand = re.search(r":\s*\(tensor<([0-9x]+)x[a-z0-9]+>", line)
        assert operand and operand.group(1).split("x")[0] != str(MEMBERS), line[-200:]
