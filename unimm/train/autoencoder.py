"""Training of image tokenizers (KL-VAE or VQ / FSQ / LFQ autoencoders) on Shapes images.

    python -m unimm.train.autoencoder --config configs/vae_shapes.py --workdir runs/vae \
        [--config.KEY=VALUE ...]

The config is `unimm.config.defaults()` plus a `tokenizer` section
(`tokenizer_defaults()`); the fields used are seed, data.image_size,
data.batch_size, data.two_object_prob, data.mixture (data.max_error_rate,
data.error_min_records), optim.*, train.steps / log_every / ckpt_every /
keep_ckpts / time_limit_s, mesh.* and tokenizer.*.

Data: by default the built-in Shapes world, one or two objects per image; with
data.mixture any source of the data pipeline (`ImageStream`). The stream is
deterministic (batch `s` is drawn from seed (0, seed, s), so a resumed run sees
the same images as an uninterrupted one); held-out images are Shapes scenes from
(1, tokenizer.eval_seed) (for other images: `python -m unimm.tokenize reconstruct`).

Losses: reconstruction (l1 / l2), the KL or quantizer term, optionally an LPIPS-style
perceptual term (tokenizer.perceptual_weight, weights read from the local file
tokenizer.perceptual_weights, see `unimm.models.perceptual`) and, with
tokenizer.disc_weight > 0, a PatchGAN generator term as taming-transformers' VQGAN:
from tokenizer.disc_start on, loss += disc_weight * lambda * -E[D(rec)], lambda the
adaptive weight ||grad rec loss|| / (||grad gan loss|| + 1e-4) at the decoder's last
conv (clipped to [0, 1e4], no gradient); the discriminator (`unimm.models.discriminator`)
trains with its own Adam from the same step on.

The workdir holds `checkpoints/` (Orbax: params, quantizer statistics, optimizer
state, step and, with a discriminator, its params and optimizer state), `tb/`,
`metrics.jsonl`, `config.json` and, at the end, `eval.json` with the held-out PSNR
(dB, on uint8 images) and, for vq, codebook usage and perplexity over the eval set. Starting again in the same workdir continues from
its latest checkpoint.
"""

import collections
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from unimm.config import defaults, tokenizer_defaults
from unimm.data import records
from unimm.data.shapes import random_scene, render
from unimm.errors import UserError, cli
from unimm.models import discriminator as disc_lib
from unimm.models.autoencoder import (KINDS, QUANTIZERS, build_tokenizer, check_shapes, num_codes,
                                      to_float, to_uint8)
from unimm.models.perceptual import load_perceptual, perceptual_distance
from unimm.models.quantizers import QuantizerStat
from unimm.parallel import sharding as shd
from unimm.train.loop import summary_writer
from unimm.train.step import make_optimizer

REC_LOSSES = ("l1", "l2")


def default_config() -> ml_collections.ConfigDict:
  c = defaults()
  c.tokenizer = tokenizer_defaults()
  return c


def check_config(cfg):
  t = cfg.get("tokenizer")
  if t is None:
    raise UserError("config has no 'tokenizer' section: start from "
                    "unimm.train.autoencoder.default_config() (see configs/vae_shapes.py)")
  if t.kind not in KINDS:
    raise UserError(f"tokenizer.kind='{t.kind}': use one of {', '.join(KINDS)}")
  if t.kind == "vq" and t.quantizer not in QUANTIZERS:
    raise UserError(f"tokenizer.quantizer='{t.quantizer}': use one of {', '.join(QUANTIZERS)}")
  if t.rec_loss not in REC_LOSSES:
    raise UserError(f"tokenizer.rec_loss='{t.rec_loss}': use one of {', '.join(REC_LOSSES)}")
  f = 2 ** (len(t.block_out_channels) - 1)
  if cfg.data.image_size % f:
    raise UserError(f"data.image_size={cfg.data.image_size} is not a multiple of the downsampling "
                    f"factor {f} of tokenizer.block_out_channels={tuple(t.block_out_channels)}")
  if cfg.data.batch_size < 1 or t.eval_images < 1 or t.restart_every < 1:
    raise UserError("data.batch_size, tokenizer.eval_images and tokenizer.restart_every must be >= 1")
  if t.disc_weight > 0:
    if t.disc_loss not in disc_lib.LOSSES:
      raise UserError(f"tokenizer.disc_loss='{t.disc_loss}': use one of {', '.join(disc_lib.LOSSES)}")
    if t.disc_norm not in disc_lib.NORMS:
      raise UserError(f"tokenizer.disc_norm='{t.disc_norm}': use one of {', '.join(disc_lib.NORMS)}")
    if disc_lib.output_size(cfg.data.image_size, t.disc_layers) < 1:
      raise UserError(f"tokenizer.disc_layers={t.disc_layers} leaves no patch of "
                      f"{cfg.data.image_size}-pixel images: use fewer layers")
  if t.perceptual_weight > 0 and not os.path.exists(t.perceptual_weights or ""):
    load_perceptual(t.perceptual_weights)  # raises the one-line error naming the file


