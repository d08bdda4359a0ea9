-- Holds priced from tokens with an overage policy, debt, hold extensions,
-- cost estimates and spend limits (contract version 3).
--
-- * reserve_credits and capture_hold take their v3 arguments: the v2
--   signatures are dropped (public and private) so that a call naming only
--   v2 arguments resolves to the v3 function through its defaults.
-- * Debt is a ledger pool of its own (credit_transactions.debt/debt_after,
--   credit_wallets.debt); credits that arrive pay it first.
-- * Spend limits: private.spend_limits, per-spender usage counted only for
--   accounts that have limits (credit_wallets.limited), the
--   credit_spend_limits view; a plain member of a tenant spends only under a
--   limit and reads only the ledger rows of their own spends.
-- * The usage log records the license key that spent and the price charged.

alter table public.credit_accounts
  add column overdraft_limit integer not null default 0 check (overdraft_limit between 0 and 1000000000);
grant update (plan_id, overdraft_limit) on public.credit_accounts to service_role;

alter table public.credit_wallets
  add column debt private.credits,
  add column limited boolean not null default false;
create index credit_wallets_attention_idx on public.credit_wallets (account_id) where debt > 0 or limited;

alter table public.credit_transactions
  add column debt bigint not null default 0,
  add column debt_after bigint not null default 0,
  add column license_key_id uuid,
  add column price jsonb;

alter table public.credit_holds
  add column actor_id uuid,
  add column overage text not null default 'reject' check (overage in ('reject', 'if_available', 'overdraft')),
  add column price jsonb,
  add column input_tokens integer,
  add column output_tokens integer,
  add column model text,
  add column extensions integer not null default 0;
-- Holds made before: their maker is the reserve's actor.
update public.credit_holds h set actor_id = t.actor_id
  from public.credit_transactions t
 where t.account_id = h.account_id and t.id = h.transaction_id and h.status = 'active';

alter type private.balance add attribute debt bigint;

drop policy credit_transactions_read on public.credit_transactions;

-- The v2 signatures (and private helpers whose arguments changed).
drop function public.reserve_credits(uuid, text, integer, text, integer, jsonb);
drop function private.reserve_credits(uuid, text, integer, text, integer, jsonb);
drop function public.capture_hold(uuid, integer, jsonb);
drop function private.capture_hold(uuid, integer, jsonb);
drop function private.settle_hold(uuid, integer, jsonb, boolean);
drop function private.end_hold(public.credit_holds, bigint, jsonb, uuid);
drop function private.post(uuid, private.entry_kind, bigint, bigint, bigint, bigint, bigint, bigint,
                           private.entry_origin, text, uuid, uuid, text, text, jsonb, uuid, timestamptz, timestamptz,
                           text, text, integer, integer, uuid, jsonb, text);
drop function private.deduct_credits(uuid, text, integer, text, text, integer, integer, jsonb);
drop function private.authorize(uuid, boolean);
drop function private.license_account(text);

create function private.managed_account_ids() returns setof uuid
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$
  select a.id from public.credit_accounts a where a.user_id = (select auth.uid())
  union all
  select a.id from public.credit_accounts a
    join public.tenant_members m on m.tenant_id = a.tenant_id
   where m.user_id = (select auth.uid()) and m.role in ('owner', 'admin')
$$;

create function private.authorize(p_account_id uuid, p_write boolean, p_spend boolean default false)
returns uuid
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_uid uuid;
  v_user_id uuid;
  v_tenant_id uuid;
  v_role text;
begin
  if p_account_id is null then
    perform private.invalid('p_account_id', 'required');
  end if;
  if private.is_service() then
    if not exists (select 1 from public.credit_accounts a where a.id = p_account_id) then
      perform private.fail('PT404', 'account_not_found');
    end if;
    return null;
  end if;
  v_uid := auth.uid();
  if v_uid is null or current_setting('role', true) <> 'authenticated' then
    perform private.fail('PT403', 'forbidden');
  end if;
  select a.user_id, a.tenant_id into v_user_id, v_tenant_id
    from public.credit_accounts a where a.id = p_account_id;
  if not found then
    perform private.fail('PT404', 'account_not_found');
  end if;
  if v_user_id = v_uid then
    return v_uid;
  end if;
  if v_tenant_id is not null then
    select m.role into v_role from public.tenant_members m
     where m.tenant_id = v_tenant_id and m.user_id = v_uid;
    if v_role in ('owner', 'admin') or (v_role is not null and not p_write) then
      return v_uid;
    end if;
    -- A plain member spends only under a limit (their own or the default member limit).
    if p_spend and v_role = 'member' and exists (select 1 from private.spend_limits l
                                      where l.account_id = p_account_id
                                        and (l.subject = 'default_member'
                                             or (l.subject = 'member' and l.subject_id = v_uid))) then
      return v_uid;
    end if;
  end if;
  if not p_write and private.is_super_admin() then
    return v_uid;
  end if;
  perform private.fail('PT403', 'forbidden');
  return null;
end
$$;

create or replace function private.available(p_wallet public.credit_wallets) returns bigint
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
begin
  return greatest(0, p_wallet.promotional - p_wallet.held_promotional
                     + p_wallet.subscription - p_wallet.held_subscription
                     + p_wallet.purchased - p_wallet.held_purchased - p_wallet.debt);
end
$$;

create or replace function private.balance_json(p_wallet public.credit_wallets) returns jsonb
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

create or replace function private.result(p_entry public.credit_transactions, p_replayed boolean) returns jsonb
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
      next_expiry_amount, next_expiry_at, ref_id, stripe_ref, metadata, debt_after)
    select e.id, c.account_id, e.kind, e.origin, e.key, e.hash, e.d_promo, e.d_sub, 0,
           n.promotional, e.sub_after, n.purchased,
           n.held_promotional + n.held_subscription + n.held_purchased, e.pstart, e.pend,
           (private.next_expiry(n) ->> 'amount')::bigint, (private.next_expiry(n) ->> 'at')::timestamptz,
           e.ref_id,
           case when e.ord = 1 then c.roll_ref else p_stripe_ref end,
           coalesce(p_metadata, '{}'::jsonb), n.debt
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

create or replace function private.add_purchased(p_account_id uuid, p_amount integer, p_key text, p_stripe_ref text,
                                      p_description text, p_metadata jsonb, p_origin private.entry_origin)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_hash uuid;
  v_entry public.credit_transactions;
begin
  perform private.authorize(p_account_id, true);
  perform private.check_amount('p_amount', p_amount);
  perform private.check_key(p_key);
  perform private.check_text('p_stripe_ref', p_stripe_ref, 'stripe_ref');
  perform private.check_text('p_description', p_description, 'description');
  perform private.check_metadata(p_metadata);
  v_hash := private.request_hash('purchase', jsonb_build_array(p_amount, p_stripe_ref, p_description, p_metadata));
  perform private.lock_wallet(p_account_id);
  v_entry := private.find_key(p_account_id, p_key, v_hash, p_origin);
  if v_entry.id is null then
    v_entry := private.post(p_account_id, 'purchase', p_purchased => p_amount, p_origin => p_origin,
                            p_key => p_key, p_hash => v_hash, p_stripe_ref => p_stripe_ref,
                            p_description => p_description, p_metadata => p_metadata);
    perform private.settle_debt(p_account_id, v_entry.id);
    return private.result(v_entry, false);
  end if;
  return private.result(v_entry, true);
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
  v_entry := private.find_key(p_account_id, p_key, v_hash, p_origin);
  perform private.settle_debt(p_account_id, v_entry.id);
  -- A new billing period: spend limits count it from its start.
  perform private.recount_usage(w) from public.credit_wallets w where w.account_id = p_account_id and w.limited;
  return private.result(v_entry, false);
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
  perform private.settle_debt(p_account_id, v_entry.id);
  return private.result(v_entry, false);
end
$$;

-- Debt and spend limits: what an account owes, and what its spenders may spend.
--
-- Holds:
--   * private.settle_debt: credits that arrive pay the debt first, in the
--     transaction that brings them (a ledger row of type debt_payment naming
--     the grants that paid, so a clawback of their payment owes it again);
--   * private.spend_limits: caps per member, per member by default, or per
--     license key, and per day, week, month (UTC calendar) or billing period;
--   * private.spend_usage: for accounts with limits, what each spender (a
--     user or a license key) spent in its current windows and holds now;
--   * private.limit_room, private.check_limits, private.count_usage, the
--     accounting every spend path calls; set_spend_limit and the
--     credit_spend_limits view.
--
-- Rules:
--   * Debt is a pool of its own, never negative: an overdraft capture adds to
--     it, arriving credits (grants, purchases, renewals, refunds, releases)
--     pay it first; available = max(0, total - held - debt). After every
--     write an account owes nothing or has no free credits (reconcile checks).
--   * A spend counts in the window containing its time, net of its refunds;
--     an active hold counts as held in every window of its maker. All limits
--     that apply are checked; a member named by any limit falls under no
--     default_member limit; owners and admins only under limits naming them.
--   * Limits cost nothing to an account without any: the wallet caches
--     `limited`, and spends look at limits only when it is set. Setting a
--     limit counts the current windows again from the ledger, so spends made
--     before the limit existed count.

