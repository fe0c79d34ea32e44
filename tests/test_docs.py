"""The commands in README.md and docs/*.md still run.

Every command line of a ```bash block and every `$ ` line of a ```text block (an output excerpt) is
parsed: its entry point (`python -m MODULE`, `python SCRIPT.py`, `torchrun ... -m MODULE` or
`torchrun ... SCRIPT.py`, `bash SCRIPT.sh`) must exist, and every `--flag` it uses must appear in
that entry point's `--help`. Commands needing a GPU, a 32B checkpoint or a download are checked that
far only; the excerpts preceded by `<!-- run by tests/test_docs.py -->` are run for real, and each line
of the excerpt (except `...`) must appear in their output, in order. `/tmp/qwen25` in an excerpt
stands for the converted Qwen2.5 tokenizer (`python -m engine.tokenizer_build qwen2.5 /tmp/qwen25`).
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_MARK = "<!-- run by tests/test_docs.py -->"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")


@dataclass(frozen=True)
class Command:
    doc: str      # README.md or docs/x.md
    line: int     # of the command in that file
    text: str     # the command, continuation lines joined, comment removed
    excerpt: tuple[str, ...] = ()  # for a `$ ` line: the output lines shown below it
    run: bool = False

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def _strip_comment(line: str) -> str:
    # A '#' preceded by whitespace starts a comment (no command in the docs quotes one).
    return re.split(r"\s#", line, maxsplit=1)[0].rstrip()


def collect() -> list[Command]:
    commands = []
    for path in DOCS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            kind, body = match.group(1), match.group(2)
            first_line = text.count("\n", 0, match.start()) + 2
            marked = text[:match.start()].rstrip().endswith(RUN_MARK)
            lines = body.splitlines()
            i = 0
            while i < len(lines):
                raw, start = lines[i], i
                if kind == "text" and not raw.startswith("$ "):
                    i += 1
                    continue
                cmd = raw[2:] if kind == "text" else raw
                while cmd.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    cmd = cmd[:-1] + " " + lines[i].strip()
                i += 1
                cmd = _strip_comment(cmd.strip())
                if kind == "text" or (cmd and not cmd.startswith("#") and kind in ("bash", "sh", "")):
                    excerpt = ()
                    if kind == "text":
                        end = next((j for j in range(i, len(lines)) if lines[j].startswith("$ ")), len(lines))
                        excerpt = tuple(lines[i:end])
                    commands.append(Command(str(path.relative_to(ROOT)), first_line + start, cmd, excerpt,
                                            marked and kind == "text"))
    return commands


COMMANDS = [c for c in collect() if re.match(r"(python3?|torchrun|bash)\b", c.text)]


def entry_point(cmd: Command) -> tuple[list[str], list[str]] | None:
    """(the argv that runs the entry point, the arguments after it), or None for a command that is
    not one of the project's (pip, pytest)."""
    words = shlex.split(cmd.text.replace("[", " ").replace("]", " ").replace("|", " "))
    prog, rest = words[0], words[1:]
    if prog == "bash":
        return [prog, rest[0]], rest[1:]
    if prog == "torchrun":  # skip torchrun's own options
        while rest and rest[0].startswith("--") and rest[0] != "-m":
            rest = rest[1:] if "=" in rest[0] else rest[2:]
    if rest[:1] == ["-m"]:
        if rest[1] in ("pytest", "pip"):
            return None
        return [sys.executable, "-m", rest[1]], rest[2:]
    if rest and rest[0].endswith(".py"):
        return [sys.executable, rest[0]], rest[1:]
    raise AssertionError(f"{cmd}: no entry point found (python -m MODULE or python SCRIPT.py)")


