-- Stripe as it bills today: what the webhook does since 0.2.0.
--
-- One chapter in sections, each replacing or adding what it names (the
-- migrations before this one are released and stay as they are):
--   1. events that can never apply are recorded as failed, not retried;
--   2. no relinking of an account with another customer's active subscription;
--   3. seats, and plan changes invoiced mid-period;
--   4. refunds and disputes of subscription payments on every API version,
--      and disputes won;
--   5. plans priced yearly, renewed month by month within the paid year;
--   6. parked events at scale.
-- The dispatcher, private.stripe_apply, is at the end of section 5.

-- ===========================================================================
-- 1. Stripe: an event that can never be applied is recorded as failed, not retried.
-- ===========================================================================
--
-- Stripe retries every non-2xx answer for three days. Only a transient failure
-- (connection, timeout, serialization, lock timeout) deserves that; an event
-- the engine refuses for good is recorded as `failed`, with its reason, for an
-- operator, and answered 2xx:
--   * a refusal by the database that the same event would meet again: the
--     data-exception and integrity classes (22xxx, 23xxx) as well as the
--     contract's own errors (PTxxx);
--   * an event the webhook could not reduce to facts (an unexpected shape, a
--     NUL character in its text): the webhook sends {"invalid": reason}.

-- Apply in a subtransaction: a permanent refusal undoes everything the event
-- did and becomes a 'failed' outcome; anything else (connection, timeout,
-- serialization, a lock timeout, a bug) aborts the whole call so Stripe retries.
create or replace function private.stripe_attempt(p_type text, p jsonb) returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_state text;
  v_message text;
  v_detail text;
begin
  return private.stripe_apply(p_type, p);
exception when others then
  get stacked diagnostics v_state = returned_sqlstate, v_message = message_text, v_detail = pg_exception_detail;
  if v_state like 'PT%' or left(v_state, 2) in ('22', '23') then
    return private.stripe_result('failed', v_message)
           || jsonb_build_object('error', jsonb_build_object('code', v_state, 'message', v_message,
                                                             'detail', private.stripe_detail(v_detail)));
  end if;
  raise;
end
$$;

-- ===========================================================================
-- 2. Stripe: an account is never relinked to another customer's subscription.
-- ===========================================================================
--
-- A subscription checkout names its account (client_reference_id or
-- metadata.account_id). If that account already has an active (or trialing,
-- or past-due) subscription of another Stripe customer, linking the new one
-- would detach the paying one: cancelling the new subscription would put the
-- account on free and the next reset would expire what the other customer
-- paid for. Such a checkout is refused (`account_has_active_subscription`),
-- recorded as failed for an operator, and changes nothing. The same
-- customer's second checkout (an upgrade by checkout) still replaces its own
-- subscription.

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

-- ===========================================================================
-- 3. Stripe: seats, and plan changes invoiced mid-period.
-- ===========================================================================
--
-- `invoice.paid` now reads its billing reason:
--   * `subscription_create`, `subscription_cycle` (or none, as older events
--     have): start the period from the plan line, granting the plan's monthly
--     credits times the line's quantity (seats);
--   * `subscription_update` (a plan or quantity change invoiced at once):
--     never restart the period. The new allowance (the new plan line's
--     monthly credits times its quantity) is compared with the best
--     allowance this period already had (its grant, and earlier changes): an
--     increase grants the difference prorated to the part of the period left
--     (rounded down), as promotional credits expiring with the period, keyed
--     by the invoice; a decrease grants nothing now (the next period's
--     invoice grants the new allowance). So toggling plans never yields more
--     in a period than the best single plan would. A change delivered
--     before the invoice that started its period waits, parked, for it;
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

  v_account := private.stripe_account(v_hint, v_customer, v_subscription);
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

