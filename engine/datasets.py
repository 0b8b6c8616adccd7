"""A small registry of image classification data sets held in memory.

Real data sets are read from IDX files found on disk; nothing is ever
downloaded at run time, so a run behaves the same offline and on a cluster.
'synthetic' is generated in memory for tests and smoke runs.

Numpy only: the training pipeline decides how to put the arrays on devices.
"""
import dataclasses
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from engine import errors
from engine import idx

DATASET_NAMES = ('fashion_mnist', 'mnist', 'synthetic', 'idx')
# Where the Debian package `dataset-fashion-mnist` installs the files. Read at
# call time (not bound as a default) so tests can monkeypatch it.
SYSTEM_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
DATA_DIR_ENV = 'ELBO_DATA_DIR'

# Split -> (images file, labels file), the standard MNIST names (no suffix).
_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
_ALL_FILES = _FILES['train'] + _FILES['test']

_SYNTHETIC_SIZE = 28
_SYNTHETIC_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """An image classification data set held in memory.

  Attributes:
    name: the registry name it was loaded under.
    train_images: uint8 [N, H, W, C].
    train_labels: int64 [N].
    test_images: uint8 [M, H, W, C].
    test_labels: int64 [M].
    source: the directory the files came from, or 'synthetic(seed=S)'.
  """
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  source: str

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    """(H, W, C) of every image."""
    return tuple(self.train_images.shape[1:])

  @property
  def num_train(self) -> int:
    """Number of training examples."""
    return int(self.train_images.shape[0])

  @property
  def num_test(self) -> int:
    """Number of test examples."""
    return int(self.test_images.shape[0])

  @property
  def num_classes(self) -> int:
    """Largest label over both splits, plus one."""
    return int(max(self.train_labels.max(), self.test_labels.max())) + 1


def _env_data_dir() -> Optional[str]:
  value = os.environ.get(DATA_DIR_ENV)
  # An empty value (e.g. `ELBO_DATA_DIR= cmd`) means "unset", not the cwd.
  return os.path.expanduser(value) if value else None


def _check_name(name):
  if name not in DATASET_NAMES:
    raise errors.ConfigError(
        f'--dataset={name!r} is not known; choose one of: '
        f'{", ".join(DATASET_NAMES)}.')


def search_dirs(name: str, data_dir: Optional[str]) -> List[str]:
  """Returns the directories searched for `name`'s IDX files, in order.

  Args:
    name: a name from DATASET_NAMES.
    data_dir: the user's data directory, or None.

  Returns:
    Directory paths, without duplicates; empty for 'synthetic', and for 'mnist'
    and 'idx' when nothing points at the data.

  Raises:
    ConfigError: `name` is not a known data set.
  """
  _check_name(name)
  if data_dir is not None:
    data_dir = os.path.expanduser(data_dir)
  env_dir = _env_data_dir()
  dirs = []
  if name == 'fashion_mnist':
    for base in (data_dir, env_dir):
      if base is not None:
        dirs += [base, os.path.join(base, 'fashion-mnist'),
                 os.path.join(base, 'fashion_mnist')]
    dirs.append(SYSTEM_FASHION_MNIST_DIR)
  elif name == 'mnist':
    if data_dir is not None:
      dirs += [data_dir, os.path.join(data_dir, 'mnist')]
    # Only the subdirectory of $ELBO_DATA_DIR: its root is where Fashion-MNIST
    # lives, under the very same file names, so searching it would silently
    # train "mnist" on Fashion-MNIST.
    if env_dir is not None:
      dirs.append(os.path.join(env_dir, 'mnist'))
  elif name == 'idx':
    if data_dir is not None:
      dirs.append(data_dir)
  # Drop repeats (e.g. data_dir == $ELBO_DATA_DIR) so messages stay readable.
  seen = set()
  unique = []
  for d in dirs:
    key = os.path.abspath(d)
    if key not in seen:
      seen.add(key)
      unique.append(d)
  return unique


def _find_files(directory: str) -> Tuple[Dict[str, str], List[str], str]:
  """Looks for the four standard files in `directory`.

  Returns:
    (found: base name -> path, missing base names, a one-line status for
    error messages).
  """
  if not os.path.exists(directory):
    return {}, list(_ALL_FILES), 'does not exist'
  if not os.path.isdir(directory):
    return {}, list(_ALL_FILES), 'exists but is not a directory'
  found, missing = {}, []
  for base in _ALL_FILES:
    # Prefer .gz when both exist: it is what the upstream distributions and
    # the Debian package ship, while a raw copy may be a stale extraction.
    for candidate in (base + '.gz', base):
      path = os.path.join(directory, candidate)
      if os.path.isfile(path):
        found[base] = path
        break
    else:
      missing.append(base)
  if not found:
    status = 'holds none of the four IDX files'
  elif missing:
    status = (f'holds only some of the IDX files; missing: '
              f'{", ".join(missing)} (with or without .gz)')
  else:
    status = 'complete'
  return found, missing, status


