"""End-to-end tests of engine/controller.py on the synthetic data set.

Tiny networks, a few dozen steps: each run takes a few seconds on CPU.
"""
import collections
import dataclasses
import glob
import json
import math
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from engine import config as config_lib
from engine import controller
from engine import errors
from models import vae

TRAIN_SCALARS = ('loss', 'elbo', 'rate', 'distortion', 'kl_weight', 'learning_rate',
                 'grad_norm', 'examples_per_sec', 'steps_per_sec')


def _config(model_dir, *, train_steps=40, learning_rate=1e-3, jit_compile=False,
            pipeline='in_memory', eval_every=20, checkpoint_every=20):
  return config_lib.ExperimentConfig(
      model='vae',
      model_options=vae.VAEConfig(encoder_sizes=(32,), decoder_sizes=(32,), latent_dim=4),
      data=config_lib.DataConfig(dataset='synthetic', input_pipeline=pipeline,
                                 synthetic_train_size=256, synthetic_test_size=64),
      train=config_lib.TrainConfig(
          model_dir=str(model_dir), train_steps=train_steps, batch_size=32,
          learning_rate=learning_rate, steps_per_loop=10, eval_every=eval_every,
          checkpoint_every=checkpoint_every, jit_compile=jit_compile, eval_batch_size=32,
          eval_iw_samples=4, iw_chunk_size=2, num_summary_images=4))


def _train(config, strategy=None):
  """Runs controller.train, returning (metrics, logged lines)."""
  lines = []
  metrics = controller.train(config, strategy or tf.distribute.get_strategy(),
                             log=lines.append)
  return metrics, lines


def _weights(config):
  """The latest checkpoint's model variables and step, restored into a fresh build."""
  exp = controller.build(config, tf.distribute.get_strategy(), record_config=False)
  return ({v.name: v.numpy() for v in exp.model.trainable_variables},
          int(exp.step.numpy()), exp)


def _events(log_dir):
  """tag -> list of (step, plugin name, value) from every event file in log_dir."""
  found = collections.defaultdict(list)
  files = glob.glob(os.path.join(log_dir, 'events.out.tfevents.*'))
  assert files, f'no event files in {log_dir}'
  for path in files:
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        found[value.tag].append((event.step, value.metadata.plugin_data.plugin_name,
                                 tf.make_ndarray(value.tensor)))
  return found


