"""ShapesEval: deterministic, model-independent scores on the Shapes world.

The Shapes world (`unimm.data.shapes`) is simple enough to read back exactly:
`parse_image` recovers the objects of an image (rendered, or generated and so
blurry and noisy) and `parse_text` the objects of a caption. `ShapesEval` holds
a fixed set of eval items and scores a model given as batched callables:

    generate(prompts: list[str]) -> uint8 [n, H, W, 3]
    caption(images: uint8 [n, H, W, 3]) -> list[str]
    answer(images, questions: list[str]) -> list[str]
    edit(images, instructions: list[str]) -> uint8 [n, H, W, 3]

Every score comes with `oracle/<name>` (the true image or text scored against
its own item: 1.0, which proves the parsers) and `chance/<name>` (the true
image or text of another item, scored against this item's prompt: what a model
that ignores its prompt gets).
"""

import re
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from unimm.data import shapes
from unimm.data.shapes import COLORS, POSITIONS, SHAPES
from unimm.errors import UserError

ATTRIBUTES = ("color", "shape", "position")
SCORE_KEYS = ("t2i_single/color", "t2i_single/shape", "t2i_single/position", "caption/attribute")

DIM = 100          # a pixel whose brightest channel is below this is background
GREY = 0.5         # ... and so is one whose dimmest channel is above this fraction of its brightest
MIN_AREA = 0.015   # components smaller than this fraction of the image are noise
SOFT = (40, 220)   # brightest-channel levels mapped to object weight 0 and 1, for the shape moments
TRIANGLE_SKEW = -0.15  # vertical skewness below this: mass sits low, an upward triangle (ideal -0.57)
SQUARE_KURTOSIS = 2.4  # (m40 + m04) / 2 m22 below this: mass in corners, a square (ideal 1.8; circle 3)
# Eval items draw from default_rng([seed, part, tag]). Training records draw from
# default_rng([seed, index]), which numpy treats as [seed, index, 0]: a nonzero tag
# keeps the two sets of streams disjoint whatever the seeds.
_EVAL_SEED_TAG = 0x5EA1E7A1
_PALETTE = np.array(list(COLORS.values()), np.float64)
_ALIASES = {"centre": "center", "middle": "center"}


# --- images ------------------------------------------------------------------

def _as_image(img):
  img = np.asarray(img)
  if img.ndim != 3 or img.shape[-1] not in (3, 4) or img.dtype.kind == "f":
    raise UserError(f"expected a uint8 [H, W, 3] image, got {img.dtype} {img.shape}")
  return img[..., :3].astype(np.float64)


def classify_pixels(img):
  """int [H, W]: each pixel's index into COLORS, or -1 for background.

  A pixel is background when dim (brightest channel < DIM) or grey; otherwise
  it is scaled to full brightness and takes the nearest palette colour, so the
  dark edge of a blurred yellow is still yellow, not red or black.
  """
  x = _as_image(img)
  peak, low = x.max(-1), x.min(-1)
  full = x * (255 / np.maximum(peak, 1))[..., None]
  nearest = ((full[..., None, :] - _PALETTE) ** 2).sum(-1).argmin(-1)
  return np.where((peak < DIM) | (low > GREY * peak), -1, nearest)


def classify_shape(weights) -> str:
  """The shape of a blob given as non-negative pixel weights [H, W].

  Uses moments of the whole mass, which blur and noise barely move (unlike the
  bounding box): an upward triangle is bottom-heavy (negative vertical
  skewness); a square keeps mass in its corners (low (m40 + m04) / 2 m22).
  """
  ys, xs = np.nonzero(weights)
  w = weights[ys, xs] / weights[ys, xs].sum()
  y, x = ys - w @ ys, xs - w @ xs
  skew = (w @ y**3) / ((w @ y**2) ** 1.5 + 1e-9)
  kurtosis = (w @ x**4 + w @ y**4) / (2 * (w @ (x**2 * y**2)) + 1e-9)
  if skew < TRIANGLE_SKEW:
    return "triangle"
  return "square" if kurtosis < SQUARE_KURTOSIS else "circle"


def _cell(weights) -> str:
  """The grid cell holding the centroid of the weights."""
  h, w = weights.shape
  cy, cx = ndimage.center_of_mass(weights)
  return shapes.position_name(min(int((cy + 0.5) * 3 / h), 2), min(int((cx + 0.5) * 3 / w), 2))


