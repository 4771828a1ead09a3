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
transaction's mailbox is left in the backend for the next: the mailbox goes when the transaction ends."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from .. import protocol as pg
from ..mailbox import Mailbox
from ..service import LookaheadRefused, ServiceConnections, ServiceLoginFailed, ServiceUnavailable
from ..stats import STATS
from ..tasks import retrieve, shielded
from .embeddingtables import EmbeddingTables
from .errors import CallError
from .evaluate import as_text, run
from .functions import LOOKAHEAD_CHUNK, Backend
from .lookahead import Lookahead, generated_lookaheads, written_tables
from .render import real_array_text
from .signatures import PRIVILEGED

log = logging.getLogger("azure_local_ai_proxy.servercalls")

REQUEST_CODE = "AL001"
REQUEST_MESSAGE = "azure-local-ai-proxy request"
#: What a waiting function sends once a second, so that its backend learns when the client is gone.
WAITING_CODE = "AL002"
_REQUEST_ID = re.compile(r"[0-9a-f]{32}")
_MAX_PLACE = 1 << 40  # large objects end at 4 TB
#: Cache bytes a looked-ahead text is reckoned to take (its vector, the text, the bookkeeping): a
#: look-ahead keeps no more texts ahead than half the cache holds, so that they are there when asked.
_LOOKAHEAD_ROW_BYTES = 2048
#: Texts a look-ahead reads at a time, and how far ahead of the server's requests it may run.
_LOOKAHEAD_PAGE = 4096
#: Answers kept ahead (sql/azure_local_ai--1.0--1.1.sql): the mailbox's first 4,096 places of 16 kB,
#: chosen by the first 12 bits of the answer's key, the MD5 of the model and the text. A later answer
#: takes the place of an earlier one (read by then, most likely: else its request asks).
KEPT_SLOT = 1 << 14
#: Mailboxes of one transaction at most (a new one comes with each rollback to a savepoint that undid
#: the setting; any code in a session could name new ones in forged requests, each a write of the proxy's).
MAX_MAILBOXES = 64


@dataclass(frozen=True)
class Request:
    id: str
    at: int  # where in the mailbox its answer goes
    function: str
    args: dict[str, object]
    role: str
    reads_kept: bool = False  # the function looks for answers kept ahead before it asks (version 1.1)
    keyed: bool = False  # the function waits on a lock of this request's own (version 1.3)
    mailbox: Mailbox | None = None  # the transaction's mailbox, as the function was told or chose it (1.4)
    backend_pid: int | None = None  # the server backend that asks (1.4)


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
        mailbox = Mailbox.parse(f"{data['box']} {data['secret']}") if "box" in data else None
        request = Request(str(data["id"]), int(data["at"]), str(data["fn"]), dict(data["args"]), str(data["role"]),
                          data.get("kept") is True, data.get("keyed") is True, mailbox,
                          int(data["pid"]) if "pid" in data else None)
    except (ValueError, KeyError, TypeError):
        return False
    return request if _REQUEST_ID.fullmatch(request.id) and 0 <= request.at < _MAX_PLACE else False


def server_evaluated_privileged(function: str) -> CallError:
    """The error of a function that changes settings or models, evaluated by the server."""
    return CallError(
        "0A000", f"azure_local_ai.{function} cannot be evaluated by the server through azure-local-ai-proxy",
        f"Call azure_local_ai.{function} with constant arguments or bind parameters, in a statement the client "
        "sends (for example SELECT azure_local_ai.set_setting('intra_op_parallelism', '2')): the proxy checks "
        "the caller's rights there. Not inside a function, a DO block, a trigger or a view.")


def unanswerable(function: str, failed: ServiceLoginFailed) -> CallError:
    """The error of a call whose answer cannot be written, its service login refused or out of reach:
    what the statement the proxy cancels fails with, rather than 'canceling statement due to user request'."""
    return CallError(
        "08001", f'azure-local-ai-proxy cannot answer azure_local_ai.{function}: its service login "{failed.user}" '
        f'cannot connect to database "{failed.database}": {failed.cause}',
        "The proxy writes the answers of the calls the server evaluates through its own login, service_user: set "
        "service_password (or that login's line in ~/.pgpass, or PGPASSWORD) to its password on the server, or "
        "service_user to a login that may connect to this database, and restart the proxy. Its log and /healthz "
        "say whether the service login connects.")


