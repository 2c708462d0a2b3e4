"""Typed configs: a frozen dataclass per study, each setting with one default and one check.

    @dataclass(frozen=True)
    class DataSettings(Settings):
        limit_per_class: int | None = setting(None, optional(whole()), "first N images per class")

    cfg = DataSettings(limit_per_class=0)       # ValueError: --limit-per-class: expected a whole number >= 1, got 0
    cfg = DataSettings.from_json({...}, where="runs/x/config.json")   # unknown keys refused
    cfg.to_json()                                # plain JSON (tuples as lists); from_json(to_json()) == cfg
    cfg.differences(other)                       # [Difference("lr", 0.1, 0.2)]

A setting is a dataclass field whose metadata holds its check, a function ``check(value, name)``
that returns the value (normalised: a JSON list becomes a tuple, an int where a float is meant
becomes a float) or raises ValueError in one line that names the flag (``--batch-size``). Every
instance is checked in ``__post_init__``, so a config object that exists is a valid one; checks
that tie two settings together go in :meth:`Settings.check`.

The checks here replace the ones that were spread over the command lines; ``config.json`` is
:meth:`Settings.to_json` and reads back with :meth:`Settings.from_json`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Sequence, TypeVar

__all__ = ["Settings", "Difference", "setting", "flag", "whole", "number", "choice", "boolean",
           "optional", "text", "whole_list", "number_list", "whole_number", "number_in",
           "SettingsError"]

Check = Callable[[Any, str], Any]
S = TypeVar("S", bound="Settings")


class SettingsError(ValueError):
    """A config that cannot be read: unknown settings, or a value out of range (one line)."""


def flag(name: str) -> str:
    """``"batch_size" -> "--batch-size"``: the command-line flag of a setting."""
    return "--" + name.replace("_", "-")


def whole_number(value: Any, name: str, low: int = 1, *, unit: str = "") -> int:
    """``value`` if it is an int (not a bool) ``>= low``; ``unit`` (``" of pixels"``) is named."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SettingsError(f"{flag(name)}: expected a whole number{unit} >= {low}, got {value!r}")
    return value


