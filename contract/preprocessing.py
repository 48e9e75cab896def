"""The one preprocessing implementation: image bytes -> model input.

Training's input pipeline and the serving gateway both call this module, and
every choice it makes is read from a :class:`PreprocessSpec`, which is stored in
the model card. Nothing else in the project decodes, resizes or normalises
images, so training/serving skew cannot come from a second copy.

Decoding rule (``decode_image``), applied in this order:

1. The header is read first; more than ``max_pixels`` pixels is refused before
   any pixel is decoded (decompression bombs), as :class:`ImageTooLargeError`.
2. Multi-frame images (animated GIF/WebP/PNG, multi-page TIFF) use their first
   frame, or are refused as :class:`UnusableImageError` when the caller asks.
3. Photo-sized decoding, only when the spec sets ``decode_oversample`` (a factor
   ``f``) and ``decode_image`` is given the spec: a JPEG is decoded downscaled in
   the DCT domain (``Image.draft``, by 1/2, 1/4 or 1/8) to the smallest size that
   keeps every side at least ``f`` times the resize output, before the exact resize.
   Other formats decode in full and the resize first shrinks by an integer factor
   (Pillow's ``reducing_gap=f``) the same way. Cards without the field (every
   version exported before it) decode in full, bit for bit as before.
4. EXIF orientation is applied (phone photos are stored sideways), after the draft.
5. Colour is converted to 8-bit RGB by one rule:
   - 16-bit and 32-bit integer grey (``I;16*``, ``I``) is scaled to 0..255 by
     the type's full range (value * 255 / 65535 for 16-bit), never clipped;
     float grey (``F``) is taken as 0..1 when its maximum is <= 1, else 0..255;
   - 16-bit RGB(A) PNGs are scaled the same way;
   - palette images are expanded through their palette;
   - images with alpha (``RGBA``, ``LA``, ``PA``, palette transparency) are
     composited over ``spec.alpha_background``;
   - CMYK and YCbCr/LAB are converted by Pillow's colour conversion;
   - grey (``L``, ``1``) is replicated to three channels.

Resize: ``spec.resize_method`` is a Pillow filter (antialiased when shrinking);
``spec.geometry`` is ``stretch`` (to H x W, aspect ratio not kept) or
``letterbox`` (scaled to fit, centred, padded with ``spec.pad_value``). The
geometry is returned so detections can be mapped back to original pixels; it
always refers to the original (upright) image, also after a drafted decode.

Normalise: ``x * spec.scale + spec.offset`` per channel, in float32. For
MobileNetV2 the default maps 0..255 to -1..1 (``scale=1/127.5, offset=-1``).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from contract.errors import DomainError

# A truncated file is an error, never silently half-grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

#: Default pixel limit for one decoded image (width * height): 40 megapixels.
DEFAULT_MAX_PIXELS = 40_000_000

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,
}


class ImageError(DomainError, ValueError):
    """Base class of image input errors."""

    code, title = "invalid_image", "Invalid image"


class ImageDecodeError(ImageError):
    """The bytes are not a decodable image (not an image, truncated, corrupt)."""

    code, title = "undecodable_image", "Image could not be decoded"


class ImageTooLargeError(ImageError):
    """The image has more pixels than allowed (decompression-bomb guard)."""

    code, title = "image_too_large", "Image too large"


class UnusableImageError(ImageError):
    """Decodable, but not usable as model input (e.g. refused multi-frame, zero size)."""

    code, title = "unusable_image", "Image cannot be used"


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything needed to turn image bytes into the model input, as data.

    Stored verbatim under ``preprocessing`` in the model card; the gateway builds
    its pipeline from the card with :meth:`from_dict`.
    """

    height: int
    width: int
    channels: int = 3
    color: str = "RGB"
    exif_orientation: bool = True
    alpha_background: tuple[int, int, int] = (255, 255, 255)
    resize_method: str = "bilinear"
    geometry: str = "stretch"  # "stretch" | "letterbox"
    pad_value: int = 0
    scale: float = 1.0 / 127.5
    offset: float = -1.0
    dtype: str = "float32"
    decode_rule: str = "first-frame; exif-transpose; 16-bit scaled by 255/65535; alpha over background; cmyk via Pillow; grey replicated"
    version: int = 1
    #: Photo-sized decoding: decode (JPEG draft) and pre-shrink (``reducing_gap``) only
    #: down to this factor above the resize output. None (cards written before the
    #: field existed) keeps the full decode.
    decode_oversample: float | None = None

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"input size must be positive, got {self.height}x{self.width}")
        if self.channels != 3 or self.color != "RGB":
            raise ValueError("only 3-channel RGB model input is supported")
        if self.resize_method not in _RESAMPLE:
            raise ValueError(f"resize_method must be one of {sorted(_RESAMPLE)}")
        if self.geometry not in ("stretch", "letterbox"):
            raise ValueError("geometry must be 'stretch' or 'letterbox'")
        if self.dtype != "float32":
            raise ValueError("only float32 model input is supported")
        if self.decode_oversample is not None and not self.decode_oversample >= 1.0:
            # Below 1 the decoded image would be smaller than the model input.
            raise ValueError(f"decode_oversample must be >= 1, got {self.decode_oversample}")

    def to_dict(self) -> dict[str, Any]:
        """The card's ``preprocessing`` object (``decode_oversample`` only when set, so a
        spec read from an older card writes that card's mapping back unchanged)."""
        d = dataclasses.asdict(self)
        d["alpha_background"] = list(self.alpha_background)
        if self.decode_oversample is None:
            del d["decode_oversample"]
        return d

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the resize produces from an upright ``width x height`` image:
        the input size for stretch, the scaled-to-fit size for letterbox."""
        if self.geometry == "stretch":
            return self.width, self.height
        s = min(self.height / height, self.width / width)
        return max(1, round(width * s)), max(1, round(height * s))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            # A card written by a newer exporter: refusing is safer than guessing.
            raise ValueError(f"unknown preprocessing fields {sorted(unknown)}")
        d = dict(d)
        if "alpha_background" in d:
            d["alpha_background"] = tuple(int(v) for v in d["alpha_background"])
        return cls(**d)


@dataclass(frozen=True)
class ImageGeometry:
    """How an original image maps into the model input (for undoing the resize).

    A point (x, y) in model-input pixels is ``((x - pad_x) / scale_x,
    (y - pad_y) / scale_y)`` in original pixels.
    """

    original_height: int
    original_width: int
    scale_y: float
    scale_x: float
    pad_y: float
    pad_x: float
    input_height: int
    input_width: int

    def boxes_to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Normalised (ymin, xmin, ymax, xmax) in model input -> original pixel (same order).

        Coordinates are clipped to the original image.
        """
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        y = (b[:, [0, 2]] * self.input_height - self.pad_y) / self.scale_y
        x = (b[:, [1, 3]] * self.input_width - self.pad_x) / self.scale_x
        y = np.clip(y, 0, self.original_height)
        x = np.clip(x, 0, self.original_width)
        return np.stack([y[:, 0], x[:, 0], y[:, 1], x[:, 1]], axis=1)

    def boxes_to_input(self, boxes: np.ndarray) -> np.ndarray:
        """Original-pixel (ymin, xmin, ymax, xmax) -> model-input pixels (same order).

        The inverse of :meth:`boxes_to_original` (times the input size): ``y * scale_y
        + pad_y`` and ``x * scale_x + pad_x``. No clipping: a box inside the original
        image lands inside the resized image (never on letterbox padding).
        """
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        y = b[:, [0, 2]] * self.scale_y + self.pad_y
        x = b[:, [1, 3]] * self.scale_x + self.pad_x
        return np.stack([y[:, 0], x[:, 0], y[:, 1], x[:, 1]], axis=1)

    def to_array(self) -> np.ndarray:
        """The fields as float64 ``[8]``, in declaration order (how capture shards keep them)."""
        return np.array([getattr(self, f.name) for f in dataclasses.fields(self)], np.float64)

    @classmethod
    def from_array(cls, a: np.ndarray | Any) -> ImageGeometry:
        """The geometry :meth:`to_array` wrote; ValueError for anything but 8 finite numbers."""
        v = np.asarray(a, dtype=np.float64).reshape(-1)
        if v.shape != (8,) or not np.isfinite(v).all():
            raise ValueError(f"an image geometry is 8 finite numbers, got {v.tolist()}")
        names = [f.name for f in dataclasses.fields(cls)]
        kw: dict[str, Any] = dict(zip(names, v.tolist(), strict=True))
        for name in ("original_height", "original_width", "input_height", "input_width"):
            kw[name] = int(round(kw[name]))
        return cls(**kw)


