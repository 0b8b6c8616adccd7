"""Bayesian neural networks by variational inference (Bayes by Backprop).

A mean-field Gaussian posterior q(W | theta) over every kernel (models/variational.py)
is trained by minimizing the variational free energy of the training set,

    F(theta) = sum_n E_q[-log p(y_n | x_n, W)] + KL(q(W | theta) || p(W)).

THE LOSS PER EXAMPLE. The engine averages per-example losses over the global batch,
so a minibatch's loss is

    mean_b -log p(y_b | x_b, W~q)  +  w_i * KL(q || p),

with w_i = 1 / N for `--kl_schedule=uniform` (N = training-set size) or Blundell's
pi_i * M / N for `--kl_schedule=blundell`; summed over one epoch's minibatches (times
their size) this is F. The KL is scaled in exactly one place
(`engine.objectives.kl_per_example_weight`). The most common mistake with these
layers is to add the whole KL to a per-example mean loss (counting it N times), or
to forget it; the figure the logs call 'elbo' is -F / N, per example, in nats.

Tasks: 'classification' (categorical likelihood, Fashion-MNIST classes, optionally a
subset with `--train_classes`; the other classes become an out-of-distribution set)
and 'rotation_regression' (predict the angle in degrees of a rotated image, drawn
uniformly in [-max_angle, max_angle]; Gaussian likelihood with a learned noise
scale, as in MATLAB's "Train Bayesian Neural Network" example).

Layers (`--bnn_layer`): reparameterization | flipout | local_reparameterization,
and two baselines of the same architecture trained by the same engine:
'deterministic' (point estimates) and 'mc_dropout' (dropout kept on at test time).
"""
import dataclasses
import math
import os
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from engine import datasets
from engine import errors
from engine import evaluation
from engine import inputs
from engine import metrics as metrics_lib
from engine import objectives
from engine import plots
from engine import sampling
from engine import tasks
from models import bias
from models import variational

tfd = tfp.distributions

TASKS = ('classification', 'rotation_regression')
ARCHITECTURES = ('mlp', 'lenet')
LAYERS = variational.ESTIMATORS + ('deterministic', 'mc_dropout')
PRIORS = ('normal', 'scale_mixture')
NUM_ROTATED_TEST = 2000  # test images per angle of the rotated-test table
NUM_NOISE_OOD = 2000


