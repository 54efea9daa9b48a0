"""Fetch listing images safely: file:// under one allowed root, http(s):// from an
allow-list of hosts, with byte, time and pixel limits.

Contract of :meth:`ImageLoader.fetch`, :meth:`ImageLoader.prepare` and :meth:`ImageLoader.load`
- :meth:`fetch` returns the bytes as fetched with their header checked
  (:func:`inference.images.inspect_image`: type sniffed, header readable, under the byte and
  pixel limits) and their SHA-256, without decoding a pixel: enough for a cache look-up.
- :meth:`prepare` decodes fully (decompression bombs and truncated bodies refused) and
  downscales if large: the image a model request may carry. CPU-bound; thread-safe.
- :meth:`load` is both: the image prepared, with the SHA-256 of the bytes as fetched.
- Raises :class:`ImageRejectedError` (not retriable) for a disallowed scheme, path
  or host, a missing file, an HTTP 4xx, a body over the byte limit, or bad bytes.
- Raises :class:`ImageFetchError` (retriable) for timeouts, connection errors and
  HTTP 5xx/429, with ``dependency`` naming the host (``image-host:<scheme>://<host>:<port>``)
  so a worker can tell a host outage from one bad URL (:mod:`schemas.retry`); and for
  transient file-system errors (EIO, EAGAIN, ENFILE, ...). Every other ``OSError`` of a
  file path (name too long, not a directory, loop, embedded NUL ...) is an
  :class:`ImageRejectedError` naming the errno; no other exception type escapes for input.
- SSRF: only allow-listed host names are contacted; their addresses must not be
  loopback/private/link-local unless ``allow_private_addresses`` (tests, on-prem CDNs);
  redirects are not followed (a redirect is a rejection naming its target).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import stat
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import httpx

from inference.images import ImageHeader, ImageRejectedError, PixelBudget, PreparedImage, inspect_image, prepare_image
from schemas.errors import ErrorKind, OpalError
from schemas.settings import WorkerSettings


@dataclass(frozen=True)
class FetchedImage:
    """Bytes as fetched, header checked (:func:`inference.images.inspect_image`); not yet decoded."""

    data: bytes
    header: ImageHeader

    @property
    def sha256(self) -> str:
        return self.header.sha256


class ImageFetchError(OpalError):
    """A transient failure fetching an image (timeout, connection error, 5xx)."""

    reason = ErrorKind.IMAGE_FETCH
    retriable = True


TRANSIENT_ERRNOS = frozenset(
    {errno.EIO, errno.EAGAIN, errno.EINTR, errno.ENFILE, errno.EMFILE, errno.ENOMEM, errno.ESTALE, errno.ETIMEDOUT, errno.EBUSY}
)
"""File-system errors that may pass on a retry (NFS hiccups, descriptor exhaustion); all others reject the image."""


def host_dependency(parsed: urllib.parse.SplitResult) -> str:
    """The dependency name of an http(s) image host: ``image-host:<scheme>://<host>:<port>``."""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return f"image-host:{parsed.scheme}://{parsed.hostname or ''}:{port}"


