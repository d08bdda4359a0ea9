-- Every credit in a grant. Until now only promotional credits had grant rows
-- (credit_promotions); subscription and purchased credits were counters, and
-- every flow (refunds, disputes, reinstatements, hold ends, rollovers)
-- re-derived whose credits they were. private.grants records every arrival
-- of credits in every pool with its source and Stripe reference, the
-- credit_grants view shows what is left of each, and clawbacks, won disputes
-- and hold ends act on grants. Existing balances become grants (below):
-- credit_promotions' rows keep their ids; every earlier arrival of
-- subscription or purchased credits becomes a grant with what is left of it.

-- Like the ledger's rows, a grant references its account without a foreign
-- key (only definer code inserts, under the wallet's lock; the monthly reset
-- inserts one per account renewed): the ledger chapter's
-- private.delete_account_books is the ON DELETE CASCADE.
create table private.grants (
  id uuid primary key,
  account_id uuid not null,
  pool text not null check (pool in ('promotional', 'subscription', 'purchased')),
  source text not null check (source in ('invoice', 'checkout', 'topup', 'reset', 'signup_bonus', 'promotion',
                                         'rollover', 'plan_change', 'refund', 'adjustment')),
  stripe_ref text,
  -- The ledger row that brought the credits (null: credits an account held
  -- before grants were recorded, whose arrival is no single row).
  transaction_id uuid,
  granted bigint not null check (granted >= 0),
  -- Promotional: its own date; subscription: its period's end; purchased: none.
  expires_at timestamptz,
  -- Subscription: the wallet's sub_epoch of its period (a later epoch ended it).
  epoch integer,
  -- Left as of the pool's last attribution (see the header).
  remaining bigint not null check (remaining >= 0),
  -- It carries the source and Stripe reference of the credits it came from
  -- (a rollover, a refund of a spend): that payment did not grant it.
  carried boolean not null default false,
  created_at timestamptz not null default now()
-- fillfactor 70 and no index on `remaining`: a hold's taking and returning
-- rewrite the row in place (HOT).
) with (fillfactor = 70);
create index grants_account_idx on private.grants (account_id, pool, expires_at, id);
create index grants_stripe_ref_idx on private.grants (stripe_ref) where stripe_ref is not null;
comment on table private.grants is
  'Every arrival of credits; what is left of each is public.credit_grants.remaining.';

alter table private.grants enable row level security;
revoke all on private.grants from public, anon, authenticated, service_role;
grant select on private.grants to authenticated, service_role;
create policy grants_read on private.grants for select to authenticated
  using (account_id in (select private.readable_account_ids()) or (select private.is_super_admin()));

-- The calendar allowance's grant is its ledger row (see the grants chapter).
alter table public.credit_wallets add column period_grant uuid;

-- A hold names the grants of every pool it reserves (its promotional parts, until now).
alter table public.credit_holds rename column promo_parts to parts;
do $$
begin
  -- PostgreSQL 18 names NOT NULL constraints after their column.
  if exists (select 1 from pg_constraint c where c.conname = 'credit_holds_promo_parts_not_null'
                and c.conrelid = 'public.credit_holds'::regclass) then
    alter table public.credit_holds rename constraint credit_holds_promo_parts_not_null to credit_holds_parts_not_null;
  end if;
end
$$;

-- Functions whose arguments changed, and those that go.
drop function private.post(uuid, private.entry_kind, bigint, bigint, bigint, bigint, bigint, bigint,
                           private.entry_origin, text, uuid, uuid, text, text, jsonb, uuid, timestamptz, timestamptz,
                           text, text, integer, integer, uuid, jsonb);
drop function private.add_promotion(public.credit_wallets, private.entry_kind, bigint, timestamptz,
                                    private.entry_origin, text, uuid, text, text, jsonb, uuid, bigint);
drop function private.materialize_promotions(public.credit_wallets);
drop function private.end_hold(public.credit_holds, bigint, text, jsonb, uuid);
drop function private.promo_attribution(uuid, bigint);

create function private.grant_source(p_kind private.entry_kind, p_origin private.entry_origin, p_stripe_ref text)
returns text
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
begin
  return case
    when p_kind in ('refund', 'adjustment', 'plan_change') then p_kind::text
    when p_stripe_ref like 'in\_%' then 'invoice'
    when p_kind = 'grant' and (p_stripe_ref is not null or p_origin = 'stripe') then 'invoice'
    when p_kind = 'grant' and p_origin = 'system' then 'reset'
    when p_kind = 'purchase' and (p_origin = 'stripe' or p_stripe_ref is not null) then 'checkout'
    else 'adjustment' end;
end
$$;

create function private.grant_attribution(p_wallet public.credit_wallets, p_pool text)
returns table (id uuid, expires_at timestamptz, created_at timestamptz, remaining bigint, attributed bigint)
language plpgsql stable rows 4
set search_path = pg_catalog, pg_temp
as $$
declare
  v_free bigint := case p_pool when 'promotional' then p_wallet.promotional - p_wallet.held_promotional
                               when 'subscription' then p_wallet.subscription - p_wallet.held_subscription
                               else p_wallet.purchased - p_wallet.held_purchased end;
begin
  return query
  select g.id, g.expires_at, g.created_at, g.remaining,
         greatest(0, least(g.remaining, g.cum - (g.total - v_free)))::bigint
    from (select p.id, p.expires_at, p.created_at, p.remaining,
                 sum(p.remaining) over (order by p.expires_at nulls last, p.created_at, p.id) as cum,
                 sum(p.remaining) over () as total
            from (select p.id, p.expires_at, p.created_at, p.remaining
                    from private.grants p
                   where p.account_id = p_wallet.account_id and p.pool = p_pool and p.remaining > 0
                     and (p_pool <> 'subscription' or p.epoch = p_wallet.sub_epoch)
                  union all
                  -- The calendar allowance, from its ledger row.
                  select t.id, t.period_end, t.created_at, t.subscription
                    from public.credit_transactions t
                   where p_pool = 'subscription' and t.id = p_wallet.period_grant
                     and t.subscription > 0) p) g;
end
$$;

create function private.materialize_grants(p_wallet public.credit_wallets, p_pool text default 'promotional')
returns public.credit_wallets
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_wallet public.credit_wallets := p_wallet;
  v_short boolean;
begin
  with a as (
    select * from private.grant_attribution(p_wallet, p_pool)
  ), written as (
    update private.grants p set remaining = a.attributed
      from a where p.id = a.id and p.remaining <> a.attributed
  )
  select coalesce(sum(a.remaining), 0) < case p_pool
           when 'promotional' then p_wallet.promotional - p_wallet.held_promotional
           when 'subscription' then p_wallet.subscription - p_wallet.held_subscription
           else p_wallet.purchased - p_wallet.held_purchased end
    into v_short from a;
  if v_short then
    raise exception using errcode = 'XX000', message = p_pool || ' credits without a grant';
  end if;
  if p_pool = 'promotional' then
    update public.credit_wallets w
       set promo_front_at = f.at, promo_front_left = coalesce(f.amount, 0)
      from (select null::int as one) x
      left join lateral (
        select p.expires_at as at, sum(p.remaining)::bigint as amount
          from private.grants p
         where p.account_id = p_wallet.account_id and p.pool = 'promotional' and p.remaining > 0
         group by p.expires_at order by p.expires_at limit 1) f on true
     where w.account_id = p_wallet.account_id
    returning w.* into v_wallet;
  end if;
  return v_wallet;
end
$$;

create function private.take_front(p_wallet public.credit_wallets, p_pool text, p_amount bigint)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_parts jsonb;
  v_covered bigint;
begin
  if p_amount <= 0 then
    return '[]'::jsonb;
  end if;
  -- One pass: attribute the pool's spends to its grants and take the front.
  with a as (
    select a.*, sum(a.attributed) over (order by a.expires_at nulls last, a.created_at, a.id) as cum
      from private.grant_attribution(p_wallet, p_pool) a
  ), t as (
    select a.id, a.expires_at, a.created_at, a.attributed,
           greatest(0, least(a.attributed, p_amount - (a.cum - a.attributed)))::bigint as amount
      from a
  ), written as (
    update private.grants p set remaining = t.attributed - t.amount
      from t where p.id = t.id and p.remaining <> t.attributed - t.amount
  )
  select coalesce(jsonb_agg(jsonb_build_object('p', p_pool, 'g', t.id, 'a', t.amount, 'e', t.expires_at)
                            order by t.expires_at nulls last, t.created_at, t.id) filter (where t.amount > 0),
                  '[]'::jsonb),
         coalesce(sum(t.attributed), 0)
    into v_parts, v_covered from t;
  if v_covered < (case p_pool when 'promotional' then p_wallet.promotional - p_wallet.held_promotional
                              when 'subscription' then p_wallet.subscription - p_wallet.held_subscription
                              else p_wallet.purchased - p_wallet.held_purchased end) then
    raise exception using errcode = 'XX000', message = p_pool || ' credits without a grant';
  end if;
  return v_parts;
end
$$;

create function private.add_promotion(
  p_wallet public.credit_wallets, p_kind private.entry_kind, p_amount bigint, p_expires_at timestamptz,
  p_origin private.entry_origin, p_key text, p_hash uuid, p_stripe_ref text, p_description text,
  p_metadata jsonb, p_actor uuid, p_source text)
returns public.credit_transactions
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_id uuid := private.uuid_v7();
begin
  -- Attribute earlier spends before a grant with an earlier expiry joins.
  perform private.materialize_grants(p_wallet);
  insert into private.grants (id, account_id, pool, source, stripe_ref, transaction_id, granted, expires_at,
                              remaining)
  values (v_id, p_wallet.account_id, 'promotional', p_source, p_stripe_ref, v_id, p_amount, p_expires_at,
          p_amount);
  return private.post(p_wallet.account_id, p_kind, p_promotional => p_amount, p_origin => p_origin,
                      p_key => p_key, p_hash => p_hash, p_ref_id => v_id, p_stripe_ref => p_stripe_ref,
                      p_description => p_description, p_metadata => p_metadata, p_actor => p_actor,
                      p_id => v_id);
end
$$;

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
  p_id uuid default null, p_outcome jsonb default null, p_source text default null)
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
         held_purchased = w.held_purchased + p_held_purchased
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
    ref_id, stripe_ref, operation, model, input_tokens, output_tokens, description, metadata, outcome, actor_id)
  values (
    v_id, p_account_id, p_kind, p_origin, p_key, p_hash,
    p_promotional, p_subscription, p_purchased,
    v_wallet.promotional, v_wallet.subscription, v_wallet.purchased,
    v_wallet.held_promotional + v_wallet.held_subscription + v_wallet.held_purchased,
    coalesce(p_period_start, v_wallet.period_start), coalesce(p_period_end, v_wallet.period_end),
    (v_expiry ->> 'amount')::bigint, (v_expiry ->> 'at')::timestamptz,
    p_ref_id, p_stripe_ref, p_operation, p_model, p_input_tokens, p_output_tokens, p_description,
    coalesce(p_metadata, '{}'::jsonb), p_outcome, p_actor)
  returning * into v_entry;
  return v_entry;
end
$$;

create function private.spend_sources(p_spend public.credit_transactions)
returns table (source text, stripe_ref text, amount bigint)
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_pool text;
  v_taken bigint;
  v_before bigint;
  v_parts jsonb;
