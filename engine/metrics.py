"""Evaluation figures of Bayesian classifiers and regressors, as pure functions.

Inputs are Monte-Carlo predictions, one per weight sample:
  classification: `probs` [S, N, K], S weight samples, N examples, K classes,
                  and integer `labels` [N];
  regression:     Gaussian predictive `means` and `stddevs` [S, N], `targets` [N].
The predictive distribution is the equal-weight mixture over the S samples.
`paired_difference` compares two runs' per-example figures on one test set.

Numpy only, except the normal CDF/quantile, taken from TF core (`tf.math.erfc`,
`tf.math.ndtri`) in float64 because numpy has no vectorised erf. Logs are
natural (nats). Bad arrays raise DataError, bad parameters ConfigError.
"""
import math
from typing import Dict, Sequence, Tuple

import numpy as np
import tensorflow as tf

from engine import errors

# Floor of p(y) in `nll`: a confidently wrong prediction costs at most
# -log(1e-12) ~= 27.6 nats instead of inf.
NLL_EPS = 1e-12
DEFAULT_NUM_BINS = 15
DEFAULT_LEVELS = (0.5, 0.7, 0.95)
INTERVAL_METHODS = ('mixture', 'moment_matched')
# Probabilities may be off by rounding (softmax in float32); beyond this they
# are treated as a bug upstream.
_PROB_TOL = 1e-3


# ----------------------------------------------------------------- checks

def _array(name, value, ndim, dtype=np.float64):
  try:
    array = np.asarray(value, dtype=dtype)
  except (TypeError, ValueError) as e:
    raise errors.DataError(f'{name}: cannot be read as a {np.dtype(dtype).name} '
                           f'array ({e}).') from None
  if array.ndim != ndim:
    raise errors.DataError(
        f'{name}: expected a rank-{ndim} array, got shape {array.shape}.')
  if array.dtype.kind == 'f' and not np.all(np.isfinite(array)):
    raise errors.DataError(
        f'{name}: holds NaN or Inf; evaluate a model whose predictions are '
        f'finite.')
  return array


def _probs(name, value, ndim):
  """Checks a probability array whose last axis is over classes."""
  probs = _array(name, value, ndim)
  if probs.shape[-1] < 2 or probs.size == 0:
    raise errors.DataError(
        f'{name}: needs at least one example and two classes, got shape '
        f'{probs.shape}.')
  if probs.min() < -_PROB_TOL or probs.max() > 1 + _PROB_TOL:
    raise errors.DataError(
        f'{name}: values must lie in [0, 1], got range [{probs.min():.4g}, '
        f'{probs.max():.4g}]; pass softmax probabilities, not logits.')
  sums = probs.sum(axis=-1)
  if np.max(np.abs(sums - 1.0)) > _PROB_TOL:
    raise errors.DataError(
        f'{name}: rows must sum to 1 over the last (class) axis; the worst row '
        f'sums to {sums.flat[np.argmax(np.abs(sums - 1.0))]:.4g}.')
  return np.clip(probs, 0.0, 1.0)


def _labels(value, mean_probs):
  labels = np.asarray(value)
  if labels.ndim != 1 or labels.dtype.kind not in 'iu':
    raise errors.DataError(
        f'labels: expected an integer array of shape [N], got dtype '
        f'{labels.dtype} and shape {labels.shape}.')
  n, k = mean_probs.shape
  if labels.shape[0] != n:
    raise errors.DataError(
        f'labels: {labels.shape[0]} labels for {n} predictions; pass one '
        f'label per row of mean_probs.')
  if labels.min() < 0 or labels.max() >= k:
    raise errors.DataError(
        f'labels: values must lie in [0, {k}) for {k} classes, got range '
        f'[{labels.min()}, {labels.max()}]; remap labels to the model\'s '
        f'classes (engine.tasks.select_classes).')
  return labels.astype(np.int64)


def _classification(mean_probs, labels):
  mean_probs = _probs('mean_probs', mean_probs, 2)
  return mean_probs, _labels(labels, mean_probs)


def _num_bins(num_bins):
  if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) \
      or num_bins < 1:
    raise errors.ConfigError(
        f'num_bins={num_bins!r}: must be a positive integer (15 is usual).')
  return int(num_bins)


