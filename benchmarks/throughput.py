"""Training throughput of the default VAE: the engine against simpler loops.

Measures examples per second of one optimizer step of the default VAE (MLP encoder
784-512-256, 32-d diagonal posterior, mirrored decoder, Bernoulli likelihood,
analytic KL) for these variants, interleaved round-robin in one process:

  engine, engine_xla        the engine's own objects, built as `controller.train`
                            builds them (in-memory input, `TrainLoop`), XLA off/on;
  engine_xla_inline         engine_xla drawing the binarization noise inside the
                            step instead of one step ahead (--noprefetch_noise);
  engine_xla_ema(1)         engine_xla that also keeps the weight average
                            (--ema_decay=0.999, engine/averaging.py), updated
                            every 10 steps (the default --ema_every) or every step;
  eager                     a Python loop of eager steps (no tf.function);
  tf_function(_xla)         one tf.function call per step, XLA off/on;
  keras_spe{1,50}(_xla)     tf_keras `Model.fit` with steps_per_execution 1 or 50,
                            XLA off/on.

All variants compute the same loss (`VAE.loss_terms` reduced by
`engine.objectives.replica_loss`) and apply Adam. The non-engine variants read
binarized images from a tf.data pipeline. Every variant is burnt in (tracing,
compilation and some steps) before it is timed; every timed chunk ends with a host
sync, and examples are counted from the step counter.

The script also measures the machine's peak float32 matmul rate and reports the
engine's FLOP rate against it (training FLOPs per example = 3 x forward FLOPs of
the dense layers). `--batch_sizes` adds engine-only rows at other batch sizes.
Last (`--step_parts`, on by default), it times the parts of the XLA step at
--batch_size, each as its own program: the forward pass, forward and backward,
the Adam update alone, the whole step, and a pass over the weights that shows
how fast this machine moves memory (the Adam update is bound by it).

Usage (from the repository root):
  .venv/bin/python benchmarks/throughput.py
  .venv/bin/python benchmarks/throughput.py --dataset=synthetic --rounds=1 \
      --steps=100 --burn_in_steps=20
"""
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import numpy as np
import tensorflow as tf
import tf_keras

from benchmarks import common
from engine import config as config_lib
from engine import controller
from engine import datasets
from engine import distribute
from engine import inputs
from engine import loop as loop_lib
from engine import objectives
from engine import sampling
from engine import step as step_lib
import models
from models import vae as vae_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

ALL_VARIANTS = ('engine', 'engine_xla', 'engine_xla_inline', 'engine_xla_ema',
                'engine_xla_ema1', 'eager', 'tf_function', 'tf_function_xla',
                'keras_spe1', 'keras_spe1_xla', 'keras_spe50', 'keras_spe50_xla')

FLAGS = flags.FLAGS
flags.DEFINE_enum('dataset', 'fashion_mnist', ['fashion_mnist', 'synthetic'],
                  'Training images: Fashion-MNIST (60,000) or the synthetic set.')
flags.DEFINE_integer('synthetic_train_size', 8192,
                     'Training examples of --dataset=synthetic.')
flags.DEFINE_string('data_dir', None, 'Directory of the IDX files (optional).')
flags.DEFINE_integer('batch_size', 128, 'Global batch size of every variant.')
flags.DEFINE_list('batch_sizes', ['512', '2048'],
                  'Extra batch sizes for the engine variants only (empty: none). '
                  'Their timed steps are scaled so a round covers about as many '
                  'examples as --steps at --batch_size.')
flags.DEFINE_list('variants', list(ALL_VARIANTS), 'Variants to run, from: '
                  + ', '.join(ALL_VARIANTS) + '.')
flags.DEFINE_integer('rounds', 5, 'Round-robin rounds; the median per variant is reported.')
flags.DEFINE_integer('steps', 200, 'Timed steps per round of each compiled variant.')
flags.DEFINE_integer('eager_steps', 30, 'Timed steps per round of the eager loop.')
flags.DEFINE_integer('burn_in_steps', 200, 'Untimed steps of each compiled variant '
                     'before timing; the first call traces and compiles.')
flags.DEFINE_integer('eager_burn_in_steps', 50, 'Untimed steps of the eager loop.')
flags.DEFINE_integer('steps_per_loop', 500, "The engine's steps per TrainLoop call "
                     '(TrainConfig default: 500).')
