"""GRPO on a unified model that draws images as next-token codes (early fusion; the X-Omni
recipe), with ShapesEval's image parser as the reward.

    python -m unimm.train.grpo --init runs/x_omni --workdir runs/x_omni_grpo [--config FILE]

The config is the starting workdir's (its config.json) unless --config names a file; the
`grpo` fields (prompts, group, temperature, kl_weight, lr, steps, updates, clip, top_blocks,
time_limit_s, reward_render) take overrides.

Each iteration draws grpo.prompts one-object Shapes prompts (training scenes, not the eval's),
samples grpo.group images per prompt from the current policy (codes at grpo.temperature, no
guidance: the policy's own distribution), and rewards each with the share of colour, shape and
position the parser reads correctly off it (the images as the model renders them, or with
grpo.reward_render="vq" by the VQ tokenizer's own decoder: one convolutional pass where a
diffusion decoder takes 25 ODE steps). Advantages are normalised within each prompt's
group, A = (r - mean) / (std + 1e-4) (GRPO, DeepSeekMath), and grpo.updates AdamW steps (GRPO's
mu) minimise

    mean over the sampled codes of
        -min(rho A, clip(rho, 1 - eps, 1 + eps) A)  +  beta * KL_k3(pi || pi_ref)

rho = pi / pi_old, pi_old the policy that drew the rollout (the first step is on-policy: rho = 1,
the gradient A grad log pi), eps = grpo.clip; k3 = e^d - d - 1, d = log pi_ref - log pi, per
code. The reference is the starting checkpoint, frozen. grpo.top_blocks >= 0 updates only the
final norm, the output head and that many of the last transformer blocks (the rest stay the
reference's, and no gradient flows below the lowest trained block: a cheaper update, and fewer
directions for the noise of a few hundred rewards to move). The workdir holds checkpoints in
the training format (`python -m unimm.sample --workdir` reads them), `grpo.jsonl` (reward, KL
per iteration) and, at the end, ShapesEval at the config's sampling settings (`eval.json`) and
`eval_policy.json`: text to image as the rollouts sample, of the starting checkpoint and of the
end (every one-object scene twice, `policy_scores`).
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimm.data import document as D
from unimm.data import shapes
from unimm.data.pipeline import encode_document
from unimm.errors import UserError, cli
from unimm.eval.shapes_eval import ATTRIBUTES, parse_image
from unimm.sampling.sampler import _round_up, _stack

ADV_EPS = 1e-4
ROLLOUT_EVAL_PROMPTS = 162  # ShapesEval's one-object scenes cycle every colour x shape x position in 162
ROLLOUT_EVAL_REPEATS = 2


def group_advantages(rewards, group):
  """[P * G] rewards, grouped prompt by prompt -> (r - group mean) / (group std + ADV_EPS)."""
  r = np.asarray(rewards, np.float64).reshape(-1, group)
  return ((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + ADV_EPS)).reshape(-1)


def k3_kl(logp, ref_logp):
  """Per-token KL(pi || pi_ref) estimate from samples of pi: e^d - d - 1, d = ref - logp."""
  d = ref_logp - logp
  return jnp.exp(d) - d - 1.0


def rewards_of(images, scenes):
  """Share of the one-object scene's colour, shape and position read off each image."""
  out = []
  for img, scene in zip(images, scenes):
    objs = parse_image(img)
    out.append(np.mean([bool(objs) and objs[0][a] == scene[0][a] for a in ATTRIBUTES]))
  return np.asarray(out)


def policy_bench(image_size, seed):
  """ShapesEval with every one-object scene once (`policy_scores`' prompts)."""
  from unimm.eval.shapes_eval import ShapesEval  # pylint: disable=import-outside-toplevel
  return ShapesEval(seed=seed, image_size=image_size, n_single=ROLLOUT_EVAL_PROMPTS)


