-- Credits core: the data model of the credits engine and who may see it.
--
-- Adds the catalog (plans, packs, prices), tenants and their members, one credit
-- account per user (made by a trigger on auth.users) or tenant, the ledger
-- (immutable, one row per change of one pool), the transaction log (one row per
-- balance-changing call: idempotency record, usage log and refund/clawback
-- bookkeeping), holds and license keys, the frontend views, RLS on every table,
-- and the private helpers the contract functions share.
--
-- Security model
--   * Users write no table directly. Every change goes through the functions in
--     20261121000110_credits_functions.sql: SECURITY INVOKER wrappers in public
--     over SECURITY DEFINER code in schema `private` (not exposed by the REST
--     layer), which decides who the caller is from the role the REST layer set
--     (`current_setting('role')`, which a definer function cannot change) and
--     from `auth.uid()`, never from an argument.
--   * Reads follow RLS: own personal account, accounts of tenants one is a
--     member of, everything for a super admin (`app_metadata.role`, never
--     `user_metadata`).
--   * Nobody, not even service_role or the owner, updates or deletes a ledger
--     row; deleting a user still removes that user's account and rows by cascade.
--
-- Hot path design: the account row carries the balances and is the one row a
-- spend locks; no index covers a column that changes on every spend (so those
-- updates stay HOT, helped by fillfactor); idempotency is a unique index on
-- the transaction log.

create schema if not exists private;
revoke all on schema private from public;
grant usage on schema private to authenticated, service_role;

-- Time-ordered ids (UUIDv7, RFC 9562: 48-bit Unix ms, then random bits) for
-- accounts and transactions. Rows made together sit together in the primary
-- key and, for accounts, in the heap: the monthly reset walks accounts in id
-- order and so reads and writes the table sequentially instead of one random
-- page per account, and transaction inserts append to the right of their
-- index. Plain SQL rather than PostgreSQL 18's uuidv7(), for PostgreSQL 15.
create function private.uuid_v7() returns uuid
language sql volatile parallel safe
set search_path = ''
as $$
  select encode(set_bit(set_bit(
    overlay(uuid_send(gen_random_uuid())
            placing substring(int8send((extract(epoch from clock_timestamp()) * 1000)::bigint) from 3)
            from 1 for 6),
    52, 1), 53, 1), 'hex')::uuid
$$;
revoke all on function private.uuid_v7() from public;

-- ---------------------------------------------------------------------------
-- Catalog: plans, packs, prices. Written by service_role (table editor),
-- readable by everyone signed in.
-- ---------------------------------------------------------------------------

create table public.credit_plans (
  id text primary key check (id ~ '^[a-z0-9_-]{1,64}$'),
  name text not null default '',
  monthly_credits integer not null check (monthly_credits between 0 and 1000000000),
  stripe_price_id text unique,
  created_at timestamptz not null default now()
);
comment on table public.credit_plans is
  'Plans and their monthly allowance; stripe_price_id maps a Stripe subscription price to a plan.';

insert into public.credit_plans (id, name, monthly_credits) values ('free', 'Free', 3);

create table public.credit_packs (
  stripe_price_id text primary key,
  credits integer not null check (credits between 1 and 1000000000),
  name text not null default '',
  created_at timestamptz not null default now()
);
comment on table public.credit_packs is 'One-off credit packs sold through Stripe Checkout, by price id.';

create table public.credit_prices (
  operation text primary key check (length(operation) between 1 and 128),
  credits integer not null default 0 check (credits between 0 and 1000000000),
  credits_per_1k_input_tokens numeric not null default 0 check (credits_per_1k_input_tokens >= 0),
  credits_per_1k_output_tokens numeric not null default 0 check (credits_per_1k_output_tokens >= 0),
  created_at timestamptz not null default now()
);
comment on table public.credit_prices is
  'Cost of an operation: flat credits plus credits per 1,000 input/output tokens, total rounded up.';

alter table public.credit_plans enable row level security;
alter table public.credit_packs enable row level security;
alter table public.credit_prices enable row level security;

create policy credit_plans_read on public.credit_plans for select to authenticated using (true);
create policy credit_packs_read on public.credit_packs for select to authenticated using (true);
create policy credit_prices_read on public.credit_prices for select to authenticated using (true);

