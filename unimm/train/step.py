"""Train state, its shardings, and the one jit-compiled train step.

The model is split once (`nnx.split`) into a static graphdef and a State of
float32 parameters. The step is a pure function of (state, batch, rng): it
casts the parameters to the compute dtype, merges them into a model, computes
the mixed loss and its gradients, and applies AdamW. It is jitted with explicit
in/out shardings from the logical-axis rules, and the state is donated. With a vae /
vq image tokenizer the jitted functions also take its frozen variables and first
encode the batch's images (`_encoding_images`).
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from unimm.batch import BATCH_DTYPES, BATCH_KEYS, BATCH_NDIM
from unimm.errors import UserError
from unimm.models.image_tokenizer import encode_images, frozen_variables, image_tokenizer
from unimm.models.unified import build_model as build_unified
from unimm.objectives.losses import mmdit_loss, unified_loss
from unimm.parallel import sharding as shd

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _dtype_name(section, field, default="float32"):
  name = getattr(section, field, default)
  if name not in DTYPES:
    raise UserError(f"{field}='{name}': use one of {', '.join(DTYPES)}")
  return name


def make_optimizer(optim, steps, frozen=None):
  """AdamW on a warmup-cosine schedule with global-norm clipping. frozen: a function
  (params -> pytree of bools) naming parameters that get no update (their Adam moments
  stay allocated, at zero)."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=min(optim.warmup_steps, max(steps - 1, 1)),
      decay_steps=max(steps, optim.warmup_steps + 1), end_value=optim.lr * optim.final_lr_fraction)
  tx = optax.chain(
      optax.clip_by_global_norm(optim.clip_norm),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay,
                  mu_dtype=DTYPES[_dtype_name(optim, "mu_dtype")],
                  mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params)))
  if frozen is not None:  # zero their gradients (before clipping) and their decayed updates
    zero = optax.masked(optax.set_to_zero(), frozen)
    tx = optax.chain(zero, tx, zero)
  return tx, schedule


FAMILIES = ("unified", "mmdit")


def build_model(cfg, vocab_size, seed=None):
  """(model, image tokenizer) of model.family: the unified transformer, or the MMDiT with its
  conditioner (`unimm.models.conditioning.DiffusionModel`)."""
  family = getattr(cfg.model, "family", "unified")
  if family not in FAMILIES:
    raise UserError(f"model.family='{family}' is unknown: use one of {', '.join(FAMILIES)}")
  if family == "unified":
    return build_unified(cfg, vocab_size=vocab_size, seed=seed)
  from unimm.models.conditioning import DiffusionModel  # pylint: disable=import-outside-toplevel
  if int(cfg.data.docs_per_row) != 1:
    raise UserError(f"model.family='mmdit' trains one document per row: set data.docs_per_row=1 "
                    f"(it is {cfg.data.docs_per_row})")
  patcher = image_tokenizer(cfg, vocab_size)
  model = DiffusionModel(cfg, vocab_size=cfg.model.vocab_size or vocab_size, patcher=patcher,
                         rngs=nnx.Rngs(cfg.seed if seed is None else seed))
  return model, patcher


TEXT_MODEL = ("embed", "lm_head", "final_norm", "blocks")
MODALITY_PARTS = ("attn_norm", "attn", "mlp_norm", "mlp")


def text_expert(params):
  """True for the parameters of the language model (LMFusion's frozen text expert): the
  token table, LM head, final norm and each block's expert-0 norms, attention projections
  and feed-forward; False for image-side parameters and the other modality experts."""

  def one(path, _):
    keys = [str(getattr(k, "key", k)) for k in path]
    if keys[0] != "blocks":
      return keys[0] in TEXT_MODEL
    return keys[2] in MODALITY_PARTS

  return jax.tree_util.tree_map_with_path(one, params)


