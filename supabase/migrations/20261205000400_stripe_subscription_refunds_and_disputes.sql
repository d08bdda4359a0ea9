-- Stripe: refunds and disputes of subscription payments on every API version,
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
      return private.stripe_invoice_paid(p);
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

revoke all on function private.stripe_grant_ref(text), private.stripe_invoice_payment(jsonb),
  private.stripe_dispute_won(text, jsonb) from public;