begin
  -- A captured hold says which grants it charged: its parts, pool by pool,
  -- in order (a part of the calendar allowance, which has no row, is reset).
  select h.parts into v_parts from public.credit_holds h
   where p_spend.ref_id is not null and h.id = p_spend.ref_id and h.account_id = p_spend.account_id;
  if v_parts is not null and v_parts <> '[]'::jsonb then
    return query
    with parts as (
      select coalesce(x.e ->> 'p', 'promotional') as pool, (x.e ->> 'g')::uuid as g, (x.e ->> 'a')::bigint as a,
             x.o
        from jsonb_array_elements(v_parts) with ordinality x(e, o)
    ), charged as (
      select q.pool, q.g, q.o,
             greatest(0, least(q.a, c.taken - (sum(q.a) over (partition by q.pool order by q.o) - q.a)))::bigint
               as amount
        from parts q
        join (values ('promotional', -p_spend.promotional), ('subscription', -p_spend.subscription),
                     ('purchased', -p_spend.purchased)) c(pool, taken) on c.pool = q.pool
    ), named as (
      select case when g.id is not null then g.source else 'reset' end as source, g.stripe_ref, c.amount,
             c.pool, c.o
        from charged c left join private.grants g on g.id = c.g
       where c.amount > 0
    )
    select n.source, n.stripe_ref, n.amount from named n
    union all
    -- What no part explains (a hold made before holds named their grants).
    select 'refund', null, (-(p_spend.promotional + p_spend.subscription + p_spend.purchased)
                            - coalesce((select sum(n.amount) from named n), 0))::bigint
     where -(p_spend.promotional + p_spend.subscription + p_spend.purchased)
           > coalesce((select sum(n.amount) from named n), 0);
    return;
  end if;
  foreach v_pool in array array['promotional', 'subscription', 'purchased'] loop
    v_taken := -case v_pool when 'promotional' then p_spend.promotional when 'subscription' then p_spend.subscription
                            else p_spend.purchased end;
    continue when v_taken <= 0;
    v_before := case v_pool when 'promotional' then p_spend.promotional_after
                            when 'subscription' then p_spend.subscription_after
                            else p_spend.purchased_after end + v_taken;
    return query
    with g as (
      -- Each grant as it stood then: less what clawbacks had taken of it, plus
      -- what won disputes had given back.
      select q.source, q.stripe_ref,
             q.granted + coalesce((select sum(e.value::bigint * case c.kind when 'clawback' then -1 else 1 end)
                                     from public.credit_transactions c
                                    cross join lateral jsonb_each_text(
                                      case when jsonb_typeof(c.outcome -> 'grants') = 'object'
                                           then c.outcome -> 'grants' else '{}'::jsonb end) e
                                    where q.stripe_ref is not null and c.stripe_ref = q.stripe_ref
                                      and c.account_id = p_spend.account_id and c.seq < p_spend.seq
                                      and c.kind in ('clawback', 'reinstate') and e.key = q.id::text), 0)
               as granted,
             q.expires_at, q.created_at, q.id
        from private.grants q
       where q.account_id = p_spend.account_id and q.pool = v_pool and q.created_at <= p_spend.created_at
         and case v_pool when 'promotional' then q.expires_at > p_spend.created_at
                         when 'subscription' then q.expires_at = p_spend.period_end
                         else true end
      union all
      -- A calendar allowance of the spend's period (its ledger row).
      select 'reset', null, t.subscription, t.period_end, t.created_at, t.id
        from public.credit_transactions t
       where v_pool = 'subscription' and t.account_id = p_spend.account_id and t.kind = 'grant'
         and t.origin = 'system' and t.stripe_ref is null and t.period_start = p_spend.period_start
         and t.seq < p_spend.seq and t.subscription > 0
    ), placed as (
      select g.source, g.stripe_ref,
             sum(g.granted) over (order by g.expires_at nulls last, g.created_at, g.id) as cum, g.granted,
             sum(g.granted) over () - v_before as start
        from g
    ), parts as (
      select p.source, p.stripe_ref,
             greatest(0, least(p.cum, p.start + v_taken) - greatest(p.cum - p.granted, p.start))::bigint as amount
        from placed p
    )
    select p.source, p.stripe_ref, p.amount from parts p where p.amount > 0
    union all
    select 'refund', null, v_taken - coalesce((select sum(p.amount) from parts p), 0)::bigint
     where v_taken > coalesce((select sum(p.amount) from parts p), 0);
  end loop;
end
$$;

create or replace function private.result(p_entry public.credit_transactions, p_replayed boolean) returns jsonb
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_result jsonb;
  -- The balance object as it was right after the row.
  v_balance private.balance := row(
    p_entry.account_id, p_entry.promotional_after, p_entry.subscription_after, p_entry.purchased_after,
    p_entry.held_after,
    p_entry.promotional_after + p_entry.subscription_after + p_entry.purchased_after - p_entry.held_after,
    p_entry.promotional_after + p_entry.subscription_after + p_entry.purchased_after,
    p_entry.period_start, p_entry.period_end,
    case when p_entry.next_expiry_at is not null
         then jsonb_build_object('amount', p_entry.next_expiry_amount, 'at', p_entry.next_expiry_at) end
  )::private.balance;
begin
  case p_entry.kind
    when 'spend' then
      return to_jsonb(row(p_entry.id, p_entry.account_id,
                          -(p_entry.promotional + p_entry.subscription + p_entry.purchased),
                          -p_entry.promotional, -p_entry.subscription, -p_entry.purchased, p_replayed,
                          v_balance)::private.spend_answer);
    when 'reserve' then
      select jsonb_build_object('hold_id', h.id, 'account_id', h.account_id, 'amount', h.amount,
                                'expires_at', h.expires_at)
        into v_result from public.credit_holds h where h.id = p_entry.ref_id;
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

create or replace function private.renew_to(p_accounts uuid[], p_amounts bigint[], p_caps bigint[], p_ends timestamptz[],
                                 p_start timestamptz, p_origin private.entry_origin, p_key text, p_hash uuid,
                                 p_stripe_ref text, p_metadata jsonb)
returns table (account_id uuid, expired bigint, rolled_over bigint, granted bigint, grant_id uuid)
language sql
set search_path = pg_catalog, pg_temp
as $$
  with calc as (
    -- The caller took the locks before this statement began, so its snapshot
    -- sees every committed change to these wallets.
    select w.*, b.amount as new_amount, b.period_end as new_end,
           least(b.cap, w.subscription - w.held_subscription) as rolled,
           w.subscription - w.held_subscription - least(b.cap, w.subscription - w.held_subscription) as lapsed,
           private.uuid_v7() as grant_id, private.uuid_v7() as roll_id, private.uuid_v7() as expire_id,
           -- A rollover keeps the Stripe reference of the grant its credits are
           -- left of: the period's last grant in the spending order that has
           -- any (spends took the front; the calendar allowance, no row and no
           -- reference, is the front).
           case when least(b.cap, w.subscription - w.held_subscription) > 0
                then (select g.stripe_ref from private.grants g
                       where g.account_id = w.account_id and g.pool = 'subscription' and g.epoch = w.sub_epoch
                         and g.remaining > 0
                       order by g.expires_at desc nulls first, g.created_at desc, g.id desc limit 1) end as roll_ref
      from unnest(p_accounts, p_amounts, p_caps, p_ends) as b(account_id, amount, cap, period_end)
      join public.credit_wallets w on w.account_id = b.account_id
     -- Older (ended before the current period began) changes nothing; a period
     -- that contains now starts even if a later one (a free month) began.
     where w.period_start is null or w.period_start <= p_start
        or (p_start <= now() and b.period_end > now() and b.period_end > w.period_start)
  ), renewed as (
    update public.credit_wallets w
       set subscription = c.held_subscription + c.new_amount,
           promotional = c.promotional + c.rolled,
           -- The rollover grant becomes the soonest expiry unless a grant with free
           -- credits expires earlier (front_left = 0: no free promotional credits).
           promo_front_at = case when c.rolled > 0 and (c.promo_front_left = 0 or c.promo_front_at >= c.new_end)
                                 then c.new_end else c.promo_front_at end,
           promo_front_left = case when c.rolled = 0 then c.promo_front_left
                                   when c.promo_front_left = 0 or c.promo_front_at > c.new_end then c.rolled
                                   when c.promo_front_at = c.new_end then c.promo_front_left + c.rolled
                                   else c.promo_front_left end,
           sub_epoch = c.sub_epoch + 1,
           period_start = p_start,
           period_end = c.new_end,
           period_grant = case when p_origin = 'system' and p_stripe_ref is null then c.grant_id end
      from calc c
     where w.account_id = c.account_id
    returning w.*
  ), grants as (
    -- The new allowance (even of 0 credits: its payment is known; a calendar
    -- allowance has no row, see the header) and the rollover.
    insert into private.grants (id, account_id, pool, source, stripe_ref, transaction_id, granted, expires_at,
                                epoch, remaining, carried)
    select g.id, c.account_id, g.pool, g.source, g.ref, g.id, g.amount, c.new_end, g.epoch, g.amount,
           g.pool = 'promotional'
      from calc c
     cross join lateral (values
       (c.grant_id, 'subscription', (select private.grant_source('grant', p_origin, p_stripe_ref)), p_stripe_ref,
        c.new_amount, c.sub_epoch + 1),
       (c.roll_id, 'promotional', 'rollover', c.roll_ref, c.rolled, null)) g(id, pool, source, ref, amount, epoch)
     where (g.pool = 'subscription' and (p_origin <> 'system' or p_stripe_ref is not null))
        or (g.pool = 'promotional' and c.rolled > 0)
  ), entries as (
    insert into public.credit_transactions (
      id, account_id, kind, origin, idempotency_key, request_hash, promotional, subscription, purchased,
      promotional_after, subscription_after, purchased_after, held_after, period_start, period_end,
      next_expiry_amount, next_expiry_at, ref_id, stripe_ref, metadata)
    select e.id, c.account_id, e.kind, e.origin, e.key, e.hash, e.d_promo, e.d_sub, 0,
           n.promotional, e.sub_after, n.purchased,
           n.held_promotional + n.held_subscription + n.held_purchased, e.pstart, e.pend,
           (private.next_expiry(n) ->> 'amount')::bigint, (private.next_expiry(n) ->> 'at')::timestamptz,
           e.ref_id,
           case when e.ord = 1 then c.roll_ref else p_stripe_ref end,
           coalesce(p_metadata, '{}'::jsonb)
      from calc c
      join renewed n on n.account_id = c.account_id
     cross join lateral (values
       (1, c.roll_id, 'rollover'::private.entry_kind, 'system'::private.entry_origin, null::text, null::uuid,
        c.rolled, -c.rolled, c.subscription - c.rolled, c.period_start, c.period_end, c.grant_id),
       (2, c.expire_id, 'expire', 'system', null, null,
        0, -c.lapsed, c.held_subscription, c.period_start, c.period_end, c.grant_id),
       (3, c.grant_id, 'grant', p_origin, p_key, p_hash,
        0, c.new_amount, n.subscription, p_start, c.new_end, null))
       as e(ord, id, kind, origin, key, hash, d_promo, d_sub, sub_after, pstart, pend, ref_id)
     where e.ord = 3 or (e.ord = 1 and c.rolled > 0) or (e.ord = 2 and c.lapsed > 0)
     order by c.account_id, e.ord
    returning 1
  )
  select c.account_id, c.lapsed, c.rolled, c.new_amount, c.grant_id
    from calc c
$$;

create or replace function private.grant_signup_bonus(p_account_id uuid, p_user_id uuid) returns void
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_plan public.credit_plans;
  v_identity text;
  v_wallet public.credit_wallets;
begin
  select * into v_plan from public.credit_plans p where p.id = 'free';
  if coalesce(v_plan.signup_bonus, 0) = 0 then
    return;
  end if;
  select coalesce(nullif(lower(btrim(u.email)), ''), 'phone:' || nullif(btrim(u.phone), '')) into v_identity
    from auth.users u where u.id = p_user_id;
  if v_identity is null then
    return;
  end if;
  insert into private.signup_bonus_claims (identity_hash)
  values (sha256(convert_to((select i.salt from private.installation i) || ':' || v_identity, 'UTF8')))
  on conflict do nothing;
  if not found then
    return;
  end if;
  v_wallet := private.lock_wallet(p_account_id);
  perform private.add_promotion(v_wallet, 'promotion', v_plan.signup_bonus,
                                now() + make_interval(days => v_plan.signup_bonus_days), 'system', null, null,
                                null, 'sign-up bonus', '{"reason": "signup_bonus"}'::jsonb, null,
                                'signup_bonus');
end
$$;

create or replace function private.add_subscription(p_account_id uuid, p_amount integer, p_period_start timestamptz,
                                         p_period_end timestamptz, p_key text, p_stripe_ref text,
                                         p_metadata jsonb, p_origin private.entry_origin)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_hash uuid;
  v_wallet public.credit_wallets;
  v_entry public.credit_transactions;
  v_cap bigint;
