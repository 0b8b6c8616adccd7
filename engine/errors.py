"""Errors the engine raises for bad input; each message names the problem and the fix.

`bin/` catches `ElboEngineError` and prints the message without a stack trace.
"""


class ElboEngineError(Exception):
  """Base class of every error meant to be shown to a user as-is."""


class ConfigError(ElboEngineError, ValueError):
  """A flag or config field has a bad value."""


class DataError(ElboEngineError, ValueError):
  """Data files are missing, truncated or do not match each other."""


class CheckpointError(ElboEngineError):
  """A model dir holds a checkpoint that cannot be used for this run."""


class NonFiniteLossError(ElboEngineError, FloatingPointError):
  """Training produced a NaN or Inf; nothing from the bad step was saved."""