@dataclasses.dataclass(frozen=True)
class BNNConfig:
  """The BNN's task, architecture, prior and posterior. Field names are flag names.

  Attributes:
    task: 'classification' or 'rotation_regression'.
    architecture: 'mlp' (hidden sizes from `hidden_sizes`) or 'lenet' (LeNet-5:
      conv 6@5x5, pool, conv 16@5x5, pool, dense 120, 84).
    hidden_sizes: the MLP's hidden layer sizes.
    bnn_layer: the variational estimator, or a baseline (see module docstring).
    prior: 'normal' (N(0, prior_sigma^2)) or 'scale_mixture' (pi N(0, sigma1^2) +
      (1 - pi) N(0, sigma2^2); Monte Carlo KL from the step's weight sample).
    prior_sigma, sigma1, sigma2, pi: the prior's parameters.
    learn_prior: learn the prior's scales too (empirical Bayes).
    posterior_rho_init: initial rho of every weight; the posterior std starts at
      softplus(rho) (-5: 0.0067), or exp(rho) with posterior_scale='exp' (-5:
      0.0067 as well), small so that training starts near a point estimate.
    posterior_scale: how rho maps to the posterior std: 'softplus' (softplus(rho),
      the default) or 'exp' (rho is log(sigma): cheaper per weight; see
      `variational.posterior_scale` and benchmarks/RESULTS.md for what it saves).
    kl_schedule: 'uniform' (KL / N per example) or 'blundell'.
    kl_warmup_steps: the KL weight ramps linearly from 0 over these steps.
    num_mc_samples: weight samples per test example for predictions.
    train_classes: classes to train on (empty: all); the rest are an OOD set.
    max_angle: rotation range in degrees for 'rotation_regression'.
    dropout_rate: dropout rate of the 'mc_dropout' baseline.
    ood_data_dir: an IDX data set (its test images) to use as an OOD set, or ''.
  """
  task: str = 'classification'
  architecture: str = 'mlp'
  hidden_sizes: Tuple[int, ...] = (400, 400)
  bnn_layer: str = 'flipout'
  prior: str = 'normal'
  prior_sigma: float = 1.0
  sigma1: float = 1.0
  sigma2: float = math.exp(-6.0)
  pi: float = 0.5
  learn_prior: bool = False
  posterior_rho_init: float = -5.0
  posterior_scale: str = 'softplus'
  kl_schedule: str = 'uniform'
  kl_warmup_steps: int = 0
  num_mc_samples: int = 10
  train_classes: Tuple[int, ...] = ()
  max_angle: float = tasks.DEFAULT_MAX_ANGLE
  dropout_rate: float = 0.1
  ood_data_dir: Optional[str] = ''

  # Fields that shape only evaluation: a checkpoint may be evaluated with other values.
  EVALUATION_FIELDS = ('num_mc_samples', 'ood_data_dir')

  def __post_init__(self):
    for name, value, choices in (('task', self.task, TASKS),
                                 ('architecture', self.architecture, ARCHITECTURES),
                                 ('bnn_layer', self.bnn_layer, LAYERS),
                                 ('prior', self.prior, PRIORS),
                                 ('posterior_scale', self.posterior_scale,
                                  variational.POSTERIOR_SCALES),
                                 ('kl_schedule', self.kl_schedule, objectives.KL_SCHEDULES)):
      if value not in choices:
        raise errors.ConfigError(
            f'--{name}={value!r} is not known; choose one of: {", ".join(choices)}.')
    if not self.hidden_sizes or any(not isinstance(h, int) or h <= 0
                                    for h in self.hidden_sizes):
      raise errors.ConfigError(
          f'--hidden_sizes={",".join(map(str, self.hidden_sizes))}: give one or more '
          f'positive integers, e.g. 400,400.')
    for name in ('prior_sigma', 'sigma1', 'sigma2'):
      value = getattr(self, name)
      if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise errors.ConfigError(f'--{name}={value!r}: must be a positive number.')
    if not 0.0 < self.pi < 1.0:
      raise errors.ConfigError(f'--pi={self.pi!r}: the mixture weight must be in (0, 1).')
    if not math.isfinite(self.posterior_rho_init):
      raise errors.ConfigError(f'--posterior_rho_init={self.posterior_rho_init!r}: '
                               f'must be finite (e.g. -5).')
    for name in ('num_mc_samples',):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise errors.ConfigError(f'--{name}={value!r}: must be a positive integer.')
    if not isinstance(self.kl_warmup_steps, int) or self.kl_warmup_steps < 0:
      raise errors.ConfigError(
          f'--kl_warmup_steps={self.kl_warmup_steps!r}: must be an integer >= 0.')
    if not 0.0 <= self.dropout_rate < 1.0:
      raise errors.ConfigError(f'--dropout_rate={self.dropout_rate!r}: must be in [0, 1).')
    if self.bnn_layer == 'local_reparameterization' and self.prior == 'scale_mixture':
      raise errors.ConfigError(
          '--bnn_layer=local_reparameterization samples pre-activations, not weights, '
          'so there is no weight sample for the Monte Carlo KL that '
          '--prior=scale_mixture needs. Use --bnn_layer=reparameterization or flipout '
          'with the scale mixture, or --prior=normal.')
    if self.task == 'rotation_regression' and self.train_classes:
      raise errors.ConfigError(
          '--train_classes applies to --task=classification; drop it for '
          'rotation_regression.')
    if not 0.0 < self.max_angle <= 180.0:
      raise errors.ConfigError(f'--max_angle={self.max_angle!r}: must be in (0, 180].')

  @property
  def variational(self):
    return self.bnn_layer in variational.ESTIMATORS


Config = BNNConfig


