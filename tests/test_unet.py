"""Tests of the Flax ADM UNet against OpenAI's guided-diffusion `UNetModel` (torch, CPU)."""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
with warnings.catch_warnings():  # guided_diffusion.nn uses deprecated torch.cuda.amp decorators
  warnings.simplefilter("ignore", FutureWarning)
  from guided_diffusion.nn import timestep_embedding as torch_timestep_embedding
  from guided_diffusion.unet import UNetModel

from adv_diffusion.nets import UNet
from adv_diffusion.nets.layers import qkv_attention, timestep_embedding
from adv_diffusion.nets.torch_mapping import flax_to_torch_state_dict, torch_to_flax_params

SMALL = dict(  # every new-style option on, learned sigma
    image_size=16,
    in_channels=3,
    model_channels=32,
    out_channels=6,
    num_res_blocks=1,
    attention_resolutions=(2,),
    dropout=0.1,
    channel_mult=(1, 2),
    num_head_channels=8,
    use_scale_shift_norm=True,
    resblock_updown=True,
    use_new_attention_order=True,
)
SMALL_CLASS_LEGACY = dict(  # class-conditional, legacy qkv order, conv resampling
    image_size=16,
    in_channels=3,
    model_channels=32,
    out_channels=3,
    num_res_blocks=2,
    attention_resolutions=(2,),
    channel_mult=(1, 2),
    num_classes=10,
    num_heads=2,
    conv_resample=True,
)
SMALL_POOL = dict(  # avg-pool / conv-free resampling, attention at full res, other upsample heads
    image_size=8,
    in_channels=2,
    model_channels=32,
    out_channels=2,
    num_res_blocks=1,
    attention_resolutions=(1, 2),
    channel_mult=(1, 2, 2),
    num_heads=4,
    num_heads_upsample=1,
    conv_resample=False,
)
NO_RES_BLOCKS = dict(  # no residual block in the levels (tests/configs/tiny_digits.py): the
    # input blocks are the stem conv and the downsample, each output level one block
    image_size=16,
    in_channels=1,
    model_channels=32,
    out_channels=2,
    num_res_blocks=0,
    attention_resolutions=(2,),
    dropout=0.1,
    channel_mult=(1, 2),
    num_head_channels=32,
)
TINY_CLASS = dict(  # one level only: just enough to exercise every kind of layer init
    image_size=8,
    in_channels=3,
    model_channels=32,
    out_channels=3,
    num_res_blocks=1,
    attention_resolutions=(1,),
    channel_mult=(1,),
    num_classes=3,
)
CIFAR10 = dict(
    image_size=32,
    in_channels=3,
    model_channels=128,
    out_channels=6,
    num_res_blocks=3,
    attention_resolutions=(2, 4),
    dropout=0.3,
    channel_mult=(1, 2, 2, 2),
    num_head_channels=32,
    use_scale_shift_norm=True,
    resblock_updown=True,
    use_new_attention_order=True,
)
IMAGENET64 = dict(
    image_size=64,
    in_channels=3,
    model_channels=192,
    out_channels=6,
    num_res_blocks=3,
    attention_resolutions=(2, 4, 8),
    dropout=0.1,
    channel_mult=(1, 2, 3, 4),
    num_head_channels=64,
    num_classes=1000,
    use_scale_shift_norm=True,
    resblock_updown=True,
    use_new_attention_order=True,
)
CIFAR10_PARAMS = 57_094_662
BATCH = 2


def torch_model(cfg: dict[str, Any], seed: int = 0) -> torch.nn.Module:
  """guided-diffusion UNetModel with every parameter (zero-inited ones too) randomised."""
  torch.manual_seed(seed)
  model = UNetModel(dims=2, use_fp16=False, use_checkpoint=False, **cfg).eval()
  with torch.no_grad():
    for module in model.modules():
      for param in module.parameters(recurse=False):
        param.normal_(0.0, 0.05)
      if isinstance(module, torch.nn.GroupNorm):
        module.weight.add_(1.0)  # keep norms near identity so SiLUs stay nonlinear
  return model