def parse_image(img) -> list:
  """The objects of an image, largest first: [{"color", "shape", "position"}, ...].

  Pixels are classified to palette colours (`classify_pixels`); each
  8-connected component of one colour covering at least MIN_AREA of the image
  is an object. Its shape and cell come from its pixels and the one-pixel rim
  around them, weighted by brightness (the soft edge of a blurred shape).
  """
  pixels = classify_pixels(img)
  h, w = pixels.shape
  peak = _as_image(img).max(-1)
  weight = np.clip((peak - SOFT[0]) / (SOFT[1] - SOFT[0]), 0, 1)
  found = []
  for k, color in enumerate(COLORS):
    labels, _ = ndimage.label(pixels == k, structure=np.ones((3, 3)))
    areas = np.bincount(labels.ravel())
    areas[0] = 0  # label 0 is everything else
    for i in np.nonzero(areas >= MIN_AREA * h * w)[0]:
      blob = labels == i
      region = ndimage.binary_dilation(blob) & ((pixels == -1) | blob)
      weights = np.where(region, weight, 0)
      found.append((-areas[i], ndimage.center_of_mass(weights),
                    shapes.obj(color, classify_shape(weights), _cell(weights))))
  return [o for *_, o in sorted(found, key=lambda f: f[:2])]


# --- text --------------------------------------------------------------------

def _words(names):
  return re.compile(r"\b(" + "|".join(sorted(names, key=len, reverse=True)) + r")\b")


_COLOR_RE, _SHAPE_RE = _words(COLORS), _words(SHAPES)
_POSITION_RE = _words(list(POSITIONS) + list(_ALIASES))


def _normal(s) -> str:
  return " ".join(str(s).lower().split())


def _first(regex, s):
  m = regex.search(s)
  return m and _ALIASES.get(m.group(1), m.group(1))


def parse_text(s: str) -> list:
  """The objects a caption describes, in order; fields it does not mention are None.

  "a red circle at the top left and a blue square in the center" ->
  [{"color": "red", "shape": "circle", "position": "top left"},
   {"color": "blue", "shape": "square", "position": "center"}]
  """
  objs = []
  for part in re.split(r"\band\b|[,;.]", _normal(s)):
    o = {"color": _first(_COLOR_RE, part), "shape": _first(_SHAPE_RE, part),
         "position": _first(_POSITION_RE, part)}
    if any(o.values()):
      objs.append(o)
  return objs


def parse_answer(s: str) -> str:
  """An answer normalised for exact match: lower case, single spaces, no end punctuation."""
  return _normal(s).strip(" .!?")


# --- scorers -----------------------------------------------------------------

def _key(o) -> tuple:
  return tuple(o[a] for a in ATTRIBUTES)


def score_single(found: list, scenes: list) -> dict:
  """color, shape, position, all: the first found object of each item against its one-object scene."""
  rows = []
  for objs, scene in zip(found, scenes):
    hits = [bool(objs) and objs[0][a] == scene[0][a] for a in ATTRIBUTES]
    rows.append(hits + [all(hits)])
  return dict(zip(ATTRIBUTES + ("all",), np.mean(rows, axis=0)))


def score_multi(found: list, scenes: list) -> dict:
  """objects: scene objects found with their colour and shape; all: every one found with all three."""
  objects, full = [], []
  for objs, scene in zip(found, scenes):
    pairs, keys = {_key(o)[:2] for o in objs}, {_key(o) for o in objs}
    objects += [_key(o)[:2] in pairs for o in scene]
    full.append(all(_key(o) in keys for o in scene))
  return {"objects": np.mean(objects), "all": np.mean(full)}


def score_caption(texts: list, scenes: list) -> dict:
  """score_single of the parsed captions, their mean attribute score, and exact caption match."""
  scores = score_single([parse_text(t) for t in texts], scenes)
  scores["attribute"] = np.mean([scores[a] for a in ATTRIBUTES])
  scores["exact"] = np.mean([_normal(t) == shapes.caption(s) for t, s in zip(texts, scenes)])
  return scores


def score_answers(answers: list, truths: list) -> dict:
  """accuracy: exact match after parse_answer."""
  return {"accuracy": np.mean([parse_answer(a) == parse_answer(t) for a, t in zip(answers, truths)])}


