"""Test log-likelihood of VAE configurations trained for a fixed budget.

Trains each configuration with the engine (`engine.controller.train`) for
`--minutes` of training (converted to steps from a short measured burn-in) or for a
fixed `--steps` (independent of other load on the machine), optionally under a
cosine learning-rate schedule over the whole budget (`--lr_schedule=cosine`), then
reports the importance-sampled test NLL in nats (k = --eval_iw_samples, full test
set, fixed test binarization) with its standard error over test examples.

  .venv/bin/python benchmarks/vae_quality.py --minutes=60 --configs=vae,iwae50
  .venv/bin/python benchmarks/vae_quality.py --steps=150000 --lr_schedule=cosine \
      --define=wide=encoder_sizes:(1024,512),decoder_sizes:(512,1024)

--define=NAME=FIELD:VALUE,... adds a configuration of VAEConfig fields over the
default VAE; --batch_size and --learning_rate apply to every configuration of a run.

The MLP configurations have gated units, VAEConfig's default since commit 449de02
(session 23); RESULTS.md's figures from before it ran relu units. To reproduce
one, add gated_units:False to its --define (for a named config such as vae or
iwae50, define it again: --define=vae=gated_units:False,kl_warmup_steps:5000).

Long runs survive preemption: on SIGTERM the engine saves a checkpoint and this
script exits with code 75; rerunning the same command with `--resume` continues
each configuration from its checkpoint (a fixed `--steps` budget is needed then,
so the resumed run has the same length and learning-rate schedule).
"""
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402
from engine import config as config_lib  # noqa: E402

flags.DEFINE_float('minutes', 5.0, 'Training budget per configuration, in minutes (> 0).')
flags.DEFINE_list('configs', ['vae', 'iwae50'], 'Configurations to run: '
                  'vae (default MLP ELBO), iwae50 (IWAE k=50), conv (conv VAE), '
                  'made (autoregressive MADE decoder), pixelcnn (causal-convolution '
                  'decoder), mixture (learned mixture prior), '
                  'vamp (VampPrior).')
flags.DEFINE_integer('steps', 0, 'Fixed step budget per configuration instead of the '
                     'one sized from --minutes (0: size from --minutes). The figures then '
                     'do not depend on other load on the machine.')
flags.DEFINE_enum('lr_schedule', 'constant', list(config_lib.LR_SCHEDULES),
                  'Learning-rate schedule (engine/schedules.py), over the whole budget.')
flags.DEFINE_float('lr_final_fraction', 0.0, 'Last rate of the cosine schedule, as a '
                   'fraction of the first.')
flags.DEFINE_multi_string('define', [], 'Extra configuration NAME=FIELD:VALUE,... of '
                          'VAEConfig fields over the default VAE (repeatable).')
flags.DEFINE_integer('batch_size', 128, 'Global batch size of every configuration.')
flags.DEFINE_float('learning_rate', 1e-3, 'Adam learning rate (the peak of a cosine '
                   'schedule) of every configuration.')
flags.DEFINE_float('weight_decay', 0.0, 'Decoupled weight decay of every configuration '
                   '(TrainConfig.weight_decay; 0: off).')
flags.DEFINE_float('ema_decay', 0.0, 'Weight-average decay of every configuration '
                   '(TrainConfig.ema_decay; 0: off). When on, the test figures are of the '
                   'averaged weights, and the trained weights are evaluated too, with '
                   'the same test noise, for a paired comparison.')
flags.DEFINE_boolean('jit_compile', None, 'XLA for every configuration '
                     '(TrainConfig.jit_compile); unset: the engine\'s default (XLA, except '
                     'the training step of a model that trains faster without it on CPU).')
flags.DEFINE_string('dataset', 'fashion_mnist', 'Data set name.')
flags.DEFINE_integer('eval_iw_samples', 1000, 'Importance samples for log p(x) (>= 1000 '
                     'for reported figures).')
flags.DEFINE_integer('iw_chunk_size', 100, 'Importance samples per test batch at a time '
                     '(the pixelcnn decoder lowers it to bound its memory).')
flags.DEFINE_string('work_dir', '/tmp/elbo_engine/vae_quality', 'Where runs are written.')
flags.DEFINE_boolean('resume', False, 'Continue a configuration from the checkpoint in '
                     'its run directory (e.g. after preemption) instead of starting over; '
                     'needs --steps, and the engine refuses a changed configuration.')
FLAGS = flags.FLAGS

_CONFIGS = {
    'vae': dict(kl_warmup_steps=5000),
    'iwae50': dict(objective='iwae', num_iw_samples=50),
    'conv': dict(architecture='conv', encoder_sizes=(512,), decoder_sizes=(512,),
                 kl_warmup_steps=5000),
    # The default encoder; the decoder is a MADE (two masked layers of 512)
    # conditioned on z, so each pixel also depends on the pixels before it.
    'made': dict(decoder='autoregressive', decoder_sizes=(512, 512), kl_warmup_steps=5000),
    # The default network; its logits corrected from a causal 7x7 convolution of
    # the pixels above and left of each pixel (models/pixelcnn.py).
    'pixelcnn': dict(decoder='pixelcnn', kl_warmup_steps=5000),
    # Learned priors (models/latent_priors.py); their rate is a Monte-Carlo estimate.
    'mixture': dict(latent_prior='mixture', prior_components=100, kl='monte_carlo',
                    kl_warmup_steps=5000),
    'vamp': dict(latent_prior='vamp', prior_components=100, kl='monte_carlo',
                 kl_warmup_steps=5000),
}


