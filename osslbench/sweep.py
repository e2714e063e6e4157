"""Sweeps: one protocol run at several values of a key (``--sweep mismatch=0,0.25,0.5,0.75,1``).

Each point is the protocol with the key overridden (after its scale and ``--set``); its runs live in
``<out>/<protocol>/<scale>/<key>=<value>/`` and its leaderboard rows carry a ``sweep_<key>`` column, so the
points of a sweep sit side by side in one leaderboard (Oliver et al., NeurIPS 2018, Fig. 2: accuracy
against the class-mismatch ratio).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from .config import deep_merge, parse_value
from .errors import ConfigError
from .protocol import Protocol
from .protocol_loader import load_protocol

#: Protocol sections whose keys can be swept by their bare name (``mismatch`` -> ``split.mismatch``).
SECTIONS = ("data", "split", "models", "train", "optim")


def resolve_key(key: str, protocol: Protocol) -> str:
    """The dotted key a ``--sweep`` name stands for: ``split.mismatch`` as given, or a bare name found in
    exactly one section; ``method.<name>.<key>`` is checked when the method's config is built.

    :raises ConfigError: unknown or ambiguous key.
    """
    fields = {section: [f.name for f in dataclasses.fields(getattr(protocol, section))] for section in SECTIONS}
    if "." in key:
        section, _, leaf = key.partition(".")
        if section == "method" and leaf.count(".") == 1 and all(leaf.split(".")):
            return key
        if section in SECTIONS and leaf in fields[section]:
            return key
        raise ConfigError(f"--sweep: unknown key {key!r} in {protocol.source_file}")
    hits = [f"{section}.{key}" for section in SECTIONS if key in fields[section]]
    if len(hits) > 1:
        raise ConfigError(f"--sweep: key {key!r} is ambiguous ({', '.join(hits)}); give the dotted name")
    if not hits:
        known = ", ".join(f"split.{k}" for k in fields["split"])
        raise ConfigError(f"--sweep: unknown key {key!r} in {protocol.source_file} (e.g. {known})")
    return hits[0]


def parse_sweep(text: str, protocol: Protocol) -> tuple[str, list[Any]]:
    """``"mismatch=0,0.5,1"`` -> ``("split.mismatch", [0, 0.5, 1])``."""
    key, sep, values = text.partition("=")
    items = [v.strip() for v in values.split(",")]
    if not sep or not key.strip() or not all(items):
        raise ConfigError(f"--sweep {text!r}: expected KEY=V1,V2,..., e.g. mismatch=0,0.5,1")
    parsed = [parse_value(v) for v in items]
    if len({repr(v) for v in parsed}) != len(parsed):
        raise ConfigError(f"--sweep {text!r}: a value is repeated")
    return resolve_key(key.strip(), protocol), parsed


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def _lookup(protocol: Protocol, dotted: str) -> Any:
    """The validated value of ``dotted`` in ``protocol`` (a method key: as given in its table)."""
    section, _, rest = dotted.partition(".")
    if section == "method":
        name, _, leaf = rest.partition(".")
        return protocol.method_tree(name)[leaf]
    return getattr(getattr(protocol, section), rest)


def _short(dotted: str) -> str:
    """``split.mismatch`` -> ``mismatch``; method keys keep their full name."""
    return dotted.split(".", 1)[1] if dotted.split(".")[0] in SECTIONS else dotted


def sweep_protocols(name: str, scale: str | None, overrides: dict[str, Any], sweeps: list[str]) -> list[Protocol]:
    """The protocol once per point of the grid of ``sweeps`` (the plain protocol when there are none).

    A point's ``sweep`` maps each swept key's short name to its value as validated (``0`` -> ``0.0`` for
    a float key), which names its folder and its leaderboard columns.
    """
    base = load_protocol(name, scale, overrides)
    if not sweeps:
        return [base]
    axes = [parse_sweep(text, base) for text in sweeps]
    keys = [key for key, _ in axes]
    if len(set(keys)) != len(keys):
        raise ConfigError("--sweep: a key is swept twice")
    points = []
    for values in itertools.product(*[vals for _, vals in axes]):
        point: dict[str, Any] = {}
        for key, value in zip(keys, values, strict=True):
            point = deep_merge(point, _nested(key, value))
        protocol = load_protocol(name, scale, deep_merge(overrides, point))
        protocol.sweep = {_short(key): _lookup(protocol, key) for key in keys}
        protocol.overrides = overrides  # the point itself is named by ``sweep``, not a custom override
        points.append(protocol)
    return points
