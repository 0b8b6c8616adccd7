"""Tests of engine.metrics against values worked out by hand in the comments."""
import itertools
import math

import numpy as np
import pytest

from engine import errors
from engine import metrics

# Five examples, three classes. With num_bins=4 the edges 0, .25, .5, .75, 1
# are exact floats. (confidence = max prob, prediction = argmax)
#   row  probs            y  conf  pred  correct  bin (right-closed)
#   0    .9  .05 .05      0  .9    0     yes      3 (.75, 1]
#   1    .1  .8  .1       0  .8    1     no       3
#   2    .2  .6  .2       1  .6    1     yes      2 (.5, .75]
#   3    .7  .2  .1       2  .7    0     no       2
#   4    .4  .3  .3       0  .4    0     yes      1 (.25, .5]
_PROBS = np.array([[.9, .05, .05], [.1, .8, .1], [.2, .6, .2], [.7, .2, .1],
                   [.4, .3, .3]])
_LABELS = np.array([0, 0, 1, 2, 0])


def test_accuracy():
  # Rows 0, 2 and 4 are right: 3 / 5.
  assert metrics.accuracy(_PROBS, _LABELS) == pytest.approx(0.6)


def test_nll():
  # p(y) = .9, .1, .6, .1, .4
  # -ln: .1053605 + 2.3025851 + .5108256 + 2.3025851 + .9162907 = 6.1376470
  # / 5 = 1.2275294
  assert metrics.nll(_PROBS, _LABELS) == pytest.approx(1.2275294, abs=1e-6)


def test_nll_floors_zero_probability():
  # p(y) = 0 -> -ln(1e-12) = 27.631021; averaged with a perfect example: / 2.
  probs = np.array([[1.0, 0.0], [1.0, 0.0]])
  assert metrics.nll(probs, np.array([1, 0])) == pytest.approx(
      -math.log(metrics.NLL_EPS) / 2)


def test_brier_sums_over_classes():
  # row 0: .1^2 + .05^2 + .05^2 = .015
  # row 1: .9^2 + .8^2 + .1^2   = 1.46
  # row 2: .2^2 + .4^2 + .2^2   = .24
  # row 3: .7^2 + .2^2 + .9^2   = 1.34
  # row 4: .6^2 + .3^2 + .3^2   = .54
  # mean = 3.595 / 5 = .719
  assert metrics.brier(_PROBS, _LABELS) == pytest.approx(0.719)
  # Certain and wrong costs 2 (the upper end of the summed convention).
  assert metrics.brier(np.array([[1.0, 0.0, 0.0]]), np.array([2])) == 2.0


def test_per_example_figures_by_hand():
  """Each example's figure (the hand values of the tests above); their means are the
  aggregate figures."""
  np.testing.assert_array_equal(metrics.correct_per_example(_PROBS, _LABELS),
                                [1, 0, 1, 0, 1])
  np.testing.assert_allclose(metrics.nll_per_example(_PROBS, _LABELS),
                             -np.log([.9, .1, .6, .1, .4]), rtol=1e-12)
  np.testing.assert_allclose(metrics.brier_per_example(_PROBS, _LABELS),
                             [.015, 1.46, .24, 1.34, .54], rtol=1e-12)
  means = np.array([[0.0, 1.0], [2.0, 1.0]])  # [S=2, N=2]
  stddevs = np.array([[1.0, 1.0], [1.0, 2.0]])
  targets = np.array([0.0, 1.0])
  # Example 0: the mixture of N(0, 1) and N(2, 1) at 0; example 1: of N(1, 1) and
  # N(1, 4) at their mean.
  pdf = lambda x, m, s: math.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))
  expected = [-math.log((pdf(0, 0, 1) + pdf(0, 2, 1)) / 2),
              -math.log((pdf(1, 1, 1) + pdf(1, 1, 2)) / 2)]
  per_example = metrics.gaussian_mixture_nll_per_example(means, stddevs, targets)
  np.testing.assert_allclose(per_example, expected, rtol=1e-12)
  assert metrics.gaussian_mixture_nll(means, stddevs, targets) == pytest.approx(
      np.mean(expected), rel=1e-12)


def test_reliability_bins():
  stats = metrics.reliability(_PROBS, _LABELS, num_bins=4)
  np.testing.assert_allclose(stats['edges'], [0, .25, .5, .75, 1])
  np.testing.assert_array_equal(stats['counts'], [0, 1, 2, 2])
  # bin 1: row 4 -> acc 1, conf .4; bin 2: rows 2, 3 -> acc .5, conf .65;
  # bin 3: rows 0, 1 -> acc .5, conf .85; empty bin 0 reports 0.
  np.testing.assert_allclose(stats['accuracies'], [0, 1, .5, .5])
  np.testing.assert_allclose(stats['confidences'], [0, .4, .65, .85])


