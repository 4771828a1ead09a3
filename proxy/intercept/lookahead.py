"""The texts a statement will ask the server-evaluated create_embeddings for, where the proxy can tell
before the server runs it: a read-only query over the same rows (the proxy embeds its result in
batches, ahead of the server's requests, which come one row at a time: servercalls.py).

A look-ahead is only ever a guess that saves time: each request the server sends is answered for the
text it names, whether or not the guess had it. So a statement is looked ahead only where the query
is plainly the same rows and plainly harmless: a back-fill (UPDATE), a generated column added to a
table, an INSERT ... SELECT or SELECT that embeds a column, and an INSERT ... SELECT, a many-row
INSERT ... VALUES or an UPDATE of the source column of a table whose generated column embeds;
over plain tables and a few pure functions. It runs read-only on the proxy's service connection,
and only once readguard.py has found that it runs no code but PostgreSQL's own and reads nothing the
client's login may not read."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from pglast import ast, parse_sql
from pglast.enums import AlterTableType, ConstrType, LimitOption, SetOperation
from pglast.parser import ParseError
from pglast.stream import RawStream

from .readguard import ReadPlan, guard, table_name
from .signatures import SCHEMA

_TEXT = ast.TypeName(names=(ast.String("pg_catalog"), ast.String("text")))
#: Statements longer than this are not looked ahead for their tables' generated columns.
MAX_WRITTEN_TEXT = 1 << 20
#: One-row INSERTs up to this long keep their parse, for when they come again: a driver's parameterised
#: statement behind a transaction pooler is parsed for every row (nothing stays prepared there).
_KEPT_PARSE_TEXT = 4096


@dataclass(frozen=True)
class Lookahead:
    """`query` yields, one text per row, the inputs the statement will embed with model `model_uri`."""

    model_uri: str
    query: str
    #: The statement locks the table against reading (ALTER TABLE): read it before the statement runs.
    before: bool = False
    #: What the query reads, checked in the catalog before each read (readguard.py).
    plan: ReadPlan = field(default=ReadPlan((), (), ()), compare=False)


def lookaheads(stmt: ast.Node, restore: Callable[[str], str] = lambda s: s) -> list[Lookahead]:
    """The look-aheads of one parsed statement (none where the rows cannot be told safely).
    `restore` gives back a string constant the caller shortened before parsing."""
    before = isinstance(stmt, ast.AlterTableStmt)
    return [replace(found, before=before) for model_uri, text_expr, source in _sources(stmt)
            if (found := _lookahead(model_uri, text_expr, source, restore)) is not None]


def _lookahead(model_uri: str, text_expr: ast.Node, source: _Source,
               restore: Callable[[str], str] = lambda s: s) -> Lookahead | None:
    query = ast.SelectStmt(
        targetList=(ast.ResTarget(val=ast.TypeCast(arg=text_expr, typeName=_TEXT)),),
        fromClause=source.fromClause, whereClause=source.whereClause, withClause=source.withClause,
        limitCount=source.limitCount, limitOffset=source.limitOffset, limitOption=source.limitOption,
        sortClause=source.sortClause,
    )
    plan = guard(query)
    if plan is None:
        return None
    _restore_strings(query, restore)
    return Lookahead(restore(model_uri), RawStream()(query), plan=plan)


@dataclass(frozen=True)
class RowInput:
    """The text a one-row INSERT gives a generated column's create_embeddings with model `model_uri`:
    a string constant (`text`), or the value of parameter number `param`."""

    model_uri: str
    text: str | None = None
    param: int | None = None


def one_row_insert(sql: str) -> tuple[ast.InsertStmt, str] | None:
    """If `sql` is one INSERT ... VALUES of one row: the statement and the table it writes, as
    to_regclass() reads a name. The statement is shared with later calls: read it, never change it."""
    return _kept_one_row_insert(sql) if len(sql) <= _KEPT_PARSE_TEXT else _one_row_insert(sql)


@functools.lru_cache(maxsize=256)
def _kept_one_row_insert(sql: str) -> tuple[ast.InsertStmt, str] | None:
    return _one_row_insert(sql)


def _one_row_insert(sql: str) -> tuple[ast.InsertStmt, str] | None:
    if len(sql) > MAX_WRITTEN_TEXT:
        return None
    try:
        raws = parse_sql(sql)
    except (ParseError, RecursionError):
        return None
    if len(raws) != 1 or not isinstance(stmt := raws[0].stmt, ast.InsertStmt) or stmt.relation is None:
        return None
    select = stmt.selectStmt
    if not isinstance(select, ast.SelectStmt) or len(select.valuesLists or ()) != 1 or stmt.withClause:
        return None
    return stmt, table_name(stmt.relation)


def embedded_columns(generated: Sequence[str]) -> list[tuple[str, str]]:
    """(model, column) for each generated column (expressions `generated`, as pg_get_expr writes them)
    that embeds another column as it is; one that embeds an expression over columns asks as it runs."""
    out = []
    for model_uri, text_expr in _generated_calls(generated):
        column = _uncast(text_expr)
        if isinstance(column, ast.ColumnRef) and len(column.fields) == 1:
            out.append((model_uri, column.fields[0].sval))
    return out


def row_inputs(stmt: ast.InsertStmt, columns: Sequence[str], embedded: Sequence[tuple[str, str]]) -> list[RowInput]:
    """The inputs of the generated columns that embed a column (`embedded`: embedded_columns) the
    INSERT's row gives as a constant or a parameter; `columns` are the table's other columns, in order.
    Others (an expression, a default) ask as they run."""
    (row,) = stmt.selectStmt.valuesLists
    names = [target.name for target in stmt.cols] if stmt.cols else list(columns[: len(row)])
    values = dict(zip(names, row, strict=False))
    out = []
    for model_uri, column in embedded:
        value = _uncast(values.get(column))
        if isinstance(value, ast.A_Const) and isinstance(value.val, ast.String):
            out.append(RowInput(model_uri, text=value.val.sval))
        elif isinstance(value, ast.ParamRef):
            out.append(RowInput(model_uri, param=value.number))
    return out


def _generated_calls(generated: Sequence[str]) -> Iterator[tuple[str, ast.Node]]:
    """(model, input expression) of each create_embeddings call in these generated columns' expressions."""
    for expression in generated:
        try:
            (raw,) = parse_sql("SELECT " + expression)
        except (ParseError, ValueError):
            continue
        for model_uri, text_expr, _ in _calls(raw.stmt.targetList[0].val, _Source()):
            yield model_uri, text_expr


