-- Personal account by default: a user's spend or hold without an account.
--
-- get_credit_balance(null) has always answered for the caller's personal
-- account. deduct_credits and reserve_credits now do the same, so a client that
-- spends from its own account makes one call instead of asking for the account
-- id first. The rule lives in one function, private.personal_account(), which
-- get_credit_balance uses too. Service calls must still name the account.

create function private.personal_account() returns uuid
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_account_id uuid;
begin
  if private.is_service() then
    perform private.invalid('p_account_id', 'required for service calls');
  end if;
  if auth.uid() is null then
    perform private.fail('PT403', 'forbidden');
  end if;
  select a.id into v_account_id from public.credit_accounts a where a.user_id = auth.uid();
  if v_account_id is null then
    perform private.fail('PT404', 'account_not_found');
  end if;
  return v_account_id;
end
$$;
comment on function private.personal_account() is
  'The calling user''s personal account (a null p_account_id); service calls must name one.';
revoke all on function private.personal_account() from public, anon, authenticated, service_role;
grant execute on function private.personal_account() to authenticated, service_role;

create or replace function private.get_credit_balance(p_account_id uuid default null) returns jsonb
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

-- coalesce() evaluates its second argument only for a null account, so the
-- usual call (an account id) pays nothing for this.
create or replace function public.deduct_credits(p_account_id uuid, p_idempotency_key text,
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
                                p_amount, p_operation, p_model, p_input_tokens, p_output_tokens, p_metadata);
end
$$;
comment on function public.deduct_credits(uuid, text, integer, text, text, integer, integer, jsonb) is
  'Spend now (promotional, then subscription, then purchased); a null account is the caller''s own. '
  '{transaction_id, account_id, charged, from_promotional, from_subscription, from_purchased, replayed, balance}.';

create or replace function public.reserve_credits(p_account_id uuid, p_idempotency_key text,
                                                  p_amount integer default null,
                                                  p_operation text default null, p_ttl_seconds integer default 900,
                                                  p_metadata jsonb default '{}'::jsonb)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.reserve_credits(coalesce(p_account_id, private.personal_account()), p_idempotency_key,
                                 p_amount, p_operation, p_ttl_seconds, p_metadata);
end
$$;
comment on function public.reserve_credits(uuid, text, integer, text, integer, jsonb) is
  'Reserve credits for work in progress; a null account is the caller''s own. '
  '{hold_id, account_id, amount, expires_at, replayed, balance}.';