revoke all on public.credit_plans, public.credit_packs, public.credit_prices from anon, authenticated;
grant select on public.credit_plans, public.credit_packs, public.credit_prices to authenticated;
revoke truncate, references, trigger on public.credit_plans, public.credit_packs, public.credit_prices
  from service_role;

-- ---------------------------------------------------------------------------
-- Tenants and members. Written by service_role; readable by the members.
-- ---------------------------------------------------------------------------

create table public.tenants (
  id uuid primary key default gen_random_uuid(),
  name text not null check (length(name) between 1 and 200),
  created_at timestamptz not null default now()
);

create table public.tenant_members (
  tenant_id uuid not null references public.tenants (id) on delete cascade,
  user_id uuid not null references auth.users (id) on delete cascade,
  role text not null check (role in ('owner', 'admin', 'member')),
  created_at timestamptz not null default now(),
  primary key (tenant_id, user_id)
);
create index tenant_members_user_id_idx on public.tenant_members (user_id);

alter table public.tenants enable row level security;
alter table public.tenant_members enable row level security;

revoke all on public.tenants, public.tenant_members from anon, authenticated;
grant select on public.tenants, public.tenant_members to authenticated;
revoke truncate, references, trigger on public.tenants, public.tenant_members from service_role;

-- ---------------------------------------------------------------------------
-- Accounts. One per user (user_id) or tenant (tenant_id). The balances live
-- here; `held` is the sum of active holds, `next_hold_expiry` the earliest of
-- their expiries: when it has passed, `held` may include expired holds and
-- is recomputed (readers compute it from the holds instead).
-- ---------------------------------------------------------------------------

create table public.credit_accounts (
  id uuid primary key default private.uuid_v7(),
  user_id uuid unique references auth.users (id) on delete cascade,
  tenant_id uuid unique references public.tenants (id) on delete cascade,
  plan_id text not null default 'free' references public.credit_plans (id),
  subscription_balance bigint not null default 0 check (subscription_balance >= 0),
  purchased_balance bigint not null default 0 check (purchased_balance >= 0),
  held bigint not null default 0 check (held >= 0),
  next_hold_expiry timestamptz,
  -- Scratch column: how much the last debit took from the subscription pool.
  -- Lets one UPDATE ... RETURNING report the split on PostgreSQL 15 (no OLD in RETURNING).
  last_debit_subscription bigint not null default 0,
  period_start timestamptz,
  period_end timestamptz,
  stripe_customer_id text unique,
  stripe_subscription_id text unique,
  subscription_status text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint credit_accounts_one_owner check (num_nonnulls(user_id, tenant_id) = 1)
-- fillfactor 50: the monthly reset rewrites every row of a batch in one
-- transaction, so a page needs room for a second version of each of its rows
-- to keep all those updates HOT (no index writes); spends need far less.
) with (fillfactor = 50);
comment on table public.credit_accounts is
  'Who holds credits: a user (personal account) or a tenant. Balances change only through the credit functions.';

alter table public.credit_accounts enable row level security;
revoke all on public.credit_accounts from anon, authenticated, service_role;
grant select on public.credit_accounts to authenticated, service_role;
-- Operators may move an account to another plan by hand; balances stay function-only.
grant update (plan_id) on public.credit_accounts to service_role;

-- ---------------------------------------------------------------------------
-- Transactions: one row per balance-changing call (and per hold reservation).
-- The unique (account_id, idempotency_key) index is the idempotency check; the
-- stored result is what a replay returns. Spends double as the usage log.
-- ---------------------------------------------------------------------------

create table public.credit_transactions (
  id uuid primary key default private.uuid_v7(),
  -- No foreign key (nor on the ledger): see private.delete_account_books below.
  account_id uuid not null,
  kind text not null check (kind in (
    'spend', 'capture', 'reserve', 'purchase', 'grant', 'expire', 'refund', 'clawback', 'adjustment')),
  idempotency_key text not null,
  request_hash uuid not null,
  result jsonb not null,
  amount bigint not null default 0,
  pool text check (pool in ('subscription', 'purchased')),
  refunded bigint not null default 0,
  clawed_back bigint not null default 0,
  stripe_ref text,
  operation text,
  model text,
  input_tokens integer,
  output_tokens integer,
  description text,
  metadata jsonb not null default '{}'::jsonb,
  actor_id uuid,
  created_at timestamptz not null default now(),
  constraint credit_transactions_idempotency unique (account_id, idempotency_key)
);
create index credit_transactions_stripe_ref_idx on public.credit_transactions (stripe_ref)
  where stripe_ref is not null;

