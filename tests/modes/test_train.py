"""The training core end to end: learning, device-count invariance, exact resume, init_from."""

import os
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modes import checkpoint as ckpt_lib
from modes import data as data_lib
from modes import train, train_programs
from modes.factories import create_diffusion, create_optimizer, create_unet
from tests import run_utils
from tests.configs import tiny_digits


def _eval_mse(params, config, model, diffusion, images, key) -> float:
  """ε-MSE on a fixed batch, fixed uniform t and fixed noise (the quantity training lowers)."""
  x0 = train_programs.preprocess_images(jnp.asarray(images), None)
  k_t, k_n = jax.random.split(key)
  t = jax.random.randint(k_t, (x0.shape[0],), 0, diffusion.num_timesteps)
  noise = jax.random.normal(k_n, x0.shape)
  out = model.apply(
      {"params": params},
      diffusion.q_sample(x0, t, noise),
      diffusion.model_timesteps(t),
      train=False,
  )
  eps = out[..., : config.data.channels]
  return float(jnp.mean((eps - noise) ** 2))


def test_loss_falls_on_digits(tmp_path):
  config = tiny_digits.get_config()
  config.train.num_steps = 60
  config.train.log_every = 20
  config.train.checkpoint_every = 60
  config.train.async_checkpointing = False
  state = train.train(config, str(tmp_path))

  model = create_unet(config)
  diffusion = create_diffusion(config)
  images = data_lib.load_dataset("digits").images[:128]
  key = jax.random.key(123)
  init = train_programs.init_params(model, config, jax.random.key(0))
  mse_init = _eval_mse(init, config, model, diffusion, images, key)
  mse_trained = _eval_mse(state.params, config, model, diffusion, images, key)
  # ADM zero-initialises the output conv, so the untrained model predicts ε = 0: MSE = E[ε²] ≈ 1.
  assert mse_init == pytest.approx(1.0, abs=0.05)
  # 60 steps of batch 16 bring the ε-MSE of the test UNet well below 0.2 (measured: 0.107 after
  # 60 steps, 0.097 after 100); an untrained or non-learning model stays at ~1.
  assert mse_trained < 0.2, mse_trained
  assert int(state.step) == 60
  assert os.path.isdir(tmp_path / "checkpoints" / "60")
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


# The paper's learning rate. Adam divides each gradient by its own running scale, so it
# amplifies the float32 reduction-order noise of the 8-way gradient all-reduce in proportion to
# the learning rate: at 1e-3 the parameters differ by ~4e-5, at 1e-4 by ~4e-6.
PLAIN = ("--config.train.async_checkpointing=False", "--config.optim.learning_rate=1e-4")
# 12 steps with every checkpoint (3, 6, 9, 12) kept; the schedule is constant, so its
# checkpoint 3 is the state of a 3-step run.
TWELVE_STEPS = (
    *PLAIN,
    "--config.train.num_steps=12",
    "--config.train.checkpoint_every=3",
    "--config.train.keep_checkpoints=4",
    "--config.train.log_every=3",
)


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory) -> str:
  """Workdir of `TWELVE_STEPS` on one device: the reference of the eight-device run (at step 3)
  and of the run killed and resumed (at step 12). Read it only."""
  workdir = str(tmp_path_factory.mktemp("one_device") / "run")
  run_utils.run_main(workdir, *TWELVE_STEPS)
  return workdir


