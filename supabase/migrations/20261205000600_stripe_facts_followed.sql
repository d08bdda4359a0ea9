-- Stripe's subscription facts followed, not copied once.
--
--   * An invoice or subscription event acts only on its customer's account:
--     metadata naming an account linked to another customer is refused
--     (account_of_another_customer, recorded as failed).
--   * Only an active or trialing subscription is renewed by Stripe; every
--     other account is renewed by the reset for the calendar month, with the
--     free plan's allowance while its subscription does not pay (past_due,
--     unpaid, incomplete, incomplete_expired, paused, canceled), so an
--     ended period's allowance is not kept by a subscription that stopped
--     paying, and an unpaid checkout never grants the paid plan.
--   * An invoice whose period contains now starts it even if a free month
--     began later (what is left of the free one expires).
--   * Yearly prices renew on their monthly anniversaries (the reset runs
--     daily), with the seats current then (customer.subscription.* events
--     keep stripe_quantity), scaled by what a partial refund left paid; a
--     full refund or a dispute of the year stops its later months, a won
--     dispute resumes them; each month's grant carries the year's Stripe
--     reference, so a refund reaches the month it is in.
--   * A dispute inquiry (warning_* status) takes nothing.
--   * A won dispute gives promotional credits back as a grant (with the
--     expiry of the one they were taken from; expired at once if that has
--     passed), never as credits without a grant.

alter table public.credit_accounts
  add column stripe_period_start timestamptz,
  add column stripe_paid_ref text,
  add column stripe_paid_until timestamptz,
  add column stripe_paid_scale numeric not null default 1 check (stripe_paid_scale between 0 and 1);

-- Existing yearly subscribers: the period started with the latest Stripe
-- grant; the year is as paid.
update public.credit_accounts a
   set stripe_paid_until = a.stripe_paid_through,
       stripe_period_start = g.period_start,
       stripe_paid_ref = g.stripe_ref
  from (select distinct on (t.account_id) t.account_id, t.period_start, t.stripe_ref
          from public.credit_transactions t
         where t.kind = 'grant' and t.origin = 'stripe'
         order by t.account_id, t.period_start desc, t.seq desc) g
 where g.account_id = a.id and a.stripe_paid_through is not null;

drop function private.reset_due(public.credit_accounts, public.credit_wallets, timestamptz);

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
           private.uuid_v7() as grant_id, private.uuid_v7() as roll_id, private.uuid_v7() as expire_id
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
           period_end = c.new_end
      from calc c
     where w.account_id = c.account_id
    returning w.*
  ), promos as (
    insert into public.credit_promotions (id, account_id, amount, expires_at, remaining)
    select c.roll_id, c.account_id, c.rolled, c.new_end, c.rolled from calc c where c.rolled > 0
  ), entries as (
    insert into public.credit_transactions (
      id, account_id, kind, origin, idempotency_key, request_hash, promotional, subscription, purchased,
      promotional_after, subscription_after, purchased_after, held_after, period_start, period_end,
      next_expiry_amount, next_expiry_at, ref_id, stripe_ref, metadata)
    select e.id, c.account_id, e.kind, e.origin, e.key, e.hash, e.d_promo, e.d_sub, 0,
           n.promotional, e.sub_after, n.purchased,
           n.held_promotional + n.held_subscription + n.held_purchased, e.pstart, e.pend,
           (private.next_expiry(n) ->> 'amount')::bigint, (private.next_expiry(n) ->> 'at')::timestamptz,
           e.ref_id, p_stripe_ref, coalesce(p_metadata, '{}'::jsonb)
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

create or replace function private.renewed_by_stripe(p_account public.credit_accounts)
returns boolean
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  return p_account.stripe_subscription_id is not null
       and coalesce(p_account.subscription_status, '') in ('active', 'trialing');
end
$$;

-- The n-th month of a period starting at p_start that contains p_at:
-- [p_start + n months, p_start + (n+1) months), computed in UTC from p_start
-- with the day clipped to the month's end (31 Jan -> 29 Feb -> 31 Mar).
create function private.anniversary_month(p_start timestamptz, p_at timestamptz,
                                          out month_start timestamptz, out month_end timestamptz)
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_start timestamp := p_start at time zone 'UTC';
  v_at timestamp := p_at at time zone 'UTC';
  v_n integer;
begin
  v_n := greatest(0, ((extract(year from v_at) - extract(year from v_start)) * 12
                      + extract(month from v_at) - extract(month from v_start))::integer);
  while v_n > 0 and v_start + make_interval(months => v_n) > v_at loop
    v_n := v_n - 1;
  end loop;
  month_start := (v_start + make_interval(months => v_n)) at time zone 'UTC';
  month_end := (v_start + make_interval(months => v_n + 1)) at time zone 'UTC';
end
$$;

-- The allowance the reset grants an account not renewed by Stripe: its plan's,
-- or the free plan's while its subscription does not pay (a yearly price whose
-- paid year ended or stopped included).
create function private.reset_allowance(p_account public.credit_accounts, p_plan public.credit_plans,
                                        p_free public.credit_plans) returns public.credit_plans
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  if coalesce(p_account.subscription_status, '') in ('past_due', 'unpaid', 'incomplete', 'incomplete_expired',
                                                      'paused', 'canceled')
     or (p_account.subscription_status in ('active', 'trialing') and p_account.stripe_paid_through is not null) then
    return p_free;
  end if;
  return p_plan;