begin
  perform private.authorize(p_account_id, true);
  perform private.check_amount('p_amount', p_amount, 0);
  perform private.check_key(p_key);
  perform private.check_text('p_stripe_ref', p_stripe_ref, 'stripe_ref');
  perform private.check_metadata(p_metadata);
  if p_period_start is null then
    perform private.invalid('p_period_start', 'required');
  end if;
  if p_period_end is null or p_period_end <= p_period_start then
    perform private.invalid('p_period_end', 'must be after p_period_start');
  end if;
  v_hash := private.request_hash('subscription',
    jsonb_build_array(p_amount, p_period_start, p_period_end, p_stripe_ref, p_metadata));
  v_wallet := private.lock_wallet(p_account_id);
  v_entry := private.find_key(p_account_id, p_key, v_hash, p_origin);
  if v_entry.id is not null then
    return private.result(v_entry, true);
  end if;
  if v_wallet.period_start is not null and p_period_start < v_wallet.period_start
     and not (p_period_start <= now() and p_period_end > now() and p_period_end > v_wallet.period_start
              and not exists (select 1 from public.credit_transactions t
                               where t.account_id = p_account_id and t.kind = 'grant' and t.origin <> 'system'
                                 and t.period_start = v_wallet.period_start)) then
    -- A grant for an older period (a late or reordered event) changes nothing; one
    -- whose period contains now starts it even if a later free period (the
    -- reset's) began, never over a later paid one.
    v_entry := private.post(p_account_id, 'grant', p_origin => p_origin, p_key => p_key, p_hash => v_hash,
                            p_stripe_ref => p_stripe_ref, p_metadata => p_metadata);
    return private.result(v_entry, false);
  end if;
  select p.rollover_cap into v_cap
    from public.credit_accounts a join public.credit_plans p on p.id = a.plan_id where a.id = p_account_id;
  if v_cap > 0 then
    -- Attribute earlier promotional spends before the rollover grant joins the
    -- grants: they were spent from the grants that existed then.
    v_wallet := private.materialize_grants(v_wallet);
  end if;
  perform private.renew(array[p_account_id], array[p_amount::bigint], array[coalesce(v_cap, 0)],
                        p_period_start, p_period_end, p_origin, p_key, v_hash, p_stripe_ref, p_metadata);
  return private.result(private.find_key(p_account_id, p_key, v_hash, p_origin), false);
end
$$;

create or replace function private.grant_promotional(p_account_id uuid, p_amount integer, p_expires_at timestamptz,
                                          p_key text, p_reason text, p_metadata jsonb, p_stripe_ref text,
                                          p_origin private.entry_origin)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_hash uuid;
  v_wallet public.credit_wallets;
  v_entry public.credit_transactions;
begin
  perform private.authorize(p_account_id, true);
  perform private.check_amount('p_amount', p_amount);
  perform private.check_key(p_key);
  perform private.check_text('p_reason', p_reason, 'reason');
  perform private.check_metadata(p_metadata);
  if p_expires_at is null or p_expires_at <= now() then
    perform private.invalid('p_expires_at', 'must be in the future');
  end if;
  v_hash := private.request_hash('promotion', jsonb_build_array(p_amount, p_expires_at, p_reason, p_metadata,
                                                                 p_stripe_ref));
  v_wallet := private.lock_wallet(p_account_id);
  v_entry := private.find_key(p_account_id, p_key, v_hash, p_origin);
  if v_entry.id is not null then
    return private.result(v_entry, true);
  end if;
  v_entry := private.add_promotion(v_wallet, 'promotion', p_amount, p_expires_at, p_origin, p_key, v_hash,
                                   p_stripe_ref, p_reason, p_metadata, null, 'promotion');
  return private.result(v_entry, false);
end
$$;

create or replace function private.hold_fates(p_hold public.credit_holds, p_charge bigint, p_epoch integer,
                                   p_now timestamptz)
returns table (f_pool text, f_grant uuid, f_amount bigint, f_fate text, f_ref text, f_key text)
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_charge private.split;
  v_left bigint;
  v_part record;
  v_take bigint;
  v_claim jsonb;
  v_released bigint;
  v_pool text;
begin
  v_charge := private.spend_split(p_hold.promotional, p_hold.subscription, p_hold.purchased, p_charge);
  foreach v_pool in array array['promotional', 'subscription', 'purchased'] loop
    continue when case v_pool when 'promotional' then p_hold.promotional
                              when 'subscription' then p_hold.subscription else p_hold.purchased end = 0;
    v_left := case v_pool when 'promotional' then v_charge.promotional
                          when 'subscription' then v_charge.subscription else v_charge.purchased end;
    f_pool := v_pool;
    for v_part in
      select (e ->> 'g')::uuid as g, (e ->> 'a')::bigint as a, o
        from jsonb_array_elements(p_hold.parts) with ordinality x(e, o)
       where coalesce(e ->> 'p', 'promotional') = v_pool
      union all
      -- A hold made before grants named theirs: its credits of the pool, of no grant.
      select null, case v_pool when 'promotional' then p_hold.promotional
                               when 'subscription' then p_hold.subscription else p_hold.purchased end
                   - coalesce((select sum((e ->> 'a')::bigint) from jsonb_array_elements(p_hold.parts) e
                                where coalesce(e ->> 'p', 'promotional') = v_pool), 0),
             1000000
      order by 3
    loop
      continue when v_part.a <= 0;
      f_grant := v_part.g;
      f_ref := null;
      f_key := null;
      v_take := least(v_part.a, v_left);
      v_left := v_left - v_take;
      if v_take > 0 then
        f_amount := v_take; f_fate := 'spend';
        return next;
      end if;
      v_released := v_part.a - v_take;
      -- A clawback that claimed this part takes its share first.
      for v_claim in select e from jsonb_array_elements(p_hold.claims) e
                      where p_hold.claims <> '[]'::jsonb and e ->> 'pool' = v_pool
                        and (e ->> 'g')::uuid is not distinct from v_part.g loop
        v_take := least(v_released, (v_claim ->> 'amount')::bigint);
        if v_take > 0 then
          f_amount := v_take; f_fate := 'clawback'; f_ref := v_claim ->> 'stripe_ref';
          f_key := v_claim ->> 'key';
          return next;
          v_released := v_released - v_take;
        end if;
      end loop;
      f_ref := null;
      f_key := null;
      if v_released > 0 then
        f_amount := v_released;
        f_fate := case when v_pool = 'promotional'
                            and (select p.expires_at from private.grants p where p.id = v_part.g) <= p_now
                       then 'expire'
                       when v_pool = 'subscription' and p_hold.sub_epoch <> p_epoch then 'expire'
                       else 'free' end;
        return next;
      end if;
    end loop;
  end loop;
end
$$;

create function private.end_hold(p_hold public.credit_holds, p_charge bigint,
                                 p_metadata jsonb default null, p_actor uuid default null)
returns public.credit_transactions
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_wallet public.credit_wallets;
  v_spend public.credit_transactions;
  v_row record;
  v_sum record;
  v_fates jsonb;
begin
  select * into v_wallet from public.credit_wallets w where w.account_id = p_hold.account_id;
  select coalesce(jsonb_agg(to_jsonb(f)), '[]'::jsonb) into v_fates
    from private.hold_fates(p_hold, p_charge, v_wallet.sub_epoch, now()) f;

  select coalesce(sum(f.f_amount) filter (where f.f_pool = 'promotional' and f.f_fate = 'spend'), 0)::bigint as sp,
         coalesce(sum(f.f_amount) filter (where f.f_pool = 'subscription' and f.f_fate = 'spend'), 0)::bigint as ss,
         coalesce(sum(f.f_amount) filter (where f.f_pool = 'purchased' and f.f_fate = 'spend'), 0)::bigint as su,
         coalesce(sum(f.f_amount) filter (where f.f_pool = 'promotional' and f.f_fate = 'expire'), 0)::bigint as ep,
         coalesce(sum(f.f_amount) filter (where f.f_pool = 'subscription' and f.f_fate = 'expire'), 0)::bigint as es,
         coalesce(sum(f.f_amount) filter (where f.f_pool = 'promotional' and f.f_fate = 'free'), 0)::bigint as fp,
         coalesce(sum(f.f_amount) filter (where f.f_pool = 'subscription' and f.f_fate = 'free'), 0)::bigint as fs,
         coalesce(sum(f.f_amount) filter (where f.f_pool = 'purchased' and f.f_fate = 'free'), 0)::bigint as fu
    into v_sum from private.fates(v_fates) f;

  if v_sum.sp + v_sum.ss + v_sum.su > 0 then
    v_spend := private.post(p_hold.account_id, 'spend', -v_sum.sp, -v_sum.ss, -v_sum.su,
                            -v_sum.sp, -v_sum.ss, -v_sum.su, p_origin => 'system', p_ref_id => p_hold.id,
                            p_metadata => p_metadata, p_actor => p_actor,
                            p_period_start => case when v_sum.ss > 0 then p_hold.period_start end,
                            p_period_end => case when v_sum.ss > 0 then p_hold.period_end end,
                            p_operation => p_hold.operation);
  end if;
  -- One clawback row per claim's payment, key and grant (a won dispute gives
  -- back what its claims took, into the same grants).
  for v_row in select f.f_pool, f.f_ref, f.f_key, f.f_grant, sum(f.f_amount)::bigint as amount
                 from private.fates(v_fates) f
                where p_hold.claims <> '[]'::jsonb and f.f_fate = 'clawback'
                group by f.f_pool, f.f_ref, f.f_key, f.f_grant order by f.f_pool, f.f_ref, f.f_key, f.f_grant loop
    perform private.post(p_hold.account_id, 'clawback',
                         p_promotional => case when v_row.f_pool = 'promotional' then -v_row.amount else 0 end,
                         p_subscription => case when v_row.f_pool = 'subscription' then -v_row.amount else 0 end,
                         p_purchased => case when v_row.f_pool = 'purchased' then -v_row.amount else 0 end,
                         p_held_promotional => case when v_row.f_pool = 'promotional' then -v_row.amount
                                                    else 0 end,
                         p_held_subscription => case when v_row.f_pool = 'subscription' then -v_row.amount
                                                     else 0 end,
                         p_held_purchased => case when v_row.f_pool = 'purchased' then -v_row.amount else 0 end,
                         p_origin => 'system', p_ref_id => p_hold.id, p_stripe_ref => v_row.f_ref,
                         p_metadata => jsonb_strip_nulls(jsonb_build_object(
                                         'reason', 'clawback found under a hold', 'claim', v_row.f_key)),
                         p_period_start => case when v_row.f_pool = 'subscription' then p_hold.period_start end,
                         p_period_end => case when v_row.f_pool = 'subscription' then p_hold.period_end end,
                         p_outcome => case when v_row.f_grant is not null
                                           then jsonb_build_object('grants',
                                                  jsonb_build_object(v_row.f_grant::text, v_row.amount)) end);
  end loop;
  if v_sum.ep + v_sum.es > 0 then
    perform private.post(p_hold.account_id, 'expire', -v_sum.ep, -v_sum.es, 0, -v_sum.ep, -v_sum.es, 0,
                         p_origin => 'system', p_ref_id => p_hold.id,
                         p_metadata => jsonb_build_object('reason', 'expired while held'),
                         p_period_start => case when v_sum.es > 0 then p_hold.period_start end,
                         p_period_end => case when v_sum.es > 0 then p_hold.period_end end);
  end if;
  -- The hold ends (its caller records how, in the same transaction): what it
  -- released is free again, and the next hold to lapse is another.
  if v_sum.fp + v_sum.fs + v_sum.fu > 0 then
    -- Released credits go back to their grants (spends since are attributed
    -- first; a calendar allowance has no row: it is the front, it gets them).
    select * into v_wallet from public.credit_wallets w where w.account_id = p_hold.account_id;
    for v_row in select distinct f.f_pool from private.fates(v_fates) f
                  where f.f_fate = 'free' and f.f_grant is not null loop
      perform private.materialize_grants(v_wallet, v_row.f_pool);
    end loop;
    update private.grants p set remaining = p.remaining + f.amount
      from (select s.f_grant, sum(s.f_amount) as amount from private.fates(v_fates) s
             where s.f_fate = 'free' and s.f_grant is not null group by s.f_grant) f
     where p.id = f.f_grant;
  end if;
  update public.credit_wallets w
     set held_promotional = w.held_promotional - v_sum.fp,
         held_subscription = w.held_subscription - v_sum.fs,
         held_purchased = w.held_purchased - v_sum.fu,
         next_hold_expiry = (select min(h.expires_at) from public.credit_holds h
                              where h.account_id = p_hold.account_id and h.status = 'active'
                                and h.id <> p_hold.id)
   where w.account_id = p_hold.account_id
  returning w.* into v_wallet;
  if v_sum.fp > 0 then
    perform private.materialize_grants(v_wallet);
  end if;
  return v_spend;
