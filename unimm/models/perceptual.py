"""LPIPS-style perceptual distance from a local weights file (never downloaded).

The net is a VGG-style conv stack (3x3 convs + ReLU, 2x2 max pools between stages)
whose features at the end of each stage are unit-normalised over channels, squared
differences weighted per channel by a 1x1 "lin" head, averaged over space and
summed over stages (Zhang et al. 2018, the `lpips` package with net='vgg').

File layout (.safetensors or .npz), PyTorch names and shapes, so converted weights
load as they are:
  features.{i}.weight  [out, in, 3, 3]  torchvision VGG `features` convs (OIHW)
  features.{i}.bias    [out]
  lin{k}.model.1.weight [1, C_k, 1, 1]  LPIPS linear heads, one per stage
A max pool sits between convs i and j when j - i == 3 (conv, ReLU, pool), as in
torchvision's VGG indices; a stage ends at each pool and at the last conv. Real use
expects torchvision vgg16 `features.*` (up to features.28) plus LPIPS v0.1 vgg.pth
`lin0..lin4` merged into one file; `write_random_weights` makes a small file of the
same layout for tests.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from unimm.errors import UserError

SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)  # LPIPS ScalingLayer
SCALE = np.array([0.458, 0.448, 0.450], np.float32)


def _load(path):
  """{name: array} of a .safetensors or .npz file (numpy arrays only: never unpickled)."""
  if not path.endswith((".safetensors", ".npz")):
    raise UserError(f"perceptual weights '{path}': use a .safetensors or .npz file (pickled "
                    "PyTorch files are never read)")
  try:
    if path.endswith(".safetensors"):
      from safetensors.numpy import load_file
      return load_file(path)
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
    raise UserError(f"perceptual weights '{path}' cannot be read ({type(e).__name__}: "
                    f"{' '.join(str(e).split())}): write them again") from None


def load_perceptual(path):
  """{'convs': [(kernel HWIO, bias)], 'pool_after': [bool], 'lins': [[C_k]]} from `path`."""
  if not path or not os.path.exists(path):
    raise UserError(f"perceptual weights file '{path}' does not exist: write converted LPIPS/VGG "
                    "weights there (layout: unimm.models.perceptual) or set "
                    "tokenizer.perceptual_weight=0")
  raw = _load(path)
  idx = sorted(int(k.split(".")[1]) for k in raw if k.startswith("features.") and k.endswith(".weight"))
  if not idx:
    raise UserError(f"perceptual weights '{path}' have no 'features.N.weight' convs")
  convs = [(jnp.asarray(np.transpose(raw[f"features.{i}.weight"], (2, 3, 1, 0)), jnp.float32),
            jnp.asarray(raw[f"features.{i}.bias"], jnp.float32)) for i in idx]
  pool_after = [b - a == 3 for a, b in zip(idx[:-1], idx[1:])] + [False]
  stages = sum(pool_after) + 1
  lins = []
  for k in range(stages):
    name = f"lin{k}.model.1.weight"
    if name not in raw:
      raise UserError(f"perceptual weights '{path}' have {stages} stages but no '{name}'")
    lins.append(jnp.asarray(raw[name], jnp.float32).reshape(-1))
  return {"convs": convs, "pool_after": pool_after, "lins": lins}


def _features(net, x):
  x = (x.astype(jnp.float32) - SHIFT) / SCALE
  taps = []
  for (kernel, bias), pool in zip(net["convs"], net["pool_after"]):
    x = jax.nn.relu(jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias)
    if pool:
      taps.append(x)
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  taps.append(x)
  return taps


def perceptual_distance(net, x, y):
  """Per-image LPIPS distance [B] between images x, y [B, H, W, 3] in [-1, 1]."""
  fx, fy = _features(net, x), _features(net, y)
  total = 0.0
  for a, b, w in zip(fx, fy, net["lins"]):
    a = a / (jnp.sqrt(jnp.sum(a * a, -1, keepdims=True)) + 1e-10)
    b = b / (jnp.sqrt(jnp.sum(b * b, -1, keepdims=True)) + 1e-10)
    total = total + jnp.mean(jnp.sum((a - b) ** 2 * w, -1), axis=(1, 2))
  return total


def write_random_weights(path, stages=((8,), (16, 16)), seed=0):
  """Writes random weights of the layout above to `path` (.npz or .safetensors), for tests:
  `stages` lists the conv widths of each stage; the lin heads are non-negative."""
  rng = np.random.default_rng(seed)
  out, i, cin = {}, 0, 3
  for k, widths in enumerate(stages):
    for c in widths:
      out[f"features.{i}.weight"] = (rng.normal(size=(c, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
      out[f"features.{i}.bias"] = np.zeros((c,), np.float32)
      cin, i = c, i + 2
    out[f"lin{k}.model.1.weight"] = np.abs(rng.normal(size=(1, cin, 1, 1))).astype(np.float32)
    i += 1  # the pool
  if path.endswith(".safetensors"):
    from safetensors.numpy import save_file
    save_file(out, path)
  else:
    np.savez(path, **out)
  return path
