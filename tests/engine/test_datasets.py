"""Tests of engine.datasets: search order, validation and the synthetic set.

Every test isolates itself from the machine: $ELBO_DATA_DIR is unset and the
system Fashion-MNIST directory points into tmp_path.
"""
import os

import numpy as np
import pytest

from engine import datasets
from engine import errors
from engine import idx

_TRAIN_IMAGES = 'train-images-idx3-ubyte'
_TRAIN_LABELS = 'train-labels-idx1-ubyte'
_TEST_IMAGES = 't10k-images-idx3-ubyte'
_TEST_LABELS = 't10k-labels-idx1-ubyte'


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
  """Unsets $ELBO_DATA_DIR; returns the (not yet existing) system directory."""
  monkeypatch.delenv('ELBO_DATA_DIR', raising=False)
  system_dir = tmp_path / 'system'
  monkeypatch.setattr(datasets, 'SYSTEM_FASHION_MNIST_DIR', str(system_dir))
  return system_dir


def _write_set(directory, *, num_train=6, num_test=4, image_shape=(3, 2),
               suffix='.gz', label_offset=0, skip=(), overrides=None):
  """Writes a tiny four-file IDX set; returns the arrays written.

  Args:
    directory: a pathlib.Path, created if needed.
    num_train, num_test: examples per split.
    image_shape: per-image shape, (H, W) for rank-3 files or (H, W, C).
    suffix: '.gz' or ''.
    label_offset: added to the labels so sets written to different
      directories can be told apart.
    skip: base file names not to write.
    overrides: base file name -> array written instead of the default.
  """
  directory.mkdir(parents=True, exist_ok=True)
  arrays = {
      _TRAIN_IMAGES: np.arange(num_train * int(np.prod(image_shape)),
                               dtype=np.int64).reshape(
                                   (num_train,) + image_shape).astype(np.uint8),
      _TRAIN_LABELS: (np.arange(num_train) % 3 + label_offset).astype(np.uint8),
      _TEST_IMAGES: np.full((num_test,) + image_shape, 7, np.uint8),
      _TEST_LABELS: (np.arange(num_test) % 2 + label_offset).astype(np.uint8),
  }
  arrays.update(overrides or {})
  for base, array in arrays.items():
    if base not in skip:
      idx.write_idx(str(directory / (base + suffix)), array)
  return arrays


# --- Search order ----------------------------------------------------------


def test_search_dirs_order(tmp_path, monkeypatch, isolated):
  data_dir, env_dir = str(tmp_path / 'd'), str(tmp_path / 'e')
  monkeypatch.setenv('ELBO_DATA_DIR', env_dir)
  j = os.path.join
  assert datasets.search_dirs('fashion_mnist', data_dir) == [
      data_dir, j(data_dir, 'fashion-mnist'), j(data_dir, 'fashion_mnist'),
      env_dir, j(env_dir, 'fashion-mnist'), j(env_dir, 'fashion_mnist'),
      str(isolated)]
  assert datasets.search_dirs('mnist', data_dir) == [
      data_dir, j(data_dir, 'mnist'), j(env_dir, 'mnist')]
  assert datasets.search_dirs('idx', data_dir) == [data_dir]
  assert datasets.search_dirs('synthetic', data_dir) == []


def test_search_dirs_without_data_dir_or_env(isolated):
  assert datasets.search_dirs('fashion_mnist', None) == [str(isolated)]
  assert datasets.search_dirs('mnist', None) == []


def test_search_dirs_drops_duplicates(tmp_path, monkeypatch, isolated):
  monkeypatch.setenv('ELBO_DATA_DIR', str(tmp_path))
  dirs = datasets.search_dirs('fashion_mnist', str(tmp_path))
  assert len(dirs) == len(set(dirs)) == 4


