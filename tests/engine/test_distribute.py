"""Tests for engine.distribute: TF_CONFIG/Slurm checks, chief logic, a 2-process run.

MultiWorkerMirroredStrategy must be made before TensorFlow runs any op and then
owns the process, so it is only built in fresh subprocesses (test_two_workers...).
"""
import json
import os
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import tensorflow as tf

from engine import distribute
from engine import errors
from tests import ports

ROOT = Path(__file__).resolve().parents[2]
_SLURM_VARS = ('SLURM_PROCID', 'SLURM_STEP_NUM_TASKS', 'SLURM_STEP_NODELIST',
               'SLURM_STEP_TASKS_PER_NODE', 'SLURM_JOB_ID', 'SLURM_LOCALID',
               'SLURMD_NODENAME', 'SLURM_GPUS_PER_TASK')


def _tf_config(workers, task_type='worker', index=0, chief=None):
  cluster = {'worker': workers}
  if chief:
    cluster['chief'] = chief
  return json.dumps({'cluster': cluster, 'task': {'type': task_type, 'index': index}})


@pytest.fixture
def clean_env(monkeypatch):
  """No TF_CONFIG, no Slurm, no GPU hints (all restored after the test)."""
  for var in ('TF_CONFIG',) + _SLURM_VARS:
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')
  return monkeypatch


def _fake_multi_worker(task_type, task_id, cluster):
  """Stands in for an MWMS: is_chief/worker_dir only read `cluster_resolver`."""
  resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
      tf.train.ClusterSpec(cluster), task_type=task_type, task_id=task_id)
  return types.SimpleNamespace(cluster_resolver=resolver)


# --- TF_CONFIG checks -------------------------------------------------------------


@pytest.mark.parametrize('text, expected', [
    ('{"cluster": {"worker": ["a:1"]', 'not valid JSON'),
    ('["a:1"]', 'must be a JSON object'),
    ('{"task": {"type": "worker", "index": 0}}', 'no "cluster" object'),
    ('{"cluster": {}, "task": {"type": "worker", "index": 0}}', 'no non-empty "worker" list'),
    ('{"cluster": {"worker": "a:1"}, "task": {"type": "worker", "index": 0}}',
     'no non-empty "worker" list'),
    ('{"cluster": {"worker": ["a:1", "b"]}, "task": {"type": "worker", "index": 0}}',
     "'b' in \"cluster\" is not a \"host:port\""),
    ('{"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}',
     'more than once'),
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:1"]}, "task": {"type": "worker", "index": 0}}',
     "job(s) ['ps']"),
    ('{"cluster": {"worker": ["a:1"]}}', 'no "task" object'),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}',
     '"task"."type" is \'chief\''),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": "0"}}',
     'must be an integer'),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}}',
     'out of range for the 2 \'worker\' address(es); use 0..1'),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": -1}}',
     'out of range'),
])
def test_parse_tf_config_errors_name_tf_config_and_the_fix(text, expected):
  with pytest.raises(errors.ConfigError) as e:
    distribute.parse_tf_config(text)
  message = str(e.value)
  assert message.startswith('TF_CONFIG=')
  assert expected in message
  assert '"cluster": {"worker": ["host1:12345", "host2:12345"]}' in message  # The fix.


def test_parse_tf_config_accepts_workers_and_a_chief():
  config = distribute.parse_tf_config(
      _tf_config(['h1:2222', 'h2:2222'], 'chief', 0, chief=['h0:2222']))
  assert config['task'] == {'type': 'chief', 'index': 0}


def test_bad_tf_config_is_refused_before_any_strategy_is_made(clean_env):
  clean_env.setenv('TF_CONFIG', '{"cluster": {"worker": ["a:1"]}, "task": {"index": 0}}')
  with pytest.raises(errors.ConfigError, match=r'TF_CONFIG=.*"task"."type" is None'):
    distribute.make_strategy('multi_worker')


def test_valid_tf_config_gives_its_task(clean_env):
  clean_env.setenv('TF_CONFIG', _tf_config(['h1:2222', 'h2:2222'], index=1))
  resolver = distribute.cluster_resolver()
  assert (resolver.task_type, resolver.task_id) == ('worker', 1)
  assert resolver.cluster_spec().as_dict() == {'worker': ['h1:2222', 'h2:2222']}


def test_no_cluster_explains_tf_config_and_srun(clean_env):
  with pytest.raises(errors.ConfigError) as e:
    distribute.make_strategy('multi_worker')
  message = str(e.value)
  assert 'TF_CONFIG is not set' in message and 'srun python -m bin.train' in message
  assert '{"cluster": {"worker": ["host1:12345", "host2:12345"]}' in message


def test_slurm_job_without_srun_says_so(clean_env):
  clean_env.setenv('SLURM_JOB_ID', '77')
  with pytest.raises(errors.ConfigError, match='inside Slurm job 77 but not in an srun step'):
    distribute.cluster_resolver()


