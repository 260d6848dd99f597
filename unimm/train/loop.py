"""The training loop: data -> jitted step -> logs and checkpoints.

A workdir holds everything a run writes: `checkpoints/` (Orbax; params,
optimizer state, step and the Grain iterator state), `tb/` (TensorBoard event
files), `metrics.jsonl`, and after evaluation `eval.json` and `samples.png`.
Starting again in the same workdir continues from its latest checkpoint.
A workdir may be local or on a bucket (gs://...: every file goes through etils.epath).
"""

import json
import os
import signal
import sys
import threading
import time

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from unimm.data.pipeline import make_iterator, validate_batch
from unimm.data.tokenizer import load_tokenizer
from unimm.errors import UserError
from unimm.parallel.sharding import make_mesh
from unimm.train.checkpoint import Checkpointer
from unimm.train.step import Trainer


def check_batch_fits_mesh(cfg, mesh):
  n = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
  if cfg.data.batch_size % n:
    raise UserError(
        f"data.batch_size={cfg.data.batch_size} does not divide over the {n} batch shards of the "
        f"mesh (data x fsdp x expert = {mesh.shape['data']} x {mesh.shape['fsdp']} x "
        f"{mesh.shape['expert']}): use a multiple of {n}")


def check_vocab(cfg, tokenizer):
  """model.vocab_size (when set) must cover the text tokenizer's ids, special tokens included;
  a pretrained table that is too small (model.init_from) grows, its new rows initialised."""
  rows, need = cfg.model.vocab_size, tokenizer.vocab_size
  if not rows or rows >= need:
    return
  if not cfg.model.init_from:
    raise UserError(f"model.vocab_size={rows} is smaller than the {need} ids of tokenizer "
                    f"{cfg.data.tokenizer!r}: set model.vocab_size >= {need} or 0")
  cfg.model.vocab_size = tokenizer.model_vocab_size()
  print(f"model.vocab_size: {rows} rows of {cfg.model.init_from} grow to {cfg.model.vocab_size} "
        f"for the {need} ids of tokenizer {cfg.data.tokenizer!r}", flush=True)


