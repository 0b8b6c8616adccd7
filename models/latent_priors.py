"""Latent priors p(z) for the VAE: the standard normal and two learned mixtures.

A standard-normal prior charges every example for the mismatch between it and the
aggregate posterior (the average of q(z | x) over the data); a prior that can
follow the aggregate posterior lowers the rate at no cost to the distortion
(Hoffman & Johnson 2016, "ELBO surgery"; Tomczak & Welling 2018, "VAE with a
VampPrior"). Both learned priors here are mixtures of K diagonal (or, for 'vamp'
with a full-covariance posterior, full) Gaussians:

  mixture  K components with learned weights, means and scales;
  vamp     the VampPrior: the uniform mixture of q(z | u_k) over K learned
           pseudo-inputs u_k, which share the encoder's weights, so the prior moves
           with the posterior.

Neither has a closed-form KL against q(z | x): the rate is estimated by Monte
Carlo from the step's own latent sample (`engine.objectives.monte_carlo_rate`).
Each prior is rebuilt from its variables on every call, so it is always current
inside a compiled step.
"""
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions

LATENT_PRIORS = ('normal', 'mixture', 'vamp')

# softplus^-1(1): a raw scale that gives a unit standard deviation.
_UNIT_SCALE_RAW = float(np.log(np.expm1(1.0)))
# Pseudo-inputs are stored as logits so the images they encode stay in (0, 1); the
# initial training images are clipped away from 0 and 1 to keep the logits finite
# and the gradient through the sigmoid alive.
_PSEUDO_CLIP = 0.05


def standard_normal(latent_dim):
  """N(0, I) over R^latent_dim."""
  return tfd.MultivariateNormalDiag(loc=tf.zeros([latent_dim]),
                                    scale_diag=tf.ones([latent_dim]), name='latent_prior')


class StandardNormalPrior(tf.Module):
  """p(z) = N(0, I); no variables."""

  def __init__(self, latent_dim, name='latent_prior'):
    super().__init__(name=name)
    self.distribution = standard_normal(latent_dim)

  def __call__(self, encoder=None):
    del encoder
    return self.distribution


class MixturePrior(tf.Module):
  """p(z) = sum_k pi_k N(z; mu_k, diag(sigma_k^2)) with learned pi, mu and sigma.

  Means start as draws from N(0, I) (seeded), scales at 1 and weights equal, so the
  prior starts close to a spread-out standard normal.
  """

  def __init__(self, latent_dim, num_components, *, seed=0, name='latent_prior'):
    super().__init__(name=name)
    rng = np.random.default_rng(seed)
    self.logits = tf.Variable(tf.zeros([num_components]), name='mixture_logits')
    self.locs = tf.Variable(rng.standard_normal([num_components, latent_dim])
                            .astype(np.float32), name='mixture_locs')
    self.raw_scales = tf.Variable(tf.fill([num_components, latent_dim], _UNIT_SCALE_RAW),
                                  name='mixture_raw_scales')

  def __call__(self, encoder=None):
    del encoder
    components = tfd.MultivariateNormalDiag(
        loc=self.locs, scale_diag=tf.math.softplus(self.raw_scales) + 1e-5)
    return tfd.MixtureSameFamily(tfd.Categorical(logits=self.logits), components,
                                 name='latent_prior')


class VampPrior(tf.Module):
  """p(z) = (1/K) sum_k q(z | u_k) over K learned pseudo-inputs u_k (Tomczak & Welling).

  The pseudo-inputs start as K distinct training images (chosen with `seed`), kept in
  (0, 1) through a sigmoid; calling the prior runs the encoder on them once.
  """

  def __init__(self, initial_images, *, name='latent_prior'):
    super().__init__(name=name)
    images = np.clip(np.asarray(initial_images, np.float32), _PSEUDO_CLIP, 1 - _PSEUDO_CLIP)
    self.pseudo_logits = tf.Variable(np.log(images) - np.log1p(-images),
                                     name='pseudo_input_logits')

  @property
  def pseudo_inputs(self):
    """The K pseudo-images in (0, 1), shaped like the data."""
    return tf.math.sigmoid(self.pseudo_logits)

  def __call__(self, encoder):
    components = encoder(self.pseudo_inputs)
    num = tf.shape(self.pseudo_logits)[0]
    return tfd.MixtureSameFamily(tfd.Categorical(logits=tf.zeros([num])), components,
                                 name='latent_prior')


def pseudo_input_images(train_images_uint8, num_components, seed):
  """K distinct training images in [0, 1], chosen with `seed`, to start a VampPrior.

  Raises:
    ValueError: fewer training images than components.
  """
  n = int(train_images_uint8.shape[0])
  if num_components > n:
    raise ValueError(f'{num_components} pseudo-inputs need as many training images; '
                     f'the data has {n}.')
  rows = np.random.default_rng(seed).choice(n, size=num_components, replace=False)
  return np.asarray(train_images_uint8[np.sort(rows)], np.float32) / 255.0