def inputs(cfg: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
  """Random NCHW images, int timesteps and (if class-conditional) labels."""
  rng = np.random.default_rng(seed)
  size, chans = cfg["image_size"], cfg["in_channels"]
  out = {
      "x": rng.standard_normal((BATCH, chans, size, size)).astype(np.float32),
      "t": rng.integers(0, 1000, size=(BATCH,)).astype(np.int64),
  }
  if cfg.get("num_classes") is not None:
    out["y"] = rng.integers(0, cfg["num_classes"], size=(BATCH,)).astype(np.int64)
  return out


def flax_args(batch: dict[str, np.ndarray]) -> tuple:
  """(x NHWC, t, y) as jax arrays."""
  y = batch.get("y")
  return (
      jnp.asarray(batch["x"].transpose(0, 2, 3, 1)),
      jnp.asarray(batch["t"], jnp.int32),
      None if y is None else jnp.asarray(y, jnp.int32),
  )


def params_template(model: UNet, cfg: dict[str, Any]) -> Any:
  """Parameter shapes via jax.eval_shape (no compute)."""
  x, t, y = flax_args(inputs(cfg))
  return jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"]


def count(tree: Any) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def rel_err(ours: np.ndarray, theirs: np.ndarray) -> float:
  return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


class Case:
  """A config with its randomised torch model, converted Flax params and reference output."""

  def __init__(self, cfg: dict[str, Any]):
    self.cfg = cfg
    self.torch = torch_model(cfg)
    self.batch = inputs(cfg)
    self.model = UNet(**cfg)
    self.apply = jax.jit(self.model.apply, static_argnames=("train",))
    template = params_template(self.model, cfg)
    self.params = torch_to_flax_params(self.torch.state_dict(), template)
    with torch.no_grad():
      y = self.batch.get("y")
      self.reference = self.torch(
          torch.from_numpy(self.batch["x"]),
          torch.from_numpy(self.batch["t"]),
          None if y is None else torch.from_numpy(y),
      ).numpy()

  def run(self, model: UNet | None = None, **kwargs: Any) -> np.ndarray:
    """Our output, NCHW float32 numpy."""
    apply = self.apply if model is None else jax.jit(model.apply, static_argnames=("train",))
    out = apply({"params": self.params}, *flax_args(self.batch), **kwargs)
    return np.asarray(out).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def small() -> Case:
  return Case(SMALL)


@pytest.fixture(scope="module")
def cifar10() -> Case:
  return Case(CIFAR10)


# ------------------------------------------------------------------------------ (a) parity


@pytest.mark.parametrize(
    "cfg",
    [SMALL_CLASS_LEGACY, SMALL_POOL, NO_RES_BLOCKS],
    ids=["class_legacy", "pool", "no_res_blocks"],
)
def test_parity_small_variants(cfg: dict[str, Any]) -> None:
  case = Case(cfg)
  out = case.run()
  assert out.dtype == np.float32 and out.shape == case.reference.shape
  assert rel_err(out, case.reference) <= 1e-5


def test_parity_small(small: Case) -> None:
  assert rel_err(small.run(), small.reference) <= 1e-5


def test_parity_cifar10(cifar10: Case) -> None:
  out = cifar10.run()
  assert out.shape == (BATCH, 6, 32, 32)
  assert rel_err(out, cifar10.reference) <= 1e-5


def test_timestep_embedding_matches_adm() -> None:
  t = np.array([0, 1, 17, 999], np.int64)
  for dim in (32, 33):
    theirs = torch_timestep_embedding(torch.from_numpy(t), dim).numpy()
    ours = np.asarray(timestep_embedding(jnp.asarray(t), dim))
    np.testing.assert_allclose(ours, theirs, atol=2e-6)


def adm_qkv_attention(qkv: jax.Array, num_heads: int, new_order: bool) -> jax.Array:
  """The UNet's attention as it was written by hand before `jax.nn.dot_product_attention`, in
  ADM's operation order (QKVAttention / QKVAttentionLegacy): q and k scaled by ch**-0.25 each,
  the float32 softmax, then the weighted sum of v."""
  batch, length, width = qkv.shape
  ch = width // (3 * num_heads)
  if new_order:
    q, k, v = jnp.moveaxis(qkv.reshape(batch, length, 3, num_heads, ch), 2, 0)
  else:
    q, k, v = jnp.moveaxis(qkv.reshape(batch, length, num_heads, 3, ch), 3, 0)
  scale = 1.0 / math.sqrt(math.sqrt(ch))
  weight = jnp.einsum("bthc,bshc->bhts", q * scale, k * scale)
  weight = jax.nn.softmax(weight.astype(jnp.float32), axis=-1).astype(weight.dtype)
  return jnp.einsum("bhts,bshc->bthc", weight, v).reshape(batch, length, num_heads * ch)


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy", "new_order"])
@pytest.mark.parametrize("heads,ch", [(1, 8), (4, 24)])
def test_qkv_attention_is_the_hand_written_formula(new_order: bool, heads: int, ch: int) -> None:
  # Head widths whose ch**-0.25 is not a power of two (a scale that rounds); q·k/sqrt(ch) has a
  # standard deviation of ~2.2, so the softmax is far from uniform (peak weights ~0.9).
  rng = np.random.default_rng(heads)
  qkv = jnp.asarray(rng.normal(0.0, 1.5, (2, 64, 3 * heads * ch)), jnp.float32)
  ours = np.asarray(jax.jit(qkv_attention, static_argnums=(1, 2))(qkv, heads, new_order))
  reference = np.asarray(adm_qkv_attention(qkv, heads, new_order))
  err = np.max(np.abs(ours - reference) / np.maximum(1.0, np.abs(reference)))
  assert err <= 1e-6, err
  # bfloat16: float32 logits and softmax inside, the result to bfloat16 rounding.
  low = qkv_attention(qkv.astype(jnp.bfloat16), heads, new_order)
  assert low.dtype == jnp.bfloat16
  assert rel_err(np.asarray(low, np.float32), reference) < 1e-2


# ------------------------------------------------------------------------- (b) param count


@pytest.mark.parametrize("cfg", [CIFAR10, IMAGENET64], ids=["cifar10", "imagenet64"])
def test_param_count_matches_torch(cfg: dict[str, Any]) -> None:
  with torch.device("meta"):  # shapes only, no allocation
    theirs = sum(p.numel() for p in UNetModel(dims=2, **cfg).parameters())
  ours = count(params_template(UNet(**cfg), cfg))
  assert ours == theirs
  if cfg is CIFAR10:
    assert ours == CIFAR10_PARAMS


# --------------------------------------------------------------------------- (c) mapping


def test_round_trip_flax_torch_flax(small: Case) -> None:
  rng = np.random.default_rng(1)  # any Flax params tree; random values catch layout slips
  params = jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), small.params
  )
  state = flax_to_torch_state_dict(params)
  with torch.device("meta"):
    fresh = UNetModel(dims=2, **SMALL)
  tensors = {k: torch.from_numpy(v) for k, v in state.items()}
  fresh.load_state_dict(tensors, strict=True, assign=True)  # torch accepts names and shapes
  back = torch_to_flax_params(state, params)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def test_round_trip_torch_flax_torch(cifar10: Case) -> None:
  theirs = cifar10.torch.state_dict()
  back = flax_to_torch_state_dict(cifar10.params)
  assert set(back) == set(theirs)
  for key, value in theirs.items():
    assert back[key].dtype == np.float32 and np.array_equal(back[key], value.numpy()), key


