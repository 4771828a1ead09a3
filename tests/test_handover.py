"""Settings made in a statement's own transaction (proxy/intercept/handover.py): the messages and the
statement, sent straight to a real server ahead of a client's own, and which of the server's replies
are the proxy's."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from proxy import protocol as pg
from proxy.intercept.handover import (
    CLOSE_REPLIES,
    KEPT_SETTING,
    PREPARE_REPLIES,
    QUERY_REPLIES,
    RUN_REPLIES,
    SESSION_SETTING,
    InjectedReplies,
    close_before_bind,
    prefix_length,
    prepare_before_bind,
    query_with,
    run_before_bind,
    settings_sql,
    shift_position,
)
from proxy.intercept.render import real_array_text
from proxy.intercept.serverrequests import encode_answer, kept_key
from proxy.mailbox import Mailbox
from proxy.messages import Bind, Parse

from .pgcluster import PgCluster
from .rawclient import RawClient

READ_IT = f"SELECT current_setting('{KEPT_SETTING}', true), current_setting('{SESSION_SETTING}', true)"
MAILBOX = Mailbox.new()


def answer() -> bytes:
    vector = np.linspace(-1, 1, 384, dtype=np.float32)
    return encode_answer(MAILBOX, kept_key("multilingual-e5-small:v1", "a text"), "V", real_array_text(vector))


def settings(handed: bytes | None = None) -> str:
    sql = settings_sql(MAILBOX.setting, handed)
    assert sql is not None
    return sql


BIND_REPLIES = PREPARE_REPLIES + RUN_REPLIES


def before_bind(handed: bytes | None = None) -> bytes:
    """The proxy's messages before a client's Bind: its statement prepared, then run."""
    return prepare_before_bind() + run_before_bind(MAILBOX.setting, handed)


def extended_batch(sql: str) -> bytes:
    """A client's batch: its statement parsed, bound, run and synced."""
    return b"".join([pg.message(pg.PARSE, Parse("", sql, ()).encode()),
                     pg.message(pg.BIND, Bind("", "", (), (), ()).encode()),
                     pg.message(pg.EXECUTE, b"\0\0\0\0\0"), pg.message(pg.SYNC)])


def query(sql: str) -> bytes:
    return sql.encode() + b"\0"


@pytest.fixture
def server(pg: PgCluster) -> Iterator[RawClient]:
    client = RawClient(pg.port)
    client.login()
    yield client
    client.close()


def exchange(server: RawClient, data: bytes, expected: bytes,
             readies: int = 1) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
    """Send `data` (the proxy's and the client's), read `readies` ReadyForQuery; split the replies
    between the proxy (their types) and the client (the messages)."""
    server.send(data)
    replies = InjectedReplies(expected)
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


def then_unset(server: RawClient) -> None:
    """After the statement's transaction, nothing of it is left in the backend (a pooler's next client
    would find it there)."""
    server.send(pg.message(pg.QUERY, query(READ_IT)))
    rows = [body for msg_type, body in server.read_until(b"Z") if msg_type == b"D"]
    assert MAILBOX.secret.encode() not in rows[0] and b"{" not in rows[0]


def test_before_a_bind_the_settings_are_the_statements_and_only_its(server: RawClient) -> None:
    handed = answer()
    batch = before_bind(handed) + extended_batch(READ_IT)
    ours, theirs = exchange(server, batch, BIND_REPLIES)
    assert b"".join(ours) == BIND_REPLIES
    assert [t for t, _ in theirs] == [b"1", b"2", b"D", b"C", b"Z"]  # what the batch alone gets
    assert handed in theirs[2][1] and MAILBOX.setting.encode() in theirs[2][1]
    assert theirs[-1][1] == b"I"
    then_unset(server)


def test_before_a_query_the_settings_are_put_in_front_of_its_text(server: RawClient) -> None:
    handed = answer()
    body = query_with(settings(handed), query(READ_IT))
    ours, theirs = exchange(server, pg.message(pg.QUERY, body), QUERY_REPLIES)
    assert b"".join(ours) == QUERY_REPLIES
    assert [t for t, _ in theirs] == [b"T", b"D", b"C", b"Z"]  # what the query alone gets
    assert handed in theirs[1][1] and MAILBOX.setting.encode() in theirs[1][1]
    then_unset(server)


def test_in_a_transaction_the_settings_last_until_its_end(server: RawClient) -> None:
    server.send(pg.message(pg.QUERY, query("BEGIN")))
    server.read_until(b"Z")
    exchange(server, pg.message(pg.QUERY, query_with(settings(), query("SELECT 1"))), QUERY_REPLIES)
    _, theirs = exchange(server, pg.message(pg.QUERY, query(READ_IT)), b"")
    assert MAILBOX.setting.encode() in theirs[1][1]
    server.send(pg.message(pg.QUERY, query("COMMIT")))
    server.read_until(b"Z")
    then_unset(server)


def failed_transaction(server: RawClient) -> None:
    server.send(pg.message(pg.QUERY, b"BEGIN; SELECT 1/0\0"))
    server.read_until(b"Z")


