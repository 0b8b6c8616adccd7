"""FLOPs per training example of the engine's step, counted from the traced graph.

Counts the floating-point operations TensorFlow's profiler attributes to one
training step (forward, backward, optimizer update) of a model at a batch size, and
divides by the batch size. Used in benchmarks/RESULTS.md to predict GPU throughput
on paper: examples/sec <= peak FLOP/s x efficiency / FLOPs per example.

Usage (from the repository root):
  .venv/bin/python benchmarks/flops.py [--batch_size=128]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import tensorflow as tf  # noqa: E402

from engine import config as config_lib  # noqa: E402
from engine import controller  # noqa: E402
from engine import distribute  # noqa: E402
from engine import inputs  # noqa: E402
from engine import objectives  # noqa: E402
from engine import sampling  # noqa: E402
from models import bnn  # noqa: E402
from models import vae  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer('batch_size', 128, 'Batch size of the counted step.')

MODELS = {
    'vae (784-512-256-z32, relu, Bernoulli)': ('vae', vae.VAEConfig(gated_units=False)),
    'vae gated (784-512-256-z32, Bernoulli)': ('vae', vae.VAEConfig()),
    'bnn deterministic MLP 784-400-400-10': ('bnn', bnn.BNNConfig(bnn_layer='deterministic')),
    'bnn reparameterization MLP': ('bnn', bnn.BNNConfig(bnn_layer='reparameterization')),
    'bnn flipout MLP': ('bnn', bnn.BNNConfig(bnn_layer='flipout')),
    'bnn local_reparameterization MLP': ('bnn', bnn.BNNConfig(
        bnn_layer='local_reparameterization')),
    'bnn flipout LeNet-5': ('bnn', bnn.BNNConfig(bnn_layer='flipout', architecture='lenet')),
}


def step_flops(model_name, options, batch_size):
  config = config_lib.ExperimentConfig(
      model=model_name, model_options=options,
      data=config_lib.DataConfig(dataset='synthetic', synthetic_train_size=batch_size,
                                 synthetic_test_size=8),
      train=config_lib.TrainConfig(model_dir='/tmp/elbo_flops', batch_size=batch_size,
                                   jit_compile=False))
  exp = controller.build(config, distribute.make_strategy('default'), record_config=False)
  model, optimizer = exp.model, exp.optimizer
  x = tf.zeros((batch_size,) + exp.task.image_shape)
  batch = {'image': x}
  if exp.task.train_targets is not None:
    batch['target'] = tf.zeros([batch_size], exp.task.train_targets.dtype)

  def one_step(batch):
    noise = sampling.Noise(inputs.step_seed(0, 0, 1))
    with tf.GradientTape() as tape:
      per_example, reg, _ = model.train_terms(batch, noise=noise, step=tf.constant(0, tf.int64))
      loss = objectives.replica_loss(per_example, reg, global_batch_size=batch_size,
                                     num_replicas=1)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  graph = tf.function(one_step).get_concrete_function(batch).graph
  opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
  opts['output'] = 'none'
  info = tf.compat.v1.profiler.profile(graph, options=opts)
  return info.total_float_ops / batch_size


def main(argv):
  del argv
  print(f'FLOPs per training example (forward + backward + Adam), batch {FLAGS.batch_size}:')
  print('| model | MFLOP / example |')
  print('| --- | ---: |')
  for name, (model_name, options) in MODELS.items():
    print(f'| {name} | {step_flops(model_name, options, FLAGS.batch_size) / 1e6:.2f} |')
  print(f'\nCommand: {" ".join(sys.argv)}')


if __name__ == '__main__':
  app.run(main)
