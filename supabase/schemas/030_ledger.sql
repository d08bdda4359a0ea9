-- Ledger: every change of every balance, immutable, one row per call.
--
-- Holds:
--   * credit_transactions: one row per balance-changing call (and per hold
--     reservation): the signed change of each pool, each pool's balance after
--     it, the idempotency key and a hash of the arguments, the Stripe
--     reference, the usage fields of a spend (operation, model, tokens,
--     metadata), who and when. A replay rebuilds the first answer from it;
--     refunds and clawbacks are new rows that point at what they compensate.
--   * credit_ledger (view): the same rows, one per pool changed (who, pool,
--     signed amount, type, balance after, key, Stripe reference, metadata,
--     time), as the contract describes the ledger.
--   * private.post(): the one way a slow-path call changes a wallet and writes
--     its row; private.balance_json(): the balance object.
--   * debt: what overdraft captures left owed is a pool of its own (never
--     negative); credits that arrive pay it first (private.settle_debt).
--   * the rule reconcile_credit_balances() (refunds and adjustments chapter)
--     checks: for every account and pool, balance = sum of the ledger; held =
--     what active holds reserve.
--
-- Rules:
--   * Nobody updates or deletes a transaction row, not even the owner; a
--     deleted user or tenant still takes its account's rows by cascade.
--   * Idempotency keys are unique per account and per origin: 'api' for every
--     key a caller passes to a contract function, 'stripe' for the keys the
--     webhook derives from Stripe objects, 'system' for rows no call keyed
--     (renewals, expiries). No key a caller chooses, through any function or
--     route, can occupy or collide with a Stripe record.

create type private.entry_kind as enum (
  'spend', 'reserve', 'purchase', 'grant', 'promotion', 'rollover', 'expire', 'refund', 'clawback',
  'reinstate', 'adjustment', 'plan_change', 'overdraft', 'debt_payment', 'extend');
create type private.entry_origin as enum ('api', 'stripe', 'system');

