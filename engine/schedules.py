"""Learning-rate schedules: a pure function of the step, and the optimizer's view of it.

`--lr_schedule=constant` keeps Adam's rate fixed. `--lr_schedule=cosine` decays it
from `--learning_rate` at step 0 to `--learning_rate * --lr_final_fraction` at
`--train_steps`, following half a cosine, then holds it there. At a fixed step
budget the decay is what lets the last steps settle into a minimum instead of
bouncing around it at the full rate.

The rate is a function of the optimizer's `iterations` (its applied updates; equal
to the global step except for float16 steps skipped by loss scaling), so a resumed
run continues the same curve. The curve depends on `--train_steps`: resuming with a
larger `--train_steps` stretches the rest of it.
"""
import math

import tensorflow as tf
import tf_keras

from engine import config as config_lib


def cosine_rate(step, *, base_rate, total_steps, final_fraction):
  """base * (f + (1 - f) * (1 + cos(pi * min(step / total, 1))) / 2), as float32."""
  progress = tf.minimum(tf.cast(step, tf.float32) / float(total_steps), 1.0)
  weight = 0.5 * (1.0 + tf.cos(math.pi * progress))
  return base_rate * (final_fraction + (1.0 - final_fraction) * weight)


class CosineSchedule(tf_keras.optimizers.schedules.LearningRateSchedule):
  """`cosine_rate` as a tf_keras schedule (evaluated at the optimizer's iterations)."""

  def __init__(self, base_rate, total_steps, final_fraction):
    super().__init__()
    self.base_rate = float(base_rate)
    self.total_steps = int(total_steps)
    self.final_fraction = float(final_fraction)

  def __call__(self, step):
    return cosine_rate(step, base_rate=self.base_rate, total_steps=self.total_steps,
                       final_fraction=self.final_fraction)

  def get_config(self):
    return dict(base_rate=self.base_rate, total_steps=self.total_steps,
                final_fraction=self.final_fraction)


def learning_rate(train_config):
  """What to give the optimizer: a float (constant) or a schedule."""
  t = train_config
  if t.lr_schedule == 'constant':
    return t.learning_rate
  if t.lr_schedule == 'cosine':
    return CosineSchedule(t.learning_rate, t.train_steps, t.lr_final_fraction)
  raise ValueError(
      f'lr_schedule={t.lr_schedule!r}; choose one of {config_lib.LR_SCHEDULES}')
