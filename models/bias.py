"""Bias adds whose gradient is summed in float32, and the conv layers that use them.

In mixed precision a bias (or any per-image term) broadcast over the pixels of a
batch gets, as its gradient, a sum over every one of those pixels: 25,000 for the
conv VAE's first layer at batch 128, about 100,000 in the pixelcnn head. TF's CPU
kernels without XLA summed some of these in the low dtype (`BiasAddGrad` in
bfloat16, the broadcast add's `Sum` in float16), and the gradients came out 15%
(float16) to 90% (bfloat16) wrong in norm (tests/engine/test_precision.py).
`broadcast_add` sums them in float32; in float32 it is a plain add.

`add_bias` is the layers' bias add. `Conv2D` and `Conv2DTranspose` are tf_keras's
layers with that bias add in mixed precision (in float32 they compute exactly as
tf_keras's): same arguments, weights, names and checkpoints, for the configurations
the models use (channels last, no groups or dilation; 'same' padding for the
transposed one).
"""
import tensorflow as tf
import tf_keras


def broadcast_add(x, y):
  """x + y, y broadcast against x (x has the sum's shape) and cast to x's dtype;
  y's gradient is summed in float32."""
  if x.dtype == tf.float32 and y.dtype == tf.float32:
    return x + y
  return _add_summing_in_float32(x, tf.convert_to_tensor(y))  # a variable read here


@tf.custom_gradient
def _add_summing_in_float32(x, y):
  """See `broadcast_add`."""
  def grad(d_out):
    _, y_axes = tf.raw_ops.BroadcastGradientArgs(s0=tf.shape(x), s1=tf.shape(y))
    d_y = tf.reshape(tf.reduce_sum(tf.cast(d_out, tf.float32), y_axes), tf.shape(y))
    return d_out, tf.cast(d_y, y.dtype)

  return x + tf.cast(y, x.dtype), grad


def add_bias(outputs, b):
  """outputs + b over the last axis: tf.nn.bias_add in float32 (as tf_keras's layers),
  otherwise `broadcast_add`."""
  if outputs.dtype == tf.float32:
    return tf.nn.bias_add(outputs, b)
  return broadcast_add(outputs, b)


def _check_supported(layer, transpose):
  if (layer.data_format != 'channels_last' or layer.groups != 1
      or any(r != 1 for r in layer.dilation_rate)
      or (transpose and (layer.padding != 'same' or layer.output_padding is not None))):
    raise ValueError(
        f'{type(layer).__name__} {layer.name!r}: models.bias implements channels_last, '
        f'groups=1 and no dilation only'
        f'{" (transposed: padding=same, no output_padding)" if transpose else ""}; '
        f'use tf_keras.layers.{type(layer).__name__} for other settings.')


class Conv2D(tf_keras.layers.Conv2D):
  """tf_keras Conv2D whose bias gradient is summed in float32."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    _check_supported(self, transpose=False)

  def call(self, inputs):
    outputs = self.convolution_op(inputs, self.kernel)
    if self.use_bias:
      outputs = add_bias(outputs, self.bias)
    return self.activation(outputs)


class Conv2DTranspose(tf_keras.layers.Conv2DTranspose):
  """tf_keras Conv2DTranspose ('same' padding) whose bias gradient is summed in
  float32."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    _check_supported(self, transpose=True)

  def call(self, inputs):
    shape = tf.shape(inputs)
    out_shape = tf.concat([shape[:1], shape[1:3] * self.strides, [self.filters]], 0)
    outputs = tf.nn.conv2d_transpose(inputs, self.kernel, out_shape, self.strides,
                                     padding='SAME')
    # The same sizes, statically where the input's are known.
    sizes = [None if d is None else d * s for d, s in zip(inputs.shape[1:3], self.strides)]
    outputs.set_shape([inputs.shape[0], *sizes, self.filters])
    if self.use_bias:
      outputs = add_bias(outputs, self.bias)
    return self.activation(outputs)
