-- Stripe: plans priced yearly grant their monthly credits each month of the
-- paid year.
--
-- An invoice that starts a period longer than a month (a yearly price) grants
-- the plan's monthly credits (times the seats) for the first month only, and
-- records on the account how far the payment reaches (stripe_paid_through) and
-- how many seats it paid for (stripe_quantity). The scheduled monthly reset
-- then renews such an account like any other, once its month has ended, with
-- its plan's credits times its seats, for a month that ends no later than the
-- paid period; past it, nothing (the next yearly invoice starts the next year).
-- Accounts on monthly Stripe prices are still renewed by their invoices only.
--
-- The renewal takes a period end per account (renew_to); renew keeps its
-- signature and calls it.

alter table public.credit_accounts
  add column stripe_paid_through timestamptz,
  add column stripe_quantity integer check (stripe_quantity between 1 and 1000000);
comment on column public.credit_accounts.stripe_paid_through is
  'End of the paid Stripe period when it is longer than a month (a yearly price); the reset renews within it.';

create function private.renew_to(p_accounts uuid[], p_amounts bigint[], p_caps bigint[], p_ends timestamptz[],
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
     where w.period_start is null or w.period_start <= p_start
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


create or replace function private.renew(p_accounts uuid[], p_amounts bigint[], p_caps bigint[], p_start timestamptz,
                                         p_end timestamptz, p_origin private.entry_origin, p_key text, p_hash uuid,
                                         p_stripe_ref text, p_metadata jsonb)
returns table (account_id uuid, expired bigint, rolled_over bigint, granted bigint, grant_id uuid)
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return query select * from private.renew_to(p_accounts, p_amounts, p_caps,
                                              array_fill(p_end, array[cardinality(p_accounts)]), p_start,
                                              p_origin, p_key, p_hash, p_stripe_ref, p_metadata);
end
$$;

-- Does the monthly reset of the month starting p_start renew this account?
-- Not renewed by Stripe and on an earlier period; or paid by Stripe for a
-- longer period that reaches past p_start, with its current month ended.
create function private.reset_due(p_account public.credit_accounts, p_wallet public.credit_wallets,
                                  p_start timestamptz) returns boolean
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
  if private.renewed_by_stripe(p_account) then
    return p_account.stripe_paid_through > p_start and p_wallet.period_end <= p_start;
  end if;
  return p_wallet.period_start is null or p_wallet.period_start < p_start;
end
$$;

-- invoice.paid: a period longer than a month starts with its first month.
create function private.stripe_invoice_paid_yearly(p jsonb) returns jsonb
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
       set stripe_paid_through = v_paid_through, stripe_quantity = coalesce(v_quantity, 1), updated_at = now()
     where a.id = (v_res ->> 'account_id')::uuid;
  end if;
  return v_res;
end
$$;

create or replace function private.stripe_apply(p_type text, p jsonb) returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  if p ? 'invalid' then
    perform private.invalid('payload', coalesce(p ->> 'invalid', 'unreadable event'));
  end if;
  case p_type
    when 'checkout.session.completed', 'checkout.session.async_payment_succeeded' then
      return private.stripe_checkout(p_type, p);
    when 'invoice.paid' then
      return private.stripe_invoice_paid_yearly(p);
    when 'invoice_payment.paid' then
      return private.stripe_invoice_payment(p);
    when 'customer.subscription.updated', 'customer.subscription.deleted' then
      return private.stripe_subscription_changed(p_type, p);
    when 'charge.refunded' then
      return private.stripe_charge_refunded(p);
    when 'charge.dispute.created', 'charge.dispute.funds_withdrawn' then
      return private.stripe_dispute_created(p);
    when 'charge.dispute.funds_reinstated', 'charge.dispute.closed' then
      return private.stripe_dispute_won(p_type, p);
    else
      return private.stripe_result('ignored', 'unhandled_type');
  end case;
end
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
  v_account uuid;
  v_ids uuid[];
  v_amounts bigint[];
  v_caps bigint[];
  v_ends timestamptz[];
  v_result record;
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
             and (private.reset_due(a, w, v_start) or private.sweep_due(w))
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

  -- Accounts on a yearly Stripe price get their plan's credits times their
  -- seats, for a month that never runs past the paid period.
  select array_agg(a.id order by a.id),
         array_agg(p.monthly_credits::bigint
                   * case when private.renewed_by_stripe(a) then coalesce(a.stripe_quantity, 1) else 1 end
                   order by a.id),
         array_agg(p.rollover_cap::bigint order by a.id),
         array_agg(case when private.renewed_by_stripe(a) then least(v_end, a.stripe_paid_through) else v_end end
                   order by a.id)
    into v_ids, v_amounts, v_caps, v_ends
    from public.credit_accounts a
    join public.credit_wallets w on w.account_id = a.id
    join public.credit_plans p on p.id = a.plan_id
   where a.id = any (v_due) and private.reset_due(a, w, v_start);
  select count(*)::integer as processed, coalesce(sum(r.expired), 0)::bigint as expired,
         coalesce(sum(r.granted), 0)::bigint as granted
    into v_result
    from private.renew_to(coalesce(v_ids, '{}'), coalesce(v_amounts, '{}'), coalesce(v_caps, '{}'),
                          coalesce(v_ends, '{}'), v_start, 'system', null, null, null,
                          '{"reason": "monthly_reset"}'::jsonb) r;

  return jsonb_build_object('processed', v_result.processed, 'expired', v_result.expired,
                            'granted', v_result.granted, 'next_after', v_last, 'done', v_scanned < p_batch_size);
end
$$;

revoke all on function
  private.renew_to(uuid[], bigint[], bigint[], timestamptz[], timestamptz, private.entry_origin, text, uuid, text,
                   jsonb),
  private.reset_due(public.credit_accounts, public.credit_wallets, timestamptz),
  private.stripe_invoice_paid_yearly(jsonb)
  from public;
