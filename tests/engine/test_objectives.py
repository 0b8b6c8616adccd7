"""Tests for engine/objectives.py.

Most checks use a linear-Gaussian latent model, where everything is exact:

  z ~ N(0, I_d),  x | z ~ N(W z + b, s^2 I_D)
  p(x)     = N(x; b, W W^T + s^2 I)
  p(z | x) = N(z; m*, S*),  S* = (I + W^T W / s^2)^-1,  m* = S* W^T (x - b) / s^2

TensorFlow runs in float32 (the engine's dtype); reference values are computed in
float64 numpy. All sampling uses stateless seeds, so every run sees the same numbers.
"""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from engine import objectives
from engine import sampling

tfd = tfp.distributions

LATENT_DIM = 2
DATA_DIM = 3
NUM_EXAMPLES = 64
NOISE_SCALE = 0.5

# The imperfect proposal: exact posterior mean shifted by L @ WHITENED_SHIFT (L the
# posterior Cholesky factor) and L inflated by SCALE_INFLATION. In the posterior's
# whitened coordinates q is then the same for every W and x, so the distribution of
# the log-weights log p(x) + log p*(z) - log q(z) - log p(x) is too, and the
# tolerances below do not depend on the model's random draw. KL(q || p*) is
# 0.5 * (2 * 1.5^2 - 2 - 2 log 1.5^2 + 0.5^2 + 0.4^2) = 0.644 nats per example.
WHITENED_SHIFT = np.array([0.5, -0.4])
SCALE_INFLATION = 1.5


@dataclasses.dataclass(frozen=True)
class LinearGaussian:
  """Parameters, data and exact reference quantities of the linear-Gaussian model."""
  w: np.ndarray  # [D, d] float64
  b: np.ndarray  # [D]
  x: np.ndarray  # [B, D]
  log_px: np.ndarray  # [B], exact log p(x)
  post_mean: np.ndarray  # [B, d]
  post_cov: np.ndarray  # [d, d], shared by all examples

  def prior(self):
    return tfd.MultivariateNormalDiag(
        loc=tf.zeros([LATENT_DIM]), scale_diag=tf.ones([LATENT_DIM]))

  def likelihood(self, z):
    """p(x | z) with event = one example; batch shape = z.shape[:-1]."""
    loc = tf.linalg.matvec(tf.constant(self.w, tf.float32), z) + self.b.astype(np.float32)
    return tfd.MultivariateNormalDiag(
        loc=loc, scale_diag=tf.fill([DATA_DIM], tf.constant(NOISE_SCALE, tf.float32)))

  def x32(self):
    return tf.constant(self.x, tf.float32)

  def posterior(self, mean_shift=0.0, scale_inflation=1.0):
    """q(z | x) as MultivariateNormalTriL with batch shape [B] (exact by default)."""
    loc = self.post_mean + mean_shift
    tril = scale_inflation * np.linalg.cholesky(self.post_cov)
    tril = np.broadcast_to(tril, (NUM_EXAMPLES, LATENT_DIM, LATENT_DIM))
    return tfd.MultivariateNormalTriL(
        loc=tf.constant(loc, tf.float32), scale_tril=tf.constant(tril, tf.float32))

  def imperfect_posterior(self):
    shift = np.linalg.cholesky(self.post_cov) @ WHITENED_SHIFT
    return self.posterior(shift, SCALE_INFLATION)

  def exact_elbo(self, q):
    """-(E_q[distortion] + analytic rate), with E_q[distortion] in closed form.

    For a Gaussian likelihood, E_q[-log p(x | z)] = -log p(x | z = mean_q)
    + tr(W Cov_q W^T) / (2 s^2), so only `distortion` at the mean is needed.
    """
    cov = q.covariance().numpy().astype(np.float64)  # [B, d, d]
    trace_term = np.einsum('ij,bjk,ik->b', self.w, cov, self.w) / (2 * NOISE_SCALE**2)
    expected_distortion = (
        objectives.distortion(self.likelihood(q.mean()), self.x32()).numpy() + trace_term)
    rate = objectives.analytic_rate(q, self.prior()).numpy()
    return -(expected_distortion + rate)