class BNN(tf.Module):
  """A Bayesian MLP or LeNet-5 whose forward pass returns (outputs, total KL)."""

  def __init__(self, config: BNNConfig, *, image_shape, num_outputs, num_train,
               global_batch_size, seed=0, target_scale=1.0, name='bnn'):
    """Builds the network.

    Args:
      config: the BNNConfig.
      image_shape: (H, W, C).
      num_outputs: classes (classification) or 1 (regression).
      num_train: N, the training-set size (scales the KL per example).
      global_batch_size: B (for the Blundell schedule's minibatches per epoch).
      seed: initialiser and noise-salt seed.
      target_scale: regression only: the network predicts target / target_scale.
    """
    super().__init__(name=name)
    self.config = config
    self.image_shape = tuple(int(s) for s in image_shape)
    self.num_outputs = int(num_outputs)
    self.num_train = int(num_train)
    self.global_batch_size = int(global_batch_size)
    self.target_scale = float(target_scale)
    self.regression = config.task == 'rotation_regression'
    if config.prior == 'normal':
      self.prior = variational.NormalPrior(config.prior_sigma, learnable=config.learn_prior)
    else:
      self.prior = variational.ScaleMixturePrior(config.sigma1, config.sigma2, config.pi,
                                                 learnable=config.learn_prior)
    self.layers = []  # (kind, layer): kind in dense | conv | pool | flatten
    base = seed * 1000
    if config.architecture == 'lenet':
      self._add('conv', 6, 5, 'same', 'relu', base + 1)
      self.layers.append(('pool', tf_keras.layers.MaxPool2D(2, name='pool0')))
      self._add('conv', 16, 5, 'valid', 'relu', base + 2)
      self.layers.append(('pool', tf_keras.layers.MaxPool2D(2, name='pool1')))
      self.layers.append(('flatten', tf_keras.layers.Flatten(name='flatten')))
      hidden = (120, 84)
    else:
      self.layers.append(('flatten', tf_keras.layers.Flatten(name='flatten')))
      hidden = config.hidden_sizes
    for i, h in enumerate(hidden):
      self._add('dense', h, None, None, 'relu', base + 10 + i)
    self._add('dense', self.num_outputs, None, None, None, base + 99, output=True)
    if self.regression:
      # Observation noise (in units of target / target_scale), learned.
      self.log_noise_scale = tf.Variable(math.log(0.5), name='log_noise_scale')
    self._build_variables()

  def _add(self, kind, size, kernel, padding, activation, seed, output=False):
    cfg = self.config
    name = f'{kind}{len([k for k, _ in self.layers if k == kind])}'
    # The output layer computes in float32 (the logits feed float32 distributions).
    extra = {'dtype': 'float32'} if output else {}
    if cfg.variational:
      common = dict(estimator=cfg.bnn_layer, prior=self.prior, activation=activation,
                    seed=seed, posterior_rho_init=cfg.posterior_rho_init,
                    posterior_scale=cfg.posterior_scale, name=name, **extra)
      if kind == 'dense':
        layer = variational.VariationalDense(size, **common)
      else:
        layer = variational.VariationalConv2D(size, kernel, padding=padding, **common)
    else:
      init = tf_keras.initializers.GlorotUniform(seed=seed)
      if kind == 'dense':
        layer = tf_keras.layers.Dense(size, activation=activation, kernel_initializer=init,
                                      name=name, **extra)
      else:
        layer = bias.Conv2D(size, kernel, padding=padding, activation=activation,
                            kernel_initializer=init, name=name, **extra)
    self.layers.append((kind, layer))

  def _build_variables(self):
    x = tf.zeros((1,) + self.image_shape)
    self.forward(x, noise=None)

  @property
  def weight_layers(self):
    return [layer for kind, layer in self.layers if kind in ('dense', 'conv')]

  @property
  def _weight_noise_layers(self):
    """The variational layers that draw a kernel-shaped normal shared by the batch."""
    if not self.config.variational:
      return []
    return [layer for layer in self.weight_layers if layer.draws_weight_noise]

  @property
  def draws_shared_noise(self):
    """Whether `shared_noise` has anything to draw (engine/step.py)."""
    return bool(self._weight_noise_layers)

  def shared_noise(self, noise):
    """The step's weight noise, drawn apart from the step (engine/step.py).

    Returns {layer name: eps} for the layers that draw a kernel-shaped normal shared
    by the batch (`VariationalDense.weight_noise`); passed back to `train_terms` as
    `shared_noise`, it gives exactly the weights an inline draw would.
    """
    return {layer.name: layer.weight_noise(noise) for layer in self._weight_noise_layers}

  def forward(self, x, noise, shared_noise=None):
    """(outputs [B, num_outputs] float32, KL(q || p) float32 scalar) for one pass.

    noise: an `engine.sampling.Noise` (one sample of the weights / dropout masks), or
      None for the posterior-mean (deterministic) network, for prediction only: the
      KL returned is then 0 (not computed), so never train with noise=None.
    shared_noise: optional `shared_noise(noise)`, drawn beforehand.
    """
    cfg = self.config
    shared_noise = shared_noise or {}
    kls = []
    h = x
    dense_layers = [layer for kind, layer in self.layers if kind == 'dense']
    for index, (kind, layer) in enumerate(self.layers):
      if kind in ('pool', 'flatten'):
        h = layer(h)
        continue
      if cfg.variational:
        if noise is None:
          h = layer(h)
        else:
          h, kl = layer.apply_with_kl(h, noise, shared_noise.get(layer.name))
          kls.append(kl)
      else:
        h = layer(h)
        if (cfg.bnn_layer == 'mc_dropout' and noise is not None and kind == 'dense'
            and layer is not dense_layers[-1]):
          h = _dropout(h, cfg.dropout_rate, noise.fold(1000 + index))
    return tf.cast(h, tf.float32), variational.sum_kl(kls)

  def kl_weight(self, step):
    """Per-example KL weight: the schedule's w_i times the warm-up factor."""
    cfg = self.config
    w = objectives.kl_per_example_weight(
        step, num_examples=self.num_train, global_batch_size=self.global_batch_size,
        schedule=cfg.kl_schedule)
    return w * objectives.kl_warmup_weight(step, cfg.kl_warmup_steps)

  def likelihood(self, outputs):
    """p(y | x, W) from the network's outputs (float32)."""
    if self.regression:
      return tfd.Normal(loc=outputs[:, 0] * self.target_scale,
                        scale=tf.exp(self.log_noise_scale) * self.target_scale)
    return tfd.Categorical(logits=outputs)

  @property
  def measurement_keys(self):
    keys = ('nll', 'kl', 'kl_weight', 'elbo')
    return keys + (('sq_error',) if self.regression else ('accuracy',))

  def loss_terms(self, batch, *, noise, kl_weight, shared_noise=None):
    """(per-example NLL [B], kl_weight * KL, measurements) for one batch and noise."""
    outputs, kl = self.forward(batch['image'], noise, shared_noise)
    likelihood = self.likelihood(outputs)
    target = batch['target']
    nll = -likelihood.log_prob(tf.cast(target, tf.float32) if self.regression else target)
    measurements = {'nll': nll, 'kl': kl, 'kl_weight': kl_weight,
                    # per example: -(NLL + KL / N), whatever the schedule
                    'elbo': -(nll + kl / self.num_train)}
    if self.regression:
      measurements['sq_error'] = tf.square(likelihood.mean() - tf.cast(target, tf.float32))
    else:
      measurements['accuracy'] = tf.cast(
          tf.equal(tf.argmax(outputs, axis=-1, output_type=tf.int32),
                   tf.cast(target, tf.int32)), tf.float32)
    return nll, kl_weight * kl, measurements

  def train_terms(self, batch, *, noise, step, shared_noise=None):
    """The engine's entry point (see engine/step.py)."""
    return self.loss_terms(batch, noise=noise, kl_weight=self.kl_weight(step),
                           shared_noise=shared_noise)

  def predict(self, x, noise, num_samples):
    """Monte-Carlo predictions, batch first.

    Returns:
      classification: {'probs': [B, S, K]}; regression: {'mean': [B, S],
      'stddev': [B, S]} in target units. Deterministic networks give S = 1.
    """
    samples = num_samples if self.config.bnn_layer != 'deterministic' else 1
    outs = []
    for s in range(samples):
      out, _ = self.forward(x, None if self.config.bnn_layer == 'deterministic'
                            else noise.fold(s))
      outs.append(out)
    outs = tf.stack(outs, axis=1)  # [B, S, out]
    if self.regression:
      mean = outs[..., 0] * self.target_scale
      std = tf.fill(tf.shape(mean), tf.exp(self.log_noise_scale) * self.target_scale)
      return {'mean': mean, 'stddev': std}
    return {'probs': tf.nn.softmax(outs, axis=-1)}


