"""Strategy construction. Resolved once (in bin/ or a test) and passed explicitly.

Multi-worker training ('multi_worker') runs one process per worker; every process
builds the same strategy at program start, before TensorFlow runs any op. The
cluster comes from `TF_CONFIG` when it is set, else from Slurm when the process
runs inside an `srun` step. See bin/CLUSTER.md.
"""
import json
import os
import re
import shutil
import tempfile

import tensorflow as tf
# Not in tf's public API: the helpers SlurmClusterResolver itself uses.
from tensorflow.python.distribute.cluster_resolver import slurm_cluster_resolver as _slurm

from engine import errors

STRATEGIES = ('default', 'one_device', 'mirrored', 'multi_worker')

# Under Slurm, task k on a node listens on `port + k`. Without an explicit port the
# base is derived from SLURM_JOB_ID, so two jobs sharing a node rarely collide;
# the range stays below Linux's ephemeral ports (32768+).
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 10000

_TF_CONFIG_EXAMPLE = (
    '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
    '"task": {"type": "worker", "index": 0}}')
_TF_CONFIG_HELP = (
    f'Set it in every worker process to the same cluster and that process\'s own task, '
    f'e.g. TF_CONFIG=\'{_TF_CONFIG_EXAMPLE}\' on host1 and "index": 1 on host2.')
# Environment variables `srun` sets for each task and SlurmClusterResolver reads.
_SLURM_STEP_VARS = ('SLURM_PROCID', 'SLURM_STEP_NUM_TASKS', 'SLURM_STEP_NODELIST',
                    'SLURM_STEP_TASKS_PER_NODE')
_ADDRESS = re.compile(r'^[^\s:]+:\d{1,5}$|^\[[0-9a-fA-F:.]+\]:\d{1,5}$')

# Worker dirs this process made with `worker_dir`; only these are ever removed.
_WORKER_DIRS = set()


def set_logical_cpu_devices(num_devices):
  """Splits the host CPU into `num_devices` logical devices (before any op runs).

  Lets the multi-replica code path run and be tested on a CPU-only machine.
  """
  cpus = tf.config.list_physical_devices('CPU')
  current = tf.config.get_logical_device_configuration(cpus[0])
  if current and len(current) == num_devices:
    return
  try:
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_devices)
  except RuntimeError as e:
    raise errors.ConfigError(
        f'--num_cpu_devices={num_devices}: logical devices must be set before '
        f'TensorFlow runs any op ({e}). Set it at program start.') from e


def make_strategy(name='default', *, num_cpu_devices=0, port=None):
  """Returns the tf.distribute strategy named `name`.

  Args:
    name: 'default' (no distribution), 'one_device', 'mirrored' (all GPUs, or
      `num_cpu_devices` logical CPUs when there is no GPU) or 'multi_worker'
      (MultiWorkerMirroredStrategy over the cluster in TF_CONFIG or the current
      `srun` step; all local GPUs of each worker, or one CPU replica per worker).
    num_cpu_devices: logical CPU devices for 'mirrored' on a CPU-only machine.
      Must be 0 or 1 with 'multi_worker'.
    port: 'multi_worker' under Slurm only: the port of a node's first task (task k
      on a node uses `port + k`). None derives it from SLURM_JOB_ID.

  Raises:
    errors.ConfigError: unknown name, bad TF_CONFIG, no cluster for
      'multi_worker', or 'multi_worker' made after TensorFlow already ran ops.
  """
  if name not in STRATEGIES:
    raise errors.ConfigError(
        f'--strategy={name!r} is not known; choose one of: {", ".join(STRATEGIES)}.')
  if name == 'default':
    return tf.distribute.get_strategy()
  if name == 'multi_worker':
    return _make_multi_worker(num_cpu_devices=num_cpu_devices, port=port)
  # Physical, not logical: listing logical devices starts the runtime, after which
  # the CPU can no longer be split into logical devices.
  gpus = tf.config.list_physical_devices('GPU')
  if name == 'one_device':
    return tf.distribute.OneDeviceStrategy('/gpu:0' if gpus else '/cpu:0')
  if gpus:
    return tf.distribute.MirroredStrategy()
  if num_cpu_devices > 1:
    set_logical_cpu_devices(num_cpu_devices)
  devices = [d.name for d in tf.config.list_logical_devices('CPU')]
  return tf.distribute.MirroredStrategy(devices)