end
$$;

-- Does the reset of the month starting p_start renew this account (see the
-- header)? 'anniversary' for a yearly price's next month, 'calendar' for the
-- calendar month, null for not now.
create function private.reset_due(p_account public.credit_accounts, p_wallet public.credit_wallets,
                                  p_start timestamptz) returns text
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_at timestamptz := greatest(now(), p_start);
begin
  if private.renewed_by_stripe(p_account) then
    if p_account.stripe_paid_through is null then
      return null;  -- a monthly price: its invoices renew it
    end if;
    if p_account.stripe_paid_through > v_at then
      return case when p_wallet.period_end <= v_at then 'anniversary' end;
    end if;
    -- The paid year ended or stopped: the next yearly invoice may take up to 72 hours.
    if coalesce(p_wallet.period_end, '-infinity') + interval '72 hours' > v_at then
      return null;
    end if;
  end if;
  return case when p_wallet.period_start is null or p_wallet.period_start < p_start then 'calendar' end;
end
$$;

-- One batch of the reset (see the header).
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

  select count(*), (array_agg(b.id order by b.id desc))[1] into v_scanned, v_last
    from (select a.id from public.credit_accounts a
           where a.id > coalesce(p_after, '00000000-0000-0000-0000-000000000000'::uuid)
           order by a.id limit p_batch_size) b;
  if v_scanned = 0 then
    return jsonb_build_object('processed', 0, 'expired', 0, 'granted', 0, 'next_after', null, 'done', true);
  end if;

  -- Lock, in ascending id, the wallets that need a renewal or a sweep.
  select array_agg(x.account_id order by x.account_id) into v_due
    from (select w.account_id
            from public.credit_wallets w
            join public.credit_accounts a on a.id = w.account_id
           where w.account_id > coalesce(p_after, '00000000-0000-0000-0000-000000000000'::uuid)
             and w.account_id <= v_last
             and (private.reset_due(a, w, v_start) is not null or private.sweep_due(w))
           order by w.account_id
             for update of w) x;
  -- Sweep what lapsed, and attribute promotional spends where a rollover
  -- grant is about to join grants whose rows lag behind the wallet (both
  -- rare: a few accounts a batch; one set-based query finds them).
  for v_account in
    select w.account_id from public.credit_wallets w
      join public.credit_accounts a on a.id = w.account_id
      join public.credit_plans p on p.id = a.plan_id
      left join (select g.account_id, sum(g.remaining) as remaining from public.credit_promotions g
                  where g.account_id = any (v_due) and g.remaining > 0 group by g.account_id) g
        on g.account_id = w.account_id
     where w.account_id = any (v_due)
       and (private.sweep_due(w)
            or (p.rollover_cap > 0 and coalesce(g.remaining, 0) <> w.promotional - w.held_promotional))
     order by w.account_id
  loop
    perform private.materialize_promotions(private.lock_wallet(v_account));
  end loop;

  -- The calendar month, in one statement for the batch.
  select array_agg(a.id order by a.id),
         array_agg((private.reset_allowance(a, p, f)).monthly_credits::bigint order by a.id),
         array_agg((private.reset_allowance(a, p, f)).rollover_cap::bigint order by a.id),
         array_agg(v_end order by a.id)
    into v_ids, v_amounts, v_caps, v_ends
    from public.credit_accounts a
    join public.credit_wallets w on w.account_id = a.id
    join public.credit_plans p on p.id = a.plan_id
    join public.credit_plans f on f.id = 'free'
   where a.id = any (v_due) and private.reset_due(a, w, v_start) = 'calendar';
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
      join public.credit_wallets w on w.account_id = a.id
      join public.credit_plans p on p.id = a.plan_id
     where a.id = any (v_due) and private.reset_due(a, w, v_start) = 'anniversary'
     order by a.id
  loop
    v_month := private.anniversary_month(coalesce(v_yearly.stripe_period_start, v_start), greatest(now(), v_start));
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