flags.DEFINE_integer('matmul_size', 2048, 'Side of the square matmul for the peak rate.')
flags.DEFINE_integer('matmul_trials', 10, 'Timed matmuls per peak measurement; the peak '
                     'is measured before the burn-in and after every round, and the '
                     'best of all counts (other processes may share the CPU).')
flags.DEFINE_integer('seed', 0, 'Seed of initialisation, data order and sampling.')
flags.DEFINE_bool('step_parts', True, 'Also time the parts of the XLA step at '
                  '--batch_size (forward, backward, Adam) and a memory reference.')

# --------------------------------------------------------------------------- FLOPs


def dense_forward_flops(model):
  """2 * sum(in * out) over the Dense layers of the encoder and decoder (one example)."""
  total = 0
  for net in (model.encoder, model.decoder):
    for layer in net.layers:
      if isinstance(layer, tf_keras.layers.Dense):
        fan_in, fan_out = layer.kernel.shape
        total += 2 * int(fan_in) * int(fan_out)
  return total


def measure_peak_matmul(size, trials):
  """Best float32 FLOP/s of a [size, size] @ [size, size] matmul in a tf.function."""
  a = tf.random.stateless_normal([size, size], seed=[1, 2])
  b = tf.random.stateless_normal([size, size], seed=[3, 4])

  @tf.function
  def matmul(a, b):
    return tf.reduce_sum(tf.matmul(a, b))

  matmul(a, b).numpy()  # trace and warm up
  best = float('inf')
  for _ in range(trials):
    tic = time.perf_counter()
    matmul(a, b).numpy()
    best = min(best, time.perf_counter() - tic)
  return 2.0 * size ** 3 / best


def measure_loop_overhead(data, batch_size, keys, *, steps=20000):
  """Microseconds per step of the engine's compiled loop around an empty step.

  The same `TrainLoop` as the engine variants (in-memory input and its epoch
  permutation, the stop flag read every step, the step counter, the measurement
  sums and the finiteness check), with an XLA replica step that does no training:
  what the engine adds per step to the model's own step.
  """
  strategy = distribute.make_strategy('default')
  train_input = inputs.make_train_input(
      'in_memory', data.train_images, strategy=strategy, global_batch_size=batch_size,
      seed=FLAGS.seed, binarize=True)
  counter = tf.Variable(0, dtype=tf.int64)
  stop = tf.Variable(False)

  def empty_step(indices, step, measure):
    del measure
    value = tf.cast(tf.reduce_sum(indices[:1]) + tf.cast(step, tf.int32) * 0, tf.float32)
    return {k: value for k in keys}

  train_loop = loop_lib.TrainLoop(empty_step, train_input, strategy=strategy,
                                  step_counter=counter, measurement_keys=keys,
                                  jit_compile=True, stop_requested=stop)
  float(train_loop(None, tf.constant(500, tf.int64))[0]['loss'])  # trace and compile
  best = float('inf')
  for _ in range(3):
    tic = time.perf_counter()
    float(train_loop(None, tf.constant(steps, tf.int64))[0]['loss'])
    best = min(best, (time.perf_counter() - tic) / steps)
  return best * 1e6


