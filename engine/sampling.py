"""Step-indexed randomness that does not depend on how the batch is split.

A training step's noise (latent samples, weight samples, Flipout signs, local
reparameterization noise) is a pure function of (run seed, step, purpose), and the
noise of a *given global example* is the same whatever the number of replicas:
per-example noise is a function of the example's row in the global batch (each
element's bits hash its flat index in the global batch's tensor, and each replica
computes those of its own rows). Noise shared by the whole batch (one weight sample
per step) is drawn from the same seed on every replica. So training with 1 replica
and with 2 replicas at the same global batch computes the same global-batch
gradient, and a resumed run draws what an uninterrupted run would have drawn. The
evaluation does the same with each test example's row in its test batch, so test
figures do not depend on the number of replicas either.
"""
import math

import tensorflow as tf

# How the bits are made. Keys (one per step and purpose) come from Philox through
# `stateless_fold_in(..., alg='philox')`: one scalar call each, cheap. The bits of a
# draw are then a keyed integer hash of each element's flat index (`_hash_bits`):
# for 477,600 elements (one normal per weight of the BNN MLP, drawn every step) XLA's
# Philox bits took 0.91 ms and the hash 0.30 ms on the 2-core CPU of
# benchmarks/RESULTS.md, and the normals 2.05 vs 1.27 ms (`benchmarks/rng.py`).
# The hash is three rounds of a 32-bit xorshift-multiply mixer (the "lowbias32"
# constants from C. Wellons' hash-prospector search, chosen there for low avalanche
# bias), with the two key words entering between rounds; tests/engine/test_sampling.py
# checks uniformity, bit balance, serial and cross-key correlation and the normal's
# moments and tails. It is a statistical generator, not a cryptographic one.
#
# Floats are made from the bits here, not by TF: XLA and TF's kernels turn bits into
# floats differently, and doing it here makes the noise the same with and without
# XLA (normals up to erfinv's rounding), so an XLA step and a plain one, or the
# in-memory (compiled) and tf.data pipelines, see the same noise.
_SQRT2 = math.sqrt(2.0)
_GOLDEN = 0x9E3779B9  # odd: i -> i * _GOLDEN is a bijection of uint32
_MIX1, _MIX2 = 0x7FEB352D, 0x846CA68B
_KEY_SALT = (0x243F6A88, 0x85A308D3)


def _mix32(x):
  """A bijective 32-bit mixer: xorshift, multiply, xorshift, multiply, xorshift."""
  shift = tf.bitwise.right_shift
  x = tf.bitwise.bitwise_xor(x, shift(x, tf.constant(16, tf.uint32)))
  x = x * tf.constant(_MIX1, tf.uint32)
  x = tf.bitwise.bitwise_xor(x, shift(x, tf.constant(15, tf.uint32)))
  x = x * tf.constant(_MIX2, tf.uint32)
  return tf.bitwise.bitwise_xor(x, shift(x, tf.constant(16, tf.uint32)))


def _hash_at(index, seed):
  """uint32 bits of the elements whose flat indices are `index` (uint32, any shape):
  bits of element i = mix(mix(mix(i * golden ^ k0) ^ k1) + k0)."""
  key = tf.bitcast(tf.convert_to_tensor(seed, tf.int32), tf.uint32)
  k0 = _mix32(tf.bitwise.bitwise_xor(key[0], tf.constant(_KEY_SALT[0], tf.uint32)))
  k1 = _mix32(tf.bitwise.bitwise_xor(key[1], tf.constant(_KEY_SALT[1], tf.uint32)))
  x = _mix32(tf.bitwise.bitwise_xor(index * tf.constant(_GOLDEN, tf.uint32), k0))
  x = _mix32(tf.bitwise.bitwise_xor(x, k1))
  return _mix32(x + k0)


def _hash_bits(count, seed):
  """uint32 [count]: the bits of elements 0 .. count - 1."""
  return _hash_at(tf.cast(tf.range(count), tf.uint32), seed)


