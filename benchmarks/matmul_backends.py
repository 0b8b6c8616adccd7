"""The default VAE's matmuls: XLA:CPU's dot against TensorFlow's own kernels.

Why is the engine's XLA step (benchmarks/throughput.py) only about as fast as
`Model.fit(steps_per_execution=50, jit_compile=True)`? Both run the same XLA
program, and most of a step at batch 128 is its 17 matmuls. This script times each
of them alone, in the three forms a dense layer's training step needs:

  forward   x @ W            [B, in] x [in, out]
  grad W    x^T @ dy         [in, B] x [B, out]
  grad x    dy @ W^T         [B, out] x [out, in]   (not for the first layer)

each as one XLA program (`jit_compile=True`) and as TensorFlow's own kernel
(oneDNN on x86), inside a compiled loop of `--steps` calls (a `tf.range` loop, so
Python is not timed). The best of `--rounds` is reported, with the FLOP rate and
the ratio of the two. A last row times all 17 matmuls of a step in one program.

Usage (from the repository root):
  .venv/bin/python benchmarks/matmul_backends.py
  .venv/bin/python benchmarks/matmul_backends.py --batch_size=512 --rounds=3
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

from engine import xla_cpu
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_integer('batch_size', 128, 'Rows of x (the batch).')
flags.DEFINE_integer('steps', 300, 'Calls per timed loop.')
flags.DEFINE_integer('rounds', 5, 'Timed loops per cell; the best is reported.')
flags.DEFINE_enum('xla_cpu_vector_width', 'auto', list(xla_cpu.VECTOR_WIDTHS),
                  "XLA's vector width, as bin/train.py sets it (engine/xla_cpu.py).")

# (in, out) of the default VAE's dense layers: encoder 784-512-256 -> 2 x 32 (the
# posterior's loc and scale), decoder 32-256-512-784.
LAYERS = ((784, 512), (512, 256), (256, 64), (32, 256), (256, 512), (512, 784))


def _forms(x, w, dy, first):
  forms = {'forward': lambda: tf.matmul(x, w),
           'grad W': lambda: tf.matmul(x, dy, transpose_a=True)}
  if not first:
    forms['grad x'] = lambda: tf.matmul(dy, w, transpose_b=True)
  return forms


def time_per_call(fn, jit_compile):
  """Best seconds per call of fn (a matmul) over the rounds, in a compiled loop."""
  # Only one element of the product leaves the program, so the loop carries a
  # scalar; the matmul itself cannot be skipped by either backend.
  body = tf.function(lambda: tf.reduce_sum(fn()[:1, :1]), jit_compile=jit_compile)

  @tf.function
  def loop(n):
    total = tf.constant(0.0)
    for _ in tf.range(n):
      total += body()
    return total

  loop(tf.constant(10)).numpy()  # trace, compile, warm up
  best = float('inf')
  for _ in range(FLAGS.rounds):
    tic = time.perf_counter()
    loop(tf.constant(FLAGS.steps)).numpy()
    best = min(best, (time.perf_counter() - tic) / FLAGS.steps)
  return best


def main(argv):
  del argv
  width = xla_cpu.configure(FLAGS.xla_cpu_vector_width)
  b = FLAGS.batch_size
  print(f'batch {b}; XLA vector width {width or "default"}; best of {FLAGS.rounds} '
        f'loops of {FLAGS.steps} calls; times in microseconds per call')
  print('| matmul | shape | XLA us | XLA GFLOP/s | TF us | TF GFLOP/s | XLA / TF time |')
  print('| --- | --- | ---: | ---: | ---: | ---: | ---: |')
  all_forms = []
  totals = {True: 0.0, False: 0.0}
  for i, (n_in, n_out) in enumerate(LAYERS):
    x = tf.random.stateless_normal([b, n_in], seed=[1, i])
    w = tf.Variable(tf.random.stateless_normal([n_in, n_out], seed=[2, i]) * 0.05)
    dy = tf.random.stateless_normal([b, n_out], seed=[3, i])
    flops = 2.0 * b * n_in * n_out
    for name, fn in _forms(x, w, dy, first=i == 0).items():
      all_forms.append(fn)
      xla, tf_kernel = time_per_call(fn, True), time_per_call(fn, False)
      totals[True] += xla
      totals[False] += tf_kernel
      print(f'| {name} | {n_in}x{n_out} | {xla * 1e6:,.0f} | {flops / xla / 1e9:.1f} | '
            f'{tf_kernel * 1e6:,.0f} | {flops / tf_kernel / 1e9:.1f} | '
            f'{xla / tf_kernel:.2f} |', flush=True)
  print(f'| sum of the {len(all_forms)} rows | | {totals[True] * 1e6:,.0f} | | '
        f'{totals[False] * 1e6:,.0f} | | {totals[True] / totals[False]:.2f} |')

  def step_matmuls():
    return tf.add_n([tf.reduce_sum(fn()[:1, :1])[None, None] for fn in all_forms])

  xla, tf_kernel = time_per_call(step_matmuls, True), time_per_call(step_matmuls, False)
  print(f'| all {len(all_forms)} in one program | | {xla * 1e6:,.0f} | | '
        f'{tf_kernel * 1e6:,.0f} | | {xla / tf_kernel:.2f} |')


if __name__ == '__main__':
  app.run(main)
