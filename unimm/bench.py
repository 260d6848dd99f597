"""Train-step throughput of a config on this machine's devices, against its PyTorch peer.

    python -m unimm.bench --config configs/bench/dense_1b.py [--config.a.b=V ...] [--steps 10]
        [--warmup 3] [--data synthetic|pipeline|synthetic,pipeline] [--devices N] [--peers]
        [--out FILE]
    python -m unimm.bench --attention [--batch 4 --seq 4096 --heads 16 --head-dim 128]
        [--image-tokens 256] [--impls xla,flash,cudnn] [--iters N] [--out FILE]
    python -m unimm.bench --table FILE.jsonl        # the JSON lines as markdown tables

**Train step.** The real step (`unimm.train.step.Trainer`, AdamW included) on a mesh from the
config over the first --devices local devices: init, lower and compile (timed), --warmup
steps, then --steps steps, each timed to the end of its results. Data (--data, else the
config's `bench.data`, else synthetic): `synthetic` is random token ids, one full-length text
document per row (the peers' input; model.family="mmdit": one text-to-image document per row,
`synthetic_mmdit_batch`); `pipeline` is packed batches of the config's data
pipeline, 4 of them read before timing and cycled, so host data time is not measured; both
(`synthetic,pipeline`) time the one compiled step on each in turn. Prints one JSON line per
kind of data (also appended to --out):

  kind "train_step", config, device, devices, backend, data, batch, seq_len, steps, warmup
  step_time_s          {median, each}
  tokens_per_s         batch x seq_len / median step time (padding included, as the peers count)
  useful_flops_per_step, useful_tflops_per_device, mfu (null for a device without a peak below)
  xla_flops_per_device the compiled step's cost_analysis() (one device's partitioned program;
                       XLA counts a loop body once, so with model.scan it leaves out all but
                       one pass of each scanned unit)
  compile_s            lower + compile of the step
  memory               peak_bytes (device memory_stats() peak_bytes_in_use, max over devices;
                       null where the backend has none, e.g. CPU), and the compiled step's
                       memory_analysis(): argument_bytes, output_bytes, temp_bytes, alias_bytes
  levers               dtype, attention, scan, remat, ce_chunk, mu_dtype, moe_impl, capacity_factor
  params               total, active, matmul_active (N below), image_side (what a text-only
                       peer lacks: patch and time embeddings, flow head, ViT); the MMDiT's:
                       total, active, matmul_active, matmul {image, text, joint, row} (below),
                       conditioner (what its diffusers peer lacks: the text encoder)
  batch_stats          real_token_share, image_token_share, allowed_pair_share (of B L^2)
  loss, versions, date
  peer, vs_peer        with --peers: who the peer is (or why there is none, or its error) and
                       unimm / peer of tokens_per_s and peak_bytes

With --peers the peer's own line (kind "peer", `unimm.bench_peers`: run first, in a
subprocess, so that the accelerator's memory is free for it) comes before, with its
tokens_per_s, useful FLOPs and MFU counted as here.

**Useful FLOPs** (MaxText-style: only the work the model needs, whatever a kernel computes):

    6 N T + 12 P H Dh depth

T: non-padding tokens of the batch. N: active matmul weights per token: every weight a token
is multiplied by, LM head included (the tied table when tied); token, patch-position and
modality embedding tables (lookups), norm scales and biases excluded; routed experts count
top_k of E, the router counts; a mixture of transformers counts one modality expert. 6 = 2
forward + 4 backward (input and weight gradients) FLOPs per weight per token. P: query-key
pairs the unified mask allows, over non-padding queries, counted on the host from the
batch's ids (`allowed_pairs`); 12 = 4 forward (QK^T and PV, 2 FLOPs per multiply-add) + 8
backward, per pair, head and head dim, in each of the model.depth blocks (a Janus ViT's
attention is not counted). MFU = useful FLOPs / step time / devices / the device's dense
bf16 peak (`PEAK_FLOPS`). With model.attention="xla" and no remat the step computes every
pair, and cost_analysis() matches 6 N T + 12 B L^2 H Dh depth (tests/test_train_bench.py).

**The MMDiT's useful FLOPs** (model.family="mmdit", `mmdit_useful_flops`), by the tokens each
matmul weight multiplies (`mmdit_stream`; the same rule counts the diffusers peer's weights,
`unimm.bench_peers.flux_counts`):

    6 (N_img Ti + N_txt Tt + N_joint (Ti + Tt) + N_row R)
      + 12 H Dh ((depth + single_depth) sum_r (Lt_r + Li_r)^2 + condition.depth sum_r Lt_r^2)

Per row r with a target image: Li_r its valid image-stream tokens (the target's N, plus
Kontext reference images), Lt_r its valid text-stream tokens (its first L - N text positions);
Ti, Tt their sums, R the rows. N_img: img_in, proj_out and the double blocks' image q/k/v/out
and MLP; N_txt: txt_in, the double blocks' text q/k/v/out and MLP, the text encoder's blocks
(its token table is a lookup); N_joint: the single blocks' q/k/v, MLP in, attention and MLP
out; N_row: what runs once a row on the conditioning vector (every adaLN modulation, the
final one, the time / guidance / pooled embedders). q/k/v biases, biases and norm scales are
not counted. Joint attention: every valid token of a row sees every other, in each double and
single block; the text encoder's blocks attend over the text alone. With model.attention="xla",
no scan, no remat and full rows (the synthetic batch) cost_analysis() is within a few percent
of it (elementwise work and AdamW; tests/test_train_bench.py).

**Attention.** `unimm.kernels.attention.attention` forward and forward+backward for each
kernel the backend has (xla; flash on GPU and TPU, interpreted on CPU only when --impls names
it; cudnn on GPU with cuDNN), on a causal text mask and on the unified mask of packed
Shapes-like rows (documents of a prompt and a --image-tokens image, 4 in 5 noised, or a clean
image and its caption). One JSON line per (mask, kernel): useful TFLOP/s counts allowed pairs
only; then a summary line with unified-mask flash over cuDNN causal.
"""

