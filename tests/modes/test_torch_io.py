"""guided-diffusion checkpoints in and out (`--mode=import_torch` / `--mode=export_torch`), and
class-conditional ImageNet 64×64 end to end on `tfds.testing.mock_data`."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from modes import checkpoint as ckpt_lib  # noqa: E402
from modes import torch_io  # noqa: E402
from modes.errors import CheckpointError  # noqa: E402
from modes.factories import create_unet  # noqa: E402
from adv_diffusion.nets.torch_mapping import flax_to_torch_state_dict  # noqa: E402
from tests import run_utils  # noqa: E402
from tests.test_unet import flax_args, inputs, rel_err, torch_model  # noqa: E402

TINY_MODULE = "tests.configs.tiny_imagenet64"
TINY_IMAGENET = os.path.join(run_utils.REPO, "tests", "configs", "tiny_imagenet64.py")
# Arguments that guided-diffusion's UNetModel shares with our UNet (which takes dtype and remat).
TORCH_ARGS = (
    "image_size",
    "in_channels",
    "model_channels",
    "out_channels",
    "num_res_blocks",
    "attention_resolutions",
    "dropout",
    "channel_mult",
    "conv_resample",
    "num_classes",
    "num_heads",
    "num_head_channels",
    "num_heads_upsample",
    "use_scale_shift_norm",
    "resblock_updown",
    "use_new_attention_order",
)


def load_config(module: str, **model: object) -> ml_collections.ConfigDict:
  """A config module's config in float32 compute, with `config.model` overrides."""
  config = importlib.import_module(module).get_config()
  config.model.compute_dtype = "float32"
  config.model.update(model)
  return config


def torch_kwargs(config: ml_collections.ConfigDict) -> dict:
  """guided-diffusion UNetModel arguments of the network `config` builds."""
  unet = create_unet(config)
  return {name: getattr(unet, name) for name in TORCH_ARGS}


def model_target(config: ml_collections.ConfigDict) -> dict:
  params = torch_io.params_template(config)
  return {"params": params, "ema_params": tuple(params for _ in config.train.ema_rates)}


def run_mock_tfds(workdir: str, *overrides: str) -> subprocess.CompletedProcess:
  """main.py on the tiny ImageNet-64 config with TFDS mocked (random images and labels)."""
  command = [
      sys.executable,
      "-m",
      "tests.mock_tfds_main",
      f"--config={TINY_IMAGENET}",
      f"--workdir={workdir}",
      *overrides,
  ]
  result = subprocess.run(
      command,
      cwd=run_utils.REPO,
      env=run_utils.subprocess_env(),
      capture_output=True,
      text=True,
      timeout=900,
  )
  if result.returncode != 0:
    raise AssertionError(f"main.py failed ({result.returncode}):\n{result.stderr[-4000:]}")
  return result


def load_pt(path: str) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}


def assert_trees_equal(a, b) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
  """Workdir of 2 training steps of the tiny class-conditional ImageNet-64 config."""
  workdir = str(tmp_path_factory.mktemp("imagenet64") / "run")
  run_mock_tfds(workdir)
  return workdir


# ------------------------------------------------------------------------------ round trips


def test_export_import_export_is_bit_exact(trained, tmp_path):
  config = load_config(TINY_MODULE)
  rates = tuple(config.train.ema_rates)
  first = str(tmp_path / "torch_a")
  run_utils.run_main(
      trained, "--mode=export_torch", f"--config.torch_io.out={first}", config=TINY_IMAGENET
  )
  names = ["model000002.pt"] + [f"ema_{r}_000002.pt" for r in rates]
  assert sorted(os.listdir(first)) == sorted(names)
  model_file, *ema_files = [os.path.join(first, n) for n in names]

  # torch files -> orbax: the same params and EMAs, bit for bit, at the step of the file name.
  imported = str(tmp_path / "imported")
  run_utils.run_main(
      imported,
      "--mode=import_torch",
      f"--config.torch_io.checkpoint={model_file}",
      f"--config.torch_io.ema={','.join(ema_files)}",
      config=TINY_IMAGENET,
  )
  original = run_utils.read_checkpoint(trained)["model"]
  again = run_utils.read_checkpoint(imported, step=2)["model"]
  assert_trees_equal(again, original)
  assert not np.array_equal(*[jax.tree.leaves(t)[0] for t in original["ema_params"]])

  # orbax -> torch again (in-process: the CLI was exercised above): the same files, bit for
  # bit, loadable by guided-diffusion's UNetModel.
  second = str(tmp_path / "torch_b")
  paths = torch_io.export_torch_checkpoint(config, imported, second)
  assert paths == [os.path.join(second, n) for n in names]
  for name in names:
    a, b = load_pt(os.path.join(first, name)), load_pt(os.path.join(second, name))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name
  from guided_diffusion.unet import UNetModel

  with torch.device("meta"):
    reference = UNetModel(dims=2, **torch_kwargs(config))
  reference.load_state_dict(torch.load(model_file, weights_only=True), strict=True, assign=True)


