"""Method discovery: every ``Method`` subclass in ``baselines/`` (and its family folders ``distill/``, ``ssl/``,
``openset/``) plus the ``osslbench.methods`` entry points.

No hand-kept list: adding a file to ``baselines/<family>/`` (or installing a package that declares an entry
point ``[project.entry-points."osslbench.methods"] name = "pkg.module:Class"``) is enough. A built-in method's
family is the folder it lives in unless its class sets ``family``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
import sys
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from . import baselines
from .config import as_tree, build, deep_merge
from .errors import ConfigError
from .method import Method, MethodConfig
from .protocol import OptimConfig, Protocol

BUILTIN = "built-in"


def _warn(text: str) -> None:
    print(f"osslbench: warning: {text}", file=sys.stderr)


def _plugin(ep: EntryPoint) -> str:
    """How a warning names an entry point: ``'name = module:Class' of distribution 'pkg'``."""
    dist = getattr(ep, "dist", None)
    return f"'{ep.name} = {ep.value}'" + (f" of distribution {dist.name!r}" if dist is not None else "")


_ORIGIN: dict[str, str] = {}  # method name -> "built-in" or its distribution, filled by methods()


@cache
def methods() -> dict[str, type[Method]]:
    """Name -> Method class of every built-in method and every entry point that loads."""
    found: dict[str, type[Method]] = {}
    origin: dict[str, str] = {}
    for info in pkgutil.walk_packages(baselines.__path__, prefix=f"{baselines.__name__}."):
        if info.ispkg:
            continue
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Method) and obj.name and obj.__module__ == module.__name__:
                found[obj.name] = obj
                origin[obj.name] = BUILTIN
    # a third-party package can add methods, never break or replace one: every problem is a warning naming
    # the distribution, and the command goes on with the methods that load
    for ep in entry_points(group="osslbench.methods"):
        who = _plugin(ep)
        try:
            obj = ep.load()
        except Exception as exc:  # any import-time failure of someone else's code
            _warn(f"method plugin {who} cannot be loaded ({type(exc).__name__}: "
                  f"{' '.join(str(exc).split())[:160]}); ignored")
            continue
        if not (inspect.isclass(obj) and issubclass(obj, Method) and obj.name):
            _warn(f"method plugin {who} is not a named osslbench Method subclass; ignored")
            continue
        if obj.name in found and found[obj.name] is not obj:
            kept = "the built-in one" if origin[obj.name] == BUILTIN else f"the one of {origin[obj.name]!r}"
            _warn(f"method plugin {who} is named {obj.name!r} like another method; {kept} is kept, the plugin ignored")
            continue
        found[obj.name] = obj
        dist = getattr(ep, "dist", None)
        origin[obj.name] = dist.name if dist is not None else ep.value.split(":")[0]
    _ORIGIN.clear()
    _ORIGIN.update(origin)
    return dict(sorted(found.items()))


def origin(name: str) -> str:
    """Where a method comes from: ``built-in`` or the name of the distribution that installed it."""
    get_method(name)
    return _ORIGIN[name]


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
        close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6) if isinstance(name, str) else []
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown method {name!r}; {hint}known: {', '.join(known)}")
    return known[name]


def check_protocol_methods(protocol: Protocol, where: str) -> None:
    """Every method named by the protocol (``methods``, ``[method.<name>]`` tables and ``--set method.<name>.*``)
    exists, and each table validates against its method's config, whether or not a command runs it."""
    for name in protocol.methods:
        try:
            get_method(name)
        except ConfigError as exc:
            raise ConfigError(f"{where}: methods: {exc}") from None
    for name in protocol.method:
        try:
            cls = get_method(name)
        except ConfigError as exc:
            raise ConfigError(f"{where}: method.{name} (a [method.{name}] table or --set method.{name}.*): {exc}") from None
        method_config(cls, protocol, where)


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
    return list(dict.fromkeys(names))  # a repeated method is one run, not two at once


def method_config(cls: type[Method], protocol: Protocol, where: str = "") -> tuple[MethodConfig, OptimConfig]:
    """A method's validated config (paper defaults < protocol ``[method.<name>]`` < ``--set``) and optimiser.

    The optimiser is the protocol's ``[optim]``, then the method's ``optim_defaults``, then the
    ``optim`` table of its config: a method's own settings beat the protocol's generic ones.
    """
    where = f"{where or protocol.source_file}: method.{cls.name}"
    cfg = build(cls.Config, protocol.method_tree(cls.name), where)
    if cls.needs_unlabelled and cfg.mu <= 0:
        raise ConfigError(f"{where}: {cls.name} needs unlabelled data: mu must be > 0")
    optim_tree: dict[str, Any] = deep_merge(deep_merge(as_tree(protocol.optim), cls.optim_defaults), cfg.optim)
    return cfg, build(OptimConfig, optim_tree, f"{where}.optim")

