"""Tests of models.made and the VAE's --decoder=autoregressive.

The decisive checks are exact: on 2x2 binary images the 16 probabilities p(x | z)
sum to one (they cannot if any logit sees its own pixel or a later one), and each
logit's gradient with respect to the pixels is zero from its own pixel on.
"""
import itertools

import numpy as np
import pytest
import tensorflow as tf

from engine import errors
from models import made
from models import vae

LATENT = 3


def _decoder(num_pixels=4, hidden=(8, 8), seed=0):
  dec = made.AutoregressiveDecoder(num_pixels, hidden, seed=seed)
  dec(tf.zeros([1, num_pixels]), tf.zeros([1, LATENT]))
  # Random biases too, so that no conditional is trivially 1/2.
  for w in dec.weights:
    if 'bias' in w.name:
      w.assign(tf.random.stateless_normal(w.shape, seed=[seed, 5]))
  return dec


def _all_images(num_pixels):
  return tf.constant(list(itertools.product([0.0, 1.0], repeat=num_pixels)))


def _log_prob(dec, x, z):
  logits = dec(x, z)
  return -tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=x, logits=logits),
                        axis=-1)


def test_hidden_degrees_cover_1_to_d_minus_1():
  deg = made.hidden_degrees(10, 5)
  assert deg.min() == 1 and deg.max() == 4
  assert set(deg) == {1, 2, 3, 4}
  assert list(made.hidden_degrees(3, 784)) == [1, 262, 523]


def test_connectivity_mask_strict_and_not():
  non_strict = made.connectivity_mask([1, 2, 3], [1, 2], strict=False)
  np.testing.assert_array_equal(non_strict, [[1, 1], [0, 1], [0, 0]])
  strict = made.connectivity_mask([1, 2, 3], [1, 2, 3], strict=True)
  np.testing.assert_array_equal(strict, [[0, 1, 1], [0, 0, 1], [0, 0, 0]])


@pytest.mark.parametrize('hidden', [(8,), (8, 8), (3, 5)])
def test_probabilities_of_all_images_sum_to_one(hidden):
  dec = _decoder(num_pixels=4, hidden=hidden, seed=len(hidden))
  x = _all_images(4)
  z = tf.tile(tf.random.stateless_normal([1, LATENT], seed=[1, 2]), [16, 1])
  total = tf.reduce_sum(tf.exp(_log_prob(dec, x, z))).numpy()
  np.testing.assert_allclose(total, 1.0, rtol=1e-5)


def test_sum_to_one_fails_without_the_masks():
  """The test above can fail: with the masks set to one it does."""
  dec = _decoder(num_pixels=4, hidden=(8,))
  for layer in dec.hidden + [dec.out]:
    layer._mask = np.ones_like(layer._mask)
  x = _all_images(4)
  z = tf.zeros([16, LATENT])
  total = tf.reduce_sum(tf.exp(_log_prob(dec, x, z))).numpy()
  assert abs(total - 1.0) > 1e-3


def test_logit_i_depends_only_on_earlier_pixels():
  num_pixels = 9
  dec = _decoder(num_pixels=num_pixels, hidden=(32, 32))
  x = tf.constant(np.random.RandomState(0).randint(0, 2, [1, num_pixels]), tf.float32)
  z = tf.random.stateless_normal([1, LATENT], seed=[3, 4])
  with tf.GradientTape() as tape:
    tape.watch(x)
    logits = dec(x, z)[0]
  jac = tape.jacobian(logits, x).numpy()[:, 0, :]  # [out i, in j]
  assert np.all(jac[np.triu_indices(num_pixels)] == 0.0)
  assert np.count_nonzero(jac) > 0
  # Through the masks, every earlier pixel reaches every later logit (a relu that is
  # off for this x can zero one gradient, so the paths are checked on the masks).
  paths = dec.hidden[0]._mask
  for layer in dec.hidden[1:] + [dec.out]:
    paths = paths @ layer._mask
  np.testing.assert_array_equal(paths > 0, np.triu(np.ones([num_pixels] * 2), 1) > 0)


def test_every_pixel_sees_z():
  dec = _decoder(num_pixels=4)
  x = tf.zeros([1, 4])
  z = tf.zeros([1, LATENT])
  with tf.GradientTape() as tape:
    tape.watch(z)
    logits = dec(x, z)[0]
  jac = tape.jacobian(logits, z).numpy()[:, 0, :]
  assert np.all(np.abs(jac).sum(axis=1) > 0)


