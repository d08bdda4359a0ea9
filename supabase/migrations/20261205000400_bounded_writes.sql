-- Bounded writes: nobody can make an account write without limit.
--
--   * At most 100 active (not revoked, not expired) license keys per account:
--     the 101st create_license_key is invalid_argument (p_account_id).
--   * At most 1,000 active holds per account, and at most 600 hold creations
--     per account in one UTC minute: reserve_credits answers PT429
--     too_many_holds with detail {limit, retry_after} (seconds: until the
--     soonest active hold expires, or until the next minute). Checked after
--     the replay (a replay always replays) and before the credits.
-- The wallet counts the current minute's creations (hold_minute,
-- hold_minute_count), so the check costs one comparison; the active holds
-- are counted only up to the bound, from their partial index.

alter table public.credit_wallets add column hold_minute timestamptz;
alter table public.credit_wallets add column hold_minute_count integer not null default 0;

-- The bounds, written once (docs/credits.md lists them).
create function private.write_bounds()
returns jsonb
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
begin
  return '{"license_keys": 100, "active_holds": 1000, "holds_per_minute": 600}'::jsonb;
end
$$;

-- Refuse a new hold over a bound (the caller holds the wallet's lock and has swept it).
create function private.check_hold_bounds(p_wallet public.credit_wallets) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_per_minute integer := (private.write_bounds() ->> 'holds_per_minute')::integer;
  v_active integer := (private.write_bounds() ->> 'active_holds')::integer;
begin
  if p_wallet.hold_minute = date_trunc('minute', now()) and p_wallet.hold_minute_count >= v_per_minute then
    perform private.fail('PT429', 'too_many_holds', jsonb_build_object(
      'limit', v_per_minute,
      'retry_after', greatest(1, ceil(extract(epoch from date_trunc('minute', now()) + interval '1 minute' - now())))::integer));
  end if;
  if p_wallet.next_hold_expiry is not null
     and (select count(*) from (select 1 from public.credit_holds h
                                 where h.account_id = p_wallet.account_id and h.status = 'active'
                                 limit v_active) x) >= v_active then
    perform private.fail('PT429', 'too_many_holds', jsonb_build_object(
      'limit', v_active,
      'retry_after', greatest(1, ceil(extract(epoch from p_wallet.next_hold_expiry - now())))::integer));
  end if;
end
$$;

revoke all on function private.write_bounds(), private.check_hold_bounds(public.credit_wallets)
  from public, anon, authenticated, service_role;

create or replace function private.reserve_credits(p_account_id uuid, p_idempotency_key text, p_amount integer default null,
                                       p_operation text default null, p_ttl_seconds integer default 900,
                                       p_metadata jsonb default '{}'::jsonb)
returns jsonb
language plpgsql security definer
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
begin
  v_actor := private.authorize(p_account_id, true);
  v_cost := private.spend_cost(p_idempotency_key, p_amount, p_operation, null, null, null, p_metadata);
  if v_cost < 1 then
    perform private.invalid('p_operation', 'a hold must reserve at least 1 credit');
  end if;
  if p_ttl_seconds is null or p_ttl_seconds not between 1 and (private.limits() ->> 'ttl_seconds')::integer then
    perform private.invalid('p_ttl_seconds', format('must be 1 to %s seconds', private.limits() ->> 'ttl_seconds'));
  end if;
  v_hash := private.request_hash('reserve', jsonb_build_array(p_amount, p_operation, p_ttl_seconds, p_metadata));
  v_expires := now() + make_interval(secs => p_ttl_seconds);

  v_wallet := private.lock_wallet(p_account_id);
  v_entry := private.find_key(p_account_id, p_idempotency_key, v_hash);
  if v_entry.id is not null then
    return private.result(v_entry, true);
  end if;
  perform private.check_hold_bounds(v_wallet);
  if private.available(v_wallet) < v_cost then
    perform private.insufficient(v_cost, private.available(v_wallet));
  end if;
  v_split := private.spend_split(v_wallet.promotional - v_wallet.held_promotional,
                                 v_wallet.subscription - v_wallet.held_subscription,
                                 v_wallet.purchased - v_wallet.held_purchased, v_cost);
  if v_split.promotional > 0 then
    -- Which grants: attribute spends first, then take soonest expiry first.
    perform private.materialize_promotions(v_wallet);
    with taken as (
      select g.id, g.expires_at,
             least(g.remaining, v_split.promotional - (g.cum - g.remaining)) as amount
        from (select p.id, p.expires_at, p.remaining,
                     sum(p.remaining) over (order by p.expires_at, p.id) as cum
                from public.credit_promotions p
               where p.account_id = p_account_id and p.remaining > 0) g
       where g.cum - g.remaining < v_split.promotional
    ), updated as (
      update public.credit_promotions p set remaining = p.remaining - t.amount
        from taken t where p.id = t.id
    )
    select jsonb_agg(jsonb_build_object('g', t.id, 'a', t.amount, 'e', t.expires_at)
                     order by t.expires_at, t.id)
      into v_parts from taken t;
  end if;
  insert into public.credit_holds (id, account_id, transaction_id, amount, promotional, subscription, purchased,
                                   promo_parts, sub_epoch, period_start, period_end, expires_at, operation,
                                   metadata)
  values (v_hold, p_account_id, v_tx, v_cost, v_split.promotional, v_split.subscription, v_split.purchased,
          v_parts, v_wallet.sub_epoch, v_wallet.period_start, v_wallet.period_end, v_expires, p_operation,
          coalesce(p_metadata, '{}'::jsonb));
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
                          p_operation => p_operation, p_id => v_tx);
  return private.result(v_entry, false);
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
  insert into public.credit_license_keys (account_id, name, prefix, key_hash, expires_at, created_by)
  values (p_account_id, p_name, left(v_key, 11), sha256(convert_to(v_key, 'UTF8')), p_expires_at, private.actor())
  returning id into v_id;
  return jsonb_build_object('key_id', v_id, 'key', v_key, 'prefix', left(v_key, 11), 'expires_at', p_expires_at);
end
$$;