def test_data_dir_beats_env_beats_system(tmp_path, monkeypatch, isolated):
  data_dir, env_dir = tmp_path / 'd', tmp_path / 'e'
  _write_set(data_dir, label_offset=10)
  _write_set(env_dir, label_offset=20)
  _write_set(isolated, label_offset=30)
  monkeypatch.setenv('ELBO_DATA_DIR', str(env_dir))

  ds = datasets.load_dataset('fashion_mnist', data_dir=str(data_dir))
  assert ds.source == str(data_dir)
  assert ds.train_labels.min() == 10

  ds = datasets.load_dataset('fashion_mnist')
  assert ds.source == str(env_dir)
  assert ds.train_labels.min() == 20

  monkeypatch.delenv('ELBO_DATA_DIR')
  ds = datasets.load_dataset('fashion_mnist')
  assert ds.source == str(isolated)
  assert ds.train_labels.min() == 30


@pytest.mark.parametrize('subdir', ['fashion-mnist', 'fashion_mnist'])
def test_fashion_mnist_subdirectories(tmp_path, monkeypatch, subdir):
  _write_set(tmp_path / 'd' / subdir)
  ds = datasets.load_dataset('fashion_mnist', data_dir=str(tmp_path / 'd'))
  assert ds.source == str(tmp_path / 'd' / subdir)

  monkeypatch.setenv('ELBO_DATA_DIR', str(tmp_path / 'd'))
  assert datasets.load_dataset('fashion_mnist').source == str(
      tmp_path / 'd' / subdir)


def test_incomplete_directory_is_skipped_for_a_complete_one(tmp_path):
  _write_set(tmp_path / 'd', skip=(_TEST_LABELS,), label_offset=10)
  _write_set(tmp_path / 'd' / 'fashion-mnist', label_offset=20)
  ds = datasets.load_dataset('fashion_mnist', data_dir=str(tmp_path / 'd'))
  assert ds.source == str(tmp_path / 'd' / 'fashion-mnist')


def test_not_found_lists_every_path_tried(tmp_path, monkeypatch):
  data_dir, env_dir = str(tmp_path / 'd'), str(tmp_path / 'e')
  monkeypatch.setenv('ELBO_DATA_DIR', env_dir)
  with pytest.raises(errors.DataError) as info:
    datasets.load_dataset('fashion_mnist', data_dir=data_dir)
  message = str(info.value)
  lines = message.splitlines()
  tried = datasets.search_dirs('fashion_mnist', data_dir)
  assert len(tried) == 7
  for directory in tried:
    # One line per path.
    assert sum(line.strip().startswith(directory + ':') for line in lines) == 1
  assert 'does not exist' in message
  assert 'sudo apt-get install dataset-fashion-mnist' in message
  assert '--data_dir' in message and 'ELBO_DATA_DIR' in message


def test_partial_directory_names_missing_files(tmp_path):
  data_dir = tmp_path / 'd'
  _write_set(data_dir, skip=(_TRAIN_LABELS, _TEST_IMAGES))
  with pytest.raises(errors.DataError) as info:
    datasets.load_dataset('fashion_mnist', data_dir=str(data_dir))
  line = next(l for l in str(info.value).splitlines()
              if l.strip().startswith(str(data_dir) + ':'))
  assert 'missing' in line
  assert _TRAIN_LABELS in line and _TEST_IMAGES in line
  assert _TRAIN_IMAGES not in line and _TEST_LABELS not in line


def test_gz_preferred_when_both_exist(tmp_path):
  data_dir = tmp_path / 'd'
  _write_set(data_dir, suffix='', label_offset=5)
  _write_set(data_dir, suffix='.gz', label_offset=1)
  ds = datasets.load_dataset('idx', data_dir=str(data_dir))
  assert ds.train_labels.min() == 1


def test_raw_and_gz_files_mixed(tmp_path):
  data_dir = tmp_path / 'd'
  written = _write_set(data_dir, suffix='', skip=(_TEST_LABELS,))
  _write_set(data_dir, suffix='.gz', skip=(_TRAIN_IMAGES, _TRAIN_LABELS,
                                           _TEST_IMAGES))
  ds = datasets.load_dataset('idx', data_dir=str(data_dir))
  np.testing.assert_array_equal(ds.test_labels, written[_TEST_LABELS])


# --- mnist and idx ---------------------------------------------------------


def test_mnist_without_data_dir_explains_how_to_get_it():
  with pytest.raises(errors.DataError) as info:
    datasets.load_dataset('mnist')
  message = str(info.value)
  assert '--data_dir' in message
  assert 'not packaged for Debian' in message
  assert _TRAIN_IMAGES in message


