"""Training throughput against replicas and precision, for the VAE and the BNN.

Measures examples per second of the engine's compiled training loop
(`controller.build` + `controller.make_train_loop`, as `controller.train` runs it)
for the relu MLP VAE (`VAEConfig(gated_units=False)`, the default before gated
units were) and the flipout BNN MLP 784-400-400-10, at each
precision (float32, mixed_bfloat16, mixed_float16) and each replica count (1, 2, 4)
under MirroredStrategy: over GPUs where present, else over logical CPU devices
(`engine.distribute.set_logical_cpu_devices`). At 1 replica it also measures the
default strategy (no distribution), which gives the mirrored path's own overhead:
1 - rate(MirroredStrategy over one device) / rate(default strategy); target < 10%.

Logical devices must be configured before TensorFlow runs any op, and a process has
one device configuration, so each replica count runs in a subprocess of this script
(`--worker`), which prints its rates as JSON; this process collects them. Inside a
worker, every (model, precision, strategy) is burnt in (build, tracing, XLA
compilation, some steps), then timed round-robin; each cell is the median over
rounds. The global batch is fixed (default 128), so each of R replicas gets 128 / R.

Each measurement runs with XLA off and on (`--xla_modes`; the engine's default is
on). XLA cannot run MirroredStrategy over several logical CPU devices (the compiled
step runs on CPU:0 and may not touch replica variables placed on CPU:1: "Trying to
access resource ... located in device CPU:1 from device CPU:0"), so on a CPU-only
machine 2 and 4 replicas are measured with XLA off only; compare them with the XLA-off
rows at 1 replica.

On a CPU-only machine the logical devices share the same cores: more replicas
cannot add compute, so the CPU figures show the cost of the replicated path (per
replica step, all-reduce), not a speedup.

Usage (from the repository root):
  .venv/bin/python benchmarks/scaling.py
  .venv/bin/python benchmarks/scaling.py --models=bnn --precisions=float32
  .venv/bin/python benchmarks/scaling.py --dataset=synthetic --rounds=1 --steps=10 \
      --burn_in_steps=5 --steps_per_loop=10        # smoke test
"""
import json
import os
import re
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

from benchmarks import common
# pylint: enable=g-import-not-at-top,wrong-import-position

MODELS = ('vae', 'bnn')
PRECISIONS = ('float32', 'mixed_bfloat16', 'mixed_float16')
TARGET_OVERHEAD = 0.10
_MARKER = 'SCALING_WORKER_RESULT '

FLAGS = flags.FLAGS
flags.DEFINE_list('replicas', ['1', '2', '4'], 'Replica counts (one subprocess each).')
flags.DEFINE_list('models', list(MODELS), 'Models: vae (relu MLP VAE, '
                  'VAEConfig(gated_units=False)), bnn '
                  '(flipout MLP 784-400-400-10).')
flags.DEFINE_list('precisions', list(PRECISIONS), 'Precisions, from: '
                  + ', '.join(PRECISIONS) + '.')
flags.DEFINE_enum('dataset', 'fashion_mnist', ['fashion_mnist', 'synthetic'],
                  'Training images (Fashion-MNIST falls back to synthetic, with a note).')
flags.DEFINE_integer('synthetic_train_size', 8192, 'Training examples of synthetic data.')
flags.DEFINE_string('data_dir', None, 'Directory of the IDX files (optional).')
flags.DEFINE_integer('batch_size', 128, 'Global batch size (divisible by every replica '
                     'count).')
flags.DEFINE_list('xla_modes', ['off', 'on'], 'XLA settings to measure (off, on): '
                  'TrainConfig.jit_compile.')
flags.DEFINE_integer('rounds', 3, 'Round-robin rounds inside each worker; medians reported.')
flags.DEFINE_integer('steps', 100, 'Timed steps per round of each measurement.')
flags.DEFINE_integer('burn_in_steps', 30, 'Untimed steps of each measurement after its '
                     'build and compilation.')