@pytest.fixture(scope='module')
def model():
  rng = np.random.default_rng(1234)
  w = rng.normal(size=(DATA_DIM, LATENT_DIM))
  b = rng.normal(size=DATA_DIM)
  z = rng.normal(size=(NUM_EXAMPLES, LATENT_DIM))
  x = z @ w.T + b + NOISE_SCALE * rng.normal(size=(NUM_EXAMPLES, DATA_DIM))
  # Round to float32 first so that the float32 TF model sees the same numbers.
  w, b, x = (a.astype(np.float32).astype(np.float64) for a in (w, b, x))

  cov_x = w @ w.T + NOISE_SCALE**2 * np.eye(DATA_DIM)
  diff = x - b
  _, logdet = np.linalg.slogdet(cov_x)
  mahalanobis = np.einsum('bi,ij,bj->b', diff, np.linalg.inv(cov_x), diff)
  log_px = -0.5 * (DATA_DIM * np.log(2 * np.pi) + logdet + mahalanobis)

  post_cov = np.linalg.inv(np.eye(LATENT_DIM) + w.T @ w / NOISE_SCALE**2)
  post_mean = diff @ w @ post_cov.T / NOISE_SCALE**2
  return LinearGaussian(w=w, b=b, x=x, log_px=log_px, post_mean=post_mean,
                        post_cov=post_cov)


def _iw_log_likelihood_fn(model_):
  """A tf.function around `iw_log_likelihood` for the model (the loop is a while_loop)."""

  @tf.function
  def run(loc, scale_tril, *, num_samples, chunk_size, seed):
    q = tfd.MultivariateNormalTriL(loc=loc, scale_tril=scale_tril)
    return objectives.iw_log_likelihood(
        q, model_.prior(), model_.likelihood, model_.x32(),
        num_samples=num_samples, chunk_size=chunk_size, noise=sampling.Noise(seed))

  def call(q, **kwargs):
    return run(q.loc, q.scale.to_dense(), **kwargs).numpy()

  return call


@pytest.fixture(scope='module')
def iw_log_likelihood(model):
  return _iw_log_likelihood_fn(model)


def _se_of_mean(per_example_samples):
  """Standard error of the grand mean of a [n, B] array, each column its own mean.

  The grand mean is the mean over examples of per-example sample means; examples
  are independent, so its variance is sum_b var_b / n / B^2.
  """
  n, b = per_example_samples.shape
  return np.sqrt(np.sum(np.var(per_example_samples, axis=0, ddof=1)) / n) / b


# ---------------------------------------------------------------------------
# Linear-Gaussian model: ELBO <= IWAE_k <= log p(x).
# ---------------------------------------------------------------------------


def test_reference_posterior_is_exact(model):
  """The fixture's closed forms agree: log p(x) = log p(x|z) + log p(z) - log p*(z|x).

  Guards the reference values every other linear-Gaussian test relies on, at a z
  far from the posterior mean (where a wrong m* or S* would show).
  """
  z = np.tile([[1.5, -2.0]], (NUM_EXAMPLES, 1))
  post = tfd.MultivariateNormalFullCovariance(
      loc=model.post_mean, covariance_matrix=model.post_cov)
  joint = (tfd.MultivariateNormalDiag(loc=z @ model.w.T + model.b,
                                      scale_diag=np.full(DATA_DIM, NOISE_SCALE))
           .log_prob(model.x)
           + tfd.MultivariateNormalDiag(loc=np.zeros(LATENT_DIM)).log_prob(z))
  np.testing.assert_allclose(joint - post.log_prob(z), model.log_px, rtol=0, atol=1e-9)
  # And p(x) agrees with TFP's own full-covariance MVN.
  marginal = tfd.MultivariateNormalFullCovariance(
      loc=model.b, covariance_matrix=model.w @ model.w.T + NOISE_SCALE**2 * np.eye(DATA_DIM))
  np.testing.assert_allclose(marginal.log_prob(model.x), model.log_px, rtol=0, atol=1e-9)


