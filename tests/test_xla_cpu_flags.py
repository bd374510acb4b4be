"""modes.xla_cpu_flags: what it adds to XLA_FLAGS, what it leaves alone, and that the running
CPU backend (conftest applied it) compiles convolutions with it, to torch's numbers."""

import jax
import jax.numpy as jnp
import numpy as np

from modes import xla_cpu_flags

OPTION = "--xla_cpu_experimental_ynn_fusion_type"
YNN_CONVOLUTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
}


def test_apply_appends_the_flags_once_and_keeps_the_users():
  env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  flags = xla_cpu_flags.apply(env)
  assert flags.split() == ["--xla_force_host_platform_device_count=4", *xla_cpu_flags.FLAGS]
  assert xla_cpu_flags.apply(env) == flags  # idempotent
  own = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{OPTION}=individual_dot"}
  # The user's own value of an option wins; the project's other flags are still added.
  assert xla_cpu_flags.apply(own).split() == [
      f"{OPTION}=individual_dot",
      *(flag for flag in xla_cpu_flags.FLAGS if not flag.startswith(OPTION)),
  ]


def test_apply_leaves_other_jaxlib_releases_alone(monkeypatch):
  monkeypatch.setattr(xla_cpu_flags, "_jaxlib_version", lambda: "0.11.2")
  env = {"JAX_PLATFORMS": "cpu"}
  assert xla_cpu_flags.apply(env) == "" and "XLA_FLAGS" not in env


def test_the_backend_runs_convolutions_without_ynnpack_to_the_same_numbers():
  """conftest applied the flags: XLA's own convolution, whose gradients match torch's float64."""
  import torch

  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 128)).astype(np.float32)  # big enough for YNNPACK
  w = (rng.standard_normal((3, 3, 128, 128)) * 0.03).astype(np.float32)

  def loss(x, w):
    dims = ("NHWC", "HWIO", "NHWC")
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims)
    return jnp.sum(jax.nn.silu(y) ** 2)

  compiled = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).compile()
  assert "__ynn_fusion" not in compiled.as_text()
  tx = torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float64, requires_grad=True)
  tw = torch.tensor(w.transpose(3, 2, 0, 1), dtype=torch.float64, requires_grad=True)
  torch.sum(torch.nn.functional.silu(torch.nn.functional.conv2d(tx, tw, padding=1)) ** 2).backward()
  gx, gw = compiled(x, w)
  np.testing.assert_allclose(gx, tx.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gw, tw.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-4, atol=1e-4)
