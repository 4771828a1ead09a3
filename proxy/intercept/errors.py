"""The one error type of the interception: whatever goes wrong with a call (its SQL, its arguments, the
function itself) reaches the client as an ERROR with PostgreSQL's SQLSTATE for the case."""

from __future__ import annotations


class CallError(Exception):
    """`sqlstate`, `message` and `hint` as the client will see them."""

    def __init__(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.hint = hint


#: What a client's CancelRequest ends a statement with, as PostgreSQL words it.
CANCELLED = CallError("57014", "canceling statement due to user request")
