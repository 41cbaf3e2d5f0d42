"""Values of one ES generation (``meta.es``, evosax Open_ES) on a known linear fitness.

Transcribed references:

* OpenAI-ES (Salimans et al. 2017, arXiv:1703.03864, eq. 1 and sec. 2.2
  "mirrored sampling"): candidates ``x_i = m + sigma z_i`` with ``z_{i+P/2} =
  -z_i``; the search-gradient estimate ``g = 1/(P sigma) sum_i w_i z_i`` of the
  (minimised) shaped fitness ``w_i``; with mirrored pairs it is ``2/(P sigma)
  sum_{i<P/2} w_i z_i`` whenever the shaped fitness is antisymmetric over a
  pair, as centred ranks of a linear fitness are.
* Centred ranks (Salimans et al. sec. 3.1; evosax
  ``core/fitness_shaping.py:72-82``): ``rank / (P - 1) - 0.5``, rank 0 for the
  smallest value of what evosax minimises (``meta.es`` tells it ``-fitness``).
* Adam's first step (Kingma & Ba 2015, alg. 1): bias-corrected ``m/sqrt(v) =
  g/|g|``, so the mean moves by ``-lr * g / (|g| + eps)``.

Fitness here is ``f(x) = c . x / |reference|`` (``Evaluation`` with no PPO), so
the ascent direction is ``c``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meta.distributed import jit_placed
from meta.es import ES, ESConfig, Evaluation, make_es

C = np.array([1.0, -2.0, 3.0, -1.5])
MEAN0 = np.array([0.5, -1.0, 2.0, 0.0])
P, SIGMA, LR, REF = 1024, 0.1, 0.05, 2.0


class VectorRule:
    """meta_params = {"w": [4]}, starting at MEAN0 (the optimizer is never built)."""

    def init_meta_params(self, key):
        return {"w": jnp.asarray(MEAN0, jnp.float32)}

    def make_optimizer(self, meta_params):  # pragma: no cover - not used
        raise AssertionError("the linear evaluation builds no optimizer")


def linear_evaluation():
    c = jnp.asarray(C, jnp.float32)

    def evaluate(carried, pop, key, mean, map_population):
        returns = (pop["w"] @ c)[:, None, None]  # [P, E=1, S=1]
        return returns, carried, {"pop": pop["w"], "mean": mean["w"]}

    return Evaluation(None, evaluate, 0)


def one_generation(**overrides):
    cfg = ESConfig(envs=("CartPole-v1",), population=P, sigma=SIGMA, lr=LR, seeds=1, timesteps=1024,
                   **overrides)
    es: ES = make_es(cfg, VectorRule(), evaluation=linear_evaluation(), reference_returns=[REF])
    state = jax.device_put(es.init(jax.random.key(0)), es.state_sharding)
    new_state, metrics = jit_placed(es.step, es.state_sharding)(state)
    return (np.asarray(metrics["pop"], np.float64), np.asarray(metrics["mean"], np.float64),
            np.asarray(metrics["fitness"], np.float64),
            np.asarray(es.mean_meta_params(new_state)["w"], np.float64))


@pytest.fixture(scope="module")
def generation():
    return one_generation()


def test_population_comes_in_mirrored_pairs(generation):
    pop, mean, _, _ = generation
    np.testing.assert_allclose(mean, MEAN0, atol=1e-6)
    half = P // 2
    mirror = pop[:half] + pop[half:] - 2 * mean
    assert np.abs(mirror).max() < 1e-5, f"not antithetic: max |x_i + x_(i+P/2) - 2m| = {np.abs(mirror).max():.3g}"
    z = (pop - mean) / SIGMA
    assert 0.85 < z.std() < 1.15, f"perturbations have std {z.std():.3f} sigma, expected 1"
    assert np.abs(z[:half]).min() > 0 and len(np.unique(np.round(z[:half], 5), axis=0)) == half


def test_antithetic_off_gives_unmirrored_population():
    pop, mean, _, _ = one_generation(antithetic=False)
    mirror = pop[: P // 2] + pop[P // 2:] - 2 * mean
    assert np.abs(mirror).max() > SIGMA, "antithetic=False still gave a mirrored population"


def test_linear_fitness_gives_the_antithetic_gradient_and_adam_step(generation):
    pop, mean, fitness, new_mean = generation
    np.testing.assert_allclose(fitness, pop @ C / REF, rtol=1e-5, atol=1e-5)
    z = (pop - mean) / SIGMA
    # centred ranks of what evosax minimises, -fitness
    ranks = np.argsort(np.argsort(-fitness)).astype(np.float64)
    w = ranks / (P - 1) - 0.5
    g = w @ z / (P * SIGMA)
    half = P // 2
    np.testing.assert_allclose(w[:half], -w[half:], atol=1e-12)  # antisymmetric over mirrored pairs
    g_anti = 2.0 / (P * SIGMA) * (w[:half] @ z[:half])
    np.testing.assert_allclose(g, g_anti, rtol=1e-6)
    cos = -g @ C / (np.linalg.norm(g) * np.linalg.norm(C))
    assert cos > 0.99, f"ES gradient direction vs the fitness slope: cosine {cos:.4f}"
    expected = mean - LR * g / (np.abs(g) + 1e-8)
    np.testing.assert_allclose(new_mean, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_mean - mean, LR * np.sign(C), rtol=1e-4)  # ascent on c . x
