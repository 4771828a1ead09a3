"""A bounded, seeded fuzz test of the proxy's handling of what clients send after start-up.

Why: drivers only send well-formed messages, so truncated bodies, missing NULs, invalid UTF-8, lying counts
and lengths, odd orders and bad types are exercised nowhere else; a mistake there is a traceback, a FATAL
XX000, a hung session or a dead proxy. Case N is random.Random(f"{SEED}:{N}") whatever ran before it, so a
reported case comes back with the same ALP_FUZZ_SEED; ALP_FUZZ_SECONDS bounds the run."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import re
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from proxy import protocol as pg

from .pgcluster import PgCluster
from .proxyproc import ProxyProcess, start_proxy
from .rawclient import RawClient

SEED = int(os.environ.get("ALP_FUZZ_SEED", "20250601"))
BUDGET_SECONDS = float(os.environ.get("ALP_FUZZ_SECONDS", "40"))
HEALTH_EVERY = 200  # messages sent between health checks
TIMEOUT = 10.0  # for the answer to the final Sync and probe
REPLAY_TIMEOUT = 3.0  # the same, replayed directly against PostgreSQL
PENDING_WAIT = 0.3  # listening to a stream whose last message is incomplete (the proxy rightly waits)
QUIET = 1.0  # silence after a refused probe that ends the reading
MAX_MESSAGE = 1 << 20  # the fuzz proxy's --max-message-size: longer messages are framing violations
MODEL = "multilingual-e5-small:v1"
FORBIDDEN = ("Traceback", "hook failed", "Task exception was never retrieved", "internal error")
TEXT, VARCHAR, INT4, INT8, TEXT_ARRAY, INT4_ARRAY = 25, 1043, 23, 20, 1009, 1007
TEXTS = ("query: hello", "passage: żółw 🐢 idzie", "", "it''s", "a b c " * 40, "NULL")  # SQL-quotable
BAD_UTF8 = (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82", b"\x80", b"\xc0\xaf")


@dataclass
class Msg:
    """One client message; `length` replaces the true length word (to lie about the body)."""

    type: int
    body: bytes = b""
    length: int | None = None

    def encode(self) -> bytes:
        if self.length is None:
            return pg.message(self.type, self.body)
        return struct.pack("!BI", self.type, self.length & 0xFFFFFFFF) + self.body

    def __repr__(self) -> str:
        name = chr(self.type) if 32 < self.type < 127 else f"{self.type:#04x}"
        lie = "" if self.length is None else f"(len={self.length})"
        return f"{name}{lie}{self.body[:60]!r}{'...' if len(self.body) > 60 else ''}"


@dataclass
class Case:
    """One session's messages, how they are cut into writes, and the mutations applied to them."""

    index: int
    messages: list[Msg]
    chunking: str  # "one" write, "each" message a write, or "split" at the fractions `cuts` of the stream
    cuts: tuple[float, ...]
    mutations: list[str]

    def writes(self) -> list[bytes]:
        if self.chunking == "each":
            return [m.encode() for m in self.messages]
        data = b"".join(m.encode() for m in self.messages)
        cuts = sorted({0, len(data), *(int(f * len(data)) for f in self.cuts)})
        return [data[a:b] for a, b in itertools.pairwise(cuts) if b > a]

    def __repr__(self) -> str:
        return f"case {self.index} ({self.chunking}; {', '.join(self.mutations) or 'unmutated'}): {self.messages}"


def cstr(text: str | bytes) -> bytes:
    return (text.encode() if isinstance(text, str) else text) + b"\0"


def query(sql: str) -> Msg:
    return Msg(pg.QUERY, cstr(sql))


def parse(name: bytes, sql: str, types: tuple[int, ...], count: int | None = None) -> Msg:
    declared = len(types) if count is None else count
    return Msg(pg.PARSE, cstr(name) + cstr(sql) + struct.pack(f"!H{len(types)}I", declared, *types))


def bind(portal: bytes, statement: bytes, values: list[bytes | None], formats: list[int], results: tuple[int, ...],
         value_count: int | None = None, format_count: int | None = None, lengths: dict[int, int] | None = None) -> Msg:
    """A Bind whose format count, value count and value lengths may lie about what follows."""
    count = len(formats) if format_count is None else format_count
    body = cstr(portal) + cstr(statement) + struct.pack(f"!H{len(formats)}h", count, *formats)
    body += struct.pack("!H", len(values) if value_count is None else value_count)
    for i, value in enumerate(values):
        length = (lengths or {}).get(i, -1 if value is None else len(value))
        body += struct.pack("!i", length) + (value or b"")
    return Msg(pg.BIND, body + struct.pack(f"!H{len(results)}h", len(results), *results))


