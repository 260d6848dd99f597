"""python -m unimm.bench: the train step timed on tiny shapes, its FLOP count against XLA's,
the allowed-pair count, the transformers peers, the attention mode and the tables; the MMDiT
(mmdit_2b, tiny): its synthetic rows, its FLOP count and its diffusers FLUX peer."""

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


# ---------------------------------------------------------------- the MMDiT

# mmdit_2b at 2 heads of 128 (its RoPE axes), one double and one single block, 16-px images
# in 4-px patches (N = 16 tokens of 48 values), 48 text positions; XLA attention, no scan /
# remat, float32: the compiled step computes what the FLOP check counts.
MMDIT_TINY = ["--config.model.width=256", "--config.model.heads=2", "--config.model.depth=1",
              "--config.model.mmdit.single_depth=1", "--config.model.mmdit.pooled_dim=256",
              "--config.data.image_size=16", "--config.model.patch_size=4",
              "--config.data.seq_len=64", "--config.data.batch_size=8",
              "--config.model.dtype=float32", "--config.model.attention=xla",
              "--config.model.scan=false", "--config.model.remat=none", "--devices", "1"]
MB, ML, MN, MH, MDH, MBLOCKS = 8, 64, 16, 2, 128, 2
FLUX = TORCH and importlib.util.find_spec("diffusers") is not None


@pytest.fixture(scope="module")
def mmdit_run():
  """mmdit_2b (tiny) timed on its synthetic rows, with the diffusers FLUX peer when torch and
  diffusers are there: the records."""
  return bench.main(["--config", "configs/bench/mmdit_2b.py", *MMDIT_TINY, "--warmup", "0",
                     "--steps", "1"] + (["--peers"] if FLUX else []))


def test_mmdit_synthetic_rows_fill_both_streams():
  """<bos>, L - N - 4 ids, <boi>, N noised patches, <eoi>, <eos>: the batch contract, and the
  text stream (the first L - N text positions) holds all L - N of them."""
  from unimm.config import parse_args
  from unimm.data.pipeline import validate_batch
  from unimm.data.tokenizer import load_tokenizer
  from unimm.image_grid import image_grid
  cfg, _ = parse_args(["--config", "configs/bench/mmdit_2b.py", *MMDIT_TINY[:-2]])
  tok = load_tokenizer("byte")
  grid = image_grid(cfg, tok.model_vocab_size())
  batch = bench.synthetic_mmdit_batch(cfg, tok, grid)
  validate_batch(batch, seq_len=ML, patch_dim=grid.patch_dim, batch_size=MB)
  text, image = bench.mmdit_stream_tokens(cfg, batch, grid.num_patches)
  assert list(text) == [ML - MN] * MB and list(image) == [MN] * MB
  row = batch["tokens"][0]
  assert (row[0], row[ML - MN - 3], row[-2], row[-1]) == (tok.bos_id, tok.boi_id, tok.eoi_id,
                                                          tok.eos_id)
  assert not set(row[1:ML - MN - 3].tolist()) & tok.special_ids
  assert list(batch["patch_index"][0, ML - MN - 2:ML - 2]) == list(range(MN))


def mmdit_formula(m, b=MB, lt=ML - MN, li=MN):
  """6 (image Li + text Lt + joint (Lt + Li) + row) + 12 (Lt + Li)^2 H Dh blocks, per row."""
  return b * (6 * (m["image"] * li + m["text"] * lt + m["joint"] * (lt + li) + m["row"])
              + 12 * (lt + li) ** 2 * MH * MDH * MBLOCKS)


def test_mmdit_line_and_flops_against_xla(mmdit_run):
  """The record of the MMDiT's step, its useful FLOPs by the formula, and XLA's count of the
  step: the rest of it is elementwise work the formula leaves out (LayerNorm and adaLN
  modulation, GELU, RoPE, QK RMSNorm, gates, softmax over the B H L^2 scores, the flow loss:
  about 2% here) and AdamW (about 20 FLOPs a parameter: about 1.5%), less the input gradients
  of img_in and time_in.linear_1 that the formula counts and the step need not compute (their
  inputs take no gradient: well under 1%); within the dense test's 6%."""
  line = mmdit_run[-1]
  assert line["kind"] == "train_step" and line["config"] == "mmdit_2b"
  assert (line["batch"], line["seq_len"], line["steps"], line["warmup"]) == (MB, ML, 1, 0)
  assert line["tokens_per_s"] == pytest.approx(MB * ML / line["step_time_s"]["median"], rel=1e-3)
  assert line["levers"] == {"dtype": "float32", "attention": "xla", "scan": False,
                            "remat": "none", "ce_chunk": 0, "mu_dtype": "float32",
                            "moe_impl": None, "capacity_factor": None}
  assert line["batch_stats"] == {"real_token_share": 1.0, "image_token_share": MN / ML,
                                 "allowed_pair_share": 1.0}
  assert np.isfinite(line["loss"]) and line["compile_s"] > 0
  p = line["params"]
  assert set(p) == {"total", "active", "matmul_active", "matmul", "conditioner"}
  assert p["matmul_active"] == sum(p["matmul"].values()) and p["active"] == p["total"]
  assert p["conditioner"] == 384 * 256 + 256  # the byte tokenizer's table and the text norm
  assert line["useful_flops_per_step"] == mmdit_formula(p["matmul"])
  assert line["xla_flops_per_device"] / line["useful_flops_per_step"] == pytest.approx(
      1.0, abs=0.06)


@pytest.mark.skipif(not FLUX, reason="torch and diffusers are test dependencies")
def test_mmdit_flux_peer(mmdit_run):
  """diffusers FluxTransformer2DModel of the same shape: our parameters less the conditioner
  (the peer is given text features), the same matmul weights stream by stream, so the same
  useful FLOPs."""
  flux, line = mmdit_run
  assert (flux["kind"], flux["peer"], flux["precision"], flux["device"]) == (
      "peer", "diffusers FluxTransformer2DModel", "float32", "cpu")
  assert flux["attention_backend"].startswith("native")
  assert (flux["batch"], flux["seq_len"], flux["image_tokens"], flux["text_tokens"]) == (
      MB, ML, MN, ML - MN)
  assert set(flux["versions"]) == {"torch", "diffusers"} and np.isfinite(flux["loss"])
  ours, theirs = line["params"], flux["params"]
  assert theirs["total"] == ours["total"] - ours["conditioner"]
  assert theirs["matmul"] == ours["matmul"]
  assert flux["useful_flops_per_step"] == line["useful_flops_per_step"]
  assert flux["tokens_per_s"] == pytest.approx(MB * ML / flux["step_time_s"]["median"], rel=1e-3)
  assert line["peer"] == {"peer": "diffusers FluxTransformer2DModel"}
  assert line["vs_peer"]["tokens_per_s"] == pytest.approx(
      line["tokens_per_s"] / flux["tokens_per_s"], rel=1e-2)

