"""Mean-field Gaussian variational layers (Bayes by Backprop) with explicit noise.

Every weight of a kernel has the posterior q(w) = N(loc, scale^2), and a prior p(w)
that is either a zero-mean normal or Blundell et al.'s (2015) scale mixture of two.
The scale is a function of an unconstrained variable rho, chosen by
`posterior_scale` (see `posterior_scale()`):

  'softplus' (default)  scale = softplus(rho) + SCALE_FLOOR (Blundell et al. 2015);
  'exp'                 scale = exp(max(rho, log(SCALE_FLOOR))), i.e. rho is
                        log(sigma) (Graves 2011; Kingma et al. 2015). Cheaper per
                        weight: log(scale) = rho for free in the KL and
                        d scale / d rho = scale (no log1p, no division); for the
                        small scales BNNs use (rho near -5) the two agree to 0.3%.

The two kinds give rho different meanings, so a checkpoint of one cannot be
continued with the other. Three estimators of the layer's output under q are
provided:

  reparameterization        one weight sample w = loc + scale * eps per step, shared
                            by the whole global batch (Blundell et al. 2015);
  flipout                   that shared perturbation, decorrelated across examples
                            by per-example random signs (Wen et al. 2018);
  local_reparameterization  no weight sample: the pre-activations are sampled from
                            their Gaussian marginal per example (Kingma et al. 2015).

Why not `tfp.layers.Dense{Reparameterization,Flipout,LocalReparameterization}`:
they fail under mixed precision (tensorflow/probability#1315), were 3.4x / 4.4x
slower than a deterministic MLP on our CPU, and sample statefully per replica. Here
all randomness comes from an `engine.sampling.Noise` passed to each call, so a
step's noise is a function of (run seed, step) and is the same whatever the
replica split: shared draws (the weight perturbation) are identical on every
replica, per-example draws (signs, pre-activation noise) are those of the replica's
rows of the global batch.

Calling conventions (both go through `tf_keras.layers.Layer.__call__`):

  outputs = layer(x, noise=noise)                 # outputs only
  outputs, kl = layer.apply_with_kl(x, noise)     # outputs and this call's KL
  outputs, kl = layer.apply_with_kl(x, noise, weight_noise=layer.weight_noise(noise))

The third form passes the kernel noise drawn beforehand (the engine draws it one
step ahead, beside the running step; see `weight_noise`); it is the same noise.

`kl` is a float32 scalar: KL(q || p) summed over the layer's kernel, computed for
the weights this call used (the Monte Carlo estimate uses this call's own weight
sample). Nothing is stored on the layer and nothing goes through `add_loss`: the
model sums the `kl` of every layer called in one forward pass (`tf.add_n`), which
XLA compiles like any other op. Call each layer once per forward pass, or the sum
counts its KL once per call. The KL is for the whole network and the whole data
set; scaling it per example (dividing by the training-set size) is the model's job.
Every replica computes the same, whole KL (it depends on the shared weight sample
only), so it is a "counted once globally" term for `objectives.replica_loss`.

Biases are point estimates (plain float32 variables, no posterior, no KL). A
learnable prior's log-scales belong to the prior module (see `NormalPrior`).

Posterior-mean mode: `noise=None` uses the posterior means (loc) as the weights,
with no randomness, e.g. for prediction. `apply_with_kl(x, None)` then returns the
exact (analytic) KL for a normal prior and raises for the scale mixture, whose KL
needs a weight sample.

Mixed precision: the variables (loc, rho, bias, prior log-scales) are float32 and
never auto-cast; weights are sampled and the KL computed in float32, and only the
sampled weights (local reparameterization: loc and scale^2) are cast to the layer's
`compute_dtype` for the matmul or convolution. The bias is added by
`models.bias.add_bias`, whose gradient (a sum over the batch and positions) is summed
in float32. Outputs are in the compute dtype; the KL is float32.
"""
import math

import tensorflow as tf
import tf_keras

from engine import errors
from models import bias

ESTIMATORS = ('reparameterization', 'flipout', 'local_reparameterization')
KL_METHODS = ('analytic', 'monte_carlo')
POSTERIOR_SCALES = ('softplus', 'exp')

