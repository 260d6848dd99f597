"""ShapesEval: the parsers read the Shapes world back exactly, and the scores mean what they say."""

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from unimm.data import shapes
from unimm.eval import shapes_eval
from unimm.eval.shapes_eval import ShapesEval, parse_image, parse_text
from unimm.errors import UserError


def keys(objs):
  return sorted(tuple(o.values()) for o in objs)


def degrade(img, rng):
  """A 3x3 box blur, then Gaussian noise of sigma 20 (of 255)."""
  x = ndimage.uniform_filter(img.astype(float), (3, 3, 1)) + rng.normal(0, 20, img.shape)
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [32, 64])
def test_parse_image_single_objects(size):
  for scene in shapes.all_single_object_scenes():
    assert parse_image(shapes.render(scene, size)) == scene


@pytest.mark.parametrize("size", [32, 64])
def test_parse_image_two_objects(size):
  rng = np.random.default_rng(size)
  for _ in range(200):
    scene = shapes.random_scene(rng, 2)
    found = parse_image(shapes.render(scene, size))
    assert keys(found) == keys(scene), (scene, found)


def test_parse_image_largest_first_and_empty():
  scene = [shapes.obj("red", "triangle", "top left"), shapes.obj("blue", "square", "bottom")]
  assert [o["shape"] for o in parse_image(shapes.render(scene, 32))] == ["square", "triangle"]
  assert parse_image(np.zeros((32, 32, 3), np.uint8)) == []
  assert parse_image(np.full((32, 32, 3), 128, np.uint8)) == []  # grey is no palette colour
  speck = np.zeros((32, 32, 3), np.uint8)
  speck[3:5, 3:5] = (255, 0, 0)
  assert parse_image(speck) == []  # below the minimum area
  with pytest.raises(UserError):
    parse_image(np.zeros((32, 32, 3), np.float32))


def test_parse_image_dim_and_off_centre():
  dim = (shapes.render([shapes.obj("yellow", "circle", "right")], 32) * 0.55).astype(np.uint8)
  assert parse_image(dim) == [shapes.obj("yellow", "circle", "right")]
  shifted = np.roll(shapes.render([shapes.obj("cyan", "square", "center")], 32), (2, -2), (0, 1))
  assert parse_image(shifted) == [shapes.obj("cyan", "square", "center")]


def test_parse_image_robust_to_blur_and_noise():
  rng = np.random.default_rng(0)
  scenes = shapes.all_single_object_scenes()
  right = [parse_image(degrade(shapes.render(s, 32), rng))[:1] == s for s in scenes]
  assert np.mean(right) >= 0.95
  doubles = [shapes.random_scene(rng, 2) for _ in range(100)]
  right = [keys(parse_image(degrade(shapes.render(s, 32), rng))) == keys(s) for s in doubles]
  assert np.mean(right) >= 0.9


def test_parse_text():
  rng = np.random.default_rng(0)
  scenes = shapes.all_single_object_scenes() + [shapes.random_scene(rng, 2) for _ in range(100)]
  for scene in scenes:
    assert parse_text(shapes.caption(scene)) == scene
  assert parse_text("A  Red thing.") == [{"color": "red", "shape": None, "position": None}]
  assert parse_text("a green triangle in the centre") == [shapes.obj("green", "triangle", "center")]
  assert parse_text("") == [] and parse_text("nothing here") == []
  assert shapes_eval.parse_answer(" Top Left. ") == "top left"


def test_items_deterministic():
  a, b, c = ShapesEval(), ShapesEval(), ShapesEval(seed=7)
  assert a.single == b.single and a.qa == b.qa and a.edits == b.edits
  assert a.double != c.double
  assert len(a.single) == 54 and len(a.double) == 24 and len(a.captioned) == 54
  assert len(a.qa) == 48 and len(a.edits) == 36
  assert {o["shape"] for (o,) in a.single} == set(shapes.SHAPES)
  with pytest.raises(UserError):
    ShapesEval(n_qa=0)