def measure_step_parts(data, batch_size, *, calls, rounds, engine=None):
  """Microseconds per call of the parts of the XLA training step, and a memory reference.

  Each part is its own XLA program, called `calls` times in a `tf.while_loop` inside
  one tf.function (as `TrainLoop` calls its step), the parts interleaved for `rounds`
  rounds; returns {part: [us per call, one per round]} and the bytes the reference
  and the Adam update move per call. On one fixed batch of the benchmark's relu VAE
  with tf_keras Adam, like the variants:

    forward           the loss (`negative_elbo_loss`);
    forward+backward  the loss and its gradients, written to variables;
    adam              the Adam update from those gradient variables;
    full step         gradients and Adam in one program (the engine's replica step
                      without its input, noise prefetch and measurements);
    w += 0 * g        one read of the weights and of the gradients and one write of
                      the weights: what this machine's memory moves per call;
    engine step       `engine` (an engine variant, set up), `calls` steps of its
                      TrainLoop per round, interleaved with the parts: what the
                      engine adds to the full step (input, binarization noise,
                      measurements, loop), measured in the same rounds.
  """
  model = make_vae(data, FLAGS.seed)
  variables = model.trainable_variables
  optimizer = tf_keras.optimizers.Adam(learning_rate=1e-3)
  optimizer.build(variables)
  grads = [tf.Variable(tf.zeros_like(v), trainable=False) for v in variables]
  zero = tf.Variable(0.0, trainable=False)
  step = tf.Variable(0, dtype=tf.int64, trainable=False)
  rng = np.random.default_rng(FLAGS.seed)
  images = data.train_images[:batch_size].astype(np.float32) / 255.0
  x = tf.constant((rng.random(images.shape) < images).astype(np.float32))

  def forward():
    return negative_elbo_loss(model, x, step, seed=FLAGS.seed, batch_size=batch_size)

  def gradients():
    with tf.GradientTape() as tape:
      loss = forward()
    return loss, tape.gradient(loss, variables)

  def forward_backward():
    loss, gs = gradients()
    for buffer, g in zip(grads, gs):
      buffer.assign(g)
    return loss

  def adam():
    optimizer.apply_gradients(zip([g.read_value() for g in grads], variables),
                              skip_gradients_aggregation=True)
    return tf.constant(0.0)

  def full_step():
    loss, gs = gradients()
    optimizer.apply_gradients(zip(gs, variables), skip_gradients_aggregation=True)
    step.assign_add(1)
    return loss

  def reference():
    for v, g in zip(variables, grads):
      v.assign_add(zero * g)
    return tf.constant(0.0)

  parts = {'forward': forward, 'forward+backward': forward_backward, 'adam': adam,
           'full step': full_step, 'w += 0 * g': reference}

  def looped(fn):
    compiled = tf.function(fn, jit_compile=True, autograph=False)

    @tf.function(autograph=False)
    def run():
      return tf.while_loop(lambda i, total: i < calls,
                           lambda i, total: (i + 1, total + compiled()),
                           (tf.constant(0), tf.constant(0.0)))[1]
    return run

  runs = {name: looped(fn) for name, fn in parts.items()}
  for run in runs.values():
    float(run())  # trace and compile
  if engine is not None:
    runs['engine step'] = lambda: engine.run(calls)  # host-synced, returns the steps
  times = {name: [] for name in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      tic = time.perf_counter()
      float(run())
      times[name].append(1e6 * (time.perf_counter() - tic) / calls)
  weight_bytes = sum(4 * int(np.prod(v.shape)) for v in variables)
  # Adam reads the weights, the gradients and both moments and writes back three.
  moved = {'w += 0 * g': 3 * weight_bytes, 'adam': 7 * weight_bytes}
  return times, moved


# --------------------------------------------------------------------------- inputs


def make_binarized_dataset(images_uint8, batch_size, seed):
  """tf.data: shuffled, repeated batches of dynamically binarized float images.

  tf.data autotuning is off (fixed parallelism instead): with it on, every
  `Model.fit` call here ended with a wait for the autotuner's next wake-up (its
  period doubles from 10 ms), which made each short fit last a multiple of about
  2.56 s. The pipeline alone runs far faster than any training step here.
  """
  n = int(images_uint8.shape[0])
  images = tf.constant(images_uint8)

  def load(indices):
    x = tf.cast(tf.gather(images, indices), tf.float32) / 255.0
    return tf.cast(tf.random.uniform(tf.shape(x)) < x, tf.float32)

  ds = tf.data.Dataset.range(n).shuffle(n, seed=seed, reshuffle_each_iteration=True)
  ds = ds.repeat().batch(batch_size, drop_remainder=True)
  ds = ds.map(load, num_parallel_calls=2).prefetch(2)
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options)


# The benchmark's network: the MLP VAE 784-512-256-z32 with relu units, as every
# figure in RESULTS.md was measured (gated units, the MLP's default since session
# 23, would change the FLOP count that dense_forward_flops makes).
VAE_OPTIONS = vae_lib.VAEConfig(gated_units=False)


def make_vae(data, seed):
  """The benchmark's relu VAE, initialised as `controller.build` initialises it."""
  pixel_mean = data.train_images.astype(np.float32).mean(axis=0) / 255.0
  return models.get('vae').build(VAE_OPTIONS, image_shape=data.image_shape,
                                 pixel_mean=pixel_mean, seed=seed)


