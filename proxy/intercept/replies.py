"""Watching the server's replies to a session's statements, while the proxy has something to change in
them: a call's error in place of the server's error at its marker (hook.py), the command tag of an
extension statement that ran as a DO block, a hint where the extension's objects are missing, the
ParameterDescription of a prepared statement without the proxy's extra parameters, the replies to the
proxy's own settings made before a statement (handover.py), dropped, and the positions in errors
moved back by the length of the proxy's text put in front of the client's.

The watcher counts the batches the server ends (ReadyForQuery): what it keeps is for one batch, and
goes with it; the server path (serverpath.py) is told of each end. Once nothing is kept, it stops
watching, and the replies go to the client as bytes again."""

from __future__ import annotations

import logging
import secrets
from collections import deque
from typing import Protocol

from .. import protocol as pg
from ..hooks import SessionControl
from ..messages import encode_parameter_description, parameter_description
from ..stats import STATS
from .errors import CallError
from .handover import InjectedReplies, shift_position

log = logging.getLogger("azure_local_ai_proxy.intercept")

_MISSING_EXTENSION_HINT = (
    "The server evaluates this call (an argument is a column or another value only the server knows, or the "
    "statement stores the expression): run CREATE EXTENSION azure_local_ai through azure-local-ai-proxy first.")


class BatchFollower(Protocol):
    """What the watcher tells the server path (serverpath.py), and asks it."""

    def cancelled_error(self, body: bytes) -> bytes | None:
        """The error the client gets in place of the server's, where the proxy cancelled the statement."""
        ...

    def batch_ended(self, answered: int, idle: bool) -> bool:
        """The server ended a batch, the `answered`th since the watching began (`idle`: outside a
        transaction): what was kept for the batches before goes. Whether work of its goes on."""
        ...


