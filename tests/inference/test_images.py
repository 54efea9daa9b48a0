"""Image checks before any model request: every bad image is rejected with a reason."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from inference.images import ImageRejectedError, PixelBudget, prepare_image, sniff
from opal.samples import load_samples
from schemas.errors import ErrorKind
from tests.support import REPO


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


def test_a_png_whose_text_chunks_inflate_costs_the_header_check_nothing_and_is_refused_before_the_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PIL's open decompresses a PNG's text chunks (64 MB allowed by default; a 66 KB file cost 337 ms): the header
    check reads IHDR alone, and the full decode allows 2 MB of text, so a few KB inflating to megabytes is refused."""
    import io

    from PIL import Image, PngImagePlugin

    from inference.images import ImageRejectedError, inspect_image

    info = PngImagePlugin.PngInfo()
    for i in range(4):
        info.add_text(f"k{i}", "a" * 900_000, zip=True)  # ~1 KB each on disk, 900 KB inflated
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
    assert len(buf.getvalue()) < 20_000
    with monkeypatch.context() as m:
        m.setattr(Image, "open", None)  # the header check must not open it with PIL (that inflates the text)
        header = inspect_image(buf.getvalue())
    assert (header.width, header.height) == (8, 8)
    with pytest.raises(ImageRejectedError, match="corrupt PNG"):
        prepare_image(buf.getvalue(), header=header)


def test_the_pixel_budget_resizes_to_what_the_served_processor_would() -> None:
    """Qwen2-VL's processor (``smart_resize``): sides in multiples of 28, area within max_pixels, aspect kept. A photo
    resized to that on the worker is left alone by the server; one within the budget is sent as it is."""
    shipped = json.loads((REPO / "models" / "opal-tiny-abo" / "preprocessor_config.json").read_text())
    budget = PixelBudget.from_preprocessor(shipped)
    assert budget == PixelBudget(12544, 28)
    qwen3 = {"image_processor_type": "Qwen3VLImageProcessorFast", "max_pixels": 1003520, "patch_size": 16, "merge_size": 2}
    assert PixelBudget.from_preprocessor(qwen3) == PixelBudget(1003520, 32)
    # elsewhere longest_edge is a side, not an area; a fixed-size processor has no budget
    assert PixelBudget.from_preprocessor({"image_processor_type": "Idefics3ImageProcessor", "size": {"longest_edge": 1456}}) is None
    assert PixelBudget.from_preprocessor({"image_processor_type": "CLIPImageProcessor", "size": {"height": 224, "width": 224}}) is None
    for w, h in [(2000, 1500), (1600, 1600), (3000, 1000), (120, 110)]:
        tw, th = budget.target(w, h)
        assert tw % 28 == 0 and th % 28 == 0 and tw * th <= 12544 and abs(tw / th - w / h) < 0.5 * w / h
        assert budget.target(tw, th) == (tw, th)  # the server's processor would keep it
    assert budget.target(100, 100) == (100, 100)  # within the budget: never an upscale
    p = prepare_image(_png(2000, 1500), budget=budget)
    assert (p.width, p.height) == budget.target(2000, 1500) == (112, 84) and p.mime == "image/jpeg"
    photo = io.BytesIO()  # a JPEG is decoded at a reduced scale for a small budget: every byte is still decoded
    Image.open(io.BytesIO(load_samples()[0].image.read_bytes())).resize((2000, 1500)).save(photo, format="JPEG", quality=90)
    small_jpeg = prepare_image(photo.getvalue(), budget=budget)
    assert (small_jpeg.width, small_jpeg.height) == (112, 84)
    with pytest.raises(ImageRejectedError, match="truncated"):
        prepare_image(photo.getvalue()[: len(photo.getvalue()) * 2 // 3], budget=budget)
    large = prepare_image(_png(3000, 1000), budget=PixelBudget(12_845_056))  # stock Qwen2-VL: the 1,024 px cap still holds
    assert (large.width, large.height) == (1024, 341)  # within the budget once capped: the server rounds it to 28s
    small = load_samples()[0].image.read_bytes()  # 256 x 256 = 65,536 px: over this budget
    assert (prepare_image(small, budget=PixelBudget(70_000)).data) == small
    assert (prepare_image(small, budget=budget).width, prepare_image(small, budget=budget).height) == (112, 112)


def test_the_header_size_reader_agrees_with_pil() -> None:
    """JPEG/PNG sizes come from the frame header without PIL; they must be what PIL reads, for real photos, for
    progressive JPEGs with EXIF and comments before the frame, and for PNGs; odd headers are left to PIL."""
    from inference.images import _jpeg_size, _png_size, inspect_image

    photos = [s.image.read_bytes() for s in load_samples()]
    img = Image.open(io.BytesIO(photos[0])).convert("RGB").resize((301, 177))
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x010F] = "OPAL test camera"
    img.save(buf, format="JPEG", progressive=True, exif=exif.tobytes(), comment=b"x" * 5000)
    photos.append(buf.getvalue())
    for data in photos:
        assert _jpeg_size(data) == Image.open(io.BytesIO(data)).size
    assert _png_size(_png(123, 45)) == (123, 45) and inspect_image(_png(123, 45)).width == 123
    assert _jpeg_size(photos[0][:20]) is None and _png_size(_png(10, 10)[:20]) is None  # cut short: PIL says why
    with pytest.raises(ImageRejectedError, match="corrupt JPEG"):
        inspect_image(photos[0][:20])
