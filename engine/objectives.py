"""Variational objectives as pure functions: ELBO terms, IWAE, log-likelihood, KL scaling.

Vocabulary (as in the literature and TFP's examples):
  distortion = -log p(x | z)                 (per example)
  rate       = KL(q(z | x) || p(z))           (per example)
  elbo       = -(distortion + rate)
Everything here is per example unless a name says otherwise; reduction over the
global batch happens in exactly one place, `replica_loss`.
"""

import math

import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions

KL_ESTIMATORS = ('analytic', 'monte_carlo', 'regularizer')
# The salt of the stream of a prior's own draws (`latent_log_prob`): folded into an
# importance chunk's seed here, and into a step's noise by the model.
PRIOR_NOISE_SALT = 0xB7
OBJECTIVES = ('elbo', 'iwae')


def distortion(likelihood, x):
  """-log p(x | z) per example; `likelihood` is p(x | z) with event = one example."""
  return -likelihood.log_prob(x)


def analytic_rate(approx_posterior, latent_prior):
  """KL(q || p) per example in closed form (`tfd.kl_divergence`)."""
  return tfd.kl_divergence(approx_posterior, latent_prior)


def _is_location_scale_normal(distribution):
  """A `tfd.MultivariateNormalLinearOperator`, also when a tfp.layers layer returned
  it wrapped (its `tensor_distribution`)."""
  inner = getattr(distribution, 'tensor_distribution', distribution)
  return isinstance(inner, tfd.MultivariateNormalLinearOperator)


def reparameterized_sample(approx_posterior, eps):
  """z = loc + scale @ eps for a location-scale normal q and standard-normal eps
  [..., B, d]."""
  return approx_posterior.loc + approx_posterior.scale.matvec(eps)


def standard_normal_log_prob(eps):
  """log N(eps; 0, I) for eps [..., d], summed over the last axis; returns [...]."""
  d = tf.cast(tf.shape(eps)[-1], eps.dtype)
  return -0.5 * tf.reduce_sum(tf.square(eps), axis=-1) - 0.5 * d * math.log(2 * math.pi)


def reparameterized_log_prob(approx_posterior, eps):
  """log q(z) at the reparameterized sample z = loc + scale @ eps, from eps.

  For a location-scale normal q (`tfd.MultivariateNormalLinearOperator`: the diagonal
  and the full-covariance posteriors) log q(z) = log N(eps; 0, I) - log|det scale|.
  This equals `q.log_prob(z)` in exact arithmetic, but `log_prob` recovers eps by
  solving scale^-1 (z - loc), and in float32 that solve's error grows with the
  condition number of a lower-triangular scale: a full-covariance posterior with a
  small diagonal and large off-diagonal entries returns log q(z) thousands of nats
  or more too low for its own sample (tests/engine/test_objectives.py builds one),
  which makes a Monte-Carlo rate or an importance weight explode.

  Args:
    approx_posterior: q(z | x), batch shape [B], event [d].
    eps: [..., B, d] standard-normal draws that made z.

  Returns:
    [..., B].
  """
  if not _is_location_scale_normal(approx_posterior):
    raise TypeError(f'reparameterized_log_prob needs a location-scale normal q(z|x), '
                    f'got {type(approx_posterior).__name__}.')
  return standard_normal_log_prob(eps) - approx_posterior.scale.log_abs_determinant()


def sample_with_log_prob(approx_posterior, num, noise):
  """`num` draws z ~ q [num, B, d] and log q(z) [num, B] (`noise`: an
  `engine.sampling.Noise`, whose rows are q's batch).

  A location-scale normal q is sampled as loc + scale @ eps and scored from eps
  (`reparameterized_log_prob`), eps per example from `noise`; any other q by its own
  `sample` (seeded by noise.seed: not per global row) and `log_prob`.
  """
  if _is_location_scale_normal(approx_posterior):
    loc = approx_posterior.loc
    eps = noise.normal([num, tf.shape(loc)[0], loc.shape[-1]], batch_axis=1,
                       dtype=loc.dtype)
    return (reparameterized_sample(approx_posterior, eps),
            reparameterized_log_prob(approx_posterior, eps))
  z = approx_posterior.sample(num, seed=noise.seed)
  return z, approx_posterior.log_prob(z)