def test_train_writes_metrics_checkpoints_and_events(tmp_path):
  """A 40-step XLA run writes metrics.json, checkpoints and train/ and eval/ events
  holding the expected scalars, images and config text."""
  config = _config(tmp_path, jit_compile=True)
  metrics, lines = _train(config)

  with open(tmp_path / 'metrics.json') as f:
    on_disk = json.load(f)
  assert on_disk == pytest.approx(metrics)
  assert on_disk['step'] == 40
  assert on_disk['dataset'] == 'synthetic' and on_disk['model'] == 'vae'
  assert on_disk['num_examples'] == 64 and on_disk['iw_samples'] == 4
  for key in ('elbo', 'nll', 'log_likelihood_stderr', 'elbo_stderr', 'rate', 'distortion'):
    assert math.isfinite(on_disk[key]), key
  assert on_disk['nll'] == pytest.approx(-on_disk['log_likelihood'])
  assert on_disk['elbo'] < 0 and on_disk['rate'] >= 0
  assert on_disk['log_likelihood_stderr'] > 0
  assert on_disk['train_examples_per_sec'] > 0

  # Every test example's figures, in the same evaluation as the means.
  from engine import evaluation
  figures, fingerprint, step = evaluation.read_per_example(str(tmp_path))
  assert step == 40 and sorted(figures) == ['distortion', 'elbo', 'log_likelihood', 'rate']
  assert all(v.shape == (64,) for v in figures.values())
  for key in ('elbo', 'log_likelihood', 'rate', 'distortion'):
    assert figures[key].mean() == pytest.approx(on_disk[key], rel=1e-5, abs=1e-4), key
  assert figures['elbo'].std(ddof=1) / 8 == pytest.approx(on_disk['elbo_stderr'], rel=1e-3)
  exp = controller.build(config, tf.distribute.get_strategy(), record_config=False)
  assert fingerprint == evaluation.test_set_fingerprint(exp.task.test_images)
  assert any('test_per_example.npz' in line for line in lines)

  assert tf.train.latest_checkpoint(str(tmp_path / 'checkpoints')).endswith('ckpt-40')
  assert os.path.exists(tmp_path / 'checkpoints' / 'ckpt-20.index')
  with open(tmp_path / 'config.json') as f:
    assert json.load(f) == config_lib.to_dict(config)

  train = _events(str(tmp_path / 'train'))
  for tag in TRAIN_SCALARS:
    assert tag in train, tag
    assert [s for s, _, _ in train[tag]] == [10, 20, 30, 40], tag
    assert all(plugin == 'scalars' for _, plugin, _ in train[tag])
    assert all(np.isfinite(v) for _, _, v in train[tag]), tag
  assert [float(v) for _, _, v in train['learning_rate']] == pytest.approx([1e-3] * 4)
  assert [float(v) for _, _, v in train['kl_weight']] == pytest.approx([1.0] * 4)
  assert 'config' in train
  (_, plugin, text), = train['config']
  assert plugin == 'text'
  assert '"latent_dim": 4' in text.item().decode()

  evals = _events(str(tmp_path / 'eval'))
  for tag in ('reconstructions', 'prior_samples'):
    steps = sorted(s for s, _, _ in evals[tag])
    assert steps == [20, 40], tag
    assert all(plugin == 'images' for _, plugin, _ in evals[tag])
    # An image summary holds [width, height, png bytes...]; decode the first PNG.
    png = evals[tag][0][2][2]
    image = tf.io.decode_png(png).numpy()
    assert image.ndim == 3 and image.shape[-1] == 1
  # 4 images in a 2x2 grid; reconstructions show original | reconstruction side by side.
  recon = tf.io.decode_png(evals['reconstructions'][0][2][2]).numpy()
  assert recon.shape == (56, 112, 1)
  assert tf.io.decode_png(evals['prior_samples'][0][2][2]).numpy().shape == (56, 56, 1)
  for tag in ('elbo', 'rate', 'distortion', 'nll'):
    assert tag in evals, tag
  assert float(evals['nll'][-1][2]) == pytest.approx(on_disk['nll'], rel=1e-5)

  assert any(line.startswith('test elbo') for line in lines)
  assert any('tensorboard --logdir' in line for line in lines)
  assert not any(line.startswith('Resuming') for line in lines)


def test_resume_matches_uninterrupted_run(tmp_path):
  """40 steps, then a second call with train_steps=80 on the same dir, resumes at
  step 40 and ends with the same weights as one uninterrupted 80-step run."""
  split_dir, whole_dir = tmp_path / 'split', tmp_path / 'whole'
  first, _ = _train(_config(split_dir, train_steps=40))
  assert first['step'] == 40
  second, lines = _train(_config(split_dir, train_steps=80))
  assert second['step'] == 80
  assert any(re.match(r'Resuming from .*ckpt-40 at step 40\.$', line) for line in lines)
  assert any('steps 40 -> 80' in line for line in lines)
  step_lines = [int(m.group(1)) for m in map(re.compile(r'step +(\d+)/80').match, lines)
                if m]
  assert step_lines == [50, 60, 70, 80]

  whole, _ = _train(_config(whole_dir, train_steps=80))
  split_weights, split_step, split_exp = _weights(_config(split_dir, train_steps=80))
  whole_weights, whole_step, whole_exp = _weights(_config(whole_dir, train_steps=80))
  assert split_step == whole_step == 80
  assert int(split_exp.optimizer.iterations.numpy()) == 80
  assert int(whole_exp.optimizer.iterations.numpy()) == 80
  assert split_weights.keys() == whole_weights.keys()
  for name in split_weights:
    np.testing.assert_allclose(split_weights[name], whole_weights[name], rtol=0, atol=1e-6,
                               err_msg=name)
  for a, b in zip(split_exp.optimizer.variables(), whole_exp.optimizer.variables()):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7, err_msg=a.name)
  assert second['elbo'] == pytest.approx(whole['elbo'], abs=1e-3)
  assert second['nll'] == pytest.approx(whole['nll'], abs=1e-3)


def test_rerun_at_final_step_only_evaluates(tmp_path):
  """Running again with the same train_steps does no training and keeps the weights."""
  _train(_config(tmp_path, train_steps=20))
  before, _, _ = _weights(_config(tmp_path, train_steps=20))
  metrics, lines = _train(_config(tmp_path, train_steps=20))
  assert metrics['step'] == 20
  assert any('evaluating only' in line for line in lines)
  assert not any(re.match(r'step +\d+/', line) for line in lines)
  after, step, _ = _weights(_config(tmp_path, train_steps=20))
  assert step == 20
  for name in before:
    np.testing.assert_array_equal(before[name], after[name])