create table public.credit_transactions (
  seq bigint generated always as identity,
  id uuid not null default private.uuid_v7(),
  account_id uuid not null,
  kind private.entry_kind not null,
  origin private.entry_origin not null default 'api',
  idempotency_key text,
  request_hash uuid,
  -- Signed change of each pool.
  promotional bigint not null default 0,
  subscription bigint not null default 0,
  purchased bigint not null default 0,
  -- The wallet after this row (what a replay answers with).
  promotional_after bigint not null,
  subscription_after bigint not null,
  purchased_after bigint not null,
  held_after bigint not null,
  period_start timestamptz,
  period_end timestamptz,
  next_expiry_amount bigint,
  next_expiry_at timestamptz,
  -- What this row is about: the hold (reserve, capture, hold end), the spend
  -- (refund), the grant (expiry of a promotional grant, the renewal's expiry).
  ref_id uuid,
  stripe_ref text,
  operation text,
  model text,
  input_tokens integer,
  output_tokens integer,
  description text,
  metadata jsonb not null default '{}'::jsonb,
  -- Figures a replay needs that no pool change carries (a clawback's shortfall and pending).
  outcome jsonb,
  actor_id uuid,
  created_at timestamptz not null default now(),
  -- Debt: its signed change (an overdraft capture +, a payment or write-off -) and what is owed after.
  debt bigint not null default 0,
  debt_after bigint not null default 0,
  -- The spender when a license key spent, and the price an operation was charged at.
  license_key_id uuid,
  price jsonb,
  -- One index serves the per-account listing (newest first) and paging.
  primary key (account_id, seq)
);
create unique index credit_transactions_id_idx on public.credit_transactions (id);
-- On PostgreSQL 18 the id comes from the built-in generator, with no function call per row.
do $$
begin
  if current_setting('server_version_num')::integer >= 180000 then
    alter table public.credit_transactions alter column id set default pg_catalog.uuidv7();
  end if;
end
$$;
create unique index credit_transactions_key_idx
  on public.credit_transactions (account_id, idempotency_key, origin);
-- Spends carry neither: these partial indexes cost them only the predicate.
create index credit_transactions_ref_idx on public.credit_transactions (ref_id) where ref_id is not null;
create index credit_transactions_stripe_ref_idx on public.credit_transactions (stripe_ref)
  where stripe_ref is not null;
comment on table public.credit_transactions is
  'Immutable: one row per balance-changing call with every pool''s change. Nobody can update or delete a row.';

alter table public.credit_transactions enable row level security;
revoke all on public.credit_transactions from anon, authenticated, service_role;
grant select on public.credit_transactions to authenticated, service_role;
-- Supabase's default grants open new sequences to the API roles; only definer code inserts.
revoke all on sequence public.credit_transactions_seq_seq from anon, authenticated, service_role;

-- A plain member of a tenant reads only the rows of their own spends.
create policy credit_transactions_read on public.credit_transactions for select to authenticated
  using (account_id in (select private.managed_account_ids())
         or (actor_id = (select auth.uid()) and account_id in (select private.readable_account_ids()))
         or (select private.is_super_admin()));

-- Privileges keep everyone but the owner from writing; this keeps the owner
-- (and so every definer function) out too. Deletes arriving through the
-- account's cascade run nested in private.delete_account_books and pass.
create function private.transactions_are_append_only() returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  if tg_op = 'DELETE' and pg_trigger_depth() > 1 then
    return old;
  end if;
  raise exception using errcode = '42501', message = 'credit_transactions is append-only';
end
$$;

create trigger credit_transactions_append_only
  before update or delete on public.credit_transactions
  for each row execute function private.transactions_are_append_only();
create trigger credit_transactions_no_truncate
  before truncate on public.credit_transactions
  for each statement execute function private.transactions_are_append_only();

-- The transaction rows (and the grants, holds, wallet and spend counters)
-- reference their account without a foreign key (a foreign key checks each
-- insert, and each update of a row the transaction wrote, with a query of its
-- own; only definer code writes them, under the wallet's lock, so the account
-- exists). This trigger is their ON DELETE CASCADE.
create function private.delete_account_books() returns trigger
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
begin
  delete from public.credit_transactions t where t.account_id = old.id;
  delete from private.grants g where g.account_id = old.id;
  delete from public.credit_holds h where h.account_id = old.id;
  delete from public.credit_wallets w where w.account_id = old.id;
  delete from private.spend_usage u where u.account_id = old.id;
  return old;
end
$$;

create trigger credit_accounts_delete_books
  after delete on public.credit_accounts
  for each row execute function private.delete_account_books();

revoke all on function private.transactions_are_append_only(), private.delete_account_books() from public;

-- ---------------------------------------------------------------------------
-- The balance object.
-- ---------------------------------------------------------------------------

-- The soonest amount that will expire and when: free promotional credits of
-- the soonest grant, or the free subscription credits at period end (both
-- summed when they expire at the same instant). Held credits are not counted:
-- they expire, if at all, when their hold ends.
create function private.next_expiry(p_wallet public.credit_wallets) returns jsonb
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
declare
  v_promo_at timestamptz := case when p_wallet.promo_front_left > 0 then p_wallet.promo_front_at end;
  v_sub_at timestamptz := case when p_wallet.subscription > p_wallet.held_subscription
                               then p_wallet.period_end end;
  v_at timestamptz := least(v_promo_at, v_sub_at);
begin
  if v_at is null then
    return null;
  end if;
  return jsonb_build_object(
    'amount', case when v_promo_at = v_at then p_wallet.promo_front_left else 0 end
              + case when v_sub_at = v_at then p_wallet.subscription - p_wallet.held_subscription else 0 end,
    'at', v_at);
end
$$;

create function private.available(p_wallet public.credit_wallets) returns bigint
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
begin
  return greatest(0, p_wallet.promotional - p_wallet.held_promotional
                     + p_wallet.subscription - p_wallet.held_subscription
                     + p_wallet.purchased - p_wallet.held_purchased - p_wallet.debt);
end
$$;

create function private.balance_json(p_wallet public.credit_wallets) returns jsonb
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
declare
  v_held bigint := p_wallet.held_promotional + p_wallet.held_subscription + p_wallet.held_purchased;
  v_total bigint := p_wallet.promotional + p_wallet.subscription + p_wallet.purchased;
begin
  return jsonb_build_object(
    'account_id', p_wallet.account_id, 'promotional', p_wallet.promotional,
    'subscription', p_wallet.subscription, 'purchased', p_wallet.purchased, 'held', v_held,
    'debt', p_wallet.debt, 'available', greatest(0, v_total - v_held - p_wallet.debt), 'total', v_total,
    'period_start', p_wallet.period_start,
    'period_end', p_wallet.period_end, 'next_expiry', private.next_expiry(p_wallet));
end
$$;


revoke all on function private.next_expiry(public.credit_wallets), private.balance_json(public.credit_wallets),
  private.available(public.credit_wallets) from public;

-- ---------------------------------------------------------------------------
-- Writing: change a wallet and record the row, in that order, under the
-- wallet's lock (which the caller holds). Every slow path goes through here;
-- the spend's fast path writes the same two rows in its own two statements.
-- ---------------------------------------------------------------------------

create function private.post(
  p_account_id uuid, p_kind private.entry_kind,
  p_promotional bigint default 0, p_subscription bigint default 0, p_purchased bigint default 0,
  p_held_promotional bigint default 0, p_held_subscription bigint default 0, p_held_purchased bigint default 0,
  p_origin private.entry_origin default 'api', p_key text default null, p_hash uuid default null,
  p_ref_id uuid default null, p_stripe_ref text default null, p_description text default null,
  p_metadata jsonb default '{}'::jsonb, p_actor uuid default null,
  p_period_start timestamptz default null, p_period_end timestamptz default null,
  p_operation text default null, p_model text default null,
  p_input_tokens integer default null, p_output_tokens integer default null,
  p_id uuid default null, p_outcome jsonb default null, p_source text default null,
  p_debt bigint default 0, p_license_key_id uuid default null, p_price jsonb default null)
returns public.credit_transactions
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_wallet public.credit_wallets;
  v_entry public.credit_transactions;
  v_expiry jsonb;
  v_id uuid := coalesce(p_id, private.uuid_v7());
begin
  update public.credit_wallets w
     set promotional = w.promotional + p_promotional,
         subscription = w.subscription + p_subscription,
         purchased = w.purchased + p_purchased,
         held_promotional = w.held_promotional + p_held_promotional,
         held_subscription = w.held_subscription + p_held_subscription,
         held_purchased = w.held_purchased + p_held_purchased,
         debt = w.debt + p_debt
   where w.account_id = p_account_id
  returning w.* into v_wallet;
  if p_promotional <> 0 or p_held_promotional <> 0 then
    -- Free promotional credits changed: attribute them to grants again.
    v_wallet := private.materialize_grants(v_wallet);
  end if;
  if p_kind in ('purchase', 'grant', 'adjustment', 'plan_change')
     and (p_subscription > 0 or p_purchased > 0 or (p_kind = 'grant' and p_stripe_ref is not null))
     and not (p_kind = 'grant' and p_origin = 'system' and p_stripe_ref is null) then
    -- Credits that arrive are a grant (promotional ones come through add_promotion,
    -- renewals through renew_to, refunds through refund_credits, a calendar
    -- allowance is its ledger row); a payment that granted nothing, one of 0.
    insert into private.grants (id, account_id, pool, source, stripe_ref, transaction_id, granted, expires_at,
                                epoch, remaining)
    select private.uuid_v7(), p_account_id, g.pool,
           coalesce(p_source, private.grant_source(p_kind, p_origin, p_stripe_ref)), p_stripe_ref, v_id, g.amount,
           case when g.pool = 'subscription' then v_wallet.period_end end,
           case when g.pool = 'subscription' then v_wallet.sub_epoch end, g.amount
      from (values ('subscription', p_subscription), ('purchased', p_purchased)) g(pool, amount)
     where g.amount > 0 or (g.pool = 'subscription' and p_kind = 'grant' and p_purchased = 0);
  end if;
  v_expiry := private.next_expiry(v_wallet);
  insert into public.credit_transactions (
    id, account_id, kind, origin, idempotency_key, request_hash,
    promotional, subscription, purchased,
    promotional_after, subscription_after, purchased_after, held_after,
    period_start, period_end, next_expiry_amount, next_expiry_at,
    ref_id, stripe_ref, operation, model, input_tokens, output_tokens, description, metadata, outcome, actor_id,
    debt, debt_after, license_key_id, price)
  values (
    v_id, p_account_id, p_kind, p_origin, p_key, p_hash,
    p_promotional, p_subscription, p_purchased,
    v_wallet.promotional, v_wallet.subscription, v_wallet.purchased,
    v_wallet.held_promotional + v_wallet.held_subscription + v_wallet.held_purchased,
    coalesce(p_period_start, v_wallet.period_start), coalesce(p_period_end, v_wallet.period_end),
    (v_expiry ->> 'amount')::bigint, (v_expiry ->> 'at')::timestamptz,
    p_ref_id, p_stripe_ref, p_operation, p_model, p_input_tokens, p_output_tokens, p_description,
    coalesce(p_metadata, '{}'::jsonb), p_outcome, p_actor, p_debt, v_wallet.debt, p_license_key_id, p_price)
  returning * into v_entry;
  return v_entry;
end
$$;

-- The earlier row with this key (null when none); idempotency_conflict when
-- its arguments differed. The caller holds the wallet's lock.
create function private.find_key(p_account_id uuid, p_key text, p_hash uuid,
                                 p_origin private.entry_origin default 'api')
returns public.credit_transactions
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_entry public.credit_transactions;
begin
  select * into v_entry from public.credit_transactions t
   where t.account_id = p_account_id and t.idempotency_key = p_key and t.origin = p_origin;
  if found and v_entry.request_hash is distinct from p_hash then
    perform private.fail('PT409', 'idempotency_conflict', jsonb_build_object('idempotency_key', p_key));
  end if;
  return v_entry;
end
$$;

-- The balance object and a spend's answer as typed rows: to_jsonb of a row
-- is cheaper than jsonb_build_object with its variadic arguments.
create type private.balance as (
  account_id uuid, promotional bigint, subscription bigint, purchased bigint, held bigint, available bigint,
  total bigint, period_start timestamptz, period_end timestamptz, next_expiry jsonb, debt bigint);
create type private.spend_answer as (
  transaction_id uuid, account_id uuid, charged bigint, from_promotional bigint, from_subscription bigint,
  from_purchased bigint, replayed boolean, balance private.balance);

-- A call's answer, rebuilt from its transaction row: the same code answers
-- the first call and every replay, so they cannot differ.
create function private.result(p_entry public.credit_transactions, p_replayed boolean) returns jsonb
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_result jsonb;
  v_paid public.credit_transactions;
  -- The balance object as it was right after the row.
  v_balance private.balance := row(
    p_entry.account_id, p_entry.promotional_after, p_entry.subscription_after, p_entry.purchased_after,
    p_entry.held_after,
    greatest(0, p_entry.promotional_after + p_entry.subscription_after + p_entry.purchased_after
                - p_entry.held_after - p_entry.debt_after),
    p_entry.promotional_after + p_entry.subscription_after + p_entry.purchased_after,
    p_entry.period_start, p_entry.period_end,
    case when p_entry.next_expiry_at is not null
         then jsonb_build_object('amount', p_entry.next_expiry_amount, 'at', p_entry.next_expiry_at) end,
    p_entry.debt_after
  )::private.balance;
begin
  if p_entry.kind in ('purchase', 'grant', 'promotion', 'refund', 'reinstate', 'adjustment', 'plan_change') then
    -- Credits that arrived paid debt: the answer shows the balance after the payment.
    select * into v_paid from public.credit_transactions t
     where t.ref_id = p_entry.id and t.account_id = p_entry.account_id and t.kind = 'debt_payment';
    if found then
      v_balance := row(
        v_paid.account_id, v_paid.promotional_after, v_paid.subscription_after, v_paid.purchased_after,
        v_paid.held_after,
        greatest(0, v_paid.promotional_after + v_paid.subscription_after + v_paid.purchased_after
                    - v_paid.held_after - v_paid.debt_after),
        v_paid.promotional_after + v_paid.subscription_after + v_paid.purchased_after,
        v_paid.period_start, v_paid.period_end,
        case when v_paid.next_expiry_at is not null
             then jsonb_build_object('amount', v_paid.next_expiry_amount, 'at', v_paid.next_expiry_at) end,
        v_paid.debt_after)::private.balance;
    end if;
  end if;
  case p_entry.kind
    when 'spend' then
      return to_jsonb(row(p_entry.id, p_entry.account_id,
                          -(p_entry.promotional + p_entry.subscription + p_entry.purchased),
                          -p_entry.promotional, -p_entry.subscription, -p_entry.purchased, p_replayed,
                          v_balance)::private.spend_answer);
    when 'reserve' then
      select jsonb_build_object('hold_id', h.id, 'account_id', h.account_id,
                                'amount', coalesce((p_entry.outcome ->> 'amount')::bigint, h.amount),
                                'expires_at', coalesce((p_entry.outcome ->> 'expires_at')::timestamptz, h.expires_at),
                                'overage', h.overage)
        into v_result from public.credit_holds h where h.id = p_entry.ref_id;
    when 'extend' then
      v_result := jsonb_build_object('hold_id', p_entry.ref_id, 'amount', (p_entry.outcome ->> 'amount')::bigint,
                                     'expires_at', (p_entry.outcome ->> 'expires_at')::timestamptz);
    when 'purchase' then
      v_result := jsonb_build_object('transaction_id', p_entry.id, 'added', p_entry.purchased);
    when 'plan_change' then
      v_result := jsonb_build_object('transaction_id', p_entry.id, 'granted', p_entry.subscription,
                                     'expires_at', p_entry.period_end);
    when 'grant' then
      select jsonb_build_object(
               'transaction_id', p_entry.id, 'granted', p_entry.subscription,
               'expired', coalesce(-sum(t.subscription) filter (where t.kind = 'expire'), 0),
               'rolled_over', coalesce(sum(t.promotional) filter (where t.kind = 'rollover'), 0))
        into v_result
        from public.credit_transactions t where t.ref_id = p_entry.id and t.account_id = p_entry.account_id;
    when 'expire' then
      v_result := jsonb_build_object('transaction_id', p_entry.id, 'expired', -p_entry.subscription);
    when 'promotion' then
      select jsonb_build_object('transaction_id', p_entry.id, 'granted', p_entry.promotional,
                                'expires_at', p.expires_at)
        into v_result from private.grants p where p.id = p_entry.ref_id;
    when 'refund' then
      v_result := jsonb_build_object('transaction_id', p_entry.id, 'refunded', p_entry.purchased);
    when 'clawback' then
      v_result := jsonb_build_object(
        'transaction_id', p_entry.id,
        'clawed_back', -(p_entry.promotional + p_entry.subscription + p_entry.purchased),
        'shortfall', coalesce((p_entry.outcome ->> 'shortfall')::bigint, 0),
        'pending', coalesce((p_entry.outcome ->> 'pending')::bigint, 0));
    when 'reinstate' then
      v_result := jsonb_build_object('transaction_id', p_entry.id,
                                     'reinstated', p_entry.promotional + p_entry.subscription + p_entry.purchased);
    else
      v_result := jsonb_build_object('transaction_id', p_entry.id);
  end case;
  return v_result || jsonb_build_object('replayed', p_replayed, 'balance', to_jsonb(v_balance));
end
$$;

revoke all on function private.result(public.credit_transactions, boolean) from public;

revoke all on function
  private.post(uuid, private.entry_kind, bigint, bigint, bigint, bigint, bigint, bigint, private.entry_origin,
               text, uuid, uuid, text, text, jsonb, uuid, timestamptz, timestamptz, text, text, integer, integer,
               uuid, jsonb, text, bigint, uuid, jsonb),
  private.find_key(uuid, text, uuid, private.entry_origin)
  from public;

-- ---------------------------------------------------------------------------
-- Reading the ledger.
-- ---------------------------------------------------------------------------

-- One row per pool a transaction changed.
create view public.credit_ledger with (security_invoker = true) as
select t.seq as id,
       t.account_id,
       t.id as transaction_id,
       v.pool,
       v.amount,
       v.balance_after,
       t.kind::text as type,
       t.idempotency_key,
       t.origin::text as origin,
       t.stripe_ref,
       t.metadata,
       t.actor_id,
       case when v.pool = 'subscription' then t.period_start end as period_start,
       case when v.pool = 'subscription' then t.period_end end as period_end,
       t.created_at
  from public.credit_transactions t
 cross join lateral (values ('promotional', t.promotional, t.promotional_after),
                            ('subscription', t.subscription, t.subscription_after),
                            ('purchased', t.purchased, t.purchased_after),
                            ('debt', t.debt, t.debt_after)) v(pool, amount, balance_after)
 where v.amount <> 0;
comment on view public.credit_ledger is 'The ledger: one row per change of one pool (read through RLS).';

-- The usage log: one row per spend (deduct or captured hold), with what was
-- refunded of it since.
create view public.credit_usage with (security_invoker = true) as
select t.id as transaction_id,
       t.account_id,
       a.tenant_id,
       a.user_id,
       t.operation,
       t.model,
       t.input_tokens,
       t.output_tokens,
       -(t.promotional + t.subscription + t.purchased)
       -- A capture above its hold charged debt too.
       + coalesce((select sum(o.debt)::bigint from public.credit_transactions o
                    where t.ref_id is not null and o.ref_id = t.ref_id and o.account_id = t.account_id
                      and o.kind = 'overdraft'), 0) as credits,
       coalesce((select sum(r.purchased) from public.credit_transactions r
                  where r.ref_id = t.id and r.kind = 'refund'), 0)::bigint as refunded,
       t.metadata,
       t.actor_id,
       t.created_at,
       t.license_key_id,
       t.price
  from public.credit_transactions t
  join public.credit_accounts a on a.id = t.account_id
 where t.kind = 'spend';

-- Per account and subscription period: granted, used and expired allowance.
create view public.credit_pool_usage with (security_invoker = true) as
select t.account_id,
       a.tenant_id,
       t.period_start,
       max(t.period_end) as period_end,
       coalesce(sum(t.subscription) filter (where t.kind in ('grant', 'adjustment', 'plan_change')
                                             and t.subscription > 0), 0)::bigint as total_credits,
       coalesce(-sum(t.subscription) filter (where t.kind = 'spend'), 0)::bigint as used_credits,
       coalesce(-sum(t.subscription) filter (where t.kind in ('expire', 'rollover')), 0)::bigint
         as expired_credits
  from public.credit_transactions t
  join public.credit_accounts a on a.id = t.account_id
 where t.subscription <> 0 and t.period_start is not null
 group by t.account_id, a.tenant_id, t.period_start;

revoke all on public.credit_ledger, public.credit_usage, public.credit_pool_usage
  from anon, authenticated, service_role;
grant select on public.credit_ledger, public.credit_usage, public.credit_pool_usage to authenticated, service_role;
