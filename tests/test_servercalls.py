"""The pure parts of the server-call channel: the start-up parameter, the request notices, the answers."""

from __future__ import annotations

import hashlib
import itertools
import json

import numpy as np
import pytest

from proxy.intercept.lookahead import RowInput
from proxy.intercept.rowinserts import _bound_inputs
from proxy.intercept.serverrequests import (
    KEPT_SLOT,
    REQUEST_CODE,
    WAITING_CODE,
    encode_answer,
    kept_answers,
    kept_key,
    kept_place,
    parse_request,
)
from proxy.mailbox import Mailbox
from proxy.messages import Bind

MODEL = "multilingual-e5-small:v1"


def notice(code: str, message: str, detail: str | None = None) -> bytes:
    fields = [b"SNOTICE", b"VNOTICE", b"C" + code.encode(), b"M" + message.encode()]
    if detail is not None:
        fields.append(b"D" + detail.encode())
    return b"\0".join(fields) + b"\0\0"


def test_a_mailbox_is_read_from_its_setting_and_nothing_else_is_one() -> None:
    mailbox = Mailbox.new()
    oid, secret = mailbox.setting.split(" ")
    assert 1 << 31 <= int(oid) < 1 << 32 and len(secret) == 32
    assert Mailbox.parse(mailbox.setting) == mailbox
    assert Mailbox.new().setting != mailbox.setting
    for bad in ["", "1234 " + "a" * 32, f"{oid} short", f"{oid} {'A' * 32}", f"{oid}  {secret}", f"{1 << 32} {secret}",
                f"{oid} {secret} more"]:
        with pytest.raises(ValueError):
            Mailbox.parse(bad)


def test_a_request_of_1_4_names_its_transactions_mailbox_and_backend() -> None:
    mailbox = Mailbox.new()
    request = {"id": "0123456789abcdef0123456789abcdef", "at": 8192, "fn": "create_embeddings",
               "args": {"input": "x"}, "role": "alice", "kept": True, "keyed": True,
               "box": str(mailbox.oid), "secret": mailbox.secret, "pid": 4242}
    parsed = parse_request(notice(REQUEST_CODE, "azure-local-ai-proxy request", json.dumps(request)))
    assert not isinstance(parsed, bool)
    assert (parsed.mailbox, parsed.backend_pid, parsed.reads_kept, parsed.keyed) == (mailbox, 4242, True, True)
    forged = parse_request(notice(REQUEST_CODE, "azure-local-ai-proxy request",
                                  json.dumps({**request, "box": "12"})))  # not a mailbox's OID
    assert forged is False


def test_requests_keep_alives_and_other_notices() -> None:
    request = {"id": "0123456789abcdef0123456789abcdef", "at": 8192, "fn": "create_embeddings",
               "args": {"input": "x"}, "role": "alice"}
    parsed = parse_request(notice(REQUEST_CODE, "azure-local-ai-proxy request", json.dumps(request)))
    assert not isinstance(parsed, bool)
    assert (parsed.id, parsed.at, parsed.function, parsed.args, parsed.role) == (
        request["id"], 8192, "create_embeddings", {"input": "x"}, "alice")
    assert parse_request(notice(WAITING_CODE, "azure-local-ai-proxy waiting")) is True
    assert parse_request(notice("00000", "relation t already exists, skipping")) is False
    assert parse_request(notice(REQUEST_CODE, "a user's own notice")) is False
    assert parse_request(notice(REQUEST_CODE, "azure-local-ai-proxy request", "{not json")) is False
    bad_id = json.dumps({**request, "id": "x'; drop table t; --"})
    assert parse_request(notice(REQUEST_CODE, "azure-local-ai-proxy request", bad_id)) is False
    too_far = json.dumps({**request, "at": 1 << 42})
    assert parse_request(notice(REQUEST_CODE, "azure-local-ai-proxy request", too_far)) is False


def test_an_answer_is_what_the_sql_function_reads_and_checks() -> None:
    mailbox = Mailbox(1 << 31, "s" * 32)
    request_id = "f" * 32
    answer = encode_answer(mailbox, request_id, "V", "{0.5,-1}ü")
    head, payload = answer[:75], answer[75:]
    assert head[:32] == request_id.encode() and head[32:33] == b"V"
    assert int(head[33:43]) == len(payload) == len("{0.5,-1}ü".encode())
    # The function's check: md5(secret || the first 43 characters || the payload), in hex.
    assert head[43:].decode() == hashlib.md5(mailbox.secret.encode() + head[:43] + payload).hexdigest()
    assert encode_answer(Mailbox(1 << 31, "t" * 32), request_id, "V", "{0.5,-1}ü")[43:75] != head[43:]


def test_answers_kept_ahead_take_one_place_each() -> None:
    """The key is what the SQL function computes (md5 of the model, a newline and the text); a place
    holds the first text that falls on it, and an answer larger than a place is not kept."""
    mailbox = Mailbox(1 << 31, "s" * 32)
    key = kept_key("m", "héllo")
    assert key == hashlib.md5("m\nhéllo".encode()).hexdigest()
    assert kept_place(key) == int(key[:3], 16) * KEPT_SLOT < 64 << 20  # the first 64 MB of the mailbox
    assert kept_key("m", "lone \ud800 surrogate") is None
    seen: dict[int, str] = {}
    for i in itertools.count():
        text = f"text {i}"
        place = kept_place(kept_key("m", text))
        if place in seen:
            first, second = seen[place], text
            break
        seen[place] = text
    vectors = [np.full(4, n, dtype=np.float32) for n in (1, 2, 3)]
    kept = kept_answers(mailbox, "m", [first, second, "another"], vectors)
    assert len(kept) == 2 and kept[place] == encode_answer(mailbox, kept_key("m", first), "V", "{1,1,1,1}")
    assert kept_answers(mailbox, "m", ["wide"], [np.full(8192, 0.123456789, dtype=np.float32)]) == {}
    request = {"id": "0" * 32, "at": 0, "fn": "create_embeddings", "args": {}, "role": "r"}
    for extra, reads_kept in (({}, False), ({"kept": True}, True)):
        parsed = parse_request(notice(REQUEST_CODE, "azure-local-ai-proxy request", json.dumps({**request, **extra})))
        assert not isinstance(parsed, bool) and parsed.reads_kept is reads_kept


def test_a_bound_text_is_read_in_text_format_or_as_binary_text() -> None:
    """A prepared one-row INSERT's text comes from its Bind: any value in text format, and a binary one
    only where the parameter is declared text (a binary integer's bytes are not its text)."""
    inputs = [RowInput(MODEL, param=1), RowInput(MODEL, text="a constant")]
    text_format = Bind("", "s", (), ("héllo".encode(), b"2"), ())
    assert _bound_inputs(text_format, inputs, ()) == [(MODEL, "héllo"), (MODEL, "a constant")]
    binary = Bind("", "s", (1,), (b"bin", b"\0\0\0\2"), ())
    assert _bound_inputs(binary, inputs, (25, 23)) == [(MODEL, "bin"), (MODEL, "a constant")]
    assert _bound_inputs(binary, inputs, (23, 23)) == [(MODEL, "a constant")]
    mixed = Bind("", "s", (0, 1), (None, b"x"), ())
    assert _bound_inputs(mixed, inputs, ()) == [(MODEL, "a constant")]  # NULL: nothing to embed
    invalid = Bind("", "s", (), (b"\xff\xfe", b"2"), ())
    assert _bound_inputs(invalid, inputs, ()) == [(MODEL, "a constant")]
