-- Spending: the hot path, and reading a balance.
--
-- Holds:
--   * private.spend_cost: every input check of a spend and its price;
--   * private.spend: take credits now, one wallet UPDATE and one transaction
--     row (the usage log and the idempotency record in one);
--   * deduct_credits, get_credit_balance, and the credit_balances and
--     credit_grants views.
--
-- Rules:
--   * Exactly one of amount and operation decides the cost; with an
--     operation, tokens add to it at the price's per-1,000 rates (total
--     rounded up). A cost of 0 is refused unless the price marks the
--     operation free (then the usage is still recorded, bounded).
--   * A spend takes free credits in the spending order (private.spend_split)
--     and never goes below zero; the same key with the same arguments
--     answers the first result again, other arguments conflict.
--   * A spend locks its wallet row, decides in memory, writes one transaction
--     row and updates the wallet (HOT: no index covers a balance). Only
--     what is unusual does more: a sweep when something lapsed, the replay
--     lookup when the key was used or the credits do not suffice, the grant
--     attribution when a spend crosses promotional grants.

-- The price of an operation: flat credits plus per-1,000-token rates, rounded up.
create function private.operation_cost(p_operation text, p_input_tokens integer, p_output_tokens integer)
returns bigint
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_price public.credit_prices;
  v_cost numeric;
begin
  select * into v_price from public.credit_prices p where p.operation = p_operation;
  if not found then
    perform private.fail('PT404', 'unknown_operation', jsonb_build_object('operation', p_operation));
  end if;
  v_cost := ceil(v_price.credits
                 + coalesce(p_input_tokens, 0) * v_price.credits_per_1k_input_tokens / 1000
                 + coalesce(p_output_tokens, 0) * v_price.credits_per_1k_output_tokens / 1000);
  if v_cost > (private.limits() ->> 'amount')::bigint then
    perform private.invalid('p_operation', format('cost exceeds %s credits', private.limits() ->> 'amount'));
  end if;
  if v_cost = 0 and not v_price.free then
    perform private.invalid('p_operation', 'costs 0 credits and is not marked free in credit_prices');
  end if;
  return v_cost::bigint;
end
$$;

-- Every input check of a spend or reservation, in the contract's order; the cost.
create function private.spend_cost(p_key text, p_amount integer, p_operation text, p_model text,
                                   p_input_tokens integer, p_output_tokens integer, p_metadata jsonb)
returns bigint
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_limits jsonb := private.limits();
begin
  -- The common case in one expression: a plain amount and in-bound inputs.
  if p_amount between 1 and (v_limits ->> 'amount')::integer and p_operation is null
     and length(p_key) between 1 and (v_limits ->> 'idempotency_key')::integer
     and (p_model is null or length(p_model) between 1 and (v_limits ->> 'model')::integer)
     and coalesce(p_input_tokens, 0) between 0 and (v_limits ->> 'tokens')::integer
     and coalesce(p_output_tokens, 0) between 0 and (v_limits ->> 'tokens')::integer
     and (p_metadata is null or (jsonb_typeof(p_metadata) = 'object'
          and octet_length(p_metadata::text) <= (v_limits ->> 'metadata_bytes')::integer)) then
    return p_amount;
  end if;
  if p_key is null or length(p_key) not between 1 and (v_limits ->> 'idempotency_key')::integer then
    perform private.check_key(p_key);
  end if;
  if p_metadata is not null and (jsonb_typeof(p_metadata) <> 'object'
                                 or octet_length(p_metadata::text) > (v_limits ->> 'metadata_bytes')::integer) then
    perform private.check_metadata(p_metadata);
  end if;
  if length(p_model) > (v_limits ->> 'model')::integer or length(p_model) = 0 then
    perform private.check_text('p_model', p_model, 'model');
  end if;
  if (p_amount is null) = (p_operation is null) then
    perform private.invalid('p_amount', 'give exactly one of p_amount and p_operation');
  end if;
  if p_input_tokens not between 0 and (v_limits ->> 'tokens')::integer then
    perform private.invalid('p_input_tokens', format('must be 0 to %s', v_limits ->> 'tokens'));
  end if;
  if p_output_tokens not between 0 and (v_limits ->> 'tokens')::integer then
    perform private.invalid('p_output_tokens', format('must be 0 to %s', v_limits ->> 'tokens'));
  end if;
  if p_amount is not null then
    if p_amount not between 1 and (v_limits ->> 'amount')::integer then
      perform private.check_amount('p_amount', p_amount);
    end if;
    return p_amount;
  end if;
  perform private.check_text('p_operation', p_operation, 'operation', true);
  return private.operation_cost(p_operation, p_input_tokens, p_output_tokens);
