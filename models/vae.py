"""Variational autoencoder: an encoder that outputs q(z | x) through tfp.layers, a
standard-normal latent prior, and a decoder that outputs p(x | z).

The model only builds distributions and per-example loss terms; the engine reduces
them over the global batch (`engine.objectives.replica_loss`).
"""
import dataclasses
import functools
import math
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from engine import errors
from engine import evaluation
from engine import inputs
from engine import objectives
from engine import sampling
from engine import summaries
from models import bias
from models import gated as gated_lib
from models import latent_priors
from models import made
from models import pixelcnn

tfd = tfp.distributions
tfpl = tfp.layers

ARCHITECTURES = ('mlp', 'conv')
POSTERIORS = ('diag', 'full_cov')
LIKELIHOODS = ('bernoulli', 'gaussian')
DECODERS = ('factorized', 'autoregressive', 'pixelcnn')
ACTIVATIONS = ('relu', 'elu', 'swish', 'softplus', 'tanh')  # tf_keras activation names
LATENT_PRIORS = latent_priors.LATENT_PRIORS
TOP_PRIORS = ('normal', 'mixture')


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The VAE's architecture and objective. Field names are the flag names.

  Attributes:
    architecture: 'mlp' or 'conv' (two strided conv layers each way).
    encoder_sizes: hidden sizes of the MLP encoder (the decoder mirrors
      `decoder_sizes`); for 'conv', the size of the dense layer after the convs.
    decoder_sizes: hidden sizes of the MLP decoder (of the MADE for an
      autoregressive decoder).
    conv_filters: filters of the two conv layers ('conv' only).
    latent_dim: dimension of z.
    posterior: 'diag' (mean-field normal) or 'full_cov' (MultivariateNormalTriL).
    likelihood: 'bernoulli' (binarized pixels) or 'gaussian' (pixels in [0, 1]).
    decoder: 'factorized' (pixels independent given z: the MLP or deconv decoder)
      or 'autoregressive' (a MADE conditioned on z, models/made.py: each pixel
      also depends on the pixels before it; Bernoulli only) or 'pixelcnn' (the
      factorized decoder's logits corrected from a causal convolution of the pixels
      above and to the left of each pixel, models/pixelcnn.py; Bernoulli,
      single-channel images only).
    pixelcnn_filters: channels of the pixelcnn decoder's hidden layers.
    pixelcnn_kernel: size (odd, >= 3) of its causal convolution window.
    pixelcnn_layers: its 1 x 1 hidden layers after the causal convolution (>= 0).
    pixelcnn_logit_window: 0, or the size m (odd, >= 3) of an m x m window of the
      factorized decoder's probabilities around each pixel that the pixelcnn head
      also reads (0: only the pixel's own logit).
    pixelcnn_latent_maps: C >= 0 more numbers per pixel that the factorized
      decoder computes from z for the pixelcnn head, beside its logits (0: none).
    pixelcnn_maps_rank: 0, or r > 0: the MLP decoder computes the latent maps of an
      image from r numbers (a linear layer of r units after its last hidden layer),
      so that part of its output layer costs r * (hidden + H * W * C) rather than
      hidden * H * W * C multiply-adds (0: the output layer computes them directly).
    decoder_dropout: rate in [0, 1) of inverted dropout on the factorized
      decoder's hidden layers (not its output layer), in training only; the
      evaluation, reconstructions and samples use the whole network (0: none).
    likelihood_scale: fixed std of the Gaussian likelihood; 0 learns it.
    objective: 'elbo' or 'iwae'.
    num_iw_samples: samples per example for the IWAE objective.
    kl: rate estimator for the ELBO: 'analytic', 'monte_carlo', or 'regularizer'
      (a `tfp.layers.KLDivergenceRegularizer` on the posterior layer; analytic KL).
    kl_warmup_steps: linear KL warm-up length in steps (ELBO only).
    latent_prior: p(z): 'normal' (standard normal), 'mixture' (a learned mixture
      of diagonal Gaussians) or 'vamp' (the VampPrior: a mixture of the posteriors
      of learned pseudo-inputs) or 'hierarchical' (a second stochastic layer: p(z) =
      integral of p(z | u) p(u) du, with an auxiliary q(u | z)); see
      models/latent_priors.py. The learned priors have no closed-form KL: they need
      kl='monte_carlo'.
    prior_components: K, the mixture's components or the VampPrior's pseudo-inputs.
    top_latent_dim: dimension of the hierarchical prior's top latent u.
    top_prior: p(u) of the hierarchical prior: 'normal' (N(0, I)) or 'mixture' (a
      learned mixture of `prior_components` diagonal Gaussians over u).
    top_units: hidden units of the hierarchical prior's p(z | u) and q(u | z).
    activation: nonlinearity of every hidden layer (conv, MADE, the pixelcnn
      head, and the MLP with gated_units=False); gated units have none.
    gated_units: the MLP encoder's and factorized decoder's hidden layers are
      gated linear units, h = (W x + b) * sigmoid(V x + c) (models/gated.py), with
      no other nonlinearity; --activation still applies to the MADE's and the
      pixelcnn head's layers. MLP architecture only. None (the default) means
      on for 'mlp' and off for 'conv'; the config holds the resolved bool.
  """
  architecture: str = 'mlp'
  encoder_sizes: Tuple[int, ...] = (512, 256)
  decoder_sizes: Tuple[int, ...] = (256, 512)
  conv_filters: Tuple[int, ...] = (32, 64)
  latent_dim: int = 32
  posterior: str = 'diag'
  likelihood: str = 'bernoulli'
  decoder: str = 'factorized'
  pixelcnn_filters: int = 32
  pixelcnn_kernel: int = 7
  pixelcnn_layers: int = 1
  pixelcnn_logit_window: int = 0
  pixelcnn_latent_maps: int = 0
  pixelcnn_maps_rank: int = 0
  decoder_dropout: float = 0.0
  likelihood_scale: float = 0.0
  objective: str = 'elbo'
  num_iw_samples: int = 1
  kl: str = 'analytic'
  kl_warmup_steps: int = 0
  latent_prior: str = 'normal'
  prior_components: int = 100
  top_latent_dim: int = 16
  top_units: int = 256
  top_prior: str = 'normal'
  activation: str = 'relu'
  gated_units: Optional[bool] = None

  def __post_init__(self):
    if self.gated_units is None:
      object.__setattr__(self, 'gated_units', self.architecture == 'mlp')
    for name, value, choices in (('architecture', self.architecture, ARCHITECTURES),
                                 ('posterior', self.posterior, POSTERIORS),
                                 ('likelihood', self.likelihood, LIKELIHOODS),
                                 ('decoder', self.decoder, DECODERS),
                                 ('objective', self.objective, objectives.OBJECTIVES),
                                 ('kl', self.kl, objectives.KL_ESTIMATORS),
                                 ('latent_prior', self.latent_prior, LATENT_PRIORS),
                                 ('top_prior', self.top_prior, TOP_PRIORS),
                                 ('activation', self.activation, ACTIVATIONS)):
      if value not in choices:
        raise errors.ConfigError(
            f'--{name}={value!r} is not known; choose one of: {", ".join(choices)}.')
    for name in ('encoder_sizes', 'decoder_sizes', 'conv_filters'):
      sizes = getattr(self, name)
      if not sizes or any(not isinstance(s, int) or isinstance(s, bool) or s <= 0
                          for s in sizes):
        raise errors.ConfigError(
            f'--{name}={",".join(map(str, sizes))}: give one or more positive integers, '
            f'e.g. 512,256.')
    if self.architecture == 'conv' and len(self.conv_filters) != 2:
      raise errors.ConfigError(
          f'--conv_filters={",".join(map(str, self.conv_filters))}: the conv VAE takes '
          f'exactly two filter counts, e.g. 32,64.')
    for name in ('latent_dim', 'num_iw_samples', 'prior_components', 'pixelcnn_filters',
                 'top_latent_dim', 'top_units'):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise errors.ConfigError(f'--{name}={value!r}: must be a positive integer.')
    if not isinstance(self.kl_warmup_steps, int) or self.kl_warmup_steps < 0:
      raise errors.ConfigError(
          f'--kl_warmup_steps={self.kl_warmup_steps!r}: must be an integer >= 0.')
    _check_window('pixelcnn_kernel', self.pixelcnn_kernel, 7)
    for name in ('pixelcnn_layers', 'pixelcnn_latent_maps', 'pixelcnn_maps_rank'):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise errors.ConfigError(f'--{name}={value!r}: must be an integer >= 0.')
    for name in ('pixelcnn_logit_window', 'pixelcnn_latent_maps'):
      if getattr(self, name) and self.decoder != 'pixelcnn':
        raise errors.ConfigError(
            f'--{name}={getattr(self, name)} feeds the pixelcnn decoder; '
            f'--decoder={self.decoder} has no use for it. Use --decoder=pixelcnn, or '
            f'--{name}=0.')
    if self.pixelcnn_maps_rank and not self.pixelcnn_latent_maps:
      raise errors.ConfigError(
          f'--pixelcnn_maps_rank={self.pixelcnn_maps_rank} sets the rank of the latent '
          f'maps; --pixelcnn_latent_maps=0 asks for none. Give --pixelcnn_latent_maps=C '
          f'(e.g. 8), or --pixelcnn_maps_rank=0.')
    if self.pixelcnn_maps_rank and self.architecture != 'mlp':
      raise errors.ConfigError(
          f'--pixelcnn_maps_rank={self.pixelcnn_maps_rank} factors the MLP decoder\'s '
          f'output layer; --architecture={self.architecture} computes the maps with a '
          f'transposed convolution. Use --architecture=mlp, or --pixelcnn_maps_rank=0.')
    rate = self.decoder_dropout
    if (not isinstance(rate, (int, float)) or isinstance(rate, bool)
        or not 0.0 <= rate < 1.0):
      raise errors.ConfigError(
          f'--decoder_dropout={rate!r}: must be a rate in [0, 1), e.g. 0.1 '
          f'(0: no dropout).')
    if rate and self.decoder == 'autoregressive':
      raise errors.ConfigError(
          f'--decoder_dropout={rate} acts on the factorized decoder\'s '
          f'hidden layers; --decoder=autoregressive (the MADE) has none. Use '
          f'--decoder_dropout=0, or --decoder=factorized or pixelcnn.')
    if not isinstance(self.gated_units, bool):
      raise errors.ConfigError(
          f'--gated_units={self.gated_units!r}: must be true or false.')
    if self.gated_units and self.architecture != 'mlp':
      raise errors.ConfigError(
          f'--gated_units gates the MLP networks\' hidden layers; '
          f'--architecture={self.architecture} has convolutions there. Use '
          f'--architecture=mlp, or --nogated_units.')
    if self.pixelcnn_logit_window != 0:
      _check_window('pixelcnn_logit_window', self.pixelcnn_logit_window, 5, zero_is_off=True)
    if self.likelihood_scale < 0:
      raise errors.ConfigError(
          f'--likelihood_scale={self.likelihood_scale}: must be >= 0 (0 learns the scale).')
    if self.decoder != 'factorized' and self.likelihood != 'bernoulli':
      raise errors.ConfigError(
          f'--decoder={self.decoder} models binary pixels: it needs '
          f'--likelihood=bernoulli, not {self.likelihood!r}. Use --decoder=factorized '
          f'for a Gaussian likelihood.')
    if self.objective == 'iwae' and self.kl_warmup_steps:
      raise errors.ConfigError(
          '--kl_warmup_steps applies to --objective=elbo only; the IWAE bound has no '
          'separate rate term to warm up. Set --kl_warmup_steps=0.')
    if self.latent_prior != 'normal' and self.kl != 'monte_carlo':
      raise errors.ConfigError(
          f'--kl={self.kl} needs --latent_prior=normal: the KL from q(z|x) to a '
          f'{self.latent_prior!r} prior has no closed form. Use --kl=monte_carlo (an '
          f'estimate from the same latent sample).')
    if self.top_prior != 'normal' and self.latent_prior != 'hierarchical':
      raise errors.ConfigError(
          f'--top_prior={self.top_prior} sets p(u) of --latent_prior=hierarchical; '
          f'--latent_prior={self.latent_prior} has no top latent. Use '
          f'--latent_prior=hierarchical, or --top_prior=normal.')
    if self.objective == 'elbo' and self.num_iw_samples != 1:
      raise errors.ConfigError(
          f'--num_iw_samples={self.num_iw_samples} needs --objective=iwae '
          f'(the ELBO uses one sample).')


class _RegularizeDistributionOnly:
  """Mixin for tfp distribution layers: apply the activity regularizer once.

  tfp's distribution layers return (distribution, sampled value) from the inner
  Layer.__call__, and tf_keras applies the activity regularizer to every flattened
  output, so a KLDivergenceRegularizer would add the KL twice
  (tensorflow/probability#1215). Regularize the distribution only.
  """

  def _handle_activity_regularization(self, inputs, outputs):
    if isinstance(outputs, (tuple, list)) and len(outputs) == 2:
      outputs = outputs[0]
    super()._handle_activity_regularization(inputs, outputs)


class _DistributionLambda(_RegularizeDistributionOnly, tfpl.DistributionLambda):
  pass


class _MultivariateNormalTriL(_RegularizeDistributionOnly, tfpl.MultivariateNormalTriL):
  pass


def _mlp(sizes, name, seed, activation, gated=False):
  init = lambda i: tf_keras.initializers.GlorotUniform(seed=seed + i)
  if gated:
    return [gated_lib.GatedDense(s, name=f'{name}_gated{i}', kernel_initializer=init(i))
            for i, s in enumerate(sizes)]
  return [tf_keras.layers.Dense(s, activation=activation, name=f'{name}_dense{i}',
                                kernel_initializer=init(i))
          for i, s in enumerate(sizes)]


class VAE(tf.Module):
  """q(z | x), p(z) and p(x | z) for images of a fixed shape.

  Sampling is stateless: every method that samples takes a `seed` (int32 [2]), so
  a step's randomness is a function of (run seed, step) and resumes exactly.
  """

  def __init__(self, config: VAEConfig, *, image_shape, pixel_mean=None, seed=0,
               pseudo_inputs=None, name='vae'):
    """Builds the networks.

    Args:
      config: the VAEConfig.
      image_shape: (H, W, C) of one example.
      pixel_mean: optional [H, W, C] mean of the training pixels in [0, 1]; the
        decoder's output bias starts at its logit (Bernoulli) or value (Gaussian),
        which speeds up early training.
      seed: initialiser seed.
      pseudo_inputs: [K, H, W, C] images in [0, 1] that start the VampPrior's
        pseudo-inputs (latent_prior='vamp'; default: K copies of `pixel_mean`, or
        0.5, with seeded jitter).
      name: module name.
    """
    super().__init__(name=name)
    self.config = config
    self.image_shape = tuple(int(s) for s in image_shape)
    h, w, c = self.image_shape
    num_pixels = h * w * c
    d = config.latent_dim
    # The fixed N(0, I): the KLDivergenceRegularizer's target. The prior the model
    # trains with is `self.prior` (a module; `prior_distribution()` gives p(z)).
    self.latent_prior = latent_priors.standard_normal(d)
    if config.latent_prior == 'mixture':
      self.prior = latent_priors.MixturePrior(d, config.prior_components, seed=seed)
    elif config.latent_prior == 'vamp':
      if pseudo_inputs is None:
        pseudo_inputs = _default_pseudo_inputs(config.prior_components, self.image_shape,
                                               pixel_mean, seed)
      self.prior = latent_priors.VampPrior(pseudo_inputs, diagonal=config.posterior == 'diag')
    elif config.latent_prior == 'hierarchical':
      self.prior = latent_priors.HierarchicalPrior(
          d, config.top_latent_dim, config.top_units, activation=config.activation,
          seed=seed * 1000 + 600,
          top_components=config.prior_components if config.top_prior == 'mixture' else 0)
    else:
      self.prior = latent_priors.StandardNormalPrior(d)

    # The layer's tensor value is the posterior mean; the reparameterized samples are
    # drawn by `posterior_sample` from step-indexed noise (engine.sampling), so a
    # global example's sample does not depend on the replica split.
    def draw(q):
      return q.mean()

    regularizer = None
    if config.kl == 'regularizer':
      regularizer = tfpl.KLDivergenceRegularizer(self.latent_prior, use_exact_kl=True)
    if config.posterior == 'full_cov':
      params = tfpl.MultivariateNormalTriL.params_size(d)
      posterior_layer = _MultivariateNormalTriL(
          d, convert_to_tensor_fn=draw, activity_regularizer=regularizer,
          name='approx_posterior', dtype='float32')
    else:
      params = 2 * d
      posterior_layer = _DistributionLambda(
          lambda t: tfd.MultivariateNormalDiag(
              loc=t[..., :d], scale_diag=tf.math.softplus(t[..., d:]) + 1e-5),
          convert_to_tensor_fn=draw, activity_regularizer=regularizer,
          name='approx_posterior', dtype='float32')

    init = lambda i: tf_keras.initializers.GlorotUniform(seed=seed * 1000 + i)
    act = config.activation
    # The factorized decoder's output per pixel: the image's channels (logits or
    # means), then the pixelcnn head's latent maps.
    out_channels = c + config.pixelcnn_latent_maps
    if config.architecture == 'mlp':
      enc = ([tf_keras.layers.Flatten(name='flatten')]
             + _mlp(config.encoder_sizes, 'encoder', seed * 1000, act,
                    config.gated_units))
      dec = _mlp(config.decoder_sizes, 'decoder', seed * 1000 + 100, act,
                 config.gated_units)
      out_init = init(200)
      if config.pixelcnn_maps_rank:
        out = _LowRankMapsOutput(h * w, c, config.pixelcnn_latent_maps,
                                 config.pixelcnn_maps_rank, seed=seed * 1000 + 200,
                                 name='decoder_out', dtype='float32')
      else:
        out = tf_keras.layers.Dense(h * w * out_channels, kernel_initializer=out_init,
                                    name='decoder_out', dtype='float32')
      dec_out = [out, tf_keras.layers.Reshape((h, w, out_channels), dtype='float32')]
    else:
      f1, f2 = config.conv_filters
      if h % 4 or w % 4:
        raise errors.ConfigError(
            f'--architecture=conv needs image height and width divisible by 4; the data '
            f'has {h}x{w}. Use --architecture=mlp.')
      enc = [bias.Conv2D(f1, 5, 2, 'same', activation=act,
                         kernel_initializer=init(0), name='encoder_conv0'),
             bias.Conv2D(f2, 5, 2, 'same', activation=act,
                         kernel_initializer=init(1), name='encoder_conv1'),
             tf_keras.layers.Flatten(name='flatten')]
      enc += _mlp(config.encoder_sizes[:1], 'encoder', seed * 1000 + 10, act)
      dec = _mlp(config.decoder_sizes[:1], 'decoder', seed * 1000 + 100, act)
      dec += [tf_keras.layers.Dense(h // 4 * w // 4 * f2, activation=act,
                                    kernel_initializer=init(110), name='decoder_dense_up'),
              tf_keras.layers.Reshape((h // 4, w // 4, f2)),
              bias.Conv2DTranspose(f1, 5, 2, 'same', activation=act,
                                   kernel_initializer=init(111), name='decoder_deconv0')]
      out_init = init(200)
      dec_out = [bias.Conv2DTranspose(out_channels, 5, 2, 'same', kernel_initializer=out_init,
                                      name='decoder_out', dtype='float32')]

    self.encoder = tf_keras.Sequential(
        [tf_keras.Input(self.image_shape)] + enc
        + [tf_keras.layers.Dense(params, kernel_initializer=init(300),
                                 name='encoder_params', dtype='float32'),
           posterior_layer],
        name='encoder')
    if config.decoder == 'autoregressive':
      self.decoder = made.AutoregressiveDecoder(num_pixels, config.decoder_sizes,
                                                seed=seed * 1000 + 400, activation=act,
                                                name='decoder')
      self.decoder(tf.zeros([1, num_pixels]), tf.zeros([1, d]))  # builds the weights
    else:
      self.decoder = tf_keras.Sequential([tf_keras.Input((d,))] + dec + dec_out,
                                         name='decoder')
    self.pixelcnn = None
    if config.decoder == 'pixelcnn':
      if c != 1:
        raise errors.ConfigError(
            f'--decoder=pixelcnn orders the pixels of single-channel images; the data '
            f'has {c} channels. Use --decoder=factorized or --decoder=autoregressive.')
      self.pixelcnn = pixelcnn.PixelCNNHead(
          filters=config.pixelcnn_filters, kernel_size=config.pixelcnn_kernel,
          hidden_layers=config.pixelcnn_layers,
          logit_window=config.pixelcnn_logit_window,
          latent_maps=config.pixelcnn_latent_maps, seed=seed * 1000 + 500, activation=act,
          name='pixelcnn')
      self.pixelcnn.build_for(self.image_shape, d)
    if pixel_mean is not None:
      self._init_output_bias(np.asarray(pixel_mean, np.float32))
    self.log_scale = None
    if config.likelihood == 'gaussian' and config.likelihood_scale == 0.0:
      self.log_scale = tf.Variable(math.log(0.1), name='likelihood_log_scale')

  def _init_output_bias(self, pixel_mean):
    if self.config.decoder == 'autoregressive':
      out_bias = self.decoder.out.bias
    else:
      out_bias = self.decoder.get_layer('decoder_out').bias
    c = self.image_shape[-1]
    if self.config.architecture == 'conv' and self.config.decoder != 'autoregressive':
      pixel_mean = pixel_mean.reshape(-1, c).mean(axis=0)
    else:
      pixel_mean = pixel_mean.reshape(-1, c)
    if self.config.likelihood == 'bernoulli':
      p = np.clip(pixel_mean, 1e-3, 1 - 1e-3)
      pixel_mean = np.log(p) - np.log1p(-p)
    # The pixelcnn head's latent maps, the last channels of the output, start at 0.
    maps = np.zeros(pixel_mean.shape[:-1] + (self.config.pixelcnn_latent_maps,))
    out_bias.assign(np.concatenate([pixel_mean, maps], axis=-1).reshape(-1).astype(np.float32))

  def approx_posterior(self, x):
    """q(z | x) for a batch x [B, H, W, C] (a MultivariateNormalLinearOperator)."""
    return self.encoder(x)

  def prior_distribution(self):
    """p(z) as a distribution, built from the prior's current variables."""
    return self.prior(self.encoder)

  def rate(self, q, prior, z, eps, prior_noise=None):
    """KL(q || p) per example: analytic, or a Monte-Carlo estimate from
    z = loc + scale @ eps ~ q (log q(z) from eps: `objectives.reparameterized_log_prob`;
    `prior_noise`: the hierarchical prior's draw of its top latent)."""
    if self.config.kl == 'monte_carlo':
      return objectives.monte_carlo_rate(
          q, prior, z, log_q=objectives.reparameterized_log_prob(q, eps),
          prior_noise=prior_noise)
    return objectives.analytic_rate(q, prior)

  @staticmethod
  def posterior_sample(q, eps):
    """Reparameterized z = loc + scale @ eps for standard-normal eps [..., B, d]."""
    return objectives.reparameterized_sample(q, eps)

  def likelihood(self, z, dropout_noise=None):
    """p(x | z) for z [..., d]; batch shape = z's leading dims, event = one image.

    With `dropout_noise` (an `engine.sampling.Noise`; training only) and
    --decoder_dropout, the factorized decoder's hidden layers are dropped out.
    """
    if self.config.decoder == 'autoregressive':
      return _AutoregressiveLikelihood(self.decoder, z, self.image_shape)
    out = self._factorized_logits(z, dropout_noise)
    if self.pixelcnn is not None:
      return _PixelCNNLikelihood(self.pixelcnn, out, z)
    if self.config.likelihood == 'bernoulli':
      base = LogitBernoulli(logits=out, dtype=tf.float32)
    else:
      scale = (tf.exp(self.log_scale) if self.log_scale is not None
               else tf.constant(self.config.likelihood_scale))
      base = tfd.Normal(loc=out, scale=scale)
    return tfd.Independent(base, reinterpreted_batch_ndims=3)

  def _factorized_logits(self, z, dropout_noise=None):
    """The factorized decoder's output [..., H, W, C] for z [..., d] (with
    --pixelcnn_latent_maps, C + the maps' channels, which only the head reads)."""
    flat = tf.reshape(z, [-1, self.config.latent_dim])
    if dropout_noise is None or not self.config.decoder_dropout:
      out = self.decoder(flat)
    else:
      out = _with_hidden_dropout(self.decoder, flat, z, self.config.decoder_dropout,
                                 dropout_noise)
    return tf.reshape(out, tf.concat([tf.shape(z)[:-1], tf.shape(out)[1:]], axis=0))

  @property
  def trains_faster_without_xla_on_cpu(self):
    """The pixelcnn head's step is many small matmuls over every pixel; TF's own
    kernels ran it 1.25-1.5x faster than XLA:CPU (benchmarks/RESULTS.md, session 16), so
    by default the engine trains it without XLA on a CPU (engine.controller.jit_compile)."""
    return self.pixelcnn is not None

  @property
  def per_example_keys(self):
    """Names of the per-example [B] measurements `loss_terms` returns."""
    base = ('distortion', 'rate', 'elbo')
    return base + (('iwae',) if self.config.objective == 'iwae' else ())

  @property
  def measurement_keys(self):
    """Names of the training measurements `train_terms` returns."""
    return self.per_example_keys + ('kl_weight',)

  def eval_keys(self, iw_samples):
    """Names of the per-example test figures `eval_terms` returns."""
    return ('distortion', 'rate', 'elbo') + (('log_likelihood',) if iw_samples else ())

  def regularization_losses(self):
    """Layer losses (the KLDivergenceRegularizer's batch-mean rate when enabled)."""
    return tf.add_n(self.encoder.losses) if self.encoder.losses else tf.constant(0.0)

  def train_terms(self, batch, *, noise, step, shared_noise=None):
    """The engine's entry point: `loss_terms` with the KL warm-up weight of `step`.
    `shared_noise` is always None: the VAE draws no noise shared by its batch."""
    del shared_noise
    kl_weight = objectives.kl_warmup_weight(step, self.config.kl_warmup_steps)
    loss, regularization, measurements = self.loss_terms(batch['image'], noise=noise,
                                                         kl_weight=kl_weight)
    measurements['kl_weight'] = kl_weight
    return loss, regularization, measurements

  def loss_terms(self, x, *, kl_weight, noise=None, seed=None):
    """Per-example loss and measurements for one replica's batch.

    Args:
      x: this replica's images [B, H, W, C].
      kl_weight: the rate's weight (KL warm-up).
      noise: an `engine.sampling.Noise`; `seed` is shorthand for Noise(seed)
        (one replica).

    Returns:
      (per_example_loss [B], regularization scalar, measurements) where
      measurements maps names to per-example [B] tensors ('elbo', 'rate',
      'distortion'; for IWAE also 'iwae') and `regularization` is a scalar counted
      once globally (see `objectives.replica_loss`). For IWAE the ELBO's distortion
      (and its Monte-Carlo rate) are those of the first importance sample, itself a
      draw from q(z | x): no decoder pass beyond the K samples.
    """
    cfg = self.config
    noise = noise if noise is not None else sampling.Noise(seed)
    post_noise, iw_noise = noise.split(2)
    # Its own stream, drawn only with dropout: runs without it keep their noise.
    likelihood = functools.partial(
        self.likelihood, dropout_noise=noise.fold(0xD0) if cfg.decoder_dropout else None)
    q = self.approx_posterior(x)
    batch = tf.shape(x)[0]
    d = cfg.latent_dim
    prior = self.prior_distribution()
    # Its own stream, drawn only by the hierarchical prior: other runs keep their noise.
    prior_noise = noise.fold(objectives.PRIOR_NOISE_SALT)
    iwae = None
    if cfg.objective == 'iwae':
      eps_k = iw_noise.normal([cfg.num_iw_samples, batch, d], batch_axis=1)
      z_k = self.posterior_sample(q, eps_k)
      log_px, log_pz, log_q = objectives.importance_weight_terms(
          q, prior, likelihood, x, z_k, log_q=objectives.reparameterized_log_prob(q, eps_k),
          prior_noise=prior_noise.fold(1))
      iwae = objectives.iwae_bound(log_px + log_pz - log_q)
      eps, z, distortion = eps_k[0], z_k[0], -log_px[0]
    else:
      eps = post_noise.normal([batch, d])
      z = self.posterior_sample(q, eps)
      distortion = objectives.distortion(likelihood(z), x)
    regularization = tf.constant(0.0)
    if cfg.kl == 'regularizer':
      # The regularizer already averaged the KL over this replica's batch; the rate
      # per example is only for measurement.
      regularization = self.regularization_losses()
      rate = tf.fill(tf.shape(distortion), regularization)
    elif iwae is not None and cfg.kl == 'monte_carlo':
      rate = log_q[0] - log_pz[0]  # the first sample's, from the weights' own terms
    else:
      rate = self.rate(q, prior, z, eps, prior_noise)
    measurements = {'distortion': distortion, 'rate': rate,
                    'elbo': -(distortion + rate)}
    if iwae is not None:
      measurements['iwae'] = iwae
      return -iwae, tf.constant(0.0), measurements
    if cfg.kl == 'regularizer':
      return distortion, kl_weight * regularization, measurements
    return objectives.negative_elbo(distortion, rate, kl_weight), regularization, measurements

  def eval_terms(self, x, *, iw_samples, iw_chunk_size, noise=None, seed=None):
    """Per-example test figures: elbo, rate, distortion and (if iw_samples) log p(x).

    noise: an `engine.sampling.Noise` (rows: x's examples); `seed` is shorthand for
    Noise(seed) (one replica).
    """
    noise = noise if noise is not None else sampling.Noise(seed)
    post_noise, iw_noise = noise.split(2)
    q = self.approx_posterior(x)
    eps = post_noise.normal([tf.shape(x)[0], self.config.latent_dim])
    z = self.posterior_sample(q, eps)
    distortion = objectives.distortion(self.likelihood(z), x)
    prior = self.prior_distribution()
    # Exact where it exists (the standard normal, whatever the training estimator);
    # a learned prior's rate is estimated from the same z.
    rate = (objectives.analytic_rate(q, prior) if self.config.latent_prior == 'normal'
            else objectives.monte_carlo_rate(
                q, prior, z, log_q=objectives.reparameterized_log_prob(q, eps),
                prior_noise=post_noise.fold(objectives.PRIOR_NOISE_SALT)))
    out = {'distortion': distortion, 'rate': rate, 'elbo': -(distortion + rate)}
    if iw_samples:
      chunk = min(iw_chunk_size, iw_samples)
      if self.pixelcnn is not None:
        chunk = bounded_chunk(iw_samples, chunk, int(np.prod(self.image_shape))
                              * self.pixelcnn.floats_per_pixel())
      out['log_likelihood'] = objectives.iw_log_likelihood(
          q, prior, self.likelihood, x, num_samples=iw_samples, chunk_size=chunk,
          noise=iw_noise)
    return out

  def reconstruct(self, x, seed):
    """Images of p(x | z) for z ~ q(z | x), in [0, 1] (see `decode`)."""
    q = self.approx_posterior(x)
    z = self.posterior_sample(q, tf.random.stateless_normal(tf.shape(q.loc), seed=seed))
    return self.decode(z, seed)

  def sample(self, num, seed):
    """Images of p(x | z) for z drawn from the latent prior (see `decode`)."""
    z = self.prior_distribution().sample(num, seed=seed)
    return self.decode(z, seed)

  def decode(self, z, seed):
    """Images in [0, 1] for latents z [N, d].

    Factorized decoder: the mean of p(x | z). Autoregressive and pixelcnn decoders:
    pixels are drawn one at a time, and the image shows each pixel's probability
    given the pixels drawn before it (eager only: one network pass per pixel).
    """
    if self.pixelcnn is not None:
      _, probs = self.pixelcnn.generate(
          self._factorized_logits(z), z, tf.random.experimental.stateless_fold_in(seed, 11))
      return probs
    if self.config.decoder == 'autoregressive':
      _, probs = self.decoder.generate(
          z, tf.random.experimental.stateless_fold_in(seed, 11))
      return tf.reshape(probs, tf.concat([tf.shape(z)[:1], self.image_shape], axis=0))
    return self.likelihood(z).mean()


# The pixelcnn decoder holds [chunk, batch, H, W, filters] activations while it
# scores importance samples: at most this many floats per test image at a time.
PIXELCNN_EVAL_FLOATS_PER_EXAMPLE = 2 ** 18


def bounded_chunk(num_samples, chunk_size, floats_per_sample, budget=None):
  """The largest divisor of num_samples that is <= chunk_size and keeps
  chunk * floats_per_sample within budget (default PIXELCNN_EVAL_FLOATS_PER_EXAMPLE;
  at least 1)."""
  budget = PIXELCNN_EVAL_FLOATS_PER_EXAMPLE if budget is None else budget
  chunk = max(1, min(chunk_size, budget // floats_per_sample))
  while num_samples % chunk:
    chunk -= 1
  return chunk


class _LowRankMapsOutput(tf_keras.layers.Layer):
  """The MLP decoder's output layer when the latent maps have rank r: per pixel,
  its `channels` logits as a dense layer computes them, then its `maps` latent maps
  from r numbers per image, (h D) U with D [hidden, r] and U [r, pixels * maps].
  The output [N, pixels * (channels + maps)] is laid out as the plain dense output
  layer's (pixel-major), with one bias over all of it."""

  def __init__(self, pixels, channels, maps, rank, *, seed, **kwargs):
    super().__init__(**kwargs)
    self.pixels, self.channels, self.maps = int(pixels), int(channels), int(maps)
    init = lambda i: tf_keras.initializers.GlorotUniform(seed=seed + i)
    self.logits = tf_keras.layers.Dense(self.pixels * self.channels, use_bias=False,
                                        kernel_initializer=init(0), name='logits',
                                        dtype=self.dtype)
    self.maps_down = tf_keras.layers.Dense(int(rank), use_bias=False,
                                           kernel_initializer=init(1), name='maps_down',
                                           dtype=self.dtype)
    self.maps_up = tf_keras.layers.Dense(self.pixels * self.maps, use_bias=False,
                                         kernel_initializer=init(2), name='maps_up',
                                         dtype=self.dtype)

  def build(self, input_shape):
    self.bias = self.add_weight(
        'bias', shape=[self.pixels * (self.channels + self.maps)], initializer='zeros')
    super().build(input_shape)

  def call(self, hidden):
    logits = tf.reshape(self.logits(hidden), [-1, self.pixels, self.channels])
    maps = tf.reshape(self.maps_up(self.maps_down(hidden)), [-1, self.pixels, self.maps])
    out = tf.concat([logits, maps], axis=-1)
    return tf.reshape(out, [-1, self.pixels * (self.channels + self.maps)]) + self.bias


def _with_hidden_dropout(decoder, flat_z, z, rate, noise):
  """Runs the factorized decoder on flat_z [N, d], z [..., B, d] flattened, with
  inverted dropout after every hidden layer, and none after the output layer. Masks
  are per example and drawn for the global batch, so they do not depend on how it is
  split over replicas."""
  lead_rank = z.shape.rank - 1
  lead = [tf.shape(z)[i] for i in range(lead_rank)]
  h = flat_z
  for layer in decoder.layers:
    h = layer(h)
    if layer.name == 'decoder_out' or not isinstance(
        layer, (tf_keras.layers.Dense, tf_keras.layers.Conv2DTranspose,
                gated_lib.GatedDense)):
      continue
    u = noise.uniform(lead + h.shape.as_list()[1:], batch_axis=lead_rank - 1)
    h = sampling.inverted_dropout(h, rate, tf.reshape(u, tf.shape(h)))
  return h


def _default_pseudo_inputs(num, image_shape, pixel_mean, seed):
  base = np.full(image_shape, 0.5, np.float32) if pixel_mean is None else np.asarray(
      pixel_mean, np.float32).reshape(image_shape)
  jitter = np.random.default_rng(seed).uniform(-0.05, 0.05, (num,) + tuple(image_shape))
  return np.clip(base + jitter, 0.0, 1.0).astype(np.float32)


class LogitBernoulli(tfd.Bernoulli):
  """tfd.Bernoulli(logits=...) whose log_prob is one fused cross-entropy.

  The same function as tfd.Bernoulli's `log_prob` for finite logits (and events in
  [0, 1]): -(max(l, 0) - l x + log1p(exp(-|l|))), one exp and one log1p per pixel.
  tfd.Bernoulli computes -softplus(l) and -softplus(-l) and weights them with
  `multiply_no_nan`. With the gradient, on the 2-core CPU of benchmarks/RESULTS.md
  ("Session 28", benchmarks/bernoulli_log_prob.py), under XLA: 1.19 -> 0.79 ms at
  batch 128, 16.2 -> 10.3 ms at batch 2048.
  An infinite logit (TFP maps it to log-probabilities 0 and -inf) gives NaN here,
  which the training loop's non-finite-loss check then reports.
  """

  def _log_prob(self, event):
    logits = tf.convert_to_tensor(self._logits)
    event = tf.cast(event, logits.dtype)
    shape = tf.broadcast_dynamic_shape(tf.shape(event), tf.shape(logits))
    # broadcast_to returns a tensor of the target shape as it is.
    return -tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.broadcast_to(event, shape), logits=tf.broadcast_to(logits, shape))


class _AutoregressiveLikelihood:
  """p(x | z) of the autoregressive decoder, for z [..., d].

  Batch shape = z's leading dims, event = one image, like the factorized
  likelihood; `log_prob(x)` broadcasts x [..., H, W, C] and z against each other
  and evaluates every pixel's conditional in one pass of the decoder.
  """

  def __init__(self, decoder, z, image_shape):
    self._decoder = decoder
    self._z = z
    self._image_shape = tuple(image_shape)

  def log_prob(self, x):
    x = tf.cast(x, tf.float32)
    rank = len(self._image_shape)
    d = tf.shape(self._z)[-1]
    batch = tf.broadcast_dynamic_shape(tf.shape(x)[:-rank], tf.shape(self._z)[:-1])
    num_pixels = int(np.prod(self._image_shape))
    flat_x = tf.reshape(tf.broadcast_to(x, tf.concat([batch, self._image_shape], 0)),
                        [-1, num_pixels])
    flat_z = tf.reshape(tf.broadcast_to(self._z, tf.concat([batch, [d]], 0)), [-1, d])
    logits = tf.cast(self._decoder(flat_x, flat_z), tf.float32)
    log_p = -tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(
        labels=flat_x, logits=logits), axis=-1)
    return tf.reshape(log_p, batch)


class _PixelCNNLikelihood:
  """p(x | z) of the pixelcnn decoder, for z [..., d] with factorized logits a.

  Batch shape = z's leading dims, event = one image; `log_prob(x)` broadcasts x
  [..., H, W, 1] against them. The causal convolution runs once per image of x,
  whatever the number of latent samples.
  """

  def __init__(self, head, factorized_logits, z):
    self._head = head
    self._a = factorized_logits
    self._z = z

  def log_prob(self, x):
    x = tf.cast(x, tf.float32)
    logits = self._head.logits(self._head.context(x), self._a, self._z)
    labels = tf.broadcast_to(x, tf.shape(logits))
    return -tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(
        labels=labels, logits=logits), axis=[-3, -2, -1])


Config = VAEConfig


def _check_window(name, size, example, zero_is_off=False):
  if not isinstance(size, int) or isinstance(size, bool) or size < 3 or size % 2 == 0:
    allowed = '0 (off) or an odd integer >= 3' if zero_is_off else 'an odd integer >= 3'
    raise errors.ConfigError(f'--{name}={size!r}: must be {allowed} (the window is '
                             f'centred on the pixel), e.g. {example}.')


def prepare_data(config: VAEConfig, dataset, *, data_config, seed):
  """ImageDataset -> TaskData: unsupervised; Bernoulli likelihoods get binarized data.

  Training images are binarized dynamically (every step, seeded); the test set once,
  with a fixed seed, so test figures are comparable across runs.
  """
  del seed
  binarize = config.likelihood == 'bernoulli' and data_config.binarize
  test = (inputs.binarize_test_set(dataset.test_images) if binarize
          else dataset.test_images.astype(np.float32) / 255.0)
  return inputs.TaskData(name=dataset.name, source=dataset.source,
                         train_images=dataset.train_images, test_images=test,
                         binarize=binarize)


def build(config: VAEConfig, *, task_data=None, image_shape=None, pixel_mean=None,
          seed=0, global_batch_size=None):
  """Factory used by the model registry (from TaskData, or explicit shape/mean)."""
  del global_batch_size  # the VAE's loss does not depend on it
  pseudo_inputs = None
  if task_data is not None:
    image_shape = task_data.image_shape
    pixel_mean = task_data.train_images.astype(np.float32).mean(axis=0) / 255.0
    if config.latent_prior == 'vamp':
      if config.prior_components > task_data.train_images.shape[0]:
        raise errors.ConfigError(
            f'--prior_components={config.prior_components}: the VampPrior starts its '
            f'pseudo-inputs from as many distinct training images, and the data has '
            f'{task_data.train_images.shape[0]}. Lower --prior_components.')
      pseudo_inputs = latent_priors.pseudo_input_images(
          task_data.train_images, config.prior_components, seed)
  return VAE(config, image_shape=image_shape, pixel_mean=pixel_mean, seed=seed,
             pseudo_inputs=pseudo_inputs)


def evaluate(exp, *, final=True, iw_samples=None, images=None):
  """Test figures in nats per example (means and standard errors).

  Args:
    exp: the controller's Experiment.
    final: the end-of-run evaluation (`--eval_iw_samples` importance samples) or a
      periodic one (`--periodic_eval_iw_samples`).
    iw_samples: overrides the number of importance samples (0: ELBO only).
    images: overrides the test images.

  The final evaluation also returns every test example's figures under
  'per_example' (see `controller.pop_per_example`).
  """
  t = exp.config.train
  if iw_samples is None:
    iw_samples = t.eval_iw_samples if final else t.periodic_eval_iw_samples
  model = exp.model

  def term_fn(batch, noise):
    return model.eval_terms(batch['image'], noise=noise, iw_samples=iw_samples,
                            iw_chunk_size=t.iw_chunk_size)

  out = evaluation.mean_figures(
      exp, term_fn, model.eval_keys(iw_samples),
      images=exp.task.test_images if images is None else images, per_example=final)
  if 'log_likelihood' in out:
    out['nll'] = -out['log_likelihood']
    out['iw_samples'] = iw_samples
  return out


def summary_line(metrics):
  """The final figures in one line for the log."""
  line = f'test elbo {metrics["elbo"]:.2f} +- {metrics["elbo_stderr"]:.2f} nats'
  if 'nll' in metrics:
    line += (f'; test NLL (-log p(x), k={metrics["iw_samples"]}) {metrics["nll"]:.2f} '
             f'+- {metrics["log_likelihood_stderr"]:.2f} nats')
  return line


def write_summaries(exp, writers, step):
  """Reconstructions of test images and samples from the prior, as TensorBoard images."""
  n = exp.config.train.num_summary_images
  seed = tf.constant([exp.config.train.seed, 77], tf.int32)
  x = exp.task.test_images[:n]
  recon = exp.model.reconstruct(tf.constant(x), seed).numpy()
  pairs = np.concatenate([x, recon], axis=2)  # original | reconstruction
  writers.image('eval', 'reconstructions', summaries.image_grid(pairs), step)
  samples = exp.model.sample(n, seed).numpy()
  writers.image('eval', 'prior_samples', summaries.image_grid(samples), step)