import datetime
import importlib.metadata
import json
import math
import os
import platform as host_platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimm import bench_peers
from unimm.batch import CLEAN_IMAGE, NOISED_IMAGE, TEXT
from unimm.config import parse_args
from unimm.errors import UserError, cli
from unimm.kernels import attention as kernels
from unimm.kernels.mask import MAX_IMAGE, MaskIds
from unimm.models.unified import parameter_counts

# Dense bf16 FLOP/s per device, by a lower-case substring of jax's device_kind.
PEAK_FLOPS = (("h100", 989e12), ("h200", 989e12), ("gh200", 989e12), ("a100", 312e12),
              ("tpu v5p", 459e12), ("tpu v5 lite", 197e12), ("tpu v5e", 197e12),
              ("tpu v6", 918e12), ("tpu v4", 275e12))
EMBEDDING_TABLES = ("embed", "patch_pos", "modality_embed")
IMAGE_SIDE = ("patch_in", "patch_pos", "modality_embed", "t_in", "t_out", "flow_head", "vit")
PIPELINE_BATCHES = 4
DATA = ("synthetic", "pipeline")
MMDIT_STREAMS = ("image", "text", "joint", "row")


def peak_flops(device_kind):
  kind = device_kind.lower()
  return next((peak for name, peak in PEAK_FLOPS if name in kind), None)


def versions(*packages):
  out = {"python": host_platform.python_version()}
  for p in packages:
    try:
      out[p] = importlib.metadata.version(p)
    except importlib.metadata.PackageNotFoundError:
      out[p] = None
  return out


def _sig(x, digits=4):
  return float(f"{x:.{digits}g}")


def _now():
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------ counting


def _abstract_model(cfg, vocab_size):
  """(the config with model.scan off, its model built abstractly): the counts below do not
  depend on model.scan, and unstacked blocks name their parameters one block at a time."""
  from unimm.train.step import build_model  # pylint: disable=import-outside-toplevel
  flat = cfg.copy_and_resolve_references()
  flat.model.scan = False
  return flat, nnx.eval_shape(lambda: build_model(flat, vocab_size=vocab_size)[0])


def _params(model):
  """(path keys as strings, shape) of every parameter of `model`."""
  return [([str(k) for k in path], p.get_value().shape)
          for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def parameter_summary(cfg, vocab_size):
  """The config's parameter counts, by model.family: the unified model's {total, active,
  matmul_active, image_side}; the MMDiT's {total, active, matmul_active, matmul, conditioner}
  (`mmdit_parameter_summary`)."""
  if getattr(cfg.model, "family", "unified") == "mmdit":
    return mmdit_parameter_summary(cfg, vocab_size)
  flat, model = _abstract_model(cfg, vocab_size)
  total, active = parameter_counts(model, flat.model)
  moe, tied = flat.model.moe, flat.model.tie_embeddings
  matmul = image = 0
  for keys, shape in _params(model):
    size = math.prod(shape)
    if keys[0] in IMAGE_SIDE:
      image += size
    if ("modality_experts" in keys or len(shape) < 2 or keys[-1] in ("bq", "bk", "bv")
        or (keys[0] in EMBEDDING_TABLES and not (keys[0] == "embed" and tied))):
      continue
    if keys[-1] in ("w_gate", "w_up", "w_down") and len(shape) == 3:  # routed experts [E, ...]
      size = size * moe.top_k // moe.experts
    matmul += size
  return {"total": total, "active": active, "matmul_active": matmul, "image_side": image}


def mmdit_stream(keys):
  """Which tokens a matmul weight of the MMDiT's DiffusionModel (path `keys`) multiplies:
  "image", "text", "joint" (both: the single-stream blocks) or "row" (the conditioning
  vector, once a row: modulations, time / guidance / pooled embedders); None: not a matmul
  weight of the count (the token table: a lookup; biases and norm scales)."""
  if keys[0] == "text_encoder":
    return "text" if "blocks" in keys else None  # trainable encoder blocks; the table, norm: none
  if keys[0] != "mmdit":
    return None
  part = keys[1]
  if part in ("img_in", "proj_out"):
    return "image"
  if part in ("txt_in", "txt_norm"):
    return "text"
  if part in ("time_in", "guidance_in", "vector_in", "final_mod"):
    return "row"
  if part == "double_blocks":
    return ("row" if keys[3].endswith("_mod") else "image" if keys[3].startswith("img_")
            else "text")
  if part == "single_blocks":
    return "row" if keys[3] == "mod" else "joint"
  return None


def mmdit_parameter_summary(cfg, vocab_size):
  """{total, active (= total: no routed experts), matmul_active (the sum of `matmul`), matmul:
  {image, text, joint, row} (matmul weights by the tokens they multiply, `mmdit_stream`: 2-D
  and larger weights but the q/k/v biases [H, Dh] and the token table), conditioner: what the
  diffusers peer lacks (it takes precomputed text features): the text encoder's token table,
  blocks and norm}."""
  _, model = _abstract_model(cfg, vocab_size)
  total = conditioner = 0
  matmul = dict.fromkeys(MMDIT_STREAMS, 0)
  for keys, shape in _params(model):
    size = math.prod(shape)
    total += size
    if keys[0] != "mmdit":
      conditioner += size
    stream = mmdit_stream(keys)
    if stream and len(shape) >= 2 and keys[-1] not in ("bq", "bk", "bv"):
      matmul[stream] += size
  return {"total": total, "active": total, "matmul_active": sum(matmul.values()),
          "matmul": matmul, "conditioner": conditioner}


def _runs(key):
  """[B, L] ids constant over contiguous runs -> (first, last) index of each token's run."""
  b, l = key.shape
  idx = np.broadcast_to(np.arange(l), (b, l))
  starts = np.concatenate([np.ones((b, 1), bool), key[:, 1:] != key[:, :-1]], axis=1)
  ends = np.concatenate([key[:, 1:] != key[:, :-1], np.ones((b, 1), bool)], axis=1)
  first = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
  last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, idx, l - 1), 1), axis=1), 1)
  return first, last


