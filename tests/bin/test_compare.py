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
