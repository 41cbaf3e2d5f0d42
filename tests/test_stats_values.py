"""Known-answer checks of ``meta.stats`` (bootstrap intervals, IQM, standard error).

References transcribed here:

* Percentile bootstrap (Efron & Tibshirani 1993, ch. 13.3): the ``(1 - c)/2``
  and ``(1 + c)/2`` quantiles of the bootstrap distribution. For the mean of
  ``n`` normal values it is asymptotically ``xbar +- z_{(1+c)/2} s_0 / sqrt(n)``
  (``s_0`` the ddof=0 standard deviation), whose exact coverage is
  ``P(|t_{n-1}| < z sqrt((n-1)/n))`` -- 0.929 for n=20, c=0.95 (the known
  small-sample undercoverage of the percentile interval).
* IQM: rliable's ``aggregate_iqm`` is ``scipy.stats.trim_mean(x, 0.25)``
  (google-research/rliable ``rliable/metrics.py``), equal to ours when
  ``len(x) % 4 == 0``; for other lengths ours uses the documented fractional
  cut-point weights (rliable/scipy trim whole elements).
* Standard error ``std(x, ddof=1) / sqrt(n)``.
"""

import numpy as np
import scipy.stats

from meta.stats import bootstrap_ci, iqm, stderr

MU, SD, N = 3.0, 2.0, 20


def test_default_95_interval_has_its_coverage():
    """1500 seeded normal datasets of n=20: the default (95%) interval covers
    the true mean about as often as the percentile bootstrap should (0.929,
    see module docstring), and within 0.95 +- 0.045 of the nominal level."""
    data = np.random.default_rng(123).normal(MU, SD, size=(1500, N))
    hits = np.array([lo <= MU <= hi for lo, hi in (bootstrap_ci(x, samples=400, seed=i)
                                                   for i, x in enumerate(data))])
    cover = hits.mean()
    theory = 1 - 2 * scipy.stats.t.sf(1.959964 * np.sqrt((N - 1) / N), N - 1)
    tol = 4 * np.sqrt(theory * (1 - theory) / len(data))  # 4 binomial SEs (~0.027)
    assert abs(cover - theory) < tol, f"coverage {cover:.3f}, percentile-bootstrap theory {theory:.3f} +- {tol:.3f}"
    assert 0.905 <= cover <= 0.995, f"coverage {cover:.3f} of a nominal 95% interval"


def test_large_sample_interval_is_mean_plus_minus_1_96_se():
    """n=400: the default interval is xbar +- 1.96 s_0/sqrt(n) to within 6%,
    centred on the sample mean (a wrong level or tail shows as a wrong width or shift)."""
    for seed in range(3):
        x = np.random.default_rng(seed).normal(MU, SD, size=400)
        lo, hi = bootstrap_ci(x)
        se0 = np.std(x) / np.sqrt(x.size)
        half = (hi - lo) / 2
        assert abs(half / (1.959964 * se0) - 1) < 0.06, f"half-width {half:.4f} vs 1.96 se {1.959964 * se0:.4f}"
        assert abs((lo + hi) / 2 - x.mean()) < 0.15 * se0, "interval not centred on the mean"
        assert lo < x.mean() < hi


def test_50_percent_interval_is_narrower_by_the_normal_ratio():
    """Width(50%) / width(95%) ~ z_0.75 / z_0.975 = 0.674 / 1.960 (within 20%)."""
    ratios = []
    for seed in range(5):
        x = np.random.default_rng(10 + seed).normal(MU, SD, size=200)
        lo50, hi50 = bootstrap_ci(x, confidence=0.5, seed=seed)
        lo95, hi95 = bootstrap_ci(x, seed=seed)
        assert lo95 < lo50 < hi50 < hi95
        ratios.append((hi50 - lo50) / (hi95 - lo95))
    expected = scipy.stats.norm.ppf(0.75) / scipy.stats.norm.ppf(0.975)
    assert abs(np.mean(ratios) / expected - 1) < 0.2, f"width ratio {np.mean(ratios):.3f}, expected {expected:.3f}"


def test_bootstrap_of_other_statistics_and_constant_data():
    x = np.full(15, 2.5)
    assert bootstrap_ci(x, samples=50) == (2.5, 2.5)
    # median of large samples: the CI brackets the sample median and its width is, on
    # average over datasets (the bootstrap of a median is lumpy), 2 * 1.96 * sqrt(pi/2) sd/sqrt(n)
    expected = 2 * 1.959964 * np.sqrt(np.pi / 2) / np.sqrt(1000)
    ratios = []
    for seed in range(4):
        x = np.random.default_rng(seed).normal(0.0, 1.0, size=1000)
        lo, hi = bootstrap_ci(x, statistic=np.median, samples=1000)
        assert lo < np.median(x) < hi
        ratios.append((hi - lo) / expected)
    assert 0.8 < np.mean(ratios) < 1.2, ratios


def test_iqm_matches_rliable_trim_mean_when_n_divisible_by_4():
    rng = np.random.default_rng(0)
    for n in (4, 8, 20, 100):
        x = rng.standard_cauchy(n)
        np.testing.assert_allclose(iqm(x), scipy.stats.trim_mean(x, 0.25), rtol=1e-12)
    # hand value: sorted [1, 2, 3, 4, 100, 200, -5, 0] -> middle half of sorted {-5,0,1,2,3,4,100,200} = 1..4
    assert iqm([1, 2, 3, 4, 100, 200, -5, 0]) == 2.5


def test_iqm_fractional_weights_for_other_lengths():
    """n=5: cut points 1.25 and 3.75 -> weights (0, .75, 1, .75, 0) on the sorted values."""
    x = np.array([10.0, -3.0, 4.0, 1.0, 8.0])  # sorted: -3, 1, 4, 8, 10
    assert np.isclose(iqm(x), (0.75 * 1 + 4 + 0.75 * 8) / 2.5)  # 4.3
    # (rliable / scipy.stats.trim_mean trim one whole value from each end instead: mean(1, 4, 8) = 4.33)
    assert not np.isclose(iqm(x), scipy.stats.trim_mean(x, 0.25))
    x = np.array([16.0, 0.0, 4.0, 1.0, 8.0, 2.0])  # cut points 1.5, 4.5: weights (0, .5, 1, 1, .5, 0)
    assert np.isclose(iqm(x), (0.5 * 1 + 2 + 4 + 0.5 * 8) / 3.0)  # 3.5 (trim_mean: 3.75)


def test_stderr_value():
    x = np.array([1.0, 2.0, 4.0, 7.0])
    assert np.isclose(stderr(x), np.sqrt(np.sum((x - 3.5) ** 2) / 3) / 2)
    assert stderr([5.0]) == 0.0
