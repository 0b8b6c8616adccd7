"""Tests of engine.tasks: class selection, rotation and the derived task sets."""
import numpy as np
import pytest

from engine import datasets
from engine import errors
from engine import tasks


def _numbered_images(n, size=3):
  """Image i is filled with the value i, so selections can be traced."""
  return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None],
                         (n, size, size, 1)).copy()


def _single_pixel(size, row, col, value=200):
  image = np.zeros((1, size, size, 1), np.uint8)
  image[0, row, col, 0] = value
  return image


# ------------------------------------------------------- select_classes

def test_select_classes_remaps_in_given_order():
  labels = np.array([0, 1, 2, 3, 1, 0, 3])
  images = _numbered_images(7)
  sel = tasks.select_classes(images, labels, (3, 1))
  # Kept: indices 1 (1), 3 (3), 4 (1), 6 (3); 3 -> 0 and 1 -> 1.
  np.testing.assert_array_equal(sel.images[:, 0, 0, 0], [1, 3, 4, 6])
  np.testing.assert_array_equal(sel.labels, [1, 0, 1, 0])
  # OOD: indices 0, 2, 5 with their original labels.
  np.testing.assert_array_equal(sel.ood_images[:, 0, 0, 0], [0, 2, 5])
  np.testing.assert_array_equal(sel.ood_labels, [0, 2, 0])
  assert sel.labels.dtype == np.int64


def test_select_classes_all_classes_without_ood():
  labels = np.array([0, 1, 1, 0])
  sel = tasks.select_classes(_numbered_images(4), labels, [1, 0],
                             require_ood=False)
  np.testing.assert_array_equal(sel.labels, [1, 0, 0, 1])
  assert sel.ood_images.shape == (0, 3, 3, 1)


@pytest.mark.parametrize('classes, match', [
    ((1,), 'at least two'),
    ((1, 1, 2), 'more than once'),
    ((0, 9), 'out of range'),
    ((0, -1), 'out of range'),
    ((0, 1.5), 'not an integer'),
    ((0, True), 'not an integer'),
    ('0,1', 'list of class ids'),
    ((0, 1, 2, 3), 'no out-of-distribution'),
])
def test_select_classes_rejects_bad_classes(classes, match):
  labels = np.array([0, 1, 2, 3])
  with pytest.raises(errors.ConfigError, match=match) as info:
    tasks.select_classes(_numbered_images(4), labels, classes)
  assert '--train_classes' in str(info.value)


def test_select_classes_uses_num_classes_and_rejects_absent_class():
  labels = np.array([0, 1, 1, 0])
  # With num_classes=4, (0, 1) leaves classes 2 and 3 out: allowed.
  tasks.select_classes(_numbered_images(4), labels, (0, 1), num_classes=4)
  with pytest.raises(errors.DataError, match='class 3 has no example'):
    tasks.select_classes(_numbered_images(4), labels, (0, 3), num_classes=4)


def test_select_classes_rejects_mismatched_arrays():
  with pytest.raises(errors.DataError, match='labels'):
    tasks.select_classes(_numbered_images(4), np.array([0, 1, 2]), (0, 1))
  with pytest.raises(errors.DataError, match='uint8'):
    tasks.select_classes(np.zeros((4, 3, 3)), np.array([0, 1, 2, 3]), (0, 1))


# --------------------------------------------------------------- rotate

def test_rotate_plus_90_moves_right_of_centre_up():
  # 5x5, centre (2, 2). The pixel right of centre (row 2, col 3) goes to
  # above centre (row 1, col 2) counter-clockwise; -90 sends it below.
  image = _single_pixel(5, 2, 3)
  up = tasks.rotate_images(image, [90.0])[0, :, :, 0]
  down = tasks.rotate_images(image, [-90.0])[0, :, :, 0]
  assert up[1, 2] == 200 and up.sum() == 200
  assert down[3, 2] == 200 and down.sum() == 200


def test_rotate_even_size_about_pixel_centre():
  # 4x4, centre (1.5, 1.5). Pixel (row 1, col 3) has offset (dx, dy) =
  # (1.5, -.5), with y down; +90 maps (dx, dy) -> (dy, -dx) = (-.5, -1.5),
  # i.e. row 0, col 1.
  rotated = tasks.rotate_images(_single_pixel(4, 1, 3), 90.0)[0, :, :, 0]
  assert rotated[0, 1] == 200 and rotated.sum() == 200


def test_rotate_360_and_round_trip_are_identity():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 7, 7, 2), dtype=np.uint8)
  np.testing.assert_array_equal(tasks.rotate_images(images, 360.0), images)
  np.testing.assert_array_equal(tasks.rotate_images(images, 0.0), images)
  there = tasks.rotate_images(images, 90.0)
  np.testing.assert_array_equal(tasks.rotate_images(there, -90.0), images)
  # 180 degrees about the centre is flipping both axes, for any size.
  wide = rng.integers(0, 256, (2, 4, 6, 1), dtype=np.uint8)
  np.testing.assert_array_equal(tasks.rotate_images(wide, 180.0),
                                wide[:, ::-1, ::-1])


