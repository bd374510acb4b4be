"""XLA's FLOP counts of the compiled train step are the design (deterministic counts, not
timings): fast AT costs a clean update per optimizer update, and a PGD ascent step costs a
forward and an input backward — no weight gradients (PAPER.md §4).

The ⅔ of the PGD bound assumes convolutions dominate, as in the paper's UNet: a conv's input
backward and its weight backward each cost a forward. Elementwise layers (group norm, SiLU) have
an input backward but no weight backward, so on a narrow UNet an ascent step costs more than ⅔
of an update (0.72 at 32 channels, 0.69 at 64, 0.68 at 128): the PGD test uses 128 channels."""

import jax
import numpy as np
import pytest

from modes import train
from modes.factories import create_unet
from tests.configs import tiny_digits


def _step_flops(channels: int = 32, **adversarial) -> float:
  """FLOPs of one compiled minibatch step of the tiny digits UNet (batch 8)."""
  config = tiny_digits.get_config()
  config.model.num_channels = channels
  config.train.batch_size = 8
  config.model.dropout = 0.0  # dropout masks are RNG work that XLA also counts as FLOPs
  config.adversarial.update(adversarial)
  model = create_unet(config)
  tx = train.create_optimizer(config.optim)
  state = jax.eval_shape(lambda k: train.init_train_state(model, tx, config, k), jax.random.key(0))
  batch = {
      "image": jax.ShapeDtypeStruct((8, 16, 16, 1), np.uint8),
      "label": jax.ShapeDtypeStruct((8,), np.int32),
  }
  step = jax.jit(train.make_step_fn(model, train.create_diffusion(config), tx, config))
  compiled = step.lower(state, batch, jax.eval_shape(lambda: jax.random.key(1))).compile()
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def test_fast_at_costs_a_clean_update_per_update():
  fast, clean = _step_flops(mode="fast", num_replays=3), _step_flops(mode="none")
  assert fast / 3 <= 1.02 * clean, fast / 3 / clean


@pytest.fixture(scope="module")
def wide_clean_flops() -> float:
  return _step_flops(128, mode="none")


@pytest.mark.parametrize("k", [1, 3])
def test_pgd_ascent_steps_take_no_weight_gradients(wide_clean_flops, k):
  # A clean update is a forward, an input backward and a weight backward (+ AdamW/EMA); an
  # ascent step needs only the first two: ≤ ⅔ of an update each.
  ratio = _step_flops(128, mode="pgd", pgd_steps=k) / wide_clean_flops
  assert ratio <= 1 + k * 2 / 3 + 0.05, ratio
  # and every one of the k steps is counted (a rolled loop would be counted once).
  assert ratio >= 1 + k * 0.5, ratio
