"""Tests for the bugs ``scripts/mutation_check.py`` showed the suite let through.

Each test is named for what it pins; the mutant it catches is in the comment
above it (``python scripts/mutation_check.py --only NAME`` reproduces it).
Expected values are typed from the references named in each test, or worked
out by hand in the comments; nothing is taken from the module under test.
Every problem is tiny (a few numbers, one rollout of 2 envs, one generation
of a population of 8), so the whole file runs in seconds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

# ---- agents/losses.py --------------------------------------------------------------------------

# The minibatch of tests/test_losses.py: ratios 2 and 0.5, one value moved
# beyond the clip range of its old value.
LOGP = np.log(np.array([0.5, 0.2]))
OLD_LOGP = np.log(np.array([0.25, 0.4]))
ADV = np.array([1.0, -1.0])
VALUE, OLD_VALUE, TARGETS = np.array([1.0, 0.0]), np.array([0.0, 0.0]), np.array([2.0, 1.0])
ENT = np.array([0.3, 0.5])


def _ppo_loss(logp=LOGP, old=OLD_LOGP, clip_eps=0.2, **flags):
    from agents import losses

    f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return losses.ppo_loss(f(logp), f(old), f(ADV), f(VALUE), f(OLD_VALUE), f(TARGETS), f(ENT), clip_eps, 0.5, 0.01,
                           normalize_advantages=False, **flags)


# mutant clip_value_flag_ignored
def test_ppo_loss_clip_value_off_is_the_plain_squared_error():
    """purejaxrl ppo.py ``_loss_fn`` without value clipping (CleanRL's
    ``clip_vloss=False``): ``0.5 * ((v - target)^2).mean()``. By hand:
    0.5 * ((1 - 2)^2 + (0 - 1)^2) / 2 = 0.5. Clipped (the default): the first
    value is clipped to 0 + 0.2, 0.5 * ((0.2 - 2)^2 + 1) / 2 = 1.06."""
    _, off = _ppo_loss(clip_value=False)
    _, on = _ppo_loss(clip_value=True)
    np.testing.assert_allclose(off["value_loss"], 0.5, rtol=1e-6)
    np.testing.assert_allclose(on["value_loss"], 1.06, rtol=1e-6)


# mutant approx_kl_k1_estimator
def test_ppo_loss_approx_kl_and_clip_fraction_values():
    """CleanRL ppo.py: ``approx_kl = ((ratio - 1) - logratio).mean()`` (the k3
    estimator of Schulman's "Approximating KL Divergence"), ``clipfrac =
    (|ratio - 1| > clip_coef).mean()``. Ratios 2 and 0.5: k3 = ((1 - ln 2) +
    (-0.5 + ln 2)) / 2 = 0.25 (k1 = mean(-log r) would be 0). Ratios 1.1, 1.3,
    0.7, 0.95 with clip 0.2: clip fraction 2/4."""
    _, aux = _ppo_loss()
    np.testing.assert_allclose(aux["approx_kl"], 0.25, rtol=1e-5)
    r = np.array([1.1, 1.3, 0.7, 0.95])
    from agents import losses

    f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    z = f(np.zeros(4))
    _, aux = losses.ppo_loss(f(np.log(r)), z, f([1.0, -1.0, 0.5, 2.0]), z, z, z, z, 0.2, 0.5, 0.0,
                             normalize_advantages=False)
    np.testing.assert_allclose(aux["clip_fraction"], 0.5)
    np.testing.assert_allclose(aux["approx_kl"], np.mean((r - 1) - np.log(r)), rtol=1e-5)


# ---- agents/ppo.py: reward normalisation ---------------------------------------------------------


def _normalize_vec_reward(raw, done, gamma):
    """purejaxrl wrappers.py ``NormalizeVecReward.step`` in float64:
    ``G = G * gamma * (1 - done) + r``; Chan's running variance of the batch
    of G (mean 0, var 1, count 1e-4 at the start); ``r / sqrt(var + 1e-8)``."""
    mean, var, count = 0.0, 1.0, 1e-4
    G = np.zeros(raw.shape[1])
    out = []
    for r, d in zip(raw, done):
        G = G * gamma * (1.0 - d) + r
        b_mean, b_var, b_count = G.mean(), G.var(), G.size
        delta, tot = b_mean - mean, count + b_count
        mean, var = mean + delta * b_count / tot, (var * count + b_var * b_count + delta**2 * count * b_count / tot) / tot
        count = tot
        out.append(r / np.sqrt(var + 1e-8))
    return np.stack(out)


# mutant reward_norm_gamma_ignored
def test_ppo_reward_normalisation_uses_reward_norm_gamma():
    """PPOConfig(reward_norm_gamma=0.5): the rewards in the rollout are those of
    purejaxrl's NormalizeVecReward with gamma 0.5, not with the wrapper's 0.99.
    The same agent without normalisation gives the raw rewards (same keys,
    same actions: normalising rewards changes nothing the policy sees)."""
    import envs
    from agents.ppo import PPOConfig, PPOHParams, make_ppo

    env, params = envs.make("CartPole-v1")
    trajs = []
    for normalize in (False, True):
        cfg = PPOConfig(num_envs=2, num_steps=12, total_timesteps=24, update_epochs=1, num_minibatches=1,
                        hidden_sizes=(), normalize_rewards=normalize, reward_norm_gamma=0.5)
        agent = make_ppo(cfg, env, params, optax.sgd(0.0))
        state = agent.init(jax.random.key(0), PPOHParams.default(gamma=0.9))
        trajs.append(jax.tree.map(np.asarray, jax.jit(agent.rollout)(state)[1]))
    raw_t, norm_t = trajs
    np.testing.assert_array_equal(raw_t["action"], norm_t["action"])
    assert not raw_t["bootstrap_value"].any()  # no time limit within 12 steps: reward = env reward
    raw = raw_t["reward"].astype(np.float64)
    done = raw_t["done"].astype(np.float64)
    expected = _normalize_vec_reward(raw, done, 0.5)
    assert np.abs(expected - _normalize_vec_reward(raw, done, 0.99)).max() > 1.0  # the check can tell
    np.testing.assert_allclose(norm_t["reward"], expected, rtol=1e-4)


# ---- learned_optim/optim4rl.py -------------------------------------------------------------------


# mutant optim4rl_eps_setting_ignored
def test_optim4rl_rule_eps_reaches_the_update():
    """Optim4RLRule(eps=1.0): sail-sg/optim4rl components/optim.py:115-121,
    ``-lr * sign(g) exp(o1) / sqrt(exp(o2) + eps)``, with eps = 1; the GRUs
    and heads by the numpy transcription of tests/test_optim4rl_transcription.py.
    The v head's bias is shifted by -18, so exp(o2) ~ 1e-8 and eps decides."""
    from learned_optim import Optim4RLRule
    from tests.test_optim4rl_transcription import as_ours, random_weights, ref_dense, ref_gru

    w = random_weights(0, v_shift=-18.0)
    g = np.array([0.3, -0.7, 0.05, 0.9])
    lr, eps = 3e-3, 1.0
    zeros = np.zeros((4, 8))
    o1 = ref_dense(w["mlp1"], ref_gru(w["rnn1"], zeros, g[:, None]))[:, 0]
    o2 = ref_dense(w["mlp2"], ref_gru(w["rnn2"], zeros, np.square(g)[:, None]))[:, 0]
    expected = -lr * np.sign(g) * np.exp(o1) / np.sqrt(np.exp(o2) + eps)
    default_eps = -lr * np.sign(g) * np.exp(o1) / np.sqrt(np.exp(o2) + 1e-8)
    assert np.abs(expected - default_eps).max() > 0.5 * np.abs(expected).max()  # the check can tell
    tx = Optim4RLRule(learning_rate=lr, eps=eps).make_optimizer(as_ours(w))
    grads = {"w": jnp.asarray(g, jnp.float32)}
    update, _ = tx.update(grads, tx.init(grads), None)
    np.testing.assert_allclose(update["w"], expected, rtol=1e-5)


# ---- learned_optim/second_order.py (K-FAC, diagonal GGN) ---------------------------------------------


# mutant min_damping_ignored
def test_min_damping_bounds_a_smaller_damping():
    """lambda = max(damping, min_damping) (kfac-jax's ``min_damping``): with
    damping 1e-9 below min_damping 0.05 the diagonal GGN step is
    -lr V / (F + 0.05), F = (a*a)^T (g*g) / N with the bias column (one step:
    the bias-corrected EMA is the batch value), on the layer of
    tests/test_second_order_values.py."""
    from learned_optim.diag_ggn import diag_ggn
    from tests.test_second_order_values import A_IN, G_PRE, grads, layer_out, params, stats, vmat

    lr, floor = 0.2, 0.05
    tx = diag_ggn(learning_rate=lr, damping=1e-9, min_damping=floor, norm_constraint=0.0)
    u, _ = tx.update(grads(), tx.init(params()), params(), layer_stats=stats())
    a1 = np.concatenate([A_IN, np.ones((len(A_IN), 1))], axis=1)
    F = (a1 ** 2).T @ (G_PRE ** 2) / len(A_IN)
    expected = -lr * vmat() / (F + floor)
    assert np.abs(expected - (-lr * vmat() / (F + 1e-9))).max() > 0.1 * np.abs(expected).max()  # it can tell
    np.testing.assert_allclose(layer_out(u), expected, rtol=2e-4, atol=1e-7)


# ---- meta/es.py ----------------------------------------------------------------------------------


class _VectorRule:
    def __init__(self, dim):
        self.dim = dim

    def init_meta_params(self, key):
        return {"w": jnp.zeros((self.dim,), jnp.float32)}

    def make_optimizer(self, meta_params):  # pragma: no cover - never built
        raise AssertionError


def _es(population=8, returns_fn=None, envs=("CartPole-v1",), reference_returns=None, dim=16):
    from meta.es import ESConfig, Evaluation, make_es

    def evaluate(carried, pop, key, mean, map_population):
        r = returns_fn(pop["w"]) if returns_fn else jnp.zeros((population, 1, 1))
        return r, carried, {"pop": pop["w"], "mean": mean["w"]}

    cfg = ESConfig(envs=envs, population=population, sigma=0.5, lr=0.1, seeds=1, timesteps=1024)
    return make_es(cfg, _VectorRule(dim), evaluation=Evaluation(None, evaluate, 0),
                   reference_returns=reference_returns)


# mutant es_same_key_every_generation
def test_es_generations_draw_fresh_perturbations():
    """OpenAI-ES (Salimans et al. 2017, alg. 1): every generation samples new
    noise eps_i ~ N(0, I). With a zero fitness the mean stays put, so two
    generations that reused one key would give the very same population; fresh
    draws of 8 x 16 standard normals correlate by ~N(0, 1/sqrt(128))."""
    from meta.distributed import jit_placed

    es = _es()
    step = jit_placed(es.step, es.state_sharding)
    state = jax.device_put(es.init(jax.random.key(0)), es.state_sharding)
    z = []
    for _ in range(2):
        state, m = step(state)
        z.append(np.asarray(m["pop"], np.float64) - np.asarray(m["mean"], np.float64))
    z0, z1 = z[0][:4].ravel(), z[1][:4].ravel()  # the first half: the drawn (not mirrored) directions
    assert np.abs(z0).min() > 0 and np.abs(z1).min() > 0
    assert abs(np.corrcoef(z0, z1)[0, 1]) < 0.5, np.corrcoef(z0, z1)[0, 1]


# mutants es_reference_sign_kept, es_fitness_mean_over_envs_axis
def test_es_fitness_per_env_seed_mean_over_abs_reference():
    """meta/es.py's docstring (as OPEN normalises returns per env): fitness =
    mean over envs of (mean over seeds of the return) / |reference of that
    env|. Two envs (references -200, as Pendulum's, and 50), three seeds; by hand
    candidate 0: ((-100 - 120 - 80) / 3 / 200 + (10 + 20 + 30) / 3 / 50) / 2
    = (-0.5 + 0.4) / 2 = -0.05; candidate 1: (-0.25 + 1.0) / 2 = 0.375."""
    es = _es(population=2, envs=("CartPole-v1", "Acrobot-v1"), reference_returns=[-200.0, 50.0], dim=2)
    returns = jnp.array([[[-100.0, -120.0, -80.0], [10.0, 20.0, 30.0]],
                         [[-50.0, -50.0, -50.0], [40.0, 50.0, 60.0]]])
    fitness, per_env, nans = es.fitness_from_returns(returns)
    np.testing.assert_allclose(fitness, [-0.05, 0.375], rtol=1e-6)
    np.testing.assert_allclose(per_env, [[-100.0, 20.0], [-50.0, 50.0]], rtol=1e-6)
    assert int(nans) == 0


# ---- meta/pbt/exploit.py --------------------------------------------------------------------------


# mutant window_valid_off_by_one
def test_member_fitness_is_the_mean_of_the_last_counts_entries():
    """The window's valid entries are its last ``counts`` (newest at the end):
    [1, 2, 3, 4] with 2 valid -> (3 + 4) / 2; with 4 valid -> 2.5; a NaN in an
    invalid slot is ignored; none valid -> the fallback."""
    from meta.pbt.exploit import member_fitness

    buf = jnp.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [jnp.nan, 5.0, 6.0, 7.0], [9.0, 9.0, 9.0, 9.0]])
    counts = jnp.array([2, 4, 3, 0])
    np.testing.assert_allclose(member_fitness(buf, counts, jnp.array([0.0, 0.0, 0.0, -3.0])), [3.5, 2.5, 6.0, -3.0])


