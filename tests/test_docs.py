"""The README and docs/: every relative link points at a file of the checkout and, with an anchor,
at a heading of that file (as GitHub makes anchors)."""

from __future__ import annotations

import glob
import os
import re

import pytest

from tests.helpers import REPO

DOCS = ["README.md", "benchmarks/README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(f"{REPO}/docs/*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)  # no headings inside code blocks
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve(doc):
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        targets = LINK.findall(f.read())
    for target in targets:
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(REPO, os.path.dirname(doc), path)) if path else os.path.join(REPO, doc)
        assert os.path.exists(full), f"{doc}: link to {target}: no such file"
        if anchor:
            assert anchor in anchors(full), f"{doc}: link to {target}: no such heading"


def test_docs_exist_and_are_linked_from_the_readme():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for doc in DOCS[2:]:
        assert f"({doc})" in readme or f"({doc}#" in readme, f"README.md does not link {doc}"