# scale = softplus(rho) + SCALE_FLOOR, or exp(rho) clipped at SCALE_FLOOR: keeps
# log(scale) and 1 / scale finite in the KL when rho drifts very negative; far
# below any scale that matters in training.
SCALE_FLOOR = 1e-6
_LOG_SCALE_FLOOR = math.log(SCALE_FLOOR)
# Added to the local-reparameterization variance before the square root, so the
# gradient stays finite for an all-zero input row (e.g. a dead ReLU layer).
_VARIANCE_FLOOR = 1e-12
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _log1p_from(x, u):
  """log1p(x) for x >= 0, given u = 1 + x as rounded: log(u) * x / (u - 1), or x
  where u rounds to 1 (Goldberg 1991: the rounding error of u cancels between
  log(u) and u - 1; a few ulps). XLA:CPU runs tf.math.log1p as a kernel of its own,
  one more pass over a weight-sized array per step; these ops fuse with their
  neighbours."""
  return tf.where(u == 1.0, x, tf.math.log(u) * (x / (u - 1.0)))


@tf.custom_gradient
def softplus_scale(rho):
  """The posterior scale softplus(rho) + SCALE_FLOOR, float32, elementwise.

  Its gradient sigmoid(rho) = e / (1 + e) reuses the forward pass's e = exp(rho)
  instead of evaluating another exponential (the kernel-sized elementwise work
  is a large share of a variational step on CPU). Above rho = 30, softplus(rho)
  is rho to float32 precision.
  """
  e = tf.exp(tf.minimum(rho, 30.0))
  u = 1.0 + e
  scale = tf.where(rho > 30.0, rho, _log1p_from(e, u)) + SCALE_FLOOR

  def grad(upstream):
    return upstream * (e / u)

  return scale, grad


def _check_posterior_scale(kind):
  if kind not in POSTERIOR_SCALES:
    raise errors.ConfigError(
        f'--posterior_scale={kind!r} is not known; choose one of: '
        f'{", ".join(POSTERIOR_SCALES)}.')


def posterior_scale(rho, kind='softplus'):
  """The posterior standard deviations and their logs from rho, float32, elementwise.

  'softplus': scale = softplus(rho) + SCALE_FLOOR (`softplus_scale`) and
    log_scale = log(scale).
  'exp': rho is log(sigma), clipped from below at log(SCALE_FLOOR) (so that, as with
    the softplus floor, scale >= SCALE_FLOOR and 1 / scale stays finite; the clip
    has zero gradient below the floor): log_scale = max(rho, log(SCALE_FLOOR)) and
    scale = exp(log_scale). One exponential per weight, log(scale) for free, and
    d scale / d rho = scale.

  Args:
    rho: the unconstrained posterior variable (a float32 tensor or variable).
    kind: one of POSTERIOR_SCALES.

  Returns:
    (scale, log_scale), float32 tensors of rho's shape. Pass log_scale to the KL
    functions so that they need not take a log of their own.

  Raises:
    ConfigError: for an unknown kind.
  """
  _check_posterior_scale(kind)
  rho = tf.convert_to_tensor(rho, tf.float32)
  if kind == 'softplus':
    scale = softplus_scale(rho)
    return scale, tf.math.log(scale)
  log_scale = tf.maximum(rho, _LOG_SCALE_FLOOR)
  return tf.exp(log_scale), log_scale


# ---------------------------------------------------------------------------------
# Densities, priors and KL divergences (float32, elementwise unless summed).


def normal_log_prob(x, loc, scale, log_scale=None):
  """log N(x; loc, scale^2), elementwise.

  log_scale: log(scale) if already known (e.g. from `posterior_scale`); by default
    it is computed.
  """
  z = (x - loc) / scale
  log_scale = tf.math.log(scale) if log_scale is None else log_scale
  return -0.5 * tf.square(z) - log_scale - _HALF_LOG_2PI


def _check_scale(name, value):
  if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
    raise errors.ConfigError(f'{name}={value!r}: must be a positive number.')


