"""Flag definitions shared by the binaries, and flags -> ExperimentConfig.

Only bin/ reads flags. Each help text states the constraint that is validated.
"""
import dataclasses
import os
import sys

from absl import flags

from engine import config as config_lib
from engine import errors
from engine import xla_cpu

FLAGS = flags.FLAGS


def _ints(name, default, help_):
  flags.DEFINE_list(name, default, help_)


def define_flags():
  """Defines every flag once (safe to call from several binaries in one process)."""
  if 'model' in FLAGS:
    return
  # Run.
  flags.DEFINE_string('model', 'vae', 'Model name: vae | bnn.')
  flags.DEFINE_string('model_dir', '/tmp/elbo_engine/vae',
                      'Directory for checkpoints, TensorBoard events, config.json and '
                      'metrics.json. Rerunning with the same dir resumes.')
  flags.DEFINE_string('strategy', 'default',
                      'default | one_device | mirrored | multi_worker (TF_CONFIG, or Slurm '
                      'under srun; see README "Cluster jobs").')
  flags.DEFINE_integer('port', None, 'multi_worker under Slurm: base port of the workers '
                       '(default: 20000 + job id mod 9936).')
  flags.DEFINE_integer('num_cpu_devices', 0,
                       'With --strategy=mirrored and no GPU: logical CPU devices (>= 2).')
  # Data.
  flags.DEFINE_string('dataset', 'fashion_mnist', 'fashion_mnist | mnist | idx | synthetic.')
  flags.DEFINE_string('data_dir', None,
                      'Directory with the four IDX files (train-images-idx3-ubyte[.gz], '
                      '...). Searched first; mnist and idx need it.')
  flags.DEFINE_enum('input_pipeline', 'in_memory', ['in_memory', 'tf_data'],
                    'in_memory: data on the device, batches gathered in the compiled loop; '
                    'tf_data: a tf.data pipeline per replica. Same batches either way.')
  flags.DEFINE_boolean('binarize', True, 'Dynamic binarization (Bernoulli likelihood only).')
  flags.DEFINE_integer('synthetic_train_size', 2048, 'Examples in --dataset=synthetic (> 0).')
  flags.DEFINE_integer('synthetic_test_size', 512, 'Test examples in synthetic (> 0).')
  # Model.
  flags.DEFINE_string('architecture', 'mlp',
                      'mlp | conv (--model=vae), or mlp | lenet (--model=bnn; lenet is '
                      'LeNet-5: conv 6@5x5, pool, conv 16@5x5, pool, dense 120, 84).')
  _ints('encoder_sizes', ['512', '256'], 'Encoder hidden sizes, positive ints.')
  _ints('decoder_sizes', ['256', '512'], 'Decoder hidden sizes, positive ints.')
  _ints('conv_filters', ['32', '64'], 'Two conv filter counts (--architecture=conv).')
  flags.DEFINE_integer('latent_dim', 32, 'Latent dimension (> 0).')
  flags.DEFINE_string('posterior', 'diag', 'diag | full_cov (MultivariateNormalTriL).')
  flags.DEFINE_string('likelihood', 'bernoulli', 'bernoulli | gaussian.')
  flags.DEFINE_string('decoder', 'factorized',
                      'VAE decoder: factorized (pixels independent given z) | '
                      'autoregressive (a MADE conditioned on z: each pixel also depends on '
                      'the pixels before it; --likelihood=bernoulli only; --decoder_sizes '
                      'are its hidden sizes) | pixelcnn (the factorized logits corrected '
                      'from a causal convolution of the pixels above and left of each '
                      'pixel; --likelihood=bernoulli, one-channel images).')
  flags.DEFINE_integer('pixelcnn_filters', 32, 'Channels of the pixelcnn decoder (> 0).')
  flags.DEFINE_integer('pixelcnn_kernel', 7,
                       "Window of the pixelcnn decoder's causal convolution (odd, >= 3).")
  flags.DEFINE_integer('pixelcnn_layers', 1,
                       "1x1 hidden layers of the pixelcnn decoder after its causal "
                       "convolution (>= 0).")
  flags.DEFINE_integer('pixelcnn_logit_window', 0,
                       "0, or the size m (odd, >= 3) of an m x m window of the factorized "
                       "decoder's probabilities around each pixel that the pixelcnn "
                       "decoder also reads (0: only the pixel's own logit).")
  flags.DEFINE_integer('pixelcnn_latent_maps', 0,
                       "C >= 0 more numbers per pixel that the factorized decoder computes "
                       "from z for the pixelcnn decoder's head, beside its logits (0: none).")
  flags.DEFINE_integer('pixelcnn_maps_rank', 0,
                       "0, or r > 0: the MLP decoder computes the latent maps from r "
                       "numbers per image (a linear layer of r units), which costs "
                       "r * (hidden + H * W * C) multiply-adds instead of "
                       "hidden * H * W * C (0: directly from the last hidden layer).")
  flags.DEFINE_float('decoder_dropout', 0.0,
                     "VAE: rate in [0, 1) of dropout on the factorized decoder's hidden "
                     "layers in training (not its output layer; evaluation, "
                     "reconstructions and samples use the whole network; 0: none).")
  flags.DEFINE_float('likelihood_scale', 0.0, 'Gaussian likelihood std (>= 0; 0 learns it).')
  flags.DEFINE_string('objective', 'elbo', 'elbo | iwae.')
  flags.DEFINE_integer('num_iw_samples', 1, 'Samples per example for --objective=iwae (> 0).')
  flags.DEFINE_string('kl', 'analytic', 'Rate estimator: analytic | monte_carlo | regularizer.')
  flags.DEFINE_string('latent_prior', 'normal',
                      'VAE prior p(z): normal (standard normal) | mixture (a learned '
                      'mixture of --prior_components diagonal Gaussians) | vamp (the '
                      'VampPrior: a mixture of the posteriors of --prior_components learned '
                      'pseudo-inputs) | hierarchical (a second stochastic layer: z drawn '
                      'from p(z | u) with u ~ N(0, I) of --top_latent_dim, inferred by '
                      'q(u | z)). All but normal need --kl=monte_carlo.')
  flags.DEFINE_string('activation', 'relu',
                      'VAE hidden-layer nonlinearity (conv, MADE, pixelcnn head, and the '
                      'MLP with --nogated_units): relu | elu | swish | softplus | tanh.')
  flags.DEFINE_bool('gated_units', None,
                    "VAE, --architecture=mlp: the encoder's and factorized decoder's "
                    'hidden layers are gated linear units, (W x + b) * sigmoid(V x + c), '
                    "with no other nonlinearity (--activation still sets the MADE's and "
                    "the pixelcnn head's). Unset: on for mlp, off for conv; "
                    '--nogated_units gives --activation units.')
  flags.DEFINE_integer('prior_components', 100,
                       'Components of --latent_prior=mixture (or of --top_prior=mixture) '
                       'or pseudo-inputs of vamp (> 0).')
  flags.DEFINE_integer('top_latent_dim', 16,
                       'Dimension of the top latent u of --latent_prior=hierarchical (> 0).')
  flags.DEFINE_string('top_prior', 'normal',
                      'p(u) of --latent_prior=hierarchical: normal (N(0, I)) | mixture '
                      '(a learned mixture of --prior_components diagonal Gaussians).')
  flags.DEFINE_integer('top_units', 256,
                       'Hidden units of the MLPs of p(z | u) and q(u | z) of '
                       '--latent_prior=hierarchical (> 0).')
  flags.DEFINE_integer('kl_warmup_steps', 0,
                       'Linear KL warm-up steps (>= 0): the VAE rate (ELBO only) or the '
                       "BNN's weight KL ramps from 0 to full weight over these steps.")
  # BNN model flags (--model=bnn): see define_bnn_flags below.
  define_bnn_flags()
  # Training.
  flags.DEFINE_integer('train_steps', 20000, 'Total optimizer steps (> 0).')
  flags.DEFINE_integer('batch_size', 128, 'Global batch size (> 0; divisible by replicas).')
  flags.DEFINE_float('learning_rate', 1e-3, 'Adam learning rate (> 0; the peak under a '
                     'schedule).')
  flags.DEFINE_enum('lr_schedule', 'constant', list(config_lib.LR_SCHEDULES),
                    'Learning-rate schedule: constant, or cosine decay from '
                    '--learning_rate to --learning_rate * --lr_final_fraction at '
                    '--train_steps.')
  flags.DEFINE_float('lr_final_fraction', 0.0,
                     'Last learning rate of --lr_schedule=cosine, as a fraction of '
                     '--learning_rate (in [0, 1]).')
  flags.DEFINE_float('clip_grad_norm', 0.0, 'Clip the global gradient norm (0: off).')
  flags.DEFINE_float('weight_decay', 0.0,
                     'Decoupled weight decay (AdamW): each step shrinks every kernel by '
                     'the current learning rate times this, of itself (>= 0; biases, '
                     'scales and learned priors do not decay; 0: off).')
  flags.DEFINE_float('ema_decay', 0.0,
                     'Keep an exponential moving average of the weights with this decay '
                     '(in [0, 1), e.g. 0.999) and evaluate and sample with it; 0: off.')
  flags.DEFINE_integer('ema_every', 10,
                       'Update the weight average every N steps, by ema_decay ** N (> 0).')
  flags.DEFINE_integer('steps_per_loop', 500, 'Steps per compiled loop call (> 0).')
  flags.DEFINE_integer('eval_every', 5000, 'Evaluate every N steps (multiple of steps_per_loop).')
  flags.DEFINE_integer('checkpoint_every', 5000,
                       'Checkpoint every N steps (multiple of steps_per_loop).')
  flags.DEFINE_integer('keep_checkpoints', 3, 'Checkpoints kept (> 0).')
  flags.DEFINE_boolean('jit_compile', None,
                       'Compile the training step and the evaluation with XLA (true) or '
                       'neither (false). Unset: XLA, except for the training step of a '
                       'model that trains faster without it on a CPU-only machine (the '
                       'pixelcnn VAE).')
  flags.DEFINE_boolean('prefetch_noise', True,
                       "With --jit_compile: draw the next step's shared noise (a BNN's "
                       'reparameterization/Flipout weight noise; the binarization noise '
                       'of the in-memory input) beside the running step, on another '
                       'core. The same noise either way.')
  flags.DEFINE_enum('xla_cpu_vector_width', 'auto', list(xla_cpu.VECTOR_WIDTHS),
                    "XLA:CPU's preferred vector width for compiled loops: auto (512 on a "
                    "CPU with AVX-512), default (XLA's own, 256), 256 or 512. A width "
                    'already in XLA_FLAGS wins. See engine/xla_cpu.py.')
  flags.DEFINE_boolean('xla_cpu_ynn_fusions', True,
                       "XLA:CPU's YNNPACK fusions (XLA's default). --noxla_cpu_ynn_fusions "
                       "made the VAE's XLA step 1.01-1.42x as fast at batch 2048 on this "
                       "project's CPU, and no faster at 128 (engine/xla_cpu.py). A "
                       'setting already in XLA_FLAGS wins.')
  flags.DEFINE_integer('seed', 0, 'Seed for init, data order, binarization, sampling (>= 0).')
  flags.DEFINE_integer('eval_batch_size', 500, 'Test batch size (> 0).')
  flags.DEFINE_integer('eval_iw_samples', 1000,
                       'Importance samples for the final test log p(x) (0: skip; multiple '
                       'of iw_chunk_size).')
  flags.DEFINE_integer('periodic_eval_iw_samples', 0,
                       'Importance samples during periodic evaluations (0: ELBO only).')
  flags.DEFINE_integer('iw_chunk_size', 100, 'Importance samples drawn at a time (> 0).')
  flags.DEFINE_integer('num_summary_images', 64,
                       'Images in the TensorBoard reconstruction/sample grids (> 0).')
  flags.DEFINE_list('profile_steps', [], 'FIRST,LAST step range to profile (empty: off).')
  flags.DEFINE_enum('precision', 'float32', ['float32', 'mixed_bfloat16', 'mixed_float16'],
                    'Layer compute dtype; variables, distributions and the loss stay '
                    'float32. mixed_float16 uses dynamic loss scaling.')
  flags.DEFINE_boolean('deterministic', False,
                       'Op determinism: with the step-indexed randomness a killed and '
                       'resumed run ends bit-identical to an uninterrupted one (CPU).')


