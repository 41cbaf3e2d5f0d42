import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meta.pipeline import PipelineConfig, make_pipeline


def _counter_pipeline(cfg):
    def init_unit(key, meta):
        return {"count": jnp.zeros((), jnp.int32), "w": jax.random.normal(key, (2,))}

    def step_unit(unit, meta):
        return dict(unit, count=unit["count"] + 1), {"count": unit["count"]}

    return make_pipeline(cfg, init_unit, step_unit)


def test_bad_config():
    with pytest.raises(ValueError, match="reset_interval"):
        PipelineConfig(num_units=4, reset_interval=0)


@pytest.mark.parametrize("staggered", [True, False])
def test_resets_on_schedule_and_ages_spread(staggered):
    cfg = PipelineConfig(num_units=4, reset_interval=8, staggered=staggered)
    pipe = _counter_pipeline(cfg)
    state = pipe.init(jax.random.key(0))
    step = jax.jit(pipe.step)
    resets, ages = [], []
    for _ in range(40):
        state, m = step(state)
        resets.append(np.asarray(m["reset"]))
        ages.append(np.asarray(m["ages"]))
        # a unit's own counter equals its age: reset really re-initialised it
        np.testing.assert_array_equal(np.asarray(m["count"]), np.asarray(m["ages"]))
    resets = np.array(resets)
    offsets = np.array([0, 2, 4, 6]) if staggered else np.zeros(4, int)
    for t in range(40):
        expected = (t % 8 == offsets) & (t > 0)
        np.testing.assert_array_equal(resets[t], expected)
    # after the warm-up every step sees ages spread evenly over the lifetime
    for t in range(8, 40):
        a = np.sort(ages[t])
        if staggered:
            np.testing.assert_array_equal(np.diff(a), [2, 2, 2])
        else:
            assert np.all(a == a[0])
    assert ages[-1].max() < 8
