"""Model registry: name -> (config class, factory).

A factory takes (config, *, image_shape, pixel_mean, seed) and returns a tf.Module
with `loss_terms`, `eval_terms`, `measurement_keys` and `eval_keys`.
"""
from engine import errors
from models import vae

MODELS = {
    'vae': (vae.VAEConfig, vae.build),
}


def get(name):
  """(config class, factory) for a model name."""
  if name not in MODELS:
    raise errors.ConfigError(
        f'--model={name!r} is not known; choose one of: {", ".join(MODELS)}.')
  return MODELS[name]
