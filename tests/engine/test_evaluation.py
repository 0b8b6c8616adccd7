"""engine/evaluation.py: per-example test figures (order, files) and bin/compare.py."""
import types

import numpy as np
import pytest
import tensorflow as tf

from bin import compare
from engine import errors
from engine import evaluation
from engine import metrics


def _exp(strategy, *, jit_compile):
  train = types.SimpleNamespace(seed=3, jit_compile=jit_compile, eval_batch_size=16)
  return types.SimpleNamespace(config=types.SimpleNamespace(train=train), strategy=strategy)


def _term_fn(batch, noise):
  x = batch['image']
  b = tf.shape(x)[0]
  return {'total': tf.reduce_sum(x, axis=[1, 2, 3]),
          'noisy': tf.random.stateless_normal([b], seed=noise.seed)}


@pytest.mark.parametrize('jit_compile', [False, True])
@pytest.mark.parametrize('strategy_name', ['default_strategy', 'mirrored_strategy'])
def test_per_example_figures_come_back_in_test_set_order(request, strategy_name,
                                                         jit_compile):
  """45 examples in batches of 16 (the last partial), over 1 or 2 replicas: every
  example's figure, in test-set order, and the same means as without them."""
  strategy = request.getfixturevalue(strategy_name)
  exp = _exp(strategy, jit_compile=jit_compile)
  images = np.arange(45, dtype=np.float32)[:, None, None, None] * np.ones(
      (1, 2, 2, 1), np.float32)  # example i sums to 4 i
  plain = evaluation.mean_figures(exp, _term_fn, ('total', 'noisy'), images=images)
  out = evaluation.mean_figures(exp, _term_fn, ('total', 'noisy'), images=images,
                                per_example=True)
  assert 'per_example' not in plain
  values = out.pop('per_example')
  np.testing.assert_array_equal(values['total'], 4.0 * np.arange(45))
  assert values['noisy'].shape == (45,) and values['noisy'].std() > 0.5
  # The same noise either way; the sums differ by float rounding only.
  assert out == pytest.approx(plain, rel=1e-5, abs=1e-5)
  assert out['num_examples'] == 45
  assert out['noisy'] == pytest.approx(values['noisy'].mean(), abs=1e-5)
  assert out['noisy_stderr'] == pytest.approx(values['noisy'].std(ddof=1) / np.sqrt(45),
                                              rel=1e-4)


def _write(tmp_path, name, values, *, images=None, step=10):
  model_dir = tmp_path / name
  model_dir.mkdir()
  images = np.zeros((len(next(iter(values.values()))), 2, 2, 1), np.float32) \
      if images is None else images
  evaluation.write_per_example(str(model_dir), values, images=images, step=step)
  return str(model_dir)


def test_per_example_file_round_trip_and_fingerprint(tmp_path):
  values = {'elbo': np.array([-3.0, -4.5, -5.0]), 'log_likelihood': np.array([-2., -4, -4])}
  images = np.random.RandomState(0).rand(3, 2, 2, 1).astype(np.float32)
  d = _write(tmp_path, 'a', values, images=images, step=7)
  figures, fingerprint, step = evaluation.read_per_example(d)
  assert step == 7 and set(figures) == {'elbo', 'log_likelihood'}
  np.testing.assert_allclose(figures['elbo'], values['elbo'])
  assert fingerprint == evaluation.test_set_fingerprint(images)
  other = images.copy()
  other[0, 0, 0, 0] += 1.0
  assert evaluation.test_set_fingerprint(other) != fingerprint
  assert evaluation.test_set_fingerprint(images.reshape(3, 4, 1, 1)) != fingerprint


def test_read_per_example_refuses_missing_and_corrupt_files(tmp_path):
  with pytest.raises(errors.DataError, match=r'not found.*bin/evaluate.py --model_dir='):
    evaluation.read_per_example(str(tmp_path))
  (tmp_path / evaluation.PER_EXAMPLE_FILE).write_bytes(b'not a zip file')
  with pytest.raises(errors.DataError, match='unreadable or not a per-example'):
    evaluation.read_per_example(str(tmp_path))
  np.savez(str(tmp_path / 'x.npz'), step=np.int64(1), test_set=np.str_('ab'),
           figure_elbo=np.zeros(3), figure_rate=np.zeros(4))
  (tmp_path / 'x.npz').rename(tmp_path / evaluation.PER_EXAMPLE_FILE)
  with pytest.raises(errors.DataError, match='one length per test example'):
    evaluation.read_per_example(str(tmp_path))


def test_paired_difference():
  a = np.array([1.0, 2.0, 3.0, 4.0])
  b = a + np.array([0.5, 0.7, 0.3, 0.5])
  mean, stderr = metrics.paired_difference(a, b)
  assert mean == pytest.approx(0.5)
  # differences 0.5, 0.7, 0.3, 0.5: sample variance 0.08/3, over n = 4
  assert stderr == pytest.approx(np.sqrt(0.08 / 3 / 4))
  with pytest.raises(errors.DataError, match='same examples'):
    metrics.paired_difference(a, b[:3])
  with pytest.raises(errors.DataError, match='NaN'):
    metrics.paired_difference(a, np.array([1.0, np.nan, 0.0, 0.0]))


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
