"""Method discovery: built-in files and third-party entry points."""

from __future__ import annotations

import sys
import types
from importlib.metadata import EntryPoint

import pytest

from osslbench import registry
from osslbench.errors import ConfigError
from osslbench.method import Batch, Method, cross_entropy


class Plugin(Method):
    name = "plugin-ce"
    description = "a third-party method"

    def losses(self, batch: Batch):
        return {"ce": cross_entropy(self.student(batch.x_lb), batch.y_lb)}


def test_builtin_methods_are_discovered_from_files():
    found = registry.methods()
    assert {"supervised", "kd", "srd", "fixmatch"} <= set(found)
    assert all(cls.name == name and cls.description for name, cls in found.items())


def test_entry_point_methods_are_added(monkeypatch):
    module = types.ModuleType("thirdparty_plugin")
    module.Plugin = Plugin
    module.types = types  # not a Method: must be refused
    monkeypatch.setitem(sys.modules, "thirdparty_plugin", module)
    ep = EntryPoint(name="plugin-ce", value="thirdparty_plugin:Plugin", group="osslbench.methods")
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep] if group == "osslbench.methods" else [])
    registry.methods.cache_clear()
    try:
        assert registry.get_method("plugin-ce") is Plugin
        bad = EntryPoint(name="bad", value="thirdparty_plugin:types", group="osslbench.methods")
        monkeypatch.setattr(registry, "entry_points", lambda group: [bad])
        registry.methods.cache_clear()
        with pytest.raises(ConfigError, match="not a named osslbench Method"):
            registry.methods()
    finally:
        registry.methods.cache_clear()


def test_ssl_methods_refuse_mu_zero_and_distillers_accept_it():
    from osslbench.protocol import load_protocol

    ssl = {name for name in registry.methods() if registry.get_method(name).needs_unlabelled}
    assert {"pseudolabel", "meanteacher", "mixmatch", "fixmatch", "mtc", "openmatch", "t2t", "iomatch"} <= ssl
    for name in registry.methods():
        protocol = load_protocol("digits-openset", "smoke", {"method": {name: {"mu": 0}}})
        if name in ssl:
            with pytest.raises(ConfigError, match=f"method.{name}: {name} needs unlabelled data"):
                registry.method_config(registry.get_method(name), protocol)
        else:  # closed-set distillation (RepDistiller's table) and the student alone
            assert registry.method_config(registry.get_method(name), protocol)[0].mu == 0