def allowed_pairs(ids: MaskIds):
  """Query-key pairs the unified mask allows over non-padding queries, O(B L) on the host
  from numpy ids laid out as the batch contract says (contiguous segments and images): query
  i sees the keys of its document up to i that are not noised, plus its whole image (a clean
  image: the rest of it; a noised one: all of it)."""
  seg, mod, img = (np.asarray(x, np.int64) for x in ids[:3])
  b, l = seg.shape
  idx = np.broadcast_to(np.arange(l), (b, l))
  visible = mod != NOISED_IMAGE
  upto = np.cumsum(visible, axis=1)  # visible keys at or before i
  seg_first, _ = _runs(seg)
  causal = upto - np.take_along_axis(upto - visible, seg_first, axis=1)
  in_image = img > 0
  img_first, img_last = _runs(np.where(in_image, seg * MAX_IMAGE + img, -1 - idx))
  own = np.where(in_image, np.where(visible, img_last - idx, img_last - img_first + 1), 0)
  return int(np.sum((causal + own)[seg > 0]))


def useful_flops(matmul_params, tokens, pairs, heads, head_dim, depth):
  return 6 * matmul_params * tokens + 12 * pairs * heads * head_dim * depth


def mmdit_useful_flops(matmul, image_tokens, text_tokens, rows, pairs, text_pairs, heads,
                       head_dim, blocks, text_blocks=0):
  """The MMDiT's useful FLOPs (module docstring): matmul {image, text, joint, row} weights;
  pairs: sum over rows of (Lt + Li)^2, attended in each of `blocks` (double + single) blocks;
  text_pairs: sum of Lt^2, attended in each of the text encoder's `text_blocks`."""
  weights = (matmul["image"] * image_tokens + matmul["text"] * text_tokens
             + matmul["joint"] * (image_tokens + text_tokens) + matmul["row"] * rows)
  return 6 * weights + 12 * heads * head_dim * (pairs * blocks + text_pairs * text_blocks)


def mmdit_stream_tokens(cfg, batch, num_patches):
  """Valid tokens of the MMDiT's two streams in each row of `batch` (numpy, the batch
  contract), as `DiffusionModel` takes them: (text [B], image [B]). Text: the row's first
  L - N text positions; image: its first target's N tokens (model.mmdit.edit="kontext": and
  up to model.mmdit.references clean images of N tokens)."""
  seg, mod, img = (np.asarray(batch[k]) for k in ("segment_ids", "modality", "image_ids"))
  n, length = int(num_patches), seg.shape[1]
  text = np.minimum(np.sum((mod == TEXT) & (seg > 0), axis=1), length - n)
  image = np.minimum(np.sum(mod == NOISED_IMAGE, axis=1), n)
  m = cfg.model.mmdit
  if m.edit == "kontext" and m.references:
    clean = (mod == CLEAN_IMAGE) & (img > 0) & (seg > 0)
    idx = np.broadcast_to(np.arange(length), seg.shape)
    first, last = _runs(np.where(clean, seg * MAX_IMAGE + img, -1 - idx))
    refs = np.sum(clean & (last - first + 1 == n), axis=1)
    image = image + np.minimum(refs, int(m.references) * n)
  return text, image