alter table public.credit_transactions enable row level security;
revoke all on public.credit_transactions from anon, authenticated, service_role;
grant select on public.credit_transactions to authenticated, service_role;

-- ---------------------------------------------------------------------------
-- Ledger: one immutable row per change of one pool. For every account and
-- pool, balance = sum(amount). Subscription rows carry the period they belong to.
-- ---------------------------------------------------------------------------

create table public.credit_ledger (
  id bigint generated always as identity,
  account_id uuid not null,
  transaction_id uuid not null,
  pool text not null check (pool in ('subscription', 'purchased')),
  amount bigint not null check (amount <> 0),
  balance_after bigint not null check (balance_after >= 0),
  type text not null check (type in (
    'grant', 'purchase', 'spend', 'refund', 'expire', 'clawback', 'adjustment')),
  idempotency_key text,
  stripe_ref text,
  metadata jsonb not null default '{}'::jsonb,
  actor_id uuid,
  period_start timestamptz,
  period_end timestamptz,
  created_at timestamptz not null default now(),
  -- One index serves uniqueness and the per-account listing (newest first).
  primary key (account_id, id)
);
comment on table public.credit_ledger is
  'Immutable: every change of a pool. Nobody can update or delete a row (a user''s deletion cascades).';

alter table public.credit_ledger enable row level security;
revoke all on public.credit_ledger from anon, authenticated, service_role;
grant select on public.credit_ledger to authenticated, service_role;
-- Supabase's default grants open new sequences to the API roles; only definer code writes the ledger.
revoke all on sequence public.credit_ledger_id_seq from anon, authenticated, service_role;

-- Privileges already keep everyone but the owner from writing; this keeps the
-- owner (and so every definer function) out too. Deletes that arrive through
-- the cascade from a deleted account (a deleted user or tenant) run nested
-- inside private.delete_account_books's trigger and are allowed.
create function private.ledger_is_append_only() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if tg_op = 'DELETE' and pg_trigger_depth() > 1 then
    return old;
  end if;
  raise exception using errcode = '42501', message = 'credit_ledger is append-only';
end
$$;
revoke all on function private.ledger_is_append_only() from public;

create trigger credit_ledger_append_only
  before update or delete on public.credit_ledger
  for each row execute function private.ledger_is_append_only();
create trigger credit_ledger_no_truncate
  before truncate on public.credit_ledger
  for each statement execute function private.ledger_is_append_only();

-- The transaction log and the ledger reference their account without a
-- foreign key: a foreign key checks every inserted row with a query of its
-- own (FOR KEY SHARE on the account), 15,000 per monthly reset batch, 10-15%
-- of the reset's time (docs/benchmarks.md). Only definer functions write these
-- tables, always while holding the account row's lock, so the account exists;
-- and this trigger is the ON DELETE CASCADE (a deleted user or tenant still
-- takes its account's books with it; the ledger guard allows deletes that
-- arrive nested in a trigger).
create function private.delete_account_books() returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  delete from public.credit_ledger l where l.account_id = old.id;
  delete from public.credit_transactions t where t.account_id = old.id;
  return old;
end
$$;
revoke all on function private.delete_account_books() from public;

create trigger credit_accounts_delete_books
  after delete on public.credit_accounts
  for each row execute function private.delete_account_books();

-- ---------------------------------------------------------------------------
-- Holds: credits reserved for work in progress.
-- ---------------------------------------------------------------------------

create table public.credit_holds (
  id uuid primary key default gen_random_uuid(),
  account_id uuid not null references public.credit_accounts (id) on delete cascade,
  transaction_id uuid not null,
  amount bigint not null check (amount > 0),
  status text not null default 'active' check (status in ('active', 'captured', 'released', 'expired')),
  expires_at timestamptz not null,
  operation text,
  metadata jsonb not null default '{}'::jsonb,
  result jsonb,
  created_at timestamptz not null default now(),
  settled_at timestamptz
);
create index credit_holds_active_account_idx on public.credit_holds (account_id, expires_at)
  where status = 'active';

