"""python -m unimm.bench: the train step timed on tiny shapes, its FLOP count against XLA's,
the allowed-pair count, the transformers peers, the attention mode and the tables."""

import importlib.util
import json

import numpy as np
import pytest

from unimm import bench, bench_peers
from unimm.config import load_file
from unimm.errors import UserError
from unimm.kernels.mask import attention_mask

from helpers import random_unified_ids

# dense_1b at a size that compiles in seconds; XLA attention, no scan / remat / chunking, so
# that the compiled step computes exactly what the FLOP check below counts.
TINY = ["--config.model.width=64", "--config.model.depth=2", "--config.model.heads=4",
        "--config.model.kv_heads=2", "--config.model.head_dim=16", "--config.model.mlp_dim=128",
        "--config.model.vocab_size=384", "--config.data.seq_len=128", "--config.data.batch_size=2",
        "--config.model.dtype=float32", "--config.model.attention=xla", "--config.model.scan=false",
        "--config.model.remat=none", "--config.model.ce_chunk=0", "--devices", "1"]
B, L, H, DH, DEPTH = 2, 128, 4, 16, 2
TORCH = importlib.util.find_spec("torch") is not None


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
  """transfusion_1b (the dense model) timed on synthetic text, with its Llama peer when torch
  is there, then on packed Shapes batches (16-px images of 4 patches): the records and the
  --out file."""
  out = tmp_path_factory.mktemp("bench") / "out.jsonl"
  records = bench.main(["--config", "configs/bench/transfusion_1b.py", *TINY,
                        "--config.data.image_size=16", "--config.model.patch_size=8",
                        "--data", "synthetic,pipeline", "--warmup", "1", "--steps", "2",
                        "--out", str(out)] + (["--peers"] if TORCH else []))
  return records, out


def test_lines_are_complete(text_run):
  records, out = text_run
  *_, text, packed = records
  for line, data in ((text, "synthetic"), (packed, "pipeline")):
    assert line["kind"] == "train_step" and line["config"] == "transfusion_1b"
    assert (line["backend"], line["devices"], line["data"]) == ("cpu", 1, data)
    assert (line["batch"], line["seq_len"], line["steps"], line["warmup"]) == (B, L, 2, 1)
    times = line["step_time_s"]
    assert len(times["each"]) == 2 and times["median"] > 0
    assert line["tokens_per_s"] == pytest.approx(B * L / times["median"], rel=1e-3)
    assert line["mfu"] is None and line["memory"]["peak_bytes"] is None  # CPU: no peak, no stats
    assert line["memory"]["argument_bytes"] > 0 and line["memory"]["temp_bytes"] > 0
    assert line["compile_s"] > 0 and np.isfinite(line["loss"]) and line["xla_flops_per_device"] > 0
    assert line["levers"] == {"dtype": "float32", "attention": "xla", "scan": False,
                              "remat": "none", "ce_chunk": 0, "mu_dtype": "float32",
                              "moe_impl": None, "capacity_factor": None}
    assert set(line["versions"]) == {"python", "jax", "jaxlib", "flax", "optax"}
  assert text["batch_stats"] == {"real_token_share": 1.0, "image_token_share": 0.0,
                                 "allowed_pair_share": round((L + 1) / (2 * L), 4)}
  stats = packed["batch_stats"]  # noised images see only themselves: fewer pairs than causal
  assert stats["image_token_share"] > 0 and 0 < stats["allowed_pair_share"] < 0.5
  assert packed["useful_flops_per_step"] < text["useful_flops_per_step"]
  assert [json.loads(x) for x in out.read_text().splitlines()] == records


def test_useful_flops_formula_matches_xla_cost_analysis(text_run):
  """6 N T + 12 P H Dh depth with P the causal pairs; with every L^2 pair counted (what the
  XLA attention computes), it matches the compiled step's cost analysis. The rest of XLA's
  count is elementwise work (softmax over the B H L^2 scores, cross-entropy over the vocab,
  norms, RoPE, SwiGLU's silu, AdamW over the parameters): about 3% at these shapes, so the
  two agree within 6%."""
  line = text_run[0][-2]
  n = line["params"]["matmul_active"]
  causal = 6 * n * B * L + 12 * B * L * (L + 1) // 2 * H * DH * DEPTH
  assert line["useful_flops_per_step"] == causal
  dense = 6 * n * B * L + 12 * B * L * L * H * DH * DEPTH
  assert line["xla_flops_per_device"] / dense == pytest.approx(1.0, abs=0.06)


