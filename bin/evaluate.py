"""Restores the latest checkpoint and writes the test figures to metrics.json (and,
for a VAE, every test example's figures to test_per_example.npz)."""
import json
import time

from absl import app

from bin import flags as flag_lib
from engine import errors


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from engine import controller
  from engine import evaluation
  _, _, config = flag_lib.recorded_experiment_config()
  exp = controller.build(config, flag_lib.strategy(), record_config=False)
  if exp.manager.latest_checkpoint is None:
    raise errors.CheckpointError(
        f'--model_dir={config.train.model_dir} has no checkpoint; train first with '
        f'bin/train.py --model_dir={config.train.model_dir}.')
  started = time.perf_counter()
  metrics = controller.evaluate(exp, final=True)
  seconds = time.perf_counter() - started
  controller.pop_images(exp, metrics, None, int(exp.step.numpy()))
  per_example_path = controller.pop_per_example(exp, metrics, int(exp.step.numpy()))
  metrics.update({'step': int(exp.step.numpy()), 'model': config.model,
                  'dataset': exp.task.name})
  path = controller.write_metrics(config.train.model_dir, metrics)
  print(json.dumps(metrics, indent=2))
  print(exp.module.summary_line(metrics))
  print(f'Evaluated in {seconds:.1f} s ({config.train.eval_iw_samples} importance samples '
        f'per test example; XLA {"on" if evaluation.uses_xla(exp) else "off"}).')
  print(f'Wrote {path}' + (f' and {per_example_path}' if per_example_path else ''))


def console_main():
  flag_lib.define_flags()
  flag_lib.run_main(main)


if __name__ == '__main__':
  console_main()
