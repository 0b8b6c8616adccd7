"""Stop at the next step boundary on SIGTERM, so a preempted job saves and resumes.

Schedulers (Slurm, Kubernetes, Borg) send SIGTERM some seconds before SIGKILL.
`PreemptionWatcher` turns that signal into a non-trainable bool variable,
`stop_requested`, that the compiled training loop reads once per step:

    for i in tf.range(num_steps):          # inside the loop's tf.function
      if watcher.stop_requested:           # a fresh ReadVariableOp every step
        break
      ...one step...

The controller then sees fewer steps done than asked, saves a checkpoint at the
current step and raises `Preempted` (a SystemExit with code EXIT_PREEMPTED); the
rerun of the same command resumes from that checkpoint.

How the signal gets in while the main thread is inside a long compiled call
(verified on Linux with TF 2.21, 2 CPU cores; see tests/engine/test_preemption.py):

* `signal.signal` alone does not work: CPython runs a Python handler on the main
  thread between bytecodes, i.e. only after the compiled call returns (a 3M-step
  loop ran all its 40 s with the handler waiting).
* `pthread_sigmask` + `sigwait` in a thread does not work once TensorFlow is
  imported: TF's threads, created at import, leave SIGTERM unblocked, the kernel
  delivers it to one of them, and the default action kills the process (exit 143).
  It would also leave SIGTERM blocked in every subprocess.
* What works: `signal.signal(sig, handler)` plus `signal.set_wakeup_fd` on a pipe.
  CPython's C-level handler writes the signal number to the pipe at once, in
  whichever thread took the signal; a daemon thread blocked on the pipe then assigns
  `stop_requested`. TF releases the GIL while a function runs, so the thread gets
  it; assigning a resource variable from another thread while a function reads it
  is safe (the variable's own lock). Measured: the loop stopped within
  milliseconds of the signal.

The read must not be inside XLA (`jit_compile=True`): XLA reads resource variables
once when the compiled cluster starts, so the flag would not be seen until the call
ends (verified). `engine.loop` compiles only the per-replica step with XLA, so the
check in its outer `tf.range` loop is fine. Never checkpoint `stop_requested`:
resuming would then stop at once.

Why not `tf.distribute.experimental.PreemptionCheckpointHandler`
(tensorflow/python/distribute/failure_handling/): it is built for multi-worker
training. A worker that gets SIGTERM (a plain `signal.signal` handler, or a polling
thread on GCE/Borg) publishes "save after run N+1" through the coordination
service's key-value store; all workers acknowledge, run up to that count, save
together and call `exit_fn` (optionally training on through a long grace period).
Its unit is one `handler.run(train_fn)` call and it checks between calls, so with
our N-steps-per-call compiled loop it stops only at the end of the call, which may
be after the scheduler's SIGKILL. We run one process on CPU and need to stop inside
the call, at the next step; hence this watcher. For several workers, every worker
must leave the loop at the same step or the next collective deadlocks; read the
flag through `agreed_stop(strategy, watcher.stop_requested)`, which all-reduces it
so that all workers stop at the first step at which any of them saw it.

Exit code: EXIT_PREEMPTED = 75 (EX_TEMPFAIL in sysexits.h: "temporary failure,
retry later"). Not 143: 128 + 15 is what a shell or scheduler reports for a process
*killed* by SIGTERM, so it could not tell "saved cleanly, rerun me" from "died
before saving". Not 2: bin/ uses 2 for user errors. 75 can be matched by requeue
rules, e.g. a Kubernetes Job podFailurePolicy `onExitCodes: {values: [75]}` with
action Ignore (not counted against backoffLimit), or a Slurm wrapper that runs
`scontrol requeue` on 75.

After the last checkpoint (the final evaluation, which has no step boundary and
writes nothing until it ends) the controller calls `exit_on_request()`: a SIGTERM
then ends the process at once with EXIT_PREEMPTED, and the rerun, which finds the
final checkpoint, only evaluates. Without it the signal would be noted and ignored
until the evaluation ended, which can take longer than the scheduler's grace period.

Ctrl-C: SIGINT is left alone by default (KeyboardInterrupt, raised when the
compiled call returns, no checkpoint). Pass `signals=(SIGTERM, SIGINT)` to make
the first Ctrl-C stop and save like SIGTERM; a second Ctrl-C then raises
KeyboardInterrupt as usual (once the main thread runs Python again).
"""
import os
import signal
import sys
import threading
import time
import warnings