def uniform_bits(shape, seed):
  """uint32 bits of `shape` for an int32 [2] seed (see the comment above)."""
  shape = tf.convert_to_tensor(shape, tf.int32)
  return tf.reshape(_hash_bits(tf.reduce_prod(shape), seed), shape)


def uniform_bits_of_rows(shape, seed, *, batch_axis, positions, global_rows):
  """The rows `positions` (along `batch_axis`) of `uniform_bits(global_shape, seed)`,
  where global_shape is `shape` with `global_rows` at `batch_axis`: the same bits,
  computed for those rows only (their flat indices hashed directly).

  Args:
    shape: the local shape (rank static); shape[batch_axis] = len(positions).
    positions: int [B] rows of the global batch, each in [0, global_rows).
    global_rows: the global batch's size (int or scalar Tensor).
  """
  rank = len(shape)
  dims = [tf.cast(n, tf.int64) for n in shape]
  dims[batch_axis] = tf.cast(global_rows, tf.int64)
  index = tf.zeros([], tf.int64)
  for axis in range(rank):
    coord = (tf.cast(positions, tf.int64) if axis == batch_axis
             else tf.range(tf.cast(shape[axis], tf.int64)))
    index = index * dims[axis] + tf.reshape(
        coord, [-1 if a == axis else 1 for a in range(rank)])
  # Below 2^31 for any tensor `uniform_bits` can draw (its range is int32); the mask
  # only makes the cast to uint32 well defined.
  index = tf.cast(tf.bitwise.bitwise_and(index, 0xFFFFFFFF), tf.uint32)
  return _hash_at(index, seed)


def uniform_from_bits(bits):
  """float32 uniform on (0, 1): the grid (m + 1/2) 2^-23 of the top 23 bits m (exact)."""
  m = tf.cast(tf.bitwise.right_shift(bits, 9), tf.float32)
  return (m + 0.5) * 2.0 ** -23


def uniform(shape, seed):
  """float32 uniform on (0, 1) of `shape` (`uniform_from_bits` of `uniform_bits`)."""
  return uniform_from_bits(uniform_bits(shape, seed))


def inverted_dropout(h, rate, uniform_draws):
  """Dropout of h's units whose draw (uniform on (0, 1), h's shape) is below `rate`;
  the others are scaled by 1 / (1 - rate), so the expectation over draws is h."""
  keep = uniform_draws >= rate
  return tf.where(keep, h / tf.cast(1.0 - rate, h.dtype), tf.zeros_like(h))


# Single-precision erfinv of M. Giles, "Approximating the erfinv function" (GPU
# Computing Gems, 2011): with w = -log(1 - x^2), erfinv(x) = x p(w), p a degree-8
# polynomial in w - 2.5 for w < 5 (|x| < 0.99663) and in sqrt(w) - 3 beyond.
# Coefficients from highest to lowest degree.
_ERFINV_CENTRAL = (2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06,
                   2.1858087e-04, -1.25372503e-03, -4.17768164e-03, 2.46640727e-01,
                   1.50140941)
_ERFINV_TAIL = (-2.00214257e-04, 1.00950558e-04, 1.34934322e-03, -3.67342844e-03,
                5.73950773e-03, -7.6224613e-03, 9.43887047e-03, 1.00167406,
                2.83297682)


def _horner(coefficients, t):
  p = coefficients[0] * t + coefficients[1]
  for c in coefficients[2:]:
    p = p * t + c
  return p


def normal_from_bits(bits):
  """uint32 bits -> float32 standard normals by the inverse CDF, sqrt(2) erfinv(2u - 1).

  u is the grid (m + 1/2) 2^-23 of the top 23 bits m, so |eps| <= 5.3 (the normal's
  mass beyond that is 1e-7). erfinv is Giles' polynomial (above), evaluated here
  rather than by `tf.math.erfinv`: 1 - x^2 is formed exactly as 4u(1 - u), so a
  plain log replaces log1p, and both branches are plain Horner sums; within 1e-6
  (relative) of tf.math.erfinv over the whole grid (tests/engine/test_sampling.py).
  On its own under XLA: 1.21 ms for 477,600 normals against 1.31 ms through
  tf.math.erfinv on the same bits (`benchmarks/rng.py`, benchmarks/RESULTS.md).
  """
  u = uniform_from_bits(bits)
  x = 2.0 * u - 1.0  # exact: a multiple of 2^-23 in (-1, 1)
  w = -tf.math.log(4.0 * u * (1.0 - u))
  p = tf.where(w < 5.0, _horner(_ERFINV_CENTRAL, w - 2.5),
               _horner(_ERFINV_TAIL, tf.sqrt(w) - 3.0))
  return _SQRT2 * (p * x)


