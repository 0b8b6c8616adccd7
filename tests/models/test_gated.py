"""Tests of the gated dense units (models/gated.py) and the VAE's --gated_units.

What is checked: gated units are the MLP's default (off for conv); the layer
computes (W x + b) * sigmoid(V x + c) from its one kernel's halves (numpy by hand); the gated VAE's MLP hidden layers are those units,
of the configured widths, and its outputs differ from the relu network's; the flag
is refused for the conv architecture and for a non-boolean value. Every variable
getting a gradient, mixed precision, old checkpoints and decoder dropout on gated
layers are in test_vae, test_precision, test_checkpoints and test_decoder_dropout.
"""
import numpy as np
import pytest
import tensorflow as tf

from engine import errors
from models import gated
from models import vae

SHAPE = (4, 4, 1)


def _vae(**overrides):
  fields = dict(encoder_sizes=(8, 6), decoder_sizes=(5, 7), latent_dim=3)
  fields.update(overrides)
  return vae.VAE(vae.VAEConfig(**fields), image_shape=SHAPE,
                 pixel_mean=np.full(SHAPE, 0.3, np.float32), seed=1)


def _sigmoid(a):
  return 1.0 / (1.0 + np.exp(-a))


def test_gated_dense_is_the_value_times_the_sigmoid_of_the_gate():
  layer = gated.GatedDense(3, kernel_initializer='glorot_uniform')
  x = np.random.RandomState(0).normal(size=(5, 4)).astype(np.float32)
  layer(x)  # builds
  bias = np.random.RandomState(1).normal(size=(6,)).astype(np.float32)
  layer.linear.bias.assign(bias)  # not the zeros it starts from
  kernel = layer.linear.kernel.numpy()
  value = x @ kernel[:, :3] + bias[:3]
  gate = x @ kernel[:, 3:] + bias[3:]
  np.testing.assert_allclose(layer(x).numpy(), value * _sigmoid(gate), rtol=1e-5, atol=1e-6)
  assert layer.compute_output_shape((None, 4)).as_list() == [None, 3]
  assert [v.shape.as_list() for v in layer.trainable_variables] == [[4, 6], [6]]


def test_the_gated_vae_has_gated_hidden_layers_of_the_configured_widths():
  model = _vae(gated_units=True)
  hidden = {net: [layer for layer in getattr(model, net).layers
                  if isinstance(layer, gated.GatedDense)] for net in ('encoder', 'decoder')}
  assert [layer.units for layer in hidden['encoder']] == [8, 6]
  assert [layer.units for layer in hidden['decoder']] == [5, 7]
  # The output layers are not gated: the posterior's parameters and the logits.
  params = model.encoder.get_layer('encoder_params')
  assert not isinstance(params, gated.GatedDense) and params.units == 6  # 2 * latent_dim
  assert not isinstance(model.decoder.get_layer('decoder_out'), gated.GatedDense)
  x = tf.constant(np.random.RandomState(2).randint(0, 2, (4,) + SHAPE).astype(np.float32))
  seed = tf.constant([3, 4])
  relu = _vae(gated_units=False)
  gated_loss = model.loss_terms(x, seed=seed, kl_weight=1.0)[0].numpy()
  relu_loss = relu.loss_terms(x, seed=seed, kl_weight=1.0)[0].numpy()
  assert np.all(np.isfinite(gated_loss))
  assert not np.allclose(gated_loss, relu_loss)


def test_gated_units_are_the_mlp_default_and_off_for_conv():
  """Unset, gated_units resolves to on for the MLP and off for conv (which refuses
  it); an explicit value is kept, and config equality sees the resolved value."""
  assert vae.VAEConfig().gated_units is True
  assert vae.VAEConfig() == vae.VAEConfig(gated_units=True)
  assert vae.VAEConfig(gated_units=False).gated_units is False
  assert vae.VAEConfig(architecture='conv').gated_units is False
  model = _vae()
  assert any(isinstance(layer, gated.GatedDense) for layer in model.encoder.layers)
  relu = _vae(gated_units=False)
  assert not any(isinstance(layer, gated.GatedDense)
                 for net in (relu.encoder, relu.decoder) for layer in net.layers)


@pytest.mark.parametrize('overrides,message', [
    (dict(gated_units=True, architecture='conv', conv_filters=(4, 8)), '--architecture=conv'),
    (dict(gated_units=1), '--gated_units=1'),
    (dict(gated_units='true'), "--gated_units='true'"),
])
def test_bad_gated_units_are_refused_naming_the_flag(overrides, message):
  with pytest.raises(errors.ConfigError, match='--gated_units') as info:
    vae.VAEConfig(**overrides)
  assert message in str(info.value)