-- A plan or quantity change invoiced mid-period: grant the increase over the
-- best allowance the period had, prorated to what is left of it (rounded
-- down), as promotional credits expiring with the period.
create function private.stripe_plan_change(p_account_id uuid, p_invoice text, p_ref text, p_allowance bigint,
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

revoke all on function private.stripe_plan_change(uuid, text, text, bigint, timestamptz, timestamptz, jsonb, text[])
  from public;

-- ===========================================================================
-- 4. Stripe: refunds and disputes of subscription payments on every API version,
-- ===========================================================================

-- and disputes that are won.
--
-- From API version 2025-03-31 an invoice no longer names its payment intent
-- and a charge no longer names its invoice, so a refund of a subscription
-- payment cannot find the invoice's grant by its payment. `invoice_payment.paid`
-- says which payment paid which invoice; it is kept in stripe_payments, and a
-- refund or dispute whose payment granted nothing itself is applied to the
-- grant of the invoice it paid (waiting, parked, until that is known).
--
-- A dispute takes back what its payment granted (`charge.dispute.created`, or
-- `charge.dispute.funds_withdrawn`: the same clawback, once). When it is won
-- (`charge.dispute.funds_reinstated`, or `charge.dispute.closed` with status
-- `won`, whichever comes first, however often) exactly what the dispute's
-- clawback took is given back, once, into the same pool, and what it had
-- claimed on holds still active is released from them. A lost dispute
-- changes nothing more. A win that arrives before the dispute's creation waits,
-- parked, for it.

create table public.stripe_payments (
  payment_ref text primary key check (length(payment_ref) between 1 and 255),
  invoice text not null check (length(invoice) between 1 and 255),
  created_at timestamptz not null default now()
);
comment on table public.stripe_payments is
  'Which Stripe payment (payment intent or charge) paid which invoice, from invoice_payment.paid.';

alter table public.stripe_payments enable row level security;
revoke all on public.stripe_payments from anon, authenticated, service_role;
grant select on public.stripe_payments to service_role;

-- The Stripe reference a payment's grants were recorded under: the payment's
-- own, or the invoice it paid; null while neither is known.
create function private.stripe_grant_ref(p_payment text) returns text
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_invoice text;
begin
  if p_payment is null then
    return null;
  end if;
  if (select g.granted from private.payment_grants(p_payment) g) is not null then
    return p_payment;
  end if;
  select sp.invoice into v_invoice from public.stripe_payments sp where sp.payment_ref = p_payment;
  if v_invoice is not null and (select g.granted from private.payment_grants(v_invoice) g) is not null then
    return v_invoice;
  end if;
  return null;
end
$$;

-- invoice_payment.paid: remember which payment paid which invoice.
create function private.stripe_invoice_payment(p jsonb) returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_invoice text := private.stripe_text(p, 'invoice');
  v_refs text[] := array_remove(array[private.stripe_text(p, 'payment_intent'),
                                      private.stripe_text(p, 'charge')], null);
begin
  if v_invoice is null or cardinality(v_refs) = 0 then
    perform private.invalid('invoice_payment', 'an invoice and its payment are required');
  end if;
  insert into public.stripe_payments (payment_ref, invoice)
  select r, v_invoice from unnest(v_refs) r
  on conflict (payment_ref) do nothing;
  return private.stripe_result('applied', 'payment_recorded', null,
                               jsonb_build_object('invoice', v_invoice, 'payments', to_jsonb(v_refs)),
                               array(select 'payment:' || r from unnest(v_refs) r));
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
  v_ref := coalesce(private.stripe_grant_ref(v_payment), private.stripe_grant_ref(private.stripe_text(p, 'charge')));
  if v_ref is null then
    return private.stripe_result('parked', 'payment_unknown', null, null, '{}',
                                 array_remove(array['payment:' || v_payment,
                                                    'payment:' || private.stripe_text(p, 'charge')], null));
  end if;
  v_result := private.clawback(v_ref, 'dispute:' || v_dispute, null, 'dispute', 'stripe');
  -- A win that arrived first waits on the dispute.
  return private.stripe_result('applied', 'clawed_back', (v_result -> 'balance' ->> 'account_id')::uuid,
                               v_result, array['dispute:' || v_dispute]);
end
$$;

-- charge.dispute.funds_reinstated, charge.dispute.closed: a won dispute gives
-- back exactly what its clawback took, once.
create function private.stripe_dispute_won(p_type text, p jsonb) returns jsonb
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
  v_entry := private.post(v_taken.account_id, 'reinstate',
                          p_promotional => -v_taken.promotional, p_subscription => -v_taken.subscription,
                          p_purchased => -v_taken.purchased, p_origin => 'stripe',
                          p_key => 'reinstate:' || v_dispute, p_hash => v_hash,
                          p_ref_id => v_taken.id, p_stripe_ref => v_taken.stripe_ref,
                          p_metadata => jsonb_build_object('reason', 'dispute won', 'dispute', v_dispute));
  return private.stripe_result('applied', 'reinstated', v_taken.account_id, private.result(v_entry, false));
end
$$;

revoke all on function private.stripe_grant_ref(text), private.stripe_invoice_payment(jsonb),
  private.stripe_dispute_won(text, jsonb) from public;

-- ===========================================================================
-- 5. Stripe: plans priced yearly grant their monthly credits each month of the
-- ===========================================================================

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

-- ===========================================================================
-- 6. Stripe: parked events at scale.
-- ===========================================================================
--
-- Events for a customer not linked to an account yet are parked and applied
-- when the link arrives. With thousands parked on one customer, releasing
-- them must not take the linking event (and, through the webhook's lock,
-- every other customer's events) down with it:
--   * a release walks the parked events in waves (the keys the link made
--     known, then the keys the released events made known), each event once
--     per wave, in delivery order: time linear in their number;
--   * of a subscription's parked updates only the newest is applied; the
--     others are recorded as ignored (`superseded`);
--   * one call releases at most 500 events; the rest are marked ready and
--     released by the next calls (each webhook call releases up to 100 after
--     its own event, and `release_stripe_events` releases on demand), so no
--     lock is held across the whole release;
--   * at most 10,000 events are parked per customer; beyond, an event is
--     recorded as failed (`too_many_parked`) for an operator.

-- The release gains a budget (and handle_stripe_event below calls the new one).
drop function private.stripe_unpark(text[]);

create index stripe_events_parked_customer_idx on public.stripe_events (customer_id) where outcome = 'parked';

-- How many events may wait, parked, for one customer.
create function private.stripe_parked_cap() returns integer
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  return 10000;
end
$$;

create or replace function private.stripe_unpark(p_keys text[], p_budget integer default 500) returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_wave text[] := p_keys;
  v_seen text[] := p_keys;
  v_next text[];
  v_event record;
  v_res jsonb;
  v_done integer := 0;
  v_out jsonb := '[]'::jsonb;
begin
  while cardinality(v_wave) > 0 loop
    -- A subscription's older parked updates are superseded by its newest.
    update public.stripe_events e
       set outcome = 'ignored', reason = 'superseded', parked_on = '{}', attempts = e.attempts + 1,
           processed_at = now()
     where e.outcome = 'parked' and e.parked_on && v_wave and e.type = 'customer.subscription.updated'
       and exists (select 1 from public.stripe_events n
                    where n.outcome = 'parked' and n.type = e.type and n.subscription_id = e.subscription_id
                      and (n.stripe_created, n.event_id) > (e.stripe_created, e.event_id));
    v_next := '{}';
    for v_event in select e.event_id, e.type, e.payload from public.stripe_events e
                    where e.outcome = 'parked' and e.parked_on && v_wave
                    order by e.stripe_created nulls last, e.first_received_at, e.event_id loop
      exit when v_done >= p_budget;
      v_res := private.stripe_attempt(v_event.type, v_event.payload);
      perform private.stripe_store(v_event.event_id, v_event.type, v_event.payload, v_res, false);
      v_done := v_done + 1;
      v_out := v_out || jsonb_build_array(jsonb_build_object('event_id', v_event.event_id,
                                                             'outcome', v_res ->> 'outcome'));
      if v_res ->> 'outcome' = 'applied' then
        v_next := v_next || array(select jsonb_array_elements_text(v_res -> 'touched'));
      end if;
    end loop;
    if v_done >= p_budget then
      -- Over this call's budget: what is left waits, ready, for the next calls.
      update public.stripe_events e set parked_on = array_append(e.parked_on, 'ready')
       where e.outcome = 'parked' and e.parked_on && (v_wave || v_next) and not ('ready' = any (e.parked_on));
      exit;
    end if;
    v_wave := array(select distinct k from unnest(v_next) k where k <> all (v_seen));
    v_seen := v_seen || v_wave;
  end loop;
  return v_out;
end
$$;

create or replace function private.handle_stripe_event(p_event_id text, p_type text, p_payload jsonb) returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_existing public.stripe_events;
  v_res jsonb;
  v_unparked jsonb := '[]'::jsonb;
  v_customer text := private.stripe_text(p_payload, 'customer');
begin
  perform private.require_service();
  if p_event_id is null or length(p_event_id) not between 1 and 255 then
    perform private.invalid('p_event_id', 'must be 1 to 255 characters');
  end if;
  if p_type is null or length(p_type) not between 1 and 255 then
    perform private.invalid('p_type', 'must be 1 to 255 characters');
  end if;
  if p_payload is null or jsonb_typeof(p_payload) <> 'object' then
    perform private.invalid('p_payload', 'must be a JSON object');
  end if;

  -- One event at a time (see the Stripe chapter); also makes concurrent redeliveries queue.
  perform pg_advisory_xact_lock(7349210455160013);

  select * into v_existing from public.stripe_events e where e.event_id = p_event_id;
  if found and v_existing.outcome in ('applied', 'ignored') then
    update public.stripe_events e
       set deliveries = e.deliveries + 1, last_received_at = now()
     where e.event_id = p_event_id;
    return jsonb_build_object('event_id', p_event_id, 'type', v_existing.type, 'outcome', 'duplicate',
                              'first_outcome', v_existing.outcome, 'account_id', v_existing.account_id);
  end if;

  v_res := private.stripe_attempt(p_type, p_payload);
  if v_res ->> 'outcome' = 'parked' and v_customer is not null
     and (select count(*) from public.stripe_events e
           where e.outcome = 'parked' and e.customer_id = v_customer and e.event_id <> p_event_id)
         >= private.stripe_parked_cap() then
    v_res := private.stripe_result('failed', 'too_many_parked')
             || jsonb_build_object('error', jsonb_build_object('code', 'PT409', 'message', 'too_many_parked',
                                                               'detail', jsonb_build_object('customer', v_customer)));
  end if;
  perform private.stripe_store(p_event_id, p_type, p_payload, v_res, true);
  if v_res ->> 'outcome' = 'applied' and jsonb_array_length(v_res -> 'touched') > 0 then
    v_unparked := private.stripe_unpark(array(select jsonb_array_elements_text(v_res -> 'touched')));
  end if;
  -- A little of what earlier releases left ready, within this call's share.
  v_unparked := v_unparked
                || private.stripe_unpark(array['ready'], greatest(0, least(100, 500 - jsonb_array_length(v_unparked))));
  return jsonb_build_object('event_id', p_event_id, 'type', p_type, 'outcome', v_res ->> 'outcome',
                            'reason', v_res ->> 'reason', 'error', v_res -> 'error' ->> 'message',
                            'account_id', v_res ->> 'account_id', 'unparked', v_unparked);
end
$$;

-- Release up to p_limit parked events that are ready (their link arrived, the
-- releasing call's budget ran out). For operators and schedules.
create function private.release_stripe_events(p_limit integer) returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_out jsonb;
begin
  perform private.require_service();
  if p_limit is null or p_limit not between 1 and 10000 then
    perform private.invalid('p_limit', 'must be 1 to 10000');
  end if;
  perform pg_advisory_xact_lock(7349210455160013);
  v_out := private.stripe_unpark(array['ready'], p_limit);
  return jsonb_build_object('released', jsonb_array_length(v_out),
                            'remaining', (select count(*) from public.stripe_events e
                                           where e.outcome = 'parked' and 'ready' = any (e.parked_on)));
end
$$;

create function public.release_stripe_events(p_limit integer default 500) returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.release_stripe_events(p_limit);
end
$$;
comment on function public.release_stripe_events(integer) is
  'Service: apply up to p_limit parked Stripe events whose link arrived. {released, remaining}.';

revoke all on function private.stripe_unpark(text[], integer), private.release_stripe_events(integer),
  private.stripe_parked_cap(),
  public.release_stripe_events(integer) from public, anon, authenticated, service_role;
grant execute on function private.release_stripe_events(integer), public.release_stripe_events(integer)
  to service_role;

