"""Image checks before any model request: every bad image is rejected with a reason."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from inference.images import ImageRejectedError, prepare_image, sniff
from opal.samples import load_samples
from schemas.errors import ErrorKind


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_real_photo_passes_unchanged() -> None:
    data = load_samples()[0].image.read_bytes()
    p = prepare_image(data)
    assert p.data == data and p.mime == "image/jpeg" and (p.width, p.height) == (256, 256)
    assert p.data_url().startswith("data:image/jpeg;base64,")


def test_large_images_are_downscaled() -> None:
    p = prepare_image(_png(3000, 1500), max_side=1024)
    assert (p.width, p.height) == (1024, 512) and p.mime == "image/jpeg"


def test_gif_and_webp_are_reencoded() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buf, format="WEBP")
    assert sniff(buf.getvalue()) == "WEBP"
    assert prepare_image(buf.getvalue()).mime == "image/jpeg"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"<html>not an image</html>", "not a JPEG/PNG/WebP/GIF"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 100, "corrupt JPEG"),
        (b"%PDF-1.4 ...", "not a JPEG"),
    ],
)
def test_bad_bytes_rejected(data: bytes, message: str) -> None:
    with pytest.raises(ImageRejectedError, match=message) as ei:
        prepare_image(data)
    assert ei.value.reason is ErrorKind.INVALID_IMAGE


def test_truncated_real_photo_rejected() -> None:
    data = load_samples()[1].image.read_bytes()
    with pytest.raises(ImageRejectedError, match="corrupt"):
        prepare_image(data[: len(data) // 2])


def test_size_limits() -> None:
    with pytest.raises(ImageRejectedError, match="bytes, limit"):
        prepare_image(_png(10, 10), max_bytes=20)
    with pytest.raises(ImageRejectedError, match="pixels, limit"):
        prepare_image(_png(200, 200), max_pixels=10_000)


def test_decompression_bomb_rejected_without_decoding() -> None:
    """A small PNG that claims 40000x40000 pixels: refused from its header alone."""
    buf = io.BytesIO()
    Image.new("1", (40000, 40000)).save(buf, format="PNG")
    data = buf.getvalue()
    assert len(data) < 1_000_000
    with pytest.raises(ImageRejectedError, match=r"decompression bomb|pixels, limit"):
        prepare_image(data)
    with pytest.raises(ImageRejectedError, match="pixels, limit"):  # our own limit, below Pillow's
        prepare_image(_png(3000, 3000), max_pixels=5_000_000)


def test_header_checks_refuse_a_png_whose_text_chunks_inflate() -> None:
    """Opening a PNG decompresses its text chunks: a few KB inflating to megabytes are refused at the header check."""
    import io

    from PIL import Image, PngImagePlugin

    from inference.images import ImageRejectedError, inspect_image

    info = PngImagePlugin.PngInfo()
    for i in range(4):
        info.add_text(f"k{i}", "a" * 900_000, zip=True)  # ~1 KB each on disk, 900 KB inflated
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
    assert len(buf.getvalue()) < 20_000
    with pytest.raises(ImageRejectedError, match="corrupt PNG"):
        inspect_image(buf.getvalue())
