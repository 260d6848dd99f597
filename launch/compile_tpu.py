"""Kept for old command lines: `python -m unimm.plan` is the planner (this runs it).

    python launch/compile_tpu.py --config configs/demo.py --topology v5p:2x2x2 \
        --config.mesh.data=2 --config.mesh.fsdp=-1 --config.data.batch_size=16

is `python -m unimm.plan` with the same arguments: compiles the train step ahead of time for
the topology on this host and prints its memory, FLOPs and collectives per chip, searching
mesh / remat settings when it does not fit (see unimm/plan.py).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from unimm.errors import cli  # noqa: E402  pylint: disable=wrong-import-position
from unimm.plan import main  # noqa: E402  pylint: disable=wrong-import-position

if __name__ == "__main__":
  cli(main)
