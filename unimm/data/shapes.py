"""The procedural "Shapes" world: built-in data that needs no download.

An image holds one or two coloured shapes (circle, square, upward triangle) on
black, each filled in a pure palette colour and centred in a cell of a 3x3
grid. A scene is a list of objects, each a JSON-able dict

    {"color": "red", "shape": "circle", "position": "top left"}

and the objects of a scene have different shapes and different cells, so "the
circle" always names one object. Every image comes with text about it in a
small regular language (captions, questions, edit instructions) that
`unimm.eval.shapes_eval` parses back, so generation and understanding can both
be scored exactly. `ShapesSource` turns the world into a deterministic,
random-access stream of documents (`unimm.data.document`) for five tasks.
"""

import numpy as np

from unimm.data.document import document, image, text
from unimm.errors import UserError

COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
NUMBERS = {1: "one", 2: "two", 3: "three"}
MOVES = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
MOVE_WORDS = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
QUESTION_KINDS = ("color", "shape", "position", "count")
EDIT_KINDS = ("recolor", "move", "remove", "add", "reshape")
TASKS = ("t2i", "caption", "qa", "edit", "story")
DEFAULT_TASKS = {"t2i": 0.4, "caption": 0.2, "qa": 0.1, "edit": 0.2, "story": 0.1}
OBJECT_SIZE = 0.75  # circle diameter, square side, triangle base and height, in cells
MIN_IMAGE_SIZE = 16
MAX_EDITS = 3  # edits per story


# --- scenes ------------------------------------------------------------------

def position_name(row: int, col: int) -> str:
  """The name of grid cell (row, col), row 0 at the top."""
  return POSITIONS[3 * row + col]


def cell_of(name: str) -> tuple:
  """The (row, col) of a position name."""
  return divmod(POSITIONS.index(name), 3)


def obj(color: str, shape: str, position: str) -> dict:
  """One scene object."""
  return {"color": color, "shape": shape, "position": position}


def random_scene(rng, num_objects: int) -> list:
  """`num_objects` objects with distinct shapes and cells; colours may repeat."""
  if not 1 <= num_objects <= len(SHAPES):
    raise ValueError(f"a scene has 1 to {len(SHAPES)} objects, got {num_objects}")
  colors = list(COLORS)
  shapes = rng.choice(len(SHAPES), num_objects, replace=False)
  cells = rng.choice(len(POSITIONS), num_objects, replace=False)
  return [obj(colors[rng.integers(len(colors))], SHAPES[s], POSITIONS[c])
          for s, c in zip(shapes, cells)]


def all_single_object_scenes() -> list:
  """Every one-object scene: colour x shape x position, 162 of them."""
  return [[obj(c, s, p)] for c in COLORS for s in SHAPES for p in POSITIONS]


# --- pixels ------------------------------------------------------------------

def shape_mask(shape: str, position: str, image_size: int):
  """bool [H, W]: the pixels (by their centres) inside `shape` centred in its cell.

  The shape's bounding box is snapped to whole pixels, so every instance of a
  shape is the same symmetric pixel pattern wherever it sits.
  """
  row, col = cell_of(position)
  cell = image_size / 3
  side = max(1, round(OBJECT_SIZE * cell))
  top, left = (round((i + 0.5) * cell - side / 2) for i in (row, col))
  half = side / 2
  y, x = np.mgrid[:image_size, :image_size] + 0.5
  dy, dx = y - (top + half), x - (left + half)
  if shape == "circle":
    return dx**2 + dy**2 <= half**2
  if shape == "square":
    return (np.abs(dx) <= half) & (np.abs(dy) <= half)
  if shape == "triangle":  # apex up: the half-width grows from 0 at the top to `half`
    return (np.abs(dy) <= half) & (np.abs(dx) <= (dy + half) / 2)
  raise ValueError(f"unknown shape {shape!r}: valid shapes are {list(SHAPES)}")


def render(scene: list, image_size: int = 32):
  """uint8 [H, W, 3]: the scene's objects, filled in palette colours on black, no anti-aliasing."""
  img = np.zeros((image_size, image_size, 3), np.uint8)
  for o in scene:
    img[shape_mask(o["shape"], o["position"], image_size)] = COLORS[o["color"]]
  return img


# --- text --------------------------------------------------------------------

def where(position: str) -> str:
  """"in the center" or "at the <position>"."""
  return "in the center" if position == "center" else f"at the {position}"


