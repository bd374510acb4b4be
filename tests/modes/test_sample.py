"""`--mode=sample`: ADM-format output, batch/device invariance, SIGKILL resume, CLI errors."""

import json
import os
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modes import sample as generate
from modes.config_validation import validate_config
from modes.errors import ConfigError
from sampling.registry import make_sampler
from tests import run_utils
from tests.configs import tiny_digits

TAG = "ddim_nfe3_step2_ema_seed0"
SAMPLE = (
    "--mode=sample",
    "--config.sampling.method=ddim",
    "--config.sampling.nfe=3",
    "--config.sampling.num_samples=12",
)


@pytest.fixture(scope="module")
def trained(trained_tiny, tmp_path_factory) -> str:
  """A copy of the tiny digits model trained for 2 steps (checkpoint at step 2)."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  shutil.copytree(trained_tiny, workdir)
  return workdir


@pytest.fixture(scope="module")
def reference(trained) -> dict:
  """The 12-sample DDIM set drawn on 1 device in batches of 4 (3 chunks, none padded)."""
  run_utils.run_main(trained, *SAMPLE, "--config.sampling.batch_size=4")
  with np.load(os.path.join(trained, "samples", f"{TAG}.npz")) as f:
    return dict(f)


def _load_set(workdir: str, tag: str = TAG) -> np.ndarray:
  with np.load(os.path.join(workdir, "samples", f"{tag}.npz")) as f:
    assert set(f.files) == {"arr_0"}  # unconditional: no labels
    return f["arr_0"]


def test_sample_inputs_depend_only_on_seed_and_index():
  shape = (4, 4, 1)
  noise, keys, labels = generate.sample_inputs(3, jnp.arange(6), shape, 10)
  sub_noise, sub_keys, sub_labels = generate.sample_inputs(3, jnp.asarray([4, 1]), shape, 10)
  np.testing.assert_array_equal(np.asarray(sub_noise), np.asarray(noise)[[4, 1]])
  np.testing.assert_array_equal(
      np.asarray(jax.random.key_data(sub_keys)), np.asarray(jax.random.key_data(keys))[[4, 1]]
  )
  np.testing.assert_array_equal(np.asarray(sub_labels), np.asarray(labels)[[4, 1]])
  other, _, _ = generate.sample_inputs(4, jnp.arange(6), shape, 10)
  assert not np.array_equal(np.asarray(other), np.asarray(noise))


def test_sample_set_is_written_in_adm_format(trained, reference):
  images = reference["arr_0"]
  assert images.shape == (12, 16, 16, 1) and images.dtype == np.uint8
  assert images.std() > 0
  samples = os.path.join(trained, "samples")
  with open(os.path.join(samples, f"{TAG}.json")) as f:
    provenance = json.load(f)
  assert provenance["checkpoint_step"] == 2 and provenance["weights"] == "ema"
  assert provenance["method"] == "ddim" and provenance["nfe"] == 3
  assert provenance["num_samples"] == 12 and provenance["seed"] == 0
  assert provenance["rounding"] == "truncate"
  assert os.path.exists(os.path.join(samples, f"{TAG}.png"))
  (chunk_dir,) = [d for d in os.listdir(os.path.join(samples, TAG)) if d.startswith("b4_")]
  chunks = sorted(os.listdir(os.path.join(samples, TAG, chunk_dir)))
  assert chunks == ["chunk_00000000.npz", "chunk_00000004.npz", "chunk_00000008.npz"]


def test_same_set_for_any_batch_size_and_device_count(trained, reference):
  # Batch 12 on 1 device; batch 8 on 8 devices (one sample each, last chunk padded 4 → 8).
  run_utils.run_main(trained, *SAMPLE, "--config.sampling.batch_size=12")
  np.testing.assert_array_equal(_load_set(trained), reference["arr_0"])
  run_utils.run_main(trained, *SAMPLE, "--config.sampling.batch_size=8", num_devices=8)
  np.testing.assert_array_equal(_load_set(trained), reference["arr_0"])
  # Each batch size has its own chunks: a rerun with another batch size never mixes them.
  dirs = sorted(d.split("_")[0] for d in os.listdir(os.path.join(trained, "samples", TAG)))
  assert dirs == ["b12", "b4", "b8"]
  chunk_dir = [d for d in os.listdir(os.path.join(trained, "samples", TAG)) if d.startswith("b8_")][
      0
  ]
  with np.load(os.path.join(trained, "samples", TAG, chunk_dir, "chunk_00000008.npz")) as f:
    assert f["arr_0"].shape == (4, 16, 16, 1)


def test_rerun_after_sigkill_completes_the_identical_set(trained, tmp_path):
  # nfe 100 makes each chunk of 2 slow enough (~0.3 s) for the kill to land mid-run.
  overrides = (
      "--mode=sample",
      "--config.sampling.method=ddim",
      "--config.sampling.nfe=100",
      "--config.sampling.num_samples=15",
  )
  tag = "ddim_nfe100_step2_ema_seed0"
  shutil.copytree(os.path.join(trained, "checkpoints"), tmp_path / "checkpoints")
  reference = tmp_path / "reference"
  shutil.copytree(os.path.join(trained, "checkpoints"), reference / "checkpoints")
  run_utils.run_main(str(reference), *overrides, "--config.sampling.batch_size=16")
  expected = _load_set(str(reference), tag)

  killed = str(tmp_path)
  killed_overrides = (*overrides, "--config.sampling.batch_size=2")  # 8 chunks, the last of 1
  proc = subprocess.Popen(
      run_utils.main_command(killed, *killed_overrides),
      cwd=run_utils.REPO,
      env=run_utils.subprocess_env(),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  tag_dir = tmp_path / "samples" / tag

  def chunk_files() -> list[str]:
    if not tag_dir.exists():
      return []
    return sorted(str(p) for p in tag_dir.glob("b2_*/chunk_*.npz"))

  deadline = time.time() + 300
  while not chunk_files() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "sampling ended before it could be killed"
  done = chunk_files()
  assert 1 <= len(done) < 8
  assert not (tmp_path / "samples" / f"{tag}.npz").exists()
  mtimes = {p: os.stat(p).st_mtime_ns for p in done}

  run_utils.run_main(killed, *killed_overrides)
  result = _load_set(killed, tag)
  assert result.shape[0] == 15
  np.testing.assert_array_equal(result, expected)
  assert len(chunk_files()) == 8
  # Finished chunks were kept, not redrawn.
  assert {p: os.stat(p).st_mtime_ns for p in done} == mtimes


def test_bad_sampling_settings_are_one_sentence_errors(trained, tmp_path):
  unknown = run_utils.run_main(trained, *SAMPLE, "--config.sampling.method=euler", check=False)
  run_utils.assert_one_sentence_error(unknown, "config.sampling.method = 'euler'", "'dpm_solver++'")
  zero_nfe = run_utils.run_main(trained, *SAMPLE, "--config.sampling.nfe=0", check=False)
  run_utils.assert_one_sentence_error(zero_nfe, "config.sampling.nfe = 0", "≥ 1")
  indivisible = run_utils.run_main(
      trained, *SAMPLE, "--config.sampling.batch_size=12", num_devices=8, check=False
  )
  run_utils.assert_one_sentence_error(indivisible, "config.sampling.batch_size = 12", "8 devices")
  too_few_steps = run_utils.run_main(
      trained,
      *SAMPLE,
      "--config.sampling.method=dpm_solver",
      "--config.sampling.nfe=1",
      check=False,
  )
  run_utils.assert_one_sentence_error(too_few_steps, "config.sampling", "at least 3 model calls")
  untrained = run_utils.run_main(str(tmp_path / "untrained"), *SAMPLE, check=False)
  run_utils.assert_one_sentence_error(untrained, "no checkpoint found", "--mode=train")


def test_the_authors_preset_reaches_dpm_solver_pp_and_only_it():
  config = tiny_digits.get_config()
  config.sampling.method = "dpm_solver++"
  config.sampling.nfe = 5
  assert generate.sampler_options(config) == dict(
      t_start=1.0, truncate_cosine_like_reference=False, clip_denoised=True
  )
  config.sampling.preset = "authors"
  authors = dict(t_start=0.992, truncate_cosine_like_reference=True, clip_denoised=False)
  assert generate.sampler_options(config) == authors
  # The preset changes the samples exactly as the explicit options do.
  model_fn = lambda x, t: 0.3 * x + 1e-3 * t[:, None, None, None]  # noqa: E731
  noise = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
  preset = generate.build_sampler(config)(model_fn, noise)
  explicit = make_sampler("dpm_solver++", 5, "cosine", 1000, **authors)(model_fn, noise)
  np.testing.assert_array_equal(np.asarray(preset), np.asarray(explicit))
  config.sampling.preset = ""
  assert np.abs(np.asarray(generate.build_sampler(config)(model_fn, noise)) - preset).max() > 1e-3
  # Other samplers of the same config keep their own settings.
  config.sampling.preset, config.sampling.method = "authors", "ddim"
  assert generate.sampler_options(config)["clip_denoised"] is True


@pytest.mark.parametrize("key,value", [("preset", "paper"), ("dpm_t_start", 0.0)])
def test_bad_dpm_settings_are_one_sentence(key, value):
  config = tiny_digits.get_config()
  config.sampling[key] = value
  with pytest.raises(ConfigError, match=f"config.sampling.{key}"):
    validate_config(config, "sample")


@pytest.mark.parametrize("use_ema,ema_index", [(False, 0), (True, 0), (True, 1)])
def test_load_params_returns_the_configured_weights(trained_tiny, use_ema, ema_index):
  # tests/conftest.py's run: ema_rates (0.9, 0.99), so params, EMA 0 and EMA 1 all differ.
  from modes import parallel
  from tests.configs import tiny_digits

  config = tiny_digits.get_config()
  config.sampling.use_ema = use_ema
  config.sampling.ema_index = ema_index
  params = generate.load_params(config, trained_tiny, 2, parallel.make_mesh())
  model = run_utils.read_checkpoint(trained_tiny, 2)["model"]
  expected = model["ema_params"][ema_index] if use_ema else model["params"]
  assert run_utils.max_abs_diff(params, expected) == 0.0
  for other in [model["params"], *model["ema_params"]]:
    if other is not expected:
      assert run_utils.max_abs_diff(params, other) > 0.0


def test_to_uint8_is_adm_truncation():
  from modes import images

  # ADM: ((x + 1) * 127.5).clamp(0, 255).to(uint8), i.e. truncation toward zero after the clamp.
  x = np.array([-2.0, -1.0, -0.999, -0.5, 0.0, 0.5, 0.99, 1.0, 3.0], np.float32)
  np.testing.assert_array_equal(
      images.to_uint8(x), np.array([0, 0, 0, 63, 127, 191, 253, 255, 255], np.uint8)
  )
  # -0.999 -> 0.1275, 0.0 -> 127.5, -0.5 -> 63.75: "round" differs exactly there.
  np.testing.assert_array_equal(
      images.to_uint8(x, "round"), np.array([0, 0, 0, 64, 128, 191, 254, 255, 255], np.uint8)
  )
  # Just below 1 the scaled value is 254.5: truncated to 254, only x = 1 reaches 255.
  assert images.to_uint8(np.float32(1 - 1 / 255))[()] == 254
  assert images.to_uint8(np.float32(1.0))[()] == 255
