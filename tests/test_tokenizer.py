"""Tests for unimm.data.tokenizer."""

import pickle

import pytest

from unimm.data.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer
from unimm.errors import UserError


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer("byte")


def test_byte_round_trip(tok):
  text = "A red circle left of a blue square. héllo ✓ <boi>"
  ids = tok.encode(text)
  assert ids == [b + 3 for b in text.encode("utf-8")]  # no specials added
  assert tok.decode(ids) == text


@pytest.mark.parametrize("text", [
    "", "plain ascii", "héllo ✓ 漢字 🙂", "<boi><eoi></s><pad><bos>", "\x00\xff"])
def test_byte_fast_path_matches_transformers(tok, text):
  slow = tok.hf.encode(text, add_special_tokens=False, split_special_tokens=True)
  assert tok.encode(text) == slow


def test_byte_special_ids(tok):
  assert (tok.pad_id, tok.eos_id) == (0, 1)
  specials = [tok.bos_id, tok.boi_id, tok.eoi_id]
  assert len(set(specials + [tok.pad_id, tok.eos_id])) == 5
  assert min(specials) >= 3 + 256  # beyond every byte id
  assert tok.vocab_size == 259 + 3
  assert tok.model_vocab_size() == 384
  assert tok.model_vocab_size(multiple=8) == 264


def test_literal_special_text_stays_text(tok):
  ids = tok.encode("<boi><eoi></s>")
  assert not set(ids) & {tok.boi_id, tok.eoi_id, tok.eos_id}


def test_decode_stops_at_eos_and_skips_specials(tok):
  ids = [tok.bos_id] + tok.encode("ab") + [tok.boi_id, tok.pad_id, tok.eoi_id]
  ids += tok.encode("c") + [tok.eos_id] + tok.encode("zz")
  assert tok.decode(ids) == "abc"
  assert tok.decode(tok.encode("x") + [tok.model_vocab_size() - 1]) == "x"


def test_pickle_rebuilds_from_spec(tok):
  tok2 = pickle.loads(pickle.dumps(tok))
  assert isinstance(tok2, Tokenizer) and tok2.spec == "byte"
  assert tok2.encode("hi") == tok.encode("hi")
  assert (tok2.bos_id, tok2.boi_id, tok2.eoi_id) == (
      tok.bos_id, tok.boi_id, tok.eoi_id)


def test_missing_path_is_user_error(tmp_path):
  with pytest.raises(UserError, match="does not exist.*data.tokenizer"):
    load_tokenizer(str(tmp_path / "nope"))


def test_unloadable_dir_is_user_error(tmp_path):
  with pytest.raises(UserError, match="could not be loaded.*data.tokenizer") as e:
    load_tokenizer(str(tmp_path))
  assert "\n" not in str(e.value)


def test_saved_directory_loads_by_path(tok, tmp_path):
  tok.hf.save_pretrained(str(tmp_path))
  tok2 = load_tokenizer(str(tmp_path))
  assert tok2.spec == str(tmp_path)
  assert tok2.vocab_size == tok.vocab_size
  assert (tok2.bos_id, tok2.boi_id, tok2.eoi_id) == (
      tok.bos_id, tok.boi_id, tok.eoi_id)
  assert tok2.encode("héllo") == tok.encode("héllo")
  assert pickle.loads(pickle.dumps(tok2)).encode("a") == tok.encode("a")


def test_tokenizer_without_pad_pads_with_eos(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  import transformers  # pylint: disable=import-outside-toplevel
  vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3}
  model = tokenizers.models.WordLevel(vocab, unk_token="[UNK]")
  backend = tokenizers.Tokenizer(model)
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")
  hf.save_pretrained(str(tmp_path))
  tok = load_tokenizer(str(tmp_path))
  assert tok.pad_id == tok.eos_id == 1
  assert tok.encode("hello world") == [2, 3]
  assert {tok.bos_id, tok.boi_id, tok.eoi_id} == {4, 5, 6}
  assert tok.vocab_size == 7
  assert all(t in tok.hf.get_vocab() for t in SPECIAL_TOKENS)


def test_shapes_words_cover_every_shapes_text():
  """The word-level Shapes tokenizer: one id a word, no <unk> in any Shapes text (three-object
  scenes and stories included), captions / answers / instructions decode to themselves."""
  from unimm.data.shapes import ShapesSource

  words = load_tokenizer("shapes")
  assert words.vocab_size < 64 and words.model_vocab_size() == 128
  unk = words.hf.unk_token_id
  assert len({words.bos_id, words.boi_id, words.eoi_id, words.eos_id, words.pad_id, unk}) == 6
  source = ShapesSource(seed=3, two_object_prob=0.5, num_records=300)
  for i in range(len(source)):
    for seg in source[i]["segments"]:
      if seg["kind"] != "text":
        continue
      ids = words.encode(seg["text"])
      assert unk not in ids, seg["text"]
      assert len(ids) == len(seg["text"].replace("?", " ?").split())
      assert words.decode(ids) == seg["text"].strip().replace("?", " ?")
  assert words.encode("a purple circle") == [words.encode("a")[0], unk, words.encode("circle")[0]]
  again = pickle.loads(pickle.dumps(words))
  assert again.spec == "shapes" and again.encode("move the square up") == words.encode(
      "move the square up")