@pytest.mark.parametrize('pipeline', ['in_memory', 'tf_data'])
def test_mirrored_training(tmp_path, mirrored_strategy, pipeline):
  """Two replicas train a few steps and give finite figures at the right step."""
  config = _config(tmp_path, train_steps=20, pipeline=pipeline)
  metrics, lines = _train(config, mirrored_strategy)
  assert metrics['step'] == 20
  for key in ('elbo', 'nll', 'rate', 'distortion', 'log_likelihood_stderr'):
    assert math.isfinite(metrics[key]), key
  assert metrics['num_examples'] == 64
  assert any('on 2 replica(s)' in line for line in lines)
  train = _events(str(tmp_path / 'train'))
  assert [float(v) for _, _, v in train['kl_weight']] == pytest.approx([1.0, 1.0])
  assert all(math.isfinite(float(v)) for _, _, v in train['loss'])
  _, step, _ = _weights(config)
  assert step == 20


def test_non_finite_loss_keeps_last_checkpoint(tmp_path):
  """A resumed run with learning rate 1e30 raises NonFiniteLossError naming the
  step; the checkpoint from before still restores at its step with finite, unchanged
  variables."""
  good = _config(tmp_path, train_steps=20)
  _train(good)
  saved, saved_step, _ = _weights(good)
  assert saved_step == 20

  with pytest.raises(errors.NonFiniteLossError) as info:
    _train(_config(tmp_path, train_steps=60, learning_rate=1e30))
  message = str(info.value)
  bad_step = int(re.search(r'at step (\d+)', message).group(1))
  assert 20 <= bad_step < 30  # inside the first call after resuming
  assert 'ckpt-20' in message
  assert '--learning_rate' in message

  assert tf.train.latest_checkpoint(str(tmp_path / 'checkpoints')).endswith('ckpt-20')
  restored, step, _ = _weights(good)
  assert step == 20
  for name, value in restored.items():
    assert np.all(np.isfinite(value)), name
    np.testing.assert_array_equal(value, saved[name], err_msg=name)


def test_learning_rate_flag_wins_on_resume(tmp_path):
  """The optimizer's learning rate is checkpointed, but a resumed run uses the
  configured one (and logs it to TensorBoard)."""
  _train(_config(tmp_path, train_steps=20))
  _train(_config(tmp_path, train_steps=40, learning_rate=5e-4))
  train = _events(str(tmp_path / 'train'))
  by_step = {s: float(v) for s, _, v in train['learning_rate']}
  assert by_step[10] == pytest.approx(1e-3)
  assert by_step[20] == pytest.approx(1e-3)
  assert by_step[30] == pytest.approx(5e-4)
  assert by_step[40] == pytest.approx(5e-4)


def test_non_finite_weight_is_never_checkpointed(tmp_path):
  """A NaN weight (which can hide behind a finite loss) blocks the checkpoint save."""
  config = _config(str(tmp_path / 'run'), train_steps=20)
  _train(config)
  exp = controller.build(config, tf.distribute.get_strategy(), record_config=False)
  before = exp.manager.latest_checkpoint
  kernel = exp.model.encoder.trainable_variables[0]
  kernel.assign(tf.fill(kernel.shape, float('nan')))
  with pytest.raises(errors.NonFiniteLossError, match='non-finite'):
    controller._save_if_finite(exp, 21)
  assert exp.manager.latest_checkpoint == before
  assert tf.train.latest_checkpoint(os.path.join(config.train.model_dir, 'checkpoints')) == before


def test_profile_steps_writes_a_trace(tmp_path):
  """--profile_steps=FIRST,LAST writes a profiler trace under model_dir/profile."""
  config = _config(str(tmp_path / 'run'), train_steps=20)
  config = dataclasses.replace(
      config, train=dataclasses.replace(config.train, profile_steps=(0, 10)))
  _train(config)
  traces = glob.glob(os.path.join(config.train.model_dir, 'profile', '**', '*.xplane.pb'),
                     recursive=True)
  assert traces, 'no profiler trace was written'
  assert os.path.getsize(traces[0]) > 0
