"""The proxy's side of the calls the server evaluates (the extension's SQL functions, extension.py):
a request arrives as a NoticeResponse on the session's own connection (taken out of the stream, so
the client never sees it), the proxy runs the function as it runs a call it reads in a statement,
and writes the answer into the session's mailbox through its service connection (service.py), where
the waiting function reads it. Answers a look-ahead computes are written there before they are asked
for, where the function looks first (kept_place), so that most rows of a back-fill ask nothing.

A mailbox belongs to a transaction (extension 1.4): its OID and the secret its answers are signed
with are set in the transaction only, by the proxy with a statement it has answers ready for
(handover.py), or else by the first call that asks, which picks them and sends them with its request.
Only the server backend and the proxy know the secret (a request is a notice, which goes to the
backend's client alone), and only the roles the session calls as may open the mailbox: another
session cannot forge an answer the function would accept, and another role cannot read one. Behind a
transaction pooler, where a backend serves one client's transaction and then another's, nothing of a
transaction's mailbox is left in the backend for the next: the mailbox goes when the transaction ends.

The formats of requests and answers are serverrequests.py's, the mailboxes' making and writing
mailboxes.py's, and the look-aheads' reading readahead.py's."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from functools import partial

import numpy as np

from .. import protocol as pg
from ..service import ServiceConnections, ServiceLoginFailed, ServiceUnavailable
from ..stats import STATS
from ..tasks import retrieve, shielded
from .embeddingtables import EmbeddingTables
from .errors import CANCELLED, CallError
from .evaluate import as_text, run
from .functions import Backend
from .mailboxes import Box, Mailboxes
from .readahead import ReadAhead
from .render import real_array_text
from .serverrequests import (
    Request,
    encode_answer,
    kept_answers,
    kept_key,
    parse_request,
    server_evaluated_privileged,
    unanswerable,
)
from .signatures import PRIVILEGED
from .vectors import LOOKAHEAD_CHUNK

log = logging.getLogger("azure_local_ai_proxy.servercalls")


class ServerCalls:
    """One per session: answers its backend's requests, one at a time as they come, and writes the
    answers a look-ahead computes into the transaction's mailbox ahead of their requests. A mailbox is
    made at its first use (a request, answers kept ahead) and dropped when its transaction ends."""

    def __init__(
        self, login: str, database: str, backend_pid: int, backend: Backend,
        service: ServiceConnections, cancel_statement: Callable[[], Awaitable[None]],
        tables: EmbeddingTables,
    ) -> None:
        self.login = login
        self.database = database
        self.backend = backend
        self.service = service
        #: The tables whose generated columns embed, as learnt from this proxy's sessions' requests.
        self.tables = tables
        self._role = login  # the role of the session's latest request: what its functions run as, likely
        self._cancel_statement = cancel_statement
        #: Why the proxy cancelled the running statement, if it did because its answer could not be
        #: written: the client gets this error instead of the cancel's (cancelled_error).
        self._unanswered: CallError | None = None
        self.mailboxes = Mailboxes(service, database, backend_pid)
        self._tasks: set[asyncio.Task[None]] = set()  # answers being worked out
        self._working: set[asyncio.Future[tuple[str, str]]] = set()  # their outcomes, which cancel() stops
        self._cancelled = False  # a client's CancelRequest came during this statement
        #: The request's advisory lock, and taking it (_hold).
        self._holding: tuple[int, asyncio.Future[bool]] | None = None
        self.ahead = ReadAhead(login, database, backend, service, self._keep_ahead)
        self.asked_in_statement = 0
        self._statement = 0  # statements ended: what is kept ahead goes into its own statement's mailbox
        self._kept_role: str | None = None  # the statement's function reads answers kept ahead, as this role
        #: Computed before the statement's first request said whether its function reads them.
        self._unkept: list[tuple[str, list[str], list[np.ndarray]]] = []

    def notice(self, body: bytes) -> bool:
        """A NoticeResponse from the server: True if it was a request (the client must not see it)."""
        request = parse_request(body)
        if isinstance(request, bool):
            return request
        box = self.mailboxes.box_of(request)
        if box is None:
            log.warning("a request naming a mailbox that is not its session's was not answered",
                        extra={"event": "server_call_refused", "function": request.function})
            return True
        self.mailboxes.current = box
        self.ahead.asked()
        self.asked_in_statement += 1
        self._role = request.role
        if request.reads_kept and self._kept_role is None:
            self._kept_role = request.role
            unkept, self._unkept = self._unkept, []
            for model_uri, texts, vectors in unkept:
                self._keep_ahead(model_uri, texts, vectors)
        task = asyncio.get_running_loop().create_task(self._answer(request, box))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _answer(self, request: Request, box: Box) -> None:
        working = asyncio.ensure_future(self._outcome(request))
        self._working.add(working)
        try:
            await asyncio.sleep(0)  # an answer at hand (a kept vector, a setting) goes at once
            if not working.done():
                await self._hold(request, box)
            await asyncio.wait([working])
            status, text = _refusal(CANCELLED) if working.cancelled() else working.result()
        finally:
            working.cancel()
            self._working.discard(working)
        # Once begun, a delivery runs to its end even if the statement ends meanwhile (statement_done):
        # cutting a service query short would leave its connection in doubt.
        await shielded(self._deliver_or_cancel(request, box, status, text, self._statement))

    async def _outcome(self, request: Request) -> tuple[str, str]:
        if self._cancelled:
            return _refusal(CANCELLED)
        try:
            return await self._evaluate(request)
        except CallError as error:
            return _refusal(error)
        except Exception:
            log.exception("a server call failed", extra={"event": "server_call_error", "function": request.function})
            STATS.error("XX000", "server")
            return "E", json.dumps({"code": "XX000", "message": "internal error in azure-local-ai-proxy"})

    async def _hold(self, request: Request, box: Box) -> None:
        """While the answer is worked out: take the request's advisory lock (the waiting function sleeps
        on it, rather than polling, and wakes as the answer is written), and make the statement's
        mailbox if it has none yet, so that only the write is left once the answer is there. Never
        cut short: the lock is always known to be held or not."""
        if self._holding is None:
            key = box.mailbox.request_lock_key(request.id) if request.keyed else box.mailbox.lock_key
            taking = asyncio.ensure_future(self.service.try_lock(self.database, key))
            taking.add_done_callback(retrieve)
            self._holding = key, taking
        if not box.granted:  # the answer's delivery, queued behind the making, only writes
            self.mailboxes.track(self.mailboxes.make(box, request.role))
        await asyncio.wait([self._holding[1]])

    def _held(self) -> int | None:
        """The lock held (to be let go of with the next answer), if any; forgets it."""
        holding, self._holding = self._holding, None
        if holding is None:
            return None
        key, taking = holding
        held = taking.done() and not taking.cancelled() and taking.exception() is None and taking.result()
        return key if held else None

    async def _deliver_or_cancel(self, request: Request, box: Box, status: str, text: str, statement: int) -> None:
        """Deliver the answer to a request of the statement numbered `statement`; if it cannot be
        written, cancel that statement (never a later one), saying why where the cause is known."""
        try:
            await self._deliver(request, box, status, text)
        except ServiceUnavailable as exc:
            # The function would wait for an answer that cannot come: stop its statement instead.
            log.error("a server call could not be answered", extra={"event": "server_call_failed",
                                                                    "reason": str(exc)})
            if statement != self._statement:
                return  # it ended meanwhile: a cancel would stop the session's next statement
            if isinstance(exc, ServiceLoginFailed):
                self._unanswered = unanswerable(request.function, exc)
                STATS.error(self._unanswered.sqlstate, "server")
            try:
                await self._cancel_statement()
            except Exception as cancel_failed:  # the server is out of reach too: the session will notice
                log.warning("a statement could not be cancelled", extra={"event": "cancel_failed",
                                                                          "reason": str(cancel_failed)})

    def cancel(self) -> None:
        """A client's CancelRequest while the statement runs. The server cancels it, except where the
        signal lands as the function's wait for its answer times out (lock_timeout): PostgreSQL then
        reports the lock's timeout, which the wait takes as a turn of its loop, and the cancel is lost.
        So the answers being worked out, and those asked for until the statement ends, are the cancel's
        error: the statement ends with 57014 either way."""
        self._cancelled = True
        for working in self._working:
            working.cancel()

    def cancelled_error(self, body: bytes) -> bytes | None:
        """What the client gets instead of the server's ErrorResponse `body`: where it is the cancel of a
        statement whose answer the service login could not write, that cause and what to set; None
        for any other error."""
        error = self._unanswered
        if error is None or pg.parse_fields(body).get("C") != "57014":
            return None
        self._unanswered = None
        return pg.error_response(error.sqlstate, error.message, severity="ERROR", hint=error.hint)

    async def _evaluate(self, request: Request) -> tuple[str, str]:
        if request.function in PRIVILEGED:
            # Any code in the session can raise a notice shaped like a request, naming any role: who
            # asks cannot be told here, so what changes settings and models is never taken from one.
            raise server_evaluated_privileged(request.function)
        args = dict(request.args)
        ids_count = args.pop("ids_count", None)
        result = await run(request.function, args, self.backend, ids_count if isinstance(ids_count, int) else None,
                           origin="server")
        text = await asyncio.to_thread(as_text, result) if result.sql_type == "rows" else as_text(result)
        return ("N", "") if text is None else ("V", text)

    async def _deliver(self, request: Request, box: Box, status: str, text: str) -> None:
        answer = encode_answer(box.mailbox, request.id, status, text)
        unlock = self._held()  # let go in the same round trip
        try:
            # Marked before the service connection answers: the function may read the answer, and the
            # statement end, before that reply reaches the proxy; its removal then waits for the making.
            if not box.granted:
                await self.mailboxes.make(box, request.role, request.at, answer, unlock)
                return
            if request.role not in box.granted:
                box.granted.add(request.role)
                await self.mailboxes.into(box, partial(self.service.grant, self.database, box.mailbox.oid,
                                                       request.role))
            await self.mailboxes.into(box, partial(self.service.write, self.database, box.mailbox.oid, request.at,
                                                   answer, unlock))
        except ServiceUnavailable:
            if unlock is not None:  # the write, and the unlock with it, did not happen: the lock is still held
                await self.service.unlock(self.database, unlock)
            raise

    def _keep_ahead(self, model_uri: str, texts: list[str], vectors: list[np.ndarray]) -> None:
        """Texts a look-ahead has computed: their answers go into the mailbox before they are asked
        for, if the statement's function reads them there."""
        current = self.mailboxes.current
        if self._kept_role is not None and current is not None:
            # A chunk per write: the writer connection serves every session's answers meanwhile.
            for i in range(0, len(texts), LOOKAHEAD_CHUNK):
                chunk = slice(i, i + LOOKAHEAD_CHUNK)
                self.mailboxes.track(self._write_ahead(self._statement, current, self._kept_role, model_uri,
                                                       texts[chunk], vectors[chunk]))
        elif not self.asked_in_statement:
            self._unkept.append((model_uri, texts, vectors))

    async def _write_ahead(self, statement: int, box: Box, role: str, model_uri: str, texts: list[str],
                           vectors: list[np.ndarray]) -> None:
        answers = await asyncio.to_thread(kept_answers, box.mailbox, model_uri, texts, vectors)
        if statement != self._statement or not answers:
            return  # its statement is over, or none fits a place
        if not box.granted:
            self.mailboxes.track(self.mailboxes.make(box, role))
        try:
            await self.mailboxes.into(box, partial(self.service.write_many, self.database, box.mailbox.oid,
                                                   list(answers), list(answers.values())))
        except ServiceUnavailable as exc:  # only time is lost: each is asked for instead
            log.debug("answers were not kept ahead", extra={"event": "keep_ahead_failed", "reason": str(exc)})
            return
        self.ahead.kept(len(answers))
        STATS.calls[("create_embeddings", "ahead")] += len(answers)

    def learn_table(self, table: str) -> asyncio.Task[None] | None:
        """The server asked during a one-row INSERT or a COPY into `table` that named no azure_local_ai
        function: its generated columns embed. Known, the table's next one-row INSERTs are answered
        before they run (keep_before), and the rows of its next COPYs computed ahead
        (ReadAhead.copy_ahead), if this database's functions read answers kept ahead. Returns the
        look-up under way, if any."""
        if self._kept_role is not None and self.tables.get(self.database, self.login, table) is None:
            return self.tables.learn(self.database, self.login, table)
        return None

    async def keep_before(self, inputs: list[tuple[str, str]]) -> None:
        """Compute the (model, text) inputs a statement about to run will ask for, and keep their answers
        in its transaction's mailbox (Mailboxes.statement_mailbox, which the caller sets in the statement's
        transaction), so that its function finds them there and asks nothing. Only time is at stake:
        what fails here is asked for, and answered or refused, as the statement runs."""
        self.mailboxes.statement_mailbox()
        box = self.mailboxes.current
        assert box is not None
        by_model: dict[str, list[str]] = {}
        for model_uri, text in inputs:
            by_model.setdefault(model_uri, []).append(text)
        try:
            for model_uri, texts in by_model.items():
                vectors = await self.backend.create_embeddings(model_uri, texts, None, 0)
                answers = list(kept_answers(box.mailbox, model_uri, texts, vectors).items())  # type: ignore[arg-type]
                if answers and not box.granted:  # made with the first answer: one round trip
                    (place, first), answers = answers[0], answers[1:]
                    await self.mailboxes.make(box, self._role, place, first)
                    STATS.calls[("create_embeddings", "ahead")] += 1
                if answers:
                    await self.mailboxes.into(box, partial(self.service.write_many, self.database, box.mailbox.oid,
                                                          [p for p, _ in answers], [a for _, a in answers]))
                    STATS.calls[("create_embeddings", "ahead")] += len(answers)
        except (CallError, ServiceUnavailable) as exc:
            log.debug("answers were not kept before a statement", extra={"event": "keep_before_failed",
                                                                          "reason": str(exc)})

    async def handed_answer(self, model_uri: str, text: str) -> bytes | None:
        """The answer to hand over with a statement about to run, signed as the mailbox's are (version
        1.2: create_embeddings of one text reads it); None where it cannot be computed now (the
        statement's function asks, and gets the error)."""
        key = kept_key(model_uri, text)
        if key is None:
            return None
        try:
            (vector,) = await self.backend.create_embeddings(model_uri, [text], None, 0)
        except CallError as exc:
            log.debug("no answer was handed over", extra={"event": "hand_over_failed", "reason": exc.message})
            return None
        STATS.calls[("create_embeddings", "ahead")] += 1
        return encode_answer(self.mailboxes.statement_mailbox(), key, "V", real_array_text(vector))  # type: ignore[arg-type]

    def statement_done(self, idle: bool) -> None:
        """The server finished the statement (ReadyForQuery): no function waits any more, so drop any
        answer still being worked out for a call that was cancelled; and, `idle`, outside a transaction,
        the transaction's mailboxes."""
        self._statement += 1
        self.asked_in_statement = 0
        self._unanswered = None
        self._cancelled = False
        self._kept_role = None
        self._unkept.clear()
        self.ahead.statement_done()
        for task in list(self._tasks):
            task.cancel()
        if self._holding is not None:  # a call cut short: its lock goes now, or once it is taken
            self.mailboxes.track(self._let_go(*self._holding))
            self._holding = None
        if idle:
            self.mailboxes.drop()
            self._role = self.login  # behind a pooler, the next transaction may be another client's

    async def _let_go(self, key: int, holding: asyncio.Future[bool]) -> None:
        await asyncio.wait([holding])
        if not holding.cancelled() and holding.exception() is None and holding.result():
            await self.service.unlock(self.database, key)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._holding is not None:
            self.mailboxes.track(self._let_go(*self._holding))
            self._holding = None
        await self.mailboxes.close()


def _refusal(error: CallError) -> tuple[str, str]:
    """The answer that makes the waiting function raise `error`."""
    STATS.error(error.sqlstate, "server")
    return "E", json.dumps({"code": error.sqlstate, "message": error.message, "hint": error.hint})
