-- Monthly reset: renew, each month, the allowance of every account its
-- invoices do not renew.
--
-- run_monthly_reset(p_period_start, p_batch_size, p_after) walks accounts in
-- id order (keyset pagination) and, for each batch: locks the wallets that
-- need work in ascending account id, sweeps those with something lapsed
-- (expired holds, promotional grants), and renews the due ones with
-- private.renew_to, the same statement an invoice's renewal runs.
--
-- Which accounts are due (private.reset_due):
--   * accounts without a Stripe subscription that is active, trialing or
--     past_due (free plans, ended subscriptions) whose period starts before
--     p_period_start: the plan's monthly credits for the calendar month;
--   * accounts on a yearly Stripe price (stripe_paid_through is past
--     p_period_start) whose current month has ended: the plan's monthly
--     credits times the paid seats (stripe_quantity), for a month that ends no
--     later than the paid period;
--   * accounts on a monthly Stripe price are renewed by their invoices only.
--
-- Rules:
--   * An account already renewed for p_period_start is skipped, so running a
--     period twice (or resuming after a timeout) grants nothing twice.
--   * A period more than one month ahead of the current UTC month is refused
--     (invalid_argument), and nothing changes.

create function private.renewed_by_stripe(p_account public.credit_accounts)
returns boolean
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  return p_account.stripe_subscription_id is not null
       and coalesce(p_account.subscription_status, '') in ('active', 'trialing', 'past_due');
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

-- One batch of the reset (see the header).
create function private.run_monthly_reset(p_period_start date, p_batch_size integer default 5000,
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

create function public.run_monthly_reset(p_period_start date, p_batch_size integer default 5000,
                                         p_after uuid default null)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.run_monthly_reset(p_period_start, p_batch_size, p_after);
end
$$;
comment on function public.run_monthly_reset(date, integer, uuid) is
  'Service: renew up to p_batch_size accounts not renewed by Stripe. {processed, expired, granted, next_after, done}.';

revoke all on function private.renewed_by_stripe(public.credit_accounts),
  private.reset_due(public.credit_accounts, public.credit_wallets, timestamptz),
  public.run_monthly_reset(date, integer, uuid) from public, anon, authenticated, service_role;
grant execute on function public.run_monthly_reset(date, integer, uuid) to service_role;

-- The definer code behind the public entry points.
revoke all on function private.run_monthly_reset(date, integer, uuid) from public, anon, authenticated, service_role;
grant execute on function private.run_monthly_reset(date, integer, uuid) to service_role;