end
$$;

create or replace function private.lock_wallet(p_account_id uuid) returns public.credit_wallets
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_wallet public.credit_wallets;
  v_hold public.credit_holds;
  v_grant record;
begin
  select * into v_wallet from public.credit_wallets w where w.account_id = p_account_id for update;
  if not found then
    perform private.fail('PT404', 'account_not_found');
  end if;
  if not private.sweep_due(v_wallet) then
    return v_wallet;
  end if;
  for v_hold in select * from public.credit_holds h
                 where h.account_id = p_account_id and h.status = 'active' and h.expires_at <= now()
                 order by h.expires_at, h.id for update loop
    perform private.end_hold(v_hold, 0);
    update public.credit_holds h set status = 'expired', settled_at = now() where h.id = v_hold.id;
  end loop;
  select * into v_wallet from public.credit_wallets w where w.account_id = p_account_id;
  v_wallet := private.materialize_grants(v_wallet);
  for v_grant in select p.id, p.remaining from private.grants p
                  where p.account_id = p_account_id and p.pool = 'promotional' and p.remaining > 0
                    and p.expires_at <= now()
                  order by p.expires_at, p.id loop
    update private.grants p set remaining = 0 where p.id = v_grant.id;
    perform private.post(p_account_id, 'expire', p_promotional => -v_grant.remaining, p_origin => 'system',
                         p_ref_id => v_grant.id, p_metadata => '{"reason": "promotional grant expired"}'::jsonb);
  end loop;
  select * into v_wallet from public.credit_wallets w where w.account_id = p_account_id;
  return v_wallet;
end
$$;

create or replace function private.settle_hold(p_hold_id uuid, p_charge integer, p_metadata jsonb, p_capture boolean)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_account_id uuid := private.hold_account(p_hold_id);
  v_hold public.credit_holds;
  v_spend public.credit_transactions;
  v_charge bigint;
  v_metadata jsonb;
  v_split private.split;
  v_result jsonb;
begin
  perform private.lock_wallet(v_account_id);
  select * into v_hold from public.credit_holds h where h.id = p_hold_id for update;
  if v_hold.status = (case when p_capture then 'captured' else 'released' end) then
    return v_hold.result || '{"replayed": true}'::jsonb;
  end if;
  perform private.check_metadata(p_metadata);
  if v_hold.status <> 'active' then
    perform private.fail('PT409', 'hold_not_active', jsonb_build_object('status', v_hold.status));
  end if;
  v_charge := 0;
  if p_capture then
    if p_charge is not null then
      perform private.check_amount('p_amount', p_charge);
      if p_charge > v_hold.amount then
        perform private.invalid('p_amount', format('must not exceed the held amount (%s)', v_hold.amount));
      end if;
    end if;
    v_charge := coalesce(p_charge, v_hold.amount);
    v_metadata := v_hold.metadata || coalesce(p_metadata, '{}'::jsonb);
    perform private.check_metadata(v_metadata, 'p_metadata (merged with the hold''s)');
  end if;
  v_spend := private.end_hold(v_hold, v_charge, v_metadata, private.actor());
  if p_capture then
    v_split := private.spend_split(v_hold.promotional, v_hold.subscription, v_hold.purchased, v_charge);
    v_result := jsonb_build_object(
      'transaction_id', v_spend.id, 'hold_id', p_hold_id, 'charged', v_charge,
      'released', v_hold.amount - v_charge, 'from_promotional', v_split.promotional,
      'from_subscription', v_split.subscription, 'from_purchased', v_split.purchased, 'replayed', false);
  else
    v_result := jsonb_build_object('hold_id', p_hold_id, 'released', v_hold.amount, 'replayed', false);
  end if;
  v_result := v_result || jsonb_build_object('balance', private.balance_json(
    (select w from public.credit_wallets w where w.account_id = v_account_id)));
  update public.credit_holds h
     set status = case when p_capture then 'captured' else 'released' end, settled_at = now(), result = v_result
   where h.id = p_hold_id;
  return v_result;
end
$$;

create or replace function private.current_wallet(p_wallet public.credit_wallets) returns public.credit_wallets
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_wallet public.credit_wallets := p_wallet;
  v_fates jsonb;
  v_sum record;
  v_front record;
begin
  if not private.sweep_due(p_wallet) then
    return p_wallet;
  end if;
  select coalesce(jsonb_agg(to_jsonb(f)), '[]'::jsonb) into v_fates
    from public.credit_holds h
   cross join lateral private.hold_fates(h, 0, p_wallet.sub_epoch, now()) f
   where h.account_id = p_wallet.account_id and h.status = 'active' and h.expires_at <= now();
  -- Lapsed holds: their parts leave held; what expires or is clawed back leaves the pools.
  select coalesce(sum(f.f_amount) filter (where f.f_pool = 'promotional'), 0) as hp,
         coalesce(sum(f.f_amount) filter (where f.f_pool = 'subscription'), 0) as hs,
         coalesce(sum(f.f_amount) filter (where f.f_pool = 'purchased'), 0) as hu,
         coalesce(sum(f.f_amount) filter (where f.f_pool = 'promotional' and f.f_fate <> 'free'), 0) as gp,
         coalesce(sum(f.f_amount) filter (where f.f_pool = 'subscription' and f.f_fate <> 'free'), 0) as gs,
         coalesce(sum(f.f_amount) filter (where f.f_pool = 'purchased' and f.f_fate <> 'free'), 0) as gu
    into v_sum from private.fates(v_fates) f;
  -- Promotional grants: the free credits attributed to each, plus what lapsed
  -- holds give back to it; those past their date expire, the soonest of the
  -- others is the new front.
  with back as (
    select f.f_grant, sum(f.f_amount) as amount from private.fates(v_fates) f
     where f.f_pool = 'promotional' and f.f_fate = 'free' group by f.f_grant
  ), grants as (
    select p.id, p.expires_at, coalesce(a.attributed, 0) + coalesce(b.amount, 0) as free
      from private.grants p
      left join private.grant_attribution(p_wallet, 'promotional') a on a.id = p.id
      left join back b on b.f_grant = p.id
     where p.account_id = p_wallet.account_id and p.pool = 'promotional'
       and (a.id is not null or b.f_grant is not null)
  ), front as (
    select g.expires_at as at from grants g where g.expires_at > now() and g.free > 0
     order by g.expires_at limit 1
  )
  select coalesce((select sum(g.free) from grants g where g.expires_at <= now()), 0)::bigint as expired,
         (select f.at from front f) as at,
         coalesce((select sum(g.free) from grants g join front f on g.expires_at = f.at), 0)::bigint as left_at
    into v_front;
  v_wallet.held_promotional := v_wallet.held_promotional - v_sum.hp;
  v_wallet.held_subscription := v_wallet.held_subscription - v_sum.hs;
  v_wallet.held_purchased := v_wallet.held_purchased - v_sum.hu;
  v_wallet.promotional := v_wallet.promotional - v_sum.gp - v_front.expired;
  v_wallet.subscription := v_wallet.subscription - v_sum.gs;
  v_wallet.purchased := v_wallet.purchased - v_sum.gu;
  v_wallet.promo_front_at := v_front.at;
  v_wallet.promo_front_left := v_front.left_at;
  v_wallet.next_hold_expiry := (select min(h.expires_at) from public.credit_holds h
                                 where h.account_id = p_wallet.account_id and h.status = 'active'
                                   and h.expires_at > now());
  return v_wallet;
end
$$;

create or replace function private.reserve_credits(p_account_id uuid, p_idempotency_key text, p_amount integer default null,
                                       p_operation text default null, p_ttl_seconds integer default 900,
                                       p_metadata jsonb default '{}'::jsonb)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_cost bigint;
  v_hash uuid;
  v_wallet public.credit_wallets;
  v_entry public.credit_transactions;
  v_split private.split;
  v_parts jsonb := '[]'::jsonb;
  v_hold uuid := gen_random_uuid();
  v_tx uuid := private.uuid_v7();
  v_expires timestamptz;
  v_actor uuid;
begin
  v_actor := private.authorize(p_account_id, true);
  v_cost := private.spend_cost(p_idempotency_key, p_amount, p_operation, null, null, null, p_metadata);
  if v_cost < 1 then
    perform private.invalid('p_operation', 'a hold must reserve at least 1 credit');
  end if;
  if p_ttl_seconds is null or p_ttl_seconds not between 1 and (private.limits() ->> 'ttl_seconds')::integer then
    perform private.invalid('p_ttl_seconds', format('must be 1 to %s seconds', private.limits() ->> 'ttl_seconds'));
  end if;
  v_hash := private.request_hash('reserve', jsonb_build_array(p_amount, p_operation, p_ttl_seconds, p_metadata));
  v_expires := now() + make_interval(secs => p_ttl_seconds);

  v_wallet := private.lock_wallet(p_account_id);
  v_entry := private.find_key(p_account_id, p_idempotency_key, v_hash);
  if v_entry.id is not null then
    return private.result(v_entry, true);
  end if;
  perform private.check_hold_bounds(v_wallet);
  if private.available(v_wallet) < v_cost then
    perform private.insufficient(v_cost, private.available(v_wallet));
  end if;
  v_split := private.spend_split(v_wallet.promotional - v_wallet.held_promotional,
                                 v_wallet.subscription - v_wallet.held_subscription,
                                 v_wallet.purchased - v_wallet.held_purchased, v_cost);
  -- Which grants, pool by pool: the front of each.
  if v_split.promotional > 0 then
    v_parts := private.take_front(v_wallet, 'promotional', v_split.promotional);
  end if;
  if v_split.subscription > 0 then
    v_parts := v_parts || private.take_front(v_wallet, 'subscription', v_split.subscription);
  end if;
  if v_split.purchased > 0 then
    v_parts := v_parts || private.take_front(v_wallet, 'purchased', v_split.purchased);
  end if;
  insert into public.credit_holds (id, account_id, transaction_id, amount, promotional, subscription, purchased,
                                   parts, sub_epoch, period_start, period_end, expires_at, operation,
                                   metadata)
  values (v_hold, p_account_id, v_tx, v_cost, v_split.promotional, v_split.subscription, v_split.purchased,
          v_parts, v_wallet.sub_epoch, v_wallet.period_start, v_wallet.period_end, v_expires, p_operation,
          coalesce(p_metadata, '{}'::jsonb));
  update public.credit_wallets w
     set next_hold_expiry = least(coalesce(w.next_hold_expiry, v_expires), v_expires),
         hold_minute = date_trunc('minute', now()),
         hold_minute_count = case when w.hold_minute = date_trunc('minute', now())
                                  then w.hold_minute_count + 1 else 1 end
   where w.account_id = p_account_id;
  v_entry := private.post(p_account_id, 'reserve',
                          p_held_promotional => v_split.promotional, p_held_subscription => v_split.subscription,
                          p_held_purchased => v_split.purchased, p_key => p_idempotency_key, p_hash => v_hash,
                          p_ref_id => v_hold, p_metadata => p_metadata, p_actor => v_actor,
                          p_operation => p_operation, p_id => v_tx);
  return private.result(v_entry, false);
end
$$;

create or replace function private.deduct_credits(p_account_id uuid, p_idempotency_key text, p_amount integer,
                                       p_operation text, p_model text, p_input_tokens integer,
                                       p_output_tokens integer, p_metadata jsonb)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_actor uuid := private.authorize(p_account_id, true);
  v_cost bigint := private.spend_cost(p_idempotency_key, p_amount, p_operation, p_model, p_input_tokens,
                                      p_output_tokens, p_metadata);
  v_hash uuid := private.request_hash('deduct', jsonb_build_array(p_amount, p_operation, p_model,
                                                                  p_input_tokens, p_output_tokens, p_metadata));
  v_wallet public.credit_wallets;
  v_entry public.credit_transactions;
  v_split private.split;
  v_expiry jsonb;
