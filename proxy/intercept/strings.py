"""How a session's server reads string literals, so that the proxy reads SQL text the same way.

With `standard_conforming_strings` off, PostgreSQL reads backslashes in plain '...' literals as
escapes (as in E'...'); pglast always reads them with the setting on. A statement whose plain
literals hold no backslash reads the same either way. One that does is rewritten, for both the
parser and the server, with those literals marked E'...': under the setting off that is exactly
what they already meant, and pglast then reads them as the server does.

Pure code over text: a small scanner that knows PostgreSQL's lexical rules for comments, quoted
identifiers, dollar quotes and string constants, nothing more."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import AnyStr, Generic

#: The most a single search reads at once: a long statement is scanned (in a worker thread) in
#: steps that each hold the GIL for well under a millisecond, so the event loop keeps its turns.
WINDOW = 1 << 20


@dataclass(frozen=True)
class _Alphabet(Generic[AnyStr]):
    """The scanner's patterns and characters, as str or as bytes: a long statement is read as its
    UTF-8 bytes, never decoded whole (every character that matters to the scanner is ASCII, and
    every byte of a multi-byte character counts as a letter, as PostgreSQL's own scanner counts it)."""

    next: re.Pattern[AnyStr]  # where the next token that matters may start
    quote_or_backslash: re.Pattern[AnyStr]
    ident_rest: re.Pattern[AnyStr]
    dollar_tag: re.Pattern[AnyStr]
    continuation: re.Pattern[AnyStr]  # between two parts of one constant: a newline, maybe comments
    chars: dict[str, AnyStr]


def _alphabet(pattern: type[str] | type[bytes]) -> _Alphabet:
    letters = r"\u0080-\U0010ffff" if pattern is str else r"\x80-\xff"

    def compile_(regex: str) -> re.Pattern:
        source = regex.replace("HIGH", letters)
        return re.compile(source if pattern is str else source.encode("ascii"))

    names = ["-", "/", "/*", "*/", '"', "'", "''", "$", "\\", "\n", "&'", "_$", *"eEnNbBxXuU"]
    return _Alphabet(
        compile_(r"--|/\*|[\"'$0-9A-Za-zHIGH_]"), compile_(r"['\\]"), compile_(r"[A-Za-z0-9_$HIGH]*"),
        compile_(r"\$([A-Za-z_HIGH][A-Za-z0-9_HIGH]*)?\$"),
        compile_(r"[ \t\f\r]*(?:--[^\n]*)?\n(?:[ \t\n\r\f]|--[^\n]*\n)*'"),
        {name: (name if pattern is str else name.encode("ascii")) for name in names},
    )


_TEXT = _alphabet(str)
_BYTES = _alphabet(bytes)


def _of(sql: str | bytes) -> _Alphabet:
    return _TEXT if isinstance(sql, str) else _BYTES


@dataclass(frozen=True)
class Constant:
    """A string constant of a statement: its span, its kind ("plain", "escape", "nchar", "dollar",
    "bits"), where its body lies, and whether it continues over a newline ('a'<newline>'b')."""

    start: int  # its first character (a prefix letter, if any)
    quote: int  # its opening quote (or dollar tag)
    end: int  # just after its closing quote
    kind: str
    backslash: bool  # a backslash occurs in it
    continued: bool
    escapes: bool = False  # its backslashes are escapes

    @property
    def has_value(self) -> bool:
        """Whether `value` can tell what the constant means: its body alone says it (a quoted
        constant without escapes or continuation, or a dollar-quoted one); the parser must read the rest."""
        if self.kind == "dollar":
            return True
        return self.kind in ("plain", "escape") and not (self.escapes and self.backslash) and not self.continued

    def value(self, sql: AnyStr) -> AnyStr | None:
        """What the constant means ('' stands for '), where `has_value`; else None."""
        if not self.has_value:
            return None
        a = _of(sql).chars
        if self.kind == "dollar":
            tag = sql[self.quote : sql.index(a["$"], self.quote + 1) + 1]
            return sql[self.quote + len(tag) : self.end - len(tag)]
        return sql[self.quote + 1 : self.end - 1].replace(a["''"], a["'"])


def constants(sql: AnyStr, *, standard_strings: bool = True) -> Iterator[Constant]:
    """The string constants of `sql` (text, or UTF-8 bytes: offsets are then byte offsets), in order,
    read as a server with standard_conforming_strings set so reads them (on: a plain constant's
    backslash is itself, and its `backslash` flag says one is there). Comments and quoted identifiers
    are skipped. Long constants and comments cost a few searches, never a step per character."""
    a = _of(sql)
    c_ = a.chars
    plain_escapes = not standard_strings
    n = len(sql)
    found = _search(a.next, sql, 0)
    while found is not None:
        i = found.start()
        c = sql[i : i + 1]
        if c == c_["-"]:
            end = _find(sql, c_["\n"], i)
            i = n if end < 0 else end + 1
        elif c == c_["/"]:
            i = _block_comment_end(sql, i)
        elif c == c_['"']:
            i = _quoted_end(sql, i + 1, c_['"'], escapes=False)
        elif c == c_["'"]:
            constant = _string(sql, i, i, "plain", plain_escapes)
            yield constant
            i = constant.end
        elif c == c_["$"]:
            tag = a.dollar_tag.match(sql, i, min(n, i + WINDOW))
            if tag is None or (i > 0 and _is_ident_char(sql[i - 1 : i])):
                i += 1
            else:
                close = _find(sql, tag.group(0), tag.end())
                i = n if close < 0 else close + len(tag.group(0))
                yield Constant(tag.start(), tag.start(), i, "dollar", False, False)
        elif c.isdigit():
            i = _ident_end(sql, i + 1)
        else:
            word_end = _ident_end(sql, i + 1)
            word = sql[i:word_end] if word_end - i <= 2 else None
            quoted = word_end < n and sql[word_end : word_end + 1] == c_["'"]
            if quoted and word in (c_["e"], c_["E"], c_["n"], c_["N"]):
                kind = "escape" if word in (c_["e"], c_["E"]) else "nchar"
                constant = _string(sql, i, word_end, kind, kind == "escape" or plain_escapes)
                yield constant
                i = constant.end
            elif quoted and word in (c_["b"], c_["B"], c_["x"], c_["X"]):
                i = _quoted_end(sql, word_end + 1, c_["'"], escapes=False)
                yield Constant(word_end - 1, word_end, i, "bits", False, False)
            elif sql.startswith(c_["&'"], word_end) and word in (c_["u"], c_["U"]):
                i = _quoted_end(sql, word_end + 2, c_["'"], escapes=False)  # the server refuses these when off
            else:
                i = word_end
        found = _search(a.next, sql, i)


def plain_literals_as_escape_strings(sql: AnyStr) -> AnyStr | None:
    """`sql` with every plain string constant written E'...', for a server that has
    standard_conforming_strings off; None when no plain constant holds a backslash (the text reads
    the same under either setting). Unterminated constants and comments are left to the server."""
    c_ = _of(sql).chars
    if _find(sql, c_["\\"], 0) < 0:
        return None
    edits: list[tuple[int, int, AnyStr]] = []  # (start, end, text): the span [start, end) becomes text
    needed = False
    for constant in constants(sql, standard_strings=False):
        if constant.kind == "plain":
            edits.append((constant.quote, constant.quote, c_["E"]))
        elif constant.kind == "nchar":  # N'...' is the type name NCHAR and a plain constant: say both
            edits.append((constant.start, constant.quote, "NCHAR E" if isinstance(sql, str) else b"NCHAR E"))
        else:
            continue
        needed = needed or constant.backslash
    if not needed:
        return None
    out = []
    cursor = 0
    for start, end, text in edits:
        out.append(sql[cursor:start])
        out.append(text)
        cursor = end
    out.append(sql[cursor:])
    return sql[:0].join(out)


def _find(sql: AnyStr, sub: AnyStr, start: int, end: int | None = None) -> int:
    """sql.find(sub, start, end), a window at a time."""
    end = len(sql) if end is None else end
    i = start
    while i < end:
        j = sql.find(sub, i, min(end, i + WINDOW + len(sub) - 1))
        if j >= 0:
            return j
        i += WINDOW
    return -1


def _search(pattern: re.Pattern[AnyStr], sql: AnyStr, start: int) -> re.Match[AnyStr] | None:
    """pattern.search(sql, start), a window at a time (windows overlap by a character: the
    patterns searched for are at most two characters long)."""
    n = len(sql)
    i = start
    while i < n:
        found = pattern.search(sql, i, min(n, i + WINDOW))
        if found is not None:
            return found
        i += WINDOW - 1
    return None


def _ident_end(sql: AnyStr, start: int) -> int:
    """Where the identifier characters from `start` end."""
    pattern = _of(sql).ident_rest
    n = len(sql)
    i = start
    while True:
        stop = min(n, i + WINDOW)
        end = pattern.match(sql, i, stop).end()  # type: ignore[union-attr]
        if end < stop or stop == n:
            return end
        i = end


def _is_ident_char(c: AnyStr) -> bool:
    return c.isalnum() or c in _of(c).chars["_$"] or (c[0] if isinstance(c, bytes) else ord(c)) >= 0x80


def _block_comment_end(sql: AnyStr, i: int) -> int:
    """After a /* ... */ comment starting at i (they nest)."""
    c_ = _of(sql).chars
    depth = 0
    n = len(sql)
    while i < n:
        opening = _find(sql, c_["/*"], i)
        closing = _find(sql, c_["*/"], i)
        if closing < 0:
            return n
        if 0 <= opening < closing:
            depth += 1
            i = opening + 2
        else:
            depth -= 1
            i = closing + 2
            if depth == 0:
                return i
    return n


def _quoted_end(sql: AnyStr, i: int, quote: AnyStr, *, escapes: bool) -> int:
    """After a quoted token whose body starts at i; a doubled quote stands for itself, and with
    `escapes` a backslash takes the next character with it."""
    a = _of(sql)
    while True:
        if escapes:
            found = _search(a.quote_or_backslash, sql, i)
            j = -1 if found is None else found.start()
        else:
            j = _find(sql, quote, i)
        if j < 0:
            return len(sql)
        if sql[j : j + 1] == a.chars["\\"] or sql.startswith(quote * 2, j):
            i = j + 2
        else:
            return j + 1


def _string(sql: AnyStr, start: int, quote: int, kind: str, escapes: bool) -> Constant:
    """The constant whose opening quote is at `quote`, continuation parts included."""
    a = _of(sql)
    backslash = continued = False
    i = quote + 1
    while True:
        end = _quoted_end(sql, i, a.chars["'"], escapes=escapes)
        backslash = backslash or _find(sql, a.chars["\\"], i, end) >= 0
        more = a.continuation.match(sql, end, min(len(sql), end + WINDOW))
        if more is None or end >= len(sql):
            return Constant(start, quote, end, kind, backslash, continued, escapes)
        continued = True
        i = more.end()