class NormalPrior(tf.Module):
  """p(w) = N(0, sigma^2) for every weight.

  With `learnable=True` the prior owns a float32 `tf.Variable` log_sigma (trained
  with the posterior: empirical Bayes). The variable belongs to this module: pass
  one prior to several layers to learn one shared scale (collect variables through
  a `tf.Module` or tf_keras model, which list a shared variable once), or give each
  layer its own prior. Create a learnable prior under the distribution strategy's
  scope, like the layers.

  Args:
    sigma: the prior's standard deviation (initial value when learnable).
    learnable: whether log(sigma) is a trainable variable.
    name: module name.
  """

  has_analytic_kl = True

  def __init__(self, sigma=1.0, *, learnable=False, name='normal_prior'):
    super().__init__(name=name)
    _check_scale('prior sigma', sigma)
    self.learnable = bool(learnable)
    self._init_log_sigma = math.log(sigma)
    if self.learnable:
      with self.name_scope:
        self._log_sigma = tf.Variable(self._init_log_sigma, dtype=tf.float32,
                                      name='log_sigma')

  @property
  def log_sigma(self):
    """log(sigma), a float32 scalar (the variable when learnable)."""
    if self.learnable:
      return self._log_sigma
    return tf.constant(self._init_log_sigma, tf.float32)

  @property
  def sigma(self):
    return tf.exp(self.log_sigma)

  def log_prob(self, w):
    """log p(w), elementwise, float32."""
    log_sigma = tf.convert_to_tensor(self.log_sigma)
    return -0.5 * tf.square(w * tf.exp(-log_sigma)) - log_sigma - _HALF_LOG_2PI


class ScaleMixturePrior(tf.Module):
  """p(w) = pi N(0, sigma1^2) + (1 - pi) N(0, sigma2^2) (Blundell et al. 2015).

  Typically sigma1 is large and sigma2 small, e.g. the defaults sigma1 = 1 and
  sigma2 = e^-6 (Blundell et al.'s -log sigma1 = 0, -log sigma2 = 6). The KL to a
  normal posterior has no closed form, so layers use the Monte Carlo estimate.

  With `learnable=True` the module owns two float32 variables, log_sigma1 and
  log_sigma2 (pi stays fixed); ownership and sharing as for `NormalPrior`.

  Args:
    sigma1: standard deviation of the first component.
    sigma2: standard deviation of the second component.
    pi: weight of the first component, in (0, 1).
    learnable: whether the two log-scales are trainable variables.
    name: module name.
  """

  has_analytic_kl = False

  def __init__(self, sigma1=1.0, sigma2=math.exp(-6.0), pi=0.5, *, learnable=False,
               name='scale_mixture_prior'):
    super().__init__(name=name)
    _check_scale('prior sigma1', sigma1)
    _check_scale('prior sigma2', sigma2)
    if not 0.0 < pi < 1.0:
      raise errors.ConfigError(f'prior pi={pi!r}: must be strictly between 0 and 1.')
    self.learnable = bool(learnable)
    self.pi = float(pi)
    self._init_log_sigmas = (math.log(sigma1), math.log(sigma2))
    if self.learnable:
      with self.name_scope:
        self._log_sigma1 = tf.Variable(self._init_log_sigmas[0], dtype=tf.float32,
                                       name='log_sigma1')
        self._log_sigma2 = tf.Variable(self._init_log_sigmas[1], dtype=tf.float32,
                                       name='log_sigma2')

  @property
  def log_sigmas(self):
    """(log sigma1, log sigma2), float32 scalars (the variables when learnable)."""
    if self.learnable:
      return self._log_sigma1, self._log_sigma2
    return tuple(tf.constant(v, tf.float32) for v in self._init_log_sigmas)

  def log_prob(self, w):
    """log p(w), elementwise, float32, by logsumexp over the two components."""
    log_sigma1, log_sigma2 = (tf.convert_to_tensor(v) for v in self.log_sigmas)
    half_w2 = 0.5 * tf.square(w)
    log_p1 = (math.log(self.pi) - half_w2 * tf.exp(-2.0 * log_sigma1) - log_sigma1)
    log_p2 = (math.log1p(-self.pi) - half_w2 * tf.exp(-2.0 * log_sigma2) - log_sigma2)
    return tf.reduce_logsumexp(tf.stack([log_p1, log_p2]), axis=0) - _HALF_LOG_2PI


def analytic_kl_normal(loc, scale, prior_sigma, log_scale=None):
  """KL(N(loc, scale^2) || N(0, prior_sigma^2)) summed over all weights.

  Args:
    loc: posterior means, float32, any shape.
    scale: posterior standard deviations, same shape.
    prior_sigma: the prior's standard deviation, a scalar.
    log_scale: log(scale) if already known (saves a log per weight); by default
      it is computed.

  Returns:
    A float32 scalar.
  """
  prior_sigma = tf.convert_to_tensor(prior_sigma, tf.float32)
  # Scalars hoisted out of the kernel-sized sum: one multiply, no divide, per weight.
  half_precision = 0.5 / tf.square(prior_sigma)
  size = tf.cast(tf.size(loc), tf.float32)
  log_scale = tf.math.log(scale) if log_scale is None else log_scale
  return (tf.reduce_sum(half_precision * (tf.square(scale) + tf.square(loc))
                        - log_scale)
          + size * (tf.math.log(prior_sigma) - 0.5))


