"""Image checks done before any model request: sniff, bound, decode, normalise.

:func:`prepare_image` raises :class:`ImageRejectedError` (not retriable) for
anything that is not a small-enough, fully decodable JPEG/PNG/WebP/GIF; it never
sends bytes it could not decode itself. Pure and thread-safe.
"""

from __future__ import annotations

import base64
import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from schemas.errors import ErrorKind, OpalError, clean_message

# Opening a PNG (the header check) decompresses its text chunks, by default up to 64 MB: a 66 KB file cost 337 ms of
# CPU before any pixel. Product photos carry little text; 2 MB in all is plenty (more: rejected as corrupt).
PngImagePlugin.MAX_TEXT_MEMORY = 2 * 1024 * 1024

ALLOWED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}
MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)


class ImageRejectedError(OpalError):
    """The image is corrupt, of a disallowed type, or over a size limit."""

    reason = ErrorKind.INVALID_IMAGE


@dataclass(frozen=True)
class PreparedImage:
    """An image checked and ready to send: ``data`` (the original bytes, or a re-encoded downscale) and the
    SHA-256 of the original bytes (what caches key on: the same file always has the same key)."""

    data: bytes
    mime: str
    width: int
    height: int
    source_sha256: str = ""

    def data_url(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode()}"


def sniff(data: bytes) -> str | None:
    for magic, fmt in MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, checked without decoding a pixel: the format sniffed from the magic bytes, the size
    (within the pixel bound) and the SHA-256 of the bytes. Enough to look a result up; not enough to send."""

    fmt: str
    width: int
    height: int
    sha256: str


def inspect_image(data: bytes, max_bytes: int = 10 * 1024 * 1024, max_pixels: int = 40_000_000) -> ImageHeader:
    """The cheap checks (empty, byte limit, type by magic, readable header, pixel bound); raises
    :class:`ImageRejectedError`. The full decode and the bomb checks are :func:`prepare_image`'s."""
    if not data:
        raise ImageRejectedError("image is empty")
    if len(data) > max_bytes:
        raise ImageRejectedError(f"image is {len(data)} bytes, limit {max_bytes}")
    fmt = sniff(data)
    if fmt is None:
        raise ImageRejectedError(f"not a JPEG/PNG/WebP/GIF image (starts with {data[:8].hex()})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as probe:  # reads the header only
                w, h = probe.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejectedError(f"decompression bomb: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageRejectedError(clean_message(f"corrupt {fmt} image: {type(e).__name__}: {e}", 500)) from None
    if w * h > max_pixels:
        raise ImageRejectedError(f"image is {w}x{h} = {w * h} pixels, limit {max_pixels}")
    return ImageHeader(fmt, w, h, hashlib.sha256(data).hexdigest())


def prepare_image(
    data: bytes,
    max_bytes: int = 10 * 1024 * 1024,
    max_pixels: int = 40_000_000,
    max_side: int = 1024,
    header: ImageHeader | None = None,
) -> PreparedImage:
    """Validate ``data`` and return it ready to send (downscaled to ``max_side`` if larger).

    ``header``, from :func:`inspect_image` of the same bytes with the same limits, skips repeating those checks."""
    if header is None:
        header = inspect_image(data, max_bytes, max_pixels)
    fmt, w, h, sha = header.fmt, header.width, header.height, header.sha256
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as probe:
                probe.verify()
            with Image.open(io.BytesIO(data), formats=[fmt]) as img:
                img.load()  # full decode: catches truncated bodies verify() misses
                if max(w, h) <= max_side and fmt in ("JPEG", "PNG"):
                    return PreparedImage(data, ALLOWED_FORMATS[fmt], w, h, sha)
                rgb = img.convert("RGB")
                rgb.thumbnail((max_side, max_side))
                out = io.BytesIO()
                rgb.save(out, format="JPEG", quality=90)
                return PreparedImage(out.getvalue(), "image/jpeg", rgb.width, rgb.height, sha)
    except ImageRejectedError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejectedError(f"decompression bomb: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageRejectedError(clean_message(f"corrupt {fmt} image: {type(e).__name__}: {e}", 500)) from None
