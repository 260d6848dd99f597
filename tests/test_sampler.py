"""Sampling: top-p truncation, determinism of image sampling, decoding shapes."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimm.data.tokenizer import load_tokenizer
from unimm.models.unified import build_model
from unimm.sampling.sampler import Sampler
from tests.helpers import tiny_config


def _sampler(**overrides):
  cfg = tiny_config(**{"sample.steps": 3, "sample.max_new_tokens": 5, **overrides})
  tok = load_tokenizer("byte")
  model, patcher = build_model(cfg, vocab_size=tok.model_vocab_size())
  graphdef, params = nnx.split(model, nnx.Param)
  return Sampler(graphdef, params, cfg, tok, patcher)


def test_top_p_keeps_only_the_nucleus():
  s = _sampler(**{"sample.temperature": 1.0, "sample.top_p": 0.9})
  logits = jnp.full((1, s.tok.model_vocab_size()), -10.0).at[0, 42].set(10.0)  # p(42) > 0.99
  picks = {int(s._pick(logits, jax.random.key(i))[0]) for i in range(20)}
  assert picks == {42}
  s.cfg.sample.top_p = 1.0
  flat = jnp.zeros((1, s.tok.model_vocab_size()))
  picks = {int(s._pick(flat, jax.random.key(i))[0]) for i in range(20)}
  assert len(picks) > 5 and max(picks) < s.tok.vocab_size  # never an id past the tokenizer's
  s.cfg.sample.temperature = 0.0
  assert int(s._pick(logits, jax.random.key(0))[0]) == 42


def test_image_sampling_is_deterministic_per_seed():
  s = _sampler()
  a = s.text_to_image(["a red circle at the top left", "a blue square"], seed=3)
  b = s.text_to_image(["a red circle at the top left", "a blue square"], seed=3)
  c = s.text_to_image(["a red circle at the top left", "a blue square"], seed=4)
  assert a.dtype == np.uint8 and a.shape == (2, 16, 16, 3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  e = s.edit(a, ["make the circle blue", "remove the square"], seed=0)
  assert e.shape == a.shape and e.dtype == np.uint8


def test_text_decoding_returns_one_string_per_image():
  s = _sampler()
  images = np.zeros((3, 16, 16, 3), np.uint8)
  out = s.image_to_text(images, ["what color is the circle? ", "", "where? "])
  assert len(out) == 3 and all(isinstance(x, str) for x in out)