def decode_with_hidden(model, latent):
  """(input of the decoder's last conv, reconstruction): the decoder of `unimm.models.vae`
  unrolled, so the GAN's adaptive weight can differentiate w.r.t. that last layer."""
  post = getattr(model, "post_quant_conv", None)
  z = post(latent) if post is not None else latent
  dec = model.decoder
  x = dec.mid_block(dec.conv_in(z))
  for block in dec.up_blocks:
    x = block(x)
  h = jax.nn.silu(dec.conv_norm_out(x))
  return h, dec.conv_out(h)


def reconstruction_loss(rec, x, t, perceptual=None):
  """(rec loss + perceptual_weight * LPIPS, {rec, perceptual}) of images in [-1, 1]."""
  err = rec.astype(jnp.float32) - x
  rec_loss = jnp.mean(jnp.abs(err)) if t.rec_loss == "l1" else jnp.mean(err ** 2)
  if perceptual is None:
    return rec_loss, {"rec": rec_loss}
  p = jnp.mean(perceptual_distance(perceptual, rec, x))
  return rec_loss + t.perceptual_weight * p, {"rec": rec_loss, "perceptual": p}


def forward(model, images, rng, t, train, perceptual=None):
  """(loss, metrics, extras) of a batch of uint8 images; extras: x (images in [-1, 1]),
  rec, hidden (input of the decoder's last conv) and, for vq, (quantizer input, indices)
  as `codes`.

  The quantizer runs with train=False: its statistics (EMA) are updated by the caller,
  outside the gradient trace.
  """
  x = to_float(images)
  metrics, codes = {}, None
  if t.kind == "vae":
    mean, logvar = model.encode(x)
    latent = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape) if train else mean
    kl = 0.5 * jnp.mean(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)
    aux = t.kl_weight * kl
    metrics["kl"] = kl
  else:
    z = model.encode(x)
    q = model.quantizer(z)
    latent, codes = q["z_q"], (z, q["indices"])
    aux = t.quantizer_weight * q["loss"]
    metrics.update(quantizer_loss=q["loss"], usage=q["usage"], perplexity=q["perplexity"])
  hidden, rec = decode_with_hidden(model, latent)
  rec_total, parts = reconstruction_loss(rec, x, t, perceptual)
  loss = rec_total + aux
  err = rec.astype(jnp.float32) - x
  # PSNR of this batch on the [-1, 1] scale (peak-to-peak 2), as on [0, 255].
  metrics.update(parts, loss=loss,
                 psnr=10.0 * jnp.log10(4.0 / jnp.maximum(jnp.mean(err ** 2), 1e-10)))
  return loss, metrics, {"x": x, "rec": rec, "hidden": hidden, "codes": codes}


