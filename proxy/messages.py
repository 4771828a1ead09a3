"""Bodies of the extended-query messages the interception rewrites (Parse, Bind, Describe, Close,
ParameterDescription), decoded and encoded as plain values. Sans-I/O, like protocol.py."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .protocol import ProtocolViolation

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
