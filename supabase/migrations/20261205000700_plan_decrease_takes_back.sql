-- A decrease invoiced mid-period that credits money back takes back the
-- credits that money had bought.
--
-- An upgrade then an immediate downgrade (proration_behavior=always_invoice)
-- kept the prorated upgrade grant while the money went back. A
-- subscription_update invoice whose allowance is lower than the period's best
-- and that has negative proration lines now takes back, from this period's
-- increase grants, floor(credits they granted x the money credited back /
-- the positive proration paid for them), newest first, never below zero.
-- Increase grants record what their invoice's positive proration charged
-- ('paid' in their metadata); those recorded before count for nothing.

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
    -- The money of the change: what its positive proration lines charge and
    -- what its negative ones credit back (both in the invoice's currency).
    return private.stripe_plan_change(
      v_account, v_invoice, v_ref, v_allowance, v_start, v_end,
      jsonb_build_object('invoice', v_invoice, 'subscription', v_subscription, 'price_id', v_price,
                         'quantity', v_quantity,
                         'paid', (select coalesce(sum(private.stripe_int(l, 'amount')), 0)
                                    from jsonb_array_elements(v_lines) l
                                   where l ->> 'proration' = 'true' and private.stripe_int(l, 'amount') > 0),
                         'credited', (select coalesce(-sum(private.stripe_int(l, 'amount')), 0)
                                        from jsonb_array_elements(v_lines) l
                                       where l ->> 'proration' = 'true' and private.stripe_int(l, 'amount') < 0)),
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

-- A plan or quantity change invoiced mid-period: grant the increase over the
-- best allowance the period had, prorated to what is left of it (rounded
-- down), as promotional credits expiring with the period.
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
  v_result jsonb;
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
           coalesce(max((t.metadata ->> 'allowance')::bigint) filter (where t.kind = 'promotion'
                                                                      and t.metadata ? 'allowance'), 0))
    into v_best
    from public.credit_transactions t
   where t.account_id = p_account_id and t.period_start = v_wallet.period_start
     and t.kind in ('grant', 'promotion');
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
  v_result := private.grant_promotional(p_account_id, v_grant::integer, v_wallet.period_end,
                                        'invoice:' || p_invoice, 'plan change',
                                        p_metadata || jsonb_build_object('allowance', p_allowance,
                                                                         'previous_allowance', v_best),
                                        p_ref, 'stripe');
  return private.stripe_result('applied', case when (v_result ->> 'replayed')::boolean then 'already_granted'
                                               else 'allowance_raised' end,
                               p_account_id, v_result, p_touched);
end
$$;

-- A decrease invoiced mid-period that credits the customer money back
-- (p_credited, its negative proration) takes back, from this period's
-- increase grants, the credits that money had bought: floor(credits they
-- granted x p_credited / the positive proration paid for them), newest grant
-- first, never below zero (what was spent is the shortfall). Increases
-- recorded before the paid amount was kept count for nothing.
create function private.stripe_plan_decrease(p_wallet public.credit_wallets, p_invoice text, p_credited bigint,
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
  v_shortfall bigint := 0;
begin
  select coalesce(sum(t.promotional), 0), coalesce(sum((t.metadata ->> 'paid')::bigint), 0)
    into v_granted, v_paid
    from public.credit_transactions t
   where t.account_id = p_wallet.account_id and t.kind = 'promotion' and t.origin = 'stripe'
     and t.period_start = p_wallet.period_start and t.metadata ? 'allowance'
     and (t.metadata ->> 'paid')::bigint > 0;
  if v_paid = 0 then
    return private.stripe_result('ignored', 'not_an_increase', p_wallet.account_id);
  end if;
  v_target := least(v_granted, floor(v_granted::numeric * p_credited / v_paid)::bigint);
  for v_grant in select t.stripe_ref, sum(t.promotional)::bigint as granted, max(t.seq) as seq
                   from public.credit_transactions t
                  where t.account_id = p_wallet.account_id and t.kind = 'promotion' and t.origin = 'stripe'
                    and t.period_start = p_wallet.period_start and t.metadata ? 'allowance'
                    and (t.metadata ->> 'paid')::bigint > 0
                  group by t.stripe_ref order by max(t.seq) desc loop
    exit when v_taken + v_shortfall >= v_target;
    select coalesce(-sum(c.promotional + c.subscription + c.purchased), 0) into v_done
      from public.credit_transactions c
     where c.account_id = p_wallet.account_id and c.stripe_ref = v_grant.stripe_ref
       and c.kind in ('clawback', 'reinstate');
    v_take := least(v_grant.granted - v_done, v_target - v_taken - v_shortfall);
    continue when v_take <= 0;
    v_result := private.clawback(v_grant.stripe_ref, 'decrease:' || p_invoice || ':' || v_grant.stripe_ref,
                                 (v_done + v_take)::integer, 'plan decrease', 'stripe');
    v_taken := v_taken + (v_result ->> 'clawed_back')::bigint;
    v_shortfall := v_shortfall + v_take - (v_result ->> 'clawed_back')::bigint;
  end loop;
  return private.stripe_result('applied', 'allowance_lowered', p_wallet.account_id,
                               jsonb_build_object('clawed_back', v_taken, 'shortfall', v_shortfall), p_touched);
end
$$;

revoke all on function private.stripe_plan_decrease(public.credit_wallets, text, bigint, text[]) from public;
