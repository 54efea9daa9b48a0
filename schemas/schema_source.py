"""Where category schemas come from, and a registry that follows changes to them.

A schema *location* is a folder of per-category files (``schemas/categories/``: one
``<slug>.json`` each, ``schemas/categories/README.md``), a folder holding bulk files, or
a single bulk file (:mod:`schemas.bulk`). Several locations merge in order, **a later
location overriding an earlier one** category by category. The packaged default
(:data:`DEFAULT_LOCATIONS`) is the schema set induced from the ABO catalogue
(``schemas/induced/abo.json``, ``opal schemas induce``) overridden by the 25 hand-written
schemas. Operators point ``OPAL_SCHEMAS_PATHS`` at their own taxonomy.

:class:`SchemaWatcher` holds the current :class:`~schemas.category_schema.CategoryRegistry` of a
set of locations and swaps in a new one when a file changes (checked at most every
``reload_s`` seconds from :meth:`SchemaWatcher.poll`, or at once after
:meth:`SchemaWatcher.request_reload`, which is safe to call from a signal handler). A set
that fails to load is refused as a whole: the old registry stays in use and the error is
kept in :attr:`SchemaWatcher.last_error` until the files change again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

from schemas.bulk import is_bulk_file, read_bulk
from schemas.category_schema import CATEGORY_DIR, CategoryRegistry, CategorySchema

log = logging.getLogger(__name__)

INDUCED_DIR = Path(__file__).parent / "induced"
DEFAULT_LOCATIONS: tuple[Path, ...] = (INDUCED_DIR / "abo.json", CATEGORY_DIR)

Fingerprint = tuple[tuple[str, int, int], ...]


def _files(location: Path) -> list[Path]:
    if location.is_dir():
        return sorted(location.glob("*.json"))
    if location.is_file():
        return [location]
    raise ValueError(f"schema location {location} does not exist")


def load_location(location: Path) -> dict[str, CategorySchema]:
    """The schemas of one location, by slug (module docstring). Raises ``ValueError`` naming the bad file."""
    found: dict[str, CategorySchema] = {}
    singles = [f for f in _files(location) if not is_bulk_file(f)]
    for f in _files(location):
        if is_bulk_file(f):
            found.update(read_bulk(f))
    if singles:
        found.update(CategoryRegistry.load_files(singles).schemas)
    if not found:
        raise ValueError(f"no category schemas in {location}")
    return found


def load_locations(locations: Sequence[Path]) -> CategoryRegistry:
    """One registry of every location, later ones overriding earlier ones category by category."""
    if not locations:
        raise ValueError("no schema location given")
    merged: dict[str, CategorySchema] = {}
    for loc in locations:
        merged.update(load_location(Path(loc)))
    return CategoryRegistry(merged)


def fingerprint(locations: Sequence[Path]) -> Fingerprint:
    """(path, size, mtime_ns) of every file the locations hold: cheap to take, changes when a file does."""
    out: list[tuple[str, int, int]] = []
    for loc in locations:
        try:
            files = _files(Path(loc))
        except ValueError:
            out.append((str(loc), -1, -1))
            continue
        for f in files:
            try:
                st = f.stat()
            except OSError:
                continue
            out.append((str(f), st.st_size, st.st_mtime_ns))
    return tuple(out)


class SchemaWatcher:
    """The current registry of ``locations``, reloaded when they change (module docstring).

    Not thread-safe; one event loop calls :meth:`poll`. :attr:`registry` is always a
    complete, validated set: readers never see a half-loaded one.
    """

    def __init__(
        self,
        locations: Sequence[Path],
        reload_s: float = 5.0,
        on_reload: Callable[[CategoryRegistry], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.locations = [Path(p) for p in locations]
        self.reload_s = reload_s
        self.on_reload = on_reload
        self._clock = clock
        self._fp = fingerprint(self.locations)
        self.registry = load_locations(self.locations)  # a bad set at start is the caller's error: raise
        self._checked = clock()
        self._requested = False
        self.reloads = 0
        self.failures = 0
        self.last_error: str | None = None

    def request_reload(self) -> None:
        """Re-read on the next :meth:`poll` even if no file looks changed (SIGHUP). Signal-safe: sets a flag."""
        self._requested = True

    def poll(self) -> bool:
        """Reload when asked to or when the files changed since the last look; True when a new set took effect."""
        now = self._clock()
        if not self._requested and (self.reload_s <= 0 or now - self._checked < self.reload_s):
            return False
        self._checked = now
        fp = fingerprint(self.locations)
        if fp == self._fp and not self._requested:
            return False
        self._requested = False
        self._fp = fp
        try:
            fresh = load_locations(self.locations)
        except (ValueError, OSError) as e:
            self.failures += 1
            self.last_error = str(e)
            log.error("schema reload refused, keeping the %d schemas in use: %s", len(self.registry), e)
            return False
        self.last_error = None
        changed = fresh.schemas != self.registry.schemas
        self.registry = fresh
        if changed:
            self.reloads += 1
            log.info("schemas reloaded: %d categories from %s", len(fresh), ", ".join(map(str, self.locations)))
            if self.on_reload is not None:
                self.on_reload(fresh)
        return changed


@cache
def default_categories() -> CategoryRegistry:
    """The category schemas shipped with OPAL (loaded once per process): :data:`DEFAULT_LOCATIONS`, the set induced
    from the ABO catalogue overridden by the hand-written ones. Re-exported by :mod:`schemas.category`."""
    return load_locations(DEFAULT_LOCATIONS)


def configured_categories(locations: Sequence[Path]) -> CategoryRegistry:
    """The registry of ``locations`` (``OpalSettings().schemas.paths``); the packaged default is loaded once per process."""
    if tuple(Path(p).resolve() for p in locations) == tuple(p.resolve() for p in DEFAULT_LOCATIONS):
        return default_categories()
    return load_locations(locations)
