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

A third learned prior adds a second stochastic layer above z:

  hierarchical  p(z) = integral of p(z | u) p(u) du over a top latent u, with
           p(u) = N(0, I) or a learned mixture of diagonal Gaussians (as
           'mixture' above, over u) and p(z | u) a diagonal Gaussian from an MLP (the
           two-stochastic-layer VAE of Burda et al., 2016, "Importance Weighted
           Autoencoders", with inference bottom-up: q(z, u | x) = q(z | x) q(u | z)).

None has a closed-form KL against q(z | x): the rate is estimated by Monte Carlo
from the step's own latent sample (`engine.objectives.monte_carlo_rate`). The
hierarchical prior's log p(z) has no closed form either; its `log_prob(z, noise)`
draws u ~ q(u | z) and returns log p(z | u) + log p(u) - log q(u | z), whose
exponential is unbiased for p(z). So its Monte-Carlo rate makes the ELBO the
two-layer model's ELBO, and an importance-sampled log p(x) with it is the two-layer
model's estimate over joint samples (z, u).
Each prior is rebuilt from its variables on every call, so it is always current
inside a compiled step.

Diagonal mixtures are `DiagonalGaussianMixture`, whose log-density is written out
as one expression over [..., K, d] instead of going through
`tfd.MixtureSameFamily(tfd.MultivariateNormalDiag)`: the same value (a test checks
it), but XLA fuses it into one loop, and the TFP form made a training step with
K = 100 about twice as slow as the standard-normal step on the 2-core CPU.
"""
import math

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from engine import objectives

tfd = tfp.distributions

LATENT_PRIORS = ('normal', 'mixture', 'vamp', 'hierarchical')

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


def diagonal_mixture_log_prob(z, mixture_logits, locs, scales):
  """log sum_k pi_k N(z; locs_k, diag(scales_k^2)) for z [..., d]; returns [...].

  Args:
    z: points [..., d].
    mixture_logits: [K] unnormalised log weights.
    locs, scales: [K, d] component means and standard deviations.
  """
  d = tf.cast(tf.shape(locs)[-1], z.dtype)
  standardized = (z[..., None, :] - locs) / scales  # [..., K, d]
  component = (-0.5 * tf.reduce_sum(tf.square(standardized), axis=-1)
               - tf.reduce_sum(tf.math.log(scales), axis=-1)
               - 0.5 * d * math.log(2 * math.pi))  # [..., K]
  return tf.reduce_logsumexp(tf.nn.log_softmax(mixture_logits) + component, axis=-1)


class DiagonalGaussianMixture:
  """A mixture of K diagonal Gaussians over R^d: `log_prob` and seeded `sample`.

  The part of the `tfd.Distribution` interface the VAE uses for p(z).
  """

  def __init__(self, mixture_logits, locs, scales):
    self.mixture_logits = mixture_logits
    self.locs = locs
    self.scales = scales

  def log_prob(self, z):
    return diagonal_mixture_log_prob(z, self.mixture_logits, self.locs, self.scales)

  def sample(self, num, seed):
    """[num, d] draws for a stateless seed (int32 [2])."""
    component_seed, normal_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    k = tf.random.stateless_categorical(self.mixture_logits[None], num,
                                        seed=component_seed)[0]
    eps = tf.random.stateless_normal([num, tf.shape(self.locs)[-1]], seed=normal_seed)
    return tf.gather(self.locs, k) + tf.gather(self.scales, k) * eps


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
    return DiagonalGaussianMixture(self.logits, self.locs,
                                   tf.math.softplus(self.raw_scales) + 1e-5)


class VampPrior(tf.Module):
  """p(z) = (1/K) sum_k q(z | u_k) over K learned pseudo-inputs u_k (Tomczak & Welling).

  The pseudo-inputs start as the given images (`pseudo_input_images` picks K distinct
  training images) and stay in (0, 1) through a sigmoid; calling the prior runs the
  encoder on them once.
  """

  def __init__(self, initial_images, *, diagonal=True, name='latent_prior'):
    """Args: initial_images: [K, H, W, C] in [0, 1]; diagonal: the encoder's posterior
    is a diagonal Gaussian (else full covariance, mixed through TFP)."""
    super().__init__(name=name)
    self._diagonal = diagonal
    images = np.clip(np.asarray(initial_images, np.float32), _PSEUDO_CLIP, 1 - _PSEUDO_CLIP)
    self.pseudo_logits = tf.Variable(np.log(images) - np.log1p(-images),
                                     name='pseudo_input_logits')

  @property
  def pseudo_inputs(self):
    """The K pseudo-images in (0, 1), shaped like the data."""
    return tf.math.sigmoid(self.pseudo_logits)

  def __call__(self, encoder):
    components = encoder(self.pseudo_inputs)
    logits = tf.zeros(tf.shape(self.pseudo_logits)[:1])
    if self._diagonal:
      return DiagonalGaussianMixture(logits, components.loc,
                                     components.scale.diag_part())
    # A full-covariance posterior: components with correlated scales.
    return tfd.MixtureSameFamily(tfd.Categorical(logits=logits), components,
                                 name='latent_prior')


def _diagonal_normal_params(params, dim):
  """[..., 2 * dim] -> (loc, scale), the scale through softplus (as the posterior's)."""
  return params[..., :dim], tf.math.softplus(params[..., dim:]) + 1e-5


class HierarchicalLatents:
  """p(z) of `HierarchicalPrior`: a one-sample log-density and seeded `sample`.

  `log_prob` needs noise (`log_prob_needs_noise`): engine.objectives passes it.
  """

  log_prob_needs_noise = True

  def __init__(self, module):
    self._m = module

  def conditional(self, u):
    """p(z | u) as (loc, scale), [..., d] each."""
    return _diagonal_normal_params(_apply(self._m.generative, u), self._m.latent_dim)

  def top_posterior(self, z):
    """q(u | z) as (loc, scale), [..., top_dim] each."""
    return _diagonal_normal_params(_apply(self._m.inference, z), self._m.top_dim)

  def log_prob(self, z, noise):
    """log p(z | u) + log p(u) - log q(u | z) for u ~ q(u | z); returns [...].

    Args:
      z: [..., B, d] latents; the second-to-last axis is the batch.
      noise: an `engine.sampling.Noise` for u's standard-normal draws.
    """
    z = tf.convert_to_tensor(z, tf.float32)
    lead = [tf.shape(z)[i] for i in range(z.shape.rank - 1)]
    eps = noise.normal(lead + [self._m.top_dim], batch_axis=z.shape.rank - 2)
    u_loc, u_scale = self.top_posterior(z)
    u = u_loc + u_scale * eps
    log_q_u = (objectives.standard_normal_log_prob(eps)
               - tf.reduce_sum(tf.math.log(u_scale), axis=-1))
    z_loc, z_scale = self.conditional(u)
    log_p_z = objectives.standard_normal_log_prob((z - z_loc) / z_scale) - tf.reduce_sum(
        tf.math.log(z_scale), axis=-1)
    return log_p_z + self._top_log_prob(u) - log_q_u

  def _top_log_prob(self, u):
    if self._m.top is None:
      return objectives.standard_normal_log_prob(u)
    return self._m.top().log_prob(u)

  def sample(self, num, seed):
    """[num, d] draws z ~ p(z | u), u ~ p(u), for a stateless seed (int32 [2])."""
    top_seed, z_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if self._m.top is None:
      u = tf.random.stateless_normal([num, self._m.top_dim], seed=top_seed)
    else:
      u = self._m.top().sample(num, top_seed)
    loc, scale = self.conditional(u)
    return loc + scale * tf.random.stateless_normal(tf.shape(loc), seed=z_seed)


def _apply(network, t):
  """A Sequential on t [..., n] with any number of leading axes."""
  flat = tf.reshape(t, [-1, t.shape[-1]])
  out = network(flat)
  return tf.reshape(out, tf.concat([tf.shape(t)[:-1], tf.shape(out)[-1:]], axis=0))


class HierarchicalPrior(tf.Module):
  """p(z) = integral p(z | u) p(u) du, with the auxiliary posterior q(u | z).

  p(u) is N(0, I), or with `top_components` K > 0 a `MixturePrior` of K diagonal
  Gaussians over u. Both conditionals are diagonal Gaussians from an MLP of one
  hidden layer (`units` units, `activation`). The output layers start with a zero
  kernel and the scale's bias at softplus^-1(1): p(z | u) starts as N(0, I) whatever
  u, so an untrained model is the VAE with the standard-normal prior, and q(u | z)
  as N(0, I).
  """

  def __init__(self, latent_dim, top_dim, units, *, activation='relu', seed=0,
               top_components=0, name='latent_prior'):
    super().__init__(name=name)
    self.latent_dim, self.top_dim = int(latent_dim), int(top_dim)
    self.top = (MixturePrior(self.top_dim, int(top_components), seed=seed, name='top_prior')
                if top_components else None)

    def network(inputs, outputs, net_name, salt):
      bias = np.concatenate([np.zeros([outputs], np.float32),
                             np.full([outputs], _UNIT_SCALE_RAW, np.float32)])
      return tf_keras.Sequential([
          tf_keras.Input((inputs,)),
          tf_keras.layers.Dense(
              units, activation=activation, name=f'{net_name}_hidden', dtype='float32',
              kernel_initializer=tf_keras.initializers.GlorotUniform(seed=seed + salt)),
          tf_keras.layers.Dense(
              2 * outputs, name=f'{net_name}_params', dtype='float32',
              kernel_initializer='zeros',
              bias_initializer=tf_keras.initializers.Constant(bias))], name=net_name)

    self.generative = network(self.top_dim, self.latent_dim, 'prior_conditional', 1)
    self.inference = network(self.latent_dim, self.top_dim, 'top_posterior', 2)

  def __call__(self, encoder=None):
    del encoder
    return HierarchicalLatents(self)


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
