"""Text diffusion (MMaDA / LLaDA: model.text_loss="masked"): the answer tokens and their <eos>
padding, the ELBO's 1/t weight on a hand-computed case, the bidirectional documents, and the
unmasking sampler against the training forward pass."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm.batch import TEXT
from unimm.config import defaults
from unimm.data import document as D
from unimm.data.pipeline import encode_document
from unimm.data.tokenizer import load_tokenizer
from unimm.errors import UserError
from unimm.image_grid import PixelPatches, image_grid
from unimm.models.image_tokenizer import encode_images, frozen_variables
from unimm.objectives import losses
from unimm.sample import sampler_from_run

from helpers import assert_8_devices_equal_one, trained_on_one_batch
from test_image_slot import _image, config

TOK = load_tokenizer("byte")


def _batch(docs, answer_len, patcher=None):
  """Documents encoded as the pipeline does, one row each: a batch of numpy arrays."""
  patcher = patcher or PixelPatches(16, 4)
  enc = [encode_document(d, TOK, patcher, answer_len=answer_len) for d in docs]
  length = max(len(e["tokens"]) for e in enc) + 3  # room for padding
  out = {k: np.zeros((len(enc), length) + v.shape[1:], v.dtype) for k, v in enc[0].items()}
  out["segment_ids"] = np.zeros((len(enc), length), np.int32)
  out["positions"] = np.zeros((len(enc), length), np.int32)
  for i, e in enumerate(enc):
    n = len(e["tokens"])
    for k, v in e.items():
      out[k][i, :n] = v
    out["segment_ids"][i, :n], out["positions"][i, :n] = 1, np.arange(n)
  return out


def test_answer_tokens_are_the_final_text_and_its_eos_padding():
  """A caption's text and its <eos>s fill answer_len tokens, all predicted; a t2i prompt is
  the image's condition (not predicted); a QA question (no loss) is not, its answer is."""
  image = np.zeros((16, 16, 3), np.uint8)
  docs = [D.document("caption", [D.image(image), D.text("a red disc")]),
          D.document("t2i", [D.text("a red disc"), D.image(image, "target")]),
          D.document("qa", [D.image(image), D.text("colour? ", loss=False), D.text("red")])]
  b = _batch(docs, answer_len=16)
  answer = np.asarray(losses.answer_tokens({k: jnp.asarray(v) for k, v in b.items()}))
  text_at = lambda i: bytes(int(t) - 3 for t in b["tokens"][i][answer[i]] if t > 2).decode()
  assert answer[0].sum() == 16 and text_at(0) == "a red disc"
  assert (b["tokens"][0][answer[0]][10:] == TOK.eos_id).all()  # 6 <eos>s of padding
  assert answer[0][len(b["tokens"][0]) - 3:].sum() == 0  # not the row's padding
  assert text_at(1) == "" and answer[1].sum() == 1  # only the <eos> after the target image
  assert text_at(2) == "red" and answer[2].sum() == 16
  assert (b["modality"][answer] == TEXT).all()
  # without answer_len one <eos>, as before
  assert _batch(docs[:1], answer_len=0)["tokens"][0].tolist().count(TOK.eos_id) == 1


def test_metric_path_probabilities_by_hand():
  """FUDOKI's path on 3 tokens with embeddings (1, 0), (0, 1), (1, 1): d(x, x1 = 0) = 0, 1,
  1 - 1/sqrt 2; at t = 0.5 with beta = 2 ((1 - t) / t) = 2, p ~ exp(-2 d); uniform at t = 1; all
  on x1 as t -> 0."""
  emb = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  probs = lambda t: np.asarray(jax.nn.softmax(
      losses.metric_path_logits(emb, jnp.array([0]), jnp.array([t]), 2.0, 1.0), -1))[0]
  want = np.exp(-2 * np.array([0.0, 1.0, 1 - 1 / np.sqrt(2)]))
  np.testing.assert_allclose(probs(0.5), want / want.sum(), rtol=1e-5)
  np.testing.assert_allclose(probs(1.0), np.full(3, 1 / 3), rtol=1e-6)
  assert probs(1e-3)[0] > 0.999


class _OneHotModel:
  """A stand-in model whose logits at a position are c times the one-hot of the token it is
  given there: the nll of the true token is known by hand, log(e^c + V - 1) - c where the
  token is shown, log(e^c + V - 1) where the mask id replaced it."""
  V, C, mask_id = 8, 2.0, 7

  def __init__(self):
    self.seen = None

  def hidden(self, tokens, *args):
    self.seen = tokens
    return jax.nn.one_hot(tokens, self.V) * self.C, None

  def head(self):
    return jnp.eye(self.V)

  code_offset = 7  # the text rows (the mask id follows them)

  @property
  def embed(self):
    return types.SimpleNamespace(value=jnp.eye(self.V) + 0.5)