def monte_carlo_kl(w, loc, scale, prior, log_scale=None):
  """Single-sample estimate sum(log q(w) - log p(w)) of KL(q || p).

  Unbiased when w ~ q. Pass the weight sample the forward pass used, so the
  estimate and the likelihood term see the same weights.

  Args:
    w: weight sample(s); any shape broadcastable with loc (a leading axis of S
      samples gives S times the mean estimate).
    loc: posterior means.
    scale: posterior standard deviations.
    prior: an object with an elementwise `log_prob(w)` (e.g. `ScaleMixturePrior`).
    log_scale: log(scale) if already known; by default it is computed.

  Returns:
    A float32 scalar.
  """
  return tf.reduce_sum(normal_log_prob(w, loc, scale, log_scale) - prior.log_prob(w))


# ---------------------------------------------------------------------------------
# Layers.


def _static_or_dynamic_shape(t):
  static = t.shape.as_list()
  if all(d is not None for d in static):
    return static
  dynamic = tf.shape(t)
  return [d if d is not None else dynamic[i] for i, d in enumerate(static)]


class _VariationalLayer(tf_keras.layers.Layer):
  """Shared machinery of `VariationalDense` and `VariationalConv2D`.

  Subclasses set `self._kernel_shape` in `build` and implement `_linear(x, kernel)`
  and `_sign_shapes(x)` (Flipout's per-example input and output sign shapes).
  """

  def __init__(self, *, estimator, prior, activation, seed, posterior_rho_init,
               posterior_scale, kl, use_bias, salt, kernel_loc_initializer, **kwargs):
    super().__init__(**kwargs)
    if estimator not in ESTIMATORS:
      raise errors.ConfigError(
          f'--bnn_layer={estimator!r} is not known; choose one of: '
          f'{", ".join(ESTIMATORS)}.')
    _check_posterior_scale(posterior_scale)
    prior = NormalPrior(1.0) if prior is None else prior
    if kl is None:
      kl = 'analytic' if prior.has_analytic_kl else 'monte_carlo'
    if kl not in KL_METHODS:
      raise errors.ConfigError(
          f'kl={kl!r} is not known; choose one of: {", ".join(KL_METHODS)}.')
    if kl == 'analytic' and not prior.has_analytic_kl:
      raise errors.ConfigError(
          f'{type(prior).__name__} has no closed-form KL to a normal posterior; '
          f"use kl='monte_carlo' (the default for this prior).")
    if estimator == 'local_reparameterization' and kl == 'monte_carlo':
      if not prior.has_analytic_kl:
        raise errors.ConfigError(
            '--bnn_layer=local_reparameterization samples pre-activations, not '
            'weights, so there is no weight sample for the Monte Carlo KL that '
            '--prior=scale_mixture needs (its KL has no closed form). Use '
            '--bnn_layer=reparameterization or flipout with --prior=scale_mixture, '
            'or --prior=normal with local_reparameterization.')
      raise errors.ConfigError(
          "--bnn_layer=local_reparameterization has no weight sample for kl="
          "'monte_carlo'; use kl='analytic' (exact for the normal prior).")
    if not isinstance(seed, int) or isinstance(seed, bool):
      raise errors.ConfigError(f'seed={seed!r}: must be an int.')
    self.estimator = estimator
    self.prior = prior  # tracked: a learnable prior's variables are trained too
    self.kl_method = kl
    self.activation = tf_keras.activations.get(activation)
    self.seed = seed
    self.salt = seed if salt is None else int(salt)
    self.posterior_rho_init = float(posterior_rho_init)
    self.posterior_scale = posterior_scale
    self.use_bias = bool(use_bias)
    self.kernel_loc_initializer = (
        tf_keras.initializers.GlorotUniform(seed=seed) if kernel_loc_initializer is None
        else tf_keras.initializers.get(kernel_loc_initializer))
    self._kernel_shape = None

  def _add_posterior(self, kernel_shape, units):
    self._kernel_shape = list(kernel_shape)
    # autocast=False: under a mixed policy, reads stay float32 inside `call`.
    self.kernel_loc = self.add_weight(
        'kernel_loc', shape=kernel_shape, dtype=tf.float32,
        initializer=self.kernel_loc_initializer, trainable=True, autocast=False)
    self.kernel_rho = self.add_weight(
        'kernel_rho', shape=kernel_shape, dtype=tf.float32,
        initializer=tf_keras.initializers.Constant(self.posterior_rho_init),
        trainable=True, autocast=False)
    self.bias = None
    if self.use_bias:
      self.bias = self.add_weight('bias', shape=[units], dtype=tf.float32,
                                  initializer='zeros', trainable=True, autocast=False)

  @property
  def kernel_scale(self):
    """The posterior standard deviations (float32) of the layer's `posterior_scale`:
    softplus(rho) + SCALE_FLOOR or exp(rho) (floored); see `posterior_scale()`."""
    return posterior_scale(self.kernel_rho, self.posterior_scale)[0]

  def analytic_kl(self, scale=None, log_scale=None):
    """Exact KL(q || p) over the kernel for a normal prior (float32 scalar).

    Args:
      scale: `kernel_scale` if already computed (saves a softplus or exp).
      log_scale: log(scale) if already computed (saves a log).
    """
    if not self.prior.has_analytic_kl:
      raise errors.ConfigError(
          f'{type(self.prior).__name__} has no closed-form KL; the Monte Carlo KL '
          f'needs a weight sample: use apply_with_kl(x, noise) with a Noise.')
    if scale is None:
      scale, log_scale = posterior_scale(self.kernel_rho, self.posterior_scale)
    return analytic_kl_normal(self.kernel_loc, scale, self.prior.sigma, log_scale)

  def apply_with_kl(self, inputs, noise, weight_noise=None):
    """(outputs, kl) for one call; see the module docstring.

    Args:
      inputs: the layer's input (cast to the compute dtype).
      noise: an `engine.sampling.Noise` for this step, or None for the posterior
        mean weights.
      weight_noise: optional `weight_noise(noise)`, drawn beforehand.

    Returns:
      outputs in the compute dtype, and the float32 scalar KL(q || p) of the
      kernel: analytic or a Monte Carlo estimate on this call's weight sample.
    """
    return self(inputs, noise=noise, return_kl=True, weight_noise=weight_noise)

  @property
  def draws_weight_noise(self):
    """Whether a call draws a kernel-shaped normal shared by the batch (see
    `weight_noise`): reparameterization and Flipout do, local reparameterization
    does not."""
    return self.estimator != 'local_reparameterization'

  def weight_noise(self, noise):
    """The standard-normal kernel noise eps that a call with `noise` draws.

    The perturbation is scale * eps; eps is shared by the whole global batch and
    depends only on `noise`'s seed and this layer's salt (not on the replica), so
    it can be drawn apart from the training step and passed back to the call as
    `weight_noise` (engine/loop.py draws the next step's eps while this step runs).
    The call draws it through the same code (`_weight_noise`), so both give the
    same eps.

    Args:
      noise: the `engine.sampling.Noise` passed to the call (not folded).

    Returns:
      float32 [kernel shape], or None when `draws_weight_noise` is False.
    """
    if not self.draws_weight_noise:
      return None
    return self._weight_noise(noise.fold(self.salt))

  def _weight_noise(self, layer_noise):
    """weight_noise from the call's noise already folded with this layer's salt."""
    if self.estimator == 'flipout':
      layer_noise = layer_noise.stream(0)  # the Flipout signs use streams 1 and 2
    return layer_noise.shared_normal(self._kernel_shape)

  def call(self, inputs, noise=None, return_kl=False, weight_noise=None):
    """outputs, or (outputs, kl) when return_kl; noise=None: posterior-mean mode.

    weight_noise: `weight_noise(noise)` drawn beforehand, or None to draw it here.
    """
    compute_dtype = self.compute_dtype
    loc = tf.convert_to_tensor(self.kernel_loc)
    kl = None
    if noise is None:
      outputs = self._linear(inputs, tf.cast(loc, compute_dtype))
      if return_kl:
        kl = self.analytic_kl()
    else:
      # Once per call: the KL reuses log_scale (free for 'exp').
      scale, log_scale = posterior_scale(self.kernel_rho, self.posterior_scale)
      noise = noise.fold(self.salt)
      eps = weight_noise
      if eps is None and self.draws_weight_noise:
        eps = self._weight_noise(noise)
      w = None
      if self.estimator == 'reparameterization':
        w = loc + scale * eps
        outputs = self._linear(inputs, tf.cast(w, compute_dtype))
      elif self.estimator == 'flipout':
        in_noise, out_noise = noise.stream(1), noise.stream(2)
        delta = scale * eps
        in_shape, out_shape, sign_rank = self._sign_shapes(inputs)
        sign_in = self._expand(in_noise.rademacher(in_shape), sign_rank)
        sign_out = self._expand(out_noise.rademacher(out_shape), sign_rank)
        perturbation = self._linear(inputs * tf.cast(sign_in, compute_dtype),
                                    tf.cast(delta, compute_dtype))
        outputs = (self._linear(inputs, tf.cast(loc, compute_dtype))
                   + perturbation * tf.cast(sign_out, compute_dtype))
        if return_kl and self.kl_method == 'monte_carlo':
          w = loc + delta
      else:  # local_reparameterization
        mean = self._linear(inputs, tf.cast(loc, compute_dtype))
        variance = self._linear(tf.square(inputs), tf.cast(tf.square(scale), compute_dtype))
        std = tf.sqrt(tf.cast(variance, tf.float32) + _VARIANCE_FLOOR)
        eps = noise.normal(_static_or_dynamic_shape(mean))
        outputs = mean + tf.cast(std * eps, compute_dtype)
      if return_kl:
        if self.kl_method == 'analytic':
          kl = analytic_kl_normal(loc, scale, self.prior.sigma, log_scale)
        else:
          kl = monte_carlo_kl(w, loc, scale, self.prior, log_scale)
    if self.bias is not None:
      outputs = bias.add_bias(outputs, self.bias)  # its gradient summed in float32
    if self.activation is not None:
      outputs = self.activation(outputs)
    return (outputs, kl) if return_kl else outputs

  @staticmethod
  def _expand(signs, rank):
    """[B, C] signs -> rank `rank`, broadcasting over the spatial axes."""
    for _ in range(rank - 2):
      signs = tf.expand_dims(signs, 1)
    return signs