def test_num_cpu_devices_is_refused_with_multi_worker(clean_env):
  with pytest.raises(errors.ConfigError, match='--num_cpu_devices=2: with --strategy=multi_worker'):
    distribute.make_strategy('multi_worker', num_cpu_devices=2)


def test_unknown_strategy_lists_multi_worker():
  with pytest.raises(errors.ConfigError, match='multi_worker'):
    distribute.make_strategy('tpu')


# --- Slurm ------------------------------------------------------------------------


def _srun_env(env, procid, nodename, *, localid=0, tasks='2(x2)'):
  env.setenv('SLURM_PROCID', str(procid))
  env.setenv('SLURM_LOCALID', str(localid))
  env.setenv('SLURM_STEP_NUM_TASKS', '4')
  env.setenv('SLURM_STEP_NODELIST', 'n[01-02]')
  env.setenv('SLURM_STEP_TASKS_PER_NODE', tasks)
  env.setenv('SLURMD_NODENAME', nodename)


def test_slurm_cpu_cluster_lists_every_task_with_one_port_each(clean_env):
  _srun_env(clean_env, 3, 'n02', localid=1)
  resolver = distribute.cluster_resolver(port=9000)
  assert resolver.cluster_spec().as_dict() == {
      'worker': ['n01:9000', 'n01:9001', 'n02:9000', 'n02:9001']}
  assert (resolver.task_type, resolver.task_id) == ('worker', 3)
  assert resolver.num_accelerators() == {'GPU': 0}


def test_slurm_default_port_comes_from_the_job_id(clean_env):
  _srun_env(clean_env, 0, 'n01')
  clean_env.setenv('SLURM_JOB_ID', '123456')
  port = distribute.SLURM_PORT_BASE + 123456 % (distribute.SLURM_PORT_SPAN - 64)
  resolver = distribute.cluster_resolver()
  assert resolver.cluster_spec().as_dict()['worker'][0] == f'n01:{port}'


def test_slurm_splits_the_node_gpus_over_its_tasks(clean_env):
  _srun_env(clean_env, 1, 'n01', localid=1)
  clean_env.setenv('CUDA_VISIBLE_DEVICES', '4,5,6,7')
  resolver = distribute.cluster_resolver(port=9000)
  assert resolver.num_accelerators() == {'GPU': 2}
  assert os.environ['CUDA_VISIBLE_DEVICES'] == '6,7'


def test_slurm_keeps_gpus_slurm_bound_per_task(clean_env):
  _srun_env(clean_env, 1, 'n01', localid=1)
  clean_env.setenv('CUDA_VISIBLE_DEVICES', '3')
  resolver = distribute.cluster_resolver(port=9000)
  assert resolver.num_accelerators() == {'GPU': 1}
  assert os.environ['CUDA_VISIBLE_DEVICES'] == '3'


def test_slurm_refuses_tasks_not_in_block_order(clean_env):
  _srun_env(clean_env, 1, 'n02')  # Cyclic placement: rank 1 on the second node.
  with pytest.raises(errors.ConfigError, match='--distribution=block'):
    distribute.cluster_resolver(port=9000)


def test_slurm_refuses_a_bad_port(clean_env):
  _srun_env(clean_env, 0, 'n01')
  with pytest.raises(errors.ConfigError, match='port=80:'):
    distribute.cluster_resolver(port=80)


# --- Chief logic ------------------------------------------------------------------


def test_default_strategy_is_chief_and_writes_the_model_dir(default_strategy, tmp_path):
  assert distribute.is_chief(default_strategy)
  assert distribute.worker_dir(str(tmp_path), default_strategy) == str(tmp_path)
  assert not distribute.cleanup_worker_dir(str(tmp_path), default_strategy)
  assert tmp_path.is_dir()
  assert distribute.describe(default_strategy) == 'default strategy (no distribution)'


def test_mirrored_is_chief_and_described(mirrored_strategy):
  assert distribute.is_chief(mirrored_strategy)
  assert distribute.describe(mirrored_strategy).startswith('MirroredStrategy: 2 replicas on ')


@pytest.mark.parametrize('task_type, task_id, with_chief, expected', [
    ('worker', 0, False, True),
    ('worker', 1, False, False),
    ('worker', 0, True, False),
    ('chief', 0, True, True),
])
def test_is_chief_reads_the_cluster(task_type, task_id, with_chief, expected):
  cluster = {'worker': ['h1:1', 'h2:1']}
  if with_chief:
    cluster['chief'] = ['h0:1']
  assert distribute.is_chief(_fake_multi_worker(task_type, task_id, cluster)) is expected


def test_non_chief_gets_a_temp_dir_and_only_that_is_removed(tmp_path):
  strategy = _fake_multi_worker('worker', 1, {'worker': ['h1:1', 'h2:1']})
  model_dir = tmp_path / 'model'
  model_dir.mkdir()
  path = distribute.worker_dir(str(model_dir), strategy)
  assert path != str(model_dir) and os.path.basename(path).startswith('worker1-')
  assert os.path.isdir(path)
  assert not distribute.cleanup_worker_dir(str(model_dir), strategy)  # A mistake: refused.
  assert model_dir.is_dir()
  assert distribute.cleanup_worker_dir(path, strategy)
  assert not os.path.exists(path)