class AutoencoderTrainer:
  """Train state {params, stats, opt_state, step}, its shardings and the jitted step."""

  def __init__(self, cfg, mesh):
    check_config(cfg)
    self.cfg, self.t, self.mesh = cfg, cfg.tokenizer, mesh
    self.rules = tuple(tuple(r) for r in cfg.mesh.rules)
    n = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    if cfg.data.batch_size % n:
      raise UserError(f"data.batch_size={cfg.data.batch_size} does not divide over the {n} batch "
                      f"shards of the mesh: use a multiple of {n}")
    abstract = nnx.eval_shape(lambda: build_tokenizer(self.t, nnx.Rngs(cfg.seed)))
    self.graphdef, abs_params, abs_stats = nnx.split(abstract, nnx.Param, QuantizerStat)
    self.tx, self.schedule = make_optimizer(cfg.optim, cfg.train.steps)
    rep = shd.replicated(mesh)
    abs_opt = jax.eval_shape(self.tx.init, abs_params)
    self.state_shardings = {
        "params": shd.state_shardings(abs_params, mesh, self.rules),
        "stats": shd.state_shardings(abs_stats, mesh, self.rules),
        "opt_state": jax.tree.map(lambda _: rep, abs_opt), "step": rep}
    abstract = {"params": abs_params, "stats": abs_stats, "opt_state": abs_opt,
                "step": jax.ShapeDtypeStruct((), jnp.int32)}
    # The perceptual net is fixed (not in the train state); read once, before any training.
    self.perceptual = (load_perceptual(self.t.perceptual_weights)
                       if self.t.perceptual_weight > 0 else None)
    self.gan = self.t.disc_weight > 0
    if self.gan:
      # The discriminator has its own params and Adam state in the train state (checkpointed).
      abs_disc = nnx.eval_shape(lambda: self._build_disc())
      self.disc_graphdef, abs_disc_params = nnx.split(abs_disc, nnx.Param)
      self.disc_tx = optax.adam(self.t.disc_lr or cfg.optim.lr, b1=0.5, b2=0.9)
      abs_disc_opt = jax.eval_shape(self.disc_tx.init, abs_disc_params)
      self.state_shardings.update(
          disc_params=shd.state_shardings(abs_disc_params, mesh, self.rules),
          disc_opt_state=jax.tree.map(lambda _: rep, abs_disc_opt))
      abstract.update(disc_params=abs_disc_params, disc_opt_state=abs_disc_opt)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
        self.state_shardings)
    self.batch_sharding = shd.batch_sharding(mesh, self.rules, 4)
    self.restarts = (self.t.kind == "vq" and self.t.quantizer == "vq"
                     and self.t.dead_code_threshold > 0)
    self.init = jax.jit(self._init, out_shardings=self.state_shardings)
    self.step = jax.jit(self._step, in_shardings=(self.state_shardings, self.batch_sharding, rep),
                        out_shardings=(self.state_shardings, rep), donate_argnums=0)
    self.reconstruct = jax.jit(self._reconstruct)

  def _build_disc(self):
    return disc_lib.PatchDiscriminator(channels=self.t.disc_channels, n_layers=self.t.disc_layers,
                                       norm=self.t.disc_norm, rngs=nnx.Rngs(self.cfg.seed + 1))

  def _init(self):
    model = build_tokenizer(self.t, nnx.Rngs(self.cfg.seed))
    _, params, stats = nnx.split(model, nnx.Param, QuantizerStat)
    state = {"params": params, "stats": stats, "opt_state": self.tx.init(params),
             "step": jnp.zeros((), jnp.int32)}
    if self.gan:
      _, disc_params = nnx.split(self._build_disc(), nnx.Param)
      state.update(disc_params=disc_params, disc_opt_state=self.disc_tx.init(disc_params))
    return state

  def _gan_terms(self, model, extras, disc_params, step):
    """(weighted generator loss, metrics): disc_weight * adaptive weight * -E[D(rec)] from
    tokenizer.disc_start on, 0 before; the adaptive weight compares the gradients of the
    reconstruction (+ perceptual) loss and of the generator loss w.r.t. the decoder's last
    conv kernel (taming's calculate_adaptive_weight)."""
    t = self.t
    disc = nnx.merge(self.disc_graphdef, jax.lax.stop_gradient(disc_params))
    g_loss = disc_lib.generator_loss(disc(extras["rec"]))
    conv = model.decoder.conv_out
    hidden, bias = jax.lax.stop_gradient(extras["hidden"]), jax.lax.stop_gradient(conv.bias[...])
    last = lambda k: jax.lax.conv_general_dilated(
        hidden, k, (1, 1), conv.padding, dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
    rec0, vjp = jax.vjp(last, jax.lax.stop_gradient(conv.kernel[...]))
    d_rec = jax.grad(lambda r: reconstruction_loss(r, extras["x"], t, self.perceptual)[0])(rec0)
    d_gan = jax.grad(lambda r: disc_lib.generator_loss(disc(r)))(rec0)
    weight = disc_lib.adaptive_weight(vjp(d_rec)[0], vjp(d_gan)[0])
    on = (step >= t.disc_start).astype(jnp.float32)
    gan_weight = on * t.disc_weight * weight
    return gan_weight * g_loss, {"g_loss": g_loss, "adaptive_weight": weight,
                                 "gan_weight": gan_weight}

  def _disc_step(self, state, x, rec, step):
    """One Adam step of the discriminator on real x vs detached rec (a no-op before disc_start)."""
    on = (step >= self.t.disc_start).astype(jnp.float32)

    def d_loss_fn(dp):
      disc = nnx.merge(self.disc_graphdef, dp)
      real, fake = disc(x), disc(jax.lax.stop_gradient(rec))
      return on * disc_lib.discriminator_loss(real, fake, self.t.disc_loss), (real, fake)

    (d_loss, (real, fake)), grads = jax.value_and_grad(d_loss_fn, has_aux=True)(
        state["disc_params"])
    updates, opt_state = self.disc_tx.update(grads, state["disc_opt_state"], state["disc_params"])
    params = optax.apply_updates(state["disc_params"], updates)
    # Before disc_start neither the params nor Adam's step count move.
    keep = lambda new, old: jnp.where(on > 0, new, old)
    params = jax.tree.map(keep, params, state["disc_params"])
    opt_state = jax.tree.map(keep, opt_state, state["disc_opt_state"])
    metrics = {"d_loss": d_loss, "logits_real": jnp.mean(real), "logits_fake": jnp.mean(fake)}
    return params, opt_state, metrics

  def _step(self, state, images, rng):
    params, stats, step = state["params"], state["stats"], state["step"]
    rng = jax.random.fold_in(rng, step)

    def loss_fn(p):
      model = nnx.merge(self.graphdef, p, stats)
      loss, metrics, extras = forward(model, images, rng, self.t, train=True,
                                      perceptual=self.perceptual)
      if self.gan:
        g_term, gan_metrics = self._gan_terms(model, extras, state["disc_params"], step)
        loss = loss + g_term
        metrics = dict(metrics, **gan_metrics, loss=loss)
      return loss, (metrics, extras)

    (_, (metrics, extras)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = self.tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), lr=self.schedule(step))
    new_state = {}
    if self.gan:
      disc_params, disc_opt, d_metrics = self._disc_step(state, extras["x"], extras["rec"], step)
      new_state.update(disc_params=disc_params, disc_opt_state=disc_opt)
      metrics.update(d_metrics)
    if self.t.kind == "vq" and self.t.quantizer == "vq":
      # EMA cluster sizes (and codebook with ema) from this batch, then dead-code restarts;
      # from the same z (pre-update encoder) whose codes the straight-through pass used.
      z, indices = extras["codes"]
      model = nnx.merge(self.graphdef, params, stats)
      model.quantizer.ema_update(z, indices)
      _, params, stats = nnx.split(model, nnx.Param, QuantizerStat)
    if self.restarts:
      model = nnx.merge(self.graphdef, params, stats)
      dead = model.quantizer.restart_dead_codes(z, jax.random.fold_in(rng, 1),
                                                self.t.dead_code_threshold)
      # Always at the first step: cluster sizes start at 0, so this seeds the codebook from data.
      now = (step == 0) | ((step + 1) % self.t.restart_every == 0)
      _, new_params, new_stats = nnx.split(model, nnx.Param, QuantizerStat)
      pick = lambda new, old: jnp.where(now, new, old)
      params, stats = jax.tree.map(pick, new_params, params), jax.tree.map(pick, new_stats, stats)
      metrics["restarted"] = jnp.where(now, dead.sum(), 0).astype(jnp.float32)
    new_state.update(params=params, stats=stats, opt_state=opt_state, step=step + 1)
    return new_state, metrics

  def _reconstruct(self, params, stats, images):
    """uint8 images -> (uint8 reconstructions, code indices (vq) or latent means (vae));
    deterministic."""
    model = nnx.merge(self.graphdef, params, stats)
    x = to_float(images)
    if self.t.kind == "vae":
      mean, _ = model.encode(x)
      return to_uint8(model.decode(mean)), mean
    q = model.quantizer(model.encode(x))
    return to_uint8(model.decode(q["z_q"])), q["indices"]

  def device_batch(self, images):
    return jax.make_array_from_process_local_data(self.batch_sharding, images)


