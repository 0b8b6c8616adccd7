"""Cost of the per-step noise under XLA on this machine: Philox bits vs the hash.

A Bayesian layer draws one normal per kernel weight every step (the BNN MLP
784-400-400-10 has 477,600), and the VAE's dynamic binarization one uniform per
pixel of the batch (128 x 784 = 100,352). This times, inside one XLA-compiled
function each, drawing those sizes with:
  - `philox_bits`: `tf.random.stateless_uniform(dtype=uint32, alg='philox')`, which
    the engine used until session 3;
  - `hash_bits`: `engine.sampling.uniform_bits` (a keyed integer hash of the index);
  - `*_normal`: the same bits turned into standard normals by sqrt(2) erfinv(2u - 1)
    (`engine.sampling.normal_from_bits`: Giles' polynomial erfinv, since session 4);
  - `hash_normal_tf_erfinv`: the hash's bits through `tf.math.erfinv` instead (what
    `normal_from_bits` computed until session 4);
  - `tf_stateless_normal`: `tf.random.stateless_normal(alg='philox')`, for reference.
Each function returns a sum so nothing is optimized away; `sum_only` is that sum
alone over a variable of the same size. Medians over rounds of 200 calls.

  TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/rng.py
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import tensorflow as tf

from benchmarks import common
from engine import sampling
# pylint: enable=g-import-not-at-top,wrong-import-position

flags.DEFINE_list('sizes', ['477600', '100352'], 'Draw sizes (elements).')
flags.DEFINE_integer('rounds', 5, 'Timed rounds per variant.')
flags.DEFINE_integer('calls', 200, 'Calls per round.')
FLAGS = flags.FLAGS


def _philox_bits(n, seed):
  return tf.random.stateless_uniform([n], seed=seed, minval=None, maxval=None,
                                     dtype=tf.uint32, alg='philox')


def _tf_erfinv_normal(bits):
  m = tf.cast(tf.bitwise.right_shift(bits, 9), tf.float32)
  return 2.0 ** 0.5 * tf.math.erfinv((m + 0.5) * 2.0 ** -22 - 1.0)


def _variants(n, table):
  top = lambda b: tf.reduce_sum(tf.cast(tf.bitwise.right_shift(b, 31), tf.int32))
  return {
      'sum_only': lambda s: tf.reduce_sum(table) + tf.cast(s[0], tf.float32),
      'philox_bits': lambda s: top(_philox_bits(n, s)),
      'hash_bits': lambda s: top(sampling.uniform_bits([n], s)),
      'philox_normal': lambda s: tf.reduce_sum(sampling.normal_from_bits(_philox_bits(n, s))),
      'hash_normal': lambda s: tf.reduce_sum(sampling.standard_normal([n], s)),
      'hash_normal_tf_erfinv': lambda s: tf.reduce_sum(_tf_erfinv_normal(
          sampling.uniform_bits([n], s))),
      'tf_stateless_normal': lambda s: tf.reduce_sum(
          tf.random.stateless_normal([n], seed=s, alg='philox')),
  }


def main(argv):
  del argv
  common.print_header()
  rows = []
  for n in (int(x) for x in FLAGS.sizes):
    table = tf.Variable(tf.ones([n]))
    fns = {k: tf.function(f, jit_compile=True) for k, f in _variants(n, table).items()}
    seed = tf.constant([1, 2], tf.int32)
    for f in fns.values():
      f(seed).numpy()  # compile
    times = {k: [] for k in fns}
    for _ in range(FLAGS.rounds):  # interleaved rounds
      for k, f in fns.items():
        tic = time.perf_counter()
        for _ in range(FLAGS.calls):
          out = f(seed)
        out.numpy()
        times[k].append((time.perf_counter() - tic) / FLAGS.calls * 1e3)
    for k, t in times.items():
      rows.append([f'{n:,}', k, f'{statistics.median(t):.3f}',
                   f'{min(t):.3f}..{max(t):.3f}'])
  print(f'\nNoise cost under XLA, ms per call (median of {FLAGS.rounds} rounds of '
        f'{FLAGS.calls} calls):')
  print(common.format_table(['elements', 'variant', 'ms (median)', 'min..max'], rows))
  print(f'load average at end: {common.load_average()}')


if __name__ == '__main__':
  app.run(main)
