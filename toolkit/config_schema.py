"""Typed dataclasses from YAML mappings: conversion that checks every field's type, `key.sub=value`
overrides, and back to plain dicts. The run configuration (toolkit.config) and the files a run writes
for itself (encoder and teacher specs) are read through it, so every error names the source and the
dotted field, and lists the allowed keys or values.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

import yaml

from toolkit.errors import EmbedforgeError


class ConfigError(EmbedforgeError, ValueError):
    """A configuration problem; the message names the file and the field."""


def check_sizes(section: str, obj: Any, minimums: dict[str, int | float]) -> None:
    """ConfigError naming `section.field` for the first field below its minimum (a size, count or length)."""
    for name, low in minimums.items():
        value = getattr(obj, name)
        if value is not None and value < low:
            raise ConfigError(f"{section}.{name}: must be >= {low}, got {value}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to `tp`, raising ConfigError naming `where` on mismatch."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _build(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return build_dataclass(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_build(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_build(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def build_dataclass(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; allowed keys of {cls.__name__}: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        path = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _build(hints[name], data[name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}: required field is missing ({cls.__name__})")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        message, section = str(exc), where.rsplit(".", 1)[-1]
        if where and message.startswith(section + "."):  # `data.max_length: ...` under `stages[0].data`
            raise ConfigError(where + message[len(section):]) from None
        raise ConfigError(f"{where + ': ' if where else ''}{message}") from None


def set_path(tree: dict, dotted: str, value: Any) -> None:
    """Apply `a.b.c=value` to a nested dict; list items are addressed by index or by `name`."""
    keys = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            match = [item for item in node if isinstance(item, dict) and item.get("name") == key]
            if key.isdigit() and int(key) < len(node):
                idx = int(key)
            elif match:
                idx = node.index(match[0])
            else:
                names = [item.get("name") for item in node if isinstance(item, dict)]
                raise ConfigError(f"override {dotted}: no list item {key!r} (by index or name {names})")
            if last:
                node[idx] = value
            else:
                node = node[idx]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {'.'.join(keys[:i])} is not a mapping")
        if last:
            node[key] = value
        else:
            node = node.setdefault(key, {})


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key.strip(), value


def from_dict(data: dict, cls: type, source: str = "<dict>") -> Any:
    """`data` as a `cls` dataclass; a ConfigError names `source` and the field."""
    try:
        return build_dataclass(cls, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def to_dict(cfg: Any) -> dict:
    """Plain-YAML-able dict of a config (tuples become lists)."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(cfg))