def simple_sql(rng: random.Random) -> str:
    """A Query text: with and without calls, named arguments, arrays, several statements, errors."""
    m, t = f"'{MODEL}'", f"'{rng.choice(TEXTS)}'"
    depth = rng.choice((2, 60, 1000))
    return rng.choice((
        "SELECT 1",
        "/* azure_local_ai */ SELECT 'azure_local_ai.create_embeddings(' AS not_a_call",
        "select AZURE_LOCAL_AI.GET_SETTING('intra_op_parallelism')",
        "SELECT azure_local_ai.get_setting(ARRAY['spin_control', 'intra_op_parallelism'])",
        f"SELECT array_length(azure_local_ai.create_embeddings({m}, {t}), 1)",
        f"SELECT azure_local_ai.create_embeddings(model_uri => {m}, input => {t}, timeout_ms => 5000)",
        f"SELECT count(*) FROM azure_local_ai.create_embeddings({m}, ARRAY[{t}, 'b', NULL], batch_size => 2)",
        f"BEGIN; SELECT array_length(azure_local_ai.create_embeddings({m}, {t}), 1); COMMIT",
        f"SELECT azure_local_ai.create_embeddings({m}, {t}, timeout_ms => 1)",
        f"SELECT azure_local_ai.create_embeddings('nope:v9', {t})",
        f"SELECT azure_local_ai.create_embeddings({m}, t) FROM (VALUES ('a')) AS v(t)",
        "DO $$ BEGIN PERFORM azure_local_ai.get_setting('spin_control'); END $$",
        f"SELECT azure_local_ai.create_embeddings({m}, ",
        "",
        "BEGIN",
        f"SELECT azure_local_ai.create_embeddings({m}, " + "ARRAY[" * depth + "'x'" + "]" * depth + ")",
    ))


PRIVILEGED_SQL = (
    "SELECT azure_local_ai.set_setting('spin_control', 'default')",
    "SELECT azure_local_ai.model_unload('nope:v1')",
    "SELECT 1; SELECT azure_local_ai.set_setting(ARRAY['spin_control'], ARRAY['default'])",
)

Values = Callable[[random.Random], list[str]]
#: Extended-protocol statements: SQL, parameter values, and the type lists a client may declare for them.
TEMPLATES: tuple[tuple[str, Values, tuple[tuple[int, ...], ...]], ...] = (
    ("SELECT azure_local_ai.create_embeddings($1, $2)", lambda r: [MODEL, r.choice(TEXTS)],
     ((), (0, 0), (TEXT, TEXT), (VARCHAR, TEXT))),
    ("SELECT array_length(azure_local_ai.create_embeddings($1, $2, $3), 1)",
     lambda r: [MODEL, r.choice(TEXTS), r.choice(("1", "5000", "-1", "abc", "2147483647"))], ((), (TEXT, TEXT, INT4))),
    ("SELECT count(*) FROM azure_local_ai.create_embeddings($1, $2::text[], batch_size => $3)",
     lambda r: [MODEL, r.choice(("{a,b,c}", "{}", '{"x y",NULL}', "{unterminated")), r.choice(("2", "0"))],
     ((), (TEXT, TEXT_ARRAY, INT8))),
    ("SELECT id FROM azure_local_ai.create_embeddings($1, $2, $3::int[])", lambda r: [MODEL, "{a,b}", "{7,8}"],
     ((TEXT, TEXT_ARRAY, 0), (0, 0, INT4_ARRAY))),
    ("SELECT azure_local_ai.get_setting($1)", lambda r: [r.choice(("spin_control", "nope", ""))], ((), (TEXT,))),
    (f"SELECT azure_local_ai.create_embeddings('{MODEL}', $1)", lambda r: [r.choice(TEXTS)], ((), (TEXT,))),
    ("SELECT azure_local_ai.set_setting($1, $2)", lambda r: ["spin_control", "default"], ((),)),
    ("SELECT azure_local_ai.create_embeddings($1, $2); SELECT 1", lambda r: [MODEL, "x"], ((),)),
)