begin
  select * into v_wallet from public.credit_wallets w where w.account_id = p_account_id for update;
  if not found then
    perform private.fail('PT404', 'account_not_found');
  end if;
  if private.sweep_due(v_wallet) then
    v_wallet := private.lock_wallet(p_account_id);
  end if;
  if private.available(v_wallet) < v_cost then
    -- A replay still answers when the balance could not pay again.
    v_entry := private.find_key(p_account_id, p_idempotency_key, v_hash);
    if v_entry.id is not null then
      return private.result(v_entry, true);
    end if;
    perform private.insufficient(v_cost, private.available(v_wallet));
  end if;
  v_split := private.spend_split(v_wallet.promotional - v_wallet.held_promotional,
                                 v_wallet.subscription - v_wallet.held_subscription,
                                 v_wallet.purchased - v_wallet.held_purchased, v_cost);
  v_wallet.promotional := v_wallet.promotional - v_split.promotional;
  v_wallet.subscription := v_wallet.subscription - v_split.subscription;
  v_wallet.purchased := v_wallet.purchased - v_split.purchased;
  if v_split.promotional > 0 then
    if v_split.promotional < v_wallet.promo_front_left
       or v_wallet.promotional = v_wallet.held_promotional then
      -- The soonest grant covers it (or nothing free is left): no grant row to touch.
      v_wallet.promo_front_left := greatest(v_wallet.promo_front_left - v_split.promotional, 0);
    else
      -- Across grants: write the wallet now and attribute the spend to grants
      -- (after the replay check, so that nothing is written for a replay).
      v_entry := private.find_key(p_account_id, p_idempotency_key, v_hash);
      if v_entry.id is not null then
        return private.result(v_entry, true);
      end if;
      update public.credit_wallets w
         set promotional = v_wallet.promotional, subscription = v_wallet.subscription,
             purchased = v_wallet.purchased
       where w.account_id = p_account_id;
      v_wallet := private.materialize_grants(v_wallet);
    end if;
  end if;
  v_expiry := private.next_expiry(v_wallet);

  -- The idempotency check: a key written before is visible now (every write
  -- of this account's rows holds the wallet's lock, which this call holds).
  if exists (select from public.credit_transactions t where t.account_id = p_account_id
                and t.idempotency_key = p_idempotency_key and t.origin = 'api') then
    return private.result(private.find_key(p_account_id, p_idempotency_key, v_hash), true);
  end if;
  insert into public.credit_transactions (
    account_id, kind, idempotency_key, request_hash, promotional, subscription, purchased,
    promotional_after, subscription_after, purchased_after, held_after, period_start, period_end,
    next_expiry_amount, next_expiry_at, operation, model, input_tokens, output_tokens, metadata, actor_id)
  values (
    p_account_id, 'spend', p_idempotency_key, v_hash, -v_split.promotional, -v_split.subscription, -v_split.purchased,
    v_wallet.promotional, v_wallet.subscription, v_wallet.purchased,
    v_wallet.held_promotional + v_wallet.held_subscription + v_wallet.held_purchased,
    v_wallet.period_start, v_wallet.period_end, (v_expiry ->> 'amount')::bigint, (v_expiry ->> 'at')::timestamptz,
    p_operation, p_model, p_input_tokens, p_output_tokens, coalesce(p_metadata, '{}'::jsonb), v_actor)
  returning * into v_entry;
  update public.credit_wallets w
     set promotional = v_wallet.promotional, subscription = v_wallet.subscription,
         purchased = v_wallet.purchased, promo_front_left = v_wallet.promo_front_left
   where w.account_id = p_account_id;
  return private.result(v_entry, false);
end
$$;

create or replace function private.payment_grants(p_stripe_ref text, out account_id uuid, out pool text, out granted bigint)
language sql stable
set search_path = pg_catalog, pg_temp
as $$
  select (array_agg(g.account_id order by g.id))[1], (array_agg(g.pool order by g.id))[1],
         case when count(*) > 0 then coalesce(sum(g.granted) filter (where not g.carried), 0) end::bigint
    from private.grants g
   where g.stripe_ref = p_stripe_ref
$$;

create or replace function private.clawback(p_stripe_ref text, p_key text, p_amount integer, p_reason text,
                                 p_origin private.entry_origin)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_grants record;
  v_hash uuid;
  v_wallet public.credit_wallets;
  v_entry public.credit_transactions;
  v_done bigint;
  v_outstanding bigint;
  v_pool text;
  v_grant record;
  v_take bigint;
  v_taken jsonb := '{}'::jsonb;
  v_by_pool jsonb := '{"promotional": 0, "subscription": 0, "purchased": 0}'::jsonb;
  v_total bigint := 0;
  v_claimed bigint := 0;
  v_hold record;
  v_claim bigint;
  v_part jsonb;
begin
  perform private.require_service();
  perform private.check_key(p_key);
  perform private.check_text('p_stripe_ref', p_stripe_ref, 'stripe_ref', true);
  perform private.check_text('p_reason', p_reason, 'reason');
  if p_amount is not null then
    perform private.check_amount('p_amount', p_amount, 0);
  end if;
  select * into v_grants from private.payment_grants(p_stripe_ref);
  if v_grants.account_id is null then
    perform private.fail('PT404', 'transaction_not_found', jsonb_build_object('stripe_ref', p_stripe_ref));
  end if;
  v_hash := private.request_hash('clawback', jsonb_build_array(p_stripe_ref, p_amount, p_reason));
  v_wallet := private.lock_wallet(v_grants.account_id);
  v_entry := private.find_key(v_grants.account_id, p_key, v_hash, p_origin);
  if v_entry.id is not null then
    return private.result(v_entry, true);
  end if;

  -- Taken back so far (clawback and reinstatement rows), plus what holds still owe.
  select coalesce(-sum(t.promotional + t.subscription + t.purchased), 0) into v_done
    from public.credit_transactions t
   where t.stripe_ref = p_stripe_ref and t.account_id = v_grants.account_id
     and t.kind in ('clawback', 'reinstate');
  select v_done + coalesce(sum((c ->> 'amount')::bigint), 0) into v_done
    from public.credit_holds h cross join lateral jsonb_array_elements(h.claims) c
   where h.account_id = v_grants.account_id and h.status = 'active' and c ->> 'stripe_ref' = p_stripe_ref;
  v_outstanding := greatest(least(coalesce(p_amount, v_grants.granted), v_grants.granted) - v_done, 0);

  -- What is left of the payment's own grants, never another's, in the
  -- spending order: the free credits are taken now.
  foreach v_pool in array array['promotional', 'subscription', 'purchased'] loop
    exit when v_outstanding - v_total <= 0;
    continue when not exists (select 1 from private.grants g where g.account_id = v_grants.account_id
                                and g.stripe_ref = p_stripe_ref and g.pool = v_pool and g.remaining > 0);
    v_wallet := private.materialize_grants(v_wallet, v_pool);
    for v_grant in select a.id, a.attributed as free
                     from private.grant_attribution(v_wallet, v_pool) a
                     join private.grants g on g.id = a.id
                    where g.stripe_ref = p_stripe_ref
                    order by a.expires_at nulls last, a.created_at, a.id loop
      v_take := least(v_outstanding - v_total, v_grant.free);
      continue when v_take <= 0;
      update private.grants g set remaining = g.remaining - v_take where g.id = v_grant.id;
      v_taken := v_taken || jsonb_build_object(v_grant.id::text, v_take);
      v_by_pool := jsonb_set(v_by_pool, array[v_pool], to_jsonb((v_by_pool ->> v_pool)::bigint + v_take));
      v_total := v_total + v_take;
    end loop;
  end loop;

  -- What active holds reserve of those grants (the parts naming them, less
  -- what earlier clawbacks claimed of them) is claimed on those holds,
  -- soonest-ending first, and taken when each ends.
  if v_outstanding > v_total then
    for v_hold in select h.id, h.parts, h.claims from public.credit_holds h
                   where h.account_id = v_grants.account_id and h.status = 'active'
                   order by h.expires_at, h.id loop
      exit when v_outstanding - v_total - v_claimed <= 0;
      for v_part in select e from jsonb_array_elements(v_hold.parts) e
                     where exists (select 1 from private.grants g
                                    where g.id = (e ->> 'g')::uuid and g.stripe_ref = p_stripe_ref) loop
        v_claim := least((v_part ->> 'a')::bigint
                         - (select coalesce(sum((c ->> 'amount')::bigint), 0) from jsonb_array_elements(v_hold.claims) c
                             where c ->> 'g' = v_part ->> 'g'),
                         v_outstanding - v_total - v_claimed);
        continue when v_claim <= 0;
        v_hold.claims := v_hold.claims || jsonb_build_array(jsonb_build_object(
          'pool', coalesce(v_part ->> 'p', 'promotional'), 'g', v_part ->> 'g', 'amount', v_claim,
          'stripe_ref', p_stripe_ref, 'key', p_key));
        v_claimed := v_claimed + v_claim;
      end loop;
      update public.credit_holds h set claims = v_hold.claims where h.id = v_hold.id;
    end loop;
  end if;
  v_entry := private.post(
    v_grants.account_id, 'clawback',
    p_promotional => -(v_by_pool ->> 'promotional')::bigint,
    p_subscription => -(v_by_pool ->> 'subscription')::bigint,
    p_purchased => -(v_by_pool ->> 'purchased')::bigint,
    p_origin => p_origin, p_key => p_key, p_hash => v_hash, p_stripe_ref => p_stripe_ref,
    p_description => p_reason,
    p_metadata => jsonb_build_object('reason', p_reason),
    p_outcome => jsonb_build_object('pending', v_claimed, 'shortfall', v_outstanding - v_total - v_claimed,
                                    'grants', v_taken));
  return private.result(v_entry, false);
end
$$;

create or replace function private.reconcile_credit_balances() returns jsonb
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$
  with sums as (
    select t.account_id, sum(t.promotional)::bigint as promotional, sum(t.subscription)::bigint as subscription,
           sum(t.purchased)::bigint as purchased
      from public.credit_transactions t group by t.account_id
  ), holds as (
    select h.account_id, sum(h.promotional)::bigint as promotional, sum(h.subscription)::bigint as subscription,
           sum(h.purchased)::bigint as purchased
      from public.credit_holds h where h.status = 'active' group by h.account_id
  ), granted as (
    -- What the grants have left of the free credits (every credit belongs to one).
    select w.account_id,
           coalesce(sum(a.attributed) filter (where p.pool = 'promotional'), 0)::bigint as promotional,
           coalesce(sum(a.attributed) filter (where p.pool = 'subscription'), 0)::bigint as subscription,
           coalesce(sum(a.attributed) filter (where p.pool = 'purchased'), 0)::bigint as purchased
      from public.credit_wallets w
     cross join lateral (values ('promotional'), ('subscription'), ('purchased')) p(pool)
     cross join lateral private.grant_attribution(w, p.pool) a
     group by w.account_id
  ), checks as (
    select w.account_id, v.pool, v.balance, coalesce(v.expected, 0) as expected
      from public.credit_wallets w
      left join sums s on s.account_id = w.account_id
      left join holds h on h.account_id = w.account_id
      left join granted g on g.account_id = w.account_id
     cross join lateral (values ('promotional', w.promotional, s.promotional),
                                ('subscription', w.subscription, s.subscription),
                                ('purchased', w.purchased, s.purchased),
                                ('held_promotional', w.held_promotional, h.promotional),
                                ('held_subscription', w.held_subscription, h.subscription),
                                ('held_purchased', w.held_purchased, h.purchased),
                                -- Free credits (the pool less what is held) against their grants.
                                ('grants_promotional', w.promotional - w.held_promotional, g.promotional),
                                ('grants_subscription', w.subscription - w.held_subscription, g.subscription),
                                ('grants_purchased', w.purchased - w.held_purchased, g.purchased))
                          v(pool, balance, expected)
  )
  select jsonb_build_object(
    'checked', count(*),
    'mismatches', coalesce(jsonb_agg(jsonb_build_object('account_id', c.account_id, 'pool', c.pool,
                                                        'balance', c.balance, 'ledger', c.expected))
                           filter (where c.balance <> c.expected), '[]'::jsonb))
  from checks c
$$;

