"""1 replica vs 2 replicas: the same global batch and seed give the same weights.

Data order, binarization and every sample (latents, IWAE samples, a BNN's weight
samples and per-example noise) are functions of (seed, step, global example), not of
the replica split (engine/sampling.py), and the loss is reduced over the global
batch in one place. So N steps on one device and on two logical devices must end
with the same weights up to float summation order.
"""
import numpy as np
import pytest
import tensorflow as tf

from engine import config as config_lib
from engine import controller
from models import bnn
from models import vae

BATCH = 16
STEPS = 12

CASES = {
    'vae_analytic': ('vae', vae.VAEConfig(encoder_sizes=(32,), decoder_sizes=(32,),
                                          latent_dim=4)),
    'vae_full_cov_mc': ('vae', vae.VAEConfig(encoder_sizes=(32,), decoder_sizes=(32,),
                                             latent_dim=3, posterior='full_cov',
                                             kl='monte_carlo')),
    'vae_regularizer': ('vae', vae.VAEConfig(encoder_sizes=(32,), decoder_sizes=(32,),
                                             latent_dim=4, kl='regularizer')),
    'iwae': ('vae', vae.VAEConfig(encoder_sizes=(32,), decoder_sizes=(32,), latent_dim=4,
                                  objective='iwae', num_iw_samples=3)),
    # Learned priors: every replica evaluates the whole prior (the VampPrior encodes
    # all its pseudo-inputs on each); their gradients are summed like the networks'.
    'vae_mixture_prior': ('vae', vae.VAEConfig(encoder_sizes=(32,), decoder_sizes=(32,),
                                               latent_dim=4, latent_prior='mixture',
                                               prior_components=5, kl='monte_carlo')),
    'vae_vamp_prior': ('vae', vae.VAEConfig(encoder_sizes=(32,), decoder_sizes=(32,),
                                            latent_dim=4, latent_prior='vamp',
                                            prior_components=5, kl='monte_carlo')),
    # BNNs: one weight sample shared by both replicas (Noise's shared draws), per-example
    # Flipout signs, pre-activation noise and dropout masks those of each replica's rows
    # of the global batch, the KL counted once (replica_loss divides it by the replicas).
    'bnn_reparameterization': ('bnn', bnn.BNNConfig(hidden_sizes=(16,),
                                                    bnn_layer='reparameterization')),
    'bnn_flipout': ('bnn', bnn.BNNConfig(hidden_sizes=(16,), bnn_layer='flipout')),
    'bnn_local_reparameterization': ('bnn', bnn.BNNConfig(
        hidden_sizes=(16,), bnn_layer='local_reparameterization')),
    'bnn_scale_mixture_blundell': ('bnn', bnn.BNNConfig(
        hidden_sizes=(16,), bnn_layer='reparameterization', prior='scale_mixture',
        learn_prior=True, kl_schedule='blundell')),
    'bnn_lenet_flipout': ('bnn', bnn.BNNConfig(architecture='lenet', bnn_layer='flipout')),
    'bnn_mc_dropout': ('bnn', bnn.BNNConfig(hidden_sizes=(16,), bnn_layer='mc_dropout',
                                            dropout_rate=0.3)),
}


def _config(model_dir, model, options):
  return config_lib.ExperimentConfig(
      model=model, model_options=options,
      data=config_lib.DataConfig(dataset='synthetic', synthetic_train_size=128,
                                 synthetic_test_size=32),
      train=config_lib.TrainConfig(
          model_dir=str(model_dir), train_steps=STEPS, batch_size=BATCH,
          learning_rate=1e-3, steps_per_loop=STEPS, eval_every=STEPS,
          checkpoint_every=STEPS, jit_compile=False, eval_batch_size=32,
          eval_iw_samples=0, num_summary_images=4))


def train_weights(model_dir, strategy, model, options):
  exp = controller.build(_config(model_dir, model, options), strategy)
  train_loop, iterator = controller.make_train_loop(exp)
  means, done, bad = train_loop(iterator, tf.constant(STEPS, tf.int64))
  assert int(done) == STEPS and int(bad) == -1
  return [v.numpy() for v in exp.model.trainable_variables], float(means['loss'])


