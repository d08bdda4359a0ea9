"""Table reads in PostgREST's query language, turned into one parameterised query.

Only what the project's callers use: ``select`` (columns, ``alias:column``),
horizontal filters (``eq neq lt lte gt gte like ilike is in`` and ``not.``),
``order``, ``limit`` and ``offset``. Every identifier is checked against the
catalog of the ``public`` schema before it reaches SQL, and every value is a
bound parameter cast to its column's declared type, so a bad value is the
database's own 22xxx error, as with PostgREST.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

RESERVED = frozenset({"select", "order", "limit", "offset", "on_conflict", "columns"})
_OPERATORS = {"eq": "=", "neq": "<>", "lt": "<", "lte": "<=", "gt": ">", "gte": ">="}
_IS_VALUES = {"null": "null", "true": "true", "false": "false", "unknown": "unknown"}
_ORDER_WORDS = {"asc": "asc", "desc": "desc", "nullsfirst": "nulls first", "nullslast": "nulls last"}
_ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class QueryError(ValueError):
    """A request the query language cannot express; carries PostgREST's code."""

    def __init__(self, code: str, message: str, details: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
        self.status = status


def table_columns(conn: psycopg.Connection, table: str) -> dict[str, str]:
    """Column name -> type name of a table or view in ``public`` ({} when there is none)."""
    rows = conn.execute(
        """
        select a.attname, format_type(a.atttypid, null)
          from pg_attribute a
          join pg_class c on c.oid = a.attrelid
          join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = 'public' and c.relname = %s
           and c.relkind in ('r', 'v', 'm', 'p', 'f')
           and a.attnum > 0 and not a.attisdropped
         order by a.attnum
        """,
        (table,),
    ).fetchall()
    return {name: type_name for name, type_name in rows}


@dataclass
class TableQuery:
    """The parts of one read: built from the query string, rendered to SQL."""

    table: str
    columns: Mapping[str, str]
    select: list[tuple[str, str]] = field(default_factory=list)  # (column, output name)
    where: list[sql.Composable] = field(default_factory=list)
    params: list[object] = field(default_factory=list)
    order: list[sql.Composable] = field(default_factory=list)
    limit: int | None = None
    offset: int = 0

    def _column(self, name: str) -> sql.Identifier:
        if name not in self.columns:
            raise QueryError("42703", f"column {self.table}.{name} does not exist")
        return sql.Identifier(name)

    def _from_where(self) -> sql.Composed:
        where = sql.SQL(" and ").join(self.where) if self.where else sql.SQL("true")
        return sql.SQL("from {}.{} where {}").format(
            sql.Identifier("public"), sql.Identifier(self.table), where
        )

    def rows_query(self) -> sql.Composed:
        """One row, one column: the JSON array text of the selected rows."""
        if self.select:
            cols = sql.SQL(", ").join(
                sql.SQL("{} as {}").format(sql.Identifier(col), sql.Identifier(out))
                for col, out in self.select
            )
        else:
            cols = sql.SQL("*")
        limit = sql.SQL("")
        if self.limit is not None:
            limit = sql.SQL(" limit {}").format(sql.Literal(self.limit))
        order = sql.SQL(" order by ") + sql.SQL(", ").join(self.order) if self.order else sql.SQL("")
        return sql.SQL(
            "select coalesce(json_agg(t), '[]')::text from (select {} {}{}{} offset {}) t"
        ).format(cols, self._from_where(), order, limit, sql.Literal(self.offset))

    def count_query(self) -> sql.Composed:
        return sql.SQL("select count(*) {}").format(self._from_where())


def _split_list(text: str) -> list[str]:
    """``a,"b,c",d`` -> ["a", "b,c", "d"] (PostgREST's ``in.(...)`` list)."""
    items: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return items


def _filter(query: TableQuery, name: str, expression: str) -> None:
    column = query._column(name)
    type_name = sql.SQL(query.columns[name])
    negate = expression.startswith("not.")
    if negate:
        expression = expression[4:]
    op, sep, value = expression.partition(".")
    if not sep:
        raise QueryError("PGRST100", f'"failed to parse filter ({expression})"')
    if op in _OPERATORS:
        clause = sql.SQL("{} {} {}::{}").format(column, sql.SQL(_OPERATORS[op]), sql.Placeholder(), type_name)
        query.params.append(value)
    elif op in ("like", "ilike"):
        clause = sql.SQL("{}::text {} {}").format(column, sql.SQL(op), sql.Placeholder())
        query.params.append(value.replace("*", "%"))
    elif op == "is":
        if value.lower() not in _IS_VALUES:
            raise QueryError("PGRST100", f'"failed to parse filter (is.{value})"')
        clause = sql.SQL("{} is {}").format(column, sql.SQL(_IS_VALUES[value.lower()]))
    elif op == "in":
        if not (value.startswith("(") and value.endswith(")")):
            raise QueryError("PGRST100", f'"failed to parse filter (in.{value})"')
        clause = sql.SQL("{} = any({}::{}[])").format(column, sql.Placeholder(), type_name)
        query.params.append(_split_list(value[1:-1]) if value != "()" else [])
    else:
        raise QueryError("PGRST100", f'"failed to parse filter ({op}.{value})"')
    query.where.append(sql.SQL("not ({})").format(clause) if negate else clause)


def _select(query: TableQuery, text: str) -> None:
    for raw in text.split(","):
        item = raw.strip()
        if item in ("*", ""):
            if item == "*":
                query.select.extend((name, name) for name in query.columns)
            continue
        if "(" in item or "::" in item or "->" in item:
            raise QueryError("PGRST100", f'"failed to parse select parameter ({item})"',
                             "Embedding, casts and JSON paths are not supported by the local endpoint")
        alias, _, name = item.rpartition(":")
        alias = alias or name
        if not _ALIAS.match(alias):
            raise QueryError("PGRST100", f'"failed to parse select parameter ({item})"')
        query._column(name)
        query.select.append((name, alias))


def _order(query: TableQuery, text: str) -> None:
    for raw in text.split(","):
        name, *modifiers = raw.strip().split(".")
        parts: list[sql.Composable] = [query._column(name)]
        for modifier in modifiers:
            if modifier not in _ORDER_WORDS:
                raise QueryError("PGRST100", f'"failed to parse order ({raw})"')
            parts.append(sql.SQL(_ORDER_WORDS[modifier]))
        query.order.append(sql.SQL(" ").join(parts))


def _non_negative(name: str, text: str) -> int:
    if not text.isdigit():
        raise QueryError("PGRST100", f'"failed to parse {name} ({text})"')
    return int(text)


def build(table: str, columns: Mapping[str, str], params: Sequence[tuple[str, str]]) -> TableQuery:
    """The query for ``GET /rest/v1/<table>?<params>``; raises ``QueryError``."""
    query = TableQuery(table, columns)
    for key, value in params:
        if key == "select":
            _select(query, value)
        elif key == "order":
            _order(query, value)
        elif key == "limit":
            query.limit = _non_negative("limit", value)
        elif key == "offset":
            query.offset = _non_negative("offset", value)
        elif key in RESERVED:
            continue
        elif key in ("or", "and", "not.or", "not.and"):
            raise QueryError("PGRST100", f'"failed to parse logic tree ({value})"',
                             "Logical operators are not supported by the local endpoint")
        else:
            _filter(query, key, value)
    return query
