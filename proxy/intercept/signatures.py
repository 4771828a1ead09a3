"""The twelve functions of the azure_local_ai schema, and PostgreSQL's way of choosing among
overloads, restricted to what tells these overloads apart: argument count, argument names, and
whether the distinguishing argument is an array."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .errors import CallError

SCHEMA = "azure_local_ai"
DEFAULT_TIMEOUT_MS = 3_600_000
DEFAULT_BATCH_SIZE = 128

_REQUIRED = object()


class ArgKind(Enum):
    """What an argument is, as far as overload resolution cares."""

    SCALAR = "scalar"
    ARRAY = "array"
    UNKNOWN = "unknown"  # an untyped literal or parameter: PostgreSQL resolves it to text


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # the SQL type as \df shows it
    default: object = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    @property
    def is_array(self) -> bool:
        return self.type.endswith("[]") or self.type == "anyarray"


@dataclass(frozen=True)
class Overload:
    function: str
    params: tuple[Param, ...]
    returns: str  # the result type (of each row, for set-returning overloads)
    columns: tuple[tuple[str, str], ...] = ()  # TABLE(...) columns of set-returning overloads

    @property
    def set_returning(self) -> bool:
        return bool(self.columns)

    def signature(self) -> str:
        return f"{SCHEMA}.{self.function}({', '.join(p.type for p in self.params)})"


_TIMEOUT = Param("timeout_ms", "integer", DEFAULT_TIMEOUT_MS)
_BATCH = Param("batch_size", "bigint", DEFAULT_BATCH_SIZE)
_URI = Param("model_uri", "text")

OVERLOADS: dict[str, tuple[Overload, ...]] = {
    "create_embeddings": (
        Overload("create_embeddings", (_URI, Param("input", "text"), _TIMEOUT), "real[]"),
        Overload("create_embeddings", (_URI, Param("inputs", "text[]"), _BATCH, _TIMEOUT), "real[]",
                 (("embedding", "real[]"),)),
        Overload("create_embeddings", (_URI, Param("inputs", "text[]"), Param("ids", "anyarray"), _BATCH, _TIMEOUT),
                 "record", (("id", "anyelement"), ("embedding", "real[]"))),
    ),
    "get_setting": (
        Overload("get_setting", (Param("keys", "text[]", ()), _TIMEOUT), "jsonb"),
        Overload("get_setting", (Param("key", "text"), _TIMEOUT), "text"),
    ),
    "model_loaded": (Overload("model_loaded", (_URI, _TIMEOUT), "boolean"),),
    "model_metadata": (Overload("model_metadata", (_URI,), "jsonb"),),
    "model_register": (
        Overload("model_register", (_URI, Param("model_path", "text"), Param("tokenizer_path", "text", None), _TIMEOUT),
                 "bigint"),
    ),
    "model_unload": (Overload("model_unload", (_URI, _TIMEOUT), "void"),),
    "model_unregister": (Overload("model_unregister", (_URI, _TIMEOUT), "void"),),
    "set_setting": (
        Overload("set_setting", (Param("keys", "text[]"), Param("values", "text[]"), _TIMEOUT), "void"),
        Overload("set_setting", (Param("key", "text"), Param("value", "text"), _TIMEOUT), "void"),
    ),
}

#: Functions that change state: they need the privileges of REFERENCE.md, "Permissions".
PRIVILEGED = frozenset({"set_setting", "model_register", "model_unregister", "model_unload"})


@dataclass(frozen=True)
class Binding:
    """An overload with each of its parameters bound to a call's argument index (or None: default)."""

    overload: Overload
    arg_for_param: tuple[int | None, ...]


def resolve(function: str, positional: list[ArgKind], named: dict[str, ArgKind]) -> Binding:
    """Choose the overload a call means, as PostgreSQL would: the arguments must fit the
    parameters by position and name, and an array argument only fits an array parameter (an
    unknown-typed one fits both, preferring text when both overloads fit)."""
    candidates: list[tuple[int, Binding]] = []
    for overload in OVERLOADS[function]:
        binding = _bind(overload, positional, named)
        if binding is None:
            continue
        kinds = positional + list(named.values())
        unknown_as_array = sum(
            1 for param, index in zip(overload.params, binding.arg_for_param, strict=True)
            if index is not None and param.is_array and kinds[index] is ArgKind.UNKNOWN
        )
        candidates.append((unknown_as_array, binding))
    if not candidates:
        described = ", ".join([k.value for k in positional] + [f"{n} => {k.value}" for n, k in named.items()])
        raise CallError(
            "42883",
            f"function {SCHEMA}.{function}({described}) does not exist",
            "No function matches the given name and argument types. You might need to add explicit type casts. "
            f"Candidates: {'; '.join(o.signature() for o in OVERLOADS[function])}",
        )
    candidates.sort(key=lambda c: c[0])
    if len(candidates) > 1 and candidates[0][0] == candidates[1][0]:
        raise CallError("42725", f"function {SCHEMA}.{function} is not unique",
                              "Could not choose a best candidate function. You might need to add explicit type casts.")
    return candidates[0][1]


def _bind(overload: Overload, positional: list[ArgKind], named: dict[str, ArgKind]) -> Binding | None:
    params = overload.params
    if len(positional) > len(params):
        return None
    slots: list[int | None] = [None] * len(params)
    for i, kind in enumerate(positional):
        if not _fits(params[i], kind):
            return None
        slots[i] = i
    names = {p.name: i for i, p in enumerate(params)}
    for offset, (name, kind) in enumerate(named.items()):
        index = names.get(name)
        if index is None or slots[index] is not None or not _fits(params[index], kind):
            return None
        slots[index] = len(positional) + offset
    if any(slot is None and param.required for slot, param in zip(slots, params, strict=True)):
        return None
    return Binding(overload, tuple(slots))


def _fits(param: Param, kind: ArgKind) -> bool:
    if kind is ArgKind.UNKNOWN:
        return True
    return param.is_array == (kind is ArgKind.ARRAY)
