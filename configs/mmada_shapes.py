"""MMaDA on the unified spine: one bidirectional transformer trained by masked (absorbing-state)
diffusion on text and image codes alike. Each document's answer text (a caption, a QA answer)
is masked token by token with probability t ~ U(0, 1) and predicted with the ELBO's 1/t weight,
its target images' VQ codes are masked as in MaskGIT; every document attends bidirectionally
(its target images still hidden from the rest). Text is word tokens (data.tokenizer="shapes", as
LLaDA's BPE vocabulary gives common words one id each; over ByT5 bytes captions scored 0.54).
Answers are padded with <eos> to data.answer_len (LLaDA / MMaDA's padding), so captions are
sampled by unmasking a block of that many mask ids, the most confident first within sub-blocks
of 4 taken left to right (semi-autoregressive, as LLaDA and MMaDA sample); images by MaskGIT's
parallel decoding.

    python -m unimm.train.autoencoder --config configs/vq_shapes.py --workdir runs/vq_shapes
    python -m unimm.train --config configs/mmada_shapes.py --workdir runs/mmada
"""

import os

from unimm.config import load_file


def get_config():
  c = load_file(os.path.join(os.path.dirname(__file__), "maskgit_shapes.py"))  # vq codes, MaskGIT
  c.model.text_loss = "masked"
  # one id a word (as a BPE vocabulary gives common words), not a byte: masked diffusion fills
  # a caption of 6 to 15 words, not of 30 to 78 bytes that depend on each other letter by letter
  c.data.tokenizer = "shapes"
  c.data.answer_len = 16  # the longest Shapes caption is 15 words
  # masked diffusion learns text from fewer effective targets than next-token prediction:
  # more captions and answers in the mix than MaskGIT's
  c.data.tasks.update(t2i=0.35, caption=0.3, qa=0.15, edit=0.15, story=0.05)
  # one answer token a step, in blocks of 4 left to right (a whole-answer block unmasks the
  # <eos> padding first)
  c.sample.update(text_steps=16, text_block=4)
  return c
