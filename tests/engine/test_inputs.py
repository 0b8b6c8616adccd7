"""Tests of engine/inputs.py: data order, binarization and the two pipelines.

The data order is a function of (seed, step) only, so the two pipelines, a resumed
pipeline and a pipeline split over replicas must all see the same global batches.
"""
import numpy as np
import pytest
import tensorflow as tf

from engine import errors
from engine import inputs

NUM_EXAMPLES = 22  # with a global batch of 4: 5 steps per epoch, 2 examples dropped
GLOBAL_BATCH = 4
STEPS_PER_EPOCH = NUM_EXAMPLES // GLOBAL_BATCH
IMAGE_SHAPE = (3, 3, 1)
SEED = 7


def _indexed_images():
  """Image i is filled with the value i, so a batch tells which examples it holds."""
  return np.broadcast_to(np.arange(NUM_EXAMPLES, dtype=np.uint8)[:, None, None, None],
                         (NUM_EXAMPLES,) + IMAGE_SHAPE).copy()


def _random_images():
  """Varied grey levels (including 0 and 255), for binarization noise to matter."""
  rng = np.random.default_rng(11)
  images = rng.integers(0, 256, size=(NUM_EXAMPLES,) + IMAGE_SHAPE, dtype=np.uint8)
  images[:, 0, 0, 0] = 0
  images[:, 0, 1, 0] = 255
  return images


def _make(cls, images, strategy, *, binarize, seed=SEED, batch=GLOBAL_BATCH):
  return cls(images, strategy=strategy, global_batch_size=batch, seed=seed,
             binarize=binarize)


def _in_memory_batches(train_input, strategy, steps):
  """Per step, the tuple of per-replica image batches (numpy) of an InMemoryTrainInput.

  Driven like engine.loop: next_args in cross-replica context, replica_batch inside
  strategy.run, both inside one tf.function.
  """

  @tf.function
  def fetch(step):
    indices = train_input.next_args(None, step)
    return strategy.run(train_input.replica_batch, args=(indices, step))['image']

  out = []
  for step in steps:
    per_replica = fetch(tf.constant(step, tf.int64))
    out.append(tuple(v.numpy() for v in strategy.experimental_local_results(per_replica)))
  return out


def _tf_data_batches(train_input, strategy, start_step, num_steps):
  """Per step, the tuple of per-replica image batches of a TfDataTrainInput."""
  iterator = train_input.iterator(start_step)
  out = []
  for step in range(start_step, start_step + num_steps):
    batch = train_input.replica_batch(train_input.next_args(iterator, step), step)
    out.append(tuple(v.numpy() for v in strategy.experimental_local_results(batch['image'])))
  return out


def test_epoch_permutation_is_a_permutation():
  """Each epoch's order holds every index exactly once, as int32."""
  for epoch in range(3):
    perm = inputs.epoch_permutation(SEED, epoch, 50)
    assert perm.dtype == tf.int32
    np.testing.assert_array_equal(np.sort(perm.numpy()), np.arange(50))


def test_epoch_permutation_deterministic_per_seed_and_epoch():
  """Same (seed, epoch) gives the same order; other epochs and seeds give others."""
  a = inputs.epoch_permutation(SEED, 4, 100).numpy()
  b = inputs.epoch_permutation(SEED, tf.constant(4, tf.int64), 100).numpy()
  np.testing.assert_array_equal(a, b)
  others = [inputs.epoch_permutation(SEED, e, 100).numpy() for e in (0, 1, 2, 3, 5)]
  for other in others:
    assert not np.array_equal(a, other)
  assert not np.array_equal(a, inputs.epoch_permutation(SEED + 1, 4, 100).numpy())
  assert not np.array_equal(a, np.arange(100))  # actually shuffled


