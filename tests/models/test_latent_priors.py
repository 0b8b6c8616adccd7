"""Tests of models.latent_priors and of the VAE with a learned prior.

The priors' log-densities are checked against sums written out by hand (numpy), the
VAE's wiring through gradients, the bound and the engine (train, checkpoint, resume).
"""
import functools

import numpy as np
import pytest
import tensorflow as tf

from engine import config as config_lib
from engine import controller
from engine import errors
from engine import objectives
from engine import sampling
from models import latent_priors
from models import vae


def _normal_log_density(z, loc, scale):
  """log N(z; loc, diag(scale^2)) summed over the last axis (numpy, float64)."""
  z, loc, scale = (np.asarray(a, np.float64) for a in (z, loc, scale))
  return np.sum(-0.5 * ((z - loc) / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi),
                axis=-1)


def _logsumexp(a, axis):
  m = np.max(a, axis=axis, keepdims=True)
  return np.squeeze(m, axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def test_mixture_prior_log_prob_is_the_weighted_sum_of_its_components():
  """log p(z) = logsumexp_k(log pi_k + log N(z; mu_k, sigma_k)) with softmax weights
  and softplus scales, for variables moved away from their initial values."""
  prior = latent_priors.MixturePrior(3, 4, seed=1)
  rng = np.random.default_rng(0)
  prior.logits.assign(rng.normal(size=[4]).astype(np.float32))
  prior.raw_scales.assign(rng.normal(size=[4, 3]).astype(np.float32))
  z = rng.normal(size=[5, 3]).astype(np.float32) * 2
  got = prior().log_prob(z).numpy()
  logits = prior.logits.numpy().astype(np.float64)
  log_pi = logits - _logsumexp(logits, 0)
  scales = np.log1p(np.exp(prior.raw_scales.numpy().astype(np.float64))) + 1e-5
  per_component = np.stack([_normal_log_density(z, prior.locs.numpy()[k], scales[k])
                            for k in range(4)], axis=1)
  np.testing.assert_allclose(got, _logsumexp(log_pi + per_component, 1), rtol=1e-5)


def test_diagonal_mixture_matches_tfp_mixture_same_family():
  """The written-out log-density equals TFP's, for z with extra leading axes."""
  import tensorflow_probability as tfp  # pylint: disable=import-outside-toplevel
  tfd = tfp.distributions
  rng = np.random.default_rng(3)
  logits = tf.constant(rng.normal(size=[5]), tf.float32)
  locs = tf.constant(rng.normal(size=[5, 4]), tf.float32)
  scales = tf.constant(rng.uniform(0.05, 2.0, size=[5, 4]), tf.float32)
  z = tf.constant(rng.normal(size=[3, 7, 4]) * 2, tf.float32)
  reference = tfd.MixtureSameFamily(tfd.Categorical(logits=logits),
                                    tfd.MultivariateNormalDiag(locs, scales)).log_prob(z)
  got = latent_priors.diagonal_mixture_log_prob(z, logits, locs, scales)
  assert got.shape == (3, 7)
  np.testing.assert_allclose(got.numpy(), reference.numpy(), rtol=1e-5, atol=1e-4)


def test_diagonal_mixture_samples_have_the_mixture_moments():
  logits = tf.math.log(tf.constant([0.2, 0.8]))
  locs = tf.constant([[-3.0, 0.0], [2.0, 1.0]])
  scales = tf.constant([[0.5, 1.0], [1.0, 0.1]])
  mixture = latent_priors.DiagonalGaussianMixture(logits, locs, scales)
  z = mixture.sample(40000, tf.constant([1, 2])).numpy()
  np.testing.assert_array_equal(z, mixture.sample(40000, tf.constant([1, 2])).numpy())
  mean = 0.2 * locs.numpy()[0] + 0.8 * locs.numpy()[1]
  second = (0.2 * (locs.numpy()[0] ** 2 + scales.numpy()[0] ** 2)
            + 0.8 * (locs.numpy()[1] ** 2 + scales.numpy()[1] ** 2))
  np.testing.assert_allclose(z.mean(0), mean, atol=0.05)
  np.testing.assert_allclose(z.var(0), second - mean ** 2, rtol=0.03)
  assert abs(np.mean(z[:, 0] < -0.5) - 0.2) < 0.01


def test_one_component_mixture_at_the_origin_is_the_standard_normal():
  prior = latent_priors.MixturePrior(3, 1)
  prior.locs.assign(tf.zeros([1, 3]))
  z = tf.random.stateless_normal([6, 3], seed=[1, 2])
  np.testing.assert_allclose(prior().log_prob(z).numpy(),
                             latent_priors.standard_normal(3).log_prob(z).numpy(),
                             rtol=1e-4)


def test_vamp_prior_is_the_uniform_mixture_of_the_pseudo_input_posteriors():
  """log p(z) = logsumexp_k log q(z | u_k) - log K, each q computed one input at a time."""
  model = vae.VAE(vae.VAEConfig(encoder_sizes=(16,), decoder_sizes=(16,), latent_dim=3,
                                latent_prior='vamp', prior_components=4, kl='monte_carlo'),
                  image_shape=(8, 8, 1), seed=0)
  z = tf.random.stateless_normal([5, 3], seed=[3, 4])
  got = model.prior_distribution().log_prob(z).numpy()
  u = model.prior.pseudo_inputs
  per_component = np.stack(
      [model.approx_posterior(u[k:k + 1]).log_prob(z).numpy() for k in range(4)], axis=1)
  np.testing.assert_allclose(got, _logsumexp(per_component, 1) - np.log(4), rtol=1e-5)
  assert np.all((u.numpy() > 0) & (u.numpy() < 1))


def test_vamp_prior_with_full_covariance_posteriors():
  """With MultivariateNormalTriL posteriors the components keep their correlations."""
  model = vae.VAE(vae.VAEConfig(encoder_sizes=(16,), decoder_sizes=(16,), latent_dim=3,
                                latent_prior='vamp', prior_components=4, kl='monte_carlo',
                                posterior='full_cov'),
                  image_shape=(8, 8, 1), seed=0)
  z = tf.random.stateless_normal([5, 3], seed=[3, 4])
  u = model.prior.pseudo_inputs
  per_component = np.stack(
      [model.approx_posterior(u[k:k + 1]).log_prob(z).numpy() for k in range(4)], axis=1)
  np.testing.assert_allclose(model.prior_distribution().log_prob(z).numpy(),
                             _logsumexp(per_component, 1) - np.log(4), rtol=1e-5)


def test_pseudo_input_images_are_distinct_seeded_training_images():
  images = np.arange(20 * 4, dtype=np.uint8).reshape(20, 2, 2, 1) * 3
  a = latent_priors.pseudo_input_images(images, 5, seed=7)
  b = latent_priors.pseudo_input_images(images, 5, seed=7)
  c = latent_priors.pseudo_input_images(images, 5, seed=8)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert len({row.tobytes() for row in a}) == 5
  rows = [np.flatnonzero(np.isclose(images / 255.0, img).all(axis=(1, 2, 3)))[0] for img in a]
  assert len(set(rows)) == 5
  with pytest.raises(ValueError, match='21 pseudo-inputs'):
    latent_priors.pseudo_input_images(images, 21, seed=0)


def _model(latent_prior, **overrides):
  fields = dict(encoder_sizes=(16,), decoder_sizes=(16,), latent_dim=3,
                latent_prior=latent_prior, prior_components=4, kl='monte_carlo',
                top_latent_dim=2, top_units=8)
  fields.update(overrides)
  return vae.VAE(vae.VAEConfig(**fields), image_shape=(8, 8, 1), seed=0)


def _images(batch, seed=0):
  rng = np.random.RandomState(seed)
  return tf.constant(rng.randint(0, 2, (batch, 8, 8, 1)).astype(np.float32))


def _move_hierarchical_prior(model, seed=0):
  """Random output kernels for the hierarchical prior's two networks. They start at
  zero (p(z | u) = q(u | z) = N(0, I) whatever the input), where the gradient of
  their hidden layers is zero and the prior is the standard normal."""
  rng = np.random.default_rng(seed)
  for net in (model.prior.generative, model.prior.inference):
    kernel = net.layers[-1].kernel
    kernel.assign(rng.normal(0.0, 0.1, kernel.shape).astype(np.float32))


def _prior_noise(seed):
  return sampling.Noise(tf.constant(seed, tf.int32))


@pytest.mark.parametrize('latent_prior,names', [
    ('mixture', ('mixture_logits', 'mixture_locs', 'mixture_raw_scales')),
    ('vamp', ('pseudo_input_logits',)),
    ('hierarchical', ('prior_conditional_hidden', 'prior_conditional_params',
                      'top_posterior_hidden', 'top_posterior_params')),
])
@pytest.mark.parametrize('objective', ['elbo', 'iwae'])
def test_gradients_reach_the_prior_and_every_network_variable(latent_prior, names,
                                                              objective):
  model = _model(latent_prior, objective=objective,
                 num_iw_samples=3 if objective == 'iwae' else 1)
  if latent_prior == 'hierarchical':
    _move_hierarchical_prior(model)
  with tf.GradientTape() as tape:
    loss, _, _ = model.loss_terms(_images(6), kl_weight=1.0, seed=tf.constant([1, 2]))
    loss = tf.reduce_mean(loss)
  grads = tape.gradient(loss, model.trainable_variables)
  missing = [v.name for v, g in zip(model.trainable_variables, grads)
             if g is None or not np.any(g.numpy())]
  assert not missing
  for name in names:
    assert any(name in v.name for v in model.trainable_variables), name


@pytest.mark.parametrize('latent_prior', ['mixture', 'vamp', 'hierarchical'])
def test_rate_is_the_monte_carlo_log_ratio_of_the_same_sample(latent_prior):
  """The training rate is log q(z|x) - log p(z) at the z the distortion used: averaged
  over seeds it matches a large-sample estimate of KL(q || p). (Hierarchical: the
  two-layer KL, log p(z) estimated from a draw of u ~ q(u | z) in both.)"""
  model = _model(latent_prior)
  if latent_prior == 'hierarchical':
    _move_hierarchical_prior(model)
  x = _images(4)
  # Traced once (300 eager calls took 12 s), without autograph as the engine does.
  rate = tf.function(lambda seed: model.loss_terms(x, kl_weight=1.0, seed=seed)[2]['rate'],
                     autograph=False)
  rates = np.mean([rate(tf.constant([s, 0])).numpy() for s in range(300)], axis=0)
  q = model.approx_posterior(x)
  z = q.sample(20000, seed=tf.constant([9, 9]))
  reference = objectives.monte_carlo_rate(q, model.prior_distribution(), z,
                                          prior_noise=_prior_noise([9, 10])).numpy()
  np.testing.assert_allclose(rates, reference, atol=0.15)


@pytest.mark.parametrize('latent_prior', ['mixture', 'vamp', 'hierarchical'])
def test_importance_sampled_log_likelihood_bounds_the_elbo(latent_prior):
  model = _model(latent_prior)
  if latent_prior == 'hierarchical':
    _move_hierarchical_prior(model)
  out = model.eval_terms(_images(16), seed=tf.constant([1, 2]), iw_samples=200,
                         iw_chunk_size=50)
  assert np.mean(out['log_likelihood']) > np.mean(out['elbo'])


@pytest.mark.parametrize('latent_prior', ['mixture', 'vamp', 'hierarchical'])
def test_samples_from_the_prior_are_seeded_images(latent_prior):
  model = _model(latent_prior)
  a = model.sample(3, tf.constant([1, 2])).numpy()
  b = model.sample(3, tf.constant([1, 2])).numpy()
  np.testing.assert_array_equal(a, b)
  assert a.shape == (3, 8, 8, 1) and np.all((a >= 0) & (a <= 1))


@pytest.mark.parametrize('overrides,message', [
    (dict(latent_prior='mixture', kl='analytic'), '--kl=analytic needs --latent_prior=normal'),
    (dict(latent_prior='vamp', kl='regularizer'), '--kl=regularizer needs'),
    (dict(latent_prior='flow'), "--latent_prior='flow' is not known"),
    (dict(latent_prior='mixture', kl='monte_carlo', prior_components=0),
     '--prior_components=0'),
    (dict(latent_prior='hierarchical'), '--kl=analytic needs --latent_prior=normal'),
    (dict(latent_prior='hierarchical', kl='monte_carlo', top_latent_dim=0),
     '--top_latent_dim=0'),
    (dict(latent_prior='hierarchical', kl='monte_carlo', top_units=-1), '--top_units=-1'),
    (dict(latent_prior='mixture', kl='monte_carlo', top_prior='mixture'),
     '--top_prior=mixture sets p\\(u\\) of --latent_prior=hierarchical'),
    (dict(latent_prior='hierarchical', kl='monte_carlo', top_prior='vamp'),
     "--top_prior='vamp' is not known"),
])
def test_bad_prior_configs_name_the_flag(overrides, message):
  with pytest.raises(errors.ConfigError, match=message):
    vae.VAEConfig(**overrides)


def _engine_config(model_dir, train_steps, components=8, latent_prior='vamp'):
  return config_lib.ExperimentConfig(
      model='vae',
      model_options=vae.VAEConfig(encoder_sizes=(32,), decoder_sizes=(32,), latent_dim=4,
                                  latent_prior=latent_prior, prior_components=components,
                                  top_latent_dim=2, top_units=8, kl='monte_carlo'),
      data=config_lib.DataConfig(dataset='synthetic', synthetic_train_size=256,
                                 synthetic_test_size=64),
      train=config_lib.TrainConfig(
          model_dir=str(model_dir), train_steps=train_steps, batch_size=32,
          steps_per_loop=10, eval_every=20, checkpoint_every=20, jit_compile=False,
          eval_batch_size=32, eval_iw_samples=4, iw_chunk_size=2, num_summary_images=4))


def _train_resumed_and_whole(tmp_path, config):
  """Trains config(dir, steps) to 40 steps in two calls (20, then resumed) and in
  one; checks that both end with the same variables and a finite NLL, and returns
  the resumed run's Experiment, rebuilt from its last checkpoint."""
  strategy = tf.distribute.get_strategy()
  split, whole = tmp_path / 'split', tmp_path / 'whole'
  controller.train(config(split, 20), strategy, log=lambda s: None)
  controller.train(config(split, 40), strategy, log=lambda s: None)
  metrics = controller.train(config(whole, 40), strategy, log=lambda s: None)
  assert np.isfinite(metrics['nll'])
  exps = [controller.build(config(d, 40), strategy, record_config=False)
          for d in (split, whole)]
  for a, b in zip(exps[0].model.trainable_variables, exps[1].model.trainable_variables):
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, err_msg=a.name)
  return exps[0]


