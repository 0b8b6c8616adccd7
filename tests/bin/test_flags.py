"""bin/flags.py in process: bin/train.py, bin/evaluate.py and bin/sample.py take the
flags they are not given from the config recorded in --model_dir."""
import dataclasses
import json
import os

from absl.testing import flagsaver
import pytest

from bin import flags as flag_lib
from engine import checkpoints
from engine import errors
from engine import config as config_lib
from models import bnn
from models import vae
from tests.bin.test_bnn_binaries import parsed_flags  # pylint: disable=unused-import


def _record(model_dir, config):
  checkpoints.check_and_record_config(str(model_dir), config_lib.to_dict(config))


def test_unset_flags_take_the_recorded_values(parsed_flags, tmp_path):
  """Every recorded field (ints, lists, None, enums) comes back as the same config;
  a flag on the command line wins over the record."""
  recorded = config_lib.ExperimentConfig(
      model='vae',
      model_options=vae.VAEConfig(encoder_sizes=(32, 16), decoder_sizes=(24,),
                                  latent_dim=4, kl_warmup_steps=5000,
                                  posterior='full_cov'),
      data=config_lib.DataConfig(dataset='synthetic', synthetic_train_size=96),
      train=config_lib.TrainConfig(model_dir=str(tmp_path), batch_size=32, seed=3,
                                   lr_schedule='cosine', learning_rate=3e-4,
                                   eval_iw_samples=100, profile_steps=(2, 4),
                                   jit_compile=False))
  _record(tmp_path, recorded)
  with flagsaver.flagsaver():
    parsed_flags(['evaluate', f'--model_dir={tmp_path}', '--eval_iw_samples=2000'])
    path, changed = flag_lib.adopt_recorded_config()
    config = flag_lib.experiment_config()
  assert path == str(tmp_path / checkpoints.CONFIG_FILE)
  # What the record changed, as the flags hold it; not the flag given, nor a
  # recorded value equal to the default.
  assert changed['encoder_sizes'] == ['32', '16'] and changed['latent_dim'] == 4
  assert changed['posterior'] == 'full_cov' and changed['profile_steps'] == ['2', '4']
  assert 'eval_iw_samples' not in changed and 'model' not in changed
  assert config.model == 'vae'
  assert config.model_options == recorded.model_options
  assert config.data == recorded.data
  assert config.train == dataclasses.replace(recorded.train, eval_iw_samples=2000)


def test_the_model_name_comes_from_the_record(parsed_flags, tmp_path):
  """A BNN dir needs no --model=bnn; an explicit --num_mc_samples overrides."""
  recorded = config_lib.ExperimentConfig(
      model='bnn', model_options=bnn.BNNConfig(hidden_sizes=(16,), train_classes=(0, 1, 2),
                                               bnn_layer='reparameterization'),
      data=config_lib.DataConfig(dataset='synthetic'),
      train=config_lib.TrainConfig(model_dir=str(tmp_path), eval_iw_samples=0))
  _record(tmp_path, recorded)
  with flagsaver.flagsaver():
    parsed_flags(['evaluate', f'--model_dir={tmp_path}', '--num_mc_samples=50'])
    flag_lib.adopt_recorded_config()
    config = flag_lib.experiment_config()
  assert config.model == 'bnn'
  assert config.model_options == dataclasses.replace(recorded.model_options,
                                                     num_mc_samples=50)


def _record_without(parsed_flags, model_dir, args, *fields):
  """Records the config that the binaries' flags ARGS build, as a run made before
  `fields` of its model_options existed."""
  with flagsaver.flagsaver():
    parsed_flags(['train', f'--model_dir={model_dir}', *args])
    _record(model_dir, flag_lib.experiment_config())
  path = model_dir / checkpoints.CONFIG_FILE
  recorded = json.loads(path.read_text())
  for field in fields:
    del recorded['model_options'][field]
  path.write_text(json.dumps(recorded))


