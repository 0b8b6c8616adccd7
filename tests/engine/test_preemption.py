"""Tests of engine/preemption.py: SIGTERM reaches a compiled loop that is running on
the main thread and stops it at the next step; a preempted process saves, exits with
EXIT_PREEMPTED, and the same command resumes."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest
import tensorflow as tf

from engine import preemption

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _make_loop(stop_requested):
  """A compiled multi-step loop that checks the flag at each step, as engine.loop."""

  @tf.function
  def loop(num_steps):
    done = tf.constant(0, tf.int64)
    total = tf.constant(0.0)
    for i in tf.range(num_steps):
      if stop_requested:
        break
      total += tf.reduce_sum(tf.sin(tf.fill([64], tf.cast(i, tf.float32))))
      done += 1
    return done, total

  return loop


def test_sigterm_stops_running_compiled_loop():
  """SIGTERM sent while the main thread is inside a 2M-step compiled call (about 30 s
  here) stops it at the next step; the process survives and the previous handler is
  restored afterwards."""
  previous = signal.getsignal(signal.SIGTERM)
  logged = []
  with preemption.PreemptionWatcher(log=logged.append) as watcher:
    assert watcher.active
    loop = _make_loop(watcher.stop_requested)
    loop(tf.constant(3, tf.int64))  # trace outside the timed call
    total = 2_000_000
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    tic = time.monotonic()
    done, _ = loop(tf.constant(total, tf.int64))
    seconds = time.monotonic() - tic
    timer.join()
    assert 0 < int(done) < total
    assert watcher.requested and watcher.reason == 'SIGTERM'
    assert watcher.seconds_since_request() < 2.0  # stopped soon after the signal
    assert seconds < 5.0
    assert bool(watcher.stop_requested.numpy())
    assert len(logged) == 1 and 'SIGTERM' in logged[0]
    # The flag stays set: a further call stops before its first step.
    assert int(loop(tf.constant(10, tf.int64))[0]) == 0
    watcher.reset()
    assert not watcher.requested
    assert int(loop(tf.constant(10, tf.int64))[0]) == 10
  assert not watcher.active
  assert signal.getsignal(signal.SIGTERM) is previous


def test_stop_restores_wakeup_fd_and_handlers():
  """stop() puts back the wakeup fd and both handlers; start() is idempotent."""
  previous_int = signal.getsignal(signal.SIGINT)
  watcher = preemption.PreemptionWatcher((signal.SIGTERM, signal.SIGINT),
                                         log=lambda _: None)
  watcher.start()
  watcher.start()
  assert signal.getsignal(signal.SIGINT) == watcher._on_signal
  watcher.stop()
  watcher.stop()
  assert signal.getsignal(signal.SIGINT) is previous_int
  assert signal.set_wakeup_fd(-1) == -1  # nothing of ours left installed


def test_sigint_opt_in_first_stops_second_interrupts():
  """With SIGINT watched, the first Ctrl-C requests a stop; the second raises
  KeyboardInterrupt as usual."""
  with preemption.PreemptionWatcher((signal.SIGTERM, signal.SIGINT),
                                    log=lambda _: None) as watcher:
    os.kill(os.getpid(), signal.SIGINT)
    deadline = time.monotonic() + 5
    while not watcher.requested and time.monotonic() < deadline:
      time.sleep(0.01)
    assert watcher.reason == 'SIGINT'
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(5)


def test_off_main_thread_is_a_warning_and_no_op():
  """start() off the main thread warns and installs nothing; request() still works."""
  watcher = preemption.PreemptionWatcher(log=lambda _: None)
  previous = signal.getsignal(signal.SIGTERM)
  caught = []

  def run():
    with warnings.catch_warnings(record=True) as w:
      warnings.simplefilter('always')
      watcher.start()
      caught.extend(w)

  thread = threading.Thread(target=run)
  thread.start()
  thread.join()
  assert not watcher.active
  assert [w.category for w in caught] == [RuntimeWarning]
  assert 'main thread' in str(caught[0].message)
  assert signal.getsignal(signal.SIGTERM) is previous
  watcher.request('time limit')
  assert watcher.requested and watcher.reason == 'time limit'
  assert bool(watcher.stop_requested.numpy())


def test_preempted_exits_with_tempfail():
  """Preempted is a SystemExit (not an Exception) carrying EXIT_PREEMPTED = 75."""
  e = preemption.Preempted(step=7, checkpoint='/x/ckpt-7')
  assert preemption.EXIT_PREEMPTED == 75 == os.EX_TEMPFAIL
  assert e.code == 75 and e.step == 7 and e.checkpoint == '/x/ckpt-7'
  assert isinstance(e, SystemExit) and not isinstance(e, Exception)


@pytest.mark.parametrize('use_mirrored', [False, True])
def test_agreed_stop_in_compiled_loop(use_mirrored, mirrored_strategy, default_strategy):
  """agreed_stop reads the flag through an all-reduce inside the compiled loop."""
  strategy = mirrored_strategy if use_mirrored else default_strategy
  with tf.device('/cpu:0'):
    flag = tf.Variable(False, trainable=False)

  @tf.function
  def loop(num_steps):
    done = tf.constant(0, tf.int64)
    for _ in tf.range(num_steps):
      if preemption.agreed_stop(strategy, flag):
        break
      done += 1
    return done

  assert int(loop(tf.constant(5, tf.int64))) == 5
  flag.assign(True)
  assert int(loop(tf.constant(5, tf.int64))) == 0


_CHILD = textwrap.dedent('''\
    """A preemptible run: resumes from its checkpoint, runs a compiled loop that checks
    the watcher's flag every step, and on SIGTERM saves and exits with 75."""
    import os
    import sys

    import tensorflow as tf

    from engine import checkpoints
    from engine import preemption

    model_dir, marker, num_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    step = tf.Variable(0, dtype=tf.int64, trainable=False)
    manager = checkpoints.make_manager(model_dir, max_to_keep=2, step=step)
    restored = checkpoints.restore_latest(manager, model_dir=model_dir)
    print(f'resumed {int(step.numpy())}' if restored else 'fresh', flush=True)
    watcher = preemption.PreemptionWatcher().start()

    @tf.function
    def loop(n):
      for _ in tf.range(n):
        if watcher.stop_requested:
          break
        step.assign_add(1)

    loop(tf.constant(0, tf.int64))  # trace; no step
    print('ready', flush=True)
    loop(tf.constant(num_steps, tf.int64))
    if watcher.requested:
      at = int(step.numpy())
      path = manager.save(checkpoint_number=at)
      with open(marker, 'w') as f:
        f.write(str(at))
      raise preemption.Preempted(step=at, checkpoint=path)
    print(f'finished {int(step.numpy())}', flush=True)
    ''')


def _run_child(tmp_path, num_steps, *, until=None):
  """Starts the child; if `until`, sends SIGTERM 1 s after it prints `until` (so the
  signal lands inside the long compiled call). Returns (exit code, stdout lines)."""
  script = tmp_path / 'child.py'
  script.write_text(_CHILD)
  env = dict(os.environ, PYTHONPATH=_REPO, TF_CPP_MIN_LOG_LEVEL='2')
  with open(tmp_path / 'child.err', 'ab') as err:
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / 'model'), str(tmp_path / 'marker'),
         str(num_steps)], stdout=subprocess.PIPE, stderr=err, text=True, env=env)
  killer = threading.Timer(60, proc.kill)  # a hung child fails the test, not the run
  killer.start()
  lines = []
  try:
    for line in proc.stdout:
      lines.append(line.strip())
      if until and line.strip() == until:
        threading.Timer(1.0, proc.send_signal, (signal.SIGTERM,)).start()
    return proc.wait(), lines
  finally:
    killer.cancel()


def test_sigterm_in_subprocess_saves_exits_75_and_resumes(tmp_path):
  """A child inside an endless (10^12-step) compiled call gets SIGTERM: the call
  returns at a step boundary, the child saves, writes the marker and exits 75;
  rerun, it resumes from that step."""
  code, lines = _run_child(tmp_path, 10**12, until='ready')
  err = (tmp_path / 'child.err').read_text()
  assert code == preemption.EXIT_PREEMPTED, (lines, err[-2000:])
  assert lines[0] == 'fresh'
  assert 'Received SIGTERM' in ' '.join(lines)
  stopped_at = int((tmp_path / 'marker').read_text())
  assert stopped_at > 1000  # the signal came well into the compiled call
  code, lines = _run_child(tmp_path, 5)
  assert code == 0, lines
  assert lines[0] == f'resumed {stopped_at}'
  assert lines[-1] == f'finished {stopped_at + 5}'