def test_vamp_prior_trains_and_resumes_through_the_engine(tmp_path):
  """Training moves the pseudo-inputs; a resumed run restores them exactly and ends
  where an uninterrupted one does. (Without XLA: with it, this test took 42 s alone,
  without 15 s; the XLA step's resume is checked in test_cluster_jobs.)"""
  exp = _train_resumed_and_whole(tmp_path, _engine_config)
  initial = latent_priors.pseudo_input_images(exp.task.train_images, 8, 0)
  moved = exp.model.prior.pseudo_inputs.numpy()
  assert np.max(np.abs(moved - np.clip(initial, 0.05, 0.95))) > 1e-4


def test_hierarchical_prior_trains_and_resumes_through_the_engine(tmp_path):
  """Training moves both networks of the hierarchical prior (from their zero output
  kernels); a resumed run ends where an uninterrupted one does: the prior's draws
  of u are step-indexed like every other noise. (Without XLA, to keep the test
  short.)"""
  exp = _train_resumed_and_whole(tmp_path, functools.partial(
      _engine_config, latent_prior='hierarchical'))
  for net in (exp.model.prior.generative, exp.model.prior.inference):
    assert np.max(np.abs(net.layers[-1].kernel.numpy())) > 1e-4


def test_untrained_hierarchical_prior_is_the_standard_normal():
  """Zero output kernels: log_prob(z, noise) is log N(z; 0, I) exactly, whatever u
  was drawn (p(z | u) = q(u | z) = p(u) = N(0, I))."""
  prior = latent_priors.HierarchicalPrior(3, 2, 5, seed=1)
  z = tf.random.stateless_normal([4, 6, 3], seed=[1, 2]) * 2
  reference = latent_priors.standard_normal(3).log_prob(z).numpy()
  for seed in ([1, 2], [3, 4]):
    np.testing.assert_allclose(prior().log_prob(z, _prior_noise(seed)).numpy(), reference,
                               rtol=1e-4, atol=1e-4)


