"""Tests of engine/loop.py: the compiled N-steps-per-call training loop.

The loop is assembled as controller.train assembles it, on a tiny VAE and the
synthetic data set.
"""
import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf

from engine import config as config_lib
from engine import controller
from engine import inputs
from engine import step as step_lib
from models import bnn
from models import vae

BATCH = 32


def _config(model_dir, *, pipeline='in_memory', learning_rate=1e-3):
  return config_lib.ExperimentConfig(
      model='vae',
      model_options=vae.VAEConfig(encoder_sizes=(32,), decoder_sizes=(32,), latent_dim=4),
      data=config_lib.DataConfig(dataset='synthetic', input_pipeline=pipeline,
                                 synthetic_train_size=256, synthetic_test_size=64),
      train=config_lib.TrainConfig(
          model_dir=str(model_dir), train_steps=40, batch_size=BATCH,
          learning_rate=learning_rate, steps_per_loop=10, eval_every=20,
          checkpoint_every=20, jit_compile=False, eval_batch_size=32, eval_iw_samples=4,
          iw_chunk_size=2, num_summary_images=4))


def _make_loop(model_dir, strategy, **kwargs):
  """(experiment, TrainLoop, iterator) wired like controller.train."""
  config = _config(model_dir, **kwargs)
  exp = controller.build(config, strategy)
  train_loop, iterator = controller.make_train_loop(exp)
  return exp, train_loop, iterator


def _call(train_loop, iterator, n):
  means, done, bad_step = train_loop(iterator, tf.constant(n, tf.int64))
  return {k: float(v) for k, v in means.items()}, int(done), int(bad_step)


def test_rejects_python_int(tmp_path, default_strategy):
  """A Python int num_steps is a TypeError (it would retrace per value); the step
  counter does not move."""
  exp, train_loop, iterator = _make_loop(tmp_path, default_strategy)
  with pytest.raises(TypeError, match='num_steps must be a Tensor'):
    train_loop(iterator, 3)
  with pytest.raises(TypeError):
    train_loop(iterator, np.int64(3))
  assert int(exp.step.numpy()) == 0


@pytest.mark.parametrize('strategy_name', ['default_strategy', 'mirrored_strategy'])
@pytest.mark.parametrize('pipeline', ['in_memory', 'tf_data'])
def test_call_advances_counter_by_n(tmp_path, request, strategy_name, pipeline):
  """One call with tf.constant(n) runs exactly n steps, advances the counter by n and
  returns finite means consistent with each other."""
  strategy = request.getfixturevalue(strategy_name)
  exp, train_loop, iterator = _make_loop(tmp_path, strategy, pipeline=pipeline)
  before = [v.numpy().copy() for v in exp.model.trainable_variables]
  means, done, bad_step = _call(train_loop, iterator, 5)
  assert (done, bad_step) == (5, -1)
  assert int(exp.step.numpy()) == 5
  assert int(exp.optimizer.iterations.numpy()) == 5
  assert set(means) == {'loss', 'grad_norm', 'kl_weight', 'distortion', 'rate', 'elbo'}
  for name, value in means.items():
    assert math.isfinite(value), name
  # Global (not per-replica) figures: the KL weight is 1 without warm-up, the ELBO
  # splits into rate and distortion, and with the analytic KL the loss is -ELBO.
  assert means['kl_weight'] == pytest.approx(1.0, abs=1e-6)
  assert means['elbo'] == pytest.approx(-(means['rate'] + means['distortion']), rel=1e-5)
  assert means['loss'] == pytest.approx(-means['elbo'], rel=1e-5)
  assert 50.0 < means['distortion'] < 2000.0  # nats for a 28x28 binary image
  assert means['rate'] >= 0.0 and means['grad_norm'] > 0.0
  after = [v.numpy() for v in exp.model.trainable_variables]
  assert any(not np.array_equal(a, b) for a, b in zip(before, after))
  means, done, bad_step = _call(train_loop, iterator, 3)
  assert (done, bad_step) == (3, -1)
  assert int(exp.step.numpy()) == 8


def test_single_steps_equal_one_call(tmp_path, default_strategy):
  """Three calls of one step end in the same weights as one call of three steps."""
  exp_a, loop_a, it_a = _make_loop(tmp_path / 'a', default_strategy)
  exp_b, loop_b, it_b = _make_loop(tmp_path / 'b', default_strategy)
  _call(loop_a, it_a, 3)
  for _ in range(3):
    _call(loop_b, it_b, 1)
  assert int(exp_a.step.numpy()) == int(exp_b.step.numpy()) == 3
  for a, b in zip(exp_a.model.trainable_variables, exp_b.model.trainable_variables):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize('calls', [(3, 1), (1, 4)])
