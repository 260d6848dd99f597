"""Curation with a model: caption scores (checked by hand against the model's logits),
caption_mismatch / unscored rules, recaptions, mining edit pairs and groups from Shapes
stories in MMC4 form, and the pipeline reading recaptions."""

import json
import os

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
from flax import nnx

from unimm.config import defaults
from unimm.data import curate, records, shapes
from unimm.data import document as D
from unimm.data import fixtures as fx
from unimm.data import convert
from unimm.data.judge import UnifiedJudge, load_judge
from unimm.data.pipeline import encode_document, recaptioned
from unimm.errors import UserError
from unimm.sample import sampler_from_run
from unimm.train.loop import Run


@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
  c = defaults()
  c.model.update(width=32, depth=1, heads=2, mlp_dim=64, patch_size=4)
  c.data.update(image_size=16, seq_len=128, batch_size=2)
  c.mesh.data = 1
  c.sample.update(max_new_tokens=5)
  run = Run(c, str(tmp_path_factory.mktemp("judge")), devices=jax.devices()[:1], with_data=False)
  return sampler_from_run(run, run.trainer.init())


def test_caption_scores_are_the_mean_log_likelihood_of_the_caption_tokens(sampler):
  scenes = [shapes.random_scene(np.random.default_rng(i), 1 + i % 2) for i in range(3)]
  images = [shapes.render(s, 16) for s in scenes]
  captions = ["a red circle", shapes.caption(scenes[1]), "no"]
  docs = [D.document("caption", [D.image(im, "condition"), D.text(c)])
          for im, c in zip(images, captions)]
  got, count = sampler.text_logprobs(docs)  # one padded batch
  model = nnx.merge(sampler.graphdef, sampler.params)
  for k, d in list(enumerate(docs))[1:]:  # by hand: each document alone, unpadded
    e = encode_document(d, sampler.tok, sampler.patcher)
    n = len(e["tokens"])
    arr = lambda key: np.asarray(e[key])[None]
    logits, _, _ = model(arr("tokens"), arr("patches").astype(np.float32), np.zeros((1, n), np.float32),
                         arr("modality"), arr("image_ids"), arr("patch_index"),
                         np.ones((1, n), np.int32), np.arange(n)[None])
    logits = np.asarray(logits[0], np.float64)
    lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    scored = np.nonzero(e["loss_mask"])[0]
    assert len(scored) == count[k] == len(sampler.tok.encode(captions[k])) + 1  # + <eos>
    want = np.mean([lp[i, e["targets"][i]] for i in scored])
    np.testing.assert_allclose(got[k], want, rtol=1e-4)
  # the judge: any image size (covered and centre-cropped)
  judge = UnifiedJudge(sampler, "tiny", batch_size=3)
  big = [np.asarray(np.kron(im, np.ones((2, 2, 1), np.uint8))) for im in images]
  np.testing.assert_allclose(judge.caption_scores(images, captions), got, rtol=1e-5)
  np.testing.assert_allclose(judge.caption_scores(big, captions), got, rtol=1e-2)
  gain, explained = judge.pair_scores(images[:2], ["make it blue", "x"], images[1:], times=(0.9,))
  assert gain.shape == explained.shape == (2,) and np.isfinite(explained).all()


class FakeJudge:
  """Scores a caption by whether it names the colour of the image's first object."""
  image_size = 32

  def __init__(self):
    self.calls = 0

  def caption_scores(self, images, captions):
    from unimm.eval.shapes_eval import parse_image
    self.calls += 1
    return np.array([0.0 if parse_image(im) and parse_image(im)[0]["color"] in c else -1.0
                     for im, c in zip(images, captions)])

  def captions(self, images):
    return [f"seen {i}" for i in range(len(images))]

  def pair_scores(self, sources, texts, targets):
    """explained 0.9 where the text is an edit of the source that gives the target, else 0."""
    from unimm.eval.shapes_eval import parse_image
    key = lambda scene: sorted(tuple(o.values()) for o in scene)
    out = []
    for a, t, b in zip(sources, texts, targets):
      results = {i.rstrip("."): key(s) for kind in shapes.edits(parse_image(a)).values()
                 for i, s in kind}
      out.append(0.9 if results.get(t.rstrip(".")) == key(parse_image(b)) else 0.0)
    return np.array(out), np.array(out)