def model_flops(cfg, params, batch, num_patches=0):
  """(useful FLOPs of one step on `batch` (numpy, the batch contract), attended pairs);
  num_patches: the MMDiT's image tokens N (model.family="mmdit")."""
  m = cfg.model
  head_dim = m.head_dim or m.width // m.heads
  if getattr(m, "family", "unified") == "mmdit":
    if m.condition.encoder != "text":
      raise UserError(f"model.condition.encoder='{m.condition.encoder}': unimm.bench counts the "
                      "MMDiT's FLOPs with the 'text' conditioner only")
    text, image = mmdit_stream_tokens(cfg, batch, num_patches)
    rows = image > 0
    pairs = int(np.sum(np.where(rows, text + image, 0) ** 2))
    text_pairs = int(np.sum(np.where(rows, text, 0) ** 2))
    flops = mmdit_useful_flops(params["matmul"], int(np.sum(image)), int(np.sum(text[rows])),
                               int(np.sum(rows)), pairs, text_pairs, m.heads, head_dim,
                               m.depth + m.mmdit.single_depth, m.condition.depth)
    return flops, pairs
  seg = batch["segment_ids"]
  pairs = allowed_pairs(MaskIds(seg, batch["modality"], batch["image_ids"], batch["positions"]))
  return useful_flops(params["matmul_active"], int(np.sum(seg > 0)), pairs, m.heads, head_dim,
                      m.depth), pairs


# ---------------------------------------------------------------------- data


def synthetic_batch(cfg, vocab_size, patch_dim, pixel_dim=0, seed=0):
  """Random token ids, one document of the whole row per row (numpy, the batch contract)."""
  b, l = cfg.data.batch_size, cfg.data.seq_len
  tokens = np.random.default_rng(seed).integers(0, vocab_size, (b, l), dtype=np.int32)
  zeros = np.zeros((b, l), np.int32)
  return {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1),
          "loss_mask": np.ones((b, l), np.float32),
          "patches": np.zeros((b, l, patch_dim), np.float32),
          "pixels": np.zeros((b, l, pixel_dim), np.uint8), "encode": zeros,
          "modality": zeros, "image_ids": zeros, "patch_index": zeros,
          "segment_ids": np.ones((b, l), np.int32),
          "positions": np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy()}


def synthetic_mmdit_batch(cfg, tokenizer, grid, seed=0):
  """One text-to-image document per row, filling it (numpy, the batch contract, laid out as
  `unimm.data.pipeline.encode_document` lays one out): <bos>, L - N - 4 random text ids (no
  special ids), <boi>, the N tokens of a noised image (random patches in [-1, 1], patch_index
  0..N-1; vae: random pixels to encode), <eoi>, <eos>. The text stream (the first L - N text
  positions) holds exactly the row's L - N text positions."""
  b, length, n = cfg.data.batch_size, cfg.data.seq_len, grid.num_patches
  words = length - n - 4
  if words < 0:
    raise UserError(f"data.seq_len={length} holds no document of a {n}-token image: use "
                    f"data.seq_len >= {n + 4}")
  rng = np.random.default_rng(seed)
  plain = np.setdiff1d(np.arange(tokenizer.vocab_size), sorted(tokenizer.special_ids))
  row = np.concatenate([[tokenizer.bos_id], np.zeros(words, np.int64), [tokenizer.boi_id],
                        np.zeros(n, np.int64), [tokenizer.eoi_id, tokenizer.eos_id]])
  tokens = np.tile(row, (b, 1)).astype(np.int32)
  tokens[:, 1:1 + words] = rng.choice(plain, (b, words))
  start = words + 2
  image = np.zeros((b, length), bool)
  image[:, start:start + n] = True
  zeros = np.zeros((b, length), np.int32)
  patches = np.zeros((b, length, grid.patch_dim), np.float32)
  pixels = np.zeros((b, length, grid.pixel_dim), np.uint8)
  if grid.pixel_dim:  # vae: the step encodes the pixels
    pixels[image] = rng.integers(0, 256, (b * n, grid.pixel_dim), dtype=np.uint8)
  else:
    patches[image] = rng.uniform(-1, 1, (b * n, grid.patch_dim))
  patch_index = zeros.copy()
  patch_index[:, start:start + n] = np.arange(n)
  return {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1),
          "loss_mask": np.zeros((b, length), np.float32), "patches": patches, "pixels": pixels,
          "encode": (image & (grid.pixel_dim > 0)).astype(np.int32),
          "modality": np.where(image, NOISED_IMAGE, TEXT).astype(np.int32),
          "image_ids": image.astype(np.int32), "patch_index": patch_index,
          "segment_ids": np.ones((b, length), np.int32),
          "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()}


def pipeline_batches(cfg, patch_dim, pixel_dim=0, n=PIPELINE_BATCHES):
  """The first n batches of the config's data pipeline (all rows: the mesh is this host's)."""
  from unimm.data.pipeline import make_iterator, validate_batch
  it = make_iterator(cfg)
  try:
    batches = [next(it) for _ in range(n)]
  finally:
    it.close()
  for batch in batches:
    validate_batch(batch, seq_len=cfg.data.seq_len, patch_dim=patch_dim,
                   batch_size=cfg.data.batch_size, pixel_dim=pixel_dim)
  return batches


