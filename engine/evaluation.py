"""Evaluation over a test set, shared by the models' `evaluate` hooks.

Two shapes of evaluation:
- `mean_figures`: per-example figures summed in a compiled loop, reported as means
  with standard errors (a VAE's ELBO and importance-sampled log p(x));
- `predictions`: per-example outputs gathered to numpy (a BNN's Monte-Carlo
  predictive probabilities), from which `engine.metrics` computes calibration and
  out-of-distribution figures.
"""
import math

from engine import distribute
from engine import inputs
from engine import loop as loop_lib
from engine import step as step_lib


def uses_xla(exp):
  """XLA for evaluation unless --nojit_compile, where the strategy can run it. (By
  default the evaluation is compiled even when the training step is not: the
  pixelcnn VAE's importance-sampled evaluation ran 2.2x faster under XLA on CPU,
  its training step 1.25-1.5x slower; benchmarks/RESULTS.md, session 16.)"""
  return (exp.config.train.jit_compile is not False
          and distribute.supports_per_replica_jit(exp.strategy))


def mean_figures(exp, term_fn, keys, *, images, targets=None):
  """Means and standard errors of per-example figures over a test set.

  Args:
    exp: the controller's Experiment (strategy, config).
    term_fn: (batch, noise) -> dict of per-example [B] figures named by `keys`.
    keys: names of the figures.
    images: float test images [M, H, W, C]; targets: optional [M].

  Returns:
    {'num_examples': M, name: mean, name + '_stderr': standard error, ...}
  """
  t = exp.config.train
  replica_eval = step_lib.make_replica_eval(term_fn, seed=t.seed)
  sum_keys = ('count',) + tuple(k for name in keys for k in (name, name + '_sq'))
  eval_loop = loop_lib.EvalLoop(
      replica_eval, strategy=exp.strategy, keys=sum_keys,
      jit_compile=uses_xla(exp))
  totals = {k: float(v) for k, v in eval_loop(inputs.make_eval_dataset(
      exp.strategy, images, batch_size=t.eval_batch_size, targets=targets)).items()}
  n = totals['count']
  out = {'num_examples': int(n)}
  for name in keys:
    mean = totals[name] / n
    var = max(totals[name + '_sq'] / n - mean * mean, 0.0)
    out[name] = mean
    out[name + '_stderr'] = math.sqrt(var / max(n - 1, 1))
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
    replica_predict = step_lib.make_replica_predict(predict_fn, seed=t.seed)
    self._loop = loop_lib.PredictLoop(
        replica_predict, strategy=exp.strategy,
        jit_compile=uses_xla(exp) if jit_compile is None else jit_compile)

  def __call__(self, images, targets=None):
    t = self._exp.config.train
    return self._loop(inputs.make_eval_dataset(
        self._exp.strategy, images, batch_size=t.eval_batch_size, targets=targets))