alter table public.credit_holds enable row level security;
revoke all on public.credit_holds from anon, authenticated, service_role;
grant select on public.credit_holds to authenticated, service_role;

-- ---------------------------------------------------------------------------
-- License keys: only the SHA-256 of the key is stored; the key is shown once.
-- ---------------------------------------------------------------------------

create table public.credit_license_keys (
  id uuid primary key default gen_random_uuid(),
  account_id uuid not null references public.credit_accounts (id) on delete cascade,
  name text not null,
  prefix text not null,
  key_hash bytea not null unique,
  expires_at timestamptz,
  revoked_at timestamptz,
  created_by uuid,
  created_at timestamptz not null default now()
);
create index credit_license_keys_account_idx on public.credit_license_keys (account_id);

alter table public.credit_license_keys enable row level security;
revoke all on public.credit_license_keys from anon, authenticated, service_role;
grant select on public.credit_license_keys to authenticated, service_role;
-- The hash stays server-side even for readers of the row.
revoke select on public.credit_license_keys from authenticated;
grant select (id, account_id, name, prefix, expires_at, revoked_at, created_by, created_at)
  on public.credit_license_keys to authenticated;

-- ---------------------------------------------------------------------------
-- Who is calling. Definer code runs as the owner, so it asks the REST layer's
-- role setting (unchangeable inside a definer function) and the JWT claims.
-- ---------------------------------------------------------------------------

-- True for service_role and for a direct owner/superuser session (no SET ROLE,
-- which only roles that already hold EXECUTE on the function can be).
create function private.is_service() returns boolean
language sql stable
set search_path = ''
as $$
  select coalesce(nullif(current_setting('role', true), ''), 'none') in ('service_role', 'none')
$$;

create function private.is_super_admin() returns boolean
language sql stable
set search_path = ''
as $$
  select coalesce(auth.jwt() -> 'app_metadata' ->> 'role', '') = 'super_admin'
$$;

-- Tenants the caller belongs to (definer: reads members without recursing into RLS).
create function private.member_tenant_ids() returns setof uuid
language sql stable security definer
set search_path = ''
as $$
  select m.tenant_id from public.tenant_members m where m.user_id = auth.uid()
$$;

-- Accounts the caller may read (not used for super admins, who read everything).
create function private.readable_account_ids() returns setof uuid
language sql stable security definer
set search_path = ''
as $$
  select a.id from public.credit_accounts a where a.user_id = auth.uid()
  union all
  select a.id from public.credit_accounts a
    join public.tenant_members m on m.tenant_id = a.tenant_id
   where m.user_id = auth.uid()
$$;

revoke all on function private.is_service(), private.is_super_admin(),
  private.member_tenant_ids(), private.readable_account_ids() from public;
grant execute on function private.is_service(), private.is_super_admin(),
  private.member_tenant_ids(), private.readable_account_ids() to authenticated, service_role;

-- ---------------------------------------------------------------------------
-- Read policies (one permissive policy per table, role and action).
-- ---------------------------------------------------------------------------

create policy tenants_read on public.tenants for select to authenticated
  using (id in (select private.member_tenant_ids()) or (select private.is_super_admin()));

create policy tenant_members_read on public.tenant_members for select to authenticated
  using (tenant_id in (select private.member_tenant_ids()) or (select private.is_super_admin()));

create policy credit_accounts_read on public.credit_accounts for select to authenticated
  using (user_id = (select auth.uid())
         or tenant_id in (select private.member_tenant_ids())
         or (select private.is_super_admin()));

create policy credit_transactions_read on public.credit_transactions for select to authenticated
  using (account_id in (select private.readable_account_ids()) or (select private.is_super_admin()));

create policy credit_ledger_read on public.credit_ledger for select to authenticated
  using (account_id in (select private.readable_account_ids()) or (select private.is_super_admin()));

create policy credit_holds_read on public.credit_holds for select to authenticated
  using (account_id in (select private.readable_account_ids()) or (select private.is_super_admin()));

create policy credit_license_keys_read on public.credit_license_keys for select to authenticated
  using (account_id in (select private.readable_account_ids()) or (select private.is_super_admin()));