-- ---------------------------------------------------------------------------
-- Debt.
-- ---------------------------------------------------------------------------

-- The front p_amount free credits of a pool, per grant (read only).
create function private.front_parts(p_wallet public.credit_wallets, p_pool text, p_amount bigint)
returns table (grant_id uuid, amount bigint)
language sql stable
set search_path = pg_catalog, pg_temp
as $$
  select a.id, greatest(0, least(a.attributed, p_amount - (a.cum - a.attributed)))::bigint
    from (select a.id, a.attributed,
                 sum(a.attributed) over (order by a.expires_at nulls last, a.created_at, a.id) as cum
            from private.grant_attribution(p_wallet, p_pool) a) a
   where p_amount > 0 and least(a.attributed, p_amount - (a.cum - a.attributed)) > 0
$$;

-- Pay what the account owes from its free credits (the caller holds the
-- wallet's lock and has written the credits that arrived, p_ref: their row,
-- whose answer then shows the balance after the payment).
create function private.settle_debt(p_account_id uuid, p_ref uuid default null) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_wallet public.credit_wallets;
  v_pay bigint;
  v_split private.split;
  v_grants jsonb;
begin
  select * into v_wallet from public.credit_wallets w where w.account_id = p_account_id;
  if v_wallet.debt = 0 then
    return;
  end if;
  v_pay := least(v_wallet.debt, v_wallet.promotional - v_wallet.held_promotional
                                + v_wallet.subscription - v_wallet.held_subscription
                                + v_wallet.purchased - v_wallet.held_purchased);
  if v_pay <= 0 then
    return;
  end if;
  v_split := private.spend_split(v_wallet.promotional - v_wallet.held_promotional,
                                 v_wallet.subscription - v_wallet.held_subscription,
                                 v_wallet.purchased - v_wallet.held_purchased, v_pay);
  select coalesce(jsonb_object_agg(x.grant_id, x.amount), '{}'::jsonb) into v_grants
    from (select * from private.front_parts(v_wallet, 'promotional', v_split.promotional)
          union all
          select * from private.front_parts(v_wallet, 'subscription', v_split.subscription)
          union all
          select * from private.front_parts(v_wallet, 'purchased', v_split.purchased)) x;
  perform private.post(p_account_id, 'debt_payment', -v_split.promotional, -v_split.subscription,
                       -v_split.purchased, p_origin => 'system', p_debt => -v_pay, p_ref_id => p_ref,
                       p_period_start => case when v_split.subscription > 0 then v_wallet.period_start end,
                       p_metadata => '{"reason": "debt paid by arriving credits"}'::jsonb,
                       p_outcome => jsonb_build_object('grants', v_grants));
end
$$;

-- What a payment's grants paid of debt, less what clawbacks of it owed again.
create function private.debt_paid_by(p_account_id uuid, p_stripe_ref text) returns bigint
language sql stable
set search_path = pg_catalog, pg_temp
as $$
  select greatest(0,
    coalesce((select sum((e.value)::bigint) from public.credit_transactions t
               cross join lateral jsonb_each_text(t.outcome -> 'grants') e
               join private.grants g on g.id = e.key::uuid
              where t.account_id = p_account_id and t.kind = 'debt_payment' and g.stripe_ref = p_stripe_ref), 0)
    - coalesce((select sum(t.debt) from public.credit_transactions t
                 where t.account_id = p_account_id and t.stripe_ref = p_stripe_ref and t.kind = 'clawback'), 0)
    + coalesce((select -sum(t.debt) from public.credit_transactions t
                 where t.account_id = p_account_id and t.stripe_ref = p_stripe_ref and t.kind = 'reinstate'), 0))::bigint
$$;

revoke all on function private.front_parts(public.credit_wallets, text, bigint), private.settle_debt(uuid, uuid),
  private.debt_paid_by(uuid, text) from public, anon, authenticated, service_role;

-- ---------------------------------------------------------------------------
-- Spend limits.
-- ---------------------------------------------------------------------------

create table private.spend_limits (
  account_id uuid not null references public.credit_accounts (id) on delete cascade,
  subject text not null check (subject in ('member', 'default_member', 'license_key')),
  -- The member's user id or the key's id; null for default_member.
  subject_id uuid,
  period text not null check (period in ('day', 'week', 'month', 'billing_period')),
  credit_limit bigint not null check (credit_limit between 0 and 1000000000),
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint spend_limits_subject check ((subject = 'default_member') = (subject_id is null)),
  constraint spend_limits_one_per_period unique nulls not distinct (account_id, subject, subject_id, period)
);
comment on table private.spend_limits is 'Spend limits: a cap per spender and calendar window (set_spend_limit).';

-- Per spender of an account with limits: spent in the current windows, held now.
create table private.spend_usage (
  account_id uuid not null references public.credit_accounts (id) on delete cascade,
  -- A user id, or a license key's id.
  spender uuid not null,
  held bigint not null default 0 check (held >= 0),
  day_start timestamptz,
  day_spent bigint not null default 0,
  week_start timestamptz,
  week_spent bigint not null default 0,
  month_start timestamptz,
  month_spent bigint not null default 0,
  period_start timestamptz,
  period_spent bigint not null default 0,
  primary key (account_id, spender)
);
comment on table private.spend_usage is
  'What each spender of an account with spend limits spent in its current windows, and holds.';

alter table private.spend_limits enable row level security;
alter table private.spend_usage enable row level security;
revoke all on private.spend_limits, private.spend_usage from public, anon, authenticated, service_role;
grant select on private.spend_limits, private.spend_usage to authenticated, service_role;
-- Owners and admins read every limit of the account; a plain member those that apply to them.
create policy spend_limits_read on private.spend_limits for select to authenticated
  using (account_id in (select private.managed_account_ids())
         or (account_id in (select private.readable_account_ids())
             and (subject_id = (select auth.uid()) or subject = 'default_member')));
create policy spend_usage_read on private.spend_usage for select to authenticated
  using (account_id in (select private.managed_account_ids())
         or (spender = (select auth.uid()) and account_id in (select private.readable_account_ids())));

-- A window's bounds at p_at: a UTC calendar day, ISO week or month, or the wallet's period.
create function private.window_bounds(p_period text, p_wallet public.credit_wallets, p_at timestamptz,
                                      out w_start timestamptz, out w_end timestamptz)
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
  if p_period = 'billing_period' then
    w_start := p_wallet.period_start;
    w_end := p_wallet.period_end;
    return;
  end if;
  w_start := date_trunc(p_period, p_at at time zone 'UTC') at time zone 'UTC';
  w_end := (date_trunc(p_period, p_at at time zone 'UTC') + ('1 ' || p_period)::interval) at time zone 'UTC';
end
$$;

-- What a spender's holds past their expiry still count as held until the next write sweeps them.
create function private.lapsed_held(p_account_id uuid, p_spender uuid) returns bigint
language sql stable
set search_path = pg_catalog, pg_temp
as $$
  select coalesce(sum(h.amount), 0)::bigint from public.credit_holds h
   where h.account_id = p_account_id and h.status = 'active' and h.expires_at <= now()
     and h.actor_id = p_spender
$$;

-- A plain member of the account's tenant (the only ones default_member limits cover).
create function private.is_plain_member(p_account_id uuid, p_user uuid) returns boolean
language sql stable
set search_path = pg_catalog, pg_temp
as $$
  select exists (select 1 from public.credit_accounts a
                   join public.tenant_members m on m.tenant_id = a.tenant_id
                  where a.id = p_account_id and m.user_id = p_user and m.role = 'member')
$$;

-- The limits that apply to a spender now, each with what was spent and is
-- held in its window, tightest first.
create function private.applicable_limits(p_wallet public.credit_wallets, p_user uuid, p_key uuid)
returns table (credit_limit bigint, period text, spent bigint, held bigint, resets_at timestamptz, room bigint)
language sql stable
set search_path = pg_catalog, pg_temp
as $$
  select l.credit_limit, l.period, x.spent, x.held, b.w_end, l.credit_limit - x.spent - x.held
    from private.spend_limits l
    left join private.spend_usage u on u.account_id = l.account_id and u.spender = coalesce(p_key, p_user)
   cross join lateral private.window_bounds(l.period, p_wallet, now()) b
   cross join lateral (select coalesce(case l.period
                                         when 'day' then case when u.day_start = b.w_start then u.day_spent end
                                         when 'week' then case when u.week_start = b.w_start then u.week_spent end
                                         when 'month' then case when u.month_start = b.w_start then u.month_spent end
                                         else case when u.period_start = b.w_start then u.period_spent end
                                       end, 0) as spent,
                              -- Holds past their expiry are no longer held (a read before the sweep).
                              coalesce(u.held, 0)
                              - case when p_wallet.next_hold_expiry <= now()
                                     then private.lapsed_held(l.account_id, p_user) else 0 end as held) x
   where l.account_id = p_wallet.account_id
     and coalesce(p_key, p_user) is not null
     and case when p_key is not null then l.subject = 'license_key' and l.subject_id = p_key
              when l.subject = 'member' then l.subject_id = p_user
              when l.subject = 'default_member' then
                not exists (select 1 from private.spend_limits n
                             where n.account_id = l.account_id and n.subject = 'member' and n.subject_id = p_user)
                and private.is_plain_member(l.account_id, p_user)
              else false end
   order by 6, 5