def standard_normal(shape, seed):
  """float32 standard normals of `shape` (`normal_from_bits` of `uniform_bits`)."""
  return normal_from_bits(uniform_bits(shape, seed))


class Noise:
  """Stateless noise for one replica at one step.

  Per-example noise is that of the global batch's rows this replica holds, so a
  given global example draws the same noise however the batch is split.

  Args:
    seed: int32 [2] seed for this step and purpose (e.g. `inputs.step_seed`).
    replica_id: this replica's index in the sync group (int or scalar Tensor).
    num_replicas: replicas in sync (Python int). Replica r holds rows
      [r B, (r + 1) B) of a global batch of num_replicas * B (the training split).
    rows: instead, (positions, global_rows): this replica holds rows `positions`
      (int [B]) of a global batch of `global_rows` rows, for splits that are not
      even (a test set's last, partial batch) or not known in advance.
  """

  def __init__(self, seed, replica_id=0, num_replicas=1, *, rows=None):
    self.seed = tf.convert_to_tensor(seed, tf.int32)
    self.replica_id = replica_id
    self.num_replicas = int(num_replicas)
    self.rows = rows

  @classmethod
  def from_replica_context(cls, seed):
    ctx = tf.distribute.get_replica_context()
    return cls(seed, ctx.replica_id_in_sync_group, ctx.num_replicas_in_sync)

  def fold(self, salt):
    """An independent stream for another purpose (salt: int or int scalar Tensor)."""
    return Noise(tf.random.experimental.stateless_fold_in(self.seed, salt, alg='philox'),
                 self.replica_id, self.num_replicas, rows=self.rows)

  def stream(self, i):
    """The i-th of `split`'s streams, drawn alone (each fold is ~50 graph ops)."""
    return self.fold(0x51 + i)

  def split(self, n):
    """n independent streams."""
    return [self.stream(i) for i in range(n)]

  # Shared: identical on every replica.
  def shared_normal(self, shape, dtype=tf.float32):
    return tf.cast(standard_normal(shape, self.seed), dtype)

  def shared_uniform(self, shape, dtype=tf.float32):
    return tf.cast(uniform(shape, self.seed), dtype)

  # Per example: rows of the global batch; `batch_axis` of `shape` is the local batch.
  def _bits(self, shape, batch_axis):
    shape = list(shape)
    if self.rows is not None:
      positions, global_rows = self.rows
    elif self.num_replicas == 1:
      return uniform_bits(shape, self.seed)
    else:
      local = shape[batch_axis]
      positions = self.replica_id * local + tf.range(local)
      global_rows = local * self.num_replicas
    return uniform_bits_of_rows(shape, self.seed, batch_axis=batch_axis,
                                positions=positions, global_rows=global_rows)

  def normal(self, shape, *, batch_axis=0, dtype=tf.float32):
    """Standard normal noise of `shape`, whose `batch_axis` is the local batch."""
    return tf.cast(normal_from_bits(self._bits(shape, batch_axis)), dtype)

  def uniform(self, shape, *, batch_axis=0, dtype=tf.float32):
    return tf.cast(uniform_from_bits(self._bits(shape, batch_axis)), dtype)

  def rademacher(self, shape, *, batch_axis=0, dtype=tf.float32):
    """+-1 with equal probability (Flipout sign vectors)."""
    bit = tf.cast(tf.bitwise.right_shift(self._bits(shape, batch_axis), 31), tf.int32)
    return tf.cast(2 * bit - 1, dtype)
