"""Tests of config validation: every bad value is a ConfigError naming its flag.

Covers engine/config.py (DataConfig, TrainConfig, ExperimentConfig), the model's
own VAEConfig, and the data set name checked by `controller.load_data`.
"""
import dataclasses
import json

import pytest

from engine import config as config_lib
from engine import controller
from engine import errors
from models import vae


def _train(**overrides):
  """A valid small TrainConfig with `overrides` applied."""
  base = dict(model_dir='/tmp/unused', train_steps=40, batch_size=32, steps_per_loop=10,
              eval_every=20, checkpoint_every=20, eval_batch_size=32, eval_iw_samples=4,
              iw_chunk_size=2)
  base.update(overrides)
  return config_lib.TrainConfig(**base)


def test_valid_configs_build():
  """The baseline values used throughout are accepted and kept as given."""
  t = _train()
  assert (t.train_steps, t.batch_size, t.steps_per_loop) == (40, 32, 10)
  d = config_lib.DataConfig(dataset='synthetic', input_pipeline='tf_data')
  assert d.input_pipeline == 'tf_data'
  v = vae.VAEConfig(encoder_sizes=(32,), decoder_sizes=(32,), latent_dim=4)
  assert v.latent_dim == 4


@pytest.mark.parametrize('name', ['train_steps', 'batch_size', 'steps_per_loop',
                                  'keep_checkpoints', 'eval_batch_size', 'iw_chunk_size',
                                  'num_summary_images'])
@pytest.mark.parametrize('value', [0, -3, 2.5, True, '8'])
def test_train_sizes_must_be_positive_integers(name, value):
  """Zero, negative, fractional, boolean and string sizes are refused by flag name."""
  overrides = {name: value}
  if name == 'steps_per_loop':
    overrides.update(eval_every=20, checkpoint_every=20)
  with pytest.raises(errors.ConfigError) as info:
    _train(**overrides)
  assert f'--{name}=' in str(info.value)


@pytest.mark.parametrize('name', ['eval_iw_samples', 'periodic_eval_iw_samples', 'seed'])
def test_non_negative_fields_refuse_negatives_but_take_zero(name):
  """Fields that allow 0 (e.g. 'skip') still refuse negative values by flag name."""
  assert getattr(_train(**{name: 0}), name) == 0
  with pytest.raises(errors.ConfigError, match=f'--{name}=-2'):
    _train(**{name: -2})


@pytest.mark.parametrize('name', ['eval_every', 'checkpoint_every'])
def test_schedule_must_be_multiple_of_steps_per_loop(name):
  """eval_every / checkpoint_every must be multiples of steps_per_loop."""
  with pytest.raises(errors.ConfigError) as info:
    _train(**{name: 25})
  message = str(info.value)
  assert f'--{name}=25' in message
  assert '--steps_per_loop=10' in message


def test_iw_samples_must_be_multiple_of_chunk_size():
  """Importance samples are drawn in chunks, so a remainder is refused."""
  with pytest.raises(errors.ConfigError, match='--eval_iw_samples=5.*--iw_chunk_size=2'):
    _train(eval_iw_samples=5)
  with pytest.raises(errors.ConfigError, match='--periodic_eval_iw_samples=3'):
    _train(periodic_eval_iw_samples=3)


@pytest.mark.parametrize('value', [0, -1e-3, 'fast'])
def test_learning_rate_must_be_positive(value):
  """A learning rate that is not a positive number is refused by flag name."""
  with pytest.raises(errors.ConfigError, match='--learning_rate='):
    _train(learning_rate=value)


def test_clip_grad_norm_and_model_dir_and_profile_steps():
  """Negative clipping, an empty model dir and a bad profile range are refused."""
  with pytest.raises(errors.ConfigError, match='--clip_grad_norm=-1'):
    _train(clip_grad_norm=-1.0)
  with pytest.raises(errors.ConfigError, match='--model_dir'):
    _train(model_dir='')
  with pytest.raises(errors.ConfigError, match='--profile_steps=5,5'):
    _train(profile_steps=(5, 5))
  assert _train(profile_steps=(2, 4)).profile_steps == (2, 4)