@pytest.mark.parametrize('strategy_kind', ['default', 'mirrored_one_device'])
def test_gradient_norm_under_xla_matches_the_plain_step(tmp_path, default_strategy, calls,
                                                        strategy_kind):
  """Under XLA the last step of a call runs the program that measures the gradient
  norm (the others run one that does not): every figure, the norm included,
  matches the loop without XLA (where a tf.cond decides inside the step).

  Under MirroredStrategy (one device: XLA over several logical CPUs is not
  supported) the XLA step is one program, the gradient's all-reduce inside it: the
  default strategy's two programs chosen by a tf.cond would fail there (a
  merge_call inside a cond branch)."""
  strategy = (default_strategy if strategy_kind == 'default'
              else tf.distribute.MirroredStrategy(['/cpu:0']))
  runs = []
  for jit in (True, False):
    config = _config(tmp_path / str(jit))
    config = dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                                   jit_compile=jit))
    exp = controller.build(config, strategy)
    train_loop, iterator = controller.make_train_loop(exp)
    runs.append([_call(train_loop, iterator, n) for n in calls])
  for n, (m_jit, *rest_jit), (m_plain, *rest_plain) in zip(calls, *runs):
    assert rest_jit == rest_plain == [n, -1]
    assert m_jit['grad_norm'] > 0.0
    for key in m_plain:
      assert m_jit[key] == pytest.approx(m_plain[key], rel=1e-4), key


def test_nan_kernel_stops_at_that_step(tmp_path, default_strategy):
  """With a NaN weight the loss is NaN at the next step: the call stops there and
  reports it as bad_step, having run only that one step."""
  exp, train_loop, iterator = _make_loop(tmp_path, default_strategy)
  _, done, bad_step = _call(train_loop, iterator, 3)
  assert (done, bad_step) == (3, -1)
  # The output layer: no ReLU after it (a fused CPU MatMul+ReLU may map NaN to 0).
  kernel = exp.model.decoder.get_layer('decoder_out').kernel
  kernel.assign(tf.fill(kernel.shape, float('nan')))
  means, done, bad_step = _call(train_loop, iterator, 5)
  assert bad_step == 3
  assert done == 1
  assert int(exp.step.numpy()) == 4
  assert math.isnan(means['loss'])


def test_huge_learning_rate_stops_at_first_bad_step(tmp_path, default_strategy):
  """A learning rate of 1e30 makes a later step non-finite: bad_step is that step's
  index, done counts the steps up to and including it, and the counter agrees."""
  exp, train_loop, iterator = _make_loop(tmp_path, default_strategy, learning_rate=1e30)
  n = 10
  means, done, bad_step = _call(train_loop, iterator, n)
  assert 0 < bad_step < n  # the first step runs on finite weights
  assert done == bad_step + 1
  assert done <= n
  assert int(exp.step.numpy()) == done
  assert not math.isfinite(means['loss'])


def test_mirrored_nan_is_detected(tmp_path, mirrored_strategy):
  """Under two replicas a NaN weight stops the loop at the first step too."""
  exp, train_loop, iterator = _make_loop(tmp_path, mirrored_strategy)
  kernel = exp.model.decoder.get_layer('decoder_out').kernel
  kernel.assign(tf.fill(kernel.shape, float('nan')))
  _, done, bad_step = _call(train_loop, iterator, 4)
  assert (done, bad_step) == (1, 0)
  assert int(exp.step.numpy()) == 1


def test_eval_loop_counts_every_example(tmp_path, mirrored_strategy):
  """controller.evaluate (EvalLoop) sees every test example once over 2 replicas,
  including a partial last batch, and gives finite figures."""
  exp = controller.build(_config(tmp_path), mirrored_strategy)
  images = exp.test_images[:45]  # batches of 32: one full, one of 13
  metrics = controller.evaluate(exp, iw_samples=4, images=images)
  assert metrics['num_examples'] == 45
  assert metrics['iw_samples'] == 4
  assert metrics['nll'] == pytest.approx(-metrics['log_likelihood'])
  for key in ('elbo', 'elbo_stderr', 'rate', 'distortion', 'log_likelihood_stderr'):
    assert math.isfinite(metrics[key]), key
  assert metrics['elbo'] == pytest.approx(-(metrics['rate'] + metrics['distortion']),
                                          rel=1e-5)
  # log p(x) >= ELBO on average (the importance-weighted bound is tighter), up to noise.
  assert metrics['log_likelihood'] > metrics['elbo'] - 1.0


# ---------------------------------------------------------------------------------
# Shared (weight) noise drawn one step ahead.


def _bnn_config(model_dir, layer, *, jit_compile, prefetch_noise=True):
  return config_lib.ExperimentConfig(
      model='bnn', model_options=bnn.BNNConfig(hidden_sizes=(16,), bnn_layer=layer),
      data=config_lib.DataConfig(dataset='synthetic', synthetic_train_size=256,
                                 synthetic_test_size=32),
      train=config_lib.TrainConfig(
          model_dir=str(model_dir), train_steps=40, batch_size=BATCH, learning_rate=1e-2,
          steps_per_loop=10, eval_every=10, checkpoint_every=10, jit_compile=jit_compile,
          prefetch_noise=prefetch_noise, eval_batch_size=32, eval_iw_samples=0))