def extended_batch(rng: random.Random) -> list[Msg]:
    """Parse [Describe S] (Bind [Describe P] Execute [Flush])+ [Close] Sync, with lying counts and values."""
    sql, make_values, type_lists = rng.choice(TEMPLATES)
    types = rng.choice(type_lists)
    name, portal = rng.choice((b"", b"", b"s1")), rng.choice((b"", b"", b"p1"))
    messages = [parse(name, sql, types, rng.choice((32768, 65535, len(types) + 1)) if rng.random() < 0.07 else None)]
    if rng.random() < 0.35:
        messages.append(Msg(pg.DESCRIBE, b"S" + cstr(name)))
    for _ in range(rng.choice((1, 1, 2, 3))):
        values: list[bytes | None] = [v.encode() for v in make_values(rng)]
        formats: list[int] = []
        if types and rng.random() < 0.2:  # binary where the declared type allows, arrays lying about their size
            formats = [int(t in (INT4, TEXT_ARRAY)) for t in types[: len(values)]]
            for i, oid in enumerate(types[: len(values)]):
                text = values[i] or b""
                if oid == INT4:
                    values[i] = struct.pack("!i", int(text)) if text.lstrip(b"-").isdigit() else b"\0\0"
                elif oid == TEXT_ARRAY:
                    values[i] = struct.pack("!6i", 1, 0, TEXT, rng.choice((1, 0, 2, 3000, -1)), 1, 1) + b"a"
        roll, i = rng.random(), rng.randrange(max(len(values), 1))
        value_count = rng.choice((65535, 32768, len(values) + 1)) if 0.12 <= roll < 0.16 else None
        format_count = rng.choice((65535, len(values) + 3)) if 0.16 <= roll < 0.19 else None
        lengths = {i: rng.choice((0x7FFFFFFF, 1_000_000, -2, 300))} if 0.19 <= roll < 0.24 else {}
        if roll < 0.12:  # too few or too many values
            values = values[:-1] if roll < 0.06 else [*values, b"extra"]
        elif 0.24 <= roll < 0.34 and values:  # an invalid UTF-8 value, or a NULL
            values[i] = (values[i] or b"") + rng.choice(BAD_UTF8) if roll < 0.30 else None
        messages.append(bind(portal, name, values, formats, rng.choice(((), (), (1,), (1, 0))),
                             value_count=value_count, format_count=format_count, lengths=lengths))
        if rng.random() < 0.35:
            messages.append(Msg(pg.DESCRIBE, b"P" + cstr(portal)))
        messages.append(Msg(pg.EXECUTE, cstr(portal) + struct.pack("!i", rng.choice((0, 0, 1, -1)))))
        if rng.random() < 0.15:
            messages.append(Msg(pg.FLUSH))
    if rng.random() < 0.25:
        messages.append(rng.choice((Msg(pg.CLOSE, b"S" + cstr(name)), Msg(pg.CLOSE, b"P" + cstr(portal)))))
    return [*messages, Msg(pg.SYNC)]


MUTATIONS = {"truncate": 10, "drop NUL": 8, "flip bit": 10, "insert bytes": 5, "invalid UTF-8": 9, "renumber $n": 4,
             "bad type": 9, "lying length": 11, "move": 11, "drop": 5, "duplicate": 5, "extra Sync": 6,
             "extra Flush": 3, "Query in batch": 5, "FunctionCall": 3}


