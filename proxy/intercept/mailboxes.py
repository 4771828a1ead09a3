"""A session's mailboxes, where the proxy writes the answers of the calls the server evaluates
(servercalls.py): one a transaction (extension 1.4), made at its first use (a request, answers kept
ahead), written into in order behind its making, and dropped when its transaction ends. Each is a large
object of the server's, made, written and removed through the proxy's service connection (service.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

from ..mailbox import Mailbox
from ..service import ServiceConnections, ServiceUnavailable
from ..tasks import retrieve
from .serverrequests import Request

log = logging.getLogger("azure_local_ai_proxy.servercalls")

#: Mailboxes of one transaction at most (a new one comes with each rollback to a savepoint that undid
#: the setting; any code in a session could name new ones in forged requests, each a write of the proxy's).
MAX_MAILBOXES = 64


@dataclass
class Box:
    """A mailbox of the session's transaction, and the roles that may open it (none: not made yet)."""

    mailbox: Mailbox
    backend_pid: int  # its server backend, as the mailbox's comment says (left ones are removed by it)
    pid_unsure: bool = False  # made by the proxy before a request: the session's cancel key's pid (a pooler's?)
    granted: set[str] = field(default_factory=set)
    making: asyncio.Future[None] | None = None  # its making (make): nothing is written into one not made
    dropped: bool = False  # its transaction ended: its removal is under way, and nothing more is written

    def unmade(self) -> BaseException | None:
        """Why the mailbox could not be made (its OID taken: by a large object of anyone's, perhaps one
        a request named to have the proxy write into it), once its making is over; else None."""
        making = self.making
        if making is None or not making.done() or making.cancelled():
            return None
        return making.exception()


class Mailboxes:
    """One per session: its transaction's mailboxes, and the operations on them, in order; and the work
    the session's end waits for (track)."""

    def __init__(self, service: ServiceConnections, database: str, backend_pid: int) -> None:
        self.service = service
        self.database = database
        self.backend_pid = backend_pid  # the server backend of the session's cancel key (a pooler's, behind one)
        self._boxes: dict[int, Box] = {}  # the transaction's mailboxes, by OID
        self.current: Box | None = None  # the one its latest request named: answers kept ahead go there
        self._closing: set[asyncio.Task[None]] = set()  # mailboxes being made or dropped, locks let go of
        self._mailbox_work: asyncio.Future[None] | None = None  # the last operation on the mailbox (in_order)

    def box_of(self, request: Request) -> Box | None:
        """The mailbox a request's answer goes into: the one it names, if it is this transaction's (same
        secret) or new (no session of this proxy has it: a request any code in a session can forge must
        not make the proxy write into another's); None where it may not. A request of objects before
        1.4 names none: the one the proxy set for the statement."""
        if request.mailbox is None:
            return self.current
        box = self._boxes.get(request.mailbox.oid)
        if box is not None:
            return box if box.mailbox == request.mailbox else None
        if len(self._boxes) >= MAX_MAILBOXES or not self.service.claim_mailbox(self.database, request.mailbox.oid):
            return None
        box = Box(request.mailbox, request.backend_pid or self.backend_pid)
        self._boxes[request.mailbox.oid] = box
        return box

    def statement_mailbox(self) -> Mailbox:
        """The mailbox of the transaction a statement about to run belongs to, made up here if it has
        none yet: the proxy sets it in the statement's transaction (handover.py), and keeps answers
        there before the statement asks."""
        if self.current is None:
            while True:
                mailbox = Mailbox.new()
                if self.service.claim_mailbox(self.database, mailbox.oid):
                    break
            self.current = self._boxes[mailbox.oid] = Box(mailbox, self.backend_pid, pid_unsure=True)
        return self.current.mailbox

    def make(self, box: Box, role: str, at: int = 0, first: bytes = b"", unlock: int | None = None
              ) -> asyncio.Future[None]:
        """Make the mailbox, readable by `role`, with `first` at `at` (and let go of the lock `unlock`):
        marked as made at once, so that what follows it only writes, in order behind it."""
        box.granted.add(role)
        made = self.in_order(partial(self.service.open_mailbox, self.database, box.mailbox.oid, box.backend_pid,
                                      role, at, first, unlock, pid_unsure=box.pid_unsure))
        box.making = self._mailbox_work
        return made

    def into(self, box: Box, work: Callable[[], Awaitable[None]]) -> asyncio.Future[None]:
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

        return self.in_order(checked)

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction has mailboxes (its end, an idle ReadyForQuery, is to be watched for)."""
        return bool(self._boxes)

    def drop(self) -> None:
        """Remove the transaction's mailboxes (not cancelled by a later statement's end)."""
        for oid, box in self._boxes.items():
            box.dropped = True
            if box.granted:
                self.track(self.in_order(partial(self.service.close_mailbox, self.database, oid)))
            else:
                self.service.release_mailbox(self.database, oid)
        self._boxes = {}
        self.current = None

    def in_order(self, work: Callable[[], Awaitable[None]]) -> asyncio.Future[None]:
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

    def track(self, work: Awaitable[None]) -> None:
        """Run `work` to its end, which the session's end waits for (close)."""
        task = asyncio.ensure_future(work)
        self._closing.add(task)
        task.add_done_callback(self._tracked)

    def _tracked(self, task: asyncio.Future[None]) -> None:
        self._closing.discard(task)
        if not task.cancelled() and task.exception() is not None:  # the statement's own delivery says more
            log.warning("a mailbox could not be made or removed", extra={"event": "mailbox_failed",
                                                                         "reason": str(task.exception())})

    async def close(self) -> None:
        """The session ended: its mailboxes go, and what was tracked ends."""
        self.drop()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
