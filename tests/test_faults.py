"""Fault injection from the CLI (issue 14): SIGKILLs at random moments and while a save is in
flight, and a SIGTERM, each followed by a restart in the same workdir, end with the parameters,
optimizer state and data order of an uninterrupted run (`unimm.train.faults`; `make faults`
runs the 20-kill version)."""

import os

from unimm.train.faults import run_faults
from tests.helpers import QUICK_XLA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--config", os.path.join(ROOT, "configs", "demo.py"), "--config.model.width=32",
         "--config.model.depth=1", "--config.model.heads=2", "--config.model.mlp_dim=64",
         "--config.data.image_size=16", "--config.data.batch_size=2", "--config.mesh.data=1",
         "--config.train.steps=20", "--config.train.ckpt_every=4", "--config.train.log_every=4",
         "--config.train.time_limit_s=0", "--no_eval"]


def test_kills_and_sigterm_resume_exactly(tmp_path):
  # the starts: one device, compiles with most XLA optimisations off (as test_cli.py); a kill
  # while a save is in flight, one at a random moment, a SIGTERM
  env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {QUICK_XLA_FLAGS}",
         "PYTHONPATH": ROOT, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
  events = []
  s = run_faults(str(tmp_path), TRAIN, kills=2, save_kills=1, sigterm=1, seed=0,
                 log=events.append, env=env)
  assert s["kills"] == 2 and s["kills_during_save"] >= 1, events
  # A SIGTERM: exit 0 with a checkpoint of the step it was on (or the next), no batch more.
  assert [t["exit"] for t in s["sigterms"]] == [0] and s["sigterms"][0]["within_one_step"], events
  assert s["partial_saves_reported"] == s["starts_after_a_partial_save"] >= 1, events
  assert s["same_params_and_optimizer"] and s["same_data_order"], (s, events)
  assert s["steps_trained_again"] > 0 and s["ok"]
