"""Work run on past its caller's cancellation: a failure after the caller is gone is seen (asyncio
would log it as never retrieved, with a traceback, at a later garbage collection)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable

import pytest

from proxy.tasks import shielded


async def _unseen_failures(shield: Callable[[Awaitable[None]], Awaitable[None]]) -> list[str]:
    """Await `shield(work)` and be cancelled; the work then fails: what the loop reports as unseen."""
    loop = asyncio.get_running_loop()
    unseen: list[str] = []
    loop.set_exception_handler(lambda _, context: unseen.append(context["message"]))
    go_on = asyncio.Event()

    async def work() -> None:
        await go_on.wait()
        raise ConnectionError("the service connection was lost")

    async def caller() -> None:
        await shield(work())

    waiting = asyncio.ensure_future(caller())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    go_on.set()
    for _ in range(3):
        await asyncio.sleep(0)
    gc.collect()
    return unseen


def test_a_failure_after_the_caller_is_cancelled_is_seen() -> None:
    assert asyncio.run(_unseen_failures(shielded)) == []


def test_asyncio_shield_alone_leaves_it_unseen() -> None:
    """What shielded is for: the failure this test file looks for is real."""
    assert asyncio.run(_unseen_failures(asyncio.shield)) == ["Task exception was never retrieved"]


async def _result() -> int:
    await asyncio.sleep(0)
    return 7


def test_the_caller_still_gets_the_result_and_the_failure() -> None:
    async def failing() -> None:
        raise ValueError("bad")

    async def both() -> None:
        assert await shielded(_result()) == 7
        with pytest.raises(ValueError, match="bad"):
            await shielded(failing())

    asyncio.run(both())
