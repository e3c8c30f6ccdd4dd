"""What a user reads describes the product: no words of the project's development process in the
README, docs/ and configs/, and no link there that points nowhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO

# Words that tell how the work went rather than what the software does: numbered sessions,
# lettered or lent machines, numbered device calls, "today's" code.
PROCESS_WORDS = re.compile(
    r"\bsessions?\s+\d+|\bsession'?s\b|\bmachines?\s+[A-H]\b|\blent\b|\btoday'?s\b|\bcalls?\s+\d+\b|_s\d+_|_session\d",
    re.IGNORECASE,
)
TEXT = (".md", ".yaml", ".py", ".toml", ".txt")


def user_facing_files() -> list[Path]:
    files = [REPO / "README.md"]
    for folder in ("docs", "configs"):
        files += sorted(p for p in (REPO / folder).rglob("*") if p.is_file())
    return files


def test_no_development_process_words_in_readme_docs_and_configs():
    hits = []
    for path in user_facing_files():
        rel = path.relative_to(REPO)
        if PROCESS_WORDS.search(str(rel)):  # file names too: records are named by what they measured
            hits.append(f"{rel} (file name)")
        if path.suffix not in TEXT:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if match := PROCESS_WORDS.search(line):
                hits.append(f"{rel}:{number}: {match.group(0)!r}")
    assert not hits, "\n".join(hits[:30])


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize(
    "path", [p for p in user_facing_files() if p.suffix == ".md"], ids=lambda p: str(p.relative_to(REPO))
)
def test_every_markdown_link_points_somewhere(path):
    """Relative links resolve to a file or folder of the repository (web links are not fetched)."""
    broken = []
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+://|mailto:|#", target):
            continue
        file = target.split("#")[0]
        if file and not (path.parent / file).exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(REPO)}: links to nothing: {broken}"