-- The account of a subscription's invoice or event: its customer's account;
-- if none, the account its metadata names, provided no other customer is
-- linked to it (the caller links it); else the subscription's; null while
-- none is known (parked). Metadata naming an account that belongs to another
-- customer is refused (account_of_another_customer): an invoice acts only on
-- its own customer's account.
create function private.stripe_billing_account(p_hint text, p_customer text, p_subscription text) returns uuid
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_id uuid;
  v_named public.credit_accounts;
begin
  if p_customer is not null then
    select a.id into v_id from public.credit_accounts a where a.stripe_customer_id = p_customer;
  end if;
  if p_hint is not null then
    if p_hint !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' then
      perform private.invalid('account_id', 'must be a uuid');
    end if;
    select * into v_named from public.credit_accounts a where a.id = p_hint::uuid;
    if v_named.id is null then
      perform private.fail('PT404', 'account_not_found', jsonb_build_object('account_id', p_hint));
    end if;
    if (v_id is not null and v_id <> v_named.id)
       or (v_named.stripe_customer_id is not null and v_named.stripe_customer_id is distinct from p_customer) then
      perform private.fail('PT409', 'account_of_another_customer',
                           jsonb_build_object('account_id', p_hint, 'customer', p_customer));
    end if;
    return v_named.id;
  end if;
  if v_id is null and p_subscription is not null then
    select a.id into v_id from public.credit_accounts a
     where a.stripe_subscription_id = p_subscription
       and (a.stripe_customer_id is null or p_customer is null or a.stripe_customer_id = p_customer);
  end if;
  return v_id;
end
$$;

-- invoice.paid (through stripe_invoice_paid_yearly), by billing reason:
--   * subscription_create, subscription_cycle, or none (older events): start
--     the period of the plan line, granting the plan's monthly credits times
--     the line's quantity (seats);
--   * subscription_update (a plan or quantity change invoiced at once): never
--     restart the period; private.stripe_plan_change decides;
--   * any other reason: ignored (`not_a_period_start`).
create or replace function private.stripe_invoice_paid(p jsonb) returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_invoice text := private.stripe_text(p, 'invoice');
  v_customer text := private.stripe_text(p, 'customer');
  v_subscription text := private.stripe_text(p, 'subscription');
  v_hint text := private.stripe_text(p, 'account_id');
  v_reason text := private.stripe_text(p, 'billing_reason');
  v_lines jsonb := case when jsonb_typeof(p -> 'lines') = 'array' then p -> 'lines' else '[]'::jsonb end;
  v_line jsonb;
  v_plan_id text;
  v_monthly bigint;
  v_quantity bigint;
  v_allowance bigint;
  v_price text;
  v_start timestamptz;
  v_end timestamptz;
  v_account uuid;
  v_keys text[] := '{}';
  v_ref text;
  v_result jsonb;
