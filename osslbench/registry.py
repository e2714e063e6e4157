"""Method discovery: every ``Method`` subclass in ``baselines/`` (and its family folders ``distill/``, ``ssl/``,
``openset/``) plus the ``osslbench.methods`` entry points.

No hand-kept list: adding a file to ``baselines/<family>/`` (or installing a package that declares an entry
point ``[project.entry-points."osslbench.methods"] name = "pkg.module:Class"``) is enough. A built-in method's
family is the folder it lives in unless its class sets ``family``.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from . import baselines
from .config import as_tree, build, deep_merge
from .errors import ConfigError
from .method import Method, MethodConfig
from .protocol import OptimConfig, Protocol


@cache
def methods() -> dict[str, type[Method]]:
    """Name -> Method class of every built-in and entry-point method."""
    found: dict[str, type[Method]] = {}
    for info in pkgutil.walk_packages(baselines.__path__, prefix=f"{baselines.__name__}."):
        if info.ispkg:
            continue
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Method) and obj.name and obj.__module__ == module.__name__:
                found[obj.name] = obj
    for ep in entry_points(group="osslbench.methods"):
        obj = ep.load()
        if not (inspect.isclass(obj) and issubclass(obj, Method) and obj.name):
            raise ConfigError(f"entry point {ep.name} = {ep.value} is not a named osslbench Method subclass")
        found[obj.name] = obj
    return dict(sorted(found.items()))


def family(cls: type[Method]) -> str:
    """The method's family: its class's ``family``, else the ``baselines/`` folder it lives in (``distill``,
    ``ssl``, ``openset``), else ``plugin`` for an entry point outside ``osslbench``."""
    if cls.family:
        return cls.family
    parts = cls.__module__.split(".")
    if parts[:2] == ["osslbench", "baselines"]:
        return parts[2] if len(parts) > 3 else "baseline"
    return "plugin"


def get_method(name: str) -> type[Method]:
    """The Method class registered as ``name``."""
    known = methods()
    if name not in known:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(known)}")
    return known[name]


def resolve_method_names(spec: str | None, protocol: Protocol) -> list[str]:
    """``--methods a,b`` / ``all`` / ``None`` (the protocol's list), each name checked."""
    if spec is None:
        names = list(protocol.methods)
    elif spec == "all":
        names = list(methods())
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ConfigError("--methods: no method given")
    for n in names:
        get_method(n)
    return names


def method_config(cls: type[Method], protocol: Protocol) -> tuple[MethodConfig, OptimConfig]:
    """A method's validated config (paper defaults < protocol ``[method.<name>]`` < ``--set``) and optimiser.

    The optimiser is the protocol's ``[optim]``, then the method's ``optim_defaults``, then the
    ``optim`` table of its config: a method's own settings beat the protocol's generic ones.
    """
    where = f"{protocol.source_file}: method.{cls.name}"
    cfg = build(cls.Config, protocol.method_tree(cls.name), where)
    if cls.needs_unlabelled and cfg.mu <= 0:
        raise ConfigError(f"{where}: {cls.name} needs unlabelled data: mu must be > 0")
    optim_tree: dict[str, Any] = deep_merge(deep_merge(as_tree(protocol.optim), cls.optim_defaults), cfg.optim)
    return cfg, build(OptimConfig, optim_tree, f"{where}.optim")

