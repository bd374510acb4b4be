"""The main job on the embedded digits: the paper's claim tested in one command.

  python main.py --config=configs/digits_at.py --workdir=runs/digits_at

AT fine-tuning (PAPER.md §4) and an equal-budget clean control, both from the clean model this
repository ships (`assets/digits_clean_ema.npz`, trained by configs/digits_clean.py; the paper
also fine-tunes a converged clean checkpoint), then 500 samples per cell from the same initial
noise for both runs, FID and KID against all 1,797 embedded digits, side-by-side grids and the
verdict: AT − control KID with its paired standard error (modes/story.py, story_report.py).
Measured runtime in the README ("What the main job does").

Train the clean model inside the job instead (the whole pipeline, ~45 minutes more on 2 cores):
  python main.py --config=configs/digits_at.py --workdir=runs/digits_at_full \
    --config.story.clean_weights=''

The AT fine-tune alone, from an existing clean run (README, "Adversarial training"):
  python main.py --config=configs/digits_at.py --mode=train \
    --config.train.init_from=runs/digits_adm --workdir=runs/digits_at_only
"""

import os

from configs import digits_adm
from configs.cifar10_at import apply_paper_at

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Written by `python main.py --config=configs/digits_clean.py --workdir=runs/digits_clean` then
# `python main.py --config=configs/digits_clean.py --mode=export_weights
# --workdir=runs/digits_clean` (README, "What the main job does").
CLEAN_WEIGHTS = os.path.join(REPO, "assets", "digits_clean_ema.npz")
CLEAN_WEIGHTS_SHA256 = "967b11a6b843fe4e341f042f04ef0a02a1a2bfe87d00a604edfad99916432964"
# The Inception pool features of all 1,797 digits (6 minutes of Inception on 2 cores), written by
# `python main.py --config=configs/digits_at.py --mode=fid_stats --workdir=runs/reference
# --config.evaluation.reference_features_file='' --config.evaluation.export_reference_features=
# assets/digits_reference_pool.npz`; used only while they describe the same digits, Inception
# weights and resize rule (else Inception runs over the images).
REFERENCE_FEATURES = os.path.join(REPO, "assets", "digits_reference_pool.npz")
REFERENCE_FEATURES_SHA256 = "25f8edf38fb695431aa1974cac7f187827d1631fb1837c7a3b55d6d9592559cf"


def get_config():
  clean = digits_adm.get_config()
  config = apply_paper_at(digits_adm.get_config())
  # A two-level UNet (compiles and steps about twice as fast as digits_adm's three levels).
  config.model.channel_mult = (1, 2)
  config.model.attention_resolutions = (8,)
  config.mode = "story"  # the README's first command runs the whole story
  config.story.clean_weights = CLEAN_WEIGHTS
  config.story.clean_weights_sha256 = CLEAN_WEIGHTS_SHA256
  # The clean stage, used only with story.clean_weights = "": configs/digits_clean.py's run.
  config.story.clean_steps = 2000
  config.story.clean_batch_size = 64
  config.story.clean_learning_rate = clean.optim.learning_rate
  config.story.clean_warmup_steps = clean.optim.warmup_steps
  # Inception costs ~0.2 s per image on 2 CPU cores: one sampler at two NFEs, 500 paired
  # samples per cell and the whole embedded set (1,797 digits, its features shipped) as the
  # reference keep the job within 15 minutes.
  config.story.methods = ("ddim",)
  config.story.nfes = (5, 10)
  config.story.num_samples = 500
  # No start-up cost estimate: its timed Inception batches alone take a minute on 2 CPU cores,
  # and the README gives this job's measured runtime.
  config.story.estimate = False
  config.evaluation.max_reference_images = 0
  config.evaluation.reference_features_file = REFERENCE_FEATURES
  config.evaluation.reference_features_sha256 = REFERENCE_FEATURES_SHA256
  config.evaluation.batch_size = 100
  config.evaluation.precision_recall = False
  # eigh gives the sqrtm value (to ~1e-12 relative) in 1.8 s instead of 8.7 s per 2048-d FID here.
  config.evaluation.fid_method = "eigh"
  config.sampling.batch_size = 250
  config.train.batch_size = 32

  config.optim.learning_rate = 2e-4  # fine-tuning: a smaller rate than the clean run's 1e-3
  config.optim.warmup_steps = 0
  config.train.num_steps = 50  # minibatches; fast AT makes K = 3 updates per minibatch
  config.train.log_every = 25
  config.train.checkpoint_every = 50
  config.train.sample_every = 0  # the table writes a sample grid of every sample set
  config.train.init_from = "runs/digits_adm"
  config.train.init_from_command = (
      "python main.py --config=configs/digits_adm.py --workdir=runs/digits_adm"
  )
  return config
