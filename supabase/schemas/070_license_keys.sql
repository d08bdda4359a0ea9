-- License keys: long random secrets tied to an account, for server or
-- desktop callers.
--
-- Holds credit_license_keys, create_license_key, revoke_license_key and
-- deduct_credits_by_license.
--
-- Rules:
--   * Only the SHA-256 of a key is stored; the key is shown once, at creation.
--   * The key is checked in the contract's order: exists, active, not expired.
--   * A license-key deduct is a deduct for the key's account, with the same
--     checks and the same idempotency space as the account's own deducts;
--     it runs as service_role, yet no key it passes can touch a Stripe record
--     (those live in the 'stripe' origin, see the ledger chapter).
--   * At most 100 active (not revoked, not expired) keys per account, and
--     1,000 created per account in 24 hours, so creating and revoking in a
--     loop cannot grow the table without limit (private.write_bounds): over
--     either, invalid_argument.
--   * A key belongs to the account, not to the person who made it: demoting
--     or removing its creator revokes nothing (owners see created_by).

create table public.credit_license_keys (
  id uuid primary key default gen_random_uuid(),
  account_id uuid not null references public.credit_accounts (id) on delete cascade,
  name text not null,
  prefix text not null,
  key_hash bytea not null unique,
  expires_at timestamptz,
  revoked_at timestamptz,
  created_by uuid,
  created_at timestamptz not null default now()
);
create index credit_license_keys_account_idx on public.credit_license_keys (account_id, created_at);

alter table public.credit_license_keys enable row level security;
revoke all on public.credit_license_keys from anon, authenticated, service_role;
grant select on public.credit_license_keys to service_role;
-- The hash stays server-side even for readers of the row.
grant select (id, account_id, name, prefix, expires_at, revoked_at, created_by, created_at)
  on public.credit_license_keys to authenticated;
create policy credit_license_keys_read on public.credit_license_keys for select to authenticated
  using (account_id in (select private.readable_account_ids()) or (select private.is_super_admin()));

create function private.create_license_key(p_account_id uuid, p_name text, p_expires_at timestamptz default null)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  -- 2 x 122 random bits from the core generator (no pgcrypto needed).
  v_key text := 'ck_' || replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '');
  v_id uuid;
begin
  perform private.authorize(p_account_id, true);
  if p_name is null or length(btrim(p_name)) = 0 then
    perform private.check_text('p_name', null, 'key_name', true);
  end if;
  perform private.check_text('p_name', p_name, 'key_name', true);
  if p_expires_at is not null and p_expires_at <= now() then
    perform private.invalid('p_expires_at', 'must be in the future');
  end if;
  -- Serialize key creations of one account so the bound holds under concurrency.
  perform 1 from public.credit_wallets w where w.account_id = p_account_id for update;
  if (select count(*) from (select 1 from public.credit_license_keys k
                             where k.account_id = p_account_id and k.revoked_at is null
                               and (k.expires_at is null or k.expires_at > now())
                             limit (private.write_bounds() ->> 'license_keys')::integer) x)
     >= (private.write_bounds() ->> 'license_keys')::integer then
    perform private.invalid('p_account_id', format('at most %s active license keys per account',
                                                   private.write_bounds() ->> 'license_keys'));
  end if;
  if (select count(*) from (select 1 from public.credit_license_keys k
                             where k.account_id = p_account_id and k.created_at > now() - interval '24 hours'
                             limit (private.write_bounds() ->> 'license_keys_per_day')::integer) x)
     >= (private.write_bounds() ->> 'license_keys_per_day')::integer then
    perform private.invalid('p_account_id', format('at most %s license keys created per account in 24 hours',
                                                   private.write_bounds() ->> 'license_keys_per_day'));
  end if;
  insert into public.credit_license_keys (account_id, name, prefix, key_hash, expires_at, created_by)
  values (p_account_id, p_name, left(v_key, 11), sha256(convert_to(v_key, 'UTF8')), p_expires_at, private.actor())
  returning id into v_id;
  return jsonb_build_object('key_id', v_id, 'key', v_key, 'prefix', left(v_key, 11), 'expires_at', p_expires_at);
end
$$;

create function public.create_license_key(p_account_id uuid, p_name text, p_expires_at timestamptz default null)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.create_license_key(p_account_id, p_name, p_expires_at);
end
$$;
comment on function public.create_license_key(uuid, text, timestamptz) is
  'A new license key for the account: {key_id, key, prefix, expires_at}; the key is shown only here.';

create function private.revoke_license_key(p_key_id uuid) returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
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

create function public.revoke_license_key(p_key_id uuid)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.revoke_license_key(p_key_id);
end
$$;
comment on function public.revoke_license_key(uuid) is 'Revoke a license key: {key_id, revoked_at}.';

-- The license key (its account, its id: the spender its limits name), checked in the contract's order.
create function private.license_key(p_license_key text) returns public.credit_license_keys
language plpgsql stable
set search_path = pg_catalog, pg_temp
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
  return v_key;
end
$$;

create function private.deduct_credits_by_license(p_license_key text, p_idempotency_key text,
                                                 p_amount integer default null, p_operation text default null,
                                                 p_model text default null, p_input_tokens integer default null,
                                                 p_output_tokens integer default null,
                                                 p_metadata jsonb default '{}'::jsonb)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_key public.credit_license_keys;
begin
  perform private.require_service();
  v_key := private.license_key(p_license_key);
  return private.deduct_credits(v_key.account_id, p_idempotency_key, p_amount, p_operation, p_model,
                                p_input_tokens, p_output_tokens, p_metadata, v_key.id);
end
$$;

create function public.deduct_credits_by_license(p_license_key text, p_idempotency_key text,
                                                 p_amount integer default null, p_operation text default null,
                                                 p_model text default null, p_input_tokens integer default null,
                                                 p_output_tokens integer default null,
                                                 p_metadata jsonb default '{}'::jsonb)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.deduct_credits_by_license(p_license_key, p_idempotency_key, p_amount, p_operation, p_model, p_input_tokens, p_output_tokens, p_metadata);
end
$$;
comment on function public.deduct_credits_by_license(text, text, integer, text, text, integer, integer, jsonb) is
  'Service: deduct_credits for the account of an active, unexpired license key.';

revoke all on function public.create_license_key(uuid, text, timestamptz), public.revoke_license_key(uuid),
  private.license_key(text),
  public.deduct_credits_by_license(text, text, integer, text, text, integer, integer, jsonb)
  from public, anon, authenticated, service_role;
grant execute on function public.create_license_key(uuid, text, timestamptz), public.revoke_license_key(uuid)
  to authenticated, service_role;
grant execute on function
  public.deduct_credits_by_license(text, text, integer, text, text, integer, integer, jsonb) to service_role;

-- The definer code behind the public entry points.
revoke all on function private.create_license_key(uuid, text, timestamptz) from public, anon, authenticated, service_role;
grant execute on function private.create_license_key(uuid, text, timestamptz) to authenticated, service_role;
revoke all on function private.revoke_license_key(uuid) from public, anon, authenticated, service_role;
grant execute on function private.revoke_license_key(uuid) to authenticated, service_role;
revoke all on function private.deduct_credits_by_license(text, text, integer, text, text, integer, integer, jsonb) from public, anon, authenticated, service_role;
grant execute on function private.deduct_credits_by_license(text, text, integer, text, text, integer, integer, jsonb) to service_role;
