-- At most 1,000 license keys created per account in 24 hours (revoked ones
-- count): creating and revoking in a loop could otherwise grow the table
-- without limit. The account's keys are found by creation time.

drop index public.credit_license_keys_account_idx;
create index credit_license_keys_account_idx on public.credit_license_keys (account_id, created_at);

create or replace function private.write_bounds()
returns jsonb
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
begin
  return '{"license_keys": 100, "license_keys_per_day": 1000, "active_holds": 1000, "holds_per_minute": 600}'::jsonb;
end
$$;

create or replace function private.create_license_key(p_account_id uuid, p_name text, p_expires_at timestamptz default null)
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

