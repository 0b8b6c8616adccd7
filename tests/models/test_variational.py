"""Tests of models.variational: priors, KL estimators, the three estimators' moments,
seeding, replica-split invariance, gradients, mixed precision and config errors.

Every layer is tiny (a few inputs and units) and the statistical checks draw their
samples in one compiled function, so the whole file runs in well under a minute.
"""
import math

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from engine import errors
from engine import sampling
from models import variational as vl

ESTIMATORS = vl.ESTIMATORS
PRECISIONS = ('mixed_bfloat16', 'mixed_float16')


def _seed(a, b=0):
  """A stateless seed, int32 [2]."""
  return tf.constant([a, b], tf.int32)


def _inputs(shape, seed=0):
  """A float32 batch of standard normal values."""
  return tf.constant(np.random.RandomState(seed).randn(*shape).astype(np.float32))


def _dense(estimator='reparameterization', units=3, seed=1, **kwargs):
  return vl.VariationalDense(units, estimator=estimator, seed=seed, **kwargs)


def _conv(estimator='reparameterization', filters=3, seed=1, **kwargs):
  return vl.VariationalConv2D(filters, 3, 1, 'same', estimator=estimator, seed=seed,
                              **kwargs)


def _built(layer, x):
  """Builds `layer` on x; returns it (posterior-mean call, no noise)."""
  layer(x)
  return layer


def _many_calls(layer, x, num, *, return_kl=False, first=1000):
  """Stacks layer outputs (and KLs) over `num` step seeds, in one tf.function."""

  @tf.function
  def draw():
    def one(i):
      noise = sampling.Noise(tf.stack([i, tf.constant(7)]))
      out, kl = layer.apply_with_kl(x, noise)
      return tf.cast(out, tf.float32), kl
    return tf.map_fn(one, tf.range(first, first + num),
                     fn_output_signature=(tf.float32, tf.float32))

  outs, kls = draw()
  return (outs.numpy(), kls.numpy()) if return_kl else outs.numpy()


def _quadrature_kl(loc, scale, log_prior, points=20001, width=12.0):
  """sum over weights of int q(w) log(q(w) / p(w)) dw by the trapezoid rule."""
  total = 0.0
  for m, s in zip(np.ravel(loc), np.ravel(scale)):
    w = np.linspace(m - width * s, m + width * s, points)
    log_q = -0.5 * ((w - m) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi)
    total += np.trapezoid(np.exp(log_q) * (log_q - log_prior(w)), w)
  return total


def _np_mixture_log_prob(w, sigma1, sigma2, pi):
  def log_normal(s):
    return -0.5 * (w / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi)
  return np.logaddexp(np.log(pi) + log_normal(sigma1), np.log1p(-pi) + log_normal(sigma2))


# ---------------------------------------------------------------------------------
# Priors and KL functions.


def test_prior_log_probs_match_closed_forms():
  """Normal and scale-mixture log densities, including far tails (no underflow)."""
  w = np.array([-30.0, -1.0, -1e-3, 0.0, 0.5, 4.0, 30.0], np.float32)
  np.testing.assert_allclose(
      vl.NormalPrior(0.3).log_prob(w).numpy(),
      -0.5 * (w / 0.3) ** 2 - np.log(0.3) - 0.5 * np.log(2 * np.pi), rtol=1e-5)
  prior = vl.ScaleMixturePrior(1.0, math.exp(-6.0), 0.25)
  got = prior.log_prob(w).numpy()
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, _np_mixture_log_prob(w, 1.0, math.exp(-6.0), 0.25),
                             rtol=1e-5)


def test_analytic_kl_normal_matches_closed_form():
  loc = np.array([[0.0, 0.5], [-1.0, 2.0]], np.float32)
  scale = np.array([[1.0, 0.1], [0.3, 2.0]], np.float32)
  expected = np.sum(np.log(0.7 / scale) + (scale ** 2 + loc ** 2) / (2 * 0.49) - 0.5)
  np.testing.assert_allclose(vl.analytic_kl_normal(loc, scale, 0.7).numpy(), expected,
                             rtol=1e-5)
  assert abs(vl.analytic_kl_normal(tf.zeros([3]), tf.fill([3], 0.7), 0.7).numpy()) < 1e-6


