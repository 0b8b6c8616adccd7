"""Tests of engine/averaging.py (the weight average) and its use by the controller."""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from engine import averaging
from engine import config as config_lib
from engine import controller
from engine import errors
from models import vae


def _reference(start, trajectory, decay):
  """The average after updates towards each array of `trajectory`, in numpy."""
  shadow = np.array(start, np.float64)
  for n, value in enumerate(trajectory):
    keep = min(decay, (1.0 + n) / (averaging.WARMUP_OFFSET + n))
    shadow = keep * shadow + (1.0 - keep) * np.asarray(value, np.float64)
  return shadow


def _trajectory(steps, shape, seed=0):
  return np.random.default_rng(seed).normal(size=(steps,) + shape).astype(np.float32)


@pytest.mark.parametrize('compiled', [False, True])
def test_update_follows_the_formula(compiled):
  """Eager and inside tf.function (XLA): the decay warms up as (1 + n) / (10 + n)
  and then stays at `decay`; the update count advances once per update."""
  w = tf.Variable(np.zeros((3, 2), np.float32))
  b = tf.Variable(np.ones((2,), np.float32))
  average = averaging.WeightAverage([w, b], decay=0.5)
  w_path, b_path = _trajectory(40, (3, 2)), _trajectory(40, (2,), seed=1)

  def step(wv, bv):
    w.assign(wv)
    b.assign(bv)
    average.update([w, b])

  if compiled:
    step = tf.function(step, jit_compile=True)
  for wv, bv in zip(w_path, b_path):
    step(tf.constant(wv), tf.constant(bv))
  # For decay 0.5 the warm-up rules for n < 8 ((1 + n) / (10 + n) < 0.5), the
  # decay after: the 40 updates cover both.
  np.testing.assert_allclose(average.shadows[0].numpy(),
                             _reference(np.zeros((3, 2)), w_path, 0.5), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(average.shadows[1].numpy(),
                             _reference(np.ones(2), b_path, 0.5), rtol=1e-5, atol=1e-6)
  assert int(average.updates.numpy()) == 40
  assert float(average.current_decay()) == pytest.approx(0.5)
  fresh = averaging.WeightAverage([w], decay=0.9)
  assert float(fresh.current_decay()) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)


def test_update_in_replica_context(mirrored_strategy):
  """Under MirroredStrategy each replica's shadow follows its (identical) weights."""
  with mirrored_strategy.scope():
    w = tf.Variable(np.zeros((4,), np.float32))
    average = averaging.WeightAverage([w], decay=0.5)
  path = _trajectory(12, (4,))

  @tf.function
  def step(value):
    w.assign(value)

    def replica_fn():
      average.update([w])

    mirrored_strategy.run(replica_fn)

  for value in path:
    step(tf.constant(value))
  expected = _reference(np.zeros(4), path, 0.5)
  for copy in mirrored_strategy.experimental_local_results(average.shadows[0]):
    np.testing.assert_allclose(copy.numpy(), expected, rtol=1e-5, atol=1e-6)
  assert int(average.updates.numpy()) == 12


def test_applied_swaps_in_and_restores_even_on_error():
  w = tf.Variable([1.0, 2.0])
  average = averaging.WeightAverage([w], decay=0.99)
  average.shadows[0].assign([5.0, 6.0])
  with average.applied([w]):
    np.testing.assert_array_equal(w.numpy(), [5.0, 6.0])
  np.testing.assert_array_equal(w.numpy(), [1.0, 2.0])
  with pytest.raises(RuntimeError, match='inside'):
    with average.applied([w]):
      raise RuntimeError('inside')
  np.testing.assert_array_equal(w.numpy(), [1.0, 2.0])
  np.testing.assert_array_equal(average.shadows[0].numpy(), [5.0, 6.0])


def test_reset_and_bad_arguments():
  w = tf.Variable([1.0, 2.0])
  average = averaging.WeightAverage([w], decay=0.99)
  average.update([w])
  w.assign([3.0, 4.0])
  average.reset([w])
  np.testing.assert_array_equal(average.shadows[0].numpy(), [3.0, 4.0])
  assert int(average.updates.numpy()) == 0
  with pytest.raises(ValueError, match='same order'):
    average.update([tf.Variable([1.0, 2.0, 3.0])])
  with pytest.raises(ValueError, match='same order'):
    average.applied([w, w]).__enter__()
  for decay in (1.0, -0.5):
    with pytest.raises(ValueError, match='decay'):
      averaging.WeightAverage([w], decay=decay)


