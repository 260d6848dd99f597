"""Checkpoints: Orbax CheckpointManager holding the train state (params,
optimizer state, step) and the data iterators' state, saved together so that a
resumed run continues with exactly the parameters and data of an
uninterrupted one.

The train state is sharded over the mesh and restores onto any mesh (Orbax
reshards). The data state is one JSON file per process holding the states of
its data shards (`unimm.data.pipeline.data_shards`); a restore reads every
process's file, so a run resumes on any process count that divides the shards.
"""

import contextlib
import dataclasses
import errno
import json
import os
import re

import jax
import orbax.checkpoint as ocp
from etils import epath

from unimm.errors import UserError, one_line


class Checkpointer:
  """Saves are asynchronous (Orbax writes in the background, at most one save in flight: a
  save first waits for the previous one). A save is written to a temporary folder and renamed
  when complete, so a process killed at any moment leaves the last complete checkpoint
  restorable; the partial folder of a save cut short is ignored (one line says so) and
  removed."""

  def __init__(self, directory, keep=2, log=None):
    self.directory = os.fspath(directory)
    partial = partial_saves(self.directory)  # (before the manager starts removing them)
    self.manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True))
    if partial and log is not None:
      latest = self.latest_step()
      log(f"checkpoints: ignoring {len(partial)} partial save(s) in {self.directory} (cut short "
          f"by a crash or a kill: {', '.join(partial)}); "
          + (f"the latest complete checkpoint is {latest}" if latest is not None
             else "there is no complete checkpoint yet"))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, data_iter, force=False):
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=DataSave(data_iter))
    with self._save_errors(step):
      return self.manager.save(int(step), args=args, force=force)

  def restore(self, step, abstract_state, data_iter=None):
    """Restores into `abstract_state`'s shapes and shardings (any mesh: Orbax reshards); sets
    data_iter's state (None, e.g. for sampling: the data state is not read)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = DataRestore(data_iter)
    with self._read_errors(step):
      self.check_shapes(step, abstract_state)
      return self.manager.restore(int(step), args=ocp.args.Composite(**items))["state"]

  @contextlib.contextmanager
  def _read_errors(self, step):
    """A checkpoint whose files cannot be read (damaged: a save cut short is never restored)
    -> one line naming it (Orbax raises bare Exceptions for unreadable arrays)."""
    try:
      yield
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"checkpoint {step} in {self.directory} cannot be restored "
                      f"({type(e).__name__}: {one_line(e, 200)}); if it is damaged, move "
                      f"{self.directory}/{step} away to resume from the checkpoint before "
                      "it") from e

  def check_shapes(self, step, abstract_state):
    """One line naming the first array whose shape differs between checkpoint `step` and
    `abstract_state` (or that only one of them has): a checkpoint of another model config."""
    saved = _shapes(ocp.StandardCheckpointHandler().metadata(
        epath.Path(self.manager.directory) / str(int(step)) / "state"))
    wanted = _shapes(abstract_state)
    where = f"checkpoint {step} in {self.manager.directory}"
    for key, shape in sorted(wanted.items(), key=lambda kv: not kv[0].startswith("params/")):
      if key not in saved:
        raise UserError(f"{where} has no {key} {shape}: it was written by another model config "
                        "(restore with that config, or train in a new workdir)")
      if tuple(saved[key]) != tuple(shape):
        raise UserError(f"{where} does not fit this config: {key} is {tuple(saved[key])} there "
                        f"and {tuple(shape)} here (restore with the config that wrote it, or "
                        "train in a new workdir)")
    extra = sorted(set(saved) - set(wanted))
    if extra:
      raise UserError(f"{where} holds {extra[0]} {tuple(saved[extra[0]])}, which this config does "
                      "not have: it was written by another model config")

  def wait(self):
    with self._save_errors(None):
      self.manager.wait_until_finished()

  @contextlib.contextmanager
  def _save_errors(self, step):
    """A save that fails (a full disk, a lost bucket) -> one line; the previous checkpoint
    stays (Orbax deletes old ones only after a save completes)."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, UserError) or not (isinstance(e, OSError) or _disk_error(e)):
        raise
      what = "no space left on device" if _disk_error(e, errno.ENOSPC) else one_line(e)
      latest = self.latest_step()
      raise UserError(
          f"saving a checkpoint{'' if step is None else f' at step {step}'} in {self.directory} "
          f"failed: {what}; the last complete checkpoint "
          + (f"({latest}) is kept" if latest is not None else "does not exist (none was written)")
          + ": free space and run again to resume") from e

  def close(self):
    self.manager.close()


def partial_saves(directory):
  """Names of the unfinished saves (Orbax's temporary folders) in `directory`."""
  path = epath.Path(directory)
  if not path.exists():
    return []
  return sorted(p.name for p in path.iterdir() if ".orbax-checkpoint-tmp" in p.name)


def _disk_error(e, code=None):
  """True when `e` or an exception it was raised from is an OSError (of errno `code`), or says
  so in its text (TensorStore wraps them)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and (code is None or e.errno == code):
      return True
    if "No space left on device" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def _shapes(tree):
  """{'params/blocks/0/attn/wq': shape} for a state tree or its checkpoint metadata."""
  def name(path):
    keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    return "/".join(k for k in keys if k != "value")
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {name(p): tuple(x.shape) for p, x in flat}


_PROCESS_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")


class DataStateHandler(ocp.CheckpointHandler):
  """The data iterators' state in Orbax: each process writes `process_I-of-P.json` (its data
  shards' states, `DataIterator.get_state`); a restore merges all files, then each process
  takes its shards (`DataIterator.set_state`)."""

  def save(self, directory, args):
    state = json.dumps(args.item.get_state(), indent=1)
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    (epath.Path(directory) / name).write_text(state)

  def restore(self, directory, args):
    item = args.item
    item.set_state(merged_data_state(epath.Path(directory)))
    item.start_prefetch()
    return item

  def metadata(self, directory):
    return None

  def finalize(self, directory):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  item: object


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  item: object


def merged_data_state(directory):
  """The union of the data shard states of all processes' files in `directory`. A file of
  an older unimm (Grain's handler: one stream per process) is shard I of P."""
  files = {}
  for path in directory.iterdir():
    m = _PROCESS_FILE.search(path.name)
    if m:
      files[int(m.group(1)), int(m.group(2))] = json.loads(path.read_text())
  counts = {p for _, p in files}
  if not files or len(counts) != 1 or len(files) != next(iter(counts)):
    raise UserError(f"the data state in {directory} is incomplete: it holds "
                    f"{sorted(p for p, _ in files)} of the writing processes' files "
                    "(a save cut short?)")
  merged = None
  for (index, count), state in sorted(files.items()):
    if "stream" in state:
      state = dict(state, shards=count,
                   shard_states={str(index): {"stream": state.pop("stream"),
                                              "counts": state.pop("counts")}})
    if merged is None:
      merged = dict(state, shard_states={})
    merged["shard_states"].update(state["shard_states"])
  return merged
