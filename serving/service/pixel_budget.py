"""The decoded-pixel budget of one request, read from image headers before any decode.

Decode time and memory follow decoded pixels, not encoded bytes: a flat PNG of
8000x8000 is a few kilobytes and 192 MB once decoded. The per-image limit
(``max_image_pixels``, in ``contract.preprocessing``) stops one bomb; this budget
stops a request of many large images that each pass it. Pillow's ``Image.open`` is
lazy (it parses the header, no pixel data), so the check costs microseconds per image.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

from PIL import Image

from contract.preprocessing import ImageTooLargeError
from serving.errors import ImageRejected, TooManyPixels


def header_pixels(data: bytes, index: int | None, max_image_pixels: int) -> int:
    """width x height from the image's header, without decoding it.

    An image over ``max_image_pixels`` is the per-image 413 at once, with the
    decode's own message (``index`` names the image in a batch), so one oversized
    image is still reported as ``image_too_large``, not as the request's budget. Any
    other unreadable header counts 0 here: its decode reports it as that image's error.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except Image.DecompressionBombError as exc:
        error = ImageTooLargeError(f"image has more pixels than the limit of {max_image_pixels}")
        raise ImageRejected(error, index) from exc
    except Exception:  # not an image, truncated header: decode_image names the fault
        return 0
    if width * height > max_image_pixels:
        error = ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels, limit is {max_image_pixels}"
        )
        raise ImageRejected(error, index)
    return width * height


def check_pixel_budget(
    images: Sequence[bytes], *, max_request_pixels: int, max_image_pixels: int
) -> int:
    """The request's decoded pixels; :class:`TooManyPixels` (413) above the budget."""
    total = sum(
        header_pixels(data, i if len(images) > 1 else None, max_image_pixels)
        for i, data in enumerate(images)
    )
    if total > max_request_pixels:
        raise TooManyPixels(
            f"the request's images hold {total} pixels, limit is {max_request_pixels} per request",
            extra={"request_pixels": total, "max_request_pixels": max_request_pixels},
        )
    return total
