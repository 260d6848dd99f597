"""The one exception type users see: a one-line message that says what to fix.

Entry points (`python -m unimm.train`, `python -m unimm.sample`) catch `UserError`
and print `error: <message>` on one line, exiting with status 2, instead of a
traceback from deep inside JAX.
"""


class UserError(ValueError):
  """Bad configuration or input, with a message that says what to change."""