begin
  if v_invoice is null then
    perform private.invalid('invoice', 'missing');
  end if;
  if v_subscription is null then
    return private.stripe_result('ignored', 'not_a_subscription_invoice');
  end if;
  if v_reason is not null and v_reason not in ('subscription_create', 'subscription_cycle', 'subscription_update') then
    return private.stripe_result('ignored', 'not_a_period_start');
  end if;
  -- The plan line: a known price; for a period start the regular line (latest
  -- period first), for a change the line charging for the new plan.
  select l.value, pl.id, pl.monthly_credits, pl.stripe_price_id into v_line, v_plan_id, v_monthly, v_price
    from jsonb_array_elements(v_lines) l
    join public.credit_plans pl on pl.stripe_price_id = l.value ->> 'price_id'
   where v_reason is distinct from 'subscription_update' or coalesce(private.stripe_int(l.value, 'amount'), 0) > 0
   order by coalesce(l.value ->> 'proration', 'false') = 'true',
            private.stripe_int(l.value, 'period_end') desc nulls last
   limit 1;
  if v_line is null then
    return private.stripe_result('ignored', 'unknown_price');
  end if;
  v_quantity := coalesce(private.stripe_int(v_line, 'quantity'), 1);
  if v_quantity not between 1 and 1000000 then
    perform private.invalid('quantity', 'must be a whole number from 1 to 1000000');
  end if;
  v_allowance := v_monthly * v_quantity;
  perform private.check_amount('allowance', v_allowance, 0);
  v_start := private.stripe_time(v_line, 'period_start');
  v_end := private.stripe_time(v_line, 'period_end');

  v_account := private.stripe_billing_account(v_hint, v_customer, v_subscription);
  if v_account is null then
    return private.stripe_result('parked', 'account_unknown', null, null, '{}',
                                 private.stripe_wait_keys(v_customer, v_subscription));
  end if;
  if v_hint is not null then
    -- Subscription metadata named the account: later events can find it by these ids.
    v_keys := private.stripe_link(v_account, v_customer, v_subscription, 'active', false);
  end if;
  v_ref := coalesce(private.stripe_text(p, 'payment_intent'), v_invoice);

  if v_reason = 'subscription_update' then
    return private.stripe_plan_change(v_account, v_invoice, v_ref, v_allowance, v_start, v_end,
                                      jsonb_build_object('invoice', v_invoice, 'subscription', v_subscription,
                                                         'price_id', v_price, 'quantity', v_quantity),
                                      v_keys || ('payment:' || v_ref));
  end if;

  v_result := private.add_subscription(
    v_account, v_allowance::integer, v_start, v_end, 'invoice:' || v_invoice, v_ref,
    jsonb_strip_nulls(jsonb_build_object('invoice', v_invoice, 'subscription', v_subscription,
                                         'price_id', v_price, 'quantity', v_quantity,
                                         'billing_reason', v_reason)), 'stripe');
  -- The plan follows the invoice that started the account's current period.
  if not (v_result ->> 'replayed')::boolean
     and not private.stripe_newer_state(v_subscription, private.stripe_time(p, 'created')) then
    update public.credit_accounts a set plan_id = v_plan_id, updated_at = now()
     where a.id = v_account
       and (select w.period_start from public.credit_wallets w where w.account_id = v_account) = v_start
       and (a.stripe_subscription_id is null or a.stripe_subscription_id = v_subscription);
  end if;
  return private.stripe_result('applied', case when (v_result ->> 'replayed')::boolean then 'already_granted'
                                               when (v_result ->> 'granted')::bigint = 0
                                                    and v_allowance > 0 then 'older_period'
                                               else 'period_started' end,
                               v_account, v_result,
                               -- Refunds waiting on a payment of this invoice (known from
                               -- invoice_payment.paid) can apply now too.
                               v_keys || ('payment:' || v_ref) || ('period:' || v_subscription)
                               || array(select 'payment:' || sp.payment_ref from public.stripe_payments sp
                                         where sp.invoice = v_invoice));
end
$$;

-- customer.subscription.updated / customer.subscription.deleted.
create or replace function private.stripe_subscription_changed(p_type text, p jsonb) returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_subscription text := private.stripe_text(p, 'subscription');
  v_customer text := private.stripe_text(p, 'customer');
  v_status text := coalesce(private.stripe_text(p, 'status'),
                            case when p_type = 'customer.subscription.deleted' then 'canceled' end);
  v_created timestamptz := private.stripe_time(p, 'created');
  v_account public.credit_accounts;
  v_account_id uuid;
  v_plan text;
  v_quantity bigint;
  v_keys text[] := '{}';