create or replace function public.reconcile_credit_balances()
returns jsonb
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.reconcile_credit_balances();
end
$$;
comment on function public.reconcile_credit_balances() is
  'Service: every account/pool whose balance differs from its ledger or its grants, and held counters from active holds.';

create or replace function private.run_monthly_reset(p_period_start date, p_batch_size integer default 5000,
                                         p_after uuid default null) returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_start timestamptz;
  v_end timestamptz;
  v_last uuid;
  v_scanned integer;
  v_due uuid[];
  v_calendar uuid[];
  v_anniversary uuid[];
  v_at timestamptz;
  v_account uuid;
  v_ids uuid[];
  v_amounts bigint[];
  v_caps bigint[];
  v_ends timestamptz[];
  v_result record;
  v_yearly record;
  v_month record;
  v_processed integer := 0;
  v_expired bigint := 0;
  v_granted bigint := 0;
begin
  perform private.require_service();
  if p_period_start is null or extract(day from p_period_start) <> 1 then
    perform private.invalid('p_period_start', 'must be the first day of a month');
  end if;
  if p_period_start > (date_trunc('month', now() at time zone 'UTC') + interval '1 month')::date then
    perform private.invalid('p_period_start', 'must not be more than one month ahead of the current UTC month');
  end if;
  if p_batch_size is null or p_batch_size not between 1 and 100000 then
    perform private.invalid('p_batch_size', 'must be 1 to 100000');
  end if;
  v_start := p_period_start::timestamp at time zone 'UTC';
  v_end := (p_period_start + interval '1 month')::timestamp at time zone 'UTC';
  v_at := greatest(now(), v_start);

  select count(*), (array_agg(b.id order by b.id desc))[1] into v_scanned, v_last
    from (select a.id from public.credit_accounts a
           where a.id > coalesce(p_after, '00000000-0000-0000-0000-000000000000'::uuid)
           order by a.id limit p_batch_size) b;
  if v_scanned = 0 then
    return jsonb_build_object('processed', 0, 'expired', 0, 'granted', 0, 'next_after', null, 'done', true);
  end if;

  -- Lock, in ascending id, the wallets that need a renewal or a sweep, and
  -- say which renewal each is due (the rule, written once, inline: a
  -- function call per row would cost the reset a third of its time):
  --   * 'anniversary': an active or trialing subscription on a yearly price
  --     still paid at v_at whose current month has ended;
  --   * nothing: a monthly price (its invoices renew it), or a yearly price
  --     whose paid year ended less than 72 hours ago (its renewal invoice may
  --     still come; a year stopped by a refund or a dispute does not wait);
  --   * 'calendar': every other account on a period that began before v_start.
  select array_agg(x.account_id order by x.account_id),
         coalesce(array_agg(x.account_id order by x.account_id) filter (where x.due = 'calendar'), '{}'),
         coalesce(array_agg(x.account_id order by x.account_id) filter (where x.due = 'anniversary'), '{}')
    into v_due, v_calendar, v_anniversary
    from (select w.account_id, d.due
            from public.credit_wallets w
            join public.credit_accounts a on a.id = w.account_id
           cross join lateral (
             select case when a.stripe_subscription_id is not null
                              and a.subscription_status in ('active', 'trialing')
                              and (a.stripe_paid_through is null
                                   or a.stripe_paid_through > v_at
                                   or (a.stripe_paid_through >= a.stripe_paid_until
                                       and a.stripe_paid_through + interval '72 hours' > v_at))
                         then case when a.stripe_paid_through > v_at and w.period_end <= v_at
                                   then 'anniversary' end
                         when w.period_start is null or w.period_start < v_start then 'calendar'
                    end as due) d
           where w.account_id > coalesce(p_after, '00000000-0000-0000-0000-000000000000'::uuid)
             and w.account_id <= v_last
             and (d.due is not null or private.sweep_due(w))
           order by w.account_id
             for update of w) x;
  -- Sweep what lapsed, and attribute promotional spends where a rollover
  -- grant is about to join grants whose rows lag behind the wallet (both
  -- rare: a few accounts a batch; one set-based query finds them).
  for v_account in
    select w.account_id from public.credit_wallets w
      join public.credit_accounts a on a.id = w.account_id
      join public.credit_plans p on p.id = a.plan_id
      left join (select g.account_id, sum(g.remaining) as remaining from private.grants g
                  where g.account_id = any (v_due) and g.pool = 'promotional' and g.remaining > 0
                  group by g.account_id) g
        on g.account_id = w.account_id
     where w.account_id = any (v_due)
       and (private.sweep_due(w)
            -- (the renewal may apply the free plan's cap instead of the account's plan's)
            or ((p.rollover_cap > 0 or (select f.rollover_cap from public.credit_plans f where f.id = 'free') > 0)
                and coalesce(g.remaining, 0) <> w.promotional - w.held_promotional))
     order by w.account_id
  loop
    perform private.materialize_grants(private.lock_wallet(v_account));
  end loop;

  -- The calendar month, in one statement for the batch: the plan's allowance,
  -- or the free plan's while the subscription does not pay (a yearly price
  -- whose paid year ended or stopped included).
  select array_agg(a.id order by a.id), array_agg(q.monthly_credits::bigint order by a.id),
         array_agg(q.rollover_cap::bigint order by a.id), array_agg(v_end order by a.id)
    into v_ids, v_amounts, v_caps, v_ends
    from public.credit_accounts a
    join public.credit_plans q
      on q.id = case when coalesce(a.subscription_status, '') in ('past_due', 'unpaid', 'incomplete',
                                                                  'incomplete_expired', 'paused', 'canceled')
                          or (a.subscription_status in ('active', 'trialing') and a.stripe_paid_through is not null)
                     then 'free' else a.plan_id end
   where a.id = any (v_calendar);
  select count(*)::integer as processed, coalesce(sum(r.expired), 0)::bigint as expired,
         coalesce(sum(r.granted), 0)::bigint as granted
    into v_result
    from private.renew_to(coalesce(v_ids, '{}'), coalesce(v_amounts, '{}'), coalesce(v_caps, '{}'),
                          coalesce(v_ends, '{}'), v_start, 'system', null, null, null,
                          '{"reason": "monthly_reset"}'::jsonb) r;
  v_processed := v_result.processed;
  v_expired := v_result.expired;
  v_granted := v_result.granted;

  -- Yearly prices: each account's month from its own anniversary, with the
  -- plan, seats and paid share current now, never past the paid period; the
  -- grant carries the year's Stripe reference.
  for v_yearly in
    select a.id, a.stripe_period_start, a.stripe_paid_through, a.stripe_paid_ref,
           floor(p.monthly_credits::numeric * coalesce(a.stripe_quantity, 1) * a.stripe_paid_scale)::bigint
             as amount, p.rollover_cap::bigint as cap
      from public.credit_accounts a
      join public.credit_plans p on p.id = a.plan_id
     where a.id = any (v_anniversary)
     order by a.id
  loop
    v_month := private.anniversary_month(coalesce(v_yearly.stripe_period_start, v_start), v_at);
    select count(*)::integer as processed, coalesce(sum(r.expired), 0)::bigint as expired,
           coalesce(sum(r.granted), 0)::bigint as granted
      into v_result
      from private.renew_to(array[v_yearly.id], array[v_yearly.amount], array[v_yearly.cap],
                            array[least(v_month.month_end, v_yearly.stripe_paid_through)], v_month.month_start,
                            'system', null, null, v_yearly.stripe_paid_ref,
                            '{"reason": "yearly_month"}'::jsonb) r;
    v_processed := v_processed + v_result.processed;
    v_expired := v_expired + v_result.expired;
    v_granted := v_granted + v_result.granted;
  end loop;

  return jsonb_build_object('processed', v_processed, 'expired', v_expired,
                            'granted', v_granted, 'next_after', v_last, 'done', v_scanned < p_batch_size);
end
$$;

create or replace function private.stripe_dispute_won(p_type text, p jsonb) returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_dispute text := private.stripe_text(p, 'dispute');
  v_taken public.credit_transactions;
  v_wallet public.credit_wallets;
  v_entry public.credit_transactions;
  v_hash uuid;
  v_claims jsonb;
  v_pool text;
  v_held_back record;