class Trainer:
  """Everything the step needs, built once from the config and the mesh."""

  def __init__(self, cfg, mesh, vocab_size):
    if cfg.model.dtype not in DTYPES:
      raise UserError(f"model.dtype='{cfg.model.dtype}': use one of {', '.join(DTYPES)}")
    experts, ep = cfg.model.moe.experts, mesh.shape["expert"]
    if experts and experts % ep:
      raise UserError(f"model.moe.experts={experts} does not divide over mesh.expert={ep}: use a "
                      f"multiple of {ep} experts or a mesh.expert that divides {experts}")
    self.cfg, self.mesh, self.rules = cfg, mesh, tuple(tuple(r) for r in cfg.mesh.rules)
    self.vocab_size = vocab_size
    self.dtype = DTYPES[cfg.model.dtype]
    self.image_tokenizer = image_tokenizer(cfg, vocab_size)  # (loaded outside eval_shape)
    abstract = nnx.eval_shape(lambda: build_model(cfg, vocab_size=vocab_size)[0])
    self.graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    self.mmdit = getattr(cfg.model, "family", "unified") == "mmdit"
    frozen = text_expert if cfg.model.mot.freeze_text else None
    if self.mmdit and hasattr(abstract, "llm"):
      from unimm.models.conditioning import frozen_params  # pylint: disable=import-outside-toplevel
      frozen = frozen_params
    self.tx, self.schedule = make_optimizer(cfg.optim, cfg.train.steps, frozen=frozen)
    self.param_shardings = shd.state_shardings(abstract_params, mesh, self.rules)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    rep = shd.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        self.tx, lambda _, s: s, abstract_opt, self.param_shardings,
        transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, nnx.Variable))
    self.state_shardings = {"params": self.param_shardings, "opt_state": opt_shardings, "step": rep}
    self.batch_shardings = {k: shd.batch_sharding(mesh, self.rules, BATCH_NDIM[k])
                            for k in BATCH_KEYS}
    self.tokenizer_shardings = shd.state_shardings(
        frozen_variables(self.image_tokenizer), mesh, self.rules)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        {"params": abstract_params, "opt_state": abstract_opt,
         "step": jax.ShapeDtypeStruct((), jnp.int32)},
        self.state_shardings)
    self.init = jax.jit(self._init, out_shardings=self.state_shardings)
    self.train_step = jax.jit(
        self._encoding_images(self._step),
        in_shardings=(self.state_shardings, self.batch_shardings, rep, self.tokenizer_shardings),
        out_shardings=(self.state_shardings, rep), donate_argnums=0)
    self.jit_loss_and_grads = jax.jit(
        self._encoding_images(self._loss_and_grads),
        in_shardings=(self.param_shardings, self.batch_shardings, rep, self.tokenizer_shardings),
        out_shardings=(rep, self.param_shardings))

  def from_pretrained(self, state, path):
    """A fresh state whose text model is the Hugging Face checkpoint at `path`
    (model.init_from): its weights converted in, the image side and the optimizer
    state as initialised. For the MMDiT: the diffusers transformer (or BFL FLUX file) at
    `path` initialises the MMDiT, the conditioner as initialised."""
    params = jax.device_get(state["params"])
    if self.mmdit:
      from unimm.interop import diffusers_mmdit  # pylint: disable=import-outside-toplevel
      params["mmdit"] = diffusers_mmdit.load(path, params["mmdit"], self.cfg.model.mmdit.variant)
    else:
      from unimm.interop import hf_llm  # pylint: disable=import-outside-toplevel
      params = hf_llm.load_params(path, params, self.cfg)
    params = jax.device_put(params, self.param_shardings)
    init_opt = jax.jit(lambda p: {"params": p, "opt_state": self.tx.init(p),
                                  "step": jnp.zeros((), jnp.int32)},
                       out_shardings=self.state_shardings)
    return init_opt(params)

  def with_llm(self, state):
    """A fresh state whose frozen LLM (MMDiT conditioning, model.condition.llm) holds the
    weights of that workdir's latest checkpoint; the optimizer state as initialised."""
    params = load_llm(jax.device_get(state["params"]), self.cfg)
    if "queries" in params:  # MetaQuery: the queries start from the loaded LLM's embeddings
      model = nnx.merge(self.graphdef, params)
      model.start_queries()
      params = nnx.state(model, nnx.Param)
    params = jax.device_put(params, self.param_shardings)
    init_opt = jax.jit(lambda p: {"params": p, "opt_state": self.tx.init(p),
                                  "step": jnp.zeros((), jnp.int32)},
                       out_shardings=self.state_shardings)
    return init_opt(params)

  def _init(self):
    model, _ = build_model(self.cfg, vocab_size=self.vocab_size)
    params = nnx.state(model, nnx.Param)
    return {"params": params, "opt_state": self.tx.init(params), "step": jnp.zeros((), jnp.int32)}

  def model(self, params):
    """A model from float32 parameters, computing in the configured dtype."""
    return nnx.merge(self.graphdef, jax.tree.map(lambda p: p.astype(self.dtype), params))

  def _loss(self, params, batch, rng):
    with shd.use_mesh_rules(self.mesh, self.rules):
      loss = mmdit_loss if self.mmdit else unified_loss
      return loss(self.model(params), batch, rng, self.cfg)

  def _loss_and_grads(self, params, batch, rng):
    (loss, _), grads = jax.value_and_grad(self._loss, has_aux=True)(params, batch, rng)
    return loss, grads

  def _step(self, state, batch, rng):
    """One AdamW update. A step whose loss or gradient norm is not finite leaves the
    parameters and optimizer state as they were (metrics["nonfinite"] = 1); its step number
    and batch are spent all the same, so the learning-rate schedule does not shift."""
    params, step = state["params"], state["step"]
    step_rng = jax.random.fold_in(rng, step)
    (loss, metrics), grads = jax.value_and_grad(self._loss, has_aux=True)(params, batch, step_rng)
    updates, opt_state = self.tx.update(grads, state["opt_state"], params)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jnp.where(finite, new, old)
    params = jax.tree.map(keep, optax.apply_updates(params, updates), params)
    opt_state = jax.tree.map(keep, opt_state, state["opt_state"])
    metrics = dict(metrics, grad_norm=grad_norm, lr=self.schedule(step),
                   nonfinite=1 - finite.astype(jnp.int32))
    return {"params": params, "opt_state": opt_state, "step": step + 1}, metrics

  def device_batch(self, batch):
    """Host numpy batch (this process's rows) -> global jax arrays on the mesh."""
    return {k: jax.make_array_from_process_local_data(self.batch_shardings[k], batch[k])
            for k in BATCH_KEYS}

  # ---------------------------------------------- images encoded inside the step (vae / vq)
  # The pipeline delivers vae / vq images as pixels; the jitted functions take the frozen
  # tokenizer's variables as their last input (sharded by their logical axes, never
  # optimised) and encode the batch's images before anything else.

  def _encoding_images(self, fn):
    """fn(x, batch, rng) -> fn(x, batch, rng, tokenizer variables), the batch encoded first."""

    def encoded(x, batch, rng, variables):
      with shd.use_mesh_rules(self.mesh, self.rules):
        batch = encode_images(self.image_tokenizer, variables, batch)
      return fn(x, batch, rng)

    return encoded

  @functools.cached_property
  def tokenizer_variables(self):
    """The frozen image tokenizer's variables on the mesh (none for pixel patches)."""
    return jax.device_put(frozen_variables(self.image_tokenizer), self.tokenizer_shardings)

  def abstract_inputs(self):
    """(batch, rng, tokenizer variables) as shape-dtype structs with their shardings: what
    `train_step` takes after the state, for ahead-of-time lowering (`abstract_state` first)."""
    b, length = self.cfg.data.batch_size, self.cfg.data.seq_len
    image = self.image_tokenizer
    dims = {"patches": image.patch_dim, "pixels": image.pixel_dim}
    batch = {k: jax.ShapeDtypeStruct((b, length, dims.get(k, 0))[:BATCH_NDIM[k]], BATCH_DTYPES[k],
                                     sharding=self.batch_shardings[k]) for k in BATCH_KEYS}
    variables = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                             frozen_variables(image), self.tokenizer_shardings)
    return batch, jax.eval_shape(lambda: jax.random.key(0)), variables

  def step(self, state, batch, rng):
    """The jitted train step: (state, metrics); the state is donated."""
    return self.train_step(state, batch, rng, self.tokenizer_variables)

  def loss_and_grads(self, params, batch, rng):
    return self.jit_loss_and_grads(params, batch, rng, self.tokenizer_variables)


