"""Tests of engine/checkpoints.py through controller.build: incompatible model dirs,
unreadable records and mismatched checkpoints are CheckpointErrors, never raw
stack traces, and a refused run leaves the model dir as it was."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from engine import checkpoints
from engine import config as config_lib
from engine import controller
from engine import errors
from models import vae


def _config(model_dir, *, latent_dim=4, batch_size=32, seed=0, learning_rate=1e-3,
            train_steps=40, dataset='synthetic', encoder_sizes=(32,)):
  return config_lib.ExperimentConfig(
      model='vae',
      model_options=vae.VAEConfig(encoder_sizes=encoder_sizes, decoder_sizes=(32,),
                                  latent_dim=latent_dim),
      data=config_lib.DataConfig(dataset=dataset, synthetic_train_size=128,
                                 synthetic_test_size=32),
      train=config_lib.TrainConfig(
          model_dir=str(model_dir), train_steps=train_steps, batch_size=batch_size,
          learning_rate=learning_rate, seed=seed, steps_per_loop=10, eval_every=20,
          checkpoint_every=20, jit_compile=False, eval_batch_size=32, eval_iw_samples=4,
          iw_chunk_size=2, num_summary_images=4))


def _build(config, **kwargs):
  return controller.build(config, tf.distribute.get_strategy(), **kwargs)


def _saved_dir(model_dir, step=7):
  """A model dir holding config.json and one checkpoint at `step` with known weights."""
  exp = _build(_config(model_dir))
  exp.step.assign(step)
  kernel = exp.model.decoder.get_layer('decoder_out').kernel
  kernel.assign(tf.fill(kernel.shape, 0.25))
  exp.manager.save(checkpoint_number=step)
  return exp


def _recorded(model_dir):
  with open(os.path.join(model_dir, checkpoints.CONFIG_FILE)) as f:
    return json.load(f)


def test_build_restores_checkpoint(tmp_path):
  """A compatible build restores the step and the saved weights."""
  _saved_dir(tmp_path, step=7)
  exp = _build(_config(tmp_path, train_steps=100, learning_rate=3e-4))
  assert int(exp.step.numpy()) == 7
  np.testing.assert_array_equal(exp.model.decoder.get_layer('decoder_out').kernel.numpy(),
                                0.25)
  assert exp.manager.latest_checkpoint.endswith('ckpt-7')
  # Compatible changes are recorded.
  assert _recorded(tmp_path)['train']['train_steps'] == 100
  assert float(exp.optimizer.learning_rate.numpy()) == pytest.approx(3e-4)


def test_fresh_dir_has_no_checkpoint(tmp_path):
  """A new model dir starts at step 0, with config.json recorded."""
  exp = _build(_config(tmp_path / 'new'))
  assert exp.manager.latest_checkpoint is None
  assert int(exp.step.numpy()) == 0
  assert _recorded(tmp_path / 'new') == config_lib.to_dict(_config(tmp_path / 'new'))


@pytest.mark.parametrize('change,field', [
    (dict(latent_dim=8), 'latent_dim'),
    (dict(batch_size=16), 'batch_size'),
    (dict(seed=3), 'seed'),
    (dict(encoder_sizes=(16,)), 'encoder_sizes'),
])
def test_incompatible_dir_names_the_field(tmp_path, change, field):
  """Changing a field the checkpoint depends on is a CheckpointError naming the
  field and both values; config.json and the checkpoint are left untouched."""
  _saved_dir(tmp_path)
  before = _recorded(tmp_path)
  config = _config(tmp_path, **change)
  with pytest.raises(errors.CheckpointError) as info:
    _build(config)
  message = str(info.value)
  assert f'{field}=' in message
  assert f'--model_dir={tmp_path}' in message
  assert _recorded(tmp_path) == before
  assert int(_build(_config(tmp_path)).step.numpy()) == 7


def test_incompatible_check_without_checkpoint(tmp_path):
  """config.json alone (no checkpoint yet) is enough to refuse a different model."""
  _build(_config(tmp_path))
  with pytest.raises(errors.CheckpointError, match=r'latent_dim=4 .*latent_dim=6'):
    _build(_config(tmp_path, latent_dim=6))


def test_evaluate_mode_does_not_record(tmp_path):
  """record_config=False (evaluate/sample) checks compatibility but writes nothing."""
  _saved_dir(tmp_path)
  before = _recorded(tmp_path)
  exp = _build(_config(tmp_path, train_steps=999), record_config=False)
  assert int(exp.step.numpy()) == 7
  assert _recorded(tmp_path) == before
  with pytest.raises(errors.CheckpointError, match='batch_size'):
    _build(_config(tmp_path, batch_size=64), record_config=False)


def test_shape_mismatch_without_config_json(tmp_path):
  """With config.json deleted, a checkpoint of different variable shapes is a
  CheckpointError (not a raw restore error); the refused run records nothing, so the
  original flags still restore afterwards."""
  _saved_dir(tmp_path)
  os.remove(tmp_path / checkpoints.CONFIG_FILE)
  with pytest.raises(errors.CheckpointError) as info:
    _build(_config(tmp_path, latent_dim=8))
  message = str(info.value)
  assert 'incompatible model' in message
  assert 'ckpt-7' in message
  assert 'shape' in message
  assert info.value.__cause__ is not None
  assert not os.path.exists(tmp_path / checkpoints.CONFIG_FILE)
  exp = _build(_config(tmp_path))
  assert int(exp.step.numpy()) == 7
  assert _recorded(tmp_path)['model_options']['latent_dim'] == 4


def test_missing_layer_without_config_json(tmp_path):
  """With config.json deleted, a model with a layer the checkpoint lacks is refused."""
  _saved_dir(tmp_path)
  os.remove(tmp_path / checkpoints.CONFIG_FILE)
  with pytest.raises(errors.CheckpointError, match='incompatible model'):
    _build(_config(tmp_path, encoder_sizes=(32, 32)))


@pytest.mark.parametrize('content', [b'{"model": "vae", ', b'', b'\xff\xfe\x00\x81garbage'])
def test_corrupt_config_json(tmp_path, content):
  """Truncated, empty or non-UTF-8 config.json is a CheckpointError naming the file."""
  _saved_dir(tmp_path)
  path = tmp_path / checkpoints.CONFIG_FILE
  path.write_bytes(content)
  with pytest.raises(errors.CheckpointError) as info:
    _build(_config(tmp_path))
  assert str(path) in str(info.value)
  assert 'unreadable' in str(info.value)
  assert path.read_bytes() == content  # left for the user to inspect


def test_first_difference():
  """_first_difference finds the first differing leaf by dotted name, or None."""
  before = {'a': 1, 'b': {'c': [1, 2], 'd': 'x'}}
  assert checkpoints._first_difference(before, json.loads(json.dumps(before)), 'r') is None
  now = {'a': 1, 'b': {'c': [1, 3], 'd': 'x'}}
  assert checkpoints._first_difference(before, now, 'r') == ('r.b.c', [1, 2], [1, 3])
  assert checkpoints._first_difference({'a': 1}, {}, 'r') == ('r.a', 1, None)


def test_record_is_json_of_the_config(tmp_path):
  """check_and_record_config writes the config dict as JSON, atomically (no .tmp)."""
  config = _config(tmp_path)
  checkpoints.check_and_record_config(str(tmp_path), config_lib.to_dict(config))
  assert _recorded(tmp_path) == config_lib.to_dict(config)
  assert os.listdir(tmp_path) == [checkpoints.CONFIG_FILE]