$$;

-- What the spender may still spend (null: no limit applies).
create function private.limit_room(p_wallet public.credit_wallets, p_user uuid, p_key uuid) returns bigint
language sql stable
set search_path = pg_catalog, pg_temp
as $$
  select case when count(*) > 0 then greatest(0, min(l.room))::bigint end
    from private.applicable_limits(p_wallet, p_user, p_key) l
$$;

-- Refuse a spend of p_amount that would pass a limit (spend_limit_exceeded, the tightest limit's figures).
create function private.check_limits(p_wallet public.credit_wallets, p_user uuid, p_key uuid, p_amount bigint)
returns void
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_limit record;
begin
  select * into v_limit from private.applicable_limits(p_wallet, p_user, p_key) l limit 1;
  if found and v_limit.room < p_amount then
    perform private.fail('PT402', 'spend_limit_exceeded', jsonb_build_object(
      'limit', v_limit.credit_limit, 'spent', v_limit.spent, 'held', v_limit.held, 'required', p_amount,
      'period', v_limit.period, 'resets_at', v_limit.resets_at));
  end if;
end
$$;

-- Count a spender's spend (p_spent, at p_at: negative for a refund) and
-- change of what it holds, in an account with limits (the caller holds the
-- wallet's lock). A refund counts only in windows still current.
create function private.count_usage(p_wallet public.credit_wallets, p_spender uuid, p_spent bigint,
                                    p_held bigint, p_at timestamptz default null)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_at timestamptz;
  v_utc timestamp;
  v_day timestamptz;
  v_week timestamptz;
  v_month timestamptz;
  v_period timestamptz := p_wallet.period_start;
begin
  if p_spender is null or not p_wallet.limited then
    return;
  end if;
  -- The windows containing p_at (private.window_bounds, inline: this runs on every limited spend).
  v_at := coalesce(p_at, now());
  v_utc := v_at at time zone 'UTC';
  v_day := date_trunc('day', v_utc) at time zone 'UTC';
  v_week := date_trunc('week', v_utc) at time zone 'UTC';
  v_month := date_trunc('month', v_utc) at time zone 'UTC';
  if p_spent < 0 then
    -- A refund: it lowers what was spent in the windows its spend fell in, if they are current.
    update private.spend_usage u
       set day_spent = case when u.day_start = v_day then greatest(0, u.day_spent + p_spent) else u.day_spent end,
           week_spent = case when u.week_start = v_week then greatest(0, u.week_spent + p_spent)
                             else u.week_spent end,
           month_spent = case when u.month_start = v_month then greatest(0, u.month_spent + p_spent)
                              else u.month_spent end,
           period_spent = case when u.period_start = v_period and v_at >= p_wallet.period_start
                               then greatest(0, u.period_spent + p_spent) else u.period_spent end,
           held = greatest(0, u.held + p_held)
     where u.account_id = p_wallet.account_id and u.spender = p_spender;
    return;
  end if;
  insert into private.spend_usage as u (account_id, spender, held, day_start, day_spent, week_start, week_spent,
                                        month_start, month_spent, period_start, period_spent)
  values (p_wallet.account_id, p_spender, greatest(0, p_held), v_day, p_spent, v_week, p_spent, v_month, p_spent,
          v_period, p_spent)
  on conflict (account_id, spender) do update
    set held = greatest(0, u.held + p_held),
        day_spent = case when u.day_start = v_day then u.day_spent + p_spent else p_spent end,
        day_start = v_day,
        week_spent = case when u.week_start = v_week then u.week_spent + p_spent else p_spent end,
        week_start = v_week,
        month_spent = case when u.month_start = v_month then u.month_spent + p_spent else p_spent end,
        month_start = v_month,
        period_spent = case when u.period_start is not distinct from v_period then u.period_spent + p_spent
                            else p_spent end,
        period_start = v_period;
end
$$;

-- Count an account's current windows again from the ledger and its active
-- holds (when its limits change: spends made before a limit existed count).
create function private.recount_usage(p_wallet public.credit_wallets) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_day timestamptz := (private.window_bounds('day', p_wallet, now())).w_start;
  v_week timestamptz := (private.window_bounds('week', p_wallet, now())).w_start;
  v_month timestamptz := (private.window_bounds('month', p_wallet, now())).w_start;
  v_period timestamptz := p_wallet.period_start;
  v_from timestamptz := least(v_day, v_week, v_month, coalesce(p_wallet.period_start, v_month));
begin
  if not p_wallet.limited then
    return;
  end if;
  delete from private.spend_usage u where u.account_id = p_wallet.account_id;
  insert into private.spend_usage (account_id, spender, held, day_start, day_spent, week_start, week_spent,
                                   month_start, month_spent, period_start, period_spent)
  select p_wallet.account_id, s.spender, coalesce(max(h.held), 0),
         v_day, coalesce(sum(s.net) filter (where s.at >= v_day), 0),
         v_week, coalesce(sum(s.net) filter (where s.at >= v_week), 0),
         v_month, coalesce(sum(s.net) filter (where s.at >= v_month), 0),
         v_period, coalesce(sum(s.net) filter (where s.at >= v_period), 0)
    from (select coalesce(t.license_key_id, t.actor_id) as spender, t.created_at as at,
                 -(t.promotional + t.subscription + t.purchased) + t.debt
                 - coalesce((select sum(r.purchased) from public.credit_transactions r
                              where r.ref_id = t.id and r.account_id = t.account_id and r.kind = 'refund'), 0)
                   as net
            from public.credit_transactions t
           where t.account_id = p_wallet.account_id and t.kind = 'spend' and t.created_at >= v_from
             and coalesce(t.license_key_id, t.actor_id) is not null
          union all
          select h.actor_id, null, 0 from public.credit_holds h
           where h.account_id = p_wallet.account_id and h.status = 'active' and h.actor_id is not null) s
    left join (select h.actor_id, sum(h.amount) as held from public.credit_holds h
                where h.account_id = p_wallet.account_id and h.status = 'active' and h.actor_id is not null
                group by h.actor_id) h on h.actor_id = s.spender
   group by s.spender;
end
$$;

revoke all on function private.window_bounds(text, public.credit_wallets, timestamptz),
  private.lapsed_held(uuid, uuid),
  private.is_plain_member(uuid, uuid), private.applicable_limits(public.credit_wallets, uuid, uuid),
  private.limit_room(public.credit_wallets, uuid, uuid),
  private.check_limits(public.credit_wallets, uuid, uuid, bigint),
  private.count_usage(public.credit_wallets, uuid, bigint, bigint, timestamptz),
  private.recount_usage(public.credit_wallets)
  from public, anon, authenticated, service_role;

create function private.set_spend_limit(p_account_id uuid, p_subject text, p_limit integer, p_period text,
                                        p_subject_id uuid default null)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_actor uuid := private.authorize(p_account_id, true);
  v_account public.credit_accounts;
  v_target_role text;
  v_wallet public.credit_wallets;
  v_limit record;
  v_bounds record;
begin
  if p_subject is null or p_subject not in ('member', 'default_member', 'license_key') then
    perform private.invalid('p_subject', 'must be member, default_member or license_key');
  end if;
  if p_period is null or p_period not in ('day', 'week', 'month', 'billing_period') then
    perform private.invalid('p_period', 'must be day, week, month or billing_period');
  end if;
  if p_limit is not null and p_limit not between 0 and (private.limits() ->> 'amount')::integer then
    perform private.invalid('p_limit', format('must be 0 to %s, or null to remove the limit',
                                              private.limits() ->> 'amount'));
  end if;
  select * into v_account from public.credit_accounts a where a.id = p_account_id;
  if p_subject = 'default_member' then
    if p_subject_id is not null then
      perform private.invalid('p_subject_id', 'must be null for default_member');
    end if;
  elsif p_subject_id is null then
    perform private.invalid('p_subject_id', 'required for ' || p_subject);
  elsif p_subject = 'member' then
    v_target_role := case when v_account.user_id = p_subject_id then 'owner'
                          else (select m.role from public.tenant_members m
                                 where m.tenant_id = v_account.tenant_id and m.user_id = p_subject_id) end;
    if v_target_role is null then
      perform private.invalid('p_subject_id', 'not a member of the account');
    end if;
    -- Only an owner (or the service) limits an owner or an admin.
    if v_actor is not null and v_target_role in ('owner', 'admin') and v_account.user_id is distinct from v_actor
       and not exists (select 1 from public.tenant_members m
                        where m.tenant_id = v_account.tenant_id and m.user_id = v_actor and m.role = 'owner') then
      perform private.fail('PT403', 'forbidden');
    end if;
  elsif not exists (select 1 from public.credit_license_keys k
                     where k.id = p_subject_id and k.account_id = p_account_id) then
    perform private.invalid('p_subject_id', 'not a license key of the account');
  end if;

  v_wallet := private.lock_wallet(p_account_id);
  if p_limit is null then
    delete from private.spend_limits l
     where l.account_id = p_account_id and l.subject = p_subject and l.subject_id is not distinct from p_subject_id
       and l.period = p_period;
  else
    insert into private.spend_limits as l (account_id, subject, subject_id, period, credit_limit)
    values (p_account_id, p_subject, p_subject_id, p_period, p_limit)
    on conflict (account_id, subject, subject_id, period)
      do update set credit_limit = excluded.credit_limit, updated_at = now();
  end if;
  update public.credit_wallets w
     set limited = exists (select 1 from private.spend_limits l where l.account_id = p_account_id)
   where w.account_id = p_account_id
  returning w.* into v_wallet;
  if v_wallet.limited then
    perform private.recount_usage(v_wallet);
  else
    delete from private.spend_usage u where u.account_id = p_account_id;
  end if;

  v_bounds := private.window_bounds(p_period, v_wallet, now());
  select coalesce(case p_period when 'day' then case when u.day_start = v_bounds.w_start then u.day_spent end
                                when 'week' then case when u.week_start = v_bounds.w_start then u.week_spent end
                                when 'month' then case when u.month_start = v_bounds.w_start then u.month_spent end
                                else case when u.period_start = v_bounds.w_start then u.period_spent end end,
                  0) as spent, u.held
    into v_limit from private.spend_usage u where u.account_id = p_account_id and u.spender = p_subject_id;
  return jsonb_build_object(
    'account_id', p_account_id, 'subject', p_subject, 'subject_id', p_subject_id, 'limit', p_limit,
    'period', p_period,
    'spent', case when p_subject <> 'default_member' then coalesce(v_limit.spent, 0) end,
    'held', case when p_subject <> 'default_member' then coalesce(v_limit.held, 0) end,
    'resets_at', v_bounds.w_end);
end
$$;

create function public.set_spend_limit(p_account_id uuid, p_subject text, p_limit integer, p_period text,
                                       p_subject_id uuid default null)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.set_spend_limit(p_account_id, p_subject, p_limit, p_period, p_subject_id);
end
$$;
comment on function public.set_spend_limit(uuid, text, integer, text, uuid) is
  'Cap what a member, each plain member, or a license key may spend per day, week, month or billing period '
  '(null limit: remove). {account_id, subject, subject_id, limit, period, spent, held, resets_at}.';

revoke all on function private.set_spend_limit(uuid, text, integer, text, uuid),
  public.set_spend_limit(uuid, text, integer, text, uuid) from public, anon, authenticated, service_role;
grant execute on function private.set_spend_limit(uuid, text, integer, text, uuid),
  public.set_spend_limit(uuid, text, integer, text, uuid) to authenticated, service_role;

-- One row per limit and spender it covers (a default_member limit: one per
-- plain member it covers), with the spender's figures in its current window.
create view public.credit_spend_limits with (security_invoker = true) as
select l.account_id, l.subject, s.subject_id, l.credit_limit as "limit", l.period,
       coalesce(case l.period when 'day' then case when u.day_start = b.w_start then u.day_spent end
                              when 'week' then case when u.week_start = b.w_start then u.week_spent end
                              when 'month' then case when u.month_start = b.w_start then u.month_spent end
                              else case when u.period_start = b.w_start then u.period_spent end end, 0)::bigint
         as spent,
       (coalesce(u.held, 0) - private.lapsed_held(l.account_id, s.subject_id))::bigint as held,
       b.w_end as resets_at
  from private.spend_limits l
  join public.credit_wallets w on w.account_id = l.account_id
  join public.credit_accounts a on a.id = l.account_id
 cross join lateral (select l.subject_id where l.subject <> 'default_member'
                     union all
                     select m.user_id from public.tenant_members m
                      where l.subject = 'default_member' and m.tenant_id = a.tenant_id and m.role = 'member'
                        and not exists (select 1 from private.spend_limits n
                                         where n.account_id = l.account_id and n.subject = 'member'
                                           and n.subject_id = m.user_id)) s(subject_id)
  left join private.spend_usage u on u.account_id = l.account_id and u.spender = s.subject_id
 cross join lateral private.window_bounds(l.period, w, now()) b
 where l.account_id in (select private.managed_account_ids())
    or s.subject_id = (select auth.uid())
    or current_user not in ('authenticated', 'anon')
    or (select private.is_super_admin());
comment on view public.credit_spend_limits is
  'Spend limits and, per spender they cover, what was spent and is held in the current window.';
revoke all on public.credit_spend_limits from anon, authenticated, service_role;
grant select on public.credit_spend_limits to authenticated, service_role;
grant execute on function private.window_bounds(text, public.credit_wallets, timestamptz),
  private.lapsed_held(uuid, uuid) to authenticated, service_role;

create function private.end_hold(p_hold public.credit_holds, p_charge bigint,
                                 p_metadata jsonb default null, p_actor uuid default null,
                                 p_extra bigint default 0, p_usage jsonb default null)
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
  v_extra private.split := row(0, 0, 0)::private.split;
begin
  select * into v_wallet from public.credit_wallets w where w.account_id = p_hold.account_id;
  if p_extra > 0 then
    v_extra := private.spend_split(v_wallet.promotional - v_wallet.held_promotional,
                                   v_wallet.subscription - v_wallet.held_subscription,
                                   v_wallet.purchased - v_wallet.held_purchased, p_extra);
  end if;
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

  if v_sum.sp + v_sum.ss + v_sum.su + p_extra > 0 then
    v_spend := private.post(p_hold.account_id, 'spend', -v_sum.sp - v_extra.promotional,
                            -v_sum.ss - v_extra.subscription, -v_sum.su - v_extra.purchased,
                            -v_sum.sp, -v_sum.ss, -v_sum.su, p_origin => 'system', p_ref_id => p_hold.id,
                            p_metadata => p_metadata, p_actor => p_actor,
                            p_period_start => case when v_sum.ss > 0 then p_hold.period_start end,
                            p_period_end => case when v_sum.ss > 0 then p_hold.period_end end,
                            p_operation => p_hold.operation, p_model => p_usage ->> 'model',
                            p_input_tokens => (p_usage ->> 'input_tokens')::integer,
                            p_output_tokens => (p_usage ->> 'output_tokens')::integer,
                            p_price => p_hold.price,
                            p_outcome => case when p_extra > 0 then jsonb_build_object(
                                           'extra', jsonb_build_object('promotional', v_extra.promotional,
                                                                       'subscription', v_extra.subscription,
                                                                       'purchased', v_extra.purchased)) end);
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
  if v_wallet.limited then
    perform private.count_usage(v_wallet, p_hold.actor_id, p_charge + p_extra, -p_hold.amount);
  end if;
  if v_sum.fp + v_sum.fs + v_sum.fu > 0 then
    perform private.settle_debt(p_hold.account_id);
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

create function private.price_of(p_operation text) returns jsonb
language sql stable
set search_path = pg_catalog, pg_temp
as $$
  select jsonb_build_object('credits', p.credits, 'credits_per_1k_input_tokens', p.credits_per_1k_input_tokens,
                            'credits_per_1k_output_tokens', p.credits_per_1k_output_tokens)
    from public.credit_prices p where p.operation = p_operation
$$;

create function private.priced(p_price jsonb, p_input_tokens bigint, p_output_tokens bigint) returns bigint
language sql immutable
set search_path = pg_catalog, pg_temp
as $$
  select ceil((p_price ->> 'credits')::numeric
              + coalesce(p_input_tokens, 0) * (p_price ->> 'credits_per_1k_input_tokens')::numeric / 1000
              + coalesce(p_output_tokens, 0) * (p_price ->> 'credits_per_1k_output_tokens')::numeric / 1000)::bigint
$$;

create function private.max_output_tokens(p_price jsonb, p_input_tokens bigint, p_budget bigint) returns bigint
language sql immutable
set search_path = pg_catalog, pg_temp
as $$
  select case when p_price is null or (p_price ->> 'credits_per_1k_output_tokens')::numeric = 0 then null
              else least(greatest(0, floor((p_budget - (p_price ->> 'credits')::numeric
                                            - coalesce(p_input_tokens, 0)
                                              * (p_price ->> 'credits_per_1k_input_tokens')::numeric / 1000)
                                           * 1000 / (p_price ->> 'credits_per_1k_output_tokens')::numeric)),
                         (private.limits() ->> 'tokens')::bigint)::bigint end
$$;

create function private.reserve_credits(p_account_id uuid, p_idempotency_key text, p_amount integer,
                                        p_operation text, p_ttl_seconds integer, p_metadata jsonb,
                                        p_model text, p_input_tokens integer, p_output_tokens integer,
                                        p_overage text)
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
  v_price jsonb;
  v_room bigint;
begin
  v_actor := private.authorize(p_account_id, true, true);
  v_cost := private.spend_cost(p_idempotency_key, p_amount, p_operation, p_model, p_input_tokens,
                               p_output_tokens, p_metadata);
  if v_cost < 1 then
    perform private.invalid('p_operation', 'a hold must reserve at least 1 credit');
  end if;
  if p_ttl_seconds is null or p_ttl_seconds not between 1 and (private.limits() ->> 'ttl_seconds')::integer then
    perform private.invalid('p_ttl_seconds', format('must be 1 to %s seconds', private.limits() ->> 'ttl_seconds'));
  end if;
  if p_overage is null or p_overage not in ('reject', 'if_available', 'overdraft') then
    perform private.invalid('p_overage', 'must be reject, if_available or overdraft');
  end if;
  if p_overage = 'overdraft' and not private.is_service() then
    perform private.fail('PT403', 'forbidden', '{"reason": "only the service makes overdraft holds"}'::jsonb);
  end if;
  v_hash := private.request_hash('reserve', jsonb_build_array(p_amount, p_operation, p_ttl_seconds, p_metadata,
                                                              p_model, p_input_tokens, p_output_tokens,
                                                              p_overage));
  v_expires := now() + make_interval(secs => p_ttl_seconds);
  if p_operation is not null then
    v_price := private.price_of(p_operation);
  end if;

  v_wallet := private.lock_wallet(p_account_id);
  v_entry := private.find_key(p_account_id, p_idempotency_key, v_hash);
  if v_entry.id is not null then
    return private.result(v_entry, true);
  end if;
  perform private.check_hold_bounds(v_wallet);
  if v_wallet.limited then
    perform private.check_limits(v_wallet, v_actor, null, v_cost);
    v_room := private.limit_room(v_wallet, v_actor, null);
  end if;
  if private.available(v_wallet) < v_cost then
    if v_price is not null then
      perform private.fail('PT402', 'insufficient_credits', jsonb_build_object(
        'required', v_cost, 'available', private.available(v_wallet),
        'max_output_tokens', private.max_output_tokens(v_price, p_input_tokens,
                                                       least(private.available(v_wallet), v_room))));
    end if;
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
                                   metadata, actor_id, overage, price, input_tokens, output_tokens, model)
  values (v_hold, p_account_id, v_tx, v_cost, v_split.promotional, v_split.subscription, v_split.purchased,
          v_parts, v_wallet.sub_epoch, v_wallet.period_start, v_wallet.period_end, v_expires, p_operation,
          coalesce(p_metadata, '{}'::jsonb), v_actor, p_overage, v_price, p_input_tokens, p_output_tokens,
          p_model);
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
                          p_operation => p_operation, p_id => v_tx,
                          p_outcome => jsonb_build_object('amount', v_cost, 'expires_at', v_expires));
  if v_wallet.limited then
    perform private.count_usage(v_wallet, v_actor, 0, v_cost);
  end if;
  return private.result(v_entry, false);
