"""Training and evaluation input.

Data order is a pure function of (seed, step): the permutation of epoch e is
argsort(stateless_uniform(seed, e)), and step t takes positions
[t mod steps_per_epoch] of it (the remainder of each epoch is dropped). Binarization
noise is drawn from (seed, step) for the *global* batch and sliced per replica.
So a resumed run sees exactly the batches an uninterrupted run would, without
checkpointing any iterator, and the split over replicas does not change the data.

Two pipelines give identical batches:
- `InMemoryTrainInput`: the training images live in a variable on each device and
  batches are gathered inside the compiled loop (no host round trip per step).
- `TfDataTrainInput`: a tf.data pipeline per input worker through
  `distribute_datasets_from_function`, for data sets too large for device memory.
"""
import contextlib
import dataclasses
from typing import Optional

import numpy as np
import tensorflow as tf

from engine import distribute
from engine import errors
from engine import sampling

_TEST_BINARIZATION_SEED = 20261124  # fixed: test figures are comparable across runs


def epoch_permutation(seed, epoch, num_examples):
  """A seeded permutation of range(num_examples) for one epoch (int32)."""
  key = tf.random.experimental.stateless_fold_in(
      tf.constant([seed, 0x5EED], tf.int32), tf.cast(epoch, tf.int32), alg='philox')
  return tf.argsort(tf.random.stateless_uniform([num_examples], seed=key), stable=True)


def step_seed(seed, step, salt):
  """Stateless int32[2] seed for (run seed, step, purpose)."""
  key = tf.random.experimental.stateless_fold_in(tf.constant([seed, salt], tf.int32),
                                                 tf.cast(step, tf.int32), alg='philox')
  return key


def to_unit_interval(images):
  """uint8 [0, 255] -> float32 [0, 1]."""
  return tf.cast(images, tf.float32) / 255.0


def binarization_noise(seed, step, global_batch_size, image_shape):
  return sampling.uniform([global_batch_size, *image_shape],
                          seed=step_seed(seed, step, 0xB1))


def binarize_test_set(images_uint8):
  """Binarizes the test set once with a fixed seed (numpy), so evaluation is reproducible."""
  rng = np.random.default_rng(_TEST_BINARIZATION_SEED)
  return (rng.random(images_uint8.shape, dtype=np.float32)
          < images_uint8.astype(np.float32) / 255.0).astype(np.float32)


@dataclasses.dataclass
class TaskData:
  """What a model trains and is tested on, prepared once by the model's module.

  Attributes:
    name, source: the data set's name and where it was read from.
    train_images: uint8 [N, H, W, C] (kept uint8 on the device; scaled to [0, 1],
      and binarized when `binarize`, inside the step).
    train_targets: None (unsupervised) or [N] int32 labels / float32 targets.
    test_images: float32 [M, H, W, C] in [0, 1], ready to evaluate (binarized once
      with a fixed seed when the model wants binary data).
    test_targets: None or [M].
    binarize: dynamic binarization of the training images.
    extras: model-specific evaluation sets (e.g. out-of-distribution images).
  """
  name: str
  source: str
  train_images: np.ndarray
  test_images: np.ndarray
  train_targets: Optional[np.ndarray] = None
  test_targets: Optional[np.ndarray] = None
  binarize: bool = False
  extras: dict = dataclasses.field(default_factory=dict)

  @property
  def num_train(self):
    return int(self.train_images.shape[0])

  @property
  def image_shape(self):
    return tuple(int(s) for s in self.train_images.shape[1:])


class _OrderedInput:
  """Shared bookkeeping of the step -> indices map."""

  def __init__(self, images, *, strategy, global_batch_size, seed, binarize, targets=None):
    self.targets = None if targets is None else np.asarray(targets)
    if self.targets is not None and self.targets.shape[0] != images.shape[0]:
      raise errors.DataError(f'{self.targets.shape[0]} targets for {images.shape[0]} images.')
    self.num_examples = int(images.shape[0])
    self.image_shape = tuple(images.shape[1:])
    self.strategy = strategy
    self.global_batch_size = global_batch_size
    self.per_replica_batch = distribute.check_global_batch(strategy, global_batch_size)
    self.steps_per_epoch = self.num_examples // global_batch_size
    if self.steps_per_epoch == 0:
      raise errors.ConfigError(
          f'--batch_size={global_batch_size} is larger than the training set '
          f'({self.num_examples} examples); lower it.')
    self.seed = seed
    self.binarize = binarize

  # Whether `shared_noise` is worth drawing ahead of the step (engine/step.py).
  draws_shared_noise = False

  def shared_noise(self, step):
    """The binarization noise of step `step`'s global batch (a function of
    (seed, step) only)."""
    return binarization_noise(self.seed, step, self.global_batch_size, self.image_shape)

  def _replica_images(self, images_uint8, step, replica_id, noise=None):
    """Float images of one replica's slice; binarized with global-batch noise
    (`noise`, when the loop drew it ahead, is that same noise)."""
    x = to_unit_interval(images_uint8)
    if self.binarize:
      if noise is None:
        noise = self.shared_noise(step)
      noise = noise[replica_id * self.per_replica_batch:
                    (replica_id + 1) * self.per_replica_batch]
      x = tf.cast(noise < x, tf.float32)
    return x


