"""Generated images as data: URLs, so image requests need no files and no network.

Each image is a seeded pattern of coloured rectangles: deterministic, distinct per seed (a server's
image cache cannot serve one session's image to another), and compressible enough that a 512x512 PNG
stays around tens of kilobytes rather than the megabyte that noise would cost.
"""

from __future__ import annotations

import base64
import io
import random


def generated_image_png(width: int, height: int, seed: int) -> bytes:
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    from PIL import Image, ImageDraw  # imported here: only image runs need Pillow

    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = rng.randrange(x0, width + 1), rng.randrange(y0, height + 1)
        draw.rectangle([x0, y0, x1, y1], fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_data_url(width: int, height: int, seed: int) -> str:
    data = base64.b64encode(generated_image_png(width, height, seed)).decode("ascii")
    return f"data:image/png;base64,{data}"
