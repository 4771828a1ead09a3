"""Background work whose failure must not go unseen: asyncio logs "Task exception was never retrieved"
(with a traceback, at some later garbage collection) for a task that failed with nobody looking."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


def retrieve(task: asyncio.Future[object]) -> None:
    """Mark a task's failure as seen (a done callback): whoever awaits the task still gets it."""
    if not task.cancelled():
        task.exception()


def shielded(work: Awaitable[T]) -> Awaitable[T]:
    """`work`, run to its end even if the caller is cancelled (asyncio.shield), its failure then seen
    here: shield forgets the work once its caller is cancelled, and a later failure would be unseen."""
    task = asyncio.ensure_future(work)
    task.add_done_callback(retrieve)
    return asyncio.shield(task)