end
$$;

create function public.reserve_credits(p_account_id uuid, p_idempotency_key text,
                                       p_amount integer default null,
                                       p_operation text default null, p_ttl_seconds integer default 900,
                                       p_metadata jsonb default '{}'::jsonb, p_model text default null,
                                       p_input_tokens integer default null, p_output_tokens integer default null,
                                       p_overage text default 'reject')
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.reserve_credits(coalesce(p_account_id, private.personal_account()), p_idempotency_key,
                                 p_amount, p_operation, p_ttl_seconds, p_metadata, p_model, p_input_tokens,
                                 p_output_tokens, p_overage);
end
$$;
comment on function public.reserve_credits(uuid, text, integer, text, integer, jsonb, text, integer, integer, text) is
  'Reserve credits for work in progress (an amount, or an operation priced from token estimates, the price '
  'fixed now); a null account is the caller''s own. {hold_id, account_id, amount, expires_at, overage, replayed, '
  'balance}.';

create or replace function private.hold_account(p_hold_id uuid) returns uuid
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_hold record;
  v_actor uuid;
begin
  if p_hold_id is null then
    perform private.invalid('p_hold_id', 'required');
  end if;
  select h.account_id, h.actor_id into v_hold from public.credit_holds h where h.id = p_hold_id;
  if not found then
    perform private.fail('PT404', 'hold_not_found');
  end if;
  v_actor := private.authorize(v_hold.account_id, true, true);
  if v_actor is not null and v_hold.actor_id is distinct from v_actor
     and private.is_plain_member(v_hold.account_id, v_actor) then
    perform private.fail('PT403', 'forbidden');
  end if;
  return v_hold.account_id;
