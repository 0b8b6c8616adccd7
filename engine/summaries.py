"""TensorBoard writers, image grids and PNG files."""
import json
import os

import numpy as np
import tensorflow as tf


def image_grid(images, columns=None):
  """[N, H, W, C] floats in [0, 1] -> one [rows*H, cols*W, C] uint8 grid (numpy)."""
  images = np.clip(np.asarray(images), 0.0, 1.0)
  n, h, w, c = images.shape
  columns = columns or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / columns))
  grid = np.zeros((rows * h, columns * w, c), np.float32)
  for i in range(n):
    r, col = divmod(i, columns)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = images[i]
  return (grid * 255 + 0.5).astype(np.uint8)


def write_png(path, grid_uint8):
  """Writes a uint8 [H, W, C] array as PNG."""
  tf.io.write_file(path, tf.io.encode_png(grid_uint8))


class Writers:
  """train/ and eval/ summary writers under model_dir (no-ops when disabled)."""

  def __init__(self, model_dir, *, enabled=True):
    self.enabled = enabled
    if enabled:
      self.train = tf.summary.create_file_writer(os.path.join(model_dir, 'train'))
      self.eval = tf.summary.create_file_writer(os.path.join(model_dir, 'eval'))

  def scalars(self, which, values, step):
    if not self.enabled:
      return
    with getattr(self, which).as_default(step=step):
      for k, v in values.items():
        tf.summary.scalar(k, float(v))

  def image(self, which, name, grid_uint8, step):
    if not self.enabled:
      return
    with getattr(self, which).as_default(step=step):
      tf.summary.image(name, grid_uint8[None], step=step)

  def text(self, name, value, step=0):
    if not self.enabled:
      return
    with self.train.as_default(step=step):
      tf.summary.text(name, '```\n' + json.dumps(value, indent=2, default=str) + '\n```')

  def flush(self):
    if self.enabled:
      self.train.flush()
      self.eval.flush()
