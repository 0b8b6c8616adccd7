"""Evaluation over a test set, shared by the models' `evaluate` hooks.

Two shapes of evaluation:
- `mean_figures`: per-example figures summed in a compiled loop, reported as means
  with standard errors (a VAE's ELBO and importance-sampled log p(x));
- `predictions`: per-example outputs gathered to numpy (a BNN's Monte-Carlo
  predictive probabilities), from which `engine.metrics` computes calibration and
  out-of-distribution figures.
"""
import hashlib
import math
import os
import zipfile

import numpy as np

from engine import distribute
from engine import errors
from engine import inputs
from engine import loop as loop_lib
from engine import step as step_lib

# Every test example's final figures, beside metrics.json, for paired comparisons
# of runs on the same test set (bin/compare.py).
PER_EXAMPLE_FILE = 'test_per_example.npz'


def uses_xla(exp):
  """XLA for evaluation unless --nojit_compile, where the strategy can run it. (By
  default the evaluation is compiled even when the training step is not: the
  pixelcnn VAE's importance-sampled evaluation ran 2.2x faster under XLA on CPU,
  its training step 1.25-1.5x slower; benchmarks/RESULTS.md, session 16.)"""
  return (exp.config.train.jit_compile is not False
          and distribute.supports_per_replica_jit(exp.strategy))


def mean_figures(exp, term_fn, keys, *, images, targets=None, per_example=False):
  """Means and standard errors of per-example figures over a test set.

  Args:
    exp: the controller's Experiment (strategy, config).
    term_fn: (batch, noise) -> dict of per-example [B] figures named by `keys`.
    keys: names of the figures.
    images: float test images [M, H, W, C]; targets: optional [M].
    per_example: also return every example's figures (test-set order) under
      'per_example' ({name: float32 [M]}); the means are the same either way.

  Returns:
    {'num_examples': M, name: mean, name + '_stderr': standard error, ...}
  """
  t = exp.config.train
  keep = tuple(keys) if per_example else ()
  replica_eval = step_lib.make_replica_eval(term_fn, seed=t.seed,
                                            batch_size=t.eval_batch_size, keep=keep)
  sum_keys = ('count',) + tuple(k for name in keys for k in (name, name + '_sq'))
  eval_loop = loop_lib.EvalLoop(
      replica_eval, strategy=exp.strategy, keys=sum_keys, keep=keep,
      jit_compile=uses_xla(exp))
  totals = eval_loop(inputs.make_eval_dataset(
      exp.strategy, images, batch_size=t.eval_batch_size, targets=targets))
  values = totals.pop('per_example', None)
  totals = {k: float(v) for k, v in totals.items()}
  n = totals['count']
  out = {'num_examples': int(n)}
  for name in keys:
    mean = totals[name] / n
    var = max(totals[name + '_sq'] / n - mean * mean, 0.0)
    out[name] = mean
    out[name + '_stderr'] = math.sqrt(var / max(n - 1, 1))
  if values is not None:
    out['per_example'] = values
  return out


class Predictor:
  """Per-example outputs of `predict_fn(batch, noise)` over test sets, as numpy.

  One compiled function reused for every test set passed to it (test set, OOD
  sets, rotated copies). Outputs must have the batch as their first axis; they come
  back in test-set order.
  """

  def __init__(self, exp, predict_fn, *, jit_compile=None):
    t = exp.config.train
    self._exp = exp
    replica_predict = step_lib.make_replica_predict(predict_fn, seed=t.seed,
                                                    batch_size=t.eval_batch_size)
    self._loop = loop_lib.PredictLoop(
        replica_predict, strategy=exp.strategy,
        jit_compile=uses_xla(exp) if jit_compile is None else jit_compile)

  def __call__(self, images, targets=None):
    t = self._exp.config.train
    return self._loop(inputs.make_eval_dataset(
        self._exp.strategy, images, batch_size=t.eval_batch_size, targets=targets))


def test_set_fingerprint(images) -> str:
  """A short hash of the test images as evaluated (shape, dtype and values), so that
  per-example figures of runs on different test sets are never paired."""
  images = np.ascontiguousarray(images)
  digest = hashlib.sha256(f'{images.shape}{images.dtype}'.encode())
  digest.update(images.tobytes())
  return digest.hexdigest()[:16]


def write_per_example(model_dir, values, *, images, step):
  """Writes {figure: [M]} of the test images to model_dir/PER_EXAMPLE_FILE
  (through a temporary file, so a cut-short write leaves the old file whole)."""
  path = os.path.join(model_dir, PER_EXAMPLE_FILE)
  tmp = path + '.tmp.npz'
  np.savez(tmp, step=np.int64(step), test_set=np.str_(test_set_fingerprint(images)),
           **{f'figure_{k}': np.asarray(v, np.float32) for k, v in values.items()})
  os.replace(tmp, path)
  return path


def read_per_example(model_dir):
  """(figures {name: float64 [M]}, test-set fingerprint, step) from a model dir.

  Raises:
    errors.DataError: no such file, or one that is not a per-example file.
  """
  path = os.path.join(model_dir, PER_EXAMPLE_FILE)
  if not os.path.isfile(path):
    raise errors.DataError(
        f'{path}: not found. A run\'s final evaluation writes it; for a run '
        f'trained before the engine wrote it, evaluate again with: bin/evaluate.py '
        f'--model_dir={model_dir}')
  try:
    with np.load(path, allow_pickle=False) as f:
      figures = {k[len('figure_'):]: f[k].astype(np.float64)
                 for k in f.files if k.startswith('figure_')}
      fingerprint, step = str(f['test_set']), int(f['step'])
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    raise errors.DataError(
        f'{path}: unreadable or not a per-example figures file ({e}). Rewrite it '
        f'with: bin/evaluate.py --model_dir={model_dir}') from None
  sizes = {v.shape for v in figures.values()}
  if not figures or len(sizes) != 1 or len(sizes.pop()) != 1:
    raise errors.DataError(
        f'{path}: expected figures of one length per test example, found '
        f'{ {k: v.shape for k, v in figures.items()} }. Rewrite it with: '
        f'bin/evaluate.py --model_dir={model_dir}')
  return figures, fingerprint, step