def _dropout(h, rate, noise):
  """Inverted dropout with a stateless per-example mask."""
  if rate == 0.0:
    return h
  shape = [tf.shape(h)[0]] + h.shape.as_list()[1:]
  return sampling.inverted_dropout(h, rate, noise.uniform(shape))


# ----------------------------------------------------------------------- hooks


def prepare_data(config: BNNConfig, dataset, *, data_config, seed):
  """ImageDataset -> TaskData for the task; OOD sets go in `extras`."""
  del data_config
  test_float = lambda images: images.astype(np.float32) / 255.0
  extras = {}
  if config.task == 'rotation_regression':
    rot = tasks.rotation_regression(dataset, seed=seed, max_angle=config.max_angle)
    return inputs.TaskData(
        name=f'{dataset.name}_rotation', source=dataset.source,
        train_images=rot.train_images, train_targets=rot.train_angles.astype(np.float32),
        test_images=test_float(rot.test_images),
        test_targets=rot.test_angles.astype(np.float32),
        extras={'max_angle': config.max_angle})
  train_x, train_y = dataset.train_images, dataset.train_labels.astype(np.int32)
  test_x, test_y = dataset.test_images, dataset.test_labels.astype(np.int32)
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  if config.train_classes:
    train = tasks.select_classes(train_x, train_y, config.train_classes,
                                 num_classes=num_classes)
    test = tasks.select_classes(test_x, test_y, config.train_classes,
                                num_classes=num_classes)
    train_x, train_y = train.images, train.labels.astype(np.int32)
    test_x, test_y = test.images, test.labels.astype(np.int32)
    extras['ood_held_out_classes'] = test_float(test.ood_images)
    num_classes = len(config.train_classes)
  extras['num_classes'] = num_classes
  extras['ood_uniform_noise'] = test_float(tasks.uniform_noise_images(
      min(NUM_NOISE_OOD, len(test_x)), dataset.image_shape, seed + 17))
  if config.ood_data_dir:
    other = datasets.load_dataset('idx', data_dir=config.ood_data_dir)
    if other.image_shape != dataset.image_shape:
      raise errors.DataError(
          f'--ood_data_dir={config.ood_data_dir} holds {other.image_shape} images, but '
          f'the training data is {dataset.image_shape}; give a set of the same shape.')
    extras['ood_' + os.path.basename(os.path.normpath(config.ood_data_dir))] = (
        test_float(other.test_images))
  return inputs.TaskData(name=dataset.name, source=dataset.source, train_images=train_x,
                         train_targets=train_y, test_images=test_float(test_x),
                         test_targets=test_y, extras=extras)


