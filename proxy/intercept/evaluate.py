"""From a call site to the SQL that replaces it: read the arguments (constants or bind values), run
the function, render its value. Functions are strict: a NULL argument gives NULL (no rows for the
set-returning overloads) and does nothing."""

from __future__ import annotations

from collections.abc import Sequence

from .arrays import ArrayLiteralError, parse_text_array
from .functions import Backend, CallError
from .render import replace_rows, replace_scalar
from .signatures import Param
from .sqlcalls import BindRef, CallSite, Const, Dependent

#: Decoded bind parameter values by position ($1 is index 0); text or None.
BindValues = Sequence[str | None]


async def replacement(call: CallSite, backend: Backend, binds: BindValues | None = None) -> str:
    """The SQL text that stands in for `call`, after running it."""
    overload = call.binding.overload
    args: dict[str, object] = {}
    for param in overload.params:
        if param.type == "anyarray":  # ids pass through to the server as written
            continue
        value = _argument(call, param, binds)
        if value is None:
            return _null_result(call)
        args[param.name] = value
    function = call.function
    timeout_ms = int(args.get("timeout_ms", 0))  # type: ignore[call-overload]
    if function == "create_embeddings":
        if "input" in args:
            (vector,) = await backend.create_embeddings(str(args["model_uri"]), [str(args["input"])], None, timeout_ms)
            return replace_scalar(call, "real[]", vector)
        inputs: list[str | None] = args["inputs"]  # type: ignore[assignment]
        ids = call.argument("ids")
        if ids is not None:
            _check_ids(ids.value, len(inputs))
        vectors = await backend.create_embeddings(
            str(args["model_uri"]), inputs, int(args["batch_size"]), timeout_ms  # type: ignore[call-overload]
        )
        return replace_rows(call, vectors, ids.text if ids is not None else None)
    if function == "get_setting":
        if "key" in args:
            return replace_scalar(call, "text", await backend.get_setting(str(args["key"])))
        return replace_scalar(call, "jsonb", await backend.get_settings(args["keys"]))  # type: ignore[arg-type]
    if function == "set_setting":
        if "key" in args:
            pairs = {str(args["key"]): str(args["value"])}
        else:
            keys: list[str | None] = args["keys"]  # type: ignore[assignment]
            values: list[str | None] = args["values"]  # type: ignore[assignment]
            if len(keys) != len(values):
                raise CallError("22023", f"keys and values must have the same length ({len(keys)} and {len(values)})")
            if any(k is None or v is None for k, v in zip(keys, values, strict=True)):
                raise CallError("22004", "setting keys and values must not be NULL")
            pairs = dict(zip(keys, values, strict=True))  # type: ignore[arg-type]
        await backend.set_settings(pairs)
        return replace_scalar(call, "void", "")
    uri = str(args["model_uri"])
    if function == "model_loaded":
        return replace_scalar(call, "boolean", await backend.model_loaded(uri))
    if function == "model_metadata":
        return replace_scalar(call, "jsonb", await backend.model_metadata(uri))
    if function == "model_register":
        tokenizer = args.get("tokenizer_path")
        model_id = await backend.model_register(uri, str(args["model_path"]), str(tokenizer) if tokenizer else None)
        return replace_scalar(call, "bigint", model_id)
    if function == "model_unload":
        await backend.model_unload(uri)
        return replace_scalar(call, "void", "")
    if function == "model_unregister":
        await backend.model_unregister(uri)
        return replace_scalar(call, "void", "")
    raise CallError("42883", f"function azure_local_ai.{function} is not implemented")


def _null_result(call: CallSite) -> str:
    overload = call.binding.overload
    if overload.set_returning:
        ids = call.argument("ids")
        return replace_rows(call, None, ids.text if ids is not None else None)
    return replace_scalar(call, overload.returns, None)


def _argument(call: CallSite, param: Param, binds: BindValues | None) -> object:
    """The value of a parameter, converted to its type; None for SQL NULL."""
    arg = call.argument(param.name)
    if arg is None:
        return param.default
    value = arg.value
    if isinstance(value, Dependent):
        raise CallError(
            "0A000",
            f"azure_local_ai.{call.function}: the argument {param.name} is {value.reason}; "
            "azure-local-ai-proxy evaluates calls whose arguments are constants or bind parameters",
            "Pass the value as a literal or a parameter.",
        )
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


def _check_ids(value: object, count: int) -> None:
    if isinstance(value, Const) and isinstance(value.value, list) and len(value.value) != count:
        raise CallError("22023", f"ids has {len(value.value)} elements but inputs has {count}",
                        "Give one id per input.")
