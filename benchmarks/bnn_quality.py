"""Test quality of BNN configurations trained for a fixed budget each.

Each configuration (a named set of `BNNConfig` overrides, below) is trained by the
engine for `--minutes` of wall-clock time, or for a fixed `--steps` (which a
`--lr_schedule=cosine` run needs, and which makes the figures independent of other
load on the machine; report the idle-machine minutes the steps correspond to):
`controller.build` +
`controller.make_train_loop`, calls of up to `--steps_per_loop` steps until the
budget is spent (the first call's tracing and XLA compilation count against it;
the last call is sized from the measured rate so the budget is not overshot by
more than a few seconds), then a checkpoint. `controller.train` is then run with
`train_steps` = the steps done: it restores that checkpoint, trains no further and
runs the model's final evaluation; its metrics are what is reported.

Classification (Fashion-MNIST, all 10 classes): accuracy, NLL, ECE (15 equal-width
bins), Brier score and out-of-distribution AUROC against uniform-noise images
(scored by predictive entropy and by mutual information), from `--num_mc_samples`
weight samples per test image, plus the steps and epochs done in the budget.
`--task=rotation_regression` (default config: flipout): RMSE, NLL and the 50/70/95%
predictive-interval coverage of the rotation angle.

The configurations (LeNet-5, Adam 1e-3, batch 128; N(0, 1) prior and
posterior_rho_init -5 unless named otherwise) vary one thing at a time against the
`flipout` baseline, so each row says what that change bought:

  det, mcdrop                   deterministic / MC-dropout LeNet (same engine);
  flipout                       the issue's baseline;
  flipout_warmup                + linear KL warm-up over 10,000 steps;
  flipout_prior0.1 / 0.3 / 3    prior N(0, sigma^2) with another sigma;
  flipout_mixture               scale-mixture prior (Blundell et al.);
  flipout_blundell              Blundell's minibatch KL schedule;
  flipout_rho-7 / rho-3         posterior std starts at 0.0009 / 0.049;
  reparam_lenet, lr_lenet       reparameterization / local reparameterization;
  flipout_mlp                   flipout MLP 784-400-400-10.

More can be given with --define=NAME=FIELD:VALUE,FIELD:VALUE (BNNConfig fields over
the flipout baseline), e.g. --define=my=prior_sigma:0.2,kl_warmup_steps:5000.

Usage (from the repository root):
  .venv/bin/python benchmarks/bnn_quality.py                 # 60 min per config
  .venv/bin/python benchmarks/bnn_quality.py --minutes=30 --configs=det,flipout,lr_lenet
  .venv/bin/python benchmarks/bnn_quality.py --task=rotation_regression
  .venv/bin/python benchmarks/bnn_quality.py --dataset=synthetic --minutes=0.2 \
      --configs=det,flipout --num_mc_samples=2                # smoke test
"""
import dataclasses
import json
import os
import shutil
import sys
import time
import traceback

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import tensorflow as tf

from benchmarks import common
from engine import config as config_lib
from engine import controller
from engine import distribute
from engine import metrics as metrics_lib
from models import bnn as bnn_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

_LENET = dict(architecture='lenet')
_FLIPOUT = dict(_LENET, bnn_layer='flipout', prior='normal', prior_sigma=1.0,
                posterior_rho_init=-5.0)
CONFIGS = {
    'det': dict(_LENET, bnn_layer='deterministic'),
    'mcdrop': dict(_LENET, bnn_layer='mc_dropout'),
    'flipout': dict(_FLIPOUT),
    'flipout_warmup': dict(_FLIPOUT, kl_warmup_steps=10000),
    'flipout_prior0.1': dict(_FLIPOUT, prior_sigma=0.1),
    'flipout_prior0.3': dict(_FLIPOUT, prior_sigma=0.3),
    'flipout_prior3': dict(_FLIPOUT, prior_sigma=3.0),
    'flipout_mixture': dict(_FLIPOUT, prior='scale_mixture'),
    'flipout_blundell': dict(_FLIPOUT, kl_schedule='blundell'),
    'flipout_rho-7': dict(_FLIPOUT, posterior_rho_init=-7.0),
    'flipout_rho-3': dict(_FLIPOUT, posterior_rho_init=-3.0),
    'reparam_lenet': dict(_FLIPOUT, bnn_layer='reparameterization'),
    'lr_lenet': dict(_FLIPOUT, bnn_layer='local_reparameterization'),
    'flipout_mlp': dict(_FLIPOUT, architecture='mlp'),
    'flipout_learnprior': dict(_FLIPOUT, learn_prior=True),
}
DEFAULT_CONFIGS = ['det', 'mcdrop', 'flipout', 'flipout_warmup', 'flipout_prior0.1',
                   'flipout_rho-7', 'lr_lenet']

