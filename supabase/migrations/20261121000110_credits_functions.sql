-- Credits functions: every SQL function of the contract.
--
-- Each contract function is a SECURITY INVOKER wrapper in public (what the
-- REST layer exposes) over a SECURITY DEFINER function of the same name in
-- schema private, which does the work in the caller's one transaction.
-- EXECUTE is granted per function: service-only ones to service_role alone;
-- user-callable ones also to authenticated, and those check the caller
-- explicitly (failing closed when auth.uid() is null). anon executes nothing.
--
-- Money rules (documented for users in docs/credits.md):
--   * spending takes the subscription pool first, then purchased;
--   * held credits cannot be spent twice: spends need `available`
--     (subscription + purchased - held); expiries, clawbacks and negative
--     adjustments never take credits that active holds reserve, so a capture
--     never fails for lack of credits;
--   * a hold past its expiry stops counting at once (readers recompute `held`
--     from unexpired holds) and is marked expired the next time its account
--     is written to, or by the monthly reset;
--   * every balance change writes one ledger row per pool it changes, in the
--     same transaction, with the pool's balance after it.
--
-- Idempotency: every balance-changing call records (account, key) with a hash
-- of its arguments and its result; a second call with the same key and
-- arguments returns that result with "replayed": true, other arguments fail
-- with idempotency_conflict.
--
-- Lock order (no deadlocks): a function locks at most one account row, first,
-- before any hold or transaction row of that account. Only the monthly reset
-- locks several accounts, and it takes them in ascending id order before it
-- touches their holds. Concurrent calls on one account therefore queue on
-- that account's row and see each other's committed balances.

-- ---------------------------------------------------------------------------
-- Shared internals (not executable by API roles; called from definer code).
-- ---------------------------------------------------------------------------

-- The caller's right to act on an account. Service: the account must exist.
-- Users: spend (p_write) needs the personal account or tenant owner/admin;
-- read also allows any tenant member and super admins.
create function private.authorize(p_account_id uuid, p_write boolean) returns void
language plpgsql stable
set search_path = ''
as $$
declare
  v_uid uuid;
  v_user_id uuid;
  v_tenant_id uuid;
  v_role text;
begin
  if p_account_id is null then
    perform private.invalid('p_account_id', 'required');
  end if;
  if private.is_service() then
    if not exists (select 1 from public.credit_accounts a where a.id = p_account_id) then
      perform private.fail('PT404', 'account_not_found');
    end if;
    return;
  end if;
  v_uid := auth.uid();
  if v_uid is null or current_setting('role', true) <> 'authenticated' then
    perform private.fail('PT403', 'forbidden');
  end if;
  select a.user_id, a.tenant_id into v_user_id, v_tenant_id
    from public.credit_accounts a where a.id = p_account_id;
  if not found then
    perform private.fail('PT404', 'account_not_found');
  end if;
  if v_user_id = v_uid then
    return;
  end if;
  if v_tenant_id is not null then
    select m.role into v_role from public.tenant_members m
     where m.tenant_id = v_tenant_id and m.user_id = v_uid;
    if v_role in ('owner', 'admin') or (v_role is not null and not p_write) then
      return;
    end if;
  end if;
  if not p_write and private.is_super_admin() then
    return;
  end if;
  perform private.fail('PT403', 'forbidden');
end
$$;

