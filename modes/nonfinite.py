"""The training loop's policy for non-finite steps: skip or stop, and a cap on skips in a row."""

import dataclasses
from typing import Callable

import jax
import ml_collections
from absl import logging

from modes.errors import NonFiniteError

ON_NONFINITE = ("skip", "stop")  # train.on_nonfinite: drop such a minibatch, or end the run


@dataclasses.dataclass
class SkipCounter:
  """Skipped updates seen so far, the steps in a row that skipped one, and the last step read."""

  seen: int
  in_a_row: int = 0
  last_step: int = -1


def check_finite(
    step: int,
    metrics: dict[str, jax.Array],
    config: ml_collections.ConfigDict,
    counter: SkipCounter,
    *,
    saving: bool,
    last_checkpoint: Callable[[], int | None] = lambda: None,
) -> None:
  """Acts on the non-finite counters of `metrics` (from step `step`), updating `counter`.

  A skipped update is logged ("skip") or ends the run ("stop"), and so do more than
  `train.max_consecutive_skips` steps in a row that skipped one; a non-finite state (only
  possible when it started that way) ends the run before it could be checkpointed. A step read
  twice (at a checkpoint, then by the loop) counts once; `last_checkpoint()` is the step kept.
  """
  skips = int(metrics["skipped_updates"])
  if saving and not bool(metrics["params_finite"]):
    raise NonFiniteError(
        f"the parameters are not finite at step {step}, so no checkpoint was written; check the "
        "weights this run started from (config.train.init_from) or its last good checkpoint."
    )
  if step <= counter.last_step:
    return
  counter.last_step = step
  if skips <= counter.seen:
    counter.in_a_row = 0
    return
  counter.seen = skips
  counter.in_a_row += 1
  if config.train.on_nonfinite == "stop":
    raise NonFiniteError(
        f"step {step} produced a non-finite loss or update (config.train.on_nonfinite = "
        "'stop'); lower config.optim.learning_rate or set config.optim.grad_clip_norm, or "
        "use on_nonfinite = 'skip' to drop such minibatches."
    )
  cap = config.train.max_consecutive_skips
  if cap and counter.in_a_row >= cap:
    kept_step = last_checkpoint()
    kept = "no checkpoint" if kept_step is None else f"checkpoint step {kept_step}"
    raise NonFiniteError(
        f"the last {counter.in_a_row} steps (up to step {step}) all produced a non-finite loss "
        f"or update (config.train.max_consecutive_skips = {cap}), so the run stopped with "
        f"{kept} kept; lower config.optim.learning_rate or set config.optim.grad_clip_norm and "
        "run again."
    )
  logging.warning(
      "Step %d: non-finite loss or update; minibatch skipped (%d skipped so far, %d in a row).",
      step,
      skips,
      counter.in_a_row,
  )
