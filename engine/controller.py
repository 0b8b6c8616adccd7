"""The eager outer loop: schedule, checkpoints, evaluation, summaries, throughput.

Everything here is plain Python between calls of the compiled loop
(`engine.loop.TrainLoop`); a host sync happens once per `steps_per_loop` steps.
"""
import contextlib
import dataclasses
import json
import os
import time
from typing import Optional

import tensorflow as tf
import tf_keras

import models
from engine import averaging
from engine import checkpoints
from engine import config as config_lib
from engine import datasets
from engine import distribute
from engine import errors
from engine import evaluation
from engine import inputs
from engine import loop as loop_lib
from engine import precision
from engine import preemption
from engine import schedules
from engine import step as step_lib
from engine import summaries

METRICS_FILE = 'metrics.json'


@dataclasses.dataclass
class Experiment:
  """What a run is built from; made once, inside `strategy.scope()`."""
  config: config_lib.ExperimentConfig
  strategy: tf.distribute.Strategy
  data: datasets.ImageDataset
  task: inputs.TaskData  # what the model trains and is tested on (from its module)
  module: object  # the model's module in the registry (hooks: evaluate, summaries)
  model: tf.Module
  optimizer: tf_keras.optimizers.Optimizer
  step: tf.Variable
  manager: tf.train.CheckpointManager  # saves to model_dir (chief) or a worker dir
  is_chief: bool = True
  worker_dir: str = ''  # a non-chief worker's temporary save dir, removed at the end
  average: Optional[averaging.WeightAverage] = None  # with TrainConfig.ema_decay > 0

  @property
  def test_images(self):
    return self.task.test_images


def load_data(data_config, seed):
  return datasets.load_dataset(
      data_config.dataset, data_dir=data_config.data_dir, seed=seed,
      num_train=data_config.synthetic_train_size, num_test=data_config.synthetic_test_size)


def build(config, strategy, *, data=None, record_config=True):
  """Loads data, builds model/optimizer/step in the strategy's scope, restores.

  Returns:
    An Experiment whose variables hold the latest checkpoint, if any.
  """
  if data is None:
    data = load_data(config.data, config.train.seed)
  model_dir = config.train.model_dir
  config_dict = config_lib.to_dict(config)
  exempt = tuple(f'model_options.{name}' for name in
                 getattr(type(config.model_options), 'EVALUATION_FIELDS', ()))
  # Check now, record only once the checkpoint restored: a refused run must not
  # rewrite the dir's record of what its checkpoint holds.
  checkpoints.check_and_record_config(model_dir, config_dict, write=False, exempt=exempt)
  module = models.get(config.model)
  task = module.prepare_data(config.model_options, data, data_config=config.data,
                             seed=config.train.seed)
  with strategy.scope(), precision.policy_scope(config.train.precision):
    model = module.build(config.model_options, task_data=task, seed=config.train.seed,
                         global_batch_size=config.train.batch_size)
  with strategy.scope():
    optimizer = precision.make_optimizer(config.train.precision,
                                         schedules.learning_rate(config.train),
                                         weight_decay=config.train.weight_decay,
                                         variables=model.trainable_variables)
    optimizer.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64, trainable=False, name='global_step')
    average = None
    if config.train.ema_decay:
      # Updated every ema_every steps, so each update decays by ema_decay ** ema_every.
      average = averaging.WeightAverage(
          model.trainable_variables, decay=config.train.ema_decay ** config.train.ema_every)
  chief = distribute.is_chief(strategy)
  trackables = dict(model=model, optimizer=optimizer, step=step)
  if average is not None:
    trackables['average'] = average
  manager = checkpoints.make_manager(model_dir, max_to_keep=config.train.keep_checkpoints,
                                     **trackables)
  # Every worker restores from the shared model dir; only the chief may repair it.
  # A checkpoint from a run without --ema_decay has no average: it starts from the
  # restored weights.
  checkpoints.restore_latest(manager, model_dir=model_dir, repair=chief,
                             optional=('average',) if average is not None else ())
  if average is not None and int(average.updates.numpy()) == 0:
    average.reset(model.trainable_variables)
  worker_dir = ''
  if not chief:
    # Saving is a collective under MultiWorkerMirroredStrategy: every worker saves,
    # the others into a temporary dir that `train` removes.
    worker_dir = distribute.worker_dir(model_dir, strategy)
    manager = checkpoints.make_manager(worker_dir, max_to_keep=1, **trackables)
  # A constant learning rate is a checkpointed optimizer variable; the flag wins on
  # resume. A schedule is rebuilt from the flags each run (only `iterations` is saved).
  if config.train.lr_schedule == 'constant':
    precision.inner_optimizer(optimizer).learning_rate = config.train.learning_rate
  if record_config and chief:
    checkpoints.check_and_record_config(model_dir, config_dict, exempt=exempt)
  return Experiment(config, strategy, data, task, module, model, optimizer, step, manager,
                    is_chief=chief, worker_dir=worker_dir, average=average)