def test_one_and_eight_devices_give_the_same_parameters(tmp_path, one_device_run):
  run_utils.run_main(str(tmp_path / "eight"), *PLAIN, "--config.train.num_steps=3", num_devices=8)
  one = run_utils.read_checkpoint(one_device_run, 3)
  eight = run_utils.read_checkpoint(str(tmp_path / "eight"))
  assert int(one["train"]["step"]) == int(eight["train"]["step"]) == 3
  assert run_utils.max_abs_diff(one["model"], eight["model"]) <= 1e-5
  assert (
      run_utils.max_abs_diff(one["train"]["sampler_state"], eight["train"]["sampler_state"]) <= 1e-5
  )
  # The parameters did move: the comparison is not between two initialisations.
  init_moved = run_utils.max_abs_diff(one["model"]["params"], one["model"]["ema_params"][1])
  assert init_moved > 1e-4


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, one_device_run):
  killed = tmp_path / "killed"
  proc = subprocess.Popen(
      run_utils.main_command(str(killed), *TWELVE_STEPS),
      cwd=run_utils.REPO,
      env=run_utils.subprocess_env(),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  marker = killed / "checkpoints" / "6"
  deadline = time.time() + 600
  while not marker.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  assert not (killed / "train_done.json").exists()
  interrupted_at = max(int(d) for d in os.listdir(killed / "checkpoints") if d.isdigit())
  assert 6 <= interrupted_at < 12

  run_utils.run_main(str(killed), *TWELVE_STEPS)  # resumes from the last finished checkpoint
  ref = run_utils.read_checkpoint(one_device_run, 12)
  res = run_utils.read_checkpoint(str(killed), 12)
  assert run_utils.max_abs_diff(ref["model"], res["model"]) == 0.0
  assert run_utils.max_abs_diff(ref["train"], res["train"]) == 0.0


def test_init_from_keeps_weights_and_ema_with_a_fresh_optimizer(tmp_path, trained_tiny):
  source = trained_tiny
  saved = run_utils.read_checkpoint(source, 2)

  config = tiny_digits.get_config()
  config.train.init_from = source
  model = create_unet(config)
  tx = create_optimizer(config.optim)
  fresh = train_programs.init_train_state(model, tx, config, jax.random.key(7))
  checkpointer = ckpt_lib.Checkpointer(
      str(tmp_path / "target" / "checkpoints"), save_every=1, keep=1, async_save=False
  )
  state = train.restore_or_init(config, fresh, checkpointer)
  checkpointer.close()

  assert run_utils.max_abs_diff(state.params, saved["model"]["params"]) == 0.0
  assert run_utils.max_abs_diff(list(state.ema_params), saved["model"]["ema_params"]) == 0.0
  # EMA carried, not re-initialised from the params: the two differ after 2 steps.
  assert run_utils.max_abs_diff(state.ema_params[0], state.params) > 0.0
  # Fresh optimizer and sampler, step counting restarts at 0.
  assert int(state.step) == 0
  assert run_utils.max_abs_diff(state.opt_state, tx.init(state.params)) == 0.0
  assert int(np.sum(np.asarray(state.sampler_state.loss_counts))) == 0
  assert int(np.sum(saved["train"]["sampler_state"]["loss_counts"])) > 0

  # A step count that the source does not have is a one-sentence error.
  config.train.init_from_step = 99
  with pytest.raises(ckpt_lib.CheckpointError, match="step 99"):
    train.restore_or_init(
        config,
        fresh,
        ckpt_lib.Checkpointer(
            str(tmp_path / "other" / "checkpoints"), save_every=1, keep=1, async_save=False
        ),
    )


# ---------------------------------------------------------------------------------------------
# Adversarial-training runs: device-count invariance and exact resume with a carried δ
# ---------------------------------------------------------------------------------------------

AT_OVERRIDES = (
    "--config.adversarial.mode=fast",
    "--config.adversarial.num_replays=2",
    "--config.adversarial.init=carry",
    "--config.optim.learning_rate=1e-4",
    "--config.train.async_checkpointing=False",
    "--config.train.checkpoint_every=2",
)


def test_at_runs_equal_on_one_and_eight_devices_and_resume_exactly(tmp_path):
  run_utils.run_main(str(tmp_path / "one"), *AT_OVERRIDES, "--config.train.num_steps=4")
  run_utils.run_main(
      str(tmp_path / "eight"), *AT_OVERRIDES, "--config.train.num_steps=4", num_devices=8
  )
  # As if stopped after checkpoint 2; resumed to 4 in a new process: δ comes back from it.
  run_utils.copy_as_stopped_at(str(tmp_path / "one"), str(tmp_path / "resumed"), 2)
  run_utils.run_main(str(tmp_path / "resumed"), *AT_OVERRIDES, "--config.train.num_steps=4")
  one = run_utils.read_checkpoint(str(tmp_path / "one"), 4)
  eight = run_utils.read_checkpoint(str(tmp_path / "eight"), 4)
  resumed = run_utils.read_checkpoint(str(tmp_path / "resumed"), 4)
  assert int(one["train"]["num_updates"]) == 8
  assert float(np.abs(one["train"]["delta"]).max()) > 0  # δ is carried and non-trivial
  assert run_utils.max_abs_diff(one["model"], eight["model"]) <= 1e-5
  assert run_utils.max_abs_diff(one["train"]["delta"], eight["train"]["delta"]) <= 1e-4
  assert run_utils.max_abs_diff(one["model"], resumed["model"]) == 0.0
  assert run_utils.max_abs_diff(one["train"], resumed["train"]) == 0.0


def test_sample_grid_is_the_ema_ancestral_samples(tmp_path):
  # The periodic grid of the train loop (train.sample_every > 0): the PNG has the pixel size of
  # sample_grid_size tiles and holds ADM's ancestral samples of the first EMA's params, with
  # sample i's noise and step keys from (config.seed, i) (modes/sample_grid.py).
  from PIL import Image

  from modes import images as image_lib
  from sampling.ancestral import ancestral_sample, per_sample_noise

  config = tiny_digits.get_config()
  config.train.num_steps = 2
  config.train.sample_every = 2
  config.train.sample_grid_size = 6
  config.train.async_checkpointing = False
  state = train.train(config, str(tmp_path))
  path = tmp_path / "samples" / "grid_00000002.png"
  assert sorted(os.listdir(tmp_path / "samples")) == [path.name]
  png = np.asarray(Image.open(path))
  # 6 tiles of 16x16 in 3 columns x 2 rows with 1-pixel gaps, upscaled 2x, grey -> RGB.
  assert png.shape == (2 * (2 * 17 + 1), 2 * (3 * 17 + 1), 3) and png.dtype == np.uint8

  model = create_unet(config)
  diffusion = create_diffusion(config, config.train.sample_respacing)
  key = jax.random.split(jax.random.key(config.seed), 3)[2]
  indices = jnp.arange(6)
  noise = per_sample_noise(key, indices, (16, 16, 1))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, 1), i))(indices)

  def direct(params):
    def model_fn(x, t):
      return model.apply({"params": params}, x, diffusion.model_timesteps(t), train=False)

    samples = jax.jit(lambda n, k: ancestral_sample(model_fn, n, diffusion, k, learn_sigma=True))(
        noise, keys
    )
    return image_lib.make_grid(image_lib.to_uint8(np.asarray(samples)))

  expected = direct(state.ema_params[0])
  np.testing.assert_array_equal(png[::2, ::2], expected)
  np.testing.assert_array_equal(png[1::2, 1::2], expected)  # nearest-neighbour upscale
  # The grid is of the EMA, not of the raw weights, and not the untrained network's.
  assert np.any(direct(state.params) != expected)
  assert np.any(direct(train_programs.init_params(model, config, jax.random.key(0))) != expected)