# The target, and the uncertainty-baselines VI reference it cites.
TARGET = dict(accuracy=0.910, nll=0.25, ece=0.010)
REFERENCE = 'uncertainty-baselines VI: accuracy 89.5%, NLL 0.292, ECE 0.011'
OOD_KEY = 'ood/uniform_noise_{}_auroc'

FLAGS = flags.FLAGS
flags.DEFINE_float('minutes', 60.0, 'Training budget per configuration, wall-clock '
                   'minutes (> 0; tracing/compilation included, evaluation not).')
flags.DEFINE_list('configs', DEFAULT_CONFIGS, 'Configurations to run, from: '
                  + ', '.join(CONFIGS) + ' (and names given by --define). Default for '
                  '--task=rotation_regression: flipout.')
flags.DEFINE_multi_string('define', [], 'Extra configuration NAME=FIELD:VALUE,... of '
                          'BNNConfig fields over the flipout baseline (run it by '
                          'adding NAME to --configs, or alone if --configs is not given).')
flags.DEFINE_enum('task', 'classification', list(bnn_lib.TASKS), 'The BNN task.')
flags.DEFINE_enum('dataset', 'fashion_mnist', ['fashion_mnist', 'synthetic'],
                  'Data set (Fashion-MNIST falls back to synthetic, with a note).')
flags.DEFINE_string('data_dir', None, 'Directory of the IDX files (optional).')
flags.DEFINE_integer('synthetic_train_size', 8192, 'Training examples of synthetic data.')
flags.DEFINE_integer('synthetic_test_size', 2048, 'Test examples of synthetic data.')
flags.DEFINE_integer('num_mc_samples', 10, 'Weight samples per test example.')
flags.DEFINE_integer('batch_size', 128, 'Global batch size.')
flags.DEFINE_float('learning_rate', 1e-3, "Adam's learning rate.")
flags.DEFINE_enum('lr_schedule', 'constant', list(config_lib.LR_SCHEDULES),
                  'Learning-rate schedule (engine/schedules.py); cosine needs --steps.')
flags.DEFINE_float('lr_final_fraction', 0.0, 'Last rate of the cosine schedule, as a '
                   'fraction of --learning_rate.')
flags.DEFINE_integer('steps', 0, 'Fixed step budget per configuration instead of '
                     '--minutes (0: use --minutes). Makes the result independent of '
                     'other load on the machine; only the wall time changes.')
flags.DEFINE_integer('steps_per_loop', 500, 'Steps per TrainLoop call (at most).')
flags.DEFINE_float('checkpoint_minutes', 10.0, 'Also checkpoint every this many minutes.')
flags.DEFINE_float('log_seconds', 60.0, 'Progress line at most this often.')
flags.DEFINE_boolean('xla', True, 'Compile each step with XLA.')
flags.DEFINE_integer('seed', 0, 'Seed of initialisation, data order and sampling.')
flags.DEFINE_string('work_dir', '/tmp/elbo_engine/bnn_quality', 'Where runs are written '
                    '(each config in WORK_DIR/TASK/NAME, removed first).')
flags.DEFINE_string('output', '/tmp/bnn_quality.json', 'JSON file of all results '
                    '(rewritten after every configuration).')


def make_config(overrides, data, model_dir, train_steps):
  options = bnn_lib.BNNConfig(**{**overrides, 'task': FLAGS.task,
                                 'num_mc_samples': FLAGS.num_mc_samples})
  spl = FLAGS.steps_per_loop
  big = 10**9 // spl * spl  # no periodic evaluation: it would eat the budget
  train = config_lib.TrainConfig(
      model_dir=model_dir, train_steps=train_steps, batch_size=FLAGS.batch_size,
      learning_rate=FLAGS.learning_rate, lr_schedule=FLAGS.lr_schedule,
      lr_final_fraction=FLAGS.lr_final_fraction, steps_per_loop=spl, eval_every=big,
      checkpoint_every=big, jit_compile=FLAGS.xla, seed=FLAGS.seed)
  return config_lib.ExperimentConfig(model='bnn', model_options=options,
                                     data=common.data_config(data, FLAGS.data_dir),
                                     train=train)


