"""Config validation, one-sentence CLI errors, and the data pipeline (digits and mocked TFDS)."""

import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from modes import data as data_lib
from modes import train_programs
from modes.config_validation import validate_config
from modes.errors import ConfigError, DatasetNotPreparedError
from tests import run_utils

SHIPPED_CONFIGS = sorted(
    name[:-3]
    for name in os.listdir(os.path.join(run_utils.REPO, "configs"))
    if name.endswith(".py") and name != "__init__.py"
)


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_shipped_configs_are_valid(name):
  validate_config(importlib.import_module(f"configs.{name}").get_config())


def test_cifar10_config_is_the_papers_recipe():
  c = importlib.import_module("configs.cifar10_adm").get_config()
  assert (c.model.num_channels, tuple(c.model.channel_mult), c.model.num_res_blocks) == (
      128,
      (1, 2, 2, 2),
      3,
  )
  assert tuple(c.model.attention_resolutions) == (16, 8) and c.model.num_head_channels == 32
  assert c.model.dropout == 0.3 and c.model.learn_sigma and c.model.use_scale_shift_norm
  assert c.model.resblock_updown and c.model.use_new_attention_order
  assert c.diffusion.noise_schedule == "cosine" and c.diffusion.num_timesteps == 1000
  assert c.diffusion.loss_type == "rescaled_mse"
  assert c.diffusion.timestep_sampler == "loss-second-moment"
  assert c.optim.learning_rate == 1e-4 and c.optim.weight_decay == 0.0
  assert c.train.batch_size == 128 and tuple(c.train.ema_rates) == (0.9999,)
  assert c.data.random_flip


@pytest.mark.parametrize(
    "key,value",
    [
        ("model.dropout", 1.5),
        ("model.compute_dtype", "float16"),
        ("model.attention_resolutions", (5,)),
        ("model.num_head_channels", 24),
        ("model.num_channels", 48),
        ("model.num_res_blocks", -1),
        ("data.dataset", "mnist"),
        ("data.image_size", 32),
        ("data.num_classes", 7),
        ("diffusion.noise_schedule", "quadratic"),
        ("diffusion.timestep_sampler", "importance"),
        ("optim.learning_rate", -1.0),
        ("train.batch_size", 0),
        ("train.ema_rates", (1.0,)),
        ("train.init_from_step", -5),
        ("adversarial.mode", "free"),
        ("adversarial.radius", -0.1),
        ("adversarial.norm", "l1"),
        ("adversarial.num_replays", 0),
        ("adversarial.target", "x0"),
        ("adversarial.init", "gaussian"),
        ("diffusion.input_perturbation", -0.1),
        ("evaluation.resize_rule", "bicubic"),
        ("evaluation.max_reference_images", 1),
        ("evaluation.fid_method", "newton"),
        ("optim.learning_rate", float("nan")),
        ("optim.grad_clip_norm", float("inf")),
        ("adversarial.radius", float("nan")),
        ("diffusion.input_perturbation", float("inf")),
        ("train.preemption_grace_seconds", float("nan")),
        ("train.max_consecutive_skips", -1),
    ],
)
def test_bad_values_name_the_key(key, value):
  config = importlib.import_module("configs.digits_adm").get_config()
  section, field = key.split(".")
  with config.unlocked():
    config[section][field] = value
  with pytest.raises(ConfigError) as info:
    validate_config(config)
  message = str(info.value)
  assert message.startswith(f"config.{key} = {value!r} is not allowed")
  assert message.count("\n") == 0


def test_cli_errors_are_one_sentence(tmp_path):
  bad_value = run_utils.run_main(str(tmp_path / "a"), "--config.model.dropout=1.5", check=False)
  run_utils.assert_one_sentence_error(bad_value, "config.model.dropout = 1.5", "[0.0, 1.0)")
  unknown = run_utils.run_main(str(tmp_path / "b"), "--config.train.batchsize=3", check=False)
  run_utils.assert_one_sentence_error(unknown, "--config.train.batchsize", "configs/default.py")
  missing = run_utils.run_main(
      str(tmp_path / "c"),
      f"--config.data.data_dir={tmp_path}/tfds",
      config=f"{run_utils.REPO}/configs/cifar10_adm.py",
      check=False,
  )
  run_utils.assert_one_sentence_error(missing, "'cifar10' is not prepared", "tfds build cifar10")
  no_clean_run = run_utils.run_main(
      str(tmp_path / "d"),
      f"--config.train.init_from={tmp_path}/clean",
      config=f"{run_utils.REPO}/configs/cifar10_at.py",
      check=False,
  )
  run_utils.assert_one_sentence_error(
      no_clean_run, "no checkpoint found", "python main.py --config=configs/cifar10_adm.py"
  )


