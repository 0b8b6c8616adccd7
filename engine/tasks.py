"""Data transforms that turn an image data set into BNN evaluation tasks.

  select_classes       train on some classes, keep the rest as an OOD set;
  rotation_regression  predict the rotation angle of rotated digits (MATLAB's
                       "Train Bayesian Neural Network" example);
  rotated_test_sets    the test set at growing rotation angles (dataset shift);
  uniform_noise_images pure-noise images (far OOD).

Deterministic numpy in and out; rotation runs TF core's
ImageProjectiveTransformV3 (no tensorflow-addons).
"""
import dataclasses
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from engine import datasets
from engine import errors

DEFAULT_MAX_ANGLE = 45.0
# 0, 15, ..., 180 degrees: the shift table of Ovadia et al. (2019) style plots.
DEFAULT_ROTATION_ANGLES = tuple(range(0, 181, 15))
# Images rotated per TF call; bounds the float32 copy (4096 28x28 = 13 MB).
_ROTATE_CHUNK = 4096


# ------------------------------------------------------------------ checks

def _images(value, name='images'):
  images = np.asarray(value)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise errors.DataError(
        f'{name}: expected uint8 [N, H, W, C], got dtype {images.dtype} and '
        f'shape {images.shape}.')
  return images


def _labels(value, num_images):
  labels = np.asarray(value)
  if labels.ndim != 1 or labels.dtype.kind not in 'iu':
    raise errors.DataError(
        f'labels: expected integers of shape [N], got dtype {labels.dtype} '
        f'and shape {labels.shape}.')
  if labels.shape[0] != num_images:
    raise errors.DataError(
        f'labels: {labels.shape[0]} labels for {num_images} images; the two '
        f'arrays must come from the same split.')
  return labels


def _seed(seed):
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
      or seed < 0:
    raise errors.ConfigError(
        f'--seed={seed!r}: must be a non-negative integer.')
  return int(seed)


# ------------------------------------------------------- class selection

class ClassSelection(NamedTuple):
  """In-distribution examples of the chosen classes and the rest as OOD.

  Attributes:
    images: uint8 [N_in, H, W, C], examples of the chosen classes.
    labels: int64 [N_in], remapped: classes[i] -> i.
    ood_images: uint8 [N_out, H, W, C], examples of every other class.
    ood_labels: int64 [N_out], their original labels.
  """
  images: np.ndarray
  labels: np.ndarray
  ood_images: np.ndarray
  ood_labels: np.ndarray


def check_classes(classes, num_classes: int, *,
                  require_ood: bool = True) -> Tuple[int, ...]:
  """Validates a --train_classes list; returns it as a tuple of ints.

  Args:
    classes: a sequence of class ids.
    num_classes: number of classes of the data set; ids lie in
      [0, num_classes).
    require_ood: when True, `classes` must leave at least one class out, so
      the out-of-distribution set is not empty.

  Raises:
    ConfigError: naming --train_classes and how to fix it.
  """
  example = ','.join(str(c) for c in range(min(5, max(num_classes - 1, 2))))
  if isinstance(classes, (str, bytes)) or not hasattr(classes, '__len__'):
    raise errors.ConfigError(
        f'--train_classes={classes!r}: must be a list of class ids, e.g. '
        f'{example}.')
  bad = [c for c in classes
         if isinstance(c, bool) or not isinstance(c, (int, np.integer))]
  if bad:
    raise errors.ConfigError(
        f'--train_classes={list(classes)!r}: {bad[0]!r} is not an integer '
        f'class id; pass ids such as {example}.')
  classes = tuple(int(c) for c in classes)
  out_of_range = [c for c in classes if not 0 <= c < num_classes]
  if out_of_range:
    raise errors.ConfigError(
        f'--train_classes={list(classes)}: {out_of_range[0]} is out of range; '
        f'the data set has classes 0..{num_classes - 1}.')
  repeated = sorted({c for c in classes if classes.count(c) > 1})
  if repeated:
    raise errors.ConfigError(
        f'--train_classes={list(classes)}: {repeated} appear more than once; '
        f'list each class once.')
  if len(classes) < 2:
    raise errors.ConfigError(
        f'--train_classes={list(classes)}: a classifier needs at least two '
        f'classes; add another, e.g. {example}.')
  if require_ood and len(classes) == num_classes:
    raise errors.ConfigError(
        f'--train_classes={list(classes)}: lists all {num_classes} classes, '
        f'which leaves no out-of-distribution set; leave out at least one '
        f'class (e.g. drop {classes[-1]}).')
  return classes