def batch_stats(batches, pairs):
  """Shares of real (non-padding) positions, of image tokens among them, of allowed pairs."""
  seg = np.stack([b["segment_ids"] for b in batches])
  image = np.stack([b["modality"] != TEXT for b in batches])[seg > 0]
  _, b, l = seg.shape
  return {"real_token_share": round(float(np.mean(seg > 0)), 4),
          "image_token_share": round(float(np.mean(image)), 4) if image.size else 0.0,
          "allowed_pair_share": round(float(np.mean(pairs)) / (b * l * l), 4)}


# ----------------------------------------------------------------- the step


def _int(opts, name, default, least=1):
  raw = opts.get(name)
  if raw is None:
    return default
  try:
    value = int(raw)
  except ValueError:
    raise UserError(f"--{name}={raw}: expected an integer") from None
  if value < least:
    raise UserError(f"--{name}={raw}: expected an integer >= {least}")
  return value


def config_name(argv):
  """The config file's name without .py (`--config FILE[:arg]` or `--config=FILE[:arg]`)."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      path = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
    else:
      continue
    return os.path.splitext(os.path.basename(path.partition(":")[0]))[0]
  return "config"


def train_step_bench(cfg, name, *, steps, warmup, data, devices, peers):
  """Times the config's train step on each kind of `data` (one compile: the shapes are the
  same); returns the JSON records, the peers' first."""
  from unimm.data.tokenizer import load_tokenizer
  from unimm.image_grid import image_grid
  from unimm.parallel.sharding import make_mesh
  from unimm.train.loop import check_batch_fits_mesh, check_vocab
  from unimm.train.step import Trainer

  tokenizer = load_tokenizer(cfg.data.tokenizer)
  check_vocab(cfg, tokenizer)
  vocab = cfg.model.vocab_size or tokenizer.model_vocab_size()
  grid = image_grid(cfg, tokenizer.model_vocab_size())
  patch_dim, pixel_dim = grid.patch_dim, grid.pixel_dim
  params = parameter_summary(cfg, vocab)
  # first, before JAX takes the accelerator's memory
  mmdit = getattr(cfg.model, "family", "unified") == "mmdit"
  n = grid.num_patches if mmdit else 0
  peer = {d: run_peer(cfg, name, d, steps, warmup, vocab) for d in data} if peers else {}

  local = jax.local_devices()
  if devices > len(local):
    raise UserError(f"--devices={devices}: this host has {len(local)} "
                    f"{jax.default_backend()} devices")
  devs = local[:devices] if devices else local
  mesh = make_mesh(cfg.mesh, devs)
  check_batch_fits_mesh(cfg, mesh)
  trainer = Trainer(cfg, mesh, vocab)
  rng = jax.random.key(cfg.seed)
  state = jax.block_until_ready(trainer.init())
  compiled = compile_s = None
  lines = []
  for kind in data:
    if kind == "pipeline":
      host = pipeline_batches(cfg, patch_dim, pixel_dim)
    elif mmdit:
      host = [synthetic_mmdit_batch(cfg, tokenizer, grid, cfg.seed)]
    else:
      host = [synthetic_batch(cfg, vocab, patch_dim, pixel_dim, cfg.seed)]
    counted = [model_flops(cfg, params, b, n) for b in host]
    batches = [trainer.device_batch(b) for b in host]
    if compiled is None:
      t = time.perf_counter()
      frozen = trainer.tokenizer_variables  # the image tokenizer's (vae / vq), else empty
      compiled = trainer.train_step.lower(state, batches[0], rng, frozen).compile()
      compile_s = time.perf_counter() - t
    for i in range(warmup):
      state, metrics = jax.block_until_ready(compiled(state, batches[i % len(batches)], rng, frozen))
    times, flops = [], []
    for i in range(warmup, warmup + steps):
      t = time.perf_counter()
      state, metrics = jax.block_until_ready(compiled(state, batches[i % len(batches)], rng, frozen))
      times.append(time.perf_counter() - t)
      flops.append(counted[i % len(counted)][0])
    line = step_record(cfg, name, kind, devs, compiled, compile_s, warmup, times, flops, params,
                       batch_stats(host, [p for _, p in counted]), float(metrics["loss"]))
    if peers:
      line.update(compare(line, peer[kind]))
    lines.append(line)
  return list(peer.values()) + lines


