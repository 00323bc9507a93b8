"""The image hand-off from the Rust gateway to the SGLang worker (m3serve.plugin.mm_handoff).

Unit level: the wire item the gateway builds decodes, on the worker side, to exactly the HF M3
processor's `pixel_values` / `image_grid_thw` (float32, and bfloat16 equal to torch's own cast), and
malformed items get a clear error. End to end (slow): a real CPU SGLang worker with the m3serve plugin
serves a request carrying the hand-off, and its plugin marker shows the hand-off was used while the
HF image processor never ran; a control request with a raw image shows the counter does count.
"""

from __future__ import annotations

import base64
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from m3serve.plugin import mm_handoff

g = pytest.importorskip("m3serve._gateway")


def image_bytes(seed: int, w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def request(images: list[bytes]) -> dict:
    parts = [{"type": "text", "text": "Describe these."}] + [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b).decode()}}
        for b in images
    ]
    return {"messages": [{"role": "user", "content": parts}]}


IMAGES = [image_bytes(1, 90, 60), image_bytes(2, 300, 120)]


@pytest.fixture(scope="module")
def prepared(tiny_checkpoint):
    out = {}
    for dtype in ("float32", "bfloat16"):
        pre = g.Preprocessor(str(tiny_checkpoint), json.dumps({"wire_dtype": dtype}))
        out[dtype] = pre.prepare_chat(json.dumps(request(IMAGES)))
    return out


@pytest.fixture(scope="module")
def hf_pixels():
    from transformers.models.minimax_m3_vl.image_processing_minimax_m3_vl import MiniMaxM3VLImageProcessor

    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in IMAGES]
    return MiniMaxM3VLImageProcessor()(images=pil, return_tensors="pt")


def image_token_id(tiny_checkpoint) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint).convert_tokens_to_ids("]<]image[>[")


def test_float32_wire_equals_hf_processor(prepared, hf_pixels, tiny_checkpoint):
    p = prepared["float32"]
    urls = json.loads(p["worker_image_data"])
    assert len(urls) == len(IMAGES) and all(u.startswith("data:application/x-m3serve-pixels;v=1;dtype=float32;") for u in urls)
    [item] = mm_handoff.convert_image_data(urls, image_token_id(tiny_checkpoint), p["input_ids"])
    assert item["format"] == "processor_output" and item["modality"] == "IMAGE"
    assert torch.equal(item["image_grid_thw"], hf_pixels["image_grid_thw"])
    assert item["pixel_values"].dtype == torch.float32
    assert torch.equal(item["pixel_values"], hf_pixels["pixel_values"])


def test_bfloat16_wire_equals_torch_cast(prepared, hf_pixels):
    urls = json.loads(prepared["bfloat16"]["worker_image_data"])
    [item] = mm_handoff.convert_image_data(urls)
    assert item["pixel_values"].dtype == torch.bfloat16
    assert torch.equal(item["pixel_values"], hf_pixels["pixel_values"].to(torch.bfloat16))
    f32 = json.loads(prepared["float32"]["worker_image_data"])
    assert sum(map(len, urls)) < 0.6 * sum(map(len, f32))


def test_worker_contract_admits_the_wire_format(prepared):
    """SGLang's /generate contract gate accepts our image_data (it refuses processor_output dicts)."""
    from sglang.srt.entrypoints.api_contract import generate_contract_error

    p = prepared["float32"]
    body = {"input_ids": p["input_ids"], "image_data": json.loads(p["worker_image_data"])}
    assert generate_contract_error(body) is None
    assert generate_contract_error({"input_ids": [1], "image_data": [{"format": "processor_output"}]}) is not None


def test_placeholders_match_grids(prepared, tiny_checkpoint):
    p = prepared["float32"]
    tid = image_token_id(tiny_checkpoint)
    expected = sum(t * h * w for t, h, w in p["image_grid_thw"]) // 4
    assert p["input_ids"].count(tid) == expected


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda u: u.replace("dtype=float32", "dtype=float16"), "dtype must be float32 or bfloat16"),
        (lambda u: u.replace(";v=1;", ";v=9;"), "unknown hand-off version"),
        (lambda u: u.replace("grid=1x", "grid=2x"), "needs"),
        (lambda u: u.replace("grid=1x", "grid=ax"), "grid must be TxHxW"),
        (lambda u: u[:-8] + "@@@@@@@@", "not valid base64"),
        (lambda u: u.replace(";base64,", ";raw,"), "must be base64"),
    ],
)
def test_malformed_items_are_refused_clearly(prepared, mutate, message):
    url = json.loads(prepared["float32"]["worker_image_data"])[0]
    with pytest.raises(mm_handoff.HandoffError, match=message):
        mm_handoff.convert_image_data([mutate(url)])


