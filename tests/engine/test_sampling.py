"""engine/sampling.py: the hashed bit generator's statistics and determinism.

Each check would fail for a broken generator: an unkeyed or weakly keyed hash
(cross-key correlation, shared values), a poor mixer (bit balance, serial pairs),
or a wrong bits-to-float conversion (moments, tails, chi-square).
"""
import math

import numpy as np
import pytest
import tensorflow as tf

from engine import sampling

N = 1 << 20


def _seed(a, b):
  return tf.constant([a, b], tf.int32)


def _bits(seed, n=N):
  return sampling.uniform_bits([n], seed).numpy().astype(np.uint64)


def test_same_seed_same_draws_and_shape():
  a = sampling.uniform_bits([3, 5, 7], _seed(1, 2)).numpy()
  b = sampling.uniform_bits([3, 5, 7], _seed(1, 2)).numpy()
  assert a.shape == (3, 5, 7) and a.dtype == np.uint32
  np.testing.assert_array_equal(a, b)
  # The flat index drives the draw: any reshaping of the same count gives the same bits.
  np.testing.assert_array_equal(a.reshape(-1),
                                sampling.uniform_bits([105], _seed(1, 2)).numpy())


def test_xla_and_plain_draws_agree():
  seed = _seed(-5, 123456789)
  compiled = tf.function(lambda s: (sampling.uniform_bits([4099], s),
                                    sampling.standard_normal([4099], s)),
                         jit_compile=True)(seed)
  np.testing.assert_array_equal(compiled[0].numpy(),
                                sampling.uniform_bits([4099], seed).numpy())
  np.testing.assert_allclose(compiled[1].numpy(),
                             sampling.standard_normal([4099], seed).numpy(),
                             rtol=1e-5, atol=1e-5)


def test_every_bit_is_balanced():
  bits = _bits(_seed(7, 11))
  ones = np.array([np.count_nonzero((bits >> k) & 1) for k in range(32)])
  # Binomial(N, 1/2): standard deviation sqrt(N) / 2; 6 of them.
  assert np.all(np.abs(ones - N / 2) < 6 * math.sqrt(N) / 2), ones


def _chi_square_ok(counts, expected):
  k = counts.size - 1
  chi2 = float(np.sum((counts - expected) ** 2 / expected))
  return abs(chi2 - k) < 6 * math.sqrt(2 * k), chi2


def test_uniform_is_uniform_and_in_the_open_interval():
  u = sampling.uniform([N], _seed(3, 4)).numpy()
  assert u.min() > 0 and u.max() < 1
  assert abs(u.mean() - 0.5) < 6 * math.sqrt(1 / 12 / N)
  ok, chi2 = _chi_square_ok(np.histogram(u, bins=256, range=(0, 1))[0], N / 256)
  assert ok, chi2


def test_consecutive_pairs_fill_the_square():
  """Serial test: (u_2i, u_2i+1) over a 32 x 32 grid, and lag-1 correlation."""
  u = sampling.uniform([N], _seed(5, 6)).numpy()
  counts = np.histogram2d(u[0::2], u[1::2], bins=32, range=[[0, 1], [0, 1]])[0]
  ok, chi2 = _chi_square_ok(counts.reshape(-1), (N / 2) / 1024)
  assert ok, chi2
  r = np.corrcoef(u[:-1], u[1:])[0, 1]
  assert abs(r) < 6 / math.sqrt(N), r


@pytest.mark.parametrize('other', [(5, 7), (6, 6), (-5, 6), (5, 6 + (1 << 16))])
def test_nearby_keys_give_unrelated_streams(other):
  """Keys one apart (as consecutive steps' fold_in keys are not, but could be) and
  keys differing in one high bit: no correlation, and no more equal 32-bit values
  than chance (N^2 / 2^32 = 256 expected)."""
  a = _bits(_seed(5, 6))
  b = _bits(_seed(*other))
  ua, ub = a / 2.0 ** 32, b / 2.0 ** 32
  r = np.corrcoef(ua, ub)[0, 1]
  assert abs(r) < 6 / math.sqrt(N), r
  assert np.count_nonzero(a == b) < 50  # same index, same value: chance is N / 2^32
  shared = np.intersect1d(a, b).size
  assert shared < 256 + 6 * 16 + 50, shared


def test_folded_keys_of_consecutive_steps_are_unrelated():
  """The engine's keys: fold_in(step) of one run seed, steps t and t + 1."""
  base = _seed(0, 0x5A)
  keys = [tf.random.experimental.stateless_fold_in(base, t, alg='philox') for t in (0, 1)]
  a, b = (sampling.uniform([N], k).numpy() for k in keys)
  assert abs(np.corrcoef(a, b)[0, 1]) < 6 / math.sqrt(N)


def test_standard_normal_moments_and_tails():
  z = sampling.standard_normal([N], _seed(8, 9)).numpy().astype(np.float64)
  se = 1 / math.sqrt(N)
  assert abs(z.mean()) < 6 * se
  assert abs(z.var() - 1) < 6 * math.sqrt(2) * se
  assert abs(np.mean(z ** 3)) < 6 * math.sqrt(15) * se
  assert abs(np.mean(z ** 4) - 3) < 6 * math.sqrt(96) * se
  for t, tail in ((1.0, 0.31731), (2.0, 0.04550), (3.0, 0.0026998)):
    p = np.mean(np.abs(z) > t)
    assert abs(p - tail) < 6 * math.sqrt(tail * (1 - tail) / N), (t, p)