def _noise_config(model_dir, kind, *, jit_compile, prefetch_noise=True):
  """A Flipout BNN (weight noise) or the VAE on binarized data (binarization noise)."""
  if kind == 'vae':
    config = _config(model_dir, learning_rate=1e-2)
    return dataclasses.replace(config, train=dataclasses.replace(
        config.train, jit_compile=jit_compile, prefetch_noise=prefetch_noise))
  return _bnn_config(model_dir, kind, jit_compile=jit_compile, prefetch_noise=prefetch_noise)


def _train_in_calls(train_loop, iterator, exp, calls):
  means = [_call(train_loop, iterator, n) for n in calls]
  return means, [v.numpy() for v in exp.model.trainable_variables]


def _assert_same_training(a, b, rtol):
  (means_a, weights_a), (means_b, weights_b) = a, b
  for m_a, m_b in zip(means_a, means_b):
    assert m_a[1:] == m_b[1:]  # steps done, bad step
    for key in m_a[0]:
      np.testing.assert_allclose(m_a[0][key], m_b[0][key], rtol=rtol, atol=1e-6,
                                 err_msg=key)
  for w_a, w_b in zip(weights_a, weights_b):
    np.testing.assert_allclose(w_a, w_b, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize('layer', ['reparameterization', 'flipout', 'vae'])
def test_prefetched_weight_noise_trains_as_inline_noise(tmp_path, default_strategy, layer):
  """Under XLA, shared noise (a BNN's weight noise, the VAE's binarization noise)
  drawn one step ahead beside the step (the default) trains exactly as noise drawn
  inside the step: the same measurements and weights over calls of 3, 1 and 4 steps
  (the noise carried across steps of a call, drawn afresh at each call). The
  learning rate is large, so a step given another step's noise would leave other
  weights."""
  runs = {}
  for prefetch in (True, False):
    exp = controller.build(_noise_config(tmp_path / str(prefetch), layer, jit_compile=True,
                                         prefetch_noise=prefetch), default_strategy)
    train_loop, iterator = controller.make_train_loop(exp)
    runs[prefetch] = _train_in_calls(train_loop, iterator, exp, (3, 1, 4))
    assert int(exp.step.numpy()) == 8
  # Separate XLA programs may round the normals' polynomial differently by an ulp.
  _assert_same_training(runs[True], runs[False], rtol=1e-4)


@pytest.mark.parametrize('kind', ['flipout', 'vae'])
def test_prefetched_weight_noise_under_mirrored_strategy(tmp_path, default_strategy,
                                                         mirrored_strategy, kind):
  """Two replicas given the prefetched noise (drawn once, outside the replicas; each
  replica takes its slice of the binarization noise) train as one replica drawing
  it inline, at the same global batch."""
  runs = []
  for strategy, prefetch in ((mirrored_strategy, True), (default_strategy, False)):
    model_dir = tmp_path / str(prefetch)
    exp = controller.build(_noise_config(model_dir, kind, jit_compile=False), strategy)
    train_loop, iterator = controller.make_train_loop(exp, prefetch_noise=prefetch)
    runs.append(_train_in_calls(train_loop, iterator, exp, (2, 3)))
  _assert_same_training(runs[0], runs[1], rtol=1e-4)


@pytest.mark.parametrize('model,layer,pipeline,expected', [
    ('bnn', 'reparameterization', 'in_memory', {'model'}),
    ('bnn', 'flipout', 'in_memory', {'model'}),
    ('bnn', 'local_reparameterization', 'in_memory', set()),
    ('bnn', 'deterministic', 'in_memory', set()), ('bnn', 'mc_dropout', 'in_memory', set()),
    ('vae', None, 'in_memory', {'input'}), ('vae', None, 'tf_data', set())])
def test_what_draws_shared_noise(tmp_path, default_strategy, model, layer, pipeline,
                                 expected):
  """Reparameterization and Flipout BNNs draw weight noise shared by the batch, and
  the in-memory input the global batch's binarization noise (tf.data binarizes in
  its own pipeline); nothing else prefetches."""
  if model == 'vae':
    config = _config(tmp_path, pipeline=pipeline)
  else:
    config = _bnn_config(tmp_path, layer, jit_compile=False)
  exp = controller.build(config, default_strategy)
  train_input = inputs.make_train_input(
      pipeline, exp.task.train_images, strategy=default_strategy, global_batch_size=BATCH,
      seed=0, binarize=exp.task.binarize, targets=exp.task.train_targets)
  draw = step_lib.make_shared_noise_fn(exp.model, seed=0, train_input=train_input)
  assert (draw is not None) == bool(expected)
  if not expected:
    return
  noise = draw(tf.constant(3, tf.int64))
  assert set(noise) == expected
  if 'model' in noise:
    kernels = {layer.name: layer.kernel_loc.shape for layer in exp.model.weight_layers}
    assert {k: v.shape for k, v in noise['model'].items()} == kernels
  if 'input' in noise:
    assert noise['input'].shape == (BATCH, *exp.task.train_images.shape[1:])