def describe(o: dict) -> str:
  """"a red circle at the top left"."""
  return f"a {o['color']} {o['shape']} {where(o['position'])}"


def caption(scene: list) -> str:
  """The objects described in scene order, joined by " and "."""
  return " and ".join(describe(o) for o in scene)


def questions(scene: list) -> dict:
  """Every valid (question, answer) about the scene, by kind (QUESTION_KINDS)."""
  return {
      "color": [(f"what color is the {o['shape']}?", o["color"]) for o in scene],
      "shape": [(f"what shape is {where(o['position'])}?", o["shape"]) for o in scene],
      "position": [(f"where is the {o['color']} {o['shape']}?", o["position"]) for o in scene],
      "count": [("how many objects are there?", NUMBERS[len(scene)])],
  }


def _replace(scene: list, i: int, **change) -> list:
  return [dict(o, **change) if j == i else dict(o) for j, o in enumerate(scene)]


def _moves(scene: list, i: int):
  """(direction, new position) for each one-cell move of object i that stays in the grid on a free cell."""
  taken = {o["position"] for o in scene}
  row, col = cell_of(scene[i]["position"])
  for direction, (dr, dc) in MOVES.items():
    r, c = row + dr, col + dc
    if 0 <= r < 3 and 0 <= c < 3 and position_name(r, c) not in taken:
      yield direction, position_name(r, c)