def test_elbo_gap_is_kl_to_true_posterior(model):
  """log p(x) - ELBO equals KL(q || p(z|x)) exactly, so ELBO < log p(x) for a bad q.

  ELBO is -(E_q distortion + analytic_rate); the identity checks `distortion` and
  `analytic_rate` together, not just the sign of the gap.
  """
  q = model.imperfect_posterior()
  elbo = model.exact_elbo(q)
  kl_to_posterior = tfd.kl_divergence(q, model.posterior()).numpy()
  np.testing.assert_allclose(model.log_px - elbo, kl_to_posterior, rtol=0, atol=2e-4)
  np.testing.assert_allclose(model.log_px - elbo, 0.6441, rtol=0, atol=2e-4)


def test_iwae_bound_increases_with_k_towards_log_px(model):
  """E[IWAE_k] = ELBO at k=1, grows with k in {1, 10, 100, 1000}, stays <= log p(x).

  One pool of N = 20000 samples per example is cut into N / k disjoint groups of k;
  the mean over groups is an unbiased estimate of E[IWAE_k]. Tolerances are 4
  standard errors of those estimates; the growth margins are about a third of the
  observed steps (0.60, 0.031, 0.0031 nats), which follow the theoretical
  -Var(w / p(x)) / (2k) behaviour of the gap.
  """
  num_samples = 20000
  q = model.imperfect_posterior()
  prior = model.prior()
  z = q.sample(num_samples, seed=tf.constant([11, 12]))  # [N, B, d]
  log_w = objectives.log_importance_weights(
      q, prior, model.likelihood, model.x32(), z).numpy()  # [N, B]
  assert log_w.shape == (num_samples, NUM_EXAMPLES)

  elbo = model.exact_elbo(q)
  log_px = model.log_px
  mean_gap = {}  # k -> mean over groups and examples of IWAE_k - log p(x)
  se = {}
  for k in (1, 10, 100, 1000):
    groups = num_samples // k
    # [N, B] -> [k, groups * B]: each column is one group of k samples of one example.
    grouped = log_w.reshape(groups, k, NUM_EXAMPLES).transpose(1, 0, 2)
    bound = objectives.iwae_bound(
        tf.constant(grouped.reshape(k, groups * NUM_EXAMPLES))).numpy()
    gaps = bound.reshape(groups, NUM_EXAMPLES) - log_px
    mean_gap[k] = gaps.mean()
    se[k] = _se_of_mean(gaps)
    # IWAE_k <= log p(x) in expectation.
    assert mean_gap[k] <= 4 * se[k], (k, mean_gap[k], se[k])

  # IWAE_1 is the Monte-Carlo ELBO: unbiased for the exact ELBO.
  assert abs(mean_gap[1] - (elbo - log_px).mean()) < 4 * se[1], (mean_gap[1], se[1])
  # ELBO <= E[IWAE_k] for k > 1, strictly here.
  assert (elbo - log_px).mean() < mean_gap[10] - 0.3
  # The bound tightens with k.
  assert mean_gap[10] - mean_gap[1] > 0.3
  assert mean_gap[100] - mean_gap[10] > 0.01
  assert mean_gap[1000] - mean_gap[100] > 0.001
  # ... and is nearly tight at k = 1000 (expected gap ~3e-4 nats).
  assert abs(mean_gap[1000]) < 0.003


def test_iw_log_likelihood_converges_to_log_px(model, iw_log_likelihood):
  """iw_log_likelihood with K=5000 recovers log p(x) from a deliberately poor q.

  With this q the per-example estimate has standard deviation ~0.012 nats
  (sqrt(Var(w/p)/K)); observed mean |error| 0.008-0.010 over seeds, so 0.015 is a
  ~6 sigma margin for a 64-example mean. The signed batch mean has standard error
  ~0.0015, so |mean error| < 0.006. Reusing one seed for every chunk (effective
  K = chunk_size) or a missing log K would miss these by an order of magnitude.
  """
  q = model.imperfect_posterior()
  est = iw_log_likelihood(q, num_samples=5000, chunk_size=500, seed=tf.constant([3, 4]))
  err = est - model.log_px
  assert est.shape == (NUM_EXAMPLES,)
  assert np.mean(np.abs(err)) < 0.015, np.mean(np.abs(err))
  assert abs(np.mean(err)) < 0.006, np.mean(err)