def shapes_images(rng, n, image_size, two_object_prob):
  """uint8 [n, S, S, 3]: Shapes scenes of one object, or two with `two_object_prob`."""
  return np.stack([render(random_scene(rng, 2 if rng.random() < two_object_prob else 1), image_size)
                   for _ in range(n)])


def train_batch(cfg, step):
  """The deterministic training batch number `step` of Shapes images."""
  rng = np.random.default_rng((0, int(cfg.seed), int(step)))
  return shapes_images(rng, cfg.data.batch_size, cfg.data.image_size, cfg.data.two_object_prob)


class ImageStream:
  """The tokenizer's training images: Shapes scenes (data.mixture "shapes", the default)
  or the images of any data.mixture of the data pipeline (built-in Shapes and folders of
  `python -m unimm.data.convert`, by weight), each decoded to data.image_size squares
  (cover-resize + centre crop). Batch `s` draws from (0, seed, s), so a resumed run sees
  the same images; unusable records are skipped and counted by reason (`skipped`), and
  a source whose skipped share passes data.max_error_rate stops the run."""

  def __init__(self, cfg):
    from unimm.data import pipeline  # pylint: disable=import-outside-toplevel
    self.cfg, self.pipeline = cfg, pipeline
    mixture = pipeline.parse_mixture(cfg.data.mixture)
    self.shapes_only = [loc for _, loc, _ in mixture] == ["shapes"]
    self.sources = [] if self.shapes_only else list(pipeline.make_sources(cfg).items())
    weights = np.array([w for _, (_, w) in self.sources], np.float64)
    self.p = weights / weights.sum() if len(weights) else None
    self.read = collections.Counter()
    self.skipped = collections.defaultdict(collections.Counter)

  def batch(self, step):
    d = self.cfg.data
    if self.shapes_only:
      return train_batch(self.cfg, step)
    rng = np.random.default_rng((0, int(self.cfg.seed), int(step)))
    size = (int(d.image_size), int(d.image_size))
    out = []
    while len(out) < d.batch_size:
      name, (src, _) = self.sources[rng.choice(len(self.sources), p=self.p)]
      record = src[int(rng.integers(len(src)))]
      self.read[name] += 1
      try:
        if isinstance(record, dict):  # built-in documents hold arrays
          images = [g["image"] for g in record["segments"] if g["kind"] == "image"]
        else:
          images = [records.decode_image(g["bytes"], size=size)
                    for g in records.unpack(record)["segments"]
                    if g["kind"] == "image" and "bytes" in g]
      except records.Skip as e:
        self.skipped[name][e.reason] += 1
        self.pipeline.check_error_rate(name, self.read[name], self.skipped[name],
                                       float(d.max_error_rate), int(d.error_min_records))
        continue
      out.extend(images)
    return np.stack(out[:d.batch_size])

  def metrics(self):
    out = {f"data/read/{n}": float(c) for n, c in self.read.items()}
    out.update({f"data/skipped/{n}/{r}": float(c)
                for n, reasons in self.skipped.items() for r, c in reasons.items()})
    return out


