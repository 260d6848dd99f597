"""The demo on a mixture: the built-in Shapes world plus data converted from
public formats (img2dataset pairs and InstructPix2Pix edits written from the
Shapes world at 64 px, so the pipeline resizes them to data.image_size).

    make demo-mixture

runs these (paths relative to the repository root):

    python -m unimm.data.fixtures --format img2dataset --output runs/data/raw_pairs/00000.parquet --n 2000
    python -m unimm.data.convert --format img2dataset --input runs/data/raw_pairs --output runs/data/pairs
    python -m unimm.data.fixtures --format instructpix2pix --output runs/data/raw_edits/00000.parquet --n 2000
    python -m unimm.data.convert --format instructpix2pix --input runs/data/raw_edits --output runs/data/edits
    python -m unimm.train --config configs/demo_mixture.py --workdir runs/demo_mixture
"""

import os

from unimm.config import load_file


def get_config():
  c = load_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py"))
  c.data.mixture = "shapes:0.7,runs/data/pairs:0.15,runs/data/edits:0.15"
  return c
