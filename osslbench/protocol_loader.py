"""Protocol files: the built-in catalogue under ``protocols/``, reading TOML, ``extends`` chains, named scales,
``--set`` overrides and the student model's rules, resolved into a validated :class:`~osslbench.protocol.Protocol`.

A protocol file is a tree; a named scale (``[scales.mini]``) is a tree merged on top of it, and ``--set key=value``
overrides are merged last, so the command line always beats the file. Only the merged tree is validated, once, so
every error names the file and the key.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from .config import build, deep_merge
from .errors import ConfigError
from .protocol import Protocol

_TOP_KEYS = {"description", "paper", "default_scale", "scales", "data", "split", "models", "train", "optim",
             "methods", "seeds", "method", "extends"}


def builtin_dir() -> Path:
    """The folder of the built-in protocol files: inside the package when installed (``pip install .``
    copies ``protocols/`` there), beside it in a source checkout or an editable install."""
    here = Path(__file__).resolve().parent
    installed = here / "protocols"
    return installed if installed.is_dir() else here.parent / "protocols"


def protocol_files() -> dict[str, Path]:
    """Protocol name -> file, for every ``*.toml`` of the built-in folder."""
    return {p.stem: p for p in sorted(builtin_dir().glob("*.toml"))}


def find_protocol(name: str) -> Path:
    """A protocol's file from its name, or a path to any ``.toml`` file."""
    if name.endswith(".toml"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"protocol file {name} does not exist")
        return path
    files = protocol_files()
    if name not in files:
        raise ConfigError(f"unknown protocol {name!r}; known: {', '.join(files)} (or give a path to a .toml file)")
    return files[name]


def read_tree(path: Path) -> dict[str, Any]:
    """The raw TOML tree of a protocol file."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                          "TOML files must be saved as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: malformed TOML: {' '.join(str(exc).split())}") from None


def _where(path: Path) -> str:
    """How errors name a protocol file: ``protocols/<file>`` for a built-in, else the path as given."""
    return f"protocols/{path.name}" if path.resolve() == protocol_files().get(path.stem, Path()).resolve() else str(path)


def _resolved_tree(path: Path, where: str, chain: list[Path]) -> dict[str, Any]:
    """The file's tree merged over the protocol it ``extends``, recursively: a family of protocols (CIFAR-100
    seen 50 / 55 / 80 / 20) is one file plus one small file per member. ``extends`` is a built-in protocol's
    name or a ``.toml`` path, relative to the folder of the file that extends it."""
    tree = read_tree(path)
    unknown = sorted(set(tree) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_TOP_KEYS))})")
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{where}: extends must be the name of a built-in protocol or a .toml path")
    if parent.endswith(".toml"):
        base = path.parent / parent
        if not base.is_file():
            raise ConfigError(f"{where}: extends {parent!r}: no such file {base}")
    else:
        try:
            base = find_protocol(parent)
        except ConfigError as exc:
            raise ConfigError(f"{where}: extends: {exc}") from None
    if base.resolve() in chain or base.resolve() == path.resolve():
        raise ConfigError(f"{where}: extends {parent!r} forms a cycle")
    return deep_merge(_resolved_tree(base, _where(base), [*chain, path.resolve()]), tree)


def _without(rules: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``rules`` less every key path that ``given`` sets (a scale or ``--set`` beats a model's rule)."""
    out = {}
    for key, value in rules.items():
        if key not in given:
            out[key] = value
        elif isinstance(value, dict) and isinstance(given[key], dict):
            rest = _without(value, given[key])
            if rest:
                out[key] = rest
    return out


