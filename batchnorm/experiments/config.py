"""Experiment configurations: frozen dataclasses of defaults, ``--quick``, and ``--set`` overrides.

An override is ``KEY=VALUE`` (every selected experiment that has KEY) or ``EXPERIMENT.KEY=VALUE``.
Values are parsed by the field's annotated type (int, float, bool, str, tuples of those as
comma-separated lists, or ``None`` where the type allows it); an unknown key is an error that
lists the known ones.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """A ``--set`` override that names no known key or whose value has the wrong type."""


def _parse_scalar(text: str, kind: type, key: str):
    text = text.strip()
    try:
        if kind is bool:
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError(text)
        return kind(text)
    except ValueError:
        raise ConfigError(f"{key}: expected {kind.__name__}, got {text!r}") from None


def parse_value(text: str, annotation, key: str):
    """Parse ``text`` as a value of the field type ``annotation``.

    >>> parse_value("2,4,8", tuple[int, ...], "sizes")
    (2, 4, 8)
    >>> parse_value("none", int | None, "limit") is None
    True
    """
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() == "none":
            return None
        (annotation,) = [arg for arg in args if arg is not type(None)]
        args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple:
        return tuple(_parse_scalar(part, args[0], key) for part in text.split(",") if part.strip())
    if annotation in (int, float, bool, str):
        return _parse_scalar(text, annotation, key)
    raise ConfigError(f"{key}: cannot be set from the command line (type {annotation})")


def split_overrides(items: Iterable[str], configs: Mapping[str, type],
                    selected: Iterable[str]) -> dict[str, dict]:
    """Assign each ``[EXPERIMENT.]KEY=VALUE`` to the ``selected`` experiments it applies to.

    A prefixed key is checked against its experiment even when that one is not selected (and
    then ignored), so one list of overrides serves every command and typos never pass.

    Args:
        configs: every experiment's name -> its Config class.
        selected: the experiments of this command.

    Returns:
        selected experiment name -> {key: raw text}.

    Raises:
        ConfigError: a malformed item, an unknown experiment, or a key that no experiment it
            names has (the message lists the valid keys).
    """
    selected = list(selected)
    result: dict[str, dict] = {name: {} for name in selected}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE or EXPERIMENT.KEY=VALUE")
        target, dot, field = key.strip().rpartition(".")
        if dot and target not in configs:
            raise ConfigError(f"--set {item!r}: unknown experiment {target!r}; expected one "
                              f"of {list(configs)}")
        names = [target] if dot else selected
        matched = [name for name in names if field in _field_names(configs[name])]
        if not matched:
            known = sorted({f"{n}.{f}" for n in names for f in _field_names(configs[n])})
            raise ConfigError(f"--set {item!r}: unknown key {field!r}; known keys: "
                              + ", ".join(known))
        for name in matched:
            if name in result:
                result[name][field] = value
    return result


def _field_names(cls: type) -> set[str]:
    return {field.name for field in dataclasses.fields(cls)}


def resolve(cls: type, quick: Mapping[str, object] | None = None,
            overrides: Mapping[str, str] | None = None):
    """The configuration: defaults of ``cls``, then ``quick`` values, then parsed ``overrides``.

    >>> @dataclasses.dataclass(frozen=True)
    ... class C:
    ...     steps: int = 100  # default
    >>> resolve(C, {"steps": 10}, {"steps": "3"})
    C(steps=3)
    """
    hints = typing.get_type_hints(cls)
    values = dict(quick or {})
    for key, text in (overrides or {}).items():
        if key not in hints:
            raise ConfigError(f"unknown key {key!r}; known keys: {', '.join(sorted(hints))}")
        values[key] = parse_value(text, hints[key], key)
    return cls(**values)


def as_dict(config) -> dict:
    """The configuration as a JSON-ready dict (tuples become lists)."""
    return {key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(config).items()}