-- ---------------------------------------------------------------------------
-- Errors and argument checks shared by the functions.
-- ---------------------------------------------------------------------------

create function private.fail(p_code text, p_message text, p_detail jsonb default null) returns void
language plpgsql
set search_path = ''
as $$
begin
  if p_detail is null then
    raise exception using errcode = p_code, message = p_message;
  end if;
  raise exception using errcode = p_code, message = p_message, detail = p_detail::text;
end
$$;

create function private.invalid(p_argument text, p_reason text) returns void
language sql
set search_path = ''
as $$
  select private.fail('22023', 'invalid_argument',
                      jsonb_build_object('argument', p_argument, 'reason', p_reason))
$$;

-- Keys starting with "stripe:" belong to the Stripe webhook (it keys grants by
-- the Stripe object); a user taking one first could make a payment's grant fail.
create function private.check_key(p_key text) returns void
language plpgsql stable
set search_path = ''
as $$
begin
  if p_key is null or length(p_key) not between 1 and 255 then
    perform private.invalid('p_idempotency_key', 'must be 1 to 255 characters');
  end if;
  if left(p_key, 7) = 'stripe:' and not private.is_service() then
    perform private.invalid('p_idempotency_key', 'the stripe: prefix is reserved');
  end if;
end
$$;

create function private.check_amount(p_argument text, p_amount bigint, p_min bigint default 1)
returns void
language plpgsql immutable
set search_path = ''
as $$
begin
  if p_amount is null or p_amount < p_min or p_amount > 1000000000 then
    perform private.invalid(p_argument, format('must be a whole number from %s to 1000000000', p_min));
  end if;
end
$$;

-- Metadata is caller-supplied JSON stored on ledger and usage rows: an object, bounded.
create function private.check_metadata(p_metadata jsonb) returns void
language plpgsql immutable
set search_path = ''
as $$
begin
  if p_metadata is not null
     and (jsonb_typeof(p_metadata) <> 'object' or pg_column_size(p_metadata) > 16384) then
    perform private.invalid('p_metadata', 'must be a JSON object of at most 16 kB');
  end if;
end
$$;

revoke all on function private.fail(text, text, jsonb), private.invalid(text, text),
  private.check_key(text), private.check_amount(text, bigint, bigint), private.check_metadata(jsonb) from public;

-- ---------------------------------------------------------------------------
-- Balances.
-- ---------------------------------------------------------------------------

-- Credits held by active, unexpired holds. Cheap when no hold has expired yet.
create function private.effective_held(p_account public.credit_accounts) returns bigint
language sql stable
set search_path = ''
as $$
  select case
    when p_account.next_hold_expiry is null or p_account.next_hold_expiry > now() then p_account.held
    else (select coalesce(sum(h.amount), 0)::bigint from public.credit_holds h
           where h.account_id = p_account.id and h.status = 'active' and h.expires_at > now())
  end
$$;

create function private.balance_json(p_account public.credit_accounts, p_held bigint default null)
returns jsonb
language sql stable
set search_path = ''
as $$
  select jsonb_build_object(
    'account_id', p_account.id,
    'subscription', p_account.subscription_balance,
    'purchased', p_account.purchased_balance,
    'held', h.held,
    'available', greatest(p_account.subscription_balance + p_account.purchased_balance - h.held, 0),
    'total', p_account.subscription_balance + p_account.purchased_balance,
    'period_start', p_account.period_start,
    'period_end', p_account.period_end)
  from (select coalesce(p_held, private.effective_held(p_account)) as held) h
$$;

revoke all on function private.effective_held(public.credit_accounts),
  private.balance_json(public.credit_accounts, bigint) from public;

-- ---------------------------------------------------------------------------
-- Opening accounts: every user and tenant gets one on `free`, with its first
-- month's allowance granted (and written to the ledger) at creation.
-- ---------------------------------------------------------------------------

create function private.open_account(p_user_id uuid, p_tenant_id uuid) returns uuid
language plpgsql security definer
set search_path = ''
as $$
declare
  v_start timestamptz := date_trunc('month', now(), 'UTC');
  v_end timestamptz := date_trunc('month', now(), 'UTC') + interval '1 month';
  v_grant bigint := coalesce((select p.monthly_credits from public.credit_plans p where p.id = 'free'), 0);
  v_account public.credit_accounts;
  v_tx uuid := private.uuid_v7();