end
$$;

create function private.settle_hold(p_hold_id uuid, p_amount integer, p_metadata jsonb, p_capture boolean,
                                    p_input_tokens integer default null, p_output_tokens integer default null,
                                    p_model text default null)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_account_id uuid := private.hold_account(p_hold_id);
  v_wallet public.credit_wallets;
  v_hold public.credit_holds;
  v_spend public.credit_transactions;
  v_overdraft public.credit_transactions;
  v_cost bigint := 0;
  v_over bigint := 0;
  v_room bigint;
  v_extra bigint := 0;
  v_debt bigint := 0;
  v_metadata jsonb;
  v_result jsonb;
begin
  v_wallet := private.lock_wallet(v_account_id);
  select * into v_hold from public.credit_holds h where h.id = p_hold_id for update;
  if v_hold.status = (case when p_capture then 'captured' else 'released' end) then
    return v_hold.result || '{"replayed": true}'::jsonb;
  end if;
  perform private.check_metadata(p_metadata);
  if v_hold.status <> 'active' then
    perform private.fail('PT409', 'hold_not_active', jsonb_build_object('status', v_hold.status));
  end if;
  if p_capture then
    if p_amount is not null and (p_input_tokens is not null or p_output_tokens is not null) then
      perform private.invalid('p_amount', 'give p_amount or token counts, not both');
    end if;
    if (p_input_tokens is not null or p_output_tokens is not null) and v_hold.price is null then
      perform private.invalid(case when p_input_tokens is not null then 'p_input_tokens' else 'p_output_tokens' end,
                              'the hold was not priced from an operation');
    end if;
    if p_input_tokens not between 0 and (private.limits() ->> 'tokens')::integer then
      perform private.invalid('p_input_tokens', format('must be 0 to %s', private.limits() ->> 'tokens'));
    end if;
    if p_output_tokens not between 0 and (private.limits() ->> 'tokens')::integer then
      perform private.invalid('p_output_tokens', format('must be 0 to %s', private.limits() ->> 'tokens'));
    end if;
    perform private.check_text('p_model', p_model, 'model');
    if p_amount is not null then
      perform private.check_amount('p_amount', p_amount);
      v_cost := p_amount;
    elsif p_input_tokens is not null or p_output_tokens is not null then
      -- A missing count is priced from the hold's estimate.
      v_cost := private.priced(v_hold.price, coalesce(p_input_tokens, v_hold.input_tokens),
                               coalesce(p_output_tokens, v_hold.output_tokens));
    else
      v_cost := v_hold.amount;
    end if;
    if v_cost > (private.limits() ->> 'amount')::bigint then
      perform private.invalid('p_amount', format('cost exceeds %s credits', private.limits() ->> 'amount'));
    end if;
    v_over := greatest(0, v_cost - v_hold.amount);
    if v_over > 0 and v_hold.overage = 'reject' then
      perform private.invalid(case when p_amount is not null then 'p_amount' else 'p_output_tokens' end,
                              format('costs %s, more than the held amount (%s); the hold''s overage policy is reject',
                                     v_cost, v_hold.amount));
    end if;
    v_metadata := v_hold.metadata || coalesce(p_metadata, '{}'::jsonb);
    perform private.check_metadata(v_metadata, 'p_metadata (merged with the hold''s)');
    if v_over > 0 then
      -- Above the hold: what is available, then (overdraft) debt up to the
      -- account's overdraft limit, all within the maker's spend limits.
      if v_wallet.limited then
        v_room := private.limit_room(v_wallet, v_hold.actor_id, null);
      end if;
      v_extra := least(v_over, private.available(v_wallet), coalesce(v_room, v_over));
      if v_hold.overage = 'overdraft' then
        v_debt := greatest(0, least(v_over - v_extra,
                                    (select a.overdraft_limit from public.credit_accounts a
                                      where a.id = v_account_id) - v_wallet.debt,
                                    coalesce(v_room, v_over) - v_extra));
      end if;
    end if;
  end if;
  v_spend := private.end_hold(v_hold, least(v_cost, v_hold.amount), v_metadata,
                              coalesce(v_hold.actor_id, private.actor()), v_extra,
                              jsonb_build_object('model', coalesce(p_model, v_hold.model),
                                                 'input_tokens', coalesce(p_input_tokens, v_hold.input_tokens),
                                                 'output_tokens', coalesce(p_output_tokens, v_hold.output_tokens)));
  if v_debt > 0 then
    v_overdraft := private.post(v_account_id, 'overdraft', p_origin => 'system', p_ref_id => p_hold_id,
                                p_debt => v_debt, p_actor => coalesce(v_hold.actor_id, private.actor()),
                                p_metadata => '{"reason": "capture above the hold (overdraft)"}'::jsonb);
    select * into v_wallet from public.credit_wallets w where w.account_id = v_account_id;
    if v_wallet.limited then
      perform private.count_usage(v_wallet, v_hold.actor_id, v_debt, 0);
    end if;
  end if;
  if p_capture then
    v_result := jsonb_build_object(
      'transaction_id', coalesce(v_spend.id, v_overdraft.id), 'hold_id', p_hold_id, 'requested', v_cost,
      'charged', least(v_cost, v_hold.amount) + v_extra + v_debt,
      'released', v_hold.amount - least(v_cost, v_hold.amount),
      'uncovered', v_cost - least(v_cost, v_hold.amount) - v_extra - v_debt, 'debt_added', v_debt,
      'from_promotional', coalesce(-v_spend.promotional, 0),
      'from_subscription', coalesce(-v_spend.subscription, 0),
      'from_purchased', coalesce(-v_spend.purchased, 0), 'replayed', false);
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