class VariationalDense(_VariationalLayer):
  """A dense layer with a mean-field Gaussian posterior over its kernel.

  Inputs are [B, in] (flatten first); outputs are [B, units]. The bias is a point
  estimate (a plain float32 variable, no posterior, no KL): it has few parameters
  and little to gain from one, and this keeps the per-step noise to the kernel.

  Args:
    units: output size.
    estimator: 'reparameterization', 'flipout' or 'local_reparameterization'.
    prior: a `NormalPrior` or `ScaleMixturePrior` (default NormalPrior(1.0)).
    activation: a tf_keras activation (name or callable), or None.
    seed: int; seeds the loc initializer and, unless `salt` is given, is the salt
      folded into the step's Noise, so layers need distinct seeds to get
      independent noise.
    posterior_rho_init: initial rho of every weight; -5.0 gives scale 0.0067
      (softplus(-5) + floor, or exp(-5) for posterior_scale='exp').
    posterior_scale: how rho maps to the scale: 'softplus' or 'exp' (rho is
      log(sigma); cheaper); see `posterior_scale()`.
    kl: 'analytic' or 'monte_carlo'; None picks analytic for a normal prior and
      Monte Carlo for the scale mixture.
    use_bias: whether to add a (deterministic) bias.
    salt: the int folded into the Noise (default: `seed`).
    kernel_loc_initializer: initializer of loc (default GlorotUniform(seed)).
    **kwargs: tf_keras Layer arguments (name, dtype: e.g. a mixed Policy).
  """

  def __init__(self, units, *, estimator='reparameterization', prior=None,
               activation=None, seed, posterior_rho_init=-5.0,
               posterior_scale='softplus', kl=None, use_bias=True, salt=None,
               kernel_loc_initializer=None, **kwargs):
    super().__init__(estimator=estimator, prior=prior, activation=activation, seed=seed,
                     posterior_rho_init=posterior_rho_init,
                     posterior_scale=posterior_scale, kl=kl, use_bias=use_bias,
                     salt=salt, kernel_loc_initializer=kernel_loc_initializer, **kwargs)
    self.units = int(units)
    self.input_spec = tf_keras.layers.InputSpec(ndim=2)

  def build(self, input_shape):
    in_dim = tf.TensorShape(input_shape)[-1]
    if in_dim is None:
      raise ValueError(f'{self.name}: the last input dimension must be known.')
    self._add_posterior([int(in_dim), self.units], self.units)
    self.input_spec = tf_keras.layers.InputSpec(ndim=2, axes={-1: int(in_dim)})
    super().build(input_shape)

  def _linear(self, x, kernel):
    return tf.matmul(x, kernel)

  def _sign_shapes(self, x):
    batch = _static_or_dynamic_shape(x)[0]
    return [batch, self._kernel_shape[0]], [batch, self.units], 2

  def compute_output_shape(self, input_shape):
    return tf.TensorShape(input_shape)[:-1].concatenate([self.units])


