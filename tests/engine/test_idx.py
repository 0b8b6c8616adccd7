"""Tests of engine.idx: round trips and every way a file can be bad."""
import gzip
import struct

import numpy as np
import pytest

from engine import errors
from engine import idx

_DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


def _sample(dtype, shape=(3, 4, 5)):
  rng = np.random.default_rng(0)
  values = rng.integers(-100, 100, size=shape)
  if np.dtype(dtype) == np.uint8:
    values = values + 100
  if np.dtype(dtype).kind == 'f':
    values = values + rng.uniform(size=shape)
  return values.astype(dtype)


def _header(code, dims):
  return struct.pack(f'>BBBB{len(dims)}I', 0, 0, code, len(dims), *dims)


@pytest.mark.parametrize('dtype', _DTYPES)
@pytest.mark.parametrize('filename', ['a.idx', 'a.idx.gz'])
def test_round_trip(tmp_path, dtype, filename):
  path = str(tmp_path / filename)
  array = _sample(dtype)
  idx.write_idx(path, array)
  with open(path, 'rb') as f:
    is_gzip = f.read(2) == b'\x1f\x8b'
  assert is_gzip == filename.endswith('.gz')
  out = idx.read_idx(path)
  assert out.dtype == np.dtype(dtype)
  assert out.dtype.isnative
  assert out.shape == array.shape
  np.testing.assert_array_equal(out, array)
  out[0] = 0  # Must be a writable copy, not a view of the file's bytes.


@pytest.mark.parametrize('shape', [(7,), (2, 3), (2, 3, 4), (2, 1, 3, 2), (0, 5)])
def test_round_trip_ranks(tmp_path, shape):
  path = str(tmp_path / 'a')
  array = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
  idx.write_idx(path, array)
  out = idx.read_idx(path)
  assert out.shape == shape
  np.testing.assert_array_equal(out, array)


def test_written_bytes_match_the_format(tmp_path):
  path = tmp_path / 'a'
  idx.write_idx(str(path), np.array([[1, 2, 3], [4, 5, 6]], np.uint8))
  assert path.read_bytes() == _header(0x08, (2, 3)) + bytes([1, 2, 3, 4, 5, 6])
  idx.write_idx(str(path), np.array([1, -2], np.int16))
  assert path.read_bytes() == _header(0x0B, (2,)) + b'\x00\x01\xff\xfe'


def test_reads_hand_made_big_endian_float(tmp_path):
  path = tmp_path / 'a'
  path.write_bytes(_header(0x0D, (2,)) + struct.pack('>2f', 1.5, -2.0))
  np.testing.assert_array_equal(idx.read_idx(str(path)), [1.5, -2.0])


def test_big_endian_input_array(tmp_path):
  path = str(tmp_path / 'a')
  array = np.array([1, 256, -3], dtype='>i4')
  idx.write_idx(path, array)
  out = idx.read_idx(path)
  assert out.dtype == np.dtype(np.int32)
  np.testing.assert_array_equal(out, [1, 256, -3])


def test_gzip_detected_by_content_not_name(tmp_path):
  array = _sample(np.uint8)
  gz_no_suffix = str(tmp_path / 'compressed')
  idx.write_idx(gz_no_suffix, array, compress=True)
  raw_with_suffix = str(tmp_path / 'raw.gz')
  idx.write_idx(raw_with_suffix, array, compress=False)
  np.testing.assert_array_equal(idx.read_idx(gz_no_suffix), array)
  np.testing.assert_array_equal(idx.read_idx(raw_with_suffix), array)


def test_compressed_output_is_deterministic(tmp_path):
  a, b = tmp_path / 'a.gz', tmp_path / 'b.gz'
  idx.write_idx(str(a), _sample(np.float32))
  idx.write_idx(str(b), _sample(np.float32))
  assert a.read_bytes() == b.read_bytes()


def _expect_data_error(path, *fragments):
  with pytest.raises(errors.DataError) as info:
    idx.read_idx(str(path))
  message = str(info.value)
  assert str(path) in message
  for fragment in fragments:
    assert fragment in message, message
  return message