@pytest.mark.parametrize('value', [-0.1, 1.0, 2])
def test_config_refuses_bad_decay(value):
  with pytest.raises(errors.ConfigError, match='--ema_decay'):
    config_lib.TrainConfig(ema_decay=value)


def _config(model_dir, *, train_steps=30, ema_decay=0.9, jit_compile=False, ema_every=1):
  return config_lib.ExperimentConfig(
      model='vae',
      # tanh, not relu: a dead relu unit's gradient is float noise around zero, whose
      # sign differs between XLA and plain kernels or one and two replicas, and Adam
      # turns it into a full step either way; on an AVX2 CPU the runs compared below
      # then drifted 0.009 apart within 30 steps. With tanh they agree to 1e-4.
      model_options=vae.VAEConfig(encoder_sizes=(32,), decoder_sizes=(32,), latent_dim=4,
                                  activation='tanh'),
      data=config_lib.DataConfig(dataset='synthetic', synthetic_train_size=256,
                                 synthetic_test_size=64),
      train=config_lib.TrainConfig(
          model_dir=str(model_dir), train_steps=train_steps, batch_size=32,
          steps_per_loop=10, eval_every=10, checkpoint_every=10, jit_compile=jit_compile,
          eval_batch_size=32, eval_iw_samples=4, iw_chunk_size=2, num_summary_images=4,
          ema_decay=ema_decay, ema_every=ema_every, learning_rate=3e-3))


def _build(config, **kwargs):
  return controller.build(config, tf.distribute.get_strategy(), record_config=False,
                          **kwargs)


def _values(variables):
  return [v.numpy().copy() for v in variables]


def test_training_keeps_evaluates_and_checkpoints_the_average(tmp_path):
  """The checkpoint holds the average; the final figures are of the average and
  differ from the trained weights' figures; evaluating leaves the weights as they
  were."""
  metrics = controller.train(_config(tmp_path), tf.distribute.get_strategy(),
                             log=lambda *a: None)
  assert metrics['weights'] == 'average'
  exp = _build(_config(tmp_path))
  assert int(exp.average.updates.numpy()) == 30
  trained = _values(exp.model.trainable_variables)
  shadows = _values(exp.average.shadows)
  assert max(np.abs(a - b).max() for a, b in zip(trained, shadows)) > 1e-4
  again = controller.evaluate(exp, final=True)
  assert again['weights'] == 'average'
  assert again['nll'] == pytest.approx(metrics['nll'], abs=1e-4)
  raw = controller.evaluate(exp, final=True, trained_weights=True)
  assert raw['weights'] == 'trained'
  assert raw['elbo'] != pytest.approx(again['elbo'], abs=1e-4)
  for before, after in zip(trained, _values(exp.model.trainable_variables)):
    np.testing.assert_array_equal(before, after)
  with controller.evaluation_weights(exp):
    for shadow, variable in zip(shadows, exp.model.trainable_variables):
      np.testing.assert_array_equal(shadow, variable.numpy())


def test_resumed_average_matches_uninterrupted(tmp_path):
  split, whole = tmp_path / 'split', tmp_path / 'whole'
  quiet = dict(log=lambda *a: None)
  controller.train(_config(split, train_steps=20), tf.distribute.get_strategy(), **quiet)
  controller.train(_config(split, train_steps=40), tf.distribute.get_strategy(), **quiet)
  controller.train(_config(whole, train_steps=40), tf.distribute.get_strategy(), **quiet)
  a, b = _build(_config(split, train_steps=40)), _build(_config(whole, train_steps=40))
  assert int(a.average.updates.numpy()) == int(b.average.updates.numpy()) == 40
  for x, y in zip(_values(a.average.shadows), _values(b.average.shadows)):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


