-- Stripe webhook: the event log and the one function the webhook calls.
--
-- The webhook Lambda verifies Stripe's signature, reduces the event to a small
-- version-independent JSON object (functions/stripe_events.py) and calls
-- public.handle_stripe_event(event id, type, payload) with the service role.
-- That call, in ONE transaction:
--   * records the event in public.stripe_events with its outcome:
--       applied  - it changed something (credits, a link, plan or status);
--       ignored  - nothing to do (a type we do not act on, an unknown price,
--                  an unpaid checkout, a stale or superseded subscription
--                  update, ...);
--       parked   - what it needs is not known yet (the account; for a refund
--                  or dispute, the payment's grant; for a mid-period plan
--                  change, the invoice that started the period; for a won
--                  dispute, the dispute); it is applied when an event makes
--                  that known;
--       failed   - refused for good, so Stripe must not retry it: any error
--                  while applying it (a contract error such as
--                  account_not_found, a data or integrity error, a bug),
--                  with its SQLSTATE and message; an event the webhook could
--                  not reduce to facts (it sends {"invalid": reason}); too
--                  many events parked for one customer; or a fifth transient
--                  failure (transient_repeated). Nothing of it is applied;
--       retrying - applying it failed transiently (a deadlock, a lock or
--                  statement timeout): nothing of it is applied, the failure
--                  is counted, and the webhook answers 500 so Stripe
--                  delivers it again;
--     and a repeated delivery of an applied or ignored event answers
--     `duplicate` and changes nothing (the others are tried again);
--   * applies it through the contract functions, keyed by the Stripe object
--     (checkout session, invoice, charge + cumulative refund, dispute), so two
--     different events about one payment never grant twice.
-- One event never blocks another: each is applied in its own subtransaction
-- (private.stripe_attempt), so whatever goes wrong is recorded on that event
-- alone. Only a failure of the call itself (the connection) answers 500
-- without a record.
--
-- The flows (one function each, dispatched by private.stripe_apply):
--   * checkout.session.completed / async_payment_succeeded: a credit pack is
--     purchased; a subscription checkout links the customer and subscription
--     to the account it names; a setup-mode checkout (a saved card, for auto
--     top-up) or a pack bought with a customer links the customer. An account with an active subscription of
--     another customer is never relinked (account_has_active_subscription).
--   * invoice.paid, by billing reason: a period start (subscription_create,
--     subscription_cycle, or none) grants the plan's monthly credits times
--     the plan line's quantity (seats), on the account of the invoice's
--     customer (stripe_billing_account); a period longer than a month (a
--     yearly price) grants its month that contains now and records the
--     year (start, stripe_paid_through, seats, payment), and the reset
--     renews the following months on their anniversaries within it (a
--     monthly period clears that record); a plan or quantity change
--     invoiced mid-period (subscription_update) grants the increase over the
--     best allowance the period already had, prorated to what is left of
--     it, as promotional credits expiring with the period; a decrease grants
--     nothing, and takes back what its money back had bought of the
--     period's increases.
--   * invoice_payment.paid: which payment paid which invoice
--     (stripe_payments), so refunds and disputes of subscription payments find
--     their grant on API versions whose charges no longer name the invoice.
--   * customer.subscription.updated / deleted: plan, status and seats follow
--     the latest event (Stripe does not guarantee order); a subscription that
--     no longer pays puts the account on free (and the reset renews it with
--     the free plan's allowance).
--   * payment_intent.succeeded / payment_failed: the outcome of an auto
--     top-up's payment (the auto top-up chapter), when its metadata names a
--     top-up of the customer's account; any other payment is ignored.
--   * charge.refunded: claw back round(granted * refunded / amount) in total
--     (refunds arrive cumulative), from the payment's own credits; a refund
--     of a yearly payment shrinks (or, in full, stops) the year's later
--     months. charge.dispute.created or funds_withdrawn: claw back
--     everything the payment granted, once (an inquiry takes nothing), and
--     stop a disputed year; funds_reinstated, or closed as won: give back
--     exactly what that dispute took, also through holds, once (credits of
--     an ended period expire at once), and resume the year.
--
-- Events are applied one at a time (a transaction-level advisory lock): Stripe
-- sends few events, and serial application makes "park, then apply when the
-- link arrives" race-free. Like every call on an account, an event locks the
-- account's wallet before its account row (a spend's ledger row share-locks
-- the account row after the wallet). With many events
-- parked on one customer the release stays bounded: it walks them in waves
-- (each event once per wave, in delivery order), applies only the newest of
-- a subscription's parked updates (the others are `superseded`), and
-- applies at most p_limit per call. A delivery never applies another event:
-- the parked events its link unblocks become ready, and
-- release_stripe_events applies them (the webhook calls it after the
-- delivery's own transaction, its schedule every 5 minutes), each in its own
-- subtransaction; a transient failure leaves that one ready and counted. At
-- most 10,000 events wait per customer.

-- ---------------------------------------------------------------------------
-- The event log and the payments of invoices. Read by operators (table
-- editor, service_role); written only by this chapter's functions. They hold
-- the normalised facts, never the raw body.
-- ---------------------------------------------------------------------------

create table public.stripe_events (
  event_id text primary key check (length(event_id) between 1 and 255),
  type text not null check (length(type) between 1 and 255),
  outcome text not null check (outcome in ('applied', 'ignored', 'parked', 'failed', 'retrying')),
  reason text,
  error jsonb,
  account_id uuid references public.credit_accounts (id) on delete set null,
  customer_id text,
  subscription_id text,
  payment_ref text,
  -- What a parked event waits for: 'customer:cus_…', 'subscription:sub_…', 'payment:pi_…'.
  parked_on text[] not null default '{}',
  stripe_created timestamptz,
  livemode boolean not null default false,
  api_version text,
  payload jsonb not null,
  result jsonb,
  deliveries integer not null default 1,
  attempts integer not null default 1,
  first_received_at timestamptz not null default now(),
  last_received_at timestamptz not null default now(),
  processed_at timestamptz not null default now(),
  -- Transient failures so far (the fifth records it as failed, transient_repeated).
  transient_failures integer not null default 0
);
comment on table public.stripe_events is
  'Every Stripe event received (normalised), with its outcome: applied, ignored, parked, failed or retrying.';

create index stripe_events_parked_idx on public.stripe_events using gin (parked_on) where outcome = 'parked';
create index stripe_events_subscription_idx on public.stripe_events (subscription_id, stripe_created)
  where subscription_id is not null and outcome = 'applied';
create index stripe_events_account_idx on public.stripe_events (account_id) where account_id is not null;
create index stripe_events_parked_customer_idx on public.stripe_events (customer_id) where outcome = 'parked';

alter table public.stripe_events enable row level security;
revoke all on public.stripe_events from anon, authenticated, service_role;
grant select on public.stripe_events to service_role;

-- Which payment paid which invoice (invoice_payment.paid): from API version
-- 2025-03-31 an invoice no longer names its payment intent and a charge no
-- longer names its invoice, so a refund or dispute of a subscription payment
-- finds the invoice's grant through this table.
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

-- ---------------------------------------------------------------------------
-- Small readers of the normalised payload (numbers arrive as JSON numbers).
-- ---------------------------------------------------------------------------

create function private.stripe_int(p jsonb, p_key text)
returns bigint
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  return case when jsonb_typeof(p -> p_key) = 'number' and (p ->> p_key) ~ '^-?[0-9]{1,18}$'
                then (p ->> p_key)::bigint end;
end
$$;

create function private.stripe_time(p jsonb, p_key text)
returns timestamptz
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  return to_timestamp(private.stripe_int(p, p_key));
end
$$;

create function private.stripe_text(p jsonb, p_key text)
returns text
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  return case when jsonb_typeof(p -> p_key) = 'string' and length(p ->> p_key) between 1 and 255
                then p ->> p_key end;
end
$$;

-- A contract error's detail is JSON text; anything else is kept as text.
create function private.stripe_detail(p_detail text) returns jsonb
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  if p_detail is null or p_detail = '' then
    return null;
  end if;
  return p_detail::jsonb;
exception when others then
  return to_jsonb(p_detail);
end
$$;

create function private.stripe_result(p_outcome text, p_reason text default null, p_account_id uuid default null,
                                      p_result jsonb default null, p_touched text[] default '{}',
                                      p_parked_on text[] default '{}')
returns jsonb
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  return jsonb_build_object('outcome', p_outcome, 'reason', p_reason, 'account_id', p_account_id,
                              'result', p_result, 'touched', to_jsonb(coalesce(p_touched, '{}')),
                              'parked_on', to_jsonb(coalesce(p_parked_on, '{}')));
end
$$;

-- Keys a parked event can wait for (only the ids the event carries).
create function private.stripe_wait_keys(p_customer text, p_subscription text)
returns text[]
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  return array_remove(array['customer:' || p_customer, 'subscription:' || p_subscription], null);
end
$$;

-- How many events may wait, parked, for one customer.
create function private.stripe_parked_cap() returns integer
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  return 10000;
end
$$;

-- ---------------------------------------------------------------------------
-- Accounts: which account an event is about, and linking Stripe ids to it.
-- ---------------------------------------------------------------------------

-- The explicit account id (client_reference_id / metadata.account_id) wins; it
-- must name an existing account. Otherwise the subscription, then the customer
-- linked earlier. Null: not known yet (the caller parks the event).
create function private.stripe_account(p_hint text, p_customer text, p_subscription text) returns uuid
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_id uuid;
begin
  if p_hint is not null then
    if p_hint !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' then
      perform private.invalid('account_id', 'must be a uuid');
    end if;
    select a.id into v_id from public.credit_accounts a where a.id = p_hint::uuid;
    if v_id is null then
      perform private.fail('PT404', 'account_not_found', jsonb_build_object('account_id', p_hint));
    end if;
    return v_id;
  end if;
  if p_subscription is not null then
    select a.id into v_id from public.credit_accounts a where a.stripe_subscription_id = p_subscription;
    if v_id is not null then
      return v_id;
    end if;
  end if;
  if p_customer is not null then
    select a.id into v_id from public.credit_accounts a where a.stripe_customer_id = p_customer;
  end if;
  return v_id;
end
$$;

-- The account of a subscription's invoice or event: its customer's account;
-- if none, the account its metadata names (the caller links it); else the
-- subscription's; null while none is known (parked). Metadata naming an
-- account linked to another customer is refused (account_of_another_customer):
-- an invoice acts only on its own customer's account.
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
    if v_named.stripe_customer_id is not null and v_named.stripe_customer_id is distinct from p_customer then
      perform private.fail('PT409', 'account_of_another_customer',
                           jsonb_build_object('account_id', p_hint, 'customer', p_customer));
    end if;
    return coalesce(v_id, v_named.id);
  end if;
  if v_id is null and p_subscription is not null then
    select a.id into v_id from public.credit_accounts a
     where a.stripe_subscription_id = p_subscription
       and (a.stripe_customer_id is null or p_customer is null or a.stripe_customer_id = p_customer);
  end if;
  return v_id;
end
$$;

-- Link a Stripe customer and subscription to an account; returns the keys now
-- resolvable (for parked events). The customer is recorded when the account
-- has none and no other account has it. The subscription replaces the
-- account's when p_replace (a new checkout) or when the account has none or
-- only an ended one; a subscription linked to another account is refused, and
-- so is a checkout that would detach another customer's active (trialing,
-- past-due) subscription from the account (cancelling the new one would put
-- the account on free and the next reset would expire what the other customer
-- paid for). The same customer's second checkout still replaces its own.
create function private.stripe_link(p_account_id uuid, p_customer text, p_subscription text,
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

-- Stripe does not guarantee order. The account's plan and status follow the
-- latest subscription event: true when this subscription's deletion, or an
-- update created after p_created, was already applied.
create function private.stripe_newer_state(p_subscription text, p_created timestamptz) returns boolean
language sql stable
set search_path = pg_catalog, pg_temp
as $$
  select exists (
    select 1 from public.stripe_events e
     where e.subscription_id = p_subscription and e.outcome = 'applied'
       and (e.type = 'customer.subscription.deleted'
            or (e.type = 'customer.subscription.updated' and e.stripe_created > p_created)))
$$;

-- ---------------------------------------------------------------------------
-- One function per flow. Each returns private.stripe_result(...).
-- ---------------------------------------------------------------------------

-- checkout.session.completed / checkout.session.async_payment_succeeded.
create function private.stripe_checkout(p_type text, p jsonb) returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_session text := private.stripe_text(p, 'session');
  v_customer text := private.stripe_text(p, 'customer');
  v_subscription text := private.stripe_text(p, 'subscription');
  v_price text := private.stripe_text(p, 'price_id');
  v_account uuid;
  v_credits bigint;
  v_quantity bigint;
  v_ref text;
  v_plan text;
  v_new boolean;
  v_keys text[];
  v_result jsonb;
begin
  if v_session is null then
    perform private.invalid('session', 'missing');
  end if;

  if p ->> 'mode' = 'subscription' then
    if v_subscription is null then
      return private.stripe_result('ignored', 'no_subscription');
    end if;
    v_account := private.stripe_account(private.stripe_text(p, 'account_id'), v_customer, null);
    if v_account is null then
      return private.stripe_result('parked', 'account_unknown', null, null, '{}',
                                   private.stripe_wait_keys(v_customer, null));
    end if;
    v_new := not exists (select 1 from public.credit_accounts a
                          where a.id = v_account and a.stripe_subscription_id = v_subscription);
    v_keys := private.stripe_link(v_account, v_customer, v_subscription, 'active', true);
    select pl.id into v_plan from public.credit_plans pl where pl.stripe_price_id = v_price;
    -- Only a new link sets the plan: a later update or the deletion may have been applied already.
    if v_new and v_plan is not null
       and not private.stripe_newer_state(v_subscription, private.stripe_time(p, 'created')) then
      update public.credit_accounts a set plan_id = v_plan, updated_at = now()
       where a.id = v_account and a.stripe_subscription_id = v_subscription;
    end if;
    return private.stripe_result('applied', 'subscription_linked', v_account,
                                 jsonb_build_object('subscription', v_subscription, 'plan_id', v_plan), v_keys);
  end if;

  -- A setup-mode session saves the customer's payment method (for auto
  -- top-up): it links the customer to the session's account, no relink.
  if p ->> 'mode' = 'setup' then
    if v_customer is null then
      return private.stripe_result('ignored', 'no_customer');
    end if;
    v_account := private.stripe_account(private.stripe_text(p, 'account_id'), v_customer, null);
    if v_account is null then
      return private.stripe_result('parked', 'account_unknown', null, null, '{}',
                                   private.stripe_wait_keys(v_customer, null));
    end if;
    v_keys := private.stripe_link(v_account, v_customer, null, null, false);
    return private.stripe_result('applied', 'customer_linked', v_account,
                                 jsonb_build_object('customer', v_customer,
                                                    'linked', (select a.stripe_customer_id = v_customer
                                                                 from public.credit_accounts a
                                                                where a.id = v_account)), v_keys);
  end if;

  if coalesce(p ->> 'mode', '') <> 'payment' then
    return private.stripe_result('ignored', 'unsupported_mode');
  end if;
  -- Delayed payment methods complete the session unpaid; async_payment_succeeded follows.
  if p_type = 'checkout.session.completed'
     and coalesce(p ->> 'payment_status', '') not in ('paid', 'no_payment_required') then
    return private.stripe_result('ignored', 'payment_pending');
  end if;

  if p -> 'credits' is not null and jsonb_typeof(p -> 'credits') <> 'null' then
    v_credits := private.stripe_int(p, 'credits');
    if v_credits is null then
      perform private.invalid('metadata.credits', 'must be a whole number');
    end if;
  else
    if v_price is null then
      return private.stripe_result('ignored', 'not_a_credit_pack');
    end if;
    select pk.credits into v_credits from public.credit_packs pk where pk.stripe_price_id = v_price;
    if v_credits is null then
      return private.stripe_result('ignored', 'unknown_price');
    end if;
    if p -> 'quantity' is not null and jsonb_typeof(p -> 'quantity') <> 'null' then
      v_quantity := private.stripe_int(p, 'quantity');
      if v_quantity is null or v_quantity < 1 or v_quantity > 1000000 then
        perform private.invalid('metadata.quantity', 'must be a whole number from 1 to 1000000');
      end if;
      v_credits := v_credits * v_quantity;
    end if;
  end if;
  perform private.check_amount('metadata.credits', v_credits);

  v_account := private.stripe_account(private.stripe_text(p, 'account_id'), v_customer, null);
  if v_account is null then
    return private.stripe_result('parked', 'account_unknown', null, null, '{}',
                                 private.stripe_wait_keys(v_customer, null));
  end if;
  v_ref := coalesce(private.stripe_text(p, 'payment_intent'), v_session);
  -- A payment with a customer links it too (no relink), before the wallet's lock is taken again.
  v_keys := case when v_customer is not null then private.stripe_link(v_account, v_customer, null, null, false)
                 else '{}' end;
  -- Arguments derive from the session only, so both events of one session are the same call.
  v_result := private.add_purchased(
    v_account, v_credits::integer, 'checkout:' || v_session, v_ref, 'Credit pack (Stripe Checkout)',
    jsonb_strip_nulls(jsonb_build_object('checkout_session', v_session, 'price_id', v_price,
                                         'quantity', v_quantity)), 'stripe');
  return private.stripe_result('applied', case when (v_result ->> 'replayed')::boolean then 'already_granted'
                                               else 'credits_purchased' end,
                               v_account, v_result, array['payment:' || v_ref] || v_keys);
