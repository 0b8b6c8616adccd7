"""An autoregressive decoder for binary images: a MADE conditioned on the latent z.

p(x | z) = prod_i Bernoulli(x_i | logit_i(x_<i, z)), pixels in raster order. One
pass of the network gives every pixel's logit from the observed image (teacher
forcing), so the log-likelihood costs one forward pass, like a factorized decoder;
drawing an image takes one pass per pixel.

The autoregressive property comes from fixed binary masks on the kernels (Germain
et al., 2015, "MADE: Masked Autoencoder for Distribution Estimation"): the mask is
multiplied into the kernel inside `call`, so no optimizer update or restored
checkpoint can break it. The latent z enters the first hidden layer and the
output layer unmasked: every pixel, the first included, sees all of z.
"""

import numpy as np
import tensorflow as tf
import tf_keras


def hidden_degrees(num_units, num_inputs):
  """Degrees 1..num_inputs-1 spread evenly over a hidden layer's units.

  A unit of degree m may see inputs 1..m, so it can feed outputs m+1..num_inputs.
  """
  if num_inputs < 2:
    return np.ones([num_units], np.int64)
  return 1 + (np.arange(num_units) * (num_inputs - 1)) // num_units


def connectivity_mask(in_degrees, out_degrees, *, strict):
  """[in, out] float mask: out unit j sees in unit i iff deg_i <= deg_j (< if strict)."""
  in_degrees = np.asarray(in_degrees)[:, None]
  out_degrees = np.asarray(out_degrees)[None, :]
  allowed = in_degrees < out_degrees if strict else in_degrees <= out_degrees
  return allowed.astype(np.float32)


class MaskedDense(tf_keras.layers.Layer):
  """Dense layer whose kernel is multiplied by a fixed 0/1 mask on every call."""

  def __init__(self, mask, *, activation=None, kernel_initializer='glorot_uniform',
               **kwargs):
    super().__init__(**kwargs)
    self._mask = np.asarray(mask, np.float32)
    self.units = int(self._mask.shape[1])
    self.activation = tf_keras.activations.get(activation)
    self.kernel_initializer = tf_keras.initializers.get(kernel_initializer)

  def build(self, input_shape):
    fan_in = int(input_shape[-1])
    if fan_in != self._mask.shape[0]:
      raise ValueError(f'{self.name}: input has {fan_in} features, mask expects '
                       f'{self._mask.shape[0]}.')
    self.kernel = self.add_weight('kernel', shape=self._mask.shape,
                                  initializer=self.kernel_initializer)
    self.bias = self.add_weight('bias', shape=[self.units], initializer='zeros')
    super().build(input_shape)

  def call(self, inputs):
    kernel = self.kernel * tf.constant(self._mask, dtype=self.kernel.dtype)
    return self.activation(tf.matmul(inputs, kernel) + self.bias)


class AutoregressiveDecoder(tf_keras.layers.Layer):
  """Logits of p(x_i | x_<i, z) for every pixel i, from a flat image and z.

  Call with (x [N, D] in {0, 1}, z [N, d]); returns logits [N, D].
  """

  def __init__(self, num_pixels, hidden_sizes, *, seed=0, activation='relu', **kwargs):
    super().__init__(**kwargs)
    self.num_pixels = int(num_pixels)
    self.activation = tf_keras.activations.get(activation)
    init = lambda i: tf_keras.initializers.GlorotUniform(seed=seed + i)
    degrees = np.arange(1, self.num_pixels + 1)
    self.hidden = []
    for i, units in enumerate(hidden_sizes):
      next_degrees = hidden_degrees(units, self.num_pixels)
      # The first layer's activation comes after z's contribution is added (`call`).
      self.hidden.append(MaskedDense(
          connectivity_mask(degrees, next_degrees, strict=False),
          activation=None if i == 0 else activation, kernel_initializer=init(i),
          name=f'made_hidden{i}'))
      degrees = next_degrees
    self.latent_in = tf_keras.layers.Dense(
        hidden_sizes[0], use_bias=False, kernel_initializer=init(50), name='made_latent_in')
    self.out = MaskedDense(
        connectivity_mask(degrees, np.arange(1, self.num_pixels + 1), strict=True),
        kernel_initializer=init(100), name='made_out', dtype='float32')
    self.latent_out = tf_keras.layers.Dense(
        self.num_pixels, use_bias=False, kernel_initializer=init(150),
        name='made_latent_out', dtype='float32')

  def call(self, x, z):
    h = self.activation(self.hidden[0](x) + self.latent_in(z))
    for layer in self.hidden[1:]:
      h = layer(h)
    return self.out(h) + self.latent_out(z)

  def generate(self, z, seed):
    """Draws x ~ p(x | z) one pixel at a time (eager; one network pass per pixel).

    Args:
      z: [N, d] latents.
      seed: int32 [2] stateless seed.

    Returns:
      (samples [N, D] in {0, 1}, probabilities [N, D]): each pixel's probability of
      being on given the pixels drawn before it, a smoother picture than the draw.
    """
    n = tf.shape(z)[0]
    u = tf.random.stateless_uniform([n, self.num_pixels], seed=seed)
    x = tf.zeros([n, self.num_pixels], tf.float32)
    probs = tf.zeros([n, self.num_pixels], tf.float32)
    for i in range(self.num_pixels):
      p = tf.sigmoid(tf.cast(self(x, z)[:, i], tf.float32))
      pixel = tf.one_hot(i, self.num_pixels, dtype=tf.float32)
      x += pixel * tf.cast(u[:, i] < p, tf.float32)[:, None]
      probs += pixel * p[:, None]
    return x, probs