begin
  if v_dispute is null then
    perform private.invalid('dispute', 'missing');
  end if;
  if p_type = 'charge.dispute.closed' and coalesce(p ->> 'status', '') <> 'won' then
    return private.stripe_result('ignored', 'dispute_' || coalesce(p ->> 'status', 'closed'));
  end if;
  select * into v_taken from public.credit_transactions t
   where t.idempotency_key = 'dispute:' || v_dispute and t.origin = 'stripe' and t.kind = 'clawback';
  if not found then
    -- Won before its creation was applied (Stripe does not guarantee order): wait for it.
    return private.stripe_result('parked', 'dispute_unknown', null, null, '{}', array['dispute:' || v_dispute]);
  end if;
  v_hash := private.request_hash('reinstate', to_jsonb(v_dispute));
  v_wallet := private.lock_wallet(v_taken.account_id);
  v_entry := private.find_key(v_taken.account_id, 'reinstate:' || v_dispute, v_hash, 'stripe');
  if v_entry.id is not null then
    return private.stripe_result('applied', 'already_reinstated', v_taken.account_id,
                                 private.result(v_entry, true));
  end if;
  -- What the dispute still claims on active holds is released from them
  -- (its claims carry its key; another clawback's claims stay).
  update public.credit_holds h
     set claims = (select coalesce(jsonb_agg(x.e order by x.o), '[]'::jsonb)
                     from jsonb_array_elements(h.claims) with ordinality x(e, o)
                    where x.e ->> 'key' is distinct from 'dispute:' || v_dispute)
   where h.account_id = v_taken.account_id and h.status = 'active'
     and h.claims @> jsonb_build_array(jsonb_build_object('key', 'dispute:' || v_dispute));
  -- What the dispute took, grant by grant: its clawback, and what its claims
  -- took from holds as they ended. (A clawback recorded before grants named
  -- theirs gives back into the payment's newest grant of the pool.)
  with rows as (
    select t.promotional, t.subscription, t.purchased, t.outcome -> 'grants' as grants
      from public.credit_transactions t
     where t.id = v_taken.id
        or (t.account_id = v_taken.account_id and t.kind = 'clawback' and t.stripe_ref = v_taken.stripe_ref
            and t.metadata ->> 'claim' = 'dispute:' || v_dispute)
  ), named as (
    select e.key::uuid as grant_id, sum(e.value::bigint)::bigint as amount
      from rows r
     cross join lateral jsonb_each_text(case when jsonb_typeof(r.grants) = 'object' then r.grants
                                             else '{}'::jsonb end) e
     group by 1
  ), unnamed as (
    select v.pool, -sum(v.amount)::bigint as amount
      from rows r cross join lateral (values ('promotional', r.promotional), ('subscription', r.subscription),
                                             ('purchased', r.purchased)) v(pool, amount)
     where jsonb_typeof(r.grants) is distinct from 'object' group by v.pool having sum(v.amount) < 0
  ), back as (
    select n.grant_id, n.amount from named n
    union all
    select (select g.id from private.grants g
             where g.account_id = v_taken.account_id and g.stripe_ref = v_taken.stripe_ref and g.pool = u.pool
             order by g.id desc limit 1), u.amount
      from unnamed u
  )
  select coalesce(jsonb_agg(jsonb_build_object(
           'g', g.id, 'pool', g.pool, 'amount', b.amount,
           'live', case g.pool when 'subscription' then g.epoch = v_wallet.sub_epoch else true end)), '[]'::jsonb)
    into v_claims
    from back b join private.grants g on g.id = b.grant_id;
  select coalesce(sum((e ->> 'amount')::bigint) filter (where e ->> 'pool' = 'promotional'), 0)::bigint
           as promotional,
         coalesce(sum((e ->> 'amount')::bigint) filter (where e ->> 'pool' = 'subscription'), 0)::bigint
           as subscription,
         coalesce(sum((e ->> 'amount')::bigint) filter (where e ->> 'pool' = 'purchased'), 0)::bigint as purchased,
         coalesce(sum((e ->> 'amount')::bigint) filter (where e ->> 'pool' = 'subscription'
                                                        and not (e ->> 'live')::boolean), 0)::bigint as ended
    into v_held_back
    from jsonb_array_elements(v_claims) e;
  -- Back into the same grants (attributed first: spends since took from the front).
  for v_pool in select distinct e ->> 'pool' from jsonb_array_elements(v_claims) e
                 where (e ->> 'live')::boolean loop
    perform private.materialize_grants(v_wallet, v_pool);
  end loop;
  update private.grants g set remaining = g.remaining + b.amount
    from (select (e ->> 'g')::uuid as id, sum((e ->> 'amount')::bigint) as amount
            from jsonb_array_elements(v_claims) e where (e ->> 'live')::boolean group by 1) b
   where g.id = b.id;
  v_entry := private.post(v_taken.account_id, 'reinstate',
                          p_promotional => v_held_back.promotional, p_subscription => v_held_back.subscription,
                          p_purchased => v_held_back.purchased, p_origin => 'stripe',
                          p_key => 'reinstate:' || v_dispute, p_hash => v_hash,
                          p_ref_id => v_taken.id, p_stripe_ref => v_taken.stripe_ref,
                          p_metadata => jsonb_build_object('reason', 'dispute won', 'dispute', v_dispute),
                          p_outcome => jsonb_build_object('grants', (
                            select coalesce(jsonb_object_agg(e ->> 'g', (e ->> 'amount')::bigint), '{}'::jsonb)
                              from jsonb_array_elements(v_claims) e)));
  if v_held_back.ended > 0 then
    -- The allowance they belonged to has ended: written back, they expire at once.
    perform private.post(v_taken.account_id, 'expire', p_subscription => -v_held_back.ended,
                         p_origin => 'system', p_ref_id => v_entry.id, p_stripe_ref => v_taken.stripe_ref,
                         p_metadata => '{"reason": "given back after its period ended"}'::jsonb);
  end if;
  -- A promotional grant whose date passed expires what it got back now.
  perform private.lock_wallet(v_taken.account_id);
  -- A won dispute of a yearly price's payment resumes its months.
  update public.credit_accounts a
     set stripe_paid_through = a.stripe_paid_until, updated_at = now()
   where a.id = v_taken.account_id and a.stripe_paid_ref = v_taken.stripe_ref and a.stripe_paid_scale > 0;
  return private.stripe_result('applied', 'reinstated', v_taken.account_id, private.result(v_entry, false));
end
$$;

create or replace function private.stripe_plan_change(p_account_id uuid, p_invoice text, p_ref text, p_allowance bigint,
                                           p_from timestamptz, p_to timestamptz, p_metadata jsonb,
                                           p_touched text[])
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_wallet public.credit_wallets := private.lock_wallet(p_account_id);
  v_best bigint;
  v_increase bigint;
  v_left numeric;
  v_grant bigint;
  v_hash uuid;
  v_entry public.credit_transactions;
begin
  -- A change is measured against the period its subscription's invoice
  -- started; delivered before that invoice, it waits for it.
  if not exists (select 1 from public.credit_transactions t
                  where t.account_id = p_account_id and t.kind = 'grant' and t.origin = 'stripe'
                    and t.period_start = v_wallet.period_start
                    and t.metadata ->> 'subscription' = p_metadata ->> 'subscription') then
    return private.stripe_result('parked', 'period_unknown', null, null, '{}',
                                 array['period:' || (p_metadata ->> 'subscription')]);
  end if;
  if v_wallet.period_end is null or p_to is null or p_from is null
     or p_to <= v_wallet.period_start or p_from >= v_wallet.period_end then
    return private.stripe_result('ignored', 'outside_the_current_period', p_account_id);
  end if;
  -- The best allowance of this period: its grant, and the allowances earlier changes raised it to.
  select greatest(
           coalesce(max(t.subscription) filter (where t.kind = 'grant'), 0),
           coalesce(max((t.metadata ->> 'allowance')::bigint)
                      filter (where t.kind in ('promotion', 'plan_change') and t.metadata ? 'allowance'), 0))
    into v_best
    from public.credit_transactions t
   where t.account_id = p_account_id and t.period_start = v_wallet.period_start
     and t.kind in ('grant', 'promotion', 'plan_change');
  v_increase := p_allowance - v_best;
  v_left := extract(epoch from (least(p_to, v_wallet.period_end) - greatest(p_from, v_wallet.period_start)))
            / nullif(extract(epoch from (v_wallet.period_end - v_wallet.period_start)), 0);
  v_grant := floor(greatest(v_increase, 0) * least(greatest(coalesce(v_left, 0), 0), 1));
  if v_increase < 0 and (p_metadata ->> 'credited')::bigint > 0 then
    return private.stripe_plan_decrease(v_wallet, p_invoice, (p_metadata ->> 'credited')::bigint, p_touched);
  end if;
  if v_grant < 1 or v_wallet.period_end <= now() then
    return private.stripe_result('ignored', case when v_increase > 0 then 'rounds_to_zero' else 'not_an_increase' end,
                                 p_account_id);
  end if;
  v_hash := private.request_hash('plan_change', jsonb_build_array(v_grant, p_ref, p_metadata, p_allowance));
  v_entry := private.find_key(p_account_id, 'invoice:' || p_invoice, v_hash, 'stripe');
  if v_entry.id is not null then
    return private.stripe_result('applied', 'already_granted', p_account_id, private.result(v_entry, true),
                                 p_touched);
  end if;
  v_entry := private.post(p_account_id, 'plan_change', p_subscription => v_grant, p_origin => 'stripe',
                          p_key => 'invoice:' || p_invoice, p_hash => v_hash, p_stripe_ref => p_ref,
                          p_description => 'plan change',
                          p_metadata => p_metadata || jsonb_build_object('allowance', p_allowance,
                                                                         'previous_allowance', v_best),
                          p_source => 'plan_change');
  return private.stripe_result('applied', 'allowance_raised', p_account_id, private.result(v_entry, false),
                               p_touched);
end
$$;

create or replace function private.stripe_plan_decrease(p_wallet public.credit_wallets, p_invoice text, p_credited bigint,
                                             p_touched text[])
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_granted bigint;
  v_paid bigint;
  v_target bigint;
  v_grant record;
  v_done bigint;
  v_take bigint;
  v_result jsonb;
  v_taken bigint := 0;
  v_pending bigint := 0;
  v_shortfall bigint := 0;
begin
  select coalesce(sum(t.promotional + t.subscription), 0), coalesce(sum((t.metadata ->> 'paid')::bigint), 0)
    into v_granted, v_paid
    from public.credit_transactions t
   where t.account_id = p_wallet.account_id and t.kind in ('promotion', 'plan_change') and t.origin = 'stripe'
     and t.period_start = p_wallet.period_start and t.metadata ? 'allowance'
     and (t.metadata ->> 'paid')::bigint > 0;
  if v_paid = 0 then
    return private.stripe_result('ignored', 'not_an_increase', p_wallet.account_id);
  end if;
  v_target := least(v_granted, floor(v_granted::numeric * p_credited / v_paid)::bigint);
  for v_grant in select t.stripe_ref, sum(t.promotional + t.subscription)::bigint as granted, max(t.seq) as seq
                   from public.credit_transactions t
                  where t.account_id = p_wallet.account_id and t.kind in ('promotion', 'plan_change')
                    and t.origin = 'stripe'
                    and t.period_start = p_wallet.period_start and t.metadata ? 'allowance'
                    and (t.metadata ->> 'paid')::bigint > 0
                  group by t.stripe_ref order by max(t.seq) desc loop
    exit when v_taken + v_pending + v_shortfall >= v_target;
    -- Taken back so far, and claimed on active holds (as the clawback counts them).
    select coalesce(-sum(c.promotional + c.subscription + c.purchased), 0)
           + coalesce((select sum((e ->> 'amount')::bigint) from public.credit_holds h
                         cross join lateral jsonb_array_elements(h.claims) e
                        where h.account_id = p_wallet.account_id and h.status = 'active'
                          and e ->> 'stripe_ref' = v_grant.stripe_ref), 0)
      into v_done
      from public.credit_transactions c
     where c.account_id = p_wallet.account_id and c.stripe_ref = v_grant.stripe_ref
       and c.kind in ('clawback', 'reinstate');
    v_take := least(v_grant.granted - v_done, v_target - v_taken - v_pending - v_shortfall);
    continue when v_take <= 0;
    v_result := private.clawback(v_grant.stripe_ref, 'decrease:' || p_invoice || ':' || v_grant.stripe_ref,
                                 (v_done + v_take)::integer, 'plan decrease', 'stripe');
    v_taken := v_taken + (v_result ->> 'clawed_back')::bigint;
    v_pending := v_pending + (v_result ->> 'pending')::bigint;
    v_shortfall := v_shortfall + (v_result ->> 'shortfall')::bigint;
  end loop;
  return private.stripe_result('applied', 'allowance_lowered', p_wallet.account_id,
                               jsonb_build_object('clawed_back', v_taken, 'pending', v_pending,
                                                  'shortfall', v_shortfall), p_touched);
end
$$;

create or replace function private.delete_account_books() returns trigger
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
begin
  delete from public.credit_transactions t where t.account_id = old.id;
  delete from private.grants g where g.account_id = old.id;
  return old;
end
$$;

create or replace function private.open_account(p_user_id uuid, p_tenant_id uuid) returns uuid
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_plan public.credit_plans;
  v_account_id uuid;
  v_month record := private.month_of(now());
  v_grant uuid := private.uuid_v7();
begin
  select * into v_plan from public.credit_plans p where p.id = 'free';
  insert into public.credit_accounts (user_id, tenant_id, plan_id)
  values (p_user_id, p_tenant_id, 'free')
  returning id into v_account_id;
  insert into public.credit_wallets (account_id, period_start, period_end, period_grant)
  values (v_account_id, v_month.period_start, v_month.period_end, v_grant);
  perform private.post(v_account_id, 'grant', p_subscription => coalesce(v_plan.monthly_credits, 0),
                       p_origin => 'system', p_metadata => '{"reason": "signup"}'::jsonb, p_id => v_grant);
  if p_user_id is not null then
    perform private.grant_signup_bonus(v_account_id, p_user_id);
  end if;
  return v_account_id;
end
$$;

create or replace function private.expire_subscription_credits(p_account_id uuid, p_idempotency_key text) returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_hash uuid := private.request_hash('expire', '[]'::jsonb);
  v_wallet public.credit_wallets;
  v_entry public.credit_transactions;
begin
  perform private.require_service();
  perform private.authorize(p_account_id, true);
  perform private.check_key(p_idempotency_key);
  v_wallet := private.lock_wallet(p_account_id);
  v_entry := private.find_key(p_account_id, p_idempotency_key, v_hash);
  if v_entry.id is not null then
    return private.result(v_entry, true);
  end if;
  -- Held allowance expires when its hold ends uncaptured (the epoch moved on).
  update public.credit_wallets w set sub_epoch = w.sub_epoch + 1, period_grant = null
   where w.account_id = p_account_id;
  v_entry := private.post(p_account_id, 'expire',
                          p_subscription => -(v_wallet.subscription - v_wallet.held_subscription),
                          p_key => p_idempotency_key, p_hash => v_hash);
  return private.result(v_entry, false);
end
$$;

create or replace function private.refund_credits(p_transaction_id uuid, p_idempotency_key text, p_amount integer default null,
                                      p_reason text default null) returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_spend public.credit_transactions;
  v_hash uuid;
  v_entry public.credit_transactions;
  v_refundable bigint;
  v_done bigint;
  v_amount bigint;
begin
  perform private.require_service();
  perform private.check_key(p_idempotency_key);
  perform private.check_text('p_reason', p_reason, 'reason');
  if p_amount is not null then
    perform private.check_amount('p_amount', p_amount);
  end if;
  select * into v_spend from public.credit_transactions t where t.id = p_transaction_id and t.kind = 'spend';
  if not found then
    perform private.fail('PT404', 'transaction_not_found');
  end if;
  v_hash := private.request_hash('refund', jsonb_build_array(p_transaction_id, p_amount, p_reason));
  perform private.lock_wallet(v_spend.account_id);
  v_entry := private.find_key(v_spend.account_id, p_idempotency_key, v_hash);
  if v_entry.id is not null then
    return private.result(v_entry, true);
  end if;
  -- Under the wallet's lock: refunds of one spend queue here.
  select coalesce(sum(r.purchased), 0) into v_done
    from public.credit_transactions r where r.ref_id = p_transaction_id and r.kind = 'refund';
  v_refundable := -(v_spend.promotional + v_spend.subscription + v_spend.purchased) - v_done;
  v_amount := coalesce(p_amount, v_refundable);
  if v_amount < 1 then
    perform private.invalid('p_transaction_id', 'nothing left to refund');
  end if;
  if v_amount > v_refundable then
    perform private.fail('22023', 'invalid_argument',
      jsonb_build_object('argument', 'p_amount', 'reason', 'exceeds what is left to refund',
                         'refundable', v_refundable));
  end if;
  v_entry := private.post(v_spend.account_id, 'refund', p_purchased => v_amount, p_key => p_idempotency_key,
                          p_hash => v_hash, p_ref_id => p_transaction_id, p_description => p_reason,
                          p_metadata => jsonb_build_object('refund_of', p_transaction_id, 'reason', p_reason));
  -- Its grants keep where the spend's credits came from (a later clawback of
  -- that payment reaches them): earlier refunds of the spend gave back its
  -- first credits, this one the next.
  insert into private.grants (id, account_id, pool, source, stripe_ref, transaction_id, granted, remaining, carried)
  select private.uuid_v7(), v_spend.account_id, 'purchased', p.source, p.stripe_ref, v_entry.id, p.amount,
         p.amount, true
    from (select s.source, s.stripe_ref,
                 greatest(0, least(s.cum, v_done + v_amount) - greatest(s.cum - s.amount, v_done))::bigint as amount
            from (select s.source, s.stripe_ref, s.amount, sum(s.amount) over (order by s.ord) as cum
                    from private.spend_sources(v_spend) with ordinality s(source, stripe_ref, amount, ord)) s) p
   where p.amount > 0;
  return private.result(v_entry, false);
end
$$;

revoke all on function private.grant_source(private.entry_kind, private.entry_origin, text),
  private.grant_attribution(public.credit_wallets, text),
  private.materialize_grants(public.credit_wallets, text),
  private.take_front(public.credit_wallets, text, bigint),
  private.end_hold(public.credit_holds, bigint, jsonb, uuid),
  private.add_promotion(public.credit_wallets, private.entry_kind, bigint, timestamptz, private.entry_origin,
                        text, uuid, text, text, jsonb, uuid, text),
  private.post(uuid, private.entry_kind, bigint, bigint, bigint, bigint, bigint, bigint, private.entry_origin,
               text, uuid, uuid, text, text, jsonb, uuid, timestamptz, timestamptz, text, text, integer, integer,
               uuid, jsonb, text)
  from public;
revoke all on function private.spend_sources(public.credit_transactions) from public, anon, authenticated, service_role;
-- credit_balances and credit_grants compute as their reader.
grant execute on function private.grant_attribution(public.credit_wallets, text) to authenticated, service_role;

-- ---------------------------------------------------------------------------
-- Existing balances become grants.
-- ---------------------------------------------------------------------------

-- Promotional grants keep their rows and ids; their source comes from the row that granted them.
insert into private.grants (id, account_id, pool, source, stripe_ref, transaction_id, granted, expires_at, remaining,
                            created_at, carried)
select p.id, p.account_id, 'promotional',
       case when t.kind = 'rollover' then 'rollover'
            when t.metadata ->> 'reason' = 'signup_bonus' then 'signup_bonus'
            when t.origin = 'stripe' and t.metadata ? 'allowance' then 'plan_change'
            else 'promotion' end,
       t.stripe_ref, t.id, p.amount, p.expires_at, p.remaining, p.created_at, t.kind = 'rollover'
  from public.credit_promotions p
  left join public.credit_transactions t on t.id = p.id and t.account_id = p.account_id;

-- Every earlier arrival of subscription or purchased credits (and every
-- payment's renewal, even of 0 credits) is a grant. A subscription grant is
-- live when it belongs to the account's current period and no explicit
-- expiry followed it; its stored remaining is an upper bound that the next
-- attribution trims (what spends took is attributed lazily).
insert into private.grants (id, account_id, pool, source, stripe_ref, transaction_id, granted, expires_at, epoch,
                            remaining, created_at)
select private.uuid_v7(), t.account_id, v.pool, private.grant_source(t.kind, t.origin, t.stripe_ref), t.stripe_ref,
       t.id, v.amount,
       case when v.pool = 'subscription' then t.period_end end,
       case when v.pool = 'subscription' then case when l.live then w.sub_epoch else w.sub_epoch - 1 end end,
       case when v.pool = 'purchased' or l.live then v.amount else 0 end,
       t.created_at
  from public.credit_transactions t
  join public.credit_wallets w on w.account_id = t.account_id
 cross join lateral (values ('subscription', t.subscription), ('purchased', t.purchased)) v(pool, amount)
 cross join lateral (
   select t.period_start is not distinct from w.period_start
          and not exists (select 1 from public.credit_transactions x
                           where x.account_id = t.account_id and x.kind = 'expire' and x.origin = 'api'
                             and x.seq > t.seq) as live) l
 where t.kind in ('purchase', 'grant', 'adjustment', 'refund')
   and (v.amount > 0 or (t.kind = 'grant' and v.pool = 'subscription' and t.stripe_ref is not null));

-- What clawbacks took and won disputes gave back of a payment leaves or
-- rejoins its newest grant in that pool.
with net as (
  select t.account_id, t.stripe_ref, v.pool, sum(v.amount)::bigint as amount
    from public.credit_transactions t
   cross join lateral (values ('subscription', t.subscription), ('purchased', t.purchased)) v(pool, amount)
   where t.kind in ('clawback', 'reinstate') and t.stripe_ref is not null and v.amount <> 0
   group by 1, 2, 3
), target as (
  select distinct on (g.account_id, g.stripe_ref, g.pool) g.id, n.amount
    from private.grants g
    join net n on n.account_id = g.account_id and n.stripe_ref = g.stripe_ref and n.pool = g.pool
   where g.pool <> 'promotional' and g.remaining > 0
   order by g.account_id, g.stripe_ref, g.pool, g.id desc
)
update private.grants g set remaining = greatest(0, g.remaining + t.amount) from target t where g.id = t.id;

-- Credits no recorded arrival covers (given back by a won dispute, or older
-- than the ledger's sources) become one adjustment grant per pool.
insert into private.grants (id, account_id, pool, source, granted, expires_at, epoch, remaining)
select private.uuid_v7(), w.account_id, v.pool, 'adjustment', v.short,
       case when v.pool = 'subscription' then w.period_end end,
       case when v.pool = 'subscription' then w.sub_epoch end, v.short
  from public.credit_wallets w
 cross join lateral (values
   ('subscription', w.subscription
                    - (select coalesce(sum(h.subscription), 0) from public.credit_holds h
                        where h.account_id = w.account_id and h.status = 'active' and h.sub_epoch <> w.sub_epoch)
                    - (select coalesce(sum(g.remaining), 0) from private.grants g
                        where g.account_id = w.account_id and g.pool = 'subscription' and g.epoch = w.sub_epoch)),
   ('purchased', w.purchased - (select coalesce(sum(g.remaining), 0) from private.grants g
                                 where g.account_id = w.account_id and g.pool = 'purchased'))) v(pool, short)
 where v.short > 0;

-- Holds active now name the grants they reserve, as if each had just taken
-- the front of its pools in turn (subscription credits of an ended period
-- belong to no live grant; a hold a clawback already claims keeps its
-- claims as they were, of no grant).
do $$
declare
  v_wallet public.credit_wallets;
  v_hold public.credit_holds;
  v_parts jsonb;
begin
  for v_wallet in select w.* from public.credit_wallets w
                   where exists (select 1 from public.credit_holds h
                                  where h.account_id = w.account_id and h.status = 'active'
                                    and h.subscription + h.purchased > 0)
                   order by w.account_id loop
    select v_wallet.held_subscription
             - coalesce(sum(h.subscription) filter (where h.sub_epoch = v_wallet.sub_epoch), 0),
           v_wallet.held_purchased - coalesce(sum(h.purchased), 0)
      into v_wallet.held_subscription, v_wallet.held_purchased
      from public.credit_holds h
     where h.account_id = v_wallet.account_id and h.status = 'active'
       and not h.claims @> '[{"pool": "subscription"}]' and not h.claims @> '[{"pool": "purchased"}]';
    for v_hold in select h.* from public.credit_holds h
                   where h.account_id = v_wallet.account_id and h.status = 'active'
                     and not h.claims @> '[{"pool": "subscription"}]' and not h.claims @> '[{"pool": "purchased"}]'
                   order by h.created_at, h.id loop
      v_parts := '[]'::jsonb;
      if v_hold.subscription > 0 and v_hold.sub_epoch = v_wallet.sub_epoch then
        v_parts := v_parts || private.take_front(v_wallet, 'subscription', v_hold.subscription);
        v_wallet.held_subscription := v_wallet.held_subscription + v_hold.subscription;
      end if;
      if v_hold.purchased > 0 then
        v_parts := v_parts || private.take_front(v_wallet, 'purchased', v_hold.purchased);
        v_wallet.held_purchased := v_wallet.held_purchased + v_hold.purchased;
      end if;
      update public.credit_holds h set parts = h.parts || v_parts where h.id = v_hold.id;
    end loop;
  end loop;
end
$$;

drop table public.credit_promotions;

-- Plan changes count in the period's allowance.
create or replace view public.credit_pool_usage with (security_invoker = true) as
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

-- What is left of every grant now, as its reader may see it (as reads see
-- balances: nothing lapsed counted): the free credits attributed to it, plus
-- what active holds reserve of it (a promotional grant past its date has
-- only those: its free credits expired);
-- calendar allowances come from their ledger rows.
create view public.credit_grants with (security_invoker = true) as
select g.id as grant_id, g.account_id, g.pool, g.source, g.stripe_ref, g.granted,
       (case when g.pool = 'promotional' and g.expires_at <= now() then 0 else coalesce(a.attributed, 0) end
        + coalesce((select sum(x.amount) from (
                      select (e ->> 'a')::bigint as amount from public.credit_holds h
                       cross join lateral jsonb_array_elements(h.parts) e
                       where h.account_id = g.account_id and h.status = 'active' and h.expires_at > now()
                         and (e ->> 'g')::uuid = g.id
                      union all
                      -- A lapsed hold's credits as its end will leave them (current_wallet's rule).
                      select f.f_amount from public.credit_holds h
                        join public.credit_wallets hw on hw.account_id = h.account_id
                       cross join lateral private.hold_fates(h, 0, hw.sub_epoch, now()) f
                       where h.account_id = g.account_id and h.status = 'active' and h.expires_at <= now()
                         and f.f_fate = 'free' and f.f_grant = g.id) x), 0))::bigint as remaining,
       g.expires_at, g.created_at
  from (select p.id, p.account_id, p.pool, p.source, p.stripe_ref, p.granted, p.expires_at, p.created_at
          from private.grants p
        union all
        -- Calendar allowances: the current one, and earlier ones active holds still reserve.
        select t.id, t.account_id, 'subscription', 'reset', null, t.subscription, t.period_end, t.created_at
          from public.credit_wallets w
         cross join lateral (select w.period_grant as id where w.period_grant is not null
                             union
                             select (e ->> 'g')::uuid from public.credit_holds h
                              cross join lateral jsonb_array_elements(h.parts) e
                              where h.account_id = w.account_id and h.status = 'active'
                                and e ->> 'p' = 'subscription') v
          join public.credit_transactions t on t.id = v.id and t.account_id = w.account_id and t.kind = 'grant'
         where not exists (select 1 from private.grants x where x.id = t.id)) g
  left join (select w.account_id, a.id, a.attributed
               from public.credit_wallets w
              cross join lateral (values ('promotional'), ('subscription'), ('purchased')) p(pool)
              cross join lateral private.grant_attribution(w, p.pool) a) a
    on a.account_id = g.account_id and a.id = g.id;
comment on view public.credit_grants is
  'Every arrival of credits (pool, source, Stripe reference, amount, expiry) and what is left of it now.';
revoke all on public.credit_grants from anon, authenticated, service_role;
grant select on public.credit_grants to authenticated, service_role;