def _short(text: str, limit: int = 200) -> str:
    """``text`` as a repr cut to ``limit`` characters, saying how long it was."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} chars)"


def _errno_text(e: OSError) -> str:
    name = errno.errorcode.get(e.errno or 0, "OSError")
    return f"{name} ({e.strerror or 'no message'})"


def _under_prefix(root: str) -> str:
    """What every path under ``root`` starts with (``/data`` -> ``/data/``; ``/`` stays ``/``)."""
    return root if root.endswith(os.sep) else root + os.sep


O_PATH = getattr(os, "O_PATH", 0)
"""Linux: a descriptor that names a file without opening it for I/O (no device driver runs, no FIFO blocks)."""


def _read_fd(fd: int, size: int, max_bytes: int) -> bytes:
    """All bytes of the open regular file, ``size`` from fstat (it may grow meanwhile; a read may come back short
    on FUSE or network file systems): read to the end, refusing more than ``max_bytes``."""
    chunks: list[bytes] = []
    total = 0
    while total <= max_bytes:
        more = os.read(fd, max(size - total, 0) + 1 if total < size else max_bytes + 1 - total)
        if not more:
            break
        chunks.append(more)
        total += len(more)
    if total > max_bytes:
        raise ImageRejectedError(f"image file grew past the limit of {max_bytes} bytes while read")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


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
        self.root = allowed_file_root.resolve() if allowed_file_root else None  # the one resolve of the root
        # what a path must lie under: the root as resolved, and as configured (a root reached through a link);
        # the file actually opened is then checked against the resolved root by the kernel's answer
        self._lexical_roots = (
            tuple({_under_prefix(str(self.root)), _under_prefix(os.path.abspath(allowed_file_root))}) if allowed_file_root else ()
        )
        self.hosts = {h.lower() for h in allowed_http_hosts}
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.timeout_s = timeout_s
        self.allow_private = allow_private_addresses
        self.budget: PixelBudget | None = None  # the served model's image budget, once known (see EnrichWorker.run)
        self._by_descriptor = bool(O_PATH) and os.path.isdir("/proc/self/fd")  # else resolve, then open (sandboxes without /proc)
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), follow_redirects=False)

    @classmethod
    def from_settings(cls, w: WorkerSettings) -> ImageLoader:
        """The loader the worker settings ask for (allowed root and hosts, byte, pixel and time limits)."""
        return cls(
            w.allowed_file_root,
            w.allowed_http_hosts,
            w.image_max_bytes,
            w.image_max_pixels,
            w.image_fetch_timeout_s,
            allow_private_addresses=w.allow_private_addresses,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def load(self, uri: str) -> PreparedImage:
        """The image at ``uri``, fetched and prepared (see the module contract)."""
        return self.prepare(await self.fetch(uri))

    def prepare(self, fetched: FetchedImage) -> PreparedImage:
        """Fully decode and normalise a fetched image (resized to :attr:`budget` when one is set); raises
        :class:`ImageRejectedError` for bad pixels."""
        return prepare_image(fetched.data, self.max_bytes, self.max_pixels, header=fetched.header, budget=self.budget)

    async def fetch(self, uri: str) -> FetchedImage:
        """The bytes at ``uri`` with their header checked and hashed; no pixel is decoded."""
        local = self.fetch_local(uri)
        if local is not None:
            return local
        parsed = urllib.parse.urlsplit(uri)  # http(s): fetch_local parsed and checked it already
        try:
            data = await asyncio.wait_for(self._load_http(uri, parsed), self.timeout_s)  # whole-download limit
        except TimeoutError:
            raise ImageFetchError(f"GET {_short(uri)} took longer than {self.timeout_s} s", host_dependency(parsed)) from None
        return FetchedImage(data, inspect_image(data, self.max_bytes, self.max_pixels))  # raises ImageRejectedError

    def fetch_local(self, uri: str) -> FetchedImage | None:
        """:meth:`fetch` for what needs no network, without the event loop: a file:// image, or the refusal of a
        URI (unparsable, scheme not allowed). None for an http(s) URI: :meth:`fetch` it. Same errors as fetch."""
        try:
            parsed = urllib.parse.urlsplit(uri)
            _ = parsed.port  # raises for a port out of range or not a number
        except ValueError as e:  # e.g. an invalid IPv6 literal or port
            raise ImageRejectedError(f"unparsable image URI {_short(uri)}: {e}") from None
        if parsed.scheme in ("http", "https"):
            return None
        if parsed.scheme != "file":
            raise ImageRejectedError(f"scheme {parsed.scheme[:20] or '(none)'!r} not allowed in {_short(uri)}")
        data = self._load_file(parsed)
        return FetchedImage(data, inspect_image(data, self.max_bytes, self.max_pixels))  # raises ImageRejectedError

    async def probe(self, dependency: str) -> None:
        """Is the image host named by ``dependency`` (from an :class:`ImageFetchError`) answering?

        One HEAD of its root, no retries: any HTTP answer but 429/502/503/504 means it is up. Raises
        :class:`ImageFetchError` otherwise. The host is checked against the allow-list again.
        """
        base = dependency.removeprefix("image-host:")
        if base.startswith("file://"):
            try:
                os.stat(self.root or "/")
            except OSError as e:
                raise ImageFetchError(f"image root {self.root} unreadable: {_errno_text(e)}", dependency) from None
            return
        parsed = urllib.parse.urlsplit(base)
        self._check_host(parsed.hostname or "", parsed.port or 443, dependency)
        try:
            r = await self._http.head(base + "/", timeout=min(5.0, self.timeout_s))
        except (httpx.TimeoutException, httpx.TransportError) as e:
            raise ImageFetchError(f"probe of {base} failed: {type(e).__name__}", dependency) from None
        if r.status_code in (429, 502, 503, 504):
            raise ImageFetchError(f"probe of {base} answered HTTP {r.status_code}", dependency)

    def _load_file(self, parsed: urllib.parse.SplitResult) -> bytes:
        """The file's bytes, when the file named is a regular file under the root.

        No per-record resolve: the path must lie under the root as written (after normalising ``..``); then, on
        Linux, the file is named with ``O_PATH`` (symbolic links followed by the kernel, nothing opened for I/O),
        the kernel's path of that descriptor (``/proc/self/fd``) must lie under the resolved root and it must be a
        regular file, and only then is that same file opened for reading (non-blocking). Without ``O_PATH`` or
        ``/proc`` the path is resolved first, as a fallback."""
        if self.root is None:
            raise ImageRejectedError("file:// images are disabled (set OPAL_WORKER_ALLOWED_FILE_ROOT)")
        if parsed.netloc not in ("", "localhost"):
            raise ImageRejectedError(f"file:// URI names a host {parsed.netloc[:100]!r}")
        raw_path = urllib.parse.unquote(parsed.path)
        shown = _short(raw_path)
        outside = ImageRejectedError(f"file {shown} is outside the allowed root {self.root}")
        root_prefix = _under_prefix(str(self.root))
        try:
            path = os.path.normpath(os.path.join(os.getcwd(), raw_path) if not os.path.isabs(raw_path) else raw_path)
            if not any(path.startswith(prefix) for prefix in self._lexical_roots):
                raise outside
            flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            if self._by_descriptor:
                ref = os.open(path, O_PATH | os.O_CLOEXEC)
                try:
                    if not os.readlink(f"/proc/self/fd/{ref}").startswith(root_prefix):
                        raise outside
                    self._check_regular(os.fstat(ref), shown)
                    fd = os.open(f"/proc/self/fd/{ref}", flags)  # that same file
                finally:
                    os.close(ref)
            else:
                if not os.path.realpath(path).startswith(root_prefix):
                    raise outside
                fd = os.open(path, flags)
            try:
                st = os.fstat(fd)
                self._check_regular(st, shown)
                return _read_fd(fd, st.st_size, self.max_bytes)
            finally:
                os.close(fd)
        except FileNotFoundError:
            raise ImageRejectedError(f"image file not found: {shown}") from None
        except IsADirectoryError:
            raise ImageRejectedError(f"image path is a directory: {shown}") from None
        except PermissionError:
            raise ImageRejectedError(f"image file not readable: {shown}") from None
        except OSError as e:
            if e.errno in TRANSIENT_ERRNOS:
                raise ImageFetchError(f"reading {shown} failed: {_errno_text(e)}", "image-host:file://") from None
            raise ImageRejectedError(f"image path {shown} refused by the file system: {_errno_text(e)}") from None
        except ValueError as e:  # embedded NUL byte
            raise ImageRejectedError(f"invalid image path {shown}: {e}") from None

    def _check_regular(self, st: os.stat_result, shown: str) -> None:
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise ImageRejectedError(f"image path {shown} is not a regular file")
        if st.st_size > self.max_bytes:
            raise ImageRejectedError(f"image file is {st.st_size} bytes, limit {self.max_bytes}")

    def _check_host(self, host: str, port: int, dependency: str) -> None:
        if host.lower() not in self.hosts:
            raise ImageRejectedError(f"host {host!r} is not in OPAL_WORKER_ALLOWED_HTTP_HOSTS")
        if self.allow_private:
            return
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise ImageFetchError(f"cannot resolve {host!r}: {e}", dependency) from None
        for info in infos:
            ip = ipaddress.ip_address(info[4][0])
            if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast or ip.is_unspecified:
                raise ImageRejectedError(f"host {host!r} resolves to non-public address {ip}")

    async def _load_http(self, uri: str, parsed: urllib.parse.SplitResult) -> bytes:
        host = parsed.hostname or ""
        self._check_host(host, parsed.port or (443 if parsed.scheme == "https" else 80), host_dependency(parsed))
        try:
            async with self._http.stream("GET", uri) as r:
                if r.is_redirect:
                    raise ImageRejectedError(f"redirect to {r.headers.get('location', '?')[:200]!r} not followed")
                if r.status_code == 429 or r.status_code >= 500:
                    raise ImageFetchError(f"GET {_short(uri)} answered HTTP {r.status_code}", host_dependency(parsed))
                if r.status_code >= 400:
                    raise ImageRejectedError(f"GET {_short(uri)} answered HTTP {r.status_code}")
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
            raise ImageFetchError(f"GET {_short(uri)} failed: {type(e).__name__}: {e}", host_dependency(parsed)) from None