def _how_to_get(name: str) -> str:
  files = ', '.join(_ALL_FILES)
  if name == 'fashion_mnist':
    return (
        'To get Fashion-MNIST: `sudo apt-get install dataset-fashion-mnist` '
        f'(Debian package; installs to {SYSTEM_FASHION_MNIST_DIR}), or pass '
        f'--data_dir=DIR where DIR holds the four IDX files ({files}, each '
        f'optionally .gz), or set {DATA_DIR_ENV}=DIR.')
  if name == 'mnist':
    return (
        'MNIST is not packaged for Debian and nothing is downloaded at run '
        'time: fetch the four MNIST IDX files yourself once '
        f'({files}, each optionally .gz) and pass --data_dir=DIR pointing at '
        f'them (or at DIR/mnist), or put them in ${DATA_DIR_ENV}/mnist.')
  return (f'Pass --data_dir=DIR where DIR holds the four IDX files ({files}, '
          f'each optionally .gz).')


def _locate(name: str, data_dir: Optional[str]) -> Tuple[str, Dict[str, str]]:
  """Returns (directory, base name -> path) of the first complete directory."""
  dirs = search_dirs(name, data_dir)
  if not dirs:
    raise errors.DataError(
        f'dataset={name!r}: no directory to search (data_dir is None and '
        f'{DATA_DIR_ENV} is not set). {_how_to_get(name)}')
  tried = []
  for directory in dirs:
    found, missing, status = _find_files(directory)
    if not missing:
      return directory, found
    tried.append(f'  {directory}: {status}')
  raise errors.DataError(
      f'dataset={name!r}: no directory holds all four IDX files. Tried, in '
      f'order:\n' + '\n'.join(tried) + '\n' + _how_to_get(name))


def _check_images(path: str, images: np.ndarray) -> np.ndarray:
  """Validates an images array and returns it as [N, H, W, C]."""
  if images.ndim not in (3, 4):
    raise errors.DataError(
        f'{path!r} holds an array of shape {images.shape} (rank {images.ndim}); '
        f'images must be rank 3 [N, H, W] or rank 4 [N, H, W, C]. Check that '
        f'the images and labels files are not swapped.')
  if images.dtype != np.uint8:
    raise errors.DataError(
        f'{path!r} holds images of dtype {images.dtype}; only uint8 pixels '
        f'(0..255) are supported. Convert them, e.g. rescale to 0..255, cast '
        f'with .astype(np.uint8) and save with engine.idx.write_idx.')
  if images.shape[0] == 0:
    raise errors.DataError(
        f'{path!r} holds no images (shape {images.shape}); the file is empty, '
        f'fetch it again.')
  if images.ndim == 3:
    images = images[..., np.newaxis]
  return images


def _check_labels(path: str, labels: np.ndarray) -> np.ndarray:
  """Validates a labels array and returns it as int64 [N]."""
  if labels.ndim != 1:
    raise errors.DataError(
        f'{path!r} holds an array of shape {labels.shape} (rank {labels.ndim}); '
        f'labels must be rank 1 [N]. Check that the images and labels files '
        f'are not swapped.')
  if labels.dtype.kind not in 'iu':
    raise errors.DataError(
        f'{path!r} holds labels of dtype {labels.dtype}; labels must be '
        f'integers (uint8 as in MNIST). Cast them to an integer type and save '
        f'with engine.idx.write_idx.')
  labels = labels.astype(np.int64)
  if labels.size and labels.min() < 0:
    bad = int(labels.min())
    raise errors.DataError(
        f'{path!r} holds a negative label ({bad}); labels must be class '
        f'indices 0..K-1. Renumber the classes.')
  return labels


def _load_idx_dir(name: str, data_dir: Optional[str]) -> ImageDataset:
  directory, paths = _locate(name, data_dir)
  arrays = {}
  for split, (images_file, labels_file) in _FILES.items():
    images_path, labels_path = paths[images_file], paths[labels_file]
    images = _check_images(images_path, idx.read_idx(images_path))
    labels = _check_labels(labels_path, idx.read_idx(labels_path))
    if images.shape[0] != labels.shape[0]:
      raise errors.DataError(
          f'{split} split: {images_path!r} holds {images.shape[0]} images but '
          f'{labels_path!r} holds {labels.shape[0]} labels; they must match. '
          f'One file is from another data set or version; fetch both again.')
    arrays[split] = (images, labels, images_path)
  train_images, train_labels, train_path = arrays['train']
  test_images, test_labels, test_path = arrays['test']
  if train_images.shape[1:] != test_images.shape[1:]:
    raise errors.DataError(
        f'{train_path!r} holds images of shape (H, W, C)='
        f'{train_images.shape[1:]} but {test_path!r} holds '
        f'{test_images.shape[1:]}; train and test images must have the same '
        f'shape. The two files come from different data sets.')
  return ImageDataset(
      name=name, train_images=train_images, train_labels=train_labels,
      test_images=test_images, test_labels=test_labels, source=directory)


