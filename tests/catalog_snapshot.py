"""A database's catalog as text, for comparing two databases object by object.

`snapshot` reads every object of every non-system schema (ours, the
bootstrap's, and what our SQL adds to them, e.g. triggers on auth.users) and
returns ``{"<kind> <name>": "<definition>"}``; `differences` lists, readably,
what one snapshot has that the other has not or has otherwise. OIDs, attnums
and the order of grants never appear: two databases built by different but
equivalent SQL compare equal; any difference a caller could observe does not.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import psycopg

SYSTEM = ("pg_catalog", "information_schema")
OURS = ("n.nspname not in ('pg_catalog', 'information_schema') "
        "and n.nspname not like 'pg\\_toast%' and n.nspname not like 'pg\\_temp\\_%'")


def acl(column: str, kind: str | None = None, owner: str = "") -> str:
    """SQL for an ACL as sorted text. With ``kind`` (an SQL expression for
    acldefault's object type) a null ACL is spelled out as the default it
    means: the owner's rights and, for functions and types, PUBLIC's."""
    source = column if kind is None else f"coalesce({column}, acldefault({kind}, {owner}))"
    return (
        "(select coalesce(string_agg(x.item, ', ' order by x.item), '') from ("
        " select case when a.grantee = 0 then 'PUBLIC' else pg_get_userbyid(a.grantee) end"
        " || '=' || a.privilege_type || case when a.is_grantable then '*' else '' end"
        " || ' by ' || pg_get_userbyid(a.grantor) as item"
        f" from aclexplode({source}) a) x)"
    )


TYPE_OWNER_ACL = ("E'\\nowner ' || pg_get_userbyid(t.typowner) || E'\\nacl ' || "
                  + acl("t.typacl", "'T'", "t.typowner"))
RELATION_ACL = acl("c.relacl", "case when c.relkind = 'S' then 's' else 'r' end::\"char\"", "c.relowner")

QUERIES: dict[str, str] = {
    "schema": f"""
        select n.nspname,
               'owner ' || pg_get_userbyid(n.nspowner) || E'\\nacl ' || {acl('n.nspacl', "'n'", 'n.nspowner')}
          from pg_namespace n where {OURS}""",
    "extension": """
        select e.extname, 'version ' || e.extversion || ' in ' || e.extnamespace::regnamespace::text
          from pg_extension e""",
    "enum": f"""
        select format_type(t.oid, null),
               'labels ' || (select string_agg(quote_literal(e.enumlabel), ', ' order by e.enumsortorder)
                               from pg_enum e where e.enumtypid = t.oid)
               || {TYPE_OWNER_ACL}
          from pg_type t join pg_namespace n on n.oid = t.typnamespace
         where {OURS} and t.typtype = 'e'""",
    "composite type": f"""
        select format_type(t.oid, null),
               (select string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod), E'\\n'
                                  order by a.attnum)
                  from pg_attribute a where a.attrelid = t.typrelid and a.attnum > 0 and not a.attisdropped)
               || {TYPE_OWNER_ACL}
          from pg_type t join pg_namespace n on n.oid = t.typnamespace
          join pg_class c on c.oid = t.typrelid
         where {OURS} and t.typtype = 'c' and c.relkind = 'c'""",
    "domain": f"""
        select format_type(t.oid, null),
               'base ' || format_type(t.typbasetype, t.typtypmod)
               || case when t.typnotnull then ' not null' else '' end
               || coalesce(' default ' || t.typdefault, '')
               || coalesce(E'\\n' || (select string_agg('constraint ' || c.conname || ' '
                                                        || pg_get_constraintdef(c.oid, true), E'\\n'
                                                        order by c.conname)
                                        from pg_constraint c where c.contypid = t.oid), '')
               || {TYPE_OWNER_ACL}
          from pg_type t join pg_namespace n on n.oid = t.typnamespace
         where {OURS} and t.typtype = 'd'""",
    "relation": f"""
        select c.oid::regclass::text,
               'kind ' || c.relkind::text || ' persistence ' || c.relpersistence::text
               || ' replica identity ' || c.relreplident::text
               || E'\\nowner ' || pg_get_userbyid(c.relowner)
               || E'\\nrow level security ' || case when c.relrowsecurity then 'enabled' else 'disabled' end
               || case when c.relforcerowsecurity then ', forced' else '' end
               || E'\\noptions ' || coalesce(array_to_string(c.reloptions, ', '), '')
               || E'\\nacl ' || {RELATION_ACL}
               || coalesce(E'\\n' || (
                    select string_agg(format('column %s: %s %s%s%s%s%s%s', a.rn, a.attname,
                                             format_type(a.atttypid, a.atttypmod),
                                             case when a.attnotnull then ' not null' else '' end,
                                             coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), ''),
                                             case a.attidentity when 'a' then ' generated always as identity'
                                                                when 'd'
                                                                  then ' generated by default as identity'
                                                                else '' end,
                                             case when a.attgenerated = 's' then ' (stored generated)'
                                                  else '' end,
                                             case when a.attacl is null then ''
                                                  else ' acl ' || {acl('a.attacl')} end),
                                      E'\\n' order by a.rn)
                      from (select a.*, row_number() over (order by a.attnum) as rn from pg_attribute a
                             where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped) a
                      left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum), '')
               || case when c.relkind in ('v', 'm') then E'\\ndefinition\\n' || pg_get_viewdef(c.oid, true)
                       else '' end
          from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where {OURS} and c.relkind in ('r', 'p', 'v', 'm', 'f', 'S')""",
    "sequence": f"""
        select s.seqrelid::regclass::text,
               format('type %s start %s increment %s min %s max %s cache %s cycle %s',
                      format_type(s.seqtypid, null), s.seqstart, s.seqincrement, s.seqmin, s.seqmax,
                      s.seqcache, s.seqcycle)
               || coalesce(E'\\nowned by ' || (
                    select string_agg(d.refobjid::regclass::text || '.' || a.attname
                                      || ' (' || d.deptype::text || ')', ', ')
                      from pg_depend d
                      join pg_attribute a on a.attrelid = d.refobjid and a.attnum = d.refobjsubid
                     where d.classid = 'pg_class'::regclass and d.objid = s.seqrelid
                       and d.refclassid = 'pg_class'::regclass and d.deptype in ('a', 'i')), '')
          from pg_sequence s join pg_class c on c.oid = s.seqrelid
          join pg_namespace n on n.oid = c.relnamespace
         where {OURS}""",
    "constraint": f"""
        select c.conrelid::regclass::text || ' ' || c.conname,
               c.contype::text || ' ' || pg_get_constraintdef(c.oid, true)
               || case when c.condeferrable then ' deferrable' else '' end
               || case when c.condeferred then ' initially deferred' else '' end
               || case when c.convalidated then '' else ' not valid' end
          from pg_constraint c join pg_namespace n on n.oid = c.connamespace
         where {OURS} and c.conrelid <> 0""",
    "index": f"""
        select i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
               || case when i.indisclustered then ' (clustered)' else '' end
          from pg_index i join pg_class c on c.oid = i.indexrelid
          join pg_namespace n on n.oid = c.relnamespace
         where {OURS}""",
    "policy": f"""
        select p.polrelid::regclass::text || ' ' || p.polname,
               format(E'%s for %s to %s\\nusing %s\\nwith check %s',
                      case when p.polpermissive then 'permissive' else 'restrictive' end,
                      case p.polcmd when 'r' then 'select' when 'a' then 'insert' when 'w' then 'update'
                                    when 'd' then 'delete' else 'all' end,
                      (select string_agg(case when r = 0 then 'public' else pg_get_userbyid(r) end, ', '
                                         order by 1)
                         from unnest(p.polroles) r),
                      coalesce(pg_get_expr(p.polqual, p.polrelid, true), '-'),
                      coalesce(pg_get_expr(p.polwithcheck, p.polrelid, true), '-'))
          from pg_policy p join pg_class c on c.oid = p.polrelid join pg_namespace n on n.oid = c.relnamespace
         where {OURS}""",
    "trigger": f"""
        select t.tgrelid::regclass::text || ' ' || t.tgname,
               pg_get_triggerdef(t.oid, true) || E'\\nenabled ' || t.tgenabled::text
          from pg_trigger t join pg_class c on c.oid = t.tgrelid join pg_namespace n on n.oid = c.relnamespace
         where {OURS} and not t.tgisinternal""",
    "rule": f"""
        select r.ev_class::regclass::text || ' ' || r.rulename, pg_get_ruledef(r.oid, true)
          from pg_rewrite r join pg_class c on c.oid = r.ev_class
          join pg_namespace n on n.oid = c.relnamespace
         where {OURS} and r.rulename <> '_RETURN'""",
    "function": f"""
        select p.oid::regprocedure::text,
               case when p.prokind in ('f', 'p', 'w') then pg_get_functiondef(p.oid)
                    else 'kind ' || p.prokind::text end
               || E'\\nowner ' || pg_get_userbyid(p.proowner)
               || E'\\nsecurity definer ' || p.prosecdef || ', volatility ' || p.provolatile::text
               || ', parallel ' || p.proparallel::text || ', strict ' || p.proisstrict
               || ', leakproof ' || p.proleakproof || ', cost ' || p.procost || ', rows ' || p.prorows
               || E'\\nconfig ' || coalesce(array_to_string(p.proconfig, ', '), '')
               || E'\\nacl ' || {acl('p.proacl', "'f'", 'p.proowner')}
          from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         where {OURS}""",
    "comment on": f"""
        select o.type || ' ' || o.identity, d.description
          from pg_description d
         cross join lateral pg_identify_object(d.classoid, d.objoid, d.objsubid) o
          left join pg_namespace n on n.nspname = coalesce(o.schema, case when o.type = 'schema'
                                                                          then o.identity end)
         where n.oid is not null and {OURS}""",
    "default privileges": f"""
        select pg_get_userbyid(d.defaclrole)
               || coalesce(' in schema ' || d.defaclnamespace::regnamespace::text, '')
               || ' on ' || d.defaclobjtype::text,
               {acl('d.defaclacl')}
          from pg_default_acl d""",
    "event trigger": """
        select e.evtname, e.evtevent || ' ' || e.evtfoid::regprocedure::text || ' ' || e.evtenabled::text
               || coalesce(' tags ' || array_to_string(e.evttags, ', '), '')
          from pg_event_trigger e""",
}


def snapshot(conn: psycopg.Connection) -> dict[str, str]:
    """Every object of the non-system schemas, ``{"<kind> <name>": definition}``."""
    result: dict[str, str] = {}
    # Names come out schema-qualified (public too) and definitions alike.
    conn.execute("set search_path = pg_catalog")
    for kind, query in QUERIES.items():
        for name, definition in conn.execute(query).fetchall():  # type: ignore[arg-type]
            key = f"{kind} {name}"
            assert key not in result, f"two objects named {key}"
            result[key] = definition if definition is not None else ""
    return result


def differences(left: dict[str, str], right: dict[str, str],
                names: tuple[str, str] = ("migrations", "schemas")) -> list[str]:
    """What differs between two snapshots, one readable entry per object."""
    found: list[str] = []
    for key in sorted(left.keys() | right.keys()):
        if key not in right:
            found.append(f"{key}: only in {names[0]}")
        elif key not in left:
            found.append(f"{key}: only in {names[1]}")
        elif left[key] != right[key]:
            diff = difflib.unified_diff(left[key].splitlines(), right[key].splitlines(),
                                        names[0], names[1], n=1, lineterm="")
            found.append(f"{key}: differs\n" + "\n".join("    " + line for line in _clip(diff)))
    return found


def _clip(lines: Iterable[str], limit: int = 40) -> list[str]:
    kept = list(lines)
    return kept if len(kept) <= limit else [*kept[:limit], f"... ({len(kept) - limit} more lines)"]