create function private.capture_hold(p_hold_id uuid, p_amount integer, p_metadata jsonb, p_input_tokens integer,
                                     p_output_tokens integer, p_model text)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.settle_hold(p_hold_id, p_amount, p_metadata, true, p_input_tokens, p_output_tokens, p_model);
end
$$;

create function public.capture_hold(p_hold_id uuid, p_amount integer default null,
                                    p_metadata jsonb default '{}'::jsonb, p_input_tokens integer default null,
                                    p_output_tokens integer default null, p_model text default null)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.capture_hold(p_hold_id, p_amount, p_metadata, p_input_tokens, p_output_tokens, p_model);
end
$$;
comment on function public.capture_hold(uuid, integer, jsonb, integer, integer, text) is
  'Charge the hold (an amount, the actual tokens at the hold''s price, or all of it) and release the rest; '
  'above the hold its overage policy applies.';

create or replace function private.release_hold(p_hold_id uuid)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.settle_hold(p_hold_id, null, null, false);
end
$$;

create function private.extend_hold(p_hold_id uuid, p_idempotency_key text, p_add_amount integer,
                                    p_ttl_seconds integer)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_account_id uuid := private.hold_account(p_hold_id);
  v_hash uuid;
  v_wallet public.credit_wallets;
  v_hold public.credit_holds;
  v_entry public.credit_transactions;
  v_split private.split := row(0, 0, 0)::private.split;
  v_parts jsonb := '[]'::jsonb;
  v_add bigint := coalesce(p_add_amount, 0);
  v_expires timestamptz;
begin
  perform private.check_key(p_idempotency_key);
  if v_add <> 0 then
    perform private.check_amount('p_add_amount', v_add);
  end if;
  if p_ttl_seconds is not null
     and p_ttl_seconds not between 1 and (private.limits() ->> 'ttl_seconds')::integer then
    perform private.invalid('p_ttl_seconds', format('must be 1 to %s seconds', private.limits() ->> 'ttl_seconds'));
  end if;
  if v_add = 0 and p_ttl_seconds is null then
    perform private.invalid('p_add_amount', 'give p_add_amount, p_ttl_seconds or both');
  end if;
  v_hash := private.request_hash('extend', jsonb_build_array(p_hold_id, v_add, p_ttl_seconds));
  v_wallet := private.lock_wallet(v_account_id);
  v_entry := private.find_key(v_account_id, p_idempotency_key, v_hash);
  if v_entry.id is not null then
    return private.result(v_entry, true);
  end if;
  select * into v_hold from public.credit_holds h where h.id = p_hold_id for update;
  if v_hold.status <> 'active' then
    perform private.fail('PT409', 'hold_not_active', jsonb_build_object('status', v_hold.status));
  end if;
  if v_hold.extensions >= 100 then
    perform private.fail('PT409', 'hold_extension_limit', '{"limit": 100}'::jsonb);
  end if;
  if v_add > 0 then
    if v_wallet.limited then
      perform private.check_limits(v_wallet, v_hold.actor_id, null, v_add);
    end if;
    if private.available(v_wallet) < v_add then
      perform private.insufficient(v_add, private.available(v_wallet));
    end if;
    v_split := private.spend_split(v_wallet.promotional - v_wallet.held_promotional,
                                   v_wallet.subscription - v_wallet.held_subscription,
                                   v_wallet.purchased - v_wallet.held_purchased, v_add);
    if v_split.subscription > 0 and v_hold.sub_epoch <> v_wallet.sub_epoch then
      -- Its subscription credits are of an earlier period: one hold keeps one period's.
      perform private.invalid('p_add_amount', 'the hold predates the current period; reserve a new hold');
    end if;
    if v_split.promotional > 0 then
      v_parts := private.take_front(v_wallet, 'promotional', v_split.promotional);
    end if;
    if v_split.subscription > 0 then
      v_parts := v_parts || private.take_front(v_wallet, 'subscription', v_split.subscription);
    end if;
    if v_split.purchased > 0 then
      v_parts := v_parts || private.take_front(v_wallet, 'purchased', v_split.purchased);
    end if;
    -- One part per grant (a clawback's claim on a grant is matched once), in the spending order.
    select coalesce(jsonb_agg(jsonb_strip_nulls(jsonb_build_object('p', x.p, 'g', x.g, 'a', x.a, 'e', x.e))
                              order by x.pool_order, x.e nulls last, x.first), '[]'::jsonb)
      into v_parts
      from (select e ->> 'p' as p, e ->> 'g' as g, sum((e ->> 'a')::bigint) as a, e -> 'e' as e,
                   min(o) as first,
                   case coalesce(e ->> 'p', 'promotional') when 'promotional' then 1
                                                            when 'subscription' then 2 else 3 end as pool_order
              from jsonb_array_elements(v_hold.parts || v_parts) with ordinality x(e, o)
             group by e ->> 'p', e ->> 'g', e -> 'e') x;
  end if;
  v_expires := case when p_ttl_seconds is not null then now() + make_interval(secs => p_ttl_seconds)
                    else v_hold.expires_at end;
  update public.credit_holds h
     set amount = h.amount + v_add, promotional = h.promotional + v_split.promotional,
         subscription = h.subscription + v_split.subscription, purchased = h.purchased + v_split.purchased,
         parts = case when v_add > 0 then v_parts else h.parts end, expires_at = v_expires,
         extensions = h.extensions + 1
   where h.id = p_hold_id;
  update public.credit_wallets w
     set next_hold_expiry = (select min(h.expires_at) from public.credit_holds h
                              where h.account_id = v_account_id and h.status = 'active')
   where w.account_id = v_account_id;
  v_entry := private.post(v_account_id, 'extend',
                          p_held_promotional => v_split.promotional, p_held_subscription => v_split.subscription,
                          p_held_purchased => v_split.purchased, p_key => p_idempotency_key, p_hash => v_hash,
                          p_ref_id => p_hold_id, p_actor => private.actor(),
                          p_outcome => jsonb_build_object('amount', v_hold.amount + v_add, 'expires_at', v_expires));
  if v_wallet.limited and v_add > 0 then
    perform private.count_usage(v_wallet, v_hold.actor_id, 0, v_add);
  end if;
  return private.result(v_entry, false);
end
$$;

create function public.extend_hold(p_hold_id uuid, p_idempotency_key text, p_add_amount integer default 0,
                                   p_ttl_seconds integer default null)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.extend_hold(p_hold_id, p_idempotency_key, p_add_amount, p_ttl_seconds);
end
$$;
comment on function public.extend_hold(uuid, text, integer, integer) is
  'Grow an active hold from available credits and/or move its expiry to now + ttl (at most 100 times). '
  '{hold_id, amount, expires_at, replayed, balance}.';

create function private.deduct_credits(p_account_id uuid, p_idempotency_key text, p_amount integer,
                                       p_operation text, p_model text, p_input_tokens integer,
                                       p_output_tokens integer, p_metadata jsonb,
                                       p_license_key_id uuid default null)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_actor uuid := private.authorize(p_account_id, true, true);
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
  if v_wallet.limited and coalesce(p_license_key_id, v_actor) is not null then
    -- Limits come after the replay (a replay always replays), before the credits.
    v_entry := private.find_key(p_account_id, p_idempotency_key, v_hash);
    if v_entry.id is not null then
      return private.result(v_entry, true);
    end if;
    perform private.check_limits(v_wallet, v_actor, p_license_key_id, v_cost);
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
    next_expiry_amount, next_expiry_at, operation, model, input_tokens, output_tokens, metadata, actor_id,
    debt_after, license_key_id, price)
  values (
    p_account_id, 'spend', p_idempotency_key, v_hash, -v_split.promotional, -v_split.subscription, -v_split.purchased,
    v_wallet.promotional, v_wallet.subscription, v_wallet.purchased,
    v_wallet.held_promotional + v_wallet.held_subscription + v_wallet.held_purchased,
    v_wallet.period_start, v_wallet.period_end, (v_expiry ->> 'amount')::bigint, (v_expiry ->> 'at')::timestamptz,
    p_operation, p_model, p_input_tokens, p_output_tokens, coalesce(p_metadata, '{}'::jsonb), v_actor,
    v_wallet.debt, p_license_key_id, case when p_operation is not null then private.price_of(p_operation) end)
  returning * into v_entry;
  update public.credit_wallets w
     set promotional = v_wallet.promotional, subscription = v_wallet.subscription,
         purchased = v_wallet.purchased, promo_front_left = v_wallet.promo_front_left
   where w.account_id = p_account_id;
  if v_wallet.limited then
    perform private.count_usage(v_wallet, coalesce(p_license_key_id, v_actor), v_cost, 0);
  end if;
  return private.result(v_entry, false);