def test_normal_from_bits_matches_tf_erfinv_over_the_grid():
  """Our polynomial erfinv against tf.math.erfinv (float64) on the 23-bit grid.

  Every 97th grid point, plus both ends and the two branches' seam (w = 5).
  """
  m = np.concatenate([np.arange(0, 2 ** 23, 97), [0, 1, 2, 2 ** 22 - 1, 2 ** 22,
                                                  2 ** 23 - 2, 2 ** 23 - 1]])
  u = (m.astype(np.float64) + 0.5) * 2.0 ** -23
  seam = 0.5 * (1 - math.sqrt(1 - math.exp(-5.0)))  # 4u(1 - u) = e^-5
  near = np.round(seam * 2 ** 23 - 0.5) + np.arange(-3, 4)
  m = np.concatenate([m, near, 2 ** 23 - 1 - near]).astype(np.uint32)
  ours = sampling.normal_from_bits(tf.constant(m << 9)).numpy().astype(np.float64)
  x = tf.constant((m.astype(np.float64) + 0.5) * 2.0 ** -22 - 1.0)
  reference = math.sqrt(2.0) * tf.math.erfinv(x).numpy()
  np.testing.assert_allclose(ours, reference, rtol=2e-6, atol=1e-6)
  assert np.all(np.diff(ours[np.argsort(m)]) >= 0)  # monotone in the bits
  # The low 9 bits are ignored: the draw is a function of the top 23 bits only.
  np.testing.assert_array_equal(
      sampling.normal_from_bits(tf.constant(m << 9 | 0x1FF)).numpy(), ours.astype(np.float32))


def test_rademacher_signs_are_balanced_and_independent_of_the_normal():
  noise = sampling.Noise(_seed(10, 11))
  s = noise.rademacher([N // 8, 8]).numpy().reshape(-1)
  assert set(np.unique(s)) == {-1.0, 1.0}
  assert abs(s.mean()) < 6 / math.sqrt(N)
  eps = noise.fold(1).normal([N // 8, 8]).numpy().reshape(-1)
  assert abs(np.corrcoef(s, eps)[0, 1]) < 6 / math.sqrt(N)


@pytest.mark.parametrize('batch_axis', [0, 1, 2])
def test_rows_of_the_global_draw_are_computed_exactly(batch_axis):
  """uniform_bits_of_rows = those rows of the whole global draw, for any axis and
  any positions (out of order, repeated, none), with static or run-time shapes,
  compiled or not."""
  global_shape = [5, 6, 7]
  whole = sampling.uniform_bits(global_shape, _seed(3, 4)).numpy()
  n = global_shape[batch_axis]
  for positions in ([n - 1, 0, 2], [1, 1], list(range(n)), []):
    shape = list(global_shape)
    shape[batch_axis] = len(positions)
    want = np.take(whole, positions, axis=batch_axis)
    got = sampling.uniform_bits_of_rows(shape, _seed(3, 4), batch_axis=batch_axis,
                                        positions=tf.constant(positions, tf.int32),
                                        global_rows=n)
    np.testing.assert_array_equal(got.numpy(), want)

  @tf.function(jit_compile=True, input_signature=[tf.TensorSpec([None], tf.int32)])
  def dynamic(positions):
    shape = list(global_shape)
    shape[batch_axis] = tf.shape(positions)[0]
    return sampling.uniform_bits_of_rows(shape, _seed(3, 4), batch_axis=batch_axis,
                                         positions=positions, global_rows=n)
  np.testing.assert_array_equal(dynamic(tf.constant([2, 0], tf.int32)).numpy(),
                                np.take(whole, [2, 0], axis=batch_axis))


def test_noise_of_a_row_is_that_of_the_global_batch_however_split():
  """Each draw of a replica's rows (even split or explicit rows) equals those rows of
  the one-replica draw of the global batch; another seed changes it."""
  seed = _seed(8, 9)
  whole = sampling.Noise(seed)
  draws = {
      'normal': lambda noise, n: noise.normal([3, n, 4], batch_axis=1),
      'uniform': lambda noise, n: noise.uniform([n, 5]),
      'rademacher': lambda noise, n: noise.rademacher([n, 2, 3]),
  }
  for name, draw in draws.items():
    axis = 1 if name == 'normal' else 0
    full = draw(whole.fold(5), 6).numpy()
    parts = [draw(sampling.Noise(seed, r, 2).fold(5), 3).numpy() for r in range(2)]
    np.testing.assert_array_equal(np.concatenate(parts, axis=axis), full, err_msg=name)
    # An uneven split (4 + 2, the second out of order) by explicit rows.
    uneven = [draw(sampling.Noise(seed, rows=(tf.constant(p), 6)).fold(5), len(p)).numpy()
              for p in ([0, 1, 2, 3], [5, 4])]
    np.testing.assert_array_equal(uneven[0], np.take(full, [0, 1, 2, 3], axis=axis))
    np.testing.assert_array_equal(uneven[1], np.take(full, [5, 4], axis=axis))
    other = draw(sampling.Noise(_seed(8, 10)).fold(5), 6).numpy()
    assert not np.array_equal(other, full)
