"""Finding azure_local_ai calls in SQL text with pglast, and reading their arguments.

A call's arguments are constants (literals, casts of literals, ARRAY[...] of them, concatenations),
bind parameters ($n, whose values arrive with Bind), or anything else ("dependent": a column, a
subquery, another function), which the proxy cannot evaluate by itself. Positions are character
offsets into the statement text, so that the caller can splice replacements into the user's own SQL."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

from pglast import ast, parse_sql
from pglast.parser import ParseError, scan
from pglast.visitors import Ancestor, Visitor

from .arrays import ArrayLiteralError, parse_text_array
from .errors import CallError
from .signatures import OVERLOADS, SCHEMA, ArgKind, Binding, resolve

_MARKER = re.compile(rb"azure_local_ai", re.IGNORECASE)

_TEXT_TYPES = frozenset({"text", "varchar", "bpchar", "name", "char", "character varying", "character"})
_INT_TYPES = frozenset({"int2", "int4", "int8", "integer", "bigint", "smallint"})
#: Array type OIDs a client may declare for a parameter (text[], varchar[], name[], bpchar[], int arrays, uuid[]).
_ARRAY_OIDS = frozenset({1009, 1015, 1003, 1014, 1005, 1007, 1016, 2951, 1000, 1021, 1022, 1231, 199, 3807})


def mentions_schema(body: bytes) -> bool:
    """The cheap pre-filter: only statements containing the schema's name go to the parser."""
    return _MARKER.search(body) is not None


class Position(Enum):
    TARGET = "target"  # the whole expression of a select-list (or RETURNING) entry
    FROM = "from"  # a function in FROM
    NESTED = "nested"  # anywhere else


@dataclass(frozen=True)
class Const:
    value: object  # str | int | bool | None | list[str | None]


@dataclass(frozen=True)
class BindRef:
    number: int  # $number, 1-based


@dataclass(frozen=True)
class Dependent:
    reason: str


ArgValue = Const | BindRef | Dependent


@dataclass(frozen=True)
class Arg:
    value: ArgValue
    kind: ArgKind
    text: str  # the argument's SQL text, without any `name =>`


@dataclass
class CallSite:
    """One call of an azure_local_ai function in a statement."""

    function: str
    binding: Binding
    args: list[Arg]
    start: int
    end: int  # exclusive: the offset just after the closing parenthesis
    position: Position
    has_alias: bool = False  # a FROM function with its own alias, or a target with AS
    statement: int = 0
    in_target: bool = False  # somewhere inside a select-list (or RETURNING) entry, where names matter
    alias: str | None = None  # a FROM function's alias: it also names a scalar function's column

    def argument(self, param_name: str) -> Arg | None:
        """The argument bound to a parameter; None when it takes its default or the overload has no
        such parameter."""
        for param, index in zip(self.binding.overload.params, self.binding.arg_for_param, strict=True):
            if param.name == param_name:
                return None if index is None else self.args[index]
        return None


@dataclass
class Statement:
    """One statement of a query string, with its calls."""

    start: int
    end: int
    calls: list[CallSite] = field(default_factory=list)


def find_calls(sql: str, param_types: dict[int, int] | None = None) -> list[Statement]:
    """Every statement of `sql` with the azure_local_ai calls it contains.

    Raises CallError for a call that names no known function or fits no overload. A syntax error is
    not ours to report: it yields no statements, and the server will answer as it always does."""
    try:
        raw_statements = parse_sql(sql)
    except ParseError:
        return []
    tokens = scan(sql)
    finder = _CallFinder(sql, tokens, param_types or {})
    out = []
    for index, raw in enumerate(raw_statements):
        end = raw.stmt_location + raw.stmt_len if raw.stmt_len else len(sql)
        statement = Statement(raw.stmt_location, end)
        finder.statement = statement
        finder.statement_index = index
        finder(raw)
        statement.calls.sort(key=lambda c: c.start)
        out.append(statement)
    return out


