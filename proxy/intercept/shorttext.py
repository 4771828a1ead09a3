"""A statement as the parser is given it (sqlcalls.py): its long string constants replaced by short
placeholders. Pure code over text."""

from __future__ import annotations

import bisect
import secrets

from .strings import Constant, constants

#: String constants at least this long are not handed to the parser (see ShortText).
LONG_CONSTANT = 1 << 16


class ShortText:
    """A statement with its long string constants replaced by short placeholders, for the parser:
    pglast holds the GIL while it copies constants, for seconds on a 200 MB statement, and nothing
    of a constant matters to it but its place. Maps positions back and placeholders to values.

    The statement may be text, or (a long statement, which is never decoded whole) its UTF-8 bytes,
    with or without the Query message's closing NUL; positions are then byte offsets."""

    def __init__(self, sql: str | bytes) -> None:
        self.sql = sql
        self._constants: dict[str, Constant] = {}  # placeholder -> the constant it stands for
        self._ends: list[int] = []  # where each placeholder ends in `text`
        self._shifts: list[int] = []  # how far `text` lies behind `sql` after that point
        short = self._shrink(sql) if len(sql) >= LONG_CONSTANT else sql
        if isinstance(short, bytes):
            short = short.removesuffix(b"\0").decode()
        self.text: str = short
        self._ascii = isinstance(sql, str) or short.isascii()

    def _shrink(self, sql: str | bytes) -> str | bytes:
        pieces: list[str | bytes] = []
        cursor = shift = 0
        token = secrets.token_hex(6)
        for constant in constants(sql):
            if constant.end - constant.start < LONG_CONSTANT or not constant.has_value:
                continue
            key = f"azure_local_ai_proxy_constant_{token}_{len(self._constants)}"
            self._constants[key] = constant
            placeholder = f"'{key}'"
            pieces += [sql[cursor : constant.start], placeholder if isinstance(sql, str) else placeholder.encode()]
            shift += constant.end - constant.start - len(key) - 2
            self._ends.append(constant.end - shift)
            self._shifts.append(shift)
            cursor = constant.end
        pieces.append(sql[cursor:])
        return sql[:0].join(pieces)  # type: ignore[arg-type]

    def original(self, position: int) -> int:
        """The offset in the statement of an offset in `text` (outside placeholders)."""
        if not self._ascii:  # `text` was decoded from bytes: count the bytes before the position
            position = len(self.text[:position].encode())
        index = bisect.bisect_right(self._ends, position)
        return position + (self._shifts[index - 1] if index else 0)

    def between(self, start: int, end: int) -> str:
        """The statement's text between two offsets of it."""
        part = self.sql[start:end]
        return part if isinstance(part, str) else part.decode()

    def value(self, sval: str) -> str:
        """A string constant's value as the parser read it, or the long constant it stands for (read
        only now: most long constants are not arguments of a call, and their value is not needed)."""
        constant = self._constants.get(sval)
        if constant is None:
            return sval
        value = constant.value(self.sql)
        return value if isinstance(value, str) else value.decode()  # type: ignore[union-attr]
