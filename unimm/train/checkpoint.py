"""Checkpoints: Orbax CheckpointManager holding the train state (params,
optimizer state, step) and the data iterators' state, saved together so that a
resumed run continues with exactly the parameters and data of an
uninterrupted one.

The train state is sharded over the mesh and restores onto any mesh (Orbax
reshards). The data state is one JSON file per process holding the states of
its data shards (`unimm.data.pipeline.data_shards`); a restore reads every
process's file, so a run resumes on any process count that divides the shards.
"""

import dataclasses
import json
import re

import jax
import orbax.checkpoint as ocp
from etils import epath

from unimm.errors import UserError


class Checkpointer:

  def __init__(self, directory, keep=2):
    self.manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, data_iter, force=False):
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=DataSave(data_iter))
    return self.manager.save(int(step), args=args, force=force)

  def restore(self, step, abstract_state, data_iter=None):
    """Restores into `abstract_state`'s shapes and shardings; sets data_iter's state
    (None, e.g. for sampling: the data state is not read)."""
    self.check_shapes(step, abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = DataRestore(data_iter)
    return self.manager.restore(int(step), args=ocp.args.Composite(**items))["state"]

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
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


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
