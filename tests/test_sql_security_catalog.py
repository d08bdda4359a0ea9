"""Security-advisor checks, as catalog queries over what the migrations made.

These are the rules Supabase's database linter applies (plus our own): they
read pg_proc, pg_class, pg_policies and the ACLs of the migrated database, so a
future migration that forgets a revoke, a search_path or RLS fails here even
if no behaviour test happens to touch the new object.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import psycopg
import pytest

from tests.support import Db

USER_CALLABLE = {
    "get_credit_balance", "deduct_credits", "reserve_credits", "capture_hold", "release_hold",
    "create_license_key", "revoke_license_key", "extend_hold", "estimate_cost", "set_spend_limit",
    "set_balance_alert", "set_auto_topup", "get_credit_usage",
}
SERVICE_ONLY_CONTRACT = {
    "deduct_credits_by_license", "add_purchased_credits", "add_subscription_credits",
    "expire_subscription_credits", "refund_credits", "clawback_credits", "admin_adjust_credits",
    "run_monthly_reset", "reconcile_credit_balances",
}
API_ROLES = ("anon", "authenticated", "service_role")

# Functions of ours: in public or private and not part of an extension.
OUR_FUNCTIONS = """
select p.oid, n.nspname, p.proname, p.oid::regprocedure::text as signature,
       p.prosecdef, coalesce(p.proconfig, '{}') as config, pg_get_userbyid(p.proowner) as owner
  from pg_proc p
  join pg_namespace n on n.oid = p.pronamespace
 where n.nspname in ('public', 'private')
   and not exists (select 1 from pg_depend d
                    where d.classid = 'pg_proc'::regclass and d.objid = p.oid and d.deptype = 'e')
