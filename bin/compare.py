"""Paired comparison of runs on the same test set: `python -m bin.compare
--model_dirs=BASELINE,OTHER[,...]`.

Reads each model dir's test_per_example.npz (written by the final evaluation of
bin/train.py and by bin/evaluate.py, for a VAE or a BNN) and prints every run's
test figures and, for each run after the first, its difference from the first with
the standard error of the per-example differences. Runs scored on different test sets (other data, other
test binarization) are refused.
"""
from absl import app
from absl import flags

from bin import flags as flag_lib
from engine import errors

flags.DEFINE_list('model_dirs', None, 'Model dirs to compare, the baseline first (>= 2).')

# (figure in the file, column name, sign, decimals): a VAE's NLL is its negated
# log-likelihood in nats per image; a BNN's figures are per test example (its
# accuracy is the mean of 'correct', 1 or 0).
_COLUMNS = (('log_likelihood', 'NLL', -1.0, 2), ('elbo', 'ELBO', 1.0, 2),
            ('rate', 'rate', 1.0, 2), ('distortion', 'distortion', 1.0, 2),
            ('nll', 'NLL', 1.0, 4), ('correct', 'accuracy', 1.0, 4),
            ('brier', 'Brier', 1.0, 4), ('squared_error', 'squared error', 1.0, 3))


def compare(model_dirs):
  """The comparison table as lines of text (raises errors.DataError on bad input)."""
  from engine import evaluation
  from engine import metrics
  if not model_dirs or len(model_dirs) < 2:
    raise errors.ConfigError(
        f'--model_dirs={",".join(model_dirs or [])}: give at least two model dirs, '
        f'the baseline first, e.g. --model_dirs=runs/a,runs/b.')
  runs = [(d,) + evaluation.read_per_example(d) for d in model_dirs]
  base_dir, base, base_print, _ = runs[0]
  for d, figures, fingerprint, _ in runs[1:]:
    if fingerprint != base_print:
      raise errors.DataError(
          f'{d} was scored on another test set than {base_dir} (test-set hash '
          f'{fingerprint} against {base_print}): another data set, data dir or '
          f'likelihood. Pair only runs evaluated on the same test images.')
  columns = [c for c in _COLUMNS if all(c[0] in r[1] for r in runs)]
  if not columns:
    raise errors.DataError(f'{", ".join(model_dirs)}: no test figure common to all runs.')
  n = next(iter(base.values())).size
  lines = [f'Paired over {n:,} test examples (test set {base_print}); differences '
           f'are against {base_dir}, +- one standard error of the per-example '
           f'differences.', '']
  header = ['run', 'step'] + [name for _, name, _, _ in columns] + [
      f'{name} diff' for _, name, _, _ in columns]
  lines.append('| ' + ' | '.join(header) + ' |')
  lines.append('|' + ' --- |' * len(header))
  for i, (d, figures, _, step) in enumerate(runs):
    means = [f'{sign * figures[key].mean():.{digits}f}' for key, _, sign, digits in columns]
    if i == 0:
      diffs = ['' for _ in columns]
    else:
      diffs = []
      for key, _, sign, digits in columns:
        mean, stderr = metrics.paired_difference(base[key], figures[key])
        diffs.append(f'{sign * mean:+.{digits}f} +- {stderr:.{digits}f}')
    lines.append('| ' + ' | '.join([d, str(step)] + means + diffs) + ' |')
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  print('\n'.join(compare(flags.FLAGS.model_dirs)))


def console_main():
  flag_lib.run_main(main)


if __name__ == '__main__':
  console_main()
