"""Draws z from the prior, decodes, and writes a PNG grid: `python -m bin.sample`."""
import os

from absl import app
from absl import flags

from bin import flags as flag_lib
from engine import errors

flags.DEFINE_integer('num_samples', 64, 'Images in the grid (> 0).')
flags.DEFINE_string('output', None, 'PNG path (default: MODEL_DIR/samples.png).')
flags.DEFINE_integer('sample_seed', 1, 'Seed for the prior samples (>= 0).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import tensorflow as tf
  from engine import controller
  from engine import summaries
  fl = flags.FLAGS
  if fl.num_samples <= 0:
    raise errors.ConfigError(f'--num_samples={fl.num_samples}: must be a positive integer.')
  _, _, config = flag_lib.recorded_experiment_config()
  exp = controller.build(config, flag_lib.strategy(), record_config=False)
  if exp.manager.latest_checkpoint is None:
    raise errors.CheckpointError(
        f'--model_dir={config.train.model_dir} has no checkpoint; train first.')
  if not hasattr(exp.model, 'sample'):
    raise errors.ConfigError(
        f'--model={config.model} is not a generative model: bin/sample.py draws from a '
        f'latent prior and decodes (use --model=vae).')
  with controller.evaluation_weights(exp):  # the weight average, if the run kept one
    images = exp.model.sample(fl.num_samples, tf.constant([fl.sample_seed, 3], tf.int32))
  path = fl.output or os.path.join(config.train.model_dir, 'samples.png')
  summaries.write_png(path, summaries.image_grid(images.numpy()))
  print(f'Wrote {fl.num_samples} samples from step {int(exp.step.numpy())} to {path}')


def console_main():
  flag_lib.define_flags()
  flag_lib.run_main(main)


if __name__ == '__main__':
  console_main()