end
$$;

-- invoice.paid (through stripe_invoice_paid_yearly), by billing reason:
--   * subscription_create, subscription_cycle, or none (older events): start
--     the period of the plan line, granting the plan's monthly credits times
--     the line's quantity (seats);
--   * subscription_update (a plan or quantity change invoiced at once): never
--     restart the period; private.stripe_plan_change decides;
--   * any other reason: ignored (`not_a_period_start`).
create function private.stripe_invoice_paid(p jsonb) returns jsonb
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
-- down), as a subscription grant of the period (source plan_change).
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

-- customer.subscription.updated / customer.subscription.deleted.
create function private.stripe_subscription_changed(p_type text, p jsonb) returns jsonb
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

-- Credits granted by a payment (its stripe_ref), or null when none yet. No
-- flow calls it since refunds and disputes find their grant with
-- stripe_grant_ref; it stays until a migration drops it.
create function private.stripe_granted(p_ref text) returns bigint
language sql stable
set search_path = pg_catalog, pg_temp
as $$
  select g.granted from private.payment_grants(p_ref) g
$$;

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
create function private.stripe_charge_refunded(p jsonb) returns jsonb
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
create function private.stripe_dispute_created(p jsonb) returns jsonb
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
create function private.stripe_dispute_won(p_type text, p jsonb) returns jsonb
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