class VariationalConv2D(_VariationalLayer):
  """A 2-D convolution (NHWC) with a mean-field Gaussian posterior over its kernel.

  Flipout's signs are per example and per channel, broadcast over space (as in
  Wen et al. 2018 and TFP). Local reparameterization samples every output position
  independently from its Gaussian marginal: each marginal is exact, but the
  correlation between positions that share the kernel is dropped. The bias is a
  point estimate, as in `VariationalDense`.

  Args:
    filters: output channels.
    kernel_size: int or (kh, kw).
    strides: int or (sh, sw).
    padding: 'same' or 'valid' (any case).
    estimator, prior, activation, seed, posterior_rho_init, posterior_scale, kl,
    use_bias, salt, kernel_loc_initializer, **kwargs: as for `VariationalDense`.
  """

  def __init__(self, filters, kernel_size, strides=1, padding='valid', *,
               estimator='reparameterization', prior=None, activation=None, seed,
               posterior_rho_init=-5.0, posterior_scale='softplus', kl=None,
               use_bias=True, salt=None, kernel_loc_initializer=None, **kwargs):
    super().__init__(estimator=estimator, prior=prior, activation=activation, seed=seed,
                     posterior_rho_init=posterior_rho_init,
                     posterior_scale=posterior_scale, kl=kl, use_bias=use_bias,
                     salt=salt, kernel_loc_initializer=kernel_loc_initializer, **kwargs)
    pair = lambda v: (int(v), int(v)) if isinstance(v, int) else tuple(int(i) for i in v)
    self.filters = int(filters)
    self.kernel_size = pair(kernel_size)
    self.strides = pair(strides)
    self.padding = padding.upper()
    if self.padding not in ('SAME', 'VALID'):
      raise ValueError(f"padding={padding!r}: use 'same' or 'valid'.")
    self.input_spec = tf_keras.layers.InputSpec(ndim=4)

  def build(self, input_shape):
    channels = tf.TensorShape(input_shape)[-1]
    if channels is None:
      raise ValueError(f'{self.name}: the input channels must be known.')
    self._add_posterior(list(self.kernel_size) + [int(channels), self.filters],
                        self.filters)
    self.input_spec = tf_keras.layers.InputSpec(ndim=4, axes={-1: int(channels)})
    super().build(input_shape)

  def _linear(self, x, kernel):
    return tf.nn.conv2d(x, kernel, strides=self.strides, padding=self.padding)

  def _sign_shapes(self, x):
    batch = _static_or_dynamic_shape(x)[0]
    return [batch, self._kernel_shape[2]], [batch, self.filters], 4

  def compute_output_shape(self, input_shape):
    shape = tf.TensorShape(input_shape).as_list()
    spatial = []
    for size, k, s in zip(shape[1:3], self.kernel_size, self.strides):
      if size is None:
        spatial.append(None)
      elif self.padding == 'SAME':
        spatial.append(-(-size // s))
      else:
        spatial.append(-(-(size - k + 1) // s))
    return tf.TensorShape([shape[0]] + spatial + [self.filters])


def posterior_stddevs(layer):
  """The kernel's posterior standard deviations (float32), e.g. for histograms."""
  return layer.kernel_scale


def sum_kl(kls):
  """The float32 sum of the per-layer KLs of one forward pass (0.0 for none)."""
  kls = [tf.convert_to_tensor(k, tf.float32) for k in kls]
  return tf.add_n(kls) if kls else tf.constant(0.0)