def define_bnn_flags():
  """Flags of models/bnn.py's BNNConfig (same names as its fields).

  `architecture` and `kl_warmup_steps` are shared with the VAE and defined in
  `define_flags`. Defaults equal BNNConfig's (checked by tests/bin/test_bnn_binaries.py);
  they are literals here because bin/ must not import TensorFlow before flag parsing.
  Values are validated by BNNConfig, so a bad one ends as `error: --name=...`.
  """
  import math  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('task', 'classification',
                      'BNN task: classification | rotation_regression (predict the '
                      'rotation angle in degrees of a rotated image).')
  _ints('hidden_sizes', ['400', '400'],
        'BNN MLP hidden layer sizes, one or more positive ints (--architecture=mlp).')
  flags.DEFINE_string('bnn_layer', 'flipout',
                      'BNN layer: reparameterization | flipout | local_reparameterization '
                      '(variational), or the baselines deterministic | mc_dropout.')
  flags.DEFINE_string('prior', 'normal',
                      'BNN weight prior: normal (N(0, prior_sigma^2)) | scale_mixture '
                      '(pi N(0, sigma1^2) + (1 - pi) N(0, sigma2^2); needs '
                      '--bnn_layer=reparameterization or flipout).')
  flags.DEFINE_float('prior_sigma', 1.0, 'Std of the normal prior (> 0, finite).')
  flags.DEFINE_float('sigma1', 1.0, 'Std of the scale mixture\'s first component (> 0).')
  flags.DEFINE_float('sigma2', math.exp(-6.0),
                     'Std of the scale mixture\'s second component (> 0; default e^-6).')
  flags.DEFINE_float('pi', 0.5, 'Weight of the scale mixture\'s first component, in (0, 1).')
  flags.DEFINE_boolean('learn_prior', False,
                       "Learn the prior's scales with the posterior (empirical Bayes).")
  flags.DEFINE_float('posterior_rho_init', -5.0,
                     'Initial rho of every BNN weight (finite); the posterior std starts '
                     'at softplus(rho), or exp(rho) with --posterior_scale=exp '
                     '(-5: 0.0067 either way).')
  flags.DEFINE_string('posterior_scale', 'softplus',
                      'How rho maps to the BNN posterior std: softplus (softplus(rho), '
                      'the default) | exp (rho is log(std): no log1p, no log in the KL, '
                      'no division in the gradient). A run cannot resume with the other.')
  flags.DEFINE_string('kl_schedule', 'uniform',
                      'Per-example weight of the BNN KL: uniform (KL / N) | blundell '
                      '(pi_i * M / N, Blundell et al. 2015).')
  flags.DEFINE_integer('num_mc_samples', 10,
                       'BNN weight samples per test example for predictions (> 0).')
  _ints('train_classes', [],
        'Classes to train the BNN on, >= 2 distinct ids, leaving at least one out '
        '(the rest form an OOD set); empty: all. --task=classification only.')
  flags.DEFINE_float('max_angle', 45.0,
                     'Rotation range in degrees for --task=rotation_regression, in (0, 180].')
  flags.DEFINE_float('dropout_rate', 0.1,
                     'Dropout rate of --bnn_layer=mc_dropout, in [0, 1).')
  flags.DEFINE_string('ood_data_dir', '',
                      'Directory of an IDX data set of the same image shape whose test '
                      'images are an extra BNN OOD set (empty: none).')