@functools.cache
def help_text(argv: tuple[str, ...]) -> str:
    out = subprocess.run([*argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{' '.join(argv[1:])} --help failed:\n{out.stderr[-2000:]}"
    return out.stdout


def test_the_docs_have_commands():
    docs = {c.doc for c in COMMANDS}
    assert "README.md" in docs and len(docs) >= 4, docs
    assert any(c.run for c in COMMANDS), "no excerpt is marked to be run"


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: f"{c.doc}:{c.line}")
def test_command_entry_point_and_flags(cmd: Command):
    found = entry_point(cmd)
    if found is None:
        return
    argv, args = found
    target = argv[-1]
    if argv[0] == "bash" or target.endswith(".py"):
        assert (ROOT / target).is_file(), f"{cmd}: {target} does not exist"
        if argv[0] == "bash":
            return
    flags = set(FLAG.findall(" ".join(args)))
    if not flags:
        return
    shown = help_text(tuple(argv))
    # Options, and settings given as --key=value (listed by name in the trainer's --help).
    available = set(FLAG.findall(shown)) | {"--" + k for k in re.findall(r"^  ([a-z][a-z0-9_]*)\s{2,}", shown, re.M)}
    missing = sorted(flags - available)
    assert not missing, f"{cmd}: {' '.join(missing)} not in `{' '.join(argv[1:])} --help`"


RUN = [c for c in COMMANDS if c.run]


@pytest.mark.parametrize("cmd", RUN, ids=lambda c: f"{c.doc}:{c.line}")
def test_marked_excerpts_run_and_show_this_output(cmd: Command, qwen25_tokenizer_path):
    argv, args = entry_point(cmd)
    args = [a.replace("/tmp/qwen25", str(qwen25_tokenizer_path.parent)) for a in args]
    # Globs as a shell would expand them, relative to the repository.
    expanded = []
    for a in args:
        expanded += sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(a)) if "*" in a else [a]
    stdout_only = ">" in expanded
    if stdout_only:  # `... > /dev/null`: the excerpt shows stderr
        expanded = expanded[:expanded.index(">")]
    out = subprocess.run([*argv, *expanded], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{cmd}\n{out.stderr[-3000:]}"
    shown = out.stderr if stdout_only else out.stdout + out.stderr
    got = [line.rstrip() for line in shown.splitlines()]
    position = 0
    for want in cmd.excerpt:
        want = want.rstrip()
        if not want or want.strip() == "...":
            continue
        try:
            position = got.index(want, position) + 1
        except ValueError:
            raise AssertionError(f"{cmd}\nthe documented line\n  {want!r}\nis not in the output (after line "
                                 f"{position}):\n" + "\n".join(got[:200])) from None


def test_the_tests_named_as_guarantees_exist():
    """README.md's guarantees table and tests/README.md name tests that exist (`test_x.py` or
    `test_x.py::test_name`, `::name` continuing the last file named)."""
    for doc in (ROOT / "README.md", ROOT / "tests" / "README.md"):
        current = None
        for match in re.finditer(r"`(?:tests/)?(test_[\w*]+\.py)?(?:::(\w+))?`", doc.read_text()):
            file, name = match.groups()
            if file:
                current = file
                assert "*" in file or (ROOT / "tests" / file).is_file(), f"{doc.name}: {file} does not exist"
            if name:
                assert current, f"{doc.name}: ::{name} without a file before it"
                source = (ROOT / "tests" / current).read_text()
                assert re.search(rf"^def {name}\(", source, re.M), f"{doc.name}: {current}::{name} does not exist"


def test_the_conditions_page_is_the_generated_table():
    """docs/conditions.md holds exactly what `python -m recipes.paper --all` prints."""
    page = (ROOT / "docs" / "conditions.md").read_text()
    marker = "<!-- generated: python -m recipes.paper --all -->\n"
    out = subprocess.run([sys.executable, "-m", "recipes.paper", "--all"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert page.split(marker, 1)[1] == out.stdout, ("docs/conditions.md is stale: regenerate its table with "
                                                   "python -m recipes.paper --all")