def supports_per_replica_jit(strategy):
  """Whether each replica's step may be compiled with XLA under this strategy.

  Not with several replicas on CPU: the step holds the gradients' all-reduce, which
  XLA cannot compile there (TF 2.21). Over several logical CPU devices in one
  process XLA places every replica's step on CPU:0 and fails reading CPU:1's
  variables ("Trying to access resource ... located in device CPU:1 from device
  CPU:0"); across workers on CPU it refuses the collective ("Only compiling
  NCCL/auto collective is supported, got: ring"; with AUTO, "Collectives are not
  yet implemented for CPU devices when compiling with XLA"). One replica (default,
  one_device) and GPUs (NCCL) are fine.
  """
  if strategy.num_replicas_in_sync == 1:
    return True
  try:
    devices = strategy.extended.worker_devices
  except RuntimeError:  # the default strategy has no device list
    return True
  return not any('CPU' in d.upper() for d in devices)


def check_global_batch(strategy, global_batch_size):
  """Refuses a global batch that does not split evenly over the replicas."""
  replicas = strategy.num_replicas_in_sync
  if global_batch_size % replicas:
    raise errors.ConfigError(
        f'--batch_size={global_batch_size} is the global batch and must divide evenly '
        f'by the {replicas} replicas; use a multiple of {replicas}.')
  return global_batch_size // replicas


# --- Multi-worker -------------------------------------------------------------------


def parse_tf_config(text):
  """Parses and checks a TF_CONFIG value for multi-worker training.

  Args:
    text: the TF_CONFIG string.

  Returns:
    The parsed dict: {'cluster': {'worker': [...], ['chief': [one]]},
    'task': {'type': ..., 'index': ...}}.

  Raises:
    errors.ConfigError: naming TF_CONFIG, what is wrong and the expected form.
  """
  def bad(problem):
    return errors.ConfigError(f'TF_CONFIG={text!r}: {problem}. {_TF_CONFIG_HELP}')

  try:
    config = json.loads(text)
  except ValueError as e:
    raise bad(f'is not valid JSON ({e})') from None
  if not isinstance(config, dict):
    raise bad(f'must be a JSON object, not {type(config).__name__}')
  cluster = config.get('cluster')
  if not isinstance(cluster, dict):
    raise bad('has no "cluster" object')
  workers = cluster.get('worker')
  if not isinstance(workers, list) or not workers:
    raise bad('"cluster" has no non-empty "worker" list of "host:port" addresses')
  unknown = sorted(set(cluster) - {'worker', 'chief'})
  if unknown:
    raise bad(f'"cluster" has job(s) {unknown}; multi_worker uses only "worker" '
              f'(and optionally "chief" with one address)')
  chief = cluster.get('chief', [])
  if not isinstance(chief, list) or len(chief) > 1:
    raise bad('"cluster"."chief" must be a list of one "host:port" address')
  addresses = chief + workers
  for address in addresses:
    if not isinstance(address, str) or not _ADDRESS.match(address):
      raise bad(f'{address!r} in "cluster" is not a "host:port" address')
  duplicates = sorted({a for a in addresses if addresses.count(a) > 1})
  if duplicates:
    raise bad(f'"cluster" lists {duplicates} more than once; each task needs its own port')
  task = config.get('task')
  if not isinstance(task, dict):
    raise bad('has no "task" object naming this process, e.g. {"type": "worker", "index": 0}')
  task_type, index = task.get('type'), task.get('index')
  if task_type not in cluster:
    raise bad(f'"task"."type" is {task_type!r}; it must be one of the cluster\'s jobs '
              f'{sorted(cluster)}')
  if not isinstance(index, int) or isinstance(index, bool):
    raise bad(f'"task"."index" is {index!r}; it must be an integer')
  if not 0 <= index < len(cluster[task_type]):
    raise bad(f'"task"."index" is {index}, out of range for the {len(cluster[task_type])} '
              f'{task_type!r} address(es); use 0..{len(cluster[task_type]) - 1}')
  return config