import tensorflow as tf

EXIT_PREEMPTED = 75  # os.EX_TEMPFAIL; see the module docstring.
_SENTINEL = 0  # written by stop() to end the watcher thread; no signal has number 0.


class Preempted(SystemExit):
  """Raised once the preemption checkpoint is saved; the process exits with 75.

  A SystemExit, so `except Exception` and bin/'s ElboEngineError handler let it
  through (finally blocks still run) and the exit status is EXIT_PREEMPTED.

  Attributes:
    step: the step the checkpoint was saved at.
    checkpoint: its path.
  """

  def __init__(self, step=None, checkpoint=None):
    super().__init__(EXIT_PREEMPTED)
    self.step = step
    self.checkpoint = checkpoint


def agreed_stop(strategy, stop_requested):
  """Whether any replica, on any worker, has its stop flag set; the same on all.

  Call once per step inside the compiled loop, in cross-replica context (where
  `engine.loop` calls `strategy.run`). It costs one scalar all-reduce per step; on
  one worker, reading `stop_requested` directly is enough.

  Args:
    strategy: the tf.distribute strategy the loop runs under.
    stop_requested: each worker's `PreemptionWatcher.stop_requested`.

  Returns:
    A scalar bool tensor.
  """
  votes = strategy.run(lambda: tf.cast(stop_requested.read_value(), tf.int32))
  return strategy.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None) > 0