def test_data_config_validation():
  """Unknown input pipelines and non-positive synthetic sizes are refused by flag name."""
  with pytest.raises(errors.ConfigError, match="--input_pipeline='queue'"):
    config_lib.DataConfig(input_pipeline='queue')
  for name in ('synthetic_train_size', 'synthetic_test_size'):
    with pytest.raises(errors.ConfigError, match=f'--{name}=0'):
      config_lib.DataConfig(**{name: 0})


def test_batch_larger_than_synthetic_set_is_refused():
  """ExperimentConfig refuses a batch larger than the synthetic training set."""
  options = vae.VAEConfig(encoder_sizes=(32,), decoder_sizes=(32,), latent_dim=4)
  data = config_lib.DataConfig(dataset='synthetic', synthetic_train_size=16)
  with pytest.raises(errors.ConfigError, match='--batch_size=32.*--synthetic_train_size=16'):
    config_lib.ExperimentConfig(model='vae', model_options=options, data=data, train=_train())


@pytest.mark.parametrize('name,value', [('posterior', 'foo'), ('likelihood', 'poisson'),
                                        ('objective', 'elbow'), ('kl', 'exact'),
                                        ('architecture', 'resnet')])
def test_vae_unknown_names(name, value):
  """Unknown posterior/likelihood/objective/kl/architecture names name the flag."""
  with pytest.raises(errors.ConfigError) as info:
    vae.VAEConfig(**{name: value})
  message = str(info.value)
  assert f'--{name}={value!r}' in message
  assert 'choose one of' in message


@pytest.mark.parametrize('name,value', [('encoder_sizes', (32, 0)), ('decoder_sizes', ()),
                                        ('encoder_sizes', (16, -4)),
                                        ('decoder_sizes', (8.5,))])
def test_vae_layer_sizes(name, value):
  """Empty, zero, negative or fractional layer sizes are refused by flag name."""
  with pytest.raises(errors.ConfigError, match=f'--{name}='):
    vae.VAEConfig(**{name: value})


@pytest.mark.parametrize('name,value', [('latent_dim', 0), ('latent_dim', 2.0),
                                        ('num_iw_samples', -1), ('kl_warmup_steps', -5),
                                        ('likelihood_scale', -0.1)])
def test_vae_numeric_fields(name, value):
  """Non-positive or non-integer model sizes are refused by flag name."""
  overrides = {name: value}
  if name == 'num_iw_samples':
    overrides['objective'] = 'iwae'
  with pytest.raises(errors.ConfigError, match=f'--{name}='):
    vae.VAEConfig(**overrides)


def test_vae_objective_combinations():
  """ELBO with several samples, and IWAE with KL warm-up, are refused."""
  with pytest.raises(errors.ConfigError, match='--num_iw_samples=4'):
    vae.VAEConfig(num_iw_samples=4)
  with pytest.raises(errors.ConfigError, match='--kl_warmup_steps'):
    vae.VAEConfig(objective='iwae', num_iw_samples=2, kl_warmup_steps=10)
  assert vae.VAEConfig(objective='iwae', num_iw_samples=2).num_iw_samples == 2


def test_unknown_dataset_via_load_data():
  """controller.load_data refuses an unknown data set name, naming the flag and value."""
  with pytest.raises(errors.ConfigError) as info:
    controller.load_data(config_lib.DataConfig(dataset='nope'), seed=0)
  message = str(info.value)
  assert "--dataset='nope'" in message
  assert 'synthetic' in message


def test_load_data_synthetic_sizes():
  """controller.load_data passes the synthetic sizes through to the data set."""
  data = controller.load_data(
      config_lib.DataConfig(dataset='synthetic', synthetic_train_size=40,
                            synthetic_test_size=12), seed=3)
  assert data.train_images.shape == (40, 28, 28, 1)
  assert data.test_images.shape == (12, 28, 28, 1)


def test_to_dict_round_trips_through_json():
  """to_dict gives plain JSON values (tuples as lists) that json reads back equal."""
  config = config_lib.ExperimentConfig(
      model='vae', model_options=vae.VAEConfig(encoder_sizes=(32, 16)),
      data=config_lib.DataConfig(dataset='synthetic'), train=_train(profile_steps=(1, 3)))
  d = config_lib.to_dict(config)
  assert json.loads(json.dumps(d)) == d
  assert d['model_options']['encoder_sizes'] == [32, 16]
  assert d['train']['profile_steps'] == [1, 3]
  assert d['data']['dataset'] == 'synthetic'
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.train.batch_size = 3  # configs are frozen
