"""`python -m unimm.plan`: topology names, the HLO collective / FLOP count, the fit search, the
one-line errors, and one real ahead-of-time compile of a tiny model for a v5p:2x2x1 topology
whose collectives match a hand count."""

import json
import math
import os
import subprocess
import sys

import jax
import pytest

from unimm import plan as P
from unimm.config import load_file, override
from unimm.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = os.path.exists(os.environ.get("TPU_LIBRARY_PATH", ""))
# the demo shrunk: one block, XLA attention (no Mosaic kernels to compile), 4 x 128 tokens
TINY = {"model.width": "64", "model.depth": "1", "model.heads": "2", "model.mlp_dim": "128",
        "model.attention": "xla", "data.image_size": "16", "data.batch_size": "4",
        "data.seq_len": "128", "mesh.data": "1", "mesh.fsdp": "-1"}


def tiny_config(**extra):
  cfg = load_file(os.path.join(ROOT, "configs/demo.py"))
  for k, v in {**TINY, **extra}.items():
    override(cfg, k, v)
  return cfg


@pytest.mark.parametrize("name,libtpu,count", [
    ("v5p-256", "v5p:4x4x8", 128), ("v6e-256", "v6e:16x16", 256), ("v5p-8", "v5p:2x2x1", 4),
    ("v5litepod-16", "v5e:4x4", 16), ("v5p:4x4x4", "v5p:4x4x4", 64), ("gpu:8xH100", None, 8)])
def test_topology_names(name, libtpu, count):
  t = P.Topology(name)
  assert (t.libtpu, t.count) == (libtpu, count)
  assert t.hbm_bytes() > 0 and t.hbm_bytes(2) == 2 * P.GiB


@pytest.mark.parametrize("name,words", [
    ("v5p-255", "v5p-256"), ("v6e-100", "v6e-256"), ("tpu-9000", "accelerator type"),
    ("gpu:8xA100", "gpu:NxH100")])
def test_bad_topology_is_one_line(name, words):
  with pytest.raises(UserError) as e:
    P.Topology(name)
  assert words in str(e.value) and "\n" not in str(e.value)


HLO = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%all-reduce-scatter.1 (input.1: f32[64,32]) -> f32[16,32] {
  %input.1 = f32[64,32]{1,0} parameter(0)
  %all-reduce.1 = f32[64,32]{1,0} all-reduce(%input.1), replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %ds = f32[16,32]{1,0} dynamic-slice(%all-reduce.1, %c, %c), dynamic_slice_sizes={16,32}
}

