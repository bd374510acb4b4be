"""The paper's story on class-conditional ImageNet 64×64 in one command (--mode=story).

  python main.py --config=configs/paper_imagenet64.py --workdir=runs/paper_imagenet64

The sibling of configs/paper_cifar10.py: clean ADM with configs/imagenet64_adm.py's recipe
(ADM's 540K iterations of batch 2048 at lr 3e-4), then from its last checkpoint ADM-AT
(configs/imagenet64_at.py: 200K minibatches of fast AT with K = 3, CIFAR-10's AT values), the
equal-budget clean control and ADM-IP (γ = 0.1, PAPER.md §5), then PAPER.md §7's grid of
samplers (ES with b = 1.006) × NFE with 50K class-conditional samples per cell against the
ImageNet-64 training set (1,281,167 images), and the paired verdict. Every stage and cell
resumes; the expected accelerator-hours are printed at start-up.

The paper publishes no ImageNet-64 numbers for AT (PAPER.md §9), so the table has no published
column to compare with: these runs are the comparison.
"""

from configs import imagenet64_adm, imagenet64_at


def get_config():
  clean = imagenet64_adm.get_config()
  config = imagenet64_at.get_config()
  config.mode = "story"
  config.story.estimate = True  # print the expected accelerator-hours at start-up
  config.train.init_from = ""  # the story starts AT, control and ADM-IP from its clean stage
  config.train.init_from_step = -1
  config.train.init_from_command = ""
  config.story.clean_steps = clean.train.num_steps
  config.story.clean_batch_size = clean.train.batch_size
  config.story.clean_learning_rate = clean.optim.learning_rate
  config.story.clean_warmup_steps = clean.optim.warmup_steps
  config.story.baselines = ("ip",)
  config.story.ip_gamma = 0.1  # PAPER.md §5: 0.1 beyond CIFAR-10
  config.story.methods = ("ancestral", "ancestral_es", "ddim", "dpm_solver++")
  config.story.nfes = (5, 8, 10, 20, 50)
  config.story.num_samples = 50_000
  config.sampling.batch_size = 500
  config.sampling.preset = "authors"  # DPM-Solver++ as the paper's CIFAR-10 script ran it
  config.evaluation.max_reference_images = 0  # the whole training split
  return config
