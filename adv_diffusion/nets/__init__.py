"""Network definitions: the ADM UNet (Dhariwal & Nichol 2021) in Flax Linen."""

from adv_diffusion.nets.unet import UNet

__all__ = ["UNet"]
