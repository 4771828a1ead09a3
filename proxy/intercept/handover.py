"""Settings the proxy makes in a statement's own transaction, just before the statement, on the
session's connection: the transaction's mailbox (``azure_local_ai.proxy_session``, extension 1.4),
an answer handed over with a one-row INSERT (``azure_local_ai.proxy_kept``, 1.2), azure.extensions
(azuresettings.py). Pure code over bytes: what to send, and which of the server's replies are the
proxy's (the client never sees them).

Each is made with ``set_config(..., true)``, for the transaction only: behind a transaction pooler the
backend serves other clients after it, and nothing of this session may be left there. So it must be
made in the statement's own transaction, without a Sync of its own:

* before a Bind, as extended-protocol messages that open the batch the client's Bind, Execute and Sync
  complete (the server runs them in one go, in one implicit transaction, and flushes no reply between);
* before a Query, as a statement put in front of the client's text (a multi-statement Query is one
  implicit transaction).

A ``SELECT set_config`` of a placeholder setting needs no privilege and fails only as any statement
may (a cancel request racing it, a transaction already failed, the backend terminated): the server
then skips the client's statement up to its Sync (or the rest of its Query), and the error is the
client's statement's, as it would have been had the cancel hit the statement."""

from __future__ import annotations

from .. import protocol as pg
from ..messages import Bind, Parse

SESSION_SETTING = "azure_local_ai.proxy_session"
KEPT_SETTING = "azure_local_ai.proxy_kept"
#: The statement and portal of the proxy's messages: a name of its own, closed first in case a batch
#: of these was cut short, and after.
NAME = "azure_local_ai_proxy_hand_over"
_NAME = NAME.encode() + b"\0"
#: The proxy's statement before a Bind, its values bound: nothing of them is parsed as SQL. Its row
#: is one small number (num_nulls), not the values set_config echoes: an answer is ~5 kB.
BIND_SQL = (f"SELECT pg_catalog.num_nulls(pg_catalog.set_config('{SESSION_SETTING}', $1, true), "
            f"pg_catalog.set_config('{KEPT_SETTING}', $2, true))")
#: The replies to prepare_before_bind: CloseComplete, ParseComplete; to run_before_bind: BindComplete,
#: the row and CommandComplete, and two CloseCompletes; to close_before_bind: CloseComplete.
PREPARE_REPLIES = b"31"
RUN_REPLIES = b"2DC33"
CLOSE_REPLIES = b"3"
#: The replies to the statement query_with put first: RowDescription, the row, CommandComplete.
QUERY_REPLIES = b"TDC"


def _constant(value: str) -> str | None:
    """`value` as a string constant, or None where a constant would not hold it as it is."""
    if not value.isascii() or "'" in value or "\\" in value or "\0" in value:
        return None
    return f"'{value}'"


def settings_sql(session: str, answer: bytes | None = None) -> str | None:
    """The statement that sets the transaction's mailbox `session` ("OID SECRET") and, if given, the
    `answer` (ASCII, as servercalls.encode_answer makes it) handed over; None where the answer holds
    bytes a string constant would not hold as they are (it is not handed over)."""
    values = [(SESSION_SETTING, session)]
    if answer is not None:
        if not answer.isascii():
            return None
        values.append((KEPT_SETTING, answer.decode()))
    constants = [(name, _constant(value)) for name, value in values]
    if any(constant is None for _, constant in constants):
        return None
    calls = ", ".join(f"pg_catalog.set_config('{name}', {constant}, true)" for name, constant in constants)
    return f"SELECT pg_catalog.num_nulls({calls})"  # a small row, as BIND_SQL's


def prepare_before_bind() -> bytes:
    """Messages that prepare the proxy's statement in the batch a Bind opens, before its answer is
    computed: the server parses it meanwhile. Then run_before_bind (or close_before_bind)."""
    return b"".join([
        pg.message(pg.CLOSE, b"S" + _NAME),
        pg.message(pg.PARSE, Parse(NAME, BIND_SQL, ()).encode()),
    ])


def run_before_bind(session: str, answer: bytes | None) -> bytes:
    """Messages that run the prepared statement with the transaction's mailbox `session` and the
    `answer` handed over (none: an empty one, which no call reads), then close it."""
    values = (session.encode(), answer if answer is not None else b"")
    return b"".join([
        pg.message(pg.BIND, Bind(NAME, NAME, (), values, ()).encode()),
        pg.message(pg.EXECUTE, _NAME + b"\0\0\0\0"),
        pg.message(pg.CLOSE, b"P" + _NAME),
        pg.message(pg.CLOSE, b"S" + _NAME),
    ])


def close_before_bind() -> bytes:
    """The message that closes the prepared statement where it is not run (its answer could not be
    computed, or a cancel request stopped it)."""
    return pg.message(pg.CLOSE, b"S" + _NAME)


def query_with(sql: str, query_body: bytes) -> bytes:
    """A Query's body with `sql` (one row, a statement of the proxy's) put in front of its text: its
    `prefix_length(sql)` characters come before the client's text."""
    return sql.encode() + b"; " + query_body


def prefix_length(sql: str) -> int:
    return len(sql) + 2


def shift_position(body: bytes, shift: int) -> bytes:
    """An ErrorResponse's or NoticeResponse's body with its position in the query (P, in characters)
    moved back by `shift`: the client's text, not the text the server ran with the proxy's in front."""
    fields = body.split(b"\0")
    for i, field in enumerate(fields):
        if field[:1] == b"P" and field[1:].isdigit() and int(field[1:]) > shift:
            fields[i] = b"P" + str(int(field[1:]) - shift).encode()
    return b"\0".join(fields)


class InjectedReplies:
    """The server's replies to the proxy's messages, in order (`expected`: their types, and more of them
    given by `then`): `take` says of each reply whether it is the proxy's (to drop)."""

    def __init__(self, expected: bytes) -> None:
        self._expected = expected
        self._seen = 0
        self._failed = False

    @property
    def done(self) -> bool:
        """Whether every reply of the proxy's has come (later ones are the client's)."""
        return self._seen == len(self._expected)

    def then(self, more: bytes) -> None:
        """The replies to messages the proxy sent after, unless an error came first (the server skips
        them)."""
        if not self._failed:
            self._expected += more

    def take(self, msg_type: int) -> bool:
        """Whether this reply, the next of the session's, is the proxy's."""
        if self.done:
            return False
        if msg_type == pg.ERROR_RESPONSE:  # the server skips the client's statement: the error is its
            self._seen = len(self._expected)
            self._failed = True
            return False
        if msg_type != self._expected[self._seen]:  # a notice, say: not a reply to a message
            return False
        self._seen += 1
        return True
