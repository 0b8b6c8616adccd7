"""The binaries with --model=bnn, run as subprocesses as a user runs them, and the
BNN flags of bin/flags.py.

Each process pays for a TensorFlow import, so the training run and the bad-flag
cases start together, and evaluate and sample then run side by side.
"""
import dataclasses
import json
import os
import re

from absl.testing import flagsaver
import numpy as np
import pytest
import tensorflow as tf

from bin import compare
from bin import flags as flag_lib
from engine import errors
from engine import evaluation
from models import bnn
from models import vae
from tests.bin.test_binaries import PNG_SIGNATURE
from tests.bin.test_binaries import _finish
from tests.bin.test_binaries import _own_stderr
from tests.bin.test_binaries import _start

# Flags shared by every run on the trained dir: they decide which model is built.
COMMON = ['--model=bnn', '--dataset=synthetic', '--synthetic_train_size=128',
          '--synthetic_test_size=32', '--hidden_sizes=16', '--bnn_layer=flipout',
          '--train_classes=0,1,2,3,4', '--num_mc_samples=3', '--batch_size=16',
          '--eval_batch_size=32', '--steps_per_loop=10', '--eval_every=20',
          '--checkpoint_every=10', '--jit_compile=false']

BAD_FLAGS = {
    'bnn_layer': (['--bnn_layer=bogus'], "error: --bnn_layer='bogus' is not known"),
    'pi': (['--prior=scale_mixture', '--pi=2'], 'error: --pi=2.0'),
}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Trains 20 steps with bin.train while the bad-flag cases run; then evaluate and
  sample on the trained dir. Name -> (returncode, stdout, stderr), and the dir."""
  base = tmp_path_factory.mktemp('bnn_bin')
  model_dir = str(base / 'run')
  procs = {'train': _start('bin.train', f'--model_dir={model_dir}', '--train_steps=20',
                           *COMMON)}
  for name, (args, _) in BAD_FLAGS.items():
    procs[name] = _start('bin.train', f'--model_dir={base / name}', '--train_steps=20',
                         *COMMON, *args)
  results = {name: _finish(proc) for name, proc in procs.items()}
  if results['train'][0] == 0:
    os.remove(os.path.join(model_dir, 'metrics.json'))
    # The training run's per-example figures, kept aside to pair with evaluate's.
    (base / 'at_training').mkdir()
    os.replace(os.path.join(model_dir, 'test_per_example.npz'),
               base / 'at_training' / 'test_per_example.npz')
    # evaluate without the training flags: they come from the dir's config.json.
    later = {'evaluate': _start('bin.evaluate', f'--model_dir={model_dir}',
                                '--num_mc_samples=4'),
             'sample': _start('bin.sample', f'--model_dir={model_dir}', *COMMON)}
    results.update({name: _finish(proc) for name, proc in later.items()})
  return model_dir, results


def test_train_binary(runs):
  """bin.train --model=bnn exits 0, prints the BNN's test figures, and leaves the
  checkpoint, config.json and the two figures behind."""
  model_dir, results = runs
  code, stdout, stderr = results['train']
  assert code == 0, stderr[-3000:]
  assert 'Traceback' not in stdout + stderr
  assert re.search(r'step +20/20', stdout)
  assert 'test accuracy' in stdout and 'OOD AUROC' in stdout
  assert tf.train.latest_checkpoint(os.path.join(model_dir, 'checkpoints')).endswith('ckpt-20')
  with open(os.path.join(model_dir, 'config.json')) as f:
    recorded = json.load(f)
  assert recorded['model'] == 'bnn'
  assert recorded['model_options']['hidden_sizes'] == [16]
  assert recorded['model_options']['train_classes'] == [0, 1, 2, 3, 4]
  assert recorded['model_options']['bnn_layer'] == 'flipout'
  for name in ('reliability_diagram.png', 'rotated_test.png'):
    with open(os.path.join(model_dir, name), 'rb') as f:
      assert f.read(8) == PNG_SIGNATURE, name
  assert 'test_per_example.npz (compare runs with bin/compare.py)' in stdout


def test_train_and_evaluate_write_per_example_figures_that_pair(runs):
  """Both the training run's final evaluation and bin.evaluate write every test
  example's nll, correct and brier, whose means are metrics.json's figures, and
  bin.compare pairs the two evaluations of the same checkpoint."""
  model_dir, results = runs
  assert results['evaluate'][0] == 0, results['evaluate'][2][-3000:]
  at_training = os.path.join(os.path.dirname(model_dir), 'at_training')
  figures, _, step = evaluation.read_per_example(model_dir)
  with open(os.path.join(model_dir, 'metrics.json')) as f:
    metrics = json.load(f)
  assert step == 20 and sorted(figures) == ['brier', 'correct', 'nll']
  assert figures['nll'].shape == (metrics['num_examples'],)
  assert set(np.unique(figures['correct'])) <= {0.0, 1.0}
  for name, key in (('nll', 'nll'), ('correct', 'accuracy'), ('brier', 'brier')):
    assert figures[name].mean() == pytest.approx(metrics[key], rel=1e-5), name
  lines = compare.compare([at_training, model_dir])
  assert lines[0].startswith(f'Paired over {metrics["num_examples"]:,} test examples')
  assert lines[2].startswith('| run | step | NLL | accuracy | Brier | NLL diff')
  assert lines[5].split(' | ')[1] == '20'


def test_evaluate_binary_writes_metrics(runs):
  """bin.evaluate, given only --model_dir and --num_mc_samples (an evaluation field
  that may differ from training's), rewrites metrics.json (valid JSON, no images)
  with the accuracy and the OOD figures of the step-20 checkpoint."""
  model_dir, results = runs
  code, stdout, stderr = results['evaluate']
  assert code == 0, stderr[-3000:]
  metrics_path = os.path.join(model_dir, 'metrics.json')
  assert f'Wrote {metrics_path}' in stdout
  with open(metrics_path) as f:
    metrics = json.load(f)
  assert metrics['step'] == 20 and metrics['model'] == 'bnn'
  assert metrics['num_mc_samples'] == 4  # the flag given to evaluate, not the record's 3
  assert 0.0 <= metrics['accuracy'] <= 1.0
  assert np.isfinite(metrics['nll'])
  assert 0.0 <= metrics['ood/held_out_classes_mutual_information_auroc'] <= 1.0
  assert 'images' not in metrics


def test_sample_binary_refuses_a_bnn(runs):
  """bin.sample --model=bnn exits 2 with one 'error:' line saying it needs a
  generative model; no traceback."""
  _, results = runs
  code, _, stderr = results['sample']
  own = _own_stderr(stderr)
  assert code == 2, stderr[-3000:]
  assert own.startswith('error: --model=bnn is not a generative model'), own[-3000:]
  assert '--model=vae' in own
  assert 'Traceback' not in stderr


@pytest.mark.parametrize('case', sorted(BAD_FLAGS))
def test_bad_bnn_flags_exit_2_with_message(runs, case):
  """A bad BNN flag value exits with code 2 and an 'error:' message naming the flag."""
  _, results = runs
  code, _, stderr = results[case]
  own = _own_stderr(stderr)
  assert code == 2, stderr[-3000:]
  assert own.startswith(BAD_FLAGS[case][1]), own[-3000:]
  assert 'Traceback' not in stderr


# ---------------------------------------------------------------------------------
# The flag definitions, in process (no parsing of a command line).


@pytest.fixture(scope='module')
def parsed_flags():
  """The binaries' flags with their defaults (defined once per process)."""
  flag_lib.define_flags()
  if not flag_lib.FLAGS.is_parsed():
    flag_lib.FLAGS.mark_as_parsed()
  return flag_lib.FLAGS


def test_every_bnn_field_has_a_flag_with_its_default(parsed_flags):
  """One flag per BNNConfig field, with the field's default: the defaults build
  BNNConfig() and, since VAEConfig takes only its own fields, VAEConfig()."""
  for field in dataclasses.fields(bnn.BNNConfig):
    assert field.name in parsed_flags, field.name
  assert flag_lib.model_options(bnn.BNNConfig) == bnn.BNNConfig()
  assert flag_lib.model_options(vae.VAEConfig) == vae.VAEConfig()
  assert parsed_flags['hidden_sizes'].default == ['400', '400']
  assert parsed_flags['train_classes'].default == []


def test_shared_flags_help_names_both_models(parsed_flags):
  help_ = parsed_flags['architecture'].help
  for value in ('mlp', 'conv', 'lenet', 'vae', 'bnn'):
    assert value in help_, value
  assert 'BNN' in parsed_flags['kl_warmup_steps'].help
  for name, words in (('bnn_layer', bnn.LAYERS), ('prior', bnn.PRIORS),
                      ('task', bnn.TASKS), ('kl_schedule', ('uniform', 'blundell'))):
    for word in words:
      assert word in parsed_flags[name].help, (name, word)
  assert '(0, 1)' in parsed_flags['pi'].help


def test_a_bad_list_entry_names_the_flag(parsed_flags):
  """A non-integer entry of a list flag is refused naming the flag (ConfigError,
  which the binaries print as 'error: ...' with exit code 2)."""
  saved = list(parsed_flags.hidden_sizes)
  try:
    parsed_flags.hidden_sizes = ['16', 'x']
    with pytest.raises(errors.ConfigError, match='--hidden_sizes=16,x'):
      flag_lib.model_options(bnn.BNNConfig)
  finally:
    parsed_flags.hidden_sizes = saved
  assert flag_lib.model_options(bnn.BNNConfig).hidden_sizes == (400, 400)


def test_posterior_scale_flag_reaches_bnn_config(parsed_flags):
  """--posterior_scale maps into BNNConfig like --posterior_rho_init, and a value
  outside variational.POSTERIOR_SCALES is refused by BNNConfig naming the flag."""
  from models import variational  # pylint: disable=import-outside-toplevel
  assert parsed_flags['posterior_scale'].default == 'softplus'
  with flagsaver.flagsaver(posterior_scale='exp', posterior_rho_init=-4.0):
    options = flag_lib.model_options(bnn.BNNConfig)
    assert options.posterior_scale == 'exp' and options.posterior_rho_init == -4.0
    assert options.posterior_scale in variational.POSTERIOR_SCALES
  with flagsaver.flagsaver(posterior_scale='sigmoid'):
    with pytest.raises(errors.ConfigError, match="--posterior_scale='sigmoid'"):
      flag_lib.model_options(bnn.BNNConfig)
  assert flag_lib.model_options(bnn.BNNConfig) == bnn.BNNConfig()