def running_under_srun():
  """True when this process is a task of a Slurm job step (started by `srun`)."""
  return all(os.environ.get(v) for v in _SLURM_STEP_VARS)


def cluster_resolver(*, port=None):
  """The cluster of this multi-worker run: from TF_CONFIG, else from the srun step.

  Under Slurm it may set CUDA_VISIBLE_DEVICES (one share of the node's GPUs per
  task), so call it before TensorFlow initializes GPUs.

  Args:
    port: Slurm only; see `make_strategy`.

  Returns:
    A tf.distribute.cluster_resolver.ClusterResolver with task_type/task_id set.

  Raises:
    errors.ConfigError: bad TF_CONFIG, bad Slurm step, or no cluster at all.
  """
  text = os.environ.get('TF_CONFIG')
  if text is not None and text.strip():
    parse_tf_config(text)
    return tf.distribute.cluster_resolver.TFConfigClusterResolver()
  if running_under_srun():
    return _slurm_resolver(port)
  in_job = ' This process is inside Slurm job %s but not in an srun step;' % (
      os.environ['SLURM_JOB_ID']) if os.environ.get('SLURM_JOB_ID') else ''
  raise errors.ConfigError(
      f'--strategy=multi_worker needs a cluster and found none: TF_CONFIG is not set and '
      f'this is not an srun task (no {", ".join(_SLURM_STEP_VARS)}).{in_job} Either run '
      f'one process per worker with TF_CONFIG set, e.g. TF_CONFIG=\'{_TF_CONFIG_EXAMPLE}\' '
      f'on host1 and "index": 1 on host2, or launch under Slurm with `srun python -m '
      f'bin.train --strategy=multi_worker ...` (see bin/slurm_train.sbatch).')


class _SlurmResolver(tf.distribute.cluster_resolver.SlurmClusterResolver):
  """SlurmClusterResolver that lists every task and reports the GPUs we assigned.

  The stock resolver, left to count GPUs itself, fails on CPU nodes (nvidia-smi
  missing; `range(..., step=0)` with no GPU), lists only min(tasks, GPUs) tasks per
  node, and sets CUDA_VISIBLE_DEVICES by physical index, ignoring Slurm's own
  binding. Here it only builds the cluster spec (one port per task on a node);
  GPUs are assigned by `_slurm_resolver`.
  """

  def __init__(self, port_base, tasks_per_node, gpus_per_task):
    # gpus_per_node=tasks_per_node, gpus_per_task=1: the base enumerates every task.
    super().__init__(port_base=port_base, gpus_per_node=tasks_per_node, gpus_per_task=1,
                     auto_set_gpu=False)
    self._engine_gpus_per_task = gpus_per_task

  def num_accelerators(self, task_type=None, task_id=None, config_proto=None):
    del task_type, task_id, config_proto  # Same for every task.
    return {'GPU': self._engine_gpus_per_task}


def _visible_gpus():
  """GPU ids this process may use, found without initializing TensorFlow."""
  cuda = os.environ.get('CUDA_VISIBLE_DEVICES')
  if cuda is not None:
    ids = [i.strip() for i in cuda.split(',') if i.strip()]
    return [] if ids in (['NoDevFiles'], ['-1']) else ids
  if shutil.which('nvidia-smi'):
    try:
      return [str(i) for i in range(_slurm.get_num_gpus())]
    except (RuntimeError, OSError):
      return []
  return []