def _list(name, kind):
  values = getattr(FLAGS, name)
  try:
    return tuple(kind(v) for v in values)
  except ValueError as e:
    example = '512,256' if kind is int else '0.5,0.25'
    raise errors.ConfigError(
        f'--{name}={",".join(values)}: every entry must be {"an integer" if kind is int else "a number"}, '
        f'e.g. {example}.') from e


def _int_list(name):
  return _list(name, int)


def model_options(options_cls):
  """The model's options dataclass from the flags of the same names.

  Tuple-valued fields come from list flags; their element type is the default's
  (int unless the default holds floats).
  """
  values = {}
  for field in dataclasses.fields(options_cls):
    if field.name not in FLAGS:
      continue
    default = field.default
    if isinstance(default, tuple):
      values[field.name] = _list(field.name, float if any(
          isinstance(v, float) for v in default) else int)
    else:
      values[field.name] = getattr(FLAGS, field.name)
  return options_cls(**values)


def _recorded_model_fields(name):
  """The option names of the recorded model, or none when it is not a known model
  (the record's `model` is then refused by name when the config is built)."""
  import models  # after flag parsing: imports TensorFlow
  try:
    return {field.name for field in dataclasses.fields(models.get(name).Config)}
  except errors.ElboEngineError:
    return set()


