"""The requests the extension's SQL functions send the proxy (a NoticeResponse on the session's own
connection) and the answers they read in the transaction's mailbox: pure code over bytes, tested
without sockets (servercalls.py answers them; sql/ has the functions' side)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np

from .. import protocol as pg
from ..mailbox import Mailbox
from ..service import ServiceLoginFailed
from .errors import CallError
from .render import real_array_text

REQUEST_CODE = "AL001"
REQUEST_MESSAGE = "azure-local-ai-proxy request"
#: What a waiting function sends once a second, so that its backend learns when the client is gone.
WAITING_CODE = "AL002"
_REQUEST_ID = re.compile(r"[0-9a-f]{32}")
_MAX_PLACE = 1 << 40  # large objects end at 4 TB
#: Answers kept ahead (sql/azure_local_ai--1.0--1.1.sql): the mailbox's first 4,096 places of 16 kB,
#: chosen by the first 12 bits of the answer's key, the MD5 of the model and the text. A later answer
#: takes the place of an earlier one (read by then, most likely: else its request asks).
KEPT_SLOT = 1 << 14


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