def test_mnist_from_data_dir_subdir_and_env(tmp_path, monkeypatch):
  _write_set(tmp_path / 'd' / 'mnist')
  assert datasets.load_dataset(
      'mnist', data_dir=str(tmp_path / 'd')).source == str(
          tmp_path / 'd' / 'mnist')
  monkeypatch.setenv('ELBO_DATA_DIR', str(tmp_path / 'd'))
  assert datasets.load_dataset('mnist').source == str(tmp_path / 'd' / 'mnist')


def test_mnist_never_reads_env_root(tmp_path, monkeypatch):
  # The root of $ELBO_DATA_DIR holds Fashion-MNIST under the same file names.
  _write_set(tmp_path / 'e')
  monkeypatch.setenv('ELBO_DATA_DIR', str(tmp_path / 'e'))
  with pytest.raises(errors.DataError) as info:
    datasets.load_dataset('mnist')
  assert os.path.join(str(tmp_path / 'e'), 'mnist') in str(info.value)


def test_idx_needs_data_dir():
  with pytest.raises(errors.ConfigError, match='data_dir'):
    datasets.load_dataset('idx')


# --- Contents and validation -----------------------------------------------


def test_rank3_gets_channel_axis_and_properties(tmp_path):
  written = _write_set(tmp_path / 'd', num_train=6, num_test=4,
                       image_shape=(3, 2))
  ds = datasets.load_dataset('idx', data_dir=str(tmp_path / 'd'))
  assert ds.train_images.shape == (6, 3, 2, 1)
  assert ds.test_images.shape == (4, 3, 2, 1)
  assert ds.image_shape == (3, 2, 1)
  assert (ds.num_train, ds.num_test, ds.num_classes) == (6, 4, 3)
  assert ds.train_images.dtype == np.uint8
  assert ds.train_labels.dtype == ds.test_labels.dtype == np.int64
  np.testing.assert_array_equal(ds.train_images[..., 0], written[_TRAIN_IMAGES])
  np.testing.assert_array_equal(ds.train_labels, written[_TRAIN_LABELS])
  assert ds.name == 'idx'


def test_rank4_kept(tmp_path):
  _write_set(tmp_path / 'd', image_shape=(2, 2, 3))
  ds = datasets.load_dataset('idx', data_dir=str(tmp_path / 'd'))
  assert ds.image_shape == (2, 2, 3)


def test_num_classes_spans_both_splits(tmp_path):
  _write_set(tmp_path / 'd', overrides={
      _TEST_LABELS: np.array([0, 9, 1, 1], np.uint8)})
  assert datasets.load_dataset(
      'idx', data_dir=str(tmp_path / 'd')).num_classes == 10


def _load_error(tmp_path, **kwargs):
  _write_set(tmp_path / 'd', **kwargs)
  with pytest.raises(errors.DataError) as info:
    datasets.load_dataset('idx', data_dir=str(tmp_path / 'd'))
  return str(info.value)


def test_label_image_count_mismatch(tmp_path):
  message = _load_error(tmp_path, overrides={
      _TRAIN_LABELS: np.zeros(5, np.uint8)})
  assert _TRAIN_IMAGES in message and _TRAIN_LABELS in message
  assert '6 images' in message and '5 labels' in message


def test_train_test_shape_mismatch(tmp_path):
  message = _load_error(tmp_path, overrides={
      _TEST_IMAGES: np.zeros((4, 3, 3), np.uint8)})
  assert _TRAIN_IMAGES in message and _TEST_IMAGES in message
  assert '(3, 2, 1)' in message and '(3, 3, 1)' in message


def test_non_uint8_images_refused(tmp_path):
  message = _load_error(tmp_path, overrides={
      _TRAIN_IMAGES: np.zeros((6, 3, 2), np.float32)})
  assert 'float32' in message and 'uint8' in message
  assert _TRAIN_IMAGES in message


def test_bad_image_rank_refused(tmp_path):
  message = _load_error(tmp_path, overrides={
      _TRAIN_IMAGES: np.zeros((6, 6), np.uint8)})
  assert 'rank 2' in message and _TRAIN_IMAGES in message