def eval_images(cfg):
  rng = np.random.default_rng((1, int(cfg.tokenizer.eval_seed)))
  return shapes_images(rng, cfg.tokenizer.eval_images, cfg.data.image_size,
                       cfg.data.two_object_prob)


def evaluate(trainer, state, cfg):
  """Held-out PSNR (dB, uint8 images; from the MSE over all eval pixels); for vq the
  codebook usage (distinct codes / codebook size) and perplexity over all eval tokens; for
  vae the mean and standard deviation of the latents (the shift and 1 / scale with which
  the unified model's latent slot normalises them, as Stable Diffusion's scaling factor)."""
  images = eval_images(cfg)
  bs, n = cfg.data.batch_size, len(images)
  padded = np.concatenate([images, images[:(-n) % bs]]) if n % bs else images
  recs, idx = [], []
  for i in range(0, len(padded), bs):
    r, codes = trainer.reconstruct(state["params"], state["stats"], padded[i:i + bs])
    recs.append(np.asarray(r))
    idx.append(np.asarray(codes))
  recs = np.concatenate(recs)[:n].astype(np.float64)
  mse_img = np.mean((recs - images.astype(np.float64)) ** 2, axis=(1, 2, 3))
  out = {"step": int(state["step"]), "eval_images": n,
         "psnr": float(10 * np.log10(255.0 ** 2 / max(mse_img.mean(), 1e-10))),
         "psnr_per_image_mean": float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse_img, 1e-10)))),
         "mse": float(mse_img.mean())}
  if cfg.tokenizer.kind == "vae":
    latents = np.concatenate(idx)[:n].astype(np.float64)
    out.update(latent_mean=float(latents.mean()), latent_std=float(latents.std()))
  else:
    flat = np.concatenate(idx)[:n].reshape(-1)
    _, counts = np.unique(flat, return_counts=True)
    p = counts / counts.sum()
    n_codes = num_codes(cfg.tokenizer)
    out.update(codes_used=int(len(counts)), num_codes=n_codes,
               usage=float(len(counts) / n_codes), perplexity=float(np.exp(-np.sum(p * np.log(p)))))
  return out