def train_for_budget(name, config, strategy, data, seconds, max_steps=None):
  """Trains until `seconds` pass or `max_steps` are done; checkpoints. Returns stats."""
  tic = time.perf_counter()
  exp = controller.build(config, strategy, data=data)
  loop, iterator = controller.make_train_loop(exp)
  build_seconds = time.perf_counter() - tic
  spl = config.train.steps_per_loop
  start = time.perf_counter()
  last_log = last_ckpt = start
  rate = None  # steps/sec of calls after the first (which compiles)
  timed_steps, timed_seconds, calls = 0, 0.0, 0
  while True:
    elapsed = time.perf_counter() - start
    left = seconds - elapsed
    if left <= 0:
      break
    if max_steps is not None:
      n = min(spl, max_steps - int(exp.step.numpy()))
    else:
      n = spl if rate is None else min(spl, int(left * rate))
    if n < 1:
      break
    call_tic = time.perf_counter()
    means, done, bad_step = loop(iterator, tf.constant(n, tf.int64))
    means = {k: float(v) for k, v in means.items()}  # host sync
    call_seconds = time.perf_counter() - call_tic
    if int(bad_step) >= 0:
      raise RuntimeError(f'{name}: non-finite loss at step {int(bad_step)}')
    calls += 1
    if calls > 1:
      timed_steps += int(done)
      timed_seconds += call_seconds
      rate = timed_steps / timed_seconds
    elif n >= 50:  # rough rate from the first call (includes compilation)
      rate = int(done) / call_seconds
    now = time.perf_counter()
    step = int(exp.step.numpy())
    if now - last_log >= FLAGS.log_seconds:
      last_log = now
      acc = f'  train acc {means["accuracy"]:.4f}' if 'accuracy' in means else ''
      budget = (f'/{max_steps}  {(now - start) / 60:.1f} min' if max_steps is not None
                else f'  {(now - start) / 60:.1f}/{seconds / 60:.1f} min')
      print(f'  {name} step {step}{budget}  '
            f'loss {means["loss"]:.4g}  nll {means["nll"]:.4g}  kl {means["kl"]:.4g}'
            f'{acc}  {n * config.train.batch_size / call_seconds:,.0f} ex/s', flush=True)
    if now - last_ckpt >= FLAGS.checkpoint_minutes * 60:
      last_ckpt = now
      exp.manager.save(checkpoint_number=step)
  train_seconds = time.perf_counter() - start
  step = int(exp.step.numpy())
  exp.manager.save(checkpoint_number=step)
  return dict(steps=step, train_seconds=train_seconds, build_seconds=build_seconds,
              examples_per_sec=(timed_steps * config.train.batch_size / timed_seconds
                                if timed_seconds else None),
              epochs=step * config.train.batch_size / exp.task.num_train)


def _budget():
  return f'{FLAGS.steps} steps' if FLAGS.steps else f'{FLAGS.minutes:g} min'


def run_config(name, overrides, strategy, data):
  model_dir = os.path.join(FLAGS.work_dir, FLAGS.task, name)
  shutil.rmtree(model_dir, ignore_errors=True)
  budget = _budget()
  print(f'\n== {name}: {overrides}; {budget} -> {model_dir}', flush=True)
  if FLAGS.steps:
    config = make_config(overrides, data, model_dir, train_steps=FLAGS.steps)
    stats = train_for_budget(name, config, strategy, data, float('inf'),
                             max_steps=FLAGS.steps)
  else:
    config = make_config(overrides, data, model_dir, train_steps=1)
    stats = train_for_budget(name, config, strategy, data, FLAGS.minutes * 60)
  print(f'  trained {stats["steps"]} steps ({stats["epochs"]:.1f} epochs) in '
        f'{stats["train_seconds"] / 60:.2f} min; final evaluation...', flush=True)
  tic = time.perf_counter()
  config = make_config(overrides, data, model_dir, train_steps=stats['steps'])
  metrics = controller.train(config, strategy, data=data,
                             log=lambda s: print('  ' + s, flush=True))
  stats['eval_seconds'] = time.perf_counter() - tic
  return dict(name=name, overrides=overrides, model_dir=model_dir, **stats,
              metrics=metrics)


