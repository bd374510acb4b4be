"""The paper on CIFAR-10 in one command (--mode=story at the paper's scale, PAPER.md §4-§7).

  python main.py --config=configs/paper_cifar10.py --workdir=runs/paper_cifar10

Stages, each resumable (a preempted run continues at the stage, step or cell where it stopped):
  clean/    clean ADM, configs/cifar10_adm.py's recipe for 250K iterations (PAPER.md §6);
  at/       ADM-AT from its last checkpoint: configs/cifar10_at.py, 200K minibatches of fast AT
            with K = 3 (600K optimizer updates; fresh optimizer, EMA kept);
  control/  the equal-budget clean continuation: 600K clean updates from the same checkpoint;
  ip/       the ADM-IP baseline (γ = 0.15, PAPER.md §5) from the same checkpoint, 600K updates
            (the paper's ADM-IP is its own run; here it is a fine-tune of the same clean start,
            so that the three runs differ in their last stage only);
  table/    PAPER.md §7's grid: IDDPM ancestral, ancestral + ES (b = 1.017), DDIM and
            DPM-Solver++ 2M (as the authors' script ran it) × NFE 5, 8, 10, 20, 50, 50K samples
            per cell, FID (and sFID, IS, precision/recall, KID) against the 50K CIFAR-10
            training images, the paper's published FIDs in parentheses beside ours (its ADM
            numbers beside our clean control, and table.md says so);
  story/    the paired AT − control KID verdict per cell.
At start-up it prints the accelerator-hours it expects, from step times measured on the devices
it runs on (modes/story_estimate.py).
"""

from configs import cifar10_adm, cifar10_at


def get_config():
  clean = cifar10_adm.get_config()
  config = cifar10_at.get_config()  # the AT stage: 200K minibatches, K = 3, η = ρ = 0.1
  config.mode = "story"
  config.story.estimate = True  # print the expected accelerator-hours at start-up
  config.train.init_from = ""  # the story starts AT, control and ADM-IP from its clean stage
  config.train.init_from_step = -1
  config.train.init_from_command = ""
  config.story.clean_steps = clean.train.num_steps  # 250K (PAPER.md §6)
  config.story.clean_batch_size = clean.train.batch_size
  config.story.clean_learning_rate = clean.optim.learning_rate
  config.story.clean_warmup_steps = clean.optim.warmup_steps
  config.story.baselines = ("ip",)
  config.story.ip_gamma = 0.15  # PAPER.md §5, CIFAR-10
  # PAPER.md §7's grid, as configs/table_cifar10.py defines it.
  config.story.methods = ("ancestral", "ancestral_es", "ddim", "dpm_solver++")
  config.story.nfes = (5, 8, 10, 20, 50)
  config.story.num_samples = 50_000
  config.sampling.batch_size = 500
  config.sampling.preset = "authors"  # DPM-Solver++ as the paper's script ran it (§7)
  config.evaluation.max_reference_images = 0  # the whole training split (§6)
  return config
