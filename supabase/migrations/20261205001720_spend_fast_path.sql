-- The spend's fast path: the common deduct (the service or a user on their
-- own personal account, a plain amount, nothing lapsed, no limits, no debt,
-- no promotional grant crossed) is one wallet UPDATE whose WHERE holds the
-- rules and one transaction row whose unique key is the idempotency check;
-- every other case goes to private.deduct_checked (the previous function),
-- which raises the exact errors. Fast-path rows keep no request hash: a
-- replay computes it again from their columns (private.find_deduct).

alter table public.credit_wallets
  add column split_promotional bigint,
  add column split_subscription bigint,
  add column front_before bigint;

create function private.find_deduct(p_account_id uuid, p_key text, p_hash uuid)
returns public.credit_transactions
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_entry public.credit_transactions;
begin
  select * into v_entry from public.credit_transactions t
   where t.account_id = p_account_id and t.idempotency_key = p_key and t.origin = 'api';
  if found and v_entry.request_hash is null and v_entry.kind = 'spend' and v_entry.ref_id is null then
    v_entry.request_hash := private.request_hash('deduct', jsonb_build_array(
      -(v_entry.promotional + v_entry.subscription + v_entry.purchased), v_entry.operation, v_entry.model,
      v_entry.input_tokens, v_entry.output_tokens, v_entry.metadata));
  end if;
  if found and v_entry.request_hash is distinct from p_hash then
    perform private.fail('PT409', 'idempotency_conflict', jsonb_build_object('idempotency_key', p_key));
  end if;
  return v_entry;
end
$$;

create function private.deduct_checked(p_account_id uuid, p_idempotency_key text, p_amount integer,
                                       p_operation text, p_model text, p_input_tokens integer,
                                       p_output_tokens integer, p_metadata jsonb, p_license_key_id uuid)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_actor uuid := private.authorize(p_account_id, true, true);
  v_cost bigint := private.spend_cost(p_idempotency_key, p_amount, p_operation, p_model, p_input_tokens,
                                      p_output_tokens, p_metadata);
  v_hash uuid := private.request_hash('deduct', jsonb_build_array(p_amount, p_operation, p_model,
                                                                  p_input_tokens, p_output_tokens, p_metadata));
  v_wallet public.credit_wallets;
  v_entry public.credit_transactions;
  v_split private.split;
  v_expiry jsonb;
begin
  select * into v_wallet from public.credit_wallets w where w.account_id = p_account_id for update;
  if not found then
    perform private.fail('PT404', 'account_not_found');
  end if;
  if private.sweep_due(v_wallet) then
    v_wallet := private.lock_wallet(p_account_id);
  end if;
  if v_wallet.limited and coalesce(p_license_key_id, v_actor) is not null then
    -- Limits come after the replay (a replay always replays), before the credits.
    v_entry := private.find_deduct(p_account_id, p_idempotency_key, v_hash);
    if v_entry.id is not null then
      return private.result(v_entry, true);
    end if;
    perform private.check_limits(v_wallet, v_actor, p_license_key_id, v_cost);
  end if;
  if private.available(v_wallet) < v_cost then
    -- A replay still answers when the balance could not pay again.
    v_entry := private.find_deduct(p_account_id, p_idempotency_key, v_hash);
    if v_entry.id is not null then
      return private.result(v_entry, true);
    end if;
    perform private.insufficient(v_cost, private.available(v_wallet));
  end if;
  v_split := private.spend_split(v_wallet.promotional - v_wallet.held_promotional,
                                 v_wallet.subscription - v_wallet.held_subscription,
                                 v_wallet.purchased - v_wallet.held_purchased, v_cost);
  v_wallet.promotional := v_wallet.promotional - v_split.promotional;
  v_wallet.subscription := v_wallet.subscription - v_split.subscription;
  v_wallet.purchased := v_wallet.purchased - v_split.purchased;
  if v_split.promotional > 0 then
    if v_split.promotional < v_wallet.promo_front_left
       or v_wallet.promotional = v_wallet.held_promotional then
      -- The soonest grant covers it (or nothing free is left): no grant row to touch.
      v_wallet.promo_front_left := greatest(v_wallet.promo_front_left - v_split.promotional, 0);
    else
      -- Across grants: write the wallet now and attribute the spend to grants
      -- (after the replay check, so that nothing is written for a replay).
      v_entry := private.find_deduct(p_account_id, p_idempotency_key, v_hash);
      if v_entry.id is not null then
        return private.result(v_entry, true);
      end if;
      update public.credit_wallets w
         set promotional = v_wallet.promotional, subscription = v_wallet.subscription,
             purchased = v_wallet.purchased
       where w.account_id = p_account_id;
      v_wallet := private.materialize_grants(v_wallet);
    end if;
  end if;
  v_expiry := private.next_expiry(v_wallet);

  -- The idempotency check: a key written before is visible now (every write
  -- of this account's rows holds the wallet's lock, which this call holds).
  if exists (select from public.credit_transactions t where t.account_id = p_account_id
                and t.idempotency_key = p_idempotency_key and t.origin = 'api') then
    return private.result(private.find_deduct(p_account_id, p_idempotency_key, v_hash), true);
  end if;
  insert into public.credit_transactions (
    account_id, kind, idempotency_key, request_hash, promotional, subscription, purchased,
    promotional_after, subscription_after, purchased_after, held_after, period_start, period_end,
    next_expiry_amount, next_expiry_at, operation, model, input_tokens, output_tokens, metadata, actor_id,
    debt_after, license_key_id, price)
  values (
    p_account_id, 'spend', p_idempotency_key, v_hash, -v_split.promotional, -v_split.subscription, -v_split.purchased,
    v_wallet.promotional, v_wallet.subscription, v_wallet.purchased,
    v_wallet.held_promotional + v_wallet.held_subscription + v_wallet.held_purchased,
    v_wallet.period_start, v_wallet.period_end, (v_expiry ->> 'amount')::bigint, (v_expiry ->> 'at')::timestamptz,
    p_operation, p_model, p_input_tokens, p_output_tokens, coalesce(p_metadata, '{}'::jsonb), v_actor,
    v_wallet.debt, p_license_key_id, case when p_operation is not null then private.price_of(p_operation) end)
  returning * into v_entry;
  update public.credit_wallets w
     set promotional = v_wallet.promotional, subscription = v_wallet.subscription,
         purchased = v_wallet.purchased, promo_front_left = v_wallet.promo_front_left
   where w.account_id = p_account_id;
  if v_wallet.limited then
    perform private.count_usage(v_wallet, coalesce(p_license_key_id, v_actor), v_cost, 0);
  end if;
  return private.result(v_entry, false);