def test_exact_posterior_gives_log_px_for_every_sample(model, iw_log_likelihood):
  """With q = p(z|x) every log-weight is log p(x), so IWAE_k = ELBO = log p(x) for all k.

  Float32 tolerance: |log p(x)| here is < 20, so 1e-4 absolute is a few ulps of
  accumulated rounding. Also checks the zero-variance single-sample identity
  -(distortion(z) + monte_carlo_rate(z)) = log p(x).
  """
  q = model.posterior()
  prior = model.prior()
  x = model.x32()
  z = q.sample(200, seed=tf.constant([5, 6]))
  log_w = objectives.log_importance_weights(q, prior, model.likelihood, x, z).numpy()
  np.testing.assert_allclose(log_w, np.broadcast_to(model.log_px, log_w.shape),
                             rtol=0, atol=1e-4)
  for k in (1, 7, 200):
    np.testing.assert_allclose(objectives.iwae_bound(tf.constant(log_w[:k])).numpy(),
                               model.log_px, rtol=0, atol=1e-4)
  np.testing.assert_allclose(model.exact_elbo(q), model.log_px, rtol=0, atol=1e-4)

  single_z = z[0]
  mc_elbo = -(objectives.distortion(model.likelihood(single_z), x)
              + objectives.monte_carlo_rate(q, prior, single_z))
  np.testing.assert_allclose(mc_elbo.numpy(), model.log_px, rtol=0, atol=1e-4)

  est = iw_log_likelihood(q, num_samples=100, chunk_size=10, seed=tf.constant([7, 8]))
  np.testing.assert_allclose(est, model.log_px, rtol=0, atol=1e-4)


@pytest.mark.parametrize('chunk_size', [10, 50, 1000])
def test_iw_log_likelihood_accuracy_does_not_depend_on_chunking(
    model, iw_log_likelihood, chunk_size):
  """Any chunk size with the same total K=5000 gives the same accuracy.

  Same tolerances as the K=5000 convergence test (observed mean |error|
  0.008-0.010 for all three chunk sizes). A chunked loop that dropped or repeated
  chunks would use an effective K of chunk_size and fail for 10 and 50.
  """
  q = model.imperfect_posterior()
  est = iw_log_likelihood(q, num_samples=5000, chunk_size=chunk_size,
                          seed=tf.constant([21, chunk_size]))
  err = est - model.log_px
  assert np.mean(np.abs(err)) < 0.015, np.mean(np.abs(err))
  assert abs(np.mean(err)) < 0.006, np.mean(err)


def test_iw_log_likelihood_rejects_ragged_chunks(model):
  """num_samples not a multiple of chunk_size raises ValueError (before any sampling)."""
  with pytest.raises(ValueError, match='multiple of'):
    objectives.iw_log_likelihood(
        model.imperfect_posterior(), model.prior(), model.likelihood, model.x32(),
        num_samples=1001, chunk_size=10, noise=sampling.Noise(tf.constant([1, 2])))


def test_iw_log_likelihood_is_deterministic_in_stateless_seed(model, iw_log_likelihood):
  """A fixed [2] int32 seed reproduces bit-identical estimates; another seed differs.

  Also runs once eagerly to show the seed path works outside tf.function too.
  """
  q = model.imperfect_posterior()
  seed = tf.constant([17, 42], tf.int32)
  first = iw_log_likelihood(q, num_samples=200, chunk_size=50, seed=seed)
  second = iw_log_likelihood(q, num_samples=200, chunk_size=50, seed=seed)
  np.testing.assert_array_equal(first, second)
  eager = objectives.iw_log_likelihood(
      q, model.prior(), model.likelihood, model.x32(),
      num_samples=200, chunk_size=50, noise=sampling.Noise(seed)).numpy()
  np.testing.assert_allclose(eager, first, rtol=0, atol=1e-5)
  other = iw_log_likelihood(q, num_samples=200, chunk_size=50,
                            seed=tf.constant([17, 43], tf.int32))
  assert np.all(other != first)


