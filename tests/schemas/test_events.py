"""The pydantic models mirror the newest .avsc of each event, field for field."""

from __future__ import annotations

import types
import typing
from typing import Any, Union, get_args, get_origin

import pytest
from pydantic import BaseModel

from schemas.events import EVENT_TYPES, ListingImageEvent
from schemas.serde import default_store


def _avro_fields(schema: dict[str, Any]) -> dict[str, Any]:
    return {f["name"]: f["type"] for f in schema["fields"]}


def _is_optional(avro_type: Any) -> bool:
    return isinstance(avro_type, list) and "null" in avro_type


def _record_of(avro_type: Any) -> dict[str, Any] | None:
    t = avro_type
    if isinstance(t, list):
        t = next(x for x in t if x != "null")
    if isinstance(t, dict) and t.get("type") == "array":
        t = t["items"]
    return t if isinstance(t, dict) and t.get("type") == "record" else None


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for a in (annotation, *get_args(annotation)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
        for b in get_args(a):
            if isinstance(b, type) and issubclass(b, BaseModel):
                return b
    return None


def _allows_none(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)


def _compare(model: type[BaseModel], schema: dict[str, Any], path: str) -> None:
    avro = _avro_fields(schema)
    fields = model.model_fields
    assert set(fields) == set(avro), f"{path}: pydantic {sorted(fields)} vs avro {sorted(avro)}"
    hints = typing.get_type_hints(model)
    for name, avro_type in avro.items():
        assert _allows_none(hints[name]) == _is_optional(avro_type), f"{path}.{name}: optionality differs"
        rec = _record_of(avro_type)
        if rec is not None:
            sub = _model_of(hints[name])
            assert sub is not None, f"{path}.{name}: avro record without a pydantic model"
            _compare(sub, rec, f"{path}.{name}")


@pytest.mark.parametrize("model", EVENT_TYPES, ids=lambda m: m.__name__)
def test_model_mirrors_newest_avsc(model: type[Any]) -> None:
    latest = default_store().latest(model.AVRO_DIR)
    assert latest.full_name == model.AVRO_NAME
    _compare(model, latest.raw, model.__name__)


def test_every_schema_folder_has_a_model() -> None:
    assert sorted(default_store().folders()) == sorted(m.AVRO_DIR for m in EVENT_TYPES)


def test_events_require_aware_timestamps() -> None:
    from datetime import datetime

    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        ListingImageEvent(listing_id="l", category="shoes", images=[{"uri": "file:///x"}], created_at=datetime(2026, 1, 1))