def encode_answer(mailbox: Mailbox, request_id: str, status: str, text: str) -> bytes:
    """What the function reads: the request's id, V (value), N (NULL) or E (error, as JSON), the
    payload's length in bytes, an MD5 over the session's secret, those and the payload; then the payload."""
    payload = text.encode()
    head = f"{request_id}{status}{len(payload):010d}"
    mac = hashlib.md5((mailbox.secret + head).encode() + payload, usedforsecurity=False).hexdigest()
    return (head + mac).encode() + payload


def kept_key(model_uri: str, text: str) -> str | None:
    """The key of a text's answer kept ahead, as the SQL function computes it (md5 of the model, a
    newline and the text, in UTF-8); None for a text that UTF-8 cannot hold (it is asked for)."""
    try:
        data = f"{model_uri}\n{text}".encode()
    except UnicodeEncodeError:
        return None
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def kept_place(key: str) -> int:
    return int(key[:3], 16) * KEPT_SLOT


def kept_answers(mailbox: Mailbox, model_uri: str, texts: list[str], vectors: list[np.ndarray]) -> dict[int, bytes]:
    """The answers to keep ahead for these texts, by place (the first of these texts to fall on a place
    has it; the others, and answers larger than a place, are asked for)."""
    out: dict[int, bytes] = {}
    for text, vector in zip(texts, vectors, strict=True):
        key = kept_key(model_uri, text)
        if key is None or kept_place(key) in out:
            continue
        answer = encode_answer(mailbox, key, "V", real_array_text(vector))
        if len(answer) <= KEPT_SLOT:
            out[kept_place(key)] = answer
    return out


