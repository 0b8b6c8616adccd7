"""Tests of models.vae: shapes, seeding, the three KL paths, IWAE, gradients, config.

Every model is tiny (one hidden layer of 16 units, a 3-d latent) and every batch is
random binary pixels, so the whole file runs in well under a minute on CPU.
"""
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from engine import errors
from engine import objectives
from engine import sampling
from models import vae

tfp_math = tfp.math

LATENT = 3
SMALL = (8, 8, 1)
MNIST = (28, 28, 1)


def _config(**overrides):
  """A tiny VAEConfig; keyword arguments override the fields."""
  fields = dict(encoder_sizes=(16,), decoder_sizes=(16,), latent_dim=LATENT)
  fields.update(overrides)
  return vae.VAEConfig(**fields)


def _model(image_shape=SMALL, seed=0, pixel_mean=None, **overrides):
  """A tiny VAE for images of `image_shape`."""
  return vae.VAE(_config(**overrides), image_shape=image_shape, pixel_mean=pixel_mean,
                 seed=seed)


def _images(batch, image_shape=SMALL, seed=0):
  """A float32 batch of random {0, 1} pixels."""
  rng = np.random.RandomState(seed)
  return tf.constant(rng.randint(0, 2, (batch,) + tuple(image_shape)).astype(np.float32))


def _seed(a, b=0):
  """A stateless seed, int32 [2]."""
  return tf.constant([a, b], tf.int32)


def _copy_weights(source, target):
  """Gives `target` the encoder and decoder weights of `source`."""
  target.encoder.set_weights(source.encoder.get_weights())
  target.decoder.set_weights(source.decoder.get_weights())


# ---------------------------------------------------------------------------------
# Shapes.


@pytest.mark.parametrize('posterior', ['diag', 'full_cov'])
def test_approx_posterior_shapes(posterior):
  """q(z | x) has batch shape [B] and event shape [d]; a reparameterized sample is
  [B, d], and its tensor value is the posterior mean."""
  model = _model(posterior=posterior)
  q = model.approx_posterior(_images(5))
  assert q.batch_shape.as_list() == [5]
  assert q.event_shape.as_list() == [LATENT]
  np.testing.assert_allclose(tf.convert_to_tensor(q).numpy(), q.mean().numpy())
  z = model.posterior_sample(q, tf.random.stateless_normal([5, LATENT], seed=_seed(1)))
  assert z.shape.as_list() == [5, LATENT]
  assert np.all(np.isfinite(z.numpy()))
  assert not np.allclose(z.numpy(), q.mean().numpy())


@pytest.mark.parametrize('posterior', ['diag', 'full_cov'])
def test_approx_posterior_full_cov_is_correlated_and_diag_is_not(posterior):
  """'full_cov' gives a non-diagonal covariance; 'diag' an exactly diagonal one."""
  model = _model(posterior=posterior)
  cov = model.approx_posterior(_images(4)).covariance().numpy()
  off_diagonal = cov - np.einsum('bij,ij->bij', cov, np.eye(LATENT))
  if posterior == 'diag':
    assert np.all(off_diagonal == 0.0)
  else:
    assert np.max(np.abs(off_diagonal)) > 1e-4


@pytest.mark.parametrize('architecture,image_shape', [('mlp', SMALL), ('conv', MNIST)])
@pytest.mark.parametrize('z_shape', [(6,), (4, 6)])
def test_likelihood_batch_and_event_shapes(architecture, image_shape, z_shape):
  """p(x | z) for z [..., d] has batch shape = z's leading dims, event = one image."""
  model = _model(image_shape=image_shape, architecture=architecture)
  z = tf.random.stateless_normal(z_shape + (LATENT,), _seed(2))
  p = model.likelihood(z)
  assert p.batch_shape.as_list() == list(z_shape)
  assert p.event_shape.as_list() == list(image_shape)
  assert p.log_prob(tf.zeros(image_shape)).shape.as_list() == list(z_shape)