def test_nan_setting_and_broken_config_files_are_one_sentence(tmp_path):
  nan = run_utils.run_main(str(tmp_path / "a"), "--config.optim.learning_rate=nan", check=False)
  run_utils.assert_one_sentence_error(nan, "config.optim.learning_rate = nan", "finite number")
  syntax = tmp_path / "bad_syntax.py"
  syntax.write_text("def get_config(:\n  pass\n")
  result = run_utils.run_main(str(tmp_path / "b"), config=str(syntax), check=False)
  run_utils.assert_one_sentence_error(result, str(syntax), "SyntaxError at line 1", "fix that")
  name = tmp_path / "bad_name.py"
  name.write_text("from configs import default\n\n\ndef get_config():\n  return defaults\n")
  result = run_utils.run_main(str(tmp_path / "c"), config=str(name), check=False)
  run_utils.assert_one_sentence_error(result, "NameError at line 5", "'defaults'")


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(DatasetNotPreparedError, match="tfds build imagenet_resized/64x64"):
    data_lib.load_dataset("imagenet64", "train", str(tmp_path))


@pytest.mark.parametrize(
    "name,shape,max_label", [("cifar10", (32, 32, 3), 9), ("imagenet64", (64, 64, 3), 999)]
)
def test_tfds_pipeline_on_mock_data(tmp_path, name, shape, max_label):
  with tfds.testing.mock_data(num_examples=24, data_dir=str(tmp_path)):
    dataset = data_lib.load_dataset(name, "train", str(tmp_path))
  assert dataset.images.shape == (24, *shape) and dataset.images.dtype == np.uint8
  assert dataset.labels.dtype == np.int32
  assert 0 <= dataset.labels.min() and dataset.labels.max() <= max_label
  # Two processes' rows of each global batch put together are the one-process batch.
  full = data_lib.batch_iterator(dataset, 8, 0, seed=3)
  halves = [
      data_lib.batch_iterator(dataset, 8, 0, seed=3, process_index=p, process_count=2)
      for p in range(2)
  ]
  for _ in range(5):  # crosses an epoch boundary (24 examples, 8 per batch)
    whole = next(full)
    parts = [next(h) for h in halves]
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), whole["image"])
    np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), whole["label"])


def test_digits_dataset():
  dataset = data_lib.load_dataset("digits")
  assert dataset.images.shape == (1797, 16, 16, 1) and dataset.images.dtype == np.uint8
  assert dataset.images.min() == 0 and dataset.images.max() == 255
  assert sorted(set(dataset.labels.tolist())) == list(range(10))
  # The CSV read (no scikit-learn import) is scikit-learn's own load_digits, value for value.
  from sklearn.datasets import load_digits

  bunch = load_digits()
  images, labels = data_lib._digits_table()
  np.testing.assert_array_equal(images, bunch.images)
  np.testing.assert_array_equal(labels, bunch.target)


def test_batch_stream_visits_every_example_once_per_epoch_and_resumes():
  n, batch = 50, 8
  stream = np.concatenate([data_lib.global_batch_indices(n, batch, s, seed=1) for s in range(25)])
  for epoch in range(4):  # 25 * 8 = 200 = 4 epochs
    np.testing.assert_array_equal(np.sort(stream[epoch * n : (epoch + 1) * n]), np.arange(n))
  assert not np.array_equal(stream[:n], stream[n : 2 * n])  # a fresh permutation each epoch
  resumed = data_lib.batch_iterator(
      data_lib.InMemoryDataset(
          np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1), np.arange(n, dtype=np.int32)
      ),
      batch,
      start_step=7,
      seed=1,
  )
  np.testing.assert_array_equal(next(resumed)["label"], stream[7 * batch : 8 * batch])
  other_seed = data_lib.global_batch_indices(n, batch, 0, seed=2)
  assert not np.array_equal(other_seed, stream[:batch])


def test_random_flip_mirrors_exactly_the_drawn_examples():
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (64, 4, 4, 1), dtype=np.uint8))
  key = jax.random.key(5)
  flipped = train_programs.preprocess_images(images, key)
  plain = train_programs.preprocess_images(images, None)
  np.testing.assert_array_equal(plain, images.astype(np.float32) / 127.5 - 1.0)
  mirrored = np.all(np.asarray(flipped) == np.asarray(plain)[:, :, ::-1], axis=(1, 2, 3))
  same = np.all(np.asarray(flipped) == np.asarray(plain), axis=(1, 2, 3))
  assert np.all(mirrored | same)
  assert 16 < mirrored.sum() < 48  # about half of 64