begin
  if v_subscription is null then
    perform private.invalid('subscription', 'missing');
  end if;
  -- Stripe does not guarantee order: an update older than one already applied,
  -- or any update after the deletion, changes nothing.
  if p_type = 'customer.subscription.updated' and private.stripe_newer_state(v_subscription, v_created) then
    return private.stripe_result('ignored', 'stale');
  end if;

  v_account_id := private.stripe_billing_account(private.stripe_text(p, 'account_id'), v_customer,
                                                v_subscription);
  if v_account_id is null then
    return private.stripe_result('parked', 'account_unknown', null, null, '{}',
                                 private.stripe_wait_keys(v_customer, v_subscription));
  end if;
  select * into v_account from public.credit_accounts a where a.id = v_account_id for update;
  if v_account.stripe_subscription_id is distinct from v_subscription then
    -- The account moved on to another subscription: this one no longer decides its plan.
    -- (An account without one adopts it, even from its deletion: Stripe may deliver
    -- the deletion before the checkout that linked it.)
    if v_account.stripe_subscription_id is not null
       and coalesce(v_account.subscription_status, '') not in ('canceled', 'incomplete_expired') then
      return private.stripe_result('ignored', 'other_subscription', v_account_id);
    end if;
    v_keys := private.stripe_link(v_account_id, v_customer, v_subscription, v_status, false);
  end if;

  if p_type = 'customer.subscription.deleted' then
    -- Back to free; what is left of the paid period stays until it ends and the
    -- monthly reset renews the account from then on. Purchased credits stay.
    update public.credit_accounts a set plan_id = 'free', subscription_status = v_status, updated_at = now()
     where a.id = v_account_id;
    return private.stripe_result('applied', 'subscription_ended', v_account_id,
                                 jsonb_build_object('plan_id', 'free', 'status', v_status), v_keys);
  end if;

  select pl.id, private.stripe_int(i.value, 'quantity') into v_plan, v_quantity
    from jsonb_array_elements(case when jsonb_typeof(p -> 'items') = 'array' then p -> 'items'
                                   else '[]'::jsonb end) i
    join public.credit_plans pl on pl.stripe_price_id = i.value ->> 'price_id'
   limit 1;
  if v_quantity is not null and v_quantity not between 1 and 1000000 then
    perform private.invalid('quantity', 'must be a whole number from 1 to 1000000');
  end if;
  -- A subscription that no longer pays puts the account on free, so the monthly
  -- reset (which renews every account Stripe does not) grants free's allowance.
  update public.credit_accounts a
     set subscription_status = v_status,
         plan_id = case when v_status in ('active', 'trialing', 'past_due') then coalesce(v_plan, a.plan_id)
                        when v_status in ('canceled', 'unpaid', 'incomplete_expired', 'paused') then 'free'
                        else a.plan_id end,
         -- The seats a yearly price renews its next months with.
         stripe_quantity = coalesce(v_quantity::integer, a.stripe_quantity),
         updated_at = now()
   where a.id = v_account_id
  returning a.plan_id into v_plan;
  return private.stripe_result('applied', 'subscription_updated', v_account_id,
                               jsonb_build_object('plan_id', v_plan, 'status', v_status), v_keys);
end
$$;

-- invoice.paid: a period longer than a month starts with its first month.
create or replace function private.stripe_invoice_paid_yearly(p jsonb) returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_reason text := private.stripe_text(p, 'billing_reason');
  v_paid_through timestamptz;
  v_quantity bigint;
  v_lines jsonb;
  v_res jsonb;
begin
  if v_reason is not distinct from 'subscription_update'
     or jsonb_typeof(p -> 'lines') is distinct from 'array' then
    return private.stripe_invoice_paid(p);
  end if;
  -- The yearly plan line's end, and its first month in its place.
  select max(private.stripe_time(l, 'period_end')), max(private.stripe_int(l, 'quantity'))
    into v_paid_through, v_quantity
    from jsonb_array_elements(p -> 'lines') l
   where private.stripe_time(l, 'period_end') > private.stripe_time(l, 'period_start') + interval '32 days';
  if v_paid_through is null then
    v_res := private.stripe_invoice_paid(p);
  else
    select jsonb_agg(case when private.stripe_time(l, 'period_end')
                                > private.stripe_time(l, 'period_start') + interval '32 days'
                          then l || jsonb_build_object('period_end', extract(epoch from
                                  private.stripe_time(l, 'period_start') + interval '1 month')::bigint)
                          else l end)
      into v_lines from jsonb_array_elements(p -> 'lines') l;
    v_res := private.stripe_invoice_paid(p || jsonb_build_object('lines', v_lines));
  end if;
  if v_res ->> 'outcome' = 'applied' and v_res ->> 'reason' = 'period_started' then
    update public.credit_accounts a
       set stripe_paid_through = v_paid_through, stripe_paid_until = v_paid_through,
           stripe_quantity = coalesce(v_quantity, 1), stripe_paid_scale = 1,
           stripe_period_start = case when v_paid_through is not null
                                      then (select w.period_start from public.credit_wallets w
                                             where w.account_id = a.id) end,
           stripe_paid_ref = case when v_paid_through is not null
                                  then coalesce(private.stripe_text(p, 'payment_intent'),
                                                private.stripe_text(p, 'invoice')) end,
           updated_at = now()
     where a.id = (v_res ->> 'account_id')::uuid;
  end if;
  return v_res;