def test_elbo_weight_on_a_hand_computed_case():
  """loss = sum over masked answer tokens of nll / t over the answer count; the loss of
  `masked_loss` equals that sum computed by hand from the masks it drew, and the model saw
  the mask id exactly at the masked tokens."""
  nll = jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
  answer = jnp.array([[False, True, True, True, True]])
  masked = jnp.array([[False, True, False, True, False]])
  t = jnp.full((1, 5), 0.5)
  loss, n, _, m = losses.diffusion_text_loss(nll, nll > 0, answer, masked, t)
  assert float(loss) == pytest.approx((2.0 / 0.5 + 4.0 / 0.5) / 4) and int(n) == 4 and int(m) == 2

  # two documents in one row, each of 6 answer tokens after a 2-token prompt without loss
  L, model = 20, _OneHotModel()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 7, (1, L)), jnp.int32)
  seg = jnp.asarray([[1] * 8 + [2] * 8 + [0] * 4])
  loss_mask = jnp.asarray([[0, 1, 1, 1, 1, 1, 1, 0] * 2 + [0] * 4], jnp.float32)
  zeros = jnp.zeros((1, L), jnp.int32)
  batch = dict(tokens=tokens, targets=zeros, loss_mask=loss_mask, patches=jnp.zeros((1, L, 1)),
               modality=zeros, image_ids=zeros, patch_index=zeros, segment_ids=seg,
               positions=jnp.asarray([list(range(8)) * 2 + [0] * 4]))
  cfg = defaults()
  cfg.model.text_loss = "masked"
  rng = jax.random.key(3)
  got, metrics = losses.masked_loss(model, batch, rng, cfg)
  ans, text_masked, t_tok = losses.masked_text(jax.random.split(rng)[1], batch)
  ans, text_masked, t_tok = (np.asarray(x)[0] for x in (ans, text_masked, t_tok))
  assert ans.sum() == 12 and 0 < text_masked.sum() < 12
  np.testing.assert_array_equal(np.asarray(model.seen)[0] == model.mask_id, text_masked)
  assert len(set(t_tok[seg[0] == 1])) == 1 and t_tok[0] != t_tok[8]  # one t a document
  lse = np.log(np.exp(model.C) + model.V - 1)
  want = sum(lse / t_tok[i] for i in range(L) if text_masked[i]) / 12
  assert float(got) == pytest.approx(want, rel=1e-5)
  assert float(metrics["text_tokens"]) == 12

  # FUDOKI: every answer token redrawn from the metric path, the clean token's nll at all 12
  cfg.model.text_loss = "flow"
  got, metrics = losses.masked_loss(model, batch, rng, cfg)
  ans, x_t, _ = losses.metric_path_text(jax.random.split(rng)[1], batch, model.embed.value[:7],
                                        cfg.model.text_flow)
  seen = np.asarray(model.seen)[0]
  np.testing.assert_array_equal(seen, np.asarray(x_t)[0])
  clean = np.asarray(tokens)[0]
  assert (seen[~np.asarray(ans)[0]] == clean[~np.asarray(ans)[0]]).all()
  want = np.mean([lse - model.C * (seen[i] == clean[i]) for i in range(L) if np.asarray(ans)[0, i]])
  assert float(got) == pytest.approx(want, rel=1e-5) and 0 < (seen != clean).sum() < 12


def test_text_diffusion_needs_masked_codes():
  c = defaults()
  c.model.text_loss = "masked"
  with pytest.raises(UserError, match="text_loss=.masked. .text diffusion. goes with discrete images"):
    image_grid(c, 384)


@pytest.fixture(scope="module")
def trained(tiny_tokenizers, tmp_path_factory):
  """A tiny vq text-diffusion model, untrained (that its loss falls is checked with the other
  recipes in test_image_slot.py), and a batch."""
  cfg = config(tiny_tokenizers, loss="masked", text_loss="masked")
  cfg.data.answer_len = 24
  cfg.sample.update(text_steps=0, temperature=0.0)
  return trained_on_one_batch(cfg, tmp_path_factory.mktemp("mmada"), steps=0)


@pytest.mark.parametrize("text_loss", ["masked", "flow"])
def test_text_diffusion_on_8_devices_equals_one(trained, text_loss):
  """Loss and gradients of the text-diffusion losses (MMaDA's, FUDOKI's) on data=2, fsdp=2,
  tensor=2 equal one device's within 1e-5 relative."""
  run, state, _, _, batch = trained
  assert_8_devices_equal_one(run, state, batch,  # (the fixture's model is MMaDA's)
                             **({"text_loss": text_loss} if text_loss != "masked" else {}))


