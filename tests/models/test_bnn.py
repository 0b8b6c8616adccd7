"""Tests of models.bnn: the loss per example, the KL, gradients, uncertainty, evaluation.

The correctness tests of the BNN issue: summed over one epoch the minibatch losses
give the full-data negative ELBO (for both KL schedules), the network KL counts
every kernel once, every posterior (and learnable prior) variable is trained through the
engine, uncertainty grows away from the data, and the end-to-end evaluation writes
its figures. Models are tiny and the data set is `synthetic`, without XLA.
"""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from engine import config as config_lib
from engine import controller
from engine import datasets
from engine import errors
from engine import evaluation
from engine import metrics as metrics_lib
from engine import objectives
from engine import sampling
from engine import tasks
from models import bnn
from models import variational

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _options(**overrides):
  """A tiny BNNConfig; keyword arguments override the fields."""
  fields = dict(hidden_sizes=(8,))
  fields.update(overrides)
  return bnn.BNNConfig(**fields)


def _noise(a, b=0):
  return sampling.Noise(tf.constant([a, b], tf.int32))


def _model(options, *, num_train=64, batch_size=16, seed=0):
  """(model, task) on a synthetic set of `num_train` examples, built outside the engine."""
  data = datasets.load_dataset('synthetic', seed=0, num_train=num_train, num_test=16)
  task = bnn.prepare_data(options, data, data_config=None, seed=0)
  model = bnn.build(options, task_data=task, seed=seed, global_batch_size=batch_size)
  return model, task


def _batch(task, start=0, stop=None):
  """Training examples [start:stop] as the engine feeds them (floats in [0, 1])."""
  return {'image': tf.constant(task.train_images[start:stop].astype(np.float32) / 255.0),
          'target': tf.constant(task.train_targets[start:stop])}


def _experiment_config(model_dir, options, *, steps=1, train_size=64, test_size=16,
                       batch_size=16, learning_rate=1e-3, eval_batch_size=16, seed=0):
  return config_lib.ExperimentConfig(
      model='bnn', model_options=options,
      data=config_lib.DataConfig(dataset='synthetic', synthetic_train_size=train_size,
                                 synthetic_test_size=test_size),
      train=config_lib.TrainConfig(
          model_dir=str(model_dir), train_steps=steps, batch_size=batch_size,
          learning_rate=learning_rate, steps_per_loop=steps, eval_every=steps,
          checkpoint_every=steps, jit_compile=False, eval_batch_size=eval_batch_size,
          eval_iw_samples=0, seed=seed))


# ---------------------------------------------------------------------------------
# The loss per example: one epoch of minibatch losses is the full-data free energy.


@pytest.mark.parametrize('prior', ['normal', 'scale_mixture'])
@pytest.mark.parametrize('schedule', ['uniform', 'blundell'])
def test_one_epoch_of_minibatch_losses_sums_to_the_full_data_negative_elbo(schedule, prior):
  """N = 64 examples, B = 16, M = 4 minibatches, one fixed weight sample (the
  reparameterization layer and one Noise for every minibatch): summing each
  minibatch's loss (as `replica_loss` reduces it, 1 replica) times B over the epoch
  gives sum_n NLL_n + KL, the KL counted exactly once, for either schedule."""
  n, b = 64, 16
  m = n // b
  options = _options(bnn_layer='reparameterization', kl_schedule=schedule, prior=prior)
  model, task = _model(options, num_train=n, batch_size=b)
  assert model.num_train == n
  noise = _noise(3, 1)
  total = 0.0
  kl_weights = []
  for i in range(m):
    per_example, regularization, measurements = model.train_terms(
        _batch(task, i * b, (i + 1) * b), noise=noise, step=tf.constant(i, tf.int64))
    assert per_example.shape == [b] and regularization.shape == []
    loss = objectives.replica_loss(per_example, regularization, global_batch_size=b,
                                   num_replicas=1)
    total += float(loss) * b
    kl_weights.append(float(measurements['kl_weight']))
  outputs, kl = model.forward(_batch(task)['image'], noise)
  full_nll = -model.likelihood(outputs).log_prob(_batch(task)['target'])
  free_energy = float(tf.reduce_sum(full_nll)) + float(kl)
  # The KL dominates (thousands of nats against ~150 of NLL): a KL counted twice,
  # or not at all, or N times, is far outside this tolerance.
  assert float(kl) > 10 * float(tf.reduce_sum(full_nll)) > 0
  np.testing.assert_allclose(total, free_energy, rtol=1e-5)
  np.testing.assert_allclose(b * sum(kl_weights), 1.0, rtol=1e-6)
  if schedule == 'blundell':  # early minibatches carry most of the KL
    assert all(a > 1.9 * c for a, c in zip(kl_weights, kl_weights[1:]))
  else:
    np.testing.assert_allclose(kl_weights, 1.0 / n, rtol=1e-7)


