"""PBT's selection as its references compute it (Jaderberg et al. 2017; Ray
Tune's pbt.py): fitness from finished episodes only, a copier's record
restarting at the copy, Ray's quantile size, the pure resample explore, and
the t-test run through the whole program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meta import pbt
from tests.test_pbt import TOY_BASE, TOY_SPACE, ToyOpt, ToyState


def episodic_toy_agent(period=3, num_envs=2, noise=1.0):
    """The toy problem of test_pbt, but an episode (one per env) ends only
    every ``period`` updates; in between the agent reports its last finished
    return, as the real agents do."""

    def init_opt(params):
        return ToyOpt({"learning_rate": jnp.float32(1e-3)}, {"m": jnp.zeros_like(params["w"])})

    def init(key, hp):
        params = {"w": jnp.zeros((3,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
        return ToyState(params, init_opt(params), hp, key, jnp.zeros((), jnp.int32))

    def run(state, n):
        def upd(s, _):
            key, k = jax.random.split(s.key)
            w = s.params["w"] + 1.0 - 20.0 * (s.hparams.x - 0.7) ** 2
            done = (s.steps % period) == period - 1
            ep = w[0] + noise * jax.random.normal(k, (num_envs,))
            s2 = s.replace(params={**s.params, "w": w}, key=key, steps=s.steps + 1)
            metrics = {"episode_return": jnp.where(done, ep.mean(), s.params["b"]),
                       "episodes": jnp.where(done, num_envs, 0),
                       "env_episode_return": jnp.where(done, ep, 0.0),
                       "env_episode_done": jnp.broadcast_to(done, (num_envs,))}
            s2 = s2.replace(params={**s2.params, "b": metrics["episode_return"]})
            return s2, metrics

        return jax.lax.scan(upd, state, None, n)

    return pbt.MemberAgent(init, run, init_opt, 1)


def make(agent, p=8, **kw):
    cfg = pbt.PBTConfig(interval=kw.pop("interval", 4), window=kw.pop("window", 6), **kw)
    return pbt.make_pbt(cfg, [agent], (pbt.Group("a", p),), [TOY_SPACE], TOY_BASE)


def test_push_episodes_keeps_only_finished_episodes_in_order():
    buf = jnp.array([[0.0, 0.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    count = jnp.array([2, 0], jnp.int32)
    rets = jnp.array([[9.0, 3.0, 9.0, 4.0, 5.0], [9.0, 9.0, 7.0, 9.0, 9.0]])
    done = jnp.array([[False, True, False, True, True], [False, False, True, False, False]])
    new, n = pbt.push_episodes(buf, count, rets, done)
    np.testing.assert_array_equal(np.asarray(n), [4, 1])
    np.testing.assert_array_equal(np.asarray(new)[0], [2.0, 3.0, 4.0, 5.0])  # the newest 4, oldest first
    np.testing.assert_array_equal(np.asarray(new)[1, -1:], [7.0])
    new, n = pbt.push_episodes(new, n, rets, jnp.zeros_like(done))
    np.testing.assert_array_equal(np.asarray(n), [4, 1])  # nothing finished: the window stands


def test_window_holds_finished_episode_returns_not_carried_values():
    """The real agents repeat the last finished return in updates where no
    episode ended; those repeats must not enter the t-test's window."""
    prog = make(episodic_toy_agent(period=3, num_envs=2), interval=4, window=6)
    state = jax.jit(prog.init)(jax.random.key(0))
    state, _ = jax.jit(prog.train)(state)  # updates 0..3: one episode end (update 2), 2 envs
    np.testing.assert_array_equal(np.asarray(state.returns_count), np.full(8, 2))
    state, _ = jax.jit(prog.train)(state)  # updates 4..7: ends at 5 -> 4 returns in all
    np.testing.assert_array_equal(np.asarray(state.returns_count), np.full(8, 4))
    w = np.asarray(state.returns_buf)[:, -4:]
    assert np.all(w[:, 0] != w[:, 1])  # two envs' own noisy returns, not one value repeated
    assert np.all(np.var(w, axis=1) > 0)


def test_ttest_sees_variance_and_alpha_matters():
    """Through the whole program: with a window of real episode returns the
    t-test has variance, so its level decides how many members copy."""
    replaced = {}
    for alpha in (1e-6, 0.5):
        prog = make(episodic_toy_agent(period=1, num_envs=4, noise=3.0), exploit="ttest", ttest_alpha=alpha,
                    interval=2, window=8)
        state = jax.jit(prog.init)(jax.random.key(1))
        step = jax.jit(prog.step)
        total = 0
        for _ in range(6):
            state, info = step(state)
            total += int(np.sum(info["replaced"]))
        replaced[alpha] = total
    assert replaced[0.5] > replaced[1e-6] + 3, replaced