def test_rotate_interpolates_and_fills_with_zero():
  # 45 degrees spreads one bright pixel bilinearly (total mass about kept);
  # a full white image loses its corners to the zero fill.
  spread = tasks.rotate_images(_single_pixel(7, 3, 5), 45.0)[0, :, :, 0]
  assert np.count_nonzero(spread) > 1 and spread.max() < 200
  white = np.full((1, 9, 9, 1), 255, np.uint8)
  rotated = tasks.rotate_images(white, 45.0)[0, :, :, 0]
  assert rotated[0, 0] == 0 and rotated[4, 4] == 255


def test_rotate_uses_one_angle_per_image():
  images = np.concatenate([_single_pixel(5, 2, 3), _single_pixel(5, 2, 3)])
  out = tasks.rotate_images(images, [0.0, 90.0])
  assert out[0, 2, 3, 0] == 200 and out[1, 1, 2, 0] == 200
  with pytest.raises(errors.DataError, match='angles_degrees'):
    tasks.rotate_images(images, [0.0, 90.0, 180.0])
  with pytest.raises(errors.DataError, match='angles_degrees'):
    tasks.rotate_images(images, [0.0, np.nan])


# --------------------------------------------------- rotation regression

def _dataset(num_train=40, num_test=16):
  return datasets.load_dataset('synthetic', seed=3, num_train=num_train,
                               num_test=num_test)


def test_rotation_regression_angles_and_images():
  data = _dataset()
  task = tasks.rotation_regression(data, seed=7, max_angle=30.0)
  assert task.train_angles.dtype == np.float32
  assert task.train_angles.shape == (40,) and task.test_angles.shape == (16,)
  for angles in (task.train_angles, task.test_angles):
    assert angles.min() >= -30.0 and angles.max() < 30.0
  # Uniform, not constant: both signs show up.
  assert task.train_angles.min() < -5 and task.train_angles.max() > 5
  np.testing.assert_array_equal(
      task.train_images, tasks.rotate_images(data.train_images,
                                             task.train_angles))
  np.testing.assert_array_equal(
      task.test_images, tasks.rotate_images(data.test_images,
                                            task.test_angles))
  assert task.train_images.dtype == np.uint8
  assert task.max_angle == 30.0


def test_rotation_regression_is_deterministic_with_distinct_streams():
  data = _dataset()
  a = tasks.rotation_regression(data, seed=7)
  b = tasks.rotation_regression(data, seed=7)
  c = tasks.rotation_regression(data, seed=8)
  np.testing.assert_array_equal(a.train_angles, b.train_angles)
  np.testing.assert_array_equal(a.test_images, b.test_images)
  assert not np.allclose(a.train_angles, c.train_angles)
  # Test angles are not a prefix/copy of the train stream...
  assert not np.allclose(a.train_angles[:16], a.test_angles)
  # ...and train angles do not depend on the test set size.
  bigger = tasks.rotation_regression(_dataset(num_test=32), seed=7)
  np.testing.assert_array_equal(bigger.train_angles, a.train_angles)
  np.testing.assert_array_equal(bigger.test_angles[:16], a.test_angles)


@pytest.mark.parametrize('kwargs, match', [
    (dict(seed=0, max_angle=0.0), '--max_angle'),
    (dict(seed=0, max_angle=200.0), '--max_angle'),
    (dict(seed=0, max_angle=float('nan')), '--max_angle'),
    (dict(seed=-1), '--seed'),
    (dict(seed=1.5), '--seed'),
])
def test_rotation_regression_rejects_bad_config(kwargs, match):
  with pytest.raises(errors.ConfigError, match=match):
    tasks.rotation_regression(_dataset(4, 2), **kwargs)


# ------------------------------------------------------ rotated test sets

def test_rotated_test_sets():
  data = _dataset(4, 6)
  sets = tasks.rotated_test_sets(data.test_images, data.test_labels)
  assert [a for a, _ in sets] == [float(a) for a in range(0, 181, 15)]
  np.testing.assert_array_equal(sets[0][1], data.test_images)
  np.testing.assert_array_equal(sets[-1][1], data.test_images[:, ::-1, ::-1])
  np.testing.assert_array_equal(
      sets[2][1], tasks.rotate_images(data.test_images, 30.0))
  assert not np.array_equal(sets[1][1], data.test_images)
  custom = tasks.rotated_test_sets(data.test_images, data.test_labels,
                                   angles=(90, -90))
  assert [a for a, _ in custom] == [90.0, -90.0]
  with pytest.raises(errors.ConfigError, match='angles'):
    tasks.rotated_test_sets(data.test_images, data.test_labels, angles=())
  with pytest.raises(errors.DataError, match='labels'):
    tasks.rotated_test_sets(data.test_images, data.test_labels[:3])


# ------------------------------------------------------------------ noise

def test_uniform_noise_images():
  noise = tasks.uniform_noise_images(50, (28, 28, 1), seed=0)
  assert noise.shape == (50, 28, 28, 1) and noise.dtype == np.uint8
  assert noise.min() == 0 and noise.max() == 255
  assert abs(noise.mean() - 127.5) < 2.0
  np.testing.assert_array_equal(
      noise, tasks.uniform_noise_images(50, (28, 28, 1), seed=0))
  assert not np.array_equal(
      noise, tasks.uniform_noise_images(50, (28, 28, 1), seed=1))
  with pytest.raises(errors.ConfigError, match='image_shape'):
    tasks.uniform_noise_images(2, (28, 28), seed=0)
  with pytest.raises(errors.ConfigError, match='num'):
    tasks.uniform_noise_images(-1, (28, 28, 1), seed=0)
