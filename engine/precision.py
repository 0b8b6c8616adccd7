"""Mixed precision: which dtype layers compute in, and loss scaling for float16.

`--precision=float32 | mixed_bfloat16 | mixed_float16`. Under a mixed policy the
network layers compute in the low dtype while their variables stay float32; every
distribution, log-prob, KL and the loss itself stay float32 (the models force
their distribution layers and output layers to float32, and our variational layers
sample weights in float32 before casting them). float16 also needs dynamic loss
scaling (tf_keras `LossScaleOptimizer`), whose skipped steps are counted.

The policy is applied only while a model is built (`policy_scope`), so it is not
left behind as process-wide state: layers capture their policy at construction.
"""
import contextlib

import tf_keras

PRECISIONS = ('float32', 'mixed_bfloat16', 'mixed_float16')


def needs_loss_scaling(precision):
  return precision == 'mixed_float16'


@contextlib.contextmanager
def policy_scope(precision):
  """Layers constructed inside get the `precision` policy; the old one is restored."""
  previous = tf_keras.mixed_precision.global_policy()
  tf_keras.mixed_precision.set_global_policy(precision)
  try:
    yield
  finally:
    tf_keras.mixed_precision.set_global_policy(previous)


def decayed(variable):
  """Whether weight decay applies to `variable`: a layer's kernel (weight matrix),
  not a bias, a scale, a learned prior or a variational posterior's parameters."""
  return variable.name.split('/')[-1].split(':')[0] == 'kernel'


def make_optimizer(precision, learning_rate, *, weight_decay=0.0, variables=()):
  """Adam (a float rate or an engine.schedules schedule); loss-scaled for float16.

  With `weight_decay` > 0 it is AdamW: before each update, every kernel among
  `variables` (the model's trainable variables; see `decayed`) shrinks by
  learning_rate(step) * weight_decay of itself. Build the optimizer on `variables`.
  """
  optimizer = tf_keras.optimizers.Adam(learning_rate=learning_rate,
                                       weight_decay=weight_decay or None)
  if weight_decay:
    optimizer.exclude_from_weight_decay(
        var_list=[v for v in variables if not decayed(v)])
  if needs_loss_scaling(precision):
    optimizer = tf_keras.mixed_precision.LossScaleOptimizer(optimizer, dynamic=True)
  return optimizer


def inner_optimizer(optimizer):
  """The optimizer that holds the learning rate and slots."""
  return getattr(optimizer, 'inner_optimizer', optimizer)
