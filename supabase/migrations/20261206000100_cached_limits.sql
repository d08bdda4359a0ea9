-- Spend limits cached per spender: the deduct's fast path checks a limited
-- spender's limits and counts the spend in one statement, from the limits
-- that apply to it cached on its usage row (private.cache_limits, written
-- on the first spend after the account's limits were set).

alter table private.spend_usage
  add column limits_cached boolean not null default false,
  add column day_limit bigint,
  add column week_limit bigint,
  add column month_limit bigint,
  add column period_limit bigint;

create function private.cache_limits(p_wallet public.credit_wallets, p_user uuid, p_key uuid) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  insert into private.spend_usage as u (account_id, spender, limits_cached, day_limit, week_limit, month_limit,
                                        period_limit)
  select p_wallet.account_id, coalesce(p_key, p_user), true,
         min(a.credit_limit) filter (where a.period = 'day'),
         min(a.credit_limit) filter (where a.period = 'week'),
         min(a.credit_limit) filter (where a.period = 'month'),
         min(a.credit_limit) filter (where a.period = 'billing_period')
    from private.applicable_limits(p_wallet, p_user, p_key) a
  on conflict (account_id, spender) do update
    set limits_cached = true, day_limit = excluded.day_limit, week_limit = excluded.week_limit,
        month_limit = excluded.month_limit, period_limit = excluded.period_limit;
end
$$;

revoke all on function private.cache_limits(public.credit_wallets, uuid, uuid)
  from public, anon, authenticated, service_role;

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
  -- The windows a limited spend counts in (private.count_usage's).
  v_utc timestamp;
  v_day timestamptz;
  v_week timestamptz;
  v_month timestamptz;
  v_cached boolean;
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
        -- Spend limits, after the idempotency check (a replay replays): the
        -- spender's limits cached on its usage row (private.cache_limits,
        -- refreshed once when not cached) checked and the spend counted in
        -- one statement, private.check_limits' rule (spent in the window +
        -- held + this <= the limit; nothing lapsed on this path) and
        -- private.count_usage's counting. Refused on fresh figures:
        -- private.check_limits raises spend_limit_exceeded with them, which
        -- undoes this call's writes.
        v_utc := now() at time zone 'UTC';
        v_day := date_trunc('day', v_utc) at time zone 'UTC';
        v_week := date_trunc('week', v_utc) at time zone 'UTC';
        v_month := date_trunc('month', v_utc) at time zone 'UTC';
        v_cached := false;
        loop
          update private.spend_usage u
             set day_spent = case when u.day_start = v_day then u.day_spent else 0 end + p_amount,
                 day_start = v_day,
                 week_spent = case when u.week_start = v_week then u.week_spent else 0 end + p_amount,
                 week_start = v_week,
                 month_spent = case when u.month_start = v_month then u.month_spent else 0 end + p_amount,
                 month_start = v_month,
                 period_spent = case when u.period_start is not distinct from v_period_start then u.period_spent
                                     else 0 end + p_amount,
                 period_start = v_period_start
           where u.account_id = p_account_id and u.spender = coalesce(p_license_key_id, v_actor)
             and u.limits_cached
             and (u.day_limit is null or case when u.day_start = v_day then u.day_spent else 0 end
                                         + u.held + p_amount <= u.day_limit)
             and (u.week_limit is null or case when u.week_start = v_week then u.week_spent else 0 end
                                          + u.held + p_amount <= u.week_limit)
             and (u.month_limit is null or case when u.month_start = v_month then u.month_spent else 0 end
                                           + u.held + p_amount <= u.month_limit)
             and (u.period_limit is null or case when u.period_start = v_period_start then u.period_spent
                                                 else 0 end + u.held + p_amount <= u.period_limit);
          exit when found;
          select * into v_wallet from public.credit_wallets w where w.account_id = p_account_id;
          if v_cached then
            perform private.check_limits(v_wallet, v_actor, p_license_key_id, p_amount);
            -- (Unreachable while the two agree; counted as the checked path counts.)
            perform private.count_usage(v_wallet, coalesce(p_license_key_id, v_actor), p_amount, 0);
            exit;
          end if;
          perform private.cache_limits(v_wallet, v_actor, p_license_key_id);
          v_cached := true;
        end loop;
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

