"""Tests of engine/checkpoints.py through controller.build: incompatible model dirs,
unreadable records and mismatched checkpoints are CheckpointErrors, never raw
stack traces, and a refused run leaves the model dir as it was. A corrupt or
partial newest checkpoint falls back to the previous one."""
import dataclasses
import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from engine import checkpoints
from engine import config as config_lib
from engine import controller
from engine import errors
from models import bnn
from models import vae


def _config(model_dir, *, latent_dim=4, batch_size=32, seed=0, learning_rate=1e-3,
            train_steps=40, dataset='synthetic', encoder_sizes=(32,), decoder='factorized',
            **model_options):
  return config_lib.ExperimentConfig(
      model='vae',
      model_options=vae.VAEConfig(encoder_sizes=encoder_sizes, decoder_sizes=(32,),
                                  latent_dim=latent_dim, decoder=decoder, **model_options),
      data=config_lib.DataConfig(dataset=dataset, synthetic_train_size=128,
                                 synthetic_test_size=32),
      train=config_lib.TrainConfig(
          model_dir=str(model_dir), train_steps=train_steps, batch_size=batch_size,
          learning_rate=learning_rate, seed=seed, steps_per_loop=10, eval_every=20,
          checkpoint_every=20, jit_compile=False, eval_batch_size=32, eval_iw_samples=4,
          iw_chunk_size=2, num_summary_images=4))


def _build(config, **kwargs):
  return controller.build(config, tf.distribute.get_strategy(), **kwargs)


def _saved_dir(model_dir, step=7, **config_kwargs):
  """A model dir holding config.json and one checkpoint at `step` with known weights."""
  exp = _build(_config(model_dir, **config_kwargs))
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


# The BNN's posterior_scale: it changes what the saved rho variables mean.


def _bnn_config(model_dir, posterior_scale='softplus', train_steps=1):
  return config_lib.ExperimentConfig(
      model='bnn',
      model_options=bnn.BNNConfig(hidden_sizes=(8,), posterior_scale=posterior_scale),
      data=config_lib.DataConfig(dataset='synthetic', synthetic_train_size=64,
                                 synthetic_test_size=16),
      train=config_lib.TrainConfig(
          model_dir=str(model_dir), train_steps=train_steps, batch_size=16,
          steps_per_loop=1, eval_every=1, checkpoint_every=1, jit_compile=False,
          eval_batch_size=16, eval_iw_samples=0))


def _saved_bnn_dir(model_dir, posterior_scale='softplus'):
  exp = _build(_bnn_config(model_dir, posterior_scale))
  exp.step.assign(3)
  exp.manager.save(checkpoint_number=3)


def _drop_recorded_posterior_scale(model_dir):
  """Rewrites config.json as a run recorded before --posterior_scale existed."""
  recorded = _recorded(model_dir)
  del recorded['model_options']['posterior_scale']
  with open(os.path.join(model_dir, checkpoints.CONFIG_FILE), 'w') as f:
    json.dump(recorded, f)


@pytest.mark.parametrize('saved,resumed', [('softplus', 'exp'), ('exp', 'softplus')])
def test_a_bnn_run_cannot_resume_with_another_posterior_scale(tmp_path, saved, resumed):
  """Switching --posterior_scale on resume is a CheckpointError naming both values;
  the recorded config and the checkpoint are left as they were, and the same flags
  still resume."""
  _saved_bnn_dir(tmp_path, saved)
  before = _recorded(tmp_path)
  with pytest.raises(errors.CheckpointError) as info:
    _build(_bnn_config(tmp_path, resumed))
  message = str(info.value)
  assert f'posterior_scale={saved!r} (model_options.posterior_scale)' in message
  assert f'posterior_scale={resumed!r}' in message
  assert _recorded(tmp_path) == before
  assert int(_build(_bnn_config(tmp_path, saved)).step.numpy()) == 3


def test_a_bnn_checkpoint_is_evaluated_with_other_evaluation_fields(tmp_path):
  """num_mc_samples and ood_data_dir (BNNConfig.EVALUATION_FIELDS) shape only the
  evaluation: a build with other values restores the checkpoint; a structural field
  (hidden_sizes) is still refused."""
  assert bnn.BNNConfig.EVALUATION_FIELDS == ('num_mc_samples', 'ood_data_dir')
  _saved_bnn_dir(tmp_path)
  base = _bnn_config(tmp_path)
  more_samples = dataclasses.replace(
      base, model_options=dataclasses.replace(base.model_options, num_mc_samples=50))
  assert int(_build(more_samples, record_config=False).step.numpy()) == 3
  other_net = dataclasses.replace(
      base, model_options=dataclasses.replace(base.model_options, hidden_sizes=(9,)))
  with pytest.raises(errors.CheckpointError, match='hidden_sizes'):
    _build(other_net, record_config=False)
  # Without the exemption the same difference is refused.
  with pytest.raises(errors.CheckpointError, match='num_mc_samples=10'):
    checkpoints.check_and_record_config(str(tmp_path), config_lib.to_dict(more_samples),
                                        write=False)