def test_settings_the_server_refuses_fail_the_statement_they_came_with(server: RawClient) -> None:
    """The server skips the client's messages after the proxy's error: the client gets the error and
    its Sync's ReadyForQuery, as if its own statement had failed (a cancel request racing the
    settings, say; here, a transaction already failed)."""
    failed_transaction(server)
    ours, theirs = exchange(server, before_bind(answer()) + extended_batch(READ_IT), BIND_REPLIES)
    assert b"".join(ours) == b"3"  # a Close runs in a failed transaction; the Parse does not
    assert [t for t, _ in theirs] == [b"E", b"Z"]
    assert pg.parse_fields(theirs[0][1])["C"] == "25P02"
    assert theirs[1][1] == b"E"


def test_settings_put_in_front_of_a_refused_query_give_it_the_error(server: RawClient) -> None:
    failed_transaction(server)
    ours, theirs = exchange(server, pg.message(pg.QUERY, query_with(settings(), query("SELECT 2"))), QUERY_REPLIES)
    assert ours == []
    assert [t for t, _ in theirs] == [b"E", b"Z"]
    assert pg.parse_fields(theirs[0][1])["C"] == "25P02"


@pytest.mark.parametrize("bad", [b"it's", b"back\\slash", "é".encode(), b"nul\0"])
def test_what_a_string_constant_would_not_hold_as_it_is_is_not_handed_over(bad: bytes) -> None:
    assert settings_sql(MAILBOX.setting, b"{1,2}" + bad) is None
    assert settings_sql(MAILBOX.setting, None) == (
        f"SELECT pg_catalog.num_nulls(pg_catalog.set_config('{SESSION_SETTING}', '{MAILBOX.setting}', true))")


def test_replies_after_the_proxys_are_the_clients() -> None:
    replies = InjectedReplies(BIND_REPLIES)
    taken = [replies.take(t) for t in b"N312DC33"]  # a notice first: not a reply to a message
    assert taken == [False, True, True, True, True, True, True, True]
    assert replies.done
    assert not any(replies.take(t) for t in b"12DCZ")


def test_between_a_parse_that_opened_the_batch_and_its_bind(server: RawClient) -> None:
    """An unnamed statement's Parse and Bind come in one batch: the settings go between them. The
    reply to the client's Parse comes first and is the client's (the proxy's begin otherwise)."""
    handed = answer()
    batch = extended_batch(READ_IT)
    cut = len(pg.message(pg.PARSE, Parse("", READ_IT, ()).encode()))
    parse, rest = batch[:cut], batch[cut:]
    ours, theirs = exchange(server, parse + before_bind(handed) + rest, BIND_REPLIES)
    assert b"".join(ours) == BIND_REPLIES
    assert [t for t, _ in theirs] == [b"1", b"2", b"D", b"C", b"Z"]
    assert handed in theirs[2][1]
    then_unset(server)


def test_a_parse_that_fails_skips_the_settings_and_its_error_is_the_clients(server: RawClient) -> None:
    bad = pg.message(pg.PARSE, Parse("", "SELEC 1", ()).encode())
    rest = b"".join([pg.message(pg.BIND, Bind("", "", (), (), ()).encode()), pg.message(pg.EXECUTE, b"\0\0\0\0\0"),
                     pg.message(pg.SYNC)])
    ours, theirs = exchange(server, bad + before_bind(answer()) + rest, BIND_REPLIES)
    assert ours == []
    assert [t for t, _ in theirs] == [b"E", b"Z"]
    assert pg.parse_fields(theirs[0][1])["C"] == "42601"


def test_a_statement_prepared_for_an_answer_not_computed_is_closed(server: RawClient) -> None:
    ours, theirs = exchange(server, prepare_before_bind() + close_before_bind() + extended_batch(READ_IT),
                            PREPARE_REPLIES + CLOSE_REPLIES)
    assert b"".join(ours) == PREPARE_REPLIES + CLOSE_REPLIES
    assert [t for t, _ in theirs] == [b"1", b"2", b"D", b"C", b"Z"]
    then_unset(server)


def test_no_replies_are_awaited_after_an_error() -> None:
    """The proxy's statement is prepared while its answer is computed; an error that comes meanwhile
    (the client's Parse refused) makes the server skip what follows, so none of it is awaited."""
    replies = InjectedReplies(PREPARE_REPLIES)
    assert not replies.take(pg.ERROR_RESPONSE) and replies.done
    replies.then(RUN_REPLIES)
    assert replies.done and not replies.take(ord("3"))
    replies = InjectedReplies(PREPARE_REPLIES)
    replies.then(RUN_REPLIES)
    assert [replies.take(t) for t in b"312DC33Z"] == [True] * 7 + [False]


def test_an_errors_position_is_moved_back_to_the_clients_text(server: RawClient) -> None:
    """With the proxy's statement in front of a Query, the server's error points past it: moved back by
    its length, the position is the client's text's (what psql marks with its caret)."""
    sql = settings()
    client_text = "INSERT INTO no_such_table VALUES (1)"
    server.send(pg.message(pg.QUERY, query_with(sql, query(client_text))))
    (error,) = [body for msg_type, body in server.read_until(b"Z") if msg_type == b"E"]
    moved = pg.parse_fields(shift_position(error, prefix_length(sql)))
    assert client_text[int(moved["P"]) - 1:].startswith("no_such_table")
    assert shift_position(b"SERROR\0C42P01\0Mx\0\0", 5) == b"SERROR\0C42P01\0Mx\0\0"  # none to move
