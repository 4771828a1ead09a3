"""What makes a look-ahead query safe to run on the proxy's service connection (lookahead.py,
service.py): it must run no code that a role other than a superuser controls.

The query is built from the client's statement, so everything in it is hostile until checked. The
check has two halves:

- *Here, over the parse tree* (pure code): only plain expressions (columns, constants, the
  pg_catalog functions of PURE_FUNCTIONS, operators, casts to pg_catalog types, CASE, COALESCE, ...)
  over tables, sub-selects of the same, and common table expressions of the statement itself. No
  sub-query expression, no function in FROM, no parameter, no locking clause. Function names are
  written as pg_catalog's; the service connection runs under `search_path = pg_catalog, pg_temp`,
  so no operator, function or type name can resolve to another schema's object.
- *In the catalog, just before reading* (service.py, `verdict` here): every table is a plain or
  partitioned table (not a view, a foreign table or anything else), without row-level security,
  all of whose descendants are plain or partitioned tables too; every column the query names is a
  column of one of its tables (no function called in column notation, no whole-row reference) of a
  type in pg_catalog (a domain over one included: no user-defined cast or type I/O), and the
  session's login may read it. The tables are locked (ACCESS SHARE) before that check, so they cannot
  change between the check and the read. Superusers alone can add a function, cast or operator
  class to pg_catalog: what the query may run is PostgreSQL's own code."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pglast import ast, parse_sql
from pglast.enums import A_Expr_Kind
from pglast.stream import RawStream

#: Functions a looked-ahead query may call: pure ones of pg_catalog, as used to build the text to embed.
PURE_FUNCTIONS = frozenset({
    "lower", "upper", "initcap", "concat", "concat_ws", "substr", "substring", "left", "right", "trim", "btrim",
    "ltrim", "rtrim", "replace", "regexp_replace", "split_part", "format", "length", "char_length",
    "array_to_string", "to_char", "translate", "repeat", "md5", "jsonb_extract_path_text",
    "json_extract_path_text", "abs", "mod", "chr", "lpad", "rpad", "reverse", "strpos", "position", "overlay",
})
#: The kinds of operator expressions allowed (their operators resolve in pg_catalog only).
_EXPRESSION_KINDS = frozenset({
    A_Expr_Kind.AEXPR_OP, A_Expr_Kind.AEXPR_OP_ANY, A_Expr_Kind.AEXPR_OP_ALL, A_Expr_Kind.AEXPR_DISTINCT,
    A_Expr_Kind.AEXPR_NOT_DISTINCT, A_Expr_Kind.AEXPR_NULLIF, A_Expr_Kind.AEXPR_IN, A_Expr_Kind.AEXPR_LIKE,
    A_Expr_Kind.AEXPR_ILIKE, A_Expr_Kind.AEXPR_BETWEEN, A_Expr_Kind.AEXPR_NOT_BETWEEN,
})
#: Nodes that hold no code of their own: what they contain is checked.
_PLAIN_NODES = (
    ast.ResTarget, ast.A_Const, ast.String, ast.Integer, ast.Float, ast.Boolean, ast.BitString, ast.Alias,
    ast.BoolExpr, ast.NullTest, ast.BooleanTest, ast.CoalesceExpr, ast.MinMaxExpr, ast.CaseExpr, ast.CaseWhen,
    ast.A_ArrayExpr, ast.A_Indices, ast.CollateClause, ast.SQLValueFunction, ast.TypeName,
)
_CATALOG = "pg_catalog"


@dataclass(frozen=True)
class ReadPlan:
    """What a look-ahead query reads: its tables (as to_regclass reads their names), every column
    name it names, and the names of the columns its sub-selects and common table expressions make."""

    tables: tuple[str, ...]
    columns: tuple[str, ...]
    derived: tuple[str, ...]


@dataclass
class _Found:
    ctes: frozenset[str]
    tables: list[str] = field(default_factory=list)
    columns: set[str] = field(default_factory=set)
    derived: set[str] = field(default_factory=set)


class _Unsafe(Exception):
    """The query could run code or read more than plain rows: it is not looked ahead."""


def guard(query: ast.SelectStmt) -> ReadPlan | None:
    """Check the query (and write its function names as pg_catalog's, in place); None if it is not
    plainly a read of table rows through pure expressions."""
    with_clause = query.withClause
    ctes = with_clause.ctes if with_clause is not None else ()
    found = _Found(frozenset(cte.ctename for cte in ctes))
    try:
        if with_clause is not None and with_clause.recursive:
            raise _Unsafe("WITH RECURSIVE")
        for cte in ctes:
            if not isinstance(cte.ctequery, ast.SelectStmt):
                raise _Unsafe("a common table expression that is not a SELECT")
            found.derived.update(name.sval for name in cte.aliascolnames or ())
            _select(cte.ctequery, found, in_cte=True)
        _select(query, found, in_cte=False, top=True)
    except _Unsafe:
        return None
    return ReadPlan(tuple(dict.fromkeys(found.tables)), tuple(sorted(found.columns)), tuple(sorted(found.derived)))


def _select(select: ast.SelectStmt, found: _Found, *, in_cte: bool, top: bool = False) -> None:
    if select.lockingClause or select.intoClause or select.windowClause or (select.withClause and not top):
        raise _Unsafe("a clause that locks, writes, windows or nests WITH")
    for slot in type(select).__slots__:
        if slot == "withClause":
            continue
        value = getattr(select, slot, None)
        if slot == "targetList":
            for target in value or ():
                if _is_star(target.val):
                    if top:
                        raise _Unsafe("* in the look-ahead's own target")
                    continue  # the columns it brings are named where they are used
                if target.name:
                    found.derived.add(target.name)
                _check(target.val, found, in_cte)
        else:
            _check(value, found, in_cte)


def _check(node: object, found: _Found, in_cte: bool) -> None:
    if isinstance(node, tuple | list):
        for item in node:
            _check(item, found, in_cte)
        return
    if not isinstance(node, ast.Node):
        return
    if isinstance(node, ast.SelectStmt):
        _select(node, found, in_cte=in_cte)
        return
    if isinstance(node, ast.RangeVar):
        _table(node, found, in_cte)
        return
    if isinstance(node, ast.ColumnRef):
        _column(node, found)
        return
    if isinstance(node, ast.RangeSubselect):
        if node.lateral:
            raise _Unsafe("LATERAL")
        found.derived.update(name.sval for name in (node.alias.colnames or ()) if node.alias is not None)
        _check(node.subquery, found, in_cte)
        return
    if isinstance(node, ast.FuncCall):
        _function(node)
    elif isinstance(node, ast.A_Expr):
        names = tuple(n.sval for n in node.name or ())
        if node.kind not in _EXPRESSION_KINDS or (len(names) > 1 and names[:-1] != (_CATALOG,)):
            raise _Unsafe(f"operator {'.'.join(names)} ({node.kind.name})")
    elif isinstance(node, ast.TypeCast):
        _type(node.typeName)
    elif isinstance(node, ast.SortBy):
        if node.useOp:
            raise _Unsafe("ORDER BY ... USING")
    elif isinstance(node, ast.JoinExpr):
        if node.isNatural:
            raise _Unsafe("NATURAL JOIN")
        found.columns.update(name.sval for name in node.usingClause or ())
    elif isinstance(node, ast.A_Indirection):
        if not all(isinstance(step, ast.A_Indices) for step in node.indirection):
            raise _Unsafe("a field selection")
    elif not isinstance(node, _PLAIN_NODES):
        raise _Unsafe(type(node).__name__)
    for slot in type(node).__slots__:
        _check(getattr(node, slot, None), found, in_cte)


def _table(node: ast.RangeVar, found: _Found, in_cte: bool) -> None:
    if node.schemaname is None and node.relname in found.ctes:
        if in_cte:
            raise _Unsafe("a common table expression's name inside one (it may name a table)")
        return  # a common table expression of the statement
    if node.catalogname is not None:
        raise _Unsafe("a table named with a database")
    found.tables.append(table_name(node))


def _column(node: ast.ColumnRef, found: _Found) -> None:
    *qualifiers, last = node.fields
    if len(qualifiers) > 2 or not all(isinstance(f, ast.String) for f in (*qualifiers, last)):
        raise _Unsafe("a column reference that is not a plain name")
    found.columns.add(last.sval)


def _function(node: ast.FuncCall) -> None:
    names = tuple(n.sval for n in node.funcname)
    if len(names) > 2 or (len(names) == 2 and names[0] != _CATALOG) or names[-1] not in PURE_FUNCTIONS:
        raise _Unsafe(f"function {'.'.join(names)}")
    if node.agg_filter or node.over or node.agg_star or node.agg_distinct or node.agg_order or node.func_variadic:
        raise _Unsafe("an aggregate, window or variadic call")
    node.funcname = (ast.String(_CATALOG), ast.String(names[-1]))


def _type(name: ast.TypeName) -> None:
    names = tuple(n.sval for n in name.names)
    if len(names) > 2 or (len(names) == 2 and names[0] != _CATALOG) or name.setof or name.pct_type:
        raise _Unsafe(f"type {'.'.join(names)}")


def _is_star(node: ast.Node | None) -> bool:
    return isinstance(node, ast.ColumnRef) and isinstance(node.fields[-1], ast.A_Star) and all(
        isinstance(f, ast.String) for f in node.fields[:-1])


def table_name(relation: ast.RangeVar) -> str:
    """A statement's table, written as to_regclass() reads a name (schema-qualified where it was)."""
    return RawStream()(ast.RangeVar(relname=relation.relname, schemaname=relation.schemaname, inh=True,
                                    relpersistence="p"))


@dataclass(frozen=True)
class TableFacts:
    """What the catalog says of one of a look-ahead's tables (service.py's check)."""

    schema: str
    name: str
    plain: bool  # a plain or partitioned table without row security, all of whose descendants are tables
    readable: bool  # the session's login may read some column of it
    columns: frozenset[str]
    refused: frozenset[str]  # columns the query names that the login may not read, or of a type outside pg_catalog


def verdict(plan: ReadPlan, facts: Sequence[TableFacts | None]) -> str | None:
    """Why the query may not run, given the facts of its tables (in plan.tables' order; None where a
    name is not a table the service connection sees); None when it may."""
    for name, table in zip(plan.tables, facts, strict=True):
        if table is None:
            return f"{name} is not a table the proxy's service login sees"
        if not table.plain:
            return f"{name} is not a plain table (a view, a foreign table, or a table with row-level security)"
        if not table.readable:
            return f"the session's login may not read {name}"
        if table.refused:
            return f"{name} has columns the session's login may not read or of a type outside pg_catalog"
    known = set().union(*(t.columns for t in facts if t is not None)) | set(plan.derived)
    unknown = sorted(set(plan.columns) - known)
    return f"{', '.join(unknown)} is not a column of its tables" if unknown else None


def qualified(query: str, tables: dict[str, tuple[str, str]]) -> str:
    """The query with each table written as the (schema, name) it was resolved to."""
    (raw,) = parse_sql(query)
    ctes = {cte.ctename for cte in raw.stmt.withClause.ctes} if raw.stmt.withClause is not None else set()
    for relation in _relations(raw.stmt):
        if relation.schemaname is None and relation.relname in ctes:
            continue
        relation.schemaname, relation.relname = tables[table_name(relation)]
    return RawStream()(raw.stmt)


def _relations(node: object) -> Iterable[ast.RangeVar]:
    if isinstance(node, tuple | list):
        for item in node:
            yield from _relations(item)
    elif isinstance(node, ast.RangeVar):
        yield node
    elif isinstance(node, ast.Node):
        for slot in type(node).__slots__:
            yield from _relations(getattr(node, slot, None))
