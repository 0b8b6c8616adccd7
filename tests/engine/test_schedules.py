"""engine/schedules.py: the cosine curve, and the engine following it through a resume."""
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf

from engine import config as config_lib
from engine import controller
from engine import errors
from engine import schedules
from tests.engine import test_controller as tc


def test_cosine_rate_closed_form():
  steps = np.array([0, 25, 50, 75, 100, 150])
  got = schedules.cosine_rate(tf.constant(steps), base_rate=2e-3, total_steps=100,
                              final_fraction=0.1).numpy()
  want = [2e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / 100, 1))))
          for s in steps]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[0] == pytest.approx(2e-3)
  assert got[2] == pytest.approx(1.1e-3)  # halfway: the mean of first and last
  assert got[4] == got[5] == pytest.approx(2e-4)  # held after train_steps
  assert np.all(np.diff(got[:5]) < 0)


@pytest.mark.parametrize('field, value, match', [
    ('lr_schedule', 'linear', '--lr_schedule'),
    ('lr_final_fraction', 1.5, '--lr_final_fraction'),
    ('lr_final_fraction', -0.1, '--lr_final_fraction'),
])
def test_bad_schedule_flags_are_refused(field, value, match):
  with pytest.raises(errors.ConfigError, match=match):
    config_lib.TrainConfig(**{field: value})


def _cosine(model_dir, train_steps):
  config = tc._config(model_dir, train_steps=train_steps)
  return dataclasses.replace(config, train=dataclasses.replace(
      config.train, lr_schedule='cosine', lr_final_fraction=0.25, learning_rate=4e-3))


def test_engine_follows_the_curve_and_a_resume_continues_it(tmp_path):
  """Logged rates are the curve at each call's last step (rate used by that step,
  i.e. the curve at step - 1); a run resumed at step 20 matches an uninterrupted one."""
  whole_dir, split_dir = tmp_path / 'whole', tmp_path / 'split'
  tc._train(_cosine(whole_dir, 40))
  train = tc._events(str(whole_dir / 'train'))
  logged = {s: float(v) for s, _, v in train['learning_rate']}
  assert sorted(logged) == [10, 20, 30, 40]
  for step, rate in logged.items():
    want = 4e-3 * (0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 40)))
    assert rate == pytest.approx(want, rel=1e-5), step

  # A split run: same curve (train_steps 40 both times), same weights.
  split_config = _cosine(split_dir, 40)
  split_config = dataclasses.replace(split_config, train=dataclasses.replace(
      split_config.train, checkpoint_every=10))
  # Stop after 20 steps of the 40-step curve, as a preempted job would, then resume.
  exp = controller.build(split_config, tf.distribute.get_strategy())
  loop, iterator = controller.make_train_loop(exp)
  loop(iterator, tf.constant(20, tf.int64))
  exp.manager.save(checkpoint_number=20)
  tc._train(split_config)
  a, _, _ = tc._weights(_cosine(whole_dir, 40))
  b, step, _ = tc._weights(_cosine(split_dir, 40))
  assert step == 40
  for name in a:
    np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6, err_msg=name)


def test_a_constant_rate_run_cannot_resume_as_cosine(tmp_path):
  tc._train(tc._config(tmp_path, train_steps=20))
  with pytest.raises(errors.CheckpointError, match='lr_schedule'):
    tc._train(_cosine(tmp_path, 40))


def test_cosine_under_two_replicas(tmp_path, mirrored_strategy):
  """The schedule's rate variable updates inside the replicated step."""
  metrics, _ = tc._train(_cosine(tmp_path, 20), mirrored_strategy)
  assert metrics['step'] == 20
  train = tc._events(str(tmp_path / 'train'))
  logged = {s: float(v) for s, _, v in train['learning_rate']}
  want = 4e-3 * (0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi * 19 / 20)))
  assert logged[20] == pytest.approx(want, rel=1e-5)


def test_a_run_recorded_before_the_schedule_flag_existed_resumes(tmp_path):
  """config.json files written before --lr_schedule existed lack the field; such a
  run was constant-rate, so it resumes as constant and is refused as cosine."""
  tc._train(tc._config(tmp_path, train_steps=20))
  path = os.path.join(str(tmp_path), 'config.json')
  with open(path) as f:
    recorded = json.load(f)
  del recorded['train']['lr_schedule']
  with open(path, 'w') as f:
    json.dump(recorded, f)
  metrics, _ = tc._train(tc._config(tmp_path, train_steps=30))
  assert metrics['step'] == 30
  with open(path) as f:
    recorded = json.load(f)
  del recorded['train']['lr_schedule']
  with open(path, 'w') as f:
    json.dump(recorded, f)
  with pytest.raises(errors.CheckpointError, match="lr_schedule='constant'"):
    tc._train(_cosine(tmp_path, 40))
