"""engine/evaluation.py: per-example test figures (order, files)."""
import types

import numpy as np
import pytest
import tensorflow as tf

from engine import errors
from engine import evaluation
from engine import loop as loop_lib


def _exp(strategy, *, jit_compile):
  train = types.SimpleNamespace(seed=3, jit_compile=jit_compile, eval_batch_size=16)
  return types.SimpleNamespace(config=types.SimpleNamespace(train=train), strategy=strategy)


def _term_fn(batch, noise):
  x = batch['image']
  b = tf.shape(x)[0]
  return {'total': tf.reduce_sum(x, axis=[1, 2, 3]),
          'noisy': noise.normal([b])}


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


def test_per_example_file_round_trip_and_fingerprint(tmp_path):
  values = {'elbo': np.array([-3.0, -4.5, -5.0]), 'log_likelihood': np.array([-2., -4, -4])}
  images = np.random.RandomState(0).rand(3, 2, 2, 1).astype(np.float32)
  d = str(tmp_path)
  evaluation.write_per_example(d, values, images=images, step=7)
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


def test_rows_are_put_in_test_set_order_and_lost_or_repeated_examples_refused():
  indices = np.array([2, 0, 3, 1])
  out = loop_lib.in_test_set_order(indices, {'a': np.array([20., 0., 30., 10.]),
                                             'b': np.arange(8).reshape(4, 2)})
  np.testing.assert_array_equal(out['a'], [0., 10., 20., 30.])
  np.testing.assert_array_equal(out['b'], [[2, 3], [6, 7], [0, 1], [4, 5]])
  for bad in ([2, 0, 2, 1], [0, 1, 2, 4]):
    with pytest.raises(RuntimeError, match=r'not each of 0 \.\. 3 once \(missing, first '
                                           r'10: \[3\]\)'):
      loop_lib.in_test_set_order(np.array(bad), {'a': np.zeros(4)})
