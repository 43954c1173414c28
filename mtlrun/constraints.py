"""Declared constraints on config values: each checks one value and says in one line which key needs what."""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence

from mtlrun.errors import MtlrunError


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bounds(above: float | None, least: float | None) -> str:
    """' > 0', ' >= 1', ' > 0 and >= 1' or ''."""
    parts = ([f"> {above:g}"] if above is not None else []) + ([f">= {least:g}"] if least is not None else [])
    return " " + " and ".join(parts) if parts else ""


def flag(key: str, value: object) -> bool:
    """A boolean: `true` or `false` (YAML's spelling), never a string read as true."""
    if not isinstance(value, bool):
        raise MtlrunError(f"{key} must be true or false, got {value!r}")
    return value


def integer(key: str, value: object, least: int | None = None) -> int:
    """An integer (not a boolean), at least `least`."""
    if not isinstance(value, int) or isinstance(value, bool) or (least is not None and value < least):
        bound = f" >= {least}" if least is not None else ""
        raise MtlrunError(f"{key} must be an integer{bound}, got {value!r}")
    return value


def numbers(key: str, value: object, length: int | None, what: str, above: float | None = None,
            least: float | None = None, example: str = "") -> list[float]:
    """A list of `length` (None: one or more) finite numbers (`what` says what each is for), each greater
    than `above` and at least `least` where given."""
    def fits(v: object) -> bool:
        return (_is_number(v) and math.isfinite(v) and (above is None or v > above)
                and (least is None or v >= least))

    size = f"{length}" if length is not None else "one or more"
    hint = f", e.g. {key}={example}" if example else ""
    sequence = isinstance(value, Sequence) and not isinstance(value, str)
    wrong_length = sequence and (not value or (length is not None and len(value) != length))
    if not sequence or wrong_length or not all(map(fits, value)):
        shown = list(value) if sequence else value
        raise MtlrunError(f"{key} must be a list of {size} finite numbers{_bounds(above, least)}, {what}"
                          f"{hint}; got {shown!r}")
    return [float(v) for v in value]


def _type_name(annotation: object) -> str:
    """How a settings type is spelt in an error: a number, an integer, a mapping {name: number}, ..."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) in (dict, Mapping):
        return f"a mapping {{name: {_type_name(args[1]).removeprefix('a ').removeprefix('an ')}}}"
    if typing.get_origin(annotation) in (list, Sequence):
        return f"a list of {_type_name(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, str(annotation))


def _fits(value: object, annotation: object) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if origin in (dict, Mapping):
        return isinstance(value, Mapping) and all(_fits(k, args[0]) and _fits(v, args[1])
                                                  for k, v in value.items())
    if origin in (list, Sequence):
        return (isinstance(value, Sequence) and not isinstance(value, str)
                and all(_fits(v, args[0]) for v in value))
    if annotation is float:
        return _is_number(value)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (bool, str):
        return isinstance(value, annotation)
    return True  # a type these settings do not use: the constructor checks it


def typed_keywords(function: Callable, values: Mapping[str, object], prefix: str,
                   mapping_example: str = "") -> None:
    """Each of `values` has the type `function`'s signature declares for it (the declaration is the
    constraint); a mismatch says which key needs which type, a mapping with `mapping_example` as syntax.
    A parameter annotated `Annotated[type, check, ...]` also passes each check (`check(key, value)`, as a
    settings field's declaration in mtlrun.settings: e.g. `Annotated[int, Integer(1)]`)."""
    hints = typing.get_type_hints(function, include_extras=True)
    for name, value in values.items():
        checks: tuple = ()
        if name in hints and typing.get_origin(hints[name]) is typing.Annotated:
            hints[name], *checks = typing.get_args(hints[name])
        if name in hints and not _fits(value, hints[name]):
            mapping = "mapping" in _type_name(hints[name]) and mapping_example
            # Quoted: a shell expands unquoted braces holding a comma into one argument per item.
            example = f", e.g. '{prefix}{name}={mapping_example}' (quoted: a shell splits unquoted braces)" \
                if mapping else ""
            raise MtlrunError(f"{prefix}{name} must be {_type_name(hints[name])}{example}; got {value!r}")
        for check in checks:
            check(f"{prefix}{name}", value)
