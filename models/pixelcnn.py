"""A local autoregressive decoder for binary images: a PixelCNN-style causal
convolution on top of a factorized decoder's logits.

p(x | z) = prod_i Bernoulli(x_i | sigmoid(a_i(z) + f_i(x_<i, a_i(z), z))), pixels in
raster order. a(z) are the logits of the ordinary (factorized) decoder; f corrects
them from the binary pixels in a window above and to the left of pixel i:

  h_i = act(context_i(x) + u * a_i(z) + V z        context: a causal k x k convolution
            [+ window_i(sigmoid(a(z)))]            window: an optional m x m convolution
            [+ M g_i(z)])                          g: optional per-pixel latent maps
  h_i = act(W_l h_i + b_l)                          (1 x 1 layers, l = 1..L)
  f_i = w . h_i                                      (starts at zero)

With dynamic binarization, pixels are independent given the grey image, but the
grey image is not fully determined by a small z; the pixels already drawn around
pixel i tell the decoder about the local grey level that z left uncertain (van den
Oord et al., 2016, "Pixel Recurrent Neural Networks"; Gulrajani et al., 2017,
"PixelVAE"). The output layer starts at zero, so an untrained model is exactly the
factorized VAE.

The optional window over the factorized probabilities sigmoid(a(z)) around pixel i
(`logit_window` m > 0; it depends on z only, so it may look ahead) lets the head
compare the pixels drawn so far with what z predicted for them, and what z
predicts next to pixel i. The optional latent maps (`latent_maps` C > 0) are C more
numbers per pixel that the factorized decoder computes from z beside a(z) (its output
layer gets C more channels), read through a 1 x 1 layer: z then tells the head more
than one logit per pixel, as PixelVAE's decoder conditions its PixelCNN on a feature
map of z.

The convolution of x does not depend on z: it is computed once per image and
shared by every latent sample (the importance samples of the log-likelihood
estimate, the IWAE's samples). It is causal by construction: it has weights for
the earlier pixels only.
"""
import numpy as np
import tensorflow as tf
import tf_keras

from models import bias


