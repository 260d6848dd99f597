"""ShapesEval of a trained unified model: scores, `eval.json` and a sample grid."""

import json

import jax
import numpy as np
from etils import epath

from unimm.eval.shapes_eval import SCORE_KEYS, ShapesEval, save_grid


def evaluate(sampler, cfg, workdir=None, log=print):
  """Runs ShapesEval with the sampler; writes eval.json and samples.png into workdir. In a
  multi-process run every process samples (one SPMD program) and process 0 writes and logs."""
  e = cfg.eval
  bench = ShapesEval(seed=e.seed, image_size=cfg.data.image_size, n_single=e.n_single,
                     n_double=e.n_double, n_caption=e.n_caption, n_qa=e.n_qa, n_edit=e.n_edit)
  seed = int(e.seed)
  understands = can_caption(sampler)
  if getattr(sampler, "reconstructs", False):  # a query tokenizer: its round trip of each scene
    scores = bench.run(generate=lambda prompts: sampler.reconstruct(bench.render_captions(prompts), seed),
                       batch_size=64)
    if workdir and jax.process_index() == 0:  # row 1: true images, row 2: their round trips
      real = bench.render(bench.single[:8])
      with (epath.Path(workdir) / "samples.png").open("wb") as f:
        save_grid(f, np.concatenate([real, sampler.reconstruct(real, seed)]), ncols=len(real),
                  labels=[""] * len(real) + ["reconstruction"] * len(real))
    _write(scores, workdir, log)
    return scores
  scores = bench.run(
      generate=lambda prompts: sampler.text_to_image(prompts, seed=seed),
      caption=(lambda images: sampler.image_to_text(images)) if understands else None,
      answer=((lambda images, questions: sampler.image_to_text(images, [q + " " for q in questions]))
              if understands else None),
      edit=lambda images, instructions: sampler.edit(images, instructions, seed=seed),
      batch_size=64)
  if workdir:  # (the grid samples in every process)
    _sample_grid(sampler, bench, epath.Path(workdir) / "samples.png", seed,
                 write=jax.process_index() == 0)
  _write(scores, workdir, log)
  return scores


def _write(scores, workdir, log):
  if jax.process_index() == 0:
    if workdir:
      (epath.Path(workdir) / "eval.json").write_text(json.dumps(scores, indent=1, sort_keys=True))
    log(format_scores(scores))


def _sample_grid(sampler, bench, path, seed, write=True):
  """Row 1-2: text to image; row 3: edits (source, result pairs); captions under the inputs."""
  prompts = bench.single_prompts[:8] + bench.double_prompts[:8]
  images = list(sampler.text_to_image(prompts, seed=seed))
  labels = list(prompts)
  src = bench.render([x["scene"] for x in bench.edits[:4]])
  instr = [x["instruction"] for x in bench.edits[:4]]
  edited = sampler.edit(src, instr, seed=seed)
  for s, i, o in zip(src, instr, edited):
    images += [s, o]
    labels += ["edit source", i]
  if can_caption(sampler):
    real = bench.render(bench.captioned[:8])
    captions = sampler.image_to_text(real)
    images += list(real)
    labels += [f"caption: {c}" for c in captions]
  if write:
    with path.open("wb") as f:
      save_grid(f, np.stack(images), ncols=8, labels=labels)


def can_caption(sampler):
  """Whether the sampler's model understands images (an MMDiT only with a frozen LLM)."""
  return getattr(sampler, "llm", True) is not None


def format_scores(scores):
  rows = []
  names = sorted({k for k in scores if not k.startswith(("chance/", "oracle/"))})
  for k in names:
    mark = " *" if k in SCORE_KEYS else ""
    rows.append(f"  {k:24s} {scores[k]:.3f}   (chance {scores.get('chance/' + k, float('nan')):.3f})"
                f"{mark}")
  return "ShapesEval:\n" + "\n".join(rows)
