"""Typed dataclasses from plain data (what YAML gives) and `a.b.c=value` overrides, every error naming the field.

`build_dataclass(cls, data)` builds a (nested) dataclass from dicts, checking each value against
its annotation (bool, int, float, str, Literal, Optional/Union, list, dict, nested dataclasses)
and refusing unknown keys with the closest known one; the dataclass's own `__post_init__` then
checks ranges. `apply_overrides(data, ["moe.num_experts=16"])` sets dotted keys, parsing values as
YAML scalars. moe_engine.config builds the run configuration with them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config value a user can fix: the message names the field, the value and what is allowed."""


def _fail(path: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{path} = {value!r}: {allowed}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        return f"a mapping of {_type_name(key_tp)} to {_type_name(value_tp)}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            _fail(path, value, f"must be a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}")
        return build_dataclass(tp, value, path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            _fail(path, value, f"allowed: {', '.join(repr(a) for a in typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(path, value, arg)
            except ConfigError:
                pass
        if float in args and _is_non_finite(value):  # a number, so "must be a number" would mislead
            _fail(path, value, "must be a finite number" + (", or null" if type(None) in args else ""))
        _fail(path, value, f"must be {_type_name(tp)}")
    if origin is dict:
        if not isinstance(value, dict):
            _fail(path, value, f"must be {_type_name(tp)}")
        key_tp, value_tp = typing.get_args(tp)
        return {_coerce(f"{path}", k, key_tp): _coerce(f"{path}.{k}", v, value_tp) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            _fail(path, value, f"must be {_type_name(tp)}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(f"{path}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, value, "must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, value, "must be an integer")
        return value
    if tp is float:
        # PyYAML reads `1e-3` (no dot) as a string, a YAML 1.1 quirk users hit constantly.
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                _fail(path, value, "must be a number")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, value, "must be a number")
        else:
            number = float(value)
        # NaN passes every `<= 0` range check and would surface steps later as a NaN loss.
        if not math.isfinite(number):
            _fail(path, value, "must be a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            _fail(path, value, "must be a string")
        return value
    raise TypeError(f"config field {path} has an unsupported annotation {tp!r}")


def _is_non_finite(value: Any) -> bool:
    """Whether `value` reads as a number (as _coerce's float does) that is NaN or infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False
    try:
        return not math.isfinite(float(value))
    except ValueError:
        return False


def build_dataclass(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """cls(**data) with every value coerced to its field's annotation; errors name `prefix`.key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            _fail(path, value, f"unknown key{hint}; allowed: {', '.join(names)}")
        kwargs[key] = _coerce(path, value, hints[key])
    return cls(**kwargs)


def apply_overrides(
    data: dict[str, Any], overrides: list[str], values: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Apply `a.b.c=value` strings to nested plain data, values parsed as YAML scalars, then
    `values` ({"a.b.c": value}) as given: a command-line option's path or name is taken literally,
    since YAML would cut it at " #" or read a folder named 2024 as a number."""
    data = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. moe.num_experts=16")
        _set_dotted(data, key, _parse_value(item, raw), f"--set {item!r}")
    for key, value in (values or {}).items():
        _set_dotted(data, key, value, f"{key} = {value!r}")
    return data


def _parse_value(item: str, raw: str) -> Any:
    """The YAML value of one --set item; malformed YAML is a ConfigError naming the item."""
    if not raw.strip():
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({problem}); quote it, or close its brackets") from err


def _set_dotted(data: dict[str, Any], key: str, value: Any, what: str) -> None:
    """data[a][b][c] = value for key "a.b.c", making missing sections; `what` names the setting in errors."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{what}: {part!r} is a value, not a section")
    node[parts[-1]] = value


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
