"""The compiled loops: the only module that applies tf.function.

`train(iterator, num_steps)` runs `num_steps` optimizer steps in one call (a
`tf.while_loop`), so Python and host synchronisation happen once per call, not per
step. `num_steps` must be a Tensor: a Python int would retrace for every value.

No autograph: the training loop, the replica functions (the step, the evaluation,
the model code under them, the evaluation's loop over a distributed test set) are
traced as plain graph code, so they write data-dependent control flow as `tf.cond`
/ `tf.while_loop`. Converting them cost 1.5-2.5 s of every process's first trace
of a training step, more than the tracing itself.
"""
import numpy as np
import tensorflow as tf

from engine import distribute
from engine import preemption


# Measurements taken on the last step of each call only (see engine.step).
SAMPLED_MEASUREMENTS = ('grad_norm',)


class TrainLoop:
  """N steps per call. Returns mean measurements and the first non-finite step.

  Measurements are means over the call's steps, except SAMPLED_MEASUREMENTS, which
  are the value at the call's last step.

  Args:
    replica_step: from `engine.step.make_replica_step`.
    train_input: supplies `next_args(iterator, step)` in cross-replica context.
    strategy: the tf.distribute strategy (resolved once by the caller).
    step_counter: int64 variable, advanced once per step.
    measurement_keys: names returned by replica_step.
    jit_compile: compile each replica's step with XLA. (Compiling the whole loop
      instead was far slower on CPU in a quick probe with this TF version.)
    stop_requested: optional bool variable (`engine.preemption.PreemptionWatcher`),
      read before every step: when set, the call returns early at that step
      boundary (`done` < num_steps). Read outside XLA, so a flip by the watcher
      thread is seen while the call runs.
    agree_on_stop: several workers: the flag is all-reduced each step so every
      worker stops at the same step (one scalar collective per step).
    shared_noise_fn: optional draw(step) -> the noise step `step` shares across its
      batch and replicas (`engine.step.make_shared_noise_fn`), passed to
      `replica_step` as its 4th argument. The loop draws step s + 1's while step s
      runs (software pipelining: the draw is carried to the next iteration), in
      its own XLA program when `jit_compile`: nothing orders the two, so TF's
      executor runs them at the same time, on two cores of a CPU. The noise is the
      same as an inline draw's; only when it is drawn changes.
    after_step: optional fn() run per replica (`strategy.run`) after every
      `after_step_every`-th step, counted by the step counter (so a resumed run
      keeps the same cadence): the weight average's update
      (`engine.averaging.WeightAverage`). Its own XLA program when `jit_compile`,
      outside the step's, so the steps without it pay only for a conditional.
    after_step_every: see `after_step`.
  """

  def __init__(self, replica_step, train_input, *, strategy, step_counter,
               measurement_keys, jit_compile, stop_requested=None, agree_on_stop=False,
               shared_noise_fn=None, after_step=None, after_step_every=1):
    self._strategy = strategy
    self._stop = stop_requested
    self._agree = agree_on_stop
    self._counter = step_counter
    self._keys = tuple(measurement_keys)
    self._input = train_input
    replica_step = _graph_code(replica_step)
    shared_noise_fn = _graph_code(shared_noise_fn)
    after_step = _graph_code(after_step)
    if jit_compile:
      # A strategy's all-reduce (a merge_call) may not run inside a tf.cond's
      # branch: the two-program choice is for the default strategy only. Under
      # the others one program decides `measure` inside XLA (it costs copies of the
      # gradients; see _compile_per_measure).
      if distribute.is_default(strategy):
        replica_step = _compile_per_measure(replica_step)
      else:
        replica_step = _xla(replica_step)
      if shared_noise_fn is not None:
        shared_noise_fn = _xla(shared_noise_fn)
    if after_step is not None and jit_compile:
      after_step = _xla(after_step)
    self._replica_step = replica_step
    self._draw = shared_noise_fn
    self._after_step = after_step
    self._after_every = int(after_step_every)
    self._loop = tf.function(self._run, autograph=False)

  def __call__(self, iterator, num_steps):
    if not isinstance(num_steps, tf.Tensor):
      raise TypeError(f'num_steps must be a Tensor (got {type(num_steps).__name__}); '
                      f'a Python int retraces the loop for every value.')
    return self._loop(iterator, num_steps)

  def _run(self, iterator, num_steps):
    # A plain tf.while_loop (traced without autograph, like everything under it).
    # The stop flag is read before the first step and after every step, for the next.
    def cond(i, done, bad_step, stopping, sums, last, pending):
      del done, sums, last, pending
      return (i < num_steps) & (bad_step < 0) & tf.logical_not(stopping)

    def body(i, done, bad_step, stopping, sums, last, pending):
      del stopping
      step = self._counter.read_value()
      args = self._input.next_args(iterator, step)
      measure = tf.equal(i, num_steps - 1)
      if self._draw is None:
        step_args = (args, step, measure)
      else:
        # `pending` holds this step's noise; draw the next step's (wasted after the
        # call's last step or an early stop: the next call draws afresh).
        step_args = (args, step, measure, pending)
        pending = self._draw(step + 1)
      shares = self._strategy.run(self._replica_step, args=step_args)
      measured = {k: self._strategy.reduce(tf.distribute.ReduceOp.SUM, shares[k], axis=None)
                  for k in self._keys}
      self._counter.assign_add(1)
      if self._after_step is not None:
        def after_step():
          self._strategy.run(self._after_step)  # an update; no outputs to match
        tf.cond(tf.equal((step + 1) % self._after_every, 0), after_step, lambda: None)
      bad_step = tf.where(tf.math.is_finite(measured['loss']), bad_step, step)
      sums = {k: sums[k] + measured[k] for k in self._keys}
      return (i + 1, done + 1, bad_step, self._should_stop(), sums, measured, pending)

    zeros = {k: tf.constant(0.0) for k in self._keys}
    pending = () if self._draw is None else self._draw(self._counter.read_value())
    _, done, bad_step, _, sums, last, _ = tf.while_loop(
        cond, body, (tf.constant(0, tf.int64), tf.constant(0, tf.int64),
                     tf.constant(-1, tf.int64), self._should_stop(), zeros, dict(zeros),
                     pending))
    means = {k: v / tf.cast(tf.maximum(done, 1), tf.float32) for k, v in sums.items()}
    means.update({k: last[k] for k in SAMPLED_MEASUREMENTS if k in self._keys})
    return means, done, bad_step

  def _should_stop(self):
    if self._stop is None:
      return tf.constant(False)
    if not self._agree:
      return self._stop.read_value()
    return preemption.agreed_stop(self._strategy, self._stop)


