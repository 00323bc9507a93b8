"""Worker side of the gateway's image hand-off: the worker takes the gateway's pixels as they are.

The Rust gateway decodes, resizes, normalizes and patchifies every image (rust_gateway/src/preprocess)
and sends the worker's ``/generate``:

* ``input_ids``: the prompt with each image already expanded to start-of-image + N image tokens +
  end-of-image (N = grid_h * grid_w / 4);
* ``image_data``: one string per image, in prompt order, a data URL of our own media type::

      data:application/x-m3serve-pixels;v=1;dtype=float32;grid=1x36x64;base64,<rows, little-endian>

  ``grid`` is the image's ``image_grid_thw`` (t x grid_h x grid_w); the payload holds t*grid_h*grid_w
  rows of 1176 values (``dtype`` float32 or bfloat16): one 14x14 patch per row as
  [channel][temporal 2][14][14], in the HF M3 processor's 2x2-merge-block order.

Strings, because SGLang 0.5.23's ``/generate`` contract gate admits image items only as strings or
``{url, ...}`` objects (a ``processor_output`` dict is refused), and JSON cannot carry tensors anyway.
The BEFORE hook installed here on ``MiniMaxM3VLProcessor.process_mm_data_async`` turns the strings into
the single ``processor_output`` item (tensors) SGLang accepts per modality, after checking that sizes,
grids and the prompt's placeholder count agree (a clear ``ValueError``, answered with HTTP 400,
otherwise). SGLang then takes the item through its preprocessed fast path (``load_mm_data`` returns it
untouched, ``collect_mm_items_from_processor_output`` reads it): no decode, no resize, no HF image
processor. A second, observe-only hook counts calls of the HF image processor
(``hf_image_processor_ran`` in the plugin marker), so tests can show the worker skipped them.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from . import marker

MEDIA_TYPE = "application/x-m3serve-pixels"
PREFIX = f"data:{MEDIA_TYPE};"
WIRE_VERSION = "1"
ROW_LEN = 3 * 2 * 14 * 14
PROCESS_TARGET = "sglang.srt.multimodal.processors.minimax_m3_vl.MiniMaxM3VLProcessor.process_mm_data_async"
HF_IMAGE_TARGET = (
    "transformers.models.minimax_m3_vl.image_processing_minimax_m3_vl.MiniMaxM3VLImageProcessor.preprocess"
)
_ITEMSIZE = {"float32": 4, "bfloat16": 2}

__all__ = ["HandoffError", "convert_image_data", "decode_url", "install", "is_handoff_item"]


class HandoffError(ValueError):
    """A malformed hand-off item (SGLang answers ValueError from preprocessing with HTTP 400)."""


def is_handoff_item(item: Any) -> bool:
    return isinstance(item, str) and item.startswith(PREFIX)


def decode_url(url: str):
    """One hand-off data URL -> (pixel rows tensor [rows, 1176], [t, h, w])."""
    import torch

    if not is_handoff_item(url):
        raise HandoffError(f"not an {MEDIA_TYPE} data URL")
    meta, sep, payload = url[len("data:"):].partition(",")
    if not sep:
        raise HandoffError("hand-off data URL has no payload")
    params = dict(p.split("=", 1) for p in meta.split(";")[1:] if "=" in p)
    if not meta.endswith(";base64"):
        raise HandoffError("hand-off data URL must be base64")
    if params.get("v") != WIRE_VERSION:
        raise HandoffError(f"unknown hand-off version {params.get('v')!r} (this worker reads {WIRE_VERSION!r})")
    dtype = params.get("dtype")
    if dtype not in _ITEMSIZE:
        raise HandoffError(f"hand-off dtype must be float32 or bfloat16, got {dtype!r}")
    try:
        grid = [int(x) for x in params.get("grid", "").split("x")]
    except ValueError:
        grid = []
    if len(grid) != 3 or min(grid) <= 0:
        raise HandoffError(f"hand-off grid must be TxHxW positive integers, got {params.get('grid')!r}")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise HandoffError(f"hand-off pixels are not valid base64: {e}") from e
    rows = grid[0] * grid[1] * grid[2]
    need = rows * ROW_LEN * _ITEMSIZE[dtype]
    if len(raw) != need:
        raise HandoffError(f"hand-off pixels hold {len(raw)} bytes; grid {params['grid']} of {dtype} needs {need}")
    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    return torch.frombuffer(bytearray(raw), dtype=torch_dtype).reshape(rows, ROW_LEN), grid


def convert_image_data(image_data: Any, image_token_id: int | None = None, input_ids: Any = None,
                       merge_size: int = 2) -> Any:
    """``image_data`` with the hand-off strings replaced by one ``processor_output`` item; other
    requests are returned untouched. With ``input_ids`` and ``image_token_id``, also checks that the
    prompt has exactly the placeholders the images need."""
    import torch

    if not isinstance(image_data, list) or not any(is_handoff_item(i) for i in image_data):
        return image_data
    if not all(is_handoff_item(i) for i in image_data):
        raise HandoffError("a request cannot mix gateway-preprocessed images with raw images")
    decoded = [decode_url(u) for u in image_data]
    if len({p.dtype for p, _ in decoded}) != 1:
        raise HandoffError("all hand-off images of a request must use the same dtype")
    grids = [g for _, g in decoded]
    if image_token_id is not None and isinstance(input_ids, list):
        want = sum(t * h * w for t, h, w in grids) // (merge_size * merge_size)
        have = sum(1 for t in input_ids if t == image_token_id)
        if have != want:
            raise HandoffError(f"the prompt has {have} image placeholder tokens, the images need {want}")
    item = {
        "format": "processor_output",
        "modality": "IMAGE",
        "pixel_values": torch.cat([p for p, _ in decoded]) if len(decoded) > 1 else decoded[0][0],
        "image_grid_thw": torch.tensor(grids, dtype=torch.long),
    }
    marker.record("mm_handoff_items", "image hand-off: using the gateway's preprocessed pixels")
    return [item]


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
