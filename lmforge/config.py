"""Typed dataclass configs: TOML presets, dotted CLI overrides, strict validation.

Each stage owns its config dataclass (`ModelConfig` in `model/`, `TrainConfig` in `train/`, ...);
this module is the machinery they share:

- `from_dict(cls, data, source)` builds a (nested) dataclass from plain data, checking every value
  against the field's type; an unknown key fails and names the source and the dotted key.
- `apply_overrides(data, ["train.lr=3e-4", ...])` sets dotted keys; values are parsed by `from_dict`
  according to the field type, so `--train.lr=3e-4` is a float and `--model.n_layers=4` an int.
- `load(cls, preset=..., overrides=...)`: defaults < preset TOML < overrides.
- `to_dict` / `save_toml` write the resolved config (a run dir's `config.toml`) so it reloads equal.

TOML has no null: fields whose value is None are left out when saving and come back as their
default, so a field that may be None must default to None.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from lmforge.errors import ConfigError

T = TypeVar("T")

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Convert `value` (from TOML or a CLI string) to type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail(expected: str | None = None) -> ConfigError:
        return ConfigError(
            f"{source}: '{key}' = {value!r} is not a valid {expected or _type_name(tp)}"
        )

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise fail(" or ".join(_type_name(a) for a in args))
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ConfigError(f"{source}: '{key}' = {value!r} must be one of {list(args)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise fail(f"table for {tp.__name__}")
        return from_dict(tp, value, source, prefix=f"{key}.")
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = tomllib.loads(f"v = {text}")["v"]
                except tomllib.TOMLDecodeError:
                    raise fail() from None
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise fail()
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise fail(f"{len(args)}-tuple")
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise fail()
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise fail("bool (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                raise fail() from None
            if f.is_integer():
                return int(f)
        raise fail()
    if tp is float:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise fail()


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config", prefix: str = "") -> T:
    """Build dataclass `cls` from `data`; unknown keys and badly typed values raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<root>'}' must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' for {cls.__name__} "
            f"(known: {', '.join(sorted(fields))})"
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name, source) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: invalid {cls.__name__}: {e}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass to plain TOML-able data; None values are left out (TOML has no null)."""

    def clean(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: clean(getattr(v, f.name)) for f in dataclasses.fields(v)
                    if getattr(v, f.name) is not None}
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return clean(obj)


def parse_override(text: str) -> tuple[list[str], str]:
    """'--train.lr=3e-4' or 'train.lr=3e-4' -> (['train', 'lr'], '3e-4')."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"override '{text}' must look like --section.key=value")
    key, value = body.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with dotted overrides set (values stay strings; from_dict types them)."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a table")
        node[path[-1]] = value
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def load(cls: type[T], preset: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults < preset TOML file < dotted overrides, validated into `cls`."""
    data: dict[str, Any] = {}
    source = "defaults"
    if preset is not None:
        data = load_toml(preset)
        source = str(preset)
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{source} + overrides"
    return from_dict(cls, data, source)


def save_toml(obj: Any, path: str | Path) -> None:
    """Write a resolved config atomically as TOML."""
    import tomli_w

    from lmforge.io import write_text

    write_text(path, tomli_w.dumps(to_dict(obj)))