def test_a_record_older_than_a_field_takes_the_value_it_ran_with(parsed_flags, tmp_path):
  """A VAE recorded before --gated_units existed had relu units: the flag takes False
  (not today's default, gated), reported as a change; --pixelcnn_maps_rank takes 0,
  its default, so it is not reported. A BNN record is not given the VAE's field."""
  _record_without(parsed_flags, tmp_path / 'vae', ['--nogated_units'], 'gated_units',
                  'pixelcnn_maps_rank')
  with flagsaver.flagsaver():
    parsed_flags(['train', f'--model_dir={tmp_path / "vae"}'])
    _, changed = flag_lib.adopt_recorded_config()
    config = flag_lib.experiment_config()
  assert changed == {'gated_units': False}
  assert config.model_options.gated_units is False
  assert config.model_options.pixelcnn_maps_rank == 0

  _record_without(parsed_flags, tmp_path / 'bnn', ['--model=bnn'], 'posterior_scale')
  with flagsaver.flagsaver():
    parsed_flags(['train', f'--model_dir={tmp_path / "bnn"}'])
    _, changed = flag_lib.adopt_recorded_config()
    assert flag_lib.FLAGS.gated_units is None
    config = flag_lib.experiment_config()
  assert changed == {'model': 'bnn'}
  assert config.model_options.posterior_scale == 'softplus'


def test_a_dir_without_a_record_leaves_the_flags(parsed_flags, tmp_path):
  with flagsaver.flagsaver():
    parsed_flags(['evaluate', f'--model_dir={tmp_path}', '--latent_dim=7'])
    assert flag_lib.adopt_recorded_config() == (None, {})
    config = flag_lib.experiment_config()
  assert config.model_options == vae.VAEConfig(latent_dim=7)


def test_every_vae_field_has_a_flag(parsed_flags):
  """A VAEConfig field without a flag could be neither set nor adopted from a record."""
  for field in dataclasses.fields(vae.VAEConfig):
    assert field.name in parsed_flags, field.name


def test_a_recorded_name_without_a_flag_is_reported_and_ignored(parsed_flags, tmp_path,
                                                                capsys):
  """A field renamed or removed since the run was recorded is named on stderr, not
  dropped silently; the rest of the record is adopted."""
  _record_without(parsed_flags, tmp_path, ['--latent_dim=6'])
  path = tmp_path / checkpoints.CONFIG_FILE
  recorded = json.loads(path.read_text())
  recorded['train']['old_eval_samples'] = 300
  path.write_text(json.dumps(recorded))
  with flagsaver.flagsaver():
    parsed_flags(['evaluate', f'--model_dir={tmp_path}'])
    _, changed, config = flag_lib.recorded_experiment_config()
  err = capsys.readouterr().err
  assert f"{path} records old_eval_samples=300, for which this version has no flag" in err
  assert 'give it under its new name' in err
  assert changed['latent_dim'] == 6 and config.model_options.latent_dim == 6


def test_a_recorded_value_that_no_longer_validates_names_the_record(parsed_flags,
                                                                    tmp_path):
  """The config's own message (the flag, its value, the rule) plus where the value
  came from; the same value typed on the command line gets the message alone."""
  _record_without(parsed_flags, tmp_path, ['--latent_dim=6'])
  path = tmp_path / checkpoints.CONFIG_FILE
  recorded = json.loads(path.read_text())
  recorded['model_options']['kl_warmup_steps'] = -5  # as if a rule were added since
  path.write_text(json.dumps(recorded))
  with flagsaver.flagsaver():
    parsed_flags(['evaluate', f'--model_dir={tmp_path}'])
    with pytest.raises(errors.ConfigError) as adopted:
      flag_lib.recorded_experiment_config()
  message = str(adopted.value)
  assert message.startswith('--kl_warmup_steps=-5: must be an integer >= 0.')
  assert f'--kl_warmup_steps was not given: its value comes from {path}' in message
  other = tmp_path / 'other'
  with flagsaver.flagsaver():
    parsed_flags(['train', f'--model_dir={other}', '--kl_warmup_steps=-5'])
    with pytest.raises(errors.ConfigError) as typed:
      flag_lib.recorded_experiment_config()
  assert 'comes from' not in str(typed.value)
  assert str(typed.value).startswith('--kl_warmup_steps=-5: must be')


@pytest.mark.parametrize('keep', [False, True])
def test_strategy_applies_the_xla_cpu_flags_before_anything_compiles(parsed_flags, monkeypatch,
                                                                    keep):
  """--xla_cpu_ynn_fusions (default off) and --xla_cpu_vector_width reach XLA_FLAGS
  when the binaries resolve their strategy."""
  monkeypatch.setenv('XLA_FLAGS', '--xla_dump_hlo_as_text')
  with flagsaver.flagsaver(xla_cpu_ynn_fusions=keep, xla_cpu_vector_width='256'):
    flag_lib.strategy()
  tokens = os.environ['XLA_FLAGS'].split()
  assert '--xla_cpu_prefer_vector_width=256' in tokens
  assert ('--xla_cpu_experimental_ynn_fusion_type=' in tokens) == (not keep)
