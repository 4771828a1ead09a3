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

#: Where the next token that matters may start: comments, quotes, dollars, words and numbers.
_NEXT = re.compile(r"--|/\*|[\"'$0-9A-Za-z_\u0080-\U0010ffff]")
_QUOTE_OR_BACKSLASH = re.compile(r"['\\]")
_IDENT_REST = re.compile(r"[A-Za-z0-9_$\u0080-\U0010ffff]*")
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_\u0080-\U0010ffff]*)?\$")
#: Between two parts of one string constant: whitespace with a newline (and `--` comments).
_CONTINUATION = re.compile(r"[ \t\f\r]*(?:--[^\n]*)?\n(?:[ \t\n\r\f]|--[^\n]*\n)*'")


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

    def value(self, sql: str) -> str | None:
        """What the constant means ('' stands for '), where `has_value`; else None."""
        if not self.has_value:
            return None
        if self.kind == "dollar":
            tag = sql[self.quote : sql.index("$", self.quote + 1) + 1]
            return sql[self.quote + len(tag) : self.end - len(tag)]
        return sql[self.quote + 1 : self.end - 1].replace("''", "'")


def constants(sql: str, *, standard_strings: bool = True) -> Iterator[Constant]:
    """The string constants of `sql`, in order, read as a server with standard_conforming_strings
    set so reads them (on: a plain constant's backslash is itself, and its `backslash` flag says one
    is there). Comments and quoted identifiers are skipped. Long constants and comments cost a
    str.find, not a step per character."""
    plain_escapes = not standard_strings
    n = len(sql)
    found = _NEXT.search(sql)
    while found is not None:
        i = found.start()
        c = sql[i]
        if c == "-":
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
        elif c == "/":
            i = _block_comment_end(sql, i)
        elif c == '"':
            i = _quoted_end(sql, i + 1, '"', escapes=False)
        elif c == "'":
            constant = _string(sql, i, i, "plain", plain_escapes)
            yield constant
            i = constant.end
        elif c == "$":
            tag = _DOLLAR_TAG.match(sql, i)
            if tag is None or (i > 0 and _is_ident_char(sql[i - 1])):
                i += 1
            else:
                close = sql.find(tag.group(0), tag.end())
                i = n if close < 0 else close + len(tag.group(0))
                yield Constant(tag.start(), tag.start(), i, "dollar", False, False)
        elif c.isdigit():
            i = _IDENT_REST.match(sql, i + 1).end()  # type: ignore[union-attr]
        else:
            word_end = _IDENT_REST.match(sql, i + 1).end()  # type: ignore[union-attr]
            word = sql[i:word_end]
            quoted = word_end < n and sql[word_end] == "'"
            if quoted and word in ("e", "E", "n", "N"):
                kind = "escape" if word in "eE" else "nchar"
                constant = _string(sql, i, word_end, kind, kind == "escape" or plain_escapes)
                yield constant
                i = constant.end
            elif quoted and word in ("b", "B", "x", "X"):
                i = _quoted_end(sql, word_end + 1, "'", escapes=False)
                yield Constant(word_end - 1, word_end, i, "bits", False, False)
            elif sql.startswith("&'", word_end) and word in ("u", "U"):
                i = _quoted_end(sql, word_end + 2, "'", escapes=False)  # the server refuses these when off
            else:
                i = word_end
        found = _NEXT.search(sql, i)


def plain_literals_as_escape_strings(sql: str) -> str | None:
    """`sql` with every plain string constant written E'...', for a server that has
    standard_conforming_strings off; None when no plain constant holds a backslash (the text reads
    the same under either setting). Unterminated constants and comments are left to the server."""
    if "\\" not in sql:
        return None
    edits: list[tuple[int, int, str]] = []  # (start, end, text): the span [start, end) becomes text
    needed = False
    for constant in constants(sql, standard_strings=False):
        if constant.kind == "plain":
            edits.append((constant.quote, constant.quote, "E"))
        elif constant.kind == "nchar":  # N'...' is the type name NCHAR and a plain constant: say both
            edits.append((constant.start, constant.quote, "NCHAR E"))
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
    return "".join(out)


def _is_ident_char(c: str) -> bool:
    return c.isalnum() or c in "_$" or ord(c) >= 0x80


def _block_comment_end(sql: str, i: int) -> int:
    """After a /* ... */ comment starting at i (they nest)."""
    depth = 0
    n = len(sql)
    while i < n:
        if sql.startswith("/*", i):
            depth += 1
            i += 2
        elif sql.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return n


def _quoted_end(sql: str, i: int, quote: str, *, escapes: bool) -> int:
    """After a quoted token whose body starts at i; a doubled quote stands for itself, and with
    `escapes` a backslash takes the next character with it."""
    stop = _QUOTE_OR_BACKSLASH if escapes else None
    while True:
        if stop is not None:
            found = stop.search(sql, i)
            j = -1 if found is None else found.start()
        else:
            j = sql.find(quote, i)
        if j < 0:
            return len(sql)
        if sql[j] == "\\" or sql.startswith(quote * 2, j):
            i = j + 2
        else:
            return j + 1


def _string(sql: str, start: int, quote: int, kind: str, escapes: bool) -> Constant:
    """The constant whose opening quote is at `quote`, continuation parts included."""
    backslash = continued = False
    i = quote + 1
    while True:
        end = _quoted_end(sql, i, "'", escapes=escapes)
        backslash = backslash or sql.find("\\", i, end) >= 0
        more = _CONTINUATION.match(sql, end)
        if more is None or end >= len(sql):
            return Constant(start, quote, end, kind, backslash, continued, escapes)
        continued = True
        i = more.end()