# --- Two real workers -------------------------------------------------------------

_WORKER_SCRIPT = textwrap.dedent('''\
    import json, os, sys
    from engine import distribute
    strategy = distribute.make_strategy('multi_worker')  # First: before any op.
    import tensorflow as tf
    import tf_keras

    with strategy.scope():
      model = tf_keras.Sequential([tf_keras.layers.Dense(
          2, kernel_initializer=tf_keras.initializers.GlorotUniform(seed=1))])
      model.build((None, 3))
      optimizer = tf_keras.optimizers.SGD(0.05)
    x = tf.reshape(tf.range(12, dtype=tf.float32), (4, 3)) / 10.

    @tf.function
    def train_step():
      def replica_step():
        # Each replica sees different data, so equal weights prove the all-reduce.
        scale = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group + 1,
                        tf.float32)
        with tf.GradientTape() as tape:
          loss = tf.reduce_mean((model(x * scale) - 1.) ** 2) / strategy.num_replicas_in_sync
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss
      return strategy.reduce('SUM', strategy.run(replica_step), axis=None)

    for _ in range(3):
      train_step()
    total = sum(float(tf.reduce_sum(v)) for v in model.trainable_variables)
    out_dir = distribute.worker_dir(sys.argv[1], strategy)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), out_dir, 1)
    manager.save()  # Every worker saves; only the chief's files are kept.
    removed = distribute.cleanup_worker_dir(out_dir, strategy)
    print('RESULT ' + json.dumps({
        'sum': repr(total), 'chief': distribute.is_chief(strategy), 'dir': out_dir,
        'removed': removed, 'describe': distribute.describe(strategy),
        'replicas': strategy.num_replicas_in_sync}), flush=True)
    ''')



def _run_two_workers(script, model_dir, tmp_path, timeout=120):
  workers = [f'127.0.0.1:{p}' for p in ports.free_ports(2)]
  procs = []
  for index in range(2):
    tmp = tmp_path / f'tmp{index}'
    tmp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM')}
    env.update(TF_CONFIG=_tf_config(workers, index=index), PYTHONPATH=str(ROOT),
               TF_CPP_MIN_LOG_LEVEL='2', TMPDIR=str(tmp))
    procs.append(subprocess.Popen(
        [sys.executable, str(script), str(model_dir)], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  deadline = time.monotonic() + timeout
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 1)))
  finally:
    for proc in procs:  # A stuck MWMS worker ignores SIGTERM (TF catches it): kill.
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return procs, outputs


@pytest.mark.slow
def test_two_workers_train_identically_and_only_the_chief_keeps_files(tmp_path):
  script = tmp_path / 'worker.py'
  script.write_text(_WORKER_SCRIPT)
  model_dir = tmp_path / 'model'
  for attempt in range(2):  # A port found free may be taken before a worker binds it.
    procs, outputs = _run_two_workers(script, model_dir, tmp_path)
    if attempt == 0 and any('cannot listen on' in err for _, err in outputs):
      continue
    break
  for proc, (out, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-3000:]
  results = [json.loads(next(line[7:] for line in out.splitlines() if line.startswith('RESULT ')))
             for out, _ in outputs]

  assert results[0]['sum'] == results[1]['sum']
  assert [r['replicas'] for r in results] == [2, 2]
  assert [r['chief'] for r in results] == [True, False]
  chief, other = results
  assert chief['dir'] == str(model_dir) and not chief['removed']
  assert chief['describe'] == ('MultiWorkerMirroredStrategy: 2 workers x 1 CPU device, '
                               'this is worker 0 (chief)')
  assert other['dir'] != str(model_dir) and other['removed']
  assert not os.path.exists(other['dir'])
  assert os.path.basename(other['dir']).startswith('worker1-')
  assert (model_dir / 'checkpoint').is_file()


def test_mirrored_over_logical_cpus_works_in_a_fresh_process(tmp_path):
  """make_strategy('mirrored', num_cpu_devices=2) as the first TF call of a process
  splits the CPU (listing devices must not start the runtime first), and per-replica
  XLA is reported unsupported there but supported on the default strategy."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  script = tmp_path / 'mirrored.py'
  script.write_text(
      'from engine import distribute\n'
      's = distribute.make_strategy("mirrored", num_cpu_devices=2)\n'
      'print("RESULT", s.num_replicas_in_sync, distribute.supports_per_replica_jit(s),\n'
      '      distribute.supports_per_replica_jit(distribute.make_strategy("default")))\n')
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True,
                       text=True, timeout=120,
                       env={**os.environ, 'PYTHONPATH': root, 'TF_CPP_MIN_LOG_LEVEL': '2'})
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'RESULT 2 False True' in out.stdout
