"""The study behind the main job (README, "The study"): the story over three seeds, with a
fine-tune six times as long, two samplers at NFE 5 / 10 / 20 and FID / KID under trajectory
attacks, every difference with its 95 % interval.

  python main.py --config=configs/digits_study.py --workdir=runs/digits_study

Each seed's story lives in WORKDIR/seed<S> and resumes stage by stage and cell by cell
(rerun the same command after an interruption); WORKDIR/study/study.md is the result.
Fine-tune length: the paper fine-tunes 200K AT minibatches (600K optimizer updates) on 250K
clean ones; here AT gets 300 minibatches = 900 updates on the shipped model's 2,000 clean updates
(0.45 of the clean run in updates, bounded by 2 CPU cores), and the control the same 900 updates.
"""

from configs import digits_at


def get_config():
  config = digits_at.get_config()
  config.mode = "study"
  config.study.seeds = (0, 1, 2)
  config.study.robustness = True
  config.train.num_steps = 300  # AT minibatches (K = 3 updates each); control: 900 updates
  config.train.log_every = 50
  config.train.checkpoint_every = 100
  config.story.methods = ("ddim", "dpm_solver++")
  config.story.nfes = (5, 10, 20)
  config.story.num_samples = 500
  # Trajectory attacks on DDIM NFE 10 (the story's NFE 10 cell is the unattacked one), at the
  # AT radius: a random direction and PGD on the denoising error, 500 paired samples each.
  config.robustness.nfe = 10
  config.robustness.kinds = ("random", "adversarial")
  config.robustness.budgets = (0.1,)
  config.robustness.num_samples = 500
  return config
