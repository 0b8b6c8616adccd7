"""Strategy construction. Resolved once (in bin/ or a test) and passed explicitly."""
import tensorflow as tf

from engine import errors

STRATEGIES = ('default', 'one_device', 'mirrored')


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


def make_strategy(name='default', *, num_cpu_devices=0):
  """Returns the tf.distribute strategy named `name`.

  Args:
    name: 'default' (no distribution), 'one_device', or 'mirrored' (all GPUs, or
      `num_cpu_devices` logical CPUs when there is no GPU).
    num_cpu_devices: logical CPU devices for 'mirrored' on a CPU-only machine.
  """
  if name not in STRATEGIES:
    raise errors.ConfigError(
        f'--strategy={name!r} is not known; choose one of: {", ".join(STRATEGIES)}.')
  if name == 'default':
    return tf.distribute.get_strategy()
  gpus = tf.config.list_logical_devices('GPU')
  if name == 'one_device':
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else '/cpu:0')
  if gpus:
    return tf.distribute.MirroredStrategy()
  if num_cpu_devices > 1:
    set_logical_cpu_devices(num_cpu_devices)
  devices = [d.name for d in tf.config.list_logical_devices('CPU')]
  return tf.distribute.MirroredStrategy(devices)


def check_global_batch(strategy, global_batch_size):
  """Refuses a global batch that does not split evenly over the replicas."""
  replicas = strategy.num_replicas_in_sync
  if global_batch_size % replicas:
    raise errors.ConfigError(
        f'--batch_size={global_batch_size} is the global batch and must divide evenly '
        f'by the {replicas} replicas; use a multiple of {replicas}.')
  return global_batch_size // replicas
