"""Bodies of the extended-query messages the interception rewrites (Parse, Bind, Describe, Close,
ParameterDescription), and the ones the admin console reads (Query, Execute), decoded and encoded as
plain values; and the result-set messages the admin console answers with. Sans-I/O, like protocol.py."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .protocol import ProtocolViolation, message

_U16 = struct.Struct("!H")  # counts: PostgreSQL reads them unsigned (up to 65,535)
_I32 = struct.Struct("!i")


def _cstring(body: bytes, pos: int) -> tuple[str, int]:
    end = body.find(b"\0", pos)
    if end < 0:
        raise ProtocolViolation("unterminated string in message")
    return body[pos:end].decode("utf-8", errors="surrogateescape"), end + 1


def _check_end(body: bytes, end: int, what: str) -> None:
    """PostgreSQL refuses a message with bytes left over after its last field."""
    if end != len(body):
        raise ProtocolViolation(f"invalid {what} message format")


def _encode_cstring(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogateescape") + b"\0"


@dataclass(frozen=True)
class Parse:
    statement: str
    query: str
    param_types: tuple[int, ...]

    @classmethod
    def decode(cls, body: bytes) -> Parse:
        try:
            statement, pos = _cstring(body, 0)
            query, pos = _cstring(body, pos)
            (count,) = _U16.unpack_from(body, pos)
            types = struct.unpack_from(f"!{count}I", body, pos + 2)
        except struct.error as exc:
            raise ProtocolViolation("malformed Parse message") from exc
        _check_end(body, pos + 2 + 4 * count, "Parse")
        return cls(statement, query, tuple(types))

    def encode(self) -> bytes:
        return (_encode_cstring(self.statement) + _encode_cstring(self.query) + _U16.pack(len(self.param_types))
                + struct.pack(f"!{len(self.param_types)}I", *self.param_types))


@dataclass(frozen=True)
class Bind:
    portal: str
    statement: str
    param_formats: tuple[int, ...]
    values: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]

    @classmethod
    def decode(cls, body: bytes) -> Bind:
        try:
            portal, pos = _cstring(body, 0)
            statement, pos = _cstring(body, pos)
            (count,) = _U16.unpack_from(body, pos)
            formats = struct.unpack_from(f"!{count}h", body, pos + 2)
            pos += 2 + 2 * count
            (count,) = _U16.unpack_from(body, pos)
            pos += 2
            values: list[bytes | None] = []
            for _ in range(count):
                (length,) = _I32.unpack_from(body, pos)
                pos += 4
                if length < -1 or pos + length > len(body):
                    raise ProtocolViolation("insufficient data left in message")
                if length < 0:
                    values.append(None)
                else:
                    values.append(body[pos : pos + length])
                    pos += length
            (count,) = _U16.unpack_from(body, pos)
            result_formats = struct.unpack_from(f"!{count}h", body, pos + 2)
        except struct.error as exc:
            raise ProtocolViolation("malformed Bind message") from exc
        _check_end(body, pos + 2 + 2 * count, "Bind")
        return cls(portal, statement, tuple(formats), tuple(values), tuple(result_formats))

    def encode(self) -> bytes:
        parts = [_encode_cstring(self.portal), _encode_cstring(self.statement),
                 _U16.pack(len(self.param_formats)), struct.pack(f"!{len(self.param_formats)}h", *self.param_formats),
                 _U16.pack(len(self.values))]
        for value in self.values:
            parts.append(_I32.pack(-1) if value is None else _I32.pack(len(value)) + value)
        parts += [_U16.pack(len(self.result_formats)), struct.pack(f"!{len(self.result_formats)}h",
                                                                     *self.result_formats)]
        return b"".join(parts)

    def format_of(self, index: int) -> int:
        """The format code (0 text, 1 binary) of parameter `index`, 0-based."""
        if not self.param_formats:
            return 0
        if len(self.param_formats) == 1:
            return self.param_formats[0]
        return self.param_formats[index]

    def with_extra_values(self, extra: list[tuple[int, bytes | None]]) -> Bind:
        """This Bind with more parameters appended, each given as (format code, value)."""
        values = self.values + tuple(v for _, v in extra)
        extra_formats = tuple(f for f, _ in extra)
        if len(self.param_formats) <= 1 and self.format_of(0) == 0 and not any(extra_formats):
            formats = self.param_formats  # "all text" still says it
        else:
            formats = tuple(self.format_of(i) for i in range(len(self.values))) + extra_formats
        return Bind(self.portal, self.statement, formats, values, self.result_formats)


def describe_target(body: bytes) -> tuple[str, str]:
    """Describe and Close bodies: ('S' or 'P', name)."""
    if not body or chr(body[0]) not in "SP":
        raise ProtocolViolation("Describe/Close must name a statement (S) or a portal (P)")
    name, _ = _cstring(body, 1)
    return chr(body[0]), name


def parameter_description(body: bytes) -> tuple[int, ...]:
    (count,) = _U16.unpack_from(body, 0)
    return struct.unpack_from(f"!{count}I", body, 2)


def encode_parameter_description(types: tuple[int, ...]) -> bytes:
    return _U16.pack(len(types)) + struct.pack(f"!{len(types)}I", *types)


@dataclass(frozen=True)
class Execute:
    portal: str
    max_rows: int  # 0: all rows

    @classmethod
    def decode(cls, body: bytes) -> Execute:
        portal, pos = _cstring(body, 0)
        try:
            (max_rows,) = _I32.unpack_from(body, pos)
        except struct.error as exc:
            raise ProtocolViolation("malformed Execute message") from exc
        _check_end(body, pos + 4, "Execute")
        return cls(portal, max_rows)


def query_text(body: bytes) -> str:
    """The SQL of a Query message."""
    text, end = _cstring(body, 0)
    _check_end(body, end, "Query")
    return text


# --------------------------------------------------------------------------- answers the proxy gives itself
# (the admin console): result sets whose columns are all `text`, whose binary form is its text form.

TEXT_OID = 25
_FIELD = struct.Struct("!IhIhih")  # table oid, column number, type oid, type length, type modifier, format


def row_description(columns: tuple[str, ...], formats: tuple[int, ...] = ()) -> bytes:
    """A RowDescription of `text` columns; `formats` as a Bind gives them (none: text; one: for all)."""
    parts = [_U16.pack(len(columns))]
    for index, name in enumerate(columns):
        fmt = formats[0] if len(formats) == 1 else formats[index] if formats else 0
        parts.append(_encode_cstring(name) + _FIELD.pack(0, 0, TEXT_OID, -1, -1, fmt))
    return message(ord("T"), b"".join(parts))


def data_row(values: tuple[str | None, ...]) -> bytes:
    parts = [_U16.pack(len(values))]
    for value in values:
        if value is None:
            parts.append(_I32.pack(-1))
        else:
            data = value.encode()
            parts.append(_I32.pack(len(data)) + data)
    return message(ord("D"), b"".join(parts))


def parse_data_row(body: bytes) -> tuple[str | None, ...]:
    """A DataRow's values, read as text."""
    try:
        (count,) = _U16.unpack_from(body, 0)
        pos = 2
        values: list[str | None] = []
        for _ in range(count):
            (length,) = _I32.unpack_from(body, pos)
            pos += 4
            if length < 0:
                values.append(None)
                continue
            if pos + length > len(body):
                raise ProtocolViolation("insufficient data left in message")
            values.append(body[pos : pos + length].decode(errors="replace"))
            pos += length
    except struct.error as exc:
        raise ProtocolViolation("malformed DataRow message") from exc
    _check_end(body, pos, "DataRow")
    return tuple(values)


def command_complete(tag: str) -> bytes:
    return message(ord("C"), _encode_cstring(tag))


def ready_for_query(status: str = "I") -> bytes:
    return message(ord("Z"), status.encode())


def parameter_status(name: str, value: str) -> bytes:
    return message(ord("S"), _encode_cstring(name) + _encode_cstring(value))


EMPTY_QUERY_RESPONSE = message(ord("I"))
PARSE_COMPLETE = message(ord("1"))
BIND_COMPLETE = message(ord("2"))
CLOSE_COMPLETE = message(ord("3"))
NO_DATA = message(ord("n"))
PORTAL_SUSPENDED = message(ord("s"))