def test_blundell_weights_sum_to_one_and_do_not_overflow():
  """pi_i = w_i N / M sums to 1 over an epoch, halves from one minibatch to the next,
  and is finite for M = 468 (Fashion-MNIST at batch 128), where 2^M overflows; the
  schedule repeats every epoch."""
  for n, b in ((64, 16), (60000, 128), (10, 1)):
    m = n // b
    w = np.array([float(objectives.kl_per_example_weight(
        i, num_examples=n, global_batch_size=b, schedule='blundell'))
                  for i in range(2 * m)])
    pi = w * n / m
    assert np.all(np.isfinite(pi)) and np.all(pi >= 0)
    np.testing.assert_allclose(pi[:m].sum(), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(pi[:m], pi[m:])  # the next epoch starts over
    np.testing.assert_allclose(pi[0], 0.5 / (1.0 - 2.0 ** -m), rtol=1e-6)
    np.testing.assert_allclose(pi[1:min(m, 20)] / pi[:min(m, 20) - 1], 0.5, rtol=1e-5)


# ---------------------------------------------------------------------------------
# The KL of the whole network.


def _kernels(model):
  return [(layer.kernel_loc.numpy().astype(np.float64),
           layer.kernel_scale.numpy().astype(np.float64)) for layer in model.weight_layers]


@pytest.mark.parametrize('layer', variational.ESTIMATORS)
@pytest.mark.parametrize('architecture', ['mlp', 'lenet'])
def test_network_kl_counts_every_kernel_once(layer, architecture):
  """With the normal prior the model's `kl` is the closed-form KL summed over every
  kernel of the network, each counted once, whatever the weight sample. (Monte Carlo
  against analytic and quadrature KLs per layer: tests/models/test_variational.py.)"""
  sigma = 0.5
  options = _options(hidden_sizes=(16, 8), architecture=architecture, bnn_layer=layer,
                     prior_sigma=sigma, posterior_rho_init=-2.0)
  model, task = _model(options)
  x = _batch(task, 0, 2)['image']
  kls = [float(model.forward(x, _noise(s))[1]) for s in range(2)]
  kernels = _kernels(model)
  assert len(kernels) == (5 if architecture == 'lenet' else 3)
  per_kernel = [np.sum(np.log(sigma / s) + (s ** 2 + m ** 2) / (2 * sigma ** 2) - 0.5)
                for m, s in kernels]
  assert min(per_kernel) > 0
  np.testing.assert_allclose(kls, sum(per_kernel), rtol=1e-5)


@pytest.mark.parametrize('architecture', ['mlp', 'lenet'])
def test_exp_posterior_scale_reaches_every_layer(architecture):
  """posterior_scale='exp' is passed to every variational layer: the network KL is
  the closed form with scale = exp(rho) of every kernel (rho spread over [-2, 0.5],
  where softplus(rho) is 5-35% smaller, so a layer left on softplus fails)."""
  sigma = 0.5
  options = _options(hidden_sizes=(16, 8), architecture=architecture, bnn_layer='flipout',
                     prior_sigma=sigma, posterior_scale='exp')
  model, task = _model(options)
  rng = np.random.RandomState(0)
  per_kernel = []
  for layer in model.weight_layers:
    assert layer.posterior_scale == 'exp'
    layer.kernel_rho.assign(rng.uniform(-2.0, 0.5, layer.kernel_rho.shape).astype(np.float32))
    m = layer.kernel_loc.numpy().astype(np.float64)
    s = np.exp(layer.kernel_rho.numpy().astype(np.float64))
    per_kernel.append(np.sum(np.log(sigma / s) + (s ** 2 + m ** 2) / (2 * sigma ** 2) - 0.5))
  _, kl = model.forward(_batch(task, 0, 2)['image'], _noise(1))
  np.testing.assert_allclose(float(kl), sum(per_kernel), rtol=1e-5)


# ---------------------------------------------------------------------------------
# Gradients through the engine.

GRADIENT_CASES = {
    'reparameterization_mlp': dict(bnn_layer='reparameterization', learn_prior=True),
    'flipout_mlp': dict(bnn_layer='flipout', learn_prior=True),
    'local_reparameterization_mlp': dict(bnn_layer='local_reparameterization',
                                         learn_prior=True),
    'scale_mixture_mlp': dict(bnn_layer='reparameterization', prior='scale_mixture',
                              learn_prior=True),
    'reparameterization_lenet': dict(bnn_layer='reparameterization', architecture='lenet'),
    'flipout_lenet': dict(bnn_layer='flipout', architecture='lenet'),
    'local_reparameterization_lenet': dict(bnn_layer='local_reparameterization',
                                           architecture='lenet', learn_prior=True),
}


def test_exp_posterior_scale_trains_through_the_engine(tmp_path, default_strategy):
  """A tiny BNN with posterior_scale='exp' trains a few engine steps: finite loss and
  KL, every kernel_loc and kernel_rho changed, and the KL measured is the closed
  form with scale = exp(rho)."""
  options = _options(hidden_sizes=(16,), bnn_layer='flipout', posterior_scale='exp')
  exp = controller.build(_experiment_config(tmp_path, options, steps=5), default_strategy)
  watched = [v for v in exp.model.trainable_variables if 'kernel_' in v.name]
  assert len(watched) == 4
  before = [v.numpy() for v in watched]
  train_loop, iterator = controller.make_train_loop(exp)
  means, done, bad = train_loop(iterator, tf.constant(5, tf.int64))
  assert int(done) == 5 and int(bad) == -1
  assert np.isfinite(float(means['loss'])) and np.isfinite(float(means['kl']))
  for v, old in zip(watched, before):
    assert not np.array_equal(v.numpy(), old), f'{v.name} did not change'
    assert np.all(np.isfinite(v.numpy())), v.name
  _, kl = exp.model.forward(_batch(exp.task, 0, 2)['image'], _noise(1))
  expected = sum(
      np.sum(-np.log(s) + (s ** 2 + m ** 2) / 2.0 - 0.5)
      for m, s in ((layer.kernel_loc.numpy().astype(np.float64),
                    np.exp(layer.kernel_rho.numpy().astype(np.float64)))
                   for layer in exp.model.weight_layers))
  np.testing.assert_allclose(float(kl), expected, rtol=1e-5)


@pytest.mark.parametrize('case', sorted(GRADIENT_CASES))
def test_one_engine_step_trains_every_posterior_and_prior_variable(case, tmp_path,
                                                                   default_strategy):
  """Built by `controller.build`, one step of `controller.make_train_loop` changes every
  kernel_loc and kernel_rho (and the learnable prior's log-sigmas); and a direct tape
  over the engine's loss gives every trainable variable a non-None, non-zero gradient."""
  options = _options(hidden_sizes=(16, 8), **GRADIENT_CASES[case])
  exp = controller.build(_experiment_config(tmp_path, options), default_strategy)
  variables = exp.model.trainable_variables
  names = [v.name for v in variables]
  locs = [v for v in variables if 'kernel_loc' in v.name]
  rhos = [v for v in variables if 'kernel_rho' in v.name]
  priors = [v for v in variables if 'log_sigma' in v.name]
  num_layers = 5 if options.architecture == 'lenet' else len(options.hidden_sizes) + 1
  assert len(locs) == len(rhos) == num_layers, names
  expected_priors = (2 if options.prior == 'scale_mixture' else 1) if options.learn_prior else 0
  assert len(priors) == expected_priors, names  # one shared prior, listed once
  watched = locs + rhos + priors
  before = [v.numpy() for v in watched]
  train_loop, iterator = controller.make_train_loop(exp)
  _, done, bad = train_loop(iterator, tf.constant(1, tf.int64))
  assert int(done) == 1 and int(bad) == -1
  for v, old in zip(watched, before):
    assert not np.array_equal(v.numpy(), old), f'{v.name} did not change'
    assert np.all(np.isfinite(v.numpy())), v.name

  batch = _batch(exp.task, 0, 16)
  with tf.GradientTape() as tape:
    per_example, regularization, _ = exp.model.train_terms(
        batch, noise=_noise(5), step=tf.constant(0, tf.int64))
    loss = objectives.replica_loss(per_example, regularization, global_batch_size=16,
                                   num_replicas=1)
  grads = tape.gradient(loss, variables)
  for v, g in zip(variables, grads):
    assert g is not None, v.name
    assert np.all(np.isfinite(g.numpy())) and np.any(g.numpy() != 0), v.name


# ---------------------------------------------------------------------------------
# Uncertainty.


def _mean_mi(probs):
  """Mean mutual information of [S, N, K] Monte-Carlo probabilities."""
  return float(metrics_lib.predictive_summary(probs)['mutual_information'].mean())


def test_mutual_information_is_higher_far_from_the_data(tmp_path, default_strategy):
  """After 300 steps on a small image problem the epistemic uncertainty (mutual
  information between label and weights) is far higher on uniform-noise images than
  on the training images, while the posterior-mean network has none at all."""
  options = _options(hidden_sizes=(32,), bnn_layer='flipout')
  config = _experiment_config(tmp_path, options, steps=300, train_size=256,
                              batch_size=32, learning_rate=1e-2)
  exp = controller.build(config, default_strategy)
  train_loop, iterator = controller.make_train_loop(exp)
  means, _, bad = train_loop(iterator, tf.constant(300, tf.int64))
  assert int(bad) == -1 and float(means['accuracy']) > 0.8
  train_x = exp.task.train_images[:128].astype(np.float32) / 255.0
  far_x = np.random.default_rng(1).uniform(0.0, 1.0, train_x.shape).astype(np.float32)

  def mean_mi(x, noise):
    probs = exp.model.predict(tf.constant(x), noise, 16)['probs'].numpy()
    assert probs.shape == (x.shape[0], 16, 10)
    return _mean_mi(np.transpose(probs, (1, 0, 2)))

  near, far = mean_mi(train_x, _noise(9)), mean_mi(far_x, _noise(9))
  assert far > 2 * near > 0, (near, far)
  # Posterior-mean predictions have no weight uncertainty: the score is the weights'.
  outputs, _ = exp.model.forward(tf.constant(far_x), None)
  probs = tf.nn.softmax(outputs).numpy()[np.newaxis].repeat(4, axis=0)
  assert _mean_mi(probs) < 1e-6


# ---------------------------------------------------------------------------------
# Evaluation end to end.


def test_classification_train_and_evaluate_end_to_end(tmp_path, default_strategy):
  """`controller.train` with --train_classes returns the test figures, OOD AUROCs for
  the held-out classes and uniform noise, the rotated-test table, and writes the two
  figures as PNG files and a metrics.json without images."""
  options = _options(hidden_sizes=(16,), train_classes=(0, 1, 2, 3, 4), num_mc_samples=4)
  config = _experiment_config(tmp_path, options, steps=20, train_size=128, test_size=64,
                              eval_batch_size=64)
  logs = []
  metrics = controller.train(config, default_strategy, log=logs.append)
  assert metrics['num_examples'] == int(np.sum(
      datasets.load_dataset('synthetic', num_train=128, num_test=64).test_labels < 5))
  for key in ('accuracy', 'brier', 'ece'):
    assert 0.0 <= metrics[key] <= 1.0 + 1e-9, key
  assert np.isfinite(metrics['nll']) and metrics['nll'] > 0
  for ood in ('held_out_classes', 'uniform_noise'):
    for score in ('predictive_entropy', 'mutual_information'):
      value = metrics[f'ood/{ood}_{score}_auroc']
      assert 0.0 <= value <= 1.0, (ood, score)
  rows = metrics['rotated']
  assert [r['angle'] for r in rows] == [float(a) for a in tasks.DEFAULT_ROTATION_ANGLES]
  for row in rows:
    assert 0.0 <= row['accuracy'] <= 1.0 and row['predictive_entropy'] >= 0
  assert 'images' not in metrics
  for name in ('reliability_diagram.png', 'rotated_test.png'):
    with open(os.path.join(str(tmp_path), name), 'rb') as f:
      assert f.read(8) == PNG_SIGNATURE, name
  with open(os.path.join(str(tmp_path), controller.METRICS_FILE)) as f:
    written = json.load(f)
  assert written['accuracy'] == metrics['accuracy'] and 'images' not in written
  assert written['model'] == 'bnn' and written['step'] == 20
  assert any('OOD AUROC' in line for line in logs)


def test_rotation_regression_reports_rmse_and_interval_coverage(tmp_path, default_strategy):
  """The regression task trains and reports RMSE (degrees), NLL and the coverage of
  the 50/70/95% predictive intervals, each a fraction in [0, 1]."""
  options = _options(hidden_sizes=(16,), task='rotation_regression', num_mc_samples=4,
                     max_angle=30.0)
  config = _experiment_config(tmp_path, options, steps=20, train_size=64, test_size=32,
                              eval_batch_size=32)
  metrics = controller.train(config, default_strategy, log=lambda _: None)
  assert 0.0 < metrics['rmse'] < 2 * 30.0
  assert np.isfinite(metrics['nll']) and metrics['noise_scale'] > 0
  for level in (50, 70, 95):
    assert 0.0 <= metrics[f'coverage_{level}'] <= 1.0, level
  assert metrics['coverage_50'] <= metrics['coverage_70'] <= metrics['coverage_95']
  with open(os.path.join(str(tmp_path), controller.METRICS_FILE)) as f:
    assert json.load(f)['rmse'] == metrics['rmse']
  # Every test example's NLL and squared error: their means are the NLL and RMSE^2.
  figures, _, step = evaluation.read_per_example(str(tmp_path))
  assert step == 20 and sorted(figures) == ['nll', 'squared_error']
  assert figures['nll'].shape == (32,)
  assert figures['nll'].mean() == pytest.approx(metrics['nll'], rel=1e-5)
  assert figures['squared_error'].mean() == pytest.approx(metrics['rmse'] ** 2, rel=1e-5)


# ---------------------------------------------------------------------------------
# Configuration.


@pytest.mark.parametrize('overrides,flag', [
    (dict(bnn_layer='bogus'), '--bnn_layer='),
    (dict(task='segmentation'), '--task='),
    (dict(architecture='conv'), '--architecture='),
    (dict(prior='laplace'), '--prior='),
    (dict(kl_schedule='linear'), '--kl_schedule='),
    (dict(hidden_sizes=()), '--hidden_sizes='),
    (dict(hidden_sizes=(8, 0)), '--hidden_sizes='),
    (dict(prior_sigma=0.0), '--prior_sigma='),
    (dict(sigma1=-1.0), '--sigma1='),
    (dict(sigma2=float('inf')), '--sigma2='),
    (dict(pi=0.0), '--pi='),
    (dict(pi=1.5), '--pi='),
    (dict(num_mc_samples=0), '--num_mc_samples='),
    (dict(kl_warmup_steps=-1), '--kl_warmup_steps='),
    (dict(dropout_rate=1.0), '--dropout_rate='),
    (dict(max_angle=200.0), '--max_angle='),
    (dict(posterior_rho_init=float('nan')), '--posterior_rho_init='),
    (dict(posterior_scale='sigmoid'), "--posterior_scale='sigmoid' is not known"),
    (dict(bnn_layer='local_reparameterization', prior='scale_mixture'),
     '--bnn_layer=local_reparameterization'),
    (dict(task='rotation_regression', train_classes=(0, 1)), '--train_classes'),
])
def test_bad_config_names_the_flag(overrides, flag):
  with pytest.raises(errors.ConfigError) as info:
    _options(**overrides)
  assert flag in str(info.value)


@pytest.mark.parametrize('classes', [(0,), (0, 0, 1), (0, 10), tuple(range(10))])
def test_bad_train_classes_name_the_flag(classes):
  """--train_classes is checked against the data set when the data are prepared."""
  options = _options(train_classes=classes)
  data = datasets.load_dataset('synthetic', num_train=64, num_test=16)
  with pytest.raises(errors.ConfigError, match='--train_classes'):
    bnn.prepare_data(options, data, data_config=None, seed=0)


def test_train_classes_relabel_and_hold_out_the_rest():
  options = _options(train_classes=(7, 2))
  model, task = _model(options)
  assert set(np.unique(task.train_targets)) == {0, 1}
  assert task.extras['num_classes'] == 2 and model.num_outputs == 2
  data = datasets.load_dataset('synthetic', num_train=64, num_test=16)
  assert model.num_train == int(np.sum(np.isin(data.train_labels, (7, 2))))
  held_out = np.sum(~np.isin(data.test_labels, (7, 2)))
  assert task.extras['ood_held_out_classes'].shape[0] == held_out


# ---------------------------------------------------------------------------------
# Seeds and baselines.


@pytest.mark.parametrize('layer', ['reparameterization', 'flipout',
                                   'local_reparameterization', 'mc_dropout'])
def test_same_seed_same_loss_other_seed_other_loss(layer):
  """Two builds with one seed give the same loss on one batch and Noise; another
  build seed or another Noise gives another loss."""
  options = _options(bnn_layer=layer)

  def loss(seed, noise):
    model, task = _model(options, seed=seed)
    nll, reg, _ = model.loss_terms(_batch(task, 0, 16), noise=noise, kl_weight=1.0 / 64)
    return float(tf.reduce_mean(nll) + reg)

  first = loss(0, _noise(1))
  assert loss(0, _noise(1)) == first
  assert loss(1, _noise(1)) != first
  assert loss(0, _noise(2)) != first


@pytest.mark.parametrize('layer', ['deterministic', 'mc_dropout'])
def test_baselines_train_and_predict(layer, tmp_path, default_strategy):
  """The deterministic and MC-dropout baselines train through the same engine (no KL);
  MC dropout's predictions differ between samples, the deterministic network gives one."""
  options = _options(hidden_sizes=(16,), bnn_layer=layer, dropout_rate=0.3)
  exp = controller.build(_experiment_config(tmp_path, options, steps=10), default_strategy)
  assert not any('rho' in v.name for v in exp.model.trainable_variables)
  before = [v.numpy() for v in exp.model.trainable_variables]
  train_loop, iterator = controller.make_train_loop(exp)
  means, _, bad = train_loop(iterator, tf.constant(10, tf.int64))
  assert int(bad) == -1 and np.isfinite(float(means['loss']))
  assert float(means['kl']) == 0.0
  np.testing.assert_allclose(float(means['loss']), float(means['nll']), rtol=1e-6)
  assert all(not np.array_equal(b, v.numpy())
             for b, v in zip(before, exp.model.trainable_variables))
  probs = exp.model.predict(tf.constant(exp.task.test_images[:8]), _noise(4), 5)['probs']
  probs = probs.numpy()
  if layer == 'deterministic':
    assert probs.shape == (8, 1, 10)
  else:
    assert probs.shape == (8, 5, 10)
    assert _mean_mi(np.transpose(probs, (1, 0, 2))) > 1e-4


def test_ood_data_dir_is_an_out_of_distribution_set(tmp_path, default_strategy):
  """--ood_data_dir (any IDX set of the same image shape) adds OOD AUROC/AUPR figures
  named after the directory; a set of another image shape is refused naming the flag."""
  from engine import idx  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  ood_dir = tmp_path / 'other_set'
  ood_dir.mkdir()
  files = {'train-images-idx3-ubyte': rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
           'train-labels-idx1-ubyte': np.zeros(8, np.uint8),
           't10k-images-idx3-ubyte': rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
           't10k-labels-idx1-ubyte': np.zeros(12, np.uint8)}
  for name, array in files.items():
    idx.write_idx(str(ood_dir / name), array)
  options = _options(hidden_sizes=(16,), num_mc_samples=2, ood_data_dir=str(ood_dir))
  config = _experiment_config(tmp_path / 'run', options, steps=10, train_size=128,
                              test_size=32, eval_batch_size=32)
  metrics = controller.train(config, default_strategy, log=lambda *a: None)
  for score in ('predictive_entropy', 'mutual_information'):
    for stat in ('auroc', 'aupr'):
      assert 0.0 <= metrics[f'ood/other_set_{score}_{stat}'] <= 1.0
  small = tmp_path / 'small_set'
  small.mkdir()
  for name, array in files.items():
    idx.write_idx(str(small / name), array[:, :14, :14] if array.ndim == 3 else array)
  data = datasets.load_dataset('synthetic', seed=0, num_train=64, num_test=16)
  with pytest.raises(errors.DataError, match='--ood_data_dir='):
    bnn.prepare_data(_options(ood_data_dir=str(small)), data, data_config=None, seed=0)