def select_classes(images, labels, classes: Sequence[int], *,
                   num_classes: Optional[int] = None,
                   require_ood: bool = True) -> ClassSelection:
  """Keeps the examples of `classes` (relabelled 0..len-1) and the rest as OOD.

  Args:
    images: uint8 [N, H, W, C].
    labels: integer [N].
    classes: class ids to keep; their order sets the new labels, so
      classes=(3, 1) maps 3 -> 0 and 1 -> 1.
    num_classes: classes of the data set (ImageDataset.num_classes); defaults
      to labels.max() + 1.
    require_ood: reject a `classes` that lists every class (see check_classes).

  Returns:
    A ClassSelection; order of the examples is kept within each part.

  Raises:
    ConfigError: bad `classes`. DataError: bad arrays, or a chosen class with
      no example in `labels`.
  """
  images = _images(images)
  labels = _labels(labels, images.shape[0])
  if labels.size and labels.min() < 0:
    raise errors.DataError(f'labels: negative label {labels.min()}.')
  if num_classes is None:
    num_classes = int(labels.max()) + 1 if labels.size else 0
  classes = check_classes(classes, num_classes, require_ood=require_ood)
  empty = [c for c in classes if not np.any(labels == c)]
  if empty:
    raise errors.DataError(
        f'--train_classes={list(classes)}: class {empty[0]} has no example in '
        f'these {labels.shape[0]} labels; choose classes present in the data.')
  lookup = np.full(max(num_classes, int(labels.max()) + 1), -1, np.int64)
  lookup[list(classes)] = np.arange(len(classes))
  new_labels = lookup[labels]
  keep = new_labels >= 0
  return ClassSelection(images=images[keep], labels=new_labels[keep],
                        ood_images=images[~keep],
                        ood_labels=labels[~keep].astype(np.int64))


# --------------------------------------------------------------- rotation

def _rotation_transforms(angles_degrees, height, width):
  """[N, 8] ImageProjectiveTransformV3 transforms rotating about the centre.

  The op maps each output pixel (x = column, y = row) to the input point
  (a0 x + a1 y + a2, b0 x + b1 y + b2). With rows growing downwards, this
  sampling turns the content counter-clockwise on screen by t:
    x_in - cx = cos t (x - cx) - sin t (y - cy)
    y_in - cy = sin t (x - cx) + cos t (y - cy)
  e.g. at t = 90 degrees the output pixel above the centre reads the input
  pixel right of it, i.e. right moves up (and below moves right).
  """
  theta = np.deg2rad(np.asarray(angles_degrees, np.float64))
  cos, sin = np.cos(theta), np.sin(theta)
  cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
  a2 = cx - cos * cx + sin * cy
  b2 = cy - sin * cx - cos * cy
  zeros = np.zeros_like(theta)
  return np.stack([cos, -sin, a2, sin, cos, b2, zeros, zeros],
                  axis=1).astype(np.float32)


def rotate_images(images, angles_degrees) -> np.ndarray:
  """Rotates each image about its centre; positive angles turn counter-clockwise.

  Counter-clockwise as the image is displayed (row 0 at the top): at +90
  degrees what was right of the centre ends up above it. The centre is
  ((W - 1) / 2, (H - 1) / 2) in pixel-centre coordinates; the output keeps
  the input size, samples bilinearly and fills with 0 where the rotated
  source lies outside the image (corners are cut off).

  Args:
    images: uint8 [N, H, W, C].
    angles_degrees: [N] angles in degrees, or a scalar for all images.

  Returns:
    uint8 [N, H, W, C], rounded to the nearest integer.

  Raises:
    DataError: bad shapes or non-finite angles.
  """
  images = _images(images)
  n, height, width, _ = images.shape
  angles = np.asarray(angles_degrees, np.float64)
  if angles.ndim == 0:
    angles = np.full(n, float(angles))
  if angles.shape != (n,) or not np.all(np.isfinite(angles)):
    raise errors.DataError(
        f'angles_degrees: expected {n} finite angles (one per image) or a '
        f'scalar, got shape {angles.shape}.')
  transforms = _rotation_transforms(angles, height, width)
  out = np.empty_like(images)
  for start in range(0, n, _ROTATE_CHUNK):
    stop = min(start + _ROTATE_CHUNK, n)
    rotated = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.constant(images[start:stop], tf.float32),
        transforms=tf.constant(transforms[start:stop]),
        output_shape=tf.constant([height, width], tf.int32),
        fill_value=tf.constant(0.0, tf.float32),
        interpolation='BILINEAR',
        fill_mode='CONSTANT')
    out[start:stop] = np.clip(np.rint(rotated.numpy()), 0, 255)
  return out


