"""Typed configuration from plain trees: validation into dataclasses, overrides, hashing.

Protocol files and method configs are TOML trees; every layer (file, scale, ``--set``) is merged
as a tree first and validated into dataclasses once, so an error can name the file and the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from .errors import ConfigError

T = TypeVar("T")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A new tree: ``over`` on top of ``base``; tables merge key by key, everything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML literal (``0.5``, ``true``, ``[1, 2]``, ``"x"``) or else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.epochs=3", "method.srd.beta=2"]`` -> a nested tree."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=3")
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is both a value and a table")
        node[parts[-1]] = parse_value(text.strip())
    return tree


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) in (list, tuple):
        return f"list of {_type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against the type hint ``tp`` (ints are accepted for floats)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
    elif origin in (list, tuple):
        if isinstance(value, list | tuple):
            items = [_coerce(v, get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value)]
            return items if origin is list else tuple(items)
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return build(tp, value, where)
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def build(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Validate the tree ``data`` into the dataclass ``cls``.

    Unknown keys, missing required keys and wrong types raise :class:`ConfigError` naming
    ``where`` (e.g. ``"protocols/x.toml: split"``) and the key.
    """
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {name!r}")
    try:
        return cls(**kwargs)
    except ValueError as exc:  # __post_init__ range checks
        raise ConfigError(f"{where}: {exc}") from None


#: Field metadata of config keys added after results were published: such a key is left out of trees (hence of
#: config hashes) while it holds its default, so every earlier result keeps its hash and stays reusable.
ADDED_LATER = {"omit_at_default": True}


def _omitted(obj: Any, f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("omit_at_default")) and getattr(obj, f.name) == f.default


def as_tree(obj: Any) -> Any:
    """A dataclass (or nested containers of them) as a JSON-ready tree (see :data:`ADDED_LATER`)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: as_tree(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not _omitted(obj, f)}
    if isinstance(obj, dict):
        return {str(k): as_tree(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [as_tree(v) for v in obj]
    return obj


def config_hash(tree: Any) -> str:
    """Short, stable hash of a config tree (canonical JSON), recorded with every result."""
    blob = json.dumps(as_tree(tree), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
