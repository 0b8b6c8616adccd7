"""Tests of the absl binaries (bin/train.py, bin/evaluate.py, bin/sample.py) run as
subprocesses, as a user runs them.

Each process pays for a TensorFlow import (seconds), so runs are few and tiny, and
the error cases run in parallel.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from engine import idx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 240
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'

# Flags shared by every run on the trained dir: they decide which model is built.
COMMON = ['--dataset=synthetic', '--synthetic_train_size=128', '--synthetic_test_size=32',
          '--encoder_sizes=32', '--decoder_sizes=32', '--latent_dim=4', '--batch_size=32',
          '--eval_batch_size=32', '--iw_chunk_size=2', '--steps_per_loop=10',
          '--eval_every=10', '--checkpoint_every=10', '--jit_compile=false']

# TensorFlow's native (C++) logger writes a few lines to stderr at import, whatever
# TF_CPP_MIN_LOG_LEVEL says; they are not the binary's output.
_NATIVE_LOG = re.compile(
    r'^(WARNING: All log messages before absl::InitializeLog\(\) is called are written '
    r'to STDERR|[IWEF]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] .*)$')


def _env():
  env = dict(os.environ)
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  env.pop('ELBO_DATA_DIR', None)
  return env


def _start(module, *args):
  return subprocess.Popen([sys.executable, '-m', module, *args], cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc):
  stdout, stderr = proc.communicate(timeout=TIMEOUT)
  return proc.returncode, stdout, stderr


def _run(module, *args):
  return _finish(_start(module, *args))


def _own_stderr(stderr):
  """stderr without TensorFlow's native log lines."""
  return '\n'.join(line for line in stderr.splitlines() if not _NATIVE_LOG.match(line))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A model dir trained for 20 steps by bin.train; (dir, returncode, stdout, stderr).

  Its MLP has relu units (--nogated_units, not the default), which bin.evaluate and
  bin.sample, not given the flag, must take from the dir's config.json to restore
  the checkpoint."""
  model_dir = str(tmp_path_factory.mktemp('bin_train') / 'run')
  code, stdout, stderr = _run('bin.train', f'--model_dir={model_dir}', '--train_steps=20',
                              '--eval_iw_samples=4', '--nogated_units', *COMMON)
  return model_dir, code, stdout, stderr


def _idx_dir(directory):
  """A complete four-file IDX set whose training images file is truncated."""
  directory.mkdir()
  rng = np.random.default_rng(0)
  idx.write_idx(str(directory / 'train-images-idx3-ubyte'),
                rng.integers(0, 256, (40, 8, 8), dtype=np.uint8))
  idx.write_idx(str(directory / 'train-labels-idx1-ubyte'), np.arange(40, dtype=np.uint8))
  idx.write_idx(str(directory / 't10k-images-idx3-ubyte'),
                rng.integers(0, 256, (8, 8, 8), dtype=np.uint8))
  idx.write_idx(str(directory / 't10k-labels-idx1-ubyte'), np.arange(8, dtype=np.uint8))
  path = directory / 'train-images-idx3-ubyte'
  content = path.read_bytes()
  path.write_bytes(content[:-17])
  return str(directory)


@pytest.fixture(scope='module')
def failures(tmp_path_factory):
  """Runs every bad-flag case at once; case name -> (returncode, stdout, stderr)."""
  base = tmp_path_factory.mktemp('bin_errors')
  data_dir = _idx_dir(base / 'idx')
  small = ['--dataset=synthetic', '--synthetic_train_size=64', '--synthetic_test_size=16',
           '--encoder_sizes=8', '--decoder_sizes=8', '--latent_dim=2', '--batch_size=16',
           '--train_steps=10', '--steps_per_loop=10', '--eval_every=10',
           '--checkpoint_every=10', '--eval_iw_samples=2', '--iw_chunk_size=2',
           '--eval_batch_size=16', '--jit_compile=false']
  cases = {
      'batch_size': [*small, '--batch_size=0'],
      'posterior': [*small, '--posterior=foo'],
      'dataset': [*small, '--dataset=nope'],
      'decoder': [*small, '--decoder=autoregressive', '--likelihood=gaussian'],
      'latent_prior': [*small, '--latent_prior=vamp'],
      'pixelcnn_kernel': [*small, '--decoder=pixelcnn', '--pixelcnn_kernel=4'],
      'mnist_without_data_dir': [*small, '--dataset=mnist'],
      'truncated_idx': [*small, '--dataset=idx', f'--data_dir={data_dir}'],
  }
  procs = {name: _start('bin.train', f'--model_dir={base / name}', *args)
           for name, args in cases.items()}
  return {name: _finish(proc) for name, proc in procs.items()}


def test_train_binary(trained):
  """bin.train exits 0, reports the test figures and how to view TensorBoard, and
  leaves checkpoints, config.json and metrics.json behind."""
  model_dir, code, stdout, stderr = trained
  assert code == 0, stderr[-3000:]
  out = stdout + stderr  # absl may route logging either way; print() goes to stdout
  assert 'test elbo' in stdout
  assert f'tensorboard --logdir {model_dir}' in stdout
  assert 'Traceback' not in out
  assert re.search(r'step +20/20', stdout)
  with open(os.path.join(model_dir, 'metrics.json')) as f:
    metrics = json.load(f)
  assert metrics['step'] == 20 and metrics['iw_samples'] == 4
  assert np.isfinite(metrics['nll'])
  assert tf.train.latest_checkpoint(os.path.join(model_dir, 'checkpoints')).endswith('ckpt-20')
  with open(os.path.join(model_dir, 'config.json')) as f:
    recorded = json.load(f)
  assert recorded['model_options']['latent_dim'] == 4
  assert recorded['model_options']['encoder_sizes'] == [32]
  assert recorded['model_options']['gated_units'] is False
  assert recorded['train']['jit_compile'] is False


def test_evaluate_and_sample_binaries(trained, tmp_path):
  """bin.evaluate rewrites metrics.json from the checkpoint (with its own importance
  sample count) and bin.sample, given only --model_dir and its own flags, writes a
  PNG grid of the requested size."""
  model_dir, code, _, stderr = trained
  assert code == 0, stderr[-3000:]
  metrics_path = os.path.join(model_dir, 'metrics.json')
  os.remove(metrics_path)
  # The training run's per-example figures, kept aside to compare with evaluate's.
  per_example = os.path.join(model_dir, 'test_per_example.npz')
  (tmp_path / 'at_training').mkdir()
  os.replace(per_example, tmp_path / 'at_training' / 'test_per_example.npz')
  output = str(tmp_path / 'grid.png')
  evaluate = _start('bin.evaluate', f'--model_dir={model_dir}', '--eval_iw_samples=6',
                    *COMMON)
  # Without the training flags: bin.sample takes them from the dir's config.json.
  sample = _start('bin.sample', f'--model_dir={model_dir}', f'--output={output}',
                  '--num_samples=6')
  code, stdout, stderr = _finish(evaluate)
  assert code == 0, stderr[-3000:]
  assert f'Wrote {metrics_path} and {per_example}' in stdout
  with open(metrics_path) as f:
    metrics = json.load(f)
  assert metrics['step'] == 20
  assert metrics['iw_samples'] == 6
  assert metrics['num_examples'] == 32
  assert metrics['dataset'] == 'synthetic'
  for key in ('elbo', 'nll', 'log_likelihood_stderr'):
    assert np.isfinite(metrics[key]), key
  compare = _start('bin.compare', f'--model_dirs={tmp_path / "at_training"},{model_dir}')
  compare_one = _start('bin.compare', f'--model_dirs={model_dir}')

  code, stdout, stderr = _finish(sample)
  assert code == 0, stderr[-3000:]
  assert f'Wrote 6 samples from step 20 to {output}' in stdout
  with open(output, 'rb') as f:
    content = f.read()
  assert content[:8] == PNG_SIGNATURE
  image = tf.io.decode_png(content).numpy()
  assert image.shape == (2 * 28, 3 * 28, 1)  # 6 images in 3 columns, 2 rows
  assert image.dtype == np.uint8 and image.max() > 0

  # bin.compare pairs the two evaluations of one checkpoint on the same 32 examples.
  code, stdout, stderr = _finish(compare)
  assert code == 0, stderr[-3000:]
  assert 'Paired over 32 test examples' in stdout
  rows = [line for line in stdout.splitlines() if line.startswith(('| /', '| ' + model_dir))]
  assert len(rows) == 2 and all(' | 20 | ' in row for row in rows), stdout
  assert f'{metrics["nll"]:.2f}' in rows[1]
  code, stdout, stderr = _finish(compare_one)
  assert code == 2 and 'Traceback' not in stderr
  assert 'give at least two model dirs' in _own_stderr(stderr)


def _refused(module, *args):
  """Runs a binary that must refuse its input: exit 2, `error: ...`, no traceback.
  Returns its own stderr."""
  code, _, stderr = _run(module, *args)
  assert code == 2, stderr[-3000:]
  assert 'Traceback' not in stderr
  own = _own_stderr(stderr)
  assert own.startswith('error:'), stderr[-3000:]
  return own


def test_evaluate_refuses_incompatible_flags(trained):
  """bin.evaluate with another latent_dim exits 2 naming the field, no traceback."""
  model_dir, code, _, stderr = trained
  assert code == 0, stderr[-3000:]
  flags = [f for f in COMMON if not f.startswith('--latent_dim')]
  own = _refused('bin.evaluate', f'--model_dir={model_dir}', '--latent_dim=5',
                 '--eval_iw_samples=2', *flags)
  assert 'latent_dim=4' in own and 'latent_dim=5' in own


def test_train_resumes_with_the_recorded_flags(trained, tmp_path):
  """Rerun with only --model_dir and a later --train_steps, bin.train continues the
  run with the flags recorded in config.json: relu units although gated units are
  the MLP's default now, the fixture's sizes and synthetic data. It says which
  recorded values differ from the defaults, and trains to step 30."""
  model_dir, code, _, stderr = trained
  assert code == 0, stderr[-3000:]
  copy = str(tmp_path / 'run')
  shutil.copytree(model_dir, copy)
  code, stdout, stderr = _run('bin.train', f'--model_dir={copy}', '--train_steps=30')
  assert code == 0, stderr[-3000:]
  line = next(line for line in stdout.splitlines() if line.startswith('Continuing'))
  assert f'recorded in {os.path.join(copy, "config.json")}' in line
  for taken in ('--gated_units=False', '--latent_dim=4', '--encoder_sizes=32',
                '--dataset=synthetic', '--jit_compile=False'):
    assert taken in line, line
  assert '--train_steps' not in line  # given on the command line: it wins
  assert re.search(r'step +30/30', stdout)
  assert tf.train.latest_checkpoint(os.path.join(copy, 'checkpoints')).endswith('ckpt-30')
  with open(os.path.join(copy, 'config.json')) as f:
    recorded = json.load(f)
  assert recorded['model_options']['gated_units'] is False
  assert recorded['train']['train_steps'] == 30


def test_train_refuses_an_explicit_flag_that_changes_the_model(trained):
  """An explicit --gated_units on the fixture's relu run is refused (exit 2): the
  message names the field, says to resume with --nogated_units (the default that
  changed in session 23), and the checkpoint stays the latest."""
  model_dir, code, _, stderr = trained
  assert code == 0, stderr[-3000:]
  own = _refused('bin.train', f'--model_dir={model_dir}', '--train_steps=30',
                 '--gated_units')
  assert 'gated_units=False' in own and 'resume it with --nogated_units' in own
  latest = tf.train.latest_checkpoint(os.path.join(model_dir, 'checkpoints'))
  assert latest.endswith('ckpt-20')


@pytest.mark.parametrize('case,expected', [
    ('batch_size', 'error: --batch_size=0'),
    ('posterior', "error: --posterior='foo' is not known"),
    ('dataset', "error: --dataset='nope' is not known"),
    ('decoder', 'error: --decoder=autoregressive models binary pixels'),
    ('latent_prior', 'error: --kl=analytic needs --latent_prior=normal'),
    ('pixelcnn_kernel', 'error: --pixelcnn_kernel=4: must be an odd integer'),
])
def test_bad_flags_exit_2_with_message(failures, case, expected):
  """A bad flag value exits with code 2 and a one-line 'error:' message naming the
  flag, without a Python traceback."""
  code, _, stderr = failures[case]
  own = _own_stderr(stderr)
  assert code == 2, stderr[-3000:]
  assert own.startswith(expected), own[-3000:]
  assert 'Traceback' not in stderr


def test_mnist_without_data_dir(failures):
  """--dataset=mnist with no data dir exits 2 and says to pass --data_dir."""
  code, _, stderr = failures['mnist_without_data_dir']
  own = _own_stderr(stderr)
  assert code == 2, stderr[-3000:]
  assert own.startswith("error: dataset='mnist'"), own[-3000:]
  assert '--data_dir' in own
  assert 'Traceback' not in stderr


def test_truncated_idx_file(failures):
  """A truncated IDX file exits 2 with a message naming that file."""
  code, _, stderr = failures['truncated_idx']
  own = _own_stderr(stderr)
  assert code == 2, stderr[-3000:]
  assert own.startswith('error:'), own[-3000:]
  assert 'train-images-idx3-ubyte' in own
  assert 'truncated' in own
  assert 'Traceback' not in stderr


def test_train_mirrored_over_two_logical_cpus(tmp_path):
  """`--strategy=mirrored --num_cpu_devices=2` with the default --jit_compile trains on 2
  replicas (per-replica XLA is switched off there, with a note) and writes metrics."""
  model_dir = str(tmp_path / 'mirrored')
  flags = [f for f in COMMON if not f.startswith('--jit_compile')]
  code, stdout, stderr = _run('bin.train', f'--model_dir={model_dir}', '--train_steps=10',
                              '--eval_iw_samples=0', '--strategy=mirrored',
                              '--num_cpu_devices=2', *flags)
  assert code == 0, _own_stderr(stderr)[-2000:]
  assert 'on 2 replica(s)' in stdout
  assert 'XLA is off' in stdout
  assert os.path.exists(os.path.join(model_dir, 'metrics.json'))