# mutant truncation_floor
def test_truncation_select_replaces_ceil_fraction_members():
    """Ray Tune pbt.py ``_quantiles``: ceil(fraction * n) members, at most n/2.
    8 members at fraction 0.2: ceil(1.6) = 2 replaced (members 0 and 1, the
    worst), each by one of the 2 best (6, 7)."""
    from meta.pbt.exploit import truncation_select

    fitness = jnp.arange(8.0)
    srcs = np.asarray(jax.vmap(lambda k: truncation_select(k, fitness, jnp.zeros(8, bool), 0.2))(
        jax.random.split(jax.random.key(0), 20)))
    assert np.all(srcs[:, 2:] == np.arange(2, 8)), srcs
    assert set(np.unique(srcs[:, :2])) == {6, 7}, srcs


# mutant ttest_biased_variance
def test_ttest_uses_unbiased_variances():
    """Welch's t-test (scipy.stats.ttest_ind(equal_var=False), unbiased
    variances): member 0 copies member 1 exactly when its p-value is below
    alpha. With alpha just below the p-value (0.99 p) it must not copy; just
    above (1.01 p) it must. A 1/n variance gives a smaller p and copies at both."""
    from scipy import stats

    from meta.pbt.exploit import ttest_select

    a = np.array([1.0, 2.0, 3.0, 2.5])
    b = np.array([2.5, 3.5, 4.0, 3.0])
    p = stats.ttest_ind(b, a, equal_var=False).pvalue
    assert 0.05 < p < 0.3, p
    buf = jnp.asarray(np.stack([a, b]), jnp.float32)
    counts, bad = jnp.array([4, 4]), jnp.zeros(2, bool)
    for alpha, copies in ((0.99 * p, False), (1.01 * p, True)):
        src = np.asarray(ttest_select(jax.random.key(0), buf, counts, bad, alpha=alpha))
        assert src[1] == 1 and (src[0] == 1) == copies, (alpha, src)


