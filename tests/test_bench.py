"""unimm.data.bench runs on a format and reports both pipelines."""

import pytest

from unimm.data import bench


@pytest.mark.parametrize("fmt", ["obelics"])
def test_bench_reports_grain_and_torch(fmt, capsys):
  pytest.importorskip("torch")
  results = bench.main(["--formats", fmt, "--seconds", "0.5", "--repeats", "1", "--docs", "6", "--image-size", "32",
                        "--patch-size", "8", "--seq-len", "256", "--batch-size", "2"])
  (r,) = results
  assert r["format"] == fmt and r["documents"] == 6 and r["images"] == 12
  for key in ("grain_w0", "torch_w0"):
    m = r[key]
    assert m["docs_per_s"] > 0 and m["tokens_per_core_s"] > 0, key
  assert capsys.readouterr().out.strip().splitlines()[-1].startswith('[{"format": "obelics"')
