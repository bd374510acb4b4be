"""benchmarks.torch_peer: the JAX step and guided-diffusion's torch step side by side (a tiny
model on CPU), the same network on both sides, and torch left out of a plain import."""

import json
import math
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import torch_peer
from benchmarks.train_step import cifar10_config
from configs import cifar10_adm
from tests import run_utils

CIFAR10_PARAMS = 57_094_662  # tests/test_unet.py: guided-diffusion's count for this config


def test_importing_it_pulls_in_no_torch():
  code = "import sys, benchmarks.torch_peer; print('torch' in sys.modules)"
  result = run_utils.run_python([sys.executable, "-c", code])
  assert result.stdout.strip().splitlines()[-1] == "False"


def test_parse_variants():
  parsed = torch_peer.parse_variants("a:;b:x=true,y=3;c:z=,w=false")
  assert parsed == {"a": {}, "b": {"x": True, "y": 3}, "c": {"z": "", "w": False}}


def test_the_torch_model_is_ours_layer_for_layer():
  """The torch UNetModel of the config takes our parameter mapping without a missing or extra
  key or shape, and the CIFAR-10 config gives the paper's 57.1M parameters on the torch side."""
  from benchmarks.torch_step import UNetModel, unet_kwargs
  from adv_diffusion.nets.torch_mapping import torch_to_flax_params
  from modes.factories import create_unet

  config = cifar10_config("float32", 2, torch_peer.TINY)
  model = create_unet(config)
  x = jnp.zeros((2, 32, 32, 3))
  template = jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros((2,), jnp.int32))
  torch_to_flax_params(UNetModel(**unet_kwargs(config)).state_dict(), template["params"])
  full = UNetModel(**unet_kwargs(cifar10_adm.get_config()))
  assert sum(p.numel() for p in full.parameters()) == CIFAR10_PARAMS


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  path = tmp_path_factory.mktemp("torch_peer") / "peer.json"
  variants = "default:;no_ynn:xla_cpu_experimental_ynn_fusion_type="
  args = ["--tiny", "--batch_size=2", "--steps=2", "--warmup=1", f"--jax_variants={variants}"]
  torch_peer.main([*args, f"--out={path}"])
  return json.loads(path.read_text())


def test_smoke_has_both_sides_with_finite_positive_timings(smoke):
  assert list(smoke["jax_variants"]) == ["default", "no_ynn"]
  assert smoke["jax"] == smoke["jax_variants"]["default"]
  assert smoke["jax_variants"]["no_ynn"]["compiler_options"] == {
      "xla_cpu_experimental_ynn_fusion_type": ""
  }
  for side in [*smoke["jax_variants"].values(), smoke["torch"]]:
    assert len(side["ms_each"]) == 2
    assert all(math.isfinite(ms) and ms > 0 for ms in side["ms_each"])
    assert side["ms_min"] <= side["ms_per_step"] <= side["ms_max"]
    assert math.isfinite(side["first_step_loss"])
  rounds = [j / t for j, t in zip(smoke["jax"]["ms_each"], smoke["torch"]["ms_each"])]
  assert smoke["ratio_jax_over_torch"] == pytest.approx(sum(rounds) / 2)  # median of two
  assert smoke["machine"]["cpu_model"] and smoke["versions"]["torch"]
  assert smoke["threads"]["torch"]["intra_op"] >= 1


def test_smoke_has_the_same_parameter_count_on_both_sides(smoke):
  counts = {s["param_count"] for s in [*smoke["jax_variants"].values(), smoke["torch"]]}
  assert len(counts) == 1 and counts.pop() > 100_000


def test_the_torch_step_trains_under_a_callers_no_grad():
  """The peer step enables grad itself: a caller (or an earlier test in the same worker) that
  left torch's grad mode off must not turn the benchmarked step into a failing backward."""
  import torch
  from benchmarks.torch_step import create_torch_step

  step = create_torch_step(cifar10_config("float32", 2, torch_peer.TINY))
  with torch.no_grad():
    out = step.run()
  assert math.isfinite(out["loss"]) and out["grad_norm"] > 0
