"""Helpers shared by the BNN and scaling benchmarks (machine info, tables, runners).

Import after the repository root is on sys.path (each script puts it there):

  from benchmarks import common
"""
import ast
import dataclasses
import datetime
import logging
import os
import platform
import shlex
import statistics
import sys
import time

from absl import flags
import tensorflow as tf

from engine import config as config_lib
from engine import controller
from engine import datasets
from engine import errors
from engine import xla_cpu

flags.DEFINE_enum('xla_cpu_vector_width', 'auto', list(xla_cpu.VECTOR_WIDTHS),
                  "XLA:CPU's preferred vector width (engine/xla_cpu.py); auto: 512 on a "
                  'CPU with AVX-512. Applies to every variant of the run alike.')
flags.DEFINE_boolean('xla_cpu_ynn_fusions', True,
                     "XLA:CPU's YNNPACK fusions (XLA's default, as in bin/; "
                     'engine/xla_cpu.py). Applies to every variant of the run alike.')


# --------------------------------------------------------------------------- machine


def cpu_model():
  """The CPU model name from /proc/cpuinfo (or platform), for the report."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.lower().startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def num_cpus():
  """CPUs this process may run on (what `nproc` prints)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count()


def load_average():
  """The 1/5/15-minute load averages as a string (other jobs on the CPU show here)."""
  try:
    return '%.2f %.2f %.2f' % os.getloadavg()
  except OSError:
    return 'unknown'


def versions():
  import tensorflow_probability as tfp  # pylint: disable=g-import-not-at-top
  import tf_keras  # pylint: disable=g-import-not-at-top
  return f'TF {tf.__version__}, TFP {tfp.__version__}, tf_keras {tf_keras.__version__}'


def command_line():
  """The command that ran this script, as typed from the current directory."""
  exe = os.path.relpath(sys.executable, os.getcwd())
  script = os.path.relpath(sys.argv[0], os.getcwd())
  env = 'TF_CPP_MIN_LOG_LEVEL=' + os.environ.get('TF_CPP_MIN_LOG_LEVEL', '0')
  return ' '.join([env, shlex.quote(exe), shlex.quote(script)]
                  + [shlex.quote(a) for a in sys.argv[1:]])


def configure_xla():
  """Applies --xla_cpu_vector_width and --xla_cpu_ynn_fusions (before anything
  compiles) and prints XLA_FLAGS."""
  xla_cpu.configure(flags.FLAGS.xla_cpu_vector_width)
  xla_cpu.configure_ynn_fusions(flags.FLAGS.xla_cpu_ynn_fusions)
  print(f'XLA_FLAGS: {os.environ.get("XLA_FLAGS", "") or "(none)"}', flush=True)


def print_header():
  """Date, machine, versions, XLA_FLAGS and the command, first in every benchmark."""
  configure_xla()
  gpus = tf.config.list_physical_devices('GPU')
  print(f'date: {datetime.datetime.now().isoformat(timespec="seconds")}')
  print(f'machine: nproc {num_cpus()} ({cpu_model()}), GPUs: {len(gpus)}; '
        f'load average at start: {load_average()}')
  print(f'versions: Python {platform.python_version()}, {versions()}')
  print(f'command: {command_line()}', flush=True)


def quiet_retracing_warning():
  """Drops TF's "N out of the last N calls ... triggered tf.function retracing".

  Each runner has its own TrainLoop (its own tf.function), traced once; TF counts
  traces of the same method over all instances and warns. The scripts print each
  loop's own tracing count instead.
  """
  class _Filter(logging.Filter):

    def filter(self, record):
      return 'triggered tf.function retracing' not in record.getMessage()
  tf.get_logger().addFilter(_Filter())


# --------------------------------------------------------------------------- data


def load_data(name, *, data_dir=None, seed=0, synthetic_train_size=8192,
              synthetic_test_size=2048):
  """(ImageDataset, note): the named set, or the synthetic set with a note if it is missing."""
  try:
    data = datasets.load_dataset(name, data_dir=data_dir, seed=seed,
                                 num_train=synthetic_train_size,
                                 num_test=synthetic_test_size)
    return data, ''
  except errors.DataError as e:
    if name == 'synthetic':
      raise
    data = datasets.load_dataset('synthetic', seed=seed, num_train=synthetic_train_size,
                                 num_test=synthetic_test_size)
    first = str(e).splitlines()[0]
    return data, (f'NOTE: {name} is not available ({first}); using the SYNTHETIC set '
                  f'instead. Figures are not comparable with {name} ones.')


def describe_data(data):
  return (f'{data.name} ({data.num_train} training images {data.image_shape}, '
          f'{data.source})')


def data_config(data, data_dir=None):
  """The DataConfig that names `data` (passed pre-loaded to controller.build)."""
  return config_lib.DataConfig(
      dataset=data.name, data_dir=data_dir, input_pipeline='in_memory',
      synthetic_train_size=max(data.num_train, 1),
      synthetic_test_size=max(int(data.test_images.shape[0]), 1))


