"""sampling/consistency.py: one- and multistep consistency sampling makes exactly the configured
model calls, at the configured timesteps."""

import jax
import jax.numpy as jnp
import pytest

from sampling.registry import make_sampler
from tests.gaussian_problem import T, counting


def test_multistep_sampling_makes_exactly_the_configured_model_calls():
  for nfe, expected in ((1, [999]), (3, [999, 666, 333])):
    sampler = make_sampler("consistency", nfe, "cosine", T)
    model_fn, calls = counting(lambda x, t: jnp.zeros_like(x))
    out = jax.jit(lambda noise, keys: sampler(model_fn, noise, keys))(
        jnp.ones((2, 4, 4, 1)), jax.random.split(jax.random.key(0), 2)
    )
    jax.effects_barrier()
    assert sampler.nfe == nfe and [int(c[0]) for c in calls] == expected
    assert out.shape == (2, 4, 4, 1)
  custom = make_sampler("consistency", 2, "cosine", T, timesteps=(900, 300))
  assert custom.options["timesteps"] == (900, 300)
  with pytest.raises(ValueError, match="exactly nfe=3"):
    make_sampler("consistency", 3, "cosine", T, timesteps=(900, 300))