def evaluation_weights(exp, *, trained=False):
  """A context in which the model holds the weights to evaluate and sample with:
  the weight average when the run keeps one (TrainConfig.ema_decay) and not
  `trained`, else the trained weights as they are."""
  if exp.average is None or trained:
    return contextlib.nullcontext()
  return exp.average.applied(exp.model.trainable_variables)


def evaluate(exp, *, final=True, trained_weights=False, **kwargs):
  """The model's test figures (its module's `evaluate` hook).

  With a weight average (TrainConfig.ema_decay) the figures are of the averaged
  weights, unless `trained_weights`; the key 'weights' says which ('average' or
  'trained').
  A model may return figures as images under the key 'images' ({name: uint8 RGB});
  use `pop_images` before writing the metrics as JSON.
  """
  with evaluation_weights(exp, trained=trained_weights):
    metrics = exp.module.evaluate(exp, final=final, **kwargs)
  metrics['weights'] = ('average' if exp.average is not None and not trained_weights
                        else 'trained')
  return metrics


def pop_images(exp, metrics, writers, step):
  """Writes the metrics' images as PNG files in model_dir and as TensorBoard images."""
  images = metrics.pop('images', {})
  paths = []
  if not exp.is_chief:
    return paths
  for name, image in images.items():
    if writers is not None:
      writers.image('eval', name, image, step)
    path = os.path.join(exp.config.train.model_dir, f'{name}.png')
    summaries.write_png(path, image)
    paths.append(path)
  return paths


def pop_per_example(exp, metrics, step):
  """Writes the metrics' per-example test figures (key 'per_example', from a final
  evaluation of the task's test set) to model_dir/test_per_example.npz; returns its
  path, or None when there are none (or this worker is not the chief)."""
  values = metrics.pop('per_example', None)
  if values is None or not exp.is_chief:
    return None
  return evaluation.write_per_example(exp.config.train.model_dir, values,
                                      images=exp.task.test_images, step=step)


def write_summaries(exp, writers, step):
  """The model's TensorBoard images/histograms (its module's `write_summaries` hook),
  drawn with the evaluation weights."""
  with evaluation_weights(exp):
    exp.module.write_summaries(exp, writers, step)