def test_a_bnn_run_recorded_before_posterior_scale_existed_reads_as_softplus(tmp_path):
  """A config.json without model_options.posterior_scale ran with softplus: it resumes
  as softplus (and is then recorded with the field), and is refused as exp."""
  _saved_bnn_dir(tmp_path)
  _drop_recorded_posterior_scale(tmp_path)
  exp = _build(_bnn_config(tmp_path, train_steps=5))
  assert int(exp.step.numpy()) == 3
  assert _recorded(tmp_path)['model_options']['posterior_scale'] == 'softplus'
  _drop_recorded_posterior_scale(tmp_path)
  with pytest.raises(errors.CheckpointError, match="posterior_scale='softplus'"):
    _build(_bnn_config(tmp_path, 'exp'))
  # A VAE's model_options has no posterior_scale: nothing is filled in for it.
  vae_dir = tmp_path / 'vae'
  checkpoints.check_and_record_config(str(vae_dir), config_lib.to_dict(_config(vae_dir)))
  checkpoints.check_and_record_config(str(vae_dir), config_lib.to_dict(_config(vae_dir)))
  assert 'posterior_scale' not in _recorded(vae_dir)['model_options']


@pytest.mark.parametrize('field,before,other,decoder', [
    ('decoder', 'factorized', 'autoregressive', 'factorized'),
    ('activation', 'relu', 'swish', 'factorized'),
    ('pixelcnn_kernel', 7, 5, 'factorized'),
    ('pixelcnn_logit_window', 0, 3, 'pixelcnn'),
    ('pixelcnn_latent_maps', 0, 2, 'pixelcnn'),
    ('decoder_dropout', 0.0, 0.1, 'factorized'),
    ('pixelcnn_maps_rank', 0, 2, 'pixelcnn'),
    ('gated_units', False, True, 'factorized')])
def test_a_vae_run_recorded_before_a_field_existed_reads_as_its_old_value(
    tmp_path, field, before, other, decoder):
  """A config.json without model_options.decoder (or .activation) ran with the
  factorized decoder (relu): it resumes as that, and a resume with another value is
  refused."""
  # The maps' rank needs maps to have one.
  extra = dict(pixelcnn_latent_maps=2) if field == 'pixelcnn_maps_rank' else {}
  # Gated units are now the MLP's default; the old runs had relu units.
  if field == 'gated_units':
    extra = dict(gated_units=False)
  _saved_dir(tmp_path, step=7, decoder=decoder, **extra)
  recorded = _recorded(tmp_path)
  del recorded['model_options'][field]
  with open(os.path.join(tmp_path, checkpoints.CONFIG_FILE), 'w') as f:
    json.dump(recorded, f)
  exp = _build(_config(tmp_path, train_steps=100, decoder=decoder, **extra))
  assert int(exp.step.numpy()) == 7
  assert _recorded(tmp_path)['model_options'][field] == before
  config = _config(tmp_path, train_steps=100, decoder=decoder, **extra)
  config = dataclasses.replace(config, model_options=dataclasses.replace(
      config.model_options, **{field: other}))
  with pytest.raises(errors.CheckpointError, match=f"{field}={before!r}") as info:
    _build(config)
  # A default that changed: the error says which flag resumes the old run.
  assert ('--nogated_units' in str(info.value)) == (field == 'gated_units')


# Corrupt or partial checkpoints: fall back to the previous one, never a half restore.


def _vars():
  return (tf.Variable(tf.fill([64], -1.0)), tf.Variable(tf.fill([3, 3], -1.0)),
          tf.Variable(-1, dtype=tf.int64))


def _manager(model_dir, *, max_to_keep=3, variables=None):
  """A CheckpointManager in model_dir over fresh variables (as after a restart)."""
  v, w, step = variables or _vars()
  manager = checkpoints.make_manager(str(model_dir), max_to_keep=max_to_keep, v=v, w=w,
                                     step=step)
  return manager, (v, w, step)