def negative_elbo_loss(model, x, step, *, seed, batch_size):
  """The engine's training loss for one batch (one replica, KL weight 1)."""
  noise = sampling.Noise(step_lib.step_noise_seed(seed, step))
  per_example, regularization, _ = model.loss_terms(
      x, noise=noise, kl_weight=tf.constant(1.0))
  return objectives.replica_loss(per_example, regularization,
                                 global_batch_size=batch_size, num_replicas=1)


# --------------------------------------------------------------------------- variants


class Variant:
  """One way of training; `run(n)` trains about n steps and returns steps done."""

  engine = False

  def __init__(self, name, batch_size):
    self.name = name
    self.batch_size = batch_size

  def setup(self):
    """Builds the model, optimizer and step function (untimed)."""

  def run(self, num_steps):
    """Trains, ends with a host sync and returns the number of steps run."""
    raise NotImplementedError


class EngineVariant(Variant):
  """`controller.build` + in-memory input + `make_replica_step` + `TrainLoop`."""

  engine = True

  def __init__(self, name, batch_size, *, data, jit_compile, steps_per_loop, seed,
               root_dir, prefetch_noise=True, ema_decay=0.0, ema_every=10):
    super().__init__(name, batch_size)
    self._prefetch = prefetch_noise
    self._ema_decay = ema_decay
    self._ema_every = ema_every
    self._data = data
    self._jit = jit_compile
    self._steps_per_loop = steps_per_loop
    self._seed = seed
    self._model_dir = os.path.join(root_dir, f'{name}_b{batch_size}')

  def setup(self):
    data_config = config_lib.DataConfig(
        dataset=self._data.name, data_dir=FLAGS.data_dir, input_pipeline='in_memory',
        synthetic_train_size=max(self._data.num_train, 1))
    train_config = config_lib.TrainConfig(
        model_dir=self._model_dir, batch_size=self.batch_size,
        steps_per_loop=self._steps_per_loop, eval_every=self._steps_per_loop,
        checkpoint_every=self._steps_per_loop, jit_compile=self._jit, seed=self._seed,
        ema_decay=self._ema_decay, ema_every=self._ema_every)
    config = config_lib.ExperimentConfig(model='vae', model_options=VAE_OPTIONS,
                                         data=data_config, train=train_config)
    strategy = distribute.make_strategy('default')
    exp = controller.build(config, strategy, data=self._data)
    self.model = exp.model
    self._step = exp.step
    self._loop, self._iterator = controller.make_train_loop(
        exp, prefetch_noise=None if self._prefetch else False)

  def tracing_count(self):
    """How often the engine's compiled loop has been traced (1 = never retraced)."""
    return self._loop._loop.experimental_get_tracing_count()  # pylint: disable=protected-access

  def run(self, num_steps):
    start = int(self._step.numpy())
    remaining = num_steps
    while remaining > 0:
      n = min(self._steps_per_loop, remaining)
      means, done, bad_step = self._loop(self._iterator, tf.constant(n, tf.int64))
      float(means['loss'].numpy())  # host sync, as controller.train does per call
      if int(bad_step) >= 0:
        raise RuntimeError(f'{self.name}: non-finite loss at step {int(bad_step)}')
      remaining -= int(done)
    return int(self._step.numpy()) - start


class StepFunctionVariant(Variant):
  """A Python loop over tf.data batches: eager steps, or one tf.function per step."""

  def __init__(self, name, batch_size, *, data, mode, seed):
    super().__init__(name, batch_size)
    self._data = data
    self._mode = mode  # 'eager', 'function' or 'function_xla'
    self._seed = seed

  def setup(self):
    self.model = make_vae(self._data, self._seed)
    self._optimizer = tf_keras.optimizers.Adam(learning_rate=1e-3)
    self._optimizer.build(self.model.trainable_variables)
    self._step = tf.Variable(0, dtype=tf.int64, trainable=False)
    model, optimizer, counter = self.model, self._optimizer, self._step
    seed, batch_size = self._seed, self.batch_size

    def train_step(x):
      step = counter.read_value()
      with tf.GradientTape() as tape:
        loss = negative_elbo_loss(model, x, step, seed=seed, batch_size=batch_size)
      variables = model.trainable_variables
      grads = tape.gradient(loss, variables)
      optimizer.apply_gradients(zip(grads, variables))
      counter.assign_add(1)
      return loss

    if self._mode == 'eager':
      self._train_step = train_step
    else:
      self._train_step = tf.function(train_step, jit_compile=self._mode == 'function_xla')
    self._iterator = iter(make_binarized_dataset(self._data.train_images, batch_size,
                                                 seed))

  def run(self, num_steps):
    start = int(self._step.numpy())
    loss = None
    for _ in range(num_steps):
      loss = self._train_step(next(self._iterator))
    if loss is not None:
      float(loss.numpy())  # host sync
    return int(self._step.numpy()) - start