def _f(value, fmt):
  return 'n/a' if value is None else format(value, fmt)


def classification_rows(results):
  header = ['config', 'layer', 'steps', 'epochs', 'accuracy', 'NLL', 'ECE (15 bins)',
            'Brier', 'OOD AUROC (entropy)', 'OOD AUROC (MI)', 'target']
  rows = []
  for r in results:
    if 'error' in r:
      rows.append([r['name'], r['overrides'].get('bnn_layer', ''), 'FAILED', '', '', '',
                   '', '', '', '', r['error'][:40]])
      continue
    m = r['metrics']
    variational = r['overrides'].get('bnn_layer') not in ('deterministic', 'mc_dropout')
    met = (m['accuracy'] >= TARGET['accuracy'] and m['nll'] <= TARGET['nll']
           and m['ece'] <= TARGET['ece'])
    rows.append([r['name'], r['overrides'].get('bnn_layer', ''), r['steps'],
                 f'{r["epochs"]:.1f}', f'{100 * m["accuracy"]:.2f}%', f'{m["nll"]:.4f}',
                 f'{m["ece"]:.4f}', f'{m["brier"]:.4f}',
                 _f(m.get(OOD_KEY.format('predictive_entropy')), '.3f'),
                 _f(m.get(OOD_KEY.format('mutual_information')), '.3f'),
                 ('MET' if met else 'no') if variational else 'n/a'])
  return header, rows


def ood_rows(results):
  """Every OOD set each configuration was scored on (noise, held-out classes, IDX)."""
  header = ['config', 'OOD set', 'AUROC (entropy)', 'AUPR (entropy)', 'AUROC (MI)',
            'AUPR (MI)']
  rows = []
  for r in results:
    m = r.get('metrics', {})
    sets = sorted({k[len('ood/'):-len('_predictive_entropy_auroc')] for k in m
                   if k.startswith('ood/') and k.endswith('_predictive_entropy_auroc')})
    for name in sets:
      rows.append([r['name'], name] + [
          _f(m.get(f'ood/{name}_{score}_{kind}'), '.3f')
          for score in ('predictive_entropy', 'mutual_information')
          for kind in ('auroc', 'aupr')])
  return header, rows


def regression_rows(results):
  header = ['config', 'layer', 'steps', 'epochs', 'RMSE (deg)', 'NLL', 'coverage 50%',
            'coverage 70%', 'coverage 95%', 'noise scale (deg)']
  rows = []
  for r in results:
    if 'error' in r:
      rows.append([r['name'], r['overrides'].get('bnn_layer', ''), 'FAILED', '', '', '',
                   '', '', '', r['error'][:40]])
      continue
    m = r['metrics']
    rows.append([r['name'], r['overrides'].get('bnn_layer', ''), r['steps'],
                 f'{r["epochs"]:.1f}', f'{m["rmse"]:.2f}', f'{m["nll"]:.3f}',
                 f'{m["coverage_50"]:.3f}', f'{m["coverage_70"]:.3f}',
                 f'{m["coverage_95"]:.3f}', f'{m["noise_scale"]:.2f}'])
  return header, rows


def write_json(results, header_info):
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
  tmp = FLAGS.output + '.tmp'
  with open(tmp, 'w') as f:
    json.dump({**header_info, 'results': results}, f, indent=2, default=str)
  os.replace(tmp, FLAGS.output)


