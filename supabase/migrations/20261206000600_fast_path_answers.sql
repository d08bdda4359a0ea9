-- The reserve's and the capture's fast paths answer from typed rows, and a
-- service capture finds and locks its wallet in one statement (the hold is
-- then read without a row lock: every writer of a hold holds its wallet's);
-- private.priced is a plain expression (no sub-select to plan and run).

create type private.reserve_answer as (
  hold_id uuid, account_id uuid, amount bigint, expires_at timestamptz, overage text, replayed boolean,
  balance private.balance);
create type private.capture_answer as (
  transaction_id uuid, hold_id uuid, requested bigint, charged bigint, released bigint, uncovered bigint,
  debt_added bigint, from_promotional bigint, from_subscription bigint, from_purchased bigint, replayed boolean,
  balance private.balance);

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
        return to_jsonb(row(v_hold, p_account_id, v_cost, v_expires, p_overage, false,
                            v_balance)::private.reserve_answer);
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

create or replace function private.capture_hold(p_hold_id uuid, p_amount integer, p_metadata jsonb, p_input_tokens integer,
                                     p_output_tokens integer, p_model text)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_role text := current_setting('role', true);
  v_actor uuid;
  v_account uuid;
  v_wallet public.credit_wallets;
  v_hold public.credit_holds;
  v_cost bigint;
  v_metadata jsonb;
  v_expiry jsonb;
  v_tx uuid;
  v_result jsonb;
begin
  if (p_amount is null or p_amount between 1 and (private.limits() ->> 'amount')::integer)
     and not (p_amount is not null and (p_input_tokens is not null or p_output_tokens is not null))
     and coalesce(p_input_tokens, 0) between 0 and (private.limits() ->> 'tokens')::integer
     and coalesce(p_output_tokens, 0) between 0 and (private.limits() ->> 'tokens')::integer
     and (p_model is null or length(p_model) between 1 and (private.limits() ->> 'model')::integer)
     and jsonb_typeof(p_metadata) = 'object'
     and (v_role in ('service_role', '', 'none') or v_role is null or v_role = 'authenticated') then
    if v_role = 'authenticated' then
      -- A user: only the holds of their own personal account (before any lock).
      v_actor := auth.uid();
      select a.id into v_account from public.credit_holds h join public.credit_accounts a on a.id = h.account_id
       where h.id = p_hold_id and a.user_id = v_actor;
    end if;
    select w.* into v_wallet from public.credit_wallets w join public.credit_holds h on h.account_id = w.account_id
     where h.id = p_hold_id and (v_role is distinct from 'authenticated' or w.account_id = v_account)
       for update of w;
    v_account := v_wallet.account_id;
    if found and not v_wallet.limited
       and not coalesce(least(v_wallet.next_hold_expiry, v_wallet.promo_front_at) <= now(), false) then
      -- (No row lock: every writer of a hold holds its wallet's lock, which this call now holds.)
      select * into v_hold from public.credit_holds h where h.id = p_hold_id;
      v_cost := case when p_amount is not null then p_amount
                     when p_input_tokens is null and p_output_tokens is null then v_hold.amount
                     else private.priced(v_hold.price, coalesce(p_input_tokens, v_hold.input_tokens),
                                         coalesce(p_output_tokens, v_hold.output_tokens)) end;
      v_metadata := v_hold.metadata || p_metadata;
      if v_hold.status = 'active' and v_cost = v_hold.amount and v_hold.claims = '[]'::jsonb
         and v_hold.promotional = 0
         and octet_length(v_metadata::text) <= (private.limits() ->> 'metadata_bytes')::integer then
        update public.credit_wallets w
           set subscription = w.subscription - v_hold.subscription, purchased = w.purchased - v_hold.purchased,
               held_subscription = w.held_subscription - v_hold.subscription,
               held_purchased = w.held_purchased - v_hold.purchased,
               next_hold_expiry = case when w.next_hold_expiry >= v_hold.expires_at
                                       then (select min(h.expires_at) from public.credit_holds h
                                              where h.account_id = v_account and h.status = 'active'
                                                and h.id <> p_hold_id)
                                       else w.next_hold_expiry end
         where w.account_id = v_account
        returning w.* into v_wallet;
        v_expiry := private.next_expiry(v_wallet);
        insert into public.credit_transactions (
          account_id, kind, origin, subscription, purchased, promotional_after, subscription_after,
          purchased_after, held_after, period_start, period_end, next_expiry_amount, next_expiry_at, ref_id,
          operation, model, input_tokens, output_tokens, metadata, actor_id, price)
        values (
          v_account, 'spend', 'system', -v_hold.subscription, -v_hold.purchased, v_wallet.promotional,
          v_wallet.subscription, v_wallet.purchased,
          v_wallet.held_promotional + v_wallet.held_subscription + v_wallet.held_purchased,
          case when v_hold.subscription > 0 then v_hold.period_start else v_wallet.period_start end,
          case when v_hold.subscription > 0 then v_hold.period_end else v_wallet.period_end end,
          (v_expiry ->> 'amount')::bigint, (v_expiry ->> 'at')::timestamptz, p_hold_id, v_hold.operation,
          coalesce(p_model, v_hold.model), coalesce(p_input_tokens, v_hold.input_tokens),
          coalesce(p_output_tokens, v_hold.output_tokens), v_metadata, coalesce(v_hold.actor_id, v_actor),
          v_hold.price)
        returning id into v_tx;
        v_result := to_jsonb(row(
          v_tx, p_hold_id, v_cost, v_cost, 0, 0, 0, 0, v_hold.subscription, v_hold.purchased, false,
          row(v_account, v_wallet.promotional, v_wallet.subscription, v_wallet.purchased,
              v_wallet.held_promotional + v_wallet.held_subscription + v_wallet.held_purchased,
              greatest(0, v_wallet.promotional + v_wallet.subscription + v_wallet.purchased
                          - v_wallet.held_promotional - v_wallet.held_subscription - v_wallet.held_purchased
                          - v_wallet.debt),
              v_wallet.promotional + v_wallet.subscription + v_wallet.purchased,
              v_wallet.period_start, v_wallet.period_end, v_expiry, v_wallet.debt)::private.balance
        )::private.capture_answer);
        update public.credit_holds h set status = 'captured', settled_at = now(), result = v_result
         where h.id = p_hold_id;
        return v_result;
      end if;
    end if;
  end if;
  return private.settle_hold(p_hold_id, p_amount, p_metadata, true, p_input_tokens, p_output_tokens, p_model);
end
$$;

create or replace function private.priced(p_price jsonb, p_input_tokens bigint, p_output_tokens bigint) returns bigint
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  return ceil((p_price ->> 'credits')::numeric
              + coalesce(p_input_tokens, 0) * (p_price ->> 'credits_per_1k_input_tokens')::numeric / 1000
              + coalesce(p_output_tokens, 0) * (p_price ->> 'credits_per_1k_output_tokens')::numeric / 1000)::bigint;
end
$$;

