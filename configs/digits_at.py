"""The main job on the embedded digits: the whole story of the paper in one command.

  python main.py --config=configs/digits_at.py --workdir=runs/digits_at

Clean ADM training, AT fine-tuning from it as the paper does (PAPER.md §4) and an equal-budget
clean continuation as the control, then samples, FID against the embedded reference and the
table, plot and sample grids (modes/story.py). About 10 minutes on 2 CPU cores (597 s
measured, README "What the main job does").

The AT fine-tune alone, from an existing clean run (README, "Adversarial training"):
  python main.py --config=configs/digits_at.py --mode=train \
    --config.train.init_from=runs/digits_adm --workdir=runs/digits_at_only
"""

from configs import digits_adm
from configs.cifar10_at import apply_paper_at


def get_config():
  clean = digits_adm.get_config()
  config = apply_paper_at(digits_adm.get_config())
  # A two-level UNet (compiles and steps about twice as fast as digits_adm's three levels).
  config.model.channel_mult = (1, 2)
  config.model.attention_resolutions = (8,)
  config.mode = "story"  # the README's first command runs the whole story
  config.story.clean_steps = 400
  config.story.clean_learning_rate = clean.optim.learning_rate
  config.story.clean_warmup_steps = clean.optim.warmup_steps
  config.story.methods = ("ddim", "dpm_solver++")
  config.story.nfes = (5, 10)
  # Inception costs ~0.2 s per image on 2 CPU cores: 300 reference images (cached in
  # WORKDIR/eval) and 100 samples per cell keep the FID stage near 4 minutes. FIDs from so few
  # samples are biased upwards; compare runs at the same count only (the table prints it).
  config.story.num_samples = 100
  config.evaluation.max_reference_images = 300
  config.evaluation.batch_size = 50
  config.evaluation.precision_recall = False
  # eigh gives the sqrtm value (to ~1e-12 relative) in 1.8 s instead of 8.7 s per 2048-d FID here.
  config.evaluation.fid_method = "eigh"
  config.sampling.batch_size = 100
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
