"""ES over pipeline units (meta/pipeline_es.py), on the toy rule of
tests/test_es.py (Adam with learning rate exp(log_lr)), whose compile is cheap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents.a2c import A2CConfig, A2CHParams
from meta import checkpoint
from meta.distributed import jit_placed
from meta.es import ESConfig, make_es
from meta.pipeline import PipelineConfig
from meta.pipeline_es import PipelineESConfig, relative_scores, unit_evaluation
from tests.test_es import LogLRRule, start

A2C = A2CConfig(num_envs=4, num_steps=10, hidden_sizes=(16,), total_timesteps=4 * 10 * 4 * 4)
HP = A2CHParams.default(gamma=0.99)


def _trainer(envs=("Catch-bsuite",), population=4, units=2, reset_interval=3, window=2, start=3e-3, sigma=1.0,
             lr=0.5, a2c=A2C, fitness="return"):
    """(ES over pipeline units, its jitted generation step)."""
    cfg = ESConfig(envs=envs, population=population, sigma=sigma, lr=lr)
    pc = PipelineESConfig(PipelineConfig(num_units=units, reset_interval=reset_interval), window=window,
                          fitness=fitness)
    rule = LogLRRule(start=start)
    es = make_es(cfg, rule, unit_evaluation(cfg, rule, pc, a2c, HP))
    return es, jit_placed(es.step, es.state_sharding)


@pytest.fixture(scope="module")
def trainer():
    """Shared by the tests below so its generation step compiles once."""
    return _trainer()


def _plain(tree):
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree.leaves(tree)]


def test_bad_window():
    with pytest.raises(ValueError, match="window"):
        PipelineESConfig(window=0)
    with pytest.raises(ValueError, match="--unit-fitness 'rank'; allowed: return, relative"):
        PipelineESConfig(fitness="rank")


def test_relative_scores_by_hand():
    """(R - M) / (max(population std of R on the unit, the env's mean of those) + eps),
    unit by unit; a NaN candidate stays NaN and is left out of the others' spread."""
    rng = np.random.default_rng(0)
    R = rng.normal(size=(6, 2, 3)).astype(np.float32)
    R[:, 0, 1] *= 100.0  # an old unit with a large spread counts as much as the others
    M = rng.normal(size=(2, 3)).astype(np.float32)
    R[:, 1, 2] = R[0, 1, 2] + 1e-4 * R[:, 1, 2]  # a unit where candidates barely differ
    want = np.empty_like(R)
    sd = np.sqrt(np.mean((R - R.mean(0)) ** 2, axis=0, dtype=np.float64))  # [E, N]
    for e in range(2):
        floor = sd[e].mean()
        for u in range(3):
            want[:, e, u] = (R[:, e, u] - M[e, u]) / (max(sd[e, u], floor) + 1e-6)
    assert np.abs(want[:, 1, 2]).max() < 1.0 + np.abs(M[1, 2] - R[0, 1, 2]) / sd[1].mean()
    np.testing.assert_allclose(relative_scores(jnp.asarray(R), jnp.asarray(M)), want, rtol=1e-5, atol=1e-6)
    R_bad = R.copy()
    R_bad[2, 1, 0] = np.nan
    got = np.asarray(relative_scores(jnp.asarray(R_bad), jnp.asarray(M)))
    assert np.isnan(got[2, 1, 0]) and np.isfinite(np.delete(got[:, 1, 0], 2)).all()
    rest = np.delete(R[:, 1, 0], 2).astype(np.float64)
    floor = np.mean([rest.std()] + [sd[1, u] for u in (1, 2)])
    np.testing.assert_allclose(np.delete(got[:, 1, 0], 2), (rest - M[1, 0]) / (max(rest.std(), floor) + 1e-6),
                               rtol=1e-5)


def test_candidates_see_the_same_units_and_the_mean_advances_them(trainer):
    """Equal candidates get bit-equal returns (same unit states and keys: common
    random numbers), different ones differ; the carried units are what the ES
    mean's own window produced."""
    es, _ = trainer
    run = start(es)
    mean = es.mean_meta_params(run)
    pop = {"log_lr": jnp.array([np.log(3e-3), np.log(3e-3), 0.0, np.log(3e-3)], jnp.float32)}
    evaluate = jax.jit(lambda *args: es.evaluation.evaluate(*args, es.map_population))
    returns, new_pipes, extra = evaluate(run.pipes, pop, jax.random.key(0), mean)
    returns = np.asarray(returns)  # [P, E, N]
    assert returns.shape == (4, 1, 2)
    np.testing.assert_array_equal(returns[0], returns[1])
    np.testing.assert_array_equal(returns[0], returns[3])
    assert not np.array_equal(returns[0], returns[2])
    units = tuple(p.units for p in run.pipes)  # step 0: no unit is reset
    mean_returns, advanced = jax.jit(es.evaluation.run_window)(mean, units)
    np.testing.assert_array_equal(np.asarray(extra["es_mean_return"]), np.asarray(mean_returns).mean(-1))
    for a, b in zip(_plain(new_pipes[0].units), _plain(advanced[0])):
        np.testing.assert_array_equal(a, b)
    assert int(new_pipes[0].step) == 1


def test_units_reset_on_their_schedule_across_generations(trainer):
    """2 units, reset interval 3: offsets 0 and 1 (the generic schedule, also
    the no-pipeline variant, is tested in test_pipeline.py)."""
    es, step = trainer
    run = start(es)
    ages = []
    for _ in range(7):
        run, m = step(run)
        ages.append(np.asarray(m["unit_ages"])[0])
        # a reset really re-initialised the unit: its update counter restarted (window = 2 updates)
        np.testing.assert_array_equal(np.asarray(run.pipes[0].units.update_step), 2 * ages[-1])
    # ages after the step (a unit reset at generation g shows age 1):
    # unit 1 resets at steps 1, 4; unit 0 at 3, 6
    np.testing.assert_array_equal(ages, [[1, 1], [2, 1], [3, 2], [1, 3], [2, 1], [3, 2], [1, 3]])
    assert step._cache_size() == 1


def test_resume_is_bit_for_bit(trainer, tmp_path):
    """4 generations straight == 2 generations, checkpoint, restore into a
    fresh run state, 2 more (the units' params, optimizer and env states, keys
    and ages come back too; unit resets fall in both halves). A fresh process
    is covered by tests/test_meta_train_pipeline_script.py."""
    es, step = trainer

    def generations(run, n, fitness):
        for _ in range(n):
            run, m = step(run)
            fitness.append(np.asarray(m["fitness"]))
        return run

    full, part = [], []
    run = generations(start(es), 4, full)
    run2 = generations(start(es), 2, part)
    checkpoint.save(str(tmp_path), 2, run2, {"config": {"c": 1}, "logs": []})
    done, run3, _ = checkpoint.restore(str(tmp_path), start(es), {"c": 1})
    run3 = jax.device_put(run3, es.state_sharding)
    assert done == 2 and int(run3.pipes[0].step) == 2
    run3 = generations(run3, 2, part)
    for a, b in zip(_plain(run), _plain(run3)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.stack(full), np.stack(part))
    assert np.ptp(np.stack(full)) > 0  # fitness moved, so a mix-up would show


@pytest.mark.slow  # a longer learning check
def test_es_on_units_raises_the_learning_rate():
    """CartPole: Adam at lr 1e-4 barely changes the policy within a unit's
    window; larger learning rates make episodes longer within a few updates, so
    ES on the units' progress must push log_lr up by a lot (it went from
    -9.2 to -3.7 in 12 generations; a sign error or candidates that all ran
    the same optimizer leave it where it was or push it down)."""
    a2c = A2CConfig(num_envs=8, num_steps=10, hidden_sizes=(16,), total_timesteps=8 * 10 * 8 * 8)
    es, step = _trainer(envs=("CartPole-v1",), population=8, units=4, reset_interval=8, window=8, start=1e-4,
                        sigma=1.0, lr=1.0, a2c=a2c)
    run = start(es)
    lr0 = float(es.mean_meta_params(run)["log_lr"])
    mean_returns = []
    for _ in range(12):
        run, m = step(run)
        mean_returns.append(float(np.asarray(m["es_mean_return"]).mean()))
    lr1 = float(es.mean_meta_params(run)["log_lr"])
    assert lr1 > lr0 + 3.0, (lr0, lr1)
    assert max(mean_returns[-3:]) > mean_returns[0] + 1.0, mean_returns
