"""ADM-AT on CIFAR-10: the paper's recipe (PAPER.md §4 and §6).

Fine-tunes the clean ADM run's 250K checkpoint (fresh optimizer, EMA kept) with the authors'
efficient AT: δ reset to zero each minibatch, K = 3 replays (3 optimizer + EMA updates per
minibatch), ℓ2 normalised ascent with step η = 0.1, radius factor ρ = 0.1, target ε + sg[δ]/σ_t,
200K minibatch iterations (= 600K optimizer updates); evaluate the EMA weights at the end.
"""

from configs import cifar10_adm


def apply_paper_at(config):
  """The authors' AT settings (PAPER.md §4), shared by every *_at config."""
  config.adversarial.mode = "fast"
  config.adversarial.num_replays = 3
  config.adversarial.step_size = 0.1
  config.adversarial.radius = 0.1
  config.adversarial.norm = "l2"
  config.adversarial.target = "delta_detach"
  config.adversarial.init = "zero"
  return config


def get_config():
  config = apply_paper_at(cifar10_adm.get_config())
  config.train.num_steps = 200_000
  config.train.init_from = "runs/cifar10_adm"
  config.train.init_from_step = 250_000
  config.train.init_from_command = (
      "python main.py --config=configs/cifar10_adm.py --workdir=runs/cifar10_adm"
  )
  return config