@pytest.mark.skipif(not TORCH, reason="torch is a test dependency")
def test_peer_lines_and_ratio(text_run):
  (llama, none, text, packed), _ = text_run
  assert (llama["kind"], llama["data"], llama["peer"]) == ("peer", "synthetic",
                                                           "transformers LlamaForCausalLM")
  assert (llama["attn_implementation"], llama["precision"], llama["device"]) == (
      "sdpa", "float32", "cpu")
  assert (llama["batch"], llama["seq_len"], len(llama["step_time_s"]["each"])) == (B, L, 2)
  assert llama["params"]["total"] == text["params"]["total"] - text["params"]["image_side"]
  assert np.isfinite(llama["loss"]) and llama["peak_bytes"] is None and llama["mfu"] is None
  assert llama["tokens_per_s"] == pytest.approx(B * L / llama["step_time_s"]["median"], rel=1e-3)
  assert text["peer"] == {"peer": "transformers LlamaForCausalLM"}
  assert text["vs_peer"]["tokens_per_s"] == pytest.approx(
      text["tokens_per_s"] / llama["tokens_per_s"], rel=1e-2)
  assert none["data"] == "pipeline" and none["peer"] is None and "text only" in none["note"]
  assert packed["peer"] == {"peer": None, "note": none["note"]}
  assert packed["vs_peer"] == {"tokens_per_s": None, "peak_bytes": None}


@pytest.mark.parametrize("name", ["dense_1b", "moe_2b"])
def test_full_size_peers_have_unimm_parameter_counts(name):
  """The peers at full size (on torch's meta device) have the text model's parameters: 1.10B
  (Llama), 2.07B of which 0.48B active (Qwen3-MoE); unimm adds only its image side."""
  torch = pytest.importorskip("torch")
  del torch
  cfg = load_file(f"configs/bench/{name}.py")
  cfg.model.moe.impl = "ragged"  # the grouped matmul does not change the counts
  ours = bench.parameter_summary(cfg, 32_000)
  spec = bench_peers.peer_spec(cfg, "synthetic", 32_000)
  theirs = bench_peers.counts(bench_peers.build(spec, "meta"))
  image = ours["image_side"]
  assert theirs["total"] == ours["total"] - image and theirs["active"] == ours["active"] - image
  assert (round(ours["total"] / 1e9, 2), round(ours["active"] / 1e9, 2)) == (
      {"dense_1b": (1.11, 1.11), "moe_2b": (2.08, 0.49)}[name])


def brute_force_pairs(ids):
  mask = np.asarray(attention_mask(ids, ids))
  return int(mask[np.asarray(ids.segment) > 0].sum())


def test_allowed_pairs_against_the_dense_mask():
  for seed in range(4):
    ids = random_unified_ids(seed, 3, 96)
    assert bench.allowed_pairs(ids) == brute_force_pairs(ids)
  ids = bench.shapes_like_ids(2, 400, 64)
  assert bench.allowed_pairs(ids) == brute_force_pairs(ids)
  assert bench.allowed_pairs(bench.causal_ids(2, 50)) == 2 * 50 * 51 // 2


def test_attention_mode_and_tables(text_run, tmp_path):
  out = tmp_path / "attention.jsonl"
  records = bench.main(["--attention", "--seq", "256", "--heads", "2", "--head-dim", "16",
                        "--image-tokens", "64", "--iters", "1", "--out", str(out)])
  *lines, summary = records
  assert [(r["mask"], r["impl"]) for r in lines] == [("causal", "xla"), ("unified", "xla")]
  assert lines[0]["allowed_pair_share"] == round(257 / 512, 4)
  assert all(r["fwd_tflops"] > 0 and r["fwd_bwd_ms"] > 0 for r in lines)
  assert summary["kind"] == "attention_summary" and summary["unified_flash_vs_cudnn_causal"] is None
  with open(out, "a") as f:
    f.write(text_run[1].read_text())
  text = bench.main(["--table", str(out)])
  assert text.startswith("Measured ") and "| transfusion_1b (2 x 128) | synthetic |" in text
  assert "| transfusion_1b (2 x 128) | pipeline |" in text
  assert "| unified | xla | " in text and "not measured here" in text


def test_bad_flags_fail_in_one_line():
  with pytest.raises(UserError, match="--data=nope"):
    bench.main(["--config", "configs/bench/dense_1b.py", "--data", "nope"])
  with pytest.raises(UserError, match="--steps=0"):
    bench.main(["--config", "configs/bench/dense_1b.py", "--steps", "0"])
  with pytest.raises(UserError, match="--config FILE is required"):
    bench.main([])