def causal_mask(kernel_size):
  """[k, k] 0/1 mask of the taps strictly before the centre in raster order."""
  k = int(kernel_size)
  mask = np.zeros([k, k], np.float32)
  mask[:k // 2, :] = 1.0
  mask[k // 2, :k // 2] = 1.0
  return mask


@tf.custom_gradient
def _stacked_matmul(taps, a_rows, taps_kernel, a_kernel):
  """[taps; a_rows]^T @ [taps_kernel; a_kernel]: [pixels, F] from inputs [T, pixels]
  and [A, pixels], in one matmul.

  Its gradient gives each input its own product. The matmul's own gradient would
  compute all T + A rows of d(input) at once, and the T rows of the taps, which are
  data, are then computed for nothing; on their own, unused, they are pruned.
  """
  features = tf.concat([taps, a_rows], 0)
  out = tf.matmul(features, tf.concat([taps_kernel, a_kernel], 0), transpose_a=True)

  def grad(d_out):
    d_kernel = tf.matmul(features, d_out)  # [T + A, F]
    t = taps.shape[0]
    return (tf.matmul(taps_kernel, d_out, transpose_b=True),
            tf.matmul(a_kernel, d_out, transpose_b=True), d_kernel[:t], d_kernel[t:])

  return out, grad


class TapConv2D(tf_keras.layers.Layer):
  """A zero-padded k x k convolution of a single-channel image, computed by
  shifting the image once per tap and contracting the taps in one matmul.

  causal=True: only the taps of `causal_mask` have weights, so each output pixel
  sees only the pixels strictly before it in raster order (PixelCNN's mask A) and
  no later pixel can leak in. causal=False: the whole window, centred.
  """

  def __init__(self, filters, kernel_size, *, causal=True, use_bias=True,
               kernel_initializer='glorot_uniform', **kwargs):
    super().__init__(**kwargs)
    self.filters = int(filters)
    self.kernel_size = int(kernel_size)
    self.causal = causal
    self.use_bias = use_bias
    mask = causal_mask(self.kernel_size) if causal else np.ones([self.kernel_size] * 2)
    self.taps = [tuple(t) for t in np.argwhere(mask)]
    self.kernel_initializer = tf_keras.initializers.get(kernel_initializer)

  def build(self, input_shape):
    if int(input_shape[-1]) != 1:
      raise ValueError(f'{self.name}: expects one channel, got {input_shape[-1]}.')
    self.kernel = self.add_weight('kernel', shape=[len(self.taps), self.filters],
                                  initializer=self.kernel_initializer)
    self.bias = (self.add_weight('bias', shape=[self.filters], initializer='zeros')
                 if self.use_bias else None)
    super().build(input_shape)

  def windows(self, x):
    """x [..., H, W, 1] -> its taps, [taps, M] with M = the number of pixels of x.

    Taps first: each shifted image is one contiguous row. (Stacked last, the taps
    interleave: a strided write of the whole tensor, which took longer than the
    matmul; and the kernel's gradient needed a transposed copy of its input.)
    """
    h, w = x.shape[-3], x.shape[-2]
    r = self.kernel_size // 2
    below = 0 if self.causal else r  # the causal window sees nothing below
    padded = tf.pad(tf.reshape(x, [-1, h, w]), [[0, 0], [r, below], [r, r]])
    return tf.stack([tf.reshape(padded[:, i:i + h, j:j + w], [-1]) for i, j in self.taps],
                    axis=0)

  def call(self, x):
    """x [..., H, W, 1] -> [..., H, W, filters]."""
    h, w = x.shape[-3], x.shape[-2]
    out = tf.matmul(self.windows(x), self.kernel, transpose_a=True)  # [M, filters]
    out = out if self.bias is None else out + self.bias
    return tf.reshape(out, tf.concat([tf.shape(x)[:-3], [h, w, self.filters]], 0))


class PixelCNNHead(tf_keras.layers.Layer):
  """Corrects a factorized decoder's logits from the pixels before each pixel.

  `context(x)` takes images [..., H, W, 1] in {0, 1} and returns [..., H, W, F];
  `logits(context, a, z)` takes the factorized decoder's output a [..., H, W, 1 + C]
  (the logits, then the C latent maps) and z [..., d] (leading dims broadcast
  against the context's) and returns the autoregressive logits [..., H, W, 1].
  """

  def __init__(self, *, filters, kernel_size, hidden_layers, logit_window=0,
               latent_maps=0, seed=0, activation='relu', **kwargs):
    super().__init__(**kwargs)
    init = lambda i: tf_keras.initializers.GlorotUniform(seed=seed + i)
    self.activation = tf_keras.activations.get(activation)
    self.conv = TapConv2D(filters, kernel_size, kernel_initializer=init(0),
                          name='pixelcnn_context')
    self.logit_in = tf_keras.layers.Dense(filters, use_bias=False,
                                          kernel_initializer=init(1),
                                          name='pixelcnn_logit_in')
    self.latent_in = tf_keras.layers.Dense(filters, use_bias=False,
                                           kernel_initializer=init(2),
                                           name='pixelcnn_latent_in')
    self.logit_window = None
    if logit_window:
      self.logit_window = TapConv2D(filters, logit_window, causal=False, use_bias=False,
                                    kernel_initializer=init(3),
                                    name='pixelcnn_logit_window')
    self.latent_maps = int(latent_maps)
    self.maps_in = None
    if self.latent_maps:
      self.maps_in = tf_keras.layers.Dense(filters, use_bias=False,
                                           kernel_initializer=init(4),
                                           name='pixelcnn_maps_in')
    self.hidden = [tf_keras.layers.Dense(filters, activation=activation,
                                         kernel_initializer=init(10 + i),
                                         name=f'pixelcnn_hidden{i}')
                   for i in range(hidden_layers)]
    self.out = tf_keras.layers.Dense(1, kernel_initializer='zeros', name='pixelcnn_out',
                                     dtype='float32')

  def build_for(self, image_shape, latent_dim):
    """Creates every weight. tf_keras builds a layer on its first call, and `logits`
    reads some of its layers' weights without calling them: each is called once here."""
    x = tf.zeros([1] + list(image_shape))
    self.conv(x)
    self.logit_in(tf.zeros([1, 1]))
    if self.maps_in is not None:
      self.maps_in(tf.zeros([1, self.latent_maps]))
    for layer in self.hidden + [self.out]:
      layer(tf.zeros([1, self.conv.filters]))
    a = tf.zeros([1] + list(image_shape[:-1]) + [1 + self.latent_maps])
    self.logits(self.context(x), a, tf.zeros([1, latent_dim]))

  def context(self, x):
    """The causal taps of images x [..., H, W, 1] in {0, 1}: [taps, ..., H, W]
    (`TapConv2D.windows`), computed once per image and shared by its latent samples."""
    windows = self.conv.windows(tf.cast(x, self.compute_dtype))
    return tf.reshape(windows, tf.concat([[len(self.conv.taps)], tf.shape(x)[:-1]], 0))

  def floats_per_pixel(self):
    """Activations per pixel of one latent sample: the first layer's F channels;
    with the logit window, its m^2 taps and F more channels; the C latent maps."""
    window = self.logit_window
    return (self.conv.filters + self.latent_maps
            + (0 if window is None else len(window.taps) + window.filters))

  def logits(self, context, a, z):
    """The autoregressive logits [..., H, W, 1] (see the class docstring)."""
    f = self.conv.filters
    taps_kernel, a_kernel = self._first_kernels()
    a_in = tf.cast(a, self.compute_dtype)
    taps = tf.reshape(context, [context.shape[0], -1])  # [taps, pixels of x]
    if self.one_sample_per_image(context, a):
      # One latent sample per image (training): x's taps and a's 1 + C channels are
      # the rows of one input, through one matmul. Each of the three small matmuls
      # this replaces wrote a [pixels, F] tensor, and that traffic, not the
      # multiply-adds, set their time (K = 1 and 8 were slower than K = 24).
      pixels = context.shape[1:].num_elements()
      a_rows = tf.transpose(tf.reshape(a_in, [pixels, -1]))
      pre = _stacked_matmul(taps, a_rows, taps_kernel, a_kernel)
      pre = tf.reshape(pre, tf.concat([tf.shape(a)[:-1], [f]], 0))
    else:
      # Several latent samples per image: x's taps once, a's channels per sample.
      from_x = tf.reshape(tf.matmul(taps, taps_kernel, transpose_a=True),
                          tf.concat([tf.shape(context)[1:], [f]], 0))
      pre = from_x + tf.tensordot(a_in, a_kernel, 1)
    pre = bias.broadcast_add(pre, self.conv.bias)
    pre = bias.broadcast_add(pre, self._from_latent(a, z))
    return self._correct(pre, a)

  @staticmethod
  def one_sample_per_image(context, a):
    """Whether `logits` reads a [B, H, W, 1 + C] for exactly the images of `context`
    (static shapes), and so computes its first layer as one matmul."""
    return context.shape[1:].is_fully_defined() and context.shape[1:] == a.shape[:-1]

  def _first_kernels(self):
    """The first layer's weights in the compute dtype: the taps' [taps, F], and a's
    [1 + C, F] (the logit's row, then the latent maps')."""
    cast = lambda v: tf.cast(v, self.compute_dtype)
    a_kernel = cast(self.logit_in.kernel)
    if self.maps_in is not None:
      a_kernel = tf.concat([a_kernel, cast(self.maps_in.kernel)], 0)
    return cast(self.conv.kernel), a_kernel

  def _from_latent(self, a, z):
    """The first layer's terms from z [..., d] other than a's own channels:
    [..., 1, 1, F] or, with the logit window, [..., H, W, F]."""
    out = self.latent_in(z)[..., None, None, :]
    if self.logit_window is not None:
      out = out + self.logit_window(tf.sigmoid(a[..., :1]))
    return out

  def _correct(self, pre_activation, a):
    """a + f from the first layer's pre-activation [..., F], for pixels a [..., 1 + C]
    (only the logit, the first channel, is used here)."""
    a = a[..., :1]
    h = self.activation(pre_activation)
    for layer in self.hidden:  # the layers' own weights; bias.broadcast_add adds the bias
      h = layer.activation(bias.broadcast_add(
          tf.tensordot(h, tf.cast(layer.kernel, h.dtype), 1), layer.bias))
    return a + tf.cast(self.out(h), a.dtype)

  def generate(self, a, z, seed):
    """Draws x ~ p(x | z) one pixel at a time (eager).

    Each pixel's conditional is computed from its own k x k window only (the same
    numbers as `logits` on the whole image, which the tests check), so drawing an
    image costs a few small operations per pixel rather than a network pass.

    Args:
      a: [N, H, W, 1 + C] the factorized decoder's output for z (see `logits`).
      z: [N, d] latents.
      seed: int32 [2] stateless seed.

    Returns:
      (samples [N, H, W, 1] in {0, 1}, probabilities [N, H, W, 1]): each pixel's
      probability of being on given the pixels drawn before it.
    """
    n, h, w = int(a.shape[0]), int(a.shape[1]), int(a.shape[2])
    r = self.conv.kernel_size // 2
    rows, cols = (np.array(t) for t in zip(*self.conv.taps))
    u = tf.random.stateless_uniform([n, h, w, 1], seed=seed).numpy()
    taps_kernel, a_kernel = (tf.cast(k, tf.float32) for k in self._first_kernels())
    from_latent = (tf.cast(self._from_latent(a, z), tf.float32) + self.conv.bias
                   + tf.tensordot(a, a_kernel, 1)).numpy()  # [N, H, W, F]
    padded = np.zeros([n, h + r, w + 2 * r], np.float32)
    probs = np.zeros([n, h, w, 1], np.float32)
    for i in range(h):
      for j in range(w):
        window = tf.constant(padded[:, i + rows, j + cols])  # [N, taps]
        pre = tf.matmul(window, taps_kernel) + from_latent[:, i, j]
        p = tf.sigmoid(self._correct(pre, a[:, i, j, :])).numpy()  # [N, 1]
        probs[:, i, j, :] = p
        padded[:, i + r, j + r] = (u[:, i, j, 0] < p[:, 0]).astype(np.float32)
    x = padded[:, r:, r:r + w, None]
    return tf.constant(x), tf.constant(probs)
