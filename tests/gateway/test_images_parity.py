"""Rust image preprocessing vs the Hugging Face `MiniMaxM3VLImageProcessor`.

Stated tolerance (also in rust_gateway/README.md), in normalized units (one 8-bit level is
1/(255*std) ~ 0.015):
* PNG, GIF, WebP: identical (decode is lossless-exact, the bicubic reproduces torchvision's
  fixed-point arithmetic, normalization uses the same float32 operations);
* JPEG: the decoders differ (zune-jpeg vs Pillow's libjpeg-turbo, a few levels on edges), so
  max |diff| <= 0.12 (8 levels) and mean |diff| <= 0.012 (< 1 level); grids always identical.
Test images are "natural-looking" and deterministic: smooth gradients, band-limited noise, hard
edges, text-like strokes and sensor noise, plus purely synthetic ones.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

g = pytest.importorskip("m3serve._gateway")

LEVEL = 1 / (255 * 0.26130258)


def natural_image(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / w * 180 + 30, y / h * 160 + 40, (x + y) / (w + h) * 200 + 20], -1)
    for octave in (64, 16, 4):  # band-limited texture at three scales
        small = rng.normal(0, 30, (h // octave + 2, w // octave + 2, 3))
        small = np.clip(small + 128, 0, 255).astype(np.uint8)
        img += np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32) - 128
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(12):  # hard-edged objects and strokes
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(2, w // 3 + 3)), y0 + int(rng.integers(2, h // 3 + 3))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.rectangle([x0, y0, x1, y1], fill=color)
        else:
            draw.line([x0, y0, x1, y1], fill=color, width=int(rng.integers(1, 4)))
    arr = np.asarray(pil, np.float32) + rng.normal(0, 3, (h, w, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def synthetic_image(kind: str, h: int, w: int) -> np.ndarray:
    if kind == "checker":
        y, x = np.mgrid[0:h, 0:w]
        v = ((x // 3 + y // 3) % 2 * 255).astype(np.uint8)
        return np.stack([v, 255 - v, v], -1)
    if kind == "noise":
        return np.random.default_rng(5).integers(0, 256, (h, w, 3), dtype=np.uint8)
    if kind == "flat":
        return np.full((h, w, 3), (12, 200, 99), np.uint8)
    raise ValueError(kind)


def encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    kwargs = {"quality": 90} if fmt in ("JPEG", "WEBP") else {}
    Image.fromarray(arr).save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def hf_processor():
    from transformers.models.minimax_m3_vl.image_processing_minimax_m3_vl import MiniMaxM3VLImageProcessor

    return MiniMaxM3VLImageProcessor()


def compare(hf_processor, data: bytes):
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    want = hf_processor(images=[pil], return_tensors="pt")
    pixels, shape, grid = g.preprocess_image(data)
    got = np.frombuffer(pixels, np.float32).reshape(shape)
    assert grid == tuple(want["image_grid_thw"][0].tolist())
    assert got.shape == tuple(want["pixel_values"].shape)
    return np.abs(got - want["pixel_values"].numpy())


SIZES = [(1080, 1920), (480, 640), (333, 500), (40, 60), (1200, 300), (20, 3000)]


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "WEBP"])
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_lossless_decodes_are_identical(hf_processor, fmt, size):
    arr = natural_image(hash(size) % 1000, *size)
    if fmt == "GIF":  # GIF is paletted: quantize first so both sides read the same palette indices
        arr = np.asarray(Image.fromarray(arr).quantize(256).convert("RGB"))
    diff = compare(hf_processor, encode(arr, fmt))
    assert diff.max() == 0.0, f"max diff {diff.max()} ({diff.max() / LEVEL:.1f} levels)"


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_jpeg_within_tolerance(hf_processor, size):
    diff = compare(hf_processor, encode(natural_image(7, *size), "JPEG"))
    assert diff.max() <= 0.12, f"max {diff.max():.4f}"
    assert diff.mean() <= 0.012, f"mean {diff.mean():.5f}"


@pytest.mark.parametrize("kind", ["checker", "noise", "flat"])
@pytest.mark.parametrize("size", [(224, 224), (57, 1000), (1000, 57), (13, 13)])
def test_synthetic_images_identical(hf_processor, kind, size):
    diff = compare(hf_processor, encode(synthetic_image(kind, *size), "PNG"))
    assert diff.max() == 0.0


def test_resize_alone_equals_torchvision():
    """The bicubic itself, against torchvision's uint8 antialiased bicubic, down and up."""
    import torchvision.transforms.v2.functional as tvF

    arr = natural_image(3, 250, 371)
    for oh, ow in [(56, 84), (112, 168), (500, 742), (250, 28), (28, 371)]:
        want = tvF.resize(
            torch.from_numpy(arr).permute(2, 0, 1), [oh, ow], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True
        )
        got = np.frombuffer(g.resize_rgb(arr.tobytes(), 371, 250, ow, oh), np.uint8).reshape(oh, ow, 3)
        np.testing.assert_array_equal(got, want.permute(1, 2, 0).numpy())


def test_smart_resize_equals_transformers():
    from transformers.models.minimax_m3_vl.image_processing_minimax_m3_vl import smart_resize

    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 5000, (300, 2))] + [(42, 70), (14, 14), (28, 5600)]
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            with pytest.raises(ValueError, match="aspect ratio"):
                g.smart_resize(h, w)
            continue
        # The processor's defaults (the function's own max_pixels default is larger).
        want = smart_resize(h, w, factor=28, min_pixels=3136, max_pixels=451584)
        assert g.smart_resize(h, w) == want, (h, w)
        assert g.smart_resize(h, w, 28, 3136, 1_003_520) == smart_resize(h, w), (h, w)


def test_rgba_and_grey_inputs_match(hf_processor):
    """Alpha is dropped and grey expanded, as PIL's convert('RGB') does."""
    rgba = np.concatenate([natural_image(1, 64, 80), np.random.default_rng(2).integers(0, 256, (64, 80, 1), dtype=np.uint8)], -1)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    assert compare(hf_processor, buf.getvalue()).max() == 0.0
    grey = natural_image(2, 64, 80)[..., 0]
    buf = io.BytesIO()
    Image.fromarray(grey, "L").save(buf, "PNG")
    assert compare(hf_processor, buf.getvalue()).max() == 0.0
