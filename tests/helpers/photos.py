"""Real test images: scikit-image's bundled photographs, re-encoded with Pillow
into every mode and container the service must accept, and a class-folder
dataset cut from them."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
from PIL import Image

SKIMAGE_DATA = Path(__import__("skimage").__file__).parent / "data"


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(name: str = "chelsea.png") -> Image.Image:
    """A bundled scikit-image photograph as a Pillow image."""
    return Image.open(SKIMAGE_DATA / name)


def exif_rotated_jpeg(orientation: int = 6) -> tuple[bytes, np.ndarray]:
    """A JPEG stored sideways with an EXIF orientation tag, and the upright pixels.

    Orientation 6 means "rotate 90° clockwise to display": the stored pixels
    are the upright image rotated 90° counter-clockwise.
    """
    upright = photo("chelsea.png").convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(stored, "JPEG", quality=95, exif=exif)
    # The reference is what the decoder should produce: the stored JPEG, turned upright.
    decoded = Image.open(io.BytesIO(data)).convert("RGB").transpose(Image.Transpose.ROTATE_270)
    return data, np.asarray(decoded)


def sample_image_bytes() -> dict[str, bytes]:
    """Encoded images, one per mode/format the decoder must handle."""
    rgb = photo("chelsea.png").convert("RGB")
    grey = photo("camera.png").convert("L")
    rgba = rgb.copy()
    alpha = Image.linear_gradient("L").resize(rgb.size)
    rgba.putalpha(alpha)
    palette = rgb.quantize(64)
    palette_t = palette.copy()
    palette_t.info["transparency"] = 0
    grey16 = Image.fromarray((np.asarray(grey, np.uint16) * 257).astype(np.uint16))
    frames = [rgb.resize((64, 48)), rgb.rotate(90).resize((64, 48))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    return {
        "jpeg": _encode(rgb, "JPEG", quality=90),
        "png": _encode(rgb, "PNG"),
        "grey_png": _encode(grey, "PNG"),
        "rgba_png": _encode(rgba, "PNG"),
        "palette_png": _encode(palette, "PNG"),
        "palette_transparent_png": _encode(palette_t, "PNG", transparency=0),
        "grey16_png": _encode(grey16, "PNG"),
        "cmyk_jpeg": _encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "exif_rotated_jpeg": exif_rotated_jpeg()[0],
        "gif_animated": gif.getvalue(),
        "bmp": _encode(rgb, "BMP"),
        "tiff": _encode(rgb, "TIFF"),
        "tiff_multipage": (SKIMAGE_DATA / "multipage.tif").read_bytes(),
        "webp": _encode(rgb, "WEBP", quality=90),
    }


PHOTO_CLASSES = ("astronaut.png", "coffee.png", "chelsea.png")


def write_photo_crops(root: Path, per_class: int, *, seed: int = 0, size: int = 40) -> Path:
    """A small real-image class-folder dataset: random crops of three photographs.

    Classes are separable from colour and texture, so a MobileNetV2 learns them
    from scratch in a few epochs, which keeps training tests fast.
    """
    rng = np.random.default_rng(seed)
    for name in PHOTO_CLASSES:
        img = np.asarray(photo(name).convert("RGB"))
        d = root / name.split(".")[0]
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            s = int(rng.integers(size, 3 * size))
            y, x = rng.integers(0, img.shape[0] - s), rng.integers(0, img.shape[1] - s)
            crop = Image.fromarray(img[y : y + s, x : x + s])
            crop.save(d / f"{i:04d}.png")
    return root


def photo_sized(name: str, width: int, height: int) -> Image.Image:
    """A bundled photograph scaled up to a phone/camera size, with sensor-like noise
    (a plain upscale is too smooth to show what a downscaled decode loses)."""
    big = photo(name).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    noise = np.random.default_rng(0).integers(-10, 11, (height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(big) + noise, 0, 255).astype(np.uint8))


@functools.cache
def phone_jpeg() -> bytes:
    """A 12 MP phone JPEG stored sideways with an EXIF orientation tag (upright 3024x4032)."""
    upright = photo_sized("astronaut.png", 3024, 4032)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated 90° counter-clockwise, displayed upright
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    return _encode(stored, "JPEG", quality=90, exif=exif)


@functools.cache
def photo_sized_image_bytes() -> dict[str, bytes]:
    """The photo-sized inputs users send: :func:`phone_jpeg`, a 1920x1080 PNG and a
    16-bit grey TIFF."""
    grey = np.asarray(photo_sized("camera.png", 1600, 1200).convert("L"), np.uint16)
    return {
        "jpeg_12mp_exif": phone_jpeg(),
        "png_1920x1080": _encode(photo_sized("coffee.png", 1920, 1080), "PNG"),
        "tiff_16bit": _encode(Image.fromarray(grey * 257), "TIFF"),
    }