def build(config: BNNConfig, *, task_data, seed=0, global_batch_size=128):
  """Factory used by the model registry."""
  regression = config.task == 'rotation_regression'
  return BNN(config, image_shape=task_data.image_shape,
             num_outputs=1 if regression else task_data.extras['num_classes'],
             num_train=task_data.num_train, global_batch_size=global_batch_size,
             seed=seed, target_scale=config.max_angle if regression else 1.0)


def _predictor(exp):
  model, s = exp.model, exp.config.model_options.num_mc_samples
  return evaluation.Predictor(exp, lambda batch, noise: model.predict(batch['image'], noise, s))


def _classification_figures(probs, labels):
  summary = metrics_lib.predictive_summary(np.transpose(probs, (1, 0, 2)))
  mean_probs = summary['mean_probs']
  return summary, {
      'accuracy': metrics_lib.accuracy(mean_probs, labels),
      'nll': metrics_lib.nll(mean_probs, labels),
      'brier': metrics_lib.brier(mean_probs, labels),
      'ece': metrics_lib.expected_calibration_error(mean_probs, labels),
      'predictive_entropy': float(summary['predictive_entropy'].mean()),
      'expected_entropy': float(summary['expected_entropy'].mean()),
      'mutual_information': float(summary['mutual_information'].mean()),
  }


