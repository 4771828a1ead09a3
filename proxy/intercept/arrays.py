"""PostgreSQL's text format for one-dimensional arrays (`{a,"b c",NULL}`), both ways."""

from __future__ import annotations

from collections.abc import Sequence


class ArrayLiteralError(ValueError):
    """Malformed array literal (SQLSTATE 22P02, as PostgreSQL's array_in reports it)."""

    sqlstate = "22P02"


def parse_text_array(text: str) -> list[str | None]:
    """Parse a one-dimensional array literal into its elements (None for NULL)."""
    s = text.strip()
    if s.startswith("["):  # optional dimension decoration: [1:3]={...}
        eq = s.find("=")
        if eq < 0:
            raise ArrayLiteralError(f'malformed array literal: "{text}"')
        s = s[eq + 1 :].strip()
    if not (s.startswith("{") and s.endswith("}")):
        raise ArrayLiteralError(f'malformed array literal: "{text}"')
    body = s[1:-1]
    out: list[str | None] = []
    if not body.strip():
        return out
    i, n = 0, len(body)
    while True:
        while i < n and body[i].isspace():
            i += 1
        if i < n and body[i] == "{":
            raise ArrayLiteralError(f'malformed array literal: "{text}": expected a one-dimensional array')
        value, quoted, i = _element(body, i, text)
        out.append(None if not quoted and value.upper() == "NULL" else value)
        while i < n and body[i].isspace():
            i += 1
        if i == n:
            return out
        if body[i] != ",":
            raise ArrayLiteralError(f'malformed array literal: "{text}"')
        i += 1


def _element(body: str, i: int, text: str) -> tuple[str, bool, int]:
    n = len(body)
    if i < n and body[i] == '"':
        chars: list[str] = []
        i += 1
        while i < n and body[i] != '"':
            if body[i] == "\\":
                i += 1
                if i == n:
                    break
            chars.append(body[i])
            i += 1
        if i >= n:
            raise ArrayLiteralError(f'malformed array literal: "{text}": unterminated quoted element')
        return "".join(chars), True, i + 1
    chars = []
    while i < n and body[i] not in ",}":
        if body[i] == "\\":
            i += 1
            if i == n:
                raise ArrayLiteralError(f'malformed array literal: "{text}"')
        elif body[i] in '{"':
            raise ArrayLiteralError(f'malformed array literal: "{text}": unexpected "{body[i]}"')
        chars.append(body[i])
        i += 1
    value = "".join(chars).rstrip()
    if not value:
        raise ArrayLiteralError(f'malformed array literal: "{text}": empty element')
    return value, False, i


def format_text_array(values: Sequence[str | None]) -> str:
    """The array literal PostgreSQL would print for these text elements."""
    return "{" + ",".join("NULL" if v is None else _quote_element(v) for v in values) + "}"


def _quote_element(value: str) -> str:
    if value == "" or value.upper() == "NULL" or any(c in value for c in '{},"\\ \t\n\r\v\f'):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value
