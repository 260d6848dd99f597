"""python -m unimm.sample --workdir DIR MODE [options]

Samples from the latest checkpoint of a training workdir (its config.json is
used unless --config is given):

  --mode t2i     --prompt "a red circle at the top left"   -> PNG
  --mode caption --image IMG.png                            -> text
  --mode answer  --image IMG.png --prompt "what color is the circle?"
  --mode edit    --image IMG.png --prompt "make the circle blue" -> PNG
  --mode eval                                               -> ShapesEval scores, eval.json, samples.png
"""

import json
import os
import sys

import numpy as np

from unimm.errors import UserError, cli


def sampler_from_run(run, state):
  from unimm.sampling.sampler import Sampler
  import jax
  params = jax.device_get(state["params"])
  return Sampler(run.trainer.graphdef, params, run.cfg, run.tokenizer, run.patcher)


def _load_image(path, size):
  from PIL import Image
  if not os.path.exists(path):
    raise UserError(f"--image {path} does not exist")
  img = Image.open(path).convert("RGB")
  if img.size != (size, size):
    img = img.resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(img)


def main(argv):
  import ml_collections
  from unimm.config import override, parse_args
  argv = list(argv)
  opts = {"mode": "eval", "prompt": "", "image": None, "out": None, "seed": "0"}
  rest = []
  while argv:
    a = argv.pop(0)
    name, eq, val = a.partition("=")
    if name.lstrip("-") in opts and name.startswith("--"):
      opts[name.lstrip("-")] = val if eq else argv.pop(0)
    else:
      rest.append(a)
  workdir = None
  if "--workdir" in rest:
    i = rest.index("--workdir")
    workdir = rest[i + 1]
    del rest[i:i + 2]
  workdir = workdir or next((r.split("=", 1)[1] for r in rest if r.startswith("--workdir=")), None)
  rest = [r for r in rest if not r.startswith("--workdir=")]
  if not workdir:
    raise UserError("--workdir DIR (a training workdir) is required")
  if not any(r.startswith("--config") and not r.startswith("--config.") for r in rest):
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
      raise UserError(f"{path} not found: pass --config FILE")
    cfg = ml_collections.ConfigDict(json.load(open(path)))
    for r in rest:
      if not r.startswith("--config."):
        raise UserError(f"unknown argument '{r}'")
      k, _, v = r[len("--config."):].partition("=")
      override(cfg, k, v)
  else:
    cfg, _ = parse_args(rest + ["--workdir", workdir])
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.expert = -1, 1, 1, 1
  from unimm.train.loop import Run
  import jax
  run = Run(cfg, workdir, devices=jax.devices()[:1])
  run.cfg.data.batch_size = 1
  state = run.restore_or_init(require=True)
  sampler = sampler_from_run(run, state)
  mode, seed = opts["mode"], int(opts["seed"])
  size = cfg.data.image_size
  if mode == "eval":
    from unimm.eval.run import evaluate
    evaluate(sampler, cfg, workdir)
  elif mode == "t2i":
    img = sampler.text_to_image([opts["prompt"]], seed=seed)[0]
    _save(img, opts["out"] or "sample.png")
  elif mode in ("caption", "answer"):
    if not opts["image"]:
      raise UserError(f"--mode {mode} needs --image PATH")
    prompt = [opts["prompt"] + " "] if mode == "answer" else None
    print(sampler.image_to_text([_load_image(opts["image"], size)], prompt, seed=seed)[0])
  elif mode == "edit":
    if not opts["image"]:
      raise UserError("--mode edit needs --image PATH")
    img = sampler.edit([_load_image(opts["image"], size)], [opts["prompt"]], seed=seed)[0]
    _save(img, opts["out"] or "edited.png")
  else:
    raise UserError(f"--mode {mode}: use t2i, caption, answer, edit or eval")


def _save(img, path):
  from PIL import Image
  Image.fromarray(img).save(path)
  print(path)


if __name__ == "__main__":
  cli(main)
