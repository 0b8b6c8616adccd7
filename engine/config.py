"""Frozen run configuration with validation up front.

`bin/` turns flags into these dataclasses; library code only ever sees them. Every
check names the flag (the field name is the flag name), the value and the fix.
"""
import dataclasses
import json
from typing import Optional, Tuple

from engine import errors

INPUT_PIPELINES = ('in_memory', 'tf_data')
LR_SCHEDULES = ('constant', 'cosine')  # engine/schedules.py


def _positive_int(name, value, *, allow_zero=False):
  ok = isinstance(value, int) and not isinstance(value, bool) and (
      value >= 0 if allow_zero else value > 0)
  if not ok:
    bound = 'a non-negative' if allow_zero else 'a positive'
    raise errors.ConfigError(f'--{name}={value!r}: must be {bound} integer.')


def _choice(name, value, choices):
  if value not in choices:
    raise errors.ConfigError(
        f'--{name}={value!r} is not known; choose one of: {", ".join(choices)}.')


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which data set, and how it is fed.

  Attributes:
    dataset: a name from `engine.datasets.DATASET_NAMES`.
    data_dir: directory searched first for IDX files (None: defaults only).
    input_pipeline: 'in_memory' (data resident on the device, batches gathered
      inside the compiled loop; fastest) or 'tf_data' (a tf.data pipeline fed per
      replica through `distribute_datasets_from_function`). Both give the same
      batches in the same order.
    binarize: dynamic binarization (for Bernoulli likelihoods).
    synthetic_train_size, synthetic_test_size: sizes of the 'synthetic' set.
  """
  dataset: str = 'fashion_mnist'
  data_dir: Optional[str] = None
  input_pipeline: str = 'in_memory'
  binarize: bool = True
  synthetic_train_size: int = 2048
  synthetic_test_size: int = 512

  def __post_init__(self):
    _choice('input_pipeline', self.input_pipeline, INPUT_PIPELINES)
    _positive_int('synthetic_train_size', self.synthetic_train_size)
    _positive_int('synthetic_test_size', self.synthetic_test_size)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training schedule and the optimizer.

  Attributes:
    model_dir: where checkpoints, TensorBoard events, flags and metrics.json go.
    train_steps: total optimizer steps (a resumed run stops here too).
    batch_size: the *global* batch size (split evenly across replicas).
    learning_rate: Adam's learning rate (its peak, under a schedule).
    lr_schedule: 'constant' or 'cosine' (engine/schedules.py: half a cosine from
      learning_rate at step 0 to learning_rate * lr_final_fraction at train_steps).
    lr_final_fraction: the cosine schedule's last rate, as a fraction of the first.
    clip_grad_norm: clip the global gradient norm to this (0: no clipping).
    weight_decay: decoupled weight decay (AdamW): each step shrinks every kernel
      (weight matrix) by learning_rate(step) * weight_decay of itself, beside Adam's
      update; biases, scales and a learned prior do not decay. 0: off.
    ema_decay: keep an exponential moving average of the weights with this decay
      (engine/averaging.py; e.g. 0.999) and evaluate, sample and draw the
      TensorBoard images with it; 0: off, everything uses the trained weights.
    ema_every: update the average every this many steps, by ema_decay ** ema_every
      (one update costs a pass over the weights: benchmarks/RESULTS.md).
    steps_per_loop: optimizer steps per call of the compiled loop; logging,
      evaluation and checkpoints happen only between calls.
    eval_every, checkpoint_every: in steps; multiples of steps_per_loop.
    keep_checkpoints: how many checkpoints to keep.
    jit_compile: compile the training step and the evaluation with XLA (True),
      neither (False), or None (the default): the evaluation with XLA, and the
      training step too unless the model trains faster without it on this machine
      (see `controller.jit_compile`).
    prefetch_noise: with jit_compile, draw the noise a step shares across its batch
      (a BNN's weight noise; the in-memory input's binarization noise) one step
      ahead, in its own XLA program that runs
      beside the step (engine/loop.py). The same noise either way.
    seed: one seed for initialisation, data order, binarization and sampling.
    eval_batch_size: test batch size.
    eval_iw_samples: importance samples per test example for log p(x) at the end
      (0: skip); the periodic evaluation uses `periodic_eval_iw_samples`.
    periodic_eval_iw_samples: importance samples during training evaluations.
    iw_chunk_size: importance samples drawn at a time (bounds memory).
    profile_steps: (first, last) step range to trace with the profiler, or None.
    num_summary_images: images in the reconstruction and sample grids.
    precision: 'float32', 'mixed_bfloat16' or 'mixed_float16' (see
      engine/precision.py; float16 uses dynamic loss scaling).
    deterministic: op determinism (tf.config.experimental.enable_op_determinism,
      set by bin/ at start-up); with the step-indexed randomness this makes a
      killed-and-resumed run bit-identical to an uninterrupted one on CPU.
  """
  model_dir: str = '/tmp/elbo_engine/vae'
  train_steps: int = 20000
  batch_size: int = 128
  learning_rate: float = 1e-3
  lr_schedule: str = 'constant'
  lr_final_fraction: float = 0.0
  clip_grad_norm: float = 0.0
  weight_decay: float = 0.0
  ema_decay: float = 0.0
  ema_every: int = 10
  steps_per_loop: int = 500
  eval_every: int = 5000
  checkpoint_every: int = 5000
  keep_checkpoints: int = 3
  jit_compile: Optional[bool] = None
  prefetch_noise: bool = True
  seed: int = 0
  eval_batch_size: int = 500
  eval_iw_samples: int = 1000
  periodic_eval_iw_samples: int = 0
  iw_chunk_size: int = 100
  profile_steps: Optional[Tuple[int, int]] = None
  num_summary_images: int = 64
  precision: str = 'float32'
  deterministic: bool = False

  def __post_init__(self):
    _choice('precision', self.precision, ('float32', 'mixed_bfloat16', 'mixed_float16'))
    _choice('lr_schedule', self.lr_schedule, LR_SCHEDULES)
    if self.jit_compile not in (None, True, False):
      raise errors.ConfigError(
          f'jit_compile={self.jit_compile!r}: must be True, False or None (the default: '
          f'XLA where it is faster).')
    if not (isinstance(self.lr_final_fraction, (int, float))
            and 0 <= self.lr_final_fraction <= 1):
      raise errors.ConfigError(
          f'--lr_final_fraction={self.lr_final_fraction!r}: must be in [0, 1] (the '
          f'last learning rate as a fraction of --learning_rate).')
    for name in ('train_steps', 'batch_size', 'steps_per_loop', 'eval_every',
                 'checkpoint_every', 'keep_checkpoints', 'eval_batch_size',
                 'iw_chunk_size', 'num_summary_images', 'ema_every'):
      _positive_int(name, getattr(self, name))
    for name in ('eval_iw_samples', 'periodic_eval_iw_samples', 'seed'):
      _positive_int(name, getattr(self, name), allow_zero=True)
    if not self.model_dir:
      raise errors.ConfigError('--model_dir is empty; give a directory for checkpoints.')
    if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
      raise errors.ConfigError(
          f'--learning_rate={self.learning_rate!r}: must be a positive number, e.g. 1e-3.')
    if not (isinstance(self.clip_grad_norm, (int, float)) and self.clip_grad_norm >= 0):
      raise errors.ConfigError(
          f'--clip_grad_norm={self.clip_grad_norm!r}: must be >= 0 (0 turns clipping off).')
    if not (isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay
            and self.weight_decay * self.learning_rate < 1):
      raise errors.ConfigError(
          f'--weight_decay={self.weight_decay!r}: must be >= 0 and below '
          f'1 / --learning_rate (each step shrinks the kernels by learning_rate * '
          f'weight_decay of themselves), e.g. 1e-2; 0 turns it off.')
    if not (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1):
      raise errors.ConfigError(
          f'--ema_decay={self.ema_decay!r}: must be in [0, 1), e.g. 0.999 (0 turns the '
          f'weight average off).')
    for name in ('eval_every', 'checkpoint_every'):
      if getattr(self, name) % self.steps_per_loop:
        raise errors.ConfigError(
            f'--{name}={getattr(self, name)} is not a multiple of '
            f'--steps_per_loop={self.steps_per_loop}; the loop only returns to Python '
            f'every steps_per_loop steps. Make {name} a multiple of it.')
    for name in ('eval_iw_samples', 'periodic_eval_iw_samples'):
      value = getattr(self, name)
      if value % self.iw_chunk_size:
        raise errors.ConfigError(
            f'--{name}={value} is not a multiple of --iw_chunk_size={self.iw_chunk_size}; '
            f'importance samples are drawn in chunks of that size.')
    if self.profile_steps is not None:
      first, last = self.profile_steps
      if not (0 <= first < last):
        raise errors.ConfigError(
            f'--profile_steps={first},{last}: give FIRST,LAST with 0 <= FIRST < LAST.')


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything a run needs. `model` names a factory in `models.MODELS`, and
  `model_options` is that model's own frozen config dataclass."""
  model: str
  model_options: object
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()

  def __post_init__(self):
    if self.train.batch_size > self.data.synthetic_train_size and self.data.dataset == 'synthetic':
      raise errors.ConfigError(
          f'--batch_size={self.train.batch_size} exceeds --synthetic_train_size='
          f'{self.data.synthetic_train_size}; lower the batch size or grow the data set.')


def to_dict(config):
  """A JSON-ready nested dict of a config (tuples become lists, as JSON reads back)."""
  return json.loads(json.dumps(dataclasses.asdict(config), default=str))
