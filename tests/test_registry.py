"""Method discovery: built-in files and third-party entry points."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from osslbench import registry
from osslbench.errors import ConfigError

from helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_builtin_methods_are_discovered_from_files():
    found = registry.methods()
    assert {"supervised", "kd", "srd", "fixmatch"} <= set(found)
    assert all(cls.name == name and cls.description for name, cls in found.items())


def test_the_readme_names_every_built_in_method():
    """The README's "Methods" paragraph is the user's map of what ships; a method missing from it is invisible."""
    readme = (ROOT / "README.md").read_text()
    paragraph = readme.split("Methods (`osslbench list methods`)", 1)[1].split("\n\n", 1)[0]
    builtin = [name for name, cls in registry.methods().items() if registry.family(cls) != "plugin"]
    assert len(builtin) >= 25
    assert [name for name in builtin if f"`{name}`" not in paragraph] == []


def install_plugin(root, dist: str, entries: dict[str, str], module: str | None = None, source: str = "") -> None:
    """A real installed distribution (``<dist>-1.0.dist-info`` with entry points) on ``root``, on sys.path."""
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entries.items())
    (info / "entry_points.txt").write_text(f"[osslbench.methods]\n{lines}")
    if module:
        (root / f"{module}.py").write_text(source)


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """A sys.path folder for fake installed distributions; method discovery is redone after the test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.methods.cache_clear()
    yield tmp_path
    registry.methods.cache_clear()


PLUGIN_SOURCE = """
from osslbench.method import Batch, Method, cross_entropy

class Good(Method):
    name = "plugin-ce"
    description = "a third-party method"

    def losses(self, batch: Batch):
        return {"ce": cross_entropy(self.student(batch.x_lb), batch.y_lb)}

class Impostor(Good):
    name = "kd"
    description = "claims the built-in kd's name"

NOT_A_METHOD = 3
"""


def test_entry_point_methods_are_added_with_their_origin(plugins, capsys):
    install_plugin(plugins, "good-plugin", {"plugin-ce": "goodplug:Good"}, "goodplug", PLUGIN_SOURCE)
    cls = registry.get_method("plugin-ce")
    assert cls.__module__ == "goodplug" and registry.origin("plugin-ce") == "good-plugin"
    assert registry.origin("kd") == registry.BUILTIN and registry.family(cls) == "plugin"
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("entries", "source", "fragment"),
    [
        ({"broken": "brokenplug:Good"}, "import no_such_module_anywhere\n",
         "'broken = brokenplug:Good' of distribution 'evil-plugin' cannot be loaded (ModuleNotFoundError"),
        ({"raises": "brokenplug:Good"}, "raise RuntimeError('boom at import')\n", "cannot be loaded (RuntimeError: boom"),
        ({"notmethod": "brokenplug:NOT_A_METHOD"}, PLUGIN_SOURCE, "is not a named osslbench Method subclass; ignored"),
        ({"kd": "brokenplug:Impostor"}, PLUGIN_SOURCE,
         "of distribution 'evil-plugin' is named 'kd' like another method; the built-in one is kept"),
    ],
)
def test_broken_or_colliding_plugin_is_one_warning_and_builtins_keep_working(plugins, capsys, entries, source, fragment):
    install_plugin(plugins, "evil-plugin", entries, "brokenplug", source)
    from osslbench.cli import main

    assert main(["list", "methods"]) == 0
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and err.startswith("osslbench: warning: method plugin ") and fragment in err
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert "[distill] (built-in)" in rows["kd"] and set(rows) >= {"supervised", "kd", "srd", "fixmatch"}
    kd = registry.get_method("kd")
    assert kd.__module__ == "osslbench.baselines.distill.kd" and registry.origin("kd") == registry.BUILTIN


def test_second_plugin_of_a_name_is_ignored_with_a_warning(plugins, capsys):
    install_plugin(plugins, "first-plugin", {"plugin-ce": "goodplug:Good"}, "goodplug", PLUGIN_SOURCE)
    install_plugin(plugins, "second-plugin", {"plugin-ce": "goodplug2:Good2"}, "goodplug2",
                   "from goodplug import Good\nclass Good2(Good):\n    pass\n")
    assert set(registry.methods()) >= {"plugin-ce", "kd"}
    kept = registry.origin("plugin-ce")
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"the one of {kept!r} is kept" in err


def test_list_methods_shows_every_origin(capsys):
    from osslbench.cli import main

    assert main(["list", "methods"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == len(registry.methods()) and all("(built-in)" in row for row in rows)


def test_typo_method_tables_are_errors_even_when_not_run():
    from osslbench.protocol_loader import load_protocol

    with pytest.raises(ConfigError, match=r"method.kdd .*unknown method 'kdd'; did you mean 'kd'\?"):
        load_protocol("digits-openset", "smoke", {"method": {"kdd": {"alpha": 5}}})
    with pytest.raises(ConfigError, match=r"method.srd: unknown key 'betta'"):  # srd is not in every command
        load_protocol("digits-openset", "smoke", {"method": {"srd": {"betta": 5}}})


def test_ssl_methods_refuse_mu_zero_and_distillers_accept_it():
    from osslbench.protocol_loader import load_protocol

    ssl = {name for name in registry.methods() if registry.get_method(name).needs_unlabelled}
    assert {"pseudolabel", "meanteacher", "mixmatch", "fixmatch", "mtc", "openmatch", "t2t", "iomatch"} <= ssl
    for name in registry.methods():
        if name in ssl:  # refused as soon as the protocol is loaded, whatever the command runs
            with pytest.raises(ConfigError, match=f"method.{name}: {name} needs unlabelled data"):
                load_protocol("digits-openset", "smoke", {"method": {name: {"mu": 0}}})
        else:  # closed-set distillation (RepDistiller's table) and the student alone
            protocol = load_protocol("digits-openset", "smoke", {"method": {name: {"mu": 0}}})
            assert registry.method_config(registry.get_method(name), protocol)[0].mu == 0


def readme_example() -> str:
    """The ``python`` block of the README's "Adding a method" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Adding a method", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readmes_example_method_runs_as_a_plugin(plugins, capsys, tmp_path):
    install_plugin(plugins, "readme-example", {"mykd": "readme_example:MyKD"}, "readme_example", readme_example())
    cls = registry.get_method("mykd")
    assert cls.teacher_outputs == ("logits",) and registry.family(cls) == "plugin"
    out = tmp_path / "results"
    code, _, err = run_cli(capsys, "run", "--methods", "mykd", "--scale", "smoke", "--quiet", "--out", str(out))
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "digits-openset" / "smoke" / "mykd" / "seed0" / "metrics.jsonl")
            .read_text().splitlines()]
    assert rows and all(math.isfinite(row["loss_kd"]) and row["loss_kd"] > 0 for row in rows)


def test_no_methods_results_are_git_ignored():
    """Every method's result files are kept by git (a root-level ``dist/`` rule once hid the ``dist`` method's runs)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    kept = ("result.json", "metrics.jsonl", "splits.npz")
    paths = [f"results/some-protocol/mini/{name}/seed0/{f}" for name in registry.methods() for f in kept]
    paths += ["results/some-protocol/leaderboard.csv", "results/some-protocol/mini_leaderboard.png"]
    out = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == "", f"git ignores: {out.stdout}"
