"""Sans-I/O protocol code, tested over bytes alone."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import protocol as pg


def frame(msg_type: bytes, body: bytes) -> bytes:
    """Built by hand here rather than with pg.message, so the two check each other."""
    return msg_type + struct.pack("!I", len(body) + 4) + body


messages = st.lists(
    st.tuples(st.sampled_from(list(b"QPBDESdc")), st.binary(max_size=300)), min_size=1, max_size=20
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


@settings(max_examples=300, deadline=None)
@given(messages, st.lists(st.integers(min_value=0, max_value=10_000), max_size=15),
       st.sets(st.sampled_from(list(b"QPBDESdc"))), st.sampled_from([0, 10, 100]))
def test_framer_reassembles_any_chunking(
    msgs: list[tuple[int, bytes]], cuts: list[int], inspect: set[int], long_parts: int
) -> None:
    stream = b"".join(frame(bytes([t]), body) for t, body in msgs)
    framer = pg.Framer(valid_types=pg.FRONTEND_TYPES)
    framer.inspect = frozenset(inspect)
    framer.long_parts = long_parts
    relayed = bytearray()
    seen: list[tuple[int, bytes]] = []
    for chunk in chunked(stream, cuts):
        for piece in framer.feed(chunk):
            if isinstance(piece, pg.Message | pg.LongMessage):
                body = piece.body() if isinstance(piece, pg.LongMessage) else piece.body
                assert not isinstance(piece, pg.LongMessage) or len(body) + 5 > long_parts > 0
                seen.append((piece.type, body))
                relayed += frame(bytes([piece.type]), body)
            else:
                relayed += bytes(piece)
    assert bytes(relayed) == stream
    assert seen == [(t, b) for t, b in msgs if t in inspect]
    assert framer.at_boundary
    assert framer.last_type == msgs[-1][0]


def test_framer_streams_long_bodies_without_holding_them() -> None:
    body = b"x" * 1_000_000
    framer = pg.Framer()
    data = frame(b"d", body)
    out = [bytes(p) for p in framer.feed(data[:1000])]
    assert b"".join(out) == data[:1000]
    assert not framer.at_boundary
    out = [bytes(p) for p in framer.feed(data[1000:])]
    assert b"".join(out) == data[1000:]
    assert framer.at_boundary


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"Z\x00\x00\x00\x04", "invalid frontend message type"),
        (b"Q\x00\x00\x00\x03", "invalid message length"),
        (b"Q\x7f\xff\xff\xf0", "exceeds the maximum"),
    ],
)
def test_framer_rejects_bad_input(data: bytes, reason: str) -> None:
    with pytest.raises(pg.ProtocolViolation, match=reason):
        pg.Framer(valid_types=pg.FRONTEND_TYPES).feed(data)


def test_framer_max_length_is_configurable() -> None:
    framer = pg.Framer(valid_types=pg.FRONTEND_TYPES, max_length=100)
    assert framer.feed(frame(b"Q", b"a" * 95))
    with pytest.raises(pg.ProtocolViolation):
        framer.feed(frame(b"Q", b"a" * 97))


def startup(version: int, **params: str) -> bytes:
    body = struct.pack("!i", version) + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items())
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def test_parse_startup_message() -> None:
    packet = pg.parse_startup(startup(196608, user="alice", database="db", application_name="x y"))
    assert packet.kind is pg.StartupKind.STARTUP
    assert packet.parameters == {"user": "alice", "database": "db", "application_name": "x y"}
    assert packet.version == 3 << 16


def test_parse_startup_newer_minor_is_passed_on() -> None:
    assert pg.parse_startup(startup((3 << 16) | 2, user="u")).version == (3 << 16) | 2


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (startup(2 << 16, user="u"), "unsupported frontend protocol"),
        (startup(196608, database="d"), "no PostgreSQL user name"),
        (struct.pack("!ii", 13, 196608) + b"user\0", "invalid startup packet layout"),
    ],
)
def test_parse_startup_rejects(packet: bytes, reason: str) -> None:
    with pytest.raises(pg.ProtocolViolation, match=reason):
        pg.parse_startup(packet)


@pytest.mark.parametrize("header", [struct.pack("!i", 4), struct.pack("!i", 10_001), b"GET "])
def test_startup_length_bounds(header: bytes) -> None:
    with pytest.raises(pg.ProtocolViolation):
        pg.startup_length(header)


def test_special_startup_packets() -> None:
    assert pg.parse_startup(struct.pack("!ii", 8, 80877103)).kind is pg.StartupKind.SSL
    assert pg.parse_startup(struct.pack("!ii", 8, 80877104)).kind is pg.StartupKind.GSSENC
    cancel = pg.parse_startup(pg.cancel_request(1234, b"\x01\x02\x03\x04"))
    assert (cancel.kind, cancel.cancel_pid, cancel.cancel_secret) == (pg.StartupKind.CANCEL, 1234, b"\x01\x02\x03\x04")
    long_key = pg.parse_startup(pg.cancel_request(7, bytes(range(32))))
    assert long_key.cancel_secret == bytes(range(32))


def test_strip_channel_binding() -> None:
    body = struct.pack("!i", 10) + b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"
    assert pg.strip_channel_binding(body) == struct.pack("!i", 10) + b"SCRAM-SHA-256\0\0"


def test_error_response_fields() -> None:
    data = pg.error_response("08P01", "bad thing", hint="do better")
    assert data[:1] == b"E"
    assert struct.unpack("!I", data[1:5])[0] == len(data) - 1
    fields = pg.parse_fields(data[5:])
    assert fields == {"S": "FATAL", "V": "FATAL", "C": "08P01", "M": "bad thing", "H": "do better"}


def test_backend_key_data_round_trip() -> None:
    data = pg.backend_key_data(42, b"secretkey-of-3.2-length")
    assert pg.parse_backend_key_data(data[5:]) == (42, b"secretkey-of-3.2-length")


def is_subsequence(short: list, long: list) -> bool:
    it = iter(long)
    return all(any(x is y or x == y for y in it) for x in short)


big_messages = st.lists(
    st.tuples(st.sampled_from(list(b"PBEDS")), st.integers(min_value=0, max_value=200_000), st.booleans()),
    min_size=1, max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(big_messages, st.lists(st.integers(min_value=0, max_value=2_000_000), max_size=12))
def test_framer_offers_long_peeked_messages(msgs: list[tuple[int, int, bool]], cuts: list[int]) -> None:
    """A long message of a peeked type comes out as a Partial; held whole only if the reader decides so
    (here: by the body's first byte), else streamed with the Partial's bytes relayed by the reader."""
    bodies = [(t, (b"K" if keep else b"S") + bytes([i % 251]) * size) for i, (t, size, keep) in enumerate(msgs)]
    stream = b"".join(frame(bytes([t]), body) for t, body in bodies)
    framer = pg.Framer(valid_types=pg.FRONTEND_TYPES)
    framer.inspect = frozenset(b"PB")
    framer.peek_types = frozenset(b"B")
    relayed = bytearray()
    seen = []
    for chunk in chunked(stream, cuts):
        for piece in framer.feed(chunk):
            if isinstance(piece, pg.Partial):
                hold = piece.body_start[:1] == b"K"
                framer.decide(hold)
                if not hold:
                    relayed += piece.data
            elif isinstance(piece, pg.Message):
                seen.append((piece.type, piece.body))
                relayed += frame(bytes([piece.type]), piece.body)
            else:
                relayed += bytes(piece)
    assert bytes(relayed) == stream
    inspected = [(t, b) for t, b in bodies if t in b"PB"]
    required = [(t, b) for t, b in inspected
                if t == ord("P") or len(b) + 5 <= pg.PEEK_THRESHOLD or b[:1] == b"K"]
    # Held: what must be; a long streamed Bind may also come out whole when one chunk held all of it.
    assert is_subsequence(required, seen) and is_subsequence(seen, inspected)
    assert framer.at_boundary


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(b"QPS")), st.binary(max_size=60),
                          st.sampled_from([b"", b"MaR_kEr", b"mar_ker", b"mar_", b"mar"])), min_size=1, max_size=8),
       st.lists(st.integers(min_value=0, max_value=2_000), max_size=20), st.sampled_from([0, 40]),
       st.sampled_from([b"mar_ker", b"mar"]))
def test_framer_finds_the_marker_in_held_messages_as_they_arrive(
    msgs: list[tuple[int, bytes, bytes]], cuts: list[int], long_parts: int, marker: bytes
) -> None:
    """A message held across reads carries whether the marker occurs in it (any case, across read
    boundaries too, with a caseless anchor byte or without); one that came whole in a read, or of
    another type, says nothing (None)."""
    bodies = [(t, pad[:30] + word + pad[30:]) for t, pad, word in msgs]
    stream = b"".join(frame(bytes([t]), body) for t, body in bodies)
    framer = pg.Framer(valid_types=pg.FRONTEND_TYPES)
    framer.inspect = frozenset(b"QPS")
    framer.marker, framer.marker_types = marker, frozenset(b"QP")
    framer.long_parts = long_parts
    seen = [(piece.type, piece.body() if isinstance(piece, pg.LongMessage) else piece.body, piece.marked)
            for chunk in chunked(stream, cuts) for piece in framer.feed(chunk)
            if isinstance(piece, pg.Message | pg.LongMessage)]
    assert [(t, body) for t, body, _ in seen] == bodies
    for msg_type, body, marked in seen:
        if marked is not None:
            assert msg_type in b"QP"
            assert marked == (marker in body.lower())


MARKER = b"azure_local_ai"
MARKER_CASES = [MARKER, MARKER.upper(), MARKER.title(),
                bytes(c ^ 0x20 * (i % 2 and c >= ord("a")) for i, c in enumerate(MARKER)),
                bytes(c ^ 0x20 * (not i % 2 and c >= ord("a")) for i, c in enumerate(MARKER))]


def marked_as_fed(msg: bytes, cuts: tuple[int, ...], long_parts: int) -> bool | None:
    """Feed `msg` to a framer looking for MARKER in Query messages, cut at `cuts`; what it says of it."""
    framer = pg.Framer(valid_types=pg.FRONTEND_TYPES)
    framer.inspect = framer.marker_types = frozenset(b"Q")
    framer.marker, framer.long_parts = MARKER, long_parts
    points = (0, *cuts, len(msg))
    pieces = [piece for a, b in itertools.pairwise(points) for piece in framer.feed(msg[a:b])]
    assert len(pieces) == 1 and isinstance(pieces[0], pg.Message | pg.LongMessage)
    body = pieces[0].body() if isinstance(pieces[0], pg.LongMessage) else pieces[0].body
    assert frame(b"Q", body) == msg
    return pieces[0].marked


@pytest.mark.parametrize("long_parts", [0, 40])
@pytest.mark.parametrize("word", MARKER_CASES, ids=lambda word: word.decode())
def test_framer_finds_the_marker_however_the_message_is_cut(word: bytes, long_parts: int) -> None:
    """A 49-byte Query with the marker at offset 30, cut into 3 and 4 pieces every way: found each time,
    also when it spans three or four pieces (a piece shorter than the marker does not hide its start)."""
    msg = frame(b"Q", b"x" * 25 + word + b"y" * 5)
    assert len(msg) == 49 and msg.lower().index(MARKER) == 30
    missed = [cuts for n in (2, 3) for cuts in itertools.combinations(range(1, len(msg)), n)
              if marked_as_fed(msg, cuts, long_parts) is not True]
    assert missed == []


@pytest.mark.parametrize("long_parts", [0, 40])
def test_framer_finds_no_marker_that_is_not_there(long_parts: int) -> None:
    """Near misses across every 3-piece cut say False: the marker with its last letter changed, and a
    body that begins with the marker's tail after a length word whose last byte is its first letter."""
    near = frame(b"Q", b"x" * 25 + MARKER[:-1] + b"b" + b"y" * 5)
    tail_only = frame(b"Q", MARKER[1:] + b"z" * (ord("a") - 4 - len(MARKER[1:])))
    assert tail_only[4:5] == b"a"
    for msg in (near, tail_only):
        wrong = [cuts for cuts in itertools.combinations(range(1, len(msg)), 2)
                 if marked_as_fed(msg, cuts, long_parts) is not False]
        assert wrong == []
