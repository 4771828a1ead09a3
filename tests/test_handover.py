"""An answer handed over with the statement (proxy/intercept/handover.py): the messages, sent straight to
a real server ahead of a client's own, and which of the server's replies are the proxy's."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from proxy import protocol as pg
from proxy.intercept.handover import SETTING, HandOverReplies, hand_over_messages
from proxy.intercept.render import real_array_text
from proxy.intercept.servercalls import encode_answer, kept_key
from proxy.mailbox import Mailbox
from proxy.messages import Bind, Parse

from .pgcluster import PgCluster
from .rawclient import RawClient

READ_IT = f"SELECT current_setting('{SETTING}', true)"


def answer() -> bytes:
    vector = np.linspace(-1, 1, 384, dtype=np.float32)
    return encode_answer(Mailbox.new(), kept_key("multilingual-e5-small:v1", "a text"), "V", real_array_text(vector))


def extended_batch(sql: str) -> bytes:
    """A client's batch: its statement parsed, bound, run and synced."""
    return b"".join([pg.message(pg.PARSE, Parse("", sql, ()).encode()),
                     pg.message(pg.BIND, Bind("", "", (), (), ()).encode()),
                     pg.message(pg.EXECUTE, b"\0\0\0\0\0"), pg.message(pg.SYNC)])


@pytest.fixture
def server(pg: PgCluster) -> Iterator[RawClient]:
    client = RawClient(pg.port)
    client.login()
    yield client
    client.close()


def exchange(server: RawClient, data: bytes, synced: bool,
             readies: int) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
    """Send `data` (the proxy's messages and the client's), read `readies` ReadyForQuery; split the
    replies between the proxy (their types) and the client (the messages)."""
    server.send(data)
    replies = HandOverReplies(synced)
    ours: list[bytes] = []
    theirs: list[tuple[bytes, bytes]] = []
    for _ in range(readies):
        for msg_type, body in server.read_until(b"Z"):
            if replies.take(msg_type[0]):
                ours.append(msg_type)
            else:
                theirs.append((msg_type, body))
    assert replies.done
    return ours, theirs


def test_the_statement_after_a_hand_over_reads_the_answer_and_gets_its_own_replies(server: RawClient) -> None:
    handed = answer()
    messages = hand_over_messages(handed)
    assert messages is not None
    ours, theirs = exchange(server, messages + extended_batch(READ_IT), synced=False, readies=1)
    assert b"".join(ours) == b"312C33"
    assert [t for t, _ in theirs] == [b"1", b"2", b"D", b"C", b"Z"]  # what the batch alone gets
    assert handed in theirs[2][1]
    assert theirs[-1][1] == b"I"


def test_before_a_query_the_hand_over_has_a_sync_and_a_ready_for_query_of_its_own(server: RawClient) -> None:
    handed = answer()
    messages = hand_over_messages(handed)
    assert messages is not None
    query = pg.message(pg.QUERY, READ_IT.encode() + b"\0")
    ours, theirs = exchange(server, messages + pg.message(pg.SYNC) + query, synced=True, readies=2)
    assert b"".join(ours) == b"312C33Z"
    assert [t for t, _ in theirs] == [b"T", b"D", b"C", b"Z"]
    assert handed in theirs[1][1]


def failed_transaction(server: RawClient) -> None:
    server.send(pg.message(pg.QUERY, b"BEGIN; SELECT 1/0\0"))
    server.read_until(b"Z")


def test_a_hand_over_the_server_refuses_fails_the_statement_it_came_with(server: RawClient) -> None:
    """The server skips the client's messages after the proxy's error: the client gets the error and
    its Sync's ReadyForQuery, as if its own statement had failed (a cancel request racing the
    hand-over, say; here, a transaction already failed)."""
    failed_transaction(server)
    messages = hand_over_messages(answer())
    assert messages is not None
    ours, theirs = exchange(server, messages + extended_batch(READ_IT), synced=False, readies=1)
    assert b"".join(ours) == b"3"  # a Close runs in a failed transaction; the Parse does not
    assert [t for t, _ in theirs] == [b"E", b"Z"]
    assert pg.parse_fields(theirs[0][1])["C"] == "25P02"
    assert theirs[1][1] == b"E"


def test_a_refused_hand_over_with_its_own_sync_keeps_its_error_to_itself(server: RawClient) -> None:
    failed_transaction(server)
    messages = hand_over_messages(answer())
    assert messages is not None
    query = pg.message(pg.QUERY, b"ROLLBACK\0")
    ours, theirs = exchange(server, messages + pg.message(pg.SYNC) + query, synced=True, readies=2)
    assert b"".join(ours) == b"3EZ"
    assert [(t, b) for t, b in theirs] == [(b"C", b"ROLLBACK\0"), (b"Z", b"I")]


@pytest.mark.parametrize("bad", [b"it's", b"back\\slash", "é".encode(), b"nul\0"])
def test_what_a_string_constant_would_not_hold_as_it_is_is_not_handed_over(bad: bytes) -> None:
    assert hand_over_messages(b"{1,2}" + bad) is None


def test_replies_after_the_proxys_are_the_clients() -> None:
    replies = HandOverReplies(synced=False)
    taken = [replies.take(t) for t in b"N312C33"]  # a notice first: not a reply to a message
    assert taken == [False, True, True, True, True, True, True]
    assert replies.done
    assert not any(replies.take(t) for t in b"12CZ")
