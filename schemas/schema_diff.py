"""What changed between two category-schema sets, and the versions that follow from it.

:func:`diff_schemas` compares by slug and aspect name: categories added or removed, and
per changed category the aspects added or removed, values added to or removed from a
closed set, and flags that changed (visual, usage, cardinality, mode, title bound).
:func:`bump_versions` gives every changed category a version above the old one when the
new file did not already raise it, so a cache keyed on the version misses and an
AspectEvent names the schema it was really checked against. Both are pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from schemas.category import AspectSpec, CategorySchema


@dataclass(frozen=True)
class CategoryChange:
    """How one category's schema changed."""

    category: str
    old_version: int
    new_version: int
    aspects_added: list[str] = field(default_factory=list)
    aspects_removed: list[str] = field(default_factory=list)
    values_added: dict[str, list[str]] = field(default_factory=dict)
    values_removed: dict[str, list[str]] = field(default_factory=dict)
    flags: dict[str, list[str]] = field(default_factory=dict)  # aspect (or "(category)") -> ["visual: True -> False", ...]

    def summary(self) -> str:
        parts = []
        if self.aspects_added:
            parts.append("+" + ", +".join(self.aspects_added))
        if self.aspects_removed:
            parts.append("-" + ", -".join(self.aspects_removed))
        for name, vs in self.values_added.items():
            parts.append(f"{name}: +{len(vs)} value{'s' * (len(vs) != 1)}")
        for name, vs in self.values_removed.items():
            parts.append(f"{name}: -{len(vs)} value{'s' * (len(vs) != 1)}")
        for name, fs in self.flags.items():
            parts.append(f"{name}: {'; '.join(fs)}")
        return "; ".join(parts) or "description only"


@dataclass(frozen=True)
class SchemaDiff:
    added: list[str]
    removed: list[str]
    changed: list[CategoryChange]
    unchanged: int

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


def _flags(a: AspectSpec) -> dict[str, object]:
    return {
        "visual": a.visual,
        "usage": "required" if a.required else "recommended" if a.recommended else "optional",
        "multi": a.multi,
        "mode": "selection only" if a.values is not None else "free text",
    }


def _change(old: CategorySchema, new: CategorySchema) -> CategoryChange | None:
    if old.model_dump(exclude={"version"}) == new.model_dump(exclude={"version"}):
        return None
    c = CategoryChange(old.category, old.version, new.version)
    c.aspects_added.extend(n for n in new.names if old.aspect(n) is None)
    c.aspects_removed.extend(n for n in old.names if new.aspect(n) is None)
    if old.title_max_chars != new.title_max_chars:
        c.flags["(category)"] = [f"title_max_chars: {old.title_max_chars} -> {new.title_max_chars}"]
    for a in new.aspects:
        before = old.aspect(a.name)
        if before is None:
            continue
        old_vals, new_vals = before.values or before.suggested or [], a.values or a.suggested or []
        if plus := [v for v in new_vals if v not in old_vals]:
            c.values_added[a.name] = plus
        if minus := [v for v in old_vals if v not in new_vals]:
            c.values_removed[a.name] = minus
        fo, fn = _flags(before), _flags(a)
        if moved := [f"{k}: {fo[k]} -> {fn[k]}" for k in fo if fo[k] != fn[k]]:
            c.flags[a.name] = moved
    return c


def diff_schemas(old: Mapping[str, CategorySchema], new: Mapping[str, CategorySchema]) -> SchemaDiff:
    """``old`` -> ``new``, both by slug."""
    changed = [c for slug in sorted(set(old) & set(new)) if (c := _change(old[slug], new[slug])) is not None]
    return SchemaDiff(
        added=sorted(set(new) - set(old)),
        removed=sorted(set(old) - set(new)),
        changed=changed,
        unchanged=len(set(old) & set(new)) - len(changed),
    )


def bump_versions(old: Mapping[str, CategorySchema], new: Mapping[str, CategorySchema]) -> dict[str, CategorySchema]:
    """``new`` with every changed category's version raised above the old one where the file did not raise it."""
    out = dict(new)
    for c in diff_schemas(old, new).changed:
        if c.new_version <= c.old_version:
            out[c.category] = new[c.category].model_copy(update={"version": c.old_version + 1})
    return out