def test_hierarchical_log_prob_is_the_two_layer_log_ratio_written_out():
  """log p(z | u) + log N(u; 0, I) - log q(u | z) at u = loc_q + scale_q * eps, with
  the networks' outputs and eps recomputed by hand (numpy, float64)."""
  prior = latent_priors.HierarchicalPrior(3, 2, 5, activation='tanh', seed=1)
  rng = np.random.default_rng(4)
  for v in prior.trainable_variables:
    v.assign(rng.normal(0.0, 0.5, v.shape).astype(np.float32))
  z = rng.normal(size=[4, 3]).astype(np.float32)
  noise = _prior_noise([5, 6])
  got = prior().log_prob(tf.constant(z), noise).numpy()
  eps = noise.normal([4, 2]).numpy().astype(np.float64)

  def net(module, t):
    hidden, out = module.layers
    h = np.tanh(t @ hidden.kernel.numpy() + hidden.bias.numpy())
    params = h @ out.kernel.numpy() + out.bias.numpy()
    n = params.shape[-1] // 2
    return params[:, :n], np.log1p(np.exp(params[:, n:])) + 1e-5

  u_loc, u_scale = net(prior.inference, z.astype(np.float64))
  u = u_loc + u_scale * eps
  z_loc, z_scale = net(prior.generative, u)
  expected = (_normal_log_density(z, z_loc, z_scale) + _normal_log_density(u, 0.0, 1.0)
              - _normal_log_density(u, u_loc, u_scale))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_hierarchical_log_prob_is_unbiased_for_the_marginal_density():
  """A linear p(z | u) = N(A u + c, s^2 I) has the marginal N(c, A A^T + s^2 I): the
  mean over many draws of u of exp(log_prob(z, noise)) recovers it (the prior's
  estimate is unbiased for p(z), whatever q(u | z))."""
  prior = latent_priors.HierarchicalPrior(2, 1, 3, activation=None, seed=1)
  rng = np.random.default_rng(7)
  hidden, out = prior.generative.layers
  hidden.kernel.assign(rng.normal(0.0, 0.6, [1, 3]).astype(np.float32))
  hidden.bias.assign(rng.normal(0.0, 0.3, [3]).astype(np.float32))
  kernel = np.zeros([3, 4], np.float32)
  kernel[:, :2] = rng.normal(0.0, 0.6, [3, 2])  # the scale does not depend on u
  out.kernel.assign(kernel)
  bias = np.array([0.3, -0.2, 0.4, 0.1], np.float32)
  out.bias.assign(bias)
  for v in prior.inference.trainable_variables:
    v.assign(rng.normal(0.0, 0.2, v.shape).astype(np.float32))
  w1, b1 = hidden.kernel.numpy().astype(np.float64), hidden.bias.numpy().astype(np.float64)
  a = w1 @ kernel[:, :2].astype(np.float64)  # [1, 2]
  c = b1 @ kernel[:, :2].astype(np.float64) + bias[:2]
  s = np.log1p(np.exp(bias[2:].astype(np.float64))) + 1e-5
  cov = a.T @ a + np.diag(s ** 2)
  z = np.array([[0.5, -1.0], [2.0, 0.3], [-1.5, -0.5]], np.float32)
  diff = z - c
  exact = (-0.5 * np.einsum('bi,ij,bj->b', diff, np.linalg.inv(cov), diff)
           - 0.5 * np.log(np.linalg.det(cov)) - np.log(2 * np.pi))
  draws = 20000
  tiled = tf.tile(tf.constant(z)[None], [draws, 1, 1])
  log_w = prior().log_prob(tiled, _prior_noise([11, 12])).numpy().astype(np.float64)
  estimate = _logsumexp(log_w, 0) - np.log(draws)
  np.testing.assert_allclose(estimate, exact, atol=0.03)
  # A single draw is a lower bound in expectation (Jensen), strictly here.
  assert np.all(log_w.mean(0) < exact - 1e-3)