def test_scale_mixture_monte_carlo_kl_matches_quadrature():
  """The single-sample MC KL averages to KL(q || p) integrated numerically."""
  sigma1, sigma2, pi = 1.0, math.exp(-3.0), 0.5
  prior = vl.ScaleMixturePrior(sigma1, sigma2, pi)
  loc = np.array([0.0, 0.02, -0.3, 1.0, 0.05], np.float32)
  scale = np.array([0.01, 0.05, 0.2, 0.5, 0.002], np.float32)
  num = 40000
  eps = tf.random.stateless_normal([num, loc.size], seed=_seed(3))
  w = loc + scale * eps
  total = vl.monte_carlo_kl(w, loc, scale, prior).numpy()
  per_sample = tf.reduce_sum(vl.normal_log_prob(w, loc, scale) - prior.log_prob(w),
                             axis=1).numpy()
  np.testing.assert_allclose(total / num, per_sample.mean(), rtol=1e-4)
  reference = _quadrature_kl(loc, scale,
                             lambda v: _np_mixture_log_prob(v, sigma1, sigma2, pi))
  stderr = per_sample.std() / math.sqrt(num)
  assert abs(per_sample.mean() - reference) < 4 * stderr + 1e-3, (
      per_sample.mean(), reference, stderr)


def test_normal_monte_carlo_kl_matches_analytic():
  prior = vl.NormalPrior(0.5)
  loc = np.array([0.0, 0.4, -1.0, 0.05], np.float32)
  scale = np.array([0.1, 0.5, 0.02, 1.0], np.float32)
  num = 40000
  w = loc + scale * tf.random.stateless_normal([num, loc.size], seed=_seed(4))
  per_sample = tf.reduce_sum(vl.normal_log_prob(w, loc, scale) - prior.log_prob(w),
                             axis=1).numpy()
  analytic = vl.analytic_kl_normal(loc, scale, 0.5).numpy()
  stderr = per_sample.std() / math.sqrt(num)
  assert abs(per_sample.mean() - analytic) < 4 * stderr, (per_sample.mean(), analytic)
  np.testing.assert_allclose(
      _quadrature_kl(loc, scale, lambda v: -0.5 * (v / 0.5) ** 2 - np.log(0.5)
                     - 0.5 * np.log(2 * np.pi)), analytic, rtol=1e-4)


# ---------------------------------------------------------------------------------
# The layer's KL.


def test_monte_carlo_kl_uses_the_forward_pass_weight_sample():
  """With x = I the reparameterized output is the weight sample itself."""
  prior = vl.ScaleMixturePrior(1.0, math.exp(-4.0), 0.5)
  layer = _dense(units=4, prior=prior, use_bias=False, posterior_rho_init=-2.0)
  out, kl = layer.apply_with_kl(tf.eye(5), sampling.Noise(_seed(9)))
  expected = vl.monte_carlo_kl(out, layer.kernel_loc, layer.kernel_scale, prior)
  np.testing.assert_allclose(kl.numpy(), expected.numpy(), rtol=1e-5)


@pytest.mark.parametrize('estimator', ['reparameterization', 'flipout'])
def test_layer_monte_carlo_kl_averages_to_analytic(estimator):
  layer = _built(_dense(estimator, units=3, kl='monte_carlo', posterior_rho_init=-1.0,
                        prior=vl.NormalPrior(0.5)), _inputs([2, 4]))
  _, kls = _many_calls(layer, _inputs([2, 4]), 2000, return_kl=True)
  analytic = layer.analytic_kl().numpy()
  stderr = kls.std() / math.sqrt(kls.size)
  assert abs(kls.mean() - analytic) < 4 * stderr, (kls.mean(), analytic, stderr)


def test_layer_scale_mixture_kl_averages_to_quadrature():
  sigma1, sigma2, pi = 1.0, math.exp(-2.0), 0.5
  layer = _built(_dense('flipout', units=2, posterior_rho_init=-1.5,
                        prior=vl.ScaleMixturePrior(sigma1, sigma2, pi)), _inputs([2, 3]))
  assert layer.kl_method == 'monte_carlo'
  _, kls = _many_calls(layer, _inputs([2, 3]), 2000, return_kl=True)
  reference = _quadrature_kl(layer.kernel_loc.numpy(), layer.kernel_scale.numpy(),
                             lambda v: _np_mixture_log_prob(v, sigma1, sigma2, pi))
  stderr = kls.std() / math.sqrt(kls.size)
  assert abs(kls.mean() - reference) < 4 * stderr, (kls.mean(), reference, stderr)


def test_posterior_mean_mode_kl():
  """noise=None: the exact KL for a normal prior, an error for the scale mixture."""
  x = _inputs([2, 3])
  layer = _dense(prior=vl.NormalPrior(0.5))
  _, kl = layer.apply_with_kl(x, None)
  np.testing.assert_allclose(
      kl.numpy(), vl.analytic_kl_normal(layer.kernel_loc, layer.kernel_scale, 0.5).numpy(),
      rtol=1e-6)
  with pytest.raises(errors.ConfigError, match='no closed-form KL'):
    _dense(prior=vl.ScaleMixturePrior()).apply_with_kl(x, None)