end
$$;

create or replace function public.deduct_credits(p_account_id uuid, p_idempotency_key text,
                                      p_amount integer default null,
                                      p_operation text default null, p_model text default null,
                                      p_input_tokens integer default null,
                                      p_output_tokens integer default null,
                                      p_metadata jsonb default '{}'::jsonb)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.deduct_credits(coalesce(p_account_id, private.personal_account()), p_idempotency_key,
                                p_amount, p_operation, p_model, p_input_tokens, p_output_tokens, p_metadata, null);
end
$$;
comment on function public.deduct_credits(uuid, text, integer, text, text, integer, integer, jsonb) is
  'Spend now (promotional, then subscription, then purchased); a null account is the caller''s own. '
  '{transaction_id, account_id, charged, from_promotional, from_subscription, from_purchased, replayed, balance}.';

create function private.estimate_cost(p_account_id uuid, p_operation text, p_amount integer,
                                      p_input_tokens integer, p_output_tokens integer)
returns jsonb
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_account_id uuid := coalesce(p_account_id, private.personal_account());
  v_actor uuid := private.authorize(v_account_id, true, true);
  v_cost bigint := private.spend_cost('estimate', p_amount, p_operation, null, p_input_tokens, p_output_tokens,
                                      null);
  v_stored public.credit_wallets;
  v_wallet public.credit_wallets;
  v_available bigint;
  v_room bigint;
begin
  select * into v_stored from public.credit_wallets w where w.account_id = v_account_id;
  v_wallet := private.current_wallet(v_stored);
  v_available := private.available(v_wallet);
  if v_wallet.limited and v_actor is not null then
    -- As stored: its next hold expiry tells whether lapsed holds are still counted as held.
    v_room := private.limit_room(v_stored, v_actor, null);
  end if;
  return jsonb_build_object(
    'cost', v_cost, 'available', v_available,
    'affordable', v_cost <= v_available and v_cost <= coalesce(v_room, v_cost),
    'max_output_tokens', case when p_operation is not null
                              then private.max_output_tokens(private.price_of(p_operation), p_input_tokens,
                                                             least(v_available, v_room)) end,
    'limit_remaining', v_room);
end
$$;

create function public.estimate_cost(p_account_id uuid default null, p_operation text default null,
                                     p_amount integer default null, p_input_tokens integer default null,
                                     p_output_tokens integer default null)
returns jsonb
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.estimate_cost(p_account_id, p_operation, p_amount, p_input_tokens, p_output_tokens);
end
$$;
comment on function public.estimate_cost(uuid, text, integer, integer, integer) is
  'The cost of a spend, what is available, whether it is affordable, the most output tokens it covers and '
  'the caller''s remaining limit: {cost, available, affordable, max_output_tokens, limit_remaining}.';

create function private.license_key(p_license_key text) returns public.credit_license_keys
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_key public.credit_license_keys;
begin
  if p_license_key is null or length(p_license_key) not between 16 and 200 then
    perform private.fail('PT403', 'invalid_license_key');
  end if;
  select * into v_key from public.credit_license_keys k
   where k.key_hash = sha256(convert_to(p_license_key, 'UTF8'));
  if not found then
    perform private.fail('PT403', 'invalid_license_key');
  end if;
  if v_key.revoked_at is not null then
    perform private.fail('PT403', 'license_key_inactive');
  end if;
  if v_key.expires_at is not null and v_key.expires_at <= now() then
    perform private.fail('PT403', 'license_key_expired');
  end if;
  return v_key;
end
$$;

create or replace function private.deduct_credits_by_license(p_license_key text, p_idempotency_key text,
                                                 p_amount integer default null, p_operation text default null,
                                                 p_model text default null, p_input_tokens integer default null,
                                                 p_output_tokens integer default null,
                                                 p_metadata jsonb default '{}'::jsonb)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_key public.credit_license_keys;
begin
  perform private.require_service();
  v_key := private.license_key(p_license_key);
  return private.deduct_credits(v_key.account_id, p_idempotency_key, p_amount, p_operation, p_model,
                                p_input_tokens, p_output_tokens, p_metadata, v_key.id);
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
  v_wallet public.credit_wallets;
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
  v_wallet := private.lock_wallet(v_spend.account_id);
  v_entry := private.find_key(v_spend.account_id, p_idempotency_key, v_hash);
  if v_entry.id is not null then
    return private.result(v_entry, true);
  end if;
  -- Under the wallet's lock: refunds of one spend queue here.
  select coalesce(sum(r.purchased), 0) into v_done
    from public.credit_transactions r where r.ref_id = p_transaction_id and r.kind = 'refund';
  -- What the spend charged: its credits, and the debt a capture above its hold added.
  v_refundable := -(v_spend.promotional + v_spend.subscription + v_spend.purchased) - v_done
                  + coalesce((select sum(o.debt) from public.credit_transactions o
                               where v_spend.ref_id is not null and o.ref_id = v_spend.ref_id
                                 and o.account_id = v_spend.account_id and o.kind = 'overdraft'), 0);
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
  -- A spend counts against its spender's limits net of its refunds.
  if v_wallet.limited then
    perform private.count_usage(v_wallet, coalesce(v_spend.license_key_id, v_spend.actor_id), -v_amount, 0,
                                v_spend.created_at);
  end if;
  perform private.settle_debt(v_spend.account_id, v_entry.id);
  return private.result(v_entry, false);
end
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
  v_debt bigint := 0;
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
  select coalesce(-sum(t.promotional + t.subscription + t.purchased) + sum(t.debt), 0) into v_done
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
  -- Of what was spent, the part that paid debt is owed again (not a shortfall).
  if v_outstanding - v_total - v_claimed > 0 then
    v_debt := least(v_outstanding - v_total - v_claimed, private.debt_paid_by(v_grants.account_id, p_stripe_ref));
  end if;
  v_entry := private.post(
    v_grants.account_id, 'clawback',
    p_promotional => -(v_by_pool ->> 'promotional')::bigint,
    p_subscription => -(v_by_pool ->> 'subscription')::bigint,
    p_purchased => -(v_by_pool ->> 'purchased')::bigint,
    p_origin => p_origin, p_key => p_key, p_hash => v_hash, p_stripe_ref => p_stripe_ref,
    p_description => p_reason,
    p_metadata => jsonb_build_object('reason', p_reason), p_debt => v_debt,
    p_outcome => jsonb_build_object('pending', v_claimed,
                                    'shortfall', v_outstanding - v_total - v_claimed - v_debt,
                                    'grants', v_taken, 'debt', v_debt));
  return private.result(v_entry, false);
end
$$;

create or replace function private.admin_adjust_credits(p_account_id uuid, p_pool text, p_amount integer, p_reason text,
                                            p_idempotency_key text) returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_hash uuid;
  v_wallet public.credit_wallets;
  v_entry public.credit_transactions;
  v_free bigint;