end
$$;

-- The earlier deduct with this key (null when none); idempotency_conflict
-- when its arguments differed. A fast-path spend keeps no hash: its hash is
-- computed again from its columns, which are its arguments.
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

-- Spend now, every case: check the caller and the arguments, lock the
-- wallet, decide in memory, write the transaction row (whose unique key is
-- the idempotency check), then the wallet. The exact errors and the rare
-- cases (a sweep, spend limits, debt, crossing promotional grants, an
-- operation's price, a tenant's members) live here; private.deduct_credits
-- is the same rule for the common case in one statement.
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


-- Spend now: the common case in one wallet UPDATE and one transaction row.
-- The caller is the service or a user on their own personal account (or a
-- license key); a plain amount with its arguments in bounds
-- (private.limits()); nothing lapsed (private.sweep_due), no debt; the free
-- credits cover it (private.available) without crossing promotional grants.
-- A spender under spend limits is checked and counted after the row. The
-- UPDATE's WHERE is those rules and takes the wallet's lock; its SET is the
-- spending order (private.spend_split) and records the split it made. The
-- transaction row's unique key is the idempotency check: a key used before
-- undoes the UPDATE and answers as private.deduct_checked does, which also
-- takes every other case and raises the exact errors.
create function private.deduct_credits(p_account_id uuid, p_idempotency_key text, p_amount integer,
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

-- coalesce() evaluates its second argument only for a null account, so the
-- usual call (an account id) pays nothing for this.
create function public.deduct_credits(p_account_id uuid, p_idempotency_key text,
                                      p_amount integer default null,
                                      p_operation text default null, p_model text default null,
                                      p_input_tokens integer default null,
                                      p_output_tokens integer default null,
                                      p_metadata jsonb default '{}'::jsonb)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.deduct_credits(coalesce(p_account_id, private.personal_account()), p_idempotency_key,
                                p_amount, p_operation, p_model, p_input_tokens, p_output_tokens, p_metadata, null);
end
$$;
comment on function public.deduct_credits(uuid, text, integer, text, text, integer, integer, jsonb) is
  'Spend now (promotional, then subscription, then purchased); a null account is the caller''s own. '
  '{transaction_id, account_id, charged, from_promotional, from_subscription, from_purchased, replayed, balance}.';

-- What a spend would cost and whether the caller can afford it now: no lock,
-- no write; authorized and checked as a deduct.
create function private.estimate_cost(p_account_id uuid, p_operation text, p_amount integer,
                                      p_input_tokens integer, p_output_tokens integer)
returns jsonb
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_account_id uuid := coalesce(p_account_id, private.personal_account());
  v_actor uuid := private.authorize(v_account_id, true, true);
  v_cost bigint := private.spend_cost('estimate', p_amount, p_operation, null, p_input_tokens, p_output_tokens,
                                      null);
  v_stored public.credit_wallets;
  v_wallet public.credit_wallets;
  v_available bigint;
  v_room bigint;
begin
  select * into v_stored from public.credit_wallets w where w.account_id = v_account_id;
  v_wallet := private.current_wallet(v_stored);
  v_available := private.available(v_wallet);
  if v_wallet.limited and v_actor is not null then
    -- As stored: its next hold expiry tells whether lapsed holds are still counted as held.
    v_room := private.limit_room(v_stored, v_actor, null);
  end if;
  return jsonb_build_object(
    'cost', v_cost, 'available', v_available,
    'affordable', v_cost <= v_available and v_cost <= coalesce(v_room, v_cost),
    'max_output_tokens', case when p_operation is not null
                              then private.max_output_tokens(private.price_of(p_operation), p_input_tokens,
                                                             least(v_available, v_room)) end,
    'limit_remaining', v_room);
end
$$;

create function public.estimate_cost(p_account_id uuid default null, p_operation text default null,
                                     p_amount integer default null, p_input_tokens integer default null,
                                     p_output_tokens integer default null)
returns jsonb
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.estimate_cost(p_account_id, p_operation, p_amount, p_input_tokens, p_output_tokens);
end
$$;
comment on function public.estimate_cost(uuid, text, integer, integer, integer) is
  'The cost of a spend, what is available, whether it is affordable, the most output tokens it covers and '
  'the caller''s remaining limit: {cost, available, affordable, max_output_tokens, limit_remaining}.';

create function private.get_credit_balance(p_account_id uuid default null) returns jsonb
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_account_id uuid := coalesce(p_account_id, private.personal_account());
  v_wallet public.credit_wallets;
begin
  perform private.authorize(v_account_id, false);
  select * into v_wallet from public.credit_wallets w where w.account_id = v_account_id;
  return private.balance_json(private.current_wallet(v_wallet));
end
$$;

create function public.get_credit_balance(p_account_id uuid default null)
returns jsonb
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.get_credit_balance(p_account_id);
end
$$;
comment on function public.get_credit_balance(uuid) is
  'The balance object of an account (null: the caller''s personal account).';

revoke all on function private.operation_cost(text, integer, integer),
  private.spend_cost(text, integer, text, text, integer, integer, jsonb),
  public.deduct_credits(uuid, text, integer, text, text, integer, integer, jsonb),
  public.get_credit_balance(uuid)
  from public, anon, authenticated, service_role;
grant execute on function public.deduct_credits(uuid, text, integer, text, text, integer, integer, jsonb),
  public.get_credit_balance(uuid) to authenticated, service_role;

-- Frontend view of balances (security invoker: the caller's RLS applies).
create view public.credit_balances with (security_invoker = true) as
select a.id as account_id, a.user_id, a.tenant_id, a.plan_id,
       (b ->> 'promotional')::bigint as promotional,
       (b ->> 'subscription')::bigint as subscription,
       (b ->> 'purchased')::bigint as purchased,
       (b ->> 'held')::bigint as held,
       (b ->> 'available')::bigint as available,
       (b ->> 'total')::bigint as total,
       (b ->> 'period_start')::timestamptz as period_start,
       (b ->> 'period_end')::timestamptz as period_end,
       b -> 'next_expiry' as next_expiry,
       (b ->> 'debt')::bigint as debt
  from public.credit_accounts a
  join public.credit_wallets w on w.account_id = a.id
 cross join lateral private.balance_json(private.current_wallet(w)) b;

revoke all on public.credit_balances from anon, authenticated, service_role;
grant select on public.credit_balances to authenticated, service_role;

-- What is left of every grant now, as its reader may see it (as reads see
-- balances: nothing lapsed counted): the free credits attributed to it, plus
-- what active holds reserve of it (a promotional grant past its date has
-- only those: its free credits expired);
-- calendar allowances come from their ledger rows.
create view public.credit_grants with (security_invoker = true) as
select g.id as grant_id, g.account_id, g.pool, g.source, g.stripe_ref, g.granted,
       (case when g.pool = 'promotional' and g.expires_at <= now() then 0 else coalesce(a.attributed, 0) end
        + coalesce((select sum(x.amount) from (
                      select (e ->> 'a')::bigint as amount from public.credit_holds h
                       cross join lateral jsonb_array_elements(h.parts) e
                       where h.account_id = g.account_id and h.status = 'active' and h.expires_at > now()
                         and (e ->> 'g')::uuid = g.id
                      union all
                      -- A lapsed hold's credits as its end will leave them (current_wallet's rule).
                      select f.f_amount from public.credit_holds h
                        join public.credit_wallets hw on hw.account_id = h.account_id
                       cross join lateral private.hold_fates(h, 0, hw.sub_epoch, now()) f
                       where h.account_id = g.account_id and h.status = 'active' and h.expires_at <= now()
                         and f.f_fate = 'free' and f.f_grant = g.id) x), 0))::bigint as remaining,
       g.expires_at, g.created_at
  from (select p.id, p.account_id, p.pool, p.source, p.stripe_ref, p.granted, p.expires_at, p.created_at
          from private.grants p
        union all
        -- Calendar allowances: the current one, and earlier ones active holds still reserve.
        select t.id, t.account_id, 'subscription', 'reset', null, t.subscription, t.period_end, t.created_at
          from public.credit_wallets w
         cross join lateral (select w.period_grant as id where w.period_grant is not null
                             union
                             select (e ->> 'g')::uuid from public.credit_holds h
                              cross join lateral jsonb_array_elements(h.parts) e
                              where h.account_id = w.account_id and h.status = 'active'
                                and e ->> 'p' = 'subscription') v
          join public.credit_transactions t on t.id = v.id and t.account_id = w.account_id and t.kind = 'grant'
         where not exists (select 1 from private.grants x where x.id = t.id)) g
  left join (select w.account_id, a.id, a.attributed
               from public.credit_wallets w
              cross join lateral (values ('promotional'), ('subscription'), ('purchased')) p(pool)
              cross join lateral private.grant_attribution(w, p.pool) a) a
    on a.account_id = g.account_id and a.id = g.id;
comment on view public.credit_grants is
  'Every arrival of credits (pool, source, Stripe reference, amount, expiry) and what is left of it now.';
revoke all on public.credit_grants from anon, authenticated, service_role;
grant select on public.credit_grants to authenticated, service_role;
-- The view computes as its reader: the balance helpers are pure, or read
-- holds and grants under the reader's RLS.
grant execute on function private.balance_json(public.credit_wallets), private.next_expiry(public.credit_wallets),
  private.current_wallet(public.credit_wallets), private.sweep_due(public.credit_wallets),
  private.hold_fates(public.credit_holds, bigint, integer, timestamptz), private.fates(jsonb),
  private.spend_split(bigint, bigint, bigint, bigint), private.grant_attribution(public.credit_wallets, text)
  to authenticated, service_role;

-- The definer code behind the public entry points.
revoke all on function private.deduct_credits(uuid, text, integer, text, text, integer, integer, jsonb, uuid)
  from public, anon, authenticated, service_role;
revoke all on function private.find_deduct(uuid, text, uuid),
  private.deduct_checked(uuid, text, integer, text, text, integer, integer, jsonb, uuid)
  from public, anon, authenticated, service_role;
grant execute on function private.deduct_credits(uuid, text, integer, text, text, integer, integer, jsonb, uuid)
  to authenticated, service_role;
revoke all on function private.estimate_cost(uuid, text, integer, integer, integer),
  public.estimate_cost(uuid, text, integer, integer, integer) from public, anon, authenticated, service_role;
grant execute on function private.estimate_cost(uuid, text, integer, integer, integer),
  public.estimate_cost(uuid, text, integer, integer, integer) to authenticated, service_role;
revoke all on function private.get_credit_balance(uuid) from public, anon, authenticated, service_role;
grant execute on function private.get_credit_balance(uuid) to authenticated, service_role;
