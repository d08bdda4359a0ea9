-- The reserve's fast path: the common case (the service or a user on their
-- own personal account, no limits, debt or free promotional credits,
-- nothing lapsed, under the hold bounds) as one wallet UPDATE whose WHERE is
-- the rules and the reserve row's unique key as the idempotency check;
-- private.reserve_checked (the reserve as it was) takes every other case.

create function private.reserve_checked(p_account_id uuid, p_idempotency_key text, p_amount integer,
                                        p_operation text, p_ttl_seconds integer, p_metadata jsonb,
                                        p_model text, p_input_tokens integer, p_output_tokens integer,
                                        p_overage text)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_cost bigint;
  v_hash uuid;
  v_wallet public.credit_wallets;
  v_entry public.credit_transactions;
  v_split private.split;
  v_parts jsonb := '[]'::jsonb;
  v_hold uuid := gen_random_uuid();
  v_tx uuid := private.uuid_v7();
  v_expires timestamptz;
  v_actor uuid;
  v_price jsonb;
  v_room bigint;
begin
  v_actor := private.authorize(p_account_id, true, true);
  v_cost := private.spend_cost(p_idempotency_key, p_amount, p_operation, p_model, p_input_tokens,
                               p_output_tokens, p_metadata);
  if v_cost < 1 then
    perform private.invalid('p_operation', 'a hold must reserve at least 1 credit');
  end if;
  if p_ttl_seconds is null or p_ttl_seconds not between 1 and (private.limits() ->> 'ttl_seconds')::integer then
    perform private.invalid('p_ttl_seconds', format('must be 1 to %s seconds', private.limits() ->> 'ttl_seconds'));
  end if;
  if p_overage is null or p_overage not in ('reject', 'if_available', 'overdraft') then
    perform private.invalid('p_overage', 'must be reject, if_available or overdraft');
  end if;
  if p_overage = 'overdraft' and not private.is_service() then
    perform private.fail('PT403', 'forbidden', '{"reason": "only the service makes overdraft holds"}'::jsonb);
  end if;
  v_hash := private.request_hash('reserve', jsonb_build_array(p_amount, p_operation, p_ttl_seconds, p_metadata,
                                                              p_model, p_input_tokens, p_output_tokens,
                                                              p_overage));
  v_expires := now() + make_interval(secs => p_ttl_seconds);
  if p_operation is not null then
    v_price := private.price_of(p_operation);
  end if;

  v_wallet := private.lock_wallet(p_account_id);
  v_entry := private.find_key(p_account_id, p_idempotency_key, v_hash);
  if v_entry.id is not null then
    return private.result(v_entry, true);
  end if;
  perform private.check_hold_bounds(v_wallet);
  if v_wallet.limited and v_actor is not null then
    perform private.check_limits(v_wallet, v_actor, null, v_cost);
  end if;
  if private.available(v_wallet) < v_cost then
    if v_price is not null then
      -- What the credits cover is also bounded by the maker's remaining limit.
      if v_wallet.limited and v_actor is not null then
        v_room := private.limit_room(v_wallet, v_actor, null);
      end if;
      perform private.fail('PT402', 'insufficient_credits', jsonb_build_object(
        'required', v_cost, 'available', private.available(v_wallet),
        'max_output_tokens', private.max_output_tokens(v_price, p_input_tokens,
                                                       least(private.available(v_wallet), v_room))));
    end if;
    perform private.insufficient(v_cost, private.available(v_wallet));
  end if;
  v_split := private.spend_split(v_wallet.promotional - v_wallet.held_promotional,
                                 v_wallet.subscription - v_wallet.held_subscription,
                                 v_wallet.purchased - v_wallet.held_purchased, v_cost);
  -- Which grants, pool by pool: the front of each.
  if v_split.promotional > 0 then
    v_parts := private.take_front(v_wallet, 'promotional', v_split.promotional);
  end if;
  if v_split.subscription > 0 then
    v_parts := v_parts || private.take_front(v_wallet, 'subscription', v_split.subscription);
  end if;
  if v_split.purchased > 0 then
    v_parts := v_parts || private.take_front(v_wallet, 'purchased', v_split.purchased);
  end if;
  insert into public.credit_holds (id, account_id, transaction_id, amount, promotional, subscription, purchased,
                                   parts, sub_epoch, period_start, period_end, expires_at, operation,
                                   metadata, actor_id, overage, price, input_tokens, output_tokens, model)
  values (v_hold, p_account_id, v_tx, v_cost, v_split.promotional, v_split.subscription, v_split.purchased,
          v_parts, v_wallet.sub_epoch, v_wallet.period_start, v_wallet.period_end, v_expires, p_operation,
          coalesce(p_metadata, '{}'::jsonb), v_actor, p_overage, v_price, p_input_tokens, p_output_tokens,
          p_model);
  update public.credit_wallets w
     set next_hold_expiry = least(coalesce(w.next_hold_expiry, v_expires), v_expires),
         hold_minute = date_trunc('minute', now()),
         hold_minute_count = case when w.hold_minute = date_trunc('minute', now())
                                  then w.hold_minute_count + 1 else 1 end
   where w.account_id = p_account_id;
  v_entry := private.post(p_account_id, 'reserve',
                          p_held_promotional => v_split.promotional, p_held_subscription => v_split.subscription,
                          p_held_purchased => v_split.purchased, p_key => p_idempotency_key, p_hash => v_hash,
                          p_ref_id => v_hold, p_metadata => p_metadata, p_actor => v_actor,
                          p_operation => p_operation, p_id => v_tx,
                          p_outcome => jsonb_build_object('amount', v_cost, 'expires_at', v_expires));
  if v_wallet.limited then
    perform private.count_usage(v_wallet, v_actor, 0, v_cost);
  end if;
  return private.result(v_entry, false);