def edits(scene: list) -> dict:
  """Every valid (instruction, new scene) for the scene, by kind (EDIT_KINDS).

  recolor and reshape keep the object's place in the scene, remove drops it,
  add (one-object scenes only) appends the new object.
  """
  out = {kind: [] for kind in EDIT_KINDS}
  used_shapes = {o["shape"] for o in scene}
  used_cells = {o["position"] for o in scene}
  for i, o in enumerate(scene):
    the = f"the {o['shape']}"
    out["recolor"] += [(f"make {the} {c}", _replace(scene, i, color=c))
                       for c in COLORS if c != o["color"]]
    out["move"] += [(f"move {the} {MOVE_WORDS[d]}", _replace(scene, i, position=p))
                    for d, p in _moves(scene, i)]
    if len(scene) == 2:
      out["remove"].append((f"remove {the}", [dict(p) for p in scene if p is not o]))
    out["reshape"] += [(f"turn {the} into a {s}", _replace(scene, i, shape=s))
                       for s in SHAPES if s not in used_shapes]
  if len(scene) == 1:
    new = [obj(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS
           if s not in used_shapes and p not in used_cells]
    out["add"] = [(f"add {describe(n)}", [dict(scene[0]), n]) for n in new]
  return out


def _pick(rng, options: dict, kind: str | None = None):
  """One option: of `kind`, else of a kind drawn uniformly among those that have any."""
  if kind is None:
    kinds = [k for k, v in options.items() if v]
    kind = kinds[rng.integers(len(kinds))]
  return options[kind][rng.integers(len(options[kind]))]


def random_question(rng, scene: list, kind: str | None = None) -> tuple:
  """(question, answer): a kind uniformly (unless given), then one of its questions."""
  return _pick(rng, questions(scene), kind)


def random_edit(rng, scene: list, kind: str | None = None) -> tuple:
  """(instruction, new scene): a valid kind uniformly (unless given), then one of its edits."""
  return _pick(rng, edits(scene), kind)


# --- documents ---------------------------------------------------------------

def t2i_document(scene: list, image_size: int = 32) -> dict:
  """Caption, then the image to generate."""
  cap = caption(scene)
  return document("t2i", [text(cap), image(render(scene, image_size), "target")],
                  {"scene": scene, "caption": cap})


def caption_document(scene: list, image_size: int = 32) -> dict:
  """The image, then its caption."""
  cap = caption(scene)
  return document("caption", [image(render(scene, image_size), "condition"), text(cap)],
                  {"scene": scene, "caption": cap})


def qa_document(scene: list, question: str, answer: str, image_size: int = 32) -> dict:
  """The image, the question (no loss), then the answer."""
  segments = [image(render(scene, image_size), "condition"),
              text(question + " ", loss=False), text(answer)]
  return document("qa", segments, {"scene": scene, "question": question, "answer": answer})


def edit_document(scene: list, instruction: str, target: list, image_size: int = 32) -> dict:
  """Source image, instruction, then the edited image to generate."""
  segments = [image(render(scene, image_size), "condition"), text(instruction),
              image(render(target, image_size), "target")]
  return document("edit", segments,
                  {"scene": scene, "instruction": instruction, "target_scene": target})


def story_document(scenes: list, instructions: list, target: int, image_size: int = 32) -> dict:
  """Caption of scenes[0] and its image, then each instruction and the image after it.

  Image `target` has role "target", the others "condition".
  """
  if len(scenes) != len(instructions) + 1 or not 0 <= target < len(scenes):
    raise ValueError("a story has one more scene than instructions and a target among its scenes")
  cap = caption(scenes[0])
  segments = []
  for i, (words, scene) in enumerate(zip([cap] + list(instructions), scenes)):
    role = "target" if i == target else "condition"
    segments += [text(words), image(render(scene, image_size), role)]
  return document("story", segments, {"scenes": scenes, "instructions": list(instructions),
                                      "caption": cap, "target": target})


def random_story(rng, num_objects: int, num_edits: int) -> tuple:
  """(scenes, instructions): a random scene and `num_edits` successive random edits."""
  scenes, instructions = [random_scene(rng, num_objects)], []
  for _ in range(num_edits):
    instruction, scene = random_edit(rng, scenes[-1])
    scenes.append(scene)
    instructions.append(instruction)
  return scenes, instructions


# --- source ------------------------------------------------------------------

def check_image_size(image_size: int) -> int:
  """image_size as an int; a UserError if too small to draw recognisable shapes."""
  if int(image_size) < MIN_IMAGE_SIZE:
    raise UserError(f"Shapes images need image_size >= {MIN_IMAGE_SIZE}, got {image_size}")
  return int(image_size)


def _task_weights(tasks: dict) -> dict:
  """The tasks with positive weight, normalised; a UserError for unknown names or bad weights."""
  unknown = sorted(set(tasks) - set(TASKS))
  if unknown:
    raise UserError(f"unknown Shapes task(s) {unknown}: valid tasks are {list(TASKS)}")
  weights = {t: float(w) for t, w in tasks.items()}
  if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
    raise UserError(f"Shapes task weights must be >= 0 with a positive sum, got {tasks}")
  total = sum(weights.values())
  return {t: weights[t] / total for t in TASKS if weights.get(t, 0) > 0}


class ShapesSource:
  """Grain-compatible random-access source of Shapes documents.

  Record i is a pure function of (seed, i): its task, scene, question or edits
  are all drawn from `np.random.default_rng([seed, i])`.
  """

  def __init__(self, seed: int = 0, image_size: int = 32, tasks: dict | None = None,
               num_records: int = 1_000_000, two_object_prob: float = 0.3):
    self.seed = int(seed)
    self.image_size = check_image_size(image_size)
    self.tasks = _task_weights(DEFAULT_TASKS if tasks is None else tasks)
    self.num_records = int(num_records)
    if not 0 <= two_object_prob <= 1:
      raise UserError(f"two_object_prob must be in [0, 1], got {two_object_prob}")
    self.two_object_prob = float(two_object_prob)

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index) -> dict:
    index = int(index)
    if not 0 <= index < self.num_records:
      raise IndexError(f"record {index} out of range for {self.num_records} records")
    rng = np.random.default_rng([self.seed, index])
    names = list(self.tasks)
    task = names[rng.choice(len(names), p=list(self.tasks.values()))]
    return getattr(self, "_" + task)(rng)

  def __repr__(self) -> str:
    return (f"ShapesSource(seed={self.seed}, image_size={self.image_size}, tasks={self.tasks}, "
            f"num_records={self.num_records}, two_object_prob={self.two_object_prob})")

  def _scene(self, rng) -> list:
    return random_scene(rng, 2 if rng.random() < self.two_object_prob else 1)

  def _t2i(self, rng) -> dict:
    return t2i_document(self._scene(rng), self.image_size)

  def _caption(self, rng) -> dict:
    return caption_document(self._scene(rng), self.image_size)

  def _qa(self, rng) -> dict:
    scene = self._scene(rng)
    return qa_document(scene, *random_question(rng, scene), self.image_size)

  def _edit(self, rng) -> dict:
    scene = self._scene(rng)
    return edit_document(scene, *random_edit(rng, scene), self.image_size)

  def _story(self, rng) -> dict:
    num_objects = 2 if rng.random() < self.two_object_prob else 1
    scenes, instructions = random_story(rng, num_objects, int(rng.integers(1, MAX_EDITS + 1)))
    return story_document(scenes, instructions, int(rng.integers(len(scenes))), self.image_size)