-- invoice.paid: a period longer than a month (a yearly price) starts with
-- its month that contains now (its first month, unless the invoice arrives
-- late), from the period's anniversary; the account records the year's
-- start, end, seats and payment for the monthly renewals (the reset chapter).
create function private.stripe_invoice_paid_yearly(p jsonb) returns jsonb
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
    v_res := private.stripe_invoice_paid(p);
    if v_res ->> 'outcome' = 'applied' and v_res ->> 'reason' = 'period_started' then
      -- A monthly price now: its invoices renew it, no yearly months any more.
      update public.credit_accounts a
         set stripe_paid_through = null, stripe_paid_until = null, stripe_period_start = null,
             stripe_paid_ref = null, stripe_paid_scale = 1, updated_at = now()
       where a.id = (v_res ->> 'account_id')::uuid and a.stripe_paid_through is not null;
    end if;
    return v_res;
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

-- The dispatcher: one flow per event type. An event the webhook could not
-- reduce to facts ({"invalid": reason}) fails for good.
create function private.stripe_apply(p_type text, p jsonb) returns jsonb
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
    when 'payment_intent.succeeded', 'payment_intent.payment_failed' then
      return private.stripe_topup(p_type, p);
    else
      return private.stripe_result('ignored', 'unhandled_type');
  end case;
