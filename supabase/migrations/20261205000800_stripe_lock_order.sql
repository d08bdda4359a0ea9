-- Stripe events lock the account's wallet before its account row; a late
-- yearly invoice starts its month that contains now; the 72 hours a yearly
-- price's renewal invoice may take count from the end of the paid year.
--
-- Linking a customer or following a subscription locked the account row
-- (FOR UPDATE) and then the wallet, while a spend locks the wallet and then,
-- through its ledger row's foreign key, share-locks the account row: a
-- subscription event and a spend on the same account could deadlock. Every
-- call now takes the wallet first.
--
-- A yearly invoice delivered after its first month ended granted that ended
-- month (and so nothing); it now starts the month of the paid year that
-- contains now.
--
-- After a paid year ended without a renewal, the reset waited 72 hours from
-- each calendar month's end again (renewing on the 4th); the wait now counts
-- from the end of the paid year, and a year stopped by a refund or a dispute
-- falls back to the calendar month at once.

-- Link a Stripe customer and subscription to an account; returns the keys now
-- resolvable (for parked events). The customer is recorded when the account
-- has none and no other account has it. The subscription replaces the
-- account's when p_replace (a new checkout) or when the account has none or
-- only an ended one; a subscription linked to another account is refused, and
-- so is a checkout that would detach another customer's active (trialing,
-- past-due) subscription from the account (cancelling the new one would put
-- the account on free and the next reset would expire what the other customer
-- paid for). The same customer's second checkout still replaces its own.
create or replace function private.stripe_link(p_account_id uuid, p_customer text, p_subscription text,
                                    p_status text, p_replace boolean) returns text[]
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_account public.credit_accounts;
  v_other uuid;
  v_keys text[] := '{}';
begin
  -- The wallet first, as every call on an account locks it (a spend locks the
  -- wallet, then its ledger row's foreign key share-locks this account row).
  perform 1 from public.credit_wallets w where w.account_id = p_account_id for update;
  select * into v_account from public.credit_accounts a where a.id = p_account_id for update;
  if p_replace and p_subscription is not null
     and v_account.stripe_subscription_id is not null
     and v_account.stripe_subscription_id <> p_subscription
     and coalesce(v_account.subscription_status, '') in ('active', 'trialing', 'past_due')
     and v_account.stripe_customer_id is distinct from p_customer then
    perform private.fail('PT409', 'account_has_active_subscription',
                         jsonb_build_object('account_id', p_account_id, 'subscription', p_subscription));
  end if;
  if p_customer is not null then
    if v_account.stripe_customer_id is null
       and not exists (select 1 from public.credit_accounts a where a.stripe_customer_id = p_customer) then
      update public.credit_accounts a set stripe_customer_id = p_customer, updated_at = now()
       where a.id = p_account_id;
    end if;
    v_keys := v_keys || ('customer:' || p_customer);
  end if;
  if p_subscription is not null then
    select a.id into v_other from public.credit_accounts a where a.stripe_subscription_id = p_subscription;
    if v_other is not null and v_other <> p_account_id then
      perform private.fail('PT409', 'subscription_linked_elsewhere',
                           jsonb_build_object('subscription', p_subscription));
    end if;
    if v_other is null and (p_replace or v_account.stripe_subscription_id is null
                            or coalesce(v_account.subscription_status, '') in ('canceled', 'incomplete_expired')) then
      update public.credit_accounts a
         set stripe_subscription_id = p_subscription, subscription_status = p_status, updated_at = now()
       where a.id = p_account_id;
    end if;
    v_keys := v_keys || ('subscription:' || p_subscription);
  end if;
  return v_keys;
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
  perform 1 from public.credit_wallets w where w.account_id = v_account_id for update;  -- the wallet first
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
-- invoice.paid: a period longer than a month (a yearly price) starts with
-- its month that contains now (its first month, unless the invoice arrives
-- late), from the period's anniversary; the account records the year's
-- start, end, seats and payment for the monthly renewals (the reset chapter).
create or replace function private.stripe_invoice_paid_yearly(p jsonb) returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_reason text := private.stripe_text(p, 'billing_reason');
  v_year_start timestamptz;
  v_paid_through timestamptz;
  v_quantity bigint;
  v_month record;
  v_lines jsonb;
  v_res jsonb;
begin
  if v_reason is not distinct from 'subscription_update'
     or jsonb_typeof(p -> 'lines') is distinct from 'array' then
    return private.stripe_invoice_paid(p);
  end if;
  -- The yearly plan line's period, and its current month in its place.
  select min(private.stripe_time(l, 'period_start')), max(private.stripe_time(l, 'period_end')),
         max(private.stripe_int(l, 'quantity'))
    into v_year_start, v_paid_through, v_quantity
    from jsonb_array_elements(p -> 'lines') l
   where private.stripe_time(l, 'period_end') > private.stripe_time(l, 'period_start') + interval '32 days';
  if v_paid_through is null then
    return private.stripe_invoice_paid(p);
  end if;
  v_month := private.anniversary_month(v_year_start, least(greatest(now(), v_year_start),
                                                           v_paid_through - interval '1 second'));
  select jsonb_agg(case when private.stripe_time(l, 'period_end')
                              > private.stripe_time(l, 'period_start') + interval '32 days'
                        then l || jsonb_build_object(
                               'period_start', extract(epoch from v_month.month_start)::bigint,
                               'period_end', extract(epoch from least(v_month.month_end, v_paid_through))::bigint)
                        else l end)
    into v_lines from jsonb_array_elements(p -> 'lines') l;
  v_res := private.stripe_invoice_paid(p || jsonb_build_object('lines', v_lines));
  if v_res ->> 'outcome' = 'applied' and v_res ->> 'reason' = 'period_started' then
    update public.credit_accounts a
       set stripe_paid_through = v_paid_through, stripe_paid_until = v_paid_through,
           stripe_quantity = coalesce(v_quantity, 1), stripe_paid_scale = 1, stripe_period_start = v_year_start,
           stripe_paid_ref = coalesce(private.stripe_text(p, 'payment_intent'), private.stripe_text(p, 'invoice')),
           updated_at = now()
     where a.id = (v_res ->> 'account_id')::uuid;
  end if;
  return v_res;
end
$$;

-- Does the reset of the month starting p_start renew this account (see the
-- header)? 'anniversary' for a yearly price's next month, 'calendar' for the
-- calendar month, null for not now.
create or replace function private.reset_due(p_account public.credit_accounts, p_wallet public.credit_wallets,
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
    -- The paid year ended as paid: its renewal invoice may take up to 72 hours. (A year
    -- stopped by a refund or a dispute falls back to the calendar month at once.)
    if p_account.stripe_paid_through >= p_account.stripe_paid_until
       and p_account.stripe_paid_through + interval '72 hours' > v_at then
      return null;
    end if;
  end if;
  return case when p_wallet.period_start is null or p_wallet.period_start < p_start then 'calendar' end;
end
$$;
