"""Category aspect schemas, the public entry point: ``from schemas.category import ...``.

Which aspects a category allows, their closed value sets and which of them a photo can
show (:class:`CategorySchema`, :class:`AspectSpec`, :class:`CategoryRegistry`, the generic
schema: defined in :mod:`schemas.category_schema`), and the schema set OPAL ships
(:func:`default_categories`: the packaged locations, defined in :mod:`schemas.schema_source`
beside :data:`~schemas.schema_source.DEFAULT_LOCATIONS`). The format of a category file is
in ``schemas/categories/README.md``, the bulk format in :mod:`schemas.bulk`.

Other code imports from here; the category modules themselves import from the module that
defines a name, so they stack without a cycle:
``category_schema <- bulk <- schema_source <- category`` (``tests/project/test_layout.py``
checks the whole project for cycles, imports inside functions included).
"""

from __future__ import annotations

from schemas.category_schema import (
    CATEGORY_DIR,
    GENERIC_FILE,
    OPEN_VALUE_MAX_CHARS,
    STAND_INS_KEPT,
    AspectSpec,
    CategoryRegistry,
    CategorySchema,
    generic_schema,
)
from schemas.schema_source import default_categories

__all__ = [
    "CATEGORY_DIR",
    "GENERIC_FILE",
    "OPEN_VALUE_MAX_CHARS",
    "STAND_INS_KEPT",
    "AspectSpec",
    "CategoryRegistry",
    "CategorySchema",
    "default_categories",
    "generic_schema",
]
