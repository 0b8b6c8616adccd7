"""Trains a model: `python -m bin.train --model_dir=DIR [flags]`. Rerun to resume: a
dir that records a run continues it, with the recorded value of every flag not given."""
from absl import app

from bin import flags as flag_lib


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from engine import controller
  path, changed, config = flag_lib.recorded_experiment_config()
  if path:
    taken = ', '.join(f'--{name}={",".join(value) if isinstance(value, list) else value}'
                      for name, value in sorted(changed.items()))
    print(f'Continuing the run recorded in {path}; flags not given take its values'
          + (f', which differ from the defaults: {taken}.' if taken else '.'), flush=True)
  controller.train(config, flag_lib.strategy())


def console_main():
  flag_lib.define_flags()
  flag_lib.run_main(main)


if __name__ == '__main__':
  console_main()
