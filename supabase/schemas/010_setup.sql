-- Setup: the ground every later chapter stands on.
--
-- Holds the `private` schema (not exposed by the REST layer), the revocation
-- of Supabase's default grants for everything this SQL creates, time-
-- ordered ids, the error helpers and the input limits.
--
-- Rules enforced here, once for the whole engine:
--   * Supabase grants every new table and function in public to anon,
--     authenticated and service_role; each chapter revokes that per object
--     and grants what the contract allows (`anon` gets nothing). The
--     project's default privileges are left as Supabase set them.
--   * Every function pins `search_path = pg_catalog, pg_temp`: pg_catalog
--     first, and the session's temporary schema explicitly last, so no type,
--     table or function a caller creates in pg_temp can stand in for ours
--     (with an empty search_path PostgreSQL would still look in pg_temp first
--     for types and relations). Every name of ours is schema-qualified too.
--   * Errors are raised with the contract's SQLSTATE and a message that is
--     exactly the error's name; details are JSON.
--   * Text and JSON inputs are bounded by the limits in private.limits(), the
--     one place they are written (the HTTP layer's functions/limits.py must
--     agree; a test compares them).

create schema if not exists private;
revoke all on schema private from public;
grant usage on schema private to authenticated, service_role;

-- Time-ordered ids (UUIDv7, RFC 9562: 48-bit Unix ms, then random bits) for
-- accounts and transactions: rows made together sit together in the primary
-- key and the heap (the monthly reset walks accounts in id order; transaction
-- inserts append to the right of their index). One definition: its body is
-- PostgreSQL 18's own generator where there is one (a fraction of the cost),
-- else the same bits computed in SQL (PostgreSQL 15).
do $$
begin
  execute format($fn$
create function private.uuid_v7() returns uuid
language plpgsql volatile parallel safe
set search_path = pg_catalog, pg_temp
as $body$%s$body$
$fn$,
    case when current_setting('server_version_num')::integer >= 180000
         then ' begin return pg_catalog.uuidv7(); end '
         else $e$
begin
  return encode(set_bit(set_bit(
    overlay(uuid_send(gen_random_uuid())
            placing substring(int8send((extract(epoch from clock_timestamp()) * 1000)::bigint) from 3)
            from 1 for 6),
    52, 1), 53, 1), 'hex')::uuid;
end
$e$ end);
end
$$;

-- ---------------------------------------------------------------------------
-- Errors.
-- ---------------------------------------------------------------------------

create function private.fail(p_code text, p_message text, p_detail jsonb default null) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  if p_detail is null then
    raise exception using errcode = p_code, message = p_message;
  end if;
  raise exception using errcode = p_code, message = p_message, detail = p_detail::text;
end
$$;

create function private.invalid(p_argument text, p_reason text)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  perform private.fail('22023', 'invalid_argument',
                        jsonb_build_object('argument', p_argument, 'reason', p_reason));
end
$$;

create function private.insufficient(p_required bigint, p_available bigint)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  perform private.fail('PT402', 'insufficient_credits',
                        jsonb_build_object('required', p_required, 'available', greatest(p_available, 0)));
end
$$;

-- ---------------------------------------------------------------------------
-- Input limits: the one place they are written (docs/credits.md lists them).
-- ---------------------------------------------------------------------------

create function private.limits()
returns jsonb
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
begin
  return '{"idempotency_key": 255, "operation": 128, "model": 200, "metadata_bytes": 16384,
             "description": 1000, "reason": 1000, "key_name": 100, "stripe_ref": 255,
             "amount": 1000000000, "tokens": 1000000000, "ttl_seconds": 86400}'::jsonb;
end
$$;
comment on function private.limits() is
  'Input limits of the contract functions (characters, bytes for metadata); the HTTP layer uses the same.';

-- Text argument: null allowed unless p_required; otherwise 1..limit characters.
create function private.check_text(p_argument text, p_value text, p_limit text, p_required boolean default false)
returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_max integer := (private.limits() ->> p_limit)::integer;
begin
  if p_value is null then
    if p_required then
      perform private.invalid(p_argument, format('required (1 to %s characters)', v_max));
    end if;
  elsif length(p_value) not between 1 and v_max then
    perform private.invalid(p_argument, format('must be 1 to %s characters', v_max));
  end if;
end
$$;

-- Metadata is caller-supplied JSON stored on transaction rows: an object, bounded.
create function private.check_metadata(p_metadata jsonb, p_argument text default 'p_metadata') returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  if p_metadata is not null
     and (jsonb_typeof(p_metadata) <> 'object'
          or octet_length(p_metadata::text) > (private.limits() ->> 'metadata_bytes')::integer) then
    perform private.invalid(p_argument, format('must be a JSON object of at most %s bytes',
                                               private.limits() ->> 'metadata_bytes'));
  end if;
end
$$;

create function private.check_amount(p_argument text, p_amount bigint, p_min bigint default 1)
returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  if p_amount is null or p_amount < p_min or p_amount > (private.limits() ->> 'amount')::bigint then
    perform private.invalid(p_argument, format('must be a whole number from %s to %s', p_min,
                                               private.limits() ->> 'amount'));
  end if;
end
$$;

create function private.check_key(p_key text)
returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  perform private.check_text('p_idempotency_key', p_key, 'idempotency_key', true);
end
$$;

create function private.request_hash(p_function text, p_args jsonb)
returns uuid
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  return md5(p_function || ':' || p_args::text)::uuid;
end
$$;

revoke all on function private.uuid_v7(), private.fail(text, text, jsonb), private.invalid(text, text),
  private.insufficient(bigint, bigint), private.limits(), private.check_text(text, text, text, boolean),
  private.check_metadata(jsonb, text), private.check_amount(text, bigint, bigint), private.check_key(text),
  private.request_hash(text, jsonb)
  from public;
