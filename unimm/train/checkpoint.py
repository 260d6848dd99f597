"""Checkpoints: Orbax CheckpointManager holding the train state (params,
optimizer state, step) and the Grain iterator state, saved together so that a
resumed run continues with exactly the parameters and data of an
uninterrupted one."""

import grain
import orbax.checkpoint as ocp


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
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    return self.manager.restore(int(step), args=ocp.args.Composite(**items))["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
