"""PostgreSQL frontend/backend protocol 3.x: framing, start-up packets and the few messages the proxy
builds itself. Pure code over bytes (sans-I/O): nothing here touches a socket."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import Enum

_I32 = struct.Struct("!i")
_TYPE_LENGTH = struct.Struct("!BI")

PROTOCOL_3_0 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

#: PostgreSQL itself refuses start-up packets longer than this (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET = 10000
#: Peeked messages longer than this are offered as a Partial of at least PEEK_BYTES of body before being held.
PEEK_THRESHOLD = 1 << 16
PEEK_BYTES = 256
#: PostgreSQL's own ceiling for one message (MaxAllocSize - 1).
DEFAULT_MAX_MESSAGE = 0x3FFFFFFF

#: Message types a client may send after start-up (protocol 3.0 and 3.2).
FRONTEND_TYPES = frozenset(b"QPBDECSHXdcfFp")

QUERY, PARSE, BIND, DESCRIBE, EXECUTE, CLOSE, SYNC, FLUSH, TERMINATE, FUNCTION_CALL = b"QPBDECSHXF"
PASSWORD = ord("p")
COPY_DATA, COPY_DONE, COPY_FAIL = b"dcf"  # from the client, in COPY FROM STDIN
AUTHENTICATION, BACKEND_KEY_DATA, ERROR_RESPONSE, NOTICE_RESPONSE, PARAMETER_STATUS, READY_FOR_QUERY = b"RKENSZ"
COMMAND_COMPLETE = ord("C")

AUTH_SASL = 10
#: Authentication requests that the client must answer with a PasswordMessage-family message.
AUTH_NEEDS_RESPONSE = frozenset({2, 3, 5, 7, 8, 9, 10, 11})

SCRAM_PLUS = b"SCRAM-SHA-256-PLUS"


class ProtocolViolation(Exception):
    """The peer broke the protocol; the session answers with 08P01 and closes."""


# --------------------------------------------------------------------------- start-up packets


class StartupKind(Enum):
    STARTUP = "startup"
    SSL = "ssl"
    GSSENC = "gssenc"
    CANCEL = "cancel"


@dataclass(frozen=True)
class StartupPacket:
    """One decoded start-up packet: a StartupMessage, SSLRequest, GSSENCRequest or CancelRequest."""

    kind: StartupKind
    version: int = 0
    parameters: dict[str, str] = field(default_factory=dict)
    raw: bytes = b""
    cancel_pid: int = 0
    cancel_secret: bytes = b""


def startup_length(header: bytes) -> int:
    """Length of the start-up packet whose first four bytes are `header`, validated."""
    (length,) = _I32.unpack(header)
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise ProtocolViolation("invalid length of startup packet")
    return length


def parse_startup(packet: bytes) -> StartupPacket:
    """Decode a whole start-up packet (length word included)."""
    code = _I32.unpack_from(packet, 4)[0]
    if code == SSL_REQUEST:
        return StartupPacket(StartupKind.SSL, raw=packet)
    if code == GSSENC_REQUEST:
        return StartupPacket(StartupKind.GSSENC, raw=packet)
    if code == CANCEL_REQUEST:
        if len(packet) < 16:
            raise ProtocolViolation("invalid length of cancel request packet")
        pid = _I32.unpack_from(packet, 8)[0]
        return StartupPacket(StartupKind.CANCEL, raw=packet, cancel_pid=pid, cancel_secret=packet[12:])
    if code >> 16 != 3:
        raise ProtocolViolation(
            f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: server supports 3.0 to 3.2"
        )
    return StartupPacket(StartupKind.STARTUP, version=code, parameters=_parse_parameters(packet), raw=packet)


def _parse_parameters(packet: bytes) -> dict[str, str]:
    parts = packet[8:].split(b"\0")
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"":
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    names_values = parts[:-2]
    if len(names_values) % 2:
        raise ProtocolViolation("invalid startup packet layout: a parameter has no value")
    try:
        decoded = [p.decode() for p in names_values]
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("invalid startup packet: parameters are not valid UTF-8") from exc
    params = dict(zip(decoded[::2], decoded[1::2], strict=True))
    if "user" not in params:
        raise ProtocolViolation("no PostgreSQL user name specified in startup packet")
    return params


def startup_message(parameters: dict[str, str], version: int = PROTOCOL_3_0) -> bytes:
    """A StartupMessage (length word included) carrying `parameters`."""
    body = _I32.pack(version) + b"".join(
        name.encode() + b"\0" + value.encode() + b"\0" for name, value in parameters.items()
    ) + b"\0"
    return _I32.pack(len(body) + 4) + body


def cancel_request(pid: int, secret: bytes) -> bytes:
    """A CancelRequest packet naming backend `pid` with key `secret`."""
    return _I32.pack(12 + len(secret)) + _I32.pack(CANCEL_REQUEST) + _I32.pack(pid) + secret


def ssl_request() -> bytes:
    return _I32.pack(8) + _I32.pack(SSL_REQUEST)


# --------------------------------------------------------------------------- regular messages


def message(msg_type: int, body: bytes = b"") -> bytes:
    """Frame one message: type byte, length word, body."""
    return _TYPE_LENGTH.pack(msg_type, len(body) + 4) + body


def header(msg_type: int, body_length: int) -> bytes:
    """A message's type byte and length word alone: a long body is written after it as it is,
    rather than copied into one new buffer with it."""
    return _TYPE_LENGTH.pack(msg_type, body_length + 4)


def error_response(
    sqlstate: str, text: str, *, severity: str = "FATAL", detail: str | None = None, hint: str | None = None
) -> bytes:
    """An ErrorResponse as PostgreSQL sends it (both the localised and the plain severity)."""
    return _report(ERROR_RESPONSE, severity, sqlstate, text, detail, hint)


def notice_response(text: str, *, sqlstate: str = "00000", hint: str | None = None) -> bytes:
    """A NoticeResponse of severity NOTICE: a message the client shows while its query goes on."""
    return _report(NOTICE_RESPONSE, "NOTICE", sqlstate, text, None, hint)


def _report(msg_type: int, severity: str, sqlstate: str, text: str, detail: str | None, hint: str | None) -> bytes:
    fields = [b"S" + severity.encode(), b"V" + severity.encode(), b"C" + sqlstate.encode(), b"M" + text.encode()]
    if detail:
        fields.append(b"D" + detail.encode())
    if hint:
        fields.append(b"H" + hint.encode())
    return message(msg_type, b"\0".join(fields) + b"\0\0")


def parse_fields(body: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse or NoticeResponse body, keyed by their one-letter codes."""
    out: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            out[chr(part[0])] = part[1:].decode(errors="replace")
    return out


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    """A ParameterStatus message's name and value."""
    name, value, _ = body.split(b"\0", 2)
    return name.decode(errors="replace"), value.decode(errors="replace")


