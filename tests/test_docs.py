"""Every citation of the notes in the code and the protocol files points at a note (and heading) in docs/."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED = re.compile(r'docs/([\w-]+\.md)(?:,? "([^"]+)")?')


def sources() -> list[Path]:
    return [p for folder in ("osslbench", "baselines", "protocols") for p in (ROOT / folder).rglob("*")
            if p.suffix in (".py", ".toml")]


def test_citations_point_into_docs():
    cited = 0
    for path in sources():
        text = path.read_text()
        assert "REFERENCE.md" not in text, f"{path}: cites REFERENCE.md, which is not in the repository"
        for name, heading in CITED.findall(text):
            note = ROOT / "docs" / name
            assert note.is_file(), f"{path}: cites docs/{name}, which does not exist"
            if heading:
                headings = [line.lstrip("#").strip() for line in note.read_text().splitlines() if line.startswith("#")]
                assert any(h.startswith(heading) for h in headings), f"{path}: no heading {heading!r} in docs/{name}"
            cited += 1
    assert cited >= 17  # the citations that used to point at a file outside the repository