"""


Run = Callable[..., list[tuple]]


# --- finders: each lists what breaks one rule (empty = the rule holds) --------

def unpinned_functions(run: Run) -> list[str]:
    return [r[0] for r in run(
        "select sig from (" + OUR_FUNCTIONS + ") f(oid, nspname, proname, sig, prosecdef, config, owner) "
        "where not exists (select 1 from unnest(config) c where c like 'search_path=%%')")]


def public_definers(run: Run) -> list[str]:
    return [r[0] for r in run(
        "select sig from (" + OUR_FUNCTIONS + ") f(oid, nspname, proname, sig, prosecdef, config, owner) "
        "where nspname = 'public' and prosecdef")]


def anon_executable(run: Run) -> list[str]:
    # has_function_privilege follows PUBLIC grants and role membership, so it
    # answers what anon can really run.
    return [r[0] for r in run(
        "select sig from (" + OUR_FUNCTIONS + ") f(oid, nspname, proname, sig, prosecdef, config, owner) "
        "where has_function_privilege('anon', oid, 'EXECUTE')")]


def tables_without_rls(run: Run) -> list[str]:
    return [r[0] for r in run(
        "select c.relname from pg_class c where c.relnamespace = 'public'::regnamespace "
        "and c.relkind in ('r', 'p') and not c.relrowsecurity")]


def definer_views(run: Run) -> list[str]:
    return [r[0] for r in run(
        "select c.relname from pg_class c where c.relnamespace = 'public'::regnamespace "
        "and c.relkind in ('v', 'm') and not coalesce(c.reloptions, '{}') "
        "&& array['security_invoker=true', 'security_invoker=on', 'security_invoker=1']")]


def _policies(run: Run) -> list[tuple]:
    return run(
        "select tablename, policyname, permissive, roles, cmd, coalesce(qual, ''), coalesce(with_check, '') "
        "from pg_policies where schemaname = 'public'"
    )


def policies_reading_user_metadata(run: Run) -> list[str]:
    return [p[1] for p in _policies(run) if re.search(r"user_meta", p[5] + p[6], re.I)]


def policies_calling_per_row(run: Run, fn: str) -> list[str]:
    # "(select auth.uid())" is evaluated once as an initplan; a bare call runs per row.
    name = fn.split(".")[1].rstrip("()")
    wrapped = re.compile(rf"\(\s*SELECT {re.escape(fn)}( AS {name})?\s*\)", re.I)
    return [p[1] for p in _policies(run) if fn in wrapped.sub("", p[5] + " " + p[6])]


def always_true_write_policies(run: Run) -> list[str]:
    return [p[1] for p in _policies(run)
            if p[2] == "PERMISSIVE" and p[4] in ("INSERT", "UPDATE", "DELETE", "ALL")
            and ("true" in (p[5].strip().lower(), p[6].strip().lower()) or (not p[5] and not p[6]))]


def overlapping_permissive_policies(run: Run) -> dict[tuple[str, str, str], list[str]]:
    seen: dict[tuple[str, str, str], list[str]] = {}
    for table, name, permissive, roles, cmd, _, _ in _policies(run):
        if permissive != "PERMISSIVE":
            continue
        actions = ("SELECT", "INSERT", "UPDATE", "DELETE") if cmd == "ALL" else (cmd,)
        for role in roles:
            for action in actions:
                seen.setdefault((table, role, action), []).append(name)
    return {k: v for k, v in seen.items() if len(v) > 1}


@pytest.fixture(scope="module")
def functions(database: Db) -> list[tuple]:
    rows = database.sql(OUR_FUNCTIONS + " order by 2, 3")
    assert rows, "no functions found: the migrations did not run"
    return rows


def executors(database: Db, oid: int) -> set[str]:
    """Who holds EXECUTE on a function: role names, 'PUBLIC' for grantee 0."""
    rows = database.sql(
        """
        select case when a.grantee = 0 then 'PUBLIC' else pg_get_userbyid(a.grantee) end
          from pg_proc p
         cross join lateral aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
         where p.oid = %s and a.privilege_type = 'EXECUTE'
        """,
        oid,
    )
    return {r[0] for r in rows}


def test_every_function_pins_its_search_path(database: Db, functions: list[tuple]) -> None:
    assert unpinned_functions(database.sql) == []


def test_no_security_definer_function_in_public(database: Db, functions: list[tuple]) -> None:
    assert public_definers(database.sql) == []


def test_every_contract_function_exists_in_public(functions: list[tuple]) -> None:
    public = {name for _, schema, name, *_ in functions if schema == "public"}
    assert (USER_CALLABLE | SERVICE_ONLY_CONTRACT) <= public


def test_no_function_is_executable_by_anon_or_public(database: Db, functions: list[tuple]) -> None:
    assert anon_executable(database.sql) == []
    public_grant = [sig for oid, _, _, sig, *_ in functions if "PUBLIC" in executors(database, oid)]
    assert public_grant == []


def test_service_only_functions_run_for_service_role_and_owner_only(
        database: Db, functions: list[tuple]) -> None:
    # Anything in public that is not user-callable (the contract's service
    # functions and any later addition, such as the webhook's) is service-only.
    wrong = {}
    for oid, schema, name, sig, _, _, owner in functions:
        if schema != "public" or name in USER_CALLABLE:
            continue
        granted = executors(database, oid)
        if granted != {owner, "service_role"}:
            wrong[sig] = granted
    assert wrong == {}
    assert not database.one(
        "select bool_or(has_function_privilege('authenticated', p.oid, 'EXECUTE')) from pg_proc p "
        "join pg_namespace n on n.oid = p.pronamespace where n.nspname = 'public' and p.proname <> all(%s)",
        sorted(USER_CALLABLE),
    )


def test_user_callable_functions_run_for_authenticated_and_service_role(
        database: Db, functions: list[tuple]) -> None:
    granted = {name: executors(database, oid) - {owner}
               for oid, schema, name, _, _, _, owner in functions
               if schema == "public" and name in USER_CALLABLE}
    assert granted == {name: {"authenticated", "service_role"} for name in USER_CALLABLE}


def test_private_definer_code_is_not_reachable_by_anon(database: Db, functions: list[tuple]) -> None:
    # The private schema holds the definer functions; anon must not even be
    # able to resolve names in it.
    assert database.one("select has_schema_privilege('anon', 'private', 'USAGE')") is False
    public_usage = database.one(
        "select count(*) from pg_namespace n cross join lateral aclexplode(n.nspacl) a "
        "where n.nspname = 'private' and a.grantee = 0"
    )
    assert public_usage == 0
    # Authenticated may run only the definer code behind user-callable
    # wrappers, the read helpers RLS policies call, and the invoker helpers
    # the credit_balances and credit_grants views compute with (pure, or
    # reading under RLS), and the caller's own account for a null p_account_id.
    allowed = USER_CALLABLE | {"is_service", "is_super_admin", "member_tenant_ids", "readable_account_ids",
                               "managed_account_ids", "personal_account", "window_bounds", "lapsed_held",
                               "balance_json", "next_expiry", "current_wallet", "sweep_due", "hold_fates",
                               "fates", "spend_split", "grant_attribution",
                               # realtime.messages' policies: the account a credits topic names.
                               "topic_account"}
    reachable = {name for oid, schema, name, *_ in functions
                 if schema == "private"
                 and database.one("select has_function_privilege('authenticated', %s::oid, 'EXECUTE')", oid)}
    assert reachable <= allowed, reachable - allowed


def test_every_public_table_has_row_level_security(database: Db) -> None:
    assert database.one("select count(*) from pg_class where relnamespace = 'public'::regnamespace "
                        "and relkind = 'r'") > 0
    assert tables_without_rls(database.sql) == []


def test_every_public_view_is_security_invoker(database: Db) -> None:
    views = {r[0] for r in database.sql("select relname from pg_class "
                                        "where relnamespace = 'public'::regnamespace and relkind = 'v'")}
    assert {"credit_balances", "credit_pool_usage", "credit_usage"} <= views
    assert definer_views(database.sql) == []


def test_no_policy_trusts_user_metadata(database: Db) -> None:
    assert _policies(database.sql)
    assert policies_reading_user_metadata(database.sql) == []
    # Nor any function of ours (policies call private helpers): user_metadata
    # is writable by the user and must never decide anything.
    bodies = database.sql(
        "select p.oid::regprocedure::text from pg_proc p join pg_namespace n on n.oid = p.pronamespace "
        "where n.nspname in ('public', 'private') and p.prosrc ~* 'user_meta'"
    )
    assert bodies == []


@pytest.mark.parametrize("fn", ["auth.uid()", "auth.jwt()", "auth.role()"])
def test_policies_call_auth_functions_once_per_statement(database: Db, fn: str) -> None:
    assert policies_calling_per_row(database.sql, fn) == []


def test_no_permissive_write_policy_is_always_true(database: Db) -> None:
    assert always_true_write_policies(database.sql) == []


def test_one_permissive_policy_per_table_role_and_action(database: Db) -> None:
    assert overlapping_permissive_policies(database.sql) == {}


def test_anon_holds_no_privilege_on_any_public_table_or_view(database: Db) -> None:
    rows = database.sql(
        "select c.relname from pg_class c where c.relnamespace = 'public'::regnamespace "
        "and c.relkind in ('r', 'p', 'v', 'm') and (has_table_privilege('anon', c.oid, "
        "'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER') "
        "or has_any_column_privilege('anon', c.oid, 'SELECT, INSERT, UPDATE, REFERENCES'))"
    )
    assert rows == []


def test_authenticated_may_only_read(database: Db) -> None:
    rows = database.sql(
        "select c.relname from pg_class c where c.relnamespace = 'public'::regnamespace "
        "and c.relkind in ('r', 'p', 'v', 'm') and (has_table_privilege('authenticated', c.oid, "
        "'INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER') "
        "or has_any_column_privilege('authenticated', c.oid, 'INSERT, UPDATE, REFERENCES'))"
    )
    assert rows == []


def test_no_api_role_may_use_a_public_sequence(database: Db) -> None:
    # Supabase's default grants open every new sequence; the ledger's ids must not be advanced or reset.
    rows = database.sql(
        "select c.relname, r.role from pg_class c cross join unnest(array['anon', 'authenticated', "
        "'service_role']) r(role) where c.relnamespace = 'public'::regnamespace and c.relkind = 'S' "
        "and has_sequence_privilege(r.role, c.oid, 'USAGE, SELECT, UPDATE')"
    )
    assert rows == []


def test_service_role_may_only_read_the_views(database: Db) -> None:
    rows = database.sql(
        "select c.relname from pg_class c where c.relnamespace = 'public'::regnamespace and c.relkind = 'v' "
        "and has_table_privilege('service_role', c.oid, "
        "'INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER')"
    )
    assert rows == []


def test_service_role_cannot_rewrite_the_books(database: Db) -> None:
    # Ledger, transactions and holds change only through the functions; on
    # accounts service_role may change the plan and the overdraft limit, never a balance.
    for table in ("credit_ledger", "credit_transactions", "credit_holds"):
        assert database.one(
            "select has_table_privilege('service_role', %s::regclass, 'INSERT, UPDATE, DELETE, TRUNCATE')",
            f"public.{table}",
        ) is False, table
    writable = database.sql(
        "select a.attname from pg_attribute a where a.attrelid = 'public.credit_accounts'::regclass "
        "and a.attnum > 0 and not a.attisdropped "
        "and has_column_privilege('service_role', a.attrelid, a.attnum, 'INSERT, UPDATE')"
    )
    assert [r[0] for r in writable] == ["plan_id", "overdraft_limit"]


@pytest.fixture
def scratch(database: Db) -> Iterator[psycopg.Connection]:
    """A connection inside a transaction that is always rolled back."""
    conn = database.connect()
    conn.autocommit = False
    try:
        yield conn
    finally:
        conn.rollback()
        conn.close()


def test_bootstrap_default_grants_are_in_effect(scratch: psycopg.Connection) -> None:
    # Without the migrations' revokes, a new table and function in public
    # would be open to anon, as on a fresh Supabase project. This proves the
    # revokes (checked above) are what keeps anon out.
    scratch.execute("create table public.zz_probe (id int)")
    scratch.execute("create function public.zz_probe_fn() returns int language sql as 'select 1'")
    row = scratch.execute(
        "select has_table_privilege('anon', 'public.zz_probe', 'SELECT, INSERT, UPDATE, DELETE'), "
        "has_table_privilege('authenticated', 'public.zz_probe', 'INSERT'), "
        "has_function_privilege('anon', 'public.zz_probe_fn()', 'EXECUTE')"
    ).fetchone()
    assert row == (True, True, True)
    scratch.execute("set local role anon")
    scratch.execute("insert into public.zz_probe values (1)")
    assert scratch.execute("select public.zz_probe_fn()").fetchone() == (1,)


def test_the_checks_catch_what_they_look_for(scratch: psycopg.Connection) -> None:
    # Offenders of every rule, made in a transaction that is rolled back: each
    # finder must name its offender, or the checks above prove nothing.
    for statement in (
        "create function public.zz_loose() returns int language sql as 'select 1'",
        "create function public.zz_definer() returns int language sql security definer "
        "set search_path = '' as 'select 1'",
        "create table public.zz_open (id int, owner uuid)",
        "create table public.zz_guarded (id int, owner uuid)",
        "alter table public.zz_guarded enable row level security",
        "create policy zz_per_row on public.zz_guarded for select to authenticated "
        "using (owner = auth.uid() or (auth.jwt() -> 'user_metadata' ->> 'role') = 'x')",
        "create policy zz_also_select on public.zz_guarded for select to authenticated using (false)",
        "create policy zz_write_all on public.zz_guarded for insert to authenticated with check (true)",
        "create view public.zz_definer_view as select 1 as one",
    ):
        scratch.execute(statement)

    def run(query: str, *params: object) -> list[tuple]:
        return scratch.execute(query, params or None).fetchall()  # type: ignore[arg-type]

    assert "zz_loose()" in unpinned_functions(run)
    assert "zz_definer()" in public_definers(run)
    assert "zz_loose()" in anon_executable(run)
    assert "zz_open" in tables_without_rls(run)
    assert "zz_definer_view" in definer_views(run)
    assert "zz_per_row" in policies_reading_user_metadata(run)
    assert "zz_per_row" in policies_calling_per_row(run, "auth.uid()")
    assert "zz_per_row" in policies_calling_per_row(run, "auth.jwt()")
    assert "zz_write_all" in always_true_write_policies(run)
    overlapping = overlapping_permissive_policies(run)[("zz_guarded", "authenticated", "SELECT")]
    assert sorted(overlapping) == ["zz_also_select", "zz_per_row"]
