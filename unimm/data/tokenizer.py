"""Text tokenizer: a small wrapper around a transformers tokenizer.

`load_tokenizer("byte")` (the default) is ByT5's byte-level tokenizer (no
download: ids 0..2 are pad/eos/unk, byte b is id b + 3); `"shapes"` is a
word-level tokenizer (`tokenizers.models.WordLevel`) over the words the built-in
Shapes world writes, one id a word or punctuation mark, as a BPE vocabulary
gives common words one id each (other words become `<unk>`: for Shapes recipes
only); any other spec is a local directory loaded with
`transformers.AutoTokenizer`. Three special tokens are added when the
tokenizer lacks them:

    <bos>  starts every document
    <boi>  opens an image (its patches follow)
    <eoi>  closes an image

eos and pad come from the tokenizer (a tokenizer without pad pads with eos).

The wrapper pickles as its spec and is rebuilt on unpickle, so Grain worker
processes get their own copy cheaply.
"""

import functools
import json
import os

from unimm.errors import UserError, one_line

BOS, BOI, EOI = "<bos>", "<boi>", "<eoi>"
SPECIAL_TOKENS = (BOS, BOI, EOI)
_BYTE_OFFSET = 3  # ByT5: ids 0, 1, 2 are pad, eos, unk; then the 256 bytes


