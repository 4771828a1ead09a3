"""The rows of a COPY ... FROM STDIN, read from the client's CopyData as the server will read them, so
that the texts a table's generated column embeds can be computed in batches ahead of the server's
requests (ReadAhead.copy_ahead). Pure code over bytes.

Only a guess that saves time: a field read otherwise than the server reads it gives a text that no
request names (the key is the MD5 of the text the row really has), so its row asks as it would have.
The text and CSV formats are read, with the options pg_dump, psql and drivers use (DELIMITER, NULL,
HEADER, QUOTE; ESCAPE equal to QUOTE); a statement with other options (binary, FORCE_NULL, DEFAULT,
ENCODING, ...) is not read at all. Data is taken as UTF-8 (the caller checks client_encoding)."""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pglast import ast, parse_sql
from pglast.parser import ParseError

from .lookahead import MAX_WRITTEN_TEXT, table_name

#: Options that change nothing of how the rows read.
_HARMLESS = frozenset({"freeze", "on_error", "log_verbosity"})
_TRUE = {"true", "on", "1", "match"}
_FALSE = {"false", "off", "0"}
_TEXT_ESCAPE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9a-fA-F]{1,2})|(.))", re.DOTALL)
_SIMPLE_ESCAPES = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}


@dataclass(frozen=True)
class CopyFormat:
    csv: bool = False
    delimiter: bytes = b"\t"
    null: bytes = b"\\N"
    header: bool = False
    quote: bytes = b'"'


@dataclass(frozen=True)
class CopyFrom:
    """A COPY ... FROM STDIN: the table, as to_regclass() reads a name; its column list, if any; the format."""

    table: str
    columns: tuple[str, ...] | None
    format: CopyFormat


def copy_from_stdin(sql: str) -> CopyFrom | None:
    """If `sql` is one COPY ... FROM STDIN whose rows this module reads: what it copies, and how."""
    if len(sql) > MAX_WRITTEN_TEXT or "stdin" not in sql.lower():
        return None
    try:
        raws = parse_sql(sql)
    except (ParseError, RecursionError):
        return None
    if len(raws) != 1 or not isinstance(stmt := raws[0].stmt, ast.CopyStmt) or not stmt.is_from:
        return None
    if stmt.relation is None or stmt.filename is not None or stmt.is_program:
        return None
    copy_format = _format(stmt.options or ())
    if copy_format is None:
        return None
    columns = tuple(column.sval for column in stmt.attlist) if stmt.attlist else None
    return CopyFrom(table_name(stmt.relation), columns, copy_format)


def _format(options: Sequence[ast.DefElem]) -> CopyFormat | None:
    given: dict[str, str | None] = {}
    for option in options:
        value = option.arg
        if value is None:
            given[option.defname] = None
        elif isinstance(value, ast.String):
            given[option.defname] = value.sval
        elif isinstance(value, ast.Boolean):
            given[option.defname] = "true" if value.boolval else "false"
        elif isinstance(value, ast.Integer):
            given[option.defname] = str(value.ival)
        else:
            return None
    kind = (given.pop("format", None) or "text").lower()
    if kind not in ("text", "csv"):
        return None
    is_csv = kind == "csv"
    header = (given.pop("header", "false") or "true").lower()
    if header not in _TRUE | _FALSE:
        return None
    quote = given.pop("quote", '"') or '"'
    escape = given.pop("escape", quote) or quote
    delimiter = given.pop("delimiter", "," if is_csv else "\t") or ""
    null = given.pop("null", "" if is_csv else "\\N")
    if set(given) - _HARMLESS or null is None or escape != quote or len(delimiter.encode()) != 1:
        return None
    if is_csv and len(quote.encode()) != 1:
        return None
    return CopyFormat(is_csv, delimiter.encode(), null.encode(), header in _TRUE, quote.encode())


class CopyRows:
    """Reads COPY data as it comes, a CopyData message at a time (rows may span messages): `feed`
    returns, for each row completed, its fields at the positions `wanted` (None for NULL, or for a
    field the data does not have, or that is not UTF-8). `resync`: the data is joined midway (text
    format only): what precedes the first line end is skipped."""

    def __init__(self, copy_format: CopyFormat, wanted: Sequence[int], *, resync: bool = False) -> None:
        self.format = copy_format
        self.wanted = list(wanted)
        self._rest = b""
        self._skip_line = resync or copy_format.header
        self._record: list[bytes] = []  # CSV lines of a record whose quotes are still open
        delimiter = re.escape(copy_format.delimiter)
        self._text_field = re.compile(rb"(?:\\.|[^\\" + delimiter + rb"])*", re.DOTALL)
        self.ended = False  # the data's end marker (\.) was read

    def feed(self, data: bytes) -> list[list[str | None]]:
        if self.ended:
            return []
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()
        return self._rows(lines)

    def finish(self) -> list[list[str | None]]:
        """The client's CopyDone: a last line without a line end is a row too."""
        rest, self._rest = self._rest, b""
        return self._rows([rest]) if rest and not self.ended else []

    def _rows(self, lines: list[bytes]) -> list[list[str | None]]:
        out: list[list[str | None]] = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._skip_line:
                self._skip_line = False
                continue
            if line == b"\\." and not self._record:
                self.ended = True
                break
            row = self._csv_line(line) if self.format.csv else self._text_fields(line)
            if row is not None:
                out.append(row)
        return out

    def _text_fields(self, line: bytes) -> list[str | None]:
        if b"\\" not in line:
            fields = line.split(self.format.delimiter)
        else:  # a backslash escapes the byte after it, a delimiter too
            fields, pos = [], 0
            while True:
                end = self._text_field.match(line, pos).end()  # type: ignore[union-attr]  # matches empty
                fields.append(line[pos:end])
                if end >= len(line):
                    break
                pos = end + 1
        return [self._text_value(fields[i]) if i < len(fields) else None for i in self.wanted]

    def _text_value(self, raw: bytes) -> str | None:
        if raw == self.format.null:
            return None
        if b"\\" in raw:
            raw = _TEXT_ESCAPE.sub(_unescape, raw)
        return _utf8(raw)

    def _csv_line(self, line: bytes) -> list[str | None] | None:
        """A CSV record ends at a line end outside quotes: until then its lines are kept."""
        self._record.append(line)
        record = b"\n".join(self._record)
        if record.count(self.format.quote) % 2:
            return None
        self._record = []
        text = _utf8(record)
        if text is None:
            return [None] * len(self.wanted)
        quote = self.format.quote.decode()
        (values,) = list(csv.reader([text], delimiter=self.format.delimiter.decode(), quotechar=quote,
                                    doublequote=True, strict=False)) or [[]]
        null = self.format.null.decode()
        out: list[str | None] = []
        for i in self.wanted:
            # An unquoted field equal to the NULL string is NULL; csv does not say which were quoted,
            # so an empty text is taken for NULL where NULL is the empty string (as it is by default):
            # at worst, an empty quoted text's row asks.
            value = values[i] if i < len(values) else None
            out.append(None if value is None or value == null else value)
        return out


def _unescape(match: re.Match[bytes]) -> bytes:
    octal, hexa, char = match.groups()
    if octal is not None:
        return bytes([int(octal, 8) & 0xFF])
    if hexa is not None:
        return bytes([int(hexa, 16)])
    return _SIMPLE_ESCAPES.get(char, char)


def _utf8(raw: bytes) -> str | None:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None

