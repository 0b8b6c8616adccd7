"""Tests of the VAE's --decoder_dropout: inverted dropout on the factorized decoder's
hidden layers, in training only.

What is checked: the masks drop hidden units and not the output layer (a network
whose every weight is 1 makes both visible); their average over many draws is the
whole network (inverted scaling); each example gets its own mask, reproducibly from
the step's noise; the masks do not depend on how the batch is split over replicas
(also for the IWAE's [k, B, d] samples); the evaluation, reconstructions and samples
use the whole network; and a run without dropout keeps its noise exactly.
"""
import numpy as np
import pytest
import tensorflow as tf

from engine import errors
from engine import objectives
from engine import sampling
from models import vae

LATENT = 3
SHAPE = (4, 4, 1)


def _vae(rate=0.5, **overrides):
  fields = dict(encoder_sizes=(8,), decoder_sizes=(16,), latent_dim=LATENT,
                decoder_dropout=rate)
  fields.update(overrides)
  return vae.VAE(vae.VAEConfig(**fields), image_shape=SHAPE,
                 pixel_mean=np.full(SHAPE, 0.3, np.float32), seed=1)


def _z(rows, seed=(1, 2)):
  return tf.random.stateless_normal([rows, LATENT], seed=seed)


@pytest.mark.parametrize('gated_units', [False, True], ids=['relu', 'gated'])
def test_hidden_units_are_dropped_and_the_output_layer_is_not(gated_units):
  """With all-ones weights and zero biases, z = 1 gives every hidden unit the value
  LATENT (gated units: LATENT * sigmoid(LATENT)), and every output the sum of the
  kept hidden units times 1 / (1 - rate). So the output is an integer multiple of
  that value / (1 - rate), between 0 and 16 of them: dropout of the output layer
  itself would zero single outputs of a row."""
  model = _vae(rate=0.25, gated_units=gated_units)
  for w in model.decoder.trainable_variables:
    w.assign(tf.ones_like(w) if 'kernel' in w.name else tf.zeros_like(w))
  unit_value = LATENT / (1.0 + np.exp(-LATENT)) if gated_units else LATENT
  out = model._factorized_logits(tf.ones([64, LATENT]), sampling.Noise([5, 6])).numpy()
  units = out / (unit_value / 0.75)
  np.testing.assert_allclose(units, np.round(units), atol=1e-4)
  per_row = np.round(units).reshape(64, -1)
  assert np.all(per_row == per_row[:, :1])  # one count per example: no output dropped
  kept = per_row[:, 0]
  assert kept.min() >= 0 and kept.max() <= 16
  assert abs(kept.mean() / 16 - 0.75) < 0.05  # about 1 - rate of the units are kept
  assert len(set(kept.tolist())) > 1  # masks differ between examples
  whole = model._factorized_logits(tf.ones([1, LATENT])).numpy()
  np.testing.assert_allclose(whole, 16 * unit_value, rtol=1e-5)


def test_the_average_over_masks_is_the_whole_network():
  model = _vae(rate=0.5)  # one hidden layer: the logits are linear in its mask
  z = tf.tile(_z(1), [20000, 1])
  dropped = model._factorized_logits(z, sampling.Noise([3, 4]))
  whole = model._factorized_logits(z[:1])[0]
  std_err = tf.math.reduce_std(dropped, axis=0) / np.sqrt(20000.0)
  assert float(tf.reduce_max(tf.abs(tf.reduce_mean(dropped, 0) - whole) / std_err)) < 5.0
  assert float(tf.reduce_min(tf.math.reduce_std(dropped, axis=0))) > 0.0


def test_masks_are_reproducible_from_the_noise():
  model = _vae()
  z = _z(8)
  a = model._factorized_logits(z, sampling.Noise([7, 8]))
  b = model._factorized_logits(z, sampling.Noise([7, 8]))
  c = model._factorized_logits(z, sampling.Noise([7, 9]))
  assert np.array_equal(a.numpy(), b.numpy())
  assert not np.array_equal(a.numpy(), c.numpy())


@pytest.mark.parametrize('lead', [(4,), (3, 4)], ids=['batch', 'iwae_samples'])
def test_masks_do_not_depend_on_the_replica_split(lead):
  """Two replicas with half the batch each get the masks of one replica with it all."""
  model = _vae(decoder_sizes=(16, 8))
  z = tf.random.stateless_normal(list(lead) + [LATENT], seed=[5, 6])
  one = model._factorized_logits(z, sampling.Noise([7, 8])).numpy()
  halves = [model._factorized_logits(z[..., r * 2:(r + 1) * 2, :],
                                     sampling.Noise([7, 8], r, 2)).numpy()
            for r in range(2)]
  # Equal up to float rounding: a matmul over 2 rows may round differently from one
  # over 4 (seen on an AVX2 machine); another mask would change outputs by O(1).
  np.testing.assert_allclose(np.concatenate(halves, axis=len(lead) - 1), one,
                             rtol=1e-5, atol=1e-6)