def test_generate_draws_from_the_log_prob():
  """Frequencies of 4,000 drawn 2x2 images match exp(log p(x | z)) (chi-square)."""
  dec = _decoder(num_pixels=4)
  n = 4000
  z = tf.tile(tf.random.stateless_normal([1, LATENT], seed=[7, 7]), [n, 1])
  samples, probs = dec.generate(z, tf.constant([1, 2], tf.int32))
  samples = samples.numpy()
  assert set(np.unique(samples)) <= {0.0, 1.0}
  assert np.all((probs.numpy() > 0) & (probs.numpy() < 1))
  codes = samples.astype(int) @ (2 ** np.arange(3, -1, -1))
  observed = np.bincount(codes, minlength=16)
  expected = n * np.exp(_log_prob(dec, _all_images(4), z[:16]).numpy())
  chi2 = np.sum((observed - expected) ** 2 / expected)
  assert chi2 < 37.7  # the 0.999 quantile of chi-square with 15 degrees of freedom


def test_generate_is_seeded():
  dec = _decoder(num_pixels=4)
  z = tf.random.stateless_normal([8, LATENT], seed=[1, 1])
  a, _ = dec.generate(z, tf.constant([5, 5], tf.int32))
  b, _ = dec.generate(z, tf.constant([5, 5], tf.int32))
  np.testing.assert_array_equal(a.numpy(), b.numpy())


# ---------------------------------------------------------------------------------
# Inside the VAE.

SMALL = (2, 2, 1)


def _vae(**overrides):
  fields = dict(encoder_sizes=(16,), decoder_sizes=(16,), latent_dim=LATENT,
                decoder='autoregressive')
  fields.update(overrides)
  return vae.VAE(vae.VAEConfig(**fields), image_shape=SMALL, seed=0)


def test_vae_likelihood_sums_to_one_over_images_for_a_batch_of_latents():
  model = _vae()
  z = tf.random.stateless_normal([2, 3, LATENT], seed=[4, 4])  # [K, B, d]
  x = tf.reshape(_all_images(4), [16, 1, 1] + list(SMALL))
  log_p = model.likelihood(z).log_prob(x)  # broadcast to [16, K, B]
  assert log_p.shape == (16, 2, 3)
  np.testing.assert_allclose(tf.reduce_sum(tf.exp(log_p), axis=0).numpy(),
                             np.ones([2, 3]), rtol=1e-5)


# Broadcasting, training and evaluation inside the VAE: test_pixelcnn.py, for both
# decoders.


def test_vae_pixel_mean_sets_the_made_output_bias():
  mean = np.full(SMALL, 0.25, np.float32)
  model = vae.VAE(vae.VAEConfig(encoder_sizes=(16,), decoder_sizes=(16,),
                                latent_dim=LATENT, decoder='autoregressive'),
                  image_shape=SMALL, pixel_mean=mean, seed=0)
  np.testing.assert_allclose(model.decoder.out.bias.numpy(), np.log(0.25 / 0.75),
                             rtol=1e-5)


@pytest.mark.parametrize('overrides,flag', [
    (dict(decoder='pixelrnn'), '--decoder'),
    (dict(decoder='autoregressive', likelihood='gaussian'), '--decoder=autoregressive'),
])
def test_decoder_config_errors_name_the_flag(overrides, flag):
  with pytest.raises(errors.ConfigError, match=flag):
    vae.VAEConfig(**overrides)


def test_conv_encoder_with_autoregressive_decoder():
  model = vae.VAE(vae.VAEConfig(architecture='conv', encoder_sizes=(16,),
                                decoder_sizes=(16,), conv_filters=(4, 4),
                                latent_dim=LATENT, decoder='autoregressive'),
                  image_shape=(8, 8, 1), seed=0)
  x = tf.constant(np.random.RandomState(0).randint(0, 2, (2, 8, 8, 1)), tf.float32)
  loss, _, _ = model.loss_terms(x, kl_weight=1.0, seed=tf.constant([1, 1], tf.int32))
  assert loss.shape == (2,) and np.all(np.isfinite(loss.numpy()))
