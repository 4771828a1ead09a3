"""Finding azure_local_ai calls in SQL text with pglast, and reading their arguments.

A call's arguments are constants (literals, casts of literals, ARRAY[...] of them, concatenations),
bind parameters ($n, whose values arrive with Bind), or anything else ("dependent": a column, a
subquery, another function), which the proxy cannot evaluate by itself: such a call is left to the
server, which runs it through the extension's SQL functions (extension.py). Positions are character
offsets into the statement text, so that the caller can splice replacements into the user's own SQL."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

from pglast import ast, parse_sql
from pglast.enums import ObjectType
from pglast.parser import ParseError, scan
from pglast.visitors import Ancestor, Visitor

from .arrays import ArrayLiteralError, parse_text_array
from .errors import CallError
from .extension import ExtensionCommand, extension_command
from .lookahead import Lookahead, lookaheads
from .shorttext import ShortText
from .signatures import OVERLOADS, SCHEMA, UNKNOWN, Binding, resolve

SCHEMA_MARKER = b"azure_local_ai"

#: PostgreSQL's internal type names (as pglast gives them) -> the names the resolver uses.
_TYPE_NAMES = {
    "text": "text", "varchar": "character varying", "bpchar": "character", "name": "name", "char": "character",
    "int2": "smallint", "int4": "integer", "int8": "bigint", "bool": "boolean", "float4": "real",
    "float8": "double precision", "numeric": "numeric",
}
_TEXT_TYPES = frozenset({"text", "character varying", "character", "name"})
_INT_TYPES = frozenset({"smallint", "integer", "bigint"})
#: Type OIDs a client may declare for a parameter.
_OID_TYPES = {
    25: "text", 1043: "character varying", 1042: "character", 19: "name", 21: "smallint", 23: "integer",
    20: "bigint", 16: "boolean", 700: "real", 701: "double precision", 1700: "numeric", 114: "json", 3802: "jsonb",
    2950: "uuid", 1009: "text[]", 1015: "character varying[]", 1014: "character[]", 1003: "name[]",
    1005: "smallint[]", 1007: "integer[]", 1016: "bigint[]", 1000: "boolean[]", 1021: "real[]",
    1022: "double precision[]", 1231: "numeric[]", 2951: "uuid[]", 199: "json[]", 3807: "jsonb[]",
}
_INT64 = range(-(2**63), 2**63)


def mentions_schema(body: bytes) -> bool:
    """The cheap pre-filter: only statements containing the schema's name (in any case) go to the
    parser. (lower() and find() are several times faster than a case-insensitive regex.)"""
    return body.lower().find(SCHEMA_MARKER) >= 0


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
    type: str  # its SQL type as overload resolution sees it (UNKNOWN when untyped or not known)
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

    @property
    def dependent(self) -> bool:
        """Whether an argument's value is one only the server knows (ids excepted: they are passed through)."""
        ids = self.argument("ids")
        return any(isinstance(a.value, Dependent) and a is not ids for a in self.args)

    def argument(self, param_name: str) -> Arg | None:
        """The argument bound to a parameter; None when it takes its default or the overload has no
        such parameter."""
        for param, index in zip(self.binding.overload.params, self.binding.arg_for_param, strict=True):
            if param.name == param_name:
                return None if index is None else self.args[index]
        return None


@dataclass
class Statement:
    """One statement of a query string, with the calls the proxy answers before the server runs it
    (`calls`), how many calls it leaves to the server (`server_calls`: arguments the proxy cannot see,
    or expressions the statement stores, as a generated column or a view), and what replaces the
    whole statement when it is about the extension itself."""

    start: int
    end: int
    calls: list[CallSite] = field(default_factory=list)
    server_calls: int = 0
    extension: ExtensionCommand | None = None
    #: What the server's calls will embed, where the proxy can read it ahead (lookahead.py).
    lookaheads: list[Lookahead] = field(default_factory=list)


