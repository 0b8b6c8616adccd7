"""XLA's CPU code generation: the vector width of compiled loops, and YNNPACK fusions.

XLA:CPU asks LLVM for 256-bit vectors by default, even on a CPU with AVX-512. The
element-wise work of a step (weight noise, the posterior scale, the KL, Adam) then
runs at half the lanes the CPU has. On the 2-core AVX-512 machine of
benchmarks/RESULTS.md ("Session 7"), 512-bit vectors made one weight sample of the
BNN MLP (477,600 normals, `benchmarks/rng.py`) 0.96 -> 0.61 ms and the variational
MLP's training step about 1.3x faster (`benchmarks/bnn_throughput.py`), with the
deterministic network's (matmul-bound) step within its run-to-run spread.

XLA reads `XLA_FLAGS` once, when it first compiles, so `configure` must run before
the first XLA compilation of the process (bin/ calls it where it resolves the
strategy). It never overrides a width already in `XLA_FLAGS`.

`configure_ynn_fusions(False)` turns off the YNNPACK fusions XLA:CPU makes by
default (in TF 2.21 they took, among others, the sums over pixels and batch and the
bias gradients). On the 2-core AVX-512 machine of benchmarks/RESULTS.md ("Session
28"), without them the relu VAE's XLA training step ran 1.01-1.42x as fast at batch
2048 in six alternated pairs of runs, but no faster at batch 128 (the default), nor
the gated default's in bin.train; so bin/ keeps XLA's default unless asked
(`--noxla_cpu_ynn_fusions`).
"""
import os

from engine import errors

VECTOR_WIDTHS = ('auto', 'default', '256', '512')
_FLAG = '--xla_cpu_prefer_vector_width'
_YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type'


def cpu_has_avx512(cpuinfo_path='/proc/cpuinfo'):
  """Whether the CPU reports AVX-512F (Linux `/proc/cpuinfo`; False if unreadable)."""
  try:
    with open(cpuinfo_path, encoding='utf-8', errors='replace') as f:
      for line in f:
        if line.startswith('flags'):
          return 'avx512f' in line.split(':', 1)[-1].split()
  except OSError:
    pass
  return False


def _value_in(xla_flags, flag):
  """The value `flag` has in the XLA_FLAGS string (None when it is not there)."""
  for token in xla_flags.split():
    if token == flag or token.startswith(flag + '='):
      return token.partition('=')[2]
  return None


def configure(vector_width='auto', *, environ=None, cpuinfo_path='/proc/cpuinfo'):
  """Adds `--xla_cpu_prefer_vector_width` to XLA_FLAGS for the rest of the process.

  Args:
    vector_width: 'auto' (512 on a CPU with AVX-512F, else XLA's default),
      'default' (leave XLA's choice), '256' or '512'.
    environ: the environment to change (os.environ when None).
    cpuinfo_path: where 'auto' looks for the CPU's flags.

  Returns:
    The width now requested in XLA_FLAGS as an int, or None when XLA's default is
    left in place. A width the user already put in XLA_FLAGS wins and is returned.

  Raises:
    errors.ConfigError: an unknown `vector_width`.
  """
  if vector_width not in VECTOR_WIDTHS:
    raise errors.ConfigError(
        f'--xla_cpu_vector_width={vector_width!r} is not known; choose one of: '
        f'{", ".join(VECTOR_WIDTHS)}.')
  environ = os.environ if environ is None else environ
  current = environ.get('XLA_FLAGS', '')
  value = _value_in(current, _FLAG)
  if value is not None:
    return int(value) if value.isdigit() else None
  if vector_width == 'default':
    return None
  if vector_width == 'auto':
    if not cpu_has_avx512(cpuinfo_path):
      return None
    vector_width = '512'
  environ['XLA_FLAGS'] = f'{current} {_FLAG}={vector_width}'.strip()
  return int(vector_width)


def configure_ynn_fusions(enabled=True, *, environ=None):
  """Leaves XLA:CPU's YNNPACK fusions on (`enabled`) or turns them off, through
  XLA_FLAGS, for the rest of the process (before its first XLA compilation).

  A `--xla_cpu_experimental_ynn_fusion_type` already in XLA_FLAGS wins.

  Returns:
    Whether YNNPACK fusions stay on: XLA's default, or a non-empty type list in
    XLA_FLAGS.
  """
  environ = os.environ if environ is None else environ
  current = environ.get('XLA_FLAGS', '')
  value = _value_in(current, _YNN_FLAG)
  if value is not None:
    return bool(value)
  if enabled:
    return True
  environ['XLA_FLAGS'] = f'{current} {_YNN_FLAG}='.strip()
  return False
