"""Checkpoints and the run's recorded config: restore with clear errors, refuse
incompatible model dirs, and never let a bad step overwrite a good checkpoint.

What a save guarantees (read from TF 2.21's `checkpoint_management.py`,
`functional_saver.py` and the tensor bundle writer, and confirmed with strace):

1. Each shard is written to `ckpt-N_temp/part-*.{data-*,index}.tempstate<random>`
   and renamed within that directory.
2. `MergeV2Checkpoints` renames the data shards to `ckpt-N.data-*`, then writes
   `ckpt-N.index` *in place* (open with O_TRUNC, write, close): the data/index pair
   is not written atomically.
3. Only afterwards does `CheckpointManager` rewrite the `checkpoint` state file,
   atomically (temp file + rename), to name ckpt-N as the latest; it rewrites it
   again after deleting checkpoints beyond max_to_keep.

So a process killed mid-save (SIGKILL, OOM) leaves the state file naming the old
latest checkpoint, which is complete; the debris (`ckpt-N_temp/`, a `ckpt-N.data-*`
without a full `ckpt-N.index`) is never referenced; the next save of step N
replaces those files (stray `*.tempstate*` files in `ckpt-N_temp/` are safe to
delete). The gap: nothing is fsynced. After a machine crash or power loss,
or on a file system without ordered writes, the renamed state file can survive
while the newest checkpoint's data or index is truncated or zero-filled; likewise
a checkpoint dir copied partially. `restore_latest` covers that gap: it checks the
files (every tensor's size and CRC32C) before restoring, falls back to the previous
checkpoint with a warning, and moves the bad files aside to
`<file>.corrupt-<YYYYmmdd-HHMMSS>` (renamed, never deleted) and out of the
manager's list and state file, so later saves can neither sweep away the good
checkpoint in its favour nor collide with it. Evaluation and sampling, which also
restore through it, move bad files aside the same way. It assumes, as
CheckpointManager does, that one process at a time writes the checkpoint dir. The
check reads the checkpoint once more than a bare restore does.
"""
import copy
import json
import os
import time

import tensorflow as tf

from engine import errors

CONFIG_FILE = 'config.json'
# Fields that, if changed, make an existing checkpoint meaningless for this run
# ('model_options' is every model field, e.g. the BNN's posterior_scale).
_INCOMPATIBLE = ('model', 'model_options', 'data.dataset', 'train.batch_size', 'train.seed',
                 'train.precision', 'train.lr_schedule')
# Fields added after runs were recorded: a config.json without one ran with this value.
# Filled in only where this run's config has the field: posterior_scale is a field of
# the BNN's model_options, which a VAE's never has.
_VALUE_BEFORE_FIELD_EXISTED = {'train.precision': 'float32', 'train.lr_schedule': 'constant',
                               'model_options.posterior_scale': 'softplus',
                               'model_options.decoder': 'factorized',
                               'model_options.latent_prior': 'normal',
                               'model_options.prior_components': 100,
                               'model_options.activation': 'relu',
                               'model_options.pixelcnn_filters': 32,
                               'model_options.pixelcnn_kernel': 7,
                               'model_options.pixelcnn_layers': 1,
                               'model_options.pixelcnn_logit_window': 0,
                               'model_options.pixelcnn_latent_maps': 0,
                               'model_options.decoder_dropout': 0.0,
                               'model_options.pixelcnn_maps_rank': 0,
                               'model_options.gated_units': False,
                               'model_options.top_latent_dim': 16,
                               'model_options.top_units': 256,
                               'model_options.top_prior': 'normal'}
# Defaults that changed: a run recorded with the old default, resumed without the
# flag, now differs in this field; the error says how to resume it.
# {dotted name: (recorded value, this run's value, what to add to the error)}.
_DEFAULT_CHANGED = {
    'model_options.gated_units': (
        False, True, ' Gated units became the MLP\'s default in session 23 (commit '
        '449de02); this run has relu units: resume it with --nogated_units.')}


def _default_changed_hint(name, before, now):
  """The hint for a difference that a changed default explains, else ''."""
  old_default, new_default, hint = _DEFAULT_CHANGED.get(name, (None, None, ''))
  return hint if (before, now) == (old_default, new_default) else ''


def _get(d, dotted):
  for part in dotted.split('.'):
    d = d.get(part, {}) if isinstance(d, dict) else {}
  return d


def _parent(d, dotted):
  """(the dict holding the leaf named `dotted`, the leaf's key); the dict is None
  when a parent is missing."""
  *parents, leaf = dotted.split('.')
  for part in parents:
    d = d.get(part) if isinstance(d, dict) else None
  return (d if isinstance(d, dict) else None), leaf


