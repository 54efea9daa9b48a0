"""Image checks done before any model request: sniff, bound, decode, normalise.

:func:`prepare_image` raises :class:`ImageRejectedError` (not retriable) for
anything that is not a small-enough, fully decodable JPEG/PNG/WebP/GIF; it never
sends bytes it could not decode itself. Pure and thread-safe.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
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
    :class:`ImageRejectedError`. The full decode and the bomb checks are :func:`prepare_image`'s.

    JPEG and PNG sizes are read from the frame header (SOF segment, IHDR chunk) directly; other formats, and
    any JPEG or PNG whose header is unusual, are opened with PIL (header only). Either way no pixel is decoded;
    the bytes are decoded fully before any model request (:func:`prepare_image`), and a cache hit is for bytes
    that were (the key is their SHA-256)."""
    if not data:
        raise ImageRejectedError("image is empty")
    if len(data) > max_bytes:
        raise ImageRejectedError(f"image is {len(data)} bytes, limit {max_bytes}")
    fmt = sniff(data)
    if fmt is None:
        raise ImageRejectedError(f"not a JPEG/PNG/WebP/GIF image (starts with {data[:8].hex()})")
    # read from the frame header itself; other formats, and anything unusual, go to PIL, which says what is wrong
    size = _jpeg_size(data) if fmt == "JPEG" else _png_size(data) if fmt == "PNG" else None
    if size is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data), formats=[fmt]) as probe:  # reads the header only
                    size = probe.size
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageRejectedError(f"decompression bomb: {e}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageRejectedError(clean_message(f"corrupt {fmt} image: {type(e).__name__}: {e}", 500)) from None
    w, h = size
    if w * h > max_pixels:
        raise ImageRejectedError(f"image is {w}x{h} = {w * h} pixels, limit {max_pixels}")
    return ImageHeader(fmt, w, h, hashlib.sha256(data).hexdigest())


@dataclass(frozen=True)
class PixelBudget:
    """The served model's image budget: what its image processor resizes every image to (Qwen2-VL's
    ``smart_resize``: sides rounded to multiples of ``factor``, area within ``max_pixels``, aspect kept).

    An image resized to :meth:`target` on the worker is left as it is by the server's processor, so the
    server's CPU decodes a small image instead of resizing a large one, and the request carries fewer bytes.
    """

    max_pixels: int
    factor: int = 28  # patch_size x merge_size (Qwen2-VL: 14 x 2)
    source: str = ""  # where it was read from, for logs

    @classmethod
    def from_preprocessor(cls, config: dict[str, object], source: str = "") -> PixelBudget | None:
        """The budget a Qwen-VL image processor's ``preprocessor_config.json`` declares (``max_pixels``, or
        ``size.longest_edge``, an area in pixels as newer Qwen2-VL processors write it); None for any other
        processor (``longest_edge`` is a side length there) or when it declares none."""
        kind = config.get("image_processor_type")
        if not isinstance(kind, str) or not kind.startswith(("Qwen2VL", "Qwen2_5_VL", "Qwen3VL")):
            return None
        size = config.get("size")
        raw = config.get("max_pixels") or (size.get("max_pixels") or size.get("longest_edge") if isinstance(size, dict) else None)
        patch, merge = config.get("patch_size", 14), config.get("merge_size", 2)
        if not isinstance(raw, int) or raw <= 0 or not isinstance(patch, int) or not isinstance(merge, int):
            return None
        return cls(raw, max(1, patch * merge), source)

    def target(self, width: int, height: int) -> tuple[int, int]:
        """The size the model's processor gives a ``width`` x ``height`` image when it is over the budget; the
        image's own size when it is within it (never an upscale: the server does that from fewer bytes)."""
        f = self.factor
        if width * height <= self.max_pixels or min(width, height) < f:
            return width, height
        w, h = round(width / f) * f, round(height / f) * f  # as smart_resize: rounded, and if still over, shrunk
        if w * h > self.max_pixels:
            beta = math.sqrt(width * height / self.max_pixels)
            w, h = max(f, math.floor(width / beta / f) * f), max(f, math.floor(height / beta / f) * f)
        return w, h


_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
"""JPEG start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic): they carry the size."""


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's first start-of-frame segment, walking the marker segments by their lengths;
    None when there is none before the scan data or the walk finds anything unexpected (PIL then reads it)."""
    i, end = 2, len(data)
    while i + 4 <= end:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xDA, 0xD9):  # scan data or the end before any frame header
            return None
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2:
            return None
        if marker in _JPEG_SOF:
            if length < 7 or i + 9 > end:
                return None
            h, w = int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
            return (w, h) if w and h else None  # a height of 0 (defined later by a DNL marker): PIL decides
        i += 2 + length
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, which must come first; None otherwise (PIL then reads it)."""
    if len(data) < 24 or data[12:16] != b"IHDR" or data[8:12] != b"\x00\x00\x00\x0d":
        return None
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return (w, h) if w and h else None


def prepare_image(
    data: bytes,
    max_bytes: int = 10 * 1024 * 1024,
    max_pixels: int = 40_000_000,
    max_side: int = 1024,
    header: ImageHeader | None = None,
    budget: PixelBudget | None = None,
) -> PreparedImage:
    """Validate ``data`` and return it ready to send: at most ``max_side`` a side, and within the served model's
    ``budget`` when one is known (then exactly the size its processor would resize to, so the server does not
    resize again). Re-encoded as JPEG (quality 95) only when resized or not JPEG/PNG.

    ``header``, from :func:`inspect_image` of the same bytes with the same limits, skips repeating those checks."""
    if header is None:
        header = inspect_image(data, max_bytes, max_pixels)
    fmt, w, h, sha = header.fmt, header.width, header.height, header.sha256
    scale = min(1.0, max_side / max(w, h))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if budget is not None:
        size = budget.target(*size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as probe:
                if probe.size != (w, h):  # the pixel bound was checked on the header's size: PIL must read the same
                    raise ImageRejectedError(f"corrupt {fmt} image: its header says {w}x{h}, PIL reads {probe.size[0]}x{probe.size[1]}")
                probe.verify()
            with Image.open(io.BytesIO(data), formats=[fmt]) as img:
                if fmt == "JPEG" and size != (w, h):
                    img.draft("RGB", size)  # decode at 1/2 to 1/8 scale (DCT scaling): still every byte of the body
                img.load()  # full decode: catches truncated bodies verify() misses
                if size == (w, h) and fmt in ("JPEG", "PNG"):
                    return PreparedImage(data, ALLOWED_FORMATS[fmt], w, h, sha)
                rgb = img.convert("RGB")
                if rgb.size != size:
                    rgb = rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
                out = io.BytesIO()
                rgb.save(out, format="JPEG", quality=95)
                return PreparedImage(out.getvalue(), "image/jpeg", rgb.width, rgb.height, sha)
    except ImageRejectedError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejectedError(f"decompression bomb: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageRejectedError(clean_message(f"corrupt {fmt} image: {type(e).__name__}: {e}", 500)) from None