def latent_log_prob(latent_prior, z, prior_noise=None):
  """log p(z) for z [..., d]: `latent_prior.log_prob(z)`, or for a prior whose
  log-density is a one-sample estimate (`log_prob_needs_noise`, e.g. the
  hierarchical prior of models/latent_priors.py) `log_prob(z, prior_noise)`.

  Raises:
    ValueError: such a prior without `prior_noise` (an `engine.sampling.Noise`).
  """
  if not getattr(latent_prior, 'log_prob_needs_noise', False):
    return latent_prior.log_prob(z)
  if prior_noise is None:
    raise ValueError(f'{type(latent_prior).__name__}.log_prob draws its own latent '
                     f'sample: pass prior_noise (an engine.sampling.Noise).')
  return latent_prior.log_prob(z, prior_noise)


def monte_carlo_rate(approx_posterior, latent_prior, z, log_q=None, prior_noise=None):
  """Single- or multi-sample estimate of KL(q || p) per example.

  Args:
    approx_posterior: q(z | x), batch shape [B].
    latent_prior: p(z), broadcastable against q.
    z: samples from q, shape [B, d] or [S, B, d]; a leading sample axis is averaged.
    log_q: optional log q(z) of the same shape as z without its last axis (e.g. from
      `reparameterized_log_prob`); default `approx_posterior.log_prob(z)`.
    prior_noise: the noise of a prior whose log-density is a one-sample estimate
      (`latent_log_prob`); the rate is then the two-layer model's, whose expectation
      is the KL from q(z | x) q(u | z) to p(z | u) p(u).

  Returns:
    [B] tensor; unbiased for the analytic KL when z ~ q.
  """
  log_q = approx_posterior.log_prob(z) if log_q is None else log_q
  log_ratio = log_q - latent_log_prob(latent_prior, z, prior_noise)
  if log_ratio.shape.rank == 2:
    log_ratio = tf.reduce_mean(log_ratio, axis=0)
  return log_ratio


def negative_elbo(distortion_, rate, kl_weight=1.0):
  """distortion + kl_weight * rate, per example (kl_weight < 1 only during warm-up)."""
  return distortion_ + tf.cast(kl_weight, rate.dtype) * rate


def importance_weight_terms(approx_posterior, latent_prior, likelihood_fn, x, z, log_q=None,
                            prior_noise=None):
  """The three terms of the log importance weights of samples z [K, B, d]:
  (log p(x | z), log p(z), log q(z | x)), each [K, B]. `log_q`: optional log q(z)
  (default `approx_posterior.log_prob(z)`); `prior_noise`: see `latent_log_prob` (the
  weights are then those of joint samples (z, u) of a two-layer model)."""
  log_q = approx_posterior.log_prob(z) if log_q is None else log_q
  return (likelihood_fn(z).log_prob(x), latent_log_prob(latent_prior, z, prior_noise),
          log_q)


def log_importance_weights(approx_posterior, latent_prior, likelihood_fn, x, z, log_q=None,
                           prior_noise=None):
  """log p(x, z) - log q(z | x) for samples z of shape [K, B, d]; returns [K, B]
  (arguments as in `importance_weight_terms`)."""
  log_px, log_pz, log_q = importance_weight_terms(
      approx_posterior, latent_prior, likelihood_fn, x, z, log_q=log_q,
      prior_noise=prior_noise)
  return log_px + log_pz - log_q


def iwae_bound(log_weights):
  """The importance-weighted bound log (1/K) sum_k w_k per example.

  Args:
    log_weights: [K, B] log importance weights.

  Returns:
    [B]; K = 1 gives the (Monte-Carlo) ELBO, and the bound tightens as K grows.
  """
  k = tf.cast(tf.shape(log_weights)[0], log_weights.dtype)
  return tf.reduce_logsumexp(log_weights, axis=0) - tf.math.log(k)


def iw_log_likelihood(approx_posterior, latent_prior, likelihood_fn, x, *,
                      num_samples, chunk_size, noise):
  """Importance-sampled estimate of log p(x) in nats, computed in chunks.

  Memory is bounded by `chunk_size` decoder evaluations per example at a time; only
  the [num_samples, B] log-weights are kept, which is small.

  Args:
    approx_posterior: q(z | x), the proposal, batch shape [B].
    latent_prior: p(z).
    likelihood_fn: z [C, B, d] -> p(x | z) with batch shape [C, B].
    x: the batch, shape [B, ...].
    num_samples: K, a Python int, a multiple of chunk_size.
    chunk_size: samples drawn per chunk (Python int).
    noise: an `engine.sampling.Noise` (rows: x's examples); chunk i draws from
      noise.fold(i).

  Returns:
    [B] estimates of log p(x) (a stochastic lower bound in expectation, tight as K grows).
  """
  if num_samples % chunk_size:
    raise ValueError(f'num_samples={num_samples} must be a multiple of '
                     f'chunk_size={chunk_size}')
  num_chunks = num_samples // chunk_size

  def chunk(i, log_weights):
    chunk_noise = noise.fold(i)
    z, log_q = sample_with_log_prob(approx_posterior, chunk_size, chunk_noise)
    prior_noise = chunk_noise.fold(PRIOR_NOISE_SALT)
    return i + 1, log_weights.write(
        i, log_importance_weights(approx_posterior, latent_prior, likelihood_fn, x, z,
                                  log_q=log_q, prior_noise=prior_noise))

  # An explicit while_loop: the loops trace model code without autograph (engine.loop).
  _, log_weights = tf.while_loop(
      lambda i, _: i < num_chunks, chunk,
      (tf.constant(0), tf.TensorArray(approx_posterior.dtype, size=num_chunks)))
  stacked = log_weights.concat()  # [num_samples, B]
  return iwae_bound(stacked)