class Tokenizer:
  """The text side of the unified model: ids, specials and vocabulary size."""

  def __init__(self, spec: str, hf_tokenizer):
    self.spec = spec
    self.hf = hf_tokenizer
    _add_specials(hf_tokenizer)
    ids = hf_tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    self.bos_id, self.boi_id, self.eoi_id = (int(i) for i in ids)
    if hf_tokenizer.eos_token_id is None:
      raise UserError(
          f"tokenizer {spec!r} has no eos token: use a tokenizer that defines "
          "eos_token, or set data.tokenizer to 'byte'")
    self.eos_id = int(hf_tokenizer.eos_token_id)
    pad = hf_tokenizer.pad_token_id
    self.pad_id = self.eos_id if pad is None else int(pad)
    self.vocab_size = len(hf_tokenizer)
    # ByT5 maps byte b to id b + 3; encoding bytes directly is ~30x faster
    # than the transformers slow path and gives the same ids.
    self._byte_offset = _BYTE_OFFSET if spec == "byte" else None
    self.special_ids = frozenset(
        int(i) for i in hf_tokenizer.all_special_ids) | {
            self.bos_id, self.boi_id, self.eoi_id, self.eos_id, self.pad_id}

  def __reduce__(self):
    return (load_tokenizer, (self.spec,))

  def __repr__(self):
    return f"Tokenizer({self.spec!r}, vocab_size={self.vocab_size})"

  def encode(self, text: str) -> list[int]:
    """Text -> ids, no special tokens added; a literal '<boi>' stays text."""
    if self._byte_offset is not None:
      return [b + self._byte_offset for b in text.encode("utf-8")]
    return self.hf.encode(
        text, add_special_tokens=False, split_special_tokens=True)

  def decode(self, ids) -> str:
    """Ids -> text: stops at the first eos, drops specials and unknown ids.

    Ids outside the tokenizer (a model's padded vocabulary) are dropped too,
    so raw model samples decode without errors.
    """
    out = []
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      if 0 <= i < self.vocab_size and i not in self.special_ids:
        out.append(i)
    return self.hf.decode(out, skip_special_tokens=True)

  def model_vocab_size(self, multiple: int = 128) -> int:
    """Embedding-table rows: vocab_size rounded up to a multiple."""
    return -(-self.vocab_size // multiple) * multiple


def _add_specials(hf_tokenizer):
  """Adds <bos>, <boi>, <eoi> as special tokens where the vocab lacks them."""
  vocab = hf_tokenizer.get_vocab()
  missing = [t for t in SPECIAL_TOKENS if t not in vocab]
  if missing:
    hf_tokenizer.add_special_tokens({"additional_special_tokens": missing})


def load_tokenizer(spec: str = "byte") -> Tokenizer:
  """'byte' -> ByT5 byte tokenizer; otherwise a local tokenizer directory (never downloaded,
  never running the folder's own code: no trust_remote_code). A missing or broken folder is
  a one-line UserError naming it and the problem."""
  import transformers  # Heavy import: only where a tokenizer is built.

  if spec == "byte":
    return Tokenizer(spec, transformers.ByT5Tokenizer(extra_ids=0))
  if spec == "shapes":
    return Tokenizer(spec, _shapes_words())
  hint = ("set data.tokenizer to 'byte' or a local directory holding tokenizer "
          "files (saved with tokenizer.save_pretrained)")
  if not os.path.isdir(str(spec)):
    raise UserError(f"tokenizer path {spec!r} does not exist: {hint}")
  try:
    hf = transformers.AutoTokenizer.from_pretrained(
        spec, local_files_only=True, trust_remote_code=False)
    tok = Tokenizer(spec, hf)
  except UserError:
    raise
  except Exception as e:  # transformers raises OSError, ValueError, ...
    raise UserError(
        f"tokenizer path {spec!r} could not be loaded ({_why(spec, e)}): {hint}") from e
  if not set(hf.get_vocab().values()) - tok.special_ids:
    raise UserError(f"tokenizer path {spec!r} has no vocabulary (only special tokens: its "
                    f"tokenizer.json or vocabulary files are missing): {hint}")
  return tok


@functools.lru_cache(maxsize=1)
def _shapes_vocabulary() -> tuple:
  """Every word and mark of the Shapes texts, sorted: the captions, questions, answers and edit
  instructions of each one-object scene and of a two- and a three-object one (" and ",
  "remove", "two", "three"), split as the tokenizer splits them (words, punctuation marks).
  Computed once a process (each of the loaders, the sampler and Grain's workers asks)."""
  from tokenizers import pre_tokenizers
  from unimm.data import shapes

  objs = [shapes.obj("red", "circle", "top"), shapes.obj("blue", "square", "left"),
          shapes.obj("green", "triangle", "center")]
  texts = set()
  for scene in [objs[:2], objs] + shapes.all_single_object_scenes():
    texts.add(shapes.caption(scene))
    for options in (shapes.questions(scene), shapes.edits(scene)):
      for pairs in options.values():
        texts.update(part for pair in pairs for part in pair if isinstance(part, str))
  split = pre_tokenizers.Whitespace()
  return tuple(sorted({w for t in texts for w, _ in split.pre_tokenize_str(t)}))


def _shapes_words():
  """A word-level fast tokenizer (`tokenizers.models.WordLevel`) over `_shapes_vocabulary`."""
  import transformers
  from tokenizers import Tokenizer as Fast, models, pre_tokenizers

  specials = ["<pad>", "</s>", "<unk>", *SPECIAL_TOKENS]
  vocab = {w: i for i, w in enumerate(specials + list(_shapes_vocabulary()))}
  fast = Fast(models.WordLevel(vocab, unk_token="<unk>"))
  fast.pre_tokenizer = pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=fast, unk_token="<unk>", eos_token="</s>", pad_token="<pad>",
      additional_special_tokens=list(SPECIAL_TOKENS))


def _why(spec, error):
  """What is wrong with a tokenizer folder that transformers could not load: a file that is
  not JSON, custom code it asks to run, or the first line of transformers' error."""
  if not os.listdir(spec):
    return "the folder is empty"
  for name in ("tokenizer_config.json", "config.json", "special_tokens_map.json", "tokenizer.json",
               "vocab.json"):
    path = os.path.join(spec, name)
    if not os.path.isfile(path):
      continue
    try:
      with open(path, "rb") as f:
        data = json.loads(f.read())
    except (OSError, ValueError) as e:
      return f"{name} is not readable JSON: {type(e).__name__}: {e}"
    if name in ("tokenizer_config.json", "config.json") and isinstance(data, dict) and (
        "auto_map" in data):
      return (f"its {name} names custom code (auto_map), and unimm never runs a checkpoint's "
              "code (no trust_remote_code)")
  return one_line(error)
