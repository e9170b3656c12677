"""The Markdown docs: every relative link and image resolves, every `#anchor` names a heading.

GitHub's rules: a relative link resolves against the file's folder (a leading `/` against the
repository root); an anchor is a heading's slug (lower case, punctuation other than `-` and
`_` dropped, spaces to `-`, `-1`, `-2`, ... on repeats). External links are not fetched.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", "build", "dist", "node_modules", ".git", ".pytest_cache", ".ruff_cache"}
README_MAX_LINES = 160

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE_LINK = re.compile(r"\]\(\s*<?([^()\s<>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_SRC = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)=[\"']([^\"']+)[\"']", re.IGNORECASE)
HTML_ANCHOR = re.compile(r"<a\b[^>]*?\b(?:name|id)=[\"']([^\"']+)[\"']", re.IGNORECASE)
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def markdown_files() -> list[Path]:
    """Tracked and new (not ignored) Markdown files; the whole tree if git is unavailable."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "*.md"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        paths = [ROOT / line for line in out]
    except (OSError, subprocess.CalledProcessError):
        paths = list(ROOT.rglob("*.md"))
    return sorted(
        {p for p in paths if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(ROOT).parts)}
    )


def prose_lines(text: str):
    """(line number, line, line with inline code spans blanked) outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            continue
        if fence is not None:
            if line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
                fence = None
            continue
        yield number, line, CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"(?<!\w)_+|_+(?!\w)", "", text)  # _emphasis_, not snake_case
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line, prose in prose_lines(path.read_text(encoding="utf-8")):
        found.update(HTML_ANCHOR.findall(prose))
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path):
    """(line number, target) of every link and image in the file's prose."""
    for number, _, prose in prose_lines(path.read_text(encoding="utf-8")):
        for pattern in (INLINE_LINK, HTML_SRC):
            for target in pattern.findall(prose):
                yield number, target
        match = REFERENCE_DEF.match(prose)
        if match:
            yield number, match.group(1)


def broken_links(path: Path, cache: dict[Path, set[str]]) -> list[str]:
    problems = []
    rel = path.relative_to(ROOT)
    for number, target in links(path):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # http(s), mailto and other external links are not fetched
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part)
        if not file_part:
            dest = path
        elif file_part.startswith("/"):
            dest = ROOT / file_part.lstrip("/")
        else:
            dest = path.parent / file_part
        if not dest.exists():
            problems.append(f"{rel}:{number}: {target} -> no such file or directory")
            continue
        if anchor and dest.is_file() and dest.suffix.lower() == ".md":
            if dest not in cache:
                cache[dest] = anchors(dest)
            if unquote(anchor).lower() not in cache[dest]:
                problems.append(f"{rel}:{number}: {target} -> no heading with anchor #{anchor}")
    return problems


def test_there_are_docs_to_check():
    files = {p.relative_to(ROOT).as_posix() for p in markdown_files()}
    assert "README.md" in files
    assert any(f.startswith("docs/") for f in files)


def test_relative_links_and_anchors_resolve():
    cache: dict[Path, set[str]] = {}
    problems = [problem for path in markdown_files() for problem in broken_links(path, cache)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail to docs/"
    )


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test\b", readme, re.MULTILINE)
    assert re.search(r"^make test\b", ci, re.MULTILINE)


# The checker itself: it must be able to fail.


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        ("The `marche` command", "the-marche-command"),
        ("MARché decoding", "marché-decoding"),
        ("API (OpenAPI at `/docs`)", "api-openapi-at-docs"),
        ("Scale-out: replicas, routing, autoscaling", "scale-out-replicas-routing-autoscaling"),
        ("CPU: MAR-B, 64 steps, cfg 2.9", "cpu-mar-b-64-steps-cfg-29"),
        ("Dispatch: calls (`marche bench --dispatch`)", "dispatch-calls-marche-bench---dispatch"),
        ("snake_case and _emphasis_", "snake_case-and-emphasis"),
    ],
)
def test_slug_follows_github(heading, expected):
    assert slug(heading) == expected


def test_checker_catches_broken_links(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "shot.png").write_bytes(b"")
    (tmp_path / "docs" / "A.md").write_text("# Title\n\n## The `x` part\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "README.md"
    page.write_text(
        "![ok](docs/shot.png) [ok](docs/A.md#the-x-part) [ok](docs/A.md#twice-1) [ok](#top)\n"
        "[ok](https://example.com/missing) [ok](docs/) `[code](missing.md)`\n"
        "# Top\n\n```\n[fenced](missing.md)\n```\n"
        "![bad](docs/web.png) [bad](docs/B.md) [bad](docs/A.md#nope) [bad](#missing)\n"
        "[ref]: docs/gone.md\n"
    )
    problems = broken_links(page, {})
    assert [p.split(" -> ")[0] for p in problems] == [
        "README.md:8: docs/web.png",
        "README.md:8: docs/B.md",
        "README.md:8: docs/A.md#nope",
        "README.md:8: #missing",
        "README.md:9: docs/gone.md",
    ]
