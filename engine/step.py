"""One training step per replica: the GradientTape, the all-reduce, the update.

Nothing here is a tf.function; `engine.loop` compiles the steps.
"""
import tensorflow as tf

from engine import inputs
from engine import objectives
from engine import sampling

_SAMPLING_SALT = 0x5A


def step_noise_seed(seed, step):
  """The int32 [2] seed of the `sampling.Noise` of training step `step`."""
  return inputs.step_seed(seed, step, _SAMPLING_SALT)


def make_shared_noise_fn(model, *, seed, train_input=None):
  """draw(step) -> the noise of that step shared across its batch, or None if none.

  Two sources offer it, each with the property `draws_shared_noise`:
  - a model whose step draws noise shared by the whole batch (a BNN's weight noise,
    as big as its weights), as `shared_noise(noise)`, taken back by
    `train_terms(..., shared_noise=)`;
  - the in-memory input, whose binarization noise covers the global batch, as
    `shared_noise(step)`, taken back by `replica_batch(..., shared_noise=)`.
  Both depend only on (seed, step), not on the replica, the batch or the weights,
  so `engine.loop.TrainLoop` draws step s + 1's while step s runs, side by side
  (benchmarks/RESULTS.md: +14% examples/sec for a reparameterization MLP on CPU).
  draw(step) returns a dict with the key 'model', 'input' or both.
  """
  from_model = getattr(model, 'draws_shared_noise', False)
  from_input = getattr(train_input, 'draws_shared_noise', False)
  if not (from_model or from_input):
    return None

  def draw(step):
    out = {}
    if from_model:
      out['model'] = model.shared_noise(sampling.Noise(step_noise_seed(seed, step)))
    if from_input:
      out['input'] = train_input.shared_noise(step)
    return out

  return draw


def make_replica_step(model, optimizer, train_input, *, global_batch_size, seed,
                      clip_grad_norm, loss_scaling=False):
  """Returns replica_step(args, step, measure, shared_noise=None) -> dict of shares.

  The model supplies `train_terms(batch, *, noise, step, shared_noise=None)` ->
  (per_example_loss [B], regularization scalar, measurements), where each
  measurement is either per-example [B] or a replica-invariant scalar (e.g. a
  BNN's KL or KL weight).
  `shared_noise`, when given, is `make_shared_noise_fn(model, seed=seed,
  train_input=train_input)(step)` (drawn by the loop ahead of the step); its
  'model' part goes to `train_terms`, its 'input' part to `replica_batch`.

  Every returned value is a share that sums over replicas (strategy.reduce SUM) to
  the global figure: per-example terms as sum / global batch, replica-invariant
  scalars (gradient norm, KL weight) divided by the number of replicas.
  `measure` asks for the costly extras: the gradient norm is computed only then
  (or always, when clipping needs it), because a per-step norm over every gradient
  slowed the XLA step on CPU (benchmarks/RESULTS.md: 0.87x -> 0.94x of the fastest
  `fit`); it is 0 otherwise. A Python bool decides while tracing (engine.loop
  compiles one XLA program for each value: a `tf.cond` inside the program made
  XLA copy every gradient into the conditional's operands at every step); a bool
  Tensor decides at run time through `tf.cond`.

  With `loss_scaling` (float16), `optimizer` is a tf_keras LossScaleOptimizer: the
  loss is scaled before the gradient, the all-reduced gradients are unscaled, and
  the optimizer skips the update (and lowers the scale) when any gradient is
  non-finite; 'skipped' (1 for a skipped step) and 'loss_scale' are measured.
  """

  def replica_step(args, step, measure, shared_noise=None):
    shared_noise = shared_noise or {}
    batch = train_input.replica_batch(args, step, shared_noise.get('input'))
    ctx = tf.distribute.get_replica_context()
    num_replicas = ctx.num_replicas_in_sync
    noise = sampling.Noise(step_noise_seed(seed, step),
                           ctx.replica_id_in_sync_group, num_replicas)
    with tf.GradientTape() as tape:
      per_example, regularization, measurements = model.train_terms(
          batch, noise=noise, step=step, shared_noise=shared_noise.get('model'))
      loss = objectives.replica_loss(per_example, regularization,
                                     global_batch_size=global_batch_size,
                                     num_replicas=num_replicas)
      target = optimizer.get_scaled_loss(loss) if loss_scaling else loss
    variables = model.trainable_variables
    grads = tape.gradient(target, variables)
    # Sum gradients across replicas here (not inside the optimizer) so the norm and
    # clipping see the global gradient.
    grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
    extra = {}
    if loss_scaling:
      grads = optimizer.get_unscaled_gradients(grads)
      finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
      extra['skipped'] = 1.0 - tf.cast(finite, tf.float32)
      extra['loss_scale'] = tf.identity(optimizer.loss_scale)
    norm = lambda: tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads]))
    if clip_grad_norm:
      grad_norm = norm()
      grads, _ = tf.clip_by_global_norm(grads, clip_grad_norm, use_norm=grad_norm)
    else:
      if isinstance(measure, bool):
        grad_norm = norm() if measure else tf.constant(0.0)
      else:
        grad_norm = tf.cond(measure, norm, lambda: tf.constant(0.0))
    optimizer.apply_gradients(zip(grads, variables), skip_gradients_aggregation=True)
    shares = {k: measurement_share(v, global_batch_size, num_replicas)
              for k, v in {**measurements, **extra}.items()}
    shares['loss'] = loss
    shares['grad_norm'] = grad_norm / num_replicas
    return shares

  return replica_step


