"""Preemption: SIGTERM makes the train loop save a checkpoint at the next step and exit 0.

Schedulers (Kubernetes, SLURM, Cloud TPU maintenance) send SIGTERM and kill the job a grace
period later. One process: our handler records the signal. Several processes: JAX's
coordination service catches SIGTERM on any process and `reached_preemption_sync_point`
makes all of them agree on the same step, so the collective save happens at one step
everywhere. If saving has not finished `grace_seconds` after the stop was decided, the process
exits with status 1 and says so; the last complete checkpoint stays usable.
"""

import os
import signal
import threading
import time

import jax
from absl import logging


class PreemptionWatcher:
  """Asked once per step by the train loop: has a preemption notice arrived?"""

  def __init__(self, grace_seconds: float):
    self.grace_seconds = grace_seconds
    self._multi_process = jax.process_count() > 1
    self._signalled_at: float | None = None
    self._timer: threading.Timer | None = None
    self._previous_handler = None
    if not self._multi_process and threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    if self._signalled_at is None:
      self._signalled_at = time.monotonic()
      logging.warning("SIGTERM received: saving a checkpoint after the current step.")

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after `step`; starts the grace-period watchdog when so."""
    if self._multi_process:
      from jax.experimental import multihost_utils

      stop = multihost_utils.reached_preemption_sync_point(step)
      if stop and self._signalled_at is None:
        self._signalled_at = time.monotonic()
    else:
      stop = self._signalled_at is not None
    if stop and self._timer is None:
      remaining = self.grace_seconds - (time.monotonic() - self._signalled_at)
      self._timer = threading.Timer(max(remaining, 0.0), self._expire, args=(step,))
      self._timer.daemon = True
      self._timer.start()
    return stop

  def _expire(self, step: int) -> None:
    logging.error(
        "Preemption: the checkpoint of step %d was not saved within the %.0f s "
        "grace period (config.train.preemption_grace_seconds); exiting. The last "
        "complete checkpoint is kept.",
        step,
        self.grace_seconds,
    )
    logging.flush()
    os._exit(1)

  def close(self) -> None:
    """Cancels the watchdog and restores the previous SIGTERM handler."""
    if self._timer is not None:
      self._timer.cancel()
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None