end
$$;

-- charge.refunded: claw back round(granted * amount_refunded / amount) in total
-- (Stripe reports refunds cumulatively; each cumulative step applies once).
create or replace function private.stripe_charge_refunded(p jsonb) returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_charge text := private.stripe_text(p, 'charge');
  v_payment text := coalesce(private.stripe_text(p, 'payment_intent'), private.stripe_text(p, 'charge'));
  v_ref text;
  v_amount bigint := private.stripe_int(p, 'amount');
  v_refunded bigint := private.stripe_int(p, 'amount_refunded');
  v_granted bigint;
  v_target bigint;
  v_result jsonb;
begin
  if v_charge is null then
    perform private.invalid('charge', 'missing');
  end if;
  if v_amount is null or v_amount < 1 or v_refunded is null or v_refunded < 0 then
    perform private.invalid('amount', 'charge amount and amount_refunded must be whole numbers');
  end if;
  if v_refunded = 0 then
    return private.stripe_result('ignored', 'nothing_refunded');
  end if;
  v_ref := coalesce(private.stripe_grant_ref(v_payment), private.stripe_grant_ref(v_charge));
  if v_ref is null then
    return private.stripe_result('parked', 'payment_unknown', null, null, '{}',
                                 array_remove(array['payment:' || v_payment, 'payment:' || v_charge], null));
  end if;
  v_granted := (select g.granted from private.payment_grants(v_ref) g);
  -- Half up, on whole credits.
  v_target := round(v_granted::numeric * least(v_refunded, v_amount) / v_amount);
  if v_target < 1 then
    return private.stripe_result('ignored', 'rounds_to_zero');
  end if;
  v_result := private.clawback(v_ref, 'refund:' || v_charge || ':' || v_refunded,
                               least(v_target, 1000000000)::integer, 'refund', 'stripe');
  -- A refund of a yearly price's payment: the later months shrink by the
  -- refunded share; a full refund ends the paid year now.
  update public.credit_accounts a
     set stripe_paid_scale = greatest(0, 1 - least(v_refunded, v_amount)::numeric / v_amount),
         stripe_paid_through = case when v_refunded >= v_amount then least(a.stripe_paid_through, now())
                                    else a.stripe_paid_through end,
         updated_at = now()
   where a.id = (v_result -> 'balance' ->> 'account_id')::uuid and a.stripe_paid_ref = v_ref;
  return private.stripe_result('applied', 'clawed_back', (v_result -> 'balance' ->> 'account_id')::uuid,
                               v_result);
end
$$;

-- charge.dispute.created / charge.dispute.funds_withdrawn: claw back everything the payment granted.
create or replace function private.stripe_dispute_created(p jsonb) returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_dispute text := private.stripe_text(p, 'dispute');
  v_payment text := coalesce(private.stripe_text(p, 'payment_intent'), private.stripe_text(p, 'charge'));
  v_ref text;
  v_result jsonb;
begin
  if v_dispute is null or v_payment is null then
    perform private.invalid('dispute', 'dispute and charge are required');
  end if;
  if coalesce(p ->> 'status', '') like 'warning\_%' then
    -- An inquiry: no money moved yet.
    return private.stripe_result('ignored', 'dispute_inquiry');
  end if;
  v_ref := coalesce(private.stripe_grant_ref(v_payment), private.stripe_grant_ref(private.stripe_text(p, 'charge')));
  if v_ref is null then
    return private.stripe_result('parked', 'payment_unknown', null, null, '{}',
                                 array_remove(array['payment:' || v_payment,
                                                    'payment:' || private.stripe_text(p, 'charge')], null));
  end if;
  v_result := private.clawback(v_ref, 'dispute:' || v_dispute, null, 'dispute', 'stripe');
  -- A disputed year renews no further month (a won dispute resumes it).
  update public.credit_accounts a
     set stripe_paid_through = least(a.stripe_paid_through, now()), updated_at = now()
   where a.id = (v_result -> 'balance' ->> 'account_id')::uuid and a.stripe_paid_ref = v_ref;
  -- A win that arrived first waits on the dispute.
  return private.stripe_result('applied', 'clawed_back', (v_result -> 'balance' ->> 'account_id')::uuid,
                               v_result, array['dispute:' || v_dispute]);
