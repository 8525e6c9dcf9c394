"""Dagster config classes made from the library's config dataclasses: each setting is
declared once (name, type, default and the description the UI's launchpad shows, in the
dataclass field's ``metadata={"doc": ...}``), and the assets' configs cannot drift from
the library's."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Optional, Union

import dagster as dg
import pydantic


def _config_type(annotation: Any) -> Any:
    """The dataclass field's type as Dagster config takes it (a Literal's values are
    checked by the library dataclass; tuples travel as lists)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return type(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):  # X | None
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        inner = _config_type(args[0]) if len(args) == 1 else annotation
        return Optional[inner] if type(None) in typing.get_args(annotation) else inner
    if origin is tuple:
        return list[typing.get_args(annotation)[0]]
    return annotation


def dagster_fields(
    library: type, *, include: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The fields of the dataclass ``library`` (those in ``include``, or all but ``exclude``)
    as ``pydantic.create_model`` takes them: type, default and launchpad description."""
    hints = typing.get_type_hints(library)
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(library):
        if field.name in exclude or (include is not None and field.name not in include):
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if isinstance(default, tuple):
            default = list(default)
        description = field.metadata.get("doc")
        fields[field.name] = (_config_type(hints[field.name]), pydantic.Field(default=default, description=description))
    missing = set(include or ()) - set(fields)
    if missing:
        raise ValueError(f"{library.__name__} has no field(s) {sorted(missing)}")
    return fields


def dagster_config(
    library: type, name: str, doc: str, *, base: type[dg.Config] = dg.Config, fields: dict[str, Any] | None = None
) -> type[dg.Config]:
    """A ``dg.Config`` class named ``name`` with the fields of the dataclass ``library``
    (or the ``fields`` given, from :func:`dagster_fields` of one or more dataclasses), on
    ``base`` (which adds fields of its own, or methods)."""
    model = pydantic.create_model(name, __base__=base, __doc__=doc, **(fields if fields is not None else dagster_fields(library)))
    model.__module__ = library.__module__
    return model
