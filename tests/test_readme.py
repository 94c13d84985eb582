"""The README runs: every ```python block, and the shell lines a reader can run safely (the client demo,
curl), each in its own subprocess against one real server started once for this module.

A block whose fence info says `no-test` (a Ray cluster, a package the suite does not install) is reported
as skipped with the fence's reason. Snippets reach the server through `$ACTDATA_URL` (the clients' default)
or through the README's literal URL, which is replaced by the test server's. Also checked: every table's
header and separator agree, config tables list each key once, relative links exist, and the Layout names
every module of the package.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import SYNTHETIC

from actdata.serve import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_URLS = ("http://127.0.0.1:8000", "http://localhost:8000")
# Shell lines that only read from a running server: safe to run here.
SAFE_SHELL = re.compile(r"^(?:\.venv/bin/)?(python -m actdata\.client\b.*|curl .*)$")
SNIPPET_TIMEOUT_S = 240


class Block(NamedTuple):
    """One fenced block of the README: its fence info (`python`, `python no-test (why)`), first line, text."""
    info: str
    line: int
    text: str


def fenced_blocks(text: str) -> list[Block]:
    blocks, info, start, body = [], None, 0, []
    for n, line in enumerate(text.splitlines(), 1):
        if info is None and line.startswith("```"):
            info, start, body = line[3:].strip(), n, []
        elif info is not None and line.startswith("```"):
            blocks.append(Block(info, start, "\n".join(body) + "\n"))
            info = None
        elif info is not None:
            body.append(line)
    assert info is None, f"README.md:{start}: a fence that never closes"
    return blocks


BLOCKS = fenced_blocks(README.read_text())
PYTHON = [b for b in BLOCKS if b.info.split()[:1] == ["python"]]
SHELL = [(b.line + i + 1, line.split("#")[0].strip()) for b in BLOCKS if b.info in ("bash", "sh")
         for i, line in enumerate(b.text.splitlines()) if SAFE_SHELL.match(line.split("#")[0].strip())]


@pytest.fixture(scope="module")
def server():
    """The test preset on the synthetic source, with provenance and statistics for the README's snippets."""
    srv = ServerProcess([*SYNTHETIC, "generator.provenance=true", "generator.statistics=true"])
    yield srv
    srv.stop()


def run_snippet(args: list[str], url: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACTDATA_URL": url, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ACTDATA_API_KEY", None)  # the test server has no key
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=SNIPPET_TIMEOUT_S, **kw)


def with_url(text: str, url: str) -> str:
    for literal in README_URLS:
        text = text.replace(literal, url)
    return text


@pytest.mark.parametrize("block", PYTHON, ids=[f"python-line{b.line}" for b in PYTHON])
def test_python_block_runs(block: Block, server, tmp_path):
    if "no-test" in block.info:
        pytest.skip(f"README.md:{block.line}: {block.info}")
    script = tmp_path / f"readme_line{block.line}.py"
    script.write_text(with_url(block.text, server.url))
    r = run_snippet([sys.executable, str(script)], server.url)
    assert r.returncode == 0, (f"README.md:{block.line}: the snippet exited {r.returncode}\n"
                               f"--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}")


@pytest.mark.parametrize("line,command", SHELL, ids=[f"shell-line{n}" for n, _ in SHELL])
def test_shell_line_runs(line: int, command: str, server):
    args = shlex.split(with_url(command, server.url))
    if args[0] == "curl":
        if shutil.which("curl") is None:
            pytest.skip("curl is not installed")
        args[1:1] = ["-sSf", "-o", os.devnull]
    else:
        args[0] = sys.executable
    r = run_snippet(args, server.url)
    assert r.returncode == 0, (f"README.md:{line}: `{command}` exited {r.returncode}\n"
                               f"--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}")


def test_readme_has_runnable_snippets():
    assert len([b for b in PYTHON if "no-test" not in b.info]) >= 5
    assert any("actdata.client" in c for _, c in SHELL)


def cells(row: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def tables(text: str) -> list[tuple[int, list[str]]]:
    """(first line, rows) of every Markdown table outside code fences."""
    out, current, start, fenced = [], [], 0, False
    for n, line in enumerate(text.splitlines(), 1):
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("|"):
            if not current:
                start = n
            current.append(line)
        elif current:
            out.append((start, current))
            current = []
    if current:
        out.append((start, current))
    return out


@pytest.mark.parametrize("doc", ["README.md", "docs/benchmarks.md"])
def test_tables_are_well_formed(doc):
    for start, rows in tables((ROOT / doc).read_text()):
        width = len(cells(rows[0]))
        assert re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", rows[1].strip()), f"{doc}:{start + 1}: no separator row"
        for i, row in enumerate(rows[1:], 1):
            assert len(cells(row)) == width, f"{doc}:{start + i}: {len(cells(row))} cells, the header has {width}"


def test_config_tables_list_each_key_once():
    for start, rows in tables(README.read_text()):
        if cells(rows[0])[0] != "key":
            continue
        keys = [cells(r)[0] for r in rows[2:]]
        dupes = {k for k in keys if keys.count(k) > 1}
        assert not dupes, f"README.md:{start}: keys listed twice: {sorted(dupes)}"


def test_relative_links_exist():
    for doc in ("README.md", "docs/benchmarks.md", "CONTRIBUTING.md"):
        path = ROOT / doc
        if not path.exists():
            continue
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" not in target:
                assert (path.parent / target).exists(), f"{doc}: link to a missing file {target}"


def test_layout_names_every_module():
    text = README.read_text()
    layout = text[text.index("## Layout"):]
    block = fenced_blocks(layout)[0].text
    listed, stack = set(), []
    for line in block.splitlines()[1:]:  # the first line is `actdata/`
        depth = (len(line) - len(line.lstrip())) // 2 - 1
        name = line.split()[0]
        stack[depth:] = [name]
        if name.endswith(".py"):
            listed.add("actdata/" + "".join(stack))
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "actdata").rglob("*.py")}
    subpackage_inits = {m for m in modules if m.endswith("/__init__.py") and m != "actdata/__init__.py"}
    missing = modules - listed - subpackage_inits - {"actdata/cluster/__main__.py"}
    assert not missing, f"README Layout does not list: {sorted(missing)}"
    assert not listed - modules, f"README Layout lists modules that do not exist: {sorted(listed - modules)}"