end
$$;

-- Apply in a subtransaction: whatever the event did is undone on any error.
-- A transient failure becomes outcome 'retry' (the caller counts it); any
-- other error becomes 'failed' with its SQLSTATE, message and detail.
create function private.stripe_attempt(p_type text, p jsonb) returns jsonb
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
  -- (A cancelled statement, e.g. the call's statement timeout, is not caught:
  -- it ends the whole call, whichever event was running.)
  get stacked diagnostics v_state = returned_sqlstate, v_message = message_text, v_detail = pg_exception_detail;
  return private.stripe_result(
           case when v_state in ('40001', '40P01', '55P03') or left(v_state, 2) in ('08', '53')
                then 'retry' else 'failed' end,
           left(v_message, 200))
         || jsonb_build_object('error', jsonb_build_object('code', v_state, 'message', v_message,
                                                           'detail', private.stripe_detail(v_detail)));
end
$$;

-- Store the outcome of one attempt (first delivery, redelivery or unparking).
create function private.stripe_store(p_event_id text, p_type text, p jsonb, p_res jsonb, p_delivery boolean)
returns void
language sql
set search_path = pg_catalog, pg_temp
as $$
  insert into public.stripe_events as e (event_id, type, outcome, reason, error, account_id, customer_id,
                                         subscription_id, payment_ref, parked_on, stripe_created, livemode,
                                         api_version, payload, result)
  values (p_event_id, p_type, p_res ->> 'outcome', p_res ->> 'reason', p_res -> 'error',
          (p_res ->> 'account_id')::uuid, private.stripe_text(p, 'customer'),
          private.stripe_text(p, 'subscription'),
          coalesce(private.stripe_text(p, 'payment_intent'), private.stripe_text(p, 'charge')),
          array(select jsonb_array_elements_text(p_res -> 'parked_on')), private.stripe_time(p, 'created'),
          coalesce((p ->> 'livemode')::boolean, false), private.stripe_text(p, 'api_version'), p,
          p_res -> 'result')
  on conflict (event_id) do update
     set outcome = excluded.outcome, reason = excluded.reason, error = excluded.error,
         account_id = coalesce(excluded.account_id, e.account_id), parked_on = excluded.parked_on,
         payload = excluded.payload, result = excluded.result,
         attempts = e.attempts + 1,
         deliveries = e.deliveries + case when p_delivery then 1 else 0 end,
         last_received_at = case when p_delivery then now() else e.last_received_at end,
         processed_at = now()