def test_curation_with_a_judge_drops_wrong_captions_counts_unscored_and_recaptions(tmp_path):
  truth = curate.corrupt(str(tmp_path / "raw"), n=24, rate=0.5, seed=2, kinds=("wrong_caption",))
  edit = fx.encode_png(shapes.render(shapes.random_scene(np.random.default_rng(0), 1), 32))
  w = records.ShardWriter(str(tmp_path / "edits"))  # not a pair: the judge cannot score it
  w.write({"task": "edit", "segments": [{"kind": "image", "bytes": edit, "role": "condition"},
                                       {"kind": "text", "text": "make it red", "loss": True},
                                       {"kind": "image", "bytes": edit, "role": "target"}]})
  w.close({"format": "test"})
  inputs = [str(tmp_path / "raw"), str(tmp_path / "edits")]
  models = curate.Models(judge="fake", recaption=True)
  judge = FakeJudge()
  out = str(tmp_path / "out")
  summary = curate.curate(inputs, out, curate.Filters(min_caption_score=-0.5), chunk=10,
                          progress=False, models=models, judge=judge)
  wrong = {int(k) for k, v in truth["faults"].items() if v["kind"] == "wrong_caption"}
  rows = pq.read_table(os.path.join(out, curate.TABLE_FILE)).to_pylist()
  flagged = {r["record"] for r in rows if r["reason"] == "caption_mismatch"}
  # a wrong caption names another scene; it may share the first object's colour by chance
  assert flagged <= wrong and len(flagged) >= len(wrong) // 2
  assert summary["unscored"] == 1 and summary["dropped"] == {"caption_mismatch": len(flagged)}
  result = curate.measure(out, str(tmp_path / "raw" / curate.FAULTS_FILE))
  assert result["wrong_caption"]["precision"] == 1.0
  kept = [records.unpack(r) for r in _read(out)]
  pairs = [d for d in kept if d["task"] == "t2i"]
  assert len(pairs) == 24 - len(flagged) and all(
      d["meta"]["recaption"].startswith("seen") and d["meta"]["original_caption"] ==
      d["segments"][0]["text"] for d in pairs)
  assert recaptioned(pairs[0])["segments"][0]["text"] == pairs[0]["meta"]["recaption"]
  # data.recaption_prob: the share of reads that train on the recaption
  from unimm.data.pipeline import _Load, unstack
  from unimm.data.tokenizer import load_tokenizer
  from unimm.image_grid import PixelPatches
  cfg = defaults().data
  cfg.update(cfg_dropout=0.0, pair_caption_prob=0.0, recaption_prob=1.0)
  tok, rec = load_tokenizer("byte"), records.pack(pairs[0])
  load = _Load(0, tok, PixelPatches(32, 8), cfg)
  ids = unstack(load.map((rec, 0)))["tokens"].tolist()
  assert tok.encode(pairs[0]["meta"]["recaption"])[0] in ids
  cfg.recaption_prob = 0.0
  assert unstack(_Load(0, tok, PixelPatches(32, 8), cfg).map((rec, 0)))["tokens"].tolist() != ids
  assert "recaption" not in next(d for d in kept if d["task"] == "edit")["meta"]
  # --unscored drop: the edit document is dropped by that named rule
  dropped = curate.curate(inputs, str(tmp_path / "strict"), curate.Filters(), chunk=10,
                          progress=False, models=curate.Models(judge="fake", unscored="drop"),
                          judge=FakeJudge())
  assert dropped["dropped"] == {"unscored": 1} and "unscored" not in dropped
  # --mine reasoning: prompt (no loss), the judge's description (loss), then the image
  reason = str(tmp_path / "reason")
  s = curate.curate(inputs[:1], reason, chunk=10, progress=False,
                    models=curate.Models(judge="fake", mine="reasoning"), judge=FakeJudge())
  docs = [records.unpack(r) for r in _read(reason)]
  assert s["mined"] == len(docs) == 24 and {d["task"] for d in docs} == {"reasoning"}
  assert [(g["kind"], g.get("loss")) for g in docs[0]["segments"]] == [
      ("text", False), ("text", True), ("image", None)]
  with pytest.raises(UserError, match="needs --judge"):
    curate.curate(inputs, str(tmp_path / "x"), curate.Filters(min_caption_score=-1.0))


def _read(folder):
  out = []
  for path in records.shard_paths(folder):
    reader = records.open_shard(path)
    out += reader.read(0, reader.num_records())
    reader.close()
  return out


