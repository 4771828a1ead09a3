"""The README's first psql session, as a test runs it: its statements are read from the transcript
(echoed with -e), sent through psql, and what psql prints is compared with the transcript. Numbers are
compared to 1e-3: another CPU's kernels may round a vector's last digits otherwise (and psql then
pads its columns otherwise)."""

from __future__ import annotations

import math
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
#: A command tag psql prints (CREATE TABLE, INSERT 0 3): upper-case words and numbers, no semicolon.
_TAG = re.compile(r"^[A-Z]+( [A-Z]+)*( \d+)*$")
_STATEMENT_START = re.compile(r"^(SELECT|CREATE|INSERT|ALTER|UPDATE|DROP|DELETE|WITH|SET|SHOW|COPY|BEGIN|COMMIT)\b")
_SERVER_MESSAGE = re.compile(r"^(ERROR|HINT|NOTICE|DETAIL|WARNING):  ")
_NUMBER = re.compile(r"-?\d+\.\d+(?:e-?\d+)?")
_ANY_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?")


@dataclass(frozen=True)
class Session:
    statements: list[str]
    stdout: list[str]  # what psql prints, the echoed statements included
    stderr: list[str]  # the server's messages


def first_session(readme: Path = README) -> Session:
    """The transcript in the README's "A first session in psql" section."""
    text = readme.read_text()
    section = text[text.index("## A first session in psql"):]
    block = section[section.index("```\n") + 4:]
    lines = block[:block.index("```")].splitlines()[1:]  # after the `$ psql ...` line
    statements: list[str] = []
    stdout: list[str] = []
    stderr: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if _SERVER_MESSAGE.match(line):
            stderr.append(line)
        elif _STATEMENT_START.match(line) and not _TAG.match(line):
            start = i
            while not lines[i].rstrip().endswith(";"):
                i += 1
            statements.append("\n".join(lines[start:i + 1]))
            stdout.extend(lines[start:i + 1])
        else:
            stdout.append(line)
        i += 1
    return Session(statements, stdout, stderr)


def run_session(psql: str, dsn: str, session: Session) -> subprocess.CompletedProcess[str]:
    """The statements through psql as the README shows them run (-e echoes each)."""
    return subprocess.run([psql, "-X", "-e", dsn], input="\n".join(session.statements) + "\n",
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PAGER": "", "PGCLIENTENCODING": "UTF8", "LC_ALL": "C.UTF-8"})


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


def assert_same_session(done: subprocess.CompletedProcess[str], session: Session,
                        tolerance: float | None = 1e-3) -> None:
    """What psql printed is the transcript's, numbers to `tolerance` (1e-3: the local engine on another
    CPU); with None, but for every number (another build of the model, on an inference server, gives
    other last digits, and may order rows whose distances tie otherwise)."""
    for name, expected, actual in (("stdout", session.stdout, done.stdout.splitlines()),
                                   ("stderr", session.stderr, done.stderr.splitlines())):
        want, got = _tokens(expected), _tokens(actual)
        if tolerance is None:
            want, got = [_ANY_NUMBER.sub("#", t) for t in want], [_ANY_NUMBER.sub("#", t) for t in got]
        pairs = enumerate(zip(want, got, strict=False))
        mismatch = next((i for i, (w, g) in pairs if not _same(w, g, tolerance)), None)
        assert len(want) == len(got) and mismatch is None, (
            f"{name} differs from the README's session at token {mismatch}:\n" + "\n".join(actual))