class Run:
  """A training run in a workdir: mesh, tokenizer, trainer, data and checkpoints."""

  def __init__(self, cfg, workdir, devices=None, with_data=True):
    """with_data=False (sampling): no data pipeline is built and its state is not restored."""
    if cfg.model.init_from:  # the checkpoint's architecture fields replace the config's
      if cfg.model.family == "mmdit":  # a diffusers transformer (or a BFL FLUX file)
        from unimm.interop.diffusers_mmdit import apply_model_fields
        if os.path.isdir(cfg.model.init_from):
          apply_model_fields(cfg, cfg.model.init_from)
      else:
        from unimm.interop.hf_llm import apply_model_fields
        apply_model_fields(cfg, cfg.model.init_from)
    self.cfg, self.workdir = cfg, resolve_workdir(workdir)
    self.mesh = make_mesh(cfg.mesh, devices)
    check_batch_fits_mesh(cfg, self.mesh)
    self.tokenizer = load_tokenizer(cfg.data.tokenizer)
    check_vocab(cfg, self.tokenizer)
    self.data = make_iterator(cfg, process_index=jax.process_index(),  # (bad sources fail fast)
                              process_count=jax.process_count()) if with_data else None
    self.trainer = Trainer(cfg, self.mesh, self.tokenizer.model_vocab_size())
    self.patcher = self.trainer.image_tokenizer
    self.ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints"), cfg.train.keep_ckpts,
                             log=_print if jax.process_index() == 0 else None)
    self.stopped, self.preempted = None, False
    self.rng = jax.random.key(cfg.seed)

  def restore_or_init(self, require=False):
    step = self.ckpt.latest_step()
    if step is None:
      if require:
        raise UserError(f"--resume: no checkpoint in {self.workdir}/checkpoints")
      state = self.trainer.init()
      if self.cfg.model.init_from:
        state = self.trainer.from_pretrained(state, self.cfg.model.init_from)
      if self.trainer.mmdit and self.cfg.model.condition.encoder in ("llm", "metaquery"):
        state = self.trainer.with_llm(state)
      return state
    return self.ckpt.restore(step, self.trainer.abstract_state, self.data)

  def next_batch(self):
    batch = next(self.data)
    validate_batch(batch, seq_len=self.cfg.data.seq_len, patch_dim=self.patcher.patch_dim,
                   batch_size=self.cfg.data.batch_size // jax.process_count(),
                   pixel_dim=self.patcher.pixel_dim)
    return self.trainer.device_batch(batch)

  def train(self, state, steps=None, log=print):
    """Runs until `steps` (default train.steps), train.time_limit_s or a preemption notice
    (SIGTERM / SIGINT; in a multi-process run JAX's preemption sync point), checkpoints, and
    returns the state; `self.stopped` says why it stopped early (None: it reached `steps`),
    `self.preempted` whether a signal stopped it.
    Steps whose loss is not finite change nothing (`Trainer._step`) and are counted
    (`nonfinite_steps` in the metrics); train.max_bad_steps of them in a row stop the run."""
    cfg = self.cfg.train
    steps = cfg.steps if steps is None else steps
    start = int(state["step"])
    self.stopped, self.preempted = None, False
    if start >= steps:
      return state
    lead = jax.process_index() == 0  # the one process that logs
    writer = summary_writer(os.path.join(self.workdir, "tb"))
    metrics_file = MetricsLog(os.path.join(self.workdir, "metrics.jsonl")) if lead else None
    guard = NonFiniteGuard(int(cfg.max_bad_steps), self)
    t0 = time.time()
    step = start
    bar = tqdm(total=steps, initial=start, desc="train", disable=not lead, mininterval=5.0)
    try:
      with Preemption() as preempted:
        while step < steps:
          batch = self.next_batch()
          state, metrics = self.trainer.step(state, batch, self.rng)
          step += 1
          guard.after(step, metrics["nonfinite"], self.data.origins)
          bar.update(1)
          out_of_time = cfg.time_limit_s > 0 and time.time() - t0 > cfg.time_limit_s
          if jax.process_count() > 1:  # process 0 decides, at log steps (no sync on the others)
            out_of_time = step % cfg.log_every == 0 and agreed(out_of_time)
          if out_of_time:
            self.stopped = f"train.time_limit_s={cfg.time_limit_s:g} reached"
          signalled = preempted(step)
          if signalled:
            self.stopped, self.preempted = signalled, True
          if step % cfg.log_every == 0 or step == steps or self.stopped:
            guard.check()
            m = {k: float(v) for k, v in jax.device_get(metrics).items()
                 if np.ndim(v) == 0 and k != "nonfinite"}
            m.update(step=step, steps_per_s=(step - start) / (time.time() - t0),
                     nonfinite_steps=guard.since_log())
            m.update(self.data.metrics(all_processes(self.data.counts)))
            if lead:
              bar.set_postfix({k: f"{m[k]:.3f}" for k in ("loss", "ce", "flow", "ce_image",
                                                          "moe_max_load") if k in m})
              metrics_file.append(m)
              for k, v in m.items():
                writer.add_scalar(f"train/{k}", v, step)
          if step % cfg.ckpt_every == 0 or step == steps or self.stopped:
            self.ckpt.save(step, state, self.data, force=True)
          if self.stopped:
            if lead:
              log(f"stopping at step {step}: {self.stopped}; checkpoint {step} saved")
            break
    finally:
      bar.close()
      if lead:
        writer.close()
      self.ckpt.wait()
    return state