def _slurm_resolver(port):
  """Builds the cluster of the current srun step; assigns this task's GPUs."""
  env = os.environ
  try:
    tasks_per_node = max(_slurm.expand_tasks_per_node(
        env['SLURM_STEP_TASKS_PER_NODE']))
  except ValueError as e:
    raise errors.ConfigError(
        f'SLURM_STEP_TASKS_PER_NODE={env["SLURM_STEP_TASKS_PER_NODE"]!r} cannot be read '
        f'({e}); launch with srun --ntasks-per-node=N.') from None
  if port is None:
    job = env.get('SLURM_JOB_ID', '0')
    port = SLURM_PORT_BASE + (int(job) if job.isdigit() else 0) % (SLURM_PORT_SPAN - 64)
  if not 1024 <= port <= 65535 - tasks_per_node:
    raise errors.ConfigError(
        f'port={port}: the Slurm base port must be in 1024..{65535 - tasks_per_node} '
        f'(tasks on a node use port..port+{tasks_per_node - 1}).')

  gpus = _visible_gpus()
  local_id = int(env.get('SLURM_LOCALID', '0'))
  if not gpus:
    gpus_per_task = 0
  elif env.get('SLURM_GPUS_PER_TASK') or len(gpus) < tasks_per_node:
    # Slurm already bound GPUs to each task (--gpus-per-task, --gpu-bind): keep them.
    gpus_per_task = len(gpus)
  elif len(gpus) % tasks_per_node:
    raise errors.ConfigError(
        f'SLURM_STEP_TASKS_PER_NODE={env["SLURM_STEP_TASKS_PER_NODE"]!r} with '
        f'{len(gpus)} GPUs per node: the GPUs do not split evenly over the tasks; use '
        f'--ntasks-per-node=1 (all GPUs per task) or one task per GPU.')
  else:
    gpus_per_task = len(gpus) // tasks_per_node
    mine = gpus[local_id * gpus_per_task:(local_id + 1) * gpus_per_task]
    os.environ['CUDA_VISIBLE_DEVICES'] = ','.join(mine)
  try:
    resolver = _SlurmResolver(port, tasks_per_node, gpus_per_task)
    spec = resolver.cluster_spec()
  except (RuntimeError, ValueError) as e:
    raise errors.ConfigError(f'The Slurm step cannot be used as a TensorFlow cluster: {e}') from e
  host = spec.task_address(resolver.task_type, resolver.task_id).rsplit(':', 1)[0]
  node = env.get('SLURMD_NODENAME')
  if node and node != host:
    raise errors.ConfigError(
        f'SLURM_PROCID={env["SLURM_PROCID"]} runs on {node} but the cluster spec puts it '
        f'on {host}: tasks must be placed in block order; use srun --distribution=block '
        f'(the default).')
  return resolver


def _communication_options(num_gpus):
  """All-reduce implementation: NCCL (via AUTO) between GPUs, ring over gRPC on CPU."""
  impl = tf.distribute.experimental.CommunicationImplementation
  return tf.distribute.experimental.CommunicationOptions(
      implementation=impl.AUTO if num_gpus else impl.RING)


def _make_multi_worker(*, num_cpu_devices, port):
  if num_cpu_devices > 1:
    raise errors.ConfigError(
        f'--num_cpu_devices={num_cpu_devices}: with --strategy=multi_worker each worker '
        f'is one CPU replica (or all its GPUs); drop --num_cpu_devices or use 0.')
  resolver = cluster_resolver(port=port)
  if isinstance(resolver, _SlurmResolver):
    num_gpus = resolver.num_accelerators()['GPU']
  else:
    num_gpus = len(tf.config.list_physical_devices('GPU'))
  try:
    return tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=resolver, communication_options=_communication_options(num_gpus))
  except RuntimeError as e:
    if 'program startup' not in str(e):
      raise
    raise errors.ConfigError(
        f'--strategy=multi_worker: the strategy must be made at program start, before '
        f'TensorFlow runs any op ({e}). Call make_strategy first.') from e
  except tf.errors.UnknownError as e:
    if 'gRPC server' not in str(e):
      raise
    address = resolver.cluster_spec().task_address(resolver.task_type, resolver.task_id)
    source = 'TF_CONFIG' if isinstance(
        resolver, tf.distribute.cluster_resolver.TFConfigClusterResolver) else 'port'
    raise errors.ConfigError(
        f'--strategy=multi_worker: this task ({resolver.task_type} {resolver.task_id}) '
        f'cannot listen on {address}, which is probably in use by another process '
        f'({e.message}); give it a free port in {source}.') from e


