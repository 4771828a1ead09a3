"""Prepared statements with azure_local_ai calls (extended query protocol).

At Parse, each call is replaced by a parameter of the proxy's own, numbered after the client's; the
server prepares that statement. At every Bind the calls run with that execution's values, and their
results travel as the extra parameters. One more extra parameter, the guard (int4, normally NULL),
lets a failing call fail the Bind on the server itself: the proxy sends a marker in it, the server
rejects it, and the proxy puts the call's own error in place of the server's. The client's view of
the statement (its parameter count and types) never shows the extra parameters."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from pglast.parser import scan

from ..messages import Bind, Parse
from .errors import CallError
from .render import rows_site, scalar_site, splice
from .sqlcalls import BindRef, CallSite, Statement

INT4, INT8, TEXT, BOOL, JSONB, TEXT_ARRAY, REAL_ARRAY = 23, 20, 25, 16, 3802, 1009, 1021
_RESULT_OIDS = {"real[]": REAL_ARRAY, "text": TEXT, "jsonb": JSONB, "boolean": BOOL, "bigint": INT8, "void": TEXT}
MAX_PARAMETERS = 65_535  # a Bind's count is 16 bits
_PARAM_OIDS = {"text": TEXT, "text[]": TEXT_ARRAY, "integer": INT4, "bigint": INT8}


@dataclass(frozen=True)
class PreparedCalls:
    """What the proxy keeps about one prepared statement that has calls."""

    calls: tuple[CallSite, ...]
    client_params: int  # how many parameters the client's statement has
    param_types: tuple[int, ...]  # all parameter types the server was told, extras included
    privileged_ok: bool | None  # the privilege check's answer at Parse time, if calls need one

    @property
    def guard(self) -> int:
        """0-based index of the guard parameter."""
        return self.client_params

    @property
    def extra(self) -> int:
        return len(self.param_types) - self.client_params


def rewrite_parse(
    parse: Parse, statements: Sequence[Statement], privileged_ok: bool | None
) -> tuple[Parse, PreparedCalls]:
    """The Parse to send upstream, and what to remember for the statement's Binds."""
    sql = parse.query
    calls = [c for s in statements for c in s.calls]
    client_params = max([len(parse.param_types), *_param_numbers(sql)], default=0)
    guard = client_params + 1
    replacements: list[tuple[int, int, str]] = []
    extra_types = [INT4]
    for offset, call in enumerate(calls):
        number = guard + 1 + offset
        overload = call.binding.overload
        if overload.set_returning:
            ids = call.argument("ids")
            text = rows_site(call, f"${number}::text[]", ids.text if ids is not None else None)
            extra_types.append(TEXT_ARRAY)
        else:
            cast = overload.returns
            text = scalar_site(call, f"${number}::{cast}")
            extra_types.append(_RESULT_OIDS[cast])
        replacements.append((call.start, call.end, text))
    rewritten = splice(sql, replacements)
    types = list(parse.param_types) + [0] * (client_params - len(parse.param_types))
    still_used = _param_numbers(rewritten)
    for call in calls:
        for param, index in zip(call.binding.overload.params, call.binding.arg_for_param, strict=True):
            if index is None or param.type == "anyarray":
                continue
            value = call.args[index].value
            if isinstance(value, BindRef) and types[value.number - 1] == 0 and value.number not in still_used:
                types[value.number - 1] = _PARAM_OIDS.get(param.type, TEXT)
    all_types = tuple(types + extra_types)
    if len(all_types) > MAX_PARAMETERS:
        raise CallError("54023", f"the statement's calls need {len(all_types)} parameters in all; PostgreSQL allows "
                        f"{MAX_PARAMETERS}", "Pass fewer parameters, or split the statement.")
    prepared = PreparedCalls(tuple(calls), client_params, all_types, privileged_ok)
    return Parse(parse.statement, rewritten, all_types), prepared


def failing_bind(bind: Bind, prepared: PreparedCalls) -> tuple[Bind, str]:
    """A Bind the server will reject (the guard carries a marker), and the marker to look for."""
    marker = f"azure_local_ai_proxy_error_{secrets.token_hex(8)}"
    extra: list[tuple[int, bytes | None]] = [(0, marker.encode())] + [(0, None)] * (prepared.extra - 1)
    return bind.with_extra_values(extra), marker


def bind_values(bind: Bind, prepared: PreparedCalls) -> list[object]:
    """The client's parameter values, decoded (text, int, or a list for arrays; None for NULL).
    Raises CallError as the server would for a value it cannot read (22021, 22P03)."""
    out: list[object] = []
    for index, raw in enumerate(bind.values[: prepared.client_params]):
        if raw is None:
            out.append(None)
        elif bind.format_of(index) == 0:
            out.append(_utf8(raw))
        else:
            try:
                out.append(decode_binary(prepared.param_types[index], raw))
            except (IndexError, ValueError) as exc:
                raise CallError("22P03", f"incorrect binary data format in bind parameter {index + 1}") from exc
    return out


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1].hex()
        raise CallError("22021", f'invalid byte sequence for encoding "UTF8": 0x{bad}') from exc


def decode_binary(oid: int, raw: bytes) -> object:
    """A binary-format parameter of one of the types the functions take."""
    if oid in (INT4, INT8, 21):
        if len(raw) not in (2, 4, 8):
            raise ValueError("integer of a wrong size")
        return int.from_bytes(raw, "big", signed=True)
    if oid in (TEXT_ARRAY, 1015, 1003, 1014):
        return _binary_text_array(raw)
    return _utf8(raw)


def _binary_text_array(raw: bytes) -> list[str | None]:
    ndim = int.from_bytes(raw[0:4], "big", signed=True)
    if ndim == 0:
        return []
    if ndim != 1:
        raise CallError("2202E", "inputs must be a one-dimensional array")
    count = int.from_bytes(raw[12:16], "big", signed=True)
    pos = 20
    values: list[str | None] = []
    for _ in range(count):
        length = int.from_bytes(raw[pos : pos + 4], "big", signed=True)
        pos += 4
        if length < 0:
            values.append(None)
        elif pos + length > len(raw):
            raise ValueError("array element past the end of the value")
        else:
            values.append(_utf8(raw[pos : pos + length]))
            pos += length
    return values


def _param_numbers(sql: str) -> set[int]:
    return {int(sql[t.start + 1 : t.end + 1]) for t in scan(sql) if t.name == "PARAM"}