class KerasELBO(tf_keras.Model):
  """A tf_keras.Model around the same VAE whose train_step minimises the negative ELBO."""

  def __init__(self, vae, *, batch_size, seed):
    super().__init__(name='keras_elbo')
    self.vae = vae
    self._batch_size = batch_size
    self._seed = seed

  def call(self, inputs_, training=False):
    del training
    seed = step_lib.step_noise_seed(self._seed, 0)
    return self.vae.reconstruct(inputs_, seed)

  def train_step(self, data):
    step = self.optimizer.iterations
    with tf.GradientTape() as tape:
      loss = negative_elbo_loss(self.vae, data, step, seed=self._seed,
                                batch_size=self._batch_size)
    variables = self.vae.trainable_variables
    grads = tape.gradient(loss, variables)
    self.optimizer.apply_gradients(zip(grads, variables))
    return {'loss': loss}


class KerasFitVariant(Variant):
  """tf_keras Model.fit with steps_per_execution and jit_compile."""

  def __init__(self, name, batch_size, *, data, steps_per_execution, jit_compile, seed):
    super().__init__(name, batch_size)
    self._data = data
    self._spe = steps_per_execution
    self._jit = jit_compile
    self._seed = seed

  def setup(self):
    self.model = make_vae(self._data, self._seed)
    self._keras = KerasELBO(self.model, batch_size=self.batch_size, seed=self._seed)
    self._keras.compile(optimizer=tf_keras.optimizers.Adam(learning_rate=1e-3),
                        steps_per_execution=self._spe, jit_compile=self._jit)
    self._dataset = make_binarized_dataset(self._data.train_images, self.batch_size,
                                           self._seed)

  def run(self, num_steps):
    num_steps = -(-num_steps // self._spe) * self._spe  # whole executions
    start = int(self._keras.optimizer.iterations.numpy())
    history = self._keras.fit(self._dataset, epochs=1, steps_per_epoch=num_steps,
                              verbose=0)
    del history
    return int(self._keras.optimizer.iterations.numpy()) - start  # host sync


def make_variants(names, data, batch_sizes, root_dir):
  """The main variants at --batch_size, then engine variants at the sweep sizes."""
  seed, b = FLAGS.seed, FLAGS.batch_size
  out = []
  for name in names:
    if name in ('engine', 'engine_xla', 'engine_xla_inline', 'engine_xla_ema',
                'engine_xla_ema1'):
      # engine_xla_inline: the binarization noise drawn inside the step, not one step
      # ahead beside it (--prefetch_noise=false), to show what prefetching buys.
      # engine_xla_ema(1): engine_xla that also keeps the weight average
      # (--ema_decay), updated every 10 steps (every step).
      out.append(EngineVariant(name, b, data=data, jit_compile=name != 'engine',
                               steps_per_loop=FLAGS.steps_per_loop, seed=seed,
                               root_dir=root_dir,
                               prefetch_noise=name != 'engine_xla_inline',
                               ema_decay=0.999 if 'ema' in name else 0.0,
                               ema_every=1 if name == 'engine_xla_ema1' else 10))
    elif name == 'eager':
      out.append(StepFunctionVariant(name, b, data=data, mode='eager', seed=seed))
    elif name in ('tf_function', 'tf_function_xla'):
      mode = 'function_xla' if name.endswith('_xla') else 'function'
      out.append(StepFunctionVariant(name, b, data=data, mode=mode, seed=seed))
    else:
      spe = 50 if name.startswith('keras_spe50') else 1
      out.append(KerasFitVariant(name, b, data=data, steps_per_execution=spe,
                                 jit_compile=name.endswith('_xla'), seed=seed))
  for size in batch_sizes:
    if size == b:
      continue
    for name in ('engine', 'engine_xla'):
      if name in names:
        out.append(EngineVariant(name, size, data=data, jit_compile=name == 'engine_xla',
                                 steps_per_loop=FLAGS.steps_per_loop, seed=seed,
                                 root_dir=root_dir))
  return out


def steps_for(variant, *, timed):
  """Steps per round (timed) or of burn-in, scaled so the examples stay about constant."""
  if variant.name == 'eager':
    base = FLAGS.eager_steps if timed else FLAGS.eager_burn_in_steps
  else:
    base = FLAGS.steps if timed else FLAGS.burn_in_steps
  return max(1, round(base * FLAGS.batch_size / variant.batch_size))


# --------------------------------------------------------------------------- report


def cpu_model():
  """The CPU model name from lscpu (or platform), for the report."""
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
      if line.startswith('Model name:'):
        return line.split(':', 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  return platform.processor() or 'unknown'


def format_table(header, rows):
  """A GitHub-markdown table with right-aligned numeric columns."""
  widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
  def line(cells):
    return '| ' + ' | '.join(
        str(c).ljust(w) if i == 0 else str(c).rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths))) + ' |'
  sep = '|' + '|'.join('-' * (w + 1) + ('-' if i == 0 else ':')
                       for i, w in enumerate(widths)) + '|'
  return '\n'.join([line(header), sep] + [line(r) for r in rows])


