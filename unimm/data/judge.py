"""Judges: trained models that score and write captions for curation (`unimm.data.curate`).

A judge is loaded from a local directory, never downloaded (`load_judge`):

- a unimm training workdir (config.json + checkpoints/): `UnifiedJudge`, the project's own
  unified model, e.g. the demo's `runs/demo`;
- a Hugging Face vision-language checkpoint (config.json with `model_type`, its processor
  files): `HFJudge`, through transformers' AutoProcessor / AutoModelForImageTextToText.

Both answer the same calls, on uint8 RGB images of any size (resized to cover the judge's
input and centre-cropped, as the data pipeline does):

    caption_scores(images, captions) -> float [n]  mean log p per caption token (nats, <= 0)
    captions(images) -> [str]                      greedy captions
    pair_scores(sources, texts, targets) -> (source_gain [n], explained [n])   (UnifiedJudge)

`caption_scores` is the length-normalised log-likelihood of the caption given the image:
a caption that describes another image has a few tokens the model finds very unlikely,
which pulls the mean down (`--min-caption-score` of curate drops it). `pair_scores` is
what mining keeps an edit pair by: the target image's flow-matching loss alone (L0), given
the source image (L1) and given the source and the text between them (L2), at high noise;
source_gain = 1 - L1 / L0 (how much of the target the source image explains) and
explained = 1 - L2 / L0 (how much the source and the instruction together explain: high for
an edit the text describes, low for an unrelated picture or a text about something else).
"""

import json
import os

import numpy as np
from PIL import Image

from unimm.errors import UserError


def _fit(image, size):
  """uint8 RGB [size, size, 3]: covers the square and centre-crops, as the pipeline does."""
  from unimm.data import records  # pylint: disable=import-outside-toplevel
  return np.asarray(records.cover(Image.fromarray(np.asarray(image, np.uint8)), (size, size)))


def _batches(n, size):
  return [slice(i, min(n, i + size)) for i in range(0, n, size)]


# Mining scores a pair at high noise, three noise draws: where the picture's layout is still
# open and the source and instruction decide it (at t <= 0.5 the noised target itself tells
# most of it, and conditioning barely moves the loss).
PAIR_TIMES = (0.9, 0.9, 0.9)


class UnifiedJudge:
  """A trained unified model (a training workdir's latest checkpoint) on one device."""

  def __init__(self, sampler, name: str, batch_size: int = 64):
    self.sampler, self.name = sampler, name  # a unimm.sampling.sampler.Sampler
    self.image_size = int(sampler.cfg.data.image_size)
    self.batch_size = int(batch_size)

  @classmethod
  def from_workdir(cls, workdir, batch_size: int = 64):
    from unimm.sample import load_sampler  # pylint: disable=import-outside-toplevel
    name = f"unified:{os.path.basename(os.path.normpath(str(workdir)))}"
    return cls(load_sampler(workdir), name, batch_size)

  def _images(self, images):
    return [_fit(im, self.image_size) for im in images]

  def caption_scores(self, images, captions):
    from unimm.data import document as D  # pylint: disable=import-outside-toplevel
    images, out = self._images(images), []
    for sl in _batches(len(images), self.batch_size):
      docs = [D.document("caption", [D.image(im, "condition"), D.text(c)])
              for im, c in zip(images[sl], captions[sl])]
      out.append(self.sampler.text_logprobs(docs)[0])
    return np.concatenate(out) if out else np.zeros(0)

  def captions(self, images):
    images, out = self._images(images), []
    for sl in _batches(len(images), self.batch_size):
      out += [c.strip() for c in self.sampler.image_to_text(images[sl])]
    return out

  def pair_scores(self, sources, texts, targets, times=PAIR_TIMES):
    from unimm.data import document as D  # pylint: disable=import-outside-toplevel
    sources, targets = self._images(sources), self._images(targets)
    gain, explained = [], []
    for sl in _batches(len(sources), self.batch_size):
      src, txt, tgt = sources[sl], texts[sl], targets[sl]
      alone = [D.document("t2i", [D.image(b, "target")]) for b in tgt]
      given = [D.document("edit", [D.image(a, "condition"), D.image(b, "target")])
               for a, b in zip(src, tgt)]
      told = [D.document("edit", [D.image(a, "condition"), D.text(t), D.image(b, "target")])
              for a, t, b in zip(src, txt, tgt)]
      l0, l1, l2 = (self.sampler.flow_losses(d, times) for d in (alone, given, told))
      gain.append(1.0 - l1 / np.maximum(l0, 1e-12))
      explained.append(1.0 - l2 / np.maximum(l0, 1e-12))
    return (np.concatenate(gain), np.concatenate(explained)) if gain else (np.zeros(0),) * 2


