-- Usage analytics (contract v3): get_credit_usage, and the per-hour roll-up
-- behind it that roll_up_credit_usage() maintains apart from the spend
-- (supabase/schemas/120_usage.sql says how it stays exact while
-- transactions are in flight). All of it is new.

-- ---------------------------------------------------------------------------
-- Ids and times.
-- ---------------------------------------------------------------------------

-- The smallest time-ordered id of p_at's millisecond (the nil uuid for null:
-- before every id).
create function private.usage_id_floor(p_at timestamptz) returns uuid
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
begin
  if p_at is null then
    return '00000000-0000-0000-0000-000000000000'::uuid;
  end if;
  return (lpad(to_hex(greatest(0, floor(extract(epoch from p_at) * 1000))::bigint), 12, '0')
          || '00000000000000000000')::uuid;
end
$$;

-- The millisecond a time-ordered id was generated in.
create function private.usage_id_time(p_id uuid) returns timestamptz
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
begin
  return timestamptz 'epoch'
         + ('x' || lpad(left(replace(p_id::text, '-', ''), 12), 16, '0'))::bit(64)::bigint
           * interval '1 millisecond';
end
$$;

revoke all on function private.usage_id_floor(timestamptz), private.usage_id_time(uuid)
  from public, anon, authenticated, service_role;

-- ---------------------------------------------------------------------------
-- What counts as usage.
-- ---------------------------------------------------------------------------