flags.DEFINE_integer('steps_per_loop', 100, 'Steps per TrainLoop call (at most).')
flags.DEFINE_integer('seed', 0, 'Seed of initialisation, data order and sampling.')
flags.DEFINE_integer('worker_timeout', 3600, 'Seconds before a worker is stopped.')
flags.DEFINE_boolean('worker', False, 'Internal: run one replica count, print JSON.')
flags.DEFINE_integer('worker_replicas', 1, 'Internal: the worker\'s replica count.')

_PASSED_FLAGS = ('models', 'precisions', 'dataset', 'synthetic_train_size', 'data_dir',
                 'batch_size', 'xla_modes', 'rounds', 'steps', 'burn_in_steps',
                 'steps_per_loop', 'seed')


# --------------------------------------------------------------------------- worker


def _strategies(replicas):
  """[(label, strategy)] for this worker; call before TensorFlow runs any op."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from engine import distribute  # pylint: disable=g-import-not-at-top
  gpus = tf.config.list_physical_devices('GPU')
  if gpus:
    if replicas > len(gpus):
      return [], f'{replicas} replicas need {replicas} GPUs; this machine has {len(gpus)}'
    devices = [f'/gpu:{i}' for i in range(replicas)]
    mirrored = tf.distribute.MirroredStrategy(devices)
  else:
    if replicas > 1:
      # Before make_strategy: it lists logical GPUs first, which initializes the
      # runtime, after which the CPU can no longer be split.
      distribute.set_logical_cpu_devices(replicas)
    mirrored = distribute.make_strategy('mirrored', num_cpu_devices=replicas
                                        if replicas > 1 else 0)
  out = []
  if replicas == 1:
    out.append(('default', distribute.make_strategy('default')))
  out.append((f'mirrored{replicas}', mirrored))
  return out, ''


def _config(model, precision, xla, model_dir, data):
  from engine import config as config_lib  # pylint: disable=g-import-not-at-top
  from models import bnn as bnn_lib  # pylint: disable=g-import-not-at-top
  from models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  if model == 'vae':
    options = vae_lib.VAEConfig(gated_units=False)
  else:
    options = bnn_lib.BNNConfig(architecture='mlp', hidden_sizes=(400, 400),
                                bnn_layer='flipout')
  spl = FLAGS.steps_per_loop
  train = config_lib.TrainConfig(
      model_dir=model_dir, batch_size=FLAGS.batch_size, steps_per_loop=spl,
      eval_every=spl, checkpoint_every=spl, jit_compile=xla, seed=FLAGS.seed,
      precision=precision)
  return config_lib.ExperimentConfig(model=model, model_options=options,
                                     data=common.data_config(data, FLAGS.data_dir),
                                     train=train)


def _error_summary(e):
  """One informative line of an exception (TF's first line is often generic)."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  for line in lines:
    if re.match(r'^\(\d+\) [A-Z_]+:', line):
      return f'{type(e).__name__}: {line[:300]}'
  return f'{type(e).__name__}: {(lines[0] if lines else "")[:300]}'


def run_worker():
  """Measures one replica count; prints progress, then one JSON line."""
  replicas = FLAGS.worker_replicas
  strategies, skipped = _strategies(replicas)  # first: before any op runs
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from engine import distribute  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  tf.get_logger().setLevel('WARNING')
  common.quiet_retracing_warning()
  xla_ok = replicas == 1 or bool(tf.config.list_physical_devices('GPU'))
  result = dict(replicas=replicas, skipped=skipped, rates={}, errors={}, devices=[],
                not_run={})
  if skipped:
    print(_MARKER + json.dumps(result), flush=True)
    return
  for label, strategy in strategies:
    result['devices'].append(f'{label}: {distribute.describe(strategy)}')
    print(f'{label}: {distribute.describe(strategy)}', flush=True)
  data, note = common.load_data(FLAGS.dataset, data_dir=FLAGS.data_dir, seed=FLAGS.seed,
                                synthetic_train_size=FLAGS.synthetic_train_size)
  result['data'] = common.describe_data(data)
  result['data_note'] = note
  log = lambda s: print(s, flush=True)
  with tempfile.TemporaryDirectory(prefix=f'elbo_scaling_r{replicas}_') as root:
    runners = []
    for model in FLAGS.models:
      for precision in FLAGS.precisions:
        for xla in FLAGS.xla_modes:
          for label, strategy in strategies:
            name = f'{model}/{precision}/xla_{xla}/{label}'
            if xla == 'on' and not xla_ok:
              result['not_run'][name] = 'XLA with several logical CPU devices'
              continue
            config = _config(model, precision, xla == 'on',
                             os.path.join(root, name.replace('/', '_')), data)
            runners.append(common.EngineRunner(name, config, strategy, data))
    ok = []
    for r in runners:  # burn-in one by one, so one failure does not stop the rest
      try:
        common.burn_in([r], FLAGS.burn_in_steps, log=log)
        ok.append(r)
      except Exception as e:  # pylint: disable=broad-except
        result['errors'][r.name] = _error_summary(e)
        log(f'burn-in {r.name}: FAILED {type(e).__name__}: {str(e)[:2000]}')
    rates = (common.interleaved_rates(ok, rounds=FLAGS.rounds, steps=FLAGS.steps, log=log)
             if ok else {})
    for r in ok:
      result['rates'][r.name] = rates[r.name]
      if r.tracing_count() != 1:
        log(f'{r.name}: TrainLoop traced {r.tracing_count()} times')
  print(_MARKER + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- parent


def run_replicas(replicas):
  """Runs one worker subprocess; echoes its output; returns its result dict."""
  argv = [sys.executable, os.path.abspath(__file__), '--worker',
          f'--worker_replicas={replicas}']
  for name in _PASSED_FLAGS:
    value = FLAGS[name].value
    if value is None:
      continue
    if isinstance(value, list):
      value = ','.join(value)
    elif isinstance(value, bool):
      argv.append(f'--{name}' if value else f'--no{name}')
      continue
    argv.append(f'--{name}={value}')
  print(f'\n== {replicas} replica(s): worker process', flush=True)
  tic = time.perf_counter()
  proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, cwd=_REPO_ROOT)
  noise = re.compile(r'^[IWE]\d{4} |absl::InitializeLog|triggered tf.function retracing')
  result = None
  deadline = time.monotonic() + FLAGS.worker_timeout
  try:
    for line in proc.stdout:
      if line.startswith(_MARKER):
        result = json.loads(line[len(_MARKER):])
      elif not noise.search(line):
        print(f'  [r={replicas}] {line.rstrip()}', flush=True)
      if time.monotonic() > deadline:
        raise subprocess.TimeoutExpired(argv, FLAGS.worker_timeout)
    proc.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    return dict(replicas=replicas, skipped=f'worker timed out after '
                f'{FLAGS.worker_timeout} s', rates={}, errors={}, not_run={})
  if result is None:
    return dict(replicas=replicas, skipped=f'worker exited with code {proc.returncode} '
                f'and no result', rates={}, errors={}, not_run={})
  print(f'  [r={replicas}] worker done in {time.perf_counter() - tic:.0f} s', flush=True)
  return result


def _median(rates):
  return common.summarize(rates)[0] if rates else None


def report(results):
  replica_counts = [r['replicas'] for r in results]
  rates, errors, not_run = {}, {}, {}
  for res in results:
    rates.update(res['rates'])
    errors.update(res['errors'])
    not_run.update(res.get('not_run', {}))
  columns = (['default'] if 1 in replica_counts else []) + [
      f'mirrored{r}' for r in replica_counts]
  titles = {c: ('default@1' if c == 'default' else c.replace('mirrored', 'mirrored@'))
            for c in columns}
  header = (['model', 'precision', 'XLA'] + [titles[c] + ' ex/s' for c in columns]
            + ['mirrored@1 overhead', f'target < {TARGET_OVERHEAD:.0%}'])
  rows, detail = [], []
  for model in FLAGS.models:
    for precision in FLAGS.precisions:
      for xla in FLAGS.xla_modes:
        prefix = f'{model}/{precision}/xla_{xla}/'
        base = _median(rates.get(prefix + 'default', []))
        cells = []
        for c in columns:
          values = rates.get(prefix + c)
          if not values:
            cells.append('failed' if prefix + c in errors else
                         'not run' if prefix + c in not_run else 'n/a')
            continue
          med, lo, hi = common.summarize(values)
          cells.append(f'{med:,.0f}' + (f' ({med / base:.2f}x)' if base else ''))
          detail.append([prefix + c, f'{med:,.0f}', f'{lo:,.0f}..{hi:,.0f}'])
        m1 = _median(rates.get(prefix + 'mirrored1', []))
        if base and m1:
          overhead = 1.0 - m1 / base
          over = [f'{overhead:+.1%}', 'PASS' if overhead < TARGET_OVERHEAD else 'MISS']
        else:
          over = ['n/a', 'n/a']
        rows.append([model, precision, xla] + cells + over)
  print()
  print(f'Scaling: examples/sec, median over {FLAGS.rounds} rounds of {FLAGS.steps} steps '
        f'(in brackets: ratio to the default strategy at 1 replica, same precision and '
        f'XLA); global batch {FLAGS.batch_size}. vae = relu MLP VAE (gated_units=False, '
        f'784-512-256, 32-d latent), bnn = flipout MLP 784-400-400-10. Overhead = 1 - '
        f'mirrored@1 / default@1.')
  print(common.format_table(header, rows))
  print()
  print('Every measurement (median and min..max over rounds):')
  print(common.format_table(['measurement', 'ex/s (median)', 'min..max'], detail))
  for r in results:
    if r.get('skipped'):
      print(f'{r["replicas"]} replica(s) skipped: {r["skipped"]}')
  reasons = sorted(set(not_run.values()))
  for reason in reasons:
    names = [k for k, v in not_run.items() if v == reason]
    print(f'not run ({reason}): {len(names)} measurement(s), e.g. {names[0]}')
  for name, error in errors.items():
    print(f'FAILED {name}: {error}')


def main(argv):
  del argv
  if FLAGS.worker:
    run_worker()
    return
  for name, values, known in (('models', FLAGS.models, MODELS),
                              ('precisions', FLAGS.precisions, PRECISIONS),
                              ('xla_modes', FLAGS.xla_modes, ('off', 'on'))):
    unknown = [v for v in values if v not in known]
    if unknown:
      raise app.UsageError(f'--{name}: unknown {unknown}; choose from {known}.')
  replica_counts = [int(r) for r in FLAGS.replicas]
  bad = [r for r in replica_counts if r < 1 or FLAGS.batch_size % r]
  if bad:
    raise app.UsageError(f'--replicas={bad}: each must be >= 1 and divide '
                         f'--batch_size={FLAGS.batch_size}.')
  wall_start = time.perf_counter()
  common.print_header()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not tf.config.list_physical_devices('GPU'):
    print(f'no GPU: replicas are logical CPU devices sharing {common.num_cpus()} '
          f'core(s); more replicas cannot add compute here.')
  print(f'{len(FLAGS.models)} model(s) x {len(FLAGS.precisions)} precision(s) x '
        f'replicas {replica_counts} (+ default strategy at 1); {FLAGS.rounds} rounds x '
        f'{FLAGS.steps} timed steps after {FLAGS.burn_in_steps} burn-in steps, '
        f'{FLAGS.steps_per_loop} steps per TrainLoop call; XLA {FLAGS.xla_modes}',
        flush=True)
  results = [run_replicas(r) for r in replica_counts]
  for r in results:
    if r.get('data'):
      print(f'data: {r["data"]}')
      if r.get('data_note'):
        print(r['data_note'])
      break
  report(results)
  print()
  print(f'load average at end: {common.load_average()}')
  print(f'command: {common.command_line()}')
  print(f'total wall time: {time.perf_counter() - wall_start:.0f} s')


if __name__ == '__main__':
  app.run(main)