def student_rules(tree: dict[str, Any], later: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """The student's ``student_defaults`` (:class:`osslbench.models.ModelInfo`) that hold for the merged ``tree``:
    those not set by a ``later`` layer (the scale, ``--set``)."""
    from .models import MODEL_INFO  # the zoo registers itself on import

    models = tree.get("models")
    if not isinstance(models, dict):
        return {}
    student = models.get("student")  # unknown models and roles are ModelsConfig's errors
    rules = MODEL_INFO[student].student_defaults if isinstance(student, str) and student in MODEL_INFO else {}
    for layer in later:
        rules = _without(rules, layer)
    return rules


def load_protocol(name: str, scale: str | None = None, overrides: dict[str, Any] | None = None) -> Protocol:
    """Load, merge and validate a protocol.

    :param name: a built-in protocol name or a path to a ``.toml`` file.
    :param scale: a named scale of the file (``full`` is the file itself); ``None`` = its ``default_scale``.
    :param overrides: a tree from ``--set`` (:func:`osslbench.config.parse_overrides`), applied last.
    """
    path = find_protocol(name)
    where = _where(path)
    builtin = protocol_files().get(path.stem)
    if builtin is not None and builtin.resolve() != path.resolve():
        raise ConfigError(f"{path}: named like the built-in protocol {path.stem!r}, whose results live in "
                          f"<out>/{path.stem}/; rename the file (a protocol's file name names its results folder)")
    if not _NAME.fullmatch(path.stem):
        raise ConfigError(f"{path}: a protocol file name must be letters, digits, '-', '_' or '.' (it names a folder)")
    tree = _resolved_tree(path, where, [])
    scales = tree.pop("scales", {})
    if not isinstance(scales, dict) or any(not isinstance(v, dict) for v in scales.values()):
        raise ConfigError(f"{where}: scales must be tables, e.g. [scales.mini]")
    names = ["full", *[s for s in scales if s != "full"]]
    scale = scale or tree.pop("default_scale", "full")
    tree.pop("default_scale", None)
    if scale not in names:
        raise ConfigError(f"{where}: unknown scale {scale!r}; this protocol has {', '.join(names)}")
    layers = {f"{where} [scales.{name}]": layer for name, layer in scales.items()}
    layers["--set"] = overrides or {}
    for layer_where, layer in layers.items():  # every scale is checked, not only the one in use
        bad = sorted((set(layer) - _TOP_KEYS) | ({"scales", "default_scale"} & set(layer)))
        if bad:
            raise ConfigError(f"{layer_where}: unknown key {bad[0]!r}")
    tree.setdefault("description", "")
    tree.setdefault("paper", "")
    tree.update(name=path.stem, source_file=where, scales=names, overrides=overrides or {})
    # every scale is validated whole (with the same --set), so a typo in [scales.smoke] is found while running mini
    chosen = None
    for other in [scale, *[n for n in names if n != scale]]:
        at = where if other == scale else f"{where} [scales.{other}]"
        try:
            protocol = _built(tree, scales.get(other, {}), overrides or {}, other, at)
        except ConfigError as error:
            if not overrides:
                raise
            try:  # the file alone is valid: the error is --set's, so name it (not the file the user did not edit)
                _built(tree, scales.get(other, {}), {}, other, at)
            except ConfigError:
                raise error from None
            on = "" if other == scale else f" (on {where} [scales.{other}])"
            raise ConfigError(f"--set{on}: {str(error).removeprefix(at).lstrip('.: ')}") from None
        chosen = chosen or protocol
    assert chosen is not None
    return chosen


def _built(tree: dict[str, Any], scale_layer: dict[str, Any], overrides: dict[str, Any], scale: str,
           where: str) -> Protocol:
    """The protocol of ``tree`` with its scale's layer and ``--set`` on top, validated whole."""
    merged = deep_merge(deep_merge(tree, scale_layer), overrides)
    merged["student_rules"] = student_rules(merged, [scale_layer, overrides], where)
    protocol = build(Protocol, {**merged, "scale": scale}, where)
    _check_methods(protocol, where)
    return protocol


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def _check_methods(protocol: Protocol, where: str) -> None:
    """Every method the protocol names (its ``methods`` list, its ``[method.<name>]`` tables, ``--set
    method.<name>.*``) is a known method whose table has only its keys, even when this command does not run it."""
    from .registry import check_protocol_methods  # the registry imports this module

    check_protocol_methods(protocol, where)