def test_a_mixture_on_top_replaces_log_p_u_and_learns():
  """With top_components K, log p(u) is the mixture's at the same u (the same
  networks and noise otherwise); the VAE's loss reaches the mixture's variables,
  and the prior's draws of z come from p(z | u) at u drawn from the mixture."""
  plain = latent_priors.HierarchicalPrior(3, 2, 5, seed=1)
  mixed = latent_priors.HierarchicalPrior(3, 2, 5, seed=1, top_components=4)
  rng = np.random.default_rng(5)
  for a, b in zip(plain.trainable_variables, [v for v in mixed.trainable_variables
                                              if 'mixture' not in v.name]):
    value = rng.normal(0.0, 0.3, a.shape).astype(np.float32)
    a.assign(value)
    b.assign(value)
  z = tf.constant(rng.normal(size=[6, 3]), tf.float32)
  noise = _prior_noise([3, 1])
  u_loc, u_scale = mixed().top_posterior(z)
  u = u_loc + u_scale * noise.normal([6, 2])
  expected = (plain().log_prob(z, noise) - latent_priors.standard_normal(2).log_prob(u)
              + mixed.top().log_prob(u))
  np.testing.assert_allclose(mixed().log_prob(z, noise).numpy(), expected.numpy(),
                             rtol=1e-5, atol=1e-4)

  model = _model('hierarchical', top_prior='mixture')
  _move_hierarchical_prior(model)
  with tf.GradientTape() as tape:
    loss, _, _ = model.loss_terms(_images(6), kl_weight=1.0, seed=tf.constant([1, 2]))
    loss = tf.reduce_mean(loss)
  top = model.prior.top.trainable_variables
  assert len(top) == 3
  assert all(np.any(g.numpy()) for g in tape.gradient(loss, top))
  model.prior.top.locs.assign(tf.constant([[40.0, 40.0]] * 4))
  model.prior.top.raw_scales.assign(tf.fill([4, 2], -20.0))
  u = model.prior.top().sample(5, tf.constant([1, 2])).numpy()
  np.testing.assert_allclose(u, 40.0, atol=1e-3)
  # The prior's own draws of z go through that u: standardized by p(z | u = 40),
  # they are standard normal (with u ~ N(0, I) instead, their mean is 5.6 off).
  z = model.prior().sample(4000, tf.constant([3, 4]))
  loc, scale = model.prior().conditional(tf.fill([1, 2], 40.0))
  eps = ((z - loc) / scale).numpy()
  np.testing.assert_allclose(eps.mean(axis=0), 0.0, atol=0.1)
  np.testing.assert_allclose(eps.std(axis=0), 1.0, atol=0.1)


def test_the_objectives_refuse_a_hierarchical_prior_without_its_noise():
  prior = latent_priors.HierarchicalPrior(3, 2, 5)()
  with pytest.raises(ValueError, match='pass prior_noise'):
    objectives.latent_log_prob(prior, tf.zeros([2, 3]))


def test_too_many_pseudo_inputs_for_the_data_is_a_config_error(tmp_path):
  with pytest.raises(errors.ConfigError, match='--prior_components=300'):
    controller.build(_engine_config(tmp_path / 'run', 10, components=300),
                     tf.distribute.get_strategy())