def test_flow_sampler_matches_the_training_forward(trained, monkeypatch):
  """FUDOKI's sampler on the same bidirectional model: each step's answer logits equal the
  training forward pass over the block it holds; the block starts uniform (t = 1) and ends as
  the argmax of the last step's logits."""
  run, state, _, _, _ = trained
  s = sampler_from_run(run, state)
  s.cfg = run.cfg.copy_and_resolve_references()
  s.cfg.model.text_loss = "flow"
  s.cfg.sample.text_steps = 4
  seen = _record_forward(s, monkeypatch)
  image = _image(4)
  (text,) = s.image_to_text([image])
  assert len(seen) == 4
  n_ans = run.cfg.data.answer_len
  b = _training_batch(run, image, n_ans)
  n = int(b["segment_ids"][0].sum())
  pos = np.arange(n - n_ans, n)
  assert (seen[0][0][pos] < run.patcher.code_offset).all()  # uniform over the text rows
  model = s._model(s.params)
  for tokens, logits in seen:
    inputs = b["tokens"].at[0, pos].set(tokens[pos])
    h = losses._hidden(model, b, inputs, b["patches"], jnp.zeros(inputs.shape))
    np.testing.assert_allclose(logits[pos], np.asarray(h @ model.head())[0, pos], rtol=1e-4,
                               atol=1e-4)
  assert text == TOK.decode(np.argmax(seen[-1][1][pos, :TOK.vocab_size], -1).tolist())

  # sub-blocks of 8 left to right (sample.text_block), 2 steps each: once a sub-block's steps
  # are done its tokens stay; the sub-blocks after it restart uniform
  seen.clear()
  s.cfg.sample.update(text_block=8, text_steps=2 * (-(-n_ans // 8)))
  s.image_to_text([image])
  assert len(seen) == s.cfg.sample.text_steps
  last = seen[-1][0][pos]
  for k, (tokens, _) in enumerate(seen):
    fixed = 8 * (k // 2)
    np.testing.assert_array_equal(tokens[pos][:fixed], last[:fixed])
    assert (tokens[pos][fixed:] < run.patcher.code_offset).all()


def _record_forward(s, monkeypatch):
  """[(tokens, logits) of row 0] of every forward pass the sampler `s` makes from now on."""
  seen, forward = [], s._forward
  def record(params, b, t):
    out = forward(params, b, t)
    seen.append((np.asarray(b["tokens"])[0], np.asarray(out[0])[0]))
    return out
  monkeypatch.setattr(s, "_forward", record)
  return seen


def _training_batch(run, image, n_ans):
  """The caption document of `image` as the pipeline encodes it with answer_len n_ans (the
  answer block at the sampler's positions), its image encoded on the device."""
  doc = D.document("caption", [D.image(image), D.text("x" * (n_ans - 1))])
  b = {k: jnp.asarray(v) for k, v in _batch([doc], n_ans, run.patcher).items()}
  return jax.jit(functools.partial(encode_images, run.patcher))(frozen_variables(run.patcher), b)


def test_text_diffusion_sampler_matches_the_training_forward(trained, monkeypatch):
  """Sampling a caption with one token a step: each
  step's answer logits equal those of the training forward pass (the loss's `_hidden` and
  head) over the caption document as the pipeline encodes it (the answer block of answer_len
  at the same positions) holding the same tokens; each step unmasks one token, the most
  confident of the masked ones, as its argmax."""
  run, state, before, _, _ = trained
  assert np.isfinite(before)
  s = sampler_from_run(run, state)
  n_ans, mask = run.cfg.data.answer_len, run.patcher.mask_id
  seen = _record_forward(s, monkeypatch)
  image = _image(3)
  (text,) = s.image_to_text([image])
  assert len(seen) == n_ans and isinstance(text, str)
  b = _training_batch(run, image, n_ans)
  n = int(b["segment_ids"][0].sum())
  pos = np.arange(n - n_ans, n)
  model = s._model(s.params)
  prev = None
  for tokens, logits in seen:
    ans = tokens[pos]
    inputs = b["tokens"].at[0, pos].set(ans)
    h = losses._hidden(model, b, inputs, b["patches"], jnp.zeros(inputs.shape))
    np.testing.assert_allclose(logits[pos], np.asarray(h @ model.head())[0, pos], rtol=1e-4,
                               atol=1e-4)
    if prev is not None:
      changed = np.nonzero(ans != prev[0])[0]
      assert len(changed) == 1 and prev[0][changed[0]] == mask
      lp = np.asarray(jax.nn.log_softmax(prev[1][:, :TOK.vocab_size], -1))
      best = np.where(prev[0] == mask, lp.max(-1), -np.inf)
      assert changed[0] == int(np.argmax(best)) and ans[changed[0]] == int(np.argmax(lp[changed[0]]))
    prev = (ans, logits[pos])

  # semi-autoregressive (sample.text_block 8): the answer fills block by block, left to right
  seen.clear()
  s.cfg = run.cfg.copy_and_resolve_references()
  s.cfg.sample.text_block = 8
  s.image_to_text([image])
  assert len(seen) == n_ans
  for k, (tokens, _) in enumerate(seen):
    open_ = np.nonzero(tokens[pos] == mask)[0]
    assert len(open_) == n_ans - k and (open_ >= 8 * (k // 8)).all()
