-- Review fixes of contract v3's events and auto top-up:
--   * a setup-mode checkout, or a pack bought with a customer, links the
--     customer to the session's account (no relink), so auto top-up can be
--     set up through Checkout;
--   * only the failure that disables auto top-up writes topup.disabled;
--   * claims of credit events skip locked rows before their limit, so notify
--     runs claiming at once split the events instead of one getting none.

create or replace function private.stripe_checkout(p_type text, p jsonb) returns jsonb
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

create or replace function private.record_topup(p_topup_id uuid, p_outcome text, p_payment_intent text, p_reason text)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_topup public.credit_topups;
  v_setting private.auto_topups;
  v_entry public.credit_transactions;
  v_balance jsonb;
  v_was text;
begin
  if p_outcome is null or p_outcome not in ('succeeded', 'failed', 'action_required', 'not_configured', 'retry') then
    perform private.invalid('p_outcome', 'must be succeeded, failed, action_required, not_configured or retry');
  end if;
  perform private.check_text('p_payment_intent', p_payment_intent, 'stripe_ref');
  perform private.check_text('p_reason', p_reason, 'reason');
  select * into v_topup from public.credit_topups p where p.id = p_topup_id;
  if not found then
    perform private.fail('PT404', 'topup_not_found');
  end if;
  perform private.lock_wallet(v_topup.account_id);
  select * into v_topup from public.credit_topups p where p.id = p_topup_id for update;
  if v_topup.status <> 'pending' then
    return jsonb_build_object('topup_id', v_topup.id, 'status', v_topup.status, 'replayed', true);
  end if;
  if p_outcome = 'retry' then
    update public.credit_topups p
       set leased_until = null, payment_intent = coalesce(p_payment_intent, p.payment_intent),
           reason = left(p_reason, 200)
     where p.id = p_topup_id;
    return jsonb_build_object('topup_id', v_topup.id, 'status', 'pending', 'replayed', false);
  end if;
  update public.credit_topups p
     set status = case p_outcome when 'not_configured' then 'failed' else p_outcome end,
         payment_intent = coalesce(p_payment_intent, p.payment_intent),
         reason = case when p_outcome = 'not_configured' then 'not_configured' else left(p_reason, 200) end,
         finished_at = now(), leased_until = null
   where p.id = p_topup_id
  returning * into v_topup;
  select * into v_setting from private.auto_topups t where t.account_id = v_topup.account_id for update;
  if p_outcome = 'succeeded' then
    v_entry := private.post(v_topup.account_id, 'purchase', p_purchased => v_topup.credits, p_origin => 'stripe',
                            p_key => 'topup:' || v_topup.id::text, p_stripe_ref => v_topup.payment_intent,
                            p_description => 'auto top-up', p_source => 'topup',
                            p_metadata => jsonb_build_object('topup_id', v_topup.id, 'pack', v_topup.pack));
    perform private.settle_debt(v_topup.account_id, v_entry.id);
    update public.credit_topups p set transaction_id = v_entry.id where p.id = v_topup.id;
    update private.auto_topups t set failures = 0 where t.account_id = v_topup.account_id;
    select private.balance_json(w) into v_balance from public.credit_wallets w
     where w.account_id = v_topup.account_id;
    perform private.topup_event(v_topup, 'topup.succeeded', jsonb_build_object('balance', v_balance));
  elsif p_outcome = 'action_required' then
    update private.auto_topups t set status = 'paused', reason = 'action_required', updated_at = now()
     where t.account_id = v_topup.account_id and t.status = 'active';
    perform private.topup_event(v_topup, 'topup.action_required');
  else
    perform private.topup_event(v_topup, 'topup.failed');
    v_was := v_setting.status;
    update private.auto_topups t
       set failures = t.failures + 1,
           status = case when p_outcome = 'not_configured' or t.failures + 1 >= 3 then 'disabled' else t.status end,
           reason = case when p_outcome = 'not_configured' then 'not_configured'
                         when t.failures + 1 >= 3 then 'failed three times in a row' else t.reason end,
           updated_at = now()
     where t.account_id = v_topup.account_id
    returning * into v_setting;
    -- Only the failure that disabled it says so (not one reported after its owner turned it off).
    if v_setting.status = 'disabled' and v_was is distinct from 'disabled' then
      perform private.emit_event(v_topup.account_id, 'topup.disabled',
                                 jsonb_build_object('reason', v_setting.reason, 'topup_id', v_topup.id));
    end if;
  end if;
  perform private.cache_topup(v_topup.account_id);
  return jsonb_build_object('topup_id', v_topup.id, 'status', v_topup.status, 'replayed', false,
                            'transaction_id', v_entry.id);
end
$$;

create or replace function private.claim_credit_events(p_limit integer, p_lease_seconds integer) returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_out jsonb;
begin
  perform private.require_service();
  if p_limit is null or p_limit not between 1 and 1000 then
    perform private.invalid('p_limit', 'must be 1 to 1000');
  end if;
  if p_lease_seconds is null or p_lease_seconds not between 1 and 900 then
    perform private.invalid('p_lease_seconds', 'must be 1 to 900');
  end if;
  update public.credit_events e
     set status = 'failed', leased_until = null,
         last_error = case when e.attempts = 0 then 'not_sent' else 'expired' end
   where e.status = 'pending' and e.sent_from < now() - interval '72 hours'
     and (e.leased_until is null or e.leased_until <= now());
  -- Each account's head (no lower pending seq), due and not leased; locked
  -- rows are skipped before the limit, so runs claiming at once split the work.
  with claimed as (
    select e.event_id from public.credit_events e
     where e.status = 'pending' and e.next_attempt_at <= now()
       and (e.leased_until is null or e.leased_until <= now())
       and not exists (select 1 from public.credit_events p
                        where p.account_id = e.account_id and p.status = 'pending' and p.seq < e.seq)
     order by e.next_attempt_at
     limit p_limit
       for update of e skip locked
  ), leased as (
    update public.credit_events e
       set leased_until = now() + make_interval(secs => p_lease_seconds)
      from claimed c
     where e.event_id = c.event_id
    returning e.*
  )
  select coalesce(jsonb_agg(jsonb_build_object('event_id', l.event_id, 'account_id', l.account_id, 'seq', l.seq,
                                               'type', l.type, 'payload', l.payload,
                                               'created_at', l.created_at, 'attempts', l.attempts)
                            order by l.account_id, l.seq), '[]'::jsonb)
    into v_out from leased l;
  return v_out;
end
$$;

