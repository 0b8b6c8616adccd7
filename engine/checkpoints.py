"""Checkpoints and the run's recorded config: restore with clear errors, refuse
incompatible model dirs, and never let a bad step overwrite a good checkpoint."""
import json
import os

import tensorflow as tf

from engine import errors

CONFIG_FILE = 'config.json'
# Fields that, if changed, make an existing checkpoint meaningless for this run.
_INCOMPATIBLE = ('model', 'model_options', 'data.dataset', 'train.batch_size', 'train.seed')


def _get(d, dotted):
  for part in dotted.split('.'):
    d = d.get(part, {}) if isinstance(d, dict) else {}
  return d


def _first_difference(before, now, prefix):
  """The dotted name and both values of the first leaf that differs, or None."""
  if isinstance(before, dict) and isinstance(now, dict):
    for key in sorted(set(before) | set(now)):
      found = _first_difference(before.get(key), now.get(key), f'{prefix}.{key}')
      if found:
        return found
    return None
  return None if before == now else (prefix, before, now)


def check_and_record_config(model_dir, config_dict, *, write=True):
  """Refuses a model dir recorded with an incompatible config; records ours.

  Raises:
    CheckpointError: naming the first field that differs and the fix.
  """
  path = os.path.join(model_dir, CONFIG_FILE)
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
      raise errors.CheckpointError(
          f'{path} is unreadable ({e}); it records the run in --model_dir={model_dir}. '
          f'Restore it or use a new --model_dir.') from e
    for field in _INCOMPATIBLE:
      diff = _first_difference(_get(old, field), _get(config_dict, field), field)
      if diff:
        name, before, now = diff
        flag = name.split('.')[-1]
        raise errors.CheckpointError(
            f'--model_dir={model_dir} holds a run with {flag}={before!r} ({name}), but '
            f'this run has {flag}={now!r}; its checkpoint cannot be continued with '
            f'these flags. Use the same flags to resume, or a new --model_dir to start '
            f'over.')
  if write:
    os.makedirs(model_dir, exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(config_dict, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def make_manager(model_dir, *, max_to_keep, **trackables):
  """A CheckpointManager over tf.train.Checkpoint(**trackables) in model_dir/checkpoints."""
  ckpt = tf.train.Checkpoint(**trackables)
  return tf.train.CheckpointManager(ckpt, os.path.join(model_dir, 'checkpoints'),
                                    max_to_keep=max_to_keep)


def restore_latest(manager, *, model_dir):
  """Restores the newest checkpoint if there is one; returns its path or None.

  Raises:
    CheckpointError: the checkpoint belongs to a different model (names or shapes).
  """
  path = manager.latest_checkpoint
  if path is None:
    return None
  try:
    status = manager.checkpoint.restore(path)
    status.assert_existing_objects_matched()
  except (ValueError, AssertionError, tf.errors.OpError) as e:
    first_line = str(e).strip().splitlines()[0][:300]
    raise errors.CheckpointError(
        f'--model_dir={model_dir} holds checkpoint {path} of an incompatible model '
        f'({first_line}). Use the flags it was trained with (see '
        f'{os.path.join(model_dir, CONFIG_FILE)}) or a new --model_dir.') from e
  return path
