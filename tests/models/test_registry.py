"""Tests of the model registry in models/__init__.py."""
import pytest

import models
from engine import errors
from models import vae


def test_get_vae_returns_its_module():
  """models.get('vae') is the vae module, whose Config is VAEConfig."""
  module = models.get('vae')
  assert module is vae
  assert module.Config is vae.VAEConfig


def test_vae_factory_builds_a_model_with_the_engine_interface():
  """The factory takes (config, *, image_shape, pixel_mean, seed) and returns a VAE."""
  module = models.get('vae')
  config = module.Config(encoder_sizes=(16,), decoder_sizes=(16,), latent_dim=3)
  model = module.build(config, image_shape=(8, 8, 1), pixel_mean=None, seed=1)
  assert isinstance(model, vae.VAE)
  assert model.config is config
  assert model.image_shape == (8, 8, 1)
  for attr in ('train_terms', 'loss_terms', 'eval_terms', 'measurement_keys', 'eval_keys'):
    assert hasattr(model, attr), attr


@pytest.mark.parametrize('name', ['vea', 'VAE', '', 'bnnn', 'BNN'])
def test_unknown_model_raises_config_error_listing_known_names(name):
  """An unknown name raises ConfigError naming the flag, the bad value and 'vae'."""
  with pytest.raises(errors.ConfigError) as info:
    models.get(name)
  message = str(info.value)
  assert '--model=' in message
  assert repr(name) in message
  assert 'vae' in message.split('choose one of:')[1]


def test_every_registered_model_has_the_hooks():
  """Each registry entry is a module with a Config class and the controller's hooks."""
  assert 'vae' in models.MODELS
  for name, module in models.MODELS.items():
    assert isinstance(module.Config, type), name
    for hook in ('prepare_data', 'build', 'evaluate', 'summary_line', 'write_summaries'):
      assert callable(getattr(module, hook)), (name, hook)
    assert models.get(name) is module