def write_metrics(model_dir, metrics):
  path = os.path.join(model_dir, METRICS_FILE)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(metrics, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return path


def _save_if_finite(exp, step):
  """Saves a checkpoint unless a weight is NaN/Inf (a finite loss does not prove that:
  a NaN kernel under a ReLU can still give a finite loss)."""
  bad = [v.name for v in exp.model.variables
         if not bool(tf.reduce_all(tf.math.is_finite(v)))]
  if bad:
    raise errors.NonFiniteLossError(
        f'At step {step} these weights are non-finite: {", ".join(bad[:5])}; the '
        f'checkpoint was not written, and the last good one is '
        f'{exp.manager.latest_checkpoint or "none yet"}. Fix: lower --learning_rate or '
        f'set --clip_grad_norm.')
  return exp.manager.save(checkpoint_number=step)


def _scalars(metrics):
  """The float figures of a metrics dict, for TensorBoard (no stderrs, no tables)."""
  return {k: v for k, v in metrics.items()
          if isinstance(v, float) and not k.endswith('stderr')}


def _fmt_eta(seconds):
  seconds = int(seconds)
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def jit_compile(exp):
  """Whether the training step runs under XLA.

  --jit_compile / --nojit_compile decide when given. Unset (None), XLA is on unless
  the model declares that its step trains faster without it on CPU
  (`trains_faster_without_xla_on_cpu`, e.g. the pixelcnn VAE: 1.25-1.5x on CPU,
  benchmarks/RESULTS.md, session 16) and the machine has no GPU. Never where the
  strategy cannot run per-replica XLA (several replicas on CPU; see
  distribute.supports_per_replica_jit).
  """
  wanted = exp.config.train.jit_compile
  if wanted is None:
    wanted = not _plain_step_is_faster(exp)
  return wanted and distribute.supports_per_replica_jit(exp.strategy)


def _plain_step_is_faster(exp):
  return (bool(getattr(exp.model, 'trains_faster_without_xla_on_cpu', False))
          and not tf.config.list_logical_devices('GPU'))


def make_train_loop(exp, *, stop_requested=None, prefetch_noise=None):
  """Wires the input, the replica step and the compiled loop for an Experiment.

  stop_requested: optional bool variable read before every step (preemption).
  prefetch_noise: draw the shared noise one step ahead (`engine.loop.TrainLoop`);
    None: when TrainConfig.prefetch_noise and the step is XLA-compiled (without
    XLA the draw is dozens of separate TF ops, slower than drawing inline).

  Returns:
    (TrainLoop, iterator), the iterator positioned at the experiment's current step
    (None for the in-memory pipeline, which indexes data by step in the graph).
  """
  config, strategy, t = exp.config, exp.strategy, exp.config.train
  train_input = inputs.make_train_input(
      config.data.input_pipeline, exp.task.train_images, strategy=strategy,
      global_batch_size=t.batch_size, seed=t.seed, binarize=exp.task.binarize,
      targets=exp.task.train_targets)
  replica_step = step_lib.make_replica_step(
      exp.model, exp.optimizer, train_input, global_batch_size=t.batch_size,
      seed=t.seed, clip_grad_norm=t.clip_grad_norm,
      loss_scaling=precision.needs_loss_scaling(t.precision))
  keys = ('loss', 'grad_norm') + tuple(exp.model.measurement_keys)
  if precision.needs_loss_scaling(t.precision):
    keys += ('skipped', 'loss_scale')
  if prefetch_noise is None:
    prefetch_noise = t.prefetch_noise and jit_compile(exp)
  shared_noise_fn = (step_lib.make_shared_noise_fn(exp.model, seed=t.seed,
                                                   train_input=train_input)
                     if prefetch_noise else None)
  after_step = None
  if exp.average is not None:
    variables = exp.model.trainable_variables
    after_step = lambda: exp.average.update(variables)
  train_loop = loop_lib.TrainLoop(
      replica_step, train_input, strategy=strategy, step_counter=exp.step,
      measurement_keys=keys, jit_compile=jit_compile(exp), stop_requested=stop_requested,
      agree_on_stop=distribute.is_multi_worker(strategy), shared_noise_fn=shared_noise_fn,
      after_step=after_step, after_step_every=t.ema_every)
  return train_loop, train_input.iterator(int(exp.step.numpy()))


def train(config, strategy, *, log=print, data=None, handle_signals=True):
  """Trains to `config.train.train_steps` (resuming from model_dir) and evaluates.

  SIGTERM (what schedulers send before preempting a job) stops training at the next
  step boundary; a checkpoint is saved there and `preemption.Preempted` is raised
  (exit code `preemption.EXIT_PREEMPTED`); rerunning the same command resumes.
  Under MultiWorkerMirroredStrategy only the chief writes logs, summaries, figures
  and metrics.json; every worker saves (a collective), the others into a temporary
  dir removed at the end.

  Args:
    handle_signals: install the SIGTERM watcher (main thread only).

  Returns:
    The final metrics dict (also written to model_dir/metrics.json).

  Raises:
    NonFiniteLossError: naming the step; the last checkpoint is left intact.
    preemption.Preempted: after saving, on SIGTERM.
  """
  exp = build(config, strategy, data=data)
  if not exp.is_chief:
    log = lambda *args, **kwargs: None
  watcher = preemption.PreemptionWatcher(log=log) if handle_signals else None
  try:
    if watcher is not None:
      watcher.start()
    return _train(exp, log=log, watcher=watcher)
  finally:
    if watcher is not None:
      watcher.stop()
    if exp.worker_dir:
      distribute.cleanup_worker_dir(exp.worker_dir, strategy)


def _train(exp, *, log, watcher):
  config, strategy = exp.config, exp.strategy
  t = config.train
  step = exp.step
  start = int(step.numpy())
  if start:
    log(f'Resuming from {exp.manager.latest_checkpoint} at step {start}.')
  if start >= t.train_steps:
    log(f'Already at step {start} >= --train_steps={t.train_steps}; evaluating only.')
  train_loop, iterator = make_train_loop(
      exp, stop_requested=None if watcher is None else watcher.stop_requested)
  writers = summaries.Writers(t.model_dir, enabled=exp.is_chief)
  writers.text('config', config_lib.to_dict(config), step=start)
  log(f'Training {config.model} on {exp.task.name} ({exp.task.num_train} examples, '
      f'{exp.task.source}): steps {start} -> {t.train_steps}, global batch {t.batch_size} '
      f'on {strategy.num_replicas_in_sync} replica(s), {t.steps_per_loop} steps per call, '
      f'XLA {"on" if jit_compile(exp) else "off"}; model dir {t.model_dir}')
  if t.jit_compile is not False and not distribute.supports_per_replica_jit(strategy):
    log('Note: XLA is off: XLA cannot compile the all-reduce of several replicas on '
        'CPU (logical CPU devices, or workers without GPUs); it can on GPUs.')
  elif t.jit_compile is None and _plain_step_is_faster(exp):
    log('Note: the training step runs without XLA: this model trains faster so on a '
        'CPU (the evaluation still uses XLA). --jit_compile forces it on.')

  current = start
  timed_steps, timed_seconds = 0, 0.0
  profiling = False
  while current < t.train_steps:
    n = min(t.steps_per_loop - current % t.steps_per_loop, t.train_steps - current)
    if t.profile_steps and not profiling and t.profile_steps[0] <= current < t.profile_steps[1]:
      tf.profiler.experimental.start(os.path.join(t.model_dir, 'profile'))
      profiling = True
    tic = time.perf_counter()
    means, done, bad_step = train_loop(iterator, tf.constant(n, tf.int64))
    means = {k: float(v) for k, v in means.items()}  # host sync
    seconds = time.perf_counter() - tic
    if profiling and (current + n >= t.profile_steps[1]):
      tf.profiler.experimental.stop()
      profiling = False
    if int(bad_step) >= 0:
      last = exp.manager.latest_checkpoint or 'none yet'
      raise errors.NonFiniteLossError(
          f'The loss became non-finite ({means["loss"]}) at step {int(bad_step)}; training '
          f'stopped and nothing from this step was saved. The last good checkpoint is '
          f'{last}. Fix: lower --learning_rate, set --clip_grad_norm, or check the data.')
    new = int(step.numpy())
    if watcher is not None and watcher.requested and int(done) < n:
      if new != current + int(done):
        raise RuntimeError(f'step counter moved from {current} to {new}, expected '
                           f'+{int(done)}')
      path = _save_if_finite(exp, new)
      writers.flush()
      log(f'Preempted ({watcher.reason}): saved {path} at step {new}; exiting with code '
          f'{preemption.EXIT_PREEMPTED}. Rerun the same command to resume.')
      raise preemption.Preempted(new, path)
    if new != current + n or int(done) != n:
      raise RuntimeError(f'step counter moved from {current} to {new}, expected +{n}')
    current = new
    if current - n > start:  # the first call includes tracing and compilation
      timed_steps += n
      timed_seconds += seconds
    rate = n / seconds
    ex_rate = rate * t.batch_size
    eta = (t.train_steps - current) / (timed_steps / timed_seconds if timed_steps else rate)
    lr = float(tf_keras.backend.get_value(
        precision.inner_optimizer(exp.optimizer).learning_rate))
    extra = {}
    if 'skipped' in means:  # float16 loss scaling: steps skipped in this call
      extra['skipped_steps'] = round(means.pop('skipped') * n)
    writers.scalars('train', {**means, **extra, 'learning_rate': lr,
                              'steps_per_sec': rate, 'examples_per_sec': ex_rate}, current)
    shown = '  '.join(f'{k} {means[k]:.4g}' for k in exp.model.measurement_keys)
    if extra:
      shown += (f'  loss_scale {means["loss_scale"]:g} skipped {extra["skipped_steps"]}')
    log(f'step {current:>7d}/{t.train_steps}  loss {means["loss"]:.4g}  {shown}  '
        f'{ex_rate:,.0f} ex/s  eta {_fmt_eta(eta)}')
    if current % t.checkpoint_every == 0 or current == t.train_steps:
      _save_if_finite(exp, current)
    if current % t.eval_every == 0 and current < t.train_steps:
      ev = evaluate(exp, final=False)
      pop_images(exp, ev, writers, current)
      writers.scalars('eval', _scalars(ev), current)
      write_summaries(exp, writers, current)
      log(f'eval @ {current}: {exp.module.summary_line(ev)}')
  if profiling:
    tf.profiler.experimental.stop()

  writers.flush()
  if watcher is not None:
    # The final checkpoint is on disk and the evaluation writes nothing until it
    # ends: a SIGTERM from here on exits at once (75), and the rerun evaluates only.
    watcher.exit_on_request(f'the final evaluation was cut short; checkpoint '
                            f'{exp.manager.latest_checkpoint} (step {current}) is saved, '
                            f'and rerunning the same command only evaluates.')
  log(f'Final evaluation on {exp.task.test_images.shape[0]} test examples...')
  metrics = evaluate(exp, final=True)
  image_paths = pop_images(exp, metrics, writers, current)
  per_example_path = pop_per_example(exp, metrics, current)
  metrics.update({'step': current, 'dataset': exp.task.name, 'model': config.model})
  if timed_steps:
    metrics['train_examples_per_sec'] = timed_steps * t.batch_size / timed_seconds
  writers.scalars('eval', _scalars(metrics), current)
  write_summaries(exp, writers, current)
  writers.flush()
  if exp.is_chief:
    write_metrics(t.model_dir, metrics)
  log(exp.module.summary_line(metrics))
  if image_paths:
    log('Figures: ' + ', '.join(image_paths))
  per_example_note = (f', {os.path.basename(per_example_path)} (compare runs with '
                      f'bin/compare.py)' if per_example_path else '')
  log(f'Outputs in {t.model_dir}: checkpoints/, {METRICS_FILE}{per_example_note}, '
      f'TensorBoard events. View with: tensorboard --logdir {t.model_dir}')
  return metrics
