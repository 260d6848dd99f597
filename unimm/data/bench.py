"""Input-pipeline throughput per CPU core, on every public format.

    python -m unimm.data.bench [--formats img2dataset,mmc4] [--workers 0,2] [--seconds 5] [--repeats 3]

For each format: writes a sample input in that format (`unimm.data.fixtures`,
photo-like JPEGs of 320x240 to 640x480), converts it (`unimm.data.convert`,
timed), then reads the converted shards twice for the same time:

  grain  unimm's pipeline (`make_iterator`): global shuffle, decode, resize and
         centre-crop into aspect buckets, tokenize, first-fit pack, batch
         (data.num_workers worker processes);
  torch  a plain `torch.utils.data.DataLoader` (shuffle, the same worker count)
         over the same records doing the same per-record work with the same
         functions (unpack, decode, resize/crop, tokenize), first-fit packed into
         rows in the main process;

and reports documents and tokens (non-padding positions) per second, and both
per CPU core: divided by the CPU seconds the process and its workers used, so
the figures do not depend on how many cores the machine lends. The two
pipelines are measured alternately, --repeats times, and medians reported;
`records_only` is the per-record work alone in one thread (the ceiling). The last
stdout line is a JSON summary. torch is optional (the peer is left out
without it).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from unimm.config import defaults
from unimm.data import convert, fixtures
from unimm.data.pipeline import (ConvertedSource, _Load, _allow_unparsed_absl_flags,
                                 make_iterator, unstack)
from unimm.data.tokenizer import load_tokenizer
from unimm.errors import cli
from unimm.image_grid import image_grid

FORMATS = ("img2dataset", "webdataset", "tfds", "instructpix2pix", "hq_edit", "mmc4",
           "obelics", "omnigen")
WORDS = ("a photo of the red small big old new house tree dog cat car road sky "
         "river with and in on near over under at sunset morning").split()
SIZES = ((480, 640), (360, 640), (480, 480), (640, 480), (240, 320))


# ------------------------------------------------------------ sample inputs


def photo(rng, size):
  """A photo-like JPEG: smooth colour gradients, a few blobs, sensor noise."""
  h, w = size
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  img = np.zeros((h, w, 3), np.float32)
  for c in range(3):
    a, b, p = rng.uniform(-1, 1, 3)
    img[..., c] = 128 + 90 * np.sin(a * x / w * 3 + b * y / h * 3 + p * 6)
  for _ in range(4):
    cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.3) * min(h, w)
    blob = ((y - cy) ** 2 + (x - cx) ** 2) < r * r
    img[blob] = rng.uniform(0, 255, 3)
  img += rng.normal(0, 6, img.shape)
  return fixtures.encode_jpeg(np.clip(img, 0, 255).astype(np.uint8), quality=90)


def sentence(rng, n=12):
  return " ".join(rng.choice(WORDS, n)) + "."


def write_input(fmt, directory, n, seed=0):
  """Writes n sample records of `fmt` under directory; returns convert's arguments."""
  rng = np.random.default_rng(seed)
  pic = lambda: photo(rng, SIZES[rng.integers(len(SIZES))])
  path = os.path.join(directory, "input")
  if fmt in ("img2dataset", "webdataset", "tfds"):
    rows = [{"image": pic(), "caption": sentence(rng)} for _ in range(n)]
    if fmt == "tfds":
      fixtures.write_tfds(path, "bench_pairs", rows)
      return ["--input", path, "--name", "bench_pairs"]
    path += ".parquet" if fmt == "img2dataset" else ".tar"
    getattr(fixtures, f"write_{fmt}")(path, rows)
  elif fmt == "instructpix2pix":
    path += ".parquet"
    fixtures.write_instructpix2pix(path, [
        {"original_image": pic(), "edited_image": pic(), "edit_prompt": sentence(rng, 6),
         "original_prompt": sentence(rng), "edited_prompt": sentence(rng)} for _ in range(n)])
  elif fmt == "hq_edit":
    path += ".parquet"
    fixtures.write_hq_edit(path, [
        {"input_image": pic(), "output_image": pic(), "edit": sentence(rng, 6),
         "input": sentence(rng), "output": sentence(rng), "inverse_edit": sentence(rng, 6)}
        for _ in range(n)])
  elif fmt == "mmc4":
    path += ".jsonl"
    fixtures.write_mmc4(path, os.path.join(directory, "images"), [
        {"text_list": [sentence(rng) for _ in range(4)],
         "images": [{"bytes": pic(), "matched_text_index": int(rng.integers(4))}
                    for _ in range(2)]} for _ in range(n)])
  elif fmt == "obelics":
    path += ".parquet"
    fixtures.write_obelics(path, os.path.join(directory, "images"), [
        [{"text": sentence(rng)}, {"image": pic(), "url": f"https://example.com/{d}/a.jpg"},
         {"text": sentence(rng)}, {"image": pic(), "url": f"https://example.com/{d}/b.jpg"},
         {"text": sentence(rng)}] for d in range(n)])
  elif fmt == "omnigen":
    path += ".jsonl"
    fixtures.write_omnigen(path, directory, [
        {"task_type": "subject", "instruction":
         "<img><|image_1|></img> " + sentence(rng, 6) + " <img><|image_2|></img>",
         "input_images": [pic(), pic()], "output_image": pic()} for _ in range(n)])
  else:
    raise ValueError(fmt)
  return ["--input", path]