# --------------------------------------------------------- classification

def entropy(probs, axis: int = -1) -> np.ndarray:
  """Shannon entropy in nats along `axis`, with 0 log 0 = 0.

  Args:
    probs: probabilities, non-negative and summing to 1 along `axis`.
    axis: the class axis.

  Returns:
    `probs` with `axis` reduced.
  """
  p = np.asarray(probs, np.float64)
  # log(1) = 0 wherever p == 0, so those terms vanish without a NaN.
  return -np.sum(p * np.log(np.where(p > 0, p, 1.0)), axis=axis)


def predictive_summary(probs) -> Dict[str, np.ndarray]:
  """Mean prediction and its uncertainty split into aleatoric and epistemic.

  Args:
    probs: [S, N, K] class probabilities, one [N, K] slice per weight sample.

  Returns:
    A dict of float64 arrays:
      'mean_probs': [N, K], the predictive distribution (mean over S).
      'predictive_entropy': [N], H[mean_s p_s] (total uncertainty).
      'expected_entropy': [N], mean_s H[p_s] (aleatoric).
      'mutual_information': [N], predictive - expected entropy (epistemic;
        the mutual information between label and weights, >= 0 by Jensen;
        round-off negatives are clipped to 0).

  Raises:
    DataError: `probs` is not [S, N, K] probabilities.
  """
  probs = _probs('probs', probs, 3)
  mean_probs = probs.mean(axis=0)
  predictive = entropy(mean_probs)
  expected = entropy(probs).mean(axis=0)
  return {
      'mean_probs': mean_probs,
      'predictive_entropy': predictive,
      'expected_entropy': expected,
      'mutual_information': np.maximum(predictive - expected, 0.0),
  }


def correct_per_example(mean_probs, labels) -> np.ndarray:
  """1.0 for each example whose argmax class (first one on ties) is the label, else 0.0."""
  mean_probs, labels = _classification(mean_probs, labels)
  return (np.argmax(mean_probs, axis=1) == labels).astype(np.float64)


def accuracy(mean_probs, labels) -> float:
  """Fraction of examples whose argmax class (first one on ties) is the label."""
  return float(np.mean(correct_per_example(mean_probs, labels)))


def nll_per_example(mean_probs, labels) -> np.ndarray:
  """-log p(y) of each example in nats, p(y) floored at NLL_EPS = 1e-12 (so one
  confidently wrong example costs at most 27.6 nats rather than inf)."""
  mean_probs, labels = _classification(mean_probs, labels)
  p = mean_probs[np.arange(labels.shape[0]), labels]
  return -np.log(np.maximum(p, NLL_EPS))


def nll(mean_probs, labels) -> float:
  """Mean negative log-likelihood -log p(y) in nats (see `nll_per_example`)."""
  return float(np.mean(nll_per_example(mean_probs, labels)))


def brier_per_example(mean_probs, labels) -> np.ndarray:
  """sum_k (p_k - onehot_k)^2 of each example.

  Convention: summed over classes, not averaged, so it ranges over [0, 2]
  (0 = certain and right, 2 = certain and wrong) whatever K is.
  """
  mean_probs, labels = _classification(mean_probs, labels)
  onehot = np.eye(mean_probs.shape[1])[labels]
  return np.sum((mean_probs - onehot) ** 2, axis=1)


def brier(mean_probs, labels) -> float:
  """Brier score: the mean over examples of `brier_per_example`."""
  return float(np.mean(brier_per_example(mean_probs, labels)))