def _segment_intensity(yy, xx, p0, p1, width):
  """Gaussian falloff with the distance of each pixel to segment p0-p1."""
  d = p1 - p0
  length2 = max(float(d @ d), 1e-6)
  t = ((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / length2
  t = np.clip(t, 0.0, 1.0)
  dist2 = (yy - (p0[0] + t * d[0]))**2 + (xx - (p0[1] + t * d[1]))**2
  return np.exp(-dist2 / (2.0 * width**2))


def _synthetic_templates(rng, size, num_classes):
  """One smooth stroke-drawing template per class, values in [0, 1]."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
  templates = np.zeros((num_classes, size, size))
  margin = size * 0.2
  for k in range(num_classes):
    num_strokes = rng.integers(2, 4)
    for _ in range(num_strokes):
      p0, p1 = rng.uniform(margin, size - margin, size=(2, 2))
      width = rng.uniform(1.0, 2.0)
      templates[k] = np.maximum(
          templates[k], _segment_intensity(yy, xx, p0, p1, width))
  return templates


def _shift(image, dy, dx):
  """Shifts a 2-D image by (dy, dx) pixels, filling with zeros."""
  out = np.zeros_like(image)
  h, w = image.shape
  out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = (
      image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)])
  return out


def _synthetic_split(rng, templates, n, max_shift=2):
  num_classes, h, w = templates.shape
  # Cycling through the classes before shuffling gives balanced classes and
  # every class present whenever n >= num_classes.
  labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
  shifts = np.arange(-max_shift, max_shift + 1)
  # All shifted variants of all templates, indexed [class, dy, dx].
  shifted = np.stack([
      np.stack([np.stack([_shift(t, dy, dx) for dx in shifts]) for dy in shifts])
      for t in templates])
  dy = rng.integers(0, len(shifts), size=n)
  dx = rng.integers(0, len(shifts), size=n)
  brightness = rng.uniform(160.0, 255.0, size=(n, 1, 1))
  noise = rng.normal(0.0, 20.0, size=(n, h, w))
  images = shifted[labels, dy, dx] * brightness + noise
  images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
  return images[..., np.newaxis], labels


def _check_count(arg, value):
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
    raise errors.ConfigError(
        f'{arg}={value!r}: must be a positive integer number of examples.')


def _make_synthetic(seed, num_train, num_test) -> ImageDataset:
  if (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool)
      or seed < 0):
    raise errors.ConfigError(
        f'seed={seed!r}: the synthetic data set needs a non-negative integer '
        f'seed.')
  rng = np.random.default_rng(seed)
  templates = _synthetic_templates(rng, _SYNTHETIC_SIZE, _SYNTHETIC_CLASSES)
  train_images, train_labels = _synthetic_split(rng, templates, num_train)
  test_images, test_labels = _synthetic_split(rng, templates, num_test)
  return ImageDataset(
      name='synthetic', train_images=train_images, train_labels=train_labels,
      test_images=test_images, test_labels=test_labels,
      source=f'synthetic(seed={seed})')


def load_dataset(name: str, *, data_dir: Optional[str] = None, seed: int = 0,
                 num_train: int = 2048, num_test: int = 512) -> ImageDataset:
  """Loads a data set into memory.

  Args:
    name: one of DATASET_NAMES. 'fashion_mnist' searches data_dir,
      $ELBO_DATA_DIR and SYSTEM_FASHION_MNIST_DIR (see `search_dirs`); 'mnist'
      searches data_dir and $ELBO_DATA_DIR/mnist; 'idx' reads the four standard
      IDX files in data_dir; 'synthetic' is generated from `seed`.
    data_dir: directory holding the four IDX files (or a named subdirectory).
    seed: seed of the 'synthetic' set; ignored otherwise.
    num_train: number of 'synthetic' training examples; ignored otherwise.
    num_test: number of 'synthetic' test examples; ignored otherwise.

  Returns:
    An ImageDataset with uint8 [N, H, W, C] images and int64 labels.

  Raises:
    ConfigError: unknown name, non-positive sizes, bad seed, or 'idx' without
      data_dir.
    DataError: the files are missing, corrupt or inconsistent.
  """
  _check_name(name)
  _check_count('num_train', num_train)
  _check_count('num_test', num_test)
  if name == 'synthetic':
    return _make_synthetic(seed, int(num_train), int(num_test))
  if name == 'idx' and data_dir is None:
    raise errors.ConfigError(
        "dataset='idx' reads the four standard IDX files from data_dir, but "
        'data_dir is None; pass --data_dir=DIR holding '
        f'{", ".join(_ALL_FILES)} (each optionally .gz).')
  return _load_idx_dir(name, data_dir)
