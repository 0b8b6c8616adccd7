"""A tiny numpy rasteriser for figures written as PNG (no matplotlib).

Every function returns a uint8 [H, W, 3] RGB image on a white background,
ready for `summaries.write_png` or `Writers.image`. There is no text: axes
run over fixed data ranges documented per function, and series colours
follow PALETTE in order so captions can name them.

Layout: a plot area inset by MARGIN pixels on each side; the data point
(x, y) maps to column left + x' * (width - 1) and row top + (1 - y') *
(height - 1) of that area, where x', y' are x, y scaled to [0, 1].
"""
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from engine import errors

WHITE = (255, 255, 255)
AXIS_COLOUR = (0, 0, 0)
GRID_COLOUR = (225, 225, 225)
BAR_COLOUR = (31, 119, 180)      # reliability bars (accuracy)
GAP_COLOUR = (240, 128, 128)     # between accuracy and mean confidence
DIAGONAL_COLOUR = (90, 90, 90)   # perfect calibration
# Series colours of line_plot, in the order of the `series` dict.
PALETTE = (
    (31, 119, 180),   # blue
    (214, 39, 40),    # red
    (44, 160, 44),    # green
    (255, 127, 14),   # orange
    (148, 103, 189),  # purple
    (140, 86, 75),    # brown
    (227, 119, 194),  # pink
    (23, 190, 207),   # cyan
)
MARGIN = 12
SCALES = ('per_series', 'shared')


# ------------------------------------------------------------ primitives

def _size(size):
  try:
    height, width = (int(v) for v in size)
  except (TypeError, ValueError):
    height = width = 0
  if min(height, width) < 4 * MARGIN:
    raise errors.ConfigError(
        f'size={size!r}: must be (height, width) of at least '
        f'{4 * MARGIN} pixels each, e.g. (240, 240).')
  return height, width