def evaluate(exp, *, final=True):
  """Monte-Carlo test figures; at the end also OOD, rotation and reliability figures.

  Returns a metrics dict; the key 'images' (popped by the controller) maps names
  to uint8 RGB images written as PNG files and TensorBoard images, and at the end
  'per_example' maps 'nll', 'correct' and 'brier' (regression: 'nll' and
  'squared_error') to every test example's figure, in test-set order.
  """
  task, model = exp.task, exp.model
  out = {'num_examples': int(task.test_images.shape[0]),
         'num_mc_samples': exp.config.model_options.num_mc_samples}
  predict = _predictor(exp)
  pred = predict(task.test_images)
  if model.regression:
    means, stds = pred['mean'].T, pred['stddev'].T  # [S, N]
    y = task.test_targets
    mean, _ = metrics_lib.mixture_mean_and_stddev(means, stds)
    out['rmse'] = metrics_lib.rmse(mean, y)
    out['nll'] = metrics_lib.gaussian_mixture_nll(means, stds, y)
    coverage = metrics_lib.gaussian_mixture_interval_coverage(means, stds, y)
    for level, frac in coverage.items():
      out[f'coverage_{int(round(level * 100))}'] = float(frac)
    out['noise_scale'] = float(np.exp(model.log_noise_scale.numpy()) * model.target_scale)
    if final:  # every test example's figures, for paired comparisons (bin/compare.py)
      out['per_example'] = {
          'nll': metrics_lib.gaussian_mixture_nll_per_example(means, stds, y),
          'squared_error': (mean - y) ** 2}
    return out
  labels = task.test_targets
  summary, figures = _classification_figures(pred['probs'], labels)
  out.update(figures)
  if not final:
    return out
  mean_probs = summary['mean_probs']
  out['per_example'] = {'nll': metrics_lib.nll_per_example(mean_probs, labels),
                        'correct': metrics_lib.correct_per_example(mean_probs, labels),
                        'brier': metrics_lib.brier_per_example(mean_probs, labels)}
  rel = metrics_lib.reliability(mean_probs, labels)
  images = {'reliability_diagram': plots.reliability_diagram(
      rel['counts'], rel['accuracies'], rel['confidences'])}
  out['reliability'] = {k: np.asarray(v).tolist() for k, v in rel.items()}
  # Out-of-distribution sets: higher entropy / mutual information = more likely OOD.
  for name, ood_images in task.extras.items():
    if not name.startswith('ood_'):
      continue
    ood = predict(ood_images)
    ood_summary = metrics_lib.predictive_summary(np.transpose(ood['probs'], (1, 0, 2)))
    for score in ('predictive_entropy', 'mutual_information'):
      key = f'{name[4:]}_{score}'
      out[f'ood/{key}_auroc'] = metrics_lib.auroc(summary[score], ood_summary[score])
      out[f'ood/{key}_aupr'] = metrics_lib.aupr(summary[score], ood_summary[score])
  # Rotated test images: accuracy, ECE and mean entropy as the angle grows.
  n = min(NUM_ROTATED_TEST, len(labels))
  uint8 = np.rint(task.test_images[:n] * 255).astype(np.uint8)
  rows = []
  for angle, rotated in tasks.rotated_test_sets(uint8, labels[:n]):
    rp = predict(rotated.astype(np.float32) / 255.0)
    _, fig = _classification_figures(rp['probs'], labels[:n])
    rows.append({'angle': float(angle), 'accuracy': fig['accuracy'], 'ece': fig['ece'],
                 'predictive_entropy': fig['predictive_entropy'],
                 'mutual_information': fig['mutual_information']})
  out['rotated'] = rows
  images['rotated_test'] = plots.line_plot(
      [r['angle'] for r in rows],
      {k: [r[k] for r in rows] for k in ('accuracy', 'ece', 'predictive_entropy')},
      scale='shared')
  out['images'] = images
  return out


def summary_line(metrics):
  if 'rmse' in metrics:
    return (f'test RMSE {metrics["rmse"]:.2f} deg, NLL {metrics["nll"]:.3f}, interval '
            f'coverage 50/70/95%: {metrics["coverage_50"]:.3f}/{metrics["coverage_70"]:.3f}/'
            f'{metrics["coverage_95"]:.3f} ({metrics["num_mc_samples"]} weight samples)')
  line = (f'test accuracy {100 * metrics["accuracy"]:.2f}%, NLL {metrics["nll"]:.4f}, '
          f'Brier {metrics["brier"]:.4f}, ECE {metrics["ece"]:.4f} '
          f'({metrics["num_mc_samples"]} weight samples)')
  ood = [f'{k[4:]} {v:.3f}' for k, v in metrics.items()
         if k.startswith('ood/') and k.endswith('_auroc')]
  if ood:
    line += '; OOD AUROC: ' + ', '.join(ood)
  return line


def write_summaries(exp, writers, step):
  """Histograms of each layer's posterior standard deviations."""
  if not writers.enabled or not exp.config.model_options.variational:
    return
  with writers.eval.as_default(step=step):
    for layer in exp.model.weight_layers:
      tf.summary.histogram(f'posterior_stddev/{layer.name}',
                           variational.posterior_stddevs(layer), step=step)