def reliability(mean_probs, labels,
                num_bins: int = DEFAULT_NUM_BINS) -> Dict[str, np.ndarray]:
  """Per-bin statistics of a reliability diagram.

  Confidence is the max class probability and the prediction its argmax.
  Bins are equal-width over [0, 1] with edges np.linspace(0, 1, num_bins + 1),
  closed on the right: bin b holds edges[b] < conf <= edges[b + 1], and bin 0
  also holds conf == 0.

  Args:
    mean_probs: [N, K] predictive probabilities.
    labels: [N] integer labels.
    num_bins: number of bins.

  Returns:
    A dict: 'edges' [B + 1] float64, 'counts' [B] int64, 'accuracies' [B] and
    'confidences' [B] float64 (mean correctness and mean confidence of the
    bin; 0 where the count is 0, so mask with counts > 0).

  Raises:
    DataError: bad arrays. ConfigError: bad num_bins.
  """
  num_bins = _num_bins(num_bins)
  mean_probs, labels = _classification(mean_probs, labels)
  confidences = mean_probs.max(axis=1)
  correct = (np.argmax(mean_probs, axis=1) == labels).astype(np.float64)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  bins = np.clip(np.searchsorted(edges, confidences, side='left') - 1,
                 0, num_bins - 1)
  counts = np.bincount(bins, minlength=num_bins)
  safe = np.maximum(counts, 1)
  return {
      'edges': edges,
      'counts': counts.astype(np.int64),
      'accuracies': np.bincount(bins, correct, num_bins) / safe,
      'confidences': np.bincount(bins, confidences, num_bins) / safe,
  }


def expected_calibration_error(mean_probs, labels,
                               num_bins: int = DEFAULT_NUM_BINS) -> float:
  """ECE = sum_b |B_b| / N * |acc_b - conf_b| over the bins of `reliability`."""
  stats = reliability(mean_probs, labels, num_bins)
  weights = stats['counts'] / stats['counts'].sum()
  return float(np.sum(weights * np.abs(stats['accuracies']
                                       - stats['confidences'])))


# -------------------------------------------------------------------- OOD

def _scores(name, value):
  scores = _array(name, value, 1)
  if scores.shape[0] == 0:
    raise errors.DataError(f'{name}: is empty; both sets need examples.')
  return scores


def auroc(scores_in, scores_out) -> float:
  """Area under the ROC curve of telling out-of-distribution from in-distribution.

  OOD is the positive class and a higher score means "more likely OOD" (e.g.
  predictive entropy or mutual information). Computed exactly as the
  Mann-Whitney statistic P(score_out > score_in) + 0.5 P(score_out ==
  score_in) over all (in, out) pairs, via average ranks.

  Args:
    scores_in: [N_in] scores of in-distribution examples.
    scores_out: [N_out] scores of OOD examples.

  Returns:
    A float in [0, 1]; 0.5 is chance, 1 a perfect separation.
  """
  scores_in = _scores('scores_in', scores_in)
  scores_out = _scores('scores_out', scores_out)
  both = np.concatenate([scores_in, scores_out])
  uniq, inverse, counts = np.unique(both, return_inverse=True,
                                    return_counts=True)
  # Tied values share the mean of the 1-based ranks they span.
  first_rank = np.cumsum(counts) - counts + 1
  ranks = (first_rank + (counts - 1) / 2.0)[inverse.ravel()]
  n_in, n_out = scores_in.shape[0], scores_out.shape[0]
  u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2.0
  return float(u / (n_in * n_out))


def aupr(scores_in, scores_out) -> float:
  """Area under the precision-recall curve, OOD as positive, as average precision.

  AP = sum_n (R_n - R_{n-1}) P_n over the distinct score values taken as
  thresholds from high to low (predict OOD when score >= threshold), with
  R_0 = 0: the step-wise definition of sklearn's average_precision_score,
  with no interpolation. Tied scores enter together.

  Args:
    scores_in: [N_in] scores of in-distribution examples.
    scores_out: [N_out] scores of OOD examples (the positives).

  Returns:
    A float in (0, 1]; chance level is N_out / (N_in + N_out).
  """
  scores_in = _scores('scores_in', scores_in)
  scores_out = _scores('scores_out', scores_out)
  scores = np.concatenate([scores_in, scores_out])
  positive = np.concatenate([np.zeros(scores_in.shape[0]),
                             np.ones(scores_out.shape[0])])
  order = np.argsort(-scores, kind='stable')
  scores, positive = scores[order], positive[order]
  # The last index of each run of equal scores is where a threshold lands.
  ends = np.r_[np.flatnonzero(np.diff(scores) != 0), scores.shape[0] - 1]
  tp = np.cumsum(positive)[ends]
  predicted = ends + 1.0
  recall = tp / scores_out.shape[0]
  precision = tp / predicted
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


# ------------------------------------------------------------- regression

