"""Model registry: name -> the model's module.

Each module provides:
- `Config`: a frozen dataclass of the model's options (field names = flag names);
- `prepare_data(config, dataset, *, data_config, seed)` -> `engine.inputs.TaskData`;
- `build(config, *, task_data, seed, global_batch_size)` -> a tf.Module with
  `train_terms(batch, *, noise, step, shared_noise=None)` and `measurement_keys` (see
  `engine.step.make_replica_step`);
- `evaluate(exp, *, final)` -> metrics dict, `summary_line(metrics)` -> str, and
  `write_summaries(exp, writers, step)` (TensorBoard images / histograms).
"""
from engine import errors
from models import bnn
from models import vae

MODELS = {
    'vae': vae,
    'bnn': bnn,
}


def get(name):
  """The module registered under a model name."""
  if name not in MODELS:
    raise errors.ConfigError(
        f'--model={name!r} is not known; choose one of: {", ".join(MODELS)}.')
  return MODELS[name]
