"""One training step per replica: the GradientTape, the all-reduce, the update.

Nothing here is a tf.function; `engine.loop` compiles the steps.
"""
import tensorflow as tf

from engine import inputs
from engine import objectives

_SAMPLING_SALT = 0x5A


def make_replica_step(model, optimizer, train_input, *, global_batch_size, num_replicas,
                      seed, kl_warmup_steps, clip_grad_norm):
  """Returns replica_step(args, step, measure) -> dict of measurement shares.

  Every returned value is a share that sums over replicas (strategy.reduce SUM) to
  the global figure: per-example terms as sum / global batch, replica-invariant
  scalars (gradient norm, KL weight) divided by the number of replicas.
  `measure` (a bool Tensor) asks for the costly extras: the gradient norm is
  computed only then (or always, when clipping needs it), because a per-step norm
  over every gradient slowed the XLA step on CPU (benchmarks/RESULTS.md: 0.87x ->
  0.94x of the fastest `fit`); it is 0 otherwise.
  """

  def replica_step(args, step, measure):
    batch = train_input.replica_batch(args, step)
    ctx = tf.distribute.get_replica_context()
    sample_seed = tf.random.experimental.stateless_fold_in(
        inputs.step_seed(seed, step, _SAMPLING_SALT), ctx.replica_id_in_sync_group)
    kl_weight = objectives.kl_warmup_weight(step, kl_warmup_steps)
    with tf.GradientTape() as tape:
      per_example, regularization, per_example_measurements = model.loss_terms(
          batch['image'], seed=sample_seed, kl_weight=kl_weight)
      loss = objectives.replica_loss(per_example, regularization,
                                     global_batch_size=global_batch_size,
                                     num_replicas=num_replicas)
    variables = model.trainable_variables
    grads = tape.gradient(loss, variables)
    # Sum gradients across replicas here (not inside the optimizer) so the norm and
    # clipping see the global gradient.
    grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
    norm = lambda: tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads]))
    if clip_grad_norm:
      grad_norm = norm()
      grads, _ = tf.clip_by_global_norm(grads, clip_grad_norm, use_norm=grad_norm)
    else:
      grad_norm = tf.cond(measure, norm, lambda: tf.constant(0.0))
    optimizer.apply_gradients(zip(grads, variables), skip_gradients_aggregation=True)
    shares = {k: objectives.global_batch_mean(v, global_batch_size)
              for k, v in per_example_measurements.items()}
    shares['loss'] = loss
    shares['grad_norm'] = grad_norm / num_replicas
    shares['kl_weight'] = kl_weight / num_replicas
    return shares

  return replica_step


def make_replica_eval(model, *, seed, iw_samples, iw_chunk_size):
  """Returns replica_eval(x, batch_index) -> dict of per-example sums and squares."""

  def replica_eval(x, batch_index):
    ctx = tf.distribute.get_replica_context()
    key = tf.random.experimental.stateless_fold_in(
        inputs.step_seed(seed, batch_index, 0xE7), ctx.replica_id_in_sync_group)
    terms = model.eval_terms(x, seed=key, iw_samples=iw_samples,
                             iw_chunk_size=iw_chunk_size)
    out = {'count': tf.cast(tf.shape(x)[0], tf.float32)}
    for k, v in terms.items():
      out[k] = tf.reduce_sum(v)
      out[k + '_sq'] = tf.reduce_sum(tf.square(v))
    return out

  return replica_eval