@pytest.mark.parametrize('case', sorted(CASES))
def test_one_and_two_replicas_give_the_same_weights(case, tmp_path, default_strategy,
                                                     mirrored_strategy):
  model, options = CASES[case]
  one, loss_one = train_weights(tmp_path / 'one', default_strategy, model, options)
  two, loss_two = train_weights(tmp_path / 'two', mirrored_strategy, model, options)
  assert len(one) == len(two)
  np.testing.assert_allclose(loss_one, loss_two, rtol=1e-5)
  # The two splits sum the gradient in a different order. Adam divides by sqrt(v),
  # so for a weight whose gradient is near zero that rounding can move the update
  # by a visible fraction of one step (lr = 1e-3): atol is 5% of a step.
  for a, b in zip(one, two):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)


def test_a_different_seed_gives_different_weights(tmp_path, default_strategy):
  """The comparison above can fail: another seed moves the weights beyond its tolerance."""
  model, options = CASES['vae_analytic']
  one, _ = train_weights(tmp_path / 'one', default_strategy, model, options)
  config = _config(tmp_path / 'other', model, options)
  config = config_lib.ExperimentConfig(
      model=model, model_options=options, data=config.data,
      train=config_lib.TrainConfig(**{**config_lib.to_dict(config)['train'], 'seed': 1}))
  exp = controller.build(config, default_strategy)
  train_loop, iterator = controller.make_train_loop(exp)
  train_loop(iterator, tf.constant(STEPS, tf.int64))
  other = [v.numpy() for v in exp.model.trainable_variables]
  assert any(not np.allclose(a, b, rtol=1e-4, atol=5e-5) for a, b in zip(one, other))


# The test figures too: each test example's noise (its ELBO's latent sample, its
# importance samples, a hierarchical prior's u, a BNN's Flipout signs) is a function
# of its row in the test batch, not of the replica (engine/step.eval_batch_noise).
# 29 test examples in batches of 16: the last batch (13) splits unevenly, 7 and 6.
EVAL_CASES = {
    'vae_iw': ('vae', vae.VAEConfig(encoder_sizes=(32,), decoder_sizes=(32,), latent_dim=4,
                                    posterior='full_cov')),
    'vae_hierarchical': ('vae', vae.VAEConfig(
        encoder_sizes=(32,), decoder_sizes=(32,), latent_dim=4, latent_prior='hierarchical',
        top_latent_dim=3, top_units=16, kl='monte_carlo')),
    'bnn_flipout': ('bnn', bnn.BNNConfig(hidden_sizes=(16,), bnn_layer='flipout',
                                         num_mc_samples=3)),
}


def _test_figures(model_dir, strategy, model, options):
  config = _config(model_dir, model, options)
  config = config_lib.ExperimentConfig(
      model=model, model_options=options,
      data=config_lib.DataConfig(dataset='synthetic', synthetic_train_size=128,
                                 synthetic_test_size=29),
      train=config_lib.TrainConfig(**{**config_lib.to_dict(config)['train'],
                                      'eval_batch_size': 16, 'eval_iw_samples': 8,
                                      'iw_chunk_size': 4}))
  exp = controller.build(config, strategy)
  if model == 'vae':
    return vae.evaluate(exp, final=True)['per_example']
  return bnn._predictor(exp)(exp.task.test_images)  # pylint: disable=protected-access


@pytest.mark.parametrize('case', sorted(EVAL_CASES))
def test_one_and_two_replicas_give_the_same_test_figures(case, tmp_path, default_strategy,
                                                          mirrored_strategy):
  model, options = EVAL_CASES[case]
  one = _test_figures(tmp_path / 'one', default_strategy, model, options)
  two = _test_figures(tmp_path / 'two', mirrored_strategy, model, options)
  assert sorted(one) == sorted(two)
  for name in one:
    assert one[name].shape[:2] == two[name].shape[:2] and 29 in one[name].shape[:2]
    np.testing.assert_allclose(one[name], two[name], rtol=1e-4, atol=1e-4, err_msg=name)
  if model == 'bnn':  # the Monte-Carlo samples differ: the noise is in the figures
    assert np.std(one['probs'], axis=1).max() > 1e-3