# --------------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "name,model",
    [
        ("configs.cifar10_adm", {}),
        # ADM's ImageNet-64 network (class embedding, mult (1,2,3,4), attention at 32/16/8 with
        # 64 head channels, scale-shift, resblock up/down, new order) at 64 instead of 192
        # channels and 2 instead of 3 res blocks: 25.7 M instead of 295.9 M parameters.
        ("configs.imagenet64_adm", {"num_channels": 64, "num_res_blocks": 2}),
    ],
    ids=["cifar10", "imagenet64"],
)
def test_imported_model_matches_guided_diffusion(tmp_path, name, model):
  config = load_config(name, **model)
  kwargs = torch_kwargs(config)
  net = torch_model(kwargs)  # every parameter random, zero-initialised ones too
  path = str(tmp_path / "model000123.pt")
  torch.save(net.state_dict(), path)
  workdir = str(tmp_path / "run")
  assert torch_io.import_torch_checkpoint(config, workdir, path) == 123

  weights, step = ckpt_lib.load_model_weights(workdir, -1, model_target(config))
  assert step == 123
  for ema in weights["ema_params"]:  # without EMA files every EMA is the model
    assert_trees_equal(ema, weights["params"])
  batch = inputs(kwargs)
  apply = jax.jit(create_unet(config).apply)
  ours = np.asarray(apply({"params": weights["params"]}, *flax_args(batch)))
  with torch.no_grad():
    y = batch.get("y")
    theirs = net(
        torch.from_numpy(batch["x"]),
        torch.from_numpy(batch["t"]),
        None if y is None else torch.from_numpy(y),
    ).numpy()
  assert rel_err(ours.transpose(0, 3, 1, 2), theirs) <= 1e-5

  if config.data.num_classes:  # the label reaches the network
    x, t, y = flax_args(batch)
    other = apply({"params": weights["params"]}, x, t, (y + 1) % config.data.num_classes)
    assert float(jnp.max(jnp.abs(other - ours))) > 1e-3


# ---------------------------------------------------------------------------------- errors


def _state_dict(config: ml_collections.ConfigDict) -> dict:
  """A well-formed (all-zero) guided-diffusion state dict of `config`'s UNet."""
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), torch_io.params_template(config))
  return {k: torch.from_numpy(v) for k, v in flax_to_torch_state_dict(zeros).items()}


def _corrupt(state: dict, kind: str) -> str:
  """Break the state dict in one way; return the key an error must name."""
  if kind == "extra":
    key = "input_blocks.1.0.not_a_layer.weight"
    state[key] = torch.zeros(3)
  elif kind == "missing":
    key = "label_emb.weight"
    del state[key]
  else:
    key = "middle_block.1.qkv.weight"
    state[key] = torch.zeros(3, 3, 1)
  return key


@pytest.mark.parametrize("kind", ["extra", "missing", "misshaped"])
def test_import_errors_name_the_key(tmp_path, kind):
  config = load_config(TINY_MODULE)
  state = _state_dict(config)
  key = _corrupt(state, kind)
  path = str(tmp_path / "model.pt")
  torch.save(state, path)
  with pytest.raises(CheckpointError, match=re.escape(key)) as info:
    torch_io.import_torch_checkpoint(config, str(tmp_path / "run"), path)
  message = str(info.value)
  assert "\n" not in message and message.endswith(".") and ". " not in message
  assert path in message and "--config" in message
  assert not os.path.exists(ckpt_lib.checkpoint_dir(str(tmp_path / "run")))


