"""unimm: JAX/TPU-native training of unified multimodal (understanding + generation) models."""

import os as _os

__version__ = "0.1.0"

# Nothing is fetched at run time: checkpoints and tokenizers are local folders. The hub
# libraries (transformers, huggingface_hub, datasets), wherever they are imported, stay
# offline; a variable already set (e.g. HF_HUB_OFFLINE=0) is left as it is.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
  _os.environ.setdefault(_name, "1")
del _name