class InMemoryTrainInput(_OrderedInput):
  """Training images resident on every device; batches gathered in the graph."""

  def __init__(self, images, **kwargs):
    super().__init__(images, **kwargs)
    # Under MultiWorkerMirroredStrategy a variable made in scope is broadcast from the
    # chief, and the collective broadcast has no uint8 kernel; every worker reads the
    # same files anyway, so each keeps its own copy outside the scope there.
    scope = (contextlib.nullcontext() if distribute.is_multi_worker(self.strategy)
             else self.strategy.scope())
    with scope:
      # Not tracked by any checkpoint: data, not state.
      self._images = tf.Variable(images, trainable=False, name='train_images')
      self._targets = (None if self.targets is None else
                       tf.Variable(self.targets, trainable=False, name='train_targets'))
      self._perm = tf.Variable(tf.zeros([self.num_examples], tf.int32), trainable=False,
                               name='epoch_permutation')
      self._perm_epoch = tf.Variable(tf.constant(-1, tf.int64), trainable=False,
                                     name='permutation_epoch')

  def iterator(self, start_step):
    del start_step  # the order is computed from the step inside the graph
    return None

  def next_args(self, iterator, step):
    """Cross-replica: the global batch's example indices for `step`."""
    del iterator
    epoch = step // self.steps_per_epoch
    position = step % self.steps_per_epoch

    def refresh():
      self._perm.assign(epoch_permutation(self.seed, epoch, self.num_examples))
      self._perm_epoch.assign(epoch)
      return tf.constant(0)

    tf.cond(tf.not_equal(self._perm_epoch, epoch), refresh, lambda: tf.constant(0))
    start = tf.cast(position, tf.int32) * self.global_batch_size
    return tf.slice(self._perm, [start], [self.global_batch_size])

  @property
  def draws_shared_noise(self):
    """The binarization noise is drawn inside the compiled loop, so it can be drawn
    ahead (tf.data binarizes in its own pipeline)."""
    return self.binarize

  def replica_batch(self, indices, step, shared_noise=None):
    """Replica context: this replica's slice of the global batch. `shared_noise`:
    `shared_noise(step)`, drawn beforehand (the same noise as drawn here)."""
    rid = tf.distribute.get_replica_context().replica_id_in_sync_group
    mine = indices[rid * self.per_replica_batch:(rid + 1) * self.per_replica_batch]
    batch = {'image': self._replica_images(tf.gather(self._images, mine), step, rid,
                                           shared_noise)}
    if self._targets is not None:
      batch['target'] = tf.gather(self._targets, mine)
    return batch


class TfDataTrainInput(_OrderedInput):
  """The same batches from a tf.data pipeline per input worker."""

  def __init__(self, images, **kwargs):
    super().__init__(images, **kwargs)
    self._images_np = images

  def _dataset_fn(self, start_step, input_context):
    g, p = self.global_batch_size, self.per_replica_batch
    replicas = input_context.num_replicas_in_sync
    local = replicas // input_context.num_input_pipelines
    first = input_context.input_pipeline_id * local
    n, spe = self.num_examples, self.steps_per_epoch
    images = tf.constant(self._images_np)
    targets = None if self.targets is None else tf.constant(self.targets)

    def epoch_batches(epoch):
      perm = epoch_permutation(self.seed, epoch, n)[:spe * g]
      return tf.data.Dataset.from_tensor_slices(tf.reshape(perm, [spe, g]))

    start_epoch, start_pos = start_step // spe, start_step % spe
    ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_batches).skip(start_pos)
    steps = tf.data.Dataset.range(start_step, 2**62)

    def per_replica(step, indices):
      chunks, labels = [], []
      for r in range(first, first + local):
        x = tf.gather(images, indices[r * p:(r + 1) * p])
        chunks.append(self._replica_images(x, step, r))
        if targets is not None:
          labels.append(tf.gather(targets, indices[r * p:(r + 1) * p]))
      batch = {'image': tf.stack(chunks)}
      if targets is not None:
        batch['target'] = tf.stack(labels)
      return tf.data.Dataset.from_tensor_slices(batch)

    ds = tf.data.Dataset.zip((steps, ds)).flat_map(per_replica)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

  def iterator(self, start_step):
    dist = self.strategy.distribute_datasets_from_function(
        lambda ctx: self._dataset_fn(int(start_step), ctx))
    return iter(dist)

  def next_args(self, iterator, step):
    del step
    return next(iterator)

  def replica_batch(self, batch, step, shared_noise=None):
    del step, shared_noise  # binarized by the pipeline; draws_shared_noise is False
    return batch


def make_train_input(pipeline, images, **kwargs):
  """Factory: 'in_memory' or 'tf_data' (see module docstring)."""
  cls = InMemoryTrainInput if pipeline == 'in_memory' else TfDataTrainInput
  return cls(images, **kwargs)


def make_eval_dataset(strategy, images, *, batch_size, targets=None):
  """A distributed dataset of {'image', 'index'[, 'target']} batches (all examples
  kept), where 'index' is each example's position in the test set (int32).

  Args:
    images: float test images [M, H, W, C].
    targets: optional [M] labels or targets.
  """
  data = {'image': images, 'index': np.arange(len(images), dtype=np.int32)}
  if targets is not None:
    data['target'] = targets
  ds = tf.data.Dataset.from_tensor_slices(data).batch(batch_size).prefetch(2)
  return strategy.experimental_distribute_dataset(ds)