def test_copier_record_restarts_and_it_sits_out_until_new_evidence():
    """Jaderberg's Algorithm 1 re-evaluates after exploit: the copier's window
    restarts, it reports the fitness it inherited, and it is neither compared
    nor copied until an episode of its own has ended."""
    prog = make(episodic_toy_agent(period=6, num_envs=2), interval=2, window=4, truncation_fraction=0.25,
                perturb_factors=(1.0,))
    state = jax.jit(prog.init)(jax.random.key(2))
    step = jax.jit(prog.step)
    for _ in range(3):  # 6 updates: one episode end at update 5
        state, info = step(state)
    replaced = np.asarray(info["replaced"])
    src = np.asarray(info["src"])
    assert replaced.sum() == 2
    np.testing.assert_array_equal(np.asarray(state.returns_count)[replaced], 0)
    # next round: no episode ends (updates 6, 7) -> the copiers report what they
    # inherited, are not eligible, and nobody copies from or replaces them
    state2, info2 = step(state)
    elig = np.asarray(info2["eligible"])
    assert not elig[replaced].any() and elig[~replaced].all()
    np.testing.assert_allclose(np.asarray(info2["fitness"])[replaced], np.asarray(info["fitness"])[src[replaced]])
    src2 = np.asarray(info2["src"])
    assert np.all(src2[replaced] == np.flatnonzero(replaced))  # not replaced
    assert not np.isin(src2[~replaced], np.flatnonzero(replaced)).any()  # not copied
    assert np.sum(src2 != np.arange(8)) == 2  # the eligible six still select: 2 of them copy


def test_truncation_constants_as_jaderberg_and_ray():
    assert pbt.PBTConfig().truncation_fraction == 0.2  # Jaderberg et al.: bottom 20% / top 20%
    # Ray Tune pbt.py _quantiles: ceil(fraction * n), at most floor(n / 2)
    for n, frac, q in [(8, 0.2, 2), (10, 0.2, 2), (5, 0.2, 1), (4, 0.5, 2), (3, 0.5, 1), (16, 0.25, 4), (2, 0.2, 1)]:
        assert pbt.truncation_count(n, frac) == q, (n, frac)
    fitness = jnp.arange(10.0)
    srcs = np.asarray(jax.vmap(lambda k: pbt.truncation_select(k, fitness, jnp.zeros(10, bool), 0.2))(
        jax.random.split(jax.random.key(0), 50)))
    assert np.all(srcs[:, 2:8] == np.arange(2, 8)) and np.all(srcs[:, 8:] == [8, 9])
    assert set(np.unique(srcs[:, :2])) == {8, 9}


def test_resample_redraws_from_the_prior_and_the_mix_is_rays():
    low = jnp.array([[0.0, 1e-4]] * 256)
    high = jnp.array([[1.0, 1e-1]] * 256)
    codes = jnp.asarray(TOY_SPACE.codes())
    h = jnp.broadcast_to(jnp.array([0.5, 1e-3]), (256, 2))
    new = np.asarray(pbt.resample(jax.random.key(0), h, low, high, codes))
    factors = np.array([0.8, 1.2])
    perturbed = np.isclose(new[..., None], np.asarray(h)[..., None] * factors).any(-1)
    assert not perturbed.any()  # never a perturbation of the old value
    assert 0.4 < np.mean(new[:, 0]) < 0.6 and np.mean(np.log10(new[:, 1]) < -2.5) > 0.3  # uniform / log-uniform
    mix = np.asarray(pbt.resample_or_perturb(jax.random.key(0), h, low, high, codes, prob=0.25))
    share = np.isclose(mix[..., None], np.asarray(h)[..., None] * factors).any(-1).mean()
    assert 0.65 < share < 0.85  # perturbed with probability 0.75
    with pytest.raises(ValueError, match="allowed: perturb, resample, resample_or_perturb"):
        pbt.PBTConfig(explore="nope")


def test_episode_metrics_report_each_envs_last_finished_episode():
    from agents.core import episode_metrics

    rets = jnp.array([[1.0, 5.0, 0.0], [2.0, 6.0, 0.0], [3.0, 7.0, 0.0]])  # [T=3, N=3]
    done = jnp.array([[True, False, False], [False, True, False], [True, True, False]])
    m = episode_metrics(rets, done, jnp.float32(-9.0))
    np.testing.assert_array_equal(np.asarray(m["env_episode_done"]), [True, True, False])
    np.testing.assert_array_equal(np.asarray(m["env_episode_return"]), [3.0, 7.0, 0.0])  # the last one per env
    assert int(m["episodes"]) == 4 and float(m["episode_return"]) == pytest.approx((1 + 6 + 3 + 7) / 4)
    m = episode_metrics(rets, jnp.zeros_like(done), jnp.float32(-9.0))
    assert float(m["episode_return"]) == -9.0 and not np.asarray(m["env_episode_done"]).any()