def _config(name, train_steps, model_dir):
  from models import vae
  options = vae.VAEConfig(**_CONFIGS[name])
  return config_lib.ExperimentConfig(
      model='vae', model_options=options,
      data=config_lib.DataConfig(dataset=FLAGS.dataset),
      train=config_lib.TrainConfig(
          model_dir=model_dir, train_steps=train_steps, steps_per_loop=500,
          batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate,
          lr_schedule=FLAGS.lr_schedule, lr_final_fraction=FLAGS.lr_final_fraction,
          eval_every=10**9 // 500 * 500, checkpoint_every=10**9 // 500 * 500,
          eval_iw_samples=FLAGS.eval_iw_samples, iw_chunk_size=FLAGS.iw_chunk_size,
          weight_decay=FLAGS.weight_decay, ema_decay=FLAGS.ema_decay,
          jit_compile=FLAGS.jit_compile))


def _steps_for_budget(name, strategy, data):
  """A 1,000-step burn-in measures this configuration's speed; the budget in steps."""
  import shutil
  from engine import controller
  probe_dir = os.path.join(FLAGS.work_dir, name + '_probe')
  shutil.rmtree(probe_dir, ignore_errors=True)
  probe = _config(name, 1000, probe_dir)
  probe = dataclasses.replace(
      probe, train=dataclasses.replace(probe.train, eval_iw_samples=0))
  m = controller.train(probe, strategy, data=data, log=lambda s: None)
  steps = int(FLAGS.minutes * 60 * m['train_examples_per_sec'] / FLAGS.batch_size) // 500 * 500
  return max(steps, 500)


def main(argv):
  del argv
  import shutil
  from engine import controller
  from engine import distribute
  if FLAGS.steps < 0 or FLAGS.steps % 500:
    raise app.UsageError(f'--steps={FLAGS.steps}: must be a multiple of 500 (the steps '
                         'per loop call), or 0 to size the run from --minutes.')
  if FLAGS.resume and not FLAGS.steps:
    raise app.UsageError('--resume needs the fixed --steps budget of the first run '
                         '(a budget sized from --minutes differs from run to run).')
  from engine import preemption
  common.configure_xla()
  strategy = distribute.make_strategy('default')
  data = controller.load_data(_config('vae', 1, '/tmp/x').data, 0)
  from models import vae
  defined = common.parse_defines(FLAGS.define, vae.VAEConfig, {})
  _CONFIGS.update(defined)
  names = FLAGS.configs if FLAGS['configs'].present or not defined else list(defined)
  print(f'batch {FLAGS.batch_size}; learning rate: {FLAGS.learning_rate:g}, {FLAGS.lr_schedule}'
        + (f' to x{FLAGS.lr_final_fraction:g}' if FLAGS.lr_schedule != 'constant' else '')
        + (f'; weight decay {FLAGS.weight_decay:g}' if FLAGS.weight_decay else '')
        + (f'; {FLAGS.steps} steps per config' if FLAGS.steps
           else f'; {FLAGS.minutes:g} min per config (sized from a burn-in)'), flush=True)
  rows = []
  for name in names:
    if name not in _CONFIGS:
      raise app.UsageError(f'--configs: unknown {name!r}; known: {", ".join(_CONFIGS)}')
    steps = FLAGS.steps or _steps_for_budget(name, strategy, data)
    model_dir = os.path.join(FLAGS.work_dir, name)
    checkpoints = os.path.join(model_dir, 'checkpoints')
    if FLAGS.resume and os.path.isdir(checkpoints) and os.listdir(checkpoints):
      print(f'{name}: resuming from {checkpoints}', flush=True)
    else:
      shutil.rmtree(model_dir, ignore_errors=True)
    tic = time.perf_counter()
    try:
      metrics = controller.train(_config(name, steps, model_dir), strategy, data=data)
    except preemption.Preempted as e:
      print(f'{name}: preempted at step {e.step}; rerun this command with --resume to '
            f'continue from {checkpoints}.', flush=True)
      sys.exit(preemption.EXIT_PREEMPTED)
    total = time.perf_counter() - tic
    epochs = steps * FLAGS.batch_size / data.num_train
    trained = {}
    if FLAGS.ema_decay:
      exp = controller.build(_config(name, steps, model_dir), strategy, data=data,
                             record_config=False)
      trained = controller.evaluate(exp, final=True, trained_weights=True)
      trained.pop('images', None)
      print(f'{name}, trained weights: {exp.module.summary_line(trained)}', flush=True)
    rows.append((name, steps, epochs, total / 60, metrics['elbo'], metrics['nll'],
                 metrics['log_likelihood_stderr'], trained.get('elbo'), trained.get('nll')))
  print()
  if FLAGS.resume:
    print('(--resume: wall minutes are this invocation\'s only)')
  paired = ' | trained-weights ELBO | trained-weights NLL' if FLAGS.ema_decay else ''
  if FLAGS.ema_decay:
    print(f'(test figures of the weight average, decay {FLAGS.ema_decay:g}; the last two '
          f'columns are of the trained weights)')
  print(f'| config | steps | epochs | wall min (incl. eval) | test ELBO | '
        f'test NLL (k={FLAGS.eval_iw_samples}) | stderr{paired} |')
  print('| --- | --- | --- | --- | --- | --- | ---' + (' | --- | ---' if paired else '') + ' |')
  for r in rows:
    extra = f' {r[7]:.2f} | {r[8]:.2f} |' if FLAGS.ema_decay else ''
    print(f'| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.2f} | {r[5]:.2f} | '
          f'{r[6]:.2f} |{extra}')


if __name__ == '__main__':
  app.run(main)
