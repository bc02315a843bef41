"""The docs stay true: runnable examples run, and relative links resolve.

A ```python block in docs/*.md preceded by ``<!-- test -->`` (blank lines
allowed in between) is runnable: it is written to a file and run with
``python`` in a fresh subprocess (spawned ranks need an importable
``__main__``), with a timeout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests._harness import TIMEOUT

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

_MARKER = "<!-- test -->"
_FENCE = re.compile(r"^```")


def _doc_files() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def runnable_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block marked ``<!-- test -->``."""
    lines = path.read_text().splitlines()
    blocks = []
    marked = False
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line == _MARKER:
            marked = True
        elif line.startswith("```"):
            start = i
            lang = line[3:].strip()
            body = []
            i += 1
            while i < len(lines) and not _FENCE.match(lines[i].strip()):
                body.append(lines[i])
                i += 1
            if marked:
                assert lang == "python", f"{path.name}:{start + 1}: {_MARKER} must precede a ```python block"
                blocks.append((start + 1, "\n".join(body) + "\n"))
            marked = False
        elif line:
            marked = False
        i += 1
    return blocks


def _all_runnable():
    out = []
    for path in _doc_files():
        for line, code in runnable_blocks(path):
            out.append(pytest.param(path, code, id=f"{path.name}:{line}"))
    return out


def test_custom_passes_page_has_a_runnable_example():
    assert runnable_blocks(DOCS / "custom_passes.md"), "docs/custom_passes.md must have a <!-- test --> python block"


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("path,code", _all_runnable())
def test_runnable_example(path, code, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(code)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # custom passes must run on every compile: never serve graphs from Inductor's caches
    env.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
    env.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
    try:
        proc = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{path.name}: example did not finish within {TIMEOUT} s\n{exc.stdout or ''}\n{exc.stderr or ''}")
    assert proc.returncode == 0, f"{path.name}: example failed (exit {proc.returncode})\n{proc.stdout}\n{proc.stderr[-6000:]}"


# -- links -------------------------------------------------------------------

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_INLINE_CODE = re.compile(r"`[^`]*`")


def _prose(text: str) -> list[tuple[int, str]]:
    """Lines outside fenced code blocks, with inline code removed."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, _INLINE_CODE.sub("", line)))
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text().splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not match:
            continue
        slug = _slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def _relative_links(path: Path) -> list[tuple[int, str]]:
    links = []
    for n, line in _prose(path.read_text()):
        for target in _LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            links.append((n, target))
    return links


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: p.name)
def test_relative_links_resolve(path):
    problems = []
    for n, target in _relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{path.name}:{n}: {target} -> {dest} does not exist")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{path.name}:{n}: {target}: no heading with anchor #{anchor} in {dest.name}")
    assert not problems, "\n".join(problems)


def test_docs_pages_exist_and_are_linked_from_index():
    index = (DOCS / "index.md").read_text()
    for name in ("concepts.md", "passes.md", "custom_passes.md", "launching.md", "troubleshooting.md", "config.md"):
        assert (DOCS / name).exists(), name
        assert f"({name})" in index, f"index.md does not link {name}"


def _pass_table_names(text: str) -> list[str]:
    names = []
    for line in text.splitlines():
        m = re.match(r"\| \[`([a-z_*]+)`\]", line)
        if m:
            names.append(m.group(1))
    return names


def test_pass_lists_in_docs_match_default_passes():
    import zerograph

    names = zerograph.default_passes().names
    passes_md = (DOCS / "passes.md").read_text()
    assert repr(names) in passes_md, "docs/passes.md: the default_passes().names output is stale"
    table = _pass_table_names(passes_md)
    collapsed = [n for n in names if not n.startswith("fuse_")]
    assert [n for n in table if n != "fuse_*"] == collapsed, table
    readme = (DOCS.parent / "README.md").read_text()
    chain = re.search(r"ZeRO stages 0–3 as passes \| (.*) \|", readme).group(1)
    readme_names = re.findall(r"`([a-z_]+)`", chain)
    assert readme_names == [n for n in names if n in readme_names], "README's pass chain is out of order"
    optional = {"activation_checkpointing", "defer_grad_sync", "hpz_secondary", "quantize_weight_gathers",
                "quantize_grad_reduction"}  # README lists them elsewhere
    assert set(readme_names) == set(collapsed) - optional, readme_names
    custom = (DOCS / "custom_passes.md").read_text()
    printed = re.search(r"Output \(timings vary; the numbers do not\):\n\n```\n(\[.*\])\n", custom).group(1)
    config = {"zero_optimization": {"stage": 3}, "zerograph": {"verify_graphs": True}}
    expected = zerograph.default_passes(config).insert_before(
        "dce", zerograph.GraphPass("fold_double_transpose", lambda gm, ctx: None)).names + ["count_gathers"]
    assert printed == repr(expected), "docs/custom_passes.md: the printed pass list is stale"