-- One row per ledger row that is usage, with what it counts and under which
-- keys (an overdraft or a refund: its spend's). The lookups run only for the
-- few rows that need them (each branch is gated on the row's kind).
create view private.usage_entries as
select t.account_id,
       t.seq,
       t.id,
       t.created_at,
       case when t.kind = 'spend' then t.operation else s.operation end as operation,
       case when t.kind = 'spend' then t.model else s.model end as model,
       case when t.kind = 'spend' then t.actor_id else s.actor_id end as member,
       case when t.kind = 'spend' then t.license_key_id else s.license_key_id end as license_key,
       (case t.kind when 'spend' then -(t.promotional + t.subscription + t.purchased)
                    when 'overdraft' then t.debt
                    else -t.purchased end)::bigint as credits,
       (case when t.kind = 'spend' then 1 else 0 end)::bigint as calls,
       (case when t.kind = 'spend' then coalesce(t.input_tokens, 0) else 0 end)::bigint as input_tokens,
       (case when t.kind = 'spend' then coalesce(t.output_tokens, 0) else 0 end)::bigint as output_tokens
  from public.credit_transactions t
  left join lateral (
    -- A refund's spend.
    select x.operation, x.model, x.actor_id, x.license_key_id
      from public.credit_transactions x
     where t.kind = 'refund' and x.id = t.ref_id and x.account_id = t.account_id
    union all
    -- An overdraft's: the capture's spend of the same hold (written in the same transaction).
    select x.operation, x.model, x.actor_id, x.license_key_id
      from public.credit_transactions x
     where t.kind = 'overdraft' and x.account_id = t.account_id and x.ref_id = t.ref_id and x.kind = 'spend'
     limit 1) s on true
 where t.kind in ('spend', 'overdraft', 'refund');
comment on view private.usage_entries is
  'The ledger rows that are usage (spends, overdraft captures, refunds) with the credits, calls and tokens '
  'each counts, under its spend''s operation, model, member and license key.';
revoke all on private.usage_entries from public, anon, authenticated, service_role;

-- ---------------------------------------------------------------------------
-- The roll-up.
-- ---------------------------------------------------------------------------

-- Usage per account, UTC hour and keys: the entries whose id is before the
-- watermark (private.usage_rollup.rolled_until), and only those.
create table private.usage_hours (
  account_id uuid not null,
  hour timestamptz not null,
  operation text,
  model text,
  member uuid,
  license_key uuid,
  credits bigint not null default 0,
  calls bigint not null default 0,
  input_tokens bigint not null default 0,
  output_tokens bigint not null default 0,
  -- The ledger rows summed here have seq between these (the primary key finds the hour's rows again).
  first_seq bigint not null,
  last_seq bigint not null,
  constraint usage_hours_key unique nulls not distinct (account_id, hour, operation, model, member, license_key)
) with (fillfactor = 80);
comment on table private.usage_hours is
  'Usage (credits net of refunds, calls, tokens) per account, UTC hour, operation, model, member and license '
  'key: the ledger rows before the roll-up''s watermark (roll_up_credit_usage).';

-- The roll-up's state: one row.
create table private.usage_rollup (
  id boolean primary key default true check (id),
  -- The watermark: usage_hours holds the usage rows whose id is before it (null: none yet).
  rolled_until timestamptz,
  -- Every ledger row whose id is at or after rolled_until has a greater seq.
  rolled_seq bigint not null default 0,
  -- A confirmed watermark the batches are rolling up to, and its seq.
  confirmed_until timestamptz,
  confirmed_seq bigint,
  -- A proposed watermark, its seq, and the transactions running when it was proposed.
  pending_until timestamptz,
  pending_seq bigint,
  pending_xacts text[],
  pending_at timestamptz,
  -- The last mark: the ledger's seq, read just before mark_at.
  mark_at timestamptz,
  mark_seq bigint,
  last_run_at timestamptz
);
comment on table private.usage_rollup is
  'The usage roll-up''s state (one row): its watermark, the watermark it is rolling up to, the one waiting for '
  'the transactions in flight when it was proposed, and the last seq mark.';
insert into private.usage_rollup (id) values (true);

alter table private.usage_hours enable row level security;
alter table private.usage_rollup enable row level security;
revoke all on private.usage_hours, private.usage_rollup from public, anon, authenticated, service_role;

-- Roll up what the confirmed watermarks allow, confirm or propose the next
-- watermark, and take a mark (see the header). p_budget bounds the time spent
-- rolling up, p_batch the ledger rows a statement reads.
create function private.roll_up_credit_usage(p_budget interval default interval '3 seconds',
                                             p_batch integer default 50000)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  -- Slack on the times read from ids and from the clock (rounding to the
  -- millisecond, the few instructions between reading the seq and the clock).
  c_slack constant interval := interval '1 second';
  v_started timestamptz := clock_timestamp();
  v_state private.usage_rollup;
  v_confirmed timestamptz;
  v_next uuid;
  v_to timestamptz;
  v_rows bigint;
  v_total bigint := 0;
  v_batches integer := 0;
  v_now timestamptz;
begin
  perform private.require_service();
  if p_batch is null or p_batch < 1 then
    perform private.invalid('p_batch', 'must be at least 1');
  end if;
  if current_setting('transaction_isolation') <> 'read committed' then
    -- Each statement must see what committed before it (the confirmation depends on it).
    perform private.fail('25000', 'read_committed_required');
  end if;
  select * into v_state from private.usage_rollup r where r.id for update skip locked;
  if not found then
    return jsonb_build_object('skipped', 'another roll-up is running');
  end if;

  -- 1. The proposed watermark holds once none of the transactions running
  -- when it was proposed is running any more.
  if v_state.pending_until is not null
     and not exists (select 1 from pg_catalog.pg_locks l where l.virtualtransaction = any (v_state.pending_xacts)) then
    v_state.confirmed_until := v_state.pending_until;
    v_state.confirmed_seq := v_state.pending_seq;
    v_confirmed := v_state.pending_until;
    v_state.pending_until := null;
    v_state.pending_seq := null;
    v_state.pending_xacts := null;
    v_state.pending_at := null;
  end if;

  -- 2. Roll up the ids up to the confirmed watermark, p_batch ledger rows a
  -- statement, while the budget lasts.
  while v_state.confirmed_until is not null
        and (v_state.rolled_until is null or v_state.rolled_until < v_state.confirmed_until)
        and (v_batches = 0 or clock_timestamp() - v_started < p_budget) loop
    select t.id into v_next
      from public.credit_transactions t
     where t.id >= private.usage_id_floor(v_state.rolled_until)
     order by t.id
    offset p_batch limit 1;
    v_to := least(v_state.confirmed_until, private.usage_id_time(v_next));
    if v_state.rolled_until is not null and v_to <= v_state.rolled_until then
      -- More than p_batch rows in one millisecond: take that millisecond whole.
      v_to := least(v_state.confirmed_until, v_state.rolled_until + interval '1 millisecond');
    end if;
    with summed as (
      select e.account_id, date_trunc('hour', e.created_at, 'UTC') as hour, e.operation, e.model, e.member,
             e.license_key, sum(e.credits) as credits, sum(e.calls) as calls,
             sum(e.input_tokens) as input_tokens, sum(e.output_tokens) as output_tokens,
             min(e.seq) as first_seq, max(e.seq) as last_seq, count(*) as entries
        from private.usage_entries e
       where e.id >= private.usage_id_floor(v_state.rolled_until) and e.id < private.usage_id_floor(v_to)
       group by 1, 2, 3, 4, 5, 6
    ), written as (
      insert into private.usage_hours as u (account_id, hour, operation, model, member, license_key, credits,
                                            calls, input_tokens, output_tokens, first_seq, last_seq)
      select s.account_id, s.hour, s.operation, s.model, s.member, s.license_key, s.credits, s.calls,
             s.input_tokens, s.output_tokens, s.first_seq, s.last_seq
        from summed s
      on conflict on constraint usage_hours_key do update
        set credits = u.credits + excluded.credits, calls = u.calls + excluded.calls,
            input_tokens = u.input_tokens + excluded.input_tokens,
            output_tokens = u.output_tokens + excluded.output_tokens,
            first_seq = least(u.first_seq, excluded.first_seq), last_seq = greatest(u.last_seq, excluded.last_seq)
    )
    select coalesce(sum(s.entries), 0) into v_rows from summed s;
    v_total := v_total + v_rows;
    v_batches := v_batches + 1;
    v_state.rolled_until := v_to;
    if v_to = v_state.confirmed_until then
      -- Every row whose id is at or after the confirmed watermark came after its mark.
      v_state.rolled_seq := v_state.confirmed_seq;
    end if;
  end loop;

  -- 3. Propose the next watermark: the time of the mark an earlier run took
  -- (two seconds ago at least) plus the slack, with the transactions running
  -- now (this one aside). A mark serves one proposal.
  v_now := clock_timestamp();
  if v_state.pending_until is null and v_state.mark_at is not null
     and v_state.mark_at + 2 * c_slack <= v_now then
    if date_trunc('milliseconds', v_state.mark_at + c_slack)
       > coalesce(v_state.confirmed_until, v_state.rolled_until, '-infinity') then
      v_state.pending_until := date_trunc('milliseconds', v_state.mark_at + c_slack);
      v_state.pending_seq := v_state.mark_seq;
      v_state.pending_at := v_now;
      v_state.pending_xacts := array(
        select distinct l.virtualtransaction
          from pg_catalog.pg_locks l
         where l.pid is distinct from pg_backend_pid()
           and (l.pid is null  -- a prepared transaction
                or l.pid in (select a.pid from pg_catalog.pg_stat_activity a
                              where a.datid = (select d.oid from pg_catalog.pg_database d
                                                where d.datname = current_database()))));
    end if;
    v_state.mark_at := null;
  end if;

  -- 4. A new mark once the last one served: the seq first, then the time.
  if v_state.mark_at is null then
    v_state.mark_seq := coalesce(pg_catalog.pg_sequence_last_value(
                          pg_catalog.pg_get_serial_sequence('public.credit_transactions', 'seq')::regclass), 0);
    v_state.mark_at := clock_timestamp();
  end if;
  v_state.last_run_at := clock_timestamp();

  update private.usage_rollup r
     set rolled_until = v_state.rolled_until, rolled_seq = v_state.rolled_seq,
         confirmed_until = v_state.confirmed_until, confirmed_seq = v_state.confirmed_seq,
         pending_until = v_state.pending_until, pending_seq = v_state.pending_seq,
         pending_xacts = v_state.pending_xacts, pending_at = v_state.pending_at,
         mark_at = v_state.mark_at, mark_seq = v_state.mark_seq, last_run_at = v_state.last_run_at
   where r.id;
  return jsonb_build_object(
    'rolled_until', v_state.rolled_until, 'rows', v_total, 'batches', v_batches, 'confirmed', v_confirmed,
    'caught_up', v_state.confirmed_until is not null and v_state.rolled_until >= v_state.confirmed_until,
    'pending_until', v_state.pending_until, 'waiting_for', coalesce(cardinality(v_state.pending_xacts), 0));
end
$$;

create function public.roll_up_credit_usage()
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.roll_up_credit_usage();
end
$$;
comment on function public.roll_up_credit_usage() is
  'Service: roll up usage for get_credit_usage (bounded; run it every minute). {rolled_until, rows, batches, '
  'confirmed, caught_up, pending_until, waiting_for}, or {skipped} while another run is in progress.';

revoke all on function private.roll_up_credit_usage(interval, integer), public.roll_up_credit_usage()
  from public, anon, authenticated, service_role;
grant execute on function private.roll_up_credit_usage(interval, integer), public.roll_up_credit_usage()
  to service_role;

-- A deleted account's usage goes with it; a roll-up in progress finishes
-- first (it may be writing rows of the account), and none starts meanwhile.
create function private.delete_account_usage() returns trigger
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
begin
  perform 1 from private.usage_rollup r where r.id for share;
  delete from private.usage_hours u where u.account_id = old.id;
  return old;
end
$$;

create trigger credit_accounts_delete_usage
  after delete on public.credit_accounts
  for each row execute function private.delete_account_usage();

revoke all on function private.delete_account_usage() from public, anon, authenticated, service_role;

-- ---------------------------------------------------------------------------
-- Reading usage.
-- ---------------------------------------------------------------------------

create function private.get_credit_usage(p_account_id uuid, p_from timestamptz, p_to timestamptz,
                                         p_group_by text[], p_bin text)
returns jsonb
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  c_keys constant text[] := array['operation', 'model', 'member', 'license_key'];
  c_max_rows constant integer := 10000;
  v_account_id uuid := coalesce(p_account_id, private.personal_account());
  v_actor uuid := private.authorize(v_account_id, false);
  -- Set for a plain member: only their own spends.
  v_member uuid;
  v_bin text := coalesce(p_bin, 'day');
  v_keys text[] := coalesce(p_group_by, '{}');
  v_wallet public.credit_wallets;
  v_month timestamp := date_trunc('month', now() at time zone 'UTC');
  v_from timestamptz;
  v_to timestamptz;
  v_first timestamptz;
  v_last timestamptz;
  -- The partly covered hours at either end, and the seq range of their rolled-up rows.
  v_head timestamptz;
  v_head_first bigint;
  v_head_last bigint;
  v_tail timestamptz;
  v_tail_first bigint;
  v_tail_last bigint;
  v_rolled_id uuid;
  v_seq bigint;
  v_count bigint;
  v_rows jsonb;
  v_total jsonb;
begin
  if v_actor is not null and not private.is_super_admin()
     and not exists (select 1 from private.managed_account_ids() m where m = v_account_id) then
    v_member := v_actor;
  end if;
  if v_bin not in ('hour', 'day', 'month') then
    perform private.invalid('p_bin', 'must be hour, day or month');
  end if;
  if array_ndims(v_keys) > 1 then
    perform private.invalid('p_group_by', 'must be a list of keys');
  end if;
  if array_position(v_keys, null) is not null or not v_keys <@ c_keys then
    perform private.invalid('p_group_by', 'keys must be among operation, model, member, license_key');
  end if;
  if (select count(distinct k) from unnest(v_keys) k) <> cardinality(v_keys) then
    perform private.invalid('p_group_by', 'each key at most once');
  end if;
  -- The default range: the account's current period (as its balance shows it).
  select * into v_wallet from public.credit_wallets w where w.account_id = v_account_id;
  v_wallet := private.current_wallet(v_wallet);
  v_from := coalesce(p_from, v_wallet.period_start, v_month at time zone 'UTC');
  v_to := coalesce(p_to, v_wallet.period_end, (v_month + interval '1 month') at time zone 'UTC');
  if not isfinite(v_from) then
    perform private.invalid('p_from', 'must be a finite time');
  end if;
  if not isfinite(v_to) then
    perform private.invalid('p_to', 'must be a finite time');
  end if;
  if v_from >= v_to then
    perform private.invalid('p_to', 'must be later than p_from');
  end if;

  -- Hours wholly in the range come from usage_hours; the partly covered hours
  -- at either end from their rolled-up ledger rows; the rest live.
  v_first := date_trunc('hour', v_from, 'UTC');
  if v_first < v_from then
    v_head := v_first;
    v_first := v_first + interval '1 hour';
  end if;
  v_last := date_trunc('hour', v_to, 'UTC');
  if v_last < v_to and v_last is distinct from v_head then
    v_tail := v_last;
  end if;
  select private.usage_id_floor(r.rolled_until), r.rolled_seq into v_rolled_id, v_seq from private.usage_rollup r;
  select min(u.first_seq), max(u.last_seq) into v_head_first, v_head_last
    from private.usage_hours u where u.account_id = v_account_id and u.hour = v_head;
  select min(u.first_seq), max(u.last_seq) into v_tail_first, v_tail_last
    from private.usage_hours u where u.account_id = v_account_id and u.hour = v_tail;

  with spent as (
    select u.hour as at, u.operation, u.model, u.member, u.license_key, u.credits, u.calls, u.input_tokens,
           u.output_tokens
      from private.usage_hours u
     where u.account_id = v_account_id and u.hour >= v_first and u.hour < v_last
       and (v_member is null or u.member = v_member)
    union all
    select e.created_at, e.operation, e.model, e.member, e.license_key, e.credits, e.calls, e.input_tokens,
           e.output_tokens
      from private.usage_entries e
     where e.account_id = v_account_id and e.seq between v_head_first and v_head_last and e.id < v_rolled_id
       and e.created_at >= v_from and e.created_at < least(v_head + interval '1 hour', v_to)
       and (v_member is null or e.member = v_member)
    union all
    select e.created_at, e.operation, e.model, e.member, e.license_key, e.credits, e.calls, e.input_tokens,
           e.output_tokens
      from private.usage_entries e
     where e.account_id = v_account_id and e.seq between v_tail_first and v_tail_last and e.id < v_rolled_id
       and e.created_at >= v_tail and e.created_at < v_to
       and (v_member is null or e.member = v_member)
    union all
    select e.created_at, e.operation, e.model, e.member, e.license_key, e.credits, e.calls, e.input_tokens,
           e.output_tokens
      from private.usage_entries e
     where e.account_id = v_account_id and e.seq > v_seq and e.id >= v_rolled_id
       and e.created_at >= v_from and e.created_at < v_to
       and (v_member is null or e.member = v_member)
  ), binned as materialized (
    select date_trunc(v_bin, s.at, 'UTC') as period,
           case when 'operation' = any (v_keys) then s.operation end as operation,
           case when 'model' = any (v_keys) then s.model end as model,
           case when 'member' = any (v_keys) then s.member end as member,
           case when 'license_key' = any (v_keys) then s.license_key end as license_key,
           sum(s.credits)::bigint as credits, sum(s.calls)::bigint as calls,
           sum(s.input_tokens)::bigint as input_tokens, sum(s.output_tokens)::bigint as output_tokens
      from spent s
     group by 1, 2, 3, 4, 5
  )
  select (select count(*) from binned),
         (select coalesce(jsonb_agg(
                   jsonb_build_object('period', b.period, 'operation', b.operation, 'model', b.model,
                                      'member', b.member, 'license_key', b.license_key, 'credits', b.credits,
                                      'calls', b.calls, 'input_tokens', b.input_tokens,
                                      'output_tokens', b.output_tokens)
                   - array(select k from unnest(c_keys) k where k <> all (v_keys))
                   order by b.period, b.operation, b.model, b.member, b.license_key), '[]'::jsonb)
            from (select * from binned b order by b.period, b.operation, b.model, b.member, b.license_key
                  limit c_max_rows + 1) b),
         (select jsonb_build_object('credits', coalesce(sum(b.credits), 0), 'calls', coalesce(sum(b.calls), 0),
                                    'input_tokens', coalesce(sum(b.input_tokens), 0),
                                    'output_tokens', coalesce(sum(b.output_tokens), 0))
            from binned b)
    into v_count, v_rows, v_total;
  if v_count > c_max_rows then
    perform private.fail('22023', 'invalid_argument', jsonb_build_object(
      'argument', 'p_from', 'reason', format('the answer has more than %s rows: narrow the range, take a '
                                             'coarser bin or fewer group keys', c_max_rows),
      'rows', v_count, 'limit', c_max_rows));
  end if;
  return jsonb_build_object('account_id', v_account_id, 'from', v_from, 'to', v_to, 'bin', v_bin,
                            'rows', v_rows, 'total', v_total);
end
$$;

create function public.get_credit_usage(p_account_id uuid default null, p_from timestamptz default null,
                                        p_to timestamptz default null, p_group_by text[] default '{}',
                                        p_bin text default 'day')
returns jsonb
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.get_credit_usage(p_account_id, p_from, p_to, p_group_by, p_bin);
end
$$;
comment on function public.get_credit_usage(uuid, timestamptz, timestamptz, text[], text) is
  'Spends net of refunds in [p_from, p_to) (default: the current period), in hour, day or month bins (UTC), '
  'grouped by any of operation, model, member, license_key (a plain member: their own spends only). '
  '{account_id, from, to, bin, rows: [{period, <keys>, credits, calls, input_tokens, output_tokens}], total}.';

revoke all on function private.get_credit_usage(uuid, timestamptz, timestamptz, text[], text),
  public.get_credit_usage(uuid, timestamptz, timestamptz, text[], text)
  from public, anon, authenticated, service_role;
grant execute on function private.get_credit_usage(uuid, timestamptz, timestamptz, text[], text),
  public.get_credit_usage(uuid, timestamptz, timestamptz, text[], text) to authenticated, service_role;