def measurement_share(value, global_batch_size, num_replicas):
  """This replica's share of a measurement: [B] -> sum / G; scalar -> value / R."""
  value = tf.cast(value, tf.float32)
  if value.shape.rank == 0:
    return value / num_replicas
  return objectives.global_batch_mean(value, global_batch_size)


def eval_batch_noise(seed, salt, batch, batch_index, batch_size):
  """The `sampling.Noise` of a replica's part of test batch `batch_index`.

  A function of (seed, batch index, salt) and of each example's row in the global
  test batch (from the batch's 'index', its position in the test set), not of the
  replica: the same test example draws the same noise over 1 replica or many,
  including in the last, partial batch.

  Args:
    batch: this replica's part, with 'index' (`inputs.make_eval_dataset`).
    batch_size: the test batches' global size (the last may be smaller).
  """
  key = inputs.step_seed(seed, batch_index, salt)
  first = tf.cast(batch_index, tf.int64) * batch_size
  positions = tf.cast(tf.cast(batch['index'], tf.int64) - first, tf.int32)
  return sampling.Noise(key, rows=(positions, batch_size))


def make_replica_eval(term_fn, *, seed, batch_size, keep=()):
  """Returns replica_eval(batch, batch_index) -> (sums, kept).

  Args:
    term_fn: (batch, noise) -> dict of per-example [B] figures.
    seed: run seed; the noise of a test example is a function of (seed, its batch
      index, its row in the batch) (`eval_batch_noise`).
    batch_size: the test batches' global size.
    keep: names of figures also returned per example (`kept`, [B] each), for
      paired comparisons of runs on the same test examples.

  `sums` holds 'count' and, for every figure, its sum and its sum of squares
  (name + '_sq') over the batch.
  """

  def replica_eval(batch, batch_index):
    terms = term_fn(batch, eval_batch_noise(seed, 0xE7, batch, batch_index, batch_size))
    sums = {'count': tf.cast(tf.shape(batch['image'])[0], tf.float32)}
    for k, v in terms.items():
      sums[k] = tf.reduce_sum(v)
      sums[k + '_sq'] = tf.reduce_sum(tf.square(v))
    return sums, {k: terms[k] for k in keep}

  return replica_eval


def make_replica_predict(predict_fn, *, seed, batch_size):
  """Returns replica_predict(batch, batch_index) -> dict of per-example outputs.

  Args:
    predict_fn: (batch, noise) -> dict of tensors whose first axis is the batch
      (or second, for [S, B, ...] Monte-Carlo outputs: see `EvalLoop` / `PredictLoop`).
    batch_size: the test batches' global size (noise as in `make_replica_eval`).
  """

  def replica_predict(batch, batch_index):
    return predict_fn(batch, eval_batch_noise(seed, 0xE8, batch, batch_index, batch_size))

  return replica_predict