-- The calling user, or null for service calls (recorded as the ledger's actor).
create function private.actor() returns uuid
language sql stable
set search_path = ''
as $$
  select case when private.is_service() then null else auth.uid() end
$$;

-- Lock an account row and bring `held` up to date (expire lapsed holds).
create function private.lock_account(p_account_id uuid) returns public.credit_accounts
language plpgsql
set search_path = ''
as $$
declare
  v_account public.credit_accounts;
begin
  select * into v_account from public.credit_accounts a where a.id = p_account_id for update;
  if not found then
    perform private.fail('PT404', 'account_not_found');
  end if;
  if v_account.next_hold_expiry is not null and v_account.next_hold_expiry <= now() then
    update public.credit_holds h
       set status = 'expired', settled_at = now()
     where h.account_id = p_account_id and h.status = 'active' and h.expires_at <= now();
    update public.credit_accounts a
       set held = s.held, next_hold_expiry = s.next_expiry
      from (select coalesce(sum(h.amount), 0)::bigint as held, min(h.expires_at) as next_expiry
              from public.credit_holds h
             where h.account_id = p_account_id and h.status = 'active') s
     where a.id = p_account_id
    returning a.* into v_account;
  end if;
  return v_account;
end
$$;

-- The stored result of an earlier call with this key, marked replayed; null
-- when there is none; idempotency_conflict when its arguments differed.
create function private.replay(p_account_id uuid, p_key text, p_hash uuid) returns jsonb
language plpgsql stable
set search_path = ''
as $$
declare
  v_hash uuid;
  v_result jsonb;
begin
  select t.request_hash, t.result into v_hash, v_result
    from public.credit_transactions t
   where t.account_id = p_account_id and t.idempotency_key = p_key;
  if not found then
    return null;
  end if;
  if v_hash <> p_hash then
    perform private.fail('PT409', 'idempotency_conflict',
                         jsonb_build_object('idempotency_key', p_key));
  end if;
  return v_result || '{"replayed": true}'::jsonb;
end
$$;

create function private.request_hash(p_function text, p_args jsonb) returns uuid
language sql immutable
set search_path = ''
as $$
  select md5(p_function || ':' || p_args::text)::uuid
$$;

create function private.insufficient(p_required bigint, p_available bigint) returns void
language sql
set search_path = ''
as $$
  select private.fail('PT402', 'insufficient_credits',
                      jsonb_build_object('required', p_required, 'available', greatest(p_available, 0)))
$$;

-- What an operation costs: flat credits plus per-1,000-token rates, rounded up.
create function private.operation_cost(p_operation text, p_input_tokens integer, p_output_tokens integer)
returns bigint
language plpgsql stable
set search_path = ''
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
  if v_cost > 1000000000 then
    perform private.invalid('p_operation', 'cost exceeds 1000000000 credits');
  end if;
  return v_cost::bigint;
end
$$;

-- Checks shared by deduct and reserve; returns the cost.
create function private.spend_cost(p_amount integer, p_operation text, p_input_tokens integer,
                                   p_output_tokens integer) returns bigint
language plpgsql stable
set search_path = ''
as $$
begin
  if (p_amount is null) = (p_operation is null) then
    perform private.invalid('p_amount', 'give exactly one of p_amount and p_operation');
  end if;
  if p_input_tokens is not null and p_input_tokens < 0 then
    perform private.invalid('p_input_tokens', 'must not be negative');
  end if;
  if p_output_tokens is not null and p_output_tokens < 0 then
    perform private.invalid('p_output_tokens', 'must not be negative');
  end if;
  if p_amount is not null then
    perform private.check_amount('p_amount', p_amount);
    return p_amount;
  end if;
  if length(p_operation) not between 1 and 128 then
    perform private.invalid('p_operation', 'must be 1 to 128 characters');
  end if;
  return private.operation_cost(p_operation, p_input_tokens, p_output_tokens);
end
$$;

-- Write the ledger rows of a debit split across the two pools.
create function private.write_debit_ledger(p_account public.credit_accounts, p_tx uuid, p_type text,
                                           p_from_subscription bigint, p_from_purchased bigint,
                                           p_key text, p_metadata jsonb, p_actor uuid) returns void
language sql
set search_path = ''
as $$
  insert into public.credit_ledger (account_id, transaction_id, pool, amount, balance_after, type,
                                    idempotency_key, metadata, actor_id, period_start, period_end)
  select p_account.id, p_tx, v.pool, -v.amount, v.balance_after, p_type, p_key,
         coalesce(p_metadata, '{}'::jsonb), p_actor,
         v.period_start, v.period_end
    from (values ('subscription', p_from_subscription, p_account.subscription_balance,
                  p_account.period_start, p_account.period_end),
                 ('purchased', p_from_purchased, p_account.purchased_balance, null, null))
         as v(pool, amount, balance_after, period_start, period_end)
   where v.amount > 0
$$;

-- Take up to p_amount from one pool without touching held credits; returns
-- the updated account (what was taken is the pool's drop). Used by expiry,
-- clawback and negative adjustments. The caller holds the account lock.
create function private.take_from_pool(p_account public.credit_accounts, p_pool text, p_amount bigint)
returns public.credit_accounts
language plpgsql
set search_path = ''
as $$
declare
  v_free bigint := p_account.subscription_balance + p_account.purchased_balance - p_account.held;
  v_pool bigint := case p_pool when 'subscription' then p_account.subscription_balance
                               else p_account.purchased_balance end;
  v_taken bigint := greatest(least(p_amount, v_pool, v_free), 0);
  v_account public.credit_accounts;
begin
  if v_taken = 0 then
    return p_account;
  end if;
  update public.credit_accounts a
     set subscription_balance = a.subscription_balance - case when p_pool = 'subscription' then v_taken else 0 end,
         purchased_balance = a.purchased_balance - case when p_pool = 'purchased' then v_taken else 0 end,
         updated_at = now()
   where a.id = p_account.id
  returning a.* into v_account;
  return v_account;
end
$$;

create function private.pool_of(p_account public.credit_accounts, p_pool text) returns bigint
language sql immutable
set search_path = ''
as $$
  select case p_pool when 'subscription' then p_account.subscription_balance else p_account.purchased_balance end
$$;

-- Record a call: its transaction row (with the result a replay returns).
create function private.record(p_tx uuid, p_account_id uuid, p_kind text, p_key text, p_hash uuid,
                               p_result jsonb, p_amount bigint default 0, p_pool text default null,
                               p_stripe_ref text default null, p_description text default null,
                               p_metadata jsonb default '{}'::jsonb, p_actor uuid default null)
returns void
language sql
set search_path = ''
as $$
  insert into public.credit_transactions (id, account_id, kind, idempotency_key, request_hash, result,
                                          amount, pool, stripe_ref, description, metadata, actor_id)
  values (p_tx, p_account_id, p_kind, p_key, p_hash, p_result, p_amount, p_pool, p_stripe_ref,
          p_description, coalesce(p_metadata, '{}'::jsonb), p_actor)
$$;

-- Credit one pool and write its ledger row.
create function private.credit_pool(p_account_id uuid, p_pool text, p_amount bigint, p_tx uuid, p_type text,
                                    p_key text, p_stripe_ref text, p_metadata jsonb, p_actor uuid)
returns public.credit_accounts
language plpgsql
set search_path = ''
as $$
declare
  v_account public.credit_accounts;
begin
  update public.credit_accounts a
     set subscription_balance = a.subscription_balance + case when p_pool = 'subscription' then p_amount else 0 end,
         purchased_balance = a.purchased_balance + case when p_pool = 'purchased' then p_amount else 0 end,
         updated_at = now()
   where a.id = p_account_id
  returning a.* into v_account;
  insert into public.credit_ledger (account_id, transaction_id, pool, amount, balance_after, type,
                                    idempotency_key, stripe_ref, metadata, actor_id, period_start, period_end)
  values (p_account_id, p_tx, p_pool, p_amount,
          case when p_pool = 'subscription' then v_account.subscription_balance else v_account.purchased_balance end,
          p_type, p_key, p_stripe_ref, coalesce(p_metadata, '{}'::jsonb), p_actor,
          case when p_pool = 'subscription' then v_account.period_start end,
          case when p_pool = 'subscription' then v_account.period_end end);
  return v_account;
end
$$;

-- Write the ledger row of a pool decrease already applied by take_from_pool.
create function private.debit_ledger(p_account public.credit_accounts, p_pool text, p_amount bigint,
                                     p_tx uuid, p_type text, p_key text, p_stripe_ref text,
                                     p_metadata jsonb, p_actor uuid,
                                     p_period_start timestamptz default null,
                                     p_period_end timestamptz default null) returns void
language sql
set search_path = ''
as $$
  insert into public.credit_ledger (account_id, transaction_id, pool, amount, balance_after, type,
                                    idempotency_key, stripe_ref, metadata, actor_id, period_start, period_end)
  select p_account.id, p_tx, p_pool, -p_amount,
         case when p_pool = 'subscription' then p_account.subscription_balance else p_account.purchased_balance end,
         p_type, p_key, p_stripe_ref, coalesce(p_metadata, '{}'::jsonb), p_actor,
         case when p_pool = 'subscription' then coalesce(p_period_start, p_account.period_start) end,
         case when p_pool = 'subscription' then coalesce(p_period_end, p_account.period_end) end
   where p_amount > 0
$$;

revoke all on function
  private.authorize(uuid, boolean), private.actor(), private.lock_account(uuid),
  private.replay(uuid, text, uuid), private.request_hash(text, jsonb), private.insufficient(bigint, bigint),
  private.operation_cost(text, integer, integer), private.spend_cost(integer, text, integer, integer),
  private.write_debit_ledger(public.credit_accounts, uuid, text, bigint, bigint, text, jsonb, uuid),
  private.take_from_pool(public.credit_accounts, text, bigint), private.pool_of(public.credit_accounts, text),
  private.record(uuid, uuid, text, text, uuid, jsonb, bigint, text, text, text, jsonb, uuid),
  private.credit_pool(uuid, text, bigint, uuid, text, text, text, jsonb, uuid),
  private.debit_ledger(public.credit_accounts, text, bigint, uuid, text, text, text, jsonb, uuid,
                       timestamptz, timestamptz)
  from public;

-- ---------------------------------------------------------------------------
-- Spending (the hot path).
-- ---------------------------------------------------------------------------

-- Spend p_cost now from an account the caller was authorized for. The fast
-- path is one UPDATE ... RETURNING that checks the balance and locks the row;
-- anything unusual (not enough credits, a lapsed hold to sweep, a replay)
-- falls to the slow path, which locks first and then decides.
create function private.spend(p_account_id uuid, p_key text, p_hash uuid, p_cost bigint,
                              p_operation text, p_model text, p_input_tokens integer,
                              p_output_tokens integer, p_metadata jsonb, p_actor uuid)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_account public.credit_accounts;
  v_tx uuid := private.uuid_v7();
  v_from_sub bigint;
  v_result jsonb;
  v_inserted boolean;
begin
  update public.credit_accounts a
     set subscription_balance = a.subscription_balance - least(a.subscription_balance, p_cost),
         purchased_balance = a.purchased_balance - (p_cost - least(a.subscription_balance, p_cost)),
         last_debit_subscription = least(a.subscription_balance, p_cost),
         updated_at = now()
   where a.id = p_account_id
     and (a.next_hold_expiry is null or a.next_hold_expiry > now())
     and a.subscription_balance + a.purchased_balance - a.held >= p_cost
  returning a.* into v_account;

  if not found then
    v_account := private.lock_account(p_account_id);
    v_result := private.replay(p_account_id, p_key, p_hash);
    if v_result is not null then
      return v_result;
    end if;
    if v_account.subscription_balance + v_account.purchased_balance - v_account.held < p_cost then
      perform private.insufficient(p_cost,
        v_account.subscription_balance + v_account.purchased_balance - v_account.held);
    end if;
    update public.credit_accounts a
       set subscription_balance = a.subscription_balance - least(a.subscription_balance, p_cost),
           purchased_balance = a.purchased_balance - (p_cost - least(a.subscription_balance, p_cost)),
           last_debit_subscription = least(a.subscription_balance, p_cost),
           updated_at = now()
     where a.id = p_account_id
    returning a.* into v_account;
  end if;

  v_from_sub := v_account.last_debit_subscription;
  v_result := jsonb_build_object(
    'transaction_id', v_tx, 'account_id', p_account_id, 'charged', p_cost,
    'from_subscription', v_from_sub, 'from_purchased', p_cost - v_from_sub, 'replayed', false,
    -- private.balance_json, inlined: the hot path avoids nested function calls
    -- (each one pins search_path, which costs a GUC save/restore per call).
    'balance', jsonb_build_object(
      'account_id', p_account_id, 'subscription', v_account.subscription_balance,
      'purchased', v_account.purchased_balance, 'held', v_account.held,
      'available', greatest(v_account.subscription_balance + v_account.purchased_balance - v_account.held, 0),
      'total', v_account.subscription_balance + v_account.purchased_balance,
      'period_start', v_account.period_start, 'period_end', v_account.period_end));

  insert into public.credit_transactions (id, account_id, kind, idempotency_key, request_hash, result, amount,
                                          operation, model, input_tokens, output_tokens, metadata, actor_id)
  values (v_tx, p_account_id, 'spend', p_key, p_hash, v_result, p_cost,
          p_operation, p_model, p_input_tokens, p_output_tokens, coalesce(p_metadata, '{}'::jsonb), p_actor)
  on conflict (account_id, idempotency_key) do nothing
  returning true into v_inserted;

  if v_inserted is null then
    -- The key was used before (we hold the account lock, so that call has
    -- committed): give the credits back and answer with its result.
    update public.credit_accounts a
       set subscription_balance = a.subscription_balance + v_from_sub,
           purchased_balance = a.purchased_balance + (p_cost - v_from_sub)
     where a.id = p_account_id;
    return private.replay(p_account_id, p_key, p_hash);
  end if;

  -- private.write_debit_ledger, inlined (see above).
  insert into public.credit_ledger (account_id, transaction_id, pool, amount, balance_after, type,
                                    idempotency_key, metadata, actor_id, period_start, period_end)
  select p_account_id, v_tx, v.pool, -v.amount, v.balance_after, 'spend', p_key,
         coalesce(p_metadata, '{}'::jsonb), p_actor, v.period_start, v.period_end
    from (values ('subscription', v_from_sub, v_account.subscription_balance,
                  v_account.period_start, v_account.period_end),
                 ('purchased', p_cost - v_from_sub, v_account.purchased_balance, null, null))
         as v(pool, amount, balance_after, period_start, period_end)
   where v.amount > 0;
  return v_result;
end
$$;
revoke all on function private.spend(uuid, text, uuid, bigint, text, text, integer, integer, jsonb, uuid)
  from public;

create function private.deduct_credits(p_account_id uuid, p_idempotency_key text, p_amount integer,
                                       p_operation text, p_model text, p_input_tokens integer,
                                       p_output_tokens integer, p_metadata jsonb)
returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  -- private.is_service(), inlined: this is the hot path, and every nested
  -- call pins search_path (a GUC save/restore). The helpers below run only
  -- when their check fails, to raise their error; the checks and their order
  -- are exactly those of authorize, check_key, check_metadata, spend_cost.
  v_service boolean := coalesce(nullif(current_setting('role', true), ''), 'none') in ('service_role', 'none');
  v_cost bigint;
begin
  if v_service and p_account_id is not null then
    perform from public.credit_accounts a where a.id = p_account_id;
    if not found then
      perform private.fail('PT404', 'account_not_found');
    end if;
  else
    perform private.authorize(p_account_id, true);
  end if;
  if p_idempotency_key is null or length(p_idempotency_key) not between 1 and 255
     or (not v_service and left(p_idempotency_key, 7) = 'stripe:') then
    perform private.check_key(p_idempotency_key);
  end if;
  perform private.check_metadata(p_metadata);
  if p_amount between 1 and 1000000000 and p_operation is null
     and p_input_tokens is null and p_output_tokens is null then
    v_cost := p_amount;
  else
    v_cost := private.spend_cost(p_amount, p_operation, p_input_tokens, p_output_tokens);
  end if;
  -- private.request_hash('deduct', ...) and private.actor(), inlined.
  return private.spend(p_account_id, p_idempotency_key,
    md5('deduct:' || jsonb_build_array(p_amount, p_operation, p_model, p_input_tokens,
                                       p_output_tokens, p_metadata)::text)::uuid,
    v_cost, p_operation, p_model, p_input_tokens, p_output_tokens, p_metadata,
    case when v_service then null else auth.uid() end);
end
$$;

create function public.deduct_credits(p_account_id uuid, p_idempotency_key text, p_amount integer default null,
                                      p_operation text default null, p_model text default null,
                                      p_input_tokens integer default null, p_output_tokens integer default null,
                                      p_metadata jsonb default '{}'::jsonb)
returns jsonb
language sql
set search_path = ''
as $$
  select private.deduct_credits(p_account_id, p_idempotency_key, p_amount, p_operation, p_model,
                                p_input_tokens, p_output_tokens, p_metadata)
$$;

revoke all on function private.deduct_credits(uuid, text, integer, text, text, integer, integer, jsonb),
  public.deduct_credits(uuid, text, integer, text, text, integer, integer, jsonb)
  from public, anon, authenticated;
grant execute on function private.deduct_credits(uuid, text, integer, text, text, integer, integer, jsonb),
  public.deduct_credits(uuid, text, integer, text, text, integer, integer, jsonb)
  to authenticated, service_role;

-- The account behind a license key, checked in the contract's order.
create function private.license_account(p_license_key text) returns uuid
language plpgsql stable
set search_path = ''
as $$
declare
  v_key public.credit_license_keys;
begin
  if p_license_key is null or length(p_license_key) not between 16 and 200 then
    perform private.fail('PT403', 'invalid_license_key');
  end if;
  select * into v_key from public.credit_license_keys k
   where k.key_hash = sha256(convert_to(p_license_key, 'UTF8'));
  if not found then
    perform private.fail('PT403', 'invalid_license_key');
  end if;
  if v_key.revoked_at is not null then
    perform private.fail('PT403', 'license_key_inactive');
  end if;
  if v_key.expires_at is not null and v_key.expires_at <= now() then
    perform private.fail('PT403', 'license_key_expired');
  end if;
  return v_key.account_id;
end
$$;
revoke all on function private.license_account(text) from public;

create function private.deduct_credits_by_license(p_license_key text, p_idempotency_key text, p_amount integer,
                                                  p_operation text, p_model text, p_input_tokens integer,
                                                  p_output_tokens integer, p_metadata jsonb)
returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  v_account_id uuid;
  v_cost bigint;
begin
  if not private.is_service() then
    perform private.fail('PT403', 'forbidden');
  end if;
  v_account_id := private.license_account(p_license_key);
  perform private.check_key(p_idempotency_key);
  perform private.check_metadata(p_metadata);
  v_cost := private.spend_cost(p_amount, p_operation, p_input_tokens, p_output_tokens);
  return private.spend(v_account_id, p_idempotency_key,
    private.request_hash('deduct', jsonb_build_array(p_amount, p_operation, p_model, p_input_tokens,
                                                     p_output_tokens, p_metadata)),
    v_cost, p_operation, p_model, p_input_tokens, p_output_tokens, p_metadata, null);
end
$$;

create function public.deduct_credits_by_license(p_license_key text, p_idempotency_key text,
                                                 p_amount integer default null, p_operation text default null,
                                                 p_model text default null, p_input_tokens integer default null,
                                                 p_output_tokens integer default null,
                                                 p_metadata jsonb default '{}'::jsonb)
returns jsonb
language sql
set search_path = ''
as $$
  select private.deduct_credits_by_license(p_license_key, p_idempotency_key, p_amount, p_operation, p_model,
                                           p_input_tokens, p_output_tokens, p_metadata)
$$;

revoke all on function private.deduct_credits_by_license(text, text, integer, text, text, integer, integer, jsonb),
  public.deduct_credits_by_license(text, text, integer, text, text, integer, integer, jsonb)
  from public, anon, authenticated;
grant execute on function
  private.deduct_credits_by_license(text, text, integer, text, text, integer, integer, jsonb),
  public.deduct_credits_by_license(text, text, integer, text, text, integer, integer, jsonb)
  to service_role;

-- ---------------------------------------------------------------------------
-- Holds.
-- ---------------------------------------------------------------------------

create function private.reserve_credits(p_account_id uuid, p_idempotency_key text, p_amount integer,
                                        p_operation text, p_ttl_seconds integer, p_metadata jsonb)
returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  v_cost bigint;
  v_hash uuid;
  v_account public.credit_accounts;
  v_result jsonb;
  v_hold uuid := gen_random_uuid();
  v_tx uuid := private.uuid_v7();
  v_expires timestamptz;
begin
  perform private.authorize(p_account_id, true);
  perform private.check_key(p_idempotency_key);
  perform private.check_metadata(p_metadata);
  v_cost := private.spend_cost(p_amount, p_operation, null, null);
  if v_cost < 1 then
    perform private.invalid('p_operation', 'a hold must reserve at least 1 credit');
  end if;
  if p_ttl_seconds is null or p_ttl_seconds not between 1 and 86400 then
    perform private.invalid('p_ttl_seconds', 'must be 1 to 86400 seconds');
  end if;
  v_hash := private.request_hash('reserve', jsonb_build_array(p_amount, p_operation, p_ttl_seconds, p_metadata));
  v_expires := now() + make_interval(secs => p_ttl_seconds);

  v_account := private.lock_account(p_account_id);
  v_result := private.replay(p_account_id, p_idempotency_key, v_hash);
  if v_result is not null then
    return v_result;
  end if;
  if v_account.subscription_balance + v_account.purchased_balance - v_account.held < v_cost then
    perform private.insufficient(v_cost,
      v_account.subscription_balance + v_account.purchased_balance - v_account.held);
  end if;

  update public.credit_accounts a
     set held = a.held + v_cost,
         next_hold_expiry = least(coalesce(a.next_hold_expiry, v_expires), v_expires),
         updated_at = now()
   where a.id = p_account_id
  returning a.* into v_account;

  insert into public.credit_holds (id, account_id, transaction_id, amount, expires_at, operation, metadata)
  values (v_hold, p_account_id, v_tx, v_cost, v_expires, p_operation, coalesce(p_metadata, '{}'::jsonb));

  v_result := jsonb_build_object('hold_id', v_hold, 'account_id', p_account_id, 'amount', v_cost,
                                 'expires_at', v_expires, 'replayed', false,
                                 'balance', private.balance_json(v_account, v_account.held));
  perform private.record(v_tx, p_account_id, 'reserve', p_idempotency_key, v_hash, v_result, v_cost,
                         p_metadata => p_metadata, p_actor => private.actor());
  return v_result;
end
$$;

create function public.reserve_credits(p_account_id uuid, p_idempotency_key text, p_amount integer default null,
                                       p_operation text default null, p_ttl_seconds integer default 900,
                                       p_metadata jsonb default '{}'::jsonb)
returns jsonb
language sql
set search_path = ''
as $$
  select private.reserve_credits(p_account_id, p_idempotency_key, p_amount, p_operation, p_ttl_seconds, p_metadata)
$$;

revoke all on function private.reserve_credits(uuid, text, integer, text, integer, jsonb),
  public.reserve_credits(uuid, text, integer, text, integer, jsonb) from public, anon, authenticated;
grant execute on function private.reserve_credits(uuid, text, integer, text, integer, jsonb),
  public.reserve_credits(uuid, text, integer, text, integer, jsonb) to authenticated, service_role;

-- Find a hold and check the caller may spend from its account; returns the
-- account id (callers then lock the account, then the hold, per the lock order).
create function private.hold_account(p_hold_id uuid) returns uuid
language plpgsql stable
set search_path = ''
as $$
declare
  v_account_id uuid;
begin
  if p_hold_id is null then
    perform private.invalid('p_hold_id', 'required');
  end if;
  select h.account_id into v_account_id from public.credit_holds h where h.id = p_hold_id;
  if not found then
    perform private.fail('PT404', 'hold_not_found');
  end if;
  perform private.authorize(v_account_id, true);
  return v_account_id;
end
$$;
revoke all on function private.hold_account(uuid) from public;

create function private.capture_hold(p_hold_id uuid, p_amount integer, p_metadata jsonb) returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  v_hold public.credit_holds;
  v_account public.credit_accounts;
  v_charge bigint;
  v_from_sub bigint;
  v_tx uuid := private.uuid_v7();
  v_key text;
  v_metadata jsonb;
  v_result jsonb;
begin
  v_account := private.lock_account(private.hold_account(p_hold_id));
  select * into v_hold from public.credit_holds h where h.id = p_hold_id for update;
  if v_hold.status = 'captured' then
    return v_hold.result || '{"replayed": true}'::jsonb;
  end if;
  perform private.check_metadata(p_metadata);
  if v_hold.status <> 'active' then
    perform private.fail('PT409', 'hold_not_active', jsonb_build_object('status', v_hold.status));
  end if;
  if p_amount is not null then
    perform private.check_amount('p_amount', p_amount);
    if p_amount > v_hold.amount then
      perform private.invalid('p_amount', format('must not exceed the held amount (%s)', v_hold.amount));
    end if;
  end if;
  v_charge := coalesce(p_amount, v_hold.amount);
  -- Holds are protected from every other decrease, so the pools cover them.
  v_from_sub := least(v_account.subscription_balance, v_charge);
  -- Unique per capture (the hold's status makes a capture happen once), so no
  -- key a caller may choose is taken.
  v_key := 'hold:' || p_hold_id || ':capture:' || v_tx;
  v_metadata := v_hold.metadata || coalesce(p_metadata, '{}'::jsonb);

  update public.credit_accounts a
     set subscription_balance = a.subscription_balance - v_from_sub,
         purchased_balance = a.purchased_balance - (v_charge - v_from_sub),
         held = a.held - v_hold.amount,
         next_hold_expiry = case when a.held - v_hold.amount = 0 then null else a.next_hold_expiry end,
         updated_at = now()
   where a.id = v_account.id
  returning a.* into v_account;

  v_result := jsonb_build_object(
    'transaction_id', v_tx, 'hold_id', p_hold_id, 'charged', v_charge, 'released', v_hold.amount - v_charge,
    'from_subscription', v_from_sub, 'from_purchased', v_charge - v_from_sub, 'replayed', false,
    'balance', private.balance_json(v_account, v_account.held));

  insert into public.credit_transactions (id, account_id, kind, idempotency_key, request_hash, result, amount,
                                          operation, metadata, actor_id)
  values (v_tx, v_account.id, 'capture', v_key, private.request_hash('capture', to_jsonb(p_hold_id)),
          v_result, v_charge, v_hold.operation, v_metadata, private.actor());
  perform private.write_debit_ledger(v_account, v_tx, 'spend', v_from_sub, v_charge - v_from_sub,
                                     v_key, v_metadata, private.actor());
  update public.credit_holds h set status = 'captured', settled_at = now(), result = v_result
   where h.id = p_hold_id;
  return v_result;
end
$$;

create function public.capture_hold(p_hold_id uuid, p_amount integer default null,
                                    p_metadata jsonb default '{}'::jsonb)
returns jsonb
language sql
set search_path = ''
as $$
  select private.capture_hold(p_hold_id, p_amount, p_metadata)
$$;

revoke all on function private.capture_hold(uuid, integer, jsonb), public.capture_hold(uuid, integer, jsonb)
  from public, anon, authenticated;
grant execute on function private.capture_hold(uuid, integer, jsonb), public.capture_hold(uuid, integer, jsonb)
  to authenticated, service_role;

create function private.release_hold(p_hold_id uuid) returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  v_hold public.credit_holds;
  v_account public.credit_accounts;
  v_result jsonb;
begin
  v_account := private.lock_account(private.hold_account(p_hold_id));
  select * into v_hold from public.credit_holds h where h.id = p_hold_id for update;
  if v_hold.status = 'released' then
    return v_hold.result || '{"replayed": true}'::jsonb;
  end if;
  if v_hold.status <> 'active' then
    perform private.fail('PT409', 'hold_not_active', jsonb_build_object('status', v_hold.status));
  end if;
  update public.credit_accounts a
     set held = a.held - v_hold.amount,
         next_hold_expiry = case when a.held - v_hold.amount = 0 then null else a.next_hold_expiry end,
         updated_at = now()
   where a.id = v_account.id
  returning a.* into v_account;
  v_result := jsonb_build_object('hold_id', p_hold_id, 'released', v_hold.amount, 'replayed', false,
                                 'balance', private.balance_json(v_account, v_account.held));
  update public.credit_holds h set status = 'released', settled_at = now(), result = v_result
   where h.id = p_hold_id;
  return v_result;
end
$$;

create function public.release_hold(p_hold_id uuid) returns jsonb
language sql
set search_path = ''
as $$
  select private.release_hold(p_hold_id)
$$;

revoke all on function private.release_hold(uuid), public.release_hold(uuid) from public, anon, authenticated;
grant execute on function private.release_hold(uuid), public.release_hold(uuid) to authenticated, service_role;

-- ---------------------------------------------------------------------------
-- Reading a balance.
-- ---------------------------------------------------------------------------

create function private.get_credit_balance(p_account_id uuid) returns jsonb
language plpgsql stable security definer
set search_path = ''
as $$
declare
  v_account public.credit_accounts;
  v_account_id uuid := p_account_id;
begin
  if v_account_id is null then
    if private.is_service() then
      perform private.invalid('p_account_id', 'required for service calls');
    end if;
    select a.id into v_account_id from public.credit_accounts a where a.user_id = auth.uid();
    if v_account_id is null then
      if auth.uid() is null then
        perform private.fail('PT403', 'forbidden');
      end if;
      perform private.fail('PT404', 'account_not_found');
    end if;
  end if;
  perform private.authorize(v_account_id, false);
  select * into v_account from public.credit_accounts a where a.id = v_account_id;
  return private.balance_json(v_account);
end
$$;

create function public.get_credit_balance(p_account_id uuid default null) returns jsonb
language sql stable
set search_path = ''
as $$
  select private.get_credit_balance(p_account_id)
$$;

revoke all on function private.get_credit_balance(uuid), public.get_credit_balance(uuid)
  from public, anon, authenticated;
grant execute on function private.get_credit_balance(uuid), public.get_credit_balance(uuid)
  to authenticated, service_role;

-- ---------------------------------------------------------------------------
-- Granting (service only).
-- ---------------------------------------------------------------------------

create function private.add_purchased_credits(p_account_id uuid, p_amount integer, p_idempotency_key text,
                                              p_stripe_ref text, p_description text, p_metadata jsonb)
returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  v_hash uuid;
  v_account public.credit_accounts;
  v_result jsonb;
  v_tx uuid := private.uuid_v7();
begin
  perform private.authorize(p_account_id, true);
  perform private.check_amount('p_amount', p_amount);
  perform private.check_key(p_idempotency_key);
  perform private.check_metadata(p_metadata);
  v_hash := private.request_hash('purchase', jsonb_build_array(p_amount, p_stripe_ref, p_description, p_metadata));
  v_account := private.lock_account(p_account_id);
  v_result := private.replay(p_account_id, p_idempotency_key, v_hash);
  if v_result is not null then
    return v_result;
  end if;
  v_account := private.credit_pool(p_account_id, 'purchased', p_amount, v_tx, 'purchase', p_idempotency_key,
                                   p_stripe_ref, p_metadata, null);
  v_result := jsonb_build_object('transaction_id', v_tx, 'added', p_amount, 'replayed', false,
                                 'balance', private.balance_json(v_account));
  perform private.record(v_tx, p_account_id, 'purchase', p_idempotency_key, v_hash, v_result, p_amount,
                         'purchased', p_stripe_ref, p_description, p_metadata);
  return v_result;
end
$$;

create function public.add_purchased_credits(p_account_id uuid, p_amount integer, p_idempotency_key text,
                                             p_stripe_ref text default null, p_description text default null,
                                             p_metadata jsonb default '{}'::jsonb)
returns jsonb
language sql
set search_path = ''
as $$
  select private.add_purchased_credits(p_account_id, p_amount, p_idempotency_key, p_stripe_ref,
                                       p_description, p_metadata)
$$;

revoke all on function private.add_purchased_credits(uuid, integer, text, text, text, jsonb),
  public.add_purchased_credits(uuid, integer, text, text, text, jsonb) from public, anon, authenticated;
grant execute on function private.add_purchased_credits(uuid, integer, text, text, text, jsonb),
  public.add_purchased_credits(uuid, integer, text, text, text, jsonb) to service_role;

-- Expire what is left of the subscription pool (never credits active holds
-- reserve) and write its ledger row. The caller holds the account lock.
create function private.expire_pool(p_account public.credit_accounts, p_tx uuid, p_key text,
                                    p_stripe_ref text, p_metadata jsonb)
returns public.credit_accounts
language plpgsql
set search_path = ''
as $$
declare
  v_account public.credit_accounts := private.take_from_pool(p_account, 'subscription',
                                                             p_account.subscription_balance);
begin
  perform private.debit_ledger(v_account, 'subscription',
                               p_account.subscription_balance - v_account.subscription_balance,
                               p_tx, 'expire', p_key, p_stripe_ref, p_metadata, null,
                               p_account.period_start, p_account.period_end);
  return v_account;
end
$$;
revoke all on function private.expire_pool(public.credit_accounts, uuid, text, text, jsonb) from public;

create function private.add_subscription_credits(p_account_id uuid, p_amount integer, p_period_start timestamptz,
                                                 p_period_end timestamptz, p_idempotency_key text,
                                                 p_stripe_ref text, p_metadata jsonb)
returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  v_hash uuid;
  v_account public.credit_accounts;
  v_result jsonb;
  v_tx uuid := private.uuid_v7();
  v_expired bigint := 0;
  v_granted bigint := 0;
begin
  perform private.authorize(p_account_id, true);
  perform private.check_amount('p_amount', p_amount, 0);
  perform private.check_key(p_idempotency_key);
  perform private.check_metadata(p_metadata);
  if p_period_start is null then
    perform private.invalid('p_period_start', 'required');
  end if;
  if p_period_end is null or p_period_end <= p_period_start then
    perform private.invalid('p_period_end', 'must be after p_period_start');
  end if;
  v_hash := private.request_hash('subscription',
    jsonb_build_array(p_amount, p_period_start, p_period_end, p_stripe_ref, p_metadata));
  v_account := private.lock_account(p_account_id);
  v_result := private.replay(p_account_id, p_idempotency_key, v_hash);
  if v_result is not null then
    return v_result;
  end if;

  -- A grant for a period older than the current one (a late or reordered
  -- event) changes nothing.
  if v_account.period_start is null or p_period_start >= v_account.period_start then
    v_expired := v_account.subscription_balance;
    v_account := private.expire_pool(v_account, v_tx, p_idempotency_key, p_stripe_ref, p_metadata);
    v_expired := v_expired - v_account.subscription_balance;
    update public.credit_accounts a
       set period_start = p_period_start, period_end = p_period_end, updated_at = now()
     where a.id = p_account_id;
    if p_amount > 0 then
      v_account := private.credit_pool(p_account_id, 'subscription', p_amount, v_tx, 'grant', p_idempotency_key,
                                       p_stripe_ref, p_metadata, null);
    else
      select * into v_account from public.credit_accounts a where a.id = p_account_id;
    end if;
    v_granted := p_amount;
  end if;

  v_result := jsonb_build_object('transaction_id', v_tx, 'expired', v_expired, 'granted', v_granted,
                                 'replayed', false, 'balance', private.balance_json(v_account));
  perform private.record(v_tx, p_account_id, 'grant', p_idempotency_key, v_hash, v_result, v_granted,
                         'subscription', p_stripe_ref, null, p_metadata);
  return v_result;
end
$$;

create function public.add_subscription_credits(p_account_id uuid, p_amount integer, p_period_start timestamptz,
                                                p_period_end timestamptz, p_idempotency_key text,
                                                p_stripe_ref text default null,
                                                p_metadata jsonb default '{}'::jsonb)
returns jsonb
language sql
set search_path = ''
as $$
  select private.add_subscription_credits(p_account_id, p_amount, p_period_start, p_period_end,
                                          p_idempotency_key, p_stripe_ref, p_metadata)
$$;

revoke all on function
  private.add_subscription_credits(uuid, integer, timestamptz, timestamptz, text, text, jsonb),
  public.add_subscription_credits(uuid, integer, timestamptz, timestamptz, text, text, jsonb)
  from public, anon, authenticated;
grant execute on function
  private.add_subscription_credits(uuid, integer, timestamptz, timestamptz, text, text, jsonb),
  public.add_subscription_credits(uuid, integer, timestamptz, timestamptz, text, text, jsonb)
  to service_role;

create function private.expire_subscription_credits(p_account_id uuid, p_idempotency_key text) returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  v_hash uuid := private.request_hash('expire', '[]'::jsonb);
  v_account public.credit_accounts;
  v_result jsonb;
  v_tx uuid := private.uuid_v7();
  v_expired bigint;
begin
  perform private.authorize(p_account_id, true);
  perform private.check_key(p_idempotency_key);
  v_account := private.lock_account(p_account_id);
  v_result := private.replay(p_account_id, p_idempotency_key, v_hash);
  if v_result is not null then
    return v_result;
  end if;
  v_expired := v_account.subscription_balance;
  v_account := private.expire_pool(v_account, v_tx, p_idempotency_key, null, '{}'::jsonb);
  v_expired := v_expired - v_account.subscription_balance;
  v_result := jsonb_build_object('transaction_id', v_tx, 'expired', v_expired, 'replayed', false,
                                 'balance', private.balance_json(v_account));
  perform private.record(v_tx, p_account_id, 'expire', p_idempotency_key, v_hash, v_result, v_expired,
                         'subscription');
  return v_result;
end
$$;

create function public.expire_subscription_credits(p_account_id uuid, p_idempotency_key text) returns jsonb
language sql
set search_path = ''
as $$
  select private.expire_subscription_credits(p_account_id, p_idempotency_key)
$$;

revoke all on function private.expire_subscription_credits(uuid, text),
  public.expire_subscription_credits(uuid, text) from public, anon, authenticated;
grant execute on function private.expire_subscription_credits(uuid, text),
  public.expire_subscription_credits(uuid, text) to service_role;

-- ---------------------------------------------------------------------------
-- Giving back and taking back (service only).
-- ---------------------------------------------------------------------------

create function private.refund_credits(p_transaction_id uuid, p_idempotency_key text, p_amount integer,
                                       p_reason text) returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  v_spend public.credit_transactions;
  v_hash uuid;
  v_account public.credit_accounts;
  v_result jsonb;
  v_tx uuid := private.uuid_v7();
  v_refundable bigint;
  v_amount bigint;
  v_metadata jsonb := jsonb_build_object('refund_of', p_transaction_id, 'reason', p_reason);
begin
  if not private.is_service() then
    perform private.fail('PT403', 'forbidden');
  end if;
  perform private.check_key(p_idempotency_key);
  if p_amount is not null then
    perform private.check_amount('p_amount', p_amount);
  end if;
  select t.account_id into v_spend.account_id from public.credit_transactions t
   where t.id = p_transaction_id and t.kind in ('spend', 'capture');
  if v_spend.account_id is null then
    perform private.fail('PT404', 'transaction_not_found');
  end if;
  v_hash := private.request_hash('refund', jsonb_build_array(p_transaction_id, p_amount, p_reason));
  v_account := private.lock_account(v_spend.account_id);
  v_result := private.replay(v_account.id, p_idempotency_key, v_hash);
  if v_result is not null then
    return v_result;
  end if;
  -- Re-read under the account lock: refunds of one spend queue here.
  select * into v_spend from public.credit_transactions t where t.id = p_transaction_id;
  v_refundable := v_spend.amount - v_spend.refunded;
  v_amount := coalesce(p_amount, v_refundable);
  if v_amount < 1 then
    perform private.invalid('p_transaction_id', 'nothing left to refund');
  end if;
  if v_amount > v_refundable then
    perform private.fail('22023', 'invalid_argument',
      jsonb_build_object('argument', 'p_amount', 'reason', 'exceeds what is left to refund',
                         'refundable', v_refundable));
  end if;
  update public.credit_transactions t set refunded = t.refunded + v_amount where t.id = p_transaction_id;
  v_account := private.credit_pool(v_account.id, 'purchased', v_amount, v_tx, 'refund', p_idempotency_key,
                                   null, v_metadata, null);
  v_result := jsonb_build_object('transaction_id', v_tx, 'refunded', v_amount, 'replayed', false,
                                 'balance', private.balance_json(v_account));
  perform private.record(v_tx, v_account.id, 'refund', p_idempotency_key, v_hash, v_result, v_amount,
                         'purchased', null, p_reason, v_metadata);
  return v_result;
end
$$;

create function public.refund_credits(p_transaction_id uuid, p_idempotency_key text, p_amount integer default null,
                                      p_reason text default null) returns jsonb
language sql
set search_path = ''
as $$
  select private.refund_credits(p_transaction_id, p_idempotency_key, p_amount, p_reason)
$$;

revoke all on function private.refund_credits(uuid, text, integer, text),
  public.refund_credits(uuid, text, integer, text) from public, anon, authenticated;
grant execute on function private.refund_credits(uuid, text, integer, text),
  public.refund_credits(uuid, text, integer, text) to service_role;

create function private.clawback_credits(p_stripe_ref text, p_idempotency_key text, p_amount integer,
                                         p_reason text) returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  v_account_id uuid;
  v_hash uuid;
  v_account public.credit_accounts;
  v_result jsonb;
  v_tx uuid := private.uuid_v7();
  v_grant public.credit_transactions;
  v_granted bigint;
  v_taken_before bigint;
  v_outstanding bigint;
  v_taken bigint;
  v_metadata jsonb := jsonb_build_object('reason', p_reason);
begin
  if not private.is_service() then
    perform private.fail('PT403', 'forbidden');
  end if;
  perform private.check_key(p_idempotency_key);
  if p_stripe_ref is null or length(p_stripe_ref) not between 1 and 255 then
    perform private.invalid('p_stripe_ref', 'must be 1 to 255 characters');
  end if;
  if p_amount is not null then
    perform private.check_amount('p_amount', p_amount, 0);
  end if;
  select t.account_id into v_account_id from public.credit_transactions t
   where t.stripe_ref = p_stripe_ref and t.kind in ('purchase', 'grant') and t.amount > 0
   order by t.created_at limit 1;
  if v_account_id is null then
    perform private.fail('PT404', 'transaction_not_found', jsonb_build_object('stripe_ref', p_stripe_ref));
  end if;
  v_hash := private.request_hash('clawback', jsonb_build_array(p_stripe_ref, p_amount, p_reason));
  v_account := private.lock_account(v_account_id);
  v_result := private.replay(v_account_id, p_idempotency_key, v_hash);
  if v_result is not null then
    return v_result;
  end if;

  -- The grant(s) of this payment on this account, read under the account lock.
  select * into v_grant from public.credit_transactions t
   where t.account_id = v_account_id and t.stripe_ref = p_stripe_ref and t.kind in ('purchase', 'grant')
     and t.amount > 0
   order by t.created_at limit 1;
  select sum(t.amount), sum(t.clawed_back) into v_granted, v_taken_before
    from public.credit_transactions t
   where t.account_id = v_account_id and t.stripe_ref = p_stripe_ref and t.kind in ('purchase', 'grant');
  -- p_amount is cumulative: only what was not yet taken back is taken now.
  v_outstanding := greatest(least(coalesce(p_amount, v_granted), v_granted) - v_taken_before, 0);
  v_taken := private.pool_of(v_account, v_grant.pool);
  v_account := private.take_from_pool(v_account, v_grant.pool, v_outstanding);
  v_taken := v_taken - private.pool_of(v_account, v_grant.pool);
  perform private.debit_ledger(v_account, v_grant.pool, v_taken, v_tx, 'clawback', p_idempotency_key,
                               p_stripe_ref, v_metadata, null);
  update public.credit_transactions t set clawed_back = t.clawed_back + v_taken where t.id = v_grant.id;

  v_result := jsonb_build_object('transaction_id', v_tx, 'clawed_back', v_taken,
                                 'shortfall', v_outstanding - v_taken, 'replayed', false,
                                 'balance', private.balance_json(v_account));
  perform private.record(v_tx, v_account_id, 'clawback', p_idempotency_key, v_hash, v_result, v_taken,
                         v_grant.pool, p_stripe_ref, p_reason, v_metadata);
  return v_result;
end
$$;

create function public.clawback_credits(p_stripe_ref text, p_idempotency_key text, p_amount integer default null,
                                        p_reason text default null) returns jsonb
language sql
set search_path = ''
as $$
  select private.clawback_credits(p_stripe_ref, p_idempotency_key, p_amount, p_reason)
$$;

revoke all on function private.clawback_credits(text, text, integer, text),
  public.clawback_credits(text, text, integer, text) from public, anon, authenticated;
grant execute on function private.clawback_credits(text, text, integer, text),
  public.clawback_credits(text, text, integer, text) to service_role;

create function private.admin_adjust_credits(p_account_id uuid, p_pool text, p_amount integer, p_reason text,
                                             p_idempotency_key text) returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  v_hash uuid;
  v_account public.credit_accounts;
  v_result jsonb;
  v_tx uuid := private.uuid_v7();
  v_taken bigint;
  v_metadata jsonb := jsonb_build_object('reason', p_reason);
begin
  perform private.authorize(p_account_id, true);
  if p_pool is null or p_pool not in ('subscription', 'purchased') then
    perform private.invalid('p_pool', 'must be subscription or purchased');
  end if;
  if p_amount is null or p_amount = 0 or abs(p_amount::bigint) > 1000000000 then
    perform private.invalid('p_amount', 'must be a non-zero whole number from -1000000000 to 1000000000');
  end if;
  if p_reason is null or length(btrim(p_reason)) = 0 or length(p_reason) > 1000 then
    perform private.invalid('p_reason', 'must be 1 to 1000 characters');
  end if;
  perform private.check_key(p_idempotency_key);
  v_hash := private.request_hash('adjust', jsonb_build_array(p_pool, p_amount, p_reason));
  v_account := private.lock_account(p_account_id);
  v_result := private.replay(p_account_id, p_idempotency_key, v_hash);
  if v_result is not null then
    return v_result;
  end if;
  if p_amount > 0 then
    v_account := private.credit_pool(p_account_id, p_pool, p_amount, v_tx, 'adjustment', p_idempotency_key,
                                     null, v_metadata, null);
  else
    v_taken := private.pool_of(v_account, p_pool);
    v_account := private.take_from_pool(v_account, p_pool, -p_amount);
    v_taken := v_taken - private.pool_of(v_account, p_pool);
    if v_taken < -p_amount then
      perform private.insufficient(-p_amount, v_taken);
    end if;
    perform private.debit_ledger(v_account, p_pool, v_taken, v_tx, 'adjustment', p_idempotency_key, null,
                                 v_metadata, null);
  end if;
  v_result := jsonb_build_object('transaction_id', v_tx, 'replayed', false,
                                 'balance', private.balance_json(v_account));
  perform private.record(v_tx, p_account_id, 'adjustment', p_idempotency_key, v_hash, v_result, p_amount,
                         p_pool, null, p_reason, v_metadata);
  return v_result;
end
$$;

create function public.admin_adjust_credits(p_account_id uuid, p_pool text, p_amount integer, p_reason text,
                                            p_idempotency_key text) returns jsonb
language sql
set search_path = ''
as $$
  select private.admin_adjust_credits(p_account_id, p_pool, p_amount, p_reason, p_idempotency_key)
$$;

revoke all on function private.admin_adjust_credits(uuid, text, integer, text, text),
  public.admin_adjust_credits(uuid, text, integer, text, text) from public, anon, authenticated;
grant execute on function private.admin_adjust_credits(uuid, text, integer, text, text),
  public.admin_adjust_credits(uuid, text, integer, text, text) to service_role;

-- ---------------------------------------------------------------------------
-- License keys.
-- ---------------------------------------------------------------------------

create function private.create_license_key(p_account_id uuid, p_name text, p_expires_at timestamptz)
returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  -- 2 x 122 random bits from the core generator (no pgcrypto needed).
  v_key text := 'ck_' || replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '');
  v_id uuid;
begin
  perform private.authorize(p_account_id, true);
  if p_name is null or length(btrim(p_name)) = 0 or length(p_name) > 100 then
    perform private.invalid('p_name', 'must be 1 to 100 characters');
  end if;
  if p_expires_at is not null and p_expires_at <= now() then
    perform private.invalid('p_expires_at', 'must be in the future');
  end if;
  insert into public.credit_license_keys (account_id, name, prefix, key_hash, expires_at, created_by)
  values (p_account_id, p_name, left(v_key, 11), sha256(convert_to(v_key, 'UTF8')), p_expires_at, private.actor())
  returning id into v_id;
  return jsonb_build_object('key_id', v_id, 'key', v_key, 'prefix', left(v_key, 11), 'expires_at', p_expires_at);
end
$$;

create function public.create_license_key(p_account_id uuid, p_name text, p_expires_at timestamptz default null)
returns jsonb
language sql
set search_path = ''
as $$
  select private.create_license_key(p_account_id, p_name, p_expires_at)
$$;

revoke all on function private.create_license_key(uuid, text, timestamptz),
  public.create_license_key(uuid, text, timestamptz) from public, anon, authenticated;
grant execute on function private.create_license_key(uuid, text, timestamptz),
  public.create_license_key(uuid, text, timestamptz) to authenticated, service_role;

create function private.revoke_license_key(p_key_id uuid) returns jsonb
language plpgsql security definer
set search_path = ''
as $$
declare
  v_account_id uuid;
  v_revoked_at timestamptz;
begin
  select k.account_id into v_account_id from public.credit_license_keys k where k.id = p_key_id;
  if v_account_id is null then
    perform private.fail('PT403', 'invalid_license_key');
  end if;
  perform private.authorize(v_account_id, true);
  update public.credit_license_keys k set revoked_at = coalesce(k.revoked_at, now())
   where k.id = p_key_id
  returning k.revoked_at into v_revoked_at;
  return jsonb_build_object('key_id', p_key_id, 'revoked_at', v_revoked_at);
end
$$;

create function public.revoke_license_key(p_key_id uuid) returns jsonb
language sql
set search_path = ''
as $$
  select private.revoke_license_key(p_key_id)
$$;

revoke all on function private.revoke_license_key(uuid), public.revoke_license_key(uuid)
  from public, anon, authenticated;
grant execute on function private.revoke_license_key(uuid), public.revoke_license_key(uuid)
  to authenticated, service_role;

-- ---------------------------------------------------------------------------
-- Checking the books.
-- ---------------------------------------------------------------------------

create function private.reconcile_credit_balances() returns jsonb
language sql stable security definer
set search_path = ''
as $$
  with sums as (
    select l.account_id, l.pool, sum(l.amount)::bigint as ledger
      from public.credit_ledger l group by l.account_id, l.pool
  ), holds as (
    select h.account_id, sum(h.amount)::bigint as held
      from public.credit_holds h where h.status = 'active' group by h.account_id
  ), checks as (
    select a.id as account_id, v.pool, v.balance, coalesce(v.expected, 0) as expected
      from public.credit_accounts a
      left join sums s on s.account_id = a.id and s.pool = 'subscription'
      left join sums p on p.account_id = a.id and p.pool = 'purchased'
      left join holds h on h.account_id = a.id
     cross join lateral (values ('subscription', a.subscription_balance, s.ledger),
                                ('purchased', a.purchased_balance, p.ledger),
                                ('held', a.held, h.held)) v(pool, balance, expected)
  )
  select jsonb_build_object(
    'checked', count(*),
    'mismatches', coalesce(jsonb_agg(jsonb_build_object('account_id', c.account_id, 'pool', c.pool,
                                                        'balance', c.balance, 'ledger', c.expected))
                           filter (where c.balance <> c.expected), '[]'::jsonb))
  from checks c
$$;

create function public.reconcile_credit_balances() returns jsonb
language sql stable
set search_path = ''
as $$
  select private.reconcile_credit_balances()
$$;

revoke all on function private.reconcile_credit_balances(), public.reconcile_credit_balances()
  from public, anon, authenticated;
grant execute on function private.reconcile_credit_balances(), public.reconcile_credit_balances()
  to service_role;
