"""Tests of engine.plots: image shape, and that marks land where the data says."""
import numpy as np
import pytest

from engine import errors
from engine import plots

_SIZE = (240, 240)
# Plot area: rows/cols MARGIN .. 239 - MARGIN, so data (x, y) sits at
# col MARGIN + x * 215 and row 227 - y * 215.
_SPAN = _SIZE[0] - 1 - 2 * plots.MARGIN


def _pixel(image, x, y):
  row = int(round(_SIZE[0] - 1 - plots.MARGIN - y * _SPAN))
  col = int(round(plots.MARGIN + x * _SPAN))
  return tuple(int(v) for v in image[row, col])


def _diagram():
  # 5 bins of width .2: bin 0 accuracy .2 / conf .6 (over-confident), bins 1
  # and 3 empty, bin 2 calibrated at .5, bin 4 accuracy 1 / conf .9.
  counts = [3, 0, 4, 0, 10]
  accuracies = [0.2, 0.0, 0.5, 0.0, 1.0]
  confidences = [0.6, 0.0, 0.5, 0.0, 0.9]
  return plots.reliability_diagram(counts, accuracies, confidences, _SIZE)


def test_reliability_diagram_shape_and_content():
  image = _diagram()
  assert image.shape == (240, 240, 3) and image.dtype == np.uint8
  assert len(np.unique(image.reshape(-1, 3), axis=0)) >= 4


def test_reliability_bar_of_accuracy_one_reaches_the_top():
  image = _diagram()
  # Centre of the last bin (x = .9), just below the top edge (y = .98).
  assert _pixel(image, 0.9, 0.98) == plots.BAR_COLOUR
  # Under-confident (conf .9 < acc 1): the gap is outlined, not filled.
  assert _pixel(image, 0.9, 0.995) == plots.GAP_COLOUR
  assert _pixel(image, 0.9, 0.8) == plots.BAR_COLOUR
  # The top margin above the frame stays white.
  assert tuple(image[plots.MARGIN // 2, 200]) == plots.WHITE


def test_reliability_bars_gaps_and_empty_bins():
  image = _diagram()
  assert _pixel(image, 0.15, 0.05) == plots.BAR_COLOUR  # under acc .2
  assert _pixel(image, 0.05, 0.4) == plots.GAP_COLOUR  # between .2 and .6
  assert _pixel(image, 0.1, 0.8) != plots.BAR_COLOUR   # above both
  assert _pixel(image, 0.3, 0.05) != plots.BAR_COLOUR  # empty bin 1
  assert _pixel(image, 0.7, 0.05) != plots.BAR_COLOUR  # empty bin 3
  assert _pixel(image, 0.5, 0.5) == plots.DIAGONAL_COLOUR


def test_reliability_diagram_rejects_bad_input():
  with pytest.raises(errors.DataError, match='accuracies'):
    plots.reliability_diagram([1, 1], [0.5], [0.5, 0.5])
  with pytest.raises(errors.DataError, match='confidences'):
    plots.reliability_diagram([1], [0.5], [1.5])
  with pytest.raises(errors.ConfigError, match='size'):
    plots.reliability_diagram([1], [0.5], [0.5], size=(10, 10))


def test_line_plot_per_series_scaling():
  xs = [0, 15, 30]
  image = plots.line_plot(xs, {'up': [0.1, 0.2, 0.3], 'down': [50, 30, 10]},
                          size=_SIZE)
  assert image.shape == (240, 240, 3) and image.dtype == np.uint8
  # Each series spans the full height on its own scale: 'up' (PALETTE[0])
  # starts at the bottom and ends at the top; 'down' (PALETTE[1]) the reverse.
  assert _pixel(image, 0.01, 0.01) == plots.PALETTE[0]
  assert _pixel(image, 0.99, 0.99) == plots.PALETTE[0]
  assert _pixel(image, 0.01, 0.99) == plots.PALETTE[1]
  assert _pixel(image, 0.99, 0.01) == plots.PALETTE[1]
  assert _pixel(image, 0.25, 0.25) == plots.PALETTE[0]  # on the 'up' line


def test_line_plot_shared_and_fixed_axes():
  xs = [0.0, 1.0]
  series = {'small': [0.0, 1.0], 'big': [0.0, 10.0]}
  shared = plots.line_plot(xs, series, size=_SIZE, scale='shared')
  # On one axis 0..10, 'small' ends at y = .1, 'big' at the top.
  assert _pixel(shared, 0.99, 0.1) == plots.PALETTE[0]
  assert _pixel(shared, 0.99, 0.99) == plots.PALETTE[1]
  fixed = plots.line_plot(xs, {'acc': [0.5, 0.5]}, size=_SIZE,
                          y_range=(0.0, 1.0))
  assert _pixel(fixed, 0.5, 0.5) == plots.PALETTE[0]
  assert _pixel(fixed, 0.5, 0.9) != plots.PALETTE[0]


def test_line_plot_constant_series_and_nan():
  image = plots.line_plot([0, 1, 2], {'flat': [3.0, 3.0, np.nan]}, size=_SIZE)
  assert _pixel(image, 0.25, 0.5) == plots.PALETTE[0]
  # The segment to the NaN point is not drawn.
  assert _pixel(image, 0.75, 0.5) != plots.PALETTE[0]


def test_line_plot_rejects_bad_input():
  with pytest.raises(errors.DataError, match='series'):
    plots.line_plot([0, 1], {'a': [1, 2, 3]})
  with pytest.raises(errors.DataError, match='series'):
    plots.line_plot([0, 1], {})
  with pytest.raises(errors.ConfigError, match='scale'):
    plots.line_plot([0, 1], {'a': [1, 2]}, scale='log')
  with pytest.raises(errors.ConfigError, match='y_range'):
    plots.line_plot([0, 1], {'a': [1, 2]}, y_range=(1, 1))
