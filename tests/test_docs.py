"""The examples of README.md and docs/*.md are run, so they cannot rot (docs/writing-docs.md).

Every fenced block is collected. ``python`` blocks are executed (a page's blocks in order, in one
namespace, in a scratch folder holding a tiny run); ``bash`` blocks are run command by command, or,
after a ``<!-- parse-only: REASON -->`` marker (a GPU, a real data set, a long run), only parsed:
LightningCLI commands with ``--print_config`` appended, argparse commands by their parser. A
``<!-- not-run: REASON -->`` block is skipped with its reason. ``text``/``yaml``/``csv`` blocks are
output or file contents. A block of any other language, or none, fails.

Own collector rather than pytest-examples or sybil: the markers and the in-process parse-check of
the CLI commands (about 0.2 s each, against 20 s for a fresh interpreter) are specific to this
project, and neither tool knows how to parse-check a command without running it.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FIXTURES = REPO / "tests" / "fixtures" / "main_00b60cb"

FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
MARKER = re.compile(r"^\s*<!-- (ci:install|ci:test|parse-only: .+|not-run: .+) -->\s*$")
LIGHTNING_CLIS = {"experiments.fit", "experiments.evaluate", "experiments.predict"}
ARGPARSE_CLIS = {"experiments.reproduce", "experiments.bench", "experiments.recalibration", "experiments.default_run",
                 "datamodules.check"}
INTERPRETERS = {".venv/bin/python", "python", "python3"}
OUTPUT_LANGUAGES = {"text", "yaml", "csv"}
#: Pages the experiments write (no hand-made markers): their commands made the page and are parse-checked.
GENERATED = {"results.md", "results_before_recalibration.md", "ab_defaults.md", "recalibration.md", "embedded_report.md"}


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    marker: str | None  # "ci:install", "parse-only: ...", "not-run: ...", or None
    code: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, language, start = m.group(1), m.group(2), i
        body = []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(previous)
        marker = marker.group(1) if marker else None
        if page.name in GENERATED and language == "bash" and marker is None:
            marker = "parse-only: the command that generated this page (hours of training)"
        found.append(Block(page, start + 1, language, marker, "\n".join(body)))
        i += 1
    return found


BLOCKS = [b for page in PAGES for b in blocks_of(page)]


def commands_of(code: str) -> list[list[str]]:
    """The block's commands as argument lists: continuations joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


class _Parsed(Exception):
    """Raised after an argparse command's arguments parsed: nothing is run."""


def _python_module(words: list[str]) -> tuple[str, list[str]] | None:
    """``(module, args)`` for ``[ENV=1 ...] .venv/bin/python -m module args``, else ``None``."""
    while words and re.match(r"^\w+=", words[0]):
        words = words[1:]
    if len(words) >= 3 and words[0] in INTERPRETERS and words[1] == "-m":
        return words[2], words[3:]
    return None


def _env(words: list[str]) -> dict[str, str]:
    return dict(w.split("=", 1) for w in words[:next((i for i, w in enumerate(words) if not re.match(r"^\w+=", w)),
                                                      len(words))])


def parse_check(words: list[str], block: Block, monkeypatch) -> None:
    target = _python_module(words)
    assert target, f"{block.id}: cannot parse-check {shlex.join(words)!r} (not `python -m <command>`)"
    module, args = target
    # the scratch folder of the tiny run, where configs/ links to the checkout's
    for key, value in _env(words).items():
        monkeypatch.setenv(key, value)
    if module in LIGHTNING_CLIS:
        if "--print_config" not in args:
            args = [*args, "--print_config"]
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            importlib.import_module(module).main(args)
        assert exit_.value.code in (0, None), f"{block.id}: {shlex.join(words)} exited {exit_.value.code}"
        assert "model:" in out.getvalue(), f"{block.id}: no configuration printed"
    elif module in ARGPARSE_CLIS:
        parse = argparse.ArgumentParser.parse_known_args  # parse_args calls it too

        def parse_then_stop(self, *a, **k):
            result = parse(self, *a, **k)
            if type(self) is argparse.ArgumentParser and str(self.prog).startswith("python -m"):
                raise _Parsed  # the command's own parser (not jsonargparse's, not a sub-parser)
            return result
        monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_then_stop)
        with pytest.raises(_Parsed):
            importlib.import_module(module).main(args)
    else:
        pytest.fail(f"{block.id}: no parse-check for the command {module}")


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A scratch folder with a tiny finished run at ``logs/taps/version_0`` (an old checkpoint and
    task file of the test fixtures), the examples' current folder."""
    run = tmp_path / "logs" / "taps" / "version_0" / "checkpoints"
    (run / "adapters").mkdir(parents=True)
    shutil.copy(FIXTURES / "incremental.ckpt", run / "last.ckpt")
    shutil.copy(FIXTURES / "incremental.ckpt", run / "best-00.ckpt")
    shutil.copy(FIXTURES / "incremental.ckpt", run / "best-01.ckpt")
    shutil.copy(FIXTURES / "incremental.ckpt", run / "best-03.ckpt")
    shutil.copy(FIXTURES / "incremental_a.safetensors", run / "adapters" / "a.safetensors")
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (run.parent / "config.yaml").write_text(_default_config())
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    return tmp_path