def _graph_code(fn):
  """fn, traced as it is (no autograph) when a loop body calls it."""
  return None if fn is None else tf.autograph.experimental.do_not_convert(fn)


def _xla(fn, **kwargs):
  """fn as its own XLA program, traced without autograph (see the module doc)."""
  return tf.function(fn, jit_compile=True, autograph=False, **kwargs)


def _compile_per_measure(replica_step):
  """replica_step under XLA, as two programs chosen by `measure` outside XLA.

  The step computes its costly measurements (the gradient norm) only when
  `measure` is true, on a call's last step. Deciding that inside one XLA program
  (a conditional) made XLA copy all gradients into the conditional's operands at
  every step. Here each value of `measure` has its own program, traced with it as
  a Python bool, and a `tf.cond` in the TF graph picks one per step.
  """
  plain = _xla(lambda *a: replica_step(a[0], a[1], False, *a[2:]))
  measured = _xla(lambda *a: replica_step(a[0], a[1], True, *a[2:]))

  def compiled_step(args, step, measure, *rest):
    return tf.cond(measure, lambda: measured(args, step, *rest),
                   lambda: plain(args, step, *rest))

  return compiled_step


def in_test_set_order(indices, parts):
  """{name: rows} sorted by the rows' test-set `indices` [N] (the dataset's 'index').

  Raises:
    RuntimeError: the indices are not 0 .. N - 1, each once (the distributed test
      set lost or repeated examples: a bug, never a figure to report).
  """
  order = np.argsort(indices, kind='stable')
  if not np.array_equal(indices[order], np.arange(len(indices))):
    missing = np.setdiff1d(np.arange(len(indices)), indices)
    raise RuntimeError(
        f'The evaluation saw {len(indices)} test examples but not each of 0 .. '
        f'{len(indices) - 1} once (missing, first 10: {missing[:10].tolist()}): the '
        f'distributed test set lost or repeated examples.')
  return {k: v[order] for k, v in parts.items()}