def backend_key_data(pid: int, secret: bytes) -> bytes:
    return message(BACKEND_KEY_DATA, _I32.pack(pid) + secret)


def parse_backend_key_data(body: bytes) -> tuple[int, bytes]:
    if len(body) < 8:
        raise ProtocolViolation("BackendKeyData too short")
    return _I32.unpack_from(body, 0)[0], bytes(body[4:])


def auth_code(body: bytes) -> int:
    return _I32.unpack_from(body, 0)[0]


def strip_channel_binding(body: bytes) -> bytes:
    """Remove SCRAM-SHA-256-PLUS from an AuthenticationSASL body: channel binding ties the client's
    TLS session to the server's, and the proxy stands between two different TLS sessions."""
    mechanisms = [m for m in body[4:].split(b"\0") if m and m != SCRAM_PLUS]
    return body[:4] + b"".join(m + b"\0" for m in mechanisms) + b"\0"


# --------------------------------------------------------------------------- framing


@dataclass(frozen=True, slots=True)
class Message:
    """A whole message the reader asked to see: its type byte and its body (length word stripped)."""

    type: int
    body: bytes
    #: For a message held across reads, of one of the framer's marker_types: whether its marker
    #: occurs in it (case-insensitively), found as the bytes arrived. None: not looked for.
    marked: bool | None = None

    def encode(self) -> bytes:
        return message(self.type, self.body)