# ---------------------------------------------------------------------------
# Monte-Carlo KL.
# ---------------------------------------------------------------------------


def _diag_posterior(rng, batch, dim):
  return tfd.MultivariateNormalDiag(
      loc=tf.constant(rng.normal(size=(batch, dim)), tf.float32),
      scale_diag=tf.constant(rng.uniform(0.3, 1.5, size=(batch, dim)), tf.float32))


def _tril_posterior(rng, batch, dim):
  tril = np.tril(rng.normal(scale=0.4, size=(batch, dim, dim)), -1)
  tril += np.eye(dim) * rng.uniform(0.3, 1.5, size=(batch, 1, dim))
  return tfd.MultivariateNormalTriL(
      loc=tf.constant(rng.normal(size=(batch, dim)), tf.float32),
      scale_tril=tf.constant(tril, tf.float32))


def _numpy_gaussian_kl_to_standard_normal(mean, cov):
  """KL(N(mean, cov) || N(0, I)) per example in float64."""
  dim = mean.shape[-1]
  _, logdet = np.linalg.slogdet(cov)
  return 0.5 * (np.trace(cov, axis1=-2, axis2=-1) + np.sum(mean**2, -1) - dim - logdet)


@pytest.mark.parametrize('make_posterior', [_diag_posterior, _tril_posterior],
                         ids=['diag', 'tril'])
def test_monte_carlo_rate_is_unbiased_for_analytic_rate(make_posterior):
  """monte_carlo_rate over S=20000 samples [S, B, d] matches analytic_rate per example.

  The tolerance is 4 standard errors of the per-sample log-ratio, estimated from
  the same samples; the standard error is also checked to be small (< 3% of the
  KL), so the comparison has teeth. analytic_rate is itself checked against the
  numpy closed form.
  """
  batch, dim, num_samples = 8, 3, 20000
  q = make_posterior(np.random.default_rng(7), batch, dim)
  prior = tfd.MultivariateNormalDiag(loc=tf.zeros([dim]), scale_diag=tf.ones([dim]))

  analytic = objectives.analytic_rate(q, prior).numpy()
  assert analytic.shape == (batch,)
  reference = _numpy_gaussian_kl_to_standard_normal(
      q.mean().numpy().astype(np.float64), q.covariance().numpy().astype(np.float64))
  np.testing.assert_allclose(analytic, reference, rtol=1e-4, atol=1e-5)

  z = q.sample(num_samples, seed=tf.constant([1, 2]))  # [S, B, d]
  mc = objectives.monte_carlo_rate(q, prior, z).numpy()
  assert mc.shape == (batch,)
  log_ratio = (q.log_prob(z) - prior.log_prob(z)).numpy()
  se = log_ratio.std(axis=0, ddof=1) / np.sqrt(num_samples)
  assert np.all(se < 0.03 * analytic), (se, analytic)
  np.testing.assert_allclose(mc, log_ratio.mean(axis=0), rtol=1e-5, atol=1e-5)
  assert np.all(np.abs(mc - analytic) < 4 * se), (mc - analytic, se)


@pytest.mark.parametrize('make_posterior', [_diag_posterior, _tril_posterior],
                         ids=['diag', 'tril'])
