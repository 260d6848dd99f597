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

import jax
import numpy as np
from etils import epath
from PIL import Image

from unimm.config import from_saved, parse_args
from unimm.errors import UserError, cli
from unimm.eval.run import evaluate
from unimm.sampling.sampler import Sampler
from unimm.train.loop import Run


def sampler_from_run(run, state):
  """A Sampler over the run's parameters, left where they are (on the mesh): the unified
  model's, or the MMDiT's (`unimm.sampling.mmdit`)."""
  kind = Sampler
  if run.trainer.mmdit:
    from unimm.sampling.mmdit import DiffusionSampler  # pylint: disable=import-outside-toplevel
    kind = DiffusionSampler
  return kind(run.trainer.graphdef, state["params"], run.cfg, run.tokenizer, run.patcher)


def _load_image(path, size):
  if not os.path.exists(path):
    raise UserError(f"--image {path} does not exist")
  img = Image.open(path).convert("RGB")
  if img.size != (size, size):
    img = img.resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(img)


def _workdir_config(opts):
  if not opts.get("workdir"):
    raise UserError("--workdir DIR (a training workdir) is required")
  path = epath.Path(opts["workdir"]) / "config.json"  # local or gs://
  if not path.exists():
    raise UserError(f"{path} not found: pass --config FILE")
  return from_saved(json.loads(path.read_text()))


def main(argv):
  cfg, opts = parse_args(argv, flags=("workdir", "mode", "prompt", "image", "out", "seed"),
                         switches=(), default_config=_workdir_config)
  if not opts["workdir"]:
    raise UserError("--workdir DIR (a training workdir) is required")
  mode, prompt, seed = opts["mode"] or "eval", opts["prompt"] or "", int(opts["seed"] or 0)
  if mode not in ("t2i", "caption", "answer", "edit", "eval"):
    raise UserError(f"--mode {mode}: use t2i, caption, answer, edit or eval")
  if mode in ("caption", "answer", "edit") and not opts["image"]:
    raise UserError(f"--mode {mode} needs --image PATH")
  cfg.mesh.update(data=-1, fsdp=1, tensor=1, expert=1)  # sampling runs on one device
  run = Run(cfg, opts["workdir"], devices=jax.devices()[:1], with_data=False)
  sampler = sampler_from_run(run, run.restore_or_init(require=True))
  size = cfg.data.image_size
  if mode == "eval":
    evaluate(sampler, cfg, opts["workdir"])
  elif mode == "t2i":
    _save(sampler.text_to_image([prompt], seed=seed)[0], opts["out"] or "sample.png")
  elif mode == "edit":
    image = _load_image(opts["image"], size)
    _save(sampler.edit([image], [prompt], seed=seed)[0], opts["out"] or "edited.png")
  else:
    question = [prompt + " "] if mode == "answer" else None
    print(sampler.image_to_text([_load_image(opts["image"], size)], question, seed=seed)[0])


def _save(img, path):
  Image.fromarray(img).save(path)
  print(path)


if __name__ == "__main__":
  cli(main)