class HFJudge:
  """A Hugging Face vision-language checkpoint from a local directory (transformers'
  AutoProcessor + AutoModelForImageTextToText, float32 on the CPU or the first GPU torch
  sees). `prompt` is the text before the caption (a chat template's user turn is not
  applied: give the model's own captioning prompt, e.g. "<image>" for LLaVA-style models).
  Tested on a tiny random LLaVA (tests/test_judge.py), not yet on a released checkpoint."""

  def __init__(self, path, batch_size: int = 16, prompt: str | None = None,
               max_new_tokens: int = 48):
    try:
      import torch  # pylint: disable=import-outside-toplevel
      import transformers  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise UserError(f"--judge {path} is a Hugging Face checkpoint, which needs torch and "
                      f"transformers installed ({e})") from None
    self.torch = torch
    try:
      self.processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
      self.model = transformers.AutoModelForImageTextToText.from_pretrained(
          path, local_files_only=True, dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError) as e:
      raise UserError(f"--judge {path}: transformers cannot load it as a vision-language "
                      f"model ({str(e).splitlines()[0]})") from None
    self.name = f"hf:{os.path.basename(os.path.normpath(str(path)))}"
    self.prompt = prompt if prompt is not None else getattr(self.processor, "image_token", "")
    self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
    self.image_size = None
    self.tokenizer = self.processor.tokenizer

  def _inputs(self, images, texts):
    pil = [Image.fromarray(np.asarray(im, np.uint8)) for im in images]
    return self.processor(images=pil, text=texts, return_tensors="pt", padding=True)

  def caption_scores(self, images, captions):
    torch, out = self.torch, []
    self.tokenizer.padding_side = "right"
    for sl in _batches(len(images), self.batch_size):
      prompt_only = self._inputs(images[sl], [self.prompt] * len(captions[sl]))
      full = self._inputs(images[sl], [self.prompt + c for c in captions[sl]])
      start = prompt_only["attention_mask"].sum(-1)  # the caption's first token
      with torch.no_grad():
        logits = self.model(**full).logits.float()
      lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, full["input_ids"][:, 1:, None])[..., 0]
      pos = torch.arange(lp.shape[1])[None] + 1
      mask = (pos >= start[:, None]) & (full["attention_mask"][:, 1:] > 0)
      out.append(((lp * mask).sum(-1) / mask.sum(-1).clamp(min=1)).numpy().astype(np.float64))
    return np.concatenate(out) if out else np.zeros(0)

  def captions(self, images):
    torch, out = self.torch, []
    self.tokenizer.padding_side = "left"
    for sl in _batches(len(images), self.batch_size):
      inputs = self._inputs(images[sl], [self.prompt] * (sl.stop - sl.start))
      with torch.no_grad():
        ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
      out += [t.strip() for t in self.tokenizer.batch_decode(
          ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]
    return out

  def pair_scores(self, sources, texts, targets):
    raise UserError(f"--judge {self.name} cannot score edit pairs (image generation): give a "
                    "unimm training workdir to mine with, or mine without a judge (phash)")


def load_judge(path, batch_size: int | None = None, prompt: str | None = None):
  """The judge in a local directory (see the module docstring); one-line UserErrors."""
  path = str(path)
  config = os.path.join(path, "config.json")
  if not os.path.isdir(path) or not os.path.isfile(config):
    raise UserError(f"--judge {path} is not a training workdir or a Hugging Face checkpoint "
                    "folder (no config.json)")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return UnifiedJudge.from_workdir(path, batch_size or 64)
  try:
    with open(config) as f:
      kind = json.load(f).get("model_type")
  except (OSError, ValueError, AttributeError):
    kind = None
  if not kind:
    raise UserError(f"--judge {path}: config.json is neither a unimm run's (no checkpoints/ "
                    "beside it) nor a Hugging Face model's (no model_type)")
  return HFJudge(path, batch_size or 16, prompt)
