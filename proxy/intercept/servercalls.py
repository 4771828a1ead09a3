"""The proxy's side of the calls the server evaluates (the extension's SQL functions, extension.py):
a request arrives as a NoticeResponse on the session's own connection (taken out of the stream, so
the client never sees it), the proxy runs the function as it runs a call it reads in a statement,
and writes the answer into the session's mailbox through its service connection (service.py), where
the waiting function reads it.

Only this session's server backend is told its mailbox and the secret its answers are signed with
(a start-up parameter the proxy adds), and only the roles the session calls as may open it: another
session cannot forge an answer the function would accept, and another role cannot read one."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .. import protocol as pg
from ..mailbox import Mailbox
from ..service import ServiceConnections, ServiceUnavailable
from ..stats import STATS
from .errors import CallError
from .evaluate import as_text, run
from .functions import Backend
from .signatures import PRIVILEGED

log = logging.getLogger("azure_local_ai_proxy.servercalls")

REQUEST_CODE = "AL001"
REQUEST_MESSAGE = "azure-local-ai-proxy request"
#: What a waiting function sends once a second, so that its backend learns when the client is gone.
WAITING_CODE = "AL002"
_REQUEST_ID = re.compile(r"[0-9a-f]{32}")
_MAX_PLACE = 1 << 40  # large objects end at 4 TB


@dataclass(frozen=True)
class Request:
    id: str
    at: int  # where in the mailbox its answer goes
    function: str
    args: dict[str, object]
    role: str


def parse_request(body: bytes) -> Request | bool:
    """The request a NoticeResponse carries; True for a waiting function's keep-alive, False for any
    other notice (the client's)."""
    if b"CAL00" not in body:
        return False
    fields = pg.parse_fields(body)
    if fields.get("C") == WAITING_CODE:
        return True
    if fields.get("C") != REQUEST_CODE or fields.get("M") != REQUEST_MESSAGE:
        return False
    try:
        data = json.loads(fields.get("D", ""))
        request = Request(str(data["id"]), int(data["at"]), str(data["fn"]), dict(data["args"]), str(data["role"]))
    except (ValueError, KeyError, TypeError):
        return False
    return request if _REQUEST_ID.fullmatch(request.id) and 0 <= request.at < _MAX_PLACE else False


def encode_answer(mailbox: Mailbox, request_id: str, status: str, text: str) -> bytes:
    """What the function reads: the request's id, V (value), N (NULL) or E (error, as JSON), the
    payload's length in bytes, an MD5 over the session's secret, those and the payload; then the payload."""
    payload = text.encode()
    head = f"{request_id}{status}{len(payload):010d}"
    mac = hashlib.md5((mailbox.secret + head).encode() + payload, usedforsecurity=False).hexdigest()
    return (head + mac).encode() + payload


class ServerCalls:
    """One per session (with a mailbox): answers its backend's requests, one at a time as they come.
    The mailbox is made at a statement's first request and dropped at its end."""

    def __init__(
        self, login: str, database: str, mailbox: Mailbox, backend: Backend, service: ServiceConnections,
        cancel_statement: Callable[[], Awaitable[None]],
    ) -> None:
        self.login = login
        self.database = database
        self.mailbox = mailbox
        self.backend = backend
        self.service = service
        self._cancel_statement = cancel_statement
        self._granted: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # answers being worked out
        self._closing: set[asyncio.Task[None]] = set()  # mailboxes being dropped

    def notice(self, body: bytes) -> bool:
        """A NoticeResponse from the server: True if it was a request (the client must not see it)."""
        request = parse_request(body)
        if isinstance(request, bool):
            return request
        task = asyncio.get_running_loop().create_task(self._answer(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _answer(self, request: Request) -> None:
        try:
            status, text = await self._evaluate(request)
        except CallError as error:
            STATS.error(error.sqlstate, "server")
            status, text = "E", json.dumps({"code": error.sqlstate, "message": error.message, "hint": error.hint})
        except Exception:
            log.exception("a server call failed", extra={"event": "server_call_error", "function": request.function})
            STATS.error("XX000", "server")
            status, text = "E", json.dumps({"code": "XX000", "message": "internal error in azure-local-ai-proxy"})
        try:
            # Once begun, a delivery runs to its end even if the statement ends meanwhile (statement_done):
            # cutting a service query short would leave its connection in doubt.
            await asyncio.shield(self._deliver(request, status, text))
        except ServiceUnavailable as exc:
            # The function would wait for an answer that cannot come: stop its statement instead.
            log.error("a server call could not be answered", extra={"event": "server_call_failed",
                                                                    "reason": str(exc)})
            await self._cancel_statement()

    async def _evaluate(self, request: Request) -> tuple[str, str]:
        if request.function in PRIVILEGED and not await self.service.may_manage(
            self.database, self.login, request.role
        ):
            raise CallError("42501", f"permission denied for function azure_local_ai.{request.function}")
        args = dict(request.args)
        ids_count = args.pop("ids_count", None)
        result = await run(request.function, args, self.backend, ids_count if isinstance(ids_count, int) else None,
                           origin="server")
        text = await asyncio.to_thread(as_text, result) if result.sql_type == "rows" else as_text(result)
        return ("N", "") if text is None else ("V", text)

    async def _deliver(self, request: Request, status: str, text: str) -> None:
        answer = encode_answer(self.mailbox, request.id, status, text)
        # Marked before the service connection answers: the function may read the answer, and the
        # statement end, before that reply reaches the proxy; its removal then waits for the making.
        if not self._granted:
            self._granted.add(request.role)
            await self.service.open_mailbox(self.database, self.mailbox.oid, request.role, request.at, answer)
            return
        if request.role not in self._granted:
            self._granted.add(request.role)
            await self.service.grant(self.database, self.mailbox.oid, request.role)
        await self.service.write(self.database, self.mailbox.oid, request.at, answer)

    @property
    def open(self) -> bool:
        """Whether the mailbox exists (from the first request of a statement to the statement's end)."""
        return bool(self._granted)

    def statement_done(self) -> None:
        """The server finished the statement (ReadyForQuery): no function waits any more, so drop
        the mailbox, and any answer still being worked out for a call that was cancelled."""
        for task in list(self._tasks):
            task.cancel()
        if self._granted:
            self._granted.clear()
            task = asyncio.get_running_loop().create_task(self.service.close_mailbox(self.database, self.mailbox.oid))
            self._closing.add(task)  # not cancelled by a later statement's end: the next one makes it anew
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._granted:
            await self.service.close_mailbox(self.database, self.mailbox.oid)