def mutate(rng: random.Random, msgs: list[Msg], kind: str) -> bool:
    """Apply mutation `kind` in place; False when the messages offer nothing for it."""
    at = rng.randint(0, len(msgs))
    target = rng.choice(msgs) if msgs else None
    body = target.body if target else b""
    nuls = [m for m in msgs if b"\0" in m.body]
    texts = [m for m in msgs if m.type in (pg.QUERY, pg.PARSE, pg.BIND) and m.body]
    numbered = [m for m in msgs if m.type in (pg.QUERY, pg.PARSE) and re.search(rb"\$\d", m.body)]
    if kind == "truncate" and target and body:
        target.body = body[: rng.randrange(len(body))]
    elif kind == "flip bit" and target and body:
        i = rng.randrange(len(body))
        target.body = body[:i] + bytes([body[i] ^ 1 << rng.randrange(8)]) + body[i + 1:]
    elif kind == "drop NUL" and nuls:
        msg = rng.choice(nuls)
        i = rng.choice([i for i, b in enumerate(msg.body) if b == 0])
        msg.body = msg.body[:i] + msg.body[i + 1:]
    elif kind == "insert bytes" and target:
        i = rng.randint(0, len(body))
        target.body = body[:i] + rng.randbytes(rng.randint(1, 8)) + body[i:]
    elif kind == "invalid UTF-8" and texts:  # mostly inside a string literal
        msg = rng.choice(texts)
        quotes = [i + 1 for i, b in enumerate(msg.body) if b == ord("'")]
        i = rng.choice(quotes) if quotes and rng.random() < 0.7 else rng.randrange(len(msg.body))
        msg.body = msg.body[:i] + rng.choice(BAD_UTF8) + msg.body[i:]
    elif kind == "renumber $n" and numbered:  # $0, beyond the declared types, beyond int16 and int32
        msg = rng.choice(numbered)
        found = rng.choice(list(re.finditer(rb"\$\d+", msg.body)))
        new = rng.choice((b"$0", b"$9", b"$65536", b"$2147483648"))
        msg.body = msg.body[: found.start()] + new + msg.body[found.end():]
    elif kind == "bad type" and target:  # another frontend type over the same body, or none at all
        target.type = rng.choice((*b"QPBDECSHFdcfp", *b"ZTRK0n", 0, 0xFF, rng.randrange(256)))
    elif kind == "lying length" and target:  # below 4, beyond the bound, a little off, more than is sent
        target.length = rng.choice((0, 3, -1, MAX_MESSAGE + 1, 0x7FFFFFFF, 70_000, MAX_MESSAGE,
                                    len(body) + rng.choice((1, 3, 5, 9, 68))))
    elif kind == "move" and len(msgs) >= 2:
        msgs.insert(rng.randrange(len(msgs)), msgs.pop(rng.randrange(len(msgs))))
    elif kind == "drop" and len(msgs) >= 2:
        msgs.pop(rng.randrange(len(msgs)))
    elif kind == "duplicate" and target:
        msgs.insert(at, replace(target))
    elif kind in ("extra Sync", "extra Flush"):
        msgs.insert(at, Msg(pg.SYNC if kind == "extra Sync" else pg.FLUSH))
    elif kind == "Query in batch":  # PostgreSQL skips it (no ReadyForQuery) after an error in the batch
        msgs.insert(at, query(simple_sql(rng)))
    elif kind == "FunctionCall":  # pg_backend_pid(), answered with a ReadyForQuery
        msgs.insert(at, Msg(pg.FUNCTION_CALL, struct.pack("!ihhh", 2026, 0, 0, 0)))
    else:
        return False
    return True


def generate_case(index: int) -> Case:
    """Case `index`, the same every run: valid sequences (some pipelined, some ending with a privileged
    call, which makes the proxy run a query of its own on the session's connection), then mutations."""
    rng = random.Random(f"{SEED}:{index}")
    pipeline = rng.random() < 0.25  # as drivers' pipeline modes do: batches, and one Sync at the end
    messages: list[Msg] = []
    for _ in range(rng.choice((1, 1, 2, 2, 3, 4) if pipeline else (1, 1, 2, 2, 3))):
        if rng.random() < (0.2 if pipeline else 0.45):
            messages.append(query(simple_sql(rng)))
        else:
            messages += extended_batch(rng)[: -1 if pipeline else None]
    messages += [Msg(pg.SYNC)] * pipeline
    if rng.random() < 0.2:
        messages.append(query(rng.choice(PRIVILEGED_SQL)))
    mutations: list[str] = []
    if rng.random() < 0.75:
        for _ in range(rng.choice((1, 1, 1, 2, 2, 3))):
            kind = rng.choices(list(MUTATIONS), list(MUTATIONS.values()))[0]
            if mutate(rng, messages, kind):
                mutations.append(kind)
    chunking = rng.choices(("one", "each", "split"), (45, 35, 20))[0]
    cuts = tuple(rng.random() for _ in range(rng.randint(1, 6))) if chunking == "split" else ()
    return Case(index, messages, chunking, cuts, mutations)


def pending(stream: bytes) -> tuple[bool, int]:
    """Whether the proxy's framer is left waiting for the rest of a message (a violation comes first:
    it closes the session), and the empty Syncs before that point, each owed one ReadyForQuery."""
    pos = syncs = 0
    while pos + 5 <= len(stream):
        msg_type, length = struct.unpack_from("!BI", stream, pos)
        if msg_type not in pg.FRONTEND_TYPES or not 4 <= length <= MAX_MESSAGE:
            return False, syncs
        syncs += msg_type == pg.SYNC and length == 4
        pos += 1 + length
    return pos != len(stream), syncs