def policy_scores(sampler, bench, seed, repeats=ROLLOUT_EVAL_REPEATS):
  """ShapesEval's text to image as the rollouts sample (the sampler at the rollout settings:
  the policy's own distribution): its one-object prompts over every colour, shape and
  position once (162), each drawn `repeats` times (seeds seed, seed + 1, ...), and its
  two-object prompts (bench: `policy_bench`); the t2i scores averaged over the draws."""
  runs = [bench.run(generate=lambda p, k=k: sampler.text_to_image(p, seed=seed + k), batch_size=64)
          for k in range(repeats)]
  return {k: float(np.mean([r[k] for r in runs])) for k in runs[0] if k.startswith("t2i_")}


def policy_batch(tok, patcher, prompts, codes):
  """Teacher-forced rows of (prompt, image of `codes`): the batch arrays and the positions
  whose next-token targets are the codes ([R, N])."""
  blank = np.zeros((patcher.image_size, patcher.image_size, 3), np.uint8)
  enc, at = [], []
  for p, c in zip(prompts, codes):
    e = encode_document(D.document("t2i", [D.text(p, loss=False), D.image(blank, "target")]),
                        tok, patcher, add_eos=False)
    pos = np.nonzero(e["encode"])[0]
    e["tokens"][pos], e["encode"][:], e["pixels"][:] = c, 0, 0
    e["targets"][:-1] = e["tokens"][1:]
    enc.append(e)
    at.append(pos - 1)
  return _stack(enc, _round_up(max(len(e["tokens"]) for e in enc)), left_pad=False), np.stack(at)


def code_logprobs(model, b, at, code_offset, num_codes, temperature):
  """log pi of each sampled code under `model`: softmax over the codes only at `temperature`,
  as the sampler draws them: [R, N] float32."""
  t = jnp.zeros(b["tokens"].shape, jnp.float32)
  logits, _, _ = model(b["tokens"], b["patches"], t, b["modality"], b["image_ids"],
                       b["patch_index"], b["segment_ids"], b["positions"])
  rows = jnp.arange(at.shape[0])[:, None]
  lg = logits[rows, at][..., code_offset:code_offset + num_codes] / temperature
  codes = jnp.take_along_axis(b["targets"], at, axis=1) - code_offset
  return jnp.take_along_axis(jax.nn.log_softmax(lg, -1), codes[..., None], -1)[..., 0]


def trainable(params, top_blocks):
  """The parameters GRPO updates (a pytree of bools like params): every one for top_blocks < 0,
  else the final norm, the output head (the token table where the two are tied) and the last
  `top_blocks` transformer blocks (the rest keep the reference's values)."""
  depth = len(params["blocks"]) if "blocks" in params else 0
  head = ("final_norm", "lm_head" if "lm_head" in params else "embed")

  def one(path, _):
    keys = [str(getattr(k, "key", k)) for k in path]
    if keys[0] == "blocks":
      return int(keys[1]) >= depth - top_blocks
    return keys[0] in head

  if top_blocks < 0:
    return jax.tree.map(lambda _: True, params)
  return jax.tree_util.tree_map_with_path(one, params)


def clipped_surrogate(lp, old_lp, adv, clip):
  """PPO's per-code objective (to maximise): min(rho A, clip(rho, 1 - clip, 1 + clip) A),
  rho = pi / pi_old; lp, old_lp [R, N], adv [R]."""
  ratio = jnp.exp(lp - old_lp)
  a = adv[:, None]
  return jnp.minimum(ratio * a, jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * a)


def grpo_loss(params, graphdef, b, at, adv, ref_lp, old_lp, *, code_offset, num_codes,
              temperature, kl_weight, clip):
  """(loss, (mean KL, log pi [R, N])) of one rollout batch: mean over the sampled codes of
  -surrogate + beta KL_k3(pi || pi_ref). old_lp None: the rollout's own policy (the first
  update, rho = 1: the surrogate's gradient is A grad log pi)."""
  lp = code_logprobs(nnx.merge(graphdef, params), b, at, code_offset, num_codes, temperature)
  old = jax.lax.stop_gradient(lp) if old_lp is None else old_lp
  kl = k3_kl(lp, ref_lp)
  loss = jnp.mean(-clipped_surrogate(lp, old, adv, clip) + kl_weight * kl)
  return loss, (jnp.mean(kl), lp)