def number_in(value: Any, name: str, *, low: float = -math.inf, high: float = math.inf,
              low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float if it is a finite int or float in the interval (ends included unless
    ``*_open``). Infinity and NaN are never accepted, so the range printed excludes them."""
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if low_open else value >= low)
          and (value < high if high_open else value <= high))
    if not ok:
        shown_high = "inf)" if math.isinf(high) else f"{high:g}{hi}"
        shown_low = "(-inf" if math.isinf(low) else f"{lo}{low:g}"
        raise SettingsError(f"{flag(name)}: expected a finite number in {shown_low}, {shown_high}, "
                            f"got {value!r}")
    return float(value)


def whole(low: int = 1, unit: str = "") -> Check:
    """The check of a whole-number setting ``>= low``."""
    return lambda value, name: whole_number(value, name, low, unit=unit)


def number(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
           high_open: bool = False) -> Check:
    """The check of a real-valued setting in an interval (stored as a float)."""
    return lambda value, name: number_in(value, name, low=low, high=high, low_open=low_open,
                                         high_open=high_open)


def choice(*options: str) -> Check:
    """The check of a setting that is one of ``options``."""
    def check(value, name):
        if value not in options:
            raise SettingsError(f"{flag(name)}: expected one of {', '.join(options)}, got {value!r}")
        return value
    return check


def boolean(value: Any, name: str) -> bool:
    """The check of an on/off setting (a JSON ``true``/``false``, never ``1`` or ``"yes"``)."""
    if not isinstance(value, bool):
        raise SettingsError(f"{flag(name)}: expected true or false, got {value!r}")
    return value


def text(value: Any, name: str) -> str:
    """The check of a free-text setting."""
    if not isinstance(value, str):
        raise SettingsError(f"{flag(name)}: expected text, got {value!r}")
    return value


def optional(check: Check) -> Check:
    """``check`` for a setting that may also be None (not set)."""
    return lambda value, name: None if value is None else check(value, name)


def _list_of(item: Check, what: str, length: int | None, distinct: bool) -> Check:
    def check(value, name):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise SettingsError(f"{flag(name)}: expected a list of {what}, got {value!r}")
        items = tuple(item(v, name) for v in value)
        if length is not None and len(items) != length:
            raise SettingsError(f"{flag(name)}: expected {length} {what}, got {len(items)} "
                                f"({', '.join(map(str, items))})")
        if not items:
            raise SettingsError(f"{flag(name)}: expected at least one value, got none")
        if distinct and len(set(items)) != len(items):
            twice = sorted({v for v in items if items.count(v) > 1})
            raise SettingsError(f"{flag(name)}: expected distinct values, got {', '.join(f'{v:g}' for v in twice)} "
                                "more than once (a repeated value would train identical members "
                                "and report them as replicates)")
        return items
    return check


def whole_list(low: int = 1, length: int | None = None) -> Check:
    """The check of a list of whole numbers ``>= low`` (stored as a tuple)."""
    return _list_of(whole(low), f"whole numbers >= {low}", length, distinct=False)


def number_list(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
                distinct: bool = False) -> Check:
    """The check of a list of finite numbers in an interval (stored as a tuple of floats)."""
    return _list_of(number(low, high, low_open=low_open), "numbers", None, distinct)


def setting(default: Any, check: Check, help: str = "") -> Any:
    """A field of a :class:`Settings` class: its one default, its one check and its help text."""
    return dataclasses.field(default=default, metadata={"check": check, "help": help})


class Difference(NamedTuple):
    """One setting that differs between two configs: ``name``, the ``stored`` and ``requested`` values."""

    name: str
    stored: Any
    requested: Any

    def __str__(self) -> str:
        return f"{flag(self.name)} {_shown(self.requested)} (the run's: {_shown(self.stored)})"


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def _to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of the typed configs. Subclasses are ``@dataclass(frozen=True)`` with every field
    declared by :func:`setting`; multiple inheritance composes them (``class CifarConfig(
    TrainSettings, DataSettings, OptimizerSettings)``)."""

    #: Settings that say where or how fast a run computes, not what it trains: a resumed run may
    #: change them (:mod:`experiments.train.lifecycle`). A study adds its own.
    resumable: ClassVar[tuple[str, ...]] = ("data_dir", "device", "retain_freed_memory")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            if check is not None:
                object.__setattr__(self, f.name, check(getattr(self, f.name), f.name))
        self.check()

    def check(self) -> None:
        """Checks that tie settings together (SettingsError, one line); none by default."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_json(cls: type[S], data: Mapping, *, where: str = "config") -> S:
        """The config ``data`` (a ``config.json``'s object) describes. A setting it lacks takes
        its default (a run saved before the setting existed); a key that is no setting of
        ``cls`` is refused, naming it."""
        if not isinstance(data, Mapping):
            raise SettingsError(f"{where}: expected a JSON object of settings, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.names()))
        if unknown:
            raise SettingsError(f"{where}: expected settings of {cls.__name__}, got unknown "
                                f"{', '.join(unknown)} (written by another version or another "
                                "command?)")
        try:
            return cls(**data)
        except SettingsError as err:
            raise SettingsError(f"{where}: {err}") from None

    @classmethod
    def upgrade(cls, data: Mapping) -> dict:
        """A ``config.json`` written by an older purenn, as this version's settings (keys renamed
        or derived since); the identity unless a study overrides it."""
        return dict(data)

    def to_json(self) -> dict:
        """The config as a JSON object (tuples as lists), in field order."""
        return {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self: S, **changes) -> S:
        """A copy with ``changes`` (checked as a new config is)."""
        return dataclasses.replace(self, **changes)

    def differences(self, other: "Settings", *, ignore: Sequence[str] = ()) -> list[Difference]:
        """The settings whose values differ between ``self`` (stored) and ``other`` (requested)."""
        if type(self) is not type(other):
            raise TypeError(f"differences: expected two {type(self).__name__}, got {type(other).__name__}")
        return [Difference(n, getattr(self, n), getattr(other, n)) for n in self.names()
                if n not in ignore and getattr(self, n) != getattr(other, n)]

    @classmethod
    def help(cls, name: str) -> str:
        """The help text of setting ``name``."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}[name]