def score_edits(images, targets: list) -> dict:
  """correct: the image holds exactly the target objects; objects: the target objects found;
  count: the right number of objects."""
  found = [parse_image(img) for img in images]
  return {
      "correct": np.mean([sorted(map(_key, f)) == sorted(map(_key, t)) for f, t in zip(found, targets)]),
      "objects": np.mean([_key(o) in set(map(_key, f)) for f, t in zip(found, targets) for o in t]),
      "count": np.mean([len(f) == len(t) for f, t in zip(found, targets)]),
  }


def _prefixed(prefix: str, scores: dict) -> dict:
  return {f"{prefix}/{k}": float(v) for k, v in scores.items()}


def _derangement(keys: list) -> np.ndarray:
  """For each item, the next item (cyclically) with the same key; (i + 1) % n where none."""
  n = len(keys)
  out = np.arange(1, n + 1) % max(n, 1)
  for i in range(n):
    for step in range(1, n):
      if keys[(i + step) % n] == keys[i]:
        out[i] = (i + step) % n
        break
  return out


# --- the eval ----------------------------------------------------------------

def _single_scenes(rng, n: int) -> list:
  """n one-object scenes in blocks of 54 (each colour at each position once, shapes rotating); 162 cycle."""
  blocks = []
  for offset in range(len(SHAPES)):
    block = [[shapes.obj(c, SHAPES[(i + j + offset) % 3], p)]
             for i, c in enumerate(COLORS) for j, p in enumerate(POSITIONS)]
    blocks += [block[k] for k in rng.permutation(len(block))]
  return [blocks[i % len(blocks)] for i in range(n)]


def _qa_items(rng, n: int) -> list:
  items = []
  for i in range(n):
    kind = shapes.QUESTION_KINDS[i % len(shapes.QUESTION_KINDS)]
    scene = shapes.random_scene(rng, 1 + int(rng.random() < 0.5))
    question, answer = shapes.random_question(rng, scene, kind)
    items.append({"kind": kind, "scene": scene, "question": question, "answer": answer})
  return items


def _edit_items(rng, n: int) -> list:
  items = []
  for i in range(n):
    kind = shapes.EDIT_KINDS[i % len(shapes.EDIT_KINDS)]
    num_objects = {"remove": 2, "add": 1}.get(kind) or 1 + int(rng.integers(2))
    scene = shapes.random_scene(rng, num_objects)
    instruction, target = shapes.random_edit(rng, scene, kind)
    items.append({"kind": kind, "scene": scene, "instruction": instruction, "target": target})
  return items


def _batched(fn, batch_size, *columns) -> list:
  """fn over chunks of the columns, outputs concatenated into one list."""
  n = len(columns[0])
  step = batch_size or max(n, 1)
  out = []
  for i in range(0, n, step):
    out += list(fn(*(c[i:i + step] for c in columns)))
  if len(out) != n:
    raise UserError(f"{getattr(fn, '__name__', 'model callable')} returned {len(out)} outputs for {n} inputs")
  return out


