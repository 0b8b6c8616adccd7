"""Polyak averaging: an exponential moving average of the trained weights.

With `TrainConfig.ema_decay` > 0 the engine keeps, beside each trainable variable w,
a shadow variable updated after every `ema_every`-th optimizer step:

    shadow <- shadow - (1 - d_n) * (shadow - w),   d_n = min(decay, (1 + n) / (10 + n)),

where decay = ema_decay ** ema_every (the per-step decay over the steps between
updates) and n counts the updates so far; the (1 + n) / (10 + n) warm-up lets the
shadow follow the weights closely over the first updates instead of remembering
their random initialisation. An update reads every weight and shadow and writes
every shadow: on CPU, done every step, that cost 12% of the VAE's step
(benchmarks/RESULTS.md), hence updates every few steps (`engine.loop.TrainLoop`'s
`after_step`). Evaluation, sampling and the TensorBoard images then use
the averaged weights (`applied`), while training continues from the raw ones.

The shadows and the update count are checkpointed beside the model, so a resumed
run continues the same average. A checkpoint written without averaging restores
with the average missing; `reset` then starts it from the restored weights.

The average never owns the model's variables: every method takes them, in the
order the average was built with (`model.trainable_variables`).
"""
import contextlib

import tensorflow as tf

WARMUP_OFFSET = 10.0


class WeightAverage(tf.Module):
  """Shadow copies of a list of variables, and their update count.

  Build inside the strategy's scope: under a tf.distribute strategy the shadows are
  mirrored like the variables they follow, and each replica updates its own copy
  from its own weights (identical across replicas after the all-reduced step), so
  an update needs no communication.
  """

  def __init__(self, variables, *, decay, name='weight_average'):
    super().__init__(name=name)
    if not 0.0 <= decay < 1.0:  # 0: the shadows copy the weights at each update
      raise ValueError(f'decay={decay!r}: must be in [0, 1).')
    self._decay = float(decay)
    with self.name_scope:
      self.shadows = [tf.Variable(v.read_value(), trainable=False, name=_short(v.name))
                      for v in variables]
      self.updates = tf.Variable(0, dtype=tf.int64, trainable=False, name='updates')

  def current_decay(self):
    """d_n of the next update, as a float32 scalar."""
    n = tf.cast(self.updates, tf.float32)
    return tf.minimum(tf.constant(self._decay, tf.float32),
                      (1.0 + n) / (WARMUP_OFFSET + n))

  def update(self, variables):
    """Moves every shadow towards its variable; call after the optimizer's update.

    Works in a replica context (inside `strategy.run`, as the training loop calls
    it) and in cross-replica or default context.
    """
    self._check(variables)
    if tf.distribute.in_cross_replica_context():
      self._update_cross_replica(tf.distribute.get_strategy(), variables)
    else:
      tf.distribute.get_replica_context().merge_call(
          self._update_cross_replica, args=(variables,))

  def _update_cross_replica(self, strategy, variables):
    keep = self.current_decay()

    def move(shadow, value):
      return shadow.assign_sub((1.0 - keep) * (shadow - tf.cast(value, shadow.dtype)))

    for shadow, variable in zip(self.shadows, variables):
      strategy.extended.update(shadow, move, args=(variable,), group=False)
    strategy.extended.update(self.updates, lambda n: n.assign_add(1), group=False)

  def reset(self, variables):
    """Starts the average afresh from the variables' current values (eagerly)."""
    self._check(variables)
    for shadow, variable in zip(self.shadows, variables):
      shadow.assign(variable.read_value())
    self.updates.assign(0)

  @contextlib.contextmanager
  def applied(self, variables):
    """Within the block, the variables hold the averaged weights (eagerly).

    Their own values are kept aside and put back on leaving the block, also when
    the block raises.
    """
    self._check(variables)
    kept = [tf.identity(v.read_value()) for v in variables]
    try:
      for variable, shadow in zip(variables, self.shadows):
        variable.assign(shadow.read_value())
      yield
    finally:
      for variable, value in zip(variables, kept):
        variable.assign(value)

  def _check(self, variables):
    variables = list(variables)
    if len(variables) != len(self.shadows) or any(
        v.shape != s.shape for v, s in zip(variables, self.shadows)):
      raise ValueError(
          f'WeightAverage was built over {len(self.shadows)} variables but was given '
          f'{len(variables)} of other shapes; pass model.trainable_variables in the same '
          f'order.')


def _short(name):
  """A variable's name without its ':0' suffix, usable as a new variable name."""
  return name.split(':')[0].replace('/', '_')
