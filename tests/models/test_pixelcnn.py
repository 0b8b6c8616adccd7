"""Tests of models.pixelcnn and the VAE's --decoder=pixelcnn (and, shared with it,
the VAE-level tests of --decoder=autoregressive).

The decisive checks are exact: on 3x3 binary images the 512 probabilities p(x | z)
sum to one (they cannot if any logit sees its own pixel or a later one), and each
logit's gradient with respect to the pixels is zero from its own pixel on.
"""
import itertools
import unittest.mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from engine import config as config_lib
from engine import controller
from engine import errors
from engine import evaluation
from engine import loop as loop_lib
from models import pixelcnn
from models import vae

tfd = tfp.distributions

LATENT = 3
SMALL = (3, 3, 1)


def _vae(seed=0, randomize=True, image_shape=SMALL, **overrides):
  fields = dict(encoder_sizes=(16,), decoder_sizes=(16,), latent_dim=LATENT,
                decoder='pixelcnn', pixelcnn_filters=8, pixelcnn_kernel=3)
  fields.update(overrides)
  model = vae.VAE(vae.VAEConfig(**fields), image_shape=image_shape, seed=seed)
  if randomize:  # the output layer starts at zero: give every weight a value
    for i, w in enumerate(model.pixelcnn.weights):
      w.assign(tf.random.stateless_normal(w.shape, seed=[seed, i]))
  return model


def _all_images(shape):
  n = int(np.prod(shape))
  return tf.reshape(tf.constant(list(itertools.product([0.0, 1.0], repeat=n))),
                    [2 ** n] + list(shape))


def test_causal_mask_sees_only_earlier_pixels():
  np.testing.assert_array_equal(pixelcnn.causal_mask(3), [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
  mask = pixelcnn.causal_mask(7)
  assert mask.sum() == 24 and mask[3, 3] == 0 and mask[3, 2] == 1 and mask[4:].sum() == 0


@pytest.mark.parametrize('causal', [True, False])
def test_tap_convolution_equals_a_masked_conv2d(causal):
  layer = pixelcnn.TapConv2D(4, 5, causal=causal, use_bias=False)
  x = tf.random.stateless_uniform([2, 6, 7, 1], seed=[0, 1])
  out = layer(x)
  mask = pixelcnn.causal_mask(5) if causal else np.ones([5, 5], np.float32)
  dense = np.zeros([25, 4], np.float32)
  dense[np.flatnonzero(mask)] = layer.kernel.numpy()
  expected = tf.nn.conv2d(x, dense.reshape([5, 5, 1, 4]), 1, 'SAME')
  np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kernel,layers,window,maps', [(3, 0, 0, 0), (3, 1, 0, 0),
                                                       (5, 2, 0, 0), (3, 1, 3, 0),
                                                       (3, 1, 3, 2)])
def test_probabilities_of_all_images_sum_to_one(kernel, layers, window, maps):
  model = _vae(seed=kernel + layers, pixelcnn_kernel=kernel, pixelcnn_layers=layers,
               pixelcnn_logit_window=window, pixelcnn_latent_maps=maps)
  x = tf.reshape(_all_images(SMALL), [512, 1, 1] + list(SMALL))
  z = tf.random.stateless_normal([2, 3, LATENT], seed=[4, 4])  # [K, B, d]
  log_p = model.likelihood(z).log_prob(x)  # broadcast to [512, K, B]
  assert log_p.shape == (512, 2, 3)
  np.testing.assert_allclose(tf.reduce_sum(tf.exp(log_p), axis=0).numpy(),
                             np.ones([2, 3]), rtol=1e-5)


@pytest.mark.parametrize('window,maps', [(0, 0), (5, 0), (5, 3)])
def test_a_logit_depends_on_earlier_pixels_only_and_on_some_of_them(window, maps):
  # tanh: a random relu network may have no active unit at some pixel.
  model = _vae(image_shape=(5, 5, 1), pixelcnn_kernel=5, activation='tanh',
               pixelcnn_logit_window=window, pixelcnn_latent_maps=maps)
  x = tf.Variable(tf.constant(np.random.RandomState(0).randint(0, 2, (1, 5, 5, 1)),
                              tf.float32))
  z = tf.random.stateless_normal([1, LATENT], seed=[1, 2])
  a = model._factorized_logits(z)
  for i in range(25):
    with tf.GradientTape() as tape:
      logits = model.pixelcnn.logits(model.pixelcnn.context(x), a, z)
      target = tf.reshape(logits, [-1])[i]
    grad = tf.reshape(tape.gradient(target, x), [-1]).numpy()
    assert not np.any(grad[i:]), f'pixel {i} sees itself or a later pixel'
    if i > 0:
      assert np.any(grad[:i]), f'pixel {i} sees no earlier pixel'


