"""bin/compare.py: paired differences of runs' per-example test figures."""
import numpy as np
import pytest

from bin import compare
from engine import errors
from engine import evaluation
from engine import metrics


def _write(tmp_path, name, values, *, images=None, step=10):
  model_dir = tmp_path / name
  model_dir.mkdir()
  images = np.zeros((len(next(iter(values.values()))), 2, 2, 1), np.float32) \
      if images is None else images
  evaluation.write_per_example(str(model_dir), values, images=images, step=step)
  return str(model_dir)


def test_compare_prints_paired_differences(tmp_path):
  rng = np.random.RandomState(1)
  ll = -230.0 + 10.0 * rng.randn(500)  # examples vary far more than the change
  shift = 0.3 + 0.1 * rng.randn(500)
  base = _write(tmp_path, 'base', {'log_likelihood': ll, 'elbo': ll - 2.0})
  better = _write(tmp_path, 'better', {'log_likelihood': ll + shift, 'elbo': ll - 2.0},
                  step=20)
  lines = compare.compare([base, better])
  assert lines[0].startswith('Paired over 500 test examples')
  assert lines[2] == '| run | step | NLL | ELBO | NLL diff | ELBO diff |'
  rows = [line.split(' | ') for line in lines[4:]]
  assert rows[0][1:4] == ['10', f'{-ll.mean():.2f}', f'{(ll - 2).mean():.2f}']
  nll_diff, elbo_diff = rows[1][4], rows[1][5].rstrip(' |')
  mean, stderr = metrics.paired_difference(ll, ll + shift)
  assert nll_diff == f'{-mean:+.2f} +- {stderr:.2f}'
  assert float(nll_diff.split()[0]) < -0.25 and stderr < 0.01
  assert elbo_diff == '+0.00 +- 0.00'


def test_compare_refuses_bad_input(tmp_path):
  a = _write(tmp_path, 'a', {'elbo': np.zeros(3)})
  b = _write(tmp_path, 'b', {'elbo': np.zeros(3)}, images=np.ones((3, 2, 2, 1), np.float32))
  with pytest.raises(errors.DataError, match='another test set'):
    compare.compare([a, b])
  with pytest.raises(errors.ConfigError, match='at least two'):
    compare.compare([a])
  with pytest.raises(errors.DataError, match='not found'):
    compare.compare([a, str(tmp_path / 'missing')])


def test_compare_prints_a_bnn_run_s_figures_to_four_decimals(tmp_path):
  """A BNN's per-example file holds nll, correct (1 or 0) and brier: the table shows
  NLL, accuracy (the mean of correct) and Brier, paired, to four decimals."""
  rng = np.random.RandomState(2)
  nll = rng.exponential(0.3, 400)
  correct = (rng.rand(400) < 0.9).astype(np.float64)
  brier = rng.rand(400)
  flipped = correct.copy()
  flipped[:8] = 1.0 - flipped[:8]
  base = _write(tmp_path, 'base', {'nll': nll, 'correct': correct, 'brier': brier})
  other = _write(tmp_path, 'other', {'nll': nll * 0.9, 'correct': flipped, 'brier': brier})
  lines = compare.compare([base, other])
  assert lines[2] == ('| run | step | NLL | accuracy | Brier | NLL diff | accuracy diff '
                      '| Brier diff |')
  rows = [line.split(' | ') for line in lines[4:]]
  assert rows[0][2:5] == [f'{nll.mean():.4f}', f'{correct.mean():.4f}', f'{brier.mean():.4f}']
  mean, stderr = metrics.paired_difference(correct, flipped)
  assert rows[1][6] == f'{mean:+.4f} +- {stderr:.4f}'
  assert rows[1][7].rstrip(' |') == '+0.0000 +- 0.0000'
