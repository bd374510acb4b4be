"""ADM-AT on class-conditional ImageNet 64×64: fine-tunes the clean `imagenet64_adm` run.

The paper publishes no ImageNet-64 AT values (PAPER.md §9), so these are CIFAR-10's (§4, §6):
δ reset to zero each minibatch, K = 3 replays, ℓ2 ascent with η = 0.1, ρ = 0.1, target
ε + sg[δ]/σ_t, 200K minibatch iterations from the clean run's latest checkpoint (fresh
optimizer, EMA kept). The clean run can also be OpenAI's `64x64_diffusion.pt`, imported with
  python main.py --mode=import_torch --config=configs/imagenet64_adm.py \
    --workdir=runs/imagenet64_adm --config.torch_io.checkpoint=64x64_diffusion.pt
"""

from configs import imagenet64_adm
from configs.cifar10_at import apply_paper_at


def get_config():
  config = apply_paper_at(imagenet64_adm.get_config())
  config.train.num_steps = 200_000
  config.train.init_from = "runs/imagenet64_adm"
  config.train.init_from_step = -1
  config.train.init_from_command = (
      "python main.py --config=configs/imagenet64_adm.py --workdir=runs/imagenet64_adm"
  )
  return config