@dataclass(frozen=True, slots=True)
class Partial:
    """The start of a long message of a peeked type (header included), offered for a decision."""

    type: int
    data: bytes

    @property
    def body_start(self) -> bytes:
        return self.data[5:]


@dataclass(frozen=True, slots=True)
class LongMessage:
    """A long inspected message held across reads, kept as the pieces it arrived in (Framer.long_parts),
    so that relaying it unchanged copies nothing; `body` joins them, for a reader that needs it whole."""

    type: int
    parts: tuple[bytes, ...]  # the body, in pieces
    marked: bool | None = None  # as Message.marked

    @property
    def size(self) -> int:
        return sum(len(part) for part in self.parts)

    def body(self) -> bytes:
        return b"".join(self.parts)


Piece = bytes | memoryview | Message | Partial | LongMessage


class Framer:
    """Splits one direction of a session's byte stream into messages.

    Messages whose type is in `inspect` come out whole, as `Message`; everything else comes out as
    runs of raw bytes to relay as they are, including the body of a long message in pieces, so that
    a 100 MB value streams through without being held. `valid_types`, when given, is the set of types
    the peer may send; anything else is a protocol violation."""

    __slots__ = (
        "_held", "_hold_total", "_marked", "_parts", "_parts_size", "_skip", "_undecided", "inspect", "last_type",
        "long_parts", "marker", "marker_types", "max_length", "peek_types", "ready_count", "tx_status", "valid_types",
    )

    def __init__(
        self, *, valid_types: frozenset[int] | None = None, max_length: int = DEFAULT_MAX_MESSAGE
    ) -> None:
        self.valid_types = valid_types
        self.max_length = max_length
        self.inspect: frozenset[int] = frozenset()
        #: Inspected types whose long messages (over PEEK_THRESHOLD) are not held at once: their first
        #: bytes come out as a `Partial`, and the reader calls `decide` to hold the rest or stream it.
        self.peek_types: frozenset[int] = frozenset()
        #: Lower-case bytes to look for in long inspected messages of `marker_types` while they arrive,
        #: a read at a time, so that nobody has to search a whole 200 MB message at once (Message.marked).
        self.marker = b""
        self.marker_types: frozenset[int] = frozenset()
        self._marked: bool | None = None
        #: Hold inspected messages longer than this as the pieces they arrive in, and hand them out as
        #: LongMessage (0: never): a 200 MB message is then neither grown nor copied in one go.
        self.long_parts = 0
        self._parts: list[bytes] = []
        self._parts_size = 0
        self._undecided = False
        self.last_type = 0
        #: ReadyForQuery messages seen, and the transaction status byte of the last one (I, T or E);
        #: meaningful on the server's stream, where they mark the ends of the client's requests.
        self.ready_count = 0
        self.tx_status = ord("I")
        self._skip = 0
        self._held = bytearray()
        self._hold_total = 0

    @property
    def at_boundary(self) -> bool:
        """True when no message is partly received."""
        return not self._skip and not self._held

    @property
    def gathering(self) -> bool:
        """A long message is being gathered whole (its pieces so far are held)."""
        return bool(self._parts)

    @property
    def skipping(self) -> int | None:
        """Where nothing is held: how many bytes of a message's body are still to stream through
        (0 at a boundary). None while bytes are held (a partial header or an inspected message)."""
        if self._held or self._parts or self._undecided:
            return None
        return self._skip

    def resume(self, skip: int, last_type: int, ready_count: int | None = None, tx_status: int | None = None) -> None:
        """Take up the stream where another reader of it (the relay thread) left it."""
        assert self.skipping is not None
        self._skip = skip
        self.last_type = last_type
        if ready_count is not None:
            self.ready_count = ready_count
        if tx_status is not None:
            self.tx_status = tx_status

    @property
    def undecided(self) -> bool:
        """A Partial was handed out and `decide` has not been called yet."""
        return self._undecided

    def feed(self, data: bytes) -> list[Piece]:
        """Consume `data`; return raw runs and whole inspected messages, in stream order.

        A chunk that is all raw (nothing inspected, nothing left over) comes back as `[data]` itself.
        A Partial, if any, is the last piece, and `decide` must be called before the next feed."""
        assert not self._undecided, "decide() must follow a Partial"
        if not self._skip and not self._held:
            return self._frame(data, 0, [])
        out: list[Piece] = []
        view = memoryview(data)
        pos = 0
        end = len(view)
        if self._skip:
            pos = min(self._skip, end)
            self._skip -= pos
            out.append(view[:pos])
            if self._skip:
                return out
        if self._held:
            pos = self._continue_held(view, pos, out)
            if self._held:
                return out
        return self._frame(data, pos, out)

    def _frame(self, data: bytes, pos: int, out: list[Piece]) -> list[Piece]:
        """Frame `data` from `pos`, a message boundary (the hot path: one loop step per message)."""
        start = pos
        end = len(data)
        unpack = _TYPE_LENGTH.unpack_from
        inspect = self.inspect
        valid = self.valid_types
        max_length = self.max_length
        while end - pos >= 5:
            msg_type, length = unpack(data, pos)
            if (valid is not None and msg_type not in valid) or length < 4 or length > max_length:
                self._reject(msg_type, length)
            self.last_type = msg_type
            total = length + 1
            if msg_type == READY_FOR_QUERY:
                self.ready_count += 1
                if end - pos > 5:
                    self.tx_status = data[pos + 5]
            if msg_type in inspect:
                if pos > start:
                    out.append(memoryview(data)[start:pos])
                if end - pos < total and total > PEEK_THRESHOLD and msg_type in self.peek_types:
                    self._held = bytearray(memoryview(data)[pos:])
                    self._hold_total = -total
                    self._offer(out)
                    return out
                if end - pos >= total:
                    out.append(Message(msg_type, bytes(data[pos + 5 : pos + total])))
                    pos += total
                    start = pos
                    continue
                self._hold_total = total
                self._held = bytearray(memoryview(data)[pos:])
                if self.marker and msg_type in self.marker_types:
                    self._marked = self._marker_in_held(5)
                return out
            if end - pos < total:
                self._skip = total - (end - pos)
                pos = end
                break
            pos += total
        if end > pos:
            # A partial header: keep it as the start of a held message of unknown length.
            if pos > start:
                out.append(memoryview(data)[start:pos])
            self._held = bytearray(memoryview(data)[pos:])
            self._hold_total = 0
            return out
        if pos > start:
            out.append(data if start == 0 else memoryview(data)[start:pos])
        return out

    def _reject(self, msg_type: int, length: int) -> None:
        if self.valid_types is not None and msg_type not in self.valid_types:
            raise ProtocolViolation(f"invalid frontend message type {msg_type}")
        if length < 4:
            raise ProtocolViolation(f"invalid message length {length}")
        raise ProtocolViolation(f"message of {length} bytes exceeds the maximum of {self.max_length}")

    def _continue_held(self, view: memoryview, pos: int, out: list[Piece]) -> int:
        """Extend the held bytes (a partial header or a partial inspected message)."""
        if self._hold_total < 0:
            pos = self._continue_peek(view, pos, out)
            if self._hold_total <= 0:
                return pos
        if not self._hold_total:
            need = 5 - len(self._held)
            self._held += view[pos : pos + need]
            pos += min(need, len(view) - pos)
            if len(self._held) < 5:
                return pos
            # The header is whole: re-frame it together with the rest of this chunk.
            header = bytes(self._held)
            self._held = bytearray()
            for piece in self.feed(header):
                out.append(piece)
            if self._skip:
                take = min(self._skip, len(view) - pos)
                self._skip -= take
                out.append(view[pos : pos + take])
                return pos + take
            if not self._held:
                return pos
            if self._hold_total < 0:
                pos = self._continue_peek(view, pos, out)
                if self._hold_total <= 0:
                    return pos
        if self.long_parts and self._hold_total > self.long_parts:
            return self._continue_parts(view, pos, out)
        need = self._hold_total - len(self._held)
        chunk = view[pos : pos + need]
        before = len(self._held)
        self._held += chunk
        pos += len(chunk)
        if self._marked is False:
            self._marked = self._marker_in_held(max(5, before - len(self.marker) + 1))
        if len(self._held) == self._hold_total:
            held = self._held
            self._held = bytearray()
            self._hold_total = 0
            marked, self._marked = self._marked, None
            out.append(Message(held[0], bytes(memoryview(held)[5:]), marked))
        return pos

    def _continue_parts(self, view: memoryview, pos: int, out: list[Piece]) -> int:
        """A long message's next piece (its first bytes, header included, are in `_held`)."""
        need = self._hold_total - len(self._held) - self._parts_size
        whole_read = pos == 0 and len(view) <= need and isinstance(view.obj, bytes)
        chunk = view.obj if whole_read else bytes(view[pos : pos + need])  # a whole read is kept, not copied
        if self._marked is False:
            overlap = len(self.marker) - 1  # a marker across the seam of this piece and those before it
            seam = self._body_tail(overlap) + chunk[:overlap]
            self._marked = _has_marker(seam, self.marker) or _has_marker(chunk, self.marker)
        self._parts.append(chunk)
        self._parts_size += len(chunk)
        if len(self._held) + self._parts_size == self._hold_total:
            first = bytes(memoryview(self._held)[5:])
            parts = (first, *self._parts) if first else tuple(self._parts)
            out.append(LongMessage(self._held[0], parts, self._marked))
            self._held, self._hold_total, self._marked, self._parts, self._parts_size = bytearray(), 0, None, [], 0
        return pos + len(chunk)

    def _body_tail(self, size: int) -> bytes:
        """The last `size` bytes of a long message's body gathered so far. They may lie in several
        pieces (a read can be shorter than the marker), so a marker begun two pieces back is still
        seen; and never in the header, whose length bytes can look like the marker's first letters."""
        tail = b""
        for part in reversed(self._parts):
            tail = part[max(0, len(part) - (size - len(tail))) :] + tail
            if len(tail) == size:
                return tail
        return bytes(self._held[max(5, len(self._held) - (size - len(tail))) :]) + tail

    def _marker_in_held(self, start: int) -> bool:
        return _has_marker(self._held[start:], self.marker)

    def _continue_peek(self, view: memoryview, pos: int, out: list[Piece]) -> int:
        """Gather the first bytes of a long peeked message; once they are here, offer it."""
        total = -self._hold_total
        take = min(total - len(self._held), len(view) - pos)
        self._held += view[pos : pos + take]
        if len(self._held) == total:  # whole after all: no decision needed
            held, self._held, self._hold_total = self._held, bytearray(), 0
            out.append(Message(held[0], bytes(held[5:])))
        else:
            self._offer(out)
        return pos + take

    def _offer(self, out: list[Piece]) -> None:
        """With enough of a long message's start, hand it out as a Partial for the reader to decide."""
        if len(self._held) >= 5 + PEEK_BYTES:
            self._undecided = True
            out.append(Partial(self._held[0], bytes(self._held)))

    def decide(self, hold: bool) -> None:
        """After a Partial: hold the rest of its message (it comes out whole, as a Message, with the
        Partial's bytes at its start), or stream it (the reader relays the Partial's bytes itself)."""
        total = -self._hold_total
        self._undecided = False
        if hold:
            self._hold_total = total
        else:
            self._skip = total - len(self._held)
            self._held = bytearray()
            self._hold_total = 0


def _has_marker(data: bytes | bytearray, marker: bytes) -> bool:
    """Whether `marker` (lower case) occurs in `data` in any case. A byte of the marker that case does
    not change (the "_" of azure_local_ai) is looked for first: memchr-fast, and most long data has
    none, which spares lowering a copy of it."""
    anchor = marker.translate(None, _LETTERS)[:1]
    if anchor and anchor not in data:
        return False
    return data.lower().find(marker) >= 0


_LETTERS = bytes(range(ord("A"), ord("Z") + 1)) + bytes(range(ord("a"), ord("z") + 1))