def test_mining_edit_pairs_from_shapes_stories_resumes_and_is_measured(tmp_path):
  truth = curate.stories(str(tmp_path / "raw"), n=12, distractor_rate=0.4, repeat_rate=0.3,
                         seed=1, image_size=32)
  conv = str(tmp_path / "conv")
  convert.main(["--format", "mmc4", "--input", str(tmp_path / "raw" / "stories.jsonl"),
                "--output", conv])
  t = str(tmp_path / "raw" / curate.STORIES_TRUTH)
  groups = str(tmp_path / "groups")  # every image-text-image group, no judge
  s = curate.curate([conv], groups, chunk=5, progress=False, models=curate.Models(mine="groups"))
  m = curate.measure_mining(groups, t, conv)
  assert m["kept"] == s["mined"] == truth["edits"] + truth["not_edits"]
  assert m["correct"] == truth["edits"] and m["recall"] == 1.0  # the text between is the instruction
  # edits: kept by the judge's score, near-duplicate pictures (a repeat) never
  edits = str(tmp_path / "edits")
  models = curate.Models(judge="fake", mine="edits")
  part = curate.curate([conv], edits, chunk=5, stop_after=1, progress=False, models=models,
                       judge=FakeJudge())
  assert part["finished"] is False
  done = curate.curate([conv], edits, chunk=5, progress=False, models=models, judge=FakeJudge())
  m = curate.measure_mining(edits, t, conv)
  assert m["precision"] == 1.0 and m["recall"] >= 0.5 and done["mined"] == m["kept"]
  mined = [records.unpack(r) for r in _read(edits)]
  assert len(mined) == m["kept"] and {d["task"] for d in mined} == {"edit"}
  assert [g["kind"] for g in mined[0]["segments"]] == ["image", "text", "image"]


def test_load_judge_errors_are_one_line(tmp_path):
  with pytest.raises(UserError, match="no config.json"):
    load_judge(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
  with pytest.raises(UserError, match="neither"):
    load_judge(str(tmp_path))


def _tiny_llava(folder):
  """A random LLaVA (CLIP vision tower, Llama text model) and its processor, saved to folder."""
  torch = pytest.importorskip("torch")
  T = pytest.importorskip("transformers")
  from tokenizers import Tokenizer, models, pre_tokenizers
  words = ["<pad>", "<s>", "</s>", "<unk>", "<image>"] + "a red blue circle square at the top left".split()
  tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tk.pre_tokenizer = pre_tokenizers.Whitespace()
  tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>")
  tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
  proc = T.LlavaProcessor(
      image_processor=T.CLIPImageProcessor(size={"shortest_edge": 16},
                                           crop_size={"height": 16, "width": 16}),
      tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
      num_additional_image_tokens=1)
  cfg = T.LlavaConfig(
      vision_config=T.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=8),
      text_config=T.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2),
      image_token_index=words.index("<image>"), vision_feature_layer=-1,
      vision_feature_select_strategy="default")
  torch.manual_seed(0)
  model = T.LlavaForConditionalGeneration(cfg).eval()
  model.save_pretrained(folder)
  proc.save_pretrained(folder)
  return model, proc


def test_hf_judge_scores_captions_as_the_model_does(tmp_path):
  torch = pytest.importorskip("torch")
  from PIL import Image
  model, proc = _tiny_llava(str(tmp_path))
  judge = load_judge(str(tmp_path), batch_size=2)
  images = [np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8) for i in range(3)]
  captions = ["a red circle", "blue square at the top left", "a"]
  got = judge.caption_scores(images, captions)
  for im, cap, score in zip(images, captions, got):  # by hand: one at a time, no padding
    start = proc(images=[Image.fromarray(im)], text=["<image>"], return_tensors="pt")["input_ids"].shape[1]
    full = proc(images=[Image.fromarray(im)], text=["<image>" + cap], return_tensors="pt")
    with torch.no_grad():
      lp = torch.log_softmax(model(**full).logits[0].double(), -1)
    ids = full["input_ids"][0]
    want = np.mean([float(lp[i - 1, ids[i]]) for i in range(start, len(ids))])
    np.testing.assert_allclose(score, want, rtol=1e-4)
  assert len(judge.captions(images)) == 3
  with pytest.raises(UserError, match="cannot score edit pairs"):
    judge.pair_scores(images, captions, images)
