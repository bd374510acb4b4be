"""LPIPS-VGG v0.1 (evaluation/lpips.py, evaluation/convert_lpips.py): parity with the `lpips`
package on a randomly initialised VGG16, basic properties, the converter's and the config's
one-sentence errors, and one consistency-distillation train step with distance "lpips"."""

import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from modes.config_validation import validate_config
from modes.errors import ConfigError
from evaluation import convert_lpips
from evaluation import lpips as lpips_jax
from evaluation.errors import EvaluationError
from tests import run_utils
from tests.configs import tiny_digits
from tests.test_train_step import _step_setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIAS_STD = 0.01  # standard deviation of the random VGG conv biases of the reference trunk


def _vgg16_stub(torch):
  """torchvision.models with only `vgg16`, built as torchvision's `make_layers(cfgs["D"])`
  (torchvision/models/vgg.py: conv 3x3 pad 1 + ReLU(inplace), "M" = MaxPool2d(2, 2)).

  The test always uses it: PyPI's torchvision wheels are CUDA builds whose C extension does not
  load next to the CPU build of torch (`operator torchvision::nms does not exist`), and the
  lpips package needs only this constructor from it. The LPIPS head, its linear layers and the
  slicing into taps stay the lpips package's.
  """
  nn = torch.nn

  def vgg16(pretrained=False, weights=None, **kwargs):
    assert not pretrained and weights is None, "the test never loads ImageNet weights"
    layers, channels = [], 3
    for v in [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ]:
      if v == "M":
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
      else:
        layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
        channels = v
    return types.SimpleNamespace(features=nn.Sequential(*layers))

  tv = types.ModuleType("torchvision")
  tv.models = types.ModuleType("torchvision.models")
  tv.models.vgg16 = vgg16
  return tv


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(torch lpips.LPIPS with a random VGG16 trunk, path of its converted npz)."""
  import torch

  with pytest.MonkeyPatch.context() as mp:
    stub = _vgg16_stub(torch)
    mp.setitem(sys.modules, "torchvision", stub)
    mp.setitem(sys.modules, "torchvision.models", stub.models)
    import lpips

    torch.manual_seed(0)
    model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, version="0.1", verbose=False)
  # torchvision VGG's kernel init (Kaiming-normal fan_out), redone here so that the stub and
  # torchvision give the same trunk, and small random biases instead of torchvision's zeros, so
  # that a forward that drops or misplaces a bias fails the parity test (issue 16). With
  # N(0, 0.01²) biases every tap still weighs in (measured at 32 px, one unrelated pair: 0.116,
  # 0.022, 0.0081, 0.0046, 0.0021) and the distances differ from the zero-bias trunk's by ~12%
  # (0.153 against 0.175); biases of 0.3 make the deep features of random images nearly
  # constant (tap 5: 1e-4).
  torch.manual_seed(0)
  with torch.no_grad():
    for module in model.net.modules():
      if isinstance(module, torch.nn.Conv2d):
        torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        torch.nn.init.normal_(module.bias, std=BIAS_STD)
  # lpips' `vgg16` keeps torchvision's indices inside slice1..slice5: slicek.N = features.N.
  vgg_state = {
      f"features.{k.split('.', 1)[1]}": v.clone() for k, v in model.net.state_dict().items()
  }
  assert len(vgg_state) == 26
  vgg_state["classifier.0.weight"] = torch.zeros(4, 4)  # ignored, as in torchvision's file
  directory = tmp_path_factory.mktemp("lpips")
  vgg_path, out = str(directory / lpips_jax.VGG16_FILE), str(directory / "lpips_vgg.npz")
  torch.save(vgg_state, vgg_path)
  assert convert_lpips.main([f"--vgg={vgg_path}", f"--out={out}"]) == 0  # --lin: the wheel's
  return model, out


def _torch_lpips(model, a: np.ndarray, b: np.ndarray, resize: int = 0) -> np.ndarray:
  import torch
  import torch.nn.functional as F

  x, y = (torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2))) for v in (a, b))
  if resize:  # what Song et al. (2023) do before LPIPS
    x, y = (F.interpolate(v, size=resize, mode="bilinear", align_corners=False) for v in (x, y))
  with torch.no_grad():
    return model(x, y).numpy().reshape(-1)


def _images(seed: int, shape) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.mark.parametrize("size,resize", [(32, 0), (64, 0), (32, 64)])
def test_matches_the_lpips_package(reference, size, resize):
  model, path = reference
  params = lpips_jax.load_lpips_params(path)
  a, b = _images(1, (3, size, size, 3)), _images(2, (3, size, size, 3))
  b[0] = np.clip(a[0] + 0.05 * b[0], -1, 1)  # one close pair, two unrelated ones
  distance = jax.jit(lpips_jax.lpips_distance, static_argnames="resize")
  ours = np.asarray(distance(params, a, b, resize=resize))
  theirs = _torch_lpips(model, a, b, resize)
  # Measured (CPU): max relative error 4.1e-7 (32 px), 4.6e-7 (64 px), 4.1e-7 (32 -> 64).
  assert np.all(theirs > 0) and theirs[0] < theirs[1]
  np.testing.assert_allclose(ours, theirs, rtol=1e-4)
  # The biases weigh in: without them the distances are far outside the tolerance above.
  unbiased = jax.tree_util.tree_map_with_path(
      lambda path, v: np.zeros_like(v) if "bias" in jax.tree_util.keystr(path) else v, params
  )
  assert np.max(np.abs(np.asarray(distance(unbiased, a, b, resize=resize)) / theirs - 1)) > 0.01


def test_identity_nonnegativity_grey_and_size_limit(reference):
  params = lpips_jax.load_lpips_params(reference[1])
  dist = jax.jit(lpips_jax.lpips_distance, static_argnames="resize")
  a, b = _images(3, (2, 16, 16, 3)), _images(4, (2, 16, 16, 3))
  assert float(jnp.max(jnp.abs(dist(params, a, a)))) <= 1e-6
  assert float(jnp.min(dist(params, a, b))) > 0
  g, h = a[..., :1], b[..., :1]
  np.testing.assert_array_equal(
      dist(params, g, h, resize=24),
      dist(params, np.repeat(g, 3, -1), np.repeat(h, 3, -1), resize=24),
  )
  with pytest.raises(ValueError, match="at least 16x16 pixels"):
    lpips_jax.lpips_distance(params, a[:, :8, :8], b[:, :8, :8])
  lpips_jax.lpips_distance(params, a[:, :8, :8], b[:, :8, :8], resize=16)  # upsampled: fine


def test_converter_maps_every_array(tmp_path, reference):
  import torch

  model, _ = reference
  torch.manual_seed(1)
  vgg = {
      k: torch.randn_like(v)
      for k, v in torch.load(
          os.path.join(os.path.dirname(reference[1]), lpips_jax.VGG16_FILE)
      ).items()
  }
  torch.save(vgg, tmp_path / "vgg.pth")
  out, sha = convert_lpips.convert(str(tmp_path / "vgg.pth"), out=str(tmp_path / "w.npz"))
  assert sha == convert_lpips.file_sha256(out)
  params = lpips_jax.load_lpips_params(out)
  assert len(params) == 13 + 5
  for index in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28):
    layer = params[f"features_{index}"]
    np.testing.assert_array_equal(
        layer["kernel"], vgg[f"features.{index}.weight"].numpy().transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(layer["bias"], vgg[f"features.{index}.bias"].numpy())
  for k, lin in enumerate(model.lins):
    np.testing.assert_array_equal(
        params[f"lin{k}"], lin.model[1].weight.detach().numpy()[0, :, 0, 0]
    )
  with np.load(out) as data:
    assert str(data["source_sha256/vgg"][0]) == convert_lpips.file_sha256(str(tmp_path / "vgg.pth"))
    assert str(data["source_sha256/lin"][0]) == convert_lpips.file_sha256(
        convert_lpips.default_lin_source()
    )


def test_converter_and_loader_errors_are_one_sentence(tmp_path, reference):
  import torch

  good = torch.load(os.path.join(os.path.dirname(reference[1]), lpips_jax.VGG16_FILE))
  bad = str(tmp_path / "no_last_bias.pth")
  torch.save({k: v for k, v in good.items() if k != "features.28.bias"}, bad)
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "evaluation.convert_lpips",
          f"--vgg={bad}",
          f"--out={tmp_path / 'x.npz'}",
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      env=run_utils.subprocess_env(),
  )
  run_utils.assert_one_sentence_error(result, bad, "lacks 'features.28.bias'")
  torch.save({**good, "features.0.weight": torch.zeros(64, 3, 5, 5)}, bad)
  with pytest.raises(EvaluationError, match=r"'features.0.weight' of shape \(64, 3, 5, 5\)"):
    convert_lpips.convert(bad, out=str(tmp_path / "x.npz"))
  with pytest.raises(EvaluationError, match="does not exist"):
    convert_lpips.convert(str(tmp_path / "missing.pth"), out=str(tmp_path / "x.npz"))
  assert not os.path.exists(tmp_path / "x.npz")

  missing = str(tmp_path / "none.npz")
  with pytest.raises(EvaluationError) as e:
    lpips_jax.load_lpips_params(missing)
  assert f"not found at {missing}" in str(e.value)
  assert "python -m evaluation.convert_lpips --vgg=" in str(e.value)
  damaged = tmp_path / "damaged.npz"
  damaged.write_bytes(open(reference[1], "rb").read()[:1000])
  with pytest.raises(EvaluationError, match="could not be read.*convert_lpips"):
    lpips_jax.load_lpips_params(str(damaged))


def _lpips_config(weights: str, **overrides):
  config = tiny_digits.get_config()
  config.consistency.update(
      dict(mode="distill", teacher="unused", distance="lpips", lpips_weights=weights, **overrides)
  )
  return config


def test_config_needs_the_weight_file(tmp_path, reference):
  missing = str(tmp_path / "absent.npz")
  with pytest.raises(ConfigError) as e:
    validate_config(_lpips_config(missing))
  message = str(e.value)
  assert missing in message and "python -m evaluation.convert_lpips" in message
  assert message.count(". ") == 0 and message.endswith("."), message  # one sentence
  validate_config(_lpips_config(reference[1]))
  validate_config(_lpips_config(reference[1], lpips_resize=0))  # digits are 16x16
  for resize in (-1, 8):
    with pytest.raises(ConfigError, match="lpips_resize"):
      validate_config(_lpips_config(reference[1], lpips_resize=resize))


def test_cd_train_step_with_lpips(reference):
  params = lpips_jax.load_lpips_params(reference[1])
  key = jax.random.key(5)
  runs = {}
  for name, extra in (("lpips", dict(distance="lpips", lpips_resize=0)), ("l2", {})):
    _, _, _, _, state, batch, step = _step_setup(
        optax.sgd(1.0), consistency=dict(mode="distill", teacher="unused", num_scales=10, **extra)
    )
    # The l2 run is test_train_step's plain CD step (one program, compiled once per cache).
    frozen = (params,) if name == "lpips" else ()
    runs[name] = step(jax.tree.map(jnp.copy, state), batch, key, state.params, *frozen)
  (lp_state, lp), (_, l2) = runs["lpips"], runs["l2"]
  assert np.isfinite(float(lp["loss"])) and float(lp["loss"]) > 0
  assert np.isfinite(float(lp["grad_norm"])) and float(lp["grad_norm"]) > 0
  assert int(lp_state.skipped_updates) == 0
  assert abs(float(lp["loss"]) - float(l2["loss"])) > 1e-3 * float(l2["loss"])