# ------------------------------------------------------------------ timing


def cpu_seconds():
  """User + system CPU seconds of this process and its live children."""
  import psutil  # pylint: disable=import-outside-toplevel
  me = psutil.Process()
  total = sum(me.cpu_times()[:2])
  for child in me.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.Error:
      pass
  return total


def measure(batches, seconds, warmup=2):
  """Pulls batches for `seconds` after `warmup`; counts documents and tokens."""
  for _ in range(warmup):
    next(batches)
  docs = tokens = 0
  c0, t0 = cpu_seconds(), time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    b = next(batches)
    seg = b["segment_ids"]
    tokens += int((seg > 0).sum())
    docs += sum(len(np.unique(row[row > 0])) for row in seg)
  wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
  return {"docs_per_s": docs / wall, "tokens_per_s": tokens / wall, "cpu_s_per_s": cpu / wall,
          "docs_per_core_s": docs / cpu, "tokens_per_core_s": tokens / cpu}


def grain_batches(cfg):
  it = make_iterator(cfg)
  try:
    while True:
      yield next(it)
  finally:
    it.close()


class TorchDocs:
  """torch map-style dataset: record i -> encoded document (the same _Load)."""

  def __init__(self, directory, cfg):
    self.directory, self.cfg = directory, cfg
    self.source = ConvertedSource(directory)
    tok = load_tokenizer(cfg.data.tokenizer)
    self.load = _Load(0, tok, image_grid(cfg, tok.model_vocab_size()), cfg.data)

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    return self.load.map((self.source[int(i)], int(i)))  # same work as grain's stream


def _identity(x):
  return x


def torch_batches(directory, cfg):
  """DataLoader of documents, first-fit packed into data.batch_size rows."""
  import torch  # pylint: disable=import-outside-toplevel
  d = cfg.data
  loader = torch.utils.data.DataLoader(
      TorchDocs(directory, cfg), batch_size=None, shuffle=True, collate_fn=_identity,
      num_workers=int(d.num_workers), persistent_workers=int(d.num_workers) > 0,
      generator=torch.Generator().manual_seed(int(cfg.seed)))
  packer = FirstFit(int(d.batch_size), int(d.seq_len))
  while True:
    for doc in loader:
      if "skip" in doc:
        continue
      for part in doc.get("chunks", [doc]):  # a long interleaved record: its chunks
        out = packer.add(part)
        if out is not None:
          yield out


class FirstFit:
  """First-fit packing of documents into `rows` bins of `length` (numpy)."""

  def __init__(self, rows, length):
    self.rows, self.length = rows, length
    self.bins = [[] for _ in range(rows)]
    self.used = [0] * rows

  def add(self, doc):
    n = len(doc["ints"])
    for r in range(self.rows):
      if self.used[r] + n <= self.length:
        self.bins[r].append(doc)
        self.used[r] += n
        return None
    out = self.flush()
    self.add(doc)
    return out

  def flush(self):
    rows = [self._row(docs) for docs in self.bins]
    self.bins = [[] for _ in range(self.rows)]
    self.used = [0] * self.rows
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

  def _row(self, docs):
    lengths = [len(d["ints"]) for d in docs]
    pad = self.length - sum(lengths)
    row = {k: np.concatenate([d[k] for d in docs]) for k in ("ints", "patches", "pixels")}
    row = {k: np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)) for k, v in row.items()}
    row = unstack(row)
    row["segment_ids"] = np.pad(np.repeat(np.arange(1, len(docs) + 1, dtype=np.int32), lengths),
                                (0, pad))
    row["positions"] = np.pad(np.concatenate([np.arange(n, dtype=np.int32) for n in lengths]),
                              (0, pad))
    return row


# --------------------------------------------------------------------- main