class PreemptionWatcher:
  """Sets `stop_requested` as soon as one of `signals` arrives (see module docstring).

  Usage, on the main thread:

      watcher = PreemptionWatcher()
      with watcher:
        ...  # the compiled loop breaks when watcher.stop_requested is set
        if watcher.requested:
          path = manager.save(checkpoint_number=step)
          raise Preempted(step, path)

  Off the main thread (some test runners) `start()` only warns: signals cannot be
  handled there, and `stop_requested` stays False unless `request()` is called.

  Create it outside `strategy.scope()` to get a plain host variable (inside a
  MirroredStrategy scope it becomes a MirroredVariable, which also works). Keep it
  out of the checkpoint.

  Args:
    signals: the signals that request a stop.
    log: where the one-line notice of a request goes; called from the watcher thread.
  """

  def __init__(self, signals=(signal.SIGTERM,), *, log=print):
    self._signals = tuple(signal.Signals(s) for s in signals)
    self._log = log
    with tf.device('/cpu:0'):
      self.stop_requested = tf.Variable(False, dtype=tf.bool, trainable=False,
                                        name='stop_requested')
    self._lock = threading.RLock()  # the main-thread handler may interrupt request()
    self._event = threading.Event()
    self._reason = None
    self._requested_at = None
    self._requested_monotonic = None
    self._active = False
    self._previous_handlers = {}
    self._previous_wakeup_fd = -1
    self._pipe = None
    self._thread = None
    self._sigints = 0  # SIGINTs seen by the thread (coalesced ones included)
    self._sigint_calls = 0  # calls of the Python-level handler for SIGINT
    self._exit_message = None  # set by exit_on_request()

  @property
  def active(self):
    """Whether signals are being watched (start() ran on the main thread)."""
    return self._active

  @property
  def requested(self):
    """Whether a stop has been requested (a Python bool; no TF read)."""
    return self._event.is_set()

  @property
  def reason(self):
    """The name of the signal that requested the stop ('SIGTERM'), or None."""
    return self._reason

  @property
  def requested_at(self):
    """`time.time()` of the first request, or None."""
    return self._requested_at

  def seconds_since_request(self):
    """Seconds since the first request (monotonic clock), or None."""
    if self._requested_monotonic is None:
      return None
    return time.monotonic() - self._requested_monotonic

  def request(self, reason='requested'):
    """Requests a stop at the next step boundary; idempotent and thread-safe."""
    with self._lock:
      if self._event.is_set():
        return
      self._reason = reason
      self._requested_at = time.time()
      self._requested_monotonic = time.monotonic()
      self._event.set()
      self.stop_requested.assign(True)
      exiting = self._exit_message is not None
    if exiting:
      self._exit_now()
    self._log(f'Received {reason}: stopping at the next step boundary to save a '
              f'checkpoint; exit code {EXIT_PREEMPTED} means "rerun to resume".')

  def exit_on_request(self, message):
    """From now on a request ends the process at once with EXIT_PREEMPTED.

    For a phase with no step boundary and nothing left to save, such as the final
    evaluation once the last checkpoint is written: the rerun redoes only that phase.
    A request already made ends the process now. The exit is `os._exit` (from the
    watcher thread, or the caller's), so no finally blocks run: call this only when
    everything worth keeping is on disk.

    Args:
      message: logged before exiting, e.g. what the rerun will do.
    """
    with self._lock:
      self._exit_message = message
      already = self._event.is_set()
    if already:
      self._exit_now()

  def _exit_now(self):
    self._log(f'Received {self._reason}: {self._exit_message} Exiting with code '
              f'{EXIT_PREEMPTED}.')
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except (OSError, ValueError):
        pass
    os._exit(EXIT_PREEMPTED)  # pylint: disable=protected-access

  def reset(self):
    """Clears a request (for reuse within one process, e.g. in tests)."""
    with self._lock:
      self._event.clear()
      self._reason = self._requested_at = self._requested_monotonic = None
      self._sigints = self._sigint_calls = 0
      self.stop_requested.assign(False)

  def start(self):
    """Installs the handlers and the wakeup pipe and starts the watcher thread.

    Returns:
      self. A no-op (with a RuntimeWarning) off the main thread or if already active.
    """
    if self._active:
      return self
    if threading.current_thread() is not threading.main_thread():
      warnings.warn('PreemptionWatcher.start() was called off the main thread, where '
                    'signal handlers cannot be installed; SIGTERM will not stop '
                    'training at a step boundary. Start it from the main thread.',
                    RuntimeWarning, stacklevel=2)
      return self
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # set_wakeup_fd requires it
    try:
      self._previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
      for s in self._signals:
        self._previous_handlers[s] = signal.signal(s, self._on_signal)
    except BaseException:
      self._restore_signals()
      os.close(read_fd)
      os.close(write_fd)
      raise
    self._pipe = (read_fd, write_fd)
    self._thread = threading.Thread(target=self._watch, args=(read_fd,),
                                    name='PreemptionWatcher', daemon=True)
    self._thread.start()
    self._active = True
    return self

  def stop(self):
    """Restores the previous handlers and wakeup fd and ends the thread.

    A request already made stays visible (`requested`, `stop_requested`). Off the
    main thread this only warns and leaves everything installed.
    """
    if not self._active:
      return
    if threading.current_thread() is not threading.main_thread():
      warnings.warn('PreemptionWatcher.stop() was called off the main thread, where '
                    'signal handlers cannot be restored; call it from the main thread.',
                    RuntimeWarning, stacklevel=2)
      return
    self._restore_signals()
    read_fd, write_fd = self._pipe
    try:
      os.write(write_fd, bytes([_SENTINEL]))
    except OSError:  # the pipe is full: the thread is not draining it anyway
      pass
    self._thread.join(timeout=5)
    if not self._thread.is_alive():
      os.close(read_fd)
    os.close(write_fd)
    self._pipe = self._thread = None
    self._active = False

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc_info):
    self.stop()
    return False

  def _restore_signals(self):
    for s, previous in self._previous_handlers.items():
      # None: the previous handler was not installed from Python; SIG_DFL is the
      # closest we can restore.
      signal.signal(s, signal.SIG_DFL if previous is None else previous)
    self._previous_handlers = {}
    signal.set_wakeup_fd(self._previous_wakeup_fd)
    self._previous_wakeup_fd = -1

  def _watch(self, read_fd):
    """The thread: each byte on the pipe is the number of a signal just received."""
    while True:
      try:
        data = os.read(read_fd, 64)
      except OSError:
        return
      if not data:
        return
      for signum in data:
        if signum == _SENTINEL:
          return
        if signum in self._signals:
          if signum == signal.SIGINT:
            self._sigints += 1
          try:
            self.request(signal.Signals(signum).name)
          except Exception as e:  # pylint: disable=broad-except
            # The Python-level handler retries on the main thread.
            self._log(f'PreemptionWatcher: could not set stop_requested ({e!r}).')

  def _on_signal(self, signum, frame):
    """The Python-level handler; runs on the main thread once it runs Python again.

    It is what makes CPython write to the wakeup fd; by the time it runs, the thread
    has normally flagged the stop already.
    """
    del frame
    if signum == signal.SIGINT:
      self._sigint_calls += 1
      if max(self._sigints, self._sigint_calls) >= 2:
        raise KeyboardInterrupt
    self.request(signal.Signals(signum).name)
