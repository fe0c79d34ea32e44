"""Dataclass configs from a TOML file plus `--key=value` command-line overrides.

    cfg = load_config(TrainConfig, "run.toml", ["--lr=2e-5", "--data=a.jsonl,b.jsonl"])

Values on the command line are parsed by the field's declared type (int, float, bool, str,
list[str] as a comma-separated list, and `X | None`, where "none" means None). Unknown keys, in the
file or on the command line, are errors that list the known ones.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from engine.errors import ConfigError

T = TypeVar("T")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _parse(text: str, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        return _parse(text, args[0], key)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return [_parse(part.strip(), inner, key) for part in text.split(",") if part.strip()]
    if tp is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key}: expected true or false, got {text!r}")
    try:
        return tp(text)
    except (TypeError, ValueError):
        raise ConfigError(f"--{key}: expected {getattr(tp, '__name__', tp)}, got {text!r}") from None


def _check_value(value: Any, tp: Any, key: str, where: str) -> Any:
    """Type-check a TOML value (TOML already typed it); ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list")
        (inner,) = typing.get_args(tp)
        return [_check_value(v, inner, key, where) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key} must be {getattr(tp, '__name__', tp)}, got {value!r}")
    return value


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    types_ = _field_types(cls)
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        for key, value in raw.items():
            if key not in types_:
                raise ConfigError(f"{path}: unknown key {key!r}; known keys: {', '.join(types_)}")
            values[key] = _check_value(value, types_[key], key, str(path))
    for item in overrides:
        if not item.startswith("--") or "=" not in item:
            raise ConfigError(f"override {item!r} must look like --key=value")
        key, text = item[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in types_:
            raise ConfigError(f"unknown option --{key}; known: {', '.join('--' + k for k in types_)}")
        values[key] = _parse(text, types_[key], key)
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values]
    if missing:
        raise ConfigError(f"missing required setting(s): {', '.join(missing)} (in the TOML file or as --key=value)")
    return cls(**values)


def config_diff(old: dict, new: dict, ignore: set[str] = frozenset()) -> list[str]:
    """Human-readable differences between two config dicts."""
    keys = sorted((set(old) | set(new)) - set(ignore))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
