"""Training throughput of the variational layers against the deterministic network.

Measures examples per second of the BNN's training step for each layer type, all
trained by the engine exactly as `controller.train` trains them (`controller.build`
+ `controller.make_train_loop`: in-memory input, the replica step, the compiled
`TrainLoop`, XLA on by default), interleaved round-robin in one process:

  deterministic             point-estimate network of the same shape (the baseline);
  mc_dropout                the same network with dropout kept on;
  reparameterization        one weight sample per step, shared by the batch;
  flipout                   pseudo-independent per-example weight perturbations;
  local_reparameterization  pre-activations sampled per example;

each variational layer with the posterior std as softplus(rho) (the default) and,
named "<layer>/exp", as exp(rho) (`--posterior_scale=exp`: no log1p, no log in the
KL, no division in the gradient; `--posterior_scales` picks which). With
`--prefetch_noise=on,off`, reparameterization and Flipout also run with their
weight noise drawn inside the step ("<layer>/inline") instead of one step ahead
beside it (TrainConfig.prefetch_noise, the default).

Default network: MLP 784-400-400-10 on Fashion-MNIST classification, batch 128
(`--architecture=lenet` for LeNet-5). Every variant is burnt in (build, tracing,
XLA compilation and some steps) before it is timed; every timed call ends with a
host sync, and examples are counted from the step counter. The report gives each
variant's median over rounds, its min..max, and its slowdown against the
deterministic network (median rate ratio; also min..max of the per-round ratios,
which are paired in time and so less sensitive to other load). Target: each
variational layer at most 2.0x slower than the deterministic network.

Usage (from the repository root):
  .venv/bin/python benchmarks/bnn_throughput.py
  .venv/bin/python benchmarks/bnn_throughput.py --architecture=lenet
  .venv/bin/python benchmarks/bnn_throughput.py --prefetch_noise=on,off \
      --variants=reparameterization,flipout
  .venv/bin/python benchmarks/bnn_throughput.py --dataset=synthetic --rounds=1 \
      --steps=20 --burn_in_steps=10
"""
import os
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

from benchmarks import common
from engine import config as config_lib
from engine import distribute
from models import bnn as bnn_lib
from models import variational
# pylint: enable=g-import-not-at-top,wrong-import-position

ALL_VARIANTS = ('deterministic', 'mc_dropout', 'reparameterization', 'flipout',
                'local_reparameterization')
BASELINES = ('deterministic', 'mc_dropout')
TARGET_SLOWDOWN = 2.0

FLAGS = flags.FLAGS
flags.DEFINE_enum('dataset', 'fashion_mnist', ['fashion_mnist', 'synthetic'],
                  'Training images: Fashion-MNIST (falls back to synthetic, with a '
                  'note, when it is missing) or the synthetic set.')
flags.DEFINE_integer('synthetic_train_size', 8192,
                     'Training examples of --dataset=synthetic.')
flags.DEFINE_string('data_dir', None, 'Directory of the IDX files (optional).')
flags.DEFINE_enum('architecture', 'mlp', list(bnn_lib.ARCHITECTURES),
                  'mlp (hidden sizes from --hidden_sizes) or lenet (LeNet-5).')
flags.DEFINE_list('hidden_sizes', ['400', '400'], 'Hidden sizes of the MLP.')
flags.DEFINE_integer('batch_size', 128, 'Global batch size of every variant.')
flags.DEFINE_list('variants', list(ALL_VARIANTS), 'Variants to run, from: '
                  + ', '.join(ALL_VARIANTS) + ' (deterministic is always run).')
flags.DEFINE_list('posterior_scales', ['softplus', 'exp'],
                  'Posterior-scale parameterizations of every variational variant '
                  '(--posterior_scale: softplus, exp); a variant with exp is named '
                  '"<layer>/exp".')
flags.DEFINE_boolean('xla', True, 'Compile each step with XLA (TrainConfig.jit_compile).')
flags.DEFINE_list('prefetch_noise', ['on'],
                  'TrainConfig.prefetch_noise of every variational variant that draws '
                  'weight noise: on (the default: drawn one step ahead, beside the '
                  'step), off (drawn inside the step; named "<variant>/inline"), or '
                  'both, e.g. on,off.')
flags.DEFINE_enum('precision', 'float32', ['float32', 'mixed_bfloat16', 'mixed_float16'],
                  'TrainConfig.precision of every variant.')
flags.DEFINE_integer('rounds', 5, 'Round-robin rounds; the median per variant is reported.')
flags.DEFINE_integer('steps', 200, 'Timed steps per round of each variant.')
flags.DEFINE_integer('burn_in_steps', 200, 'Untimed steps of each variant before timing; '
                     'the first call traces and compiles.')
flags.DEFINE_integer('steps_per_loop', 500, "The engine's steps per TrainLoop call "
                     '(TrainConfig default: 500).')
flags.DEFINE_integer('seed', 0, 'Seed of initialisation, data order and sampling.')


def make_config(variant, data, model_dir, posterior_scale='softplus', prefetch_noise=True):
  options = bnn_lib.BNNConfig(
      architecture=FLAGS.architecture,
      hidden_sizes=tuple(int(h) for h in FLAGS.hidden_sizes),
      bnn_layer=variant, posterior_scale=posterior_scale)
  spl = FLAGS.steps_per_loop
  train = config_lib.TrainConfig(
      model_dir=model_dir, batch_size=FLAGS.batch_size, steps_per_loop=spl,
      eval_every=spl, checkpoint_every=spl, jit_compile=FLAGS.xla,
      prefetch_noise=prefetch_noise, seed=FLAGS.seed, precision=FLAGS.precision)
  return config_lib.ExperimentConfig(model='bnn', model_options=options,
                                     data=common.data_config(data, FLAGS.data_dir),
                                     train=train)


