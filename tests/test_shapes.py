"""The procedural Shapes world: scenes, rendering, text, and the document source."""

import collections
import pickle

import numpy as np
import pytest

from unimm.data import shapes
from unimm.data.shapes import COLORS, POSITIONS, SHAPES, ShapesSource
from unimm.errors import UserError


def same_doc(a, b):
  if a["task"] != b["task"] or a["meta"] != b["meta"] or len(a["segments"]) != len(b["segments"]):
    return False
  for x, y in zip(a["segments"], b["segments"]):
    if x.keys() != y.keys():
      return False
    for k in x:
      equal = np.array_equal(x[k], y[k]) if k == "image" else x[k] == y[k]
      if not equal:
        return False
  return True


def check_scene(scene):
  assert 1 <= len(scene) <= 2
  for o in scene:
    assert set(o) == {"color", "shape", "position"}
    assert o["color"] in COLORS and o["shape"] in SHAPES and o["position"] in POSITIONS
  assert len({o["shape"] for o in scene}) == len(scene)
  assert len({o["position"] for o in scene}) == len(scene)


def only(task, **kw):
  return ShapesSource(tasks={task: 1.0}, **kw)


def test_grid_names():
  assert [shapes.position_name(r, c) for r in range(3) for c in range(3)] == list(POSITIONS)
  assert all(shapes.position_name(*shapes.cell_of(p)) == p for p in POSITIONS)
  assert shapes.cell_of("top right") == (0, 2) and shapes.cell_of("bottom") == (2, 1)
  assert list(COLORS) == ["red", "green", "blue", "yellow", "magenta", "cyan"]
  assert len(shapes.all_single_object_scenes()) == 162


def test_random_scene_constraints():
  rng = np.random.default_rng(0)
  for n in (1, 2) * 200:
    scene = shapes.random_scene(rng, n)
    assert len(scene) == n
    check_scene(scene)


@pytest.mark.parametrize("size", [16, 24, 32, 48, 64])
def test_render_palette_and_placement(size):
  for (o,) in shapes.all_single_object_scenes():
    img = shapes.render([o], size)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    colors = {tuple(p) for p in img.reshape(-1, 3)}
    assert colors == {(0, 0, 0), COLORS[o["color"]]}  # no anti-aliasing
    ys, xs = np.nonzero(img.any(-1))
    row, col = shapes.cell_of(o["position"])
    assert int(ys.mean() * 3 / size) == row and int(xs.mean() * 3 / size) == col


def test_shapes_differ_as_expected():
  fill = {s: shapes.render([shapes.obj("red", s, "center")], 48).any(-1).sum() for s in SHAPES}
  assert fill["square"] == 144 and 0.7 < fill["circle"] / 144 < 0.85 and 0.45 < fill["triangle"] / 144 < 0.6
  tri = shapes.render([shapes.obj("red", "triangle", "center")], 48).any(-1)
  rows = tri.sum(1)[tri.any(1)]
  assert list(rows) == sorted(rows)  # apex up, base down


def test_text():
  red = shapes.obj("red", "circle", "top left")
  mid = shapes.obj("blue", "square", "center")
  assert shapes.caption([red]) == "a red circle at the top left"
  assert shapes.caption([mid]) == "a blue square in the center"
  assert shapes.caption([red, mid]) == "a red circle at the top left and a blue square in the center"
  qs = shapes.questions([red, mid])
  assert ("what color is the circle?", "red") in qs["color"]
  assert ("what shape is at the top left?", "circle") in qs["shape"]
  assert ("what shape is in the center?", "square") in qs["shape"]
  assert ("where is the red circle?", "top left") in qs["position"]
  assert qs["count"] == [("how many objects are there?", "two")]


def test_edits_are_valid():
  rng = np.random.default_rng(1)
  for n in (1, 2) * 100:
    scene = shapes.random_scene(rng, n)
    options = shapes.edits(scene)
    assert bool(options["remove"]) == (n == 2) and bool(options["add"]) == (n == 1)
    for kind, pairs in options.items():
      for instruction, target in pairs:
        check_scene(target)
        assert target != scene
        before, after = {tuple(o.values()) for o in scene}, {tuple(o.values()) for o in target}
        if kind == "add":
          assert len(target) == 2 and instruction == "add " + shapes.describe(target[1])
        elif kind == "remove":
          assert len(target) == 1 and after < before
        else:
          assert len(target) == n and len(before - after) == 1  # exactly one object changed
          (old,), (new,) = before - after, after - before
          changed = [i for i in range(3) if old[i] != new[i]]
          assert changed == [{"recolor": 0, "reshape": 1, "move": 2}[kind]]
          if kind == "move":
            (r0, c0), (r1, c1) = shapes.cell_of(old[2]), shapes.cell_of(new[2])
            assert abs(r0 - r1) + abs(c0 - c1) == 1


def test_move_wording():
  scene = [shapes.obj("red", "square", "center")]
  moves = dict(shapes.edits(scene)["move"])
  assert moves["move the square to the left"][0]["position"] == "left"
  assert moves["move the square to the right"][0]["position"] == "right"
  assert moves["move the square up"][0]["position"] == "top"
  assert moves["move the square down"][0]["position"] == "bottom"
  corner = [shapes.obj("red", "square", "top left"), shapes.obj("red", "circle", "top")]
  assert [i for i, _ in shapes.edits(corner)["move"] if "square" in i] == ["move the square down"]


