"""``imgserve detect --out``: detections drawn onto the image, and where each file goes.

Boxes come back in the pixels of the image as the gateway saw it: decoded by
:func:`contract.preprocessing.decode_image`, so EXIF-rotated photos upright, the
first frame of an animation, transparency over white. The drawing is made on that
same decode, at full size, so every box sits where the model found it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from contract.preprocessing import decode_image

#: Box colours by class index: distinct, and readable under white or black text.
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
    (170, 110, 40),
)
#: Where several annotated images go: ``DIR/<stem of FILE><SUFFIX>``, lossless.
SUFFIX = ".png"


class OutputError(ValueError):
    """``--out`` cannot hold the annotated images (the message says why)."""


def colour_of(index: int) -> tuple[int, int, int]:
    """The outline colour of class ``index``."""
    return PALETTE[index % len(PALETTE)]


def annotate(data: bytes, detections: Sequence[dict[str, Any]]) -> Image.Image:
    """The image ``data`` as the gateway decoded it, each detection drawn as a box
    outlined in its class colour with ``label score`` on a filled tag above it
    (inside the box when it touches the top edge)."""
    image = decode_image(data).image
    draw = ImageDraw.Draw(image)
    # Lines and text in proportion to the image, so both read on a thumbnail or a 12 MP photo.
    short_side = min(image.size)
    line = max(2, round(short_side / 200))
    font = ImageFont.load_default(size=max(10, round(short_side / 30)))
    pad = max(1, line // 2)
    for d in detections:
        box = d["box"]
        x0, y0, x1, y1 = (round(box[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
        colour = colour_of(int(d["index"]))
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        text = f"{d['label']} {float(d['score']):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tag_h = bottom - top + 2 * pad
        tag_y = y0 - tag_h if y0 - tag_h >= 0 else y0
        draw.rectangle((x0, tag_y, x0 + right - left + 2 * pad, tag_y + tag_h), fill=colour)
        draw.text((x0 + pad - left, tag_y + pad - top), text, fill=_text_colour(colour), font=font)
    return image


def _text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    # Rec. 601 luma: black text on light tags, white on dark ones.
    r, g, b = fill
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def output_paths(files: Sequence[str], out: str) -> list[Path]:
    """Where each FILE's annotated image goes.

    One FILE: ``out`` is the file to write, its format from the extension, unless it
    is an existing directory or ends with ``/``. Several FILEs: ``out`` is a directory
    (made if missing) and each image goes to ``out/<stem of FILE>.png``; two FILEs
    with the same stem are refused rather than one overwriting the other.
    """
    target = Path(out)
    if len(files) == 1 and not (target.is_dir() or out.endswith(("/", "\\"))):
        if target.suffix.lower() not in Image.registered_extensions():
            raise OutputError(
                f"--out {out!r}: no image format for {target.suffix or 'a name without extension'}"
                " (use .png, .jpg, ...)"
            )
        return [target]
    if target.exists() and not target.is_dir():
        raise OutputError(f"--out {out!r} must be a directory for several files")
    paths = [target / (Path(f).stem + SUFFIX) for f in files]
    seen: dict[Path, str] = {}
    for f, path in zip(files, paths, strict=True):
        if path in seen:
            raise OutputError(f"{seen[path]} and {f} would both be written to {path}")
        seen[path] = f
    return paths


def save(image: Image.Image, path: Path) -> None:
    """Write ``image`` to ``path`` (format from the extension), making its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