$$;

-- How many transient failures make an event failed (`transient_repeated`).
create function private.stripe_transient_cap() returns integer
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  return 5;
end
$$;

-- A transient failure of an event: counted on it; the cap-th makes it failed.
-- Returns the outcome recorded ('retrying', 'parked' for a released event that
-- waits for the next release, or 'failed').
create function private.stripe_transient(p_event_id text, p_type text, p jsonb, p_res jsonb, p_delivery boolean)
returns text
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_failures integer;
  v_outcome text;
begin
  v_failures := coalesce((select e.transient_failures from public.stripe_events e where e.event_id = p_event_id), 0) + 1;
  if v_failures >= private.stripe_transient_cap() then
    perform private.stripe_store(p_event_id, p_type, p,
                                 private.stripe_result('failed', 'transient_repeated')
                                 || jsonb_build_object('error', p_res -> 'error'), p_delivery);
    v_outcome := 'failed';
  elsif p_delivery then
    perform private.stripe_store(p_event_id, p_type, p,
                                 private.stripe_result('retrying', 'transient')
                                 || jsonb_build_object('error', p_res -> 'error'), true);
    v_outcome := 'retrying';
  else
    -- A released event stays parked and ready for the next release.
    update public.stripe_events e
       set error = p_res -> 'error', attempts = e.attempts + 1, processed_at = now()
     where e.event_id = p_event_id;
    v_outcome := 'parked';
  end if;
  update public.stripe_events e set transient_failures = v_failures where e.event_id = p_event_id;
  return v_outcome;