def test_bad_label_rank_refused(tmp_path):
  message = _load_error(tmp_path, overrides={
      _TEST_LABELS: np.zeros((4, 1), np.uint8)})
  assert 'rank 2' in message and _TEST_LABELS in message


def test_float_labels_refused(tmp_path):
  message = _load_error(tmp_path, overrides={
      _TRAIN_LABELS: np.zeros(6, np.float64)})
  assert 'float64' in message and 'integers' in message


def test_negative_labels_refused(tmp_path):
  message = _load_error(tmp_path, overrides={
      _TEST_LABELS: np.array([0, 1, -1, 2], np.int8)})
  assert '-1' in message and _TEST_LABELS in message


def test_empty_split_refused(tmp_path):
  message = _load_error(tmp_path, overrides={
      _TEST_IMAGES: np.zeros((0, 3, 2), np.uint8),
      _TEST_LABELS: np.zeros(0, np.uint8)})
  assert 'no images' in message


def test_corrupt_file_error_propagates(tmp_path):
  _write_set(tmp_path / 'd')
  path = tmp_path / 'd' / (_TRAIN_IMAGES + '.gz')
  path.write_bytes(path.read_bytes()[:-10])
  with pytest.raises(errors.DataError, match=_TRAIN_IMAGES):
    datasets.load_dataset('idx', data_dir=str(tmp_path / 'd'))


# --- Synthetic and argument checks -----------------------------------------


def test_synthetic_shapes_and_source():
  ds = datasets.load_dataset('synthetic', seed=3, num_train=50, num_test=20)
  assert ds.train_images.shape == (50, 28, 28, 1)
  assert ds.test_images.shape == (20, 28, 28, 1)
  assert ds.train_images.dtype == np.uint8
  assert ds.train_labels.dtype == np.int64
  assert ds.num_classes == 10
  assert ds.source == 'synthetic(seed=3)'
  assert sorted(set(ds.train_labels.tolist())) == list(range(10))


def test_synthetic_deterministic():
  a = datasets.load_dataset('synthetic', seed=7, num_train=40, num_test=10)
  b = datasets.load_dataset('synthetic', seed=7, num_train=40, num_test=10)
  c = datasets.load_dataset('synthetic', seed=8, num_train=40, num_test=10)
  for field in ('train_images', 'train_labels', 'test_images', 'test_labels'):
    assert getattr(a, field).tobytes() == getattr(b, field).tobytes()
  assert a.train_images.tobytes() != c.train_images.tobytes()


def test_synthetic_is_learnable():
  ds = datasets.load_dataset('synthetic', seed=0, num_train=500, num_test=200)
  x_train = ds.train_images.reshape(ds.num_train, -1).astype(np.float64)
  x_test = ds.test_images.reshape(ds.num_test, -1).astype(np.float64)
  # Not noise: a nearest-class-mean classifier does far better than 10%.
  means = np.stack([x_train[ds.train_labels == k].mean(0) for k in range(10)])
  dist = ((x_test[:, None, :] - means[None]) ** 2).sum(-1)
  accuracy = (dist.argmin(1) == ds.test_labels).mean()
  assert accuracy > 0.7
  assert 0 < ds.train_images.mean() < 128


def test_unknown_name():
  with pytest.raises(errors.ConfigError) as info:
    datasets.load_dataset('cifar10')
  message = str(info.value)
  assert "'cifar10'" in message
  for name in datasets.DATASET_NAMES:
    assert name in message
  with pytest.raises(errors.ConfigError):
    datasets.search_dirs('cifar10', None)


@pytest.mark.parametrize('kwargs', [
    {'num_train': 0}, {'num_test': -1}, {'num_train': 2.5}, {'num_test': True}])
def test_bad_sizes(kwargs):
  arg, value = next(iter(kwargs.items()))
  with pytest.raises(errors.ConfigError) as info:
    datasets.load_dataset('synthetic', **kwargs)
  assert f'{arg}={value!r}' in str(info.value)


def test_bad_seed():
  with pytest.raises(errors.ConfigError, match='seed=-1'):
    datasets.load_dataset('synthetic', seed=-1)


def test_dataset_is_frozen():
  ds = datasets.load_dataset('synthetic', num_train=10, num_test=10)
  with pytest.raises(AttributeError):
    ds.name = 'other'
