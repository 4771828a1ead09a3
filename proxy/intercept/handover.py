"""An answer handed over with the statement that needs it (extension 1.2).

For a one-row INSERT into a table whose generated column embeds, the proxy computes the answer first
and sets it in the session (``azure_local_ai.proxy_kept``) with extended-protocol messages of its own,
sent on the session's connection just before the statement's; the function reads it there. Those
messages' replies are the proxy's: the client never sees them. Pure code over bytes: what to send,
and which replies are the proxy's.

Before a Bind, the messages open the batch that the client's Bind, Execute and Sync complete: the
server runs both in one go and flushes no reply between them, and the setting is made in the
statement's own transaction (rolled back with it). A ``SET`` of a placeholder setting, which needs no
privilege, fails only as any statement may (a cancel request racing it, the backend terminated): the
server then skips the client's messages up to its Sync, and the error is the client's statement's,
as it would have been had the cancel hit the statement. Before a Query, which the server would skip
without a reply after such an error, they end with a Sync of their own (sent by the caller, who
counts it), which keeps any error to them: the statement's function then asks for its answer."""

from __future__ import annotations

from .. import protocol as pg
from ..messages import Bind, Parse

SETTING = "azure_local_ai.proxy_kept"
#: The statement and portal of the proxy's messages: a name of its own, closed first in case a batch
#: of these was cut short, and after.
NAME = "azure_local_ai_proxy_hand_over"
#: The replies to hand_over_messages: CloseComplete, ParseComplete, BindComplete, CommandComplete, and
#: two CloseCompletes.
REPLIES = b"312C33"


def hand_over_messages(answer: bytes) -> bytes | None:
    """The messages that set `answer` (ASCII, as servercalls.encode_answer makes it) in the session;
    None for bytes a string constant would not hold as they are (they are not handed over)."""
    if not answer.isascii() or b"'" in answer or b"\\" in answer or b"\0" in answer:
        return None
    name = NAME.encode() + b"\0"
    sql = f"SET {SETTING} = '{answer.decode()}'"
    return b"".join([
        pg.message(pg.CLOSE, b"S" + name),
        pg.message(pg.PARSE, Parse(NAME, sql, ()).encode()),
        pg.message(pg.BIND, Bind(NAME, NAME, (), (), ()).encode()),
        pg.message(pg.EXECUTE, name + b"\0\0\0\0"),
        pg.message(pg.CLOSE, b"P" + name),
        pg.message(pg.CLOSE, b"S" + name),
    ])


class HandOverReplies:
    """The server's replies to hand_over_messages, in order: `take` says of each reply whether it is
    the proxy's (to drop). `synced`: the messages were followed by a Sync of the proxy's."""

    def __init__(self, synced: bool) -> None:
        self.synced = synced
        self._expected = REPLIES + (b"Z" if synced else b"")
        self._seen = 0

    @property
    def done(self) -> bool:
        """Whether every reply of the proxy's has come (later ones are the client's)."""
        return self._seen == len(self._expected)

    def take(self, msg_type: int) -> bool:
        """Whether this reply, the next of the session's, is the proxy's."""
        if self.done:
            return False
        if msg_type == pg.ERROR_RESPONSE:
            if not self.synced:  # the server skips to the client's Sync: the error is the statement's
                self._seen = len(self._expected)
                return False
            self._seen = len(self._expected) - 1  # then only the proxy's ReadyForQuery
            return True
        if msg_type != self._expected[self._seen]:  # a notice, say: not a reply to a message
            return False
        self._seen += 1
        return True