@dataclass
class DecodedImage:
    """An image decoded to RGB uint8, with what decoding noticed."""

    image: Image.Image  # mode "RGB"
    format: str | None
    original_mode: str
    frames: int = 1
    exif_rotated: bool = False
    notes: list[str] = field(default_factory=list)
    #: (width, height) of the full image, upright; differs from ``image.size`` after a
    #: drafted decode. Geometry refers to it. None: the image's own size.
    original_size: tuple[int, int] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the full upright image, whatever size was decoded."""
        return self.original_size or self.image.size

    @functools.cached_property
    def pixels(self) -> np.ndarray:
        """(H, W, 3) uint8, made on first use: :func:`resize` takes the image itself."""
        return np.asarray(self.image, dtype=np.uint8)


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels, limit is {max_pixels}"
        )


def header_pixels(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """width x height read from the image's header alone, under :func:`decode_image`'s
    per-image limit (Pillow opens lazily: no pixel data is decoded).

    Raises :class:`ImageTooLargeError` above ``max_pixels`` (with the message the
    decode would give) and :class:`ImageDecodeError` when the header cannot be read.
    Pillow's bomb *warning* is not an error here: the size check decides.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image has more pixels than the limit of {max_pixels}") from exc
    except Exception as exc:  # not an image, truncated header
        raise ImageDecodeError(f"image header could not be read: {exc}") from exc
    _check_pixels(width, height, max_pixels)
    return width * height


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    multi_frame: str = "first",
    alpha_background: tuple[int, int, int] = (255, 255, 255),
    exif_orientation: bool = True,
    spec: PreprocessSpec | None = None,
) -> DecodedImage:
    """Decode image bytes to RGB uint8 by the module's rule (see module docstring).

    ``spec``: decode for this model input; its ``alpha_background`` and
    ``exif_orientation`` replace those arguments, and its ``decode_oversample``
    (when set) lets a JPEG decode downscaled. Without it the image decodes in full.

    Raises :class:`ImageDecodeError` for bytes that are not an image or are
    truncated, :class:`ImageTooLargeError` above ``max_pixels``, and
    :class:`UnusableImageError` for refused multi-frame or empty images.
    """
    if not data:
        raise ImageDecodeError("empty image body")
    if spec is not None:
        alpha_background, exif_orientation = spec.alpha_background, spec.exif_orientation
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width < 1 or height < 1:
                raise UnusableImageError("image has zero width or height")
            _check_pixels(width, height, max_pixels)
            frames = int(getattr(img, "n_frames", 1) or 1)
            if frames > 1 and multi_frame == "reject":
                raise UnusableImageError(f"multi-frame image ({frames} frames) is not accepted")
            img.seek(0)
            fmt = img.format
            original_mode = img.mode
            orientation = img.getexif().get(0x0112, 1) if exif_orientation else 1
            # Orientations 5-8 swap the axes: the upright image is height x width.
            upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
            if spec is not None and spec.decode_oversample is not None:
                _draft(img, spec, upright, swapped=upright != (width, height))
            img.load()
            rotated = False
            if orientation not in (1, None):  # 1 when exif_orientation is off
                img = ImageOps.exif_transpose(img)
                rotated = True
            rgb = _to_rgb(img, alpha_background)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image has more pixels than the limit of {max_pixels}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("bytes are not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        raise ImageDecodeError(f"image could not be decoded: {exc}") from exc
    if rgb.mode != "RGB":
        raise UnusableImageError(f"decoded to unexpected mode {rgb.mode}")
    original = upright if rgb.size != upright else None
    return DecodedImage(rgb, fmt, original_mode, frames, rotated, original_size=original)


def _draft(
    img: Image.Image, spec: PreprocessSpec, upright: tuple[int, int], *, swapped: bool
) -> None:
    """Ask a JPEG for a DCT-domain downscale that stays ``decode_oversample`` x above the
    resize output on each side (a no-op for other formats). Before ``load()``."""
    out_w, out_h = spec.output_size(*upright)
    f = float(spec.decode_oversample or 1.0)
    want = (math.ceil(out_w * f), math.ceil(out_h * f))
    if swapped:  # draft works on the stored (sideways) pixels
        want = (want[1], want[0])
    # Pillow picks the largest 1/2^k scale whose result is still >= ``want`` on both sides;
    # keeping the mode keeps the colour conversion the full decode would do.
    img.draft(img.mode, want)


def _scale_to_uint8(arr: np.ndarray, full_range: float) -> np.ndarray:
    return np.clip(np.rint(arr.astype(np.float64) * (255.0 / full_range)), 0, 255).astype(np.uint8)


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        grey = _scale_to_uint8(np.asarray(img), 65535.0)
        return Image.fromarray(grey).convert("RGB")
    if mode == "I":
        arr = np.asarray(img)
        # Pillow opens 16-bit PNG/TIFF grey as "I"; its range decides the scale.
        full = (
            65535.0 if arr.max(initial=0) <= 65535 and arr.min(initial=0) >= 0 else float(2**31 - 1)
        )
        return Image.fromarray(_scale_to_uint8(np.clip(arr, 0, None), full)).convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        full = 1.0 if np.nanmax(arr) <= 1.0 else 255.0
        return Image.fromarray(_scale_to_uint8(np.nan_to_num(np.clip(arr, 0, None)), full)).convert(
            "RGB"
        )
    if mode in ("RGBA;16", "RGB;16", "RGBX"):
        return img.convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode == "L" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        canvas = Image.new("RGB", img.size, tuple(background))
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    # L, 1, CMYK, YCbCr, LAB, HSV: Pillow's conversions.
    return img.convert("RGB")


def resize(
    pixels: np.ndarray | Image.Image | DecodedImage, spec: PreprocessSpec
) -> tuple[np.ndarray, ImageGeometry]:
    """Resize RGB uint8 ``(h, w, 3)`` (or an RGB image: the same pixels, one copy fewer;
    or a :class:`DecodedImage`, possibly decoded downscaled) to the spec's input size;
    returns uint8 and geometry (in the original image's pixels)."""
    original: tuple[int, int] | None = None
    if isinstance(pixels, DecodedImage):
        original = pixels.original_size
        pixels = pixels.image
    if isinstance(pixels, Image.Image):
        if pixels.mode != "RGB":
            raise ValueError(f"resize takes RGB images, not {pixels.mode}")
        img = pixels
        w, h = img.size
    else:
        h, w = pixels.shape[:2]
        img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    decoded_hw = (h, w)
    if original is not None:
        w, h = original  # the layout and geometry belong to the full image
    th, tw = spec.height, spec.width
    method = _RESAMPLE[spec.resize_method]
    # None keeps Pillow's plain resize (and today's pixels) for specs without the field.
    gap = spec.decode_oversample
    if spec.geometry == "stretch":
        out = np.asarray(
            img.resize((tw, th), method, reducing_gap=gap) if decoded_hw != (th, tw) else img
        )
        geom = ImageGeometry(h, w, th / h, tw / w, 0.0, 0.0, th, tw)
        return out, geom
    nw, nh = spec.output_size(w, h)
    resized = img.resize((nw, nh), method, reducing_gap=gap) if (nh, nw) != decoded_hw else img
    top, left = (th - nh) // 2, (tw - nw) // 2
    canvas = Image.new("RGB", (tw, th), (spec.pad_value,) * 3)
    canvas.paste(resized, (left, top))
    geom = ImageGeometry(h, w, nh / h, nw / w, float(top), float(left), th, tw)
    return np.asarray(canvas), geom


def normalize(
    pixels: np.ndarray, spec: PreprocessSpec, out: np.ndarray | None = None
) -> np.ndarray:
    """uint8 (or float 0..255) pixels -> float32 model input: ``x * scale + offset``.

    ``out``: a float32 array to write into (e.g. a row of a batch), the same values.
    """
    if out is None:
        x = np.asarray(pixels, dtype=np.float32)
        return x * np.float32(spec.scale) + np.float32(spec.offset)
    np.multiply(pixels, np.float32(spec.scale), out=out, dtype=np.float32)
    out += np.float32(spec.offset)
    return out


def denormalize(x: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Model input back to 0..255 float pixels (for statistics and debugging)."""
    return (np.asarray(x, dtype=np.float32) - np.float32(spec.offset)) / np.float32(spec.scale)


def preprocess_pixels(
    pixels: np.ndarray | Image.Image | DecodedImage,
    spec: PreprocessSpec,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, ImageGeometry]:
    """Decoded RGB uint8 (or the RGB image, or the :class:`DecodedImage`) ->
    (model input float32 (H, W, 3), geometry)."""
    resized, geom = resize(pixels, spec)
    return normalize(resized, spec, out), geom


def preprocess_bytes(
    data: bytes,
    spec: PreprocessSpec,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    multi_frame: str = "first",
) -> tuple[np.ndarray, ImageGeometry]:
    """Image bytes -> (model input float32 (H, W, 3), geometry): the whole pipeline."""
    decoded = decode_image(data, max_pixels=max_pixels, multi_frame=multi_frame, spec=spec)
    return preprocess_pixels(decoded, spec)