class ReplyWatcher:
    """One per session; see the module docstring."""

    def __init__(self) -> None:
        #: The server path, told of each batch's end; None where sessions get no mailbox.
        self.server: BatchFollower | None = None
        self.control: SessionControl | None = None
        self.watching = False
        #: The batches the server has ended since the watching began (counted from the requests sent).
        self.answered = 0
        # marker -> (batch, error), and the Describe statement requests awaiting their
        # ParameterDescription: (batch, extra parameters).
        self._markers: dict[bytes, tuple[int, bytes]] = {}
        self._describes: deque[tuple[int, int]] = deque()
        # (batch, statement) -> the CommandComplete the client sees (extension statements run as DO);
        # and the batches whose "no such schema/function azure_local_ai" error gets a hint.
        self._tags: dict[tuple[int, int], bytes] = {}
        self._completed = 0
        self._hinted: set[int] = set()
        #: The server's replies to the proxy's settings, to drop (handover.py).
        self.handing_over: InjectedReplies | None = None
        #: The length of the proxy's statement put in front of the Query under way, if any: the positions
        #: in its errors are moved back by it (handover.shift_position).
        self.shifted = 0

    def watch(self, control: SessionControl) -> None:
        self.control = control
        if not self.watching:  # count ReadyForQuery from here on, as the server's replies pass by
            self.answered = control.requests_sent - control.outstanding
            self.watching = True
            control.watch_server(self.on_server_message)

    def expect_failure(self, control: SessionControl, error: CallError, marker: str | None = None) -> str:
        """Register the marker whose server error is to be replaced by `error`."""
        STATS.error(error.sqlstate, "sql")
        marker = marker or f"azure_local_ai_proxy_error_{secrets.token_hex(8)}"
        replacement_error = pg.error_response(error.sqlstate, error.message, severity="ERROR", hint=error.hint)
        self._markers[marker.encode()] = (control.requests_sent, replacement_error)
        self.watch(control)
        return marker

    def retag(self, control: SessionControl, statement: int, tag: str) -> None:
        self._tags[(control.requests_sent, statement)] = pg.message(pg.COMMAND_COMPLETE, tag.encode() + b"\0")
        self.watch(control)

    def hint_missing_extension(self, control: SessionControl) -> None:
        self._hinted.add(control.requests_sent)
        self.watch(control)

    def expect_description(self, control: SessionControl, extra: int) -> None:
        """A Describe of a statement goes upstream: its ParameterDescription loses `extra` parameters."""
        self._describes.append((control.requests_sent, extra))
        self.watch(control)

    def on_server_message(self, msg_type: int, body: bytes) -> bytes | None:
        replies = self.handing_over
        if replies is not None:
            ours = replies.take(msg_type)
            if replies.done:
                self.handing_over = None
            if msg_type == pg.ERROR_RESPONSE:
                log.debug("an answer was not handed over", extra={"event": "hand_over_failed",
                                                                  "reason": pg.parse_fields(body).get("M")})
            if ours:
                return b""
        shifted = None  # the message with its position in the client's text, if the proxy's went before it
        if self.shifted and msg_type in (pg.ERROR_RESPONSE, pg.NOTICE_RESPONSE):
            body = shift_position(body, self.shifted)
            shifted = pg.message(msg_type, body)
        if msg_type == pg.COMMAND_COMPLETE:
            self._completed += 1
            return self._tags.pop((self.answered, self._completed - 1), None)
        if msg_type in (pg.ERROR_RESPONSE, pg.NOTICE_RESPONSE) and b"inline_code_block" in body and any(
            batch == self.answered for batch, _ in self._tags
        ):
            return _without_context(msg_type, body)  # the DO block an extension statement ran as
        if msg_type == pg.ERROR_RESPONSE:
            unanswered = self.server.cancelled_error(body) if self.server is not None else None
            if unanswered is not None:  # the proxy cancelled it: its service login cannot write the answer
                self._drop_describes_of_batch()
                return unanswered
            if self.answered in self._hinted:
                hinted = _with_missing_extension_hint(body)
                if hinted is not None:
                    return hinted
            for marker, (_, error) in list(self._markers.items()):
                if marker in body:
                    del self._markers[marker]
                    self._drop_describes_of_batch()
                    return error
            self._drop_describes_of_batch()
        elif msg_type == ord("t"):
            while self._describes and self._describes[0][0] < self.answered:
                self._describes.popleft()
            if self._describes:
                _, extra = self._describes.popleft()
                if extra:
                    types = parameter_description(body)
                    return pg.message(msg_type, encode_parameter_description(types[: len(types) - extra]))
        elif msg_type == pg.READY_FOR_QUERY:
            self.handing_over = None  # its replies all come before its batch's end
            self._ready(idle=body[:1] == b"I")
        return shifted

    def _ready(self, idle: bool) -> None:
        """A ReadyForQuery: what was kept for the batch it ends goes; `idle` (no transaction), the
        transaction's mailboxes too (the server path's)."""
        self.answered += 1
        self.shifted = 0
        self._completed = 0
        server_busy = self.server.batch_ended(self.answered, idle) if self.server is not None else False
        self._markers = {m: v for m, v in self._markers.items() if v[0] >= self.answered}
        self._tags = {k: v for k, v in self._tags.items() if k[0] >= self.answered}
        self._hinted = {b for b in self._hinted if b >= self.answered}
        while self._describes and self._describes[0][0] < self.answered:
            self._describes.popleft()
        busy = self._markers or self._describes or self._tags or self._hinted or server_busy
        if not busy and self.control is not None:
            self.watching = False
            self.control.stop_watching()

    def _drop_describes_of_batch(self) -> None:
        """After an error the server skips to the next Sync: Describes of this batch get no answer."""
        while self._describes and self._describes[0][0] <= self.answered:
            self._describes.popleft()


def _without_context(msg_type: int, body: bytes) -> bytes:
    """An error or notice without its CONTEXT field ("PL/pgSQL function inline_code_block ...")."""
    fields = [f for f in body.split(b"\0") if f and not f.startswith(b"W")]
    return pg.message(msg_type, b"\0".join(fields) + b"\0\0")


def _with_missing_extension_hint(body: bytes) -> bytes | None:
    """The server's error for an azure_local_ai call when the extension's objects are not there, with a
    hint that says what to do (its other fields, the position among them, as they came); None for any
    other error."""
    fields = pg.parse_fields(body)
    if fields.get("C") not in ("3F000", "42883") or "azure_local_ai" not in fields.get("M", "") or "H" in fields:
        return None
    return pg.message(pg.ERROR_RESPONSE, body[:-1] + b"H" + _MISSING_EXTENSION_HINT.encode() + b"\0\0")