# --------------------------------------------------------------------------- timing


class EngineRunner:
  """The engine's compiled training loop for one ExperimentConfig.

  `setup()` runs `controller.build` (in the strategy's scope) and
  `controller.make_train_loop`, exactly as `controller.train` does; `run(n)` trains
  about n steps in calls of at most `steps_per_loop` steps, each ending with a host
  sync (as `controller.train` syncs once per call), and returns the steps done.
  """

  def __init__(self, name, config, strategy, data):
    self.name = name
    self.config = config
    self.strategy = strategy
    self.data = data
    self.batch_size = config.train.batch_size

  def setup(self):
    self.exp = controller.build(self.config, self.strategy, data=self.data)
    self.model = self.exp.model
    self._step = self.exp.step
    self._loop, self._iterator = controller.make_train_loop(self.exp)

  def tracing_count(self):
    return self._loop._loop.experimental_get_tracing_count()  # pylint: disable=protected-access

  def run(self, num_steps):
    start = int(self._step.numpy())
    remaining = num_steps
    per_call = self.config.train.steps_per_loop
    while remaining > 0:
      n = min(per_call, remaining)
      means, done, bad_step = self._loop(self._iterator, tf.constant(n, tf.int64))
      float(means['loss'].numpy())  # host sync
      if int(bad_step) >= 0:
        raise RuntimeError(f'{self.name}: non-finite loss at step {int(bad_step)}')
      remaining -= int(done)
    return int(self._step.numpy()) - start


def burn_in(runners, steps, log=print):
  """Builds, traces/compiles and runs `steps` untimed steps of every runner."""
  for r in runners:
    tic = time.perf_counter()
    r.setup()
    done = r.run(steps)
    log(f'burn-in {r.name:<28s}: {done} steps incl. build/trace/compile in '
        f'{time.perf_counter() - tic:.1f} s')


def interleaved_rates(runners, *, rounds, steps, log=print):
  """Examples/sec of every runner, round-robin: {runner.name: [rate per round]}."""
  rates = {r.name: [] for r in runners}
  for i in range(rounds):
    for r in runners:
      tic = time.perf_counter()
      done = r.run(steps)
      rates[r.name].append(done * r.batch_size / (time.perf_counter() - tic))
    log(f'round {i + 1}/{rounds}: ' + ', '.join(
        f'{r.name} {rates[r.name][-1]:,.0f}' for r in runners) + ' ex/s')
  return rates


def summarize(values):
  """(median, min, max) of a list of rates."""
  return statistics.median(values), min(values), max(values)


# --------------------------------------------------------------------------- report


def format_table(header, rows):
  """A GitHub-markdown table; the first column left-aligned, the others right-aligned."""
  rows = [[str(c) for c in r] for r in rows]
  header = [str(c) for c in header]
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

  def line(cells):
    return '| ' + ' | '.join(
        c.ljust(w) if i == 0 else c.rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths))) + ' |'
  sep = '|' + '|'.join('-' * (w + 1) + ('-' if i == 0 else ':')
                       for i, w in enumerate(widths)) + '|'
  return '\n'.join([line(header), sep] + [line(r) for r in rows])


# --------------------------------------------------------------------------- --define


def _parse_value(text):
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  return tuple(value) if isinstance(value, list) else value


def _split_top_level(body):
  """Splits at commas outside brackets: 'a:1,b:(1,2)' -> ['a:1', 'b:(1,2)']."""
  parts, depth, current = [], 0, ''
  for char in body:
    depth += char in '(['
    depth -= char in ')]'
    if char == ',' and depth == 0:
      parts.append(current)
      current = ''
    else:
      current += char
  return parts + [current]


def parse_defines(defines, options_cls, base):
  """{name: overrides} from --define NAME=FIELD:VALUE,FIELD:VALUE.

  Args:
    defines: the flag's values.
    options_cls: the model's options dataclass; FIELD must be one of its fields.
    base: the overrides every defined configuration starts from.
  """
  from absl import app  # pylint: disable=import-outside-toplevel
  fields = {f.name for f in dataclasses.fields(options_cls)}
  out = {}
  for item in defines:
    name, sep, body = item.partition('=')
    if not sep or not name:
      raise app.UsageError(f'--define={item!r}: expected NAME=FIELD:VALUE,...')
    overrides = dict(base)
    for part in filter(None, (p.strip() for p in _split_top_level(body))):
      key, sep, value = part.partition(':')
      if not sep or key not in fields:
        raise app.UsageError(f'--define={item!r}: {part!r} is not FIELD:VALUE with a '
                             f'{options_cls.__name__} field ({", ".join(sorted(fields))}).')
      overrides[key] = _parse_value(value)
    out[name] = overrides
  return out
