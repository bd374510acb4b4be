"""Long-run safety: SIGTERM saves and exits 0, damaged checkpoints fall back, non-finite updates
are skipped or stop the run and never reach a checkpoint, bad workdirs fail at start-up."""

import glob
import os
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modes import checkpoint as ckpt_lib
from modes import data as data_lib
from modes import nonfinite, parallel, train_programs
from modes.errors import NonFiniteError, UserFacingError
from modes.factories import create_diffusion, create_optimizer, create_unet
from modes.workdir import check_free_space
from tests import run_utils
from tests.configs import tiny_digits

EVERY_STEP = (
    "--config.train.num_steps=3",
    "--config.train.checkpoint_every=1",
    "--config.train.async_checkpointing=False",
)


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory) -> str:
  """A tiny run with checkpoints at steps 1, 2 and 3."""
  workdir = str(tmp_path_factory.mktemp("three"))
  run_utils.run_main(workdir, *EVERY_STEP)
  return workdir


def _damage(workdir: str, step: int) -> None:
  """Truncates the largest data file of the model weights of checkpoint `step` to half."""
  files = glob.glob(
      os.path.join(workdir, "checkpoints", str(step), "model", "**", "d", "*"), recursive=True
  )
  victim = max(files, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
  workdir = tmp_path / "run"
  log = tmp_path / "stderr.txt"
  with open(log, "w") as err:
    proc = subprocess.Popen(
        run_utils.main_command(
            str(workdir),
            "--config.train.num_steps=100000",
            "--config.train.checkpoint_every=100000",
            "--config.train.preemption_grace_seconds=120",
        ),
        cwd=run_utils.REPO,
        env=run_utils.subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=err,
    )
    deadline = time.time() + 600
    while (
        "optimizer_updates=" not in log.read_text()
        and proc.poll() is None
        and time.time() < deadline
    ):
      time.sleep(0.05)  # wait until a few steps have run
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
  assert proc.returncode == 0, log.read_text()[-3000:]
  steps = ckpt_lib.checkpoint_steps(str(workdir / "checkpoints"))
  assert len(steps) == 1 and 1 <= steps[0] < 100000  # saved at the step it stopped, not before
  assert int(run_utils.read_checkpoint(str(workdir))["train"]["step"]) == steps[0]
  assert not (workdir / "train_done.json").exists()
  assert "Preempted: saved the checkpoint of step" in log.read_text()


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(three_checkpoints, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(three_checkpoints, workdir)
  _damage(workdir, 3)
  result = run_utils.run_main(
      workdir,
      "--config.train.num_steps=4",
      "--config.train.checkpoint_every=1",
      "--config.train.async_checkpointing=False",
  )
  assert "Falling back to checkpoint step 2" in result.stderr
  assert "Resuming from" in result.stderr and "at step 2." in result.stderr
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  assert any(n.startswith("damaged_3_") for n in names)
  assert ckpt_lib.checkpoint_steps(os.path.join(workdir, "checkpoints"))[-1] == 4
  # Steps 3 and 4 were trained again from step 2: the new step 3 equals the original one (the
  # source's step 3 is intact; only the copy's was damaged), bit for bit.
  original = run_utils.read_checkpoint(three_checkpoints, 3)
  retrained = run_utils.read_checkpoint(workdir, 3)
  assert int(retrained["train"]["step"]) == 3
  assert int(run_utils.read_checkpoint(workdir, 4)["train"]["step"]) == 4
  assert run_utils.max_abs_diff(original["model"], retrained["model"]) == 0.0
  assert run_utils.max_abs_diff(original["train"], retrained["train"]) == 0.0


def test_every_checkpoint_damaged_is_one_sentence(three_checkpoints, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(three_checkpoints, workdir)
  for step in (1, 2, 3):
    _damage(workdir, step)
  result = run_utils.run_main(workdir, "--config.train.num_steps=4", check=False)
  run_utils.assert_one_sentence_error(result, "cannot be read", "[3, 2, 1]")
  assert ckpt_lib.checkpoint_steps(os.path.join(workdir, "checkpoints")) == [1, 2, 3]


def test_sampling_the_latest_checkpoint_skips_a_damaged_one(three_checkpoints, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(three_checkpoints, workdir)
  _damage(workdir, 3)
  config = tiny_digits.get_config()
  model = create_unet(config)
  params = train_programs.init_params(model, config, jax.random.key(0))
  target = {"params": params, "ema_params": (params, params)}
  restored, step = ckpt_lib.load_model_weights(workdir, -1, target)
  assert step == 2
  expected = run_utils.read_checkpoint(three_checkpoints, 2)["model"]
  assert run_utils.max_abs_diff(expected["params"], restored["params"]) == 0.0
  with pytest.raises(ckpt_lib.CheckpointError, match=r"step\(s\) \[3\].*cannot be read"):
    ckpt_lib.load_model_weights(workdir, 3, target)


@pytest.fixture(scope="module")
def compiled_step():
  config = tiny_digits.get_config()
  config.train.batch_size = 8
  mesh = parallel.make_mesh()
  model = create_unet(config)
  tx = create_optimizer(config.optim)
  state = train_programs.create_train_state(model, tx, config, jax.random.key(0), mesh)
  step_fn = train_programs.make_step_fn(model, create_diffusion(config), tx, config)
  step = jax.jit(lambda s, b, k: step_fn(s, b, k))
  images = data_lib.load_dataset("digits").images[:8]
  return step, state, images


def test_a_nonfinite_minibatch_is_skipped_and_training_goes_on(compiled_step):
  step, state, images = compiled_step
  key = jax.random.key(1)
  # Float images (uint8 cannot hold a NaN): one compiled program for all three steps.
  good = {"image": jnp.asarray(images, jnp.float32), "label": jnp.zeros(8, jnp.int32)}
  state, _ = step(state, good, key)  # one real update so that the output conv is non-zero
  poisoned = {"image": good["image"].at[0, 3, 3, 0].set(jnp.nan), "label": good["label"]}
  skipped, metrics = step(state, poisoned, key)
  assert not np.isfinite(float(metrics["loss"]))
  assert int(skipped.skipped_updates) == 1 and int(skipped.step) == int(state.step) + 1
  assert int(skipped.num_updates) == int(state.num_updates)
  unchanged = lambda s: (s.params, s.ema_params, s.opt_state, s.sampler_state)  # noqa: E731
  assert run_utils.max_abs_diff(unchanged(state), unchanged(skipped)) == 0.0
  after, metrics = step(skipped, good, key)
  assert bool(metrics["params_finite"]) and int(after.skipped_updates) == 1
  assert run_utils.max_abs_diff(state.params, after.params) > 0.0


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_nonfinite_weights_never_reach_a_checkpoint(three_checkpoints, tmp_path, mode):
  # A run started from weights that hold a NaN: every update is non-finite.
  source = str(tmp_path / "nan_source")
  shutil.copytree(three_checkpoints, source)
  config = tiny_digits.get_config()
  params = train_programs.init_params(create_unet(config), config, jax.random.key(0))
  params = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), params)
  shutil.rmtree(os.path.join(source, "checkpoints"))
  checkpointer = ckpt_lib.Checkpointer(
      os.path.join(source, "checkpoints"), save_every=1, keep=1, async_save=False
  )
  checkpointer.save(1, {"params": params, "ema_params": (params, params), "step": 1})
  checkpointer.close()
  workdir = str(tmp_path / "run")
  result = run_utils.run_main(
      workdir,
      f"--config.train.init_from={source}",
      f"--config.train.on_nonfinite={mode}",
      *EVERY_STEP,
      check=False,
  )
  run_utils.assert_one_sentence_error(
      result, "parameters are not finite at step 1", "no checkpoint was written"
  )
  assert ckpt_lib.checkpoint_steps(os.path.join(workdir, "checkpoints")) == []


def test_nonfinite_policy_of_the_loop():
  config = tiny_digits.get_config()
  finite = {"skipped_updates": np.int32(0), "params_finite": np.bool_(True)}
  skipped = {"skipped_updates": np.int32(1), "params_finite": np.bool_(True)}
  for mode in ("skip", "stop"):
    config.train.on_nonfinite = mode
    counter = nonfinite.SkipCounter(seen=0)
    nonfinite.check_finite(5, finite, config, counter, saving=True)
    assert (counter.seen, counter.in_a_row) == (0, 0)
  config.train.on_nonfinite = "skip"
  counter = nonfinite.SkipCounter(seen=0)
  nonfinite.check_finite(5, skipped, config, counter, saving=True)  # logged, goes on
  assert (counter.seen, counter.in_a_row) == (1, 1)
  config.train.on_nonfinite = "stop"
  with pytest.raises(UserFacingError, match="step 5 produced a non-finite loss or update"):
    nonfinite.check_finite(5, skipped, config, nonfinite.SkipCounter(seen=0), saving=False)
  counter = nonfinite.SkipCounter(seen=1, last_step=5)
  nonfinite.check_finite(6, skipped, config, counter, saving=False)  # already reported
  bad_state = {"skipped_updates": np.int32(1), "params_finite": np.bool_(False)}
  nonfinite.check_finite(7, bad_state, config, counter, saving=False)
  with pytest.raises(UserFacingError, match="not finite at step 8, so no checkpoint"):
    nonfinite.check_finite(8, bad_state, config, counter, saving=True)


def _metrics(skips: int) -> dict:
  return {"skipped_updates": np.int32(skips), "params_finite": np.bool_(True)}


def test_consecutive_skips_are_counted_exactly_and_capped():
  config = tiny_digits.get_config()
  config.train.max_consecutive_skips = 3
  counter = nonfinite.SkipCounter(seen=0)
  check = lambda step, skips: nonfinite.check_finite(  # noqa: E731
      step, _metrics(skips), config, counter, saving=False, last_checkpoint=lambda: 4
  )
  # Skips at steps 1, 2, a good step 3 resets the streak, skips at 4, 5 (step 5 read twice, as
  # at a checkpoint and then by the loop, counts once), and the third in a row, 6, stops.
  for step, skips in ((1, 1), (2, 2), (3, 2), (4, 3), (5, 4), (5, 4)):
    check(step, skips)
  assert (counter.seen, counter.in_a_row) == (4, 2)
  with pytest.raises(NonFiniteError) as info:
    check(6, 5)
  message = str(info.value)
  assert "last 3 steps (up to step 6)" in message and "checkpoint step 4 kept" in message
  assert message.count("\n") == 0
  config.train.max_consecutive_skips = 0  # no cap
  counter = nonfinite.SkipCounter(seen=0)
  for step in range(1, 50):
    check(step, step)
  assert counter.in_a_row == 49


def test_a_run_of_nonfinite_steps_stops_and_keeps_its_checkpoints(three_checkpoints, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(three_checkpoints, workdir)
  # ADM-IP noise of γ = 1e30 makes the VLB term infinite at every step: every update skipped.
  result = run_utils.run_main(
      workdir,
      "--config.train.num_steps=10",
      "--config.diffusion.input_perturbation=1e30",
      "--config.train.max_consecutive_skips=2",
      check=False,
  )
  run_utils.assert_one_sentence_error(
      result, "last 2 steps (up to step 5)", "max_consecutive_skips = 2", "checkpoint step 3 kept"
  )
  assert ckpt_lib.checkpoint_steps(os.path.join(workdir, "checkpoints")) == [1, 2, 3]
  restored = run_utils.read_checkpoint(workdir, 3)
  original = run_utils.read_checkpoint(three_checkpoints, 3)
  assert run_utils.max_abs_diff(original, restored) == 0.0


def test_resuming_with_other_network_settings_names_them(three_checkpoints, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(three_checkpoints, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    before = f.read()
  result = run_utils.run_main(
      workdir,
      "--config.train.num_steps=4",
      "--config.model.num_channels=64",
      "--config.data.num_classes=10",
      "--config.model.dropout=0.3",  # changes no shape: not named
      check=False,
  )
  run_utils.assert_one_sentence_error(
      result, "model.num_channels = 32 there, 64 here", "data.num_classes = 0 there, 10 here"
  )
  assert "dropout" not in result.stderr.strip().splitlines()[-1]
  assert "orbax" not in result.stderr.lower()
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == before  # the workdir's record of its settings is kept
  assert ckpt_lib.checkpoint_steps(os.path.join(workdir, "checkpoints")) == [1, 2, 3]


def test_unwritable_workdir_is_one_sentence(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  result = run_utils.run_main(str(blocker / "run"), check=False)
  run_utils.assert_one_sentence_error(result, "cannot be written", "--workdir")


def test_full_disk_is_one_sentence(tmp_path):
  free = shutil.disk_usage(tmp_path).free
  with pytest.raises(UserFacingError, match="MiB free but one checkpoint of this run needs"):
    check_free_space(str(tmp_path), free + 2**30)
  check_free_space(str(tmp_path), 1)  # enough room: no error
