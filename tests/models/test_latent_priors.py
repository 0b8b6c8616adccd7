"""Tests of models.latent_priors and of the VAE with a learned prior.

The priors' log-densities are checked against sums written out by hand (numpy), the
VAE's wiring through gradients, the bound and the engine (train, checkpoint, resume).
"""
import numpy as np
import pytest
import tensorflow as tf

from engine import config as config_lib
from engine import controller
from engine import errors
from engine import objectives
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
                latent_prior=latent_prior, prior_components=4, kl='monte_carlo')
  fields.update(overrides)
  return vae.VAE(vae.VAEConfig(**fields), image_shape=(8, 8, 1), seed=0)


def _images(batch, seed=0):
  rng = np.random.RandomState(seed)
  return tf.constant(rng.randint(0, 2, (batch, 8, 8, 1)).astype(np.float32))


@pytest.mark.parametrize('latent_prior,names', [
    ('mixture', ('mixture_logits', 'mixture_locs', 'mixture_raw_scales')),
    ('vamp', ('pseudo_input_logits',)),
])
@pytest.mark.parametrize('objective', ['elbo', 'iwae'])
def test_gradients_reach_the_prior_and_every_network_variable(latent_prior, names,
                                                              objective):
  model = _model(latent_prior, objective=objective,
                 num_iw_samples=3 if objective == 'iwae' else 1)
  with tf.GradientTape() as tape:
    loss, _, _ = model.loss_terms(_images(6), kl_weight=1.0, seed=tf.constant([1, 2]))
    loss = tf.reduce_mean(loss)
  grads = tape.gradient(loss, model.trainable_variables)
  missing = [v.name for v, g in zip(model.trainable_variables, grads)
             if g is None or not np.any(g.numpy())]
  assert not missing
  have = {v.name.split(':')[0].split('/')[-1] for v in model.trainable_variables}
  assert set(names) <= have


@pytest.mark.parametrize('latent_prior', ['mixture', 'vamp'])
def test_rate_is_the_monte_carlo_log_ratio_of_the_same_sample(latent_prior):
  """The training rate is log q(z|x) - log p(z) at the z the distortion used: averaged
  over seeds it matches a large-sample estimate of KL(q || p)."""
  model = _model(latent_prior)
  x = _images(4)
  rates = np.mean([model.loss_terms(x, kl_weight=1.0, seed=tf.constant([s, 0]))[2]['rate']
                   .numpy() for s in range(300)], axis=0)
  q = model.approx_posterior(x)
  z = q.sample(20000, seed=tf.constant([9, 9]))
  reference = objectives.monte_carlo_rate(q, model.prior_distribution(), z).numpy()
  np.testing.assert_allclose(rates, reference, atol=0.15)


@pytest.mark.parametrize('latent_prior', ['mixture', 'vamp'])
def test_importance_sampled_log_likelihood_bounds_the_elbo(latent_prior):
  model = _model(latent_prior)
  out = model.eval_terms(_images(16), seed=tf.constant([1, 2]), iw_samples=200,
                         iw_chunk_size=50)
  assert np.mean(out['log_likelihood']) > np.mean(out['elbo'])


@pytest.mark.parametrize('latent_prior', ['mixture', 'vamp'])
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
])
def test_bad_prior_configs_name_the_flag(overrides, message):
  with pytest.raises(errors.ConfigError, match=message):
    vae.VAEConfig(**overrides)


def _engine_config(model_dir, train_steps, components=8):
  return config_lib.ExperimentConfig(
      model='vae',
      model_options=vae.VAEConfig(encoder_sizes=(32,), decoder_sizes=(32,), latent_dim=4,
                                  latent_prior='vamp', prior_components=components,
                                  kl='monte_carlo'),
      data=config_lib.DataConfig(dataset='synthetic', synthetic_train_size=256,
                                 synthetic_test_size=64),
      train=config_lib.TrainConfig(
          model_dir=str(model_dir), train_steps=train_steps, batch_size=32,
          steps_per_loop=10, eval_every=20, checkpoint_every=20, jit_compile=True,
          eval_batch_size=32, eval_iw_samples=4, iw_chunk_size=2, num_summary_images=4))


def test_vamp_prior_trains_and_resumes_through_the_engine(tmp_path):
  """XLA steps move the pseudo-inputs; a resumed run restores them exactly and ends
  where an uninterrupted one does."""
  strategy = tf.distribute.get_strategy()
  split, whole = tmp_path / 'split', tmp_path / 'whole'
  controller.train(_engine_config(split, 20), strategy, log=lambda s: None)
  controller.train(_engine_config(split, 40), strategy, log=lambda s: None)
  metrics = controller.train(_engine_config(whole, 40), strategy, log=lambda s: None)
  assert np.isfinite(metrics['nll'])
  exps = [controller.build(_engine_config(d, 40), strategy, record_config=False)
          for d in (split, whole)]
  initial = latent_priors.pseudo_input_images(exps[0].task.train_images, 8, 0)
  moved = exps[0].model.prior.pseudo_inputs.numpy()
  assert np.max(np.abs(moved - np.clip(initial, 0.05, 0.95))) > 1e-4
  for a, b in zip(exps[0].model.trainable_variables, exps[1].model.trainable_variables):
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, err_msg=a.name)


def test_too_many_pseudo_inputs_for_the_data_is_a_config_error(tmp_path):
  with pytest.raises(errors.ConfigError, match='--prior_components=300'):
    controller.build(_engine_config(tmp_path / 'run', 10, components=300),
                     tf.distribute.get_strategy())