@pytest.mark.parametrize('maps', [0, 2])
def test_untrained_decoder_equals_the_factorized_one(maps):
  """The head's output layer starts at zero: p(x | z) is the Bernoulli of the
  factorized logits (the first output channel), and the same as a factorized VAE's
  when there are no latent maps (same initial weights)."""
  x = tf.constant(np.random.RandomState(1).randint(0, 2, (4,) + SMALL), tf.float32)
  z = tf.random.stateless_normal([4, LATENT], seed=[2, 2])
  ar = _vae(randomize=False, pixelcnn_latent_maps=maps)
  own = tfd.Independent(tfd.Bernoulli(logits=ar._factorized_logits(z)[..., :1]), 3)
  np.testing.assert_allclose(ar.likelihood(z).log_prob(x).numpy(),
                             own.log_prob(x).numpy(), rtol=1e-6)
  if not maps:
    factorized = vae.VAE(vae.VAEConfig(encoder_sizes=(16,), decoder_sizes=(16,),
                                       latent_dim=LATENT), image_shape=SMALL, seed=0)
    np.testing.assert_allclose(ar.likelihood(z).log_prob(x).numpy(),
                               factorized.likelihood(z).log_prob(x).numpy(), rtol=1e-6)
  ar_trained = _vae(pixelcnn_latent_maps=maps)
  own = tfd.Independent(tfd.Bernoulli(logits=ar_trained._factorized_logits(z)[..., :1]), 3)
  assert not np.allclose(ar_trained.likelihood(z).log_prob(x).numpy(),
                         own.log_prob(x).numpy())