def main(argv):
  del argv
  unknown = [v for v in FLAGS.variants if v not in ALL_VARIANTS]
  if unknown:
    raise app.UsageError(f'--variants: unknown {unknown}; choose from {ALL_VARIANTS}.')
  names = [v for v in ALL_VARIANTS if v in FLAGS.variants]
  batch_sizes = [int(s) for s in FLAGS.batch_sizes if s.strip()]
  wall_start = time.perf_counter()

  common.configure_xla()  # before anything compiles: fit and the engine alike
  common.quiet_retracing_warning()  # one tf.function per step part, each traced once
  print(f'date: {datetime.datetime.now().isoformat(timespec="seconds")}')
  print(f'machine: {os.cpu_count()} CPU(s) ({cpu_model()}), GPUs: '
        f'{len(tf.config.list_physical_devices("GPU"))}; TF {tf.__version__}, '
        f'tf_keras {tf_keras.__version__}')
  print('command: ' + ' '.join([os.path.relpath(sys.executable, os.getcwd())]
                               + [os.path.relpath(sys.argv[0], os.getcwd())]
                               + sys.argv[1:]))

  data = datasets.load_dataset(FLAGS.dataset, data_dir=FLAGS.data_dir, seed=FLAGS.seed,
                               num_train=FLAGS.synthetic_train_size)
  print(f'data: {data.name} ({data.num_train} training images {data.image_shape}, '
        f'{data.source})')

  peaks = [measure_peak_matmul(FLAGS.matmul_size, FLAGS.matmul_trials)]
  print(f'peak float32 matmul ({FLAGS.matmul_size}^2, best of {FLAGS.matmul_trials}): '
        f'{peaks[0] / 1e9:.1f} GFLOP/s')

  with tempfile.TemporaryDirectory(prefix='elbo_throughput_') as root_dir:
    variants = make_variants(names, data, batch_sizes, root_dir)
    for v in variants:
      tic = time.perf_counter()
      v.setup()
      steps = v.run(steps_for(v, timed=False))
      print(f'burn-in {v.name:<16s} batch {v.batch_size:>5d}: {steps} steps incl. '
            f'build/trace/compile in {time.perf_counter() - tic:.1f} s')
    flops_per_example = 3 * dense_forward_flops(variants[0].model)
    print(f'training FLOPs per example (3 x dense forward): {flops_per_example:,}')

    rates = {id(v): [] for v in variants}
    for r in range(FLAGS.rounds):
      for v in variants:
        n = steps_for(v, timed=True)
        tic = time.perf_counter()
        steps = v.run(n)
        seconds = time.perf_counter() - tic
        rates[id(v)].append(steps * v.batch_size / seconds)
      peaks.append(measure_peak_matmul(FLAGS.matmul_size, FLAGS.matmul_trials))
      print(f'round {r + 1}/{FLAGS.rounds}: ' + ', '.join(
          f'{v.name}@{v.batch_size} {rates[id(v)][-1]:,.0f}' for v in variants)
            + f' ex/s; matmul {peaks[-1] / 1e9:.1f} GFLOP/s')
    for v in variants:
      if v.engine:
        print(f'{v.name}@{v.batch_size}: TrainLoop traced {v.tracing_count()} time(s) '
              f'in all (burn-in + rounds)')

  peak = max(peaks)
  print(f'peak float32 matmul, best of all measurements: {peak / 1e9:.1f} GFLOP/s '
        f'(each: {", ".join(f"{p / 1e9:.1f}" for p in peaks)})')

  median = {id(v): statistics.median(rates[id(v)]) for v in variants}
  main_rows = [v for v in variants if v.batch_size == FLAGS.batch_size]
  engine_best = max((median[id(v)] for v in main_rows if v.engine), default=None)

  def flop_cells(v):
    gflops = median[id(v)] * flops_per_example / 1e9
    return f'{gflops:.1f}', f'{100 * gflops * 1e9 / peak:.1f}%'

  header = ['variant', 'examples/sec (median)', 'min..max over rounds',
            'ratio to engine', 'GFLOP/s', '% of peak']
  rows = []
  for v in main_rows:
    lo, hi = min(rates[id(v)]), max(rates[id(v)])
    ratio = f'{median[id(v)] / engine_best:.2f}' if engine_best else 'n/a'
    gf, pct = flop_cells(v) if v.engine else ('', '')
    rows.append([v.name, f'{median[id(v)]:,.0f}', f'{lo:,.0f}..{hi:,.0f}', ratio, gf, pct])
  print()
  print(f'Throughput, batch {FLAGS.batch_size}, {FLAGS.rounds} rounds '
        f'(ratio to the best engine variant; peak {peak / 1e9:.1f} GFLOP/s):')
  print(format_table(header, rows))

  sweep = sorted((v for v in variants if v.engine),
                 key=lambda v: (v.name, v.batch_size))
  if len({v.batch_size for v in sweep}) > 1:
    rows = []
    for v in sweep:
      gf, pct = flop_cells(v)
      rows.append([v.name, v.batch_size, f'{median[id(v)]:,.0f}', gf, pct])
    print()
    print('Engine batch-size sweep:')
    print(format_table(['variant', 'batch', 'examples/sec (median)', 'GFLOP/s',
                        '% of peak'], rows))
  engine_xla = [v for v in main_rows if v.name == 'engine_xla']
  if engine_xla:
    keys = ('loss', 'grad_norm') + tuple(engine_xla[0].model.measurement_keys)
    overhead = measure_loop_overhead(data, FLAGS.batch_size, keys)
    step_us = 1e6 * FLAGS.batch_size / median[id(engine_xla[0])]
    print()
    print(f'engine loop overhead (TrainLoop around an empty XLA step, best of 3 x 20,000 '
          f'steps): {overhead:.1f} us/step, {100 * overhead / step_us:.1f}% of '
          f"engine_xla's {step_us:.0f} us step at batch {FLAGS.batch_size}")
  if FLAGS.step_parts:
    times, moved = measure_step_parts(data, FLAGS.batch_size, calls=FLAGS.steps,
                                      rounds=FLAGS.rounds,
                                      engine=engine_xla[0] if engine_xla else None)
    full = statistics.median(times['full step'])
    rows = []
    for name, values in times.items():
      us = statistics.median(values)
      rate = f'{moved[name] / us / 1e3:.1f}' if name in moved else ''
      rows.append([name, f'{us:,.0f}', f'{min(values):,.0f}..{max(values):,.0f}',
                   f'{100 * us / full:.0f}%', rate])
    print()
    print(f'Parts of the XLA step at batch {FLAGS.batch_size} (each its own program, '
          f'{FLAGS.steps} calls per round, median of {FLAGS.rounds} rounds; GB/s for '
          f'the parts bound by memory):')
    print(format_table(['part', 'us per call (median)', 'min..max', 'of the full step',
                        'GB/s moved'], rows))
  print()
  print(f'total wall time: {time.perf_counter() - wall_start:.0f} s')


if __name__ == '__main__':
  app.run(main)