@dataclass
class _Box:
    """A mailbox of the session's transaction, and the roles that may open it (none: not made yet)."""

    mailbox: Mailbox
    backend_pid: int  # its server backend, as the mailbox's comment says (left ones are removed by it)
    pid_unsure: bool = False  # made by the proxy before a request: the session's cancel key's pid (a pooler's?)
    granted: set[str] = field(default_factory=set)
    making: asyncio.Future[None] | None = None  # its making (_make): nothing is written into one not made
    dropped: bool = False  # its transaction ended: its removal is under way, and nothing more is written

    def unmade(self) -> BaseException | None:
        """Why the mailbox could not be made (its OID taken: by a large object of anyone's, perhaps one
        a request named to have the proxy write into it), once its making is over; else None."""
        making = self.making
        if making is None or not making.done() or making.cancelled():
            return None
        return making.exception()


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
        self.backend_pid = backend_pid  # the server backend of the session's cancel key (a pooler's, behind one)
        self.backend = backend
        self.service = service
        #: The tables whose generated columns embed, as learnt from this proxy's sessions' requests.
        self.tables = tables
        self._role = login  # the role of the session's latest request: what its functions run as, likely
        self._cancel_statement = cancel_statement
        #: Why the proxy cancelled the running statement, if it did because its answer could not be
        #: written: the client gets this error instead of the cancel's (cancelled_error).
        self._unanswered: CallError | None = None
        self._boxes: dict[int, _Box] = {}  # the transaction's mailboxes, by OID
        self._current: _Box | None = None  # the one its latest request named: answers kept ahead go there
        self._tasks: set[asyncio.Task[None]] = set()  # answers being worked out
        self._closing: set[asyncio.Task[None]] = set()  # mailboxes being made or dropped, locks let go of
        self._mailbox_work: asyncio.Future[None] | None = None  # the last operation on the mailbox (_in_order)
        #: The request's advisory lock, and taking it (_hold).
        self._holding: tuple[int, asyncio.Future[bool]] | None = None
        self._asked = 0  # requests so far, and answers kept ahead, with an event at each: how far the
        self._ahead = 0  # server has come
        self._progress = asyncio.Event()
        self.asked_in_statement = 0
        self._statement = 0  # statements ended: what is kept ahead goes into its own statement's mailbox
        self._kept_role: str | None = None  # the statement's function reads answers kept ahead, as this role
        #: Computed before the statement's first request said whether its function reads them.
        self._unkept: list[tuple[str, list[str], list[np.ndarray]]] = []
        #: (model, text) a COPY's rows give its table's generated columns, not yet computed (copy_ahead).
        self._copied: list[tuple[str, str]] = []
        self._copying: asyncio.Task[None] | None = None

    def notice(self, body: bytes) -> bool:
        """A NoticeResponse from the server: True if it was a request (the client must not see it)."""
        request = parse_request(body)
        if isinstance(request, bool):
            return request
        box = self._box_of(request)
        if box is None:
            log.warning("a request naming a mailbox that is not its session's was not answered",
                        extra={"event": "server_call_refused", "function": request.function})
            return True
        self._current = box
        self._asked += 1
        self.asked_in_statement += 1
        self._progress.set()
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

    def _box_of(self, request: Request) -> _Box | None:
        """The mailbox a request's answer goes into: the one it names, if it is this transaction's (same
        secret) or new (no session of this proxy has it: a request any code in a session can forge must
        not make the proxy write into another's); None where it may not. A request of objects before
        1.4 names none: the one the proxy set for the statement."""
        if request.mailbox is None:
            return self._current
        box = self._boxes.get(request.mailbox.oid)
        if box is not None:
            return box if box.mailbox == request.mailbox else None
        if len(self._boxes) >= MAX_MAILBOXES or not self.service.claim_mailbox(self.database, request.mailbox.oid):
            return None
        box = _Box(request.mailbox, request.backend_pid or self.backend_pid)
        self._boxes[request.mailbox.oid] = box
        return box

    def statement_mailbox(self) -> Mailbox:
        """The mailbox of the transaction a statement about to run belongs to, made up here if it has
        none yet: the proxy sets it in the statement's transaction (handover.py), and keeps answers
        there before the statement asks."""
        if self._current is None:
            while True:
                mailbox = Mailbox.new()
                if self.service.claim_mailbox(self.database, mailbox.oid):
                    break
            self._current = self._boxes[mailbox.oid] = _Box(mailbox, self.backend_pid, pid_unsure=True)
        return self._current.mailbox

    async def _answer(self, request: Request, box: _Box) -> None:
        working = asyncio.ensure_future(self._outcome(request))
        try:
            await asyncio.sleep(0)  # an answer at hand (a kept vector, a setting) goes at once
            if not working.done():
                await self._hold(request, box)
            status, text = await working
        finally:
            working.cancel()
        # Once begun, a delivery runs to its end even if the statement ends meanwhile (statement_done):
        # cutting a service query short would leave its connection in doubt.
        await shielded(self._deliver_or_cancel(request, box, status, text, self._statement))

    async def _outcome(self, request: Request) -> tuple[str, str]:
        try:
            return await self._evaluate(request)
        except CallError as error:
            STATS.error(error.sqlstate, "server")
            return "E", json.dumps({"code": error.sqlstate, "message": error.message, "hint": error.hint})
        except Exception:
            log.exception("a server call failed", extra={"event": "server_call_error", "function": request.function})
            STATS.error("XX000", "server")
            return "E", json.dumps({"code": "XX000", "message": "internal error in azure-local-ai-proxy"})

    async def _hold(self, request: Request, box: _Box) -> None:
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
            self._track(self._make(box, request.role))
        await asyncio.wait([self._holding[1]])

    def _make(self, box: _Box, role: str, at: int = 0, first: bytes = b"", unlock: int | None = None
              ) -> asyncio.Future[None]:
        """Make the mailbox, readable by `role`, with `first` at `at` (and let go of the lock `unlock`):
        marked as made at once, so that what follows it only writes, in order behind it."""
        box.granted.add(role)
        made = self._in_order(partial(self.service.open_mailbox, self.database, box.mailbox.oid, box.backend_pid,
                                      role, at, first, unlock, pid_unsure=box.pid_unsure))
        box.making = self._mailbox_work
        return made

    def _into(self, box: _Box, work: Callable[[], Awaitable[None]]) -> asyncio.Future[None]:
        """Run `work`, a write into `box` or a grant on it, in order, if the box was made."""
        async def checked() -> None:
            if box.dropped:  # its OID is free again: it might be another's by now
                raise ServiceUnavailable(f"the mailbox {box.mailbox.oid} is gone with its transaction")
            problem = box.unmade()
            if isinstance(problem, ServiceUnavailable):  # its cause (the service login refused, say) says most
                raise problem
            if problem is not None:
                raise ServiceUnavailable(f"the mailbox {box.mailbox.oid} could not be made: {problem}")
            await work()

        return self._in_order(checked)

    def _held(self) -> int | None:
        """The lock held (to be let go of with the next answer), if any; forgets it."""
        holding, self._holding = self._holding, None
        if holding is None:
            return None
        key, taking = holding
        held = taking.done() and not taking.cancelled() and taking.exception() is None and taking.result()
        return key if held else None

    async def _deliver_or_cancel(self, request: Request, box: _Box, status: str, text: str, statement: int) -> None:
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

    async def _deliver(self, request: Request, box: _Box, status: str, text: str) -> None:
        answer = encode_answer(box.mailbox, request.id, status, text)
        unlock = self._held()  # let go in the same round trip
        try:
            # Marked before the service connection answers: the function may read the answer, and the
            # statement end, before that reply reaches the proxy; its removal then waits for the making.
            if not box.granted:
                await self._make(box, request.role, request.at, answer, unlock)
                return
            if request.role not in box.granted:
                box.granted.add(request.role)
                await self._into(box, partial(self.service.grant, self.database, box.mailbox.oid, request.role))
            await self._into(box, partial(self.service.write, self.database, box.mailbox.oid, request.at, answer,
                                          unlock))
        except ServiceUnavailable:
            if unlock is not None:  # the write, and the unlock with it, did not happen: the lock is still held
                await self.service.unlock(self.database, unlock)
            raise

    def _keep_ahead(self, model_uri: str, texts: list[str], vectors: list[np.ndarray]) -> None:
        """Texts a look-ahead has computed: their answers go into the mailbox before they are asked
        for, if the statement's function reads them there."""
        if self._kept_role is not None and self._current is not None:
            # A chunk per write: the writer connection serves every session's answers meanwhile.
            for i in range(0, len(texts), LOOKAHEAD_CHUNK):
                self._track(self._write_ahead(self._statement, self._current, self._kept_role, model_uri,
                                              texts[i : i + LOOKAHEAD_CHUNK], vectors[i : i + LOOKAHEAD_CHUNK]))
        elif not self.asked_in_statement:
            self._unkept.append((model_uri, texts, vectors))

    async def _write_ahead(self, statement: int, box: _Box, role: str, model_uri: str, texts: list[str],
                           vectors: list[np.ndarray]) -> None:
        answers = await asyncio.to_thread(kept_answers, box.mailbox, model_uri, texts, vectors)
        if statement != self._statement or not answers:
            return  # its statement is over, or none fits a place
        if not box.granted:
            self._track(self._make(box, role))
        try:
            await self._into(box, partial(self.service.write_many, self.database, box.mailbox.oid, list(answers),
                                         list(answers.values())))
        except ServiceUnavailable as exc:  # only time is lost: each is asked for instead
            log.debug("answers were not kept ahead", extra={"event": "keep_ahead_failed", "reason": str(exc)})
            return
        self._ahead += len(answers)
        self._progress.set()
        STATS.calls[("create_embeddings", "ahead")] += len(answers)

    def learn_table(self, table: str) -> asyncio.Task[None] | None:
        """The server asked during a one-row INSERT or a COPY into `table` that named no azure_local_ai
        function: its generated columns embed. Known, the table's next one-row INSERTs are answered
        before they run (keep_before), and the rows of its next COPYs computed ahead (copy_ahead), if
        this database's functions read answers kept ahead. Returns the look-up under way, if any."""
        if self._kept_role is not None and self.tables.get(self.database, self.login, table) is None:
            return self.tables.learn(self.database, self.login, table)
        return None

    def copy_ahead(self, inputs: list[tuple[str, str]]) -> asyncio.Task[None] | None:
        """(model, text) inputs that a COPY's rows give its table's generated columns, read from the
        client's data on its way to the server: computed in batches and kept ahead of the server's
        requests, never more than a page ahead of them. Returns the task that computes them, when
        this starts one (the caller cancels it at the statement's end)."""
        if not self._capacity():
            return None
        self._copied += inputs
        if self._copying is not None and not self._copying.done():
            return None
        self._copying = asyncio.get_running_loop().create_task(self._copy_ahead())
        return self._copying

    async def _copy_ahead(self) -> None:
        page = min(_LOOKAHEAD_PAGE, self._capacity())
        asked_from, sent = self._asked + self._ahead, 0
        pages = _TwoPages()
        try:
            while self._copied:  # rows read meanwhile (copy_ahead adds to them) are taken too
                while self._copied:
                    while self._asked + self._ahead - asked_from < sent - page:
                        self._progress.clear()
                        await self._progress.wait()
                    taken, self._copied = self._copied[:page], self._copied[page:]
                    by_model: dict[str, list[str]] = {}
                    for model_uri, text in taken:
                        by_model.setdefault(model_uri, []).append(text)
                    for model_uri, texts in by_model.items():
                        await pages.add(self.backend.embed_ahead(model_uri, texts, self._keep_ahead))
                    sent += len(taken)
                await pages.finish()
        except CallError as exc:
            log.debug("a look-ahead was given up", extra={"event": "lookahead_failed", "reason": exc.message})
            self._copied = []
        finally:
            pages.cancel()
        log.debug("looked ahead", extra={"event": "lookahead", "texts": sent, "computed": pages.computed})

    async def keep_before(self, inputs: list[tuple[str, str]]) -> None:
        """Compute the (model, text) inputs a statement about to run will ask for, and keep their answers
        in its transaction's mailbox (statement_mailbox, which the caller sets in the statement's
        transaction), so that its function finds them there and asks nothing. Only time is at stake:
        what fails here is asked for, and answered or refused, as the statement runs."""
        self.statement_mailbox()
        box = self._current
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
                    await self._make(box, self._role, place, first)
                    STATS.calls[("create_embeddings", "ahead")] += 1
                if answers:
                    await self._into(box, partial(self.service.write_many, self.database, box.mailbox.oid,
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
        return encode_answer(self.statement_mailbox(), key, "V", real_array_text(vector))  # type: ignore[arg-type]

    def look_ahead(self, lookaheads: list[Lookahead]) -> tuple[asyncio.Task[None], asyncio.Future[None]] | None:
        """Start embedding, in batches, the texts a statement is about to ask for one by one. Returns
        the work (the caller cancels it when the statement ends) and a future done once the first
        texts are read; None when the cache is off."""
        if not lookaheads or not self._capacity():
            return None
        loop = asyncio.get_running_loop()
        read = loop.create_future()
        return loop.create_task(self._look_ahead(lookaheads, read)), read

    def look_ahead_written(self, sql: str) -> asyncio.Task[None] | None:
        """For a statement that does not name azure_local_ai but whose server asks: the embeddings the
        generated columns of the tables it writes will need (INSERT ... SELECT, UPDATE of the source)."""
        return asyncio.get_running_loop().create_task(self._look_ahead_written(sql)) if self._capacity() else None

    def _capacity(self) -> int:
        """How many looked-ahead texts the cache keeps, with room to spare (half of it)."""
        return self.backend.cache.max_bytes // _LOOKAHEAD_ROW_BYTES // 2

    async def _look_ahead_written(self, sql: str) -> None:
        found: list[Lookahead] = []
        for stmt, table in await asyncio.to_thread(written_tables, sql):
            try:
                columns, generated = await self.service.generated_embeddings(self.database, self.login, table)
            except ServiceUnavailable as exc:
                log.debug("a look-ahead was given up", extra={"event": "lookahead_failed", "reason": str(exc)})
                return
            found += generated_lookaheads(stmt, columns, generated)
        await self._look_ahead(found)

    async def _look_ahead(self, lookaheads: list[Lookahead], read: asyncio.Future[None] | None = None) -> None:
        try:
            for lookahead in lookaheads:
                await self._read_ahead(lookahead, read)
        finally:
            if read is not None and not read.done():
                read.set_result(None)

    async def _read_ahead(self, lookahead: Lookahead, read: asyncio.Future[None] | None) -> None:
        """Read the texts a page at a time, never more than a page ahead of the server's requests, and
        embed each page in batches. A statement that locks its table (ALTER TABLE) reads all it can
        at once, before it runs."""
        page = self._capacity() if lookahead.before else min(_LOOKAHEAD_PAGE, self._capacity())
        asked_from, offset, total = self._asked + self._ahead, 0, 0
        pages = _TwoPages()
        try:
            while True:
                while self._asked + self._ahead - asked_from < offset - page:
                    self._progress.clear()
                    await self._progress.wait()
                try:
                    # Read on when the statement ends: the service connection is never left mid-query.
                    texts = await shielded(self.service.read_texts(self.database, self.login, lookahead, page, offset))
                except LookaheadRefused as exc:
                    log.info("a statement's rows were not read ahead", extra={"event": "lookahead_refused",
                                                                              "reason": str(exc)})
                    break
                except ServiceUnavailable as exc:  # only time is lost: each request is answered anyway
                    log.debug("a look-ahead was given up", extra={"event": "lookahead_failed", "reason": str(exc)})
                    break
                finally:
                    if read is not None and not read.done():
                        read.set_result(None)
                await pages.add(self.backend.embed_ahead(lookahead.model_uri, texts, self._keep_ahead))
                total, offset = total + len(texts), offset + page
                if len(texts) < page or lookahead.before:
                    break
            await pages.finish()
        except CallError as exc:
            log.debug("a look-ahead was given up", extra={"event": "lookahead_failed", "reason": exc.message})
        finally:
            pages.cancel()
        log.info("looked ahead", extra={"event": "lookahead", "texts": total, "computed": pages.computed})

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction has mailboxes (its end, an idle ReadyForQuery, is to be watched for)."""
        return bool(self._boxes)

    def statement_done(self, idle: bool) -> None:
        """The server finished the statement (ReadyForQuery): no function waits any more, so drop any
        answer still being worked out for a call that was cancelled; and, `idle`, outside a transaction,
        the transaction's mailboxes."""
        self._statement += 1
        self.asked_in_statement = 0
        self._unanswered = None
        self._kept_role = None
        self._unkept.clear()
        self._copied = []
        for task in list(self._tasks):
            task.cancel()
        if self._holding is not None:  # a call cut short: its lock goes now, or once it is taken
            self._track(self._let_go(*self._holding))
            self._holding = None
        if idle:
            self._drop_mailboxes()
            self._role = self.login  # behind a pooler, the next transaction may be another client's

    def _drop_mailboxes(self) -> None:
        """Remove the transaction's mailboxes (not cancelled by a later statement's end)."""
        for oid, box in self._boxes.items():
            box.dropped = True
            if box.granted:
                self._track(self._in_order(partial(self.service.close_mailbox, self.database, oid)))
            else:
                self.service.release_mailbox(self.database, oid)
        self._boxes = {}
        self._current = None

    def _in_order(self, work: Callable[[], Awaitable[None]]) -> asyncio.Future[None]:
        """Run `work`, an operation on the session's mailbox, once every one asked for before it has
        ended, whichever task asks and however the tasks are scheduled: a write never overtakes the
        mailbox's making, nor a making the last statement's removal. Never cut short once asked for."""
        previous = self._mailbox_work

        async def after() -> None:
            if previous is not None:
                await asyncio.wait([previous])
            await work()

        task = asyncio.ensure_future(after())
        task.add_done_callback(retrieve)
        self._mailbox_work = task  # the work itself: a cancelled caller of a shield is not its end
        return asyncio.shield(task)

    def _track(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._closing.add(task)
        task.add_done_callback(self._tracked)

    def _tracked(self, task: asyncio.Future[None]) -> None:
        self._closing.discard(task)
        if not task.cancelled() and task.exception() is not None:  # the statement's own delivery says more
            log.warning("a mailbox could not be made or removed", extra={"event": "mailbox_failed",
                                                                         "reason": str(task.exception())})

    async def _let_go(self, key: int, holding: asyncio.Future[bool]) -> None:
        await asyncio.wait([holding])
        if not holding.cancelled() and holding.exception() is None and holding.result():
            await self.service.unlock(self.database, key)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._holding is not None:
            self._track(self._let_go(*self._holding))
            self._holding = None
        self._drop_mailboxes()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


class _TwoPages:
    """A look-ahead's pages: one is embedded while the next is read, so that the engine (or a pool of
    inference servers) never waits for a read, nor drains between pages; at most two at once."""

    def __init__(self) -> None:
        self.computed = 0
        self._pending: asyncio.Future[int] | None = None

    async def add(self, work: Awaitable[int]) -> None:
        """Start embedding a page; wait for the one before it (its CallError is raised here)."""
        previous, self._pending = self._pending, asyncio.ensure_future(work)
        self._pending.add_done_callback(retrieve)  # a page cancelled after it failed
        if previous is not None:
            self.computed += await previous

    async def finish(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self.computed += await pending

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
