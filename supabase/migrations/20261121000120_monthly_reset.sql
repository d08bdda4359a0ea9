-- Monthly reset: renew the allowance of every account not renewed by Stripe.
--
-- run_monthly_reset(p_period_start, p_batch_size, p_after) walks accounts in
-- id order (keyset pagination on the primary key) and, set-based for each
-- batch, expires what is left of the old period's subscription credits,
-- grants the plan's monthly credits for the month starting p_period_start,
-- and releases lapsed holds. An account whose period already starts on or
-- after p_period_start is skipped, so running a period twice (or resuming
-- from the start after a timeout) grants nothing twice.
--
-- Accounts renewed by Stripe (a subscription that is active, trialing or
-- past_due) are left alone: their invoices start their periods.
--
-- Renewals are written to the ledger only (an expire and a grant row sharing
-- one transaction id per account): the period check, not an idempotency
-- record, is what keeps a renewal from happening twice, and a transaction-log
-- row per account would cost the reset a third more writes.
--
-- Locks: the batch's accounts that need work are locked in ascending id order
-- first, then their holds (the lock order of the credits functions), and
-- released at the end of the call's transaction, so a batch keeps concurrent
-- spends on those accounts waiting only for the batch's duration.

create function private.renewed_by_stripe(p_account public.credit_accounts) returns boolean
language sql immutable
set search_path = ''
as $$
  select p_account.stripe_subscription_id is not null
     and coalesce(p_account.subscription_status, '') in ('active', 'trialing', 'past_due')
$$;
revoke all on function private.renewed_by_stripe(public.credit_accounts) from public;

create function private.run_monthly_reset(p_period_start date, p_batch_size integer, p_after uuid)
returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  v_start timestamptz;
  v_end timestamptz;
  v_key text;
  v_last uuid;
  v_scanned integer;
  v_processed integer := 0;
  v_expired bigint := 0;
  v_granted bigint := 0;
begin
  if not private.is_service() then
    perform private.fail('PT403', 'forbidden');
  end if;
  if p_period_start is null or extract(day from p_period_start) <> 1 then
    perform private.invalid('p_period_start', 'must be the first day of a month');
  end if;
  if p_batch_size is null or p_batch_size not between 1 and 100000 then
    perform private.invalid('p_batch_size', 'must be 1 to 100000');
  end if;
  v_start := p_period_start::timestamp at time zone 'UTC';
  v_end := (p_period_start + interval '1 month')::timestamp at time zone 'UTC';
  -- The ledger rows' key names the period and ends in the renewal's own
  -- transaction id. The period check (under the row lock) is what makes a
  -- second run grant nothing.
  v_key := 'monthly_reset:' || p_period_start::text || ':';

  -- The batch: the next p_batch_size accounts by id.
  select count(*), (array_agg(b.id order by b.id desc))[1] into v_scanned, v_last
    from (select a.id from public.credit_accounts a
           where a.id > coalesce(p_after, '00000000-0000-0000-0000-000000000000'::uuid)
           order by a.id limit p_batch_size) b;

  if v_scanned > 0 then
    -- One statement: lock (ascending id) the accounts that need renewal or a
    -- hold sweep, expire their lapsed holds, then renew and write the books.
    with due as (
      select a.*,
             (a.period_start is null or a.period_start < v_start) and not private.renewed_by_stripe(a) as renew
        from public.credit_accounts a
       where a.id > coalesce(p_after, '00000000-0000-0000-0000-000000000000'::uuid) and a.id <= v_last
         and (((a.period_start is null or a.period_start < v_start) and not private.renewed_by_stripe(a))
              or a.next_hold_expiry <= now())
       order by a.id
         for update
    ), swept as (
      update public.credit_holds h set status = 'expired', settled_at = now()
        from due d
       where h.account_id = d.id and d.next_hold_expiry <= now()
         and h.status = 'active' and h.expires_at <= now()
      returning h.id
    ), calc as (
      select d.id, d.renew, d.subscription_balance as old_sub, d.period_start as old_start,
             d.period_end as old_end, hh.held, hh.next_expiry, e.expire,
             case when d.renew then p.monthly_credits::bigint else 0 end as grant_amount,
             private.uuid_v7() as tx
        from due d
        join public.credit_plans p on p.id = d.plan_id
       cross join lateral (
         select case when d.next_hold_expiry is null or d.next_hold_expiry > now() then d.held
                     else (select coalesce(sum(h.amount), 0)::bigint from public.credit_holds h
                            where h.account_id = d.id and h.status = 'active' and h.expires_at > now())
                end as held,
                case when d.next_hold_expiry is null or d.next_hold_expiry > now() then d.next_hold_expiry
                     else (select min(h.expires_at) from public.credit_holds h
                            where h.account_id = d.id and h.status = 'active' and h.expires_at > now())
                end as next_expiry) hh
       cross join lateral (
         -- Never expire credits that active holds reserve.
         select case when d.renew
                     then greatest(least(d.subscription_balance,
                                         d.subscription_balance + d.purchased_balance - hh.held), 0)
                     else 0 end as expire) e
    ), renewed as (
      update public.credit_accounts a
         set held = c.held,
             next_hold_expiry = c.next_expiry,
             subscription_balance = c.old_sub - c.expire + c.grant_amount,
             period_start = case when c.renew then v_start else a.period_start end,
             period_end = case when c.renew then v_end else a.period_end end,
             updated_at = now()
        from calc c
       where a.id = c.id
      returning a.id
    ), ledger as (
      insert into public.credit_ledger (account_id, transaction_id, pool, amount, balance_after, type,
                                        idempotency_key, metadata, period_start, period_end)
      select c.id, c.tx, 'subscription', v.amount, v.balance_after, v.type, v_key || c.tx,
             '{"reason": "monthly_reset"}'::jsonb, v.period_start, v.period_end
        from calc c
       cross join lateral (values (-c.expire, c.old_sub - c.expire, 'expire', c.old_start, c.old_end),
                                  (c.grant_amount, c.old_sub - c.expire + c.grant_amount, 'grant', v_start, v_end))
             as v(amount, balance_after, type, period_start, period_end)
       where c.renew and v.amount <> 0
    )
    select count(*) filter (where c.renew), coalesce(sum(c.expire), 0), coalesce(sum(c.grant_amount), 0)
      into v_processed, v_expired, v_granted
      from calc c;
  end if;

  return jsonb_build_object('processed', v_processed, 'expired', v_expired, 'granted', v_granted,
                            'next_after', v_last, 'done', v_scanned < p_batch_size);
end
$$;

create function public.run_monthly_reset(p_period_start date, p_batch_size integer default 5000,
                                         p_after uuid default null) returns jsonb
language sql
set search_path = ''
as $$
  select private.run_monthly_reset(p_period_start, p_batch_size, p_after)
$$;

revoke all on function private.run_monthly_reset(date, integer, uuid),
  public.run_monthly_reset(date, integer, uuid) from public, anon, authenticated;
grant execute on function private.run_monthly_reset(date, integer, uuid),
  public.run_monthly_reset(date, integer, uuid) to service_role;