def main(argv):
  from unimm.config import parse_args  # pylint: disable=import-outside-toplevel
  from unimm.sample import _workdir_config  # pylint: disable=import-outside-toplevel

  def init_config(opts):
    if not opts.get("init"):
      raise UserError("--init WORKDIR (the supervised checkpoint to start from) is required")
    return _workdir_config({"workdir": opts["init"]})

  cfg, opts = parse_args(argv, flags=("workdir", "init"), switches=("no_eval",),
                         default_config=init_config)
  if not opts["workdir"] or not opts["init"]:
    raise UserError("--init WORKDIR (the supervised checkpoint) and --workdir DIR are required")
  g = cfg.grpo
  if cfg.model.image_loss != "next_token":
    raise UserError(f"GRPO samples next-token image codes: model.image_loss='next_token' "
                    f"(early fusion), not '{cfg.model.image_loss}'")
  if g.reward_render not in ("model", "vq"):
    raise UserError(f"grpo.reward_render='{g.reward_render}': use 'model' or 'vq'")
  if g.reward_render == "vq" and cfg.model.image_tokenizer != "vq":
    raise UserError(f"grpo.reward_render='vq' needs a VQ tokenizer's codes, not "
                    f"model.image_tokenizer='{cfg.model.image_tokenizer}'")
  if cfg.model.scan and g.top_blocks >= 0:
    raise UserError(f"grpo.top_blocks={g.top_blocks} picks blocks of an unscanned stack: set "
                    f"model.scan=False or grpo.top_blocks=-1 (every parameter)")
  if g.updates < 1 or not 0 < g.clip < 1:
    raise UserError(f"grpo.updates={g.updates}, grpo.clip={g.clip}: updates >= 1 and 0 < clip < 1")
  from etils import epath  # pylint: disable=import-outside-toplevel
  from unimm.eval.run import evaluate  # pylint: disable=import-outside-toplevel
  from unimm.sample import load_sampler, sampler_from_run  # pylint: disable=import-outside-toplevel
  from unimm.train.loop import Run  # pylint: disable=import-outside-toplevel
  cfg.mesh.update(data=-1, fsdp=1, tensor=1, expert=1)
  cfg.optim.update(lr=g.lr, warmup_steps=0)
  cfg.train.steps = g.steps * g.updates  # the optimizer's schedule counts updates
  run = Run(cfg, opts["workdir"], devices=jax.devices()[:1])
  workdir = epath.Path(run.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(cfg.to_json(indent=1))
  ref_params = load_sampler(opts["init"]).params
  if run.ckpt.latest_step() is None:
    state = run.trainer.init()
    state = dict(state, params=ref_params, opt_state=run.trainer.tx.init(ref_params))
  else:
    state = run.restore_or_init()
  graphdef, tx = run.trainer.graphdef, run.trainer.tx
  p = run.patcher
  code = dict(code_offset=p.code_offset, num_codes=p.num_codes, temperature=g.temperature)
  logprobs = jax.jit(lambda params, b, at: code_logprobs(nnx.merge(graphdef, params), b, at, **code))

  train = trainable(ref_params, g.top_blocks)
  keep = lambda tree: jax.tree.map(lambda x, t: x if t else jnp.zeros_like(x), tree, train)

  @jax.jit
  def update(state, b, at, adv, ref_lp, old_lp):
    (loss, (kl, lp)), grads = jax.value_and_grad(grpo_loss, has_aux=True)(
        state["params"], graphdef, b, at, adv, ref_lp, old_lp, kl_weight=g.kl_weight,
        clip=g.clip, **code)
    upd, opt = tx.update(keep(grads), state["opt_state"], state["params"])
    upd = keep(upd)  # no weight decay either on what stays the reference's
    params = jax.tree.map(lambda a, u: a + u, state["params"], upd)
    return dict(state, params=params, opt_state=opt, step=state["step"] + 1), loss, kl, lp

  render = p.vq_decode if g.reward_render == "vq" else p.decode
  rollout_cfg = cfg.copy_and_resolve_references()
  rollout_cfg.sample.update(cfg_scale=1.0, image_temperature=g.temperature, image_top_k=0)
  sampler = sampler_from_run(run, state)
  sampler.cfg = rollout_cfg
  if not opts["no_eval"]:  # the supervised checkpoint as the rollouts sample, to compare the end with
    sampler.params = ref_params
    bench = policy_bench(cfg.data.image_size, int(cfg.eval.seed))
    start_scores = policy_scores(sampler, bench, int(cfg.eval.seed))
  rng = np.random.default_rng([int(cfg.seed), int(state["step"])])
  start, log, row = time.time(), (workdir / "grpo.jsonl").open("a"), {}
  while (int(state["step"]) < g.steps * g.updates
         and (not g.time_limit_s or time.time() - start < g.time_limit_s)):
    scenes = [shapes.random_scene(rng, 1) for _ in range(g.prompts)]
    scenes = [s for s in scenes for _ in range(g.group)]
    prompts = [shapes.caption(s) for s in scenes]
    sampler.params = state["params"]
    cond = [D.document("t2i", [D.text(x), D.image(sampler._blank(), "target")]) for x in prompts]
    codes = sampler.next_token_codes(cond, [], seed=int(state["step"]))
    rewards = rewards_of(render(codes), scenes)
    adv = group_advantages(rewards, g.group)
    b, at = policy_batch(run.tokenizer, p, prompts, codes)
    b, at, adv = jax.tree.map(jnp.asarray, b), jnp.asarray(at), jnp.asarray(adv, jnp.float32)
    ref_lp = logprobs(ref_params, b, at)
    state, loss, kl, old_lp = update(state, b, at, adv, ref_lp, None)  # rho = 1: KL of the rollout's pi
    for _ in range(g.updates - 1):  # PPO's clipped ratio to the rollout's policy
      state, loss, _, _ = update(state, b, at, adv, ref_lp, old_lp)
    it = int(state["step"]) // g.updates
    row = dict(iteration=it, reward=float(rewards.mean()), all_right=float((rewards == 1).mean()),
               kl=float(kl), logp=float(jnp.mean(old_lp)), loss=float(loss),
               seconds=round(time.time() - start, 1))
    log.write(json.dumps(row) + "\n")
    log.flush()
    if it % 10 == 0:
      print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
            flush=True)
  run.ckpt.save(int(state["step"]), state, run.data, force=True)
  run.ckpt.wait()
  print(f"GRPO stopped at step {int(state['step'])} after {time.time() - start:.0f} s", flush=True)
  if not opts["no_eval"]:
    sampler.params = state["params"]
    end_scores = policy_scores(sampler, bench, int(cfg.eval.seed))
    (workdir / "eval_policy.json").write_text(json.dumps(
        {"settings": dict(temperature=g.temperature, cfg_scale=1.0, prompts=ROLLOUT_EVAL_PROMPTS,
                          repeats=ROLLOUT_EVAL_REPEATS),
         "start": start_scores, "end": end_scores, "kl": row.get("kl")}, indent=1))
    print(f"t2i as the rollouts sample (temperature {g.temperature}, no guidance; "
          f"{ROLLOUT_EVAL_PROMPTS} prompts x {ROLLOUT_EVAL_REPEATS}): " + ", ".join(
              f"{a} {start_scores['t2i_single/' + a]:.3f} -> {end_scores['t2i_single/' + a]:.3f}"
              for a in ("all",) + ATTRIBUTES) + f"; KL to the reference {row.get('kl', 0.0):.4f} a code",
          flush=True)
    evaluate(sampler_from_run(run, state), cfg, run.workdir)


if __name__ == "__main__":
  cli(main)