def _cluster(strategy):
  """(task_type, task_id, cluster dict) of a multi-worker strategy, else None."""
  resolver = getattr(strategy, 'cluster_resolver', None)
  if resolver is None or resolver.task_type is None:
    return None
  cluster = resolver.cluster_spec().as_dict()
  if not cluster:
    return None
  return resolver.task_type, int(resolver.task_id), cluster


def is_multi_worker(strategy):
  """True for a strategy spanning several worker processes."""
  info = _cluster(strategy)
  if info is None:
    return False
  _, _, cluster = info
  return sum(len(v) for v in cluster.values()) > 1


def is_chief(strategy):
  """True if this process writes the run's outputs (checkpoints, logs, samples).

  Always True outside multi-worker training. With MultiWorkerMirroredStrategy: the
  'chief' task, or worker 0 when the cluster has no chief.
  """
  info = _cluster(strategy)
  if info is None:
    return True
  task_type, task_id, cluster = info
  if task_type == 'chief':
    return True
  return task_type == 'worker' and task_id == 0 and not cluster.get('chief')


def worker_dir(model_dir, strategy):
  """Where this process writes: `model_dir` on the chief, a new temp dir elsewhere.

  Under MultiWorkerMirroredStrategy every worker must call `manager.save()` (saving
  is a collective), but only the chief's files are kept: non-chief workers save
  into a private temporary dir, removed with `cleanup_worker_dir` at the end.
  """
  if is_chief(strategy):
    return model_dir
  task_type, task_id, _ = _cluster(strategy)
  path = tempfile.mkdtemp(prefix=f'{task_type}{task_id}-')
  _WORKER_DIRS.add(path)
  return path


def cleanup_worker_dir(path, strategy):
  """Removes a non-chief's dir made by `worker_dir`; never touches the chief's.

  Only paths this process got from `worker_dir` are removed, so passing the model
  dir by mistake on a non-chief worker is harmless.

  Returns:
    True if `path` was removed.
  """
  if is_chief(strategy) or path not in _WORKER_DIRS:
    return False
  shutil.rmtree(path, ignore_errors=True)
  _WORKER_DIRS.discard(path)
  return True


def is_default(strategy):
  """Whether `strategy` is TF's default strategy (no distribution)."""
  return type(strategy).__name__ == '_DefaultDistributionStrategy'


def describe(strategy):
  """A one-line description of `strategy` for logs."""
  kind = type(strategy).__name__
  if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    kind = 'MultiWorkerMirroredStrategy'  # Its class is named CollectiveAllReduceStrategy.
  if is_default(strategy):
    return 'default strategy (no distribution)'
  replicas = strategy.num_replicas_in_sync
  devices = strategy.extended.worker_devices
  device_type = 'GPU' if any('GPU' in d.upper() for d in devices) else 'CPU'
  info = _cluster(strategy)
  if info is not None:
    task_type, task_id, cluster = info
    workers = len(cluster.get('worker', [])) + len(cluster.get('chief', []))
    per_worker = max(replicas // workers, 1)
    role = ' (chief)' if is_chief(strategy) else ''
    return (f'{kind}: {workers} workers x {per_worker} {device_type} device'
            f'{"s" if per_worker > 1 else ""}, this is {task_type} {task_id}{role}')
  return f'{kind}: {replicas} replica{"s" if replicas > 1 else ""} on {", ".join(devices)}'