@pytest.mark.parametrize('events', ['binary', 'grey'])
def test_logit_bernoulli_is_tfp_bernoulli_with_a_cheaper_log_prob(events):
  """LogitBernoulli's log_prob and its gradient equal tfd.Bernoulli's for logits up
  to +-60 (exp(-60) is far below float32's resolution at 1), binary or grey events;
  sampling and the mean are tfd.Bernoulli's own."""
  rng = np.random.RandomState(0)
  logits = tf.constant(np.concatenate([rng.normal(0, 3, 500), np.linspace(-60, 60, 121)]),
                       tf.float32)
  x = (rng.randint(0, 2, logits.shape) if events == 'binary'
       else rng.uniform(0, 1, logits.shape)).astype(np.float32)
  results = []
  for cls in (vae.LogitBernoulli, tfp.distributions.Bernoulli):
    with tf.GradientTape() as tape:
      tape.watch(logits)
      log_p = cls(logits=logits, dtype=tf.float32).log_prob(x)
    results.append((log_p.numpy(), tape.gradient(log_p, logits).numpy()))
  (ours, our_grad), (theirs, their_grad) = results
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(our_grad, their_grad, rtol=1e-6, atol=1e-6)
  p = vae.LogitBernoulli(logits=logits, dtype=tf.float32)
  np.testing.assert_allclose(p.mean().numpy(), tf.sigmoid(logits).numpy(), rtol=1e-6)
  assert p.sample(seed=(1, 2)).dtype == tf.float32
  # The VAE's factorized Bernoulli is this one.
  assert isinstance(_model().likelihood(tf.zeros([2, LATENT])).distribution,
                    vae.LogitBernoulli)


def test_likelihood_of_sample_axis_matches_per_sample_calls():
  """The [K, B, d] path decodes each sample exactly as a separate [B, d] call does."""
  model = _model()
  z = tf.random.stateless_normal([3, 4, LATENT], _seed(3))
  x = _images(4)
  joint = model.likelihood(z).log_prob(x).numpy()
  for k in range(3):
    np.testing.assert_allclose(joint[k], model.likelihood(z[k]).log_prob(x).numpy(),
                               rtol=1e-6)


@pytest.mark.parametrize('architecture,image_shape', [('mlp', SMALL), ('conv', MNIST)])
def test_sample_and_reconstruct_are_images_in_unit_interval(architecture, image_shape):
  """sample() and reconstruct() return Bernoulli means: [N, H, W, C] in [0, 1]."""
  model = _model(image_shape=image_shape, architecture=architecture)
  samples = model.sample(7, _seed(4)).numpy()
  recon = model.reconstruct(_images(5, image_shape), _seed(5)).numpy()
  assert samples.shape == (7,) + image_shape
  assert recon.shape == (5,) + image_shape
  for images in (samples, recon):
    assert np.all(np.isfinite(images))
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_conv_architecture_trains_on_28x28():
  """The conv VAE runs loss_terms on 28x28x1 and gives finite [B] terms."""
  model = _model(image_shape=MNIST, architecture='conv')
  loss, reg, measurements = model.loss_terms(_images(4, MNIST), seed=_seed(6),
                                             kl_weight=1.0)
  assert loss.shape.as_list() == [4]
  assert float(reg) == 0.0
  for key in model.per_example_keys:
    assert measurements[key].shape.as_list() == [4]
    assert np.all(np.isfinite(measurements[key].numpy()))


def test_conv_architecture_rejects_size_not_divisible_by_4():
  """A 10x10 image cannot go through two stride-2 convs and back: ConfigError."""
  with pytest.raises(errors.ConfigError, match='--architecture=conv') as info:
    _model(image_shape=(10, 10, 1), architecture='conv')
  assert '10x10' in str(info.value)


# ---------------------------------------------------------------------------------
# Seeding.


@pytest.mark.parametrize('overrides', [
    dict(kl='monte_carlo'),
    dict(kl='analytic', posterior='full_cov'),
    dict(objective='iwae', num_iw_samples=4),
])
def test_loss_terms_are_a_function_of_the_seed(overrides):
  """Same stateless seed -> identical terms; another seed -> different MC terms."""
  model = _model(**overrides)
  x = _images(6)
  first = model.loss_terms(x, seed=_seed(11, 3), kl_weight=1.0)
  again = model.loss_terms(x, seed=_seed(11, 3), kl_weight=1.0)
  other = model.loss_terms(x, seed=_seed(12, 3), kl_weight=1.0)
  np.testing.assert_array_equal(first[0].numpy(), again[0].numpy())
  for key in model.per_example_keys:
    np.testing.assert_array_equal(first[2][key].numpy(), again[2][key].numpy())
  mc_keys = ['distortion'] + (['rate'] if overrides.get('kl') == 'monte_carlo' else [])
  mc_keys += ['iwae'] if 'iwae' in model.per_example_keys else []
  for key in mc_keys:
    assert not np.allclose(first[2][key].numpy(), other[2][key].numpy()), key
  assert not np.allclose(first[0].numpy(), other[0].numpy())


def test_analytic_rate_does_not_depend_on_the_seed():
  """The analytic rate is a function of x only; the seed changes only the distortion."""
  model = _model(kl='analytic')
  x = _images(6)
  a = model.loss_terms(x, seed=_seed(1), kl_weight=1.0)[2]
  b = model.loss_terms(x, seed=_seed(2), kl_weight=1.0)[2]
  np.testing.assert_array_equal(a['rate'].numpy(), b['rate'].numpy())


