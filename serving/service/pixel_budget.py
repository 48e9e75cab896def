"""The decoded-pixel budget of one request, read from image headers before any decode.

Decode time and memory follow decoded pixels, not encoded bytes: a flat PNG of
8000x8000 is a few kilobytes and 192 MB once decoded. The per-image limit
(``max_image_pixels``, in ``contract.preprocessing``) stops one bomb; this budget
stops a request of many large images that each pass it. Pillow's ``Image.open`` is
lazy (it parses the header, no pixel data), so the check costs microseconds per image.
"""

from __future__ import annotations

from collections.abc import Sequence

from contract import preprocessing
from contract.preprocessing import ImageError, ImageTooLargeError
from serving.errors import ImageRejected, TooManyPixels


def header_pixels(data: bytes, index: int | None, max_image_pixels: int) -> int:
    """One image's header pixels; an image over the per-image limit is its 413 at once
    (``index`` names it in a batch). Any other unreadable header counts 0 here: its
    decode reports it as that image's error."""
    try:
        return preprocessing.header_pixels(data, max_pixels=max_image_pixels)
    except ImageTooLargeError as exc:
        raise ImageRejected(exc, index) from exc
    except ImageError:
        return 0


def check_pixel_budget(
    images: Sequence[bytes], *, max_request_pixels: int, max_image_pixels: int
) -> list[int]:
    """Each image's header pixels; :class:`TooManyPixels` (413) when their sum is above
    the budget. The list is what each decode reserves of the worker's limit
    (:mod:`serving.service.worker_pixels`)."""
    pixels = [
        header_pixels(data, i if len(images) > 1 else None, max_image_pixels)
        for i, data in enumerate(images)
    ]
    total = sum(pixels)
    if total > max_request_pixels:
        raise TooManyPixels(
            f"the request's images hold {total} pixels, limit is {max_request_pixels} per request",
            extra={"request_pixels": total, "max_request_pixels": max_request_pixels},
        )
    return pixels
