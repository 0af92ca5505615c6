"""Experiment configurations: frozen dataclasses of defaults, ``--quick``, and ``--set`` overrides.

An override is ``KEY=VALUE`` (every selected experiment that has KEY) or ``EXPERIMENT.KEY=VALUE``.
Values are parsed by the field's annotated type (int, float, bool, str, tuples of those as
comma-separated lists, or ``None`` where the type allows it); an unknown key is an error that
lists the known ones. Each experiment gives every field a :class:`Limit`, and :func:`check`
holds the resolved configuration to them before any data is read, so a value out of range is a
one-line usage error instead of a crash (or a run that silently does nothing) after loading.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping

from batchnorm.data import FILES

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}

# Training images of full MNIST: the most that any setting counting training images can take
# before the data is loaded (:func:`check` tightens it to the loaded set afterwards).
FULL_TRAIN = FILES["train_images"].count


class ConfigError(ValueError):
    """A ``--set`` override that names no known key, or whose value has the wrong type or range."""


@dataclasses.dataclass(frozen=True)
class Limit:
    """The values one setting may take.

    A number must lie between ``low`` and ``high`` (None: unbounded on that side; each end
    included unless ``open_low`` / ``open_high``). A tuple must have ``items = (fewest, most)``
    elements (most None: no upper bound), each in that range. Floats must also be finite: NaN
    compares false with every bound, and results.json is strict JSON, which has no NaN or
    Infinity. Strings are only counted (their values are checked by the experiment's
    ``validate``).

    ``images=True`` marks a count of training images: ``high`` is then given for full MNIST
    (:data:`FULL_TRAIN`) and moves down with a smaller training set by the same margin, so
    ``high=FULL_TRAIN`` reads "at most the training set", ``FULL_TRAIN - 1`` "fewer than it".

    >>> Limit(0, 1, open_low=True).describe(float)
    'in (0, 1]'
    >>> Limit(1, items=(1, 4)).describe(tuple[int, ...])
    'a list of 1 to 4 values >= 1'
    """

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    items: tuple[int, int | None] = (1, None)
    images: bool = False
    why: str = ""  # the reason for the range, shown in the error

    def bounds(self, train_images: int | None) -> tuple[float | None, float | None, str]:
        """``low``, ``high`` for a training set of ``train_images`` (None: full MNIST), and the
        note that says where ``high`` comes from."""
        if not self.images:
            return self.low, self.high, self.why
        n = FULL_TRAIN if train_images is None else train_images
        margin = FULL_TRAIN - self.high
        whose = (f"MNIST's {n:,} training images" if train_images is None
                 else f"the training set's {n:,} images")
        note = {0: f"at most {whose}", 1: f"fewer than {whose}"}.get(
            margin, f"at most {whose} less {margin}")
        return self.low, n - margin, "; ".join(filter(None, (self.why, note)))

    def describe(self, annotation, train_images: int | None = None) -> str:
        """What the setting must be, as the end of "KEY must be ..."."""
        low, high, _ = self.bounds(train_images)
        kind, many = element_type(annotation)
        if low is not None and high is not None:
            rule = (f"in {'(' if self.open_low else '['}{_number(low)}, {_number(high)}"
                    f"{')' if self.open_high else ']'}")
        elif low is not None:
            rule = f"{'>' if self.open_low else '>='} {_number(low)}"
        elif high is not None:
            rule = f"{'<' if self.open_high else '<='} {_number(high)}"
        else:
            rule = ""
        finite = kind is float and (low is None or high is None)
        if not many:
            return " and ".join(filter(None, ("finite" if finite else "", rule))) or "any value"
        fewest, most = self.items
        if most is not None:
            count = f"a list of {fewest} to {most}"
        else:
            count = {0: "a list of", 1: "a non-empty list of"}.get(
                fewest, f"a list of at least {fewest}")
        return f"{count} {'finite ' if finite else ''}values{' ' + rule if rule else ''}"

    def admits(self, value, annotation, train_images: int | None = None) -> bool:
        """Whether ``value`` (of the field type ``annotation``) is within this limit."""
        low, high, _ = self.bounds(train_images)
        kind, many = element_type(annotation)
        values = value if many else (value,)
        if many and not (self.items[0] <= len(values)
                         and (self.items[1] is None or len(values) <= self.items[1])):
            return False
        for item in values:
            if kind is str or kind is bool:
                continue
            if kind is float and not math.isfinite(item):
                return False
            if low is not None and (item <= low if self.open_low else item < low):
                return False
            if high is not None and (item >= high if self.open_high else item > high):
                return False
        return True


def element_type(annotation) -> tuple[type, bool]:
    """The scalar type of a field and whether the field is a tuple of it (``None`` dropped).

    >>> element_type(tuple[int, ...]), element_type(float | None)
    ((<class 'int'>, True), (<class 'float'>, False))
    """
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) is tuple:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _shown(value) -> str:
    """A value as it is written after ``--set KEY=``."""
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if value else "an empty list"
    return str(value)


def check(config, limits: Mapping[str, Limit], train_images: int | None = None) -> None:
    """Hold every field of ``config`` to its limit in ``limits``.

    Called once with ``train_images=None`` before any data is read (counts of training images
    are then held to full MNIST's), and again once the training set is loaded.

    Raises:
        ConfigError: the first value out of range; the message names the key, the allowed
            range and the value.
        TypeError: ``limits`` does not name every field of ``config`` exactly (a bug in the
            experiment, not in its use).

    >>> @dataclasses.dataclass(frozen=True)
    ... class C:
    ...     steps: int = 100  # default
    >>> check(C(steps=0), {"steps": Limit(1)})
    Traceback (most recent call last):
    ...
    batchnorm.experiments.config.ConfigError: steps must be >= 1, got 0
    """
    hints = typing.get_type_hints(type(config))
    names = [field.name for field in dataclasses.fields(config)]
    if set(names) != set(limits):
        raise TypeError(f"{type(config).__qualname__}: limits must name every field: missing "
                        f"{sorted(set(names) - set(limits))}, unknown "
                        f"{sorted(set(limits) - set(names))}")
    for name in names:
        limit, value = limits[name], getattr(config, name)
        if value is None or limit.admits(value, hints[name], train_images):
            continue
        why = limit.bounds(train_images)[2]
        raise ConfigError(f"{name} must be {limit.describe(hints[name], train_images)}"
                          f"{f' ({why})' if why else ''}, got {_shown(value)}")


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