end
$$;

create or replace function private.deduct_credits(p_account_id uuid, p_idempotency_key text, p_amount integer,
                                       p_operation text, p_model text, p_input_tokens integer,
                                       p_output_tokens integer, p_metadata jsonb,
                                       p_license_key_id uuid default null)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_role text := current_setting('role', true);
  v_actor uuid;
  v_id uuid;
  -- The wallet after the UPDATE, and the split it made.
  v_promotional bigint;
  v_subscription bigint;
  v_purchased bigint;
  v_held bigint;
  v_period_start timestamptz;
  v_period_end timestamptz;
  v_front_left bigint;
  v_sub_free bigint;
  v_split_promotional bigint;
  v_split_subscription bigint;
  v_limited boolean;
  v_wallet public.credit_wallets;
  -- The balance's next expiry: the promotional front's, the allowance's, the sooner.
  v_promo_at timestamptz;
  v_sub_at timestamptz;
  v_at timestamptz;
  v_expiring bigint;
begin
  if p_amount between 1 and (private.limits() ->> 'amount')::integer and p_operation is null
     and length(p_idempotency_key) between 1 and (private.limits() ->> 'idempotency_key')::integer
     and (p_model is null or length(p_model) between 1 and (private.limits() ->> 'model')::integer)
     and coalesce(p_input_tokens, 0) between 0 and (private.limits() ->> 'tokens')::integer
     and coalesce(p_output_tokens, 0) between 0 and (private.limits() ->> 'tokens')::integer
     and jsonb_typeof(p_metadata) = 'object'
     and octet_length(p_metadata::text) <= (private.limits() ->> 'metadata_bytes')::integer
     and (v_role in ('service_role', '', 'none') or v_role is null or v_role = 'authenticated') then
    if v_role = 'authenticated' then
      -- A user: the fast path only on their own personal account (authorize's first rule).
      v_actor := auth.uid();
      if not exists (select 1 from public.credit_accounts a where a.id = p_account_id and a.user_id = v_actor) then
        return private.deduct_checked(p_account_id, p_idempotency_key, p_amount, p_operation, p_model,
                                      p_input_tokens, p_output_tokens, p_metadata, p_license_key_id);
      end if;
    end if;
    -- Plain parameters only in this statement: its plan stays generic (cached).
    update public.credit_wallets w
       set promotional = w.promotional - least(w.promotional - w.held_promotional, p_amount),
           subscription = w.subscription - least(w.subscription - w.held_subscription,
                                                  p_amount - least(w.promotional - w.held_promotional, p_amount)),
           purchased = w.purchased - (p_amount - least(w.promotional - w.held_promotional, p_amount)
                                      - least(w.subscription - w.held_subscription,
                                              p_amount - least(w.promotional - w.held_promotional, p_amount))),
           promo_front_left = greatest(w.promo_front_left - least(w.promotional - w.held_promotional, p_amount), 0),
           split_promotional = least(w.promotional - w.held_promotional, p_amount),
           split_subscription = least(w.subscription - w.held_subscription,
                                      p_amount - least(w.promotional - w.held_promotional, p_amount)),
           front_before = w.promo_front_left
     where w.account_id = p_account_id
       and w.promotional - w.held_promotional + w.subscription - w.held_subscription
           + w.purchased - w.held_purchased - w.debt >= p_amount
       and w.debt = 0
       and not coalesce(least(w.next_hold_expiry, w.promo_front_at) <= now(), false)
       and (w.promotional = w.held_promotional or p_amount < w.promo_front_left
            or w.promotional - w.held_promotional <= p_amount)
    returning w.promotional, w.subscription, w.purchased, w.held_promotional + w.held_subscription + w.held_purchased,
              w.period_start, w.period_end, case when w.promo_front_left > 0 then w.promo_front_at end,
              w.promo_front_left, case when w.subscription > w.held_subscription then w.period_end end,
              w.subscription - w.held_subscription, w.split_promotional, w.split_subscription, w.limited
         into v_promotional, v_subscription, v_purchased, v_held, v_period_start, v_period_end, v_promo_at,
              v_front_left, v_sub_at, v_sub_free, v_split_promotional, v_split_subscription, v_limited;
    if found then
      v_at := least(v_promo_at, v_sub_at);
      v_expiring := case when v_promo_at = v_at then v_front_left else 0 end
                    + case when v_sub_at = v_at then v_sub_free else 0 end;
      insert into public.credit_transactions (
        account_id, kind, idempotency_key, promotional, subscription, purchased,
        promotional_after, subscription_after, purchased_after, held_after, period_start, period_end,
        next_expiry_amount, next_expiry_at, model, input_tokens, output_tokens, metadata, actor_id,
        license_key_id)
      values (
        p_account_id, 'spend', p_idempotency_key, -v_split_promotional, -v_split_subscription,
        v_split_promotional + v_split_subscription - p_amount, v_promotional, v_subscription, v_purchased, v_held,
        v_period_start, v_period_end, v_expiring, v_at, p_model, p_input_tokens, p_output_tokens, p_metadata,
        v_actor, p_license_key_id)
      on conflict (account_id, idempotency_key, origin) do nothing
      returning id into v_id;
      if v_id is not null and v_limited and coalesce(p_license_key_id, v_actor) is not null then
        -- Spend limits, after the idempotency check (a replay replays): over a
        -- limit raises spend_limit_exceeded, which undoes this call's writes.
        select * into v_wallet from public.credit_wallets w where w.account_id = p_account_id;
        perform private.check_limits(v_wallet, v_actor, p_license_key_id, p_amount);
        perform private.count_usage(v_wallet, coalesce(p_license_key_id, v_actor), p_amount, 0);
      end if;
      if v_id is not null then
        return to_jsonb(row(
          v_id, p_account_id, p_amount, v_split_promotional, v_split_subscription,
          p_amount - v_split_promotional - v_split_subscription, false,
          row(p_account_id, v_promotional, v_subscription, v_purchased, v_held,
              v_promotional + v_subscription + v_purchased - v_held, v_promotional + v_subscription + v_purchased,
              v_period_start, v_period_end,
              case when v_at is not null then jsonb_build_object('amount', v_expiring, 'at', v_at) end,
              0)::private.balance)::private.spend_answer);
      end if;
      -- The key was used before: put the wallet back; the checked path answers.
      update public.credit_wallets w
         set promotional = w.promotional + w.split_promotional,
             subscription = w.subscription + w.split_subscription,
             purchased = w.purchased + (p_amount - w.split_promotional - w.split_subscription),
             promo_front_left = w.front_before
       where w.account_id = p_account_id;
    end if;
  end if;
  return private.deduct_checked(p_account_id, p_idempotency_key, p_amount, p_operation, p_model, p_input_tokens,
                                p_output_tokens, p_metadata, p_license_key_id);
end
$$;

revoke all on function private.find_deduct(uuid, text, uuid),
  private.deduct_checked(uuid, text, integer, text, text, integer, integer, jsonb, uuid)
  from public, anon, authenticated, service_role;
