"""Reading and writing IDX files (the format MNIST and Fashion-MNIST ship in).

An IDX file is: two zero bytes, a dtype code byte, a rank byte, `rank`
big-endian uint32 dimension sizes, then the elements in C order, big-endian.
Files may be gzip-compressed; compression is detected from the content (the
gzip magic bytes), never from the file name, because downloads are often
renamed or decompressed without the name changing.

Pure numpy on purpose: data conversion must not need TensorFlow.
"""
import gzip
import os
import struct
import zlib
from typing import Optional

import numpy as np

from engine import errors

# dtype code -> on-disk (big-endian) dtype.
_CODE_TO_DTYPE = {
    0x08: np.dtype('>u1'),
    0x09: np.dtype('>i1'),
    0x0B: np.dtype('>i2'),
    0x0C: np.dtype('>i4'),
    0x0D: np.dtype('>f4'),
    0x0E: np.dtype('>f8'),
}
# (numpy kind, itemsize) -> dtype code; keyed this way so arrays of either byte
# order map to the same code.
_KIND_SIZE_TO_CODE = {(dt.kind, dt.itemsize): code
                      for code, dt in _CODE_TO_DTYPE.items()}

_GZIP_MAGIC = b'\x1f\x8b'
_MIN_RANK = 1
# The format allows up to 255 dimensions; nothing this engine reads has more
# than 4 ([N, H, W, C]), so a larger rank almost certainly means a corrupt
# header, and refusing it avoids allocating absurd shapes.
_MAX_RANK = 4
_UINT32_MAX = 2**32 - 1


def _supported_dtypes_text():
  return ', '.join(str(dt.newbyteorder('=')) for dt in _CODE_TO_DTYPE.values())