def test_monte_carlo_rate_single_sample_has_batch_shape(make_posterior):
  """With z of shape [B, d] (no sample axis) the result is the per-example log ratio, [B]."""
  batch, dim = 5, 2
  q = make_posterior(np.random.default_rng(3), batch, dim)
  prior = tfd.MultivariateNormalDiag(loc=tf.zeros([dim]), scale_diag=tf.ones([dim]))
  z = q.sample(seed=tf.constant([4, 5]))
  mc = objectives.monte_carlo_rate(q, prior, z)
  assert mc.shape == (batch,)
  np.testing.assert_allclose(mc.numpy(), (q.log_prob(z) - prior.log_prob(z)).numpy(),
                             rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# iwae_bound on hand-made log-weights.
# ---------------------------------------------------------------------------


def test_iwae_bound_matches_numpy_log_mean_exp():
  """iwae_bound(lw) = log(mean_k exp(lw[k])) per column, and K=1 returns lw itself."""
  lw = np.random.default_rng(0).normal(scale=3.0, size=(37, 6))
  expected = np.log(np.mean(np.exp(lw), axis=0))
  got = objectives.iwae_bound(tf.constant(lw, tf.float32)).numpy()
  assert got.shape == (6,)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(objectives.iwae_bound(tf.constant(lw[:1], tf.float32)).numpy(),
                             lw[0], rtol=1e-6, atol=1e-6)
  # Equal weights: log mean = the common value whatever K (the -log K is there).
  flat = objectives.iwae_bound(tf.fill([1000, 2], -3.25)).numpy()
  np.testing.assert_allclose(flat, [-3.25, -3.25], rtol=0, atol=1e-5)


@pytest.mark.parametrize('offset', [-1e4, 1e4])
def test_iwae_bound_is_stable_for_large_magnitudes(offset):
  """Log-weights around +-1e4 (exp under/overflows) still give the exact finite value.

  Reference: offset + log mean exp(lw - offset) in float64. Float32 spacing near
  1e4 is ~1e-3, so the tolerance is 4e-3.
  """
  small = np.random.default_rng(1).normal(scale=2.0, size=(50, 4))
  lw = offset + small
  expected = offset + np.log(np.mean(np.exp(small), axis=0))
  with np.errstate(over='ignore', divide='ignore'):
    assert not np.all(np.isfinite(np.log(np.mean(np.exp(lw.astype(np.float32)), 0))))
  got = objectives.iwae_bound(tf.constant(lw, tf.float32)).numpy()
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, expected, rtol=0, atol=4e-3)


# ---------------------------------------------------------------------------
# KL warm-up and negative ELBO.
# ---------------------------------------------------------------------------


def test_kl_warmup_weight_is_linear_then_one():
  """0 at step 0, 0.5 halfway, 0.25 a quarter in, 1 at and after warmup_steps."""
  cases = [(0, 0.0), (25, 0.25), (50, 0.5), (100, 1.0), (101, 1.0), (10_000, 1.0)]
  for step, expected in cases:
    got = objectives.kl_warmup_weight(step, 100)
    assert got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-7, err_msg=str(step))
  # A tensor step (as in a training loop) inside tf.function.
  fn = tf.function(lambda s: objectives.kl_warmup_weight(s, 100))
  np.testing.assert_allclose(fn(tf.constant(50, tf.int64)).numpy(), 0.5, atol=1e-7)


def test_kl_warmup_weight_without_warmup_is_one():
  """warmup_steps == 0 means no warm-up: weight 1.0 from step 0 (no division by zero)."""
  for step in (0, 1, 1000):
    w = objectives.kl_warmup_weight(step, 0)
    assert w.numpy() == 1.0