def step_record(cfg, name, data, devs, compiled, compile_s, warmup, times, flops, params, stats,
                loss):
  """The JSON record of one timed run of the step (see the module docstring)."""
  median = statistics.median(times)
  per_step = float(np.mean(flops))
  kind = devs[0].device_kind
  peak = peak_flops(kind)
  tflops = per_step / median / len(devs) / 1e12
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  device_stats = [d.memory_stats() for d in devs]
  peaks = [s["peak_bytes_in_use"] for s in device_stats if s and "peak_bytes_in_use" in s]
  m, b, l = cfg.model, cfg.data.batch_size, cfg.data.seq_len
  return {
      "kind": "train_step", "config": name, "device": kind, "devices": len(devs),
      "backend": jax.default_backend(), "data": data, "batch": b, "seq_len": l,
      "steps": len(times), "warmup": warmup,
      "step_time_s": {"median": round(median, 5), "each": [round(x, 5) for x in times]},
      "tokens_per_s": round(b * l / median, 1),
      "useful_flops_per_step": per_step, "useful_tflops_per_device": _sig(tflops),
      "mfu": round(tflops * 1e12 / peak, 4) if peak else None,
      "xla_flops_per_device": float(cost["flops"]) if cost and "flops" in cost else None,
      "compile_s": round(compile_s, 2),
      "memory": {"peak_bytes": max(peaks) if peaks else None,
                 "argument_bytes": mem.argument_size_in_bytes if mem else None,
                 "output_bytes": mem.output_size_in_bytes if mem else None,
                 "temp_bytes": mem.temp_size_in_bytes if mem else None,
                 "alias_bytes": mem.alias_size_in_bytes if mem else None},
      "levers": {"dtype": m.dtype, "attention": m.attention, "scan": m.scan, "remat": m.remat,
                 "ce_chunk": m.ce_chunk, "mu_dtype": cfg.optim.mu_dtype,
                 "moe_impl": m.moe.impl if m.moe.experts else None,
                 "capacity_factor": m.moe.capacity_factor if m.moe.experts else None},
      "params": params, "batch_stats": stats, "loss": loss,
      "versions": versions("jax", "jaxlib", "flax", "optax"),
      "date": _now(),
  }


def compare(line, peer):
  """{peer: who (or why none, or its error), vs_peer: unimm / peer of tokens/s and peak memory}."""
  ok = "tokens_per_s" in peer
  mine, theirs = line["memory"]["peak_bytes"], peer.get("peak_bytes")
  speed = round(line["tokens_per_s"] / peer["tokens_per_s"], 3) if ok else None
  return {"peer": {k: peer[k] for k in ("peer", "note", "error") if k in peer},
          "vs_peer": {"tokens_per_s": speed,
                      "peak_bytes": round(mine / theirs, 3) if ok and mine and theirs else None}}