%cond (p: (s32[], bf16[16,32])) -> pred[] {
  %p = (s32[], bf16[16,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[]{:T(128)} constant(6)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (q: (s32[], bf16[16,32])) -> (s32[], bf16[16,32]) {
  %q = (s32[], bf16[16,32]{1,0}) parameter(0)
  %w = bf16[16,32]{1,0} get-tuple-element(%q), index=1
  %all-gather.1 = bf16[64,32]{1,0:T(8,128)(2,1)} all-gather(%w), replica_groups=mesh['axis_0'=4] {'axis_0'}, dimensions={0}
  %x = bf16[8,64]{1,0} parameter(1)
  %dot.1 = f32[8,32]{1,0} dot(%x, %all-gather.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[], bf16[16,32]{1,0}) tuple(%i, %w)
}

ENTRY %main (arg: f32[64,32]) -> f32[16,32] {
  %arg = f32[64,32]{1,0} parameter(0)
  %init = (s32[], bf16[16,32]{1,0}) tuple(%z, %v)
  %loop = (s32[], bf16[16,32]{1,0}) while(%init), condition=%cond, body=%body
  %rs = f32[16,32]{1,0} fusion(%arg), kind=kCustom, calls=%all-reduce-scatter.1
  %ar = (f32[8]{0}, bf16[4,4]{1,0}) all-reduce(%a1, %a2), replica_groups=[2,4]<=[8], to_apply=%add
  ROOT %r = f32[16,32]{1,0} reduce-scatter(%arg), replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
}
"""


def test_hlo_collectives_and_flops_count_loop_trips():
  counts, flops, known = P.analyze_hlo(HLO)
  assert known
  assert counts["all-gather"] == {"count": 6, "bytes": 6 * 64 * 32 * 2}  # in a 6-trip loop
  # TPU's fused reduce-scatter and a plain one: the full f32[64,32] operand each
  assert counts["reduce-scatter"] == {"count": 2, "bytes": 2 * 64 * 32 * 4}
  assert counts["all-reduce"] == {"count": 1, "bytes": 8 * 4 + 16 * 2}  # a tuple: both arrays
  assert flops == 6 * 2 * 8 * 32 * 64


def test_search_order_and_pick(monkeypatch, capsys):
  """Memory constrained (here: each setting's total made up by its remat and tensor size), the
  search tries the config, then remat save_dots / full on the config's and the all-fsdp mesh,
  then tensor parallelism, and prints the first that fits with its command line."""
  cfg = tiny_config(**{"mesh.data": "2", "mesh.fsdp": "2"})
  cands = P.search_candidates(cfg, 4)
  assert cands[0] == {}
  assert [(c["mesh.data"], c["mesh.tensor"], c["model.remat"]) for c in cands[1:5]] == [
      (2, 1, "none"), (1, 1, "none"), (2, 1, "save_dots"), (1, 1, "save_dots")]
  assert {c["mesh.tensor"] for c in cands[1:]} == {1, 2, 4}

  tried = []

  def fake_measure(trial, topo, hbm, spare):
    tried.append((trial.model.remat, trial.mesh.data, trial.mesh.tensor))
    total = {"none": 10, "save_dots": 6, "full": 3}[trial.model.remat] * P.GiB
    total = total if trial.mesh.data == 1 else total + 2 * P.GiB
    return {"memory": {"total": total}, "fits": total <= hbm * (1 - spare), "compile_s": 1.0}

  monkeypatch.setattr(P, "measure", fake_measure)
  report = P.plan(cfg, "v5p:2x2x1", hbm_gib=8, spare=0.1)
  assert tried == [("none", 2, 1), ("none", 2, 1), ("none", 1, 1), ("save_dots", 2, 1),
                   ("save_dots", 1, 1)]
  assert report["setting"] == {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 1,
                               "mesh.expert": 1, "model.remat": "save_dots", "model.scan": True}
  assert "tried --config.mesh.data=1" in capsys.readouterr().out
  cmd = P.command(["--config", "c.py", "--topology", "v5p:2x2x1", "--config.mesh.data=2"],
                  report["setting"])
  assert cmd == ("python -m unimm.plan --config c.py --topology v5p:2x2x1 --config.mesh.data=1 "
                 "--config.mesh.fsdp=4 --config.mesh.tensor=1 --config.mesh.expert=1 "
                 "--config.model.remat=save_dots --config.model.scan=true")
  with pytest.raises(UserError) as e:  # nothing fits: one line, with the smallest tried
    P.plan(cfg, "v5p:2x2x1", hbm_gib=2, spare=0.1)
  assert "no setting tried" in str(e.value) and "3.0 GiB" in str(e.value)
  assert "\n" not in str(e.value)


def test_mesh_that_does_not_divide_is_one_line():
  with pytest.raises(UserError) as e:
    P.plan(tiny_config(**{"mesh.data": "3", "mesh.fsdp": "1"}), "v5p:2x2x1")
  assert "does not divide v5p:2x2x1" in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_input_is_one_line():
  """Bad input fails before JAX starts: one line on stderr, status 2 (the same UserError in
  process)."""
  r = subprocess.run([sys.executable, "-m", "unimm.plan", "--config", "configs/demo.py",
                      "--topology", "v5p-7"], capture_output=True, text=True, cwd=ROOT,
                     timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.startswith("error: --topology v5p-7") and r.stderr.count("\n") == 1, r.stderr
  for args in (["--topology", "v5p-8", "--spare", "x"], ["--topology", "v5p-8", "--spare", "1"],
               ["--topology", "v5p-8", "--config.model.widht=3"], []):
    with pytest.raises(UserError) as e:
      P.main(["--config", "configs/demo.py", *args])
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def tiny_report():
  if not HAS_LIBTPU:
    pytest.skip("no libtpu beside the venv (make test installs it): no ahead-of-time TPU compile")
  cfg = tiny_config()
  return cfg, P.plan(cfg, "v5p-8", search=False)


def test_report_fields(tiny_report):
  _, r = tiny_report
  assert (r["topology"], r["libtpu_topology"], r["devices"], r["estimated"]) == (
      "v5p-8", "v5p:2x2x1", 4, False)
  assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 1} and r["fits"]
  m = r["memory"]
  assert m["total"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"] + m["code"]
  assert m["hbm"] == 95 * P.GiB and 0 < m["aliased"] <= m["arguments"]
  assert r["flops"]["matmul_hlo"] > 0 and r["loop_trips_known"]
  line = json.dumps(r)  # machine-readable as it is
  assert json.loads(line)["collectives"] == r["collectives"]
  text = P.text_report(r, ["--config", "configs/demo.py", "--topology", "v5p-8"])
  assert "HBM" in text and "reduce-scatter" in text and "larger of" in text


def test_fsdp_collectives_match_a_hand_count(tiny_report):
  """fsdp=4, remat none: each weight is all-gathered in bf16 once, for the forward, and the
  gathered copy kept for the backward (2 bytes a parameter, the gathered size; with remat the
  backward gathers it again), and its float32 gradient is reduce-scattered (4 bytes a
  parameter, the full operand; XLA all-reduces some instead, in bfloat16 where it reduces
  before the cast to float32 (2 bytes: docs/scaling.md, dense_7b)). No activation is
  gathered: the rows stay batch-sharded (a timestep embedding once gathered the whole batch)."""
  cfg, r = tiny_report
  from unimm.data.tokenizer import load_tokenizer
  from unimm.parallel.sharding import make_mesh
  from unimm.train.step import Trainer
  trainer = Trainer(cfg, make_mesh(cfg.mesh, P.Topology("v5p-8").devices()),
                    load_tokenizer(cfg.data.tokenizer).model_vocab_size())
  leaves = jax.tree.leaves(trainer.abstract_state["params"])
  sharded = sum(math.prod(x.shape) for x in leaves
                if any("fsdp" in ((s,) if isinstance(s, str) else s or ()) for s in x.sharding.spec))
  total = sum(math.prod(x.shape) for x in leaves)
  c = r["collectives"]
  assert c["reduce-scatter"]["count"] > 0 and c["all-gather"]["count"] > 0
  assert cfg.model.remat == "none"
  assert 0.9 < c["all-gather"]["bytes"] / (2 * sharded) < 1.25, (c, sharded)
  grads = c["reduce-scatter"]["bytes"] + c.get("all-reduce", {}).get("bytes", 0)
  assert 2 * total * 0.95 < grads < 4 * total * 1.1, (c, total)
