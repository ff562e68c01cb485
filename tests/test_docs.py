"""The documents stay true to the code and to each other: the configuration reference is the
settings object's, every local link and anchor resolves, and the README stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.config import reference

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted(
    [
        ROOT / "README.md",
        ROOT / "API.md",
        ROOT / "MODELS.md",
        ROOT / "CHANGELOG.md",
        ROOT / "bench" / "results" / "history.md",
        *(ROOT / "docs").glob("*.md"),
    ]
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def test_the_configuration_reference_is_the_settings_objects() -> None:
    text = reference.PAGE.read_text(encoding="utf-8")
    assert reference.page(text) == text, (
        "docs/configuration.md is stale: run python -m gateway.config.reference"
    )


def test_the_readme_stays_short() -> None:
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 300


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub makes of a page's headings."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_local_link_resolves(document: Path) -> None:
    text = FENCE.sub("", document.read_text(encoding="utf-8"))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^(https?:|mailto:)", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        missing_anchor = (
            linked.exists() and bool(anchor) and linked.suffix == ".md" and anchor not in _anchors(linked)
        )
        if not linked.exists() or missing_anchor:
            broken.append(target)
    assert broken == [], f"{document.name}: {broken}"