class NonFiniteGuard:
  """Counts the train steps whose loss or gradient norm was not finite (the step left the
  parameters as they were) and stops the run after `max_bad` in a row. A step's flag is read
  after the next step is dispatched, so the device never waits on the host."""

  def __init__(self, max_bad, run):
    self.max_bad, self.run = max_bad, run
    self.pending = None
    self.in_a_row = self.logged = self.total = 0

  def after(self, step, flag, origins):
    """Step `step` was dispatched with its nonfinite flag: checks the one before it."""
    self.check()
    self.pending = (step, flag, list(origins))

  def check(self):
    if self.pending is None:
      return
    (step, flag, origins), self.pending = self.pending, None
    if not int(flag):
      self.in_a_row = 0
      return
    self.in_a_row += 1
    self.total += 1
    if self.max_bad > 0 and self.in_a_row >= self.max_bad:
      latest = self.run.ckpt.latest_step()
      where = (f"the last good checkpoint is {self.run.ckpt.directory}/{latest}"
               if latest is not None else "no checkpoint was written yet")
      rows = "" if jax.process_count() == 1 else f" (process {jax.process_index()}'s rows)"
      raise UserError(
          f"step {step}: loss or gradient norm not finite for {self.in_a_row} steps in a row "
          f"(train.max_bad_steps={self.max_bad}; those steps changed nothing); the batch of step "
          f"{step} holds {self.run.data.describe_origins(origins)}{rows}; {where}")

  def since_log(self):
    """Non-finite steps since the previous call."""
    n, self.logged = self.total - self.logged, self.total
    return n


class Preemption:
  """`with Preemption() as preempted:` ... `preempted(step)` gives the reason to stop now (or
  None): a SIGTERM or SIGINT received since entering (a second SIGINT interrupts at once) or,
  in a multi-process run, JAX's preemption sync point (its distributed service turns a
  SIGTERM or a TPU maintenance notice in any process into the same step in all of them)."""

  def __enter__(self):
    self.received, self.previous = None, {}
    self.synced = jax.process_count() > 1 and _preemption_service()
    if threading.current_thread() is threading.main_thread():
      signals = [signal.SIGINT] if self.synced else [signal.SIGTERM, signal.SIGINT]
      for sig in signals:
        self.previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.received and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name

  def __call__(self, step):
    if self.synced:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        return "preemption notice (JAX preemption sync point)"
    return self.received and f"{self.received} received"

  def __exit__(self, *exc):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)


def _preemption_service():
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return distributed.global_state.preemption_sync_manager is not None


def routing_report(run, state, batches=16):
  """Expert load of each MoE block over `batches` training batches (the routing at the end
  of training): per block the max/mean of its experts' shares of the assignments."""
  trainer = run.trainer
  loss = jax.jit(trainer._encoding_images(trainer._loss))
  loads = []
  for i in range(batches):
    _, m = loss(state["params"], run.next_batch(), jax.random.key(i), trainer.tokenizer_variables)
    loads.append(np.asarray(jax.device_get(m["moe_block_load"])))
  load = np.mean(loads, axis=0)  # [blocks, E]
  per_block = load.max(axis=1) * load.shape[1]
  return {"batches": batches, "max_over_mean_per_block": [round(float(x), 4) for x in per_block],
          "max_over_mean": round(float(per_block.max()), 4),
          "load_per_block": [[round(float(x), 4) for x in row] for row in load]}


def _print(line):
  print(line, flush=True)


def resolve_workdir(workdir):
  """A local workdir made absolute; a bucket's (gs://...) as given."""
  workdir = os.fspath(workdir)
  if "://" in workdir:
    return workdir
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir {workdir} is a file, not a folder: give a folder (a new one "
                    "starts a run, an existing one continues it)")
  return os.path.abspath(workdir)


class MetricsLog:
  """metrics.jsonl: one JSON line per logged step, appended (rewritten whole on a bucket,
  where files cannot be appended to)."""

  def __init__(self, path):
    self.path, self.remote = epath.Path(path), "://" in path
    self.text = self.path.read_text() if self.remote and self.path.exists() else ""

  def append(self, metrics):
    line = json.dumps(metrics) + "\n"
    if self.remote:
      self.text += line
      self.path.write_text(self.text)
    else:
      with open(self.path, "a") as f:
        f.write(line)


def agreed(flag):
  """Process 0's `flag` in every process (a decision that must not differ between them)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def all_processes(counts):
  """`counts` summed over the processes of the run (every process calls it at the same step)."""
  if jax.process_count() == 1:
    return counts
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(counts)).sum(0)


def summary_writer(path):
  """A TensorBoard writer on process 0 (None elsewhere)."""
  if jax.process_index() != 0:
    return None
  blocked = "torch" not in sys.modules
  if blocked:  # tensorboardX imports torch when it is installed (2 s a start); we log floats
    sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    if blocked:
      del sys.modules["torch"]
  return SummaryWriter(path)
