"""Test session set-up: two logical CPU devices, so multi-replica code paths run on CPU.

Must run before TensorFlow executes any op, hence at import of conftest.
"""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from engine import distribute  # noqa: E402

distribute.set_logical_cpu_devices(2)


@pytest.fixture(scope='session')
def mirrored_strategy():
  """MirroredStrategy over the two logical CPU devices, one per test session.

  One strategy per process, as in a real run: separate MirroredStrategy objects in
  one process can collide on collective instance keys (seen here: a gradient
  all-reduce of one test's model met the previous test's shape).
  """
  return distribute.make_strategy('mirrored', num_cpu_devices=2)


@pytest.fixture
def default_strategy():
  return tf.distribute.get_strategy()