class _CallFinder(Visitor):
    def __init__(self, sql: str, tokens: list, param_types: dict[int, int]) -> None:
        super().__init__()
        self.sql = sql
        self.tokens = tokens
        self.starts = {t.start: i for i, t in enumerate(tokens)}
        self.param_types = param_types
        self.statement: Statement | None = None
        self.statement_index = 0

    def visit_FuncCall(self, ancestors: Ancestor, node: ast.FuncCall) -> None:
        names = [n.sval for n in node.funcname]
        if len(names) != 2 or names[0] != SCHEMA:
            return
        function = names[1]
        if function not in OVERLOADS:
            raise CallError("42883", f"function {SCHEMA}.{function} does not exist",
                           f"The {SCHEMA} schema has: {', '.join(sorted(OVERLOADS))}.")
        start = node.location
        end, arg_spans = self._call_extent(start)
        raw_args = list(node.args or ())
        positional: list[Arg] = []
        named: dict[str, Arg] = {}
        for raw, (a, b) in zip(raw_args, arg_spans, strict=True):
            text = self.sql[a:b].strip()
            if isinstance(raw, ast.NamedArgExpr):
                text = re.sub(r"^\s*(\"[^\"]+\"|\w+)\s*(=>|:=)\s*", "", text, count=1)
                named[raw.name] = self._arg(raw.arg, text)
            else:
                positional.append(self._arg(raw, text))
        binding = resolve(function, [a.kind for a in positional], {k: a.kind for k, a in named.items()})
        position, alias, ordinality = _position(ancestors)
        if ordinality:
            raise CallError("0A000", f"WITH ORDINALITY is not supported on {SCHEMA}.{function}",
                            "Number the rows with row_number() OVER () instead.")
        assert self.statement is not None
        self.statement.calls.append(CallSite(
            function, binding, positional + list(named.values()), start, end, position,
            has_alias=alias is not None, statement=self.statement_index,
            in_target=position is Position.TARGET or _inside_target(ancestors),
            alias=alias if position is Position.FROM else None,
        ))

    def _call_extent(self, start: int) -> tuple[int, list[tuple[int, int]]]:
        """The end of the call starting at `start`, and the spans of its arguments."""
        i = self.starts[start]
        while self.tokens[i].name != "ASCII_40":
            i += 1
        depth = 0
        spans: list[tuple[int, int]] = []
        arg_start = self.tokens[i].end + 1
        for token in self.tokens[i:]:
            if token.name in ("ASCII_40", "ASCII_91"):
                depth += 1
            elif token.name in ("ASCII_41", "ASCII_93"):
                depth -= 1
                if depth == 0:
                    if self.sql[arg_start : token.start].strip():
                        spans.append((arg_start, token.start))
                    return token.end + 1, spans
            elif token.name == "ASCII_44" and depth == 1:
                spans.append((arg_start, token.start))
                arg_start = token.end + 1
        raise CallError("42601", "unterminated function call")

    def _arg(self, node: ast.Node, text: str) -> Arg:
        value, kind = self._evaluate(node)
        return Arg(value, kind, text)

    def _evaluate(self, node: ast.Node) -> tuple[ArgValue, ArgKind]:
        if isinstance(node, ast.A_Const):
            if node.isnull:
                return Const(None), ArgKind.UNKNOWN
            val = node.val
            if isinstance(val, ast.String):
                return Const(val.sval), ArgKind.UNKNOWN
            if isinstance(val, ast.Integer):
                return Const(val.ival), ArgKind.SCALAR
            if isinstance(val, ast.Boolean):
                return Const(val.boolval), ArgKind.SCALAR
            if isinstance(val, ast.Float):
                return Const(val.fval), ArgKind.SCALAR
            return Dependent("an unsupported constant"), ArgKind.SCALAR
        if isinstance(node, ast.ParamRef):
            oid = self.param_types.get(node.number, 0)
            kind = ArgKind.UNKNOWN if oid == 0 else ArgKind.ARRAY if oid in _ARRAY_OIDS else ArgKind.SCALAR
            return BindRef(node.number), kind
        if isinstance(node, ast.TypeCast):
            return self._cast(node)
        if isinstance(node, ast.A_ArrayExpr):
            elements = []
            for element in node.elements or ():
                value, _ = self._evaluate(element)
                if not isinstance(value, Const) or isinstance(value.value, list):
                    return Dependent("an array element that is not a constant"), ArgKind.ARRAY
                elements.append(None if value.value is None else str(value.value))
            return Const(elements), ArgKind.ARRAY
        if isinstance(node, ast.A_Expr) and _operator(node) == "||":
            left, _ = self._evaluate(node.lexpr)
            right, _ = self._evaluate(node.rexpr)
            if isinstance(left, Const) and isinstance(right, Const) and not any(
                isinstance(v.value, list) for v in (left, right)
            ):
                if left.value is None or right.value is None:
                    return Const(None), ArgKind.SCALAR
                return Const(_text(left.value) + _text(right.value)), ArgKind.SCALAR
            return Dependent("an expression over values the proxy cannot see"), ArgKind.SCALAR
        return Dependent("a column, subquery or function result"), ArgKind.UNKNOWN

    def _cast(self, node: ast.TypeCast) -> tuple[ArgValue, ArgKind]:
        type_name = node.typeName
        name = type_name.names[-1].sval
        is_array = bool(type_name.arrayBounds)
        kind = ArgKind.ARRAY if is_array else ArgKind.SCALAR
        inner, _ = self._evaluate(node.arg)
        if isinstance(inner, BindRef):
            return inner, kind
        if not isinstance(inner, Const):
            return inner, kind
        value = inner.value
        if value is None:
            return Const(None), kind
        try:
            if is_array and name in _TEXT_TYPES:
                if isinstance(value, list):
                    return Const(value), kind
                return Const(parse_text_array(str(value))), kind
            if not is_array and name in _TEXT_TYPES and not isinstance(value, list):
                return Const(_text(value)), kind
            if not is_array and name in _INT_TYPES and not isinstance(value, list):
                return Const(int(str(value).strip())), kind
        except ArrayLiteralError as exc:
            raise CallError(exc.sqlstate, str(exc)) from exc
        except ValueError as exc:
            raise CallError("22P02", f'invalid input syntax for type {name}: "{value}"') from exc
        return Dependent(f"a cast to {name}"), kind


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _operator(node: ast.A_Expr) -> str | None:
    names = node.name or ()
    return names[-1].sval if names else None