def test_bad_magic(tmp_path):
  path = tmp_path / 'bad'
  path.write_bytes(b'\x01\x02\x08\x01' + struct.pack('>I', 1) + b'\x00')
  _expect_data_error(path, 'magic', '01 02')


def test_unknown_dtype_code(tmp_path):
  path = tmp_path / 'bad'
  path.write_bytes(_header(0x0A, (1,)) + b'\x00')
  _expect_data_error(path, 'dtype code 0x0A')


@pytest.mark.parametrize('rank', [0, 5])
def test_bad_rank(tmp_path, rank):
  path = tmp_path / 'bad'
  path.write_bytes(_header(0x08, (1,) * rank) + b'\x00')
  _expect_data_error(path, f'rank {rank}', '1 to 4')


def test_file_shorter_than_header(tmp_path):
  path = tmp_path / 'bad'
  path.write_bytes(b'\x00\x00')
  _expect_data_error(path, '2 bytes', 'truncated')


def test_truncated_inside_dims(tmp_path):
  path = tmp_path / 'bad'
  path.write_bytes(_header(0x08, (2, 3))[:9])
  _expect_data_error(path, 'truncated', '12 header bytes')


def test_truncated_raw(tmp_path):
  path = tmp_path / 'bad'
  idx.write_idx(str(path), np.zeros((4, 5), np.int16))  # 40 data bytes.
  path.write_bytes(path.read_bytes()[:-3])
  _expect_data_error(path, 'truncated', '40 data bytes', '37 data bytes')


def test_trailing_bytes(tmp_path):
  path = tmp_path / 'bad'
  idx.write_idx(str(path), np.zeros((4, 5), np.uint8))
  path.write_bytes(path.read_bytes() + b'\x00\x00')
  _expect_data_error(path, 'trailing', '20 data bytes', '22 data bytes')


def test_trailing_bytes_inside_gzip(tmp_path):
  path = tmp_path / 'bad.gz'
  path.write_bytes(gzip.compress(_header(0x08, (3,)) + b'\x01\x02\x03\x04'))
  _expect_data_error(path, 'trailing', '3 data bytes', '4 data bytes')


def test_truncated_gzip(tmp_path):
  path = tmp_path / 'bad.gz'
  idx.write_idx(str(path), _sample(np.float64, (50, 20)))
  content = path.read_bytes()
  path.write_bytes(content[:len(content) // 2])
  _expect_data_error(path, 'gzip')


def test_corrupt_gzip(tmp_path):
  path = tmp_path / 'bad.gz'
  idx.write_idx(str(path), _sample(np.float64, (50, 20)))
  content = bytearray(path.read_bytes())
  content[-6] ^= 0xFF  # Inside the CRC/length trailer.
  path.write_bytes(bytes(content))
  _expect_data_error(path, 'gzip')


def test_missing_file(tmp_path):
  _expect_data_error(tmp_path / 'nope', 'does not exist')


def test_directory_instead_of_file(tmp_path):
  _expect_data_error(tmp_path, 'cannot be read')


@pytest.mark.parametrize('dtype', [np.int64, np.bool_, np.uint16, np.complex64])
def test_write_unsupported_dtype(tmp_path, dtype):
  path = str(tmp_path / 'a')
  with pytest.raises(errors.ConfigError, match='cannot be stored') as info:
    idx.write_idx(path, np.zeros(3, dtype))
  assert path in str(info.value)
  assert not (tmp_path / 'a').exists()


@pytest.mark.parametrize('shape', [(), (1, 1, 1, 1, 1)])
def test_write_unsupported_rank(tmp_path, shape):
  with pytest.raises(errors.ConfigError, match='rank'):
    idx.write_idx(str(tmp_path / 'a'), np.zeros(shape, np.uint8))


def test_write_into_missing_directory(tmp_path):
  path = str(tmp_path / 'no_such_dir' / 'a')
  with pytest.raises(errors.DataError, match='no_such_dir'):
    idx.write_idx(path, np.zeros(3, np.uint8))