def test_deterministic_and_seeded():
  a, b, c = ShapesSource(seed=0), ShapesSource(seed=0), ShapesSource(seed=1)
  for i in (0, 1, 7, 123456):
    assert same_doc(a[i], b[i])
  assert not all(same_doc(a[i], c[i]) for i in range(10))
  assert not same_doc(a[0], a[1])
  assert same_doc(a[np.int64(5)], a[5])
  with pytest.raises(IndexError):
    a[len(a)]


def test_task_weights():
  src = ShapesSource(tasks={"t2i": 1.0, "caption": 0.0, "qa": 1.0, "edit": 0, "story": 0})
  seen = collections.Counter(src[i]["task"] for i in range(300))
  assert set(seen) == {"t2i", "qa"} and 100 < seen["t2i"] < 200
  seen = collections.Counter(ShapesSource(seed=3)[i]["task"] for i in range(1000))
  for task, weight in shapes.DEFAULT_TASKS.items():
    assert abs(seen[task] / 1000 - weight) < 0.05, seen


def test_bad_config():
  with pytest.raises(UserError, match="valid tasks are.*t2i.*story"):
    ShapesSource(tasks={"t2i": 1.0, "vqa": 1.0})
  with pytest.raises(UserError):
    ShapesSource(tasks={"t2i": 0.0})
  with pytest.raises(UserError):
    ShapesSource(tasks={"t2i": -1.0, "qa": 2.0})
  with pytest.raises(UserError):
    ShapesSource(image_size=8)


def test_picklable():
  src = ShapesSource(seed=5, image_size=24)
  copy = pickle.loads(pickle.dumps(src))
  assert len(copy) == len(src)
  assert all(same_doc(copy[i], src[i]) for i in range(5))


def images(doc):
  return [s for s in doc["segments"] if s["kind"] == "image"]


def test_t2i_and_caption_documents():
  for task in ("t2i", "caption"):
    src = only(task, image_size=24, two_object_prob=0.5)
    for i in range(30):
      doc = src[i]
      meta, segs = doc["meta"], doc["segments"]
      check_scene(meta["scene"])
      assert meta["caption"] == shapes.caption(meta["scene"])
      kinds = ["text", "image"] if task == "t2i" else ["image", "text"]
      assert [s["kind"] for s in segs] == kinds
      (img,) = images(doc)
      assert img["role"] == ("target" if task == "t2i" else "condition")
      assert img["image"].shape == (24, 24, 3)
      assert np.array_equal(img["image"], shapes.render(meta["scene"], 24))
      assert next(s for s in segs if s["kind"] == "text")["text"] == meta["caption"]


def test_two_object_prob():
  counts = [len(only("t2i", two_object_prob=p)[i]["meta"]["scene"]) for p in (0.0, 1.0) for i in range(20)]
  assert counts == [1] * 20 + [2] * 20


def test_qa_documents():
  src = only("qa", two_object_prob=0.5)
  kinds = set()
  for i in range(80):
    doc = src[i]
    meta, (img, q, a) = doc["meta"], doc["segments"]
    check_scene(meta["scene"])
    assert (img["kind"], img["role"]) == ("image", "condition")
    assert q == {"kind": "text", "text": meta["question"] + " ", "loss": False}
    assert a == {"kind": "text", "text": meta["answer"], "loss": True}
    pairs = [p for ps in shapes.questions(meta["scene"]).values() for p in ps]
    assert (meta["question"], meta["answer"]) in pairs
    kinds.add(meta["question"].split()[0] + meta["question"].split()[1])
  assert kinds == {"whatcolor", "whatshape", "whereis", "howmany"}


def test_edit_documents():
  src = only("edit", image_size=32, two_object_prob=0.5)
  for i in range(60):
    doc = src[i]
    meta, (a, instruction, b) = doc["meta"], doc["segments"]
    check_scene(meta["scene"])
    check_scene(meta["target_scene"])
    assert (a["role"], instruction["kind"], b["role"]) == ("condition", "text", "target")
    assert instruction["text"] == meta["instruction"]
    assert np.array_equal(a["image"], shapes.render(meta["scene"], 32))
    assert np.array_equal(b["image"], shapes.render(meta["target_scene"], 32))
    pairs = [p for ps in shapes.edits(meta["scene"]).values() for p in ps]
    assert (meta["instruction"], meta["target_scene"]) in pairs


def test_story_documents():
  src = only("story", two_object_prob=0.5)
  lengths, targets = set(), set()
  for i in range(60):
    doc = src[i]
    meta, segs = doc["meta"], doc["segments"]
    scenes, instructions = meta["scenes"], meta["instructions"]
    assert 1 <= len(instructions) <= 3 and len(scenes) == len(instructions) + 1
    assert [s["kind"] for s in segs] == ["text", "image"] * len(scenes)
    texts = [s["text"] for s in segs[::2]]
    assert texts == [shapes.caption(scenes[0])] + instructions
    roles = [s["role"] for s in segs[1::2]]
    assert roles.count("target") == 1 and roles.index("target") == meta["target"]
    for k, scene in enumerate(scenes):
      check_scene(scene)
      assert np.array_equal(segs[2 * k + 1]["image"], shapes.render(scene, 32))
    for k, instruction in enumerate(instructions):
      pairs = [p for ps in shapes.edits(scenes[k]).values() for p in ps]
      assert (instruction, scenes[k + 1]) in pairs
    lengths.add(len(instructions))
    targets.add(meta["target"])
  assert lengths == {1, 2, 3} and targets == {0, 1, 2, 3}