def find_calls(sql: str | bytes, param_types: dict[int, int] | None = None) -> list[Statement]:
    """Every statement of `sql` with the azure_local_ai calls it contains; positions are offsets
    into `sql` (text, or the UTF-8 bytes of a long statement, see ShortText).

    Raises CallError for a call that names no known function or fits no overload. A syntax error, or
    nesting too deep to walk, is not ours to report: it yields no statements, and the server will
    answer as it always does."""
    text = ShortText(sql)
    try:
        raw_statements = parse_sql(text.text)
        finder = _CallFinder(text, scan(text.text), param_types or {})
        out = []
        for index, raw in enumerate(raw_statements):
            end = raw.stmt_location + raw.stmt_len if raw.stmt_len else len(text.text)
            statement = Statement(text.original(raw.stmt_location), text.original(end))
            finder.statement = statement
            finder.statement_index = index
            finder.prepared = isinstance(raw.stmt, ast.PrepareStmt)
            finder(raw)
            statement.extension = extension_command(raw.stmt)
            _leave_to_server(statement, raw.stmt)
            if statement.server_calls:
                statement.lookaheads = lookaheads(raw.stmt, text.value)
            out.append(statement)
    except (ParseError, RecursionError):  # nested too deep for us: the server has its own limit
        return []
    return out


#: Statements that run a query once, where a call may be replaced by its value. Any other statement
#: stores its expressions (a generated column, a default, a view, an index, a trigger's condition):
#: there the server evaluates the calls, as it would the real extension's functions.
_RUN_ONCE = (ast.SelectStmt, ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt, ast.ExplainStmt,
             ast.DeclareCursorStmt, ast.CopyStmt, ast.CallStmt, ast.PrepareStmt, ast.ExecuteStmt)


def _leave_to_server(statement: Statement, node: ast.Node) -> None:
    """Keep in `calls` those the proxy answers; count the others as the server's."""
    if isinstance(node, ast.CreateTableAsStmt):
        stored = node.objtype == ObjectType.OBJECT_MATVIEW  # REFRESH recomputes a materialized view
    else:
        stored = not isinstance(node, _RUN_ONCE)
    ours = [] if stored else [c for c in statement.calls if not c.dependent]
    statement.server_calls += len(statement.calls) - len(ours)
    statement.calls = sorted(ours, key=lambda c: c.start)