def test_in_memory_order_follows_epoch_permutations(default_strategy):
  """Step t takes slots [t mod steps_per_epoch] of epoch t // steps_per_epoch's
  permutation, so each epoch's batches are disjoint and the remainder is dropped."""
  train_input = _make(inputs.InMemoryTrainInput, _indexed_images(), default_strategy,
                      binarize=False)
  assert train_input.steps_per_epoch == STEPS_PER_EPOCH
  steps = range(2 * STEPS_PER_EPOCH + 2)
  batches = _in_memory_batches(train_input, default_strategy, steps)
  for step, (batch,) in zip(steps, batches):
    assert batch.shape == (GLOBAL_BATCH,) + IMAGE_SHAPE
    ids = np.rint(batch[:, 0, 0, 0] * 255).astype(int)
    np.testing.assert_allclose(batch * 255, np.rint(batch * 255), atol=1e-4)  # pixels are i / 255
    epoch, position = divmod(step, STEPS_PER_EPOCH)
    perm = inputs.epoch_permutation(SEED, epoch, NUM_EXAMPLES).numpy()
    np.testing.assert_array_equal(
        ids, perm[position * GLOBAL_BATCH:(position + 1) * GLOBAL_BATCH])
  first_epoch = np.concatenate(
      [np.rint(b[0][:, 0, 0, 0] * 255).astype(int) for b in batches[:STEPS_PER_EPOCH]])
  assert len(set(first_epoch.tolist())) == STEPS_PER_EPOCH * GLOBAL_BATCH
  # Epoch 1 starts a new order rather than repeating epoch 0's.
  assert not np.array_equal(batches[0][0], batches[STEPS_PER_EPOCH][0])


def test_pipelines_agree_across_epoch_boundary(default_strategy):
  """InMemory and TfData give bit-identical binarized batches for the first steps,
  through the end of an epoch and into the next."""
  images = _random_images()
  num_steps = 2 * STEPS_PER_EPOCH + 1
  in_memory = _in_memory_batches(
      _make(inputs.InMemoryTrainInput, images, default_strategy, binarize=True),
      default_strategy, range(num_steps))
  tf_data = _tf_data_batches(
      _make(inputs.TfDataTrainInput, images, default_strategy, binarize=True),
      default_strategy, 0, num_steps)
  assert len(in_memory) == len(tf_data) == num_steps
  for step, ((a,), (b,)) in enumerate(zip(in_memory, tf_data)):
    assert a.shape == b.shape == (GLOBAL_BATCH,) + IMAGE_SHAPE
    np.testing.assert_array_equal(a, b, err_msg=f'step {step}')
  assert not np.array_equal(in_memory[0][0], in_memory[1][0])


def test_tf_data_resumes_at_nonzero_start_step(default_strategy):
  """A TfData pipeline started at step 7 (mid epoch 1) yields the batches that the
  in-memory pipeline gives for steps 7, 8, ... and that an uninterrupted TfData
  pipeline gives at those steps."""
  images = _random_images()
  start, num_steps = STEPS_PER_EPOCH + 2, 2 * STEPS_PER_EPOCH
  resumed = _tf_data_batches(
      _make(inputs.TfDataTrainInput, images, default_strategy, binarize=True),
      default_strategy, start, num_steps)
  in_memory = _in_memory_batches(
      _make(inputs.InMemoryTrainInput, images, default_strategy, binarize=True),
      default_strategy, range(start, start + num_steps))
  fresh = _tf_data_batches(
      _make(inputs.TfDataTrainInput, images, default_strategy, binarize=True),
      default_strategy, 0, start + num_steps)[start:]
  for i, ((a,), (b,), (c,)) in enumerate(zip(resumed, in_memory, fresh)):
    np.testing.assert_array_equal(a, b, err_msg=f'step {start + i}')
    np.testing.assert_array_equal(a, c, err_msg=f'step {start + i}')


def test_in_memory_jumping_to_a_later_step(default_strategy):
  """The in-memory pipeline needs no iterator state: asking for step 12 first gives
  the same batch as reaching step 12 in order."""
  images = _random_images()
  in_order = _in_memory_batches(
      _make(inputs.InMemoryTrainInput, images, default_strategy, binarize=True),
      default_strategy, range(13))[12][0]
  jumped = _in_memory_batches(
      _make(inputs.InMemoryTrainInput, images, default_strategy, binarize=True),
      default_strategy, [12])[0][0]
  np.testing.assert_array_equal(in_order, jumped)


