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


#: ``--methods`` groups -> the family they select (see :func:`family`); each group also runs ``supervised``
GROUPS = {"distillers": "distill", "ssl": "ssl", "openset": "openset"}
#: the reference every group includes: the student trained on the labelled images alone
REFERENCE = "supervised"


def group(name: str) -> list[str]:
    """The methods of a ``--methods`` group: ``all``, or ``distillers`` / ``ssl`` / ``openset`` (every method of that
    family, built-in or plugin, plus ``supervised``: a leaderboard of a family needs the student-alone reference
    to say whether the family helps at all)."""
    known = methods()
    if name == "all":
        return list(known)
    fam = GROUPS[name]
    return [REFERENCE, *(n for n, cls in known.items() if family(cls) == fam and n != REFERENCE)]


def resolve_method_names(spec: str | None, protocol: Protocol) -> list[str]:
    """``--methods a,b`` (names and groups, see :func:`group`, mixed freely) / ``None`` (the protocol's list), each
    name checked; duplicates kept once, in order."""
    if spec is None:
        names = list(protocol.methods)
    else:
        names = []
        for token in (t.strip() for t in spec.split(",")):
            if token in GROUPS or token == "all":
                names += group(token)
            elif token:
                names.append(token)
    if not names:
        raise ConfigError("--methods: no method given")
    for n in names:
        if n not in methods():
            raise ConfigError(f"--methods: unknown method {n!r}; known: {', '.join(methods())} "
                              f"or a group: all, {', '.join(GROUPS)}")
    return list(dict.fromkeys(names))  # a repeated method is one run, not two at once


def student_rules_of(cls: type[Method], protocol: Protocol) -> dict[str, Any]:
    """The student model's rules that apply to this method's run (its optimiser, its own method table)."""
    rules = protocol.student_rules
    out: dict[str, Any] = {}
    if rules.get("optim"):
        out["optim"] = rules["optim"]
    mine = rules.get("method", {}).get(cls.name)
    if mine:
        out["method"] = {cls.name: mine}
    return out


def method_config(cls: type[Method], protocol: Protocol, where: str = "") -> tuple[MethodConfig, OptimConfig]:
    """A method's validated config (paper defaults < protocol ``[method.<name>]`` < the student model's rules <
    the scale and ``--set``) and optimiser.

    The optimiser is the protocol's ``[optim]``, then the student model's rules (``student_defaults`` of its
    ``register_model``: RepDistiller's lr 0.01 for ShuffleNet / MobileNet students), then the method's
    ``optim_defaults``, then the ``optim`` table of its config: a method's own settings beat the generic ones.
    """
    where = f"{where or protocol.source_file}: method.{cls.name}"
    rules = student_rules_of(cls, protocol)
    cfg = build(cls.Config, deep_merge(protocol.method_tree(cls.name), rules.get("method", {}).get(cls.name, {})), where)
    if cls.needs_unlabelled and cfg.mu <= 0:
        raise ConfigError(f"{where}: {cls.name} needs unlabelled data: mu must be > 0")
    optim_tree: dict[str, Any] = deep_merge(as_tree(protocol.optim), rules.get("optim", {}))
    optim_tree = deep_merge(deep_merge(optim_tree, cls.optim_defaults), cfg.optim)
    return cfg, build(OptimConfig, optim_tree, f"{where}.optim")