def load_llm(params, cfg):
  """params (a host pytree of the DiffusionModel's parameters) with the frozen LLM's replaced by
  those of the latest checkpoint in model.condition.llm (restored on one device)."""
  # pylint: disable=import-outside-toplevel
  from unimm.data.tokenizer import load_tokenizer
  from unimm.models.conditioning import llm_config
  from unimm.train.checkpoint import Checkpointer, _shapes
  path = cfg.model.condition.llm
  llm_cfg = llm_config(path, cfg)
  with open(os.path.join(path, "config.json")) as f:
    hf = "model_type" in json.load(f)
  if hf:
    from unimm.interop.hf_llm import load_params  # pylint: disable=import-outside-toplevel
    params["llm"] = load_params(path, params["llm"], llm_cfg)
    return params
  llm_cfg.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
  ckpt = Checkpointer(os.path.join(path, "checkpoints"), 1)
  step = ckpt.latest_step()
  if step is None:
    raise UserError(f"model.condition.llm={path}: no checkpoint in {path}/checkpoints")
  trainer = Trainer(llm_cfg, shd.make_mesh(llm_cfg.mesh, jax.devices()[:1]),
                    load_tokenizer(llm_cfg.data.tokenizer).model_vocab_size())
  restored = jax.device_get(ckpt.restore(step, trainer.abstract_state)["params"])
  ckpt.close()
  found = dict(zip(_shapes(restored), jax.tree.leaves(restored)))
  ours = params["llm"]
  names, (leaves, treedef) = list(_shapes(ours)), jax.tree.flatten(ours)
  out = []
  for name, leaf in zip(names, leaves):
    if name not in found:
      raise UserError(f"{path}: its checkpoint has no parameter {name}")
    if tuple(found[name].shape) != tuple(leaf.shape):
      raise UserError(f"{path}: parameter {name} is {tuple(found[name].shape)} there and "
                      f"{tuple(leaf.shape)} here")
    out.append(np.asarray(found[name], leaf.dtype))
  params["llm"] = jax.tree.unflatten(treedef, out)
  return params