end
$$;

-- Mark the parked events waiting for any of p_keys ready; returns how many.
create function private.stripe_ready(p_keys text[]) returns integer
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_count integer;
begin
  update public.stripe_events e set parked_on = array_append(e.parked_on, 'ready')
   where e.outcome = 'parked' and e.parked_on && p_keys and not ('ready' = any (e.parked_on));
  get diagnostics v_count = row_count;
  return v_count;
end
$$;

-- Apply the parked events waiting for any of p_keys, in waves: the events
-- waiting on the keys, then those waiting on the keys they made known; each
-- event once per wave, in delivery order. A subscription's older parked
-- updates are superseded by its newest. Each event is applied in its own
-- subtransaction: a failure is recorded on it (a transient one leaves it
-- parked and ready, counted). At most p_budget events are applied; past it,
-- what is left is marked ready for the next calls.
create function private.stripe_unpark(p_keys text[], p_budget integer default 500) returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_wave text[] := p_keys;
  v_seen text[] := p_keys;
  v_tried text[] := '{}';
  v_next text[];
  v_event record;
  v_res jsonb;
  v_outcome text;
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
                    where e.outcome = 'parked' and e.parked_on && v_wave and e.event_id <> all (v_tried)
                    order by e.stripe_created nulls last, e.first_received_at, e.event_id loop
      exit when v_done >= p_budget;
      v_tried := v_tried || v_event.event_id;
      v_res := private.stripe_attempt(v_event.type, v_event.payload);
      if v_res ->> 'outcome' = 'retry' then
        v_outcome := private.stripe_transient(v_event.event_id, v_event.type, v_event.payload, v_res, false);
      else
        perform private.stripe_store(v_event.event_id, v_event.type, v_event.payload, v_res, false);
        v_outcome := v_res ->> 'outcome';
      end if;
      v_done := v_done + 1;
      v_out := v_out || jsonb_build_array(jsonb_build_object('event_id', v_event.event_id, 'outcome', v_outcome));
      if v_outcome = 'applied' then
        v_next := v_next || array(select jsonb_array_elements_text(v_res -> 'touched'));
      end if;
    end loop;
    if v_done >= p_budget then
      -- Over this call's budget: what is left waits, ready, for the next calls.
      perform private.stripe_ready(v_wave || v_next);
      exit;
    end if;
    v_wave := array(select distinct k from unnest(v_next) k where k <> all (v_seen));
    v_seen := v_seen || v_wave;
  end loop;
  return v_out;