class _CallFinder(Visitor):
    def __init__(self, text: ShortText, tokens: list, param_types: dict[int, int]) -> None:
        super().__init__()
        self.text = text
        self.sql = text.text
        self.tokens = tokens
        self.starts = {t.start: i for i, t in enumerate(tokens)}
        self.param_types = param_types
        self.statement: Statement | None = None
        self.statement_index = 0
        #: In SQL's PREPARE, $n is the prepared statement's parameter, which EXECUTE gives the server.
        self.prepared = False

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
            text = self.text.between(self.text.original(a), self.text.original(b)).strip()
            if isinstance(raw, ast.NamedArgExpr):
                text = re.sub(r"^\s*(\"[^\"]+\"|\w+)\s*(=>|:=)\s*", "", text, count=1)
                named[raw.name] = self._arg(raw.arg, text)
            else:
                positional.append(self._arg(raw, text))
        assert self.statement is not None
        try:
            binding = resolve(function, [a.type for a in positional], {k: a.type for k, a in named.items()})
        except CallError:
            if any(isinstance(a.value, Dependent) for a in [*positional, *named.values()]):
                self.statement.server_calls += 1  # types only the server knows: its resolution decides
                return
            raise
        position, alias, ordinality = _position(ancestors, start)
        if ordinality:
            raise CallError("0A000", f"WITH ORDINALITY is not supported on {SCHEMA}.{function}",
                            "Number the rows with row_number() OVER () instead.")
        self.statement.calls.append(CallSite(
            function, binding, positional + list(named.values()), self.text.original(start),
            self.text.original(end), position,
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
        value, type_name = self._evaluate(node)
        return Arg(value, type_name, text)

    def _evaluate(self, node: ast.Node) -> tuple[ArgValue, str]:
        """An argument's value (when the proxy can know it) and its type."""
        if isinstance(node, ast.A_Const):
            if node.isnull:
                return Const(None), UNKNOWN
            val = node.val
            if isinstance(val, ast.String):
                return Const(self.text.value(val.sval)), UNKNOWN
            if isinstance(val, ast.Integer):
                return Const(val.ival), "integer"
            if isinstance(val, ast.Boolean):
                return Const(val.boolval), "boolean"
            if isinstance(val, ast.Float):  # beyond int4: bigint if it is a whole number that fits
                whole = val.fval.isdigit() and int(val.fval) in _INT64
                return Const(val.fval), "bigint" if whole else "numeric"
            return Dependent("an unsupported constant"), UNKNOWN
        if isinstance(node, ast.ParamRef):
            if self.prepared:
                return Dependent("a parameter of PREPARE"), UNKNOWN
            if node.number < 1:
                raise CallError("42P02", f"there is no parameter ${node.number}")
            return BindRef(node.number), _OID_TYPES.get(self.param_types.get(node.number, 0), UNKNOWN)
        if isinstance(node, ast.TypeCast):
            return self._cast(node)
        if isinstance(node, ast.A_ArrayExpr):
            elements = []
            types = set()
            for element in node.elements or ():
                value, type_name = self._evaluate(element)
                if not isinstance(value, Const) or isinstance(value.value, list):
                    return Dependent("an array element that is not a constant"), UNKNOWN
                elements.append(None if value.value is None else _text(value.value))
                types.add("text" if type_name in _TEXT_TYPES else type_name)
            known = types - {UNKNOWN}
            return Const(elements), (known.pop() if len(known) == 1 else "text") + "[]"
        if isinstance(node, ast.A_Expr) and _operator(node) == "||":
            left, _ = self._evaluate(node.lexpr)
            right, _ = self._evaluate(node.rexpr)
            if isinstance(left, Const) and isinstance(right, Const) and not any(
                isinstance(v.value, list) for v in (left, right)
            ):
                if left.value is None or right.value is None:
                    return Const(None), "text"
                return Const(_text(left.value) + _text(right.value)), "text"
            return Dependent("an expression over values the proxy cannot see"), UNKNOWN
        return Dependent(_describe(node)), UNKNOWN

    def _cast(self, node: ast.TypeCast) -> tuple[ArgValue, str]:
        type_name = node.typeName
        raw_name = type_name.names[-1].sval
        name = _TYPE_NAMES.get(raw_name, raw_name)
        is_array = bool(type_name.arrayBounds)
        full_name = name + "[]" if is_array else name
        inner, _ = self._evaluate(node.arg)
        if not isinstance(inner, Const):
            return inner, full_name
        value = inner.value
        if value is None:
            return Const(None), full_name
        try:
            if is_array and name in _TEXT_TYPES:
                if isinstance(value, list):
                    return Const(value), full_name
                return Const(parse_text_array(str(value))), full_name
            if not is_array and name in _TEXT_TYPES and not isinstance(value, list):
                return Const(_text(value)), full_name
            if not is_array and name in _INT_TYPES and not isinstance(value, list):
                return Const(int(str(value).strip())), full_name
        except ArrayLiteralError as exc:
            raise CallError(exc.sqlstate, str(exc)) from exc
        except ValueError as exc:
            raise CallError("22P02", f'invalid input syntax for type {name}: "{value}"') from exc
        return Dependent(f"a cast to {full_name}"), full_name


def _describe(node: ast.Node) -> str:
    """What an argument the proxy cannot evaluate is, in words for an error message."""
    if isinstance(node, ast.ColumnRef):
        return "a column"
    if isinstance(node, ast.SubLink):
        return "a subquery"
    if isinstance(node, ast.FuncCall):
        return "a function result"
    return "an expression"


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
            return _names_a_column(ancestors)
        ancestors = ancestors.parent
    return False


_TARGET_LISTS = ("targetList", "returningList", "exprs")  # exprs: PostgreSQL 18's ReturningClause


def _names_a_column(res_target: Ancestor) -> bool:
    """Whether this ResTarget is an output column (a select list or RETURNING entry), whose name
    the call's name gives; UPDATE's SET entries are ResTargets too, but name nothing."""
    owner = res_target.parent.parent if res_target.parent is not None else None
    return owner is not None and owner.member in _TARGET_LISTS and not isinstance(owner.node, ast.UpdateStmt)


def _position(ancestors: Ancestor, start: int) -> tuple[Position, str | None, bool]:
    """Where a call stands (the whole value of a target-list entry, a FROM function, or elsewhere),
    its alias (the FROM alias, or the target's AS name) and whether it asks WITH ORDINALITY."""
    parent = ancestors.node
    if isinstance(parent, ast.ResTarget) and ancestors.member == "val":
        # A parenthesised call, `(f(x))`, is nested: the AS of its stand-in must stay inside.
        if _names_a_column(ancestors) and parent.location == start:
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