def run_peer(cfg, name, data, steps, warmup, vocab):
  """The peer's record: its measurement (`python -m unimm.bench_peers` in a subprocess, with
  the FLOP count and MFU of this module), or why there is none, or its error."""
  spec = bench_peers.peer_spec(cfg, data, vocab)
  base = {"kind": "peer", "config": name, "data": data}
  if "note" in spec:
    return dict(base, peer=None, note=spec["note"])
  spec.update(steps=steps, warmup=warmup)
  root = os.path.dirname(os.path.dirname(os.path.abspath(bench_peers.__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (root, os.environ.get("PYTHONPATH")) if p))
  proc = subprocess.run([sys.executable, "-m", "unimm.bench_peers", json.dumps(spec)], env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  sys.stderr.write(proc.stderr)
  lines = proc.stdout.strip().splitlines()
  if proc.returncode or not lines:
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return dict(base, peer=spec["name"], error=f"exit {proc.returncode}: {last}")
  out = dict(base, **json.loads(lines[-1]))
  b, l = spec["batch"], spec["seq_len"]
  median = out["step_time_s"]["median"]
  if spec.get("family") == "mmdit":
    f, lt, li = spec["flux"], spec["text_tokens"], spec["image_tokens"]
    flops = mmdit_useful_flops(out["params"]["matmul"], b * li, b * lt, b, b * (lt + li) ** 2, 0,
                               f["num_attention_heads"], f["attention_head_dim"],
                               f["num_layers"] + f["num_single_layers"])
  else:
    flops = useful_flops(out["params"]["matmul_active"], b * l, b * l * (l + 1) // 2,
                         spec["hf"]["num_attention_heads"], spec["hf"]["head_dim"],
                         spec["hf"]["num_hidden_layers"])
  peak = peak_flops(out["device"])
  out.update(tokens_per_s=round(b * l / median, 1), useful_flops_per_step=float(flops),
             useful_tflops_per_device=_sig(flops / median / 1e12),
             mfu=round(flops / median / peak, 4) if peak else None)
  return out


# ----------------------------------------------------------------- attention


def causal_ids(batch, seq):
  """One text document per row."""
  zeros = np.zeros((batch, seq), np.int32)
  return MaskIds(np.ones((batch, seq), np.int32), zeros, zeros,
                 np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy())


def shapes_like_ids(batch, seq, image_tokens, seed=0):
  """Packed rows like the Shapes pipeline's (numpy MaskIds): documents one after another while
  they fit, then padding; a document is text-to-image (4 in 5: <bos>, a prompt of 8-40
  tokens, <boi>, a noised image, <eoi>) or a caption (<bos>, <boi>, a clean image, <eoi>,
  8-40 tokens)."""
  if seq < image_tokens + 43:
    raise UserError(f"--seq={seq} holds no document of a {image_tokens}-token image: use "
                    f"--seq >= {image_tokens + 43} or fewer --image-tokens")
  rng = np.random.default_rng(seed)
  cols = {k: np.zeros((batch, seq), np.int32) for k in MaskIds._fields}
  for row in range(batch):
    i = seg = 0
    while True:
      noised, text = rng.random() < 0.8, int(rng.integers(8, 41))
      n = text + image_tokens + 3
      if i + n > seq:
        break
      seg += 1
      start = i + (text + 2 if noised else 2)
      cols["segment"][row, i:i + n] = seg
      cols["position"][row, i:i + n] = np.arange(n)
      cols["image"][row, start:start + image_tokens] = 1
      cols["modality"][row, start:start + image_tokens] = NOISED_IMAGE if noised else CLEAN_IMAGE
      i += n
  return MaskIds(**cols)


def mean_call_time(fn, *args, iters):
  """Seconds per call of fn(*args) over `iters` calls, after one call that compiles."""
  jax.block_until_ready(fn(*args))  # compile
  t = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / iters


def attention_impls(backend):
  """The kernels `attention` runs as such on this backend (flash on CPU is interpreted)."""
  if backend == "gpu":
    return ("xla", "flash") + (("cudnn",) if kernels.cudnn_available() else ())
  return ("xla", "flash") if backend == "tpu" else ("xla",)


def attention_bench(opts):
  """Times the attention kernels on a causal and a unified mask; returns the JSON records."""
  backend = "gpu" if jax.default_backend() in ("cuda", "rocm") else jax.default_backend()
  cpu = backend == "cpu"
  b = _int(opts, "batch", 1 if cpu else 4)
  l = _int(opts, "seq", 1024 if cpu else 4096)
  h = _int(opts, "heads", 4 if cpu else 16)
  d = _int(opts, "head-dim", 64 if cpu else 128)
  iters = _int(opts, "iters", 3 if cpu else 10)
  image_tokens = _int(opts, "image-tokens", 256)
  impls = tuple(opts["impls"].split(",")) if opts.get("impls") else attention_impls(backend)
  unknown = [i for i in impls if i not in kernels.IMPLS]
  if unknown:
    raise UserError(f"--impls: unknown kernel '{unknown[0]}'; kernels: "
                    f"{', '.join(kernels.IMPLS[1:])}")
  dtype = jnp.float32 if cpu else jnp.bfloat16
  kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
  q, k, v, dout = (jax.random.normal(key, (b, l, h, d), dtype) for key in (kq, kk, kv, kg))
  device = jax.local_devices()[0].device_kind
  base = {"kind": "attention", "device": device, "backend": backend, "batch": b, "seq_len": l,
          "heads": h, "head_dim": d, "dtype": jnp.dtype(dtype).name}
  records, tflops = [], {}
  masks = (("causal", causal_ids(b, l)), ("unified", shapes_like_ids(b, l, image_tokens)))
  for mask, host_ids in masks:
    pairs = allowed_pairs(host_ids)
    ids = MaskIds(*(jnp.asarray(x) for x in host_ids))
    for impl in impls:
      line = dict(base, mask=mask, impl=impl, allowed_pair_share=round(pairs / (b * l * l), 4))
      if impl == "cudnn" and (mask == "unified" or backend != "gpu"):
        why = "takes text-only causal rows" if backend == "gpu" else "runs on GPUs only"
        records.append(dict(line, skipped=f"cuDNN {why}; the dispatch runs flash here"))
        continue
      fwd = jax.jit(lambda q, k, v, ids, impl=impl: kernels.attention(q, k, v, ids, ids, impl))
      grad = jax.jit(jax.grad(  # backward from a random output gradient (an argument)
          lambda q, k, v, dout, ids, impl=impl: jnp.sum(
              (kernels.attention(q, k, v, ids, ids, impl) * dout).astype(jnp.float32)),
          argnums=(0, 1, 2)))
      try:
        fwd_s = mean_call_time(fwd, q, k, v, ids, iters=iters)
        both_s = mean_call_time(grad, q, k, v, dout, ids, iters=iters)
      except Exception as e:  # pylint: disable=broad-except  (a kernel being written may fail)
        records.append(dict(line, error=f"{type(e).__name__}: {(str(e) or '-').splitlines()[0]}"))
        continue
      tflops[mask, impl] = (4 * pairs * h * d / fwd_s / 1e12, 12 * pairs * h * d / both_s / 1e12)
      records.append(dict(line, fwd_ms=_sig(fwd_s * 1e3), fwd_bwd_ms=_sig(both_s * 1e3),
                          fwd_tflops=_sig(tflops[mask, impl][0]),
                          fwd_bwd_tflops=_sig(tflops[mask, impl][1])))
  flash, cudnn = tflops.get(("unified", "flash")), tflops.get(("causal", "cudnn"))
  ratio = ({"fwd": round(flash[0] / cudnn[0], 3), "fwd_bwd": round(flash[1] / cudnn[1], 3)}
           if flash and cudnn else None)
  records.append(dict(base, kind="attention_summary", unified_flash_vs_cudnn_causal=ratio,
                      versions=versions("jax", "jaxlib"), date=_now()))
  return records


# --------------------------------------------------------------------- table


def _gib(x):
  return f"{x / 2**30:.1f}" if x else "-"


def _num(x, fmt="{:,.0f}"):
  return "-" if x is None else fmt.format(x)


def table(records):
  """Markdown: a header (devices, versions, date), the train steps against their peers, the
  attention kernels."""
  steps = [r for r in records if r.get("kind") == "train_step"]
  peers = {(r["config"], r["data"]): r for r in records if r.get("kind") == "peer"}
  attn = [r for r in records if r.get("kind") == "attention"]
  summary = [r for r in records if r.get("kind") == "attention_summary"]
  lines = []
  head = (steps or summary)[:1]
  if head:
    r = head[0]
    v = dict(r["versions"], **next((p["versions"] for p in peers.values() if "versions" in p), {}))
    lines += [f"Measured {r['date']} on {r.get('devices', 1)} x {r['device']} ({r['backend']}); "
              + ", ".join(f"{k} {x}" for k, x in v.items() if x), ""]
  if steps:
    lines += ["| workload | data | peer | peer tokens/s | unimm tokens/s | unimm / peer | "
              "peer MFU | unimm MFU | unimm step (ms) | compile (s) | "
              "peak memory GiB, unimm / peer | levers |", "|" + "---|" * 12]
    for r in steps:
      p = peers.get((r["config"], r["data"]), {})
      name = p.get("peer") or ("none" if "note" in p else "-")
      if p.get("error"):
        name = f"{name}: {p['error']}"
      levers = ", ".join(k if v is True else f"{k} {v}" for k, v in r["levers"].items()
                         if v not in (None, False, 0, "none"))
      lines.append(
          f"| {r['config']} ({r['batch']} x {r['seq_len']}) | {r['data']} | {name} | "
          f"{_num(p.get('tokens_per_s'))} | {_num(r['tokens_per_s'])} | "
          f"{_num((r.get('vs_peer') or {}).get('tokens_per_s'), '{:.2f}')} | "
          f"{_num(p.get('mfu'), '{:.1%}')} | {_num(r['mfu'], '{:.1%}')} | "
          f"{r['step_time_s']['median'] * 1e3:.1f} | {r['compile_s']:.1f} | "
          f"{_gib(r['memory']['peak_bytes'])} / {_gib(p.get('peak_bytes'))} | {levers} |")
    lines.append("")
  if attn:
    lines += ["| mask | kernel | allowed pairs | fwd TFLOP/s | fwd+bwd TFLOP/s | fwd ms | "
              "fwd+bwd ms |", "|" + "---|" * 7]
    for r in attn:
      note = r.get("skipped") or r.get("error")
      cells = ([note, "", "", ""] if note else
               [f"{r[k]:.3g}" for k in ("fwd_tflops", "fwd_bwd_tflops", "fwd_ms", "fwd_bwd_ms")])
      lines.append(f"| {r['mask']} | {r['impl']} | {r['allowed_pair_share']:.1%} | "
                   + " | ".join(cells) + " |")
    for s in summary:
      ratio = s["unified_flash_vs_cudnn_causal"]
      ratio = (f"{ratio['fwd']:.2f} forward, {ratio['fwd_bwd']:.2f} forward+backward" if ratio
               else "not measured here")
      lines += ["", f"{s['batch']} x {s['seq_len']}, {s['heads']} heads of {s['head_dim']}, "
                f"{s['dtype']}; unified-mask flash / cuDNN causal (useful TFLOP/s): {ratio}"]
  return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------- main


def emit(records, out):
  for r in records:
    print(json.dumps(r), flush=True)
  if out:
    with open(out, "a") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  cfg, opts = parse_args(
      argv, flags=("steps", "warmup", "data", "devices", "out", "table", "batch", "seq", "heads",
                   "head-dim", "image-tokens", "impls", "iters"),
      switches=("peers", "attention"), default_config=lambda opts: None)
  if opts["table"]:
    if not os.path.exists(opts["table"]):
      raise UserError(f"--table {opts['table']}: no such file")
    with open(opts["table"]) as f:
      records = [json.loads(line) for line in f if line.strip()]
    text = table(records)
    print(text, end="")
    return text
  if opts["attention"]:
    records = attention_bench(opts)
  else:
    if cfg is None:
      raise UserError("--config FILE is required (e.g. --config configs/bench/dense_1b.py), "
                      "or --attention, or --table FILE")
    raw = opts["data"] or cfg.get("bench", {}).get("data", "synthetic")
    data = list(dict.fromkeys(raw.split(",")))
    if not data or any(d not in DATA for d in data):
      raise UserError(f"--data={raw}: use synthetic, pipeline or synthetic,pipeline")
    records = train_step_bench(cfg, config_name(argv), steps=_int(opts, "steps", 10),
                               warmup=_int(opts, "warmup", 3, least=0), data=data,
                               devices=_int(opts, "devices", 0), peers=opts["peers"])
  emit(records, opts["out"])
  return records


if __name__ == "__main__":
  cli(main)