def main(argv):
  del argv
  if FLAGS.minutes <= 0:
    raise app.UsageError(f'--minutes={FLAGS.minutes}: must be > 0.')
  if FLAGS.steps < 0:
    raise app.UsageError(f'--steps={FLAGS.steps}: must be >= 0 (0: use --minutes).')
  if FLAGS.lr_schedule != 'constant' and not FLAGS.steps:
    raise app.UsageError(f'--lr_schedule={FLAGS.lr_schedule} needs the step budget in '
                         'advance: give --steps (e.g. minutes x 60 x steps/sec measured '
                         'in an earlier run) instead of --minutes.')
  budget = _budget()
  configs = dict(CONFIGS)
  defined = common.parse_defines(FLAGS.define, bnn_lib.BNNConfig, _FLIPOUT)
  configs.update(defined)
  if FLAGS['configs'].present:
    names = FLAGS.configs
  elif defined:
    names = list(defined)
  elif FLAGS.task == 'rotation_regression':
    names = ['flipout']
  else:
    names = DEFAULT_CONFIGS
  unknown = [n for n in names if n not in configs]
  if unknown:
    raise app.UsageError(f'--configs: unknown {unknown}; known: {", ".join(configs)}')
  assert metrics_lib.DEFAULT_NUM_BINS == 15, 'ECE is reported with 15 bins'
  wall_start = time.perf_counter()

  common.print_header()
  common.quiet_retracing_warning()
  data, note = common.load_data(FLAGS.dataset, data_dir=FLAGS.data_dir, seed=FLAGS.seed,
                                synthetic_train_size=FLAGS.synthetic_train_size,
                                synthetic_test_size=FLAGS.synthetic_test_size)
  if note:
    print(note)
  print(f'data: {common.describe_data(data)}')
  print(f'task: {FLAGS.task}; configs: {", ".join(names)}; {budget} each; '
        f'{FLAGS.num_mc_samples} MC samples; batch {FLAGS.batch_size}, Adam '
        f'{FLAGS.learning_rate:g} ({FLAGS.lr_schedule}'
        f'{f" to x{FLAGS.lr_final_fraction:g}" if FLAGS.lr_schedule != "constant" else ""}),'
        f' XLA {"on" if FLAGS.xla else "off"}', flush=True)
  if FLAGS.task == 'classification':
    print(f'target: a BNN with accuracy >= {100 * TARGET["accuracy"]:.1f}% (the '
          f'deterministic network\'s), NLL <= {TARGET["nll"]}, ECE <= {TARGET["ece"]} '
          f'(reference: {REFERENCE})')
  machine = dict(nproc=common.num_cpus(), cpu=common.cpu_model(),
                 gpus=len(tf.config.list_physical_devices('GPU')),
                 versions=common.versions())
  header_info = dict(command=common.command_line(),
                     date=time.strftime('%Y-%m-%dT%H:%M:%S'), machine=machine,
                     task=FLAGS.task, minutes=FLAGS.minutes, steps=FLAGS.steps,
                     lr_schedule=FLAGS.lr_schedule,
                     lr_final_fraction=FLAGS.lr_final_fraction, dataset=data.name,
                     data_note=note, num_mc_samples=FLAGS.num_mc_samples,
                     target=TARGET, reference=REFERENCE)

  strategy = distribute.make_strategy('default')
  results = []
  for name in names:
    try:
      results.append(run_config(name, configs[name], strategy, data))
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      results.append(dict(name=name, overrides=configs[name],
                          error=f'{type(e).__name__}: {e}'))
    write_json(results, header_info)

  make_rows = classification_rows if FLAGS.task == 'classification' else regression_rows
  header, rows = make_rows(results)
  print()
  print(f'BNN quality ({FLAGS.task}, {data.name}, {budget} of training per '
        f'config, {FLAGS.num_mc_samples} MC samples):')
  if FLAGS.task == 'classification':
    print('OOD AUROC: test set vs uniform-noise images, scored by predictive entropy or '
          'by mutual information (0.5 = no signal; MI is 0 for det).')
    print(f'target: accuracy >= {100 * TARGET["accuracy"]:.1f}%, NLL <= {TARGET["nll"]}, '
          f'ECE <= {TARGET["ece"]}; reference: {REFERENCE}')
  print(common.format_table(header, rows))
  if FLAGS.task == 'classification':
    header, rows = ood_rows(results)
    if rows:
      print()
      print('Out-of-distribution detection, every OOD set (in-distribution test images '
            'vs the OOD set; AUPR with OOD as the positive class):')
      print(common.format_table(header, rows))
  print()
  print(f'results JSON: {FLAGS.output}')
  print(f'load average at end: {common.load_average()}')
  print(f'command: {common.command_line()}')
  print(f'total wall time: {(time.perf_counter() - wall_start) / 60:.1f} min')


if __name__ == '__main__':
  app.run(main)
