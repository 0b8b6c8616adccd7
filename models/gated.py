"""Gated dense units: h = (W x + b) * sigmoid(V x + c).

A gated linear unit (Dauphin et al., 2017, "Language modeling with gated
convolutional networks"), the hidden layer of the MLP encoders and decoders in
Tomczak & Welling (2018, "VAE with a VampPrior"). The sigmoid gate lets a unit pass
its linear value through, scaled, rather than cut it at zero, and the gate's
gradient does not vanish where a relu's does.

The value and the gate come from one matmul with 2 * units outputs (one kernel
[in, 2 * units], one bias [2 * units]), split in half: the first half is the value,
the second the gate. The layer has no other nonlinearity.
"""
import tensorflow as tf
import tf_keras


class GatedDense(tf_keras.layers.Layer):
  """`units` gated linear units over the last axis of the inputs."""

  def __init__(self, units, *, kernel_initializer='glorot_uniform', **kwargs):
    super().__init__(**kwargs)
    self.units = units
    self.linear = tf_keras.layers.Dense(2 * units, kernel_initializer=kernel_initializer,
                                        name='value_and_gate')

  def call(self, inputs):
    value, gate = tf.split(self.linear(inputs), 2, axis=-1)
    return value * tf.sigmoid(gate)

  def compute_output_shape(self, input_shape):
    return tf.TensorShape(input_shape)[:-1].concatenate([self.units])