@pytest.mark.parametrize('pipeline', ['in_memory', 'tf_data'])
def test_mirrored_replicas_concatenate_to_global_batch(pipeline, mirrored_strategy,
                                                       default_strategy):
  """With two replicas, replica 0's batch followed by replica 1's equals the
  single-replica global batch for the same seed and step (binarization included)."""
  assert mirrored_strategy.num_replicas_in_sync == 2
  images = _random_images()
  num_steps = STEPS_PER_EPOCH + 2
  reference = _in_memory_batches(
      _make(inputs.InMemoryTrainInput, images, default_strategy, binarize=True),
      default_strategy, range(num_steps))
  train_input = inputs.make_train_input(
      pipeline, images, strategy=mirrored_strategy, global_batch_size=GLOBAL_BATCH,
      seed=SEED, binarize=True)
  assert train_input.per_replica_batch == GLOBAL_BATCH // 2
  if pipeline == 'in_memory':
    assert isinstance(train_input, inputs.InMemoryTrainInput)
    split = _in_memory_batches(train_input, mirrored_strategy, range(num_steps))
  else:
    assert isinstance(train_input, inputs.TfDataTrainInput)
    split = _tf_data_batches(train_input, mirrored_strategy, 0, num_steps)
  for step, (parts, (whole,)) in enumerate(zip(split, reference)):
    assert len(parts) == 2
    assert parts[0].shape == (GLOBAL_BATCH // 2,) + IMAGE_SHAPE
    np.testing.assert_array_equal(np.concatenate(parts), whole, err_msg=f'step {step}')


def test_binarized_values_are_zero_or_one(default_strategy):
  """Binarized pixels are exactly 0 or 1; black stays 0 and white becomes 1; grey
  pixels are a mixture."""
  images = _random_images()
  batches = _in_memory_batches(
      _make(inputs.InMemoryTrainInput, images, default_strategy, binarize=True),
      default_strategy, range(STEPS_PER_EPOCH))
  x = np.concatenate([b[0] for b in batches])
  assert x.dtype == np.float32
  assert set(np.unique(x).tolist()) == {0.0, 1.0}
  np.testing.assert_array_equal(x[:, 0, 0, 0], 0.0)
  np.testing.assert_array_equal(x[:, 0, 1, 0], 1.0)
  # The mean of the binarized batch tracks the grey levels it was drawn from.
  assert abs(x.mean() - images.mean() / 255.0) < 0.1


def test_binarize_false_gives_unit_interval(default_strategy):
  """Without binarization the batch is the uint8 images divided by 255."""
  images = _random_images()
  train_input = _make(inputs.InMemoryTrainInput, images, default_strategy, binarize=False)
  (batch,), = _in_memory_batches(train_input, default_strategy, [0])
  perm = inputs.epoch_permutation(SEED, 0, NUM_EXAMPLES).numpy()[:GLOBAL_BATCH]
  np.testing.assert_allclose(batch, images[perm].astype(np.float32) / 255.0, rtol=0,
                             atol=1e-7)


def test_seed_changes_order_and_noise(default_strategy):
  """A different seed gives a different first batch."""
  images = _random_images()
  a = _in_memory_batches(_make(inputs.InMemoryTrainInput, images, default_strategy,
                               binarize=True), default_strategy, [0])[0][0]
  b = _in_memory_batches(_make(inputs.InMemoryTrainInput, images, default_strategy,
                               binarize=True, seed=SEED + 1), default_strategy, [0])[0][0]
  assert not np.array_equal(a, b)


@pytest.mark.parametrize('cls', [inputs.InMemoryTrainInput, inputs.TfDataTrainInput])
def test_batch_not_divisible_by_replicas(cls, mirrored_strategy):
  """A global batch that does not split over 2 replicas is a ConfigError."""
  with pytest.raises(errors.ConfigError, match='--batch_size=5.*2 replicas'):
    _make(cls, _random_images(), mirrored_strategy, binarize=True, batch=5)


@pytest.mark.parametrize('cls', [inputs.InMemoryTrainInput, inputs.TfDataTrainInput])
def test_batch_larger_than_dataset(cls, default_strategy):
  """A global batch larger than the training set is a ConfigError naming both sizes."""
  with pytest.raises(errors.ConfigError, match=f'--batch_size=24.*{NUM_EXAMPLES} examples'):
    _make(cls, _random_images(), default_strategy, binarize=True, batch=24)


def test_binarize_test_set_is_deterministic():
  """The test set binarizes identically on every call, to 0/1 floats, black to 0,
  white to 1."""
  images = _random_images()
  a = inputs.binarize_test_set(images)
  b = inputs.binarize_test_set(images.copy())
  assert a.dtype == np.float32 and a.shape == images.shape
  np.testing.assert_array_equal(a, b)
  assert set(np.unique(a).tolist()) == {0.0, 1.0}
  np.testing.assert_array_equal(a[:, 0, 0, 0], 0.0)
  np.testing.assert_array_equal(a[:, 0, 1, 0], 1.0)
  grey = np.full((2000, 1, 1, 1), 64, np.uint8)
  assert abs(inputs.binarize_test_set(grey).mean() - 64 / 255) < 0.03


def test_step_seed_depends_on_step_and_salt():
  """step_seed differs across steps and purposes and repeats for equal arguments."""
  a = inputs.step_seed(SEED, 3, 1).numpy()
  np.testing.assert_array_equal(a, inputs.step_seed(SEED, tf.constant(3, tf.int64), 1))
  assert not np.array_equal(a, inputs.step_seed(SEED, 4, 1).numpy())
  assert not np.array_equal(a, inputs.step_seed(SEED, 3, 2).numpy())


def test_eval_dataset_keeps_every_example(mirrored_strategy):
  """make_eval_dataset over 2 replicas covers all test examples, partial batch too,
  each with its index in the test set; batch b holds examples 4 b .. 4 b + 3."""
  images = np.arange(11, dtype=np.float32).reshape(11, 1, 1, 1)
  dist = inputs.make_eval_dataset(mirrored_strategy, images, batch_size=4)
  seen = []
  for b, batch in enumerate(dist):
    for part, index in zip(mirrored_strategy.experimental_local_results(batch['image']),
                           mirrored_strategy.experimental_local_results(batch['index'])):
      np.testing.assert_array_equal(part.numpy().ravel(), index.numpy())
      assert np.all((index.numpy() >= 4 * b) & (index.numpy() < 4 * b + 4))
      seen.extend(index.numpy().tolist())
  assert sorted(seen) == list(range(11))


def test_eval_dataset_carries_targets_aligned_with_images(mirrored_strategy):
  """With targets, every test batch is {'image', 'target'} and the pairs stay aligned."""
  images = np.arange(11, dtype=np.float32).reshape(11, 1, 1, 1)
  targets = np.arange(11, dtype=np.int32) * 10
  dist = inputs.make_eval_dataset(mirrored_strategy, images, batch_size=4, targets=targets)
  pairs = []
  for batch in dist:
    xs = mirrored_strategy.experimental_local_results(batch['image'])
    ys = mirrored_strategy.experimental_local_results(batch['target'])
    for x, y in zip(xs, ys):
      pairs.extend(zip(x.numpy().ravel().tolist(), y.numpy().tolist()))
  assert sorted(pairs) == [(float(i), 10 * i) for i in range(11)]


@pytest.mark.parametrize('pipeline', ['in_memory', 'tf_data'])
def test_train_input_gathers_the_targets_of_the_images(pipeline, mirrored_strategy):
  """Both pipelines return each replica's targets for exactly its images."""
  n = 24
  images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
  targets = np.arange(n, dtype=np.int32) + 100
  train_input = inputs.make_train_input(
      pipeline, images, strategy=mirrored_strategy, global_batch_size=8, seed=3,
      binarize=False, targets=targets)
  iterator = train_input.iterator(0)
  for step in range(4):
    args = train_input.next_args(iterator, tf.constant(step, tf.int64))
    out = mirrored_strategy.run(
        lambda a, s=step: train_input.replica_batch(a, tf.constant(s, tf.int64)), args=(args,))
    xs = mirrored_strategy.experimental_local_results(out['image'])
    ys = mirrored_strategy.experimental_local_results(out['target'])
    for x, y in zip(xs, ys):
      pixel = np.rint(x.numpy().ravel() * 255).astype(np.int32)
      np.testing.assert_array_equal(pixel + 100, y.numpy())


def test_train_input_refuses_targets_of_another_length(default_strategy):
  with pytest.raises(errors.DataError, match='5 targets for 6 images'):
    inputs.make_train_input('in_memory', np.zeros((6, 1, 1, 1), np.uint8),
                            strategy=default_strategy, global_batch_size=2, seed=0,
                            binarize=False, targets=np.zeros(5, np.int32))
