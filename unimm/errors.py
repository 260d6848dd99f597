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