def written_tables(sql: str) -> list[tuple[ast.Node, str]]:
    """The INSERT and UPDATE statements of `sql` (which does not name azure_local_ai), each with the
    table it writes, as to_regclass() reads a name: their tables' generated columns may embed."""
    if len(sql) > MAX_WRITTEN_TEXT:
        return []
    try:
        raws = parse_sql(sql)
    except (ParseError, RecursionError):
        return []
    out = []
    for raw in raws:
        stmt = raw.stmt
        one_row = isinstance(stmt, ast.InsertStmt) and isinstance(stmt.selectStmt, ast.SelectStmt) and len(
            stmt.selectStmt.valuesLists or ()) == 1
        if one_row:
            continue  # its one request is on its way already: not worth a look at the catalog
        if isinstance(stmt, ast.InsertStmt | ast.UpdateStmt) and stmt.relation is not None:
            out.append((stmt, table_name(stmt.relation)))
    return out


def generated_lookaheads(stmt: ast.Node, columns: Sequence[str], generated: Sequence[str]) -> list[Lookahead]:
    """For an INSERT or UPDATE of a table whose stored generated columns have the expressions
    `generated` (as pg_get_expr writes them), the look-aheads of the texts they will embed; `columns`
    are the table's other columns, in order (an INSERT without a column list fills them so)."""
    out = []
    for model_uri, text_expr in _generated_calls(generated):
        found = (_inserted(stmt, text_expr, columns) if isinstance(stmt, ast.InsertStmt)
                 else _updated(stmt, text_expr) if isinstance(stmt, ast.UpdateStmt) else None)
        lookahead = _lookahead(model_uri, *found) if found is not None else None
        if lookahead is not None:
            out.append(lookahead)
    return out


def _inserted(stmt: ast.InsertStmt, text_expr: ast.Node, columns: Sequence[str]) -> tuple[ast.Node, _Source] | None:
    """The rows an INSERT writes, as a subquery named after the columns they fill."""
    select = stmt.selectStmt
    if not isinstance(select, ast.SelectStmt) or stmt.onConflictClause is not None:
        return None
    if stmt.cols:
        names = [target.name for target in stmt.cols]
    else:
        width = len(select.valuesLists[0]) if select.valuesLists else len(select.targetList or ())
        if any(isinstance(t.val, ast.ColumnRef) and isinstance(t.val.fields[-1], ast.A_Star)
               for t in select.targetList or ()):
            return None  # SELECT *: how many columns it fills only the server knows
        names = list(columns[:width])
    if select.valuesLists and len(select.valuesLists) < 2:
        return None  # one row: its request is on its way already
    if not _column_names(text_expr) <= set(names):
        return None  # a column the INSERT leaves to its default
    rows = ast.RangeSubselect(subquery=select, alias=ast.Alias(
        aliasname="lookahead_rows", colnames=tuple(ast.String(n) for n in names)))
    return text_expr, _Source((rows,), withClause=stmt.withClause)


def _updated(stmt: ast.UpdateStmt, text_expr: ast.Node) -> tuple[ast.Node, _Source] | None:
    """The rows an UPDATE writes, with the new values of the columns it sets."""
    assigned = {t.name: t.val for t in stmt.targetList or () if not t.indirection and not isinstance(
        t.val, ast.MultiAssignRef)}
    if not _column_names(text_expr) & assigned.keys():
        return None  # the source columns keep their values
    source = _Source((stmt.relation, *(stmt.fromClause or ())), stmt.whereClause, stmt.withClause)
    return _substitute(text_expr, assigned), source


def _column_names(expr: ast.Node) -> set[str]:
    return {node.fields[-1].sval for node in _walk(expr, into_subqueries=True)
            if isinstance(node, ast.ColumnRef) and isinstance(node.fields[-1], ast.String)}


def _substitute(node: object, values: dict[str, ast.Node]) -> object:
    """`node` with each bare column reference to a key of `values` replaced by its value."""
    if isinstance(node, tuple | list):
        return type(node)(_substitute(item, values) for item in node)
    if not isinstance(node, ast.Node):
        return node
    if isinstance(node, ast.ColumnRef) and len(node.fields) == 1 and isinstance(node.fields[0], ast.String):
        return values.get(node.fields[0].sval, node)
    for slot in type(node).__slots__:
        value = getattr(node, slot, None)
        if isinstance(value, ast.Node | tuple | list):
            setattr(node, slot, _substitute(value, values))
    return node


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
        yield _uncast(model).val.sval, text, source


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
    return isinstance(_uncast(node), ast.A_Const) and isinstance(_uncast(node).val, ast.String)


def _uncast(node: ast.Node | None) -> ast.Node | None:
    while isinstance(node, ast.TypeCast):
        node = node.arg
    return node


def _is_constant(node: ast.Node) -> bool:
    return isinstance(_uncast(node), ast.A_Const | ast.ParamRef)