def adopt_recorded_config():
  """Flags not given on the command line take the values recorded in
  MODEL_DIR/config.json.

  bin/evaluate.py and bin/sample.py then restore a checkpoint with the flags it was
  trained with, without repeating them, and bin/train.py resumes a run with them, so
  a default changed since the run was recorded (e.g. --gated_units in session 23)
  does not change the run. A flag given explicitly still wins, and one that makes
  the model another (e.g. --latent_dim) is refused by `controller.build`, naming it.

  Returns:
    (the path read, {flag name: recorded value} for every flag whose value the
    record changed), or (None, {}) when the dir records no run.
  """
  from engine import checkpoints  # after flag parsing: imports TensorFlow
  recorded = checkpoints.read_recorded_config(FLAGS.model_dir)
  if recorded is None:
    return None, {}
  # A record older than a field holds the value the run had then (e.g. relu units
  # before --gated_units existed), not today's default.
  model_fields = _recorded_model_fields(recorded.get('model'))
  recorded = checkpoints.with_fields_added_later(
      recorded, lambda dotted: not dotted.startswith('model_options.')
      or dotted.split('.', 1)[1] in model_fields)
  values = {'model': recorded.get('model')}
  for section in ('model_options', 'data', 'train'):
    values.update(recorded.get(section) or {})
  path = os.path.join(FLAGS.model_dir, checkpoints.CONFIG_FILE)
  # Every field of today's configs has a flag of its name: a recorded name without
  # one was renamed or removed since the run was recorded.
  unknown = {name: value for name, value in values.items() if name not in FLAGS}
  if unknown:
    listed = ', '.join(f'{name}={value!r}' for name, value in sorted(unknown.items()))
    print(f'Note: {path} records {listed}, for which this version has no flag: '
          f'ignored. If a flag was renamed, give it under its new name.',
          file=sys.stderr, flush=True)
  changed = {}
  for name, value in values.items():
    if name == 'model_dir' or name not in FLAGS or FLAGS[name].present:
      continue
    if isinstance(FLAGS[name].parser, flags.ListParser):
      value = [] if value is None else [str(v) for v in value]
    if FLAGS[name].value != value:
      changed[name] = value
    # The config dataclasses validate the value, as they do a typed flag's.
    setattr(FLAGS, name, value)
  return path, changed


