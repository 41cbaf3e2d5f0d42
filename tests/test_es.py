"""ES meta-training on a toy rule whose best meta-parameter is known:
the log learning rate of Adam, started far too small."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from meta import checkpoint
from meta.distributed import jit_placed
from meta.es import WORST_FITNESS, ESConfig, make_es, make_evaluator
from tests.conftest import ROOT


class LogLRRule:
    """meta_params = {"log_lr"}: Adam with learning rate exp(log_lr)."""

    def __init__(self, start=1e-5):
        self.start = start

    def init_meta_params(self, key):
        return {"log_lr": jnp.float32(np.log(self.start))}

    def make_optimizer(self, meta_params):
        return optax.with_extra_args_support(optax.adam(jnp.exp(meta_params["log_lr"])))


TOY = ESConfig(envs=("CartPole-v1",), population=4, generations=3, sigma=1.0, lr=0.5, seeds=2, timesteps=4096)


def start(es):
    """The run state as the CLI starts it, placed for ``jit_placed(es.step, ...)``."""
    return jax.device_put(es.init(jax.random.key(es.config.seed)), es.state_sharding)


def test_bad_configs_raise_before_compiling():
    with pytest.raises(ValueError, match="odd; antithetic"):
        ESConfig(population=5)
    with pytest.raises(ValueError, match="unknown ES algorithm"):
        ESConfig(algorithm="Nope_ES")
    with pytest.raises(ValueError, match="unknown env"):
        ESConfig(envs=("CartPol",))
    with pytest.raises(ValueError, match="reference_returns has 2 values for 1 envs"):
        ESConfig(reference_returns=(1.0, 2.0))


def test_nan_candidates_get_worst_fitness():
    es = make_es(TOY, LogLRRule(), reference_returns=[100.0])
    returns = jnp.array([[[10.0, 20.0]], [[jnp.nan, 5.0]], [[jnp.inf, 1.0]], [[50.0, 50.0]]])
    fitness, per_env, nans = es.fitness_from_returns(returns)
    np.testing.assert_allclose(fitness, [0.15, WORST_FITNESS, WORST_FITNESS, 0.5])
    assert int(nans) == 2


def test_member_batches_give_the_same_generation():
    """Training candidates two at a time (lax.map over vmapped pairs, as on
    CPU by default) gives the generation that one vmap over all gives."""
    import dataclasses

    outs = []
    for batch in (2, 4):
        es = make_es(dataclasses.replace(TOY, member_batch=batch), LogLRRule(), reference_returns=[100.0])
        _, m = jit_placed(es.step, es.state_sharding)(start(es))
        outs.append(np.asarray(m["fitness"]))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5)
    assert np.ptp(outs[0]) > 0  # candidates differ, so a mix-up would show
    with pytest.raises(ValueError, match="member_batch"):
        dataclasses.replace(TOY, member_batch=0)


def test_es_raises_fitness_on_toy_problem():
    cfg = ESConfig(envs=("CartPole-v1",), population=4, sigma=1.0, lr=1.0, seeds=2, timesteps=8192)
    es = make_es(cfg, LogLRRule(start=3e-5), reference_returns=[100.0])
    step = jit_placed(es.step, es.state_sharding)
    run = start(es)
    evaluate = jax.jit(make_evaluator(cfg, LogLRRule(start=3e-5)))
    key = jax.random.key(123)
    mean0 = es.mean_meta_params(run)
    ret0 = float(evaluate(mean0, key).mean())
    for _ in range(5):
        run, m = step(run)
    assert step._cache_size() == 1, "generation step recompiled"
    mean1 = es.mean_meta_params(run)
    ret1 = float(evaluate(mean1, key).mean())
    assert float(mean1["log_lr"]) > float(mean0["log_lr"]) + 2.0, (mean0, mean1)
    assert ret1 > 1.5 * ret0, (ret0, ret1)  # random play ~22; a useful lr learns within 8k steps


def test_resume_is_bit_for_bit(tmp_path):
    es = make_es(TOY, LogLRRule(), reference_returns=[100.0])
    step = jit_placed(es.step, es.state_sharding)
    run = start(es)
    full = []
    for _ in range(3):
        run, m = step(run)
        full.append(np.asarray(m["fitness"]))
    run2 = start(es)
    part = []
    run2, m = step(run2)
    part.append(np.asarray(m["fitness"]))
    cfg_doc = {"toy": 1}
    checkpoint.save(str(tmp_path), 1, run2, {"config": cfg_doc, "logs": []})
    # Restored into a fresh template; the same jitted step, so its compiled
    # program is reused (a fresh process: tests/test_meta_train_script.py, marked slow).
    done, run3, doc = checkpoint.restore(str(tmp_path), start(es), cfg_doc)
    run3 = jax.device_put(run3, es.state_sharding)
    assert done == 1
    for _ in range(2):
        run3, m = step(run3)
        part.append(np.asarray(m["fitness"]))
    for a, b in zip(jax.tree.leaves(run), jax.tree.leaves(run3)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.stack(full), np.stack(part))
    with pytest.raises(checkpoint.CheckpointError, match="different config"):
        checkpoint.restore(str(tmp_path), start(es), {"toy": 2})
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.restore(str(tmp_path / "nothing"), start(es), cfg_doc)


def test_sharded_over_four_cpu_devices_equals_unsharded():
    """Two generations on a ``"pop"`` mesh of 4 fake CPU devices give the same
    meta-parameters and fitness as on one device. (This used to hang: each
    device's vmapped flax init ran a batched LAPACK QR that waits for pool
    threads the other devices hold; ``agents.networks.orthogonal`` maps the
    QR instead. The subprocess timeout turns a regression into a failure.)"""
    code = textwrap.dedent(
        """
        import jax, numpy as np
        from jax.sharding import Mesh
        from tests.test_es import LogLRRule, TOY, start
        from meta.distributed import jit_placed
        from meta.es import make_es
        assert jax.device_count() == 4, jax.devices()
        outs = []
        for devices in (jax.devices(), jax.devices()[:1]):
            es = make_es(TOY, LogLRRule(), reference_returns=[100.0], mesh=Mesh(np.array(devices), ("pop",)))
            step = jit_placed(es.step, es.state_sharding)
            run = start(es)
            for _ in range(2):
                run, m = step(run)
            assert len(m["fitness"].sharding.device_set) == len(devices)
            outs.append((np.asarray(es.mean_meta_params(run)["log_lr"]), np.asarray(m["fitness"])))
        np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-6)
        np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-5)
        print("SHARDED_OK", outs[0][1])
        """
    )
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SHARDED_OK" in out.stdout
