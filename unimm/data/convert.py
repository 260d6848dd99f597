"""Converts a public dataset to the ArrayRecord shards the training pipeline reads.

    python -m unimm.data.convert --format FORMAT --input PATH --output DIR \\
        [--images DIR] [--name DATASET] [--split train] [--docs-per-shard 10000] \\
        [--max-pixels N] [--caption-column COL] [--image-column COL] [--url-column COL]

FORMAT is one of `unimm.data.formats.FORMATS`. A progress bar goes to stderr;
the last line on stdout is one JSON object

    {"documents": N, "images": N, "skipped": {reason: n, ...}, "repaired": {reason: n, ...}}

which is also written, with the format, input and shard names, to
DIR/info.json. Bad input (unknown format, missing input, tfds without --name,
a non-empty output folder, a --*-column that the parquet lacks) is one `error: ...`
line on stderr and exit status 2.

--caption-column / --image-column / --url-column read parquet variants of image-text
pairs with `--format img2dataset`: LAION metadata with an image-bytes column, Hugging Face
dataset exports (an image column of {bytes, path} structs). The url is kept in each
document's meta; nothing is downloaded.
"""

import argparse
import json
import sys

from tqdm import tqdm

from unimm.data import formats, records
from unimm.errors import UserError, cli


class _Parser(argparse.ArgumentParser):
  """argparse whose errors are UserErrors (one line, exit 2) instead of usage dumps."""

  def error(self, message):
    raise UserError(message)


def _parser():
  p = _Parser(prog="python -m unimm.data.convert", description=__doc__.split("\n")[0])
  p.add_argument("--format", required=True, help=f"one of: {', '.join(formats.FORMATS)}")
  p.add_argument("--input", required=True,
                 help="a file or a folder of shards (tfds: the TFDS data_dir)")
  p.add_argument("--output", required=True, help="an empty or new folder for the shards")
  p.add_argument("--images", default=None,
                 help="image folder for mmc4 / obelics / omnigen (default: images/ beside the "
                      "input; omnigen: the jsonl's folder)")
  p.add_argument("--name", default=None, help="TFDS dataset name (--format tfds)")
  p.add_argument("--split", default="train", help="TFDS split (default: train)")
  p.add_argument("--docs-per-shard", type=int, default=10_000)
  p.add_argument("--max-pixels", type=int, default=records.MAX_PIXELS,
                 help="images with more pixels are skipped as decompression bombs")
  for what, example in (("caption", "TEXT"), ("image", "image"), ("url", "URL")):
    p.add_argument(f"--{what}-column", default=None,
                   help=f"img2dataset: the parquet column of the {what} (e.g. {example}) "
                        "instead of img2dataset's own")
  return p


def main(argv) -> dict:
  """Runs a conversion; returns the summary also printed as the last stdout line."""
  args = _parser().parse_args(argv)
  if args.format not in formats.FORMATS:
    raise UserError(f"unknown --format {args.format!r}: choose one of "
                    f"{', '.join(formats.FORMATS)}")
  if args.format == "tfds" and not args.name:
    raise UserError("--format tfds needs --name DATASET (the TFDS dataset name)")
  if args.docs_per_shard < 1:
    raise UserError(f"--docs-per-shard must be >= 1, got {args.docs_per_shard}")
  if args.max_pixels < 1:
    raise UserError(f"--max-pixels must be >= 1, got {args.max_pixels}")
  stats = records.Stats()
  docs = formats.read(args.format, args.input, stats=stats, images_dir=args.images,
                      name=args.name, split=args.split, max_pixels=args.max_pixels,
                      columns={"caption": args.caption_column, "image": args.image_column,
                               "url": args.url_column})
  writer = records.ShardWriter(args.output, args.docs_per_shard)
  for doc in tqdm(docs, desc=f"convert {args.format}", unit=" docs", file=sys.stderr,
                  dynamic_ncols=True):
    writer.write(doc)
  summary = stats.summary()
  info = dict(summary, format=args.format, input=args.input)
  if args.format == "tfds":
    info.update(name=args.name, split=args.split)
  columns = {f"{k}_column": getattr(args, f"{k}_column") for k in ("caption", "image", "url")}
  info.update({k: v for k, v in columns.items() if v})
  writer.close(info)
  if not summary["documents"]:
    print(f"warning: no documents converted from {args.input} (skipped: {summary['skipped']})",
          file=sys.stderr)
  print(json.dumps(summary), flush=True)
  return summary


if __name__ == "__main__":
  cli(main)
