"""Checkpoints: Orbax CheckpointManager holding the train state (params,
optimizer state, step) and the Grain iterator state, saved together so that a
resumed run continues with exactly the parameters and data of an
uninterrupted one."""

import grain
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
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(data_iter))
    return self.manager.save(int(step), args=args, force=force)

  def restore(self, step, abstract_state, data_iter=None):
    """Restores into `abstract_state`'s shapes and shardings; sets data_iter's state
    (None, e.g. for sampling: the data state is not read)."""
    self.check_shapes(step, abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
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
