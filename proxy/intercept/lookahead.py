"""The texts a statement will ask the server-evaluated create_embeddings for, where the proxy can tell
before the server runs it: a read-only query over the same rows (prefetch.py embeds its result in
batches, ahead of the server's requests, which come one row at a time).

A look-ahead is only ever a guess that saves time: each request the server sends is answered for the
text it names, whether or not the guess had it. So a statement is looked ahead only where the query
is plainly the same rows and plainly harmless: a back-fill (UPDATE), a generated column added to a
table, an INSERT ... SELECT or SELECT that embeds a column, over plain tables and a few pure
functions. It runs read-only as the client's login, so it can neither change nor read more than
the client's statement could."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pglast import ast
from pglast.enums import AlterTableType, ConstrType, LimitOption, SetOperation
from pglast.stream import RawStream

from .signatures import SCHEMA

#: Functions a looked-ahead query may call: pure ones, as used to build the text to embed.
PURE_FUNCTIONS = frozenset({
    "lower", "upper", "initcap", "concat", "concat_ws", "substr", "substring", "left", "right", "trim", "btrim",
    "ltrim", "rtrim", "replace", "regexp_replace", "split_part", "format", "coalesce", "nullif", "length",
    "char_length", "array_to_string", "to_char", "translate", "repeat", "md5",
    "jsonb_extract_path_text", "json_extract_path_text", "greatest", "least", "abs", "mod",
})
_TEXT = ast.TypeName(names=(ast.String("pg_catalog"), ast.String("text")))


@dataclass(frozen=True)
class Lookahead:
    """`query` yields, one text per row, the inputs the statement will embed with model `model_uri`."""

    model_uri: str
    query: str


def lookaheads(stmt: ast.Node, restore: Callable[[str], str] = lambda s: s) -> list[Lookahead]:
    """The look-aheads of one parsed statement (none where the rows cannot be told safely).
    `restore` gives back a string constant the caller shortened before parsing."""
    out = []
    for model_uri, text_expr, source in _sources(stmt):
        query = ast.SelectStmt(
            targetList=(ast.ResTarget(val=ast.TypeCast(arg=text_expr, typeName=_TEXT)),),
            fromClause=source.fromClause, whereClause=source.whereClause, withClause=source.withClause,
            limitCount=source.limitCount, limitOffset=source.limitOffset, limitOption=source.limitOption,
            sortClause=source.sortClause,
        )
        if _harmless(query):
            _restore_strings(query, restore)
            out.append(Lookahead(restore(model_uri), RawStream()(query)))
    return out


@dataclass
class _Source:
    fromClause: tuple | None = None
    whereClause: ast.Node | None = None
    withClause: ast.WithClause | None = None
    limitCount: ast.Node | None = None
    limitOffset: ast.Node | None = None
    limitOption: LimitOption = LimitOption.LIMIT_OPTION_DEFAULT
    sortClause: tuple | None = None


def _sources(stmt: ast.Node) -> Iterator[tuple[str, ast.Node, _Source]]:
    """(model, input expression, the rows it is evaluated over) for each embedding the statement makes."""
    if isinstance(stmt, ast.UpdateStmt):
        source = _Source((stmt.relation, *(stmt.fromClause or ())), stmt.whereClause, stmt.withClause)
        for target in stmt.targetList or ():
            yield from _calls(target.val, source)
    elif isinstance(stmt, ast.InsertStmt) and isinstance(stmt.selectStmt, ast.SelectStmt):
        yield from _select(stmt.selectStmt, stmt.withClause)
    elif isinstance(stmt, ast.SelectStmt):
        yield from _select(stmt, None)
    elif isinstance(stmt, ast.AlterTableStmt):
        source = _Source((ast.RangeVar(relname=stmt.relation.relname, schemaname=stmt.relation.schemaname,
                                       inh=True, relpersistence="p"),))
        for cmd in stmt.cmds or ():
            if cmd.subtype == AlterTableType.AT_AddColumn and isinstance(cmd.def_, ast.ColumnDef):
                for constraint in cmd.def_.constraints or ():
                    if constraint.contype == ConstrType.CONSTR_GENERATED:
                        yield from _calls(constraint.raw_expr, source)


def _select(select: ast.SelectStmt, outer_with: ast.WithClause | None) -> Iterator[tuple[str, ast.Node, _Source]]:
    grouped = select.groupClause or select.havingClause or select.distinctClause or select.windowClause
    if select.op != SetOperation.SETOP_NONE or select.valuesLists or grouped or select.lockingClause:
        return
    if outer_with is not None and select.withClause is not None:
        return
    source = _Source(select.fromClause, select.whereClause, select.withClause or outer_with,
                     select.limitCount, select.limitOffset, select.limitOption, select.sortClause)
    for target in select.targetList or ():
        yield from _calls(target.val, source)


def _calls(expr: ast.Node | None, source: _Source) -> Iterator[tuple[str, ast.Node, _Source]]:
    """create_embeddings(<constant model>, <expression>) calls in `expr`, not inside a subquery."""
    for node in _walk(expr, into_subqueries=False):
        if not isinstance(node, ast.FuncCall) or _name(node) != (SCHEMA, "create_embeddings"):
            continue
        args = list(node.args or ())
        positional = [a for a in args if not isinstance(a, ast.NamedArgExpr)]
        named = {a.name: a.arg for a in args if isinstance(a, ast.NamedArgExpr)}
        model = named.get("model_uri", positional[0] if positional else None)
        text = named.get("input", positional[1] if len(positional) > 1 else None)
        if "inputs" in named or not _is_string(model) or text is None or _is_constant(text):
            continue
        yield model.val.sval, text, source


def _harmless(query: ast.SelectStmt) -> bool:
    """Whether the query reads plain rows only: no functions but pure ones, no parameters, no locks, and
    common table expressions that are queries."""
    return not any(_unsafe(node) for node in _walk(query, into_subqueries=True))


_UNSAFE_NODES = (ast.ParamRef, ast.RangeFunction, ast.RangeTableFunc, ast.RangeTableSample)


def _unsafe(node: ast.Node) -> bool:
    if isinstance(node, ast.FuncCall):
        name = _name(node)
        return len(name) > 2 or name[-1] not in PURE_FUNCTIONS or (len(name) == 2 and name[0] != "pg_catalog")
    if isinstance(node, ast.CommonTableExpr):
        return not isinstance(node.ctequery, ast.SelectStmt)
    if isinstance(node, ast.SelectStmt):
        return bool(node.lockingClause)
    return isinstance(node, _UNSAFE_NODES)


def _restore_strings(query: ast.Node, restore: Callable[[str], str]) -> None:
    for node in _walk(query, into_subqueries=True):
        if isinstance(node, ast.A_Const) and isinstance(node.val, ast.String):
            node.val = ast.String(restore(node.val.sval))


def _walk(node: object, *, into_subqueries: bool) -> Iterator[ast.Node]:
    if isinstance(node, tuple | list):
        for item in node:
            yield from _walk(item, into_subqueries=into_subqueries)
        return
    if not isinstance(node, ast.Node):
        return
    yield node
    if not into_subqueries and isinstance(node, ast.SubLink | ast.RangeSubselect):
        return
    for slot in type(node).__slots__:
        yield from _walk(getattr(node, slot, None), into_subqueries=into_subqueries)


def _name(call: ast.FuncCall) -> tuple[str, ...]:
    return tuple(n.sval for n in call.funcname)


def _is_string(node: ast.Node | None) -> bool:
    return isinstance(node, ast.A_Const) and isinstance(node.val, ast.String)


def _is_constant(node: ast.Node) -> bool:
    while isinstance(node, ast.TypeCast):
        node = node.arg
    return isinstance(node, ast.A_Const | ast.ParamRef)