# mutant random_other_may_be_self
def test_random_other_is_never_self_and_covers_the_rest():
    """Binary tournament against a random *other* member: with two members the
    worse one always meets, and copies, the better one."""
    from meta.pbt.exploit import tournament_select

    fitness, bad = jnp.array([0.0, 1.0]), jnp.zeros(2, bool)
    srcs = np.asarray(jax.vmap(lambda k: tournament_select(k, fitness, bad))(jax.random.split(jax.random.key(0), 32)))
    np.testing.assert_array_equal(srcs, np.tile([1, 1], (32, 1)))


# ---- meta/stats.py --------------------------------------------------------------------------------


# mutant bootstrap_seed_ignored
def test_bootstrap_seed_changes_the_resamples():
    """The percentile bootstrap (Efron & Tibshirani ch. 13) with numpy's
    generator seeded by ``seed``: resample indices ``integers(0, n, (B, n))``,
    the interval the 2.5% and 97.5% quantiles of the resampled means."""
    from meta.stats import bootstrap_ci

    x = np.array([0.3, 1.9, 2.2, 4.0, 5.5, 7.1, 9.4])

    def reference(seed, samples=200):
        draws = np.random.default_rng(seed).integers(0, x.size, size=(samples, x.size))
        means = x[draws].mean(1)
        return np.quantile(means, 0.025), np.quantile(means, 0.975)

    assert reference(0) != reference(5)
    for seed in (0, 5):
        np.testing.assert_allclose(bootstrap_ci(x, samples=200, seed=seed), reference(seed), rtol=1e-12)
