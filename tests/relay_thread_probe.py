"""The relay thread's own behaviour over socket pairs, without PostgreSQL or an event loop: what it
forwards, where it stops, and the counts it hands back. Run by tests/test_relay_thread.py natively,
and under qemu's Haswell CPU (`python -m tests.relay_thread_probe` prints "ok")."""

from __future__ import annotations

import select
import socket
import struct
import threading

from proxy import _fastrelay

MARKER = b"azure_local_ai"


def message(msg_type: bytes, body: bytes) -> bytes:
    return msg_type + struct.pack("!i", len(body) + 4) + body


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    out = b""
    while len(out) < size:
        chunk = sock.recv(size - len(out))
        assert chunk, "closed early"
        out += chunk
    return out


def handed_back(timeout: float = 5.0) -> tuple:
    ready, _, _ = select.select([_fastrelay.notify_fd()], [], [], timeout)
    assert ready, "the thread handed nothing back"
    (state,) = _fastrelay.take()
    return state


def attach(proxy_client: socket.socket, proxy_server: socket.socket, watched: bytes = b"") -> int:
    return _fastrelay.attach(
        proxy_client.fileno(), proxy_server.fileno(), hooked=True, marker=MARKER, watched=watched,
        max_message=1 << 30, up_skip=0, up_last=0, down_skip=0, down_last=0, syncs_sent=3, batch_open=False,
        uncertain=False, ready_count=3, tx_status=ord("I"), in_query=False, last_activity=0.0,
    )


def probe() -> None:
    client, proxy_client = socket.socketpair()
    proxy_server, server = socket.socketpair()
    for sock in (proxy_client, proxy_server):
        sock.setblocking(False)
    session = attach(proxy_client, proxy_server)

    # Plain requests go through as they are, and the answers come back, across arbitrary splits.
    query = message(b"Q", b"select 1\0")
    parse = message(b"P", b"\0select $1\0\0\0") + message(b"B", b"\0\0\0\0\0\0\0\0") + message(b"S", b"")
    client.sendall(query[:3])
    client.sendall(query[3:] + parse)
    assert recv_exactly(server, len(query + parse)) == query + parse
    big_row = message(b"D", b"\0\1" + struct.pack("!i", 600_000) + b"r" * 600_000)  # streamed, never held whole
    answers = message(b"C", b"SELECT 1\0") + message(b"Z", b"T") + big_row + message(b"Z", b"I")
    sender = threading.Thread(target=server.sendall, args=(answers,))  # more than the sockets buffer
    sender.start()
    assert recv_exactly(client, len(answers)) == answers
    sender.join()
    activity = _fastrelay.activity(session)
    assert activity is not None and activity[1:] == (0, 3 + 2, 3 + 2, ord("I"), 1)  # all answered

    # A Query naming the schema, in any case: the thread stops at its first byte.
    call = message(b"Q", b"SELECT Azure_Local_AI.create_embeddings('m', 'x')\0")
    client.sendall(call + query)
    state = handed_back()
    (sid, reason, up_unsent, up_unframed, up_skip, up_last, down_unsent, down_unframed, down_skip, down_last,
     syncs, batch_open, uncertain, ready, tx_status, in_query, _last, unread) = state
    assert (sid, reason) == (session, _fastrelay.CLIENT_MESSAGE)
    assert up_unsent == b"" and up_unframed == call + query and up_skip == 0 and up_last == ord("S")
    assert down_unsent == down_unframed == b"" and down_skip == 0 and down_last == ord("Z")
    assert (syncs, batch_open, uncertain) == (3 + 2, False, False)  # Query and Sync counted once each
    assert (ready, chr(tx_status), in_query) == (3 + 2, "I", True)
    assert unread == message(b"P", b"\0select $1\0\0\0")  # the last Query or Parse forwarded
    assert _fastrelay.detach(session) is None  # taken already

    # Server notices stop it too, and so does a Bind of a statement the hook prepared.
    session = attach(proxy_client, proxy_server, watched=b"with_calls\0")
    server.sendall(message(b"N", b"SNOTICE\0Mhi\0\0"))
    state = handed_back()
    assert state[1] == _fastrelay.SERVER_MESSAGE and state[7] == message(b"N", b"SNOTICE\0Mhi\0\0")
    session = attach(proxy_client, proxy_server, watched=b"with_calls\0")
    other = message(b"B", b"\0other\0\0\0\0\0\0\0")
    mine = message(b"B", b"\0with_calls\0\0\0\0\0\0\0")
    client.sendall(other + mine)
    assert recv_exactly(server, len(other)) == other
    state = handed_back()
    assert state[1] == _fastrelay.CLIENT_MESSAGE and state[3] == mine and state[11] == 1  # batch open

    # Malformed input is left for Python to refuse; an end of stream is handed back as such.
    session = attach(proxy_client, proxy_server)
    client.sendall(b"\x01\0\0\0\x04")
    state = handed_back()
    assert state[1] == _fastrelay.CLIENT_MESSAGE and state[3] == b"\x01\0\0\0\x04"
    session = attach(proxy_client, proxy_server)
    client.close()
    assert handed_back()[1] == _fastrelay.CLIENT_CLOSED
    for sock in (proxy_client, proxy_server, server):
        sock.close()


if __name__ == "__main__":
    probe()
    print("ok")
