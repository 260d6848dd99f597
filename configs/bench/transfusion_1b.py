"""The dense 1.1B decoder of `dense_1b.py` on packed Shapes batches: Transfusion's workload.

    python -m unimm.bench --config configs/bench/transfusion_1b.py

Rows of 2048 positions, 4 per step, from the data pipeline: Shapes documents at 256 px in
16-pixel patches (256 tokens an image), text-to-image, captions, questions, edits and
stories packed first-fit, next-token loss on text and flow matching on the noised images,
under the unified mask (most positions are image tokens; a noised image sees only itself).
No PyTorch peer trains this batch.
"""

import os

from unimm.config import load_file


def get_config():
  c = load_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "dense_1b.py"))
  c.model.patch_size = 16
  c.data.update(image_size=256, seq_len=2048, batch_size=4, pack_bins=4)
  c.bench.data = "pipeline"
  return c
