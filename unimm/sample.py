"""python -m unimm.sample --workdir DIR MODE [options]

Samples from the latest checkpoint of a training workdir (its config.json is
used unless --config is given):

  --mode t2i     --prompt "a red circle at the top left"   -> PNG
  --mode caption --image IMG.png                            -> text
  --mode answer  --image IMG.png --prompt "what color is the circle?"
  --mode edit    --image IMG.png --prompt "make the circle blue" -> PNG
  --mode eval                                               -> ShapesEval scores, eval.json, samples.png

The inputs are checked before any model is built: a workdir without config.json
(and no --config) or without a checkpoint, a damaged config.json, or an --image
that is not a usable image (empty, not an image, truncated, a decompression
bomb: the checks of `unimm.data.records`) is one `error: ...` line and exit
status 2. 16-bit, CMYK, palette and alpha images are converted to 8-bit RGB as
`unimm.data.convert` repairs them (one `note:` line on stderr says so); the
image is resized to cover the model's image size and centre-cropped, as the data
pipeline does.
"""

import sys

import jax
from etils import epath
from PIL import Image

from unimm.config import from_saved, parse_args
from unimm.data import records
from unimm.errors import UserError, cli, read_json


def sampler_from_run(run, state):
  """A Sampler over the run's parameters, left where they are (on the mesh): the unified
  model's, or the MMDiT's (`unimm.sampling.mmdit`)."""
  from unimm.sampling.sampler import Sampler  # pylint: disable=import-outside-toplevel
  kind = Sampler
  if run.trainer.mmdit:
    from unimm.sampling.mmdit import DiffusionSampler  # pylint: disable=import-outside-toplevel
    kind = DiffusionSampler
  return kind(run.trainer.graphdef, state["params"], run.cfg, run.tokenizer, run.patcher)


def _load_image(path, size):
  """--image as the model reads it: uint8 RGB [size, size, 3] (`records.image_file`)."""
  image, repair = records.image_file(path, "--image", size=(size, size))
  if repair:
    print(records.repair_note("--image", path, repair), file=sys.stderr)
  return image


def _workdir_config(opts):
  if not opts.get("workdir"):
    raise UserError("--workdir DIR (a training workdir) is required")
  path = epath.Path(opts["workdir"]) / "config.json"  # local or gs://
  if not path.exists():
    raise UserError(f"{path} not found: pass --config FILE")
  saved = read_json(path, "pass --config FILE", "a config written by python -m unimm.train")
  try:
    return from_saved(saved)
  except (TypeError, ValueError, KeyError, AttributeError) as e:
    raise UserError(f"{path} is not a config written by python -m unimm.train ({e}): pass "
                    "--config FILE") from None


def _check_checkpoint(workdir):
  """Fails fast, before any model is built, on a workdir with no checkpoint to sample."""
  path = epath.Path(workdir)
  ckpt = path / "checkpoints"
  if not path.is_dir():
    raise UserError(f"--workdir {workdir} does not exist: give the --workdir of a training run")
  if not ckpt.is_dir() or not any(p.name.isdigit() for p in ckpt.iterdir()):
    raise UserError(f"--workdir {workdir} holds no checkpoint (no saved step in {ckpt}): train "
                    f"there first (python -m unimm.train ... --workdir {workdir})")


def load_sampler(workdir, cfg=None):
  """The sampler of a training workdir's latest checkpoint, on one device; cfg defaults to
  the workdir's config.json. One-line UserErrors for a workdir without either."""
  cfg = cfg or _workdir_config({"workdir": workdir})
  _check_checkpoint(workdir)
  from unimm.train.loop import Run  # pylint: disable=import-outside-toplevel
  cfg.mesh.update(data=-1, fsdp=1, tensor=1, expert=1)  # sampling runs on one device
  run = Run(cfg, workdir, devices=jax.devices()[:1], with_data=False)
  return sampler_from_run(run, run.restore_or_init(require=True))


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
  image = None
  if mode in ("caption", "answer", "edit"):  # checked before any model is built
    image = _load_image(opts["image"], int(cfg.data.image_size))
  sampler = load_sampler(opts["workdir"], cfg)
  if mode == "eval":
    from unimm.eval.run import evaluate  # pylint: disable=import-outside-toplevel
    evaluate(sampler, cfg, opts["workdir"])
  elif mode == "t2i":
    _save(sampler.text_to_image([prompt], seed=seed)[0], opts["out"] or "sample.png")
  elif mode == "edit":
    _save(sampler.edit([image], [prompt], seed=seed)[0], opts["out"] or "edited.png")
  else:
    question = [prompt + " "] if mode == "answer" else None
    print(sampler.image_to_text([image], question, seed=seed)[0])


def _save(img, path):
  Image.fromarray(img).save(path)
  print(path)


if __name__ == "__main__":
  cli(main)
