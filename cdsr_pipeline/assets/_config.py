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


def dagster_config(library: type, name: str, doc: str) -> type[dg.Config]:
    """A ``dg.Config`` class named ``name`` with the fields of the dataclass ``library``."""
    hints = typing.get_type_hints(library)
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(library):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if isinstance(default, tuple):
            default = list(default)
        description = field.metadata.get("doc")
        fields[field.name] = (_config_type(hints[field.name]), pydantic.Field(default=default, description=description))
    model = pydantic.create_model(name, __base__=dg.Config, __doc__=doc, **fields)
    model.__module__ = library.__module__
    return model