@pytest.mark.parametrize('window,maps', [(0, 0), (3, 0), (3, 2)])
def test_one_matmul_for_one_sample_per_image_equals_the_shared_taps(window, maps):
  """Training (one z per image) computes the first layer as one matmul over x's
  taps and a's channels; several z per image reuse x's taps. Same values and
  gradients."""
  model = _vae(pixelcnn_logit_window=window, pixelcnn_latent_maps=maps)
  head = model.pixelcnn
  x = tf.constant(np.random.RandomState(2).randint(0, 2, (4,) + SMALL), tf.float32)
  z = tf.random.stateless_normal([4, LATENT], seed=[7, 1])
  a = model._factorized_logits(z)
  context = head.context(x)
  assert head.one_sample_per_image(context, a)
  assert not head.one_sample_per_image(context, a[None])
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(a)
    one = head.logits(context, a, z)
    shared = head.logits(context, a[None], z[None])[0]
    one_loss, shared_loss = (tf.reduce_sum(tf.sin(3.0 * t)) for t in (one, shared))
  np.testing.assert_allclose(one.numpy(), shared.numpy(), rtol=1e-5, atol=1e-5)
  sources = [a] + head.trainable_variables
  for g1, g2 in zip(tape.gradient(one_loss, sources), tape.gradient(shared_loss, sources)):
    np.testing.assert_allclose(g1.numpy(), g2.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('window,maps', [(0, 0), (3, 0), (3, 2)])
def test_generated_probabilities_are_the_conditionals_of_the_drawn_image(window, maps):
  model = _vae(pixelcnn_logit_window=window, pixelcnn_latent_maps=maps)
  z = tf.random.stateless_normal([6, LATENT], seed=[3, 1])
  a = model._factorized_logits(z)
  x, probs = model.pixelcnn.generate(a, z, tf.constant([5, 5], tf.int32))
  assert set(np.unique(x.numpy())) <= {0.0, 1.0}
  teacher_forced = tf.sigmoid(model.pixelcnn.logits(model.pixelcnn.context(x), a, z))
  np.testing.assert_allclose(probs.numpy(), teacher_forced.numpy(), rtol=1e-5, atol=1e-6)
  again, _ = model.pixelcnn.generate(a, z, tf.constant([5, 5], tf.int32))
  np.testing.assert_array_equal(x.numpy(), again.numpy())


def test_the_logit_window_reads_the_neighbours_predicted_probabilities():
  """With the window, pixel i's logit depends on the factorized logits of pixels
  around it, later ones included (they depend on z only); without it, on a_i only."""
  z = tf.random.stateless_normal([1, LATENT], seed=[1, 2])
  x = tf.constant(np.random.RandomState(0).randint(0, 2, (1, 5, 5, 1)), tf.float32)
  for window, expected in [(0, {12}), (3, {6, 7, 8, 11, 12, 13, 16, 17, 18})]:
    model = _vae(image_shape=(5, 5, 1), pixelcnn_kernel=3, activation='tanh',
                 pixelcnn_logit_window=window)
    a = tf.Variable(model._factorized_logits(z))
    with tf.GradientTape() as tape:
      centre = tf.reshape(model.pixelcnn.logits(model.pixelcnn.context(x), a, z), [-1])[12]
    grad = tf.reshape(tape.gradient(centre, a), [-1]).numpy()
    assert set(np.flatnonzero(grad)) == expected


def test_the_latent_maps_enter_at_their_own_pixel():
  """With C latent maps, pixel i's logit depends on its own C map values (and its own
  factorized logit), on no other pixel's; the factorized output has 1 + C channels."""
  z = tf.random.stateless_normal([1, LATENT], seed=[1, 2])
  x = tf.constant(np.random.RandomState(0).randint(0, 2, (1, 5, 5, 1)), tf.float32)
  model = _vae(image_shape=(5, 5, 1), pixelcnn_kernel=3, activation='tanh',
               pixelcnn_latent_maps=2)
  a = tf.Variable(model._factorized_logits(z))
  assert a.shape == (1, 5, 5, 3)
  with tf.GradientTape() as tape:
    logits = model.pixelcnn.logits(model.pixelcnn.context(x), a, z)
    centre = tf.reshape(logits, [-1])[12]
  assert logits.shape == (1, 5, 5, 1)
  grad = tape.gradient(centre, a).numpy()
  assert set(zip(*np.nonzero(grad[0]))) == {(2, 2, 0), (2, 2, 1), (2, 2, 2)}


def _maps_and_hidden(model, z):
  """The latent maps [N, H * W * C] without their bias, and the decoder's last
  hidden layer [N, hidden], for z [N, d]."""
  out = model.decoder.get_layer('decoder_out')
  hidden = z
  for layer in model.decoder.layers:
    if layer is out:
      break
    hidden = layer(hidden)
  bias = tf.reshape(out.bias, [-1, 1 + model.config.pixelcnn_latent_maps])
  a = model._factorized_logits(z)
  maps = tf.reshape(a[..., 1:] - tf.reshape(bias[:, 1:], a.shape[1:].as_list()[:-1] + [-1]),
                    [z.shape[0], -1])
  return a, maps, hidden, bias


@pytest.mark.parametrize('rank', [0, 2])
def test_the_maps_rank_bounds_the_rank_of_the_latent_maps(rank):
  """With --pixelcnn_maps_rank=r the latent maps of any batch span at most r
  directions (they are (h D) U); without it they span as many as the hidden layer
  allows. The logits channel is the same dense function of the hidden layer either way."""
  model = _vae(image_shape=(5, 5, 1), decoder_sizes=(16,), pixelcnn_latent_maps=3,
               pixelcnn_maps_rank=rank)
  z = tf.random.stateless_normal([40, LATENT], seed=[7, 7])
  a, maps, hidden, bias = _maps_and_hidden(model, z)
  assert a.shape == (40, 5, 5, 4)
  singular = np.linalg.svd(maps.numpy(), compute_uv=False)
  numerical_rank = int(np.sum(singular > 1e-4 * singular[0]))
  if rank:
    assert numerical_rank == rank
    out = model.decoder.get_layer('decoder_out')
    np.testing.assert_allclose(
        tf.reshape(a[..., 0], [40, -1]).numpy(),
        (tf.matmul(hidden, out.logits.kernel) + bias[:, 0]).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        maps.numpy(), tf.matmul(tf.matmul(hidden, out.maps_down.kernel),
                                out.maps_up.kernel).numpy(), rtol=1e-4, atol=1e-5)
  else:
    assert numerical_rank > 2


def test_low_rank_maps_train_under_the_exact_likelihood():
  """Probabilities of all 3x3 images still sum to one, and every variable of the
  factored output layer gets a gradient (and is a kernel for weight decay)."""
  model = _vae(pixelcnn_latent_maps=2, pixelcnn_maps_rank=1)
  x = tf.reshape(_all_images(SMALL), [512, 1] + list(SMALL))
  z = tf.random.stateless_normal([3, LATENT], seed=[4, 4])
  np.testing.assert_allclose(
      tf.reduce_sum(tf.exp(model.likelihood(z).log_prob(x)), axis=0).numpy(),
      np.ones([3]), rtol=1e-5)
  batch = tf.constant(np.random.RandomState(0).randint(0, 2, (8,) + SMALL), tf.float32)
  with tf.GradientTape() as tape:
    loss, _, _ = model.loss_terms(batch, kl_weight=1.0, seed=tf.constant([1, 1], tf.int32))
    loss = tf.reduce_mean(loss)
  grads = tape.gradient(loss, model.trainable_variables)
  assert not [v.name for v, g in zip(model.trainable_variables, grads)
              if g is None or not np.any(g.numpy())]
  names = {v.name for v in model.decoder.trainable_variables}
  assert {'decoder_out/logits/kernel:0', 'decoder_out/maps_down/kernel:0',
          'decoder_out/maps_up/kernel:0', 'decoder_out/bias:0'} <= names


# Both pixel-ordered decoders inside the VAE (the MADE's own tests: test_made.py).
DECODERS = {'pixelcnn': ('pixelcnn_', _vae),
            'autoregressive': ('made_', lambda **o: vae.VAE(
                vae.VAEConfig(encoder_sizes=(16,), decoder_sizes=(16,), latent_dim=LATENT,
                              decoder='autoregressive', **o), image_shape=SMALL, seed=0))}


@pytest.mark.parametrize('decoder', list(DECODERS))
def test_likelihood_broadcasts_x_over_the_sample_axis(decoder):
  model = DECODERS[decoder][1]()
  x = tf.constant(np.random.RandomState(1).randint(0, 2, (3,) + SMALL), tf.float32)
  zk = tf.random.stateless_normal([5, 3, LATENT], seed=[2, 2])
  joint = model.likelihood(zk).log_prob(x).numpy()
  for k in range(5):
    np.testing.assert_allclose(joint[k], model.likelihood(zk[k]).log_prob(x).numpy(),
                               rtol=1e-5)


@pytest.mark.parametrize('decoder', list(DECODERS))
@pytest.mark.parametrize('objective', ['elbo', 'iwae'])
def test_vae_trains_and_every_variable_gets_a_gradient(decoder, objective):
  prefix, make = DECODERS[decoder]
  model = make(objective=objective, num_iw_samples=4 if objective == 'iwae' else 1)
  x = tf.constant(np.random.RandomState(0).randint(0, 2, (8,) + SMALL), tf.float32)
  with tf.GradientTape() as tape:
    loss, _, _ = model.loss_terms(x, kl_weight=1.0, seed=tf.constant([1, 1], tf.int32))
    loss = tf.reduce_mean(loss)
  grads = tape.gradient(loss, model.trainable_variables)
  names = [v.name for v, g in zip(model.trainable_variables, grads)
           if g is None or not np.any(g.numpy())]
  assert not names
  assert any(prefix in v.name for v in model.trainable_variables)


@pytest.mark.parametrize('decoder', list(DECODERS))
def test_vae_eval_log_likelihood_bounds_the_elbo_and_sample_gives_images(decoder):
  model = DECODERS[decoder][1]()
  x = tf.constant(np.random.RandomState(0).randint(0, 2, (6,) + SMALL), tf.float32)
  out = model.eval_terms(x, seed=tf.constant([1, 2], tf.int32), iw_samples=64,
                         iw_chunk_size=16)
  assert np.all(np.isfinite(out['log_likelihood'].numpy()))
  assert np.mean(out['log_likelihood'].numpy()) >= np.mean(out['elbo'].numpy()) - 0.05
  images = model.sample(5, tf.constant([3, 3], tf.int32)).numpy()
  assert images.shape == (5,) + SMALL
  assert np.all((images > 0) & (images < 1))
  assert model.reconstruct(x, tf.constant([3, 3], tf.int32)).shape == (6,) + SMALL


def test_conv_vae_with_pixelcnn_decoder():
  model = _vae(image_shape=(8, 8, 1), architecture='conv', conv_filters=(4, 4))
  x = tf.constant(np.random.RandomState(0).randint(0, 2, (2, 8, 8, 1)), tf.float32)
  loss, _, _ = model.loss_terms(x, kl_weight=1.0, seed=tf.constant([1, 1], tf.int32))
  assert loss.shape == (2,) and np.all(np.isfinite(loss.numpy()))


@pytest.mark.parametrize('architecture,rank', [('mlp', 0), ('conv', 0), ('mlp', 2)])
def test_pixel_mean_sets_the_logits_bias_and_the_latent_maps_start_at_zero(architecture,
                                                                           rank):
  shape = (4, 4, 1)
  mean = np.random.RandomState(0).uniform(0.1, 0.9, shape).astype(np.float32)
  model = vae.VAE(vae.VAEConfig(encoder_sizes=(16,), decoder_sizes=(16,),
                                latent_dim=LATENT, decoder='pixelcnn',
                                architecture=architecture, conv_filters=(2, 2),
                                pixelcnn_latent_maps=2, pixelcnn_maps_rank=rank),
                  image_shape=shape, pixel_mean=mean, seed=0)
  bias = model.decoder.get_layer('decoder_out').bias.numpy()
  logit = np.log(mean / (1 - mean))
  if architecture == 'mlp':  # one bias per pixel and channel, channels last
    bias = bias.reshape(4, 4, 3)
    np.testing.assert_allclose(bias[..., 0], logit[..., 0], rtol=1e-5)
  else:  # the deconvolution has one bias per channel: the logit of the mean pixel
    np.testing.assert_allclose(bias[0], np.log(mean.mean() / (1 - mean.mean())), rtol=1e-5)
  assert not np.any(bias[..., 1:])
  # The factorized output's first channel is the logits: at z's zero contribution
  # (all decoder weights zero) it is the bias.
  for w in model.decoder.trainable_variables:
    if 'kernel' in w.name:
      w.assign(tf.zeros_like(w))
  out = model._factorized_logits(tf.zeros([2, LATENT]))
  assert out.shape == (2, 4, 4, 3)
  assert not np.any(out.numpy()[..., 1:])


@pytest.mark.parametrize('overrides,flag', [
    (dict(likelihood='gaussian'), '--decoder=pixelcnn'),
    (dict(pixelcnn_kernel=4), '--pixelcnn_kernel'),
    (dict(pixelcnn_kernel=1), '--pixelcnn_kernel'),
    (dict(pixelcnn_filters=0), '--pixelcnn_filters'),
    (dict(pixelcnn_layers=-1), '--pixelcnn_layers'),
    (dict(pixelcnn_logit_window=2), '--pixelcnn_logit_window'),
    (dict(pixelcnn_logit_window=1), '--pixelcnn_logit_window'),
    (dict(pixelcnn_logit_window=-3), '--pixelcnn_logit_window'),
    (dict(pixelcnn_latent_maps=-1), '--pixelcnn_latent_maps'),
    (dict(pixelcnn_latent_maps=1.5), '--pixelcnn_latent_maps'),
    (dict(decoder='factorized', pixelcnn_latent_maps=2), '--pixelcnn_latent_maps=2'),
    (dict(pixelcnn_latent_maps=2, pixelcnn_maps_rank=-1), '--pixelcnn_maps_rank'),
    (dict(pixelcnn_maps_rank=4), '--pixelcnn_maps_rank=4 .*--pixelcnn_latent_maps=0'),
    (dict(pixelcnn_latent_maps=2, pixelcnn_maps_rank=4, architecture='conv'),
     '--pixelcnn_maps_rank=4 .*--architecture=conv'),
    (dict(decoder='autoregressive', pixelcnn_logit_window=5), '--pixelcnn_logit_window=5'),
])
def test_config_errors_name_the_flag(overrides, flag):
  with pytest.raises(errors.ConfigError, match=flag):
    vae.VAEConfig(**{'decoder': 'pixelcnn', **overrides})


def test_colour_images_are_refused():
  with pytest.raises(errors.ConfigError, match='single-channel'):
    vae.VAE(vae.VAEConfig(encoder_sizes=(16,), decoder_sizes=(16,), latent_dim=LATENT,
                          decoder='pixelcnn'), image_shape=(4, 4, 3), seed=0)


def test_engine_trains_the_pixelcnn_vae_under_xla(tmp_path):
  """The engine's compiled loop trains it (with latent maps and decoder dropout), and
  the test figures are finite with the log-likelihood estimate above the ELBO."""
  config = config_lib.ExperimentConfig(
      model='vae',
      model_options=vae.VAEConfig(encoder_sizes=(32,), decoder_sizes=(32,), latent_dim=4,
                                  decoder='pixelcnn', pixelcnn_filters=4, pixelcnn_kernel=5,
                                  pixelcnn_latent_maps=2, decoder_dropout=0.1),
      data=config_lib.DataConfig(dataset='synthetic', synthetic_train_size=128,
                                 synthetic_test_size=32),
      train=config_lib.TrainConfig(
          model_dir=str(tmp_path), train_steps=10, batch_size=32, steps_per_loop=10,
          eval_every=10, checkpoint_every=10, jit_compile=True, eval_batch_size=32,
          eval_iw_samples=8, iw_chunk_size=4, num_summary_images=2))
  metrics = controller.train(config, tf.distribute.get_strategy(), log=lambda s: None)
  assert metrics['step'] == 10
  assert np.isfinite(metrics['nll']) and -metrics['nll'] >= metrics['elbo'] - 0.5


@pytest.mark.parametrize('decoder,flag,step_xla,eval_xla', [
    ('pixelcnn', None, False, True),  # the default on this CPU-only machine
    ('pixelcnn', True, True, True),
    ('pixelcnn', False, False, False),
    ('factorized', None, True, True)])
def test_the_pixelcnn_vae_trains_without_xla_by_default_on_cpu(tmp_path, decoder, flag,
                                                               step_xla, eval_xla):
  """Unset, --jit_compile leaves the pixelcnn VAE's training step to TF's kernels on
  a CPU (faster there) and still compiles its evaluation; a given flag decides both;
  other models keep XLA."""
  config = config_lib.ExperimentConfig(
      model='vae',
      model_options=vae.VAEConfig(encoder_sizes=(8,), decoder_sizes=(8,), latent_dim=2,
                                  decoder=decoder),
      data=config_lib.DataConfig(dataset='synthetic', synthetic_train_size=64,
                                 synthetic_test_size=16),
      train=config_lib.TrainConfig(model_dir=str(tmp_path), train_steps=2, batch_size=16,
                                   steps_per_loop=2, eval_every=2, checkpoint_every=2,
                                   jit_compile=flag, eval_batch_size=16,
                                   eval_iw_samples=0, num_summary_images=2))
  assert not tf.config.list_logical_devices('GPU')
  strategy = tf.distribute.get_strategy()
  exp = controller.build(config, strategy)
  assert controller.jit_compile(exp) is step_xla
  assert evaluation.uses_xla(exp) is eval_xla
  if decoder == 'pixelcnn' and flag is None:  # what the run says, and what it runs
    with unittest.mock.patch.object(loop_lib, 'EvalLoop', wraps=loop_lib.EvalLoop) as evals, \
         unittest.mock.patch.object(loop_lib, 'TrainLoop', wraps=loop_lib.TrainLoop) as trains:
      lines = []
      controller.train(config, strategy, log=lines.append)
    assert evals.call_args.kwargs['jit_compile'] is True
    assert trains.call_args.kwargs['jit_compile'] is False
    assert any('XLA off' in line for line in lines)
    assert any('runs without XLA' in line for line in lines)


def test_evaluation_bounds_the_importance_samples_scored_at_a_time():
  # 28x28 images with 32 filters: 25,088 floats per sample, 10 fit in 2^18.
  assert vae.bounded_chunk(1000, 100, 28 * 28 * 32) == 10
  assert vae.bounded_chunk(1000, 5, 28 * 28 * 32) == 5
  assert vae.bounded_chunk(999, 100, 28 * 28 * 32) == 9  # a divisor of 999
  assert vae.bounded_chunk(7, 100, 10 ** 9) == 1
  model = _vae()
  x = tf.constant(np.random.RandomState(0).randint(0, 2, (4,) + SMALL), tf.float32)
  seed = tf.constant([1, 2], tf.int32)
  assert vae.bounded_chunk(12, 12, 1, budget=4) == 4
  # 3x3 images, 8 filters: a budget of 4 samples' activations per image.
  with unittest.mock.patch.object(vae, 'PIXELCNN_EVAL_FLOATS_PER_EXAMPLE', 4 * 9 * 8):
    bounded = model.eval_terms(x, seed=seed, iw_samples=12, iw_chunk_size=12)
  explicit = model.eval_terms(x, seed=seed, iw_samples=12, iw_chunk_size=4)
  unbounded = model.eval_terms(x, seed=seed, iw_samples=12, iw_chunk_size=12)
  np.testing.assert_allclose(bounded['log_likelihood'].numpy(),
                             explicit['log_likelihood'].numpy(), rtol=1e-6)
  assert not np.allclose(bounded['log_likelihood'].numpy(),
                         unbounded['log_likelihood'].numpy())