class EvalLoop:
  """Sums per-example figures over a distributed test set.

  `replica_eval(batch, batch_index)` returns (sums, kept) as
  `step.make_replica_eval` does. The call returns the totals of the sums named in
  `keys` and, for each name in `keep`, that figure of every test example, in
  test-set order (by the batches' 'index', `inputs.make_eval_dataset`), as a numpy
  array under 'per_example'.

  Without `keep`, the whole test set is one compiled call. With it, one compiled
  call per batch: a gather of the replicas' figures inside a compiled loop over
  batches is not safe under MirroredStrategy (the collectives of successive
  iterations can meet out of order; seen here as a shape mismatch on the last,
  smaller batch). The totals are then summed over batches in float64 on the host.
  """

  def __init__(self, replica_eval, *, strategy, keys, keep=(), jit_compile=False):
    self._strategy = strategy
    self._keys = tuple(keys)
    self._keep = tuple(keep)
    # XLA per replica step; the last batch may be smaller, which compiles once more.
    replica_eval = _graph_code(replica_eval)
    self._replica_eval = _xla(replica_eval) if jit_compile else replica_eval
    self._fn = tf.function(self._run, autograph=False)
    self._batch_fn = tf.function(self._one_batch, reduce_retracing=True, autograph=False)

  def __call__(self, dist_dataset):
    if not self._keep:
      return {k: v.numpy() for k, v in self._fn(iter(dist_dataset)).items()}
    totals = {k: 0.0 for k in self._keys}
    parts = {k: [] for k in self._keep}
    indices = []
    for index, batch in enumerate(dist_dataset):
      sums, kept, example_index = self._batch_fn(batch, tf.constant(index, tf.int64))
      for k in self._keys:
        totals[k] += float(sums[k])
      for k in self._keep:
        parts[k].append(kept[k].numpy())
      indices.append(example_index.numpy())
    totals['per_example'] = {
        k: v.astype(np.float32)
        for k, v in in_test_set_order(np.concatenate(indices),
                                      {k: np.concatenate(v) for k, v in parts.items()}).items()}
    return totals

  def _run(self, iterator):
    # The loop autograph would write for `for x in iterator`: draw an optional
    # batch, and run the body under tf.cond only when there was one.
    def body(more, index, totals):
      del more
      batch = iterator.get_next_as_optional()

      def add():
        sums, _ = self._strategy.run(self._replica_eval, args=(batch.get_value(), index))
        return index + 1, {k: totals[k] + self._strategy.reduce(
            tf.distribute.ReduceOp.SUM, sums[k], axis=None) for k in self._keys}

      more = batch.has_value()
      index, totals = tf.cond(more, add, lambda: (index, totals))
      return more, index, totals

    _, _, totals = tf.while_loop(
        lambda more, index, totals: more, body,
        (tf.constant(True), tf.constant(0, tf.int64),
         {k: tf.constant(0.0) for k in self._keys}))
    return totals

  def _one_batch(self, batch, index):
    sums, kept = self._strategy.run(self._replica_eval, args=(batch, index))
    # The figures and the examples' test-set indices, gathered in the same order.
    return ({k: self._strategy.reduce(tf.distribute.ReduceOp.SUM, sums[k], axis=None)
             for k in self._keys},
            {k: self._strategy.gather(kept[k], axis=0) for k in self._keep},
            self._strategy.gather(batch['index'], axis=0))


class PredictLoop:
  """Per-example outputs over a distributed test set, gathered to numpy.

  One compiled call per test batch (prediction is not the hot path; the Python loop
  over batches keeps the outputs' variable batch sizes simple). Outputs of the
  replica function must have the batch as their first axis; they come back in
  test-set order (by the batches' 'index', `inputs.make_eval_dataset`).
  """

  def __init__(self, replica_predict, *, strategy, jit_compile=False):
    self._strategy = strategy
    # reduce_retracing: partial last batches and several test sets of other sizes
    # share one trace with a dynamic batch dimension.
    replica_predict = _graph_code(replica_predict)
    self._replica_predict = (_xla(replica_predict, reduce_retracing=True) if jit_compile
                             else replica_predict)
    self._fn = tf.function(self._run, reduce_retracing=True, autograph=False)

  def _run(self, batch, index):
    out = self._strategy.run(self._replica_predict, args=(batch, index))
    return ({k: self._strategy.gather(v, axis=0) for k, v in out.items()},
            self._strategy.gather(batch['index'], axis=0))

  def __call__(self, dist_dataset):
    parts = {}
    indices = []
    for index, batch in enumerate(dist_dataset):
      out, example_index = self._fn(batch, tf.constant(index, tf.int64))
      for k, v in out.items():
        parts.setdefault(k, []).append(v.numpy())
      indices.append(example_index.numpy())
    return in_test_set_order(np.concatenate(indices),
                             {k: np.concatenate(v, axis=0) for k, v in parts.items()})
