"""Weights files (`modes/weights_file.py`): a run's EMA params exported to one .npz and read back
by `train.init_from`, with its sha256 checked; every bad file is one sentence."""

import os
import re
import shutil

import jax
import numpy as np
import pytest

from modes import weights_file
from modes.errors import CheckpointError
from tests import run_utils


def _tree(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {
      "conv_in": {"kernel": rng.normal(size=(3, 3, 1, 4)), "bias": rng.normal(size=(4,))},
      "block_0": {"norm": {"scale": rng.normal(size=(4,))}},
  }


def _target() -> dict:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.float32), _tree())


def _one_sentence(msg: str) -> bool:
  return "\n" not in msg and msg.endswith(".") and len(msg) < 500


def test_round_trip_keeps_every_leaf_and_the_provenance(tmp_path):
  path = str(tmp_path / "w.npz")
  digest = weights_file.save_weights(path, _tree(), {"step": 7})
  loaded = weights_file.load_weights(path, _target(), sha256=digest)
  for want, got in zip(jax.tree.leaves(_tree()), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(got, want.astype(np.float32))
    assert got.dtype == np.float32
  assert jax.tree.structure(loaded) == jax.tree.structure(_tree())
  assert weights_file.weights_provenance(path) == {"step": 7}


def test_bad_weights_files_are_one_sentence(tmp_path):
  path = str(tmp_path / "w.npz")
  digest = weights_file.save_weights(path, _tree(), {})
  garbage = tmp_path / "garbage.npz"
  garbage.write_text("not a zip")
  other = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape + (1,), np.float32), _tree())
  cases = [
      (lambda: weights_file.load_weights(str(tmp_path / "none.npz"), _target()), "does not exist"),
      (lambda: weights_file.load_weights(path, _target(), sha256="0" * 64), "sha256"),
      (lambda: weights_file.load_weights(str(garbage), _target()), "not a readable"),
      (lambda: weights_file.load_weights(path, other), "3 differently shaped"),
      (lambda: weights_file.load_weights(path, {"conv_in": _target()["conv_in"]}), "1 unexpected"),
  ]
  for call, match in cases:
    with pytest.raises(CheckpointError, match=match) as info:
      call()
    assert _one_sentence(str(info.value)), str(info.value)
  assert weights_file.load_weights(path, _target(), sha256=digest) is not None


def test_exported_ema_weights_start_a_run_exactly(tmp_path, trained_tiny):
  source = str(tmp_path / "source")
  shutil.copytree(trained_tiny, source)  # export writes into the run's directory
  export = run_utils.run_main(source, "--mode=export_weights")
  line = re.search(r"sha256 ([0-9a-f]{64})  (\S+)", export.stdout)
  assert line, export.stdout
  digest, path = line.groups()
  assert path == os.path.join(source, "export", "ema0_step2.npz")
  assert weights_file.weights_provenance(path)["step"] == 2

  # A learning rate of 1e-30 leaves the weights where they started (an Adam update moves a
  # weight by ~1e-30), so the new run's step-1 params and both EMAs must equal the source's
  # first EMA to ~1e-30; any other start (the raw params, a fresh init) differs by > 1e-3.
  start = str(tmp_path / "start")
  run_utils.run_main(
      start,
      "--config.train.num_steps=1",
      "--config.train.checkpoint_every=1",
      "--config.optim.learning_rate=1e-30",
      "--config.optim.weight_decay=0.0",
      f"--config.train.init_from={path}",
      f"--config.train.init_from_sha256={digest}",
  )
  ema = run_utils.read_checkpoint(source)["model"]["ema_params"][0]
  started = run_utils.read_checkpoint(start)["model"]
  assert run_utils.max_abs_diff(started["params"], ema) < 1e-20
  for tree in started["ema_params"]:  # r·w + (1 − r)·w rounds to within an ulp of w
    assert run_utils.max_abs_diff(tree, ema) < 1e-6
  assert run_utils.max_abs_diff(ema, run_utils.read_checkpoint(source)["model"]["params"]) > 1e-3

  wrong = run_utils.run_main(
      str(tmp_path / "wrong"),
      f"--config.train.init_from={path}",
      f"--config.train.init_from_sha256={'0' * 64}",
      check=False,
  )
  run_utils.assert_one_sentence_error(wrong, "sha256", path)
  assert not os.path.exists(os.path.join(str(tmp_path / "wrong"), "checkpoints"))