def test_negative_elbo_weights_the_rate():
  """negative_elbo = distortion + w * rate per example, w = 1 by default."""
  distortion = tf.constant([1.0, 2.5, -0.5])
  rate = tf.constant([0.25, 4.0, 1.0])
  np.testing.assert_allclose(objectives.negative_elbo(distortion, rate).numpy(),
                             [1.25, 6.5, 0.5], rtol=1e-6)
  np.testing.assert_allclose(objectives.negative_elbo(distortion, rate, 0.5).numpy(),
                             [1.125, 4.5, 0.0], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(objectives.negative_elbo(distortion, rate, 0.0).numpy(),
                             distortion.numpy(), rtol=0)
  # The warm-up weight (a float32 tensor) plugs straight in.
  warm = objectives.kl_warmup_weight(30, 120)
  np.testing.assert_allclose(objectives.negative_elbo(distortion, rate, warm).numpy(),
                             [1.0625, 3.5, -0.25], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# Cross-replica reduction.
# ---------------------------------------------------------------------------

GLOBAL_BATCH = 8
PER_EXAMPLE = np.array([0.5, 1.25, -2.0, 3.0, 0.75, 4.5, -1.0, 2.0])
REGULARIZATION = 0.625


@pytest.mark.parametrize('num_replicas', [1, 2, 4])
def test_replica_losses_sum_to_global_mean_plus_regularization(num_replicas):
  """Summing replica_loss over R equal shards gives mean(global batch) + r, for any R.

  This is what all-reduce sees, so the training loss must not depend on R.
  """
  shards = np.split(PER_EXAMPLE.astype(np.float32), num_replicas)
  total = sum(
      objectives.replica_loss(tf.constant(shard), tf.constant(REGULARIZATION),
                              global_batch_size=GLOBAL_BATCH,
                              num_replicas=num_replicas).numpy()
      for shard in shards)
  np.testing.assert_allclose(total, PER_EXAMPLE.mean() + REGULARIZATION, rtol=1e-6)
  # global_batch_mean alone sums to the plain mean.
  mean_parts = sum(objectives.global_batch_mean(tf.constant(shard), GLOBAL_BATCH).numpy()
                   for shard in shards)
  np.testing.assert_allclose(mean_parts, PER_EXAMPLE.mean(), rtol=1e-6)


@pytest.mark.parametrize('num_replicas', [1, 2, 4])
def test_summed_replica_gradients_equal_single_replica_gradient(num_replicas):
  """Sum over shards of d(replica_loss)/d(theta) = d(global loss)/d(theta).

  theta scales the per-example losses linearly and the regularization
  quadratically, so a regularizer counted R times (or per-example terms divided by
  the local batch size) would change the gradient.
  """
  theta = tf.Variable(1.7)

  def losses(per_example):
    return theta * per_example, theta**2 * REGULARIZATION

  with tf.GradientTape() as tape:
    per_example, reg = losses(tf.constant(PER_EXAMPLE, tf.float32))
    global_loss = objectives.replica_loss(per_example, reg, global_batch_size=GLOBAL_BATCH,
                                          num_replicas=1)
  expected = tape.gradient(global_loss, theta).numpy()
  np.testing.assert_allclose(expected, PER_EXAMPLE.mean() + 2 * 1.7 * REGULARIZATION,
                             rtol=1e-6)

  summed = 0.0
  for shard in np.split(PER_EXAMPLE.astype(np.float32), num_replicas):
    with tf.GradientTape() as tape:
      per_example, reg = losses(tf.constant(shard))
      loss = objectives.replica_loss(per_example, reg, global_batch_size=GLOBAL_BATCH,
                                     num_replicas=num_replicas)
    summed += tape.gradient(loss, theta).numpy()
  np.testing.assert_allclose(summed, expected, rtol=1e-6)


# log q(z) of the posterior's own reparameterized sample, from eps.


def _ill_conditioned_tril(dtype):
  """Lower-triangular scales with diagonal 0.1 and N(0, 0.5^2) entries below it
  (d = 16): condition numbers near 4e11, and eps [5, 3, d] that make z."""
  rng = np.random.RandomState(0)
  dim = 16
  scale = np.tril(rng.normal(0, 0.5, (3, dim, dim)), -1) + 0.1 * np.eye(dim)
  eps = rng.normal(size=(5, 3, dim))
  q = tfd.MultivariateNormalTriL(loc=rng.normal(size=(3, dim)).astype(dtype),
                                 scale_tril=scale.astype(dtype))
  return q, tf.constant(eps.astype(dtype))


@pytest.mark.parametrize('make_posterior', [_diag_posterior, _tril_posterior],
                         ids=['diag', 'tril'])
def test_reparameterized_log_prob_equals_log_prob(make_posterior):
  q = make_posterior(np.random.default_rng(5), 4, 3)
  eps = tf.random.stateless_normal([7, 4, 3], seed=[1, 1])
  z = q.loc + q.scale.matvec(eps)
  np.testing.assert_allclose(objectives.reparameterized_log_prob(q, eps).numpy(),
                             q.log_prob(z).numpy(), rtol=1e-5, atol=1e-4)
  with pytest.raises(TypeError, match='location-scale'):
    objectives.reparameterized_log_prob(tfd.Independent(tfd.Laplace(q.loc, 1.0), 1), eps)


def test_reparameterized_log_prob_stays_exact_where_the_triangular_solve_fails():
  """In float32, `log_prob` of an ill-conditioned full-covariance q at its own sample
  is thousands of nats off (it solves scale^-1 (z - loc)); from eps it matches the
  float64 value, which float64's solve confirms."""
  q32, eps32 = _ill_conditioned_tril(np.float32)
  q64, eps64 = _ill_conditioned_tril(np.float64)
  exact = q64.log_prob(q64.loc + q64.scale.matvec(eps64)).numpy()
  np.testing.assert_allclose(objectives.reparameterized_log_prob(q64, eps64).numpy(), exact,
                             rtol=1e-6, atol=1e-4)
  np.testing.assert_allclose(objectives.reparameterized_log_prob(q32, eps32).numpy(), exact,
                             rtol=1e-5, atol=1e-3)
  solved = q32.log_prob(q32.loc + q32.scale.matvec(eps32)).numpy()
  assert np.max(np.abs(solved - exact)) > 100.0  # why the engine does not use it


def test_monte_carlo_rate_and_importance_weights_take_log_q_from_eps():
  """With the ill-conditioned q, the Monte-Carlo rate from eps averages to the
  analytic KL, and the log-likelihood estimate of a model whose prior and likelihood
  are known equals the exact one; scored by `log_prob` both are far off."""
  q, _ = _ill_conditioned_tril(np.float32)
  prior = tfd.MultivariateNormalDiag(loc=tf.zeros([16]), scale_diag=tf.ones([16]))
  z, log_q = objectives.sample_with_log_prob(q, 4000, sampling.Noise(tf.constant([3, 3])))
  assert z.shape == (4000, 3, 16) and log_q.shape == (4000, 3)
  mc = objectives.monte_carlo_rate(q, prior, z, log_q=log_q).numpy()
  log_ratio = (log_q - prior.log_prob(z)).numpy()
  se = log_ratio.std(axis=0, ddof=1) / np.sqrt(4000)
  analytic = objectives.analytic_rate(q, prior).numpy()
  assert np.all(np.abs(mc - analytic) < 4 * se), (mc, analytic, se)
  assert np.max(np.abs(objectives.monte_carlo_rate(q, prior, z).numpy() - analytic)) > 100.0
  # The log-likelihood estimate scores each chunk's draws from their eps: the same
  # figure by hand, from the chunks' noise (chunk i: fold(i), rows on axis 1).
  x = tf.constant(np.random.RandomState(1).normal(size=(3, 16)).astype(np.float32))
  likelihood_fn = lambda zs: tfd.Independent(tfd.Normal(zs, 1.0), 1)
  seed = tf.constant([1, 2])
  est = objectives.iw_log_likelihood(q, prior, likelihood_fn, x, num_samples=40,
                                     chunk_size=20, noise=sampling.Noise(seed)).numpy()
  log_w = []
  for i in range(2):
    eps = sampling.Noise(seed).fold(i).normal([20, 3, 16], batch_axis=1)
    zs = q.loc + q.scale.matvec(eps)
    log_w.append(likelihood_fn(zs).log_prob(x) + prior.log_prob(zs)
                 - objectives.reparameterized_log_prob(q, eps))
  np.testing.assert_allclose(est, objectives.iwae_bound(tf.concat(log_w, 0)).numpy(),
                             rtol=1e-5, atol=1e-3)
  assert np.all(np.isfinite(est)) and np.all(est < 0)
