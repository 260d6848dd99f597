"""The one exception type users see: a one-line message that says what to fix.

Entry points (`python -m unimm.train`, `python -m unimm.sample`) catch `UserError`
and print `error: <message>` on one line, exiting with status 2, instead of a
traceback from deep inside JAX.
"""


class UserError(ValueError):
  """Bad configuration or input, with a message that says what to change."""


def cli(main):
  """Runs `main(sys.argv[1:])` as an entry point: a UserError becomes one line on stderr, exit 2."""
  import sys
  try:
    main(sys.argv[1:])
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def one_line(e, limit=300):
  """An exception's message on one line (at most `limit` characters), for a UserError."""
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


def read_json(path, fix, what="a JSON object"):
  """The JSON object in file `path` (local or gs://), or a one-line UserError naming it:
  `PATH is not readable JSON (...): FIX`, `PATH holds a JSON list, not WHAT: FIX`. A missing
  file raises FileNotFoundError (the caller says what its absence means)."""
  import json
  from etils import epath
  try:
    value = json.loads(epath.Path(path).read_bytes())
  except FileNotFoundError:
    raise
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is not readable JSON ({type(e).__name__}: {one_line(e)}): "
                    f"{fix}") from None
  if not isinstance(value, dict):
    raise UserError(f"{path} holds a JSON {type(value).__name__}, not {what}: {fix}")
  return value
