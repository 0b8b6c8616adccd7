"""models.bias: the float32-summed bias add and the conv layers that use it."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from models import bias


@pytest.mark.parametrize('dtype', [tf.bfloat16, tf.float16])
def test_broadcast_add_sums_the_gradient_in_float32(dtype):
  """A bias over 2 x 50,000 pixels of ones: its gradient is 100,000 per entry. A
  running sum in bfloat16 stops growing at 256 and float16 overflows at 65,504."""
  x = tf.ones([2, 50_000, 3], dtype)
  y = tf.Variable(tf.zeros([3]))
  with tf.GradientTape() as tape:
    out = bias.broadcast_add(x, y)
    loss = tf.reduce_sum(tf.cast(out, tf.float32))
  assert out.dtype == dtype
  np.testing.assert_allclose(tape.gradient(loss, y).numpy(), [100_000.0] * 3, rtol=1e-2)


def test_broadcast_add_in_float32_is_a_plain_add():
  x, y = tf.random.normal([4, 5]), tf.random.normal([5])
  np.testing.assert_array_equal(bias.broadcast_add(x, y).numpy(), (x + y).numpy())


def _pair(ours, theirs, *args, **kwargs):
  init = lambda: tf_keras.initializers.GlorotUniform(seed=3)
  b_init = lambda: tf_keras.initializers.RandomNormal(seed=4)
  return [cls(*args, kernel_initializer=init(), bias_initializer=b_init(), **kwargs)
          for cls in (ours, theirs)]


@pytest.mark.parametrize('layer_types', [
    (bias.Conv2D, tf_keras.layers.Conv2D),
    (bias.Conv2DTranspose, tf_keras.layers.Conv2DTranspose)], ids=['conv', 'deconv'])
@pytest.mark.parametrize('strides,padding', [(2, 'same'), (1, 'same'), (2, 'valid')])
def test_conv_layers_equal_tf_keras(layer_types, strides, padding, tmp_path):
  """Same outputs, weights and checkpoint as tf_keras's layer, eager and traced."""
  if layer_types[0] is bias.Conv2DTranspose and padding != 'same':
    with pytest.raises(ValueError, match='padding=same'):
      layer_types[0](4, 3, strides, padding)
    return
  ours, theirs = _pair(*layer_types, 4, 3, strides, padding, activation='relu', name='c')
  x = tf.random.stateless_normal([2, 8, 8, 3], [1, 2])
  out = [ours(x), theirs(x)]
  assert out[0].shape == out[1].shape
  np.testing.assert_allclose(out[0].numpy(), out[1].numpy(), rtol=1e-5, atol=1e-5)
  traced = tf.function(lambda v: ours(v))(tf.concat([x, x], 0))
  np.testing.assert_allclose(traced.numpy()[:2], out[1].numpy(), rtol=1e-5, atol=1e-5)
  assert [(v.name, v.shape) for v in ours.weights] == [
      (v.name, v.shape) for v in theirs.weights]

  # A checkpoint of tf_keras's layer restores into ours.
  for v in theirs.weights:
    v.assign(v + 1.0)
  path = tf.train.Checkpoint(layer=theirs).write(str(tmp_path / 'ckpt'))
  tf.train.Checkpoint(layer=ours).read(path).assert_consumed()
  np.testing.assert_allclose(ours(x).numpy(), theirs(x).numpy(), rtol=1e-5, atol=1e-5)


def test_conv_layers_refuse_settings_they_do_not_implement():
  with pytest.raises(ValueError, match='channels_last'):
    bias.Conv2D(4, 3, data_format='channels_first')
  with pytest.raises(ValueError, match='groups=1'):
    bias.Conv2D(4, 3, groups=2)
  with pytest.raises(ValueError, match='no dilation'):
    bias.Conv2DTranspose(4, 3, dilation_rate=2, padding='same')
  with pytest.raises(ValueError, match='no output_padding'):
    bias.Conv2DTranspose(4, 3, 2, 'same', output_padding=1)


@pytest.mark.parametrize('layer_types', [
    (bias.Conv2D, tf_keras.layers.Conv2D),
    (bias.Conv2DTranspose, tf_keras.layers.Conv2DTranspose)], ids=['conv', 'deconv'])
def test_conv_layers_take_images_of_unknown_height_and_width(layer_types):
  """Traced with height and width unknown, then called on two image sizes."""
  ours, theirs = _pair(*layer_types, 4, 3, 2, 'same', name='c')
  theirs(tf.zeros([1, 8, 8, 3]))
  ours(tf.zeros([1, 8, 8, 3]))
  traced = tf.function(ours, input_signature=[tf.TensorSpec([None, None, None, 3])])
  for shape in ([2, 8, 6, 3], [1, 5, 7, 3]):
    x = tf.random.stateless_normal(shape, [3, 4])
    np.testing.assert_allclose(traced(x).numpy(), theirs(x).numpy(), rtol=1e-5, atol=1e-5)