def test_sample_and_reconstruct_are_seeded():
  """sample() and reconstruct() repeat with the same seed and change with another."""
  model = _model()
  x = _images(4)
  np.testing.assert_array_equal(model.sample(3, _seed(1)).numpy(),
                                model.sample(3, _seed(1)).numpy())
  assert not np.allclose(model.sample(3, _seed(1)).numpy(),
                         model.sample(3, _seed(2)).numpy())
  np.testing.assert_array_equal(model.reconstruct(x, _seed(1)).numpy(),
                                model.reconstruct(x, _seed(1)).numpy())
  assert not np.allclose(model.reconstruct(x, _seed(1)).numpy(),
                         model.reconstruct(x, _seed(2)).numpy())


# ---------------------------------------------------------------------------------
# The regularizer path against the explicit (analytic) path.


def _twin_models(posterior, seed=3):
  """(regularizer model, analytic model) with the same config and the same weights."""
  reg_model = _model(seed=seed, posterior=posterior, kl='regularizer')
  ana_model = _model(seed=seed, posterior=posterior, kl='analytic')
  _copy_weights(reg_model, ana_model)
  return reg_model, ana_model


@pytest.mark.parametrize('posterior', ['diag', 'full_cov'])
def test_regularizer_equals_analytic_single_replica(posterior):
  """mean(distortion) + regularization == mean(distortion + analytic rate), R = 1."""
  reg_model, ana_model = _twin_models(posterior)
  x = _images(8)
  seed = _seed(21, 5)
  reg_pe, reg, reg_m = reg_model.loss_terms(x, seed=seed, kl_weight=1.0)
  ana_pe, ana_reg, ana_m = ana_model.loss_terms(x, seed=seed, kl_weight=1.0)
  assert float(ana_reg) == 0.0
  np.testing.assert_allclose(reg_pe.numpy(), ana_m['distortion'].numpy(), rtol=1e-6)
  reg_loss = objectives.replica_loss(reg_pe, reg, global_batch_size=8, num_replicas=1)
  ana_loss = objectives.replica_loss(ana_pe, ana_reg, global_batch_size=8,
                                     num_replicas=1)
  np.testing.assert_allclose(float(reg_loss), float(ana_loss), rtol=1e-5)
  np.testing.assert_allclose(float(reg), float(tf.reduce_mean(ana_m['rate'])), rtol=1e-5)
  np.testing.assert_allclose(reg_m['elbo'].numpy().mean(), ana_m['elbo'].numpy().mean(),
                             rtol=1e-5)


@pytest.mark.parametrize('posterior', ['diag', 'full_cov'])
def test_regularizer_equals_analytic_two_way_split(posterior):
  """Two halves as replicas (global batch B, R = 2): the shares sum to the R = 1 loss.

  The R = 1 reference is the analytic model's mean per-example loss over the same
  examples and posterior samples, so double counting or a missing 1/R shows up.
  """
  reg_model, ana_model = _twin_models(posterior)
  x = _images(8)
  halves = (x[:4], x[4:])
  seeds = (_seed(31, 0), _seed(31, 1))
  shares, ana_per_example = [], []
  for half, seed in zip(halves, seeds):
    pe, reg, _ = reg_model.loss_terms(half, seed=seed, kl_weight=1.0)
    shares.append(objectives.replica_loss(pe, reg, global_batch_size=8, num_replicas=2))
    ana_per_example.append(ana_model.loss_terms(half, seed=seed, kl_weight=1.0)[0])
  single = objectives.replica_loss(tf.concat(ana_per_example, 0), tf.constant(0.0),
                                   global_batch_size=8, num_replicas=1)
  np.testing.assert_allclose(float(tf.add_n(shares)), float(single), rtol=1e-5)
  np.testing.assert_allclose(float(single), float(tf.reduce_mean(tf.concat(
      ana_per_example, 0))), rtol=1e-6)


def test_regularizer_is_counted_once_per_call_and_not_accumulated():
  """encoder.losses holds exactly one KL after a call, and a second call reads the same."""
  reg_model, ana_model = _twin_models('diag')
  x = _images(8)
  _, first, _ = reg_model.loss_terms(x, seed=_seed(1), kl_weight=1.0)
  assert len(reg_model.encoder.losses) == 1
  _, second, _ = reg_model.loss_terms(x, seed=_seed(1), kl_weight=1.0)
  assert len(reg_model.encoder.losses) == 1
  assert float(second) == pytest.approx(float(first), rel=1e-6)
  assert float(reg_model.regularization_losses()) == pytest.approx(float(first), rel=1e-6)
  expected = tf.reduce_mean(ana_model.loss_terms(x, seed=_seed(1), kl_weight=1.0)[2]['rate'])
  assert float(first) == pytest.approx(float(expected), rel=1e-5)