begin
  insert into public.credit_accounts (user_id, tenant_id, plan_id, subscription_balance, period_start, period_end)
  values (p_user_id, p_tenant_id, 'free', v_grant, v_start, v_end)
  returning * into v_account;

  insert into public.credit_transactions (id, account_id, kind, idempotency_key, request_hash, result,
                                          amount, pool, description)
  -- The key ends in the transaction id so that no key a caller may choose is taken.
  values (v_tx, v_account.id, 'grant', 'signup:' || v_tx, md5('signup')::uuid,
          jsonb_build_object('expired', 0, 'granted', v_grant, 'replayed', false,
                             'balance', private.balance_json(v_account, 0)),
          v_grant, 'subscription', 'first month''s allowance');

  if v_grant > 0 then
    insert into public.credit_ledger (account_id, transaction_id, pool, amount, balance_after, type,
                                      idempotency_key, period_start, period_end, metadata)
    values (v_account.id, v_tx, 'subscription', v_grant, v_grant, 'grant', 'signup:' || v_tx, v_start, v_end,
            '{"reason": "signup"}'::jsonb);
  end if;
  return v_account.id;
end
$$;
revoke all on function private.open_account(uuid, uuid) from public;

create function private.on_auth_user_created() returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  perform private.open_account(new.id, null);
  return new;
end
$$;
revoke all on function private.on_auth_user_created() from public;

create trigger on_auth_user_created_open_credit_account
  after insert on auth.users
  for each row execute function private.on_auth_user_created();

create function private.on_tenant_created() returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  perform private.open_account(null, new.id);
  return new;
end
$$;
revoke all on function private.on_tenant_created() from public;

create trigger on_tenant_created_open_credit_account
  after insert on public.tenants
  for each row execute function private.on_tenant_created();

-- ---------------------------------------------------------------------------
-- Views for the frontend (security invoker: the caller's RLS applies).
-- ---------------------------------------------------------------------------

create view public.credit_balances with (security_invoker = true) as
select a.id as account_id,
       a.user_id,
       a.tenant_id,
       a.plan_id,
       a.subscription_balance as subscription,
       a.purchased_balance as purchased,
       h.held,
       greatest(a.subscription_balance + a.purchased_balance - h.held, 0) as available,
       a.subscription_balance + a.purchased_balance as total,
       a.period_start,
       a.period_end
  from public.credit_accounts a
  cross join lateral (
    select case
      when a.next_hold_expiry is null or a.next_hold_expiry > now() then a.held
      else (select coalesce(sum(x.amount), 0)::bigint from public.credit_holds x
             where x.account_id = a.id and x.status = 'active' and x.expires_at > now())
    end as held) h;

-- Per account and subscription period: what was granted, used and expired.
create view public.credit_pool_usage with (security_invoker = true) as
select l.account_id,
       a.tenant_id,
       l.period_start,
       max(l.period_end) as period_end,
       coalesce(sum(l.amount) filter (where l.type = 'grant'), 0)::bigint as total_credits,
       coalesce(-sum(l.amount) filter (where l.type = 'spend'), 0)::bigint as used_credits,
       coalesce(-sum(l.amount) filter (where l.type = 'expire'), 0)::bigint as expired_credits
  from public.credit_ledger l
  join public.credit_accounts a on a.id = l.account_id
 where l.pool = 'subscription' and l.period_start is not null
 group by l.account_id, a.tenant_id, l.period_start;

-- The usage log: one row per spend (deduct or captured hold).
create view public.credit_usage with (security_invoker = true) as
select t.id as transaction_id,
       t.account_id,
       a.tenant_id,
       a.user_id,
       t.operation,
       t.model,
       t.input_tokens,
       t.output_tokens,
       t.amount as credits,
       t.refunded,
       t.metadata,
       t.actor_id,
       t.created_at
  from public.credit_transactions t
  join public.credit_accounts a on a.id = t.account_id
 where t.kind in ('spend', 'capture');

revoke all on public.credit_balances, public.credit_pool_usage, public.credit_usage
  from anon, authenticated, service_role;
grant select on public.credit_balances, public.credit_pool_usage, public.credit_usage to authenticated, service_role;
