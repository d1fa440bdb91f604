"""Typed method options: each explainer's ``Options``, a frozen dataclass subclass of :class:`MethodOptions`.

Each explainer class names its options in the class attribute ``Options``: a frozen dataclass subclass of
:class:`MethodOptions` (an empty one when it takes none) whose fields are the option names.
:meth:`MethodOptions.parse` converts each given value (JSON-decoded or text, see
:func:`SegXAILib.methods.parse_option_pairs`) to its field's declared type, resolves aliases
(``misure.lambda`` is the field ``lam``) and checks ranges; an unknown name or a bad value is a one-line
:class:`~SegXAILib.errors.SegXAIError`. Field types understood: ``int``, ``float``, ``str``, ``tuple[T, ...]`` and
``tuple[T, T]`` (a JSON list, or text separated by commas or spaces), and unions of these with ``None``
(JSON ``null``). Declare a field with :func:`option` to add a range (``minimum``), a set of ``choices``,
another ``check``, or a ``convert`` function of its own.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

from ..errors import SegXAIError

__all__ = ["MethodOptions", "WINDOWS", "option"]

WINDOWS = ("model", "scan")
"""Choices of the option ``window`` (Grad-CAM and the black-box methods): the model's sliding windows, as its
segmentation ran (default), or the whole input in one pass, as tools without sliding windows run it."""


def option(default: Any, *, minimum: float | None = None, choices: Sequence[Any] | None = None,
           check: Callable[[Any], bool] | None = None, convert: Callable[[Any], Any] | None = None,
           must: str | None = None) -> Any:
    """A field of a :class:`MethodOptions` subclass with its checks.

    Args:
        default: the value when the option is not given.
        minimum: the smallest valid value (numbers).
        choices: the valid values.
        check: any other test of the converted value (``None`` is never checked).
        convert: turns the given value into the field's value, instead of the conversion by its type.
        must: what a valid value is, in words ("a number in (0, 1]"), for the error message; by default
            it is written from the type, ``minimum`` and ``choices``.
    """
    return field(default=default, metadata={"minimum": minimum, "choices": choices, "check": check,
                                            "convert": convert, "must": must})


_PLURAL = {int: "integers", float: "numbers", str: "names"}


def _describe(kind: Any) -> str:
    """A declared type in words: ``int | None`` -> "an integer or null"."""
    if kind is int:
        return "an integer"
    if kind is float:
        return "a number"
    if kind is str:
        return "text"
    if kind is type(None):
        return "null"
    args = get_args(kind)
    if get_origin(kind) in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if get_origin(kind) is tuple:
        count = "" if args[-1] is Ellipsis else f"{len(args)} "
        return f"a list of {count}{_PLURAL[args[0]]}"
    return kind.__name__


def _convert(value: Any, kind: Any) -> Any:
    """``value`` as the declared type ``kind``; ValueError, TypeError or OverflowError when it is not one."""
    origin = get_origin(kind)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(kind):
            return None
        for arg in get_args(kind):
            if arg is not type(None):
                try:
                    return _convert(value, arg)
                except (TypeError, ValueError, OverflowError):
                    pass
        raise ValueError(value)
    if origin is tuple:
        items = [p for p in re.split(r"[,\s]+", value) if p] if isinstance(value, str) else \
            list(value) if isinstance(value, (list, tuple)) else [value]
        args = get_args(kind)
        element_types = [args[0]] * len(items) if args[-1] is Ellipsis else list(args)
        if len(items) != len(element_types):
            raise ValueError(value)
        return tuple(_convert(item, t) for item, t in zip(items, element_types))
    if isinstance(value, bool) or value is None:
        raise TypeError(value)
    if kind is int:
        number = int(value) if isinstance(value, str) else value
        if not isinstance(number, (int, float)) or number != int(number):
            raise ValueError(value)
        return int(number)
    if kind is float:
        return float(value)
    if kind is str:
        if not isinstance(value, (str, int)):
            raise TypeError(value)
        return str(value)
    raise TypeError(f"option type {kind!r} is not supported")


def _shown(value: Any) -> str:
    """``repr`` of a value for an error message, cut to a line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options: a frozen dataclass whose fields are the option names.

    Subclasses are frozen dataclasses too, and may set ``aliases`` (public name -> field name, e.g.
    ``{"lambda": "lam"}``: a field reached by an alias is named only by its alias).
    """

    aliases: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def names(cls) -> list[str]:
        """The option names accepted on the command line, in field order."""
        public = {target: alias for alias, target in cls.aliases.items()}
        return [public.get(f.name, f.name) for f in fields(cls)]

    @classmethod
    def parse(cls, raw: Mapping[str, Any], method: str) -> MethodOptions:
        """Options of ``method`` from ``{name: value}`` (JSON-decoded or text values), converted and checked.

        Raises:
            SegXAIError: one line naming the method and the unknown name (with the valid names) or the bad
                value (with what a valid one is).
        """
        names = cls.names()
        by_name = {name: f for name, f in zip(names, fields(cls))}
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in by_name:
                valid = f"the options of {method} are: {', '.join(names)}" if names else f"{method} takes no options"
                raise SegXAIError(f"unknown option {method}.{key}; {valid}")
            spec = by_name[key]
            values[spec.name] = cls._checked(method, key, value, hints[spec.name], spec.metadata)
        return cls(**values)

    @staticmethod
    def _checked(method: str, key: str, value: Any, kind: Any, rules: Mapping[str, Any]) -> Any:
        """``value`` converted and checked against a field's type and ``rules`` (see :func:`option`)."""
        minimum, choices, check = rules.get("minimum"), rules.get("choices"), rules.get("check")
        must = rules.get("must")
        if must is None:
            optional = get_origin(kind) in (Union, types.UnionType) and type(None) in get_args(kind)
            base = Union[tuple(a for a in get_args(kind) if a is not type(None))] if optional else kind
            must = (f"one of {', '.join(map(str, choices))}" if choices is not None else
                    _describe(base) + (f" >= {minimum}" if minimum is not None else ""))
            must += " or null" if optional else ""
        try:
            converted = rules["convert"](value) if rules.get("convert") else _convert(value, kind)
            ok = converted is None or ((minimum is None or converted >= minimum)
                                       and (choices is None or converted in choices)
                                       and (check is None or check(converted)))
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise SegXAIError(f"option {method}.{key} must be {must}, got {_shown(value)}")
        return converted

    @classmethod
    def of(cls, given: MethodOptions | Mapping[str, Any], method: str) -> MethodOptions:
        """``given`` if it is already parsed options of this class, else :meth:`parse` of it."""
        return given if isinstance(given, cls) else cls.parse(given, method)