def with_fields_added_later(recorded, applies):
  """A copy of the recorded config dict in which each field of
  _VALUE_BEFORE_FIELD_EXISTED that it lacks holds the value the recorded run ran
  with, where `applies(dotted name)` says the field belongs to the run's model (a
  VAE's model_options never have the BNN's posterior_scale)."""
  recorded = copy.deepcopy(recorded)
  for dotted, value in _VALUE_BEFORE_FIELD_EXISTED.items():
    if not applies(dotted):
      continue
    d, leaf = _parent(recorded, dotted)
    if d is not None and leaf not in d:
      d[leaf] = value
  return recorded


def _first_difference(before, now, prefix):
  """The dotted name and both values of the first leaf that differs, or None."""
  if isinstance(before, dict) and isinstance(now, dict):
    for key in sorted(set(before) | set(now)):
      found = _first_difference(before.get(key), now.get(key), f'{prefix}.{key}')
      if found:
        return found
    return None
  return None if before == now else (prefix, before, now)


def read_recorded_config(model_dir):
  """The config dict recorded in MODEL_DIR/config.json, or None when there is none.

  Raises:
    CheckpointError: the file exists but is not readable JSON.
  """
  path = os.path.join(model_dir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
    raise errors.CheckpointError(
        f'{path} is unreadable ({e}); it records the run in --model_dir={model_dir}. '
        f'Restore it or use a new --model_dir.') from e


def _without(d, dotted_names):
  """A deep copy of the nested dict `d` without the leaves named `dotted_names`."""
  d = copy.deepcopy(d)
  for dotted in dotted_names:
    node, leaf = _parent(d, dotted)
    if node is not None:
      node.pop(leaf, None)
  return d


def check_and_record_config(model_dir, config_dict, *, write=True, exempt=()):
  """Refuses a model dir recorded with an incompatible config; records ours.

  Args:
    exempt: dotted names of fields that only shape evaluation (e.g. a BNN's
      `model_options.num_mc_samples`): they may differ from the record.

  Raises:
    CheckpointError: naming the first field that differs and the fix.
  """
  old = read_recorded_config(model_dir)
  if old is not None:
    old = _without(with_fields_added_later(
        old, lambda dotted: _get(config_dict, dotted) != {}), exempt)
    now = _without(config_dict, exempt)
    for field in _INCOMPATIBLE:
      diff = _first_difference(_get(old, field), _get(now, field), field)
      if diff:
        name, before, now_value = diff
        flag = name.split('.')[-1]
        raise errors.CheckpointError(
            f'--model_dir={model_dir} holds a run with {flag}={before!r} ({name}), but '
            f'this run has {flag}={now_value!r}; its checkpoint cannot be continued with '
            f'these flags. Use the same flags to resume, or a new --model_dir to start '
            f'over.' + _default_changed_hint(name, before, now_value))
  if write:
    path = os.path.join(model_dir, CONFIG_FILE)
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


def _first_line(e):
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else type(e).__name__


def unreadable_reason(path):
  """Why the checkpoint at prefix `path` cannot be read, or None if it can.

  Opens the `.index` file and reads every tensor from the `.data-*` shards, which
  checks each tensor's size and CRC32C checksum. Only files are looked at, never the
  model, so a failure here means missing, truncated or corrupt files, not an
  incompatible model.

  Args:
    path: a checkpoint prefix such as `.../checkpoints/ckpt-300`.

  Returns:
    A one-line reason naming the error, or None.
  """
  # Seen with TF 2.21: a missing file is NotFoundError; a bad checksum or an index
  # that is not an sstable, an OpError; a data file shorter than its index says,
  # IndexError (OUT_OF_RANGE from the reader).
  try:
    reader = tf.train.load_checkpoint(path)
    for name in reader.get_variable_to_shape_map():
      reader.get_tensor(name)
  except IndexError as e:
    return f'a data file is truncated: IndexError: {_first_line(e)}'
  except (tf.errors.OpError, ValueError, OSError, RuntimeError) as e:
    return f'{type(e).__name__}: {_first_line(e)}'
  return None


def _candidates(manager, log=print):
  """The managed checkpoint prefixes, newest first (latest_checkpoint leads).

  When the `checkpoint` state file is missing or unreadable (TF then lists no
  checkpoint) but checkpoint files are on disk, they are the candidates, highest
  step first: a lost state file must not silently restart training from step 0.
  """
  ordered = [manager.latest_checkpoint] + list(reversed(manager.checkpoints))
  found = list(dict.fromkeys(p for p in ordered if p))
  if found:
    return found
  on_disk = []
  for index in tf.io.gfile.glob(os.path.join(manager.directory, 'ckpt-*.index')):
    prefix = index[:-len('.index')]
    number = prefix.rsplit('-', 1)[-1]
    if number.isdigit():
      on_disk.append((int(number), prefix))
  if on_disk:
    log(f'WARNING: {os.path.join(manager.directory, "checkpoint")} is missing or '
        f'unreadable, but {len(on_disk)} checkpoint(s) are on disk; trying them, '
        f'newest first.')
  return [prefix for _, prefix in sorted(on_disk, reverse=True)]


def _set_aside(manager, bad, good, log):
  """Renames the files of the `bad` prefixes to `<file>.corrupt-<time>` and drops them
  from the manager's bookkeeping and from the `checkpoint` state file, which then
  names `good` as the latest."""
  stamp = time.strftime('%Y%m%d-%H%M%S')
  for path in bad:
    files = (tf.io.gfile.glob(path + '.index') +
             tf.io.gfile.glob(path + '.data-?????-of-?????'))
    for name in files:
      try:
        tf.io.gfile.rename(name, f'{name}.corrupt-{stamp}')
      except tf.errors.OpError as e:
        log(f'WARNING: could not move {name} aside ({_first_line(e)}); delete it by '
            f'hand.')
    if files:
      log(f'WARNING: moved the files of {path} to {os.path.basename(path)}.*.corrupt-'
          f'{stamp}; nothing was deleted. Delete them once inspected.')
  # CheckpointManager has no public API to forget a checkpoint. Without this, the bad
  # prefixes would stay in its list (and in the state file), count against
  # max_to_keep, and a later save's sweep would delete the good checkpoint first.
  kept = getattr(manager, '_maybe_delete', None)
  if kept is None or not hasattr(manager, '_record_state'):
    log(f'WARNING: this TensorFlow version\'s CheckpointManager has no _maybe_delete; '
        f'{manager.directory}/checkpoint still lists {", ".join(bad)}.')
    return
  for path in bad:
    kept.pop(path, None)
  manager._latest_checkpoint = good  # pylint: disable=protected-access
  if kept:
    manager._record_state()  # pylint: disable=protected-access  (an atomic rewrite)


def _holds(path, name):
  """Whether the checkpoint at `path` holds anything under its root's child `name`."""
  keys = tf.train.load_checkpoint(path).get_variable_to_shape_map()
  return any(k.startswith(name + '/') for k in keys)


def restore_latest(manager, *, model_dir, log=print, repair=True, optional=()):
  """Restores the newest readable checkpoint, if there is one; returns its path or None.

  A checkpoint whose files are missing, truncated or corrupt is skipped with a
  warning naming it and the reason, and the previous one is tried, newest first.
  Once one restores, the skipped ones are moved aside (see the module docstring), so
  saving again, even under the same number, neither reuses nor trips over them.

  Files are checked before anything is restored (`unreadable_reason`), so variables
  are only ever assigned from a checkpoint whose every tensor read back intact.

  Args:
    manager: from `make_manager`.
    model_dir: the run's --model_dir, for messages.
    log: where warnings go.
    repair: move unreadable checkpoints aside (only the chief of a multi-worker
      job may change the shared model dir; other workers just skip them).
    optional: names of the checkpoint's children that an older checkpoint may lack
      (e.g. 'average', the weight average of a run that had none); those stay as
      they are, and the caller decides how to start them.

  Returns:
    The restored checkpoint prefix, or None when the manager has no checkpoint.

  Raises:
    CheckpointError: the first readable checkpoint belongs to a different model (names
      or shapes); or checkpoints exist and none of them is readable. Nothing in the
      model dir is changed in either case.
  """
  candidates = _candidates(manager, log)
  bad = []
  for i, path in enumerate(candidates):
    reason = unreadable_reason(path)
    if reason:
      then = ('trying the previous one' if i + 1 < len(candidates)
              else 'no older checkpoint is left to try')
      log(f'WARNING: checkpoint {path} is unreadable ({reason}); {then}.')
      bad.append((path, reason))
      continue
    try:
      ckpt = manager.checkpoint
      missing = [name for name in optional if not _holds(path, name)]
      if missing:
        log(f'Note: checkpoint {path} has no {", ".join(missing)}; '
            f'{"it starts" if len(missing) == 1 else "they start"} afresh.')
        ckpt = tf.train.Checkpoint(**{
            name: child for name, child in ckpt._trackable_children().items()  # pylint: disable=protected-access
            if name not in missing})
      status = ckpt.restore(path)
      status.assert_existing_objects_matched()
    except (ValueError, AssertionError, tf.errors.OpError) as e:
      raise errors.CheckpointError(
          f'--model_dir={model_dir} holds checkpoint {path} of an incompatible model '
          f'({_first_line(e)}). Use the flags it was trained with (see '
          f'{os.path.join(model_dir, CONFIG_FILE)}) or a new --model_dir.') from e
    if bad:
      log(f'WARNING: restored {path} instead of the unreadable {bad[0][0]}; the steps '
          f'after it will be trained again.')
      if repair:
        _set_aside(manager, [p for p, _ in bad], path, log)
    return path
  if not bad:
    return None
  listing = '; '.join(f'{p} ({reason})' for p, reason in bad)
  raise errors.CheckpointError(
      f'--model_dir={model_dir} holds {len(bad)} checkpoint(s) and none is readable: '
      f'{listing}. Restore {manager.directory} from a backup; or, to start over from '
      f'step 0 with the same flags, move it aside (mv {manager.directory} '
      f'{manager.directory}.bad); or use a new --model_dir.')