Outcome = tuple[str, list[dict[str, str]], str | None]  # kind, the errors received, the failure (None: fine)
Reply = tuple[bytes, bytes]  # a server message: type byte, body


def converse(port: int, case: Case, timeout: float) -> Outcome:
    """Log in, send the case, then (if the stream is intact) a Sync and a probe query; read until the
    probe is answered, the connection closes or the timeout; classify what came back."""
    incomplete, syncs = pending(b"".join(case.writes()))
    probe = f"fuzz-probe-{case.index}".encode()
    try:
        client = RawClient(port, timeout=timeout)
        client.login(application_name=f"fuzz-{case.index}")
    except (OSError, EOFError) as exc:
        return "no session", [], f"log-in failed: {exc!r}"
    with contextlib.closing(client):
        with contextlib.suppress(OSError):  # a write refused: the peer closed
            for chunk in case.writes():
                client.send(chunk)
            if not incomplete:  # ROLLBACK ends any transaction the case left open or failed
                client.send(pg.message(pg.SYNC) + pg.message(pg.QUERY, b"ROLLBACK; SELECT '" + probe + b"'\0"))
        replies, end = read_replies(client, None if incomplete else probe, PENDING_WAIT if incomplete else timeout,
                                    syncs + 2)
    return classify(incomplete, syncs, replies, end)


def read_replies(client: RawClient, probe: bytes | None, wait: float, owed: int) -> tuple[list[Reply], str]:
    """Messages until the probe's ReadyForQuery ("answered"), a close ("eof"; "reset" may have lost the
    peer's last words) or the deadline ("timeout"). PostgreSQL may refuse the probe (after a FunctionCall in
    an extended batch): `owed` ReadyForQuery, the last after an error, then QUIET seconds also end it."""
    deadline = time.monotonic() + wait
    replies: list[Reply] = []
    probed = False
    while (left := deadline - time.monotonic()) > 0:
        kinds = [kind for kind, _ in replies]
        refused = probe is not None and not probed and kinds.count(b"Z") >= owed and kinds[-2:] == [b"E", b"Z"]
        client.sock.settimeout(min(left, QUIET) if refused else left)
        try:
            msg = client.read_message()
        except EOFError:
            return replies, "eof"
        except ConnectionError:
            return replies, "reset"
        except TimeoutError:
            if refused:
                return replies, "refused"
            continue
        replies.append(msg)
        if probe is not None and msg[0] == b"D" and probe in msg[1]:
            probed = True
        elif probed and msg[0] == b"Z":
            return replies, "answered"
    return replies, "timeout"


def never(errors: list[dict[str, str]]) -> str | None:
    """What no session may get, however odd its input: an internal error, the proxy's marker (by which it
    makes the server fail a statement), or permission denied for the superuser the cases log in as."""
    for e in errors:
        if e.get("C") == "XX000" and (e.get("S") == "FATAL" or "azure-local-ai-proxy" in e.get("M", "")):
            return f"{e.get('S')} XX000: {e.get('M')}"
        if "azure_local_ai_proxy_error_" in e.get("M", "") + e.get("D", ""):
            return f"the proxy's marker reached the client: {e.get('M')}"
        if e.get("C") == "42501" and "azure_local_ai" in e.get("M", ""):
            return f"superuser refused: {e.get('M')}"
    return None


def classify(incomplete: bool, syncs: int, replies: list[Reply], end: str) -> Outcome:
    """Acceptable: the probe answered, every Sync with its ReadyForQuery; the proxy's FATAL 08P01 close (a
    framing violation, a body it cannot read); a reset (which may lose that FATAL); anything while the last
    message is incomplete. Failing: never(), any other close, a hang (unless PostgreSQL does not answer)."""
    errors = [pg.parse_fields(body) for kind, body in replies if kind == b"E"]
    fatal = next((e for e in errors if e.get("S") == "FATAL"), None)
    failure: str | None = None
    if incomplete:
        kind = "incomplete: " + ("waiting" if end == "timeout" else "closed")
    elif end in ("answered", "refused"):
        kind = "answered" + " with errors" * bool(errors) + ", probe refused" * (end == "refused")
        if [t for t, _ in replies].count(b"Z") < syncs + 2:
            kind = failure = "fewer ReadyForQuery than Syncs"
    elif end in ("eof", "reset") and fatal:
        kind = f"closed: FATAL {fatal.get('C')} from the {'server' if 'F' in fatal else 'proxy'}"
        if kind != "closed: FATAL 08P01 from the proxy":
            failure = f"{kind}: {fatal.get('M')}"
    elif end == "reset":
        kind = "closed: reset"
    elif end == "eof":
        kind = failure = "closed without an error"
    else:
        kind, failure = "hang", "hang: no ReadyForQuery after the final Sync"
    return kind, errors, never(errors) or failure


