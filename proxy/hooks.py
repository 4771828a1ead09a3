"""The seam through which a session's SQL can be inspected, rewritten or answered by the proxy.

A hook sees the client messages it asks for (types in `message_types`) before they go upstream.
`wants` is called synchronously on the relay's path and must be cheap; only when it returns True is
the session held (later client messages wait, in order) while `handle` runs. `handle` decides what
happens to the message through the `SessionControl`: forward it, send something else upstream,
answer the client, and/or watch the server's replies. With no hook, or a hook that never wants a
message, the session stays a byte relay."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from .upstream import Upstream

#: A watcher gets each server message (type, body) and returns the bytes to send to the client
#: instead (b"" drops it), or None to relay the message unchanged.
ServerWatcher = Callable[[int, bytes], bytes | None]


@dataclass(frozen=True)
class SessionInfo:
    """What a hook may know about its session."""

    session_id: str
    user: str
    database: str
    parameters: dict[str, str]
    upstream: Upstream
    #: The upstream backend's (pid, secret), to cancel its statement.
    server_key: tuple[int, bytes] | None = None


class SessionControl(Protocol):
    """What a hook may do to its session."""

    info: SessionInfo
    #: The server's run-time parameters as last reported (ParameterStatus), e.g. standard_conforming_strings.
    server_parameters: dict[str, str]

    @property
    def transaction_status(self) -> str:
        """I, T or E, as of the server's last ReadyForQuery."""
        ...

    @property
    def requests_sent(self) -> int:
        """Queries and Syncs sent upstream so far (each is answered by one ReadyForQuery)."""
        ...

    @property
    def outstanding(self) -> int:
        """Of those, how many the server has not answered yet."""
        ...

    @property
    def in_batch(self) -> bool:
        """Whether extended-query messages went upstream since the last Sync or Query."""
        ...

    def forward(self, msg_type: int, body: bytes) -> None:
        """Send the client's message (possibly rewritten) upstream."""

    def forward_parts(self, msg_type: int, parts: list[bytes | memoryview]) -> None:
        """`forward`, with the body in parts that are written as they are, never joined."""

    def cork(self) -> None:
        """Send what goes upstream from now on in one write, once the hook's message and the messages
        held behind it have gone; only where the hook awaits nothing more of the server."""

    async def settled(self) -> None:
        """Wait until the server has answered everything sent so far."""

    async def query(self, sql: str) -> list[tuple[str | None, ...]]:
        """Run the proxy's own query on the session's connection (after everything before it is
        answered) and return its rows as text; raises capture.QueryFailed on an error."""
        ...

    def send_upstream(self, data: bytes) -> None: ...

    def send_client(self, data: bytes) -> None: ...

    def watch_server(self, watcher: ServerWatcher) -> None: ...

    def stop_watching(self) -> None: ...

    def observe_client(self, types: frozenset[int]) -> None:
        """From now on, show the hook (`SessionHook.observe`) the client's messages of these types, each
        as it goes upstream unchanged (none: frozenset())."""


class SessionHook(Protocol):
    """Per-session interception logic (see the module docstring)."""

    message_types: frozenset[int]
    #: Lower-case bytes the relay looks for in long messages of `message_types` as they arrive
    #: (b"": none); `wants` gets the answer as `marked`, and None where it was not looked for.
    marker: bytes

    def wants(self, msg_type: int, body: bytes, marked: bool | None = None) -> bool: ...

    def markers(self) -> list[bytes]:
        """Lower-case bytes of which the relay thread stops at a Query or Parse that contains any one:
        `marker`, and any more the hook wants to see now."""
        ...

    async def handle(self, msg_type: int, body: bytes, control: SessionControl) -> None: ...

    def notice(self, body: bytes, control: SessionControl) -> bool:
        """A NoticeResponse from the server; True if it was addressed to the proxy (the client must not
        see it). Called on the relay's path: cheap for every other notice."""
        ...

    def resting(self) -> Iterable[bytes] | None:
        """None while the hook has work under way on this session (a statement, replies it watches,
        a read-ahead); otherwise the names of the prepared statements whose Bind, Describe or Close it
        must see. The relay hands a resting session to its thread, which stops at those messages and
        at every Query or Parse that names azure_local_ai."""
        ...

    def passed(self, msg_type: int, body: bytes) -> None:
        """The last Query or Parse the relay thread forwarded without asking `wants`: what `wants`
        would have remembered of it."""

    def observe(self, msg_type: int, body: bytes | None) -> None:
        """A client message of a type the hook asked to observe (SessionControl.observe_client), on its
        way upstream as it is (`body` None: a message too long to be read on the relay's path, over
        relay.OBSERVE_MAX). Called on the relay's path: cheap."""

    def cancel(self) -> None:
        """The client sent a CancelRequest while a statement of this session runs: stop the local work
        on it, and end the calls the server evaluates for it."""

    def close(self) -> None:
        """The session ended: release what the hook holds."""


HookFactory = Callable[[SessionInfo], SessionHook | None]