begin
  perform private.require_service();
  perform private.authorize(p_account_id, true);
  if p_pool is null or p_pool not in ('promotional', 'subscription', 'purchased', 'debt') then
    perform private.invalid('p_pool', 'must be promotional, subscription, purchased or debt');
  end if;
  if p_amount is null or p_amount = 0 or abs(p_amount::bigint) > (private.limits() ->> 'amount')::bigint then
    perform private.invalid('p_amount', 'must be a non-zero whole number from -1000000000 to 1000000000');
  end if;
  if p_pool = 'debt' and p_amount > 0 then
    perform private.invalid('p_amount', 'debt is only written off (a negative amount)');
  end if;
  if p_pool = 'promotional' and p_amount > 0 then
    perform private.invalid('p_pool', 'promotional credits are granted with an expiry (grant_promotional_credits)');
  end if;
  if p_reason is null or length(btrim(p_reason)) = 0 then
    perform private.check_text('p_reason', null, 'reason', true);
  end if;
  perform private.check_text('p_reason', p_reason, 'reason', true);
  perform private.check_key(p_idempotency_key);
  v_hash := private.request_hash('adjust', jsonb_build_array(p_pool, p_amount, p_reason));
  v_wallet := private.lock_wallet(p_account_id);
  v_entry := private.find_key(p_account_id, p_idempotency_key, v_hash);
  if v_entry.id is not null then
    return private.result(v_entry, true);
  end if;
  v_free := case p_pool when 'promotional' then v_wallet.promotional - v_wallet.held_promotional
                        when 'subscription' then v_wallet.subscription - v_wallet.held_subscription
                        when 'debt' then v_wallet.debt
                        else v_wallet.purchased - v_wallet.held_purchased end;
  if p_amount < 0 and v_free < -p_amount then
    perform private.insufficient(-p_amount, v_free);
  end if;
  v_entry := private.post(p_account_id, 'adjustment',
                          p_promotional => case when p_pool = 'promotional' then p_amount else 0 end,
                          p_subscription => case when p_pool = 'subscription' then p_amount else 0 end,
                          p_purchased => case when p_pool = 'purchased' then p_amount else 0 end,
                          p_debt => case when p_pool = 'debt' then p_amount else 0 end,
                          p_key => p_idempotency_key, p_hash => v_hash, p_description => p_reason,
                          p_metadata => jsonb_build_object('reason', p_reason));
  if p_amount > 0 then
    perform private.settle_debt(p_account_id, v_entry.id);
  end if;
  return private.result(v_entry, false);
end
$$;

create or replace function private.reconcile_credit_balances() returns jsonb
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$
  with sums as (
    select t.account_id, sum(t.promotional)::bigint as promotional, sum(t.subscription)::bigint as subscription,
           sum(t.purchased)::bigint as purchased, sum(t.debt)::bigint as debt
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
                                ('debt', w.debt, s.debt),
                                -- Debt is paid as soon as there are free credits.
                                ('debt_unpaid', least(w.debt, w.promotional - w.held_promotional
                                                              + w.subscription - w.held_subscription
                                                              + w.purchased - w.held_purchased), 0),
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
  -- A renewal pays what the account owes, and spend limits count the new
  -- billing period from its start (rare: a partial index finds them).
  perform private.settle_debt(w.account_id), private.recount_usage(w) from public.credit_wallets w
   where (w.debt > 0 or w.limited) and w.account_id = any (coalesce(v_ids, '{}'));

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
    perform private.settle_debt(v_yearly.id);
    perform private.recount_usage(w) from public.credit_wallets w where w.account_id = v_yearly.id and w.limited;
    v_processed := v_processed + v_result.processed;
    v_expired := v_expired + v_result.expired;
    v_granted := v_granted + v_result.granted;
  end loop;

  return jsonb_build_object('processed', v_processed, 'expired', v_expired,
                            'granted', v_granted, 'next_after', v_last, 'done', v_scanned < p_batch_size);
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
  perform private.settle_debt(p_account_id, v_entry.id);
  return private.stripe_result('applied', 'allowance_raised', p_account_id, private.result(v_entry, false),
                               p_touched);
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
                          -- The debt this dispute made owed again is owed no more.
                          p_debt => -least(v_taken.debt, (select w.debt from public.credit_wallets w
                                                           where w.account_id = v_taken.account_id)),
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
  perform private.settle_debt(v_taken.account_id, v_entry.id);
  -- A won dispute of a yearly price's payment resumes its months.
  update public.credit_accounts a
     set stripe_paid_through = a.stripe_paid_until, updated_at = now()
   where a.id = v_taken.account_id and a.stripe_paid_ref = v_taken.stripe_ref and a.stripe_paid_scale > 0;
  return private.stripe_result('applied', 'reinstated', v_taken.account_id, private.result(v_entry, false));
end
$$;


revoke all on function private.is_service(), private.is_super_admin(), private.actor(),
  private.member_tenant_ids(), private.readable_account_ids(), private.managed_account_ids(),
  private.authorize(uuid, boolean, boolean),
  private.require_service() from public;
grant execute on function private.managed_account_ids() to authenticated, service_role;
revoke all on function
  private.post(uuid, private.entry_kind, bigint, bigint, bigint, bigint, bigint, bigint, private.entry_origin,
               text, uuid, uuid, text, text, jsonb, uuid, timestamptz, timestamptz, text, text, integer, integer,
               uuid, jsonb, text, bigint, uuid, jsonb)
  from public;
revoke all on function private.end_hold(public.credit_holds, bigint, jsonb, uuid, bigint, jsonb) from public;
revoke all on function private.price_of(text), private.priced(jsonb, bigint, bigint),
  private.max_output_tokens(jsonb, bigint, bigint) from public, anon, authenticated, service_role;

revoke all on function private.hold_account(uuid),
  private.settle_hold(uuid, integer, jsonb, boolean, integer, integer, text),
  public.reserve_credits(uuid, text, integer, text, integer, jsonb, text, integer, integer, text),
  public.capture_hold(uuid, integer, jsonb, integer, integer, text), public.release_hold(uuid),
  public.extend_hold(uuid, text, integer, integer)
  from public, anon, authenticated, service_role;
grant execute on function public.reserve_credits(uuid, text, integer, text, integer, jsonb, text, integer, integer, text),
  public.capture_hold(uuid, integer, jsonb, integer, integer, text), public.release_hold(uuid),
  public.extend_hold(uuid, text, integer, integer) to authenticated, service_role;
revoke all on function private.reserve_credits(uuid, text, integer, text, integer, jsonb, text, integer, integer, text)
  from public, anon, authenticated, service_role;
grant execute on function private.reserve_credits(uuid, text, integer, text, integer, jsonb, text, integer, integer, text)
  to authenticated, service_role;
revoke all on function private.capture_hold(uuid, integer, jsonb, integer, integer, text)
  from public, anon, authenticated, service_role;
grant execute on function private.capture_hold(uuid, integer, jsonb, integer, integer, text)
  to authenticated, service_role;
revoke all on function private.extend_hold(uuid, text, integer, integer) from public, anon, authenticated, service_role;
grant execute on function private.extend_hold(uuid, text, integer, integer) to authenticated, service_role;

revoke all on function private.deduct_credits(uuid, text, integer, text, text, integer, integer, jsonb, uuid)
  from public, anon, authenticated, service_role;
grant execute on function private.deduct_credits(uuid, text, integer, text, text, integer, integer, jsonb, uuid)
  to authenticated, service_role;
revoke all on function private.estimate_cost(uuid, text, integer, integer, integer),
  public.estimate_cost(uuid, text, integer, integer, integer) from public, anon, authenticated, service_role;
grant execute on function private.estimate_cost(uuid, text, integer, integer, integer),
  public.estimate_cost(uuid, text, integer, integer, integer) to authenticated, service_role;
revoke all on function private.license_key(text) from public, anon, authenticated, service_role;

-- A plain member of a tenant reads only the rows of their own spends.
create policy credit_transactions_read on public.credit_transactions for select to authenticated
  using (account_id in (select private.managed_account_ids())
         or (actor_id = (select auth.uid()) and account_id in (select private.readable_account_ids()))
         or (select private.is_super_admin()));

create or replace view public.credit_ledger with (security_invoker = true) as
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

create or replace view public.credit_usage with (security_invoker = true) as
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

create or replace view public.credit_balances with (security_invoker = true) as
select a.id as account_id, a.user_id, a.tenant_id, a.plan_id,
       (b ->> 'promotional')::bigint as promotional,
       (b ->> 'subscription')::bigint as subscription,
       (b ->> 'purchased')::bigint as purchased,
       (b ->> 'held')::bigint as held,
       (b ->> 'available')::bigint as available,
       (b ->> 'total')::bigint as total,
       (b ->> 'period_start')::timestamptz as period_start,
       (b ->> 'period_end')::timestamptz as period_end,
       b -> 'next_expiry' as next_expiry,
       (b ->> 'debt')::bigint as debt
  from public.credit_accounts a
  join public.credit_wallets w on w.account_id = a.id
 cross join lateral private.balance_json(private.current_wallet(w)) b;