def test_import_cli_error_is_one_sentence(tmp_path):
  state = _state_dict(load_config(TINY_MODULE))
  for kind in ("extra", "missing", "misshaped"):
    _corrupt(state, kind)
  path = str(tmp_path / "model.pt")
  torch.save(state, path)
  result = run_utils.run_main(
      str(tmp_path / "run"),
      "--mode=import_torch",
      f"--config.torch_io.checkpoint={path}",
      config=TINY_IMAGENET,
      check=False,
  )
  run_utils.assert_one_sentence_error(
      result,
      path,
      "1 unknown key(s) [input_blocks.1.0.not_a_layer.weight]",
      "1 missing key(s) [label_emb.weight]",
      "1 mis-shaped key(s) [middle_block.1.qkv.weight",
  )


def test_missing_or_unreadable_file_is_one_sentence(tmp_path):
  config = load_config(TINY_MODULE)
  missing = str(tmp_path / "nope.pt")
  with pytest.raises(CheckpointError, match="does not exist"):
    torch_io.import_torch_checkpoint(config, str(tmp_path / "run"), missing)
  garbage = tmp_path / "garbage.pt"
  garbage.write_bytes(b"not a torch file")
  with pytest.raises(CheckpointError, match="could not be read"):
    torch_io.import_torch_checkpoint(config, str(tmp_path / "run"), str(garbage))
  with pytest.raises(CheckpointError, match="no checkpoint found"):
    torch_io.export_torch_checkpoint(config, str(tmp_path / "run"))


class _NotATensor:
  """A pickled object that torch.load(weights_only=True) refuses."""


def test_a_file_that_is_not_a_state_dict_is_one_sentence_of_ours(tmp_path):
  text = tmp_path / "notes.pt"
  text.write_text("these are not weights\n")
  with pytest.raises(CheckpointError) as info:
    torch_io.load_state_dict(str(text))
  assert "neither a torch.save zip archive nor a tensor pickle" in str(info.value)
  objects = tmp_path / "objects.pt"
  torch.save({"model": _NotATensor()}, objects)
  with pytest.raises(CheckpointError) as info:
    torch_io.load_state_dict(str(objects))
  message = str(info.value)
  assert "Python objects besides tensors" in message and "weights_only" not in message
  assert message.count("\n") == 0
  result = run_utils.run_main(
      str(tmp_path / "run"),
      "--mode=import_torch",
      f"--config.torch_io.checkpoint={objects}",
      config=TINY_IMAGENET,
      check=False,
  )
  run_utils.assert_one_sentence_error(result, str(objects), "Python objects besides tensors")
  assert "weights_only" not in result.stderr and "Weights only" not in result.stderr


# ---------------------------------------------------------------------------- end to end


def test_conditional_imagenet64_train_sample_end_to_end(trained):
  config = load_config(TINY_MODULE)
  weights, step = ckpt_lib.load_model_weights(trained, -1, model_target(config))
  assert step == 2
  # Labels reach the network: the trained model's output changes with the label alone.
  x = jax.random.normal(jax.random.key(0), (1, 64, 64, 3))
  t = jnp.array([500], jnp.int32)
  apply = jax.jit(create_unet(config).apply)
  a = apply({"params": weights["params"]}, x, t, jnp.array([3], jnp.int32))
  b = apply({"params": weights["params"]}, x, t, jnp.array([997], jnp.int32))
  assert float(jnp.max(jnp.abs(a - b))) > 0.0

  run_mock_tfds(trained, "--mode=sample")
  samples_dir = os.path.join(trained, "samples")
  (name,) = [n for n in os.listdir(samples_dir) if n.endswith(".npz")]
  with np.load(os.path.join(samples_dir, name)) as arrays:
    images, labels = arrays["arr_0"], arrays["arr_1"]
  assert images.shape == (8, 64, 64, 3) and images.dtype == np.uint8
  assert labels.shape == (8,) and labels.dtype == np.int64
  assert labels.min() >= 0 and labels.max() < 1000 and len(set(labels.tolist())) > 1