end
$$;

-- charge.dispute.funds_reinstated, charge.dispute.closed: a won dispute gives
-- back exactly what its clawback took, once.
create or replace function private.stripe_dispute_won(p_type text, p jsonb) returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_dispute text := private.stripe_text(p, 'dispute');
  v_taken public.credit_transactions;
  v_wallet public.credit_wallets;
  v_entry public.credit_transactions;
  v_pending bigint;
  v_hash uuid;
  v_hold record;
  v_claims jsonb;
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
  -- What the dispute still claims on active holds is released from them.
  v_pending := coalesce((v_taken.outcome ->> 'pending')::bigint, 0);
  for v_hold in select h.id, h.claims from public.credit_holds h
                 where h.account_id = v_taken.account_id and h.status = 'active'
                   and h.claims @> jsonb_build_array(jsonb_build_object('stripe_ref', v_taken.stripe_ref))
                 order by h.expires_at desc, h.id loop
    exit when v_pending <= 0;
    select coalesce(jsonb_agg(c.value order by c.ordinality), '[]'::jsonb) into v_claims
      from (select e.value, e.ordinality,
                   sum((e.value ->> 'amount')::bigint) filter (where e.value ->> 'stripe_ref' = v_taken.stripe_ref)
                     over (order by e.ordinality desc) as from_end
              from jsonb_array_elements(v_hold.claims) with ordinality e) c
     where c.value ->> 'stripe_ref' is distinct from v_taken.stripe_ref or c.from_end > v_pending;
    v_pending := v_pending - (select coalesce(sum((e ->> 'amount')::bigint), 0)
                                from jsonb_array_elements(v_hold.claims) e
                               where e ->> 'stripe_ref' = v_taken.stripe_ref)
                           + (select coalesce(sum((e ->> 'amount')::bigint), 0)
                                from jsonb_array_elements(v_claims) e
                               where e ->> 'stripe_ref' = v_taken.stripe_ref);
    update public.credit_holds h set claims = v_claims where h.id = v_hold.id;
  end loop;
  if v_taken.promotional < 0 then
    -- Promotional credits come back as a grant with the expiry of the one they
    -- were taken from; past it, they are written back and expired at once.
    v_entry := private.add_promotion(
      v_wallet, 'reinstate', -v_taken.promotional,
      coalesce((select max(g.expires_at) from public.credit_promotions g
                  join public.credit_transactions t on t.id = g.id
                 where t.account_id = v_taken.account_id and t.stripe_ref = v_taken.stripe_ref), now()),
      'stripe', 'reinstate:' || v_dispute, v_hash, v_taken.stripe_ref, null,
      jsonb_build_object('reason', 'dispute won', 'dispute', v_dispute), null);
    select * into v_wallet from public.credit_wallets w where w.account_id = v_taken.account_id;
    perform private.materialize_promotions(v_wallet);
    perform private.lock_wallet(v_taken.account_id);  -- sweeps it at once if its expiry passed
  else
    v_entry := private.post(v_taken.account_id, 'reinstate',
                            p_promotional => -v_taken.promotional, p_subscription => -v_taken.subscription,
                            p_purchased => -v_taken.purchased, p_origin => 'stripe',
                            p_key => 'reinstate:' || v_dispute, p_hash => v_hash,
                            p_ref_id => v_taken.id, p_stripe_ref => v_taken.stripe_ref,
                            p_metadata => jsonb_build_object('reason', 'dispute won', 'dispute', v_dispute));
  end if;
  -- A won dispute of a yearly price's payment resumes its months.
  update public.credit_accounts a
     set stripe_paid_through = a.stripe_paid_until, updated_at = now()
   where a.id = v_taken.account_id and a.stripe_paid_ref = v_taken.stripe_ref and a.stripe_paid_scale > 0;
  return private.stripe_result('applied', 'reinstated', v_taken.account_id, private.result(v_entry, false));
end
$$;

revoke all on function private.reset_due(public.credit_accounts, public.credit_wallets, timestamptz),
  private.anniversary_month(timestamptz, timestamptz),
  private.reset_allowance(public.credit_accounts, public.credit_plans, public.credit_plans),
  private.stripe_billing_account(text, text, text)
  from public, anon, authenticated, service_role;