class _Canvas:
  """A white RGB image with a plot area and data -> pixel mapping."""

  def __init__(self, size):
    height, width = _size(size)
    self.image = np.full((height, width, 3), WHITE, np.uint8)
    self.top = self.left = MARGIN
    self.bottom, self.right = height - 1 - MARGIN, width - 1 - MARGIN

  def col(self, x):
    """x in [0, 1] -> float column."""
    return self.left + np.asarray(x, np.float64) * (self.right - self.left)

  def row(self, y):
    """y in [0, 1] -> float row (y = 1 at the top)."""
    return self.bottom - np.asarray(y, np.float64) * (self.bottom - self.top)

  def rect(self, x0, x1, y0, y1, colour):
    """Fills data rectangle [x0, x1] x [y0, y1] (any order)."""
    c0, c1 = sorted((int(round(float(self.col(x0)))),
                     int(round(float(self.col(x1))))))
    r0, r1 = sorted((int(round(float(self.row(y0)))),
                     int(round(float(self.row(y1))))))
    self.image[r0:r1 + 1, c0:c1 + 1] = colour

  def frame(self, x0, x1, y0, y1, colour, width=2):
    """Outlines data rectangle [x0, x1] x [y0, y1], `width` pixels inside it."""
    c0, c1 = sorted((int(round(float(self.col(x0)))),
                     int(round(float(self.col(x1))))))
    r0, r1 = sorted((int(round(float(self.row(y0)))),
                     int(round(float(self.row(y1))))))
    self.image[r0:r0 + width, c0:c1 + 1] = colour
    self.image[max(r1 - width + 1, r0):r1 + 1, c0:c1 + 1] = colour
    self.image[r0:r1 + 1, c0:c0 + width] = colour
    self.image[r0:r1 + 1, max(c1 - width + 1, c0):c1 + 1] = colour

  def line(self, x0, y0, x1, y1, colour, thickness=1):
    """Draws a data-space segment, `thickness` pixels wide (odd numbers)."""
    self.pixel_line(float(self.row(y0)), float(self.col(x0)),
                    float(self.row(y1)), float(self.col(x1)), colour, thickness)

  def pixel_line(self, r0, c0, r1, c1, colour, thickness=1):
    steps = int(np.ceil(max(abs(r1 - r0), abs(c1 - c0)))) + 1
    t = np.linspace(0.0, 1.0, steps)
    rows = np.rint(r0 + t * (r1 - r0)).astype(int)
    cols = np.rint(c0 + t * (c1 - c0)).astype(int)
    self._stamp(rows, cols, colour, thickness // 2)

  def dot(self, x, y, colour, radius=2):
    self._stamp(np.array([int(round(float(self.row(y))))]),
                np.array([int(round(float(self.col(x))))]), colour, radius)

  def _stamp(self, rows, cols, colour, radius):
    h, w, _ = self.image.shape
    for dr in range(-radius, radius + 1):
      for dc in range(-radius, radius + 1):
        r, c = rows + dr, cols + dc
        ok = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        self.image[r[ok], c[ok]] = colour

  def grid(self, num=4):
    for v in np.linspace(0.0, 1.0, num + 1)[1:-1]:
      self.line(v, 0.0, v, 1.0, GRID_COLOUR)
      self.line(0.0, v, 1.0, v, GRID_COLOUR)

  def axes(self, xticks, yticks):
    """Black frame around the plot area, with tick marks outside it.

    Args:
      xticks, yticks: tick positions in [0, 1] (scaled data units).
    """
    self.line(0.0, 0.0, 1.0, 0.0, AXIS_COLOUR)
    self.line(0.0, 1.0, 1.0, 1.0, AXIS_COLOUR)
    self.line(0.0, 0.0, 0.0, 1.0, AXIS_COLOUR)
    self.line(1.0, 0.0, 1.0, 1.0, AXIS_COLOUR)
    for v in xticks:
      c = float(self.col(v))
      self.pixel_line(self.bottom, c, self.bottom + 4, c, AXIS_COLOUR)
    for v in yticks:
      r = float(self.row(v))
      self.pixel_line(r, self.left - 4, r, self.left, AXIS_COLOUR)


def _vector(name, value, length=None):
  array = np.asarray(value, np.float64)
  if array.ndim != 1 or (length is not None and array.shape[0] != length):
    want = f'[{length}]' if length is not None else '[B]'
    raise errors.DataError(
        f'{name}: expected shape {want}, got {array.shape}.')
  return array


# ------------------------------------------------------------------ plots

def reliability_diagram(counts, accuracies, confidences,
                        size: Tuple[int, int] = (240, 240)) -> np.ndarray:
  """Reliability diagram from `metrics.reliability` statistics.

  Both axes run over [0, 1]: x is confidence, split into B equal-width bins;
  y is accuracy. For every non-empty bin a BAR_COLOUR bar rises to the bin's
  accuracy, and the gap between the accuracy and the bin's mean confidence
  is marked in GAP_COLOUR: a filled box above the bar when over-confident
  (confidence > accuracy), a 2-pixel outline over the top of the bar when
  under-confident, so the bar itself stays visible. The DIAGONAL_COLOUR
  diagonal is perfect calibration.
  Empty bins (count 0) are left blank.

  Args:
    counts: [B] examples per bin.
    accuracies: [B] accuracy per bin, in [0, 1].
    confidences: [B] mean confidence per bin, in [0, 1].
    size: (height, width) in pixels.

  Returns:
    uint8 [height, width, 3].

  Raises:
    DataError: mismatched shapes or values outside [0, 1].
    ConfigError: size too small.
  """
  counts = _vector('counts', counts)
  num_bins = counts.shape[0]
  if num_bins == 0:
    raise errors.DataError('counts: needs at least one bin.')
  accuracies = _vector('accuracies', accuracies, num_bins)
  confidences = _vector('confidences', confidences, num_bins)
  for name, v in (('accuracies', accuracies), ('confidences', confidences)):
    if not np.all(np.isfinite(v)) or v.min() < 0 or v.max() > 1:
      raise errors.DataError(
          f'{name}: values must lie in [0, 1]; pass metrics.reliability(...) '
          f'output.')
  canvas = _Canvas(size)
  canvas.grid()
  width = 1.0 / num_bins
  for b in np.flatnonzero(counts > 0):
    x0, x1 = b * width, (b + 1) * width
    if accuracies[b] > 0:
      canvas.rect(x0, x1, 0.0, accuracies[b], BAR_COLOUR)
    if confidences[b] > accuracies[b]:  # over-confident: box above the bar
      canvas.rect(x0, x1, accuracies[b], confidences[b], GAP_COLOUR)
    elif confidences[b] < accuracies[b]:  # under-confident: outline on it
      canvas.frame(x0, x1, confidences[b], accuracies[b], GAP_COLOUR)
    if b > 0:  # a white seam keeps neighbouring bars apart
      canvas.line(x0, 0.0, x0, max(accuracies[b], confidences[b]), WHITE)
  canvas.line(0.0, 0.0, 1.0, 1.0, DIAGONAL_COLOUR, thickness=3)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  canvas.axes(xticks=edges if num_bins <= 20 else np.linspace(0, 1, 11),
              yticks=np.linspace(0.0, 1.0, 11))
  return canvas.image


def line_plot(xs, series: Dict[str, Sequence[float]],
              size: Tuple[int, int] = (240, 320), *,
              scale: str = 'per_series',
              y_range: Optional[Tuple[float, float]] = None) -> np.ndarray:
  """One coloured polyline (with dots at the points) per series.

  x is scaled linearly from [min(xs), max(xs)] to the plot width. y scaling:
    scale='per_series' (default): each series is min-max scaled to [0, 1] on
      its own, so curves in different units (accuracy, ECE, entropy) share
      one plot; only each curve's shape is comparable, not its level.
    scale='shared': all series share one axis from the overall min to max.
    y_range=(lo, hi): a fixed shared axis (overrides `scale`), e.g. (0, 1)
      for accuracies; values outside are clipped to the frame.
  A constant series (under per-series or a degenerate shared range) is drawn
  at mid-height. NaN values are skipped together with their segments.
  Series i (dict order) is drawn in PALETTE[i % len(PALETTE)].

  Args:
    xs: [P] x values, e.g. rotation angles.
    series: name -> [P] y values.
    size: (height, width) in pixels.
    scale: one of SCALES.
    y_range: optional fixed (lo, hi) with lo < hi.

  Returns:
    uint8 [height, width, 3].

  Raises:
    DataError: mismatched lengths, no series or no points.
    ConfigError: bad scale, y_range or size.
  """
  if scale not in SCALES:
    raise errors.ConfigError(
        f'scale={scale!r}: choose one of {", ".join(SCALES)}.')
  xs = _vector('xs', xs)
  if xs.shape[0] == 0 or not np.all(np.isfinite(xs)):
    raise errors.DataError('xs: needs at least one finite x value.')
  if not series:
    raise errors.DataError('series: is empty; pass {name: y values}.')
  ys = {name: _vector(f'series[{name!r}]', v, xs.shape[0])
        for name, v in series.items()}
  if y_range is not None:
    try:
      lo, hi = (float(v) for v in y_range)
    except (TypeError, ValueError):
      lo = hi = float('nan')
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
      raise errors.ConfigError(
          f'y_range={y_range!r}: must be (lo, hi) finite with lo < hi, '
          f'e.g. (0, 1).')
    shared = (lo, hi)
  elif scale == 'shared':
    finite = np.concatenate([v[np.isfinite(v)] for v in ys.values()])
    shared = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
  else:
    shared = None

  def normalise(v):
    lo_, hi_ = shared if shared is not None else (
        (np.nanmin(v), np.nanmax(v)) if np.any(np.isfinite(v)) else (0, 1))
    if hi_ <= lo_:
      return np.where(np.isfinite(v), 0.5, np.nan)
    return np.clip((v - lo_) / (hi_ - lo_), 0.0, 1.0)

  x_lo, x_hi = xs.min(), xs.max()
  xn = (xs - x_lo) / (x_hi - x_lo) if x_hi > x_lo else np.full_like(xs, 0.5)
  canvas = _Canvas(size)
  canvas.grid()
  for i, v in enumerate(ys.values()):
    colour = PALETTE[i % len(PALETTE)]
    yn = normalise(v)
    for j in range(xs.shape[0] - 1):
      if np.isfinite(yn[j]) and np.isfinite(yn[j + 1]):
        canvas.line(xn[j], yn[j], xn[j + 1], yn[j + 1], colour, thickness=3)
    for j in np.flatnonzero(np.isfinite(yn)):
      canvas.dot(xn[j], yn[j], colour)
  canvas.axes(xticks=xn if xs.shape[0] <= 25 else np.linspace(0, 1, 11),
              yticks=np.linspace(0.0, 1.0, 5))
  return canvas.image
