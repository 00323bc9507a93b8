"""Worker side of the gateway's image hand-off: the worker takes the gateway's pixels as they are.

The Rust gateway decodes, resizes, normalizes and patchifies every image (rust_gateway/src/preprocess)
and sends the worker's ``/generate``:

* ``input_ids``: the prompt with each image already expanded to start-of-image + N image tokens +
  end-of-image (N = grid_h * grid_w / 4);
* ``image_data``: a one-item list (SGLang accepts exactly one ``processor_output`` item per modality)::

      {"format": "processor_output",
       "modality": "IMAGE",
       "m3serve_pixels": "v1",
       "pixel_values": {"dtype": "float32" | "bfloat16",
                        "shape": [rows, 1176],
                        "data": "<base64 of the little-endian rows>"},
       "image_grid_thw": [[1, grid_h, grid_w], ...]}   # one per image, in prompt order

  ``rows`` = sum of grid_h * grid_w; each row is one 14x14 patch as [channel][temporal 2][14][14], in
  the HF M3 processor's 2x2-merge-block order.

SGLang 0.5.23 already passes ``processor_output`` items through untouched (no decode, no resize, no HF
image processor: ``BaseMultimodalProcessor.load_mm_data``'s preprocessed fast path, then
``collect_mm_items_from_processor_output``), but JSON cannot carry tensors. The BEFORE hook installed
here on ``MiniMaxM3VLProcessor.process_mm_data_async`` turns the item into tensors (and checks that
shape, grids and the prompt's placeholder count agree, with a clear error otherwise) before SGLang
sees it. A second, observe-only hook counts calls of the HF image processor (``hf_image_processor_ran``
in the plugin marker), so tests can show the worker skipped its own image processing.
"""

from __future__ import annotations

import base64
from typing import Any

from . import marker

WIRE_KEY = "m3serve_pixels"
WIRE_VERSION = "v1"
PROCESS_TARGET = "sglang.srt.multimodal.processors.minimax_m3_vl.MiniMaxM3VLProcessor.process_mm_data_async"
HF_IMAGE_TARGET = (
    "transformers.models.minimax_m3_vl.image_processing_minimax_m3_vl.MiniMaxM3VLImageProcessor.preprocess"
)
_ITEMSIZE = {"float32": 4, "bfloat16": 2}

__all__ = ["HandoffError", "decode_item", "install", "is_handoff_item", "convert_image_data"]


class HandoffError(ValueError):
    """A malformed hand-off item (SGLang answers ValueError from preprocessing with HTTP 400)."""


def is_handoff_item(item: Any) -> bool:
    return isinstance(item, dict) and item.get(WIRE_KEY) is not None


def decode_item(item: dict, image_token_id: int | None = None, input_ids: list[int] | None = None,
                merge_size: int = 2) -> dict:
    """The wire item -> SGLang's ``processor_output`` dict with ``pixel_values`` and ``image_grid_thw``
    tensors. With ``input_ids`` and ``image_token_id``, also checks the placeholder count."""
    import torch

    if item.get(WIRE_KEY) != WIRE_VERSION:
        raise HandoffError(f"unknown {WIRE_KEY} version {item.get(WIRE_KEY)!r} (this worker reads {WIRE_VERSION!r})")
    pv = item.get("pixel_values")
    if not isinstance(pv, dict):
        raise HandoffError("pixel_values must be an object with dtype, shape and data")
    dtype = pv.get("dtype")
    if dtype not in _ITEMSIZE:
        raise HandoffError(f"pixel_values dtype must be float32 or bfloat16, got {dtype!r}")
    shape = pv.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(x, int) and x > 0 for x in shape)):
        raise HandoffError(f"pixel_values shape must be [rows, cols] of positive ints, got {shape!r}")
    try:
        raw = base64.b64decode(pv.get("data", ""), validate=True)
    except (ValueError, TypeError) as e:
        raise HandoffError(f"pixel_values data is not valid base64: {e}") from e
    rows, cols = shape
    if len(raw) != rows * cols * _ITEMSIZE[dtype]:
        raise HandoffError(f"pixel_values holds {len(raw)} bytes, shape {shape} of {dtype} needs {rows * cols * _ITEMSIZE[dtype]}")
    grids = item.get("image_grid_thw")
    if not (isinstance(grids, list) and grids and all(
        isinstance(g, list) and len(g) == 3 and all(isinstance(x, int) and x > 0 for x in g) for g in grids
    )):
        raise HandoffError(f"image_grid_thw must be a non-empty list of [t, h, w] positive ints, got {grids!r}")
    patches = sum(t * h * w for t, h, w in grids)
    if patches != rows:
        raise HandoffError(f"image_grid_thw describes {patches} patches but pixel_values has {rows} rows")
    if image_token_id is not None and input_ids is not None:
        want = patches // (merge_size * merge_size)
        have = sum(1 for t in input_ids if t == image_token_id)
        if have != want:
            raise HandoffError(f"the prompt has {have} image placeholder tokens, the images need {want}")
    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    pixels = torch.frombuffer(bytearray(raw), dtype=torch_dtype).reshape(rows, cols)
    out = {k: v for k, v in item.items() if k not in (WIRE_KEY, "pixel_values", "image_grid_thw")}
    out.update(
        format="processor_output",
        modality="IMAGE",
        pixel_values=pixels,
        image_grid_thw=torch.tensor(grids, dtype=torch.long),
    )
    return out


def convert_image_data(image_data: Any, image_token_id: int | None = None, input_ids: Any = None,
                       merge_size: int = 2) -> Any:
    """``image_data`` of a request with every hand-off item decoded (other items untouched)."""
    if not isinstance(image_data, list) or not any(is_handoff_item(i) for i in image_data):
        return image_data
    ids = input_ids if isinstance(input_ids, list) else None
    converted = [
        decode_item(i, image_token_id, ids, merge_size) if is_handoff_item(i) else i for i in image_data
    ]
    marker.record("mm_handoff_items", "image hand-off: using the gateway's preprocessed pixels")
    return converted


def _before_process_mm_data(self, *args, **kwargs):
    """BEFORE hook on MiniMaxM3VLProcessor.process_mm_data_async(image_data, audio_data, input_text, ...)."""
    args = list(args)
    image_data = kwargs["image_data"] if "image_data" in kwargs else (args[0] if args else None)
    input_ids = kwargs.get("input_text", args[2] if len(args) > 2 else None)
    merge = getattr(getattr(getattr(self, "_processor", None), "image_processor", None), "merge_size", 2)
    new = convert_image_data(image_data, getattr(self, "IM_TOKEN_ID", None), input_ids, merge)
    if new is image_data:
        return None
    if "image_data" in kwargs:
        kwargs["image_data"] = new
    else:
        args[0] = new
    return (self, *args), kwargs


def _count_hf_image_processing(original, *args, **kwargs):
    marker.record("hf_image_processor_ran")
    return original(*args, **kwargs)


def install(registry) -> None:
    """Register the hooks with SGLang's HookRegistry (called by ``m3serve.plugin.register``)."""
    from sglang.srt.plugins.hook_registry import HookType

    registry.register(PROCESS_TARGET, _before_process_mm_data, HookType.BEFORE)
    registry.register(HF_IMAGE_TARGET, _count_hf_image_processing, HookType.AROUND)
