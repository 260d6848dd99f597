"""Fault injection: a training run killed and restarted many times ends exactly where an
uninterrupted one does.

    python -m unimm.train.faults --workdir W [--kills 20] [--save_kills 5] [--sigterm 1]
        [--kill_every 0] [--seed 0] -- TRAIN ARGS (as for python -m unimm.train, no --workdir)

First trains W/reference uninterrupted, then W/faulted: each start of `python -m unimm.train`
is killed with SIGKILL at a random moment (`--save_kills` of them the moment a checkpoint
save is in flight, i.e. Orbax's temporary folder appears) and started again in the same
workdir, until `--kills` kills were delivered and a start ran to the end. `--sigterm` more
starts get a SIGTERM a few steps into training instead: each must exit 0 with a checkpoint of
the step it was on (or the next). `--kill_every N` (the soak run) kills instead once per N
steps, N/4 steps past each multiple of N (train with a checkpoint interval that divides N, so
that each start gets further).

Every start logs a digest of each batch it trains on; the starts of the faulted run resume
from their latest complete checkpoint, so their digests name the steps they trained. The
summary (one JSON line, also W/faults.json) says whether the final parameters and optimizer
state are bit-identical to the reference's, whether every step trained on the reference's
batch, and (with evaluation) whether eval.json is the same; exit status 0 only if all hold.
"""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

TMP = ".orbax-checkpoint-tmp"


def complete_steps(workdir):
  """Steps of the complete checkpoints in `workdir` (Orbax renames a save when it is done)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def saves_in_flight(workdir):
  """{(name, inode)} of Orbax's temporary folders in the workdir's checkpoints: a save in
  flight, or the partial save of a killed process (until the next save removes it; a save of
  the same step may reuse its name, not its inode)."""
  directory = os.path.join(workdir, "checkpoints")
  out = set()
  try:
    for entry in os.scandir(directory):
      if TMP in entry.name:
        out.add((entry.name, entry.inode()))
  except FileNotFoundError:
    pass
  return out


class SaveWatch:
  """The saves a start has in flight: temporary folders in its workdir's checkpoints that were
  not there when it started (those are partial saves of killed starts, which it removes)."""

  def __init__(self, workdir):
    self.workdir = workdir
    self.stale = saves_in_flight(workdir)

  def new(self):
    now = saves_in_flight(self.workdir)
    self.stale &= now  # (a stale folder once gone cannot come back)
    return now - self.stale


def batch_lines(path):
  try:
    with open(path) as f:
      return [line.split() for line in f if line.endswith("\n")]
  except FileNotFoundError:
    return []


class Start:
  """One start of the training CLI in `workdir`, logging its batches' digests."""

  def __init__(self, workdir, train_args, index, env):
    self.workdir, self.index = workdir, index
    self.resumed_from = max(complete_steps(workdir), default=0)
    self.partial_at_start = saves_in_flight(workdir)  # a killed save's folder, if any
    self.saves = SaveWatch(workdir)
    self.log = os.path.join(workdir, f"start_{index:03d}.log")
    self.batches = os.path.join(workdir, f"start_{index:03d}.batches")
    self.t0 = time.time()
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "unimm.train.faults", "worker", self.batches, "--",
         "--workdir", workdir, *train_args],
        stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env)

  def trained(self):
    """Batches fetched so far (the step being trained is resumed_from + this)."""
    return len(batch_lines(self.batches))

  def kill(self, sig=signal.SIGKILL):
    self.proc.send_signal(sig)
    self.killed_at = time.time()

  def wait(self, timeout=None):
    code = self.proc.wait(timeout)
    self.seconds = time.time() - self.t0
    return code


def worker(argv):
  """`worker BATCH_LOG -- TRAIN ARGS`: python -m unimm.train, with a digest of every batch
  appended to BATCH_LOG as it is fetched (before its step)."""
  log_path, args = argv[0], argv[2:]
  import numpy as np  # pylint: disable=import-outside-toplevel
  from unimm.data import pipeline  # pylint: disable=import-outside-toplevel
  from unimm.errors import cli  # pylint: disable=import-outside-toplevel
  from unimm.train.__main__ import main  # pylint: disable=import-outside-toplevel
  fetch = pipeline.DataIterator.__next__
  log = open(log_path, "a")

  def logged(self):
    batch = fetch(self)
    digest = hashlib.sha256()
    for k in sorted(batch):
      digest.update(np.ascontiguousarray(batch[k]).tobytes())
    log.write(f"{digest.hexdigest()[:16]}\n")
    log.flush()
    return batch

  pipeline.DataIterator.__next__ = logged
  sys.argv = [sys.argv[0], *args]
  cli(main)


