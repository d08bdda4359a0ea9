-- The capture's fast path: a whole capture by the service or a user on their
-- own personal account (no limits, nothing lapsed, nothing claimed, no
-- promotional credits held) written directly, the wallet locked before the
-- hold; private.settle_hold takes every other case.

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
    select h.account_id into v_account from public.credit_holds h where h.id = p_hold_id;
    if v_role = 'authenticated' then
      v_actor := auth.uid();
      if not exists (select 1 from public.credit_accounts a where a.id = v_account and a.user_id = v_actor) then
        v_account := null;
      end if;
    end if;
    select * into v_wallet from public.credit_wallets w where w.account_id = v_account for update;
    if found and not v_wallet.limited and not private.sweep_due(v_wallet) then
      select * into v_hold from public.credit_holds h where h.id = p_hold_id for update;
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
        v_result := jsonb_build_object(
          'transaction_id', v_tx, 'hold_id', p_hold_id, 'requested', v_cost, 'charged', v_cost, 'released', 0,
          'uncovered', 0, 'debt_added', 0, 'from_promotional', 0, 'from_subscription', v_hold.subscription,
          'from_purchased', v_hold.purchased, 'replayed', false,
          'balance', to_jsonb(row(
            v_account, v_wallet.promotional, v_wallet.subscription, v_wallet.purchased,
            v_wallet.held_promotional + v_wallet.held_subscription + v_wallet.held_purchased,
            private.available(v_wallet), v_wallet.promotional + v_wallet.subscription + v_wallet.purchased,
            v_wallet.period_start, v_wallet.period_end, v_expiry, v_wallet.debt)::private.balance));
        update public.credit_holds h set status = 'captured', settled_at = now(), result = v_result
         where h.id = p_hold_id;
        return v_result;
      end if;
    end if;
  end if;
  return private.settle_hold(p_hold_id, p_amount, p_metadata, true, p_input_tokens, p_output_tokens, p_model);
end
$$;

