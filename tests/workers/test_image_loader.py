"""Image loading guards: file root, host allow-list, SSRF, redirects, size limits, retriable errors."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from inference.images import ImageRejectedError
from opal.samples import load_samples
from workers.image_loader import ImageFetchError, ImageLoader
from workers.metrics import WorkerMetrics

PHOTO = load_samples()[0].image.read_bytes()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/photo.jpg":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PHOTO)))
            self.end_headers()
            self.wfile.write(PHOTO)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data")
            self.end_headers()
        elif self.path == "/busy":
            self.send_response(503)
            self.end_headers()
        elif self.path == "/huge":
            self.send_response(200)
            self.end_headers()  # no Content-Length: the body is counted while streaming
            self.wfile.write(b"\xff\xd8\xff" + b"\x00" * 300_000)
        else:
            self.send_response(404)
            self.end_headers()


@pytest.fixture
def http_base() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://localhost:{server.server_address[1]}"
    server.shutdown()


def _load(loader: ImageLoader, uri: str) -> bytes:
    """The bytes the loader would send (a small photo is sent as it is), after checking its source digest."""

    async def go() -> bytes:
        try:
            image = await loader.load(uri)
            assert image.source_sha256 == hashlib.sha256(image.data).hexdigest()
            return image.data
        finally:
            await loader.aclose()

    return asyncio.run(go())


def _loader(root: Path | None = None, hosts: list[str] | None = None, private: bool = True, max_bytes: int = 200_000) -> ImageLoader:
    return ImageLoader(root, hosts or [], max_bytes, 40_000_000, 5.0, allow_private_addresses=private)


def test_file_under_root_loads_and_outside_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(PHOTO)
    assert _load(_loader(tmp_path), (tmp_path / "a.jpg").as_uri()) == PHOTO
    for uri, msg in [
        ((tmp_path / ".." / "etc-passwd").as_uri(), "outside the allowed root"),
        ("file:///etc/passwd", "outside the allowed root"),
        ((tmp_path / "missing.jpg").as_uri(), "not found"),
        ("file://otherhost/x.jpg", "names a host"),
        ("ftp://example.com/a.jpg", "scheme 'ftp' not allowed"),
        ("gopher:x", "not allowed"),
    ]:
        with pytest.raises(ImageRejectedError, match=msg):
            _load(_loader(tmp_path), uri)
    with pytest.raises(ImageRejectedError, match="disabled"):
        _load(_loader(None), (tmp_path / "a.jpg").as_uri())


def test_symlink_out_of_root_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(PHOTO)
    root = tmp_path / "root"
    root.mkdir()
    (root / "link.jpg").symlink_to(outside)
    with pytest.raises(ImageRejectedError, match="outside the allowed root"):
        _load(_loader(root), (root / "link.jpg").as_uri())


def test_special_files_in_the_root_are_refused_without_opening_them(tmp_path: Path) -> None:
    """A FIFO would block a plain open and a device's driver would run: neither is opened for reading."""
    os.mkfifo(tmp_path / "fifo.jpg")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    (tmp_path / "dir.jpg").mkdir()
    for name, msg in [("fifo.jpg", "not a regular file"), ("zero.jpg", "outside the allowed root"), ("dir.jpg", "is a directory")]:
        with pytest.raises(ImageRejectedError, match=msg):
            _load(_loader(tmp_path), (tmp_path / name).as_uri())


def test_http_allow_list_and_guards(http_base: str) -> None:
    assert _load(_loader(hosts=["localhost"]), f"{http_base}/photo.jpg") == PHOTO
    with pytest.raises(ImageRejectedError, match="not in OPAL_WORKER_ALLOWED_HTTP_HOSTS"):
        _load(_loader(hosts=["cdn.example.com"]), f"{http_base}/photo.jpg")
    with pytest.raises(ImageRejectedError, match="non-public address"):  # SSRF: allow-listed name, loopback address
        _load(_loader(hosts=["localhost"], private=False), f"{http_base}/photo.jpg")
    with pytest.raises(ImageRejectedError, match=r"redirect .* not followed"):
        _load(_loader(hosts=["localhost"]), f"{http_base}/redirect")
    with pytest.raises(ImageRejectedError, match="HTTP 404"):
        _load(_loader(hosts=["localhost"]), f"{http_base}/nope")
    with pytest.raises(ImageRejectedError, match="exceeds 200000 bytes"):
        _load(_loader(hosts=["localhost"]), f"{http_base}/huge")
    with pytest.raises(ImageFetchError, match="HTTP 503") as ei:
        _load(_loader(hosts=["localhost"]), f"{http_base}/busy")
    assert ei.value.retriable


def test_unreachable_host_is_retriable() -> None:
    with pytest.raises(ImageFetchError) as ei:
        _load(_loader(hosts=["127.0.0.1"]), "http://127.0.0.1:9/a.jpg")
    assert ei.value.retriable
    assert ei.value.dependency == "image-host:http://127.0.0.1:9"  # an outage of the host class, not of the record


@pytest.mark.parametrize(
    ("path", "expect"),
    [
        ("/" + "x" * 1_000_000, "ENAMETOOLONG"),  # the 1 MB file URI of the oversize-record incident
        ("/a.jpg/inside-a-file", "ENOTDIR"),
        ("/with\x00nul.jpg", "invalid image path"),
    ],
)
def test_every_os_error_becomes_a_typed_rejection(tmp_path: Path, path: str, expect: str) -> None:
    (tmp_path / "a.jpg").write_bytes(PHOTO)
    uri = "file://" + urllib.request.pathname2url(str(tmp_path)) + path.replace("\x00", "%00")
    with pytest.raises(ImageRejectedError) as ei:
        _load(_loader(tmp_path), uri)
    assert expect in str(ei.value) and len(str(ei.value)) < 1000 and not ei.value.retriable


@pytest.mark.parametrize("uri", ["http://localhost:99999/a.jpg", "http://localhost:abc/a.jpg", "http://[::1/a.jpg"])
def test_unparsable_uris_are_typed_rejections(uri: str) -> None:
    with pytest.raises(ImageRejectedError, match="unparsable image URI"):
        _load(_loader(hosts=["localhost"]), uri)


def test_probe_says_whether_a_host_answers(http_base: str) -> None:
    async def go(dep: str) -> None:
        loader = _loader(hosts=["localhost", "127.0.0.1"])
        try:
            await loader.probe(dep)
        finally:
            await loader.aclose()

    asyncio.run(go("image-host:" + http_base))  # any answer but 429/502/503/504 (here 501 for HEAD) means up
    with pytest.raises(ImageFetchError):
        asyncio.run(go("image-host:http://127.0.0.1:9"))


def test_metrics_endpoint_serves_worker_metrics() -> None:
    m = WorkerMetrics()
    m.cache_hits.inc(3)
    port = m.serve(0)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for name in (
        "opal_enrich_consumed_total",
        "opal_enrich_dead_letters_total",
        "opal_enrich_model_latency_seconds_bucket",
        "opal_enrich_in_flight",
        "opal_enrich_lag",
        "opal_enrich_batch_size_bucket",
    ):
        assert name in body or name.split("_bucket")[0] in body, name
    assert "opal_enrich_cache_hits_total 3.0" in body