def _inside_target(ancestors: Ancestor | None) -> bool:
    while ancestors is not None and ancestors.node is not None:
        if isinstance(ancestors.node, ast.ResTarget) and ancestors.member == "val":
            owner = ancestors.parent.parent if ancestors.parent is not None else None
            return owner is not None and owner.member in _TARGET_LISTS
        ancestors = ancestors.parent
    return False


_TARGET_LISTS = ("targetList", "returningList", "exprs")  # exprs: PostgreSQL 18's ReturningClause


def _position(ancestors: Ancestor) -> tuple[Position, str | None, bool]:
    """Where a call stands (the whole value of a target-list entry, a FROM function, or elsewhere),
    its alias (the FROM alias, or the target's AS name) and whether it asks WITH ORDINALITY."""
    parent = ancestors.node
    if isinstance(parent, ast.ResTarget) and ancestors.member == "val":
        grand = ancestors.parent.parent if ancestors.parent is not None else None
        owner_member = ancestors.parent.parent.member if grand is not None else None
        if owner_member in _TARGET_LISTS:
            return Position.TARGET, parent.name, False
        return Position.NESTED, None, False
    # A FROM function: FuncCall -> (FuncCall, coldeflist) tuple -> functions tuple -> RangeFunction
    chain = ancestors
    for _ in range(3):
        if chain is None:
            break
        chain = chain.parent
        if chain is not None and isinstance(chain.node, ast.RangeFunction):
            range_function = chain.node
            alias = range_function.alias.aliasname if range_function.alias is not None else None
            return Position.FROM, alias, bool(range_function.ordinality)
    return Position.NESTED, None, False
