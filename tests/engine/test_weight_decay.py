"""Decoupled weight decay (--weight_decay, AdamW): kernels shrink by lr * wd of
themselves each step, everything else is left to Adam alone."""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from engine import config as config_lib
from engine import controller
from engine import errors
from engine import precision
from models import vae

STEPS = 2
LR = 1e-6
SHRINK = 0.25  # lr * weight_decay: each step keeps 0.75 of every kernel


def _config(model_dir, *, weight_decay, jit_compile, options=None):
  return config_lib.ExperimentConfig(
      model='vae', model_options=options or vae.VAEConfig(
          encoder_sizes=(16,), decoder_sizes=(16,), latent_dim=3,
          latent_prior='mixture', prior_components=4, kl='monte_carlo'),
      data=config_lib.DataConfig(dataset='synthetic', synthetic_train_size=64,
                                 synthetic_test_size=16),
      train=config_lib.TrainConfig(
          model_dir=str(model_dir), train_steps=STEPS, batch_size=16, learning_rate=LR,
          weight_decay=weight_decay, steps_per_loop=STEPS, eval_every=STEPS,
          checkpoint_every=STEPS, jit_compile=jit_compile, eval_batch_size=16,
          eval_iw_samples=0, num_summary_images=4))


def test_only_layer_kernels_decay():
  model = vae.build(vae.VAEConfig(decoder='pixelcnn', pixelcnn_logit_window=3,
                                  latent_prior='mixture', kl='monte_carlo'),
                    image_shape=(28, 28, 1),
                    pixel_mean=np.full((28, 28, 1), 0.3, np.float32))
  names = {v.name: precision.decayed(v) for v in model.trainable_variables}
  decayed = sorted(n for n, d in names.items() if d)
  assert decayed and all(n.endswith('/kernel:0') for n in decayed)
  kept = sorted(n for n, d in names.items() if not d)
  assert any('bias' in n for n in kept) and any('mixture' in n for n in kept)
  assert not any(n.endswith('/kernel:0') for n in kept)


@pytest.mark.parametrize('strategy_name,jit_compile', [('default', True),
                                                       ('mirrored', False)])
def test_kernels_shrink_by_lr_times_decay_and_nothing_else_does(
    strategy_name, jit_compile, tmp_path, request):
  strategy = request.getfixturevalue(f'{strategy_name}_strategy')
  exp = controller.build(_config(tmp_path, weight_decay=SHRINK / LR,
                                 jit_compile=jit_compile), strategy)
  before = [v.numpy() for v in exp.model.trainable_variables]
  train_loop, iterator = controller.make_train_loop(exp)
  _, done, bad = train_loop(iterator, tf.constant(STEPS, tf.int64))
  assert int(done) == STEPS and int(bad) == -1
  # Adam moves each weight by at most about lr per step; the decay by 25% of it.
  adam = 2 * STEPS * LR
  for v, b in zip(exp.model.trainable_variables, before):
    expected = b * (1 - SHRINK) ** STEPS if precision.decayed(v) else b
    np.testing.assert_allclose(v.numpy(), expected, rtol=1e-5, atol=adam,
                               err_msg=v.name)


def test_without_decay_kernels_stay(tmp_path, default_strategy):
  """The check above can fail: with --weight_decay=0 the kernels keep their values."""
  exp = controller.build(_config(tmp_path, weight_decay=0.0, jit_compile=True),
                         default_strategy)
  kernel = next(v for v in exp.model.trainable_variables if precision.decayed(v))
  before = kernel.numpy()
  train_loop, iterator = controller.make_train_loop(exp)
  train_loop(iterator, tf.constant(STEPS, tf.int64))
  np.testing.assert_allclose(kernel.numpy(), before, atol=2 * STEPS * LR)
  assert np.abs(before).max() > 100 * STEPS * LR


@pytest.mark.parametrize('value', [-1e-3, 1 / LR, 'x'])
def test_bad_weight_decay_is_refused(value, tmp_path):
  with pytest.raises(errors.ConfigError, match='--weight_decay'):
    dataclasses.replace(_config(tmp_path, weight_decay=0.0, jit_compile=False).train,
                        weight_decay=value)