def test_mixing_and_placeholder_mismatch_refused(prepared, tiny_checkpoint):
    p = prepared["float32"]
    urls = json.loads(p["worker_image_data"])
    with pytest.raises(mm_handoff.HandoffError, match="cannot mix"):
        mm_handoff.convert_image_data([urls[0], "data:image/png;base64,AAAA"])
    tid = image_token_id(tiny_checkpoint)
    ids = [t for t in p["input_ids"] if t != tid][:10] + [tid] * 3
    with pytest.raises(mm_handoff.HandoffError, match="3 image placeholder tokens"):
        mm_handoff.convert_image_data(urls, tid, ids)


def test_before_hook_rewrites_only_handoff_items(prepared, tiny_checkpoint):
    class FakeProcessor:
        IM_TOKEN_ID = image_token_id(tiny_checkpoint)

    p = prepared["float32"]
    data = json.loads(p["worker_image_data"])
    args, kwargs = mm_handoff._before_process_mm_data(
        FakeProcessor(), image_data=data, audio_data=None, input_text=p["input_ids"], request_obj=None
    )
    assert isinstance(kwargs["image_data"][0]["pixel_values"], torch.Tensor)
    assert mm_handoff._before_process_mm_data(FakeProcessor(), image_data=["data:x"], input_text="t") is None


def test_hooks_target_existing_sglang_and_transformers_code():
    import pkgutil

    for target in (mm_handoff.PROCESS_TARGET, mm_handoff.HF_IMAGE_TARGET):
        owner, attr = target.rsplit(".", 1)
        assert hasattr(pkgutil.resolve_name(owner), attr), target


# --- end to end against a real worker ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_worker_skips_its_image_processing(tiny_checkpoint, tmp_path, worker_factory):
    from m3serve.plugin.marker import read_all

    # bf16: SGLang's M3 vision tower asserts bf16 pixel_values (a float32 worker cannot take images).
    pre = g.Preprocessor(str(tiny_checkpoint), json.dumps({"wire_dtype": "bfloat16"}))
    p = pre.prepare_chat(json.dumps(request(IMAGES)))
    args = ["--dtype", "bfloat16", "--max-total-tokens", "4096", "--skip-server-warmup", "--mem-fraction-static", "0.3"]
    with worker_factory(tiny_checkpoint, tmp_path, args) as worker:

        def counts() -> dict:
            total: dict = {}
            for snap in read_all(str(worker.marker_dir)):
                for k, v in snap.get("counts", {}).items():
                    total[k] = total.get(k, 0) + v
            return total

        import urllib.error

        try:
            out = worker.generate(
                input_ids=p["input_ids"],
                image_data=json.loads(p["worker_image_data"]),
                sampling_params={"max_new_tokens": 4, "temperature": 0},
            )
        except urllib.error.HTTPError as e:
            pytest.fail(f"worker refused the hand-off: HTTP {e.code}: {e.read()[:2000]!r}")
        assert out["meta_info"]["prompt_tokens"] == len(p["input_ids"])
        # The worker counted exactly our placeholders as image tokens (its vision tower ran on our pixels).
        assert out["meta_info"]["image_tokens"] == sum(t * h * w for t, h, w in p["image_grid_thw"]) // 4
        assert out["meta_info"]["completion_tokens"] == 4
        after_handoff = counts()
        assert after_handoff.get("mm_handoff_items", 0) >= 1, after_handoff
        assert after_handoff.get("hf_image_processor_ran", 0) == 0, after_handoff

        # Control: the same prompt with a raw image makes the worker run the HF processor.
        # SGLang expands a bare image token itself, so collapse each start + N image + end run to one.
        tid = image_token_id(tiny_checkpoint)
        start, end = pre.encode("]<]start of image[>[")[0], pre.encode("]<]end of image[>[")[0]
        raw_ids = [t for t in p["input_ids"] if t not in (tid, end)]
        raw_ids = [tid if t == start else t for t in raw_ids]
        seen = raw_ids.count(tid)
        first = "data:image/png;base64," + base64.b64encode(IMAGES[0]).decode()
        second = "data:image/png;base64," + base64.b64encode(IMAGES[1]).decode()
        worker.generate(input_ids=raw_ids, image_data=[first, second][:seen], sampling_params={"max_new_tokens": 2})
        assert counts().get("hf_image_processor_ran", 0) >= 1, "the control request did not reach the HF processor"


@pytest.fixture
def worker_factory():
    """The serving tests' worker launcher (tests/serving/conftest.py), loaded under its own name."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "serving" / "conftest.py"
    spec = importlib.util.spec_from_file_location("m3serve_serving_conftest", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    os.environ.setdefault("M3SERVE_PLUGIN_MARKER_EVERY_EVENT", "1")
    return module.running_worker
