"""From a call site to the SQL that replaces it: read the arguments (constants or bind values), run
the function, render its value. Functions are strict: a NULL argument gives NULL (no rows for the
set-returning overloads) and does nothing; only a parameter whose default is NULL (model_register's
tokenizer_path) may be NULL."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from inference.engine import Usage

from ..stats import STATS
from .arrays import ArrayLiteralError, parse_text_array
from .errors import CallError
from .functions import Backend
from .render import embeddings_text_array, real_array_text, replace_rows, replace_scalar
from .signatures import Param
from .sqlcalls import BindRef, CallSite, Const, Dependent

#: Decoded bind parameter values by position ($1 is index 0): text, int, a list for arrays, or None.
BindValues = Sequence[object]


@dataclass(frozen=True)
class Value:
    """A call's result: a scalar of `sql_type`, or (sql_type "rows") the embeddings of a set-returning call."""

    sql_type: str
    value: object  # None is SQL NULL (no rows, for "rows")


#: The most SQL text the rows of one set-returning call may take: PostgreSQL's scanner grows a
#: string constant by doubling, up to its 1 GB allocation limit, so one must stay under 512 MB.
MAX_ROWS_TEXT = (1 << 29) - 1
#: An upper bound of the text of one float in an embedding ("-0.012241181," and its quoting).
_TEXT_PER_FLOAT = 16
#: Results of more rows than this are rendered in a worker thread, away from the event loop.
_RENDER_INLINE_ROWS = 64


async def replacement(call: CallSite, backend: Backend, binds: BindValues | None = None) -> str:
    """The SQL text that stands in for `call`, after running it (simple protocol: a literal)."""
    result = await compute(call, backend, binds)
    if _rows(result) > _RENDER_INLINE_ROWS:
        return await asyncio.to_thread(as_literal, call, result)
    return as_literal(call, result)


async def parameter(call: CallSite, backend: Backend, binds: BindValues | None = None) -> tuple[int, bytes | None]:
    """The value that stands in for `call` as a bind parameter (extended protocol), after running it."""
    result = await compute(call, backend, binds)
    if _rows(result) > _RENDER_INLINE_ROWS:
        return await asyncio.to_thread(as_parameter, result)
    return as_parameter(result)


def _rows(result: Value) -> int:
    return len(result.value) if result.sql_type == "rows" and result.value is not None else 0  # type: ignore[arg-type]


def as_literal(call: CallSite, result: Value) -> str:
    if result.sql_type == "rows":
        ids = call.argument("ids")
        return replace_rows(call, result.value, ids.text if ids is not None else None)  # type: ignore[arg-type]
    return replace_scalar(call, result.sql_type, result.value)


def as_text(result: Value) -> str | None:
    """The result in PostgreSQL's text form of its type (None: NULL), as the extension's SQL functions
    read it from the proxy's answer (servercalls.py)."""
    value = result.value
    if value is None:
        return None
    if result.sql_type == "real[]":
        return real_array_text(value)  # type: ignore[arg-type]
    if result.sql_type == "rows":
        return embeddings_text_array(value)  # type: ignore[arg-type]
    if result.sql_type == "jsonb":
        return json.dumps(value, separators=(", ", ": "))
    if result.sql_type == "boolean":
        return "t" if value else "f"
    return str(value)


def as_parameter(result: Value) -> tuple[int, bytes | None]:
    """The result as a bind parameter (extended protocol): (format code, value). An embedding goes in
    binary, which spares formatting and parsing 384 floats as text."""
    value = result.value
    if value is None:
        return 0, None
    if result.sql_type == "real[]":
        return 1, real_array_binary(value)  # type: ignore[arg-type]
    if result.sql_type == "rows":
        return 0, embeddings_text_array(value).encode()  # type: ignore[arg-type]
    if result.sql_type == "jsonb":
        return 0, json.dumps(value, separators=(", ", ": ")).encode()
    if result.sql_type == "boolean":
        return 0, b"t" if value else b"f"
    return 0, str(value).encode()


_FLOAT4_OID = 700


def real_array_binary(vector: np.ndarray) -> bytes:
    """PostgreSQL's binary format of a one-dimensional real[]: header, then (length 4, float) pairs."""
    count = len(vector)
    header = np.array([1, 0, _FLOAT4_OID, count, 1], dtype=">i4").tobytes()
    items = np.empty(count, dtype=[("length", ">i4"), ("value", ">f4")])
    items["length"] = 4
    items["value"] = vector
    return header + items.tobytes()


async def compute(call: CallSite, backend: Backend, binds: BindValues | None = None) -> Value:
    """Run the call with its arguments' values."""
    overload = call.binding.overload
    args: dict[str, object] = {}
    for param in overload.params:
        if param.type == "anyarray":  # ids pass through to the server as written
            continue
        value = _argument(call, param, binds)
        if value is None and param.default is not None:  # strict, but for parameters whose default is NULL
            return Value("rows" if overload.set_returning else overload.returns, None)
        args[param.name] = value
    ids = call.argument("ids")
    known_ids = ids.value.value if ids is not None and isinstance(ids.value, Const) else None
    ids_count = len(known_ids) if isinstance(known_ids, list) else None
    return await run(call.function, args, backend, ids_count)