def _components(means, stddevs):
  """Checks and broadcasts to float64 means and stddevs, both [S, N]."""
  means = _array('means', means, 2)
  if means.size == 0:
    raise errors.DataError(f'means: is empty (shape {means.shape}).')
  stddevs = np.asarray(stddevs, np.float64)
  if stddevs.ndim != 2:
    raise errors.DataError(
        f'stddevs: expected shape [S, N] or [S, 1], got {stddevs.shape}.')
  try:
    stddevs = np.broadcast_to(stddevs, means.shape)
  except ValueError:
    raise errors.DataError(
        f'stddevs: shape {stddevs.shape} does not broadcast to the means\' '
        f'{means.shape}; pass [S, N] or [S, 1].') from None
  if not np.all(np.isfinite(stddevs)) or stddevs.min() <= 0:
    raise errors.DataError(
        'stddevs: must be finite and > 0; apply softplus (plus a small '
        'floor) to the model\'s scale output.')
  return means, stddevs


def _regression(means, stddevs, targets):
  """Checks means, stddevs [S, N] and targets [N]."""
  means, stddevs = _components(means, stddevs)
  targets = _array('targets', targets, 1)
  if targets.shape[0] != means.shape[1]:
    raise errors.DataError(
        f'targets: {targets.shape[0]} targets for {means.shape[1]} '
        f'predictions; pass one target per column of means.')
  return means, stddevs, targets


def _levels(levels):
  try:
    levels = np.asarray(levels, np.float64).reshape(-1)
  except (TypeError, ValueError):
    levels = np.array([np.nan])
  if levels.size == 0 or not np.all((levels > 0) & (levels < 1)):
    raise errors.ConfigError(
        f'levels={levels.tolist()!r}: each must be a probability strictly '
        f'between 0 and 1, e.g. (0.5, 0.7, 0.95).')
  return levels


def _normal_cdf(z):
  """Standard normal CDF, accurate in both tails (0.5 erfc(-z / sqrt 2))."""
  z = np.asarray(z, np.float64)
  return 0.5 * tf.math.erfc(-z / math.sqrt(2.0)).numpy()


def _normal_quantile(p):
  return tf.math.ndtri(np.asarray(p, np.float64)).numpy()


def gaussian_mixture_cdf(means, stddevs, x) -> np.ndarray:
  """CDF at x [N] of each equal-weight mixture of S Gaussians [S, N]; returns [N]."""
  means, stddevs, x = _regression(means, stddevs, x)
  return _normal_cdf((x[None] - means) / stddevs).mean(axis=0)


def gaussian_mixture_quantiles(means, stddevs, probs, *, tol: float = 1e-10,
                               max_iter: int = 200) -> np.ndarray:
  """Quantiles of each equal-weight mixture of S Gaussians, by bisection.

  The p-quantile lies between the smallest and largest component quantiles
  mu_s + sigma_s ndtri(p), so bisection starts from that bracket, all
  examples and levels at once, until every bracket is narrower than
  tol * (1 + bracket scale).

  Args:
    means: [S, N] component means.
    stddevs: [S, N] or [S, 1] component stddevs, > 0.
    probs: [P] probabilities strictly inside (0, 1).
    tol: relative width at which bisection stops.
    max_iter: bound on the number of halvings.

  Returns:
    [P, N] float64 quantiles.
  """
  means, stddevs = _components(means, stddevs)
  probs = _levels(probs)
  component = means[None] + stddevs[None] * _normal_quantile(probs)[:, None, None]
  lo, hi = component.min(axis=1), component.max(axis=1)  # [P, N]
  scale = 1.0 + np.abs(lo) + np.abs(hi)
  target = probs[:, None]
  for _ in range(max_iter):
    if np.all(hi - lo <= tol * scale):
      break
    mid = 0.5 * (lo + hi)
    cdf = _normal_cdf((mid[:, None] - means[None]) / stddevs[None]).mean(axis=1)
    below = cdf < target
    lo = np.where(below, mid, lo)
    hi = np.where(below, hi, mid)
  return 0.5 * (lo + hi)