class ShapesEval:
  """A fixed Shapes benchmark, built from its own seed, that scores batched model callables."""

  def __init__(self, seed: int = 1234, image_size: int = 32, n_single: int = 54, n_double: int = 24,
               n_caption: int = 54, n_qa: int = 48, n_edit: int = 36):
    counts = dict(n_single=n_single, n_double=n_double, n_caption=n_caption, n_qa=n_qa, n_edit=n_edit)
    if min(counts.values()) < 1:
      raise UserError(f"ShapesEval needs at least one item of each kind, got {counts}")
    self.seed = int(seed)
    self.image_size = shapes.check_image_size(image_size)
    rng = lambda part: np.random.default_rng([self.seed, part, _EVAL_SEED_TAG])
    self.single = _single_scenes(rng(0), n_single)
    double_rng = rng(1)
    self.double = [shapes.random_scene(double_rng, 2) for _ in range(n_double)]
    self.captioned = _single_scenes(rng(2), n_caption)
    self.qa = _qa_items(rng(3), n_qa)
    self.edits = _edit_items(rng(4), n_edit)
    self._reference = None

  def render(self, scenes: list):
    """uint8 [n, H, W, 3]: the scenes rendered at this eval's image size."""
    return np.stack([shapes.render(s, self.image_size) for s in scenes])

  def render_captions(self, prompts: list):
    """The true images of text-to-image prompts of this eval (a reconstruction's input)."""
    scenes = {shapes.caption(s): s for s in self.single + self.double}
    return self.render([scenes[p] for p in prompts])

  @property
  def single_prompts(self) -> list:
    return [shapes.caption(s) for s in self.single]

  @property
  def double_prompts(self) -> list:
    return [shapes.caption(s) for s in self.double]

  def reference_scores(self) -> dict:
    """chance/<name> and oracle/<name> for every score; needs no model (computed once)."""
    if self._reference is None:
      self._reference = {**self._score_truths("oracle", lambda keys: np.arange(len(keys))),
                         **self._score_truths("chance", _derangement)}
    return dict(self._reference)

  def _score_truths(self, prefix: str, order) -> dict:
    """The true output of item order(keys)[i] scored against item i, for every part.

    Edits instead score the unchanged source image against the target.
    """
    def true(items, keys=None):
      return [items[j] for j in order(keys or [0] * len(items))]
    answers = true([q["answer"] for q in self.qa], [q["kind"] for q in self.qa])
    edited = [e["target"] if prefix == "oracle" else e["scene"] for e in self.edits]
    scores = {
        **_prefixed("t2i_single", score_single(
            [parse_image(x) for x in self.render(true(self.single))], self.single)),
        **_prefixed("t2i_double", score_multi(
            [parse_image(x) for x in self.render(true(self.double))], self.double)),
        **_prefixed("caption", score_caption(
            [shapes.caption(s) for s in true(self.captioned)], self.captioned)),
        **_prefixed("qa", score_answers(answers, [q["answer"] for q in self.qa])),
        **_prefixed("edit", score_edits(self.render(edited), [e["target"] for e in self.edits])),
    }
    return {f"{prefix}/{k}": v for k, v in scores.items()}

  def run(self, generate=None, caption=None, answer=None, edit=None, batch_size: int | None = None) -> dict:
    """Scores of the given callables (None skips a part), merged with reference_scores()."""
    scores = {}
    if generate is not None:
      for name, scenes, score in (("t2i_single", self.single, score_single),
                                  ("t2i_double", self.double, score_multi)):
        images = _batched(generate, batch_size, [shapes.caption(s) for s in scenes])
        scores.update(_prefixed(name, score([parse_image(x) for x in images], scenes)))
    if caption is not None:
      texts = _batched(caption, batch_size, self.render(self.captioned))
      scores.update(_prefixed("caption", score_caption(texts, self.captioned)))
    if answer is not None:
      replies = _batched(answer, batch_size, self.render([q["scene"] for q in self.qa]),
                         [q["question"] for q in self.qa])
      scores.update(_prefixed("qa", score_answers(replies, [q["answer"] for q in self.qa])))
    if edit is not None:
      images = _batched(edit, batch_size, self.render([e["scene"] for e in self.edits]),
                        [e["instruction"] for e in self.edits])
      scores.update(_prefixed("edit", score_edits(images, [e["target"] for e in self.edits])))
    return {**scores, **self.reference_scores()}


# --- sample grids ------------------------------------------------------------

def grid(images, ncols: int = 8, labels: list | None = None, scale: int = 4, pad: int = 2):
  """A PIL image: the images upscaled `scale`x (nearest neighbour) in a grid, each label wrapped beneath."""
  images = np.asarray(images, np.uint8)
  n, h, w = images.shape[:3]
  if labels is not None and len(labels) != n:
    raise ValueError(f"{len(labels)} labels for {n} images")
  ncols = max(1, min(ncols, n))
  nrows = -(-n // ncols)
  tw, th = w * scale, h * scale
  font = ImageFont.load_default()
  line_h = font.getbbox("Ag")[3] + 2
  lines = [textwrap.wrap(str(s), max(1, int(tw // font.getlength("x")))) for s in labels or []]
  band = line_h * max(map(len, lines), default=0)
  sheet = Image.new("RGB", (ncols * (tw + pad) + pad, nrows * (th + band + pad) + pad), (64, 64, 64))
  draw = ImageDraw.Draw(sheet)
  for i, img in enumerate(images):
    r, c = divmod(i, ncols)
    x, y = pad + c * (tw + pad), pad + r * (th + band + pad)
    sheet.paste(Image.fromarray(img).resize((tw, th), Image.Resampling.NEAREST), (x, y))
    for j, line in enumerate(lines[i] if lines else []):
      draw.text((x, y + th + j * line_h), line, fill=(255, 255, 255), font=font)
  return sheet


def save_grid(path, images, ncols: int = 8, labels: list | None = None, scale: int = 4):
  """Write `grid(images, ncols, labels, scale)` as a PNG at `path`; returns the path."""
  grid(images, ncols, labels, scale).save(path, format="PNG")
  return path