def _read_bytes(path: str) -> bytes:
  """Returns the (decompressed) content of `path`, raising DataError on failure."""
  try:
    with open(path, 'rb') as f:
      raw = f.read()
  except FileNotFoundError:
    raise errors.DataError(
        f'IDX file {path!r} does not exist; check the path (or the data '
        f'directory it was built from).') from None
  except OSError as e:
    raise errors.DataError(
        f'IDX file {path!r} cannot be read ({e.strerror or e}); check that it '
        f'is a readable regular file.') from e
  if not raw.startswith(_GZIP_MAGIC):
    return raw
  try:
    return gzip.decompress(raw)
  except (EOFError, OSError, zlib.error) as e:
    raise errors.DataError(
        f'IDX file {path!r} starts with the gzip magic bytes but its gzip '
        f'stream is corrupt or truncated ({type(e).__name__}: {e}); the '
        f'download or copy is incomplete, fetch the file again.') from e


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file, gzip-compressed or raw.

  Args:
    path: the file to read. Compression is detected from the gzip magic bytes.

  Returns:
    A writable, native-endian numpy array with the shape the header declares.

  Raises:
    DataError: the file is missing or unreadable, its gzip stream is corrupt,
      the header is invalid (magic, dtype code, rank), or the data is shorter
      or longer than the header declares.
  """
  content = _read_bytes(path)
  if len(content) < 4:
    raise errors.DataError(
        f'IDX file {path!r} is {len(content)} bytes long, shorter than the '
        f'4-byte IDX header; the file is truncated or not an IDX file.')
  zero0, zero1, code, rank = content[0], content[1], content[2], content[3]
  if zero0 != 0 or zero1 != 0:
    raise errors.DataError(
        f'IDX file {path!r} has magic bytes {content[:2].hex(" ")}, expected '
        f'00 00; it is not an IDX file (or is compressed with something other '
        f'than gzip). Point at the IDX file itself.')
  if code not in _CODE_TO_DTYPE:
    known = ', '.join(f'0x{c:02X}' for c in _CODE_TO_DTYPE)
    raise errors.DataError(
        f'IDX file {path!r} has dtype code 0x{code:02X}, which is not a known '
        f'IDX type (known: {known}); the header is corrupt or the file is not '
        f'an IDX file.')
  if not _MIN_RANK <= rank <= _MAX_RANK:
    raise errors.DataError(
        f'IDX file {path!r} declares rank {rank}; only ranks {_MIN_RANK} to '
        f'{_MAX_RANK} are supported. The header is corrupt, or the data needs '
        f'reshaping to at most {_MAX_RANK} dimensions before writing.')
  header_size = 4 + 4 * rank
  if len(content) < header_size:
    raise errors.DataError(
        f'IDX file {path!r} is truncated inside its header: rank {rank} needs '
        f'{header_size} header bytes but the file has {len(content)}; fetch '
        f'the file again.')
  dims = struct.unpack(f'>{rank}I', content[4:header_size])
  disk_dtype = _CODE_TO_DTYPE[code]
  # Python ints, so a huge declared shape cannot overflow.
  expected = disk_dtype.itemsize
  for d in dims:
    expected *= d
  actual = len(content) - header_size
  if actual != expected:
    what = 'truncated' if actual < expected else 'has trailing bytes'
    raise errors.DataError(
        f'IDX file {path!r} {what}: its header declares shape {tuple(dims)} of '
        f'{disk_dtype.newbyteorder("=")} ({expected} data bytes) but it holds '
        f'{actual} data bytes; the file is damaged or was concatenated, '
        f'fetch it again.')
  data = np.frombuffer(content, dtype=disk_dtype, offset=header_size,
                       count=expected // disk_dtype.itemsize)
  # astype copies, giving a writable native-endian array.
  return data.astype(disk_dtype.newbyteorder('=')).reshape(dims)


def write_idx(path: str, array: np.ndarray, *,
              compress: Optional[bool] = None) -> None:
  """Writes `array` as an IDX file.

  The file is written to a temporary name and renamed into place, so an
  interrupted write never leaves a truncated file under `path`.

  Args:
    path: destination file.
    array: array of dtype uint8, int8, int16, int32, float32 or float64 (either
      byte order), rank 1 to 4, each dimension below 2**32.
    compress: gzip the file; None means compress iff `path` ends in '.gz'.

  Raises:
    ConfigError: the array's dtype, rank or shape cannot be stored as IDX.
    DataError: the file cannot be written.
  """
  array = np.asarray(array)
  code = _KIND_SIZE_TO_CODE.get((array.dtype.kind, array.dtype.itemsize))
  if code is None:
    raise errors.ConfigError(
        f'write_idx({path!r}): array dtype {array.dtype} cannot be stored in '
        f'IDX; cast it to one of: {_supported_dtypes_text()}.')
  if not _MIN_RANK <= array.ndim <= _MAX_RANK:
    raise errors.ConfigError(
        f'write_idx({path!r}): array has rank {array.ndim} (shape '
        f'{array.shape}); only ranks {_MIN_RANK} to {_MAX_RANK} are supported, '
        f'reshape it first.')
  if any(d > _UINT32_MAX for d in array.shape):
    raise errors.ConfigError(
        f'write_idx({path!r}): shape {array.shape} has a dimension of 2**32 or '
        f'more, which the IDX header cannot hold; split the array.')
  if compress is None:
    compress = path.endswith('.gz')
  header = struct.pack(f'>BBBB{array.ndim}I', 0, 0, code, array.ndim,
                       *array.shape)
  body = np.ascontiguousarray(array, dtype=_CODE_TO_DTYPE[code]).tobytes()
  content = header + body
  if compress:
    # mtime=0 keeps the output byte-identical for identical input.
    content = gzip.compress(content, mtime=0)
  tmp_path = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp_path, 'wb') as f:
      f.write(content)
    os.replace(tmp_path, path)
  except OSError as e:
    try:
      os.remove(tmp_path)
    except OSError:
      pass
    raise errors.DataError(
        f'write_idx: cannot write {path!r} ({e.strerror or e}); check that '
        f'the directory exists and is writable.') from e