def test_expected_calibration_error():
  # 1/5 |1 - .4| + 2/5 |.5 - .65| + 2/5 |.5 - .85| = .12 + .06 + .14 = .32
  assert metrics.expected_calibration_error(
      _PROBS, _LABELS, num_bins=4) == pytest.approx(0.32)


def test_bins_are_closed_on_the_right():
  # conf .5 -> bin 1 (.25, .5]; conf 1 -> bin 3; conf .75 -> bin 2.
  probs = np.array([[.5, .5], [1.0, 0.0], [.75, .25]])
  stats = metrics.reliability(probs, np.array([0, 0, 1]), num_bins=4)
  np.testing.assert_array_equal(stats['counts'], [0, 1, 1, 1])


def test_ece_zero_when_calibrated():
  # Four examples at conf .75, all in the 15-bin bin (.733, .8]; 3 of 4 right,
  # so accuracy .75 = confidence.
  probs = np.tile([[.75, .25]], (4, 1))
  assert metrics.expected_calibration_error(
      probs, np.array([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-12)


def test_predictive_summary_agreeing_samples_have_no_mutual_information():
  probs = np.tile(_PROBS[None], (4, 1, 1))
  summary = metrics.predictive_summary(probs)
  np.testing.assert_allclose(summary['mean_probs'], _PROBS)
  np.testing.assert_allclose(summary['predictive_entropy'],
                             summary['expected_entropy'])
  np.testing.assert_allclose(summary['mutual_information'], 0.0, atol=1e-12)
  # Row 4: -(.4 ln .4 + 2 * .3 ln .3) = .366516 + .722375 = 1.088900
  assert summary['predictive_entropy'][4] == pytest.approx(1.0889001, abs=1e-6)


def test_predictive_summary_disagreeing_samples():
  # Example 0: two confident samples that disagree -> mean [.5, .5]:
  #   predictive ln 2, expected 0 (0 log 0 = 0, no NaN), MI ln 2.
  # Example 1: both samples uniform -> predictive = expected = ln 2, MI 0.
  probs = np.array([[[1.0, 0.0], [.5, .5]],
                    [[0.0, 1.0], [.5, .5]]])
  summary = metrics.predictive_summary(probs)
  assert np.all(np.isfinite(summary['expected_entropy']))
  np.testing.assert_allclose(summary['predictive_entropy'],
                             [math.log(2), math.log(2)])
  np.testing.assert_allclose(summary['expected_entropy'], [0, math.log(2)],
                             atol=1e-12)
  np.testing.assert_allclose(summary['mutual_information'], [math.log(2), 0],
                             atol=1e-12)
  assert np.all(summary['mutual_information'] >= 0)


def _brute_force_auroc(scores_in, scores_out):
  total = 0.0
  for a, b in itertools.product(scores_in, scores_out):
    total += 1.0 if b > a else 0.5 if b == a else 0.0
  return total / (len(scores_in) * len(scores_out))


def test_auroc_with_ties_by_hand():
  # out .4 : beats .1, ties .4 twice (+.5 +.5), loses to .8  -> 2
  # out .9 : beats all four                                  -> 4
  # out .35: beats .1 only                                   -> 1
  # 7 / (4 * 3) = .583333
  scores_in, scores_out = [.1, .4, .4, .8], [.4, .9, .35]
  assert metrics.auroc(scores_in, scores_out) == pytest.approx(7 / 12)


def test_auroc_matches_brute_force_on_many_ties():
  rng = np.random.default_rng(0)
  scores_in = rng.integers(0, 5, 40).astype(float)
  scores_out = rng.integers(1, 7, 30).astype(float)
  assert metrics.auroc(scores_in, scores_out) == pytest.approx(
      _brute_force_auroc(scores_in, scores_out))


def test_auroc_extremes():
  assert metrics.auroc([0, 1], [2, 3]) == 1.0
  assert metrics.auroc([2, 3], [0, 1]) == 0.0
  assert metrics.auroc([1, 1], [1, 1]) == 0.5


def test_aupr_by_hand():
  # sorted: .8 P | .4 N | .3 P | .1 N, thresholds at each score:
  #   >= .8: TP 1 of 1 predicted, R .5, P 1
  #   >= .4: TP 1 of 2,           R .5, P .5   (recall step 0)
  #   >= .3: TP 2 of 3,           R 1,  P 2/3
  # AP = .5 * 1 + .5 * 2/3 = .833333
  assert metrics.aupr([.1, .4], [.3, .8]) == pytest.approx(5 / 6)


def test_aupr_ties_enter_together():
  # out .9 | (.5 out, .5 in tied) | .2 in | .05 out:
  #   >= .9 : TP 1/1, R 1/3, P 1
  #   >= .5 : TP 2/3, R 2/3, P 2/3  (the tie counts both at once)
  #   >= .2 : TP 2/4, R 2/3         (recall step 0)
  #   >= .05: TP 3/5, R 1,   P 3/5
  # AP = 1/3 + 1/3 * 2/3 + 1/3 * 3/5 = 34/45 = .755556
  # (Ranking the tied positive first would give 1/3 + 1/3 + 1/5 = .866667.)
  assert metrics.aupr([.5, .2], [.5, .9, .05]) == pytest.approx(34 / 45)
  assert metrics.aupr([.2, .5], [.05, .9, .5]) == pytest.approx(34 / 45)


def test_aupr_perfect_and_chance():
  assert metrics.aupr([0, 1], [2, 3]) == 1.0
  # All scores equal: one threshold, P = 2/6 at R = 1.
  assert metrics.aupr([1, 1, 1, 1], [1, 1]) == pytest.approx(1 / 3)


def test_coverage_of_one_gaussian():
  # N(0, 1): central half-widths are z = .674 (50%), 1.036 (70%), 1.960 (95%).
  #   target  0   : inside all three
  #   target  1.0 : outside 50%, inside 70% and 95%
  #   target -0.8 : outside 50%, inside 70% and 95%
  #   target  2.0 : outside all three
  # -> 50%: 1/4, 70%: 3/4, 95%: 3/4
  means = np.zeros((1, 4))
  stddevs = np.ones((1, 1))
  coverage = metrics.gaussian_mixture_interval_coverage(
      means, stddevs, [0.0, 1.0, -0.8, 2.0])
  assert coverage == pytest.approx({0.5: 0.25, 0.7: 0.75, 0.95: 0.75})


def test_coverage_of_bimodal_mixture_differs_from_moment_matching():
  # Components N(-3, 1) and N(3, 1). Target 0 is the median of both the
  # mixture and its moment-matched N(0, 10), so it is inside every interval.
  # Target 2.99 (near a mode): mixture CDF .5 * (Phi(5.99) + Phi(-.01)) = .748,
  # inside the central 50% interval [.25, .75] (just); moment-matched:
  # z = 2.99 / sqrt(10) = .946, outside 50% (.674).
  # Target 5.5: mixture CDF .5 * (Phi(8.5) + Phi(2.5)) = .99690 > .975, outside
  # 95%; moment-matched z = 1.739 < 1.960, inside 95%.
  means = np.array([[-3.0, -3.0, -3.0], [3.0, 3.0, 3.0]])
  stddevs = np.ones((2, 1))
  targets = [0.0, 2.99, 5.5]
  mixture = metrics.gaussian_mixture_interval_coverage(
      means, stddevs, targets, levels=(0.5, 0.95))
  matched = metrics.gaussian_mixture_interval_coverage(
      means, stddevs, targets, levels=(0.5, 0.95), method='moment_matched')
  assert mixture == pytest.approx({0.5: 2 / 3, 0.95: 2 / 3})
  assert matched == pytest.approx({0.5: 1 / 3, 0.95: 1.0})


def test_quantiles_by_bisection():
  # One standard normal: q(.975) = 1.959964, q(.25) = -.674490.
  q = metrics.gaussian_mixture_quantiles(np.zeros((1, 1)), np.ones((1, 1)),
                                         [0.25, 0.975])
  np.testing.assert_allclose(q[:, 0], [-0.6744898, 1.9599640], atol=1e-6)
  # Random mixtures: F(q(p)) = p, and coverage agrees with the interval ends.
  rng = np.random.default_rng(1)
  means = rng.normal(size=(5, 50)) * 3
  stddevs = rng.uniform(0.2, 2.0, size=(5, 50))
  q = metrics.gaussian_mixture_quantiles(means, stddevs, [0.025, 0.975])
  for row, p in zip(q, [0.025, 0.975]):
    np.testing.assert_allclose(
        metrics.gaussian_mixture_cdf(means, stddevs, row), p, atol=1e-8)
  targets = rng.normal(size=50) * 4
  inside = np.mean((targets >= q[0]) & (targets <= q[1]))
  assert metrics.gaussian_mixture_interval_coverage(
      means, stddevs, targets, levels=(0.95,))[0.95] == pytest.approx(inside)


def test_rmse():
  # errors 0, 0, 2 -> sqrt(4 / 3)
  assert metrics.rmse([1, 2, 3], [1, 2, 5]) == pytest.approx(math.sqrt(4 / 3))


def test_gaussian_mixture_nll():
  half_log_2pi = 0.5 * math.log(2 * math.pi)  # .9189385
  # N(0, 1) at 0, one or two identical samples: .5 ln(2 pi).
  assert metrics.gaussian_mixture_nll(
      np.zeros((2, 1)), np.ones((2, 1)), [0.0]) == pytest.approx(half_log_2pi)
  # Components at 0 and 100: density at 0 is phi(0) / 2 -> + ln 2; the far
  # component underflows exp but log-mean-exp keeps it exact.
  assert metrics.gaussian_mixture_nll(
      np.array([[0.0], [100.0]]), np.ones((2, 1)), [0.0]) == pytest.approx(
          half_log_2pi + math.log(2))
  # N(1, 2^2) at 3: .5 ln(2 pi) + ln 2 + .5 * 1 = 2.1120857
  assert metrics.gaussian_mixture_nll(
      np.array([[1.0]]), np.array([[2.0]]), [3.0]) == pytest.approx(
          half_log_2pi + math.log(2) + 0.5)
  # Far in the tail of every sample, still finite.
  assert np.isfinite(metrics.gaussian_mixture_nll(
      np.zeros((3, 1)), np.full((3, 1), 0.01), [50.0]))


def test_mixture_mean_and_stddev():
  # N(-3, 1), N(3, 1): mean 0, variance 1 + 9 = 10.
  mean, stddev = metrics.mixture_mean_and_stddev(
      np.array([[-3.0], [3.0]]), np.ones((2, 1)))
  np.testing.assert_allclose(mean, [0.0], atol=1e-12)
  np.testing.assert_allclose(stddev, [math.sqrt(10)])


@pytest.mark.parametrize('call', [
    lambda: metrics.accuracy(np.array([[.7, .7]]), np.array([0])),
    lambda: metrics.nll(np.array([[2.0, -1.0]]), np.array([0])),
    lambda: metrics.brier(_PROBS, np.array([0, 0, 1, 3, 0])),
    lambda: metrics.brier(_PROBS, _LABELS[:4]),
    lambda: metrics.predictive_summary(_PROBS),
    lambda: metrics.predictive_summary(np.full((2, 1, 2), np.nan)),
    lambda: metrics.auroc([], [1.0]),
    lambda: metrics.gaussian_mixture_nll(np.zeros((1, 2)), np.zeros((1, 1)),
                                         [0.0, 0.0]),
    lambda: metrics.gaussian_mixture_nll(np.zeros((1, 2)), np.ones((2, 2)),
                                         [0.0, 0.0]),
    lambda: metrics.rmse([1.0, 2.0], [1.0]),
])
def test_bad_arrays_raise_data_error(call):
  with pytest.raises(errors.DataError):
    call()


def test_bad_parameters_raise_config_error():
  with pytest.raises(errors.ConfigError, match='num_bins'):
    metrics.expected_calibration_error(_PROBS, _LABELS, num_bins=0)
  with pytest.raises(errors.ConfigError, match='levels'):
    metrics.gaussian_mixture_interval_coverage(
        np.zeros((1, 1)), np.ones((1, 1)), [0.0], levels=(0.5, 1.0))
  with pytest.raises(errors.ConfigError, match='method'):
    metrics.gaussian_mixture_interval_coverage(
        np.zeros((1, 1)), np.ones((1, 1)), [0.0], method='exact')


def test_paired_difference():
  a = np.array([1.0, 2.0, 3.0, 4.0])
  b = a + np.array([0.5, 0.7, 0.3, 0.5])
  mean, stderr = metrics.paired_difference(a, b)
  assert mean == pytest.approx(0.5)
  # differences 0.5, 0.7, 0.3, 0.5: sample variance 0.08/3, over n = 4
  assert stderr == pytest.approx(np.sqrt(0.08 / 3 / 4))
  with pytest.raises(errors.DataError, match='same examples'):
    metrics.paired_difference(a, b[:3])
  with pytest.raises(errors.DataError, match='NaN'):
    metrics.paired_difference(a, np.array([1.0, np.nan, 0.0, 0.0]))