def _corrupt(kind: str, state: dict[str, Any]) -> str:
  """Break the state dict in one way; return the key an error must name."""
  if kind == "missing":
    key = "input_blocks.1.0.emb_layers.1.bias"
    del state[key]
  elif kind == "extra":
    key = "input_blocks.1.0.not_a_layer.weight"
    state[key] = np.zeros(3, np.float32)
  else:
    key = "middle_block.1.qkv.weight"
    state[key] = np.zeros((3, 3, 1), np.float32)
  return key


@pytest.mark.parametrize("kind", ["missing", "extra", "misshaped"])
def test_mapping_errors_name_the_key(small: Case, kind: str) -> None:
  state = dict(small.torch.state_dict())
  key = _corrupt(kind, state)
  with pytest.raises(ValueError, match=re.escape(key)):
    torch_to_flax_params(state, small.params)


# ------------------------------------------------------------------- (d)-(f) behaviour


def test_fresh_init_outputs_exactly_zero() -> None:
  model = UNet(**TINY_CLASS)
  x, t, y = flax_args(inputs(TINY_CLASS))
  # On CPU, compiling threefry for every parameter's init dominates (~10 s even here);
  # the cheap "unsafe_rbg" key keeps this test fast and is still a plain Flax init.
  variables = jax.jit(model.init)(jax.random.key(2, impl="unsafe_rbg"), x, t, y)
  leaves = jax.tree_util.tree_leaves(variables["params"])
  assert all(p.dtype == jnp.float32 for p in leaves)
  assert any(bool(jnp.any(p != 0)) for p in leaves)
  out = model.apply(variables, x, t, y)
  assert out.shape == (BATCH, 8, 8, 3) and bool(jnp.all(out == 0.0))