def kl_warmup_weight(step, warmup_steps):
  """Linear KL warm-up: 0 -> 1 over `warmup_steps` steps (1 when warmup_steps == 0)."""
  if warmup_steps <= 0:
    return tf.constant(1.0)
  step = tf.cast(step, tf.float32)
  return tf.minimum(1.0, step / float(warmup_steps))


KL_SCHEDULES = ('uniform', 'blundell')


def kl_per_example_weight(step, *, num_examples, global_batch_size, schedule='uniform'):
  """The weight of a BNN's weight-KL in one minibatch's *per-example* loss.

  The variational free energy of the whole training set is
      F = sum_n E_q[-log p(y_n | x_n, W)] + KL(q(W) || p(W)).
  Per example, the minibatch loss is mean_b NLL_b + w_i * KL with w_i chosen so that
  summing (per-example loss x batch size) over the M minibatches of one epoch gives F,
  i.e. B * sum_i w_i = 1 when N = M * B:
  - 'uniform': w_i = 1 / N (the usual "divide the KL by the number of examples");
  - 'blundell': w_i = pi_i * M / N with pi_i = 2^(M-i) / (2^M - 1), i = 1..M the
    minibatch's index within its epoch (Blundell et al. 2015, eq. 9): early
    minibatches carry most of the KL, later ones almost none. Computed as
    2^-i / (1 - 2^-M), which does not overflow.
  This is the only place the BNN's KL is scaled.

  Args:
    step: the global step (int64 Tensor or int).
    num_examples: N, the training-set size.
    global_batch_size: B.
    schedule: 'uniform' or 'blundell'.
  """
  n = float(num_examples)
  if schedule == 'uniform':
    return tf.constant(1.0 / n)
  if schedule != 'blundell':
    raise ValueError(f'schedule={schedule!r}; choose one of {KL_SCHEDULES}')
  m = max(num_examples // global_batch_size, 1)
  i = tf.cast(tf.math.floormod(tf.cast(step, tf.int64), m) + 1, tf.float32)
  log2_pi = -i - tf.math.log1p(-tf.pow(2.0, -float(m))) / math.log(2.0)
  return tf.pow(2.0, log2_pi) * (m / n)


def global_batch_mean(per_example, global_batch_size):
  """This replica's share of a mean over the *global* batch.

  Summing this over replicas (which is what gradient all-reduce does) gives the
  mean over the global batch, whatever the number of replicas.
  """
  return tf.reduce_sum(per_example) / tf.cast(global_batch_size, per_example.dtype)


def replica_loss(per_example_loss, regularization, *, global_batch_size, num_replicas):
  """The one place the training loss is reduced. Returns this replica's share.

  Why the two terms are scaled differently: gradients are *summed* across replicas.
  - Per-example terms are summed on each replica and divided by the global batch
    size, so the all-reduced gradient is that of the global-batch mean.
  - `regularization` is a scalar every replica computes in full: a BNN's weight KL
    (already scaled per example by the model), or a Keras activity regularizer
    such as `tfp.layers.KLDivergenceRegularizer` (a mean over this replica's batch).
    Either way each replica holds the whole value, so it is divided by the number
    of replicas to be counted once in total. (For activity regularizers this is
    exact because every replica has the same batch size.)

  Args:
    per_example_loss: [B_local] loss per example.
    regularization: scalar counted once globally (0.0 when there is none).
    global_batch_size: the batch size summed over replicas.
    num_replicas: replicas in sync.

  Returns:
    Scalar: this replica's contribution to the global loss.
  """
  regularization = tf.cast(regularization, per_example_loss.dtype)
  return (global_batch_mean(per_example_loss, global_batch_size)
          + regularization / tf.cast(num_replicas, per_example_loss.dtype))
