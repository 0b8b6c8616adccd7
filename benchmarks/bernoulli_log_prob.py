"""The factorized Bernoulli likelihood's cost: tfd.Bernoulli against LogitBernoulli.

The default VAE's distortion is -log p(x | z) of 784 independent Bernoulli pixels
given their logits. `tfd.Bernoulli.log_prob` computes -softplus(l) and -softplus(-l)
and weights them with `multiply_no_nan`; `models.vae.LogitBernoulli` computes the
same function as one sigmoid cross-entropy. This script times each, forward and
gradient with respect to the logits ([B, 28, 28, 1], binary events), inside a
compiled loop of `--steps` calls, as one XLA program and with TensorFlow's kernels,
alternating the two in `--rounds` rounds; the best time per call is reported.

Usage (from the repository root):
  .venv/bin/python benchmarks/bernoulli_log_prob.py
  .venv/bin/python benchmarks/bernoulli_log_prob.py --batch_sizes=128,2048 --rounds=5
"""
import os
import sys
import time

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import tensorflow as tf
import tensorflow_probability as tfp

from benchmarks import common
from models import vae
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_list('batch_sizes', ['128', '2048'], 'Batch sizes to time.')
flags.DEFINE_integer('steps', 50, 'Calls per timed loop.')
flags.DEFINE_integer('rounds', 5, 'Timed loops per cell, alternating the two '
                     'likelihoods; the best is reported.')

LIKELIHOODS = {'tfd.Bernoulli': tfp.distributions.Bernoulli,
               'LogitBernoulli': vae.LogitBernoulli}


def make_loop(cls, logits, x, jit_compile):
  """A compiled loop of n calls of the mean distortion and its gradient."""
  def distortion_and_grad(offset):
    shifted = logits + offset  # so that no call can be hoisted out of the loop
    with tf.GradientTape() as tape:
      tape.watch(shifted)
      log_p = tfp.distributions.Independent(cls(logits=shifted, dtype=tf.float32),
                                            reinterpreted_batch_ndims=3).log_prob(x)
      loss = -tf.reduce_mean(log_p)
    grad = tape.gradient(loss, shifted)
    return loss + grad[0, 0, 0, 0]

  body = tf.function(distortion_and_grad, jit_compile=jit_compile, autograph=False)

  def loop(n):
    return tf.while_loop(lambda i, acc: i < n,
                         lambda i, acc: (i + 1, acc + 1e-9 * body(acc)),
                         (tf.constant(0), tf.constant(0.0)))[1]

  return tf.function(loop, autograph=False)


def main(argv):
  del argv
  common.configure_xla()  # --xla_cpu_vector_width, --xla_cpu_ynn_fusions, as in bin/
  print(f'TF {tf.__version__}, TFP {tfp.__version__}; {os.cpu_count()} CPU(s); '
        f'best of {FLAGS.rounds} loops of {FLAGS.steps} calls')
  print('| batch | backend | tfd.Bernoulli ms | LogitBernoulli ms | ratio |')
  print('| ---: | --- | ---: | ---: | ---: |')
  for batch in (int(b) for b in FLAGS.batch_sizes):
    logits = tf.random.stateless_normal([batch, 28, 28, 1], (1, 2), stddev=3.0)
    x = tf.cast(tf.random.stateless_uniform([batch, 28, 28, 1], (3, 4)) < 0.3, tf.float32)
    for jit_compile, backend in ((True, 'XLA'), (False, 'TF kernels')):
      loops = {name: make_loop(cls, logits, x, jit_compile)
               for name, cls in LIKELIHOODS.items()}
      for fn in loops.values():
        fn(tf.constant(3)).numpy()  # trace, compile, warm up
      best = {name: float('inf') for name in loops}
      for _ in range(FLAGS.rounds):
        for name, fn in loops.items():
          tic = time.perf_counter()
          fn(tf.constant(FLAGS.steps)).numpy()
          best[name] = min(best[name], (time.perf_counter() - tic) / FLAGS.steps)
      old, new = best['tfd.Bernoulli'] * 1e3, best['LogitBernoulli'] * 1e3
      print(f'| {batch} | {backend} | {old:.2f} | {new:.2f} | {old / new:.2f} |',
            flush=True)


if __name__ == '__main__':
  app.run(main)
