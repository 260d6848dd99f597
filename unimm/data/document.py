"""The canonical multimodal document every data source emits.

A document is a plain dict (so Grain can move it between processes):

    {
      "task": "t2i" | "caption" | "qa" | "edit" | "story" | ...,
      "segments": [
        {"kind": "text",  "text": str, "loss": bool},          # loss: LM loss on these tokens
        {"kind": "image", "image": np.uint8[H, W, 3], "role": "condition" | "target"},
        ...
      ],
      "meta": {...},   # JSON-able ground truth for evaluation (scene objects, answer, ...)
    }

Segments are in reading order. An image with role "condition" enters the
sequence clean (context, modality CLEAN_IMAGE); an image with role "target" is
noised and trained with the flow loss (modality NOISED_IMAGE), and no later
token ever attends to it.
"""

from unimm.batch import CLEAN_IMAGE, NOISED_IMAGE, TEXT  # noqa: F401 (the batch contract)


def text(s: str, loss: bool = True) -> dict:
  return {"kind": "text", "text": s, "loss": loss}


def image(array, role: str = "condition") -> dict:
  if role not in ("condition", "target"):
    raise ValueError(f"image role must be 'condition' or 'target', got {role!r}")
  return {"kind": "image", "image": array, "role": role}


def document(task: str, segments: list, meta: dict | None = None) -> dict:
  return {"task": task, "segments": list(segments), "meta": dict(meta or {})}