def test_evaluation_reconstruction_and_samples_use_the_whole_network():
  dropped, whole = _vae(rate=0.5), _vae(rate=0.0)
  z = _z(5)
  np.testing.assert_array_equal(dropped.likelihood(z).distribution.logits.numpy(),
                                whole.likelihood(z).distribution.logits.numpy())
  x = tf.cast(tf.random.stateless_uniform((5,) + SHAPE, [1, 1]) > 0.5, tf.float32)
  seed = tf.constant([1, 2], tf.int32)
  for method in ('reconstruct', 'sample'):
    arg = x if method == 'reconstruct' else 5
    np.testing.assert_array_equal(getattr(dropped, method)(arg, seed).numpy(),
                                  getattr(whole, method)(arg, seed).numpy())
  a = dropped.eval_terms(x, seed=seed, iw_samples=8, iw_chunk_size=4)
  b = whole.eval_terms(x, seed=seed, iw_samples=8, iw_chunk_size=4)
  for key in a:
    np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())


@pytest.mark.parametrize('objective', ['elbo', 'iwae'])
def test_training_loss_uses_dropout_and_a_rate_of_zero_keeps_the_old_noise(objective):
  x = tf.cast(tf.random.stateless_uniform((6,) + SHAPE, [1, 1]) > 0.5, tf.float32)
  seed = tf.constant([3, 4], tf.int32)
  iw = dict(objective=objective, num_iw_samples=4 if objective == 'iwae' else 1)
  dropped, whole = _vae(rate=0.5, **iw), _vae(rate=0.0, **iw)
  loss_d = dropped.loss_terms(x, kl_weight=1.0, seed=seed)[0].numpy()
  loss_w = whole.loss_terms(x, kl_weight=1.0, seed=seed)[0].numpy()
  assert not np.allclose(loss_d, loss_w)
  # Without dropout the loss is that of the same z and the whole network, whose
  # noise comes from the same streams as before the option existed.
  post_noise, iw_noise = sampling.Noise(seed).split(2)
  q = whole.approx_posterior(x)
  prior = whole.prior_distribution()
  if objective == 'elbo':
    eps = post_noise.normal([6, LATENT])
    z = whole.posterior_sample(q, eps)
    distortion = -whole.likelihood(z).log_prob(x).numpy()
    rate = whole.rate(q, prior, z, eps).numpy()
    np.testing.assert_allclose(loss_w, distortion + rate, rtol=1e-6)
  else:
    # The K importance samples, the first of which gives the measured distortion.
    eps = iw_noise.normal([4, 6, LATENT], batch_axis=1)
    z = whole.posterior_sample(q, eps)
    log_px = whole.likelihood(z).log_prob(x)
    log_w = log_px + prior.log_prob(z) - objectives.reparameterized_log_prob(q, eps)
    np.testing.assert_allclose(loss_w, -objectives.iwae_bound(log_w).numpy(), rtol=1e-6)
    terms = whole.loss_terms(x, kl_weight=1.0, seed=seed)[2]
    np.testing.assert_allclose(terms['distortion'].numpy(), -log_px[0].numpy(), rtol=1e-6)


def test_pixelcnn_decoder_takes_dropout_and_every_variable_gets_a_gradient():
  model = _vae(rate=0.2, decoder='pixelcnn', pixelcnn_filters=4, pixelcnn_kernel=3,
               pixelcnn_latent_maps=2)
  x = tf.cast(tf.random.stateless_uniform((6,) + SHAPE, [1, 1]) > 0.5, tf.float32)
  with tf.GradientTape() as tape:
    loss = tf.reduce_mean(model.loss_terms(x, kl_weight=1.0, seed=[1, 1])[0])
  grads = tape.gradient(loss, model.trainable_variables)
  assert all(g is not None for g in grads)
  assert np.isfinite(loss.numpy())


def test_conv_decoder_takes_dropout():
  model = vae.VAE(vae.VAEConfig(architecture='conv', conv_filters=(2, 2), encoder_sizes=(8,),
                                decoder_sizes=(8,), latent_dim=LATENT, decoder_dropout=0.5),
                  image_shape=(8, 8, 1), seed=0)
  z = _z(4)
  a = model._factorized_logits(z, sampling.Noise([1, 2])).numpy()
  assert a.shape == (4, 8, 8, 1) and np.all(np.isfinite(a))
  assert not np.array_equal(a, model._factorized_logits(z).numpy())


@pytest.mark.parametrize('overrides,message', [
    (dict(decoder_dropout=-0.1), '--decoder_dropout=-0.1'),
    (dict(decoder_dropout=1.0), '--decoder_dropout=1.0'),
    (dict(decoder_dropout='0.1'), "--decoder_dropout='0.1'"),
    (dict(decoder_dropout=True), '--decoder_dropout=True'),
    (dict(decoder_dropout=0.1, decoder='autoregressive'), 'the MADE'),
])
def test_bad_rates_are_refused_naming_the_flag(overrides, message):
  with pytest.raises(errors.ConfigError, match=message.replace('.', r'\.')):
    vae.VAEConfig(**overrides)