end
$$;

-- Record and apply one delivered event (see the header). Parked events it
-- unblocks become ready (`ready` in the answer): release_stripe_events applies
-- them, never inside this delivery. Outcome 'retrying' asks for a redelivery.
create function private.handle_stripe_event(p_event_id text, p_type text, p_payload jsonb) returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_existing public.stripe_events;
  v_res jsonb;
  v_outcome text;
  v_ready integer := 0;
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
  if v_res ->> 'outcome' = 'retry' then
    v_outcome := private.stripe_transient(p_event_id, p_type, p_payload, v_res, true);
    v_res := private.stripe_result(v_outcome, case when v_outcome = 'failed' then 'transient_repeated'
                                                   else 'transient' end)
             || jsonb_build_object('error', v_res -> 'error');
  else
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
      v_ready := private.stripe_ready(array(select jsonb_array_elements_text(v_res -> 'touched')));
    end if;
  end if;
  return jsonb_build_object('event_id', p_event_id, 'type', p_type, 'outcome', v_res ->> 'outcome',
                            'reason', v_res ->> 'reason', 'error', v_res -> 'error' ->> 'message',
                            'account_id', v_res ->> 'account_id', 'ready', v_ready);
end
$$;

create function public.handle_stripe_event(p_event_id text, p_type text, p_payload jsonb)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.handle_stripe_event(p_event_id, p_type, p_payload);
end
$$;
comment on function public.handle_stripe_event(text, text, jsonb) is
  'Record and apply one verified, normalised Stripe event (service only; called by the webhook).';

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
  -- A batch release is not broadcast (alerts are still evaluated).
  perform set_config('credits.quiet', 'on', true);
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

revoke all on function
  private.stripe_int(jsonb, text), private.stripe_time(jsonb, text), private.stripe_text(jsonb, text),
  private.stripe_detail(text), private.stripe_result(text, text, uuid, jsonb, text[], text[]),
  private.stripe_wait_keys(text, text), private.stripe_parked_cap(), private.stripe_account(text, text, text),
  private.stripe_billing_account(text, text, text),
  private.stripe_link(uuid, text, text, text, boolean), private.stripe_newer_state(text, timestamptz),
  private.stripe_checkout(text, jsonb), private.stripe_invoice_paid(jsonb),
  private.stripe_plan_change(uuid, text, text, bigint, timestamptz, timestamptz, jsonb, text[]),
  private.stripe_plan_decrease(public.credit_wallets, text, bigint, text[]),
  private.stripe_subscription_changed(text, jsonb), private.stripe_granted(text), private.stripe_grant_ref(text),
  private.stripe_invoice_payment(jsonb), private.stripe_charge_refunded(jsonb),
  private.stripe_dispute_created(jsonb), private.stripe_dispute_won(text, jsonb),
  private.stripe_invoice_paid_yearly(jsonb), private.stripe_apply(text, jsonb), private.stripe_attempt(text, jsonb),
  private.stripe_store(text, text, jsonb, jsonb, boolean), private.stripe_unpark(text[], integer)
  from public;
revoke all on function private.stripe_transient_cap(), private.stripe_ready(text[]),
  private.stripe_transient(text, text, jsonb, jsonb, boolean)
  from public, anon, authenticated, service_role;
revoke all on function private.handle_stripe_event(text, text, jsonb),
  public.handle_stripe_event(text, text, jsonb) from public, anon, authenticated;
grant execute on function private.handle_stripe_event(text, text, jsonb),
  public.handle_stripe_event(text, text, jsonb) to service_role;
revoke all on function private.release_stripe_events(integer), public.release_stripe_events(integer)
  from public, anon, authenticated, service_role;
grant execute on function private.release_stripe_events(integer), public.release_stripe_events(integer)
  to service_role;