@pytest.fixture(scope="module")
def ev():
  return ShapesEval()


def test_reference_scores(ev):
  ref = ev.reference_scores()
  oracle = {k[len("oracle/"):]: v for k, v in ref.items() if k.startswith("oracle/")}
  chance = {k[len("chance/"):]: v for k, v in ref.items() if k.startswith("chance/")}
  assert set(oracle) == set(chance) and set(shapes_eval.SCORE_KEYS) <= set(oracle)
  assert all(v == 1.0 for v in oracle.values()), oracle
  assert all(0.0 <= v < 0.7 for v in chance.values()), chance
  for name in ("t2i_single/color", "caption/color", "t2i_single/position", "caption/position"):
    assert chance[name] < 0.4
  assert chance["t2i_single/all"] < 0.1 and chance["edit/correct"] == 0.0
  assert chance["caption/attribute"] < 0.4 and chance["qa/accuracy"] < 0.5


def perfect_model(ev):
  """Callables that look the true outputs up from the eval items."""
  drawn = {shapes.caption(s): shapes.render(s, 32) for s in ev.single + ev.double}
  captions = {shapes.render(s, 32).tobytes(): shapes.caption(s) for s in ev.captioned}
  answers = {(shapes.render(q["scene"], 32).tobytes(), q["question"]): q["answer"] for q in ev.qa}
  edited = {(shapes.render(e["scene"], 32).tobytes(), e["instruction"]): shapes.render(e["target"], 32)
            for e in ev.edits}
  return dict(
      generate=lambda prompts: np.stack([drawn[p] for p in prompts]),
      caption=lambda imgs: [captions[x.tobytes()] for x in imgs],
      answer=lambda imgs, qs: [answers[x.tobytes(), q].upper() + "." for x, q in zip(imgs, qs)],
      edit=lambda imgs, ins: np.stack([edited[x.tobytes(), i] for x, i in zip(imgs, ins)]))


def test_run_perfect_model(ev):
  scores = ev.run(**perfect_model(ev), batch_size=10)
  model = {k: v for k, v in scores.items() if not k.startswith(("oracle/", "chance/"))}
  assert all(isinstance(v, float) for v in scores.values())
  assert set(shapes_eval.SCORE_KEYS) <= set(model)
  assert {k.split("/")[0] for k in model} == {"t2i_single", "t2i_double", "caption", "qa", "edit"}
  assert all(v == 1.0 for v in model.values()), model
  assert set(scores) == set(model) | set(ev.reference_scores())


def test_run_black_images_and_skips(ev):
  black = lambda prompts: np.zeros((len(prompts), 32, 32, 3), np.uint8)
  scores = ev.run(generate=black)
  t2i = {k: v for k, v in scores.items() if k.startswith("t2i_")}
  assert t2i and all(v == 0.0 for v in t2i.values())
  assert not any(k.startswith(("caption/", "qa/", "edit/")) for k in scores)
  assert set(ev.run()) == set(ev.reference_scores())


def test_run_rejects_bad_outputs(ev):
  with pytest.raises(UserError):
    ev.run(caption=lambda imgs: ["a red circle"])  # wrong count
  with pytest.raises(UserError):
    ev.run(generate=lambda prompts: np.zeros((len(prompts), 32, 32, 3), np.float32))


def test_save_grid(tmp_path, ev):
  imgs = ev.render(ev.single[:10])
  path = shapes_eval.save_grid(tmp_path / "grid.png", imgs, ncols=4)
  with Image.open(path) as png:
    assert png.format == "PNG" and png.size == (4 * (128 + 2) + 2, 3 * (128 + 2) + 2)
    tile = np.asarray(png.convert("RGB"))[2:130, 2:130]
  assert np.array_equal(tile[::4, ::4], imgs[0])
  labelled = shapes_eval.grid(imgs, ncols=4, labels=ev.single_prompts[:10])
  assert labelled.size[0] == png.size[0] and labelled.size[1] > png.size[1]