def test_regularizer_rate_measurement_and_kl_weight():
  """The 'rate' measurement is the batch-mean KL per example; kl_weight scales the reg."""
  reg_model, _ = _twin_models('diag')
  x = _images(8)
  _, full, measurements = reg_model.loss_terms(x, seed=_seed(1), kl_weight=1.0)
  _, warm, _ = reg_model.loss_terms(x, seed=_seed(1), kl_weight=0.25)
  np.testing.assert_allclose(measurements['rate'].numpy(), np.full(8, float(full)),
                             rtol=1e-6)
  assert float(warm) == pytest.approx(0.25 * float(full), rel=1e-6)


def test_regularizer_equals_analytic_inside_tf_function():
  """The regularizer is counted once when loss_terms is traced into a graph too."""
  reg_model, ana_model = _twin_models('diag')
  x = _images(8)

  @tf.function
  def losses(seed):
    reg_pe, reg, _ = reg_model.loss_terms(x, seed=seed, kl_weight=1.0)
    ana_pe, ana_reg, _ = ana_model.loss_terms(x, seed=seed, kl_weight=1.0)
    return (objectives.replica_loss(reg_pe, reg, global_batch_size=8, num_replicas=1),
            objectives.replica_loss(ana_pe, ana_reg, global_batch_size=8,
                                    num_replicas=1))

  reg_loss, ana_loss = losses(_seed(9))
  np.testing.assert_allclose(float(reg_loss), float(ana_loss), rtol=1e-5)


def test_regularizer_equals_analytic_under_mirrored_strategy(mirrored_strategy):
  """Two real replicas: the SUM of replica_loss shares matches the analytic model."""
  strategy = mirrored_strategy
  assert strategy.num_replicas_in_sync == 2
  with strategy.scope():
    reg_model = _model(seed=3, kl='regularizer')
    ana_model = _model(seed=3, kl='analytic')
  _copy_weights(reg_model, ana_model)
  x = _images(8)
  dataset = tf.data.Dataset.from_tensor_slices(x).batch(8)
  batch = next(iter(strategy.experimental_distribute_dataset(dataset)))

  @tf.function
  def step(batch):
    def replica(images):
      ctx = tf.distribute.get_replica_context()
      seed = tf.random.experimental.stateless_fold_in(_seed(41), ctx.replica_id_in_sync_group)
      out = []
      for model in (reg_model, ana_model):
        pe, reg, _ = model.loss_terms(images, seed=seed, kl_weight=1.0)
        out.append(objectives.replica_loss(pe, reg, global_batch_size=8, num_replicas=2))
      return out
    shares = strategy.run(replica, args=(batch,))
    return [strategy.reduce(tf.distribute.ReduceOp.SUM, s, axis=None) for s in shares]

  reg_loss, ana_loss = step(batch)
  np.testing.assert_allclose(float(reg_loss), float(ana_loss), rtol=1e-5)


# ---------------------------------------------------------------------------------
# Monte Carlo KL and IWAE, in expectation over seeds.

NUM_SEEDS = 200


def _over_seeds(model, x, key, num_seeds=NUM_SEEDS):
  """[num_seeds, B] array of measurement `key` for seeds (s, 7), s = 0..num_seeds-1."""
  @tf.function
  def one(seed):
    return model.loss_terms(x, seed=seed, kl_weight=1.0)[2][key]
  return np.stack([one(_seed(s, 7)).numpy() for s in range(num_seeds)])


def test_monte_carlo_rate_is_unbiased_for_the_analytic_rate():
  """Per example, the mean MC rate over seeds is within 4 standard errors of the KL."""
  model = _model(kl='monte_carlo')
  x = _images(6)
  mc = _over_seeds(model, x, 'rate')
  analytic = objectives.analytic_rate(model.approx_posterior(x),
                                      model.latent_prior).numpy()
  se = mc.std(axis=0, ddof=1) / np.sqrt(len(mc))
  assert np.all(se > 0)
  assert np.all(np.abs(mc.mean(axis=0) - analytic) < 4 * se + 1e-6), (
      mc.mean(axis=0), analytic, se)


def test_monte_carlo_and_analytic_share_the_distortion():
  """With the same weights and seed, MC and analytic KL models give the same distortion."""
  mc_model = _model(seed=5, kl='monte_carlo')
  ana_model = _model(seed=5, kl='analytic')
  _copy_weights(mc_model, ana_model)
  x = _images(6)
  a = mc_model.loss_terms(x, seed=_seed(3), kl_weight=1.0)[2]
  b = ana_model.loss_terms(x, seed=_seed(3), kl_weight=1.0)[2]
  np.testing.assert_allclose(a['distortion'].numpy(), b['distortion'].numpy(), rtol=1e-6)
  assert not np.allclose(a['rate'].numpy(), b['rate'].numpy())