def num_parameters(model):
  return int(sum(np.prod(v.shape) for v in model.trainable_variables))


def describe_network():
  if FLAGS.architecture == 'lenet':
    return 'LeNet-5 (conv 6@5x5, pool, conv 16@5x5, pool, dense 120-84-10)'
  return 'MLP 784-' + '-'.join(FLAGS.hidden_sizes) + '-10'


def main(argv):
  del argv
  unknown = [v for v in FLAGS.variants if v not in ALL_VARIANTS]
  if unknown:
    raise app.UsageError(f'--variants: unknown {unknown}; choose from {ALL_VARIANTS}.')
  unknown = [p for p in FLAGS.posterior_scales if p not in variational.POSTERIOR_SCALES]
  if unknown or not FLAGS.posterior_scales:
    raise app.UsageError(f'--posterior_scales: {FLAGS.posterior_scales}; choose one or '
                         f'more of {variational.POSTERIOR_SCALES}.')
  modes = {'on': True, 'off': False}
  unknown = [m for m in FLAGS.prefetch_noise if m not in modes]
  if unknown or not FLAGS.prefetch_noise:
    raise app.UsageError(f'--prefetch_noise: {FLAGS.prefetch_noise}; choose on, off '
                         f'or on,off.')
  runs = []  # (runner name, layer, posterior scale, prefetch noise)
  for v in ALL_VARIANTS:
    if v in BASELINES:
      if v in FLAGS.variants or v == 'deterministic':
        runs.append((v, v, 'softplus', True))
    elif v in FLAGS.variants:
      for p in FLAGS.posterior_scales:
        name = v if p == 'softplus' else f'{v}/{p}'
        # local reparameterization draws no weight noise: prefetching changes nothing.
        for m in (FLAGS.prefetch_noise if v != 'local_reparameterization' else ['on']):
          runs.append((name + ('/inline' if m == 'off' else ''), v, p, modes[m]))
  wall_start = time.perf_counter()

  common.print_header()
  common.quiet_retracing_warning()
  data, note = common.load_data(FLAGS.dataset, data_dir=FLAGS.data_dir, seed=FLAGS.seed,
                                synthetic_train_size=FLAGS.synthetic_train_size)
  if note:
    print(note)
  print(f'data: {common.describe_data(data)}')
  print(f'network: {describe_network()}, batch {FLAGS.batch_size}, {FLAGS.precision}, '
        f'XLA {"on" if FLAGS.xla else "off"}, weight noise prefetch '
        f'{",".join(FLAGS.prefetch_noise)}, {FLAGS.steps_per_loop} steps per '
        f'TrainLoop call; {FLAGS.rounds} rounds x {FLAGS.steps} timed steps after '
        f'{FLAGS.burn_in_steps} burn-in steps', flush=True)

  strategy = distribute.make_strategy('default')
  with tempfile.TemporaryDirectory(prefix='elbo_bnn_throughput_') as root_dir:
    runners = [common.EngineRunner(
        name, make_config(layer, data, os.path.join(root_dir, name.replace('/', '_')),
                          posterior_scale, prefetch),
        strategy, data) for name, layer, posterior_scale, prefetch in runs]
    common.burn_in(runners, FLAGS.burn_in_steps,
                   log=lambda s: print(s, flush=True))
    params = {r.name: num_parameters(r.model) for r in runners}
    rates = common.interleaved_rates(runners, rounds=FLAGS.rounds, steps=FLAGS.steps,
                                     log=lambda s: print(s, flush=True))
    for r in runners:
      print(f'{r.name}: TrainLoop traced {r.tracing_count()} time(s) in all')

  base = rates['deterministic']
  base_median = common.summarize(base)[0]
  header = ['variant', 'parameters', 'examples/sec (median)', 'min..max over rounds',
            'slowdown vs deterministic', 'per-round slowdown min..max',
            f'target <= {TARGET_SLOWDOWN:.1f}x']
  rows = []
  for r in runners:
    med, lo, hi = common.summarize(rates[r.name])
    slow = base_median / med
    paired = [b / v for b, v in zip(base, rates[r.name])]
    if r.name == 'deterministic':
      verdict = 'baseline'
    elif r.name in BASELINES:
      verdict = 'n/a'
    else:
      verdict = 'PASS' if slow <= TARGET_SLOWDOWN else 'MISS'
    rows.append([r.name, f'{params[r.name]:,}', f'{med:,.0f}', f'{lo:,.0f}..{hi:,.0f}',
                 f'{slow:.2f}x', f'{min(paired):.2f}..{max(paired):.2f}', verdict])
  print()
  print(f'BNN training throughput, {describe_network()}, batch {FLAGS.batch_size}, '
        f'{data.name}, {FLAGS.precision}, XLA {"on" if FLAGS.xla else "off"}, '
        f'{FLAGS.rounds} rounds x {FLAGS.steps} steps (median over rounds):')
  print(common.format_table(header, rows))
  print()
  print(f'load average at end: {common.load_average()}')
  print(f'command: {common.command_line()}')
  print(f'total wall time: {time.perf_counter() - wall_start:.0f} s')


if __name__ == '__main__':
  app.run(main)