def test_dropout_train_vs_eval(small: Case) -> None:
  eval_a = small.run(train=False)
  eval_b = small.run(train=False)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = small.run(train=True, rngs={"dropout": jax.random.key(0)})
  train_b = small.run(train=True, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(train_a, train_b)
  assert not np.allclose(train_a, eval_a)


def test_bfloat16_compute(small: Case) -> None:
  model = UNet(**SMALL, dtype=jnp.bfloat16)
  template = params_template(model, SMALL)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(template))
  out = small.run(model)
  assert out.dtype == np.float32 and np.isfinite(out).all()
  assert rel_err(out, small.run()) < 5e-2


def test_remat_same_params_and_output(small: Case) -> None:
  model = UNet(**SMALL, remat=True)
  template = params_template(model, SMALL)
  assert jax.tree_util.tree_structure(template) == jax.tree_util.tree_structure(small.params)
  np.testing.assert_allclose(small.run(model), small.run(), rtol=1e-6, atol=1e-6)


def test_label_consistency_is_checked(small: Case) -> None:
  x, t, _ = flax_args(small.batch)
  with pytest.raises(ValueError, match="class-conditional"):
    small.model.apply({"params": small.params}, x, t, jnp.zeros((BATCH,), jnp.int32))
  conditional = UNet(**SMALL_CLASS_LEGACY)
  with pytest.raises(ValueError, match="class-conditional"):
    conditional.init(jax.random.key(0), x, t)


def _equations(jaxpr) -> list:
  """Every equation of a jaxpr and of the jaxprs nested in it (pjit, custom_jvp, remat...)."""
  out = []
  for eqn in jaxpr.eqns:
    out.append(eqn)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          out.extend(_equations(sub))
  return out


def test_bfloat16_keeps_norms_softmax_and_timestep_mlp_in_float32() -> None:
  # The precision policy of adv_diffusion/nets/layers.py, read off the compiled computation:
  # group-norm statistics and the softmax (the only reductions of the UNet) run in float32, the
  # timestep MLP and every ResBlock's emb projection (the only dense layers on (B, C) inputs) too,
  # while the torso's convolutions and the attention products take bfloat16 operands (q·kᵀ
  # accumulates into float32 logits, the weighted sum of v is bfloat16). dot_product_attention
  # groups heads into a 5-d q·kᵀ: every dot_general of ≥ 4-d operands is attention.
  model = UNet(**SMALL, dtype=jnp.bfloat16)
  x, t, y = flax_args(inputs(SMALL))
  params = jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"]
  jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, x, t, y))(params)
  eqns = _equations(jaxpr.jaxpr)
  dtypes = lambda eqn: {v.aval.dtype for v in eqn.invars if hasattr(v.aval, "dtype")}  # noqa: E731
  reductions = [e for e in eqns if e.primitive.name in ("reduce_sum", "reduce_max")]
  assert len(reductions) >= 2 * 8  # mean and variance of every group norm, max/sum of softmax
  assert all(dtypes(e) == {jnp.dtype(jnp.float32)} for e in reductions)
  assert any(e.primitive.name == "reduce_max" for e in reductions)  # the softmax is among them
  assert all(dtypes(e) == {jnp.dtype(jnp.float32)} for e in eqns if e.primitive.name == "exp")
  # jnp.mean accumulates bfloat16 in float32 anyway: the normalisation itself is the check.
  rsqrts = [e for e in eqns if e.primitive.name == "rsqrt"]
  assert len(rsqrts) >= 8 and all(dtypes(e) == {jnp.dtype(jnp.float32)} for e in rsqrts)
  dense_2d = [e for e in eqns if e.primitive.name == "dot_general" and e.invars[0].aval.ndim == 2]
  assert len(dense_2d) >= 2 + 4  # time_embed_0, time_embed_2 and the ResBlocks' emb_layers_1
  assert all(dtypes(e) == {jnp.dtype(jnp.float32)} for e in dense_2d)
  bf16 = {jnp.dtype(jnp.bfloat16)}
  convs = [e for e in eqns if e.primitive.name == "conv_general_dilated"]
  # The torso's convolutions in bfloat16; the output head (`out_2`, the last conv) in float32.
  assert len(convs) > 2 and all(dtypes(e) == bf16 for e in convs[:-1])
  assert dtypes(convs[-1]) == {jnp.dtype(jnp.float32)}
  attention = [e for e in eqns if e.primitive.name == "dot_general" and e.invars[0].aval.ndim >= 4]
  assert attention and all(dtypes(e) == bf16 for e in attention)
  products = [e.outvars[0].aval.dtype for e in attention]  # q·kᵀ and weights·v of every block
  assert products.count(jnp.dtype(jnp.float32)) == products.count(jnp.dtype(jnp.bfloat16)) > 0
  assert jaxpr.out_avals[0].dtype == jnp.float32