end
$$;

create or replace function private.reserve_credits(p_account_id uuid, p_idempotency_key text, p_amount integer,
                                        p_operation text, p_ttl_seconds integer, p_metadata jsonb,
                                        p_model text, p_input_tokens integer, p_output_tokens integer,
                                        p_overage text)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_role text := current_setting('role', true);
  v_actor uuid;
  v_cost bigint;
  v_price jsonb;
  v_expires timestamptz;
  v_wallet public.credit_wallets;
  v_from_subscription bigint;
  v_expiry jsonb;
  v_tx uuid;
  v_hold uuid;
  v_parts jsonb := '[]'::jsonb;
  v_balance private.balance;
begin
  if p_ttl_seconds between 1 and (private.limits() ->> 'ttl_seconds')::integer
     and p_overage in ('reject', 'if_available')
     and ((p_amount between 1 and (private.limits() ->> 'amount')::integer and p_operation is null)
          or (p_amount is null and length(p_operation) between 1 and (private.limits() ->> 'operation')::integer))
     and length(p_idempotency_key) between 1 and (private.limits() ->> 'idempotency_key')::integer
     and (p_model is null or length(p_model) between 1 and (private.limits() ->> 'model')::integer)
     and coalesce(p_input_tokens, 0) between 0 and (private.limits() ->> 'tokens')::integer
     and coalesce(p_output_tokens, 0) between 0 and (private.limits() ->> 'tokens')::integer
     and jsonb_typeof(p_metadata) = 'object'
     and octet_length(p_metadata::text) <= (private.limits() ->> 'metadata_bytes')::integer
     and (v_role in ('service_role', '', 'none') or v_role is null or v_role = 'authenticated') then
    if v_role = 'authenticated' then
      v_actor := auth.uid();
      if not exists (select 1 from public.credit_accounts a where a.id = p_account_id and a.user_id = v_actor) then
        return private.reserve_checked(p_account_id, p_idempotency_key, p_amount, p_operation, p_ttl_seconds,
                                       p_metadata, p_model, p_input_tokens, p_output_tokens, p_overage);
      end if;
    end if;
    if p_operation is null then
      v_cost := p_amount;
    else
      -- (An unknown operation has no price: null, the checked path.)
      v_price := private.price_of(p_operation);
      v_cost := private.priced(v_price, p_input_tokens, p_output_tokens);
    end if;
    v_expires := now() + make_interval(secs => p_ttl_seconds);
    -- Plain parameters only in this statement: its plan stays generic (cached).
    update public.credit_wallets w
       set held_subscription = w.held_subscription + least(w.subscription - w.held_subscription, v_cost),
           held_purchased = w.held_purchased + v_cost - least(w.subscription - w.held_subscription, v_cost),
           split_subscription = least(w.subscription - w.held_subscription, v_cost),
           next_hold_expiry = least(coalesce(w.next_hold_expiry, v_expires), v_expires),
           hold_minute = date_trunc('minute', now()),
           hold_minute_count = case when w.hold_minute = date_trunc('minute', now())
                                    then w.hold_minute_count + 1 else 1 end
     where w.account_id = p_account_id
       and v_cost between 1 and (private.limits() ->> 'amount')::integer
       and w.subscription - w.held_subscription + w.purchased - w.held_purchased >= v_cost
       and w.promotional = w.held_promotional and w.debt = 0 and not w.limited
       and not coalesce(least(w.next_hold_expiry, w.promo_front_at) <= now(), false)
       and (w.hold_minute is distinct from date_trunc('minute', now())
            or w.hold_minute_count < (private.write_bounds() ->> 'holds_per_minute')::integer)
       and (w.next_hold_expiry is null
            or (select count(*) from (select 1 from public.credit_holds h
                                       where h.account_id = p_account_id and h.status = 'active'
                                       limit (private.write_bounds() ->> 'active_holds')::integer) x)
               < (private.write_bounds() ->> 'active_holds')::integer)
    returning w.* into v_wallet;
    if found then
      v_from_subscription := v_wallet.split_subscription;
      v_expiry := private.next_expiry(v_wallet);
      v_hold := gen_random_uuid();
      insert into public.credit_transactions (
        account_id, kind, idempotency_key, request_hash, promotional_after, subscription_after, purchased_after,
        held_after, period_start, period_end, next_expiry_amount, next_expiry_at, ref_id, operation, metadata,
        outcome, actor_id)
      values (
        p_account_id, 'reserve', p_idempotency_key,
        private.request_hash('reserve', jsonb_build_array(p_amount, p_operation, p_ttl_seconds, p_metadata, p_model,
                                                          p_input_tokens, p_output_tokens, p_overage)),
        v_wallet.promotional, v_wallet.subscription, v_wallet.purchased,
        v_wallet.held_promotional + v_wallet.held_subscription + v_wallet.held_purchased,
        v_wallet.period_start, v_wallet.period_end, (v_expiry ->> 'amount')::bigint,
        (v_expiry ->> 'at')::timestamptz, v_hold, p_operation, p_metadata,
        jsonb_build_object('amount', v_cost, 'expires_at', v_expires), v_actor)
      on conflict (account_id, idempotency_key, origin) do nothing
      returning id into v_tx;
      if v_tx is not null then
        v_balance := row(p_account_id, v_wallet.promotional, v_wallet.subscription, v_wallet.purchased,
                         v_wallet.held_promotional + v_wallet.held_subscription + v_wallet.held_purchased,
                         v_wallet.promotional + v_wallet.subscription + v_wallet.purchased
                         - v_wallet.held_promotional - v_wallet.held_subscription - v_wallet.held_purchased,
                         v_wallet.promotional + v_wallet.subscription + v_wallet.purchased,
                         v_wallet.period_start, v_wallet.period_end, v_expiry, 0)::private.balance;
        -- Which grants: the front of each pool, from the wallet as the hold found it.
        v_wallet.held_subscription := v_wallet.held_subscription - v_from_subscription;
        v_wallet.held_purchased := v_wallet.held_purchased - (v_cost - v_from_subscription);
        if v_from_subscription > 0 then
          v_parts := private.take_front(v_wallet, 'subscription', v_from_subscription);
        end if;
        if v_cost > v_from_subscription then
          v_parts := v_parts || private.take_front(v_wallet, 'purchased', v_cost - v_from_subscription);
        end if;
        insert into public.credit_holds (id, account_id, transaction_id, amount, subscription, purchased, parts,
                                         sub_epoch, period_start, period_end, expires_at, operation, metadata,
                                         actor_id, overage, price, input_tokens, output_tokens, model)
        values (v_hold, p_account_id, v_tx, v_cost, v_from_subscription, v_cost - v_from_subscription, v_parts,
                v_wallet.sub_epoch, v_wallet.period_start, v_wallet.period_end, v_expires, p_operation,
                p_metadata, v_actor, p_overage, v_price, p_input_tokens, p_output_tokens, p_model);
        return jsonb_build_object('hold_id', v_hold, 'account_id', p_account_id, 'amount', v_cost,
                                  'expires_at', v_expires, 'overage', p_overage, 'replayed', false,
                                  'balance', to_jsonb(v_balance));
      end if;
      -- The key was used before: put the wallet back; the checked path answers.
      update public.credit_wallets w
         set held_subscription = w.held_subscription - w.split_subscription,
             held_purchased = w.held_purchased - (v_cost - w.split_subscription),
             hold_minute_count = w.hold_minute_count - 1,
             next_hold_expiry = (select min(h.expires_at) from public.credit_holds h
                                  where h.account_id = p_account_id and h.status = 'active')
       where w.account_id = p_account_id;
    end if;
  end if;
  return private.reserve_checked(p_account_id, p_idempotency_key, p_amount, p_operation, p_ttl_seconds,
                                 p_metadata, p_model, p_input_tokens, p_output_tokens, p_overage);
end
$$;

revoke all on function private.reserve_checked(uuid, text, integer, text, integer, jsonb, text, integer, integer, text)
  from public, anon, authenticated, service_role;
