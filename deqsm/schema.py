"""The one base of every settings class (deqsm's and the pipeline's) and the one formatter of their errors.

params.yaml is parsed once into pydantic models built on :class:`Strict`: an unknown key is an error that
names it and lists the known ones, a bad value names the key, the value and what is allowed
(:func:`describe_errors`), and a registry name is checked by :func:`known_name`.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticCustomError


class Strict(BaseModel):
    """The base of every settings class of deqsm and its pipeline: an unknown key is an error that names it
    and lists the known ones (error type ``unknown_key``; :func:`describe_errors` writes it at the key's
    own dotted path)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [str(k) for k in data if k not in cls.model_fields]
            if unknown:
                raise PydanticCustomError(
                    "unknown_key", "unknown key{s} {names}; known: {known}",
                    {"s": "s" if len(unknown) > 1 else "", "names": ", ".join(map(repr, unknown)),
                     "unknown": unknown, "known": ", ".join(cls.model_fields)})
        return data


def error_items(err: ValidationError, prefix: str = "", with_input: bool = True) -> list[tuple[str, str]]:
    """``(dotted key, message)`` per problem of ``err``, the key starting at ``prefix`` ("" for the model
    itself): an unknown key becomes ``(<path>.<key>, "unknown key; known: ...")``; other messages end with
    ``(got <value>)`` when ``with_input``."""
    items = []
    for e in err.errors():
        key = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        if e["type"] == "unknown_key":
            items += [(f"{key + '.' if key else ''}{name}", f"unknown key; known: {e['ctx']['known']}")
                      for name in e["ctx"]["unknown"]]
        else:
            msg = e["msg"].removeprefix("Value error, ")
            # a check across keys may get a whole section as input: the message names the keys, no dump of it
            shown = with_input and len(repr(e.get("input"))) <= 200
            items.append((key, f"{msg} (got {e.get('input')!r})" if shown else msg))
    return items


def describe_errors(err: ValidationError, prefix: str = "", with_input: bool = True) -> list[str]:
    """One ``key: message`` line per problem of ``err`` (:func:`error_items`). The one formatter of settings
    errors, for params.yaml and the library alike."""
    return [f"{key or '(top level)'}: {msg}" for key, msg in error_items(err, prefix, with_input)]


def known_name(name: str, registry) -> str:
    """``name`` if ``registry`` has it; else an error listing the known names."""
    if name not in registry:
        raise ValueError(f"unknown {registry.kind} {name!r}; known: {', '.join(registry.names())}")
    return name