def bench_config(args):
  cfg = defaults()
  cfg.data.image_size, cfg.model.patch_size = args.image_size, args.patch_size
  cfg.data.seq_len, cfg.data.batch_size = args.seq_len, args.batch_size
  cfg.data.pack_bins = args.batch_size
  cfg.data.max_aspect = 2.0
  return cfg


def run_format(fmt, args, workdir):
  directory = os.path.join(workdir, fmt)
  os.makedirs(directory)
  argv = write_input(fmt, directory, args.docs)
  out = os.path.join(directory, "converted")
  c0, t0 = cpu_seconds(), time.perf_counter()
  summary = convert.main(["--format", fmt, "--output", out, *argv])
  wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
  result = {"format": fmt, "documents": summary["documents"], "images": summary["images"],
            "convert_docs_per_s": summary["documents"] / wall,
            "convert_docs_per_core_s": summary["documents"] / max(cpu, 1e-9)}
  cfg = bench_config(args)
  cfg.data.mixture = out
  runs = {}
  for _ in range(args.repeats):  # alternating, so that machine noise hits both alike
    runs.setdefault("records_only", []).append(records_only(out, cfg, args.seconds))
    for workers in args.workers:
      cfg.data.num_workers = workers
      runs.setdefault(f"grain_w{workers}", []).append(measure(grain_batches(cfg), args.seconds))
      if args.torch:
        runs.setdefault(f"torch_w{workers}", []).append(
            measure(torch_batches(out, cfg), args.seconds))
  for k, ms in runs.items():
    result[k] = {m: float(np.median([x[m] for x in ms])) for m in ms[0]}
    result[k]["repeats"] = [round(x["docs_per_core_s"], 1) for x in ms]
  return result


def records_only(directory, cfg, seconds):
  """The per-record work alone (unpack, decode, resize, tokenize), one thread,
  no loader and no packing: the ceiling both pipelines approach."""
  docs = TorchDocs(directory, cfg)
  n = tokens = 0
  c0, t0 = cpu_seconds(), time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    tokens += len(docs[n % len(docs)]["ints"])
    n += 1
  wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
  return {"docs_per_s": n / wall, "tokens_per_s": tokens / wall, "cpu_s_per_s": cpu / wall,
          "docs_per_core_s": n / cpu, "tokens_per_core_s": tokens / cpu}


def parse(argv):
  p = argparse.ArgumentParser(prog="python -m unimm.data.bench", description=__doc__.split("\n")[0])
  p.add_argument("--formats", default=",".join(FORMATS))
  p.add_argument("--workers", default="0", help="comma-separated worker counts, e.g. 0,2")
  p.add_argument("--seconds", type=float, default=5.0, help="measuring time per pipeline and repeat")
  p.add_argument("--repeats", type=int, default=3, help="alternating repeats (medians are reported)")
  p.add_argument("--docs", type=int, default=96, help="sample records written per format")
  p.add_argument("--image-size", type=int, default=256)
  p.add_argument("--patch-size", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=2048)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--no-torch", dest="torch", action="store_false")
  p.add_argument("--json", default=None, help="also write the results here")
  args = p.parse_args(argv)
  args.formats = [f for f in args.formats.split(",") if f]
  unknown = sorted(set(args.formats) - set(FORMATS))
  if unknown:
    p.error(f"unknown format(s) {unknown}: choose from {', '.join(FORMATS)}")
  args.workers = [int(w) for w in args.workers.split(",")]
  if args.torch:
    try:
      import torch  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      print("torch is not installed: the DataLoader peer is left out", file=sys.stderr)
      args.torch = False
  return args


def table(results):
  lines = ["| format | pipeline | docs/s | tokens/s | CPU cores busy | docs per core-s | "
           "tokens per core-s | docs per core-s, each repeat |", "|---|---|---|---|---|---|---|---|"]
  for r in results:
    for k, m in r.items():
      if isinstance(m, dict):
        lines.append(f"| {r['format']} | {k} | {m['docs_per_s']:.1f} | {m['tokens_per_s']:.0f} | "
                     f"{m['cpu_s_per_s']:.2f} | {m['docs_per_core_s']:.1f} | "
                     f"{m['tokens_per_core_s']:.0f} | {m['repeats']} |")
  return "\n".join(lines)


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  _allow_unparsed_absl_flags()
  results = []
  with tempfile.TemporaryDirectory() as workdir:
    for fmt in args.formats:
      results.append(run_format(fmt, args, workdir))
      print(table(results[-1:]).split("\n", 2)[-1], file=sys.stderr, flush=True)
  print(table(results), file=sys.stderr)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  print(json.dumps(results))
  return results


if __name__ == "__main__":
  cli(main)