def _fill(variables, value):
  v, w, step = variables
  v.assign(tf.fill(v.shape, float(value)))
  w.assign(tf.fill(w.shape, float(value)))
  step.assign(value)


def _assert_holds(variables, value):
  v, w, step = variables
  np.testing.assert_array_equal(v.numpy(), value)
  np.testing.assert_array_equal(w.numpy(), value)
  assert int(step.numpy()) == value


def _save_steps(model_dir, steps=(100, 200, 300), max_to_keep=3):
  manager, variables = _manager(model_dir, max_to_keep=max_to_keep)
  for s in steps:
    _fill(variables, s)
    manager.save(checkpoint_number=s)
  return manager.directory


def _prefix(model_dir, step):
  return os.path.join(model_dir, 'checkpoints', f'ckpt-{step}')


def _corrupt(prefix, how):
  [data] = glob.glob(prefix + '.data-*')
  if how == 'truncate_data':
    os.truncate(data, os.path.getsize(data) // 2)
  elif how == 'delete_data':
    os.remove(data)
  elif how == 'delete_index':
    os.remove(prefix + '.index')
  elif how == 'truncate_index':
    os.truncate(prefix + '.index', os.path.getsize(prefix + '.index') // 2)
  elif how == 'flip_byte':  # same size; only the CRC32C check catches it
    with open(data, 'r+b') as f:
      f.seek(40)
      byte = f.read(1)
      f.seek(40)
      f.write(bytes([byte[0] ^ 0xFF]))


def _corrupt_files(directory):
  return sorted(os.path.basename(f) for f in glob.glob(os.path.join(directory, '*.corrupt-*')))


@pytest.mark.parametrize('how', ['truncate_data', 'delete_index', 'delete_data',
                                 'truncate_index', 'flip_byte'])
def test_corrupt_newest_falls_back(tmp_path, how):
  """A truncated, missing or bit-flipped newest checkpoint is skipped with a warning
  naming it; every variable then holds the previous checkpoint's values, even after
  a raw restore attempt from the bad files; the bad files are moved aside and out
  of the state file."""
  directory = _save_steps(tmp_path)
  _corrupt(_prefix(tmp_path, 300), how)
  manager, variables = _manager(tmp_path)
  with pytest.raises(Exception):  # a raw restore fails, whatever it assigned
    manager.checkpoint.restore(_prefix(tmp_path, 300)).assert_existing_objects_matched()
  logged = []
  path = checkpoints.restore_latest(manager, model_dir=str(tmp_path), log=logged.append)
  assert path == _prefix(tmp_path, 200)
  _assert_holds(variables, 200)
  assert 'WARNING' in logged[0] and _prefix(tmp_path, 300) in logged[0]
  assert 'unreadable (' in logged[0]
  assert manager.latest_checkpoint == path
  assert manager.checkpoints == [_prefix(tmp_path, 100), path]
  assert tf.train.latest_checkpoint(directory) == path  # the state file, rewritten
  assert _corrupt_files(directory)  # moved aside, not deleted
  assert not os.path.exists(_prefix(tmp_path, 300) + '.index')
  assert not glob.glob(_prefix(tmp_path, 300) + '.data-?????-of-?????')


def test_falls_back_past_several(tmp_path):
  """Two bad checkpoints in a row are both skipped."""
  _save_steps(tmp_path)
  _corrupt(_prefix(tmp_path, 300), 'truncate_data')
  _corrupt(_prefix(tmp_path, 200), 'delete_index')
  manager, variables = _manager(tmp_path)
  logged = []
  assert checkpoints.restore_latest(manager, model_dir=str(tmp_path),
                                    log=logged.append) == _prefix(tmp_path, 100)
  _assert_holds(variables, 100)
  assert manager.checkpoints == [_prefix(tmp_path, 100)]


def test_all_corrupt_is_checkpoint_error(tmp_path):
  """No readable checkpoint: a CheckpointError listing each with its reason and the
  fix; no variable is assigned and no file is moved."""
  directory = _save_steps(tmp_path)
  for step, how in ((100, 'flip_byte'), (200, 'delete_index'), (300, 'truncate_data')):
    _corrupt(_prefix(tmp_path, step), how)
  before = sorted(os.listdir(directory))
  manager, variables = _manager(tmp_path)
  with pytest.raises(errors.CheckpointError) as info:
    checkpoints.restore_latest(manager, model_dir=str(tmp_path), log=lambda _: None)
  message = str(info.value)
  for step in (100, 200, 300):
    assert _prefix(tmp_path, step) + ' (' in message
  assert 'none is readable' in message and 'Checksum does not match' in message
  assert 'backup' in message and '--model_dir' in message
  _assert_holds(variables, -1)
  assert sorted(os.listdir(directory)) == before


def test_incompatible_model_is_not_a_fallback(tmp_path):
  """Readable files of a different model are the incompatible-model CheckpointError
  about the newest checkpoint, not a silent fallback; nothing is moved."""
  directory = _save_steps(tmp_path)
  before = sorted(os.listdir(directory))
  wrong = (tf.Variable(tf.zeros([64])), tf.Variable(tf.zeros([4, 4])),
           tf.Variable(0, dtype=tf.int64))
  manager, _ = _manager(tmp_path, variables=wrong)
  logged = []
  with pytest.raises(errors.CheckpointError, match='incompatible model') as info:
    checkpoints.restore_latest(manager, model_dir=str(tmp_path), log=logged.append)
  assert _prefix(tmp_path, 300) in str(info.value)
  assert not logged
  assert sorted(os.listdir(directory)) == before


@pytest.mark.parametrize('number', [300, 250])
def test_save_after_fallback(tmp_path, number):
  """After falling back from ckpt-300 to ckpt-200 (max_to_keep=2), saving ckpt-300
  again, or ckpt-250, works, keeps ckpt-200 (the bad one no longer counts against
  max_to_keep) and is what the next run restores; the bad files are still kept."""
  directory = _save_steps(tmp_path, max_to_keep=2)
  _corrupt(_prefix(tmp_path, 300), 'truncate_data')
  manager, variables = _manager(tmp_path, max_to_keep=2)
  checkpoints.restore_latest(manager, model_dir=str(tmp_path), log=lambda _: None)
  _fill(variables, number)
  assert manager.save(checkpoint_number=number) == _prefix(tmp_path, number)
  assert os.path.exists(_prefix(tmp_path, 200) + '.index')
  assert len(_corrupt_files(directory)) == 2
  again, restored = _manager(tmp_path, max_to_keep=2)
  assert again.checkpoints == [_prefix(tmp_path, 200), _prefix(tmp_path, number)]
  logged = []
  assert checkpoints.restore_latest(again, model_dir=str(tmp_path),
                                    log=logged.append) == _prefix(tmp_path, number)
  _assert_holds(restored, number)
  assert not logged


def test_build_falls_back_to_previous_checkpoint(tmp_path, capsys):
  """Through controller.build: a truncated newest checkpoint is skipped with a
  printed warning and the previous step and weights are restored."""
  exp = _saved_dir(tmp_path, step=7)
  kernel = exp.model.decoder.get_layer('decoder_out').kernel
  exp.step.assign(9)
  kernel.assign(tf.fill(kernel.shape, 0.5))
  exp.manager.save(checkpoint_number=9)
  _corrupt(_prefix(tmp_path, 9), 'truncate_data')
  exp = _build(_config(tmp_path))
  assert int(exp.step.numpy()) == 7
  np.testing.assert_array_equal(exp.model.decoder.get_layer('decoder_out').kernel.numpy(),
                                0.25)
  out = capsys.readouterr().out
  assert 'WARNING' in out and 'ckpt-9' in out


def test_a_lost_state_file_does_not_restart_from_step_zero(tmp_path, default_strategy):
  """With the `checkpoint` state file deleted (or garbled), the checkpoints on disk are
  still found, the newest restored, with a warning; training does not restart at 0."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from engine import checkpoints as ckpt_lib  # pylint: disable=import-outside-toplevel
  v = tf.Variable(0.0)
  manager = ckpt_lib.make_manager(str(tmp_path), max_to_keep=3, v=v)
  for number in (10, 20):
    v.assign(float(number))
    manager.save(checkpoint_number=number)
  state = tmp_path / 'checkpoints' / 'checkpoint'
  for damage in ('delete', 'garble'):
    if damage == 'delete':
      state.unlink()
    else:
      state.write_text('this is not a checkpoint state proto {{{')
    v.assign(-1.0)
    messages = []
    fresh = ckpt_lib.make_manager(str(tmp_path), max_to_keep=3, v=v)
    path = ckpt_lib.restore_latest(fresh, model_dir=str(tmp_path), log=messages.append)
    assert path.endswith('ckpt-20'), damage
    assert float(v.numpy()) == 20.0
    assert any('missing or unreadable' in m for m in messages), messages
