"""Weight conversion to and from other libraries' checkpoint layouts.

Only safetensors weights are read (and Orbax checkpoints, by `unimm.train`): a pickled
PyTorch file (.bin, .pt, .ckpt, ...) can run code when it is loaded, so the loaders refuse
it with one line (`not_safetensors`) instead of opening it.
"""

import os

from unimm.errors import UserError

PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def not_safetensors(path, what="checkpoint") -> UserError:
  """The one-line refusal of a weights file that is not safetensors."""
  kind = "a pickled PyTorch file" if str(path).endswith(PICKLED) else "not a .safetensors file"
  return UserError(f"{what} {path} is {kind}: only safetensors weights are read (pickled files can "
                   "run code when loaded); convert it (safetensors.torch.save_file) or download "
                   "the model's .safetensors weights")


def pickled_files(directory) -> list:
  """The pickled weight files (PICKLED extensions) directly in `directory`, sorted."""
  return sorted(n for n in os.listdir(directory) if n.endswith(PICKLED))