def health(port: int, timeout: float = 5.0) -> str | None:
    """None when another session embeds (extended protocol, 384 dimensions) and runs SELECT 1; else why not."""
    sql = f"SELECT array_length(azure_local_ai.create_embeddings('{MODEL}', 'health check'), 1)"
    messages = [parse(b"", sql, ()), bind(b"", b"", [], [], ()), Msg(pg.EXECUTE, b"\0\0\0\0\0"), Msg(pg.SYNC),
                query("SELECT 1")]
    try:
        with contextlib.closing(RawClient(port, timeout=timeout)) as client:
            client.login(application_name="fuzz-health")
            client.send(b"".join(m.encode() for m in messages))
            replies = client.read_until(b"Z") + client.read_until(b"Z")
    except (OSError, EOFError) as exc:
        return f"{type(exc).__name__}: {exc}"
    rows = [body[6:] for kind, body in replies if kind == b"D"]
    return None if rows == [b"384", b"1"] else f"got {replies!r:.300}"


def fuzz(proxy: ProxyProcess, server_port: int) -> tuple[str, list[str]]:
    """Run cases until the time budget is spent, with a health check every HEALTH_EVERY messages, after a
    hang and at the end. A hang or close counts only if PostgreSQL itself, sent the same case, answers it
    (a server's FATAL, say, may be lost in a reset). Returns a summary and the failures."""
    outcomes, codes, failures = Counter[str](), Counter[str](), list[str]()
    sessions = messages = checks = failed_checks = 0
    started, next_health, case, kind = time.monotonic(), HEALTH_EVERY, None, ""
    while True:
        over = time.monotonic() > started + BUDGET_SECONDS or not proxy.alive()
        if proxy.alive() and (over or kind.startswith("hang") or messages >= next_health):
            checks, next_health = checks + 1, messages + HEALTH_EVERY
            if (problem := health(proxy.port)) is not None:
                failed_checks += 1
                failures.append(f"health check failed: {problem}\n  after {case!r}")
        if over:
            break
        case = generate_case(sessions)
        kind, errors, failure = converse(proxy.port, case, TIMEOUT)
        replay = failure is not None and not never(errors)  # a hang or close: does PostgreSQL answer the case?
        if replay and not converse(server_port, case, REPLAY_TIMEOUT)[0].startswith("answered"):
            kind, failure = f"{kind} (nor does PostgreSQL answer)", None
        sessions, messages = sessions + 1, messages + len(case.messages)
        outcomes[kind] += 1
        codes.update(e.get("C", "?") for e in errors)
        if failure:
            failures.append(f"{failure}\n  {case!r}")
    return (f"fuzz: seed {SEED}: {sessions} sessions, {messages} messages in {time.monotonic() - started:.1f} s; "
            f"{checks} health checks, {failed_checks} failed; {len(failures) - failed_checks} failing cases\n"
            f"outcomes: {', '.join(f'{k} {v}' for k, v in outcomes.most_common())}\n"
            f"SQLSTATEs: {', '.join(f'{k} {v}' for k, v in codes.most_common())}"), failures


@pytest.mark.timeout(600)
def test_fuzz_client_protocol(pg: PgCluster, model_data_dir: Path, tmp_path: Path) -> None:
    """Mutated sessions never crash the proxy, hang a synced session, get XX000, log a traceback, or stop others
    embedding. A private data directory (models linked) keeps set_setting away from the shared catalog."""
    data_dir = tmp_path / "fuzz-data"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(model_data_dir / "models")
    proxy = start_proxy(data_dir, "--max-message-size", str(MAX_MESSAGE), upstream=pg.url())
    try:
        assert health(proxy.port, timeout=120) is None, "the fuzz proxy is not healthy after start"
        summary, failures = fuzz(proxy, pg.port)
        alive = proxy.alive()
    finally:
        proxy.stop(timeout=10)
    print("\n" + summary)
    bad_log = [line[:300] for line in proxy.log.splitlines() if any(f in line for f in FORBIDDEN)]
    problems = ([] if alive else ["the proxy died"]) + failures + bad_log[:5]
    assert not problems, summary + "\n" + "\n".join(problems[:20])