def test_iwae_with_one_sample_is_the_mc_elbo_of_that_sample():
  """K = 1: the IWAE bound is the Monte-Carlo ELBO of its one sample, which is also
  the sample the ELBO measurements come from."""
  model = _model(objective='iwae', num_iw_samples=1, kl='monte_carlo')
  x = _images(6)
  for s in range(3):
    m = model.loss_terms(x, seed=_seed(s, 8), kl_weight=1.0)[2]
    np.testing.assert_allclose(m['iwae'].numpy(), m['elbo'].numpy(), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize('kl', ['monte_carlo', 'analytic', 'regularizer'])
def test_iwae_decodes_its_k_samples_once_and_measures_the_elbo_on_the_first(kl):
  """One decoder pass over the K importance samples and none besides; the measured
  distortion is the first sample's, its rate that sample's estimate (or the analytic
  KL / the regularizer's)."""
  model = _model(objective='iwae', num_iw_samples=3, kl=kl)
  x = _images(4)
  decoded = []
  likelihood = model.likelihood

  def counting(z, dropout_noise=None):
    decoded.append(z)
    return likelihood(z, dropout_noise=dropout_noise)

  model.likelihood = counting
  _, _, m = model.loss_terms(x, seed=_seed(2), kl_weight=1.0)
  assert [tuple(z.shape) for z in decoded] == [(3, 4, model.config.latent_dim)]
  first = decoded[0][0]
  np.testing.assert_allclose(m['distortion'].numpy(),
                             -likelihood(first).log_prob(x).numpy(), rtol=1e-6)
  q = model.approx_posterior(x)
  prior = model.prior_distribution()
  if kl == 'monte_carlo':
    expected_rate = q.log_prob(first) - prior.log_prob(first)
  elif kl == 'analytic':
    expected_rate = tfp.distributions.kl_divergence(q, prior)
  else:
    expected_rate = tf.fill([4], model.regularization_losses())
  np.testing.assert_allclose(m['rate'].numpy(), expected_rate.numpy(), rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(m['elbo'].numpy(), -(m['distortion'] + m['rate']).numpy(),
                             rtol=1e-6)


def test_iwae_loss_is_minus_the_bound():
  """For the IWAE objective the per-example loss is -iwae and regularization is 0."""
  model = _model(objective='iwae', num_iw_samples=5)
  loss, reg, m = model.loss_terms(_images(4), seed=_seed(1), kl_weight=1.0)
  np.testing.assert_array_equal(loss.numpy(), -m['iwae'].numpy())
  assert float(reg) == 0.0


def test_iwae_with_50_samples_bounds_the_elbo_from_above():
  """K = 50: the mean IWAE bound over seeds is >= the mean ELBO (and clearly so)."""
  model = _model(objective='iwae', num_iw_samples=50)
  x = _images(6)
  iwae = _over_seeds(model, x, 'iwae', num_seeds=40)
  elbo = _over_seeds(model, x, 'elbo', num_seeds=40)
  assert iwae.mean() >= elbo.mean()
  assert np.all(iwae.mean(axis=0) >= elbo.mean(axis=0))


# ---------------------------------------------------------------------------------
# Gradients.


@pytest.mark.parametrize('overrides', [
    dict(kl='analytic'),
    dict(kl='monte_carlo'),
    dict(kl='regularizer'),
    dict(objective='iwae', num_iw_samples=3),
    dict(posterior='full_cov'),
    dict(posterior='full_cov', kl='regularizer'),
    dict(activation='swish'),
    dict(gated_units=True),
])
@pytest.mark.parametrize('likelihood', ['gaussian', 'bernoulli'])
def test_every_trainable_variable_gets_a_gradient(overrides, likelihood):
  """One GradientTape of replica_loss reaches every variable with a finite, nonzero grad."""
  model = _model(likelihood=likelihood, likelihood_scale=0.0, **overrides)
  x = _images(6)
  variables = model.trainable_variables
  names = [v.name for v in variables]
  assert any(n.startswith('encoder') for n in names)
  assert any(n.startswith('decoder') for n in names)
  if likelihood == 'gaussian':
    assert model.log_scale is not None
    assert any(v is model.log_scale for v in variables)
  else:
    assert model.log_scale is None
  expected = (len(model.encoder.trainable_variables) + len(model.decoder.trainable_variables)
              + (1 if likelihood == 'gaussian' else 0))
  assert len(variables) == expected
  with tf.GradientTape() as tape:
    pe, reg, _ = model.loss_terms(x, seed=_seed(1), kl_weight=1.0)
    loss = objectives.replica_loss(pe, reg, global_batch_size=6, num_replicas=1)
  grads = tape.gradient(loss, variables)
  for name, grad in zip(names, grads):
    assert grad is not None, name
    grad = tf.convert_to_tensor(grad).numpy()
    assert np.all(np.isfinite(grad)), name
    assert np.any(grad != 0.0), name


@pytest.mark.parametrize('architecture,decoder', [('mlp', 'factorized'), ('conv', 'factorized'),
                                                   ('mlp', 'autoregressive'),
                                                   ('mlp', 'pixelcnn')])
def test_activation_reaches_every_hidden_layer(architecture, decoder):
  """--activation=tanh puts tanh in every hidden layer (none in the output layers),
  and the same weights give other outputs than relu."""
  # Gated units (the MLP's default) have no --activation; this checks the others.
  overrides = dict(architecture=architecture, decoder=decoder, likelihood='bernoulli',
                   gated_units=False)
  if architecture == 'conv':
    overrides.update(encoder_sizes=(16,), decoder_sizes=(16,), conv_filters=(4, 8))
  relu = _model(**overrides)
  tanh = _model(activation='tanh', **overrides)

  def nonlinearities(model):
    nets = (model.encoder, model.decoder) + ((model.pixelcnn,) if model.pixelcnn else ())
    return [layer.activation for net in nets
            for layer in (net, *net.submodules)
            if getattr(layer, 'activation', None) not in (None, tf_keras.activations.linear)]

  assert len(nonlinearities(tanh)) >= 2  # one hidden layer each way at least
  assert all(a is tf_keras.activations.tanh for a in nonlinearities(tanh))
  assert all(a is tf_keras.activations.relu for a in nonlinearities(relu))
  for a, b in zip(relu.trainable_variables, tanh.trainable_variables):
    b.assign(a)
  x = _images(4)
  terms = [m.loss_terms(x, seed=_seed(2), kl_weight=1.0)[0].numpy() for m in (relu, tanh)]
  assert not np.allclose(terms[0], terms[1])


def test_regularizer_gradient_matches_analytic_gradient():
  """The regularizer path and the explicit path give the same gradients, too."""
  reg_model, ana_model = _twin_models('diag')
  x = _images(8)
  grads = []
  for model in (reg_model, ana_model):
    with tf.GradientTape() as tape:
      pe, reg, _ = model.loss_terms(x, seed=_seed(2), kl_weight=1.0)
      loss = objectives.replica_loss(pe, reg, global_batch_size=8, num_replicas=1)
    grads.append(tape.gradient(loss, model.encoder.trainable_variables))
  for reg_grad, ana_grad in zip(*grads):
    np.testing.assert_allclose(reg_grad.numpy(), ana_grad.numpy(), rtol=1e-4, atol=1e-6)


def test_fixed_gaussian_scale_has_no_variable():
  """likelihood_scale > 0 fixes the Gaussian's std: no log_scale variable."""
  model = _model(likelihood='gaussian', likelihood_scale=0.3)
  assert model.log_scale is None
  p = model.likelihood(tf.zeros([2, LATENT]))
  np.testing.assert_allclose(p.distribution.scale.numpy(), 0.3, rtol=1e-6)


# ---------------------------------------------------------------------------------
# pixel_mean initialisation.


def _pixel_mean(image_shape, seed=0):
  """A pixel mean in [0, 1] that includes exact 0s and 1s (to exercise clipping)."""
  mean = np.random.RandomState(seed).uniform(0.0, 1.0, image_shape).astype(np.float32)
  mean.flat[0] = 0.0
  mean.flat[1] = 1.0
  return mean


def test_pixel_mean_sets_bernoulli_bias_to_clipped_logit():
  """mlp, Bernoulli: decoder_out bias == logit(clip(mean, 1e-3, 1 - 1e-3)), flattened."""
  mean = _pixel_mean(SMALL)
  model = _model(pixel_mean=mean)
  bias = model.decoder.get_layer('decoder_out').bias.numpy()
  p = np.clip(mean.reshape(-1).astype(np.float64), 1e-3, 1 - 1e-3)
  np.testing.assert_allclose(bias, np.log(p / (1 - p)), rtol=1e-5, atol=1e-5)
  assert np.all(np.isfinite(bias))


def test_pixel_mean_gives_mean_image_when_output_kernel_is_zero():
  """With a zero output kernel, the decoder's mean at z = 0 is the (clipped) pixel mean."""
  mean = _pixel_mean(SMALL)
  model = _model(pixel_mean=mean)
  kernel = model.decoder.get_layer('decoder_out').kernel
  kernel.assign(tf.zeros_like(kernel))
  image = model.likelihood(tf.zeros([1, LATENT])).mean().numpy()[0]
  np.testing.assert_allclose(image, np.clip(mean, 1e-3, 1 - 1e-3), rtol=1e-4, atol=1e-6)


def test_pixel_mean_sets_gaussian_bias_to_the_mean():
  """mlp, Gaussian: the bias is the pixel mean itself (no logit)."""
  mean = _pixel_mean(SMALL)
  model = _model(pixel_mean=mean, likelihood='gaussian')
  bias = model.decoder.get_layer('decoder_out').bias.numpy()
  np.testing.assert_allclose(bias, mean.reshape(-1), rtol=1e-6)


def test_pixel_mean_conv_uses_per_channel_mean():
  """conv, Bernoulli: the per-channel bias is the logit of the channel's mean pixel."""
  mean = _pixel_mean((28, 28, 2))
  model = _model(image_shape=(28, 28, 2), architecture='conv', pixel_mean=mean)
  bias = model.decoder.get_layer('decoder_out').bias.numpy()
  p = np.clip(mean.reshape(-1, 2).mean(axis=0), 1e-3, 1 - 1e-3)
  assert bias.shape == (2,)
  np.testing.assert_allclose(bias, np.log(p / (1 - p)), rtol=1e-5)


def test_without_pixel_mean_output_bias_is_zero():
  """No pixel_mean: the output bias keeps its zero initialiser."""
  model = _model()
  assert np.all(model.decoder.get_layer('decoder_out').bias.numpy() == 0.0)


# ---------------------------------------------------------------------------------
# eval_terms.


def test_eval_terms_without_importance_samples():
  """iw_samples = 0: elbo, rate, distortion per example, elbo = -(distortion + rate)."""
  model = _model(kl='monte_carlo')
  out = model.eval_terms(_images(5), seed=_seed(1), iw_samples=0, iw_chunk_size=8)
  assert set(out) == set(model.eval_keys(0)) == {'elbo', 'rate', 'distortion'}
  for value in out.values():
    assert value.shape.as_list() == [5]
  np.testing.assert_allclose(out['elbo'].numpy(),
                             -(out['distortion'].numpy() + out['rate'].numpy()), rtol=1e-6)
  assert np.all(out['rate'].numpy() >= 0.0)


def test_eval_terms_log_likelihood_bounds_the_elbo():
  """iw_samples > 0 adds log_likelihood [B]; on average it is >= the ELBO."""
  model = _model()
  x = _images(6)
  lls, elbos = [], []
  for s in range(10):
    out = model.eval_terms(x, seed=_seed(s, 2), iw_samples=64, iw_chunk_size=16)
    assert set(out) == set(model.eval_keys(64))
    assert out['log_likelihood'].shape.as_list() == [6]
    lls.append(out['log_likelihood'].numpy())
    elbos.append(out['elbo'].numpy())
  assert np.mean(lls) >= np.mean(elbos)
  assert np.all(np.mean(lls, axis=0) >= np.mean(elbos, axis=0))


def test_eval_terms_log_likelihood_is_seeded_and_checks_chunking():
  """Same seed gives the same log p(x) estimate; a non-multiple chunk size is refused."""
  model = _model()
  x = _images(4)
  a = model.eval_terms(x, seed=_seed(3), iw_samples=32, iw_chunk_size=8)
  b = model.eval_terms(x, seed=_seed(3), iw_samples=32, iw_chunk_size=8)
  np.testing.assert_array_equal(a['log_likelihood'].numpy(), b['log_likelihood'].numpy())
  with pytest.raises(ValueError, match='multiple of'):
    model.eval_terms(x, seed=_seed(3), iw_samples=30, iw_chunk_size=8)


# ---------------------------------------------------------------------------------
# VAEConfig validation.


@pytest.mark.parametrize('overrides,flag', [
    (dict(objective='iwae', num_iw_samples=5, kl_warmup_steps=10), '--kl_warmup_steps'),
    (dict(objective='elbo', num_iw_samples=4), '--num_iw_samples'),
    (dict(likelihood_scale=-0.1), '--likelihood_scale'),
    (dict(architecture='conv', conv_filters=(8, 16, 32)), '--conv_filters'),
    (dict(architecture='rnn'), '--architecture'),
    (dict(posterior='flow'), '--posterior'),
    (dict(likelihood='poisson'), '--likelihood'),
    (dict(objective='vimco'), '--objective'),
    (dict(kl='exact'), '--kl'),
    (dict(encoder_sizes=()), '--encoder_sizes'),
    (dict(decoder_sizes=(16, 0)), '--decoder_sizes'),
    (dict(latent_dim=0), '--latent_dim'),
    (dict(num_iw_samples=0, objective='iwae'), '--num_iw_samples'),
    (dict(kl_warmup_steps=-1), '--kl_warmup_steps'),
    (dict(activation='gelu'), '--activation'),
])
def test_config_validation_names_the_flag(overrides, flag):
  """Each bad field raises ConfigError (a ValueError) whose message names the flag."""
  with pytest.raises(errors.ConfigError) as info:
    _config(**overrides)
  assert flag + '=' in str(info.value) or flag + ' ' in str(info.value)
  assert isinstance(info.value, ValueError)


@pytest.mark.parametrize('overrides', [
    dict(objective='iwae', num_iw_samples=50),
    dict(objective='elbo', kl_warmup_steps=100),
    dict(architecture='conv', conv_filters=(8, 16)),
    dict(likelihood='gaussian', likelihood_scale=0.0),
    dict(posterior='full_cov', kl='monte_carlo'),
])
def test_config_accepts_valid_combinations(overrides):
  """Valid combinations construct without error and keep their values."""
  config = _config(**overrides)
  for name, value in overrides.items():
    assert getattr(config, name) == value


def test_measurement_and_eval_keys():
  """measurement_keys adds 'iwae' only for that objective; eval_keys adds log_likelihood."""
  assert _model().measurement_keys == ('distortion', 'rate', 'elbo', 'kl_weight')
  iwae = _model(objective='iwae', num_iw_samples=2)
  assert iwae.measurement_keys == ('distortion', 'rate', 'elbo', 'iwae', 'kl_weight')
  assert iwae.eval_keys(0) == ('distortion', 'rate', 'elbo')
  assert iwae.eval_keys(10) == ('distortion', 'rate', 'elbo', 'log_likelihood')


@pytest.mark.parametrize('objective', ['elbo', 'iwae'])
def test_an_ill_conditioned_full_cov_posterior_scores_its_samples_from_eps(objective):
  """The encoder made to output q = N(loc, L L^T) with L's diagonal 0.05 and entries
  up to 3 below it (condition number > 1e12, as a full-covariance VAE reached within
  ten steps of KL warm-up on Fashion-MNIST): the Monte-Carlo rate and the IWAE
  weights are those of log q(z) from the step's eps, finite; `q.log_prob(z)` of the
  same z is hundreds of nats off or worse."""
  dim = 16
  model = _model(posterior='full_cov', latent_dim=dim, kl='monte_carlo', objective=objective,
                 num_iw_samples=4 if objective == 'iwae' else 1)
  params = model.encoder.get_layer('encoder_params')
  rng = np.random.RandomState(0)
  raw_tril = np.tril(rng.uniform(-3.0, 3.0, (dim, dim)), -1)
  raw_tril[np.diag_indices(dim)] = np.log(np.expm1(0.05))  # softplus^-1(0.05)
  kernel, _ = params.get_weights()
  params.set_weights([np.zeros_like(kernel), np.concatenate(
      [np.zeros(dim), _pack_lower_triangular(raw_tril)]).astype(np.float32)])
  x = _images(6)
  q = model.approx_posterior(x)
  np.testing.assert_allclose(q.scale.to_dense().numpy()[0], np.tril(raw_tril, -1)
                             + 0.05 * np.eye(dim), rtol=1e-4, atol=1e-4)
  assert np.linalg.cond(q.scale.to_dense().numpy()[0].astype(np.float64)) > 1e12
  seed = _seed(4)
  loss, _, terms = model.loss_terms(x, kl_weight=1.0, seed=seed)
  assert np.all(np.isfinite(loss.numpy()))
  prior = model.prior_distribution()
  post_noise, iw_noise = sampling.Noise(seed).split(2)
  if objective == 'elbo':
    eps = post_noise.normal([6, dim])
  else:
    eps = iw_noise.normal([4, 6, dim], batch_axis=1)
  z = model.posterior_sample(q, eps)
  log_q = objectives.reparameterized_log_prob(q, eps)
  if objective == 'elbo':
    np.testing.assert_allclose(terms['rate'].numpy(), (log_q - prior.log_prob(z)).numpy(),
                               rtol=1e-5, atol=1e-3)
  else:
    log_w = model.likelihood(z).log_prob(x) + prior.log_prob(z) - log_q
    np.testing.assert_allclose(terms['iwae'].numpy(), objectives.iwae_bound(log_w).numpy(),
                               rtol=1e-5, atol=1e-3)
  assert np.max(np.abs(q.log_prob(z).numpy() - log_q.numpy())) > 100.0


def _pack_lower_triangular(matrix):
  """The vector that `tfp.math.fill_triangular` turns into `matrix`'s lower triangle."""
  n = matrix.shape[0]
  target = tf.constant(np.tril(matrix), tf.float32)
  # fill_triangular is a fixed permutation: find it from the indices.
  probe = tfp_math.fill_triangular(tf.range(n * (n + 1) // 2, dtype=tf.float32)).numpy()
  packed = np.zeros(n * (n + 1) // 2)
  rows, cols = np.tril_indices(n)
  packed[probe[rows, cols].astype(int)] = target.numpy()[rows, cols]
  return packed