def recorded_experiment_config():
  """`adopt_recorded_config`, then `experiment_config`: (path, changed, config).

  A value taken from the record that no longer validates (a rule added since the
  run was recorded) is refused with the config's own message, which names the
  flag, plus where the value came from: the user did not type it.
  """
  path, changed = adopt_recorded_config()
  try:
    return path, changed, experiment_config()
  except errors.ConfigError as e:
    adopted = [name for name in changed if f'--{name}=' in str(e)]
    if not adopted:
      raise
    raise errors.ConfigError(
        f'{e} (--{adopted[0]} was not given: its value comes from {path}, the run '
        f'recorded in --model_dir. Give --{adopted[0]} explicitly to override it.)') from e


def experiment_config():
  """Builds the validated ExperimentConfig from the parsed flags."""
  import models  # after flag parsing: imports TensorFlow
  options = model_options(models.get(FLAGS.model).Config)
  profile = _int_list('profile_steps')
  if profile and len(profile) != 2:
    raise errors.ConfigError(f'--profile_steps={FLAGS.profile_steps}: give FIRST,LAST.')
  data = config_lib.DataConfig(
      dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, input_pipeline=FLAGS.input_pipeline,
      binarize=FLAGS.binarize, synthetic_train_size=FLAGS.synthetic_train_size,
      synthetic_test_size=FLAGS.synthetic_test_size)
  train = config_lib.TrainConfig(
      model_dir=FLAGS.model_dir, train_steps=FLAGS.train_steps, batch_size=FLAGS.batch_size,
      learning_rate=FLAGS.learning_rate, lr_schedule=FLAGS.lr_schedule,
      lr_final_fraction=FLAGS.lr_final_fraction, clip_grad_norm=FLAGS.clip_grad_norm,
      weight_decay=FLAGS.weight_decay, ema_decay=FLAGS.ema_decay, ema_every=FLAGS.ema_every,
      steps_per_loop=FLAGS.steps_per_loop, eval_every=FLAGS.eval_every,
      checkpoint_every=FLAGS.checkpoint_every, keep_checkpoints=FLAGS.keep_checkpoints,
      jit_compile=FLAGS.jit_compile, prefetch_noise=FLAGS.prefetch_noise, seed=FLAGS.seed,
      eval_batch_size=FLAGS.eval_batch_size,
      eval_iw_samples=FLAGS.eval_iw_samples,
      periodic_eval_iw_samples=FLAGS.periodic_eval_iw_samples,
      iw_chunk_size=FLAGS.iw_chunk_size, num_summary_images=FLAGS.num_summary_images,
      profile_steps=tuple(profile) if profile else None,
      precision=FLAGS.precision, deterministic=FLAGS.deterministic)
  return config_lib.ExperimentConfig(model=FLAGS.model, model_options=options, data=data,
                                     train=train)


def strategy():
  """The strategy named by --strategy, resolved once (also applies --deterministic,
  --xla_cpu_vector_width and --xla_cpu_ynn_fusions, which must precede the first XLA
  compilation)."""
  import tensorflow as tf
  from engine import distribute
  xla_cpu.configure(FLAGS.xla_cpu_vector_width)
  xla_cpu.configure_ynn_fusions(FLAGS.xla_cpu_ynn_fusions)
  if FLAGS.deterministic:
    tf.config.experimental.enable_op_determinism()
  if FLAGS.num_cpu_devices < 0:
    raise errors.ConfigError(f'--num_cpu_devices={FLAGS.num_cpu_devices}: must be >= 0.')
  return distribute.make_strategy(FLAGS.strategy, num_cpu_devices=FLAGS.num_cpu_devices,
                                  port=FLAGS.port)


def run_main(main):
  """Runs an absl main, turning ElboEngineError into a message and exit code 2."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from absl import app

  def wrapped(argv):
    try:
      return main(argv)
    except errors.ElboEngineError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)

  app.run(wrapped)
