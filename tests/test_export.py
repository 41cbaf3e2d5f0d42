"""The programs users run on accelerators, exported for CUDA and TPU without
one (``jax.export``): they lower, carry no CPU-only custom call, and the
population's linear algebra stays batched there (the CPU workaround
``runtime.platform.one_matrix_at_a_time`` is the CPU branch only).

Programs: the vmapped PPO update with every optimizer kind; one ES generation
over whole lifetimes (``meta.es``, a population larger than the CPU's member
batch), one over pipeline units (``meta.pipeline_es``); a PBT round and a PB2
round (``meta.pbt.program``) with an Adam and a K-FAC group; a meta-gradient
step (``meta.metagrad``). Each test prints what it checked."""

import functools
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


# Outer-loop programs ---------------------------------------------------------------------------

ES_POPULATION = 16  # more than meta.es.CPU_MEMBER_BATCH: on CPU candidates run 8 at a time, elsewhere all at once
KFAC_MEMBERS = 3  # the K-FAC group of the PBT rounds (beside 2 Adam members)
UNITS = 3  # pipeline units (pipeline ES, metagrad)


def _a2c():
    from agents.a2c import A2CConfig, A2CHParams

    return A2CConfig(num_envs=4, num_steps=8, hidden_sizes=(16,), total_timesteps=4 * 8 * 16), A2CHParams.default()


@functools.lru_cache(maxsize=None)
def _program(name):
    """``(jitted step, abstract state, names of the per-member linear-algebra
    calls, their batch size)`` of one outer-loop program, tiny."""
    from learned_optim import registry
    from meta.distributed import jit_placed
    from meta.es import ESConfig, make_es

    if name == "es":
        es = make_es(ESConfig(envs=("CartPole-v1",), population=ES_POPULATION, seeds=1, timesteps=512),
                     registry.make_rule("open"))
        return jit_placed(es.step, es.state_sharding), jax.eval_shape(es.init, jax.random.key(0)), "qr", \
            ES_POPULATION
    if name == "es-pipeline":
        from meta.pipeline import PipelineConfig
        from meta.pipeline_es import PipelineESConfig, unit_evaluation

        cfg, rule = ESConfig(envs=("CartPole-v1",), population=4), registry.make_rule("optim4rl")
        a2c, hp = _a2c()
        pc = PipelineESConfig(PipelineConfig(num_units=UNITS, reset_interval=4), window=2)
        es = make_es(cfg, rule, unit_evaluation(cfg, rule, pc, a2c, hp, None, 3e-3))
        return jit_placed(es.step, es.state_sharding), jax.eval_shape(es.init, jax.random.key(0)), "qr", UNITS
    if name in ("pbt", "pb2"):
        from meta import pbt

        groups = pbt.parse_groups(f"adam:2,kfac:{KFAC_MEMBERS}", 2 + KFAC_MEMBERS)
        agents, spaces, base, _, _ = pbt.make_member_agents(
            "ppo", "CartPole-v1", groups, 4 * 16 * 8, None, num_envs=4, num_steps=16, num_minibatches=2,
            update_epochs=1, hidden_sizes=(16, 16))
        program = pbt.make_pbt(pbt.PBTConfig(algo=name, interval=2, pb2_history=16, pb2_candidates=8), agents,
                               groups, spaces, base)
        # PB2's GP (one Cholesky of its data rows) is not per member; K-FAC's eigh is.
        return jax.jit(program.step), jax.eval_shape(program.init, jax.random.key(0)), "eigh", KFAC_MEMBERS
    if name == "metagrad":
        import envs as env_registry
        from meta.metagrad import MetaGradConfig, make_metagrad
        from meta.pipeline import PipelineConfig

        a2c, hp = _a2c()
        trainer = make_metagrad(MetaGradConfig(num_inner=2, pipeline=PipelineConfig(num_units=UNITS, reset_interval=4)),
                                registry.make_rule("optim4rl"), [env_registry.make("CartPole-v1")], a2c, hp, 3e-3)
        return jax.jit(trainer.step), jax.eval_shape(trainer.init, jax.random.key(0)), "qr", UNITS
    raise KeyError(name)


PER_MEMBER = {"qr": re.compile(r"geqrf|orgqr|^Qr$|Householder", re.I), "eigh": re.compile(r"syevd|^Eigh$", re.I)}


def _leading(line):
    operand = re.search(r":\s*\(tensor<([0-9x]+)x[a-z0-9]+>", line)
    return operand.group(1).split("x") if operand else []


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("program", ["es", "es-pipeline", "pbt", "pb2", "metagrad"])
def test_outer_loop_programs_export_for_accelerators(program, platform):
    """One step of every outer loop lowers for ``platform``, holds no
    CPU-only custom call, and every per-member factorisation (the agents'
    orthogonal-init QR, K-FAC's eigh) runs on the whole population, units or
    group at once: a batched call, not one matrix inside a ``lax.map``."""
    step, state, kind, batch = _program(program)
    text = jax.export.export(step, platforms=[platform])(state).mlir_module()
    calls = _custom_calls(text)
    cpu_only = [name for name, _ in calls if name.startswith("lapack_") or "cpu" in name.lower()]
    assert not cpu_only, cpu_only
    per_member = [line for name, line in calls if PER_MEMBER[kind].search(name)]
    assert per_member, f"no {kind} call in the exported {program} step"
    for line in per_member:
        assert _leading(line)[:1] == [str(batch)], line[-200:]
    others = sorted({f"{n}[{'x'.join(_leading(l))}]" for n, l in calls if LINALG.search(n)
                     and not PER_MEMBER[kind].search(n)})
    print(f"{program} {platform}: lowers; no CPU-only call; {len(per_member)} {kind} calls batched over {batch}"
          + (f"; other linear algebra (not per member): {', '.join(others)}" if others else "")
          + f"; custom calls {sorted({n for n, _ in calls})}")


def test_cpu_export_of_an_es_generation_runs_candidates_in_turn():
    """The same ES generation lowered for CPU: candidates 8 at a time
    (``lax.map``) and one matrix per LAPACK call (the CPU workarounds)."""
    step, state, _, _ = _program("es")
    text = jax.export.export(step, platforms=["cpu"])(state).mlir_module()
    qr = [line for name, line in _custom_calls(text) if PER_MEMBER["qr"].search(name)]
    assert qr and all(len(_leading(line)) == 2 for line in qr), qr[:1]
