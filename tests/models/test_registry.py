"""Tests of the model registry in models/__init__.py."""
import pytest

import models
from engine import errors
from models import vae


def test_get_vae_returns_config_class_and_factory():
  """models.get('vae') is exactly (VAEConfig, build)."""
  config_cls, factory = models.get('vae')
  assert config_cls is vae.VAEConfig
  assert factory is vae.build


def test_vae_factory_builds_a_model_with_the_engine_interface():
  """The factory takes (config, *, image_shape, pixel_mean, seed) and returns a VAE."""
  config_cls, factory = models.get('vae')
  config = config_cls(encoder_sizes=(16,), decoder_sizes=(16,), latent_dim=3)
  model = factory(config, image_shape=(8, 8, 1), pixel_mean=None, seed=1)
  assert isinstance(model, vae.VAE)
  assert model.config is config
  assert model.image_shape == (8, 8, 1)
  for attr in ('loss_terms', 'eval_terms', 'measurement_keys', 'eval_keys'):
    assert hasattr(model, attr), attr


@pytest.mark.parametrize('name', ['vea', 'VAE', '', 'bnn'])
def test_unknown_model_raises_config_error_listing_known_names(name):
  """An unknown name raises ConfigError naming the flag, the bad value and 'vae'."""
  with pytest.raises(errors.ConfigError) as info:
    models.get(name)
  message = str(info.value)
  assert '--model=' in message
  assert repr(name) in message
  assert 'vae' in message.split('choose one of:')[1]


def test_every_registered_model_is_a_config_and_a_callable():
  """Each registry entry is (a config class, a callable factory)."""
  assert 'vae' in models.MODELS
  for name, (config_cls, factory) in models.MODELS.items():
    assert isinstance(config_cls, type), name
    assert callable(factory), name
    assert models.get(name) == (config_cls, factory)