def poll_until(condition, start, period=0.002):
  """Waits until condition() (True) or the start ends (False), tracking its saves meanwhile."""
  while start.proc.poll() is None:
    start.saves.new()
    if condition():
      return True
    time.sleep(period)
  return False


def final_state(workdir):
  """{name: numpy array} of the params and optimizer state of the latest checkpoint."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import warnings  # pylint: disable=import-outside-toplevel
  step = max(complete_steps(workdir))
  with warnings.catch_warnings():  # (no shardings given: restored as saved, on this host)
    warnings.simplefilter("ignore")
    tree = ocp.PyTreeCheckpointer().restore(
        os.path.join(workdir, "checkpoints", str(step), "state"))
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return step, {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


def steps_batches(starts):
  """{step: [digests of every start that trained it]} over `starts`."""
  out = {}
  for s in starts:
    for i, (digest,) in enumerate(batch_lines(s.batches)):
      out.setdefault(s.resumed_from + i + 1, []).append(digest)
  return out


def run_faults(workdir, train_args, kills=20, save_kills=5, sigterm=1, kill_every=0, seed=0,
               log=print, env=None):
  """The fault-injection run; returns its summary dict. env: variables set for the starts."""
  rng = random.Random(seed)
  if kill_every:  # the soak run: only those kills
    kills = save_kills = sigterm = 0
  env = dict(os.environ, **(env or {}))
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(workdir, "jax_cache"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  reference, faulted = os.path.join(workdir, "reference"), os.path.join(workdir, "faulted")
  for d in (reference, faulted):
    if os.path.exists(d) and os.listdir(d):
      raise SystemExit(f"{d} is not empty: give a new --workdir (both runs start from scratch)")
    os.makedirs(d, exist_ok=True)

  ref = Start(reference, train_args, 0, env)
  poll_until(lambda: ref.trained() >= 1, ref, 0.01)
  startup = time.time() - ref.t0  # until the first batch: imports, restore, compiles
  if ref.wait() != 0:
    raise SystemExit(f"the reference run failed: see {ref.log}")
  ref_steps = len(batch_lines(ref.batches))
  step_time = max(ref.seconds - startup, 0.0) / max(ref_steps, 1)
  log(f"reference: {ref.seconds:.1f} s, {ref_steps} steps, {startup:.1f} s to the first batch")
  span = max(1, 2 * ref_steps // (kills + sigterm + 1))  # a random kill comes within this many steps

  starts, delivered, events = [], 0, []
  plan = ["save"] * save_kills + ["random"] * max(kills - save_kills, 0)
  rng.shuffle(plan)
  plan += ["sigterm"] * sigterm
  while True:
    start = Start(faulted, train_args, len(starts), env)
    starts.append(start)
    kind = plan[delivered] if delivered < len(plan) else None
    event = {"start": start.index, "resumed_from": start.resumed_from, "kind": kind}
    if kind == "save":
      if poll_until(start.saves.new, start):
        start.kill()
    elif kind == "random":  # while starting (restoring, compiling) or at a random moment of
      # a random step, 3 steps before the last at the latest (the next kill needs an unfinished run)
      # (not while starting when it found a killed save's folder: it reaches training, so that
      # its report of the partial save is checked; killed while starting, it may have removed
      # the folder already, and no later start would find one to report)
      remaining = ref_steps - start.resumed_from
      if (rng.random() < 0.25 or remaining < 5) and not start.partial_at_start:
        at = rng.uniform(0, startup)  # (the reference's, with cold compiles: at the latest the
        # moment the first batch is fetched)
        reached = poll_until(lambda: time.time() - start.t0 > at or start.trained() >= 1, start,
                             0.005)
      else:
        target, extra = rng.randint(1, max(1, min(span, remaining - 4))), rng.uniform(0, step_time)
        reached = poll_until(lambda: start.trained() >= target, start, 0.005)
        time.sleep(extra)
      if reached:
        start.kill()
    elif kind == "sigterm":
      if poll_until(lambda: start.trained() >= 3, start, 0.01):
        event["trained_at_signal"] = start.trained()
        start.kill(signal.SIGTERM)
    elif kill_every:  # a quarter interval past the next multiple (its checkpoint is complete)
      target = (start.resumed_from // kill_every + 1) * kill_every + kill_every // 4
      if target < ref_steps and poll_until(
          lambda: start.resumed_from + start.trained() > target, start, 0.05):
        start.kill()
        kind = event["kind"] = "every"
    code = start.wait()
    event.update(exit=code, seconds=round(start.seconds, 2),
                 complete_after=max(complete_steps(faulted), default=0))
    if code != 0 and not (kind in ("save", "random", "every") and code == -signal.SIGKILL):
      raise SystemExit(f"start {start.index} ended with status {code}: see {start.log}")
    if kind == "sigterm":
      event["stopped_at"] = event["complete_after"]
      event["seconds_to_exit"] = round(time.time() - start.killed_at, 2)
      if "trained_at_signal" in event:  # the step it was on, or the next: no more
        on = start.resumed_from + event["trained_at_signal"]
        event["within_one_step"] = (code == 0 and on <= event["stopped_at"] <= on + 1
                                    and start.trained() == event["stopped_at"] - start.resumed_from)
    if code == -signal.SIGKILL:
      delivered += 1
      # killed while a save of this start was in flight: it left its temporary folder
      event["killed_during_save"] = bool(start.saves.new())
    elif kind == "sigterm":
      delivered += 1
    if start.partial_at_start:  # did it say so (if it lived long enough to open the checkpoints)?
      with open(start.log) as f:
        text = f.read()
      event["partial_save_reported"] = "partial save" in text
      event["reached_training"] = "\nstep " in "\n" + text
    events.append(event)
    log(json.dumps(event))
    if code == 0 and kind != "sigterm" and max(complete_steps(faulted), default=0) >= ref_steps:
      break
    if len(starts) > 4 * (kills + sigterm) + 10:
      raise SystemExit("too many starts without finishing: see the start logs")

  ref_step, want = final_state(reference)
  got_step, got = final_state(faulted)
  same_state = ref_step == got_step and want.keys() == got.keys() and all(
      want[k].dtype == got[k].dtype and want[k].shape == got[k].shape
      and want[k].tobytes() == got[k].tobytes() for k in want)
  ref_batches = [d for (d,) in batch_lines(ref.batches)]
  by_step = steps_batches(starts)
  same_data = (sorted(by_step) == list(range(1, ref_steps + 1)) and all(
      set(ds) == {ref_batches[s - 1]} for s, ds in by_step.items()))
  summary = {
      "kills": sum(e["exit"] == -signal.SIGKILL for e in events),
      "kills_during_save": sum(e.get("killed_during_save", False) for e in events),
      "sigterms": [{k: e.get(k) for k in ("exit", "stopped_at", "seconds_to_exit",
                                          "within_one_step")}
                   for e in events if e["kind"] == "sigterm"],
      "starts": len(starts), "steps": ref_steps,
      "steps_trained_again": sum(len(ds) - 1 for ds in by_step.values()),
      "starts_after_a_partial_save": sum(e.get("reached_training", False) for e in events),
      "partial_saves_reported": sum(e.get("reached_training", False)
                                    and e.get("partial_save_reported", False) for e in events),
      "reference_s": round(ref.seconds, 1),
      "faulted_s": round(sum(s.seconds for s in starts), 1),
      "same_params_and_optimizer": bool(same_state), "same_data_order": bool(same_data)}
  ref_eval, got_eval = (os.path.join(d, "eval.json") for d in (reference, faulted))
  if os.path.exists(ref_eval):
    with open(ref_eval) as f, open(got_eval) as g:
      a, b = json.load(f), json.load(g)
    summary["same_eval"] = a == b
    summary["eval"] = {k: a[k] for k in a if not isinstance(a[k], (dict, list))}
  summary["ok"] = bool(
      same_state and same_data and summary.get("same_eval", True)
      and all(s["within_one_step"] for s in summary["sigterms"])
      and summary["partial_saves_reported"] == summary["starts_after_a_partial_save"]
      and summary["kills"] >= kills and summary["kills_during_save"] >= save_kills)
  with open(os.path.join(workdir, "faults.json"), "w") as f:
    json.dump({**summary, "events": events}, f, indent=1)
  return summary


def main(argv):
  if argv[:1] == ["worker"]:
    return worker(argv[1:])
  if "--" not in argv:
    raise SystemExit(__doc__)
  ours, train_args = argv[:argv.index("--")], argv[argv.index("--") + 1:]
  opts = {"workdir": None, "kills": 20, "save_kills": 5, "sigterm": 1, "kill_every": 0,
          "seed": 0}
  while ours:
    name = ours.pop(0)[2:]
    if name not in opts or not ours:
      raise SystemExit(f"unknown or incomplete flag --{name}\n{__doc__}")
    opts[name] = ours.pop(0)
  if not opts["workdir"]:
    raise SystemExit("--workdir is required")
  workdir = os.path.abspath(opts.pop("workdir"))
  summary = run_faults(workdir, train_args, **{k: int(v) for k, v in opts.items()})
  print(json.dumps(summary), flush=True)
  sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
  main(sys.argv[1:])
