-- Stripe: an event that can never be applied is recorded as failed, not retried.
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
    when 'customer.subscription.updated', 'customer.subscription.deleted' then
      return private.stripe_subscription_changed(p_type, p);
    when 'charge.refunded' then
      return private.stripe_charge_refunded(p);
    when 'charge.dispute.created' then
      return private.stripe_dispute_created(p);
    else
      return private.stripe_result('ignored', 'unhandled_type');
  end case;
end
$$;

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