def test_average_starts_from_restored_weights_of_a_run_without_one(tmp_path, capsys):
  """Turning --ema_decay on when resuming a run that had none: the checkpoint
  restores (no incompatibility error), and the average starts from its weights."""
  controller.train(_config(tmp_path, ema_decay=0.0), tf.distribute.get_strategy(),
                   log=lambda *a: None)
  plain = _build(_config(tmp_path, ema_decay=0.0))
  assert plain.average is None
  capsys.readouterr()
  exp = _build(_config(tmp_path, train_steps=40))
  assert 'has no average; it starts afresh' in capsys.readouterr().out
  assert int(exp.step.numpy()) == 30
  assert int(exp.average.updates.numpy()) == 0
  for shadow, weight in zip(_values(exp.average.shadows),
                            _values(plain.model.trainable_variables)):
    np.testing.assert_array_equal(shadow, weight)
  metrics = controller.train(_config(tmp_path, train_steps=40),
                             tf.distribute.get_strategy(), log=lambda *a: None)
  assert metrics['step'] == 40 and metrics['weights'] == 'average'
  assert int(_build(_config(tmp_path, train_steps=40)).average.updates.numpy()) == 10


def test_xla_step_updates_the_average_like_the_plain_step(tmp_path):
  controller.train(_config(tmp_path / 'xla', jit_compile=True), tf.distribute.get_strategy(),
                   log=lambda *a: None)
  controller.train(_config(tmp_path / 'plain'), tf.distribute.get_strategy(),
                   log=lambda *a: None)
  a = _build(_config(tmp_path / 'xla', jit_compile=True))
  b = _build(_config(tmp_path / 'plain'))
  assert int(a.average.updates.numpy()) == 30
  for x, y in zip(_values(a.average.shadows), _values(b.average.shadows)):
    np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4)


def test_mirrored_training_averages_like_one_replica(tmp_path, mirrored_strategy):
  """Two replicas (the global batch split in two) end with the average of one
  replica's run: one update per step, not one per replica."""
  quiet = dict(log=lambda *a: None)
  metrics = controller.train(_config(tmp_path / 'two', train_steps=20), mirrored_strategy,
                             **quiet)
  assert metrics['weights'] == 'average'
  controller.train(_config(tmp_path / 'one', train_steps=20), tf.distribute.get_strategy(),
                   **quiet)
  two = controller.build(_config(tmp_path / 'two', train_steps=20), mirrored_strategy,
                         record_config=False)
  one = _build(_config(tmp_path / 'one', train_steps=20))
  assert int(two.average.updates.numpy()) == 20
  for x, y in zip(_values(two.average.shadows), _values(one.average.shadows)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('jit_compile', [False, True])
def test_update_every_k_steps_follows_the_weights(tmp_path, jit_compile):
  """With ema_every=3 the loop updates the average after steps 3, 6, 9, ... (by the
  step counter, whatever the calls' lengths), each time by 0.9 ** 3, towards the
  weights of that step."""
  exp = _build(_config(tmp_path, ema_every=3, jit_compile=jit_compile))
  train_loop, iterator = controller.make_train_loop(exp)
  variables = exp.model.trainable_variables
  start = _values(variables)
  after = []  # the weights after each step, one step per call
  for _ in range(11):
    train_loop(iterator, tf.constant(1, tf.int64))
    after.append(_values(variables))
  assert int(exp.step.numpy()) == 11
  assert int(exp.average.updates.numpy()) == 3  # after steps 3, 6 and 9
  shadows = _values(exp.average.shadows)
  for i, shadow in enumerate(shadows):
    expected = _reference(start[i], [after[s - 1][i] for s in (3, 6, 9)], 0.9 ** 3)
    np.testing.assert_allclose(shadow, expected, rtol=1e-5, atol=1e-6)
  # The same 11 steps in calls of 4 and 7 steps: the same updates, the same average.
  other = _build(_config(tmp_path / 'other', ema_every=3, jit_compile=jit_compile))
  other_loop, other_iterator = controller.make_train_loop(other)
  for n in (4, 7):
    other_loop(other_iterator, tf.constant(n, tf.int64))
  assert int(other.average.updates.numpy()) == 3
  for x, y in zip(_values(other.average.shadows), shadows):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_per_update_decay_may_underflow_to_zero(tmp_path):
  """ema_decay ** ema_every below float range is 0: the shadows then copy the weights."""
  exp = _build(_config(tmp_path, ema_decay=0.01, ema_every=1000))
  assert float(exp.average.current_decay()) == 0.0
  exp.average.update(exp.model.trainable_variables)
  for shadow, weight in zip(_values(exp.average.shadows),
                            _values(exp.model.trainable_variables)):
    np.testing.assert_array_equal(shadow, weight)