# ---------------------------------------------------------------------------------
# Seeding and the posterior-mean mode.


@pytest.mark.parametrize('estimator', ESTIMATORS)
@pytest.mark.parametrize('make', [_dense, _conv], ids=['dense', 'conv'])
def test_seeding_and_posterior_mean_mode(make, estimator):
  x = _inputs([3, 5, 5, 2]) if make is _conv else _inputs([3, 4])
  layer, twin = make(estimator, seed=5), make(estimator, seed=5)
  noise = sampling.Noise(_seed(11))
  a = layer(x, noise=noise).numpy()
  np.testing.assert_array_equal(a, layer(x, noise=noise).numpy())
  np.testing.assert_array_equal(a, twin(x, noise=noise).numpy())
  assert not np.allclose(a, layer(x, noise=sampling.Noise(_seed(12))).numpy())
  # Another salt is another stream.
  other = make(estimator, seed=5, salt=99)
  assert not np.allclose(a, other(x, noise=noise).numpy())
  # Posterior mean: the deterministic layer with kernel = loc.
  mean = layer(x).numpy()
  np.testing.assert_array_equal(mean, layer(x, noise=None).numpy())
  expected = layer._linear(x, layer.kernel_loc) + layer.bias  # pylint: disable=protected-access
  np.testing.assert_allclose(mean, expected.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('estimator', ESTIMATORS)
@pytest.mark.parametrize('make', [_dense, _conv], ids=['dense', 'conv'])
def test_weight_noise_drawn_beforehand_is_the_inline_draw(make, estimator):
  """`weight_noise(noise)` passed back to the call gives the inline call's outputs
  and KL exactly; it is the eps of w = loc + scale * eps (so the argument is used:
  another eps gives other outputs); local reparameterization draws none."""
  x = _inputs([3, 5, 5, 2]) if make is _conv else _inputs([3, 4])
  layer = _built(make(estimator, seed=5, kl='analytic'), x)
  noise = sampling.Noise(_seed(11), 0, 1)
  eps = layer.weight_noise(noise)
  inline, inline_kl = layer.apply_with_kl(x, noise)
  if estimator == 'local_reparameterization':
    assert not layer.draws_weight_noise and eps is None
    return
  assert layer.draws_weight_noise
  assert eps.shape == layer.kernel_loc.shape and eps.dtype == tf.float32
  given, given_kl = layer.apply_with_kl(x, noise, weight_noise=eps)
  np.testing.assert_array_equal(given.numpy(), inline.numpy())
  assert given_kl.numpy() == inline_kl.numpy()
  # Per replica the same eps: it is shared by the global batch.
  np.testing.assert_array_equal(layer.weight_noise(sampling.Noise(_seed(11), 1, 2)).numpy(),
                                eps.numpy())
  other = layer.apply_with_kl(x, noise, weight_noise=-eps)[0]
  assert not np.allclose(other.numpy(), inline.numpy())
  if estimator == 'reparameterization':
    w = layer.kernel_loc + layer.kernel_scale * eps
    expected = layer._linear(x, w) + layer.bias  # pylint: disable=protected-access
    np.testing.assert_allclose(inline.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_softplus_scale_value_and_gradient():
  rho = tf.constant([-100.0, -20.0, -5.0, 0.0, 3.0, 29.0, 31.0, 80.0, 200.0])
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(rho)
    ours = vl.softplus_scale(rho)
    reference = tf.nn.softplus(rho) + vl.SCALE_FLOOR
  np.testing.assert_allclose(ours.numpy(), reference.numpy(), rtol=1e-6)
  np.testing.assert_allclose(tape.gradient(ours, rho).numpy(),
                             tape.gradient(reference, rho).numpy(), rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize('jit', [False, True])
def test_fused_log1p_matches_float64_log1p(jit):
  """softplus_scale's log1p, log(u) x / (u - 1), within 1e-6 of float64's log1p on a
  dense grid over [0, 1e13] (x = exp(rho) for rho <= 30), eagerly and under XLA."""
  x = np.concatenate([[0.0], np.logspace(-30, 13, 20001)]).astype(np.float32)
  fn = lambda t: vl._log1p_from(t, 1.0 + t)  # pylint: disable=protected-access
  if jit:
    fn = tf.function(fn, jit_compile=True)
  got = fn(tf.constant(x)).numpy()
  np.testing.assert_allclose(got, np.log1p(x.astype(np.float64)), rtol=1e-6, atol=0)


def test_exp_posterior_scale_value_and_gradient():
  """'exp': scale = exp(rho) and log_scale = rho above the floor; below it both are
  clipped at SCALE_FLOOR with zero gradient; d scale / d rho = scale."""
  floor = math.log(vl.SCALE_FLOOR)
  rho = tf.constant([-100.0, floor - 1.0, floor + 0.5, -5.0, -1.0, 0.0, 3.0])
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(rho)
    scale, log_scale = vl.posterior_scale(rho, 'exp')
    reference = tf.exp(rho)
  assert scale.dtype == log_scale.dtype == tf.float32
  above = rho.numpy() > floor
  np.testing.assert_allclose(scale.numpy()[above], reference.numpy()[above], rtol=1e-6)
  np.testing.assert_allclose(scale.numpy()[~above], vl.SCALE_FLOOR, rtol=1e-6)
  np.testing.assert_array_equal(log_scale.numpy(), np.maximum(rho.numpy(), floor))
  np.testing.assert_allclose(log_scale.numpy(), np.log(scale.numpy()), rtol=1e-6)
  grad = tape.gradient(scale, rho).numpy()
  np.testing.assert_allclose(grad[above], tape.gradient(reference, rho).numpy()[above],
                             rtol=1e-6)
  np.testing.assert_array_equal(grad[~above], 0.0)
  np.testing.assert_array_equal(tape.gradient(log_scale, rho).numpy(), above.astype(float))
  # -5 gives 0.0067 either way (0.3% apart).
  np.testing.assert_allclose(float(vl.posterior_scale(tf.constant(-5.0), 'exp')[0]),
                             float(vl.posterior_scale(tf.constant(-5.0), 'softplus')[0]),
                             rtol=4e-3)


def test_softplus_posterior_scale_is_softplus_scale_and_its_log():
  rho = tf.constant([-30.0, -5.0, 0.0, 2.0, 40.0])
  scale, log_scale = vl.posterior_scale(rho, 'softplus')
  np.testing.assert_array_equal(scale.numpy(), vl.softplus_scale(rho).numpy())
  np.testing.assert_allclose(log_scale.numpy(), np.log(scale.numpy()), rtol=1e-6)
  with pytest.raises(errors.ConfigError, match="--posterior_scale='sigmoid'.*softplus, exp"):
    vl.posterior_scale(rho, 'sigmoid')


def test_kl_functions_are_the_same_with_and_without_log_scale():
  """Passing log_scale = log(scale) changes nothing; the functions do use it (a
  shifted log_scale shifts the result)."""
  loc = tf.constant([[0.0, 0.5], [-1.0, 2.0]])
  scale = tf.constant([[1.0, 0.1], [0.3, 2.0]])
  log_scale = tf.math.log(scale)
  x = loc + scale * tf.random.stateless_normal([2, 2], seed=_seed(2))
  prior = vl.ScaleMixturePrior(1.0, 0.1, 0.5)
  pairs = [
      (vl.analytic_kl_normal(loc, scale, 0.7),
       vl.analytic_kl_normal(loc, scale, 0.7, log_scale=log_scale),
       vl.analytic_kl_normal(loc, scale, 0.7, log_scale=log_scale + 1.0)),
      (vl.monte_carlo_kl(x, loc, scale, prior),
       vl.monte_carlo_kl(x, loc, scale, prior, log_scale=log_scale),
       vl.monte_carlo_kl(x, loc, scale, prior, log_scale=log_scale + 1.0)),
      (vl.normal_log_prob(x, loc, scale),
       vl.normal_log_prob(x, loc, scale, log_scale=log_scale),
       vl.normal_log_prob(x, loc, scale, log_scale=log_scale + 1.0)),
  ]
  for without, with_, shifted in pairs:
    np.testing.assert_allclose(with_.numpy(), without.numpy(), rtol=1e-6)
    # The KLs sum over 4 weights: 4 nats less; the log density 1 nat less per entry.
    np.testing.assert_allclose(shifted.numpy(), without.numpy()
                               - (4.0 if without.shape == [] else 1.0), rtol=1e-5)


@pytest.mark.parametrize('estimator', ESTIMATORS)
@pytest.mark.parametrize('make', [_dense, _conv], ids=['dense', 'conv'])
def test_exp_posterior_scale_layer_kl_and_gradients(make, estimator):
  """posterior_scale='exp': kernel_scale is exp(rho); the step's KL (normal prior,
  analytic) is the closed form with scale = exp(rho), and its gradient in rho is
  exp(2 rho) / sigma^2 - 1; the data term reaches loc and rho."""
  sigma = 0.5
  x = _inputs([2, 4, 4, 2]) if make is _conv else _inputs([4, 3])
  layer = _built(make(estimator, prior=vl.NormalPrior(sigma), activation='tanh',
                      posterior_scale='exp'), x)
  assert layer.posterior_scale == 'exp'
  # Scales far from where softplus and exp agree, so the other kind would fail.
  rho = np.random.RandomState(0).uniform(-2.0, 0.5, layer.kernel_rho.shape)
  layer.kernel_rho.assign(rho.astype(np.float32))
  rho = layer.kernel_rho.numpy().astype(np.float64)
  loc = layer.kernel_loc.numpy().astype(np.float64)
  s = np.exp(rho)
  np.testing.assert_allclose(layer.kernel_scale.numpy(), s, rtol=1e-6)
  target = _inputs(layer.compute_output_shape(x.shape).as_list(), seed=3)
  with tf.GradientTape(persistent=True) as tape:
    out, kl = layer.apply_with_kl(x, sampling.Noise(_seed(1)))
    data_term = tf.reduce_sum(tf.square(out - target))
  expected = np.sum(np.log(sigma / s) + (s ** 2 + loc ** 2) / (2 * sigma ** 2) - 0.5)
  np.testing.assert_allclose(kl.numpy(), expected, rtol=1e-5)
  np.testing.assert_allclose(layer.analytic_kl().numpy(), expected, rtol=1e-5)
  np.testing.assert_allclose(tape.gradient(kl, layer.kernel_rho).numpy(),
                             s ** 2 / sigma ** 2 - 1.0, rtol=1e-4, atol=1e-6)
  for g in tape.gradient(data_term, [layer.kernel_loc, layer.kernel_rho]):
    assert g is not None
    g = tf.convert_to_tensor(g).numpy()
    assert np.all(np.isfinite(g)) and np.any(g != 0)


@pytest.mark.parametrize('estimator', ['reparameterization', 'flipout'])
def test_exp_posterior_scale_monte_carlo_kl(estimator):
  """posterior_scale='exp' with the scale mixture: the Monte Carlo KL is that of the
  step's weight sample under N(loc, exp(rho)^2), and it reaches loc and rho."""
  prior = vl.ScaleMixturePrior(1.0, math.exp(-4.0), 0.5)
  layer = _dense(estimator, units=4, prior=prior, use_bias=False, posterior_rho_init=-1.0,
                 posterior_scale='exp')
  with tf.GradientTape() as tape:
    out, kl = layer.apply_with_kl(tf.eye(5), sampling.Noise(_seed(9)))
  grads = tape.gradient(kl, [layer.kernel_loc, layer.kernel_rho])
  if estimator == 'reparameterization':  # with x = I the output is the weight sample
    w = out.numpy().astype(np.float64)
    loc = layer.kernel_loc.numpy().astype(np.float64)
    s = np.exp(layer.kernel_rho.numpy().astype(np.float64))
    log_q = -0.5 * ((w - loc) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi)
    expected = np.sum(log_q - _np_mixture_log_prob(w, 1.0, math.exp(-4.0), 0.5))
    np.testing.assert_allclose(kl.numpy(), expected, rtol=1e-4)
  for g in grads:
    assert g is not None
    g = tf.convert_to_tensor(g).numpy()
    assert np.all(np.isfinite(g)) and np.any(g != 0)


# ---------------------------------------------------------------------------------
# Moments of the three estimators against explicit weight sampling.


def _explicit_moments(x, loc, scale, bias, linear, num=20000, seed=0):
  """Mean and variance of linear(x, w) + bias over explicit samples w ~ q (NumPy)."""
  rng = np.random.RandomState(seed)
  outs = []
  for _ in range(num // 500):
    w = loc + scale * rng.randn(500, *loc.shape).astype(np.float32)
    outs.append(np.stack([linear(x, wi) for wi in w]) if linear is not None
                else np.einsum('bi,sio->sbo', x, w))
  outs = np.concatenate(outs) + bias
  return outs.mean(0), outs.var(0)


@pytest.mark.parametrize('estimator', ESTIMATORS)
@pytest.mark.parametrize('kind', ['dense', 'conv'])
def test_output_moments_match_explicit_weight_sampling(kind, estimator):
  if kind == 'dense':
    x = _inputs([3, 4], seed=1)
    layer = _dense(estimator, units=2, posterior_rho_init=0.0)
    linear = None
  else:
    x = _inputs([1, 3, 3, 2], seed=1)
    layer = _conv(estimator, filters=2, posterior_rho_init=0.0)
    linear = lambda xx, w: layer._linear(xx, w).numpy()  # pylint: disable=protected-access
  layer = _built(layer, x)
  layer.bias.assign(tf.fill(layer.bias.shape, 0.25))
  num = 3000
  outs = _many_calls(layer, x, num)
  loc, scale = layer.kernel_loc.numpy(), layer.kernel_scale.numpy()
  # The exact moments of explicit weight sampling, and their Monte Carlo estimate.
  mean = layer(x).numpy()
  var = layer._linear(  # pylint: disable=protected-access
      tf.square(x), tf.square(layer.kernel_scale)).numpy()
  mc_mean, mc_var = _explicit_moments(x.numpy(), loc, scale, 0.25, linear,
                                      num=20000 if kind == 'dense' else 2000)
  np.testing.assert_allclose(mc_mean, mean, atol=4 * np.sqrt(var.max() / 2000))
  np.testing.assert_allclose(mc_var, var, rtol=0.15)
  # The layer's samples: mean within 4 standard errors, variance within 15%.
  np.testing.assert_array_less(np.abs(outs.mean(0) - mean), 4 * np.sqrt(var / num))
  np.testing.assert_allclose(outs.var(0), var, rtol=0.15)


# ---------------------------------------------------------------------------------
# Replica-split invariance.


@pytest.mark.parametrize('estimator', ESTIMATORS)
@pytest.mark.parametrize('kind', ['dense', 'conv'])
def test_replica_split_invariance(kind, estimator):
  """Full batch with 1 replica == rows 0..3 on replica 0 + rows 4..7 on replica 1."""
  x = _inputs([8, 4, 4, 2]) if kind == 'conv' else _inputs([8, 5])
  layer = _conv(estimator) if kind == 'conv' else _dense(estimator)
  seed = _seed(21, 3)
  full, kl = layer.apply_with_kl(x, sampling.Noise(seed, 0, 1))
  part0, kl0 = layer.apply_with_kl(x[:4], sampling.Noise(seed, 0, 2))
  part1, kl1 = layer.apply_with_kl(x[4:], sampling.Noise(seed, 1, 2))
  np.testing.assert_allclose(tf.concat([part0, part1], 0).numpy(), full.numpy(),
                             rtol=1e-6, atol=1e-6)
  assert kl.numpy() == kl0.numpy() == kl1.numpy()


def test_mirrored_strategy_matches_one_replica(mirrored_strategy):
  """Under MirroredStrategy (2 replicas) each replica computes its rows of the batch."""
  x = _inputs([8, 5])
  seed = _seed(5, 6)
  with mirrored_strategy.scope():
    layer = _built(_dense('flipout', prior=vl.NormalPrior(1.0, learnable=True)), x)
  full, full_kl = layer.apply_with_kl(x, sampling.Noise(seed))
  dist = mirrored_strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensor_slices(x).batch(8))

  @tf.function
  def run(batch):
    def replica_fn(xb):
      return layer.apply_with_kl(xb, sampling.Noise.from_replica_context(seed))
    return mirrored_strategy.run(replica_fn, args=(batch,))

  outs, kls = run(next(iter(dist)))
  got = tf.concat(mirrored_strategy.experimental_local_results(outs), 0)
  np.testing.assert_allclose(got.numpy(), full.numpy(), rtol=1e-6, atol=1e-6)
  for k in mirrored_strategy.experimental_local_results(kls):
    np.testing.assert_allclose(k.numpy(), full_kl.numpy(), rtol=1e-6)


# ---------------------------------------------------------------------------------
# Gradients.


_GRADIENT_CASES = [(kind, est, prior) for kind in ('dense', 'conv') for est in ESTIMATORS
                   for prior in ('normal', 'scale_mixture')
                   if not (est == 'local_reparameterization' and prior == 'scale_mixture')]


@pytest.mark.parametrize('kind,estimator,prior_name', _GRADIENT_CASES)
def test_gradients_reach_every_variable(kind, estimator, prior_name):
  prior = (vl.NormalPrior(0.5, learnable=True) if prior_name == 'normal'
           else vl.ScaleMixturePrior(1.0, 0.05, 0.5, learnable=True))
  if kind == 'dense':
    x, layer = _inputs([4, 3]), _dense(estimator, prior=prior, activation='tanh')
  else:
    x, layer = _inputs([2, 4, 4, 2]), _conv(estimator, prior=prior, activation='tanh')
  layer = _built(layer, x)
  prior_vars = list(prior.trainable_variables)
  assert len(prior_vars) == (1 if prior_name == 'normal' else 2)
  assert {id(v) for v in layer.trainable_weights} == (
      {id(layer.kernel_loc), id(layer.kernel_rho), id(layer.bias)}
      | {id(v) for v in prior_vars})
  target = _inputs(layer.compute_output_shape(x.shape).as_list(), seed=3)
  with tf.GradientTape(persistent=True) as tape:
    out, kl = layer.apply_with_kl(x, sampling.Noise(_seed(1)))
    data_term = tf.reduce_sum(tf.square(out - target))
  # The data term reaches the posterior (loc, rho) and the bias ...
  grads = tape.gradient(data_term, [layer.kernel_loc, layer.kernel_rho, layer.bias])
  # ... and the KL reaches loc, rho and every prior scale.
  grads += tape.gradient(kl, [layer.kernel_loc, layer.kernel_rho] + prior_vars)
  for g in grads:
    assert g is not None
    g = tf.convert_to_tensor(g).numpy()
    assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_local_reparameterization_gradient_finite_for_zero_inputs():
  layer = _dense('local_reparameterization')
  x = tf.zeros([2, 3])
  with tf.GradientTape() as tape:
    out = layer(x, noise=sampling.Noise(_seed(1)))
    loss = tf.reduce_sum(out)
  for g in tape.gradient(loss, layer.trainable_weights):
    if g is not None:
      assert np.all(np.isfinite(g.numpy()))


# ---------------------------------------------------------------------------------
# XLA, mixed precision.


@pytest.mark.parametrize('estimator', ESTIMATORS)
def test_kl_sum_compiles_with_xla(estimator):
  """A two-layer forward pass summing the KLs compiles with XLA, as eager."""
  x = _inputs([4, 6])
  first = _dense(estimator, units=5, activation='relu', seed=1)
  second = _dense(estimator, units=2, seed=2)

  @tf.function(jit_compile=True)
  def forward(seed):
    noise = sampling.Noise(seed)
    h, kl1 = first.apply_with_kl(x, noise)
    out, kl2 = second.apply_with_kl(h, noise)
    return out, vl.sum_kl([kl1, kl2])

  out, kl = forward(_seed(3))
  assert out.shape == (4, 2) and kl.dtype == tf.float32
  expected = first.analytic_kl() + second.analytic_kl()
  np.testing.assert_allclose(kl.numpy(), expected.numpy(), rtol=1e-5)
  # Noise draws the same values with and without XLA (to erfinv's rounding).
  noise = sampling.Noise(_seed(3))
  eager = second(first(x, noise=noise), noise=noise)
  # (Flipout folds the Noise twice; with fold_in's default algorithm XLA gave other
  # values for negative seed words, fixed by alg='philox' in engine/sampling.py.)
  np.testing.assert_allclose(out.numpy(), eager.numpy(), rtol=1e-4, atol=1e-4)


# Output tolerance against the float32 layer, relative to the output's largest
# magnitude: bfloat16 keeps 8 significant bits (~0.4% per rounding), float16 11.
_MIXED_TOLERANCE = {'mixed_bfloat16': 3e-2, 'mixed_float16': 5e-3}


@pytest.mark.parametrize('precision', PRECISIONS)
@pytest.mark.parametrize('estimator', ESTIMATORS)
@pytest.mark.parametrize('kind', ['dense', 'conv'])
def test_mixed_precision(kind, estimator, precision):
  policy = tf_keras.mixed_precision.Policy(precision)
  prior = vl.NormalPrior(1.0, learnable=True)
  if kind == 'dense':
    x = _inputs([4, 16])
    make = lambda **kw: _dense(estimator, units=8, activation='relu', prior=prior, **kw)
  else:
    x = _inputs([2, 5, 5, 3])
    make = lambda **kw: _conv(estimator, filters=4, activation='relu', prior=prior, **kw)
  layer, reference = make(dtype=policy), make()
  noise = sampling.Noise(_seed(8))
  with tf.GradientTape() as tape:
    out, kl = layer.apply_with_kl(x, noise)
    loss = tf.reduce_sum(tf.cast(out, tf.float32)) + kl
  assert layer.compute_dtype == policy.compute_dtype
  assert out.dtype == policy.compute_dtype
  assert kl.dtype == tf.float32 and np.isfinite(kl.numpy())
  for v in layer.trainable_weights:
    assert v.dtype == tf.float32
    assert 'AutoCast' not in type(v).__name__  # reads stay float32 inside call
  for g in tape.gradient(loss, layer.trainable_weights):
    assert g.dtype == tf.float32 and np.all(np.isfinite(g.numpy()))
  ref_out, ref_kl = reference.apply_with_kl(x, noise)
  scale = np.abs(ref_out.numpy()).max()
  np.testing.assert_allclose(tf.cast(out, tf.float32).numpy(), ref_out.numpy(),
                             atol=_MIXED_TOLERANCE[precision] * scale)
  np.testing.assert_allclose(kl.numpy(), ref_kl.numpy(), rtol=1e-6)
  # Posterior-mean mode too.
  assert layer(x).dtype == policy.compute_dtype


# ---------------------------------------------------------------------------------
# Keras integration, helpers, config errors.


def test_works_in_a_keras_model_and_checkpoints(tmp_path):
  """Posterior-mean mode inside tf_keras.Sequential; variables restore."""
  prior = vl.NormalPrior(1.0, learnable=True)
  model = tf_keras.Sequential([
      tf_keras.Input((4,)),
      vl.VariationalDense(5, estimator='flipout', activation='relu', seed=1, prior=prior),
      vl.VariationalDense(2, estimator='flipout', seed=2, prior=prior)])
  assert model(_inputs([3, 4])).shape == (3, 2)
  # One shared learnable prior: its variable is listed once.
  assert len(model.trainable_variables) == 3 * 2 + 1
  path = tf.train.Checkpoint(model=model).save(str(tmp_path / 'ckpt'))
  twin_prior = vl.NormalPrior(2.0, learnable=True)
  twin = tf_keras.Sequential([
      tf_keras.Input((4,)),
      vl.VariationalDense(5, estimator='flipout', activation='relu', seed=7,
                          prior=twin_prior, posterior_rho_init=-1.0),
      vl.VariationalDense(2, estimator='flipout', seed=8, prior=twin_prior)])
  tf.train.Checkpoint(model=twin).restore(path).assert_consumed()
  for a, b in zip(model.layers, twin.layers):
    np.testing.assert_array_equal(a.kernel_rho.numpy(), b.kernel_rho.numpy())
    np.testing.assert_array_equal(a.kernel_loc.numpy(), b.kernel_loc.numpy())
  assert twin_prior.log_sigma.numpy() == 0.0


def test_posterior_stddevs():
  layer = _built(_dense(posterior_rho_init=-5.0), _inputs([1, 3]))
  scale = vl.posterior_stddevs(layer)
  assert scale.dtype == tf.float32 and scale.shape == (3, 3)
  np.testing.assert_allclose(scale.numpy(), np.log1p(np.exp(-5.0)) + vl.SCALE_FLOOR,
                             rtol=1e-5)
  layer = _built(_dense(posterior_rho_init=-5.0, posterior_scale='exp'), _inputs([1, 3]))
  np.testing.assert_allclose(vl.posterior_stddevs(layer).numpy(), np.exp(-5.0), rtol=1e-6)


def test_local_reparameterization_with_scale_mixture_is_a_clear_error():
  with pytest.raises(ValueError,
                     match='(?i)use --bnn_layer=reparameterization or flipout with '
                           '--prior=scale_mixture'):
    _dense('local_reparameterization', prior=vl.ScaleMixturePrior())
  with pytest.raises(ValueError, match='(?i)use --bnn_layer=reparameterization or flipout'):
    _conv('local_reparameterization', prior=vl.ScaleMixturePrior())


@pytest.mark.parametrize('kwargs,match', [
    (dict(estimator='local_reparameterization', kl='monte_carlo'), "kl='analytic'"),
    (dict(prior=vl.ScaleMixturePrior(), kl='analytic'), 'no closed-form KL'),
    (dict(estimator='bayes'), 'bnn_layer'),
    (dict(kl='exact'), 'kl='),
    (dict(posterior_scale='sigmoid'), "--posterior_scale='sigmoid' .*softplus, exp"),
])
def test_config_errors(kwargs, match):
  with pytest.raises(errors.ConfigError, match=match):
    _dense(**kwargs)


def test_conv_checks_posterior_scale():
  with pytest.raises(errors.ConfigError, match="--posterior_scale='log'"):
    _conv(posterior_scale='log')


def test_prior_arguments_are_checked():
  with pytest.raises(errors.ConfigError, match='pi'):
    vl.ScaleMixturePrior(pi=1.0)
  with pytest.raises(errors.ConfigError, match='sigma'):
    vl.NormalPrior(0.0)
