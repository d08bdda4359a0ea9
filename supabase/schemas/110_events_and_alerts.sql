-- Events, balance alerts and the live balance: what an account's owners hear
-- about without asking.
--
-- Holds:
--   * private.balance_alerts: up to 10 thresholds of available credits per
--     account, each armed or not; the wallet caches the two figures that
--     decide whether a change can cross any of them (alert_below: the highest
--     armed threshold; alert_rearm: the lowest re-arm level of a fired alert);
--   * public.credit_events: notable changes (alerts, top-up outcomes), one row
--     each, numbered per account (seq) under the wallet's lock, with their
--     delivery state; the notify Lambda claims, sends and records them;
--   * private.watch_balance: a deferred trigger on credit_wallets that runs
--     once per account at the end of every transaction that changed its
--     balance: it evaluates the alerts and broadcasts the balance object on
--     the Realtime topic credits:<account_id>;
--   * set_balance_alert, and the service's delivery functions
--     (claim_credit_events, record_credit_event_delivery, list_credit_events,
--     resend_credit_event) and sweep_credit_accounts;
--   * policies on realtime.messages: only those who can read an account may
--     join credits:<account_id>, and no client may send on credits:*.
--
-- Rules:
--   * An alert compares available before and after the whole transaction: it
--     fires once when available goes from at or above its threshold to below
--     it (balance.depleted when it lands on 0, else balance.low) and re-arms,
--     with one balance.recovered, only when available is back at or above its
--     re-arm level (hysteresis: a hold that lowers available and its release
--     that lifts it back fire at most once). Highest threshold first.
--   * An account without alerts pays one comparison per wallet change (the
--     trigger's WHEN on the cached figures); events are written in the
--     transaction that caused them, so they exist iff it committed.
--   * Delivery: at least once, in order per account: an event is handed out
--     only when every lower seq of its account is delivered or failed, and
--     only under a lease, so two notify runs never send the same event at
--     once. Failed attempts back off (5 s doubling, at most 1 h); events older
--     than 72 hours fail (not_sent when never attempted, else expired).
--   * The broadcast is best effort: at most one message per account per
--     transaction with the final balance object; none from the monthly reset
--     or batch releases of Stripe events (they set credits.quiet), none when
--     nothing of the balance changed.

-- ---------------------------------------------------------------------------
-- Alerts.
-- ---------------------------------------------------------------------------

create table private.balance_alerts (
  account_id uuid not null references public.credit_accounts (id) on delete cascade,
  threshold bigint not null check (threshold >= 1),
  rearm_at bigint not null,
  armed boolean not null,
  created_at timestamptz not null default now(),
  primary key (account_id, threshold),
  check (rearm_at >= threshold)
);
alter table private.balance_alerts enable row level security;
comment on table private.balance_alerts is
  'Balance alerts: a threshold of available credits, its re-arm level and whether it is armed.';

-- ---------------------------------------------------------------------------
-- Events.
-- ---------------------------------------------------------------------------

create table public.credit_events (
  event_id uuid primary key default private.uuid_v7(),
  account_id uuid not null references public.credit_accounts (id) on delete cascade,
  seq bigint not null,
  type text not null,
  payload jsonb not null,
  created_at timestamptz not null default now(),
  -- Delivery to the operator's endpoint (the notify Lambda): 72 hours from
  -- sent_from (created_at, or the operator's re-send).
  sent_from timestamptz not null default now(),
  status text not null default 'pending' check (status in ('pending', 'delivered', 'failed')),
  attempts integer not null default 0,
  next_attempt_at timestamptz not null default now(),
  leased_until timestamptz,
  delivered_at timestamptz,
  last_error text,
  unique (account_id, seq)
);
-- What notify looks through: the undelivered events, in order per account.
create index credit_events_pending_idx on public.credit_events (account_id, seq) where status = 'pending';
comment on table public.credit_events is
  'Notable changes of an account (alerts, top-up outcomes), numbered per account, delivered to the operator''s '
  'webhook at least once and in order. Function-only writes.';

alter table public.credit_events enable row level security;
revoke all on public.credit_events from anon, authenticated, service_role;
grant select on public.credit_events to authenticated, service_role;

create policy credit_events_read on public.credit_events for select to authenticated
  using (account_id in (select private.readable_account_ids()) or (select private.is_super_admin()));

-- Write an event of an account whose wallet the caller has locked (which
-- makes max(seq) + 1 safe).
create function private.emit_event(p_account_id uuid, p_type text, p_payload jsonb) returns uuid
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_id uuid;
begin
  insert into public.credit_events (account_id, seq, type, payload)
  values (p_account_id,
          coalesce((select max(e.seq) from public.credit_events e where e.account_id = p_account_id), 0) + 1,
          p_type, p_payload)
  returning event_id into v_id;
  return v_id;
end
$$;

-- The wallet's cached alert figures, from the alerts as they are now.
create function private.cache_alerts(p_account_id uuid) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  update public.credit_wallets w
     set alert_below = coalesce((select max(a.threshold) from private.balance_alerts a
                                  where a.account_id = p_account_id and a.armed), 0),
         alert_rearm = (select min(a.rearm_at) from private.balance_alerts a
                         where a.account_id = p_account_id and not a.armed)
   where w.account_id = p_account_id;
end
$$;

-- Fire and re-arm the alerts of a wallet at its final available credits.
create function private.evaluate_alerts(p_wallet public.credit_wallets, p_available bigint) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_alert private.balance_alerts;
  v_balance jsonb := private.balance_json(p_wallet);
begin
  for v_alert in select * from private.balance_alerts a
                  where a.account_id = p_wallet.account_id
                    and ((a.armed and a.threshold > p_available) or (not a.armed and a.rearm_at <= p_available))
                  order by a.threshold desc loop
    update private.balance_alerts a set armed = not v_alert.armed
     where a.account_id = v_alert.account_id and a.threshold = v_alert.threshold;
    perform private.emit_event(
      p_wallet.account_id,
      case when not v_alert.armed then 'balance.recovered'
           when p_available = 0 then 'balance.depleted'
           else 'balance.low' end,
      jsonb_build_object('threshold', v_alert.threshold, 'rearm_at', v_alert.rearm_at,
                         'available', p_available, 'balance', v_balance));
  end loop;
  perform private.cache_alerts(p_wallet.account_id);
end
$$;

revoke all on function private.emit_event(uuid, text, jsonb), private.cache_alerts(uuid),
  private.evaluate_alerts(public.credit_wallets, bigint) from public;

-- ---------------------------------------------------------------------------
-- The end of every transaction that changed a balance.
-- ---------------------------------------------------------------------------

-- Runs at commit (deferred), once per account and transaction: later queued
-- calls for the same account find it in credits.watched and return. It reads
-- the wallet as the transaction leaves it, under the lock the transaction
-- already holds. Definer: at commit the caller's own role is back in force.
create function private.watch_balance() returns trigger
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_seen text := coalesce(current_setting('credits.watched', true), '');
  v_wallet public.credit_wallets;
  v_available bigint;
  v_changed boolean;
  v_total bigint;
  v_held bigint;
  v_expiry jsonb;
begin
  if strpos(v_seen, new.account_id::text) > 0 then
    return null;
  end if;
  perform set_config('credits.watched', v_seen || new.account_id::text || ',', true);
  select * into v_wallet from public.credit_wallets w where w.account_id = new.account_id;
  if not found then
    return null;
  end if;
  -- The first queued row's OLD is the wallet as the transaction found it: a
  -- change undone (a replayed spend's fast path) is no change.
  v_changed := (old.promotional, old.subscription, old.purchased, old.held_promotional, old.held_subscription,
                old.held_purchased, old.debt, old.period_start, old.period_end, old.promo_front_at,
                old.promo_front_left)
               is distinct from
               (v_wallet.promotional, v_wallet.subscription, v_wallet.purchased, v_wallet.held_promotional,
                v_wallet.held_subscription, v_wallet.held_purchased, v_wallet.debt, v_wallet.period_start,
                v_wallet.period_end, v_wallet.promo_front_at, v_wallet.promo_front_left);
  if v_wallet.alert_below > 0 or v_wallet.alert_rearm is not null then
    v_available := private.available(v_wallet);
    if v_wallet.alert_below > v_available or v_wallet.alert_rearm <= v_available then
      perform private.evaluate_alerts(v_wallet, v_available);
    end if;
  end if;
  -- Auto top-up (its chapter): checked when the transaction lowered available below the threshold.
  if v_wallet.topup_below > 0 then
    v_available := coalesce(v_available, private.available(v_wallet));
    if v_available < v_wallet.topup_below
       and v_available < greatest(0, old.promotional - old.held_promotional + old.subscription
                                     - old.held_subscription + old.purchased - old.held_purchased - old.debt) then
      perform private.topup_if_due(v_wallet.account_id, v_available);
    end if;
  end if;
  if v_changed and current_setting('credits.quiet', true) is distinct from 'on' then
    -- The balance object (private.balance_json's figures) as a typed row:
    -- to_jsonb of a row is cheaper than jsonb_build_object.
    v_total := v_wallet.promotional + v_wallet.subscription + v_wallet.purchased;
    v_held := v_wallet.held_promotional + v_wallet.held_subscription + v_wallet.held_purchased;
    if v_wallet.promo_front_left > 0 or v_wallet.subscription > v_wallet.held_subscription then
      v_expiry := private.next_expiry(v_wallet);
    end if;
    perform realtime.send(
      to_jsonb(row(v_wallet.account_id, v_wallet.promotional, v_wallet.subscription, v_wallet.purchased, v_held,
                   greatest(0, v_total - v_held - v_wallet.debt), v_total, v_wallet.period_start,
                   v_wallet.period_end, v_expiry, v_wallet.debt)::private.balance),
      'balance', 'credits:' || v_wallet.account_id::text, true);
  end if;
  return null;
end
$$;
revoke all on function private.watch_balance() from public;

-- Every change queues the watch, except in a quiet transaction (the reset,
-- batch releases) on an account without alerts or auto top-up. The condition is short on
-- purpose: PostgreSQL reads and prepares a trigger's WHEN on every execution
-- of an UPDATE (a long one cost a spend as much as the rest of its work), and
-- the watch itself returns early when nothing of the balance changed.
create constraint trigger credit_wallets_watch
  after update on public.credit_wallets
  deferrable initially deferred
  for each row
  when (new.alert_below > 0 or new.alert_rearm is not null or new.topup_below > 0
        or current_setting('credits.quiet', true) is distinct from 'on')
  execute function private.watch_balance();

-- ---------------------------------------------------------------------------
-- set_balance_alert.
-- ---------------------------------------------------------------------------

create function private.set_balance_alert(p_account_id uuid, p_threshold integer, p_rearm_at integer)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_wallet public.credit_wallets;
  v_alert private.balance_alerts;
  v_rearm bigint := coalesce(p_rearm_at::bigint, 2 * p_threshold::bigint);
begin
  perform private.authorize(p_account_id, true);
  if p_threshold is null or p_threshold < 1 or p_threshold > 1000000000 then
    perform private.invalid('p_threshold', 'must be 1 to 1000000000');
  end if;
  v_wallet := private.lock_wallet(p_account_id);
  select * into v_alert from private.balance_alerts a
   where a.account_id = p_account_id and a.threshold = p_threshold;
  if p_rearm_at = 0 and found then
    delete from private.balance_alerts a where a.account_id = p_account_id and a.threshold = p_threshold;
    perform private.cache_alerts(p_account_id);
    return jsonb_build_object('account_id', p_account_id, 'threshold', p_threshold, 'rearm_at', 0,
                              'armed', false);
  end if;
  if v_rearm < p_threshold then
    perform private.invalid('p_rearm_at', 'must be at least p_threshold (0 removes an existing alert)');
  end if;
  if found then
    update private.balance_alerts a set rearm_at = v_rearm
     where a.account_id = p_account_id and a.threshold = p_threshold
    returning * into v_alert;
  else
    if (select count(*) from private.balance_alerts a where a.account_id = p_account_id) >= 10 then
      perform private.invalid('p_threshold', 'at most 10 alerts per account');
    end if;
    -- A new alert is armed iff available is at or above it, and fires nothing now.
    insert into private.balance_alerts (account_id, threshold, rearm_at, armed)
    values (p_account_id, p_threshold, v_rearm, private.available(private.current_wallet(v_wallet)) >= p_threshold)
    returning * into v_alert;
  end if;
  perform private.cache_alerts(p_account_id);
  return jsonb_build_object('account_id', v_alert.account_id, 'threshold', v_alert.threshold,
                            'rearm_at', v_alert.rearm_at, 'armed', v_alert.armed);
end
$$;

create function public.set_balance_alert(p_account_id uuid, p_threshold integer, p_rearm_at integer default null)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.set_balance_alert(p_account_id, p_threshold, p_rearm_at);
end
$$;
comment on function public.set_balance_alert(uuid, integer, integer) is
  'Add or change the balance alert at p_threshold (p_rearm_at >= threshold, default twice it; 0 removes it). '
  '{account_id, threshold, rearm_at, armed}.';

revoke all on function private.set_balance_alert(uuid, integer, integer),
  public.set_balance_alert(uuid, integer, integer) from public, anon, authenticated, service_role;
grant execute on function private.set_balance_alert(uuid, integer, integer),
  public.set_balance_alert(uuid, integer, integer) to authenticated, service_role;

-- ---------------------------------------------------------------------------
-- Delivery (the notify Lambda, service only).
-- ---------------------------------------------------------------------------

create function private.event_json(p_event public.credit_events) returns jsonb
language sql immutable
set search_path = pg_catalog, pg_temp
as $$
  select jsonb_build_object('event_id', p_event.event_id, 'account_id', p_event.account_id, 'seq', p_event.seq,
                            'type', p_event.type, 'payload', p_event.payload, 'created_at', p_event.created_at,
                            'status', p_event.status, 'attempts', p_event.attempts,
                            'next_attempt_at', p_event.next_attempt_at, 'delivered_at', p_event.delivered_at,
                            'last_error', p_event.last_error)
$$;
revoke all on function private.event_json(public.credit_events) from public;

-- Hand out each account's next event, leased: events past 72 hours fail
-- first, so they never hold their account's later events back.
create function private.claim_credit_events(p_limit integer, p_lease_seconds integer) returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_out jsonb;
begin
  perform private.require_service();
  if p_limit is null or p_limit not between 1 and 1000 then
    perform private.invalid('p_limit', 'must be 1 to 1000');
  end if;
  if p_lease_seconds is null or p_lease_seconds not between 1 and 900 then
    perform private.invalid('p_lease_seconds', 'must be 1 to 900');
  end if;
  update public.credit_events e
     set status = 'failed', leased_until = null,
         last_error = case when e.attempts = 0 then 'not_sent' else 'expired' end
   where e.status = 'pending' and e.sent_from < now() - interval '72 hours'
     and (e.leased_until is null or e.leased_until <= now());
  -- Each account's head (no lower pending seq), due and not leased; locked
  -- rows are skipped before the limit, so runs claiming at once split the work.
  with claimed as (
    select e.event_id from public.credit_events e
     where e.status = 'pending' and e.next_attempt_at <= now()
       and (e.leased_until is null or e.leased_until <= now())
       and not exists (select 1 from public.credit_events p
                        where p.account_id = e.account_id and p.status = 'pending' and p.seq < e.seq)
     order by e.next_attempt_at
     limit p_limit
       for update of e skip locked
  ), leased as (
    update public.credit_events e
       set leased_until = now() + make_interval(secs => p_lease_seconds)
      from claimed c
     where e.event_id = c.event_id
    returning e.*
  )
  select coalesce(jsonb_agg(jsonb_build_object('event_id', l.event_id, 'account_id', l.account_id, 'seq', l.seq,
                                               'type', l.type, 'payload', l.payload,
                                               'created_at', l.created_at, 'attempts', l.attempts)
                            order by l.account_id, l.seq), '[]'::jsonb)
    into v_out from leased l;
  return v_out;
end
$$;

create function private.record_credit_event_delivery(p_event_id uuid, p_delivered boolean, p_error text)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_event public.credit_events;
begin
  perform private.require_service();
  if p_delivered is null then
    perform private.invalid('p_delivered', 'required');
  end if;
  update public.credit_events e
     set status = case when p_delivered then 'delivered'
                       when e.sent_from < now() - interval '72 hours' then 'failed'
                       else e.status end,
         delivered_at = case when p_delivered then now() end,
         attempts = e.attempts + 1,
         next_attempt_at = case when p_delivered then e.next_attempt_at
                                else now() + least(interval '1 hour',
                                                   interval '5 seconds' * power(2, least(e.attempts, 20))) end,
         leased_until = null,
         last_error = case when p_delivered then null else left(coalesce(p_error, 'failed'), 500) end
   where e.event_id = p_event_id and e.status <> 'delivered'
  returning * into v_event;
  if not found then
    select * into v_event from public.credit_events e where e.event_id = p_event_id;
    if not found then
      perform private.fail('PT404', 'event_not_found');
    end if;
  end if;
  return jsonb_build_object('event_id', v_event.event_id, 'status', v_event.status, 'attempts', v_event.attempts,
                            'next_attempt_at', v_event.next_attempt_at);
end
$$;

create function private.list_credit_events(p_status text, p_account_id uuid, p_limit integer) returns jsonb
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
begin
  perform private.require_service();
  if p_status is not null and p_status not in ('pending', 'delivered', 'failed') then
    perform private.invalid('p_status', 'must be pending, delivered or failed (null: all)');
  end if;
  if p_limit is null or p_limit not between 1 and 1000 then
    perform private.invalid('p_limit', 'must be 1 to 1000');
  end if;
  return (select coalesce(jsonb_agg(private.event_json(e) order by e.created_at desc, e.seq desc), '[]'::jsonb)
            from (select * from public.credit_events e
                   where (p_status is null or e.status = p_status)
                     and (p_account_id is null or e.account_id = p_account_id)
                   order by e.created_at desc, e.seq desc
                   limit p_limit) e);
end
$$;

create function private.resend_credit_event(p_event_id uuid) returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_event public.credit_events;
begin
  perform private.require_service();
  update public.credit_events e
     set status = 'pending', attempts = 0, next_attempt_at = now(), leased_until = null, delivered_at = null,
         last_error = null, sent_from = now()
   where e.event_id = p_event_id
  returning * into v_event;
  if not found then
    perform private.fail('PT404', 'event_not_found');
  end if;
  return private.event_json(v_event);
end
$$;

-- Write what lapsed (expired holds, expired promotional grants) on accounts
-- nobody wrote to since: their events and broadcasts happen here.
create function private.sweep_credit_accounts(p_limit integer) returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_account uuid;
  v_swept integer := 0;
begin
  perform private.require_service();
  if p_limit is null or p_limit not between 1 and 10000 then
    perform private.invalid('p_limit', 'must be 1 to 10000');
  end if;
  for v_account in select w.account_id from public.credit_wallets w
                    where least(w.next_hold_expiry, w.promo_front_at) <= now()
                    limit p_limit
                      for update skip locked loop
    perform private.lock_wallet(v_account);
    v_swept := v_swept + 1;
  end loop;
  return jsonb_build_object('swept', v_swept);
end
$$;

create function public.claim_credit_events(p_limit integer default 100, p_lease_seconds integer default 60)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.claim_credit_events(p_limit, p_lease_seconds);
end
$$;
comment on function public.claim_credit_events(integer, integer) is
  'Service: lease each account''s next undelivered event (at most p_limit). '
  '[{event_id, account_id, seq, type, payload, created_at, attempts}].';

create function public.record_credit_event_delivery(p_event_id uuid, p_delivered boolean, p_error text default null)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.record_credit_event_delivery(p_event_id, p_delivered, p_error);
end
$$;
comment on function public.record_credit_event_delivery(uuid, boolean, text) is
  'Service: record a delivery attempt of a claimed event. {event_id, status, attempts, next_attempt_at}.';

create function public.list_credit_events(p_status text default 'failed', p_account_id uuid default null,
                                          p_limit integer default 100)
returns jsonb
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.list_credit_events(p_status, p_account_id, p_limit);
end
$$;
comment on function public.list_credit_events(text, uuid, integer) is
  'Service: events by delivery status (null: all), newest first.';

create function public.resend_credit_event(p_event_id uuid) returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.resend_credit_event(p_event_id);
end
$$;
comment on function public.resend_credit_event(uuid) is
  'Service: send an event again (same event_id, seq and created_at; its 72 hours start over).';

create function public.sweep_credit_accounts(p_limit integer default 1000) returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.sweep_credit_accounts(p_limit);
end
$$;
comment on function public.sweep_credit_accounts(integer) is
  'Service: write what lapsed on up to p_limit accounts nobody wrote to. {swept}.';

revoke all on function private.claim_credit_events(integer, integer),
  private.record_credit_event_delivery(uuid, boolean, text), private.list_credit_events(text, uuid, integer),
  private.resend_credit_event(uuid), private.sweep_credit_accounts(integer),
  public.claim_credit_events(integer, integer), public.record_credit_event_delivery(uuid, boolean, text),
  public.list_credit_events(text, uuid, integer), public.resend_credit_event(uuid),
  public.sweep_credit_accounts(integer)
  from public, anon, authenticated, service_role;
grant execute on function private.claim_credit_events(integer, integer),
  private.record_credit_event_delivery(uuid, boolean, text), private.list_credit_events(text, uuid, integer),
  private.resend_credit_event(uuid), private.sweep_credit_accounts(integer),
  public.claim_credit_events(integer, integer), public.record_credit_event_delivery(uuid, boolean, text),
  public.list_credit_events(text, uuid, integer), public.resend_credit_event(uuid),
  public.sweep_credit_accounts(integer)
  to service_role;

-- ---------------------------------------------------------------------------
-- The live balance: who may join credits:<account_id>.
-- ---------------------------------------------------------------------------

-- The account a credits topic names (null for any other topic).
create function private.topic_account(p_topic text) returns uuid
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  if p_topic ~ '^credits:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$' then
    return substr(p_topic, 9)::uuid;
  end if;
  return null;
end
$$;
revoke all on function private.topic_account(text) from public;
grant execute on function private.topic_account(text) to authenticated, service_role;

-- Receive: those who can read the account. Restrictive, so that a project's
-- own broader policies on realtime.messages never open credits topics to others.
create policy credits_topic_receive on realtime.messages for select to authenticated
  using (private.topic_account((select realtime.topic())) in (select private.readable_account_ids()));
create policy credits_topic_readers_only on realtime.messages as restrictive for select to authenticated
  using ((select realtime.topic()) is null or (select realtime.topic()) not like 'credits:%'
         or private.topic_account((select realtime.topic())) in (select private.readable_account_ids()));
create policy credits_topic_not_anon on realtime.messages as restrictive for select to anon
  using ((select realtime.topic()) is null or (select realtime.topic()) not like 'credits:%');
-- Send: nobody but the database (a restrictive policy: no client broadcast or
-- presence on credits:*, whatever else the project allows).
create policy credits_topic_no_client_send on realtime.messages as restrictive for insert to anon, authenticated
  with check ((select realtime.topic()) is null or (select realtime.topic()) not like 'credits:%');
