"""Compile the train step ahead of time for a TPU topology on this (CPU) host.

    pip install libtpu
    python launch/compile_tpu.py --config configs/demo.py --topology v5p:2x2x2 \
        --config.mesh.data=2 --config.mesh.fsdp=-1 --config.data.batch_size=16

The topology is libtpu's name, CHIP:SHAPE (v5p:2x2x2 is 8 chips, a v5p-16).

Uses jax.experimental.topologies to make abstract TPU devices, builds the mesh
from the config over them, lowers and compiles the jitted step, and prints its
memory use: pod-size programs are checked without a pod (MaxText's
train_compile).
"""

import os
import sys
import time

os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no TPU VM metadata on this host
# the libtpu `make test` installs beside the venv (a pip-installed libtpu is found by itself)
_LIBTPU = os.path.join(os.path.dirname(__file__), "..", ".venv", "libtpu", "libtpu", "libtpu.so")
if os.path.exists(_LIBTPU):
  os.environ.setdefault("TPU_LIBRARY_PATH", os.path.abspath(_LIBTPU))
import jax  # pylint: disable=wrong-import-position


def main(argv):
  from unimm.config import parse_args
  cfg, opts = parse_args(argv, flags=("topology",))
  from jax.experimental import topologies
  from unimm.data.tokenizer import load_tokenizer
  from unimm.parallel.sharding import make_mesh
  from unimm.train.step import Trainer
  topo = topologies.get_topology_desc(platform="tpu", topology_name=opts.get("topology") or "v5p:2x2x1")
  mesh = make_mesh(cfg.mesh, topo.devices)
  trainer = Trainer(cfg, mesh, load_tokenizer(cfg.data.tokenizer).model_vocab_size())
  lowered = trainer.train_step.lower(trainer.abstract_state, *trainer.abstract_inputs())
  start = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  print(f"compiled the train step for {opts.get('topology')}: {len(topo.devices)} chips, "
        f"mesh {dict(mesh.shape)}; per chip: arguments {mem.argument_size_in_bytes / 2**20:.1f} MiB, "
        f"temporaries {mem.temp_size_in_bytes / 2**20:.1f} MiB, code {mem.generated_code_size_in_bytes / 2**20:.1f} MiB; "
        f"compiled in {seconds:.1f} s")


if __name__ == "__main__":
  main(sys.argv[1:])
