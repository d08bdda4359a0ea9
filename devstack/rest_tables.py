"""Table reads in PostgREST's query language, turned into one parameterised query.

Only what the project's callers use: ``select`` (columns, ``alias:column``),
horizontal filters (``eq neq lt lte gt gte like ilike is in`` and ``not.``),
``order``, ``limit`` and ``offset``. Every identifier is checked against the
catalog of the ``public`` schema before it reaches SQL, and every value is a
bound parameter cast to its column's declared type, so a bad value is the
database's own 22xxx error, as with PostgREST.
"""

from __future__ import annotations

import json
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


# --- writes: POST (insert, upsert), PATCH (update), DELETE ----------------------------------------


def primary_key(conn: psycopg.Connection, table: str) -> list[str]:
    """The primary key columns of ``public.<table>`` (PostgREST's default ``on_conflict``)."""
    rows = conn.execute(
        """
        select a.attname
          from pg_index i
          join pg_class c on c.oid = i.indrelid
          join pg_namespace n on n.oid = c.relnamespace
          join pg_attribute a on a.attrelid = c.oid and a.attnum = any(i.indkey)
         where n.nspname = 'public' and c.relname = %s and i.indisprimary
         order by array_position(i.indkey::int2[], a.attnum)
        """,
        (table,),
    ).fetchall()
    return [name for (name,) in rows]


@dataclass
class TableWrite:
    """One write, rendered as a statement whose single row is (JSON array text of the
    affected rows or null, how many rows it affected)."""

    statement: sql.Composed
    params: list[object]


def _body_columns(table: str, columns: Mapping[str, str], rows: Sequence[Mapping[str, object]]) -> list[str]:
    """The columns a body writes; every row must name the same ones (as PostgREST requires)."""
    names: list[str] = []
    if any(set(row) != set(rows[0]) for row in rows):
        raise QueryError("PGRST102", "All object keys must match")
    for row in rows:
        for name in row:
            if name not in columns:
                raise QueryError("PGRST204",
                                 f"Could not find the '{name}' column of '{table}' in the schema cache")
            if name not in names:
                names.append(name)
    return names


def _wrapped(write: sql.Composable, returning: bool) -> sql.Composed:
    result = sql.SQL("coalesce(json_agg(w), '[]')::text") if returning else sql.SQL("null::text")
    return sql.SQL("with w as ({}) select {}, count(*) from w").format(write, result)


def insert(table: str, columns: Mapping[str, str], rows: Sequence[Mapping[str, object]], *,
           returning: bool, on_conflict: list[str] | None = None, merge: bool = True) -> TableWrite:
    """``POST /rest/v1/<table>``: rows from a JSON array (or one object); keys a row lacks are null.
    With ``on_conflict``, an upsert: merge (update the sent columns) or ignore duplicates."""
    names = _body_columns(table, columns, rows)
    if not names:
        raise QueryError("PGRST102", "Empty or invalid json", "The body names no column")
    target = sql.SQL("{}.{}").format(sql.Identifier("public"), sql.Identifier(table))
    column_list = sql.SQL(", ").join(sql.Identifier(n) for n in names)
    conflict = sql.SQL("")
    if on_conflict is not None:
        for name in on_conflict:
            if name not in columns:
                raise QueryError("42703", f"column {table}.{name} does not exist")
        keys = sql.SQL(", ").join(sql.Identifier(n) for n in on_conflict)
        updates = [n for n in names if n not in on_conflict]
        if merge and updates:
            assignments = sql.SQL(", ").join(
                sql.SQL("{} = excluded.{}").format(sql.Identifier(n), sql.Identifier(n)) for n in updates)
            conflict = sql.SQL(" on conflict ({}) do update set {}").format(keys, assignments)
        else:
            conflict = sql.SQL(" on conflict ({}) do nothing").format(keys)
    write = sql.SQL("insert into {} ({}) select {} from json_populate_recordset(null::{}, {}::json){} "
                    "returning {}").format(target, column_list, column_list, target, sql.Placeholder(),
                                           conflict, sql.SQL("*") if returning else sql.SQL("1"))
    return TableWrite(_wrapped(write, returning), [_json(rows)])


def update(table: str, columns: Mapping[str, str], values: Mapping[str, object],
           params: Sequence[tuple[str, str]], *, returning: bool) -> TableWrite:
    """``PATCH /rest/v1/<table>?<filters>``: set the body's columns on the matching rows."""
    names = _body_columns(table, columns, [values])
    if not names:
        raise QueryError("PGRST102", "Empty or invalid json", "The body names no column")
    query = build(table, columns, params)
    target = sql.SQL("{}.{}").format(sql.Identifier("public"), sql.Identifier(table))
    column_list = sql.SQL(", ").join(sql.Identifier(n) for n in names)
    where = sql.SQL(" and ").join(query.where) if query.where else sql.SQL("true")
    write = sql.SQL("update {} set ({}) = (select {} from json_populate_record(null::{}, {}::json)) "
                    "where {} returning {}").format(target, column_list, column_list, target,
                                                    sql.Placeholder(), where,
                                                    sql.SQL("*") if returning else sql.SQL("1"))
    return TableWrite(_wrapped(write, returning), [_json(values), *query.params])


def delete(table: str, columns: Mapping[str, str], params: Sequence[tuple[str, str]], *,
           returning: bool) -> TableWrite:
    """``DELETE /rest/v1/<table>?<filters>``."""
    query = build(table, columns, params)
    target = sql.SQL("{}.{}").format(sql.Identifier("public"), sql.Identifier(table))
    where = sql.SQL(" and ").join(query.where) if query.where else sql.SQL("true")
    write = sql.SQL("delete from {} where {} returning {}").format(
        target, where, sql.SQL("*") if returning else sql.SQL("1"))
    return TableWrite(_wrapped(write, returning), list(query.params))


def _json(value: object) -> str:
    return json.dumps(value)
