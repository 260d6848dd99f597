"""The data pipeline and the model side import nothing of each other: what both need (the
batch contract, the image grid) lives in unimm/batch.py and unimm/image_grid.py."""

import ast
import pathlib

import pytest

UNIMM = pathlib.Path(__file__).resolve().parents[1] / "unimm"
FORBIDDEN = {"data": ("unimm.models", "unimm.train", "unimm.objectives"),
             "models": ("unimm.data",), "objectives": ("unimm.data",)}


def imports(source, package):
  """Every module the import statements of `source` (a module of `package`, e.g.
  ("unimm", "data")) name: relative ones resolved, `from a import b` naming a and a.b."""
  out = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = package[:len(package) - node.level + 1] if node.level else ()
      module = ".".join(base + ((node.module,) if node.module else ()))
      out.add(module)
      out.update(f"{module}.{a.name}" for a in node.names)
  return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_data_and_models_do_not_import_each_other(package):
  files = sorted((UNIMM / package).rglob("*.py"))
  assert files
  for path in files:
    found = imports(path.read_text(), path.relative_to(UNIMM.parent).parent.parts)
    bad = sorted(m for m in found if any(m == f or m.startswith(f + ".")
                                         for f in FORBIDDEN[package]))
    assert not bad, f"{path.relative_to(UNIMM.parent)} imports {bad}"


def test_every_form_of_import_is_seen():
  source = ("import unimm.train.step\nfrom unimm import models\nfrom ..objectives import flow\n"
            "def f():\n  from .records import unpack\n")
  assert imports(source, ("unimm", "data")) >= {
      "unimm.train.step", "unimm.models", "unimm.objectives.flow", "unimm.data.records"}