@dataclasses.dataclass(frozen=True)
class RotationRegression:
  """Images rotated by a random angle, with the angle as regression target.

  Attributes:
    train_images: uint8 [N, H, W, C], the training images rotated.
    train_angles: float32 [N], their angles in degrees (counter-clockwise).
    test_images: uint8 [M, H, W, C].
    test_angles: float32 [M].
    max_angle: angles were drawn uniformly from [-max_angle, max_angle).
  """
  train_images: np.ndarray
  train_angles: np.ndarray
  test_images: np.ndarray
  test_angles: np.ndarray
  max_angle: float


def rotation_regression(dataset: datasets.ImageDataset, *, seed: int,
                        max_angle: float = DEFAULT_MAX_ANGLE
                        ) -> RotationRegression:
  """Builds the rotated-digit regression task of MATLAB's BNN example.

  Each image gets one fixed angle drawn uniformly from [-max_angle,
  max_angle) degrees (numpy's half-open uniform; the default gives
  [-45, 45)), positive = counter-clockwise (see rotate_images). Train and
  test angles come from two independent streams spawned from
  np.random.default_rng(seed), so the train angles do not depend on the
  size of the test set and vice versa. Labels are dropped.

  Args:
    dataset: the source images.
    seed: non-negative integer; the same seed gives the same task.
    max_angle: in degrees, in (0, 180].

  Returns:
    A RotationRegression.

  Raises:
    ConfigError: bad seed or max_angle.
  """
  seed = _seed(seed)
  if isinstance(max_angle, bool) or not isinstance(
      max_angle, (int, float, np.integer, np.floating)) or not (
          math.isfinite(max_angle) and 0 < max_angle <= 180):
    raise errors.ConfigError(
        f'--max_angle={max_angle!r}: must be a number of degrees in (0, 180]; '
        f'45 reproduces the MATLAB example.')
  train_rng, test_rng = np.random.default_rng(seed).spawn(2)
  max_angle = float(max_angle)
  train_angles = train_rng.uniform(-max_angle, max_angle,
                                   dataset.num_train).astype(np.float32)
  test_angles = test_rng.uniform(-max_angle, max_angle,
                                 dataset.num_test).astype(np.float32)
  return RotationRegression(
      train_images=rotate_images(dataset.train_images, train_angles),
      train_angles=train_angles,
      test_images=rotate_images(dataset.test_images, test_angles),
      test_angles=test_angles,
      max_angle=max_angle)


def rotated_test_sets(images, labels,
                      angles: Sequence[float] = DEFAULT_ROTATION_ANGLES
                      ) -> List[Tuple[float, np.ndarray]]:
  """The same images rotated by each angle, for metric-vs-rotation tables.

  Args:
    images: uint8 [N, H, W, C].
    labels: integer [N]; rotation keeps them, so they are only checked
      against `images` and can be reused for every angle.
    angles: angles in degrees (counter-clockwise), in the order returned.

  Returns:
    [(angle as float, uint8 [N, H, W, C] rotated images)], one per angle;
    angle 0 returns the images unchanged (a copy).

  Raises:
    DataError: bad arrays. ConfigError: empty or non-finite angles.
  """
  images = _images(images)
  _labels(labels, images.shape[0])
  try:
    angle_list = [float(a) for a in angles]
  except (TypeError, ValueError):
    angle_list = []
  if not angle_list or not all(math.isfinite(a) for a in angle_list):
    raise errors.ConfigError(
        f'angles={angles!r}: must be a non-empty list of finite degrees, '
        f'e.g. 0,15,...,180.')
  return [(a, images.copy() if a == 0 else rotate_images(images, a))
          for a in angle_list]


# ------------------------------------------------------------------ noise

def uniform_noise_images(num: int, image_shape: Sequence[int],
                         seed: int) -> np.ndarray:
  """uint8 [num, H, W, C] images with pixels i.i.d. uniform on {0, ..., 255}.

  Args:
    num: number of images (>= 0).
    image_shape: (H, W, C), e.g. ImageDataset.image_shape.
    seed: non-negative integer for np.random.default_rng.

  Raises:
    ConfigError: bad num, image_shape or seed.
  """
  seed = _seed(seed)
  if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 0:
    raise errors.ConfigError(
        f'num={num!r}: the number of noise images must be a non-negative '
        f'integer.')
  shape = tuple(image_shape)
  if len(shape) != 3 or not all(
      isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0
      for d in shape):
    raise errors.ConfigError(
        f'image_shape={image_shape!r}: must be (H, W, C) positive integers, '
        f'e.g. dataset.image_shape.')
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, size=(int(num),) + tuple(int(d) for d in shape),
                      dtype=np.uint8)
