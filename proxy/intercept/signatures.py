"""The twelve functions of the azure_local_ai schema, and PostgreSQL's way of choosing among
overloads, over the few types their arguments can have."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CallError

SCHEMA = "azure_local_ai"
DEFAULT_TIMEOUT_MS = 3_600_000
DEFAULT_BATCH_SIZE = 128

_REQUIRED = object()


#: An argument's type as PostgreSQL names it; UNKNOWN for an untyped literal or parameter (and, for
#: want of better, for columns and other expressions the proxy cannot type).
UNKNOWN = "unknown"

#: (type category, preferred in it) of the types calls can pass, as pg_type says.
_CATEGORY = {
    "text": ("S", True), "character varying": ("S", False), "character": ("S", False), "name": ("S", False),
    "smallint": ("N", False), "integer": ("N", False), "bigint": ("N", False), "numeric": ("N", False),
    "double precision": ("N", True), "boolean": ("B", True), "anyarray": ("P", False),
}
#: Implicit casts between those types (PostgreSQL's pg_cast, context 'i'), the identity aside.
_IMPLICIT = {
    "text": {"character varying", "character", "name"},
    "integer": {"smallint"},
    "bigint": {"smallint", "integer"},
}


def category(type_name: str) -> tuple[str, bool]:
    """A type's category and whether it is the category's preferred type."""
    if type_name.endswith("[]"):
        return "A", False
    return _CATEGORY.get(type_name, ("U", False))


def can_coerce(arg: str, param: str) -> bool:
    """Whether an argument of type `arg` may be passed for a parameter of type `param` implicitly."""
    if arg in (UNKNOWN, param):
        return True
    if param == "anyarray":
        return arg.endswith("[]")
    if param.endswith("[]") and arg.endswith("[]"):
        return arg[:-2] in _IMPLICIT.get(param[:-2], ())
    return arg in _IMPLICIT.get(param, ())


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # the SQL type as \df shows it
    default: object = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


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


def resolve(function: str, positional: list[str], named: dict[str, str]) -> Binding:
    """Choose the overload a call means from its arguments' types, by PostgreSQL's rules (the
    "Function" section of its type conversion chapter): candidates that take the arguments, then the
    most exact matches, the most preferred types, a category for unknown arguments (string first),
    and the last-gasp rule for one known type. Raises 42883 (none fits) or 42725 (no best one)."""
    arg_types = positional + list(named.values())
    candidates: list[tuple[Binding, list[str]]] = []
    for overload in OVERLOADS[function]:
        binding = _bind(overload, positional, named)
        if binding is not None:
            param_types = [""] * len(arg_types)
            for param, index in zip(overload.params, binding.arg_for_param, strict=True):
                if index is not None:
                    param_types[index] = param.type
            candidates.append((binding, param_types))
    if not candidates:
        described = ", ".join(positional + [f"{n} => {t}" for n, t in named.items()])
        raise CallError(
            "42883",
            f"function {SCHEMA}.{function}({described}) does not exist",
            "No function matches the given name and argument types. You might need to add explicit type casts.",
        )
    chosen = _best_candidate(arg_types, candidates)
    if chosen is None:
        raise CallError("42725", f"function {SCHEMA}.{function}({', '.join(arg_types)}) is not unique",
                        "Could not choose a best candidate function. You might need to add explicit type casts.")
    return chosen


def _best_candidate(args: list[str], candidates: list[tuple[Binding, list[str]]]) -> Binding | None:
    if len(candidates) == 1:
        return candidates[0][0]
    known = [i for i, t in enumerate(args) if t != UNKNOWN]
    for score in (
        lambda params: sum(params[i] == args[i] for i in known),  # exact matches
        lambda params: sum(params[i] == args[i] or category(params[i]) == (category(args[i])[0], True)
                           for i in known),  # preferred types of the argument's own category
    ):
        best = max(score(params) for _, params in candidates)
        candidates = [c for c in candidates if score(c[1]) == best]
        if len(candidates) == 1:
            return candidates[0][0]
    unknown = [i for i, t in enumerate(args) if t == UNKNOWN]
    slots = [_unknown_slot(i, candidates) for i in unknown]
    if unknown and all(slot is not None for slot in slots):
        kept = [c for c in candidates if all(
            category(c[1][i])[0] == slot[0] and (not slot[1] or category(c[1][i])[1])  # type: ignore[index]
            for i, slot in zip(unknown, slots, strict=True))]
        if len(kept) == 1:
            return kept[0][0]
        candidates = kept or candidates
    if unknown and known and len({args[i] for i in known}) == 1:
        assumed = args[known[0]]
        fitting = [c for c in candidates if all(can_coerce(assumed, p) for p in c[1])]
        if len(fitting) == 1:
            return fitting[0][0]
    return None


def _unknown_slot(index: int, candidates: list[tuple[Binding, list[str]]]) -> tuple[str, bool] | None:
    """The category an unknown argument takes among the candidates (string wins a conflict), and
    whether a preferred type is among them; None when the candidates disagree with no string."""
    slot: tuple[str, bool] | None = None
    conflict = False
    for _, params in candidates:
        cat, preferred = category(params[index])
        if slot is None:
            slot = (cat, preferred)
        elif cat == slot[0]:
            slot = (cat, slot[1] or preferred)
        elif cat == "S":
            slot = (cat, preferred)
        else:
            conflict = True
    if conflict and slot is not None and slot[0] != "S":
        return None
    return slot


def _bind(overload: Overload, positional: list[str], named: dict[str, str]) -> Binding | None:
    params = overload.params
    if len(positional) > len(params):
        return None
    slots: list[int | None] = [None] * len(params)
    for i, arg_type in enumerate(positional):
        if not can_coerce(arg_type, params[i].type):
            return None
        slots[i] = i
    names = {p.name: i for i, p in enumerate(params)}
    for offset, (name, arg_type) in enumerate(named.items()):
        index = names.get(name)
        if index is None or slots[index] is not None or not can_coerce(arg_type, params[index].type):
            return None
        slots[index] = len(positional) + offset
    if any(slot is None and param.required for slot, param in zip(slots, params, strict=True)):
        return None
    return Binding(overload, tuple(slots))