def gaussian_mixture_interval_coverage(
    means, stddevs, targets, levels: Sequence[float] = DEFAULT_LEVELS, *,
    method: str = 'mixture') -> Dict[float, float]:
  """Fraction of targets inside the central predictive interval, per level.

  The central level-a interval is [q((1 - a) / 2), q((1 + a) / 2)] of the
  predictive distribution.
    method='mixture' (default, exact): the equal-weight mixture of the S
      Gaussians. Its CDF F is continuous and strictly increasing, so y lies in
      the interval iff (1 - a) / 2 <= F(y) <= (1 + a) / 2; that test is exact
      and is what is computed (`gaussian_mixture_quantiles` gives the same
      interval ends by bisection).
    method='moment_matched': one Gaussian with the mixture's mean and variance
      (mean_s mu_s, mean_s (sigma_s^2 + mu_s^2) - mean^2); cheaper to reason
      about, but wrong for multi-modal predictions.

  Args:
    means: [S, N] predictive means, one row per weight sample.
    stddevs: [S, N] or [S, 1] predictive (aleatoric) stddevs, > 0.
    targets: [N] true values.
    levels: nominal coverages, each in (0, 1).
    method: one of INTERVAL_METHODS.

  Returns:
    {level: fraction of targets covered}; a calibrated model gives ~level.

  Raises:
    DataError: bad arrays. ConfigError: bad levels or method.
  """
  if method not in INTERVAL_METHODS:
    raise errors.ConfigError(
        f'method={method!r}: choose one of {", ".join(INTERVAL_METHODS)}.')
  means, stddevs, targets = _regression(means, stddevs, targets)
  levels_array = _levels(levels)
  if method == 'mixture':
    cdf = _normal_cdf((targets[None] - means) / stddevs).mean(axis=0)
  else:
    mean, stddev = mixture_mean_and_stddev(means, stddevs)
    cdf = _normal_cdf((targets - mean) / stddev)
  lo = (1.0 - levels_array[:, None]) / 2.0
  inside = (cdf[None] >= lo) & (cdf[None] <= 1.0 - lo)
  return {float(a): float(c) for a, c in zip(levels_array, inside.mean(axis=1))}


def rmse(pred_mean, targets) -> float:
  """Root mean squared error of point predictions [N] against targets [N]."""
  pred_mean = _array('pred_mean', pred_mean, 1)
  targets = _array('targets', targets, 1)
  if pred_mean.shape != targets.shape or pred_mean.size == 0:
    raise errors.DataError(
        f'pred_mean {pred_mean.shape} and targets {targets.shape}: need the '
        f'same non-empty shape [N].')
  return float(np.sqrt(np.mean((pred_mean - targets) ** 2)))


def gaussian_mixture_nll_per_example(means, stddevs, targets) -> np.ndarray:
  """-log (1/S) sum_s N(y; mu_s, sigma_s^2) of each example [N], in nats.

  The mixture density is combined in log space (log-mean-exp over the S
  samples), so it stays finite far in the tails.
  """
  means, stddevs, targets = _regression(means, stddevs, targets)
  z = (targets[None] - means) / stddevs
  log_pdf = -0.5 * z ** 2 - np.log(stddevs) - 0.5 * math.log(2.0 * math.pi)
  top = log_pdf.max(axis=0)
  return -(top + np.log(np.mean(np.exp(log_pdf - top), axis=0)))


def gaussian_mixture_nll(means, stddevs, targets) -> float:
  """The mean over examples of `gaussian_mixture_nll_per_example`."""
  return float(np.mean(gaussian_mixture_nll_per_example(means, stddevs, targets)))


def mixture_mean_and_stddev(means, stddevs) -> Tuple[np.ndarray, np.ndarray]:
  """Mean [N] and stddev [N] of each equal-weight mixture (law of total variance)."""
  means, stddevs = _components(means, stddevs)
  mean = means.mean(axis=0)
  var = np.mean(stddevs ** 2 + means ** 2, axis=0) - mean ** 2
  return mean, np.sqrt(np.maximum(var, 0.0))


def paired_difference(a, b) -> Tuple[float, float]:
  """Mean of b - a over the same examples, and its standard error.

  For two runs scored on the same test examples, the per-example differences vary
  far less than either run's figures, so this standard error is what tells whether
  a change bought anything (the two runs' own standard errors overstate it).
  """
  a = _array('a', a, 1)
  b = _array('b', b, 1)
  if a.shape != b.shape or a.size < 2:
    raise errors.DataError(
        f'a {a.shape} and b {b.shape}: need figures of the same examples, at least 2.')
  d = b - a
  return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))
