import os

# 8 fake CPU devices for the sharding tests; must be set before JAX is imported.
# Tests compile far more than they run: XLA:CPU's backend optimisations (LLVM) cost more
# compile time than they save (the suite runs in about 60% of the time without them).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu for ahead-of-time TPU compiles (`make test` installs it beside the venv)
_LIBTPU = os.path.join(os.path.dirname(__file__), "..", ".venv", "libtpu", "libtpu", "libtpu.so")
if os.path.exists(_LIBTPU):
  os.environ.setdefault("TPU_LIBRARY_PATH", os.path.abspath(_LIBTPU))
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # compiles only, no TPU opened: test processes running side by side need not take turns
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizers(tmp_path_factory):
  """Workdirs of a tiny KL-VAE and a tiny quantized tokenizer (FSQ, 4 x 4 x 4 = 64 codes,
  the quickest to compile), 16x16 Shapes images, f=2, a few training steps each."""
  import jax
  from unimm.train import autoencoder as ae
  out = {}
  for kind in ("vae", "vq"):
    c = ae.default_config()
    c.data.update(image_size=16, batch_size=4)
    c.train.update(steps=4, log_every=100, ckpt_every=100)
    c.optim.update(lr=3e-3, warmup_steps=1)
    c.mesh.data = 1
    c.tokenizer.update(kind=kind, quantizer="fsq", block_out_channels=(8, 16), norm_num_groups=4,
                       fsq_levels=(4, 4, 4), eval_images=4)
    out[kind] = str(tmp_path_factory.mktemp(f"tokenizer_{kind}"))
    ae.train(c, out[kind], devices=jax.devices()[:1], log=lambda s: None)
  return out