async def run(
    function: str, args: dict[str, object], backend: Backend, ids_count: int | None = None, *, origin: str = "sql",
    usage: Usage | None = None,
) -> Value:
    """Run one of the twelve functions with its arguments' values, by parameter name (the overload is
    told by which are there: input or inputs, key or keys); `ids_count`, where ids were given and known.
    Counted for the metrics by function and `origin` (stats.py); `usage` gets the tokens embedded."""
    started = time.perf_counter()
    try:
        return await _run(function, args, backend, ids_count, usage)
    finally:
        STATS.call_done(function, origin, time.perf_counter() - started)


async def _run(
    function: str, args: dict[str, object], backend: Backend, ids_count: int | None, usage: Usage | None
) -> Value:
    timeout_ms = int(args.get("timeout_ms", 0))  # type: ignore[call-overload]
    if function == "create_embeddings":
        if "input" in args:
            (vector,) = await backend.create_embeddings(str(args["model_uri"]), [str(args["input"])], None, timeout_ms,
                                                        usage=usage)
            return Value("real[]", vector)
        inputs: list[str | None] = args["inputs"]  # type: ignore[assignment]
        if ids_count is not None and ids_count != len(inputs):
            raise CallError("22023", f"ids has {ids_count} elements but inputs has {len(inputs)}",
                            "Give one id per input.")
        vectors = await backend.create_embeddings(
            str(args["model_uri"]), inputs, int(args["batch_size"]), timeout_ms,  # type: ignore[call-overload]
            max_text=MAX_ROWS_TEXT, text_per_value=_TEXT_PER_FLOAT, usage=usage,
        )
        return Value("rows", vectors)
    if function == "get_setting":
        if "key" in args:
            return Value("text", await backend.get_setting(str(args["key"])))
        return Value("jsonb", await backend.get_settings(args["keys"]))  # type: ignore[arg-type]
    if function == "set_setting":
        if "key" in args:
            pairs = {str(args["key"]): str(args["value"])}
        else:
            keys: list[str | None] = args["keys"]  # type: ignore[assignment]
            values: list[str | None] = args["values"]  # type: ignore[assignment]
            if len(keys) != len(values):
                raise CallError("2202E", f"keys and values must have the same length ({len(keys)} and {len(values)})")
            if any(k is None or v is None for k, v in zip(keys, values, strict=True)):
                raise CallError("22004", "setting keys and values must not be NULL")
            repeated = sorted({k for k in keys if keys.count(k) > 1})  # type: ignore[type-var]
            if repeated:
                raise CallError("22023", f"setting {repeated[0]} is given more than once", "Give each key once.")
            pairs = dict(zip(keys, values, strict=True))  # type: ignore[arg-type]
        await backend.set_settings(pairs)
        return Value("void", "")
    uri = str(args["model_uri"])
    if function == "model_loaded":
        return Value("boolean", await backend.model_loaded(uri))
    if function == "model_metadata":
        return Value("jsonb", await backend.model_metadata(uri))
    if function == "model_register":
        tokenizer = args.get("tokenizer_path")
        model_id = await backend.model_register(uri, str(args["model_path"]), str(tokenizer) if tokenizer else None)
        return Value("bigint", model_id)
    if function == "model_unload":
        await backend.model_unload(uri)
        return Value("void", "")
    if function == "model_unregister":
        await backend.model_unregister(uri)
        return Value("void", "")
    raise CallError("42883", f"function azure_local_ai.{function} is not implemented")


def _argument(call: CallSite, param: Param, binds: BindValues | None) -> object:
    """The value of a parameter, converted to its type; None for SQL NULL."""
    arg = call.argument(param.name)
    if arg is None:
        return param.default
    value = arg.value
    assert not isinstance(value, Dependent), "calls with such arguments are the server's (sqlcalls.py)"
    if isinstance(value, BindRef):
        if binds is None or value.number > len(binds):
            raise CallError("42P02", f"there is no parameter ${value.number}")
        raw: object = binds[value.number - 1]
    else:
        assert isinstance(value, Const)
        raw = value.value
    return _convert(raw, param)


def _convert(raw: object, param: Param) -> object:
    if raw is None:
        return None
    if param.type == "text[]":
        if isinstance(raw, list):
            return raw
        try:
            return parse_text_array(str(raw))
        except ArrayLiteralError as exc:
            raise CallError(exc.sqlstate, str(exc)) from exc
    if isinstance(raw, list):
        raise CallError("42804", f"argument {param.name} must be {param.type}, not an array")
    if param.type in ("integer", "bigint"):
        try:
            number = int(str(raw).strip())
        except ValueError as exc:
            raise CallError("22P02", f'invalid input syntax for type {param.type}: "{raw}"') from exc
        limit = 2**31 if param.type == "integer" else 2**63
        if not -limit <= number < limit:
            raise CallError("22003", f'value "{raw}" is out of range for type {param.type}')
        return number
    if isinstance(raw, bool):
        return "true" if raw else "false"
    return str(raw)
