"""Trains a model: `python -m bin.train --model_dir=DIR [flags]`. Rerun to resume."""
from absl import app

from bin import flags as flag_lib


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from engine import controller
  config = flag_lib.experiment_config()
  controller.train(config, flag_lib.strategy())


def console_main():
  flag_lib.define_flags()
  flag_lib.run_main(main)


if __name__ == '__main__':
  console_main()
