-- Monthly reset: renew, each month, the allowance of every account its
-- invoices do not renew.
--
-- run_monthly_reset(p_period_start, p_batch_size, p_after) walks accounts in
-- id order (keyset pagination) and, for each batch: locks the wallets that
-- need work in ascending account id, sweeps those with something lapsed
-- (expired holds, promotional grants), and renews the due ones with
-- private.renew_to, the same statement an invoice's renewal runs.
--
-- Which accounts are due (decided in the batch's locking statement), at
-- X = greatest(now(), p_period_start) (the reset Lambda runs daily, with the
-- current month's first day):
--   * accounts whose Stripe subscription is not active or trialing (free
--     plans, ended, past_due, unpaid, incomplete, paused subscriptions), and
--     yearly-priced ones whose paid year ended more than 72 hours ago (its
--     renewal invoice did not come) or was stopped (a full refund, a
--     dispute), whose period starts before p_period_start: the calendar
--     month, with the plan's monthly credits, or the free plan's while the
--     subscription does not pay;
--   * accounts on a yearly Stripe price still paid at X whose current month
--     has ended: the month of the paid year that contains X, from the
--     period's anniversary (private.anniversary_month), with the plan's
--     credits times the seats and the paid share current then, never past
--     the paid period; its grant carries the year's Stripe reference, so a
--     refund or dispute of the year reaches it;
--   * accounts on a monthly Stripe price are renewed by their invoices only.
--
-- Rules:
--   * An account already renewed for p_period_start is skipped, so running a
--     period twice (or resuming after a timeout) grants nothing twice.
--   * A period more than one month ahead of the current UTC month is refused
--     (invalid_argument), and nothing changes.

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
  -- Renewals are not broadcast (alerts are still evaluated).
  perform set_config('credits.quiet', 'on', true);
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

revoke all on function private.anniversary_month(timestamptz, timestamptz),
  public.run_monthly_reset(date, integer, uuid) from public, anon, authenticated, service_role;
grant execute on function public.run_monthly_reset(date, integer, uuid) to service_role;

-- The definer code behind the public entry points.
revoke all on function private.run_monthly_reset(date, integer, uuid) from public, anon, authenticated, service_role;
grant execute on function private.run_monthly_reset(date, integer, uuid) to service_role;