def test_bfloat16_training_lowers_the_loss_and_keeps_float32_state(tmp_path):
  config = tiny_digits.get_config()
  config.model.compute_dtype = "bfloat16"
  config.train.num_steps = 40
  config.train.log_every = 40
  config.train.checkpoint_every = 40
  config.train.async_checkpointing = False
  state = train.train(config, str(tmp_path))
  model = create_unet(config)
  assert model.dtype == jnp.bfloat16
  leaves = jax.tree.leaves((state.params, state.ema_params, state.opt_state))
  assert all(x.dtype == jnp.float32 for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))
  diffusion = create_diffusion(config)
  images = data_lib.load_dataset("digits").images[:128]
  key = jax.random.key(123)
  init = train_programs.init_params(model, config, jax.random.key(0))
  mse_init = _eval_mse(init, config, model, diffusion, images, key)
  mse_trained = _eval_mse(state.params, config, model, diffusion, images, key)
  assert mse_init == pytest.approx(1.0, abs=0.05)  # zero-initialised output: ε̂ = 0
  # 40 bfloat16 steps of batch 16 at lr 1e-3 learn (60 float32 steps reach < 0.2, above); a
  # non-learning run, or one whose bfloat16 gradients vanish, stays at ~1.
  assert mse_trained < 0.6, mse_trained


def test_the_cost_estimate_and_the_stages_share_one_traced_step_program(tmp_path, monkeypatch):
  # `train_programs.shared_programs`: the story's estimate times the program its stage then
  # runs, and a stage that differs only in steps, seed or start (a later stage, a study's next
  # seed) runs it too: the step is traced once per process. A setting of the step makes a
  # program of its own.
  import copy

  from adv_diffusion import train_step as step_lib
  from modes import parallel, story_estimate

  traced = []
  real_step = step_lib.train_step

  def counting_step(*args, **kwargs):
    traced.append(kwargs["settings"])
    return real_step(*args, **kwargs)

  monkeypatch.setattr(step_lib, "train_step", counting_step)
  monkeypatch.setattr(train_programs, "_SHARED_PROGRAMS", {})
  config = tiny_digits.get_config()
  config.train.num_steps = 2
  config.train.async_checkpointing = False
  assert story_estimate.train_step_seconds(config, 1) > 0
  assert len(traced) == 1
  stage = copy.deepcopy(config)
  stage.seed, stage.train.num_steps, stage.train.log_every = 7, 3, 3
  train.train(stage, str(tmp_path / "stage"))
  assert len(traced) == 1
  assert int(ckpt_lib.checkpoint_steps(ckpt_lib.checkpoint_dir(str(tmp_path / "stage")))[-1]) == 3

  mesh = parallel.make_mesh()
  for key, value in (
      ("optim.learning_rate", 2e-3),
      ("adversarial.num_replays", 2),
      ("train.ema_rates", (0.5,)),
      ("model.dropout", 0.0),
      ("data.random_flip", True),
  ):
    changed = copy.deepcopy(config)
    section, name = key.split(".")
    changed[section][name] = value
    assert train_programs.shared_programs(changed, mesh) is not train_programs.shared_programs(
        config, mesh
    ), key
  assert train_programs.shared_programs(stage, mesh) is train_programs.shared_programs(config, mesh)
