import os

# 8 fake CPU devices for the sharding tests; must be set before JAX is imported.
# Tests compile far more than they run: XLA:CPU's backend optimisations (LLVM) cost more
# compile time than they save (the suite runs in about 60% of the time without them), and so
# do its fusion emitters (tests/helpers.py).
from tests.helpers import QUICK_XLA_FLAGS  # noqa: E402 (imports no JAX)

os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {QUICK_XLA_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the run: the xdist controller imports this file first and
# its workers, and the subprocesses tests start, inherit the variable, so a program compiled by
# one of them (the same tiny config trained, resumed and sampled by several CLI runs) is
# compiled once. A fresh directory a run: nothing carries over between runs.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="unimm_jax_cache_")
# libtpu for ahead-of-time TPU compiles (`make test` installs it beside the venv)
_LIBTPU = os.path.join(os.path.dirname(__file__), "..", ".venv", "libtpu", "libtpu", "libtpu.so")
if os.path.exists(_LIBTPU):
  os.environ.setdefault("TPU_LIBRARY_PATH", os.path.abspath(_LIBTPU))
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # compiles only, no TPU opened: test processes running side by side need not take turns
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


import pytest  # noqa: E402


def pytest_unconfigure(config):  # pylint: disable=unused-argument
  """The process that made the compilation cache (the controller) removes it at the end."""
  if _OWN_CACHE:
    import shutil
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(items):
  """The slow tests first, so that parallel workers (`make test` runs pytest-xdist) do not end
  on one of them while the others idle."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _shared_dir(tmp_path_factory, name):
  """(directory, lock) shared by the xdist workers of this run (the process's own without
  xdist): a session fixture built there once serves every worker."""
  from filelock import FileLock
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  return root / name, FileLock(str(root / f"{name}.lock"))


@pytest.fixture(scope="session")
def tiny_tokenizers(tmp_path_factory):
  """Workdirs of a tiny KL-VAE and a tiny quantized tokenizer (FSQ, 4 x 4 x 4 = 64 codes,
  the quickest to compile), 16x16 Shapes images, f=2, a few training steps each; trained
  once per run, by the first worker that asks."""
  import jax
  from unimm.train import autoencoder as ae
  root, lock = _shared_dir(tmp_path_factory, "tiny_tokenizers")
  out = {kind: str(root / kind) for kind in ("vae", "vq")}
  with lock:
    if (root / "done").exists():
      return out
    for kind in ("vae", "vq"):
      c = ae.default_config()
      c.data.update(image_size=16, batch_size=4)
      c.train.update(steps=4, log_every=100, ckpt_every=100)
      c.optim.update(lr=3e-3, warmup_steps=1)
      c.mesh.data = 1
      c.tokenizer.update(kind=kind, quantizer="fsq", block_out_channels=(8, 16), norm_num_groups=4,
                         fsq_levels=(4, 4, 4), eval_images=4)
      from tests.helpers import quick_compiles
      with quick_compiles():
        ae.train(c, out[kind], devices=jax.devices()[:1], log=lambda s: None)
    (root / "done").touch()
  return out