def _print(line):
  print(line, flush=True)


def train(cfg, workdir, devices=None, log=_print):
  """Trains in `workdir` (continuing from its latest checkpoint), evaluates, writes eval.json."""
  check_config(cfg)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(cfg.to_json(indent=1))
  mesh = shd.make_mesh(cfg.mesh, devices)
  trainer = AutoencoderTrainer(cfg, mesh)
  manager = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"), item_handlers=ocp.StandardCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(max_to_keep=cfg.train.keep_ckpts, create=True))
  latest = manager.latest_step()
  if latest is None:
    state = trainer.init()
  else:
    meta = manager.item_metadata(latest)
    check_shapes(getattr(meta, "tree", meta), trainer.abstract_state,
                 f"checkpoint {workdir}/checkpoints/{latest}")
    state = manager.restore(latest, args=ocp.args.StandardRestore(trainer.abstract_state))
  tc, steps = cfg.train, cfg.train.steps
  start = step = int(state["step"])
  log(f"step {start} of {steps}; {cfg.tokenizer.kind}"
      f"{'/' + cfg.tokenizer.quantizer if cfg.tokenizer.kind == 'vq' else ''}; "
      f"workdir {workdir}")
  rng = jax.random.key(cfg.seed)
  stream = ImageStream(cfg)
  writer = summary_writer(os.path.join(workdir, "tb")) if start < steps else None
  t0 = time.time()
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as metrics_file:
      while step < steps:
        state, metrics = trainer.step(state, trainer.device_batch(stream.batch(step)), rng)
        step += 1
        out_of_time = tc.time_limit_s > 0 and time.time() - t0 > tc.time_limit_s
        if step % tc.log_every == 0 or step == steps or out_of_time or step == start + 1:
          m = {k: float(v) for k, v in jax.device_get(metrics).items()}
          m.update(stream.metrics())
          m.update(step=step, steps_per_s=(step - start) / (time.time() - t0))
          metrics_file.write(json.dumps(m) + "\n")
          metrics_file.flush()
          log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in m.items()))
          if writer is not None:
            for k, v in m.items():
              writer.add_scalar(f"train/{k}", v, step)
        if step % tc.ckpt_every == 0 or step == steps or out_of_time:
          manager.save(step, args=ocp.args.StandardSave(state), force=True)
        if out_of_time:
          log(f"stopping at step {step}: train.time_limit_s={tc.time_limit_s:g} reached")
          break
  finally:
    if writer is not None:
      writer.close()
    manager.wait_until_finished()
    manager.close()
  result = evaluate(trainer, state, cfg)
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(result, f, indent=1)
  log("eval: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in result.items()))
  return state, result


def main(argv):
  from unimm.config import parse_args
  cfg, opts = parse_args(argv, flags=("workdir",), switches=(),
                         default_config=lambda _: default_config())
  if not opts["workdir"]:
    raise UserError("--workdir DIR is required")
  train(cfg, opts["workdir"])


if __name__ == "__main__":
  cli(main)
