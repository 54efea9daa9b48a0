"""Fetch listing images safely: file:// under one allowed root, http(s):// from an
allow-list of hosts, with byte, time and pixel limits.

Contract of :meth:`ImageLoader.load`
- Returns the raw bytes, already checked by :func:`inference.images.prepare_image`
  (type sniffed, fully decodable, under the pixel limit: decompression bombs refused).
- Raises :class:`ImageRejectedError` (not retriable) for a disallowed scheme, path
  or host, a missing file, an HTTP 4xx, a body over the byte limit, or bad bytes.
- Raises :class:`ImageFetchError` (retriable) for timeouts, connection errors and
  HTTP 5xx/429; the caller retries with backoff and dead-letters after its attempts.
- SSRF: only allow-listed host names are contacted; their addresses must not be
  loopback/private/link-local unless ``allow_private_addresses`` (tests, on-prem CDNs);
  redirects are not followed (a redirect is a rejection naming its target).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import urllib.parse
from pathlib import Path

import httpx

from inference.images import ImageRejectedError, prepare_image
from schemas.errors import ErrorKind, OpalError


class ImageFetchError(OpalError):
    """A transient failure fetching an image (timeout, connection error, 5xx)."""

    reason = ErrorKind.IMAGE_FETCH
    retriable = True


class ImageLoader:
    def __init__(
        self,
        allowed_file_root: Path | None,
        allowed_http_hosts: list[str],
        max_bytes: int,
        max_pixels: int,
        timeout_s: float,
        allow_private_addresses: bool = False,
    ) -> None:
        self.root = allowed_file_root.resolve() if allowed_file_root else None
        self.hosts = {h.lower() for h in allowed_http_hosts}
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.timeout_s = timeout_s
        self.allow_private = allow_private_addresses
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), follow_redirects=False)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def load(self, uri: str) -> bytes:
        parsed = urllib.parse.urlsplit(uri)
        if parsed.scheme == "file":
            data = self._load_file(parsed)
        elif parsed.scheme in ("http", "https"):
            try:
                data = await asyncio.wait_for(self._load_http(uri, parsed), self.timeout_s)  # whole-download limit
            except TimeoutError:
                raise ImageFetchError(f"GET {uri[:200]} took longer than {self.timeout_s} s") from None
        else:
            raise ImageRejectedError(f"scheme {parsed.scheme or '(none)'!r} not allowed in {uri[:200]!r}")
        prepare_image(data, self.max_bytes, self.max_pixels)  # raises ImageRejectedError
        return data

    def _load_file(self, parsed: urllib.parse.SplitResult) -> bytes:
        if self.root is None:
            raise ImageRejectedError("file:// images are disabled (set OPAL_WORKER_ALLOWED_FILE_ROOT)")
        if parsed.netloc not in ("", "localhost"):
            raise ImageRejectedError(f"file:// URI names a host {parsed.netloc!r}")
        path = Path(urllib.parse.unquote(parsed.path)).resolve()
        if not path.is_relative_to(self.root):
            raise ImageRejectedError(f"file {path} is outside the allowed root {self.root}")
        try:
            size = path.stat().st_size
            if size > self.max_bytes:
                raise ImageRejectedError(f"image file is {size} bytes, limit {self.max_bytes}")
            with path.open("rb") as f:
                return f.read(self.max_bytes + 1)
        except FileNotFoundError:
            raise ImageRejectedError(f"image file not found: {path}") from None
        except IsADirectoryError:
            raise ImageRejectedError(f"image path is a directory: {path}") from None
        except PermissionError:
            raise ImageRejectedError(f"image file not readable: {path}") from None

    def _check_host(self, host: str, port: int) -> None:
        if host.lower() not in self.hosts:
            raise ImageRejectedError(f"host {host!r} is not in OPAL_WORKER_ALLOWED_HTTP_HOSTS")
        if self.allow_private:
            return
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise ImageFetchError(f"cannot resolve {host!r}: {e}") from None
        for info in infos:
            ip = ipaddress.ip_address(info[4][0])
            if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast or ip.is_unspecified:
                raise ImageRejectedError(f"host {host!r} resolves to non-public address {ip}")

    async def _load_http(self, uri: str, parsed: urllib.parse.SplitResult) -> bytes:
        host = parsed.hostname or ""
        self._check_host(host, parsed.port or (443 if parsed.scheme == "https" else 80))
        try:
            async with self._http.stream("GET", uri) as r:
                if r.is_redirect:
                    raise ImageRejectedError(f"redirect to {r.headers.get('location', '?')[:200]!r} not followed")
                if r.status_code == 429 or r.status_code >= 500:
                    raise ImageFetchError(f"GET {uri[:200]} answered HTTP {r.status_code}")
                if r.status_code >= 400:
                    raise ImageRejectedError(f"GET {uri[:200]} answered HTTP {r.status_code}")
                declared = r.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    raise ImageRejectedError(f"image is {declared} bytes, limit {self.max_bytes}")
                chunks: list[bytes] = []
                total = 0
                async for chunk in r.aiter_bytes():
                    total += len(chunk)
                    if total > self.max_bytes:
                        raise ImageRejectedError(f"image body exceeds {self.max_bytes} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
        except (httpx.TimeoutException, httpx.TransportError) as e:
            raise ImageFetchError(f"GET {uri[:200]} failed: {type(e).__name__}: {e}") from None
