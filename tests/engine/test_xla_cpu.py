"""engine/xla_cpu.py: the XLA:CPU vector width and YNNPACK fusions, set through XLA_FLAGS."""
import os
import subprocess
import sys
import textwrap

import pytest

from engine import errors
from engine import xla_cpu

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cpuinfo(tmp_path, flags_line):
  path = tmp_path / 'cpuinfo'
  path.write_text(f'processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags_line}\n\n')
  return str(path)


def test_auto_asks_for_512_bit_vectors_on_a_cpu_with_avx512(tmp_path):
  environ = {'XLA_FLAGS': '--xla_dump_to=/tmp/x'}
  width = xla_cpu.configure('auto', environ=environ,
                            cpuinfo_path=_cpuinfo(tmp_path, 'fpu sse2 avx2 avx512f avx512bw'))
  assert width == 512
  assert environ['XLA_FLAGS'] == '--xla_dump_to=/tmp/x --xla_cpu_prefer_vector_width=512'


def test_auto_leaves_xla_alone_without_avx512(tmp_path):
  environ = {}
  # Other AVX-512 extensions are not AVX-512F: the match is on whole flag names, so
  # 'avx512fp16' (which contains 'avx512f') must not count.
  path = _cpuinfo(tmp_path, 'fpu sse2 avx2 avx512_bf16 avx512fp16')
  assert xla_cpu.configure('auto', environ=environ, cpuinfo_path=path) is None
  assert environ == {}
  assert not xla_cpu.cpu_has_avx512(path)
  assert not xla_cpu.cpu_has_avx512(str(tmp_path / 'missing'))


@pytest.mark.parametrize('width', ['256', '512'])
def test_an_explicit_width_is_set_whatever_the_cpu(tmp_path, width):
  environ = {}
  assert xla_cpu.configure(width, environ=environ,
                           cpuinfo_path=_cpuinfo(tmp_path, 'sse2')) == int(width)
  assert environ['XLA_FLAGS'] == f'--xla_cpu_prefer_vector_width={width}'


def test_a_width_already_in_xla_flags_wins(tmp_path):
  environ = {'XLA_FLAGS': '--xla_cpu_prefer_vector_width=256 --xla_cpu_enable_fast_math=false'}
  before = dict(environ)
  assert xla_cpu.configure('512', environ=environ,
                           cpuinfo_path=_cpuinfo(tmp_path, 'avx512f')) == 256
  assert environ == before


def test_default_changes_nothing(tmp_path):
  environ = {'XLA_FLAGS': '--xla_dump_to=/tmp/x'}
  assert xla_cpu.configure('default', environ=environ,
                           cpuinfo_path=_cpuinfo(tmp_path, 'avx512f')) is None
  assert environ == {'XLA_FLAGS': '--xla_dump_to=/tmp/x'}


def test_an_unknown_width_is_a_config_error():
  with pytest.raises(errors.ConfigError, match='--xla_cpu_vector_width=.*1024.*auto'):
    xla_cpu.configure('1024', environ={})


def _compile_in_a_new_process(dump, configure, fn, arg):
  """Runs `configure` (source using xla_cpu) after importing TensorFlow, then compiles
  and calls `fn` on `arg` under XLA in a fresh Python, XLA dumping to `dump`."""
  script = textwrap.dedent(f"""
      import os, sys
      sys.path.insert(0, {_REPO!r})
      import tensorflow as tf
      from engine import xla_cpu
      os.environ['XLA_FLAGS'] = '--xla_dump_to={dump}'
      {configure}
      f = tf.function({fn}, jit_compile=True)
      print(float(tf.reshape(f({arg}), [-1])[0]))
      """)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  env.pop('XLA_FLAGS', None)
  result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert os.listdir(dump)


def test_xla_compiles_with_the_width_set_after_tensorflow_is_imported(tmp_path):
  """The flag only works if XLA reads XLA_FLAGS at its first compilation, not at import."""
  dump = tmp_path / 'dump'
  _compile_in_a_new_process(dump, "assert xla_cpu.configure('512') == 512",
                            'lambda x: tf.exp(x) * 2.0', 'tf.ones([64])')
  options = [p for p in os.listdir(dump) if p.endswith('.debug_options')]
  assert options, sorted(os.listdir(dump))[:10]
  text = (dump / options[0]).read_text()
  assert 'xla_cpu_prefer_vector_width: 512' in text, text


def test_ynn_fusions_are_turned_off_only_when_asked():
  environ = {'XLA_FLAGS': '--xla_dump_to=/tmp/x'}
  assert xla_cpu.configure_ynn_fusions(False, environ=environ) is False
  assert environ['XLA_FLAGS'] == '--xla_dump_to=/tmp/x --xla_cpu_experimental_ynn_fusion_type='
  assert xla_cpu.configure_ynn_fusions(False, environ=environ) is False  # idempotent
  assert environ['XLA_FLAGS'].count('ynn') == 1
  environ = {}
  assert xla_cpu.configure_ynn_fusions(True, environ=environ) is True
  assert environ == {}


@pytest.mark.parametrize('setting,on', [('--xla_cpu_experimental_ynn_fusion_type=reduce', True),
                                        ('--xla_cpu_experimental_ynn_fusion_type=', False)])
def test_a_ynn_setting_already_in_xla_flags_wins(setting, on):
  environ = {'XLA_FLAGS': setting}
  assert xla_cpu.configure_ynn_fusions(not on, environ=environ) is on
  assert environ == {'XLA_FLAGS': setting}


@pytest.mark.parametrize('enabled', [True, False])
def test_xla_makes_ynn_fusions_only_when_they_are_on(tmp_path, enabled):
  """A reduction is a YNNPACK fusion under XLA's default and not once they are off
  (so the flag is the one this XLA reads, and it is read at the first compilation)."""
  dump = tmp_path / 'dump'
  _compile_in_a_new_process(
      dump, f'assert xla_cpu.configure_ynn_fusions({enabled}) is {enabled}',
      'lambda x: tf.reduce_sum(tf.exp(x), axis=1)', 'tf.ones([256, 784])')
  hlo = [p for p in os.listdir(dump) if p.endswith('after_optimizations.txt')]
  assert hlo, sorted(os.listdir(dump))[:10]
  fused = sum((dump / p).read_text().count('__ynn_fusion') for p in hlo)
  assert (fused > 0) == enabled, fused