_namespaces: dict[Path, dict] = {}
_config: list[str] = []


def _default_config() -> str:
    """The default run's ``config.yaml``, as ``--print_config`` writes it (made once)."""
    if not _config:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            importlib.import_module("experiments.fit").main(["--print_config"])
        _config.append(out.getvalue())
    return _config[0]


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_example(block: Block, workspace, monkeypatch):
    if block.marker in ("ci:install", "ci:test"):
        assert block.page.name == "README.md" and block.language == "bash", f"{block.id}: CI markers belong to the README"
        pytest.skip(f"run by .ci/run ({block.marker})")
    if block.marker and block.marker.startswith("not-run:"):
        assert len(block.marker) > len("not-run: ") + 3, f"{block.id}: say why the block is not run"
        pytest.skip(block.marker)
    if block.language in OUTPUT_LANGUAGES:
        assert block.marker is None, f"{block.id}: a {block.language} block is not run; drop its marker"
        if block.language == "yaml":
            yaml.safe_load(block.code)
        return
    if block.language == "python":
        assert block.marker is None, f"{block.id}: Python blocks are executed; parse-only is for commands"
        namespace = _namespaces.setdefault(block.page, {"__name__": "__docs__"})
        exec(compile(block.code, block.id, "exec"), namespace)
        return
    assert block.language == "bash", (f"{block.id}: a block of language {block.language or '(none)'!r}: use "
                                      "bash, python, or text/yaml/csv for output and file contents")
    commands = commands_of(block.code)
    assert commands, f"{block.id}: an empty block"
    for words in commands:
        target = _python_module(words)
        if (block.marker and block.marker.startswith("parse-only:")) or (
                target and target[0] in LIGHTNING_CLIS and "--print_config" in target[1]):
            parse_check(words, block, monkeypatch)
            continue
        if target:
            words = [sys.executable, "-m", target[0], *target[1]]
        env = {**os.environ, **_env(words), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        while words and re.match(r"^\w+=", words[0]):
            words = words[1:]
        run = subprocess.run(words, cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"{block.id}: {shlex.join(words)} exited {run.returncode}\n{run.stderr[-3000:]}"


def test_every_page_has_examples_collected():
    assert {b.page for b in BLOCKS} >= {REPO / "README.md", REPO / "docs" / "getting-started.md"}


def test_the_readme_keeps_the_ci_markers_and_installs_the_docs_tools():
    markers = [b for b in BLOCKS if b.page.name == "README.md" and b.marker in ("ci:install", "ci:test")]
    assert [b.marker for b in markers] == ["ci:install", "ci:test"]
    install = markers[0].code.strip()
    assert "docs" in install and "\n" not in install, "the install command is one line and installs the docs extra"


TEST_REF = re.compile(r"(tests/[\w/]+\.py)(?:::(\w+))?")


def test_every_named_test_exists():
    """Each ``tests/<file>.py::<test>`` a page names (the "(tested: ...)" of a promise) exists; a
    bare ``::name`` continues the file named before it."""
    missing = []
    for page in PAGES:
        text = page.read_text()
        last_file = None
        for m in re.finditer(r"(tests/[\w/]+\.py)(?:::(\w+))?|`::(\w+)`", text):
            path, name, cont = m.group(1), m.group(2), m.group(3)
            if path:
                last_file = path
                if not (REPO / path).is_file():
                    missing.append(f"{page.name}: {path}")
                    continue
            if cont:
                path, name = last_file, cont
            if name and path and not re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M):
                missing.append(f"{page.name}: {path}::{name}")
    assert not missing, missing


def test_no_promise_says_tested_without_naming_the_test():
    bare = [f"{p.name}:{i}" for p in PAGES if p.name not in GENERATED
            for i, line in enumerate(p.read_text().splitlines(), 1) if "(tested)" in line]
    assert not bare, f"'(tested)' without naming the test: {bare}"


def test_benchmark_tables_render_from_their_json():
    sys.path.insert(0, str(REPO / "docs" / "hooks"))
    try:
        generated = importlib.import_module("generated")
    finally:
        sys.path.pop(0)
    page = (REPO / "docs" / "performance.md").read_text()
    rendered = generated.render(page)
    assert "<!-- bench:" not in rendered and "| resnet50 |" in rendered and "Source: `docs/bench.json`" in rendered
