-- One Stripe event never blocks another.
--
-- Whatever goes wrong while applying one event (any error, not only the
-- refusals the engine knows) is recorded on that event, in its own
-- subtransaction, and never fails the delivery or the release of another:
--   * a transient failure (deadlock, serialization, lock or statement
--     timeout) undoes what the event did, is counted on the event and
--     answered 500 so Stripe delivers it again; the fifth one records it as
--     failed (`transient_repeated`) and is answered 200;
--   * anything else is recorded as failed, with its SQLSTATE and message;
--   * a delivery applies only its own event: parked events its link unblocks
--     become ready, and release_stripe_events (called by the webhook after
--     the delivery's own transaction, and by its schedule) applies them, each
--     in its own subtransaction.

alter table public.stripe_events drop constraint stripe_events_outcome_check;
alter table public.stripe_events add constraint stripe_events_outcome_check
  check (outcome in ('applied', 'ignored', 'parked', 'failed', 'retrying'));
alter table public.stripe_events add column transient_failures integer not null default 0;
comment on table public.stripe_events is
  'Every Stripe event received (normalised), with its outcome: applied, ignored, parked, failed or retrying.';

-- How many transient failures make an event failed (`transient_repeated`).
create function private.stripe_transient_cap() returns integer
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  return 5;
end
$$;

-- Apply in a subtransaction: whatever the event did is undone on any error.
-- A transient failure becomes outcome 'retry' (the caller counts it); any
-- other error becomes 'failed' with its SQLSTATE, message and detail.
create or replace function private.stripe_attempt(p_type text, p jsonb) returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_state text;
  v_message text;
  v_detail text;
begin
  return private.stripe_apply(p_type, p);
exception when others or query_canceled then
  get stacked diagnostics v_state = returned_sqlstate, v_message = message_text, v_detail = pg_exception_detail;
  return private.stripe_result(
           case when v_state in ('40001', '40P01', '55P03', '57014') or left(v_state, 2) in ('08', '53')
                then 'retry' else 'failed' end,
           left(v_message, 200))
         || jsonb_build_object('error', jsonb_build_object('code', v_state, 'message', v_message,
                                                           'detail', private.stripe_detail(v_detail)));
end
$$;

-- A transient failure of an event: counted on it; the cap-th makes it failed.
-- Returns the outcome recorded ('retrying', 'parked' for a released event that
-- waits for the next release, or 'failed').
create function private.stripe_transient(p_event_id text, p_type text, p jsonb, p_res jsonb, p_delivery boolean)
returns text
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_failures integer;
  v_outcome text;
begin
  v_failures := coalesce((select e.transient_failures from public.stripe_events e where e.event_id = p_event_id), 0) + 1;
  if v_failures >= private.stripe_transient_cap() then
    perform private.stripe_store(p_event_id, p_type, p,
                                 private.stripe_result('failed', 'transient_repeated')
                                 || jsonb_build_object('error', p_res -> 'error'), p_delivery);
    v_outcome := 'failed';
  elsif p_delivery then
    perform private.stripe_store(p_event_id, p_type, p,
                                 private.stripe_result('retrying', 'transient')
                                 || jsonb_build_object('error', p_res -> 'error'), true);
    v_outcome := 'retrying';
  else
    -- A released event stays parked and ready for the next release.
    update public.stripe_events e
       set error = p_res -> 'error', attempts = e.attempts + 1, processed_at = now()
     where e.event_id = p_event_id;
    v_outcome := 'parked';
  end if;
  update public.stripe_events e set transient_failures = v_failures where e.event_id = p_event_id;
  return v_outcome;
end
$$;

-- Apply the parked events waiting for any of p_keys, in delivery order, each
-- in its own subtransaction; what they apply may release more (a parked
-- invoice grants, which releases a parked refund of its payment). Each event
-- is tried once per call; over p_budget, what is left waits, ready.
create or replace function private.stripe_unpark(p_keys text[], p_budget integer default 500) returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_wave text[] := p_keys;
  v_seen text[] := p_keys;
  v_tried text[] := '{}';
  v_next text[];
  v_event record;
  v_res jsonb;
  v_outcome text;
  v_done integer := 0;
  v_out jsonb := '[]'::jsonb;
begin
  while cardinality(v_wave) > 0 loop
    -- A subscription's older parked updates are superseded by its newest.
    update public.stripe_events e
       set outcome = 'ignored', reason = 'superseded', parked_on = '{}', attempts = e.attempts + 1,
           processed_at = now()
     where e.outcome = 'parked' and e.parked_on && v_wave and e.type = 'customer.subscription.updated'
       and exists (select 1 from public.stripe_events n
                    where n.outcome = 'parked' and n.type = e.type and n.subscription_id = e.subscription_id
                      and (n.stripe_created, n.event_id) > (e.stripe_created, e.event_id));
    v_next := '{}';
    for v_event in select e.event_id, e.type, e.payload from public.stripe_events e
                    where e.outcome = 'parked' and e.parked_on && v_wave and e.event_id <> all (v_tried)
                    order by e.stripe_created nulls last, e.first_received_at, e.event_id loop
      exit when v_done >= p_budget;
      v_tried := v_tried || v_event.event_id;
      v_res := private.stripe_attempt(v_event.type, v_event.payload);
      if v_res ->> 'outcome' = 'retry' then
        v_outcome := private.stripe_transient(v_event.event_id, v_event.type, v_event.payload, v_res, false);
      else
        perform private.stripe_store(v_event.event_id, v_event.type, v_event.payload, v_res, false);
        v_outcome := v_res ->> 'outcome';
      end if;
      v_done := v_done + 1;
      v_out := v_out || jsonb_build_array(jsonb_build_object('event_id', v_event.event_id, 'outcome', v_outcome));
      if v_outcome = 'applied' then
        v_next := v_next || array(select jsonb_array_elements_text(v_res -> 'touched'));
      end if;
    end loop;
    if v_done >= p_budget then
      -- Over this call's budget: what is left waits, ready, for the next calls.
      perform private.stripe_ready(v_wave || v_next);
      exit;
    end if;
    v_wave := array(select distinct k from unnest(v_next) k where k <> all (v_seen));
    v_seen := v_seen || v_wave;
  end loop;
  return v_out;
end
$$;

-- Mark the parked events waiting for any of p_keys ready; returns how many.
create function private.stripe_ready(p_keys text[]) returns integer
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_count integer;
begin
  update public.stripe_events e set parked_on = array_append(e.parked_on, 'ready')
   where e.outcome = 'parked' and e.parked_on && p_keys and not ('ready' = any (e.parked_on));
  get diagnostics v_count = row_count;
  return v_count;
end
$$;

-- Record and apply one delivered event. Parked events it unblocks become
-- ready (`ready` in the answer): release_stripe_events applies them, never
-- inside this delivery. Outcome 'retrying' asks Stripe to deliver it again.
create or replace function private.handle_stripe_event(p_event_id text, p_type text, p_payload jsonb) returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_existing public.stripe_events;
  v_res jsonb;
  v_outcome text;
  v_ready integer := 0;
  v_customer text := private.stripe_text(p_payload, 'customer');
begin
  perform private.require_service();
  if p_event_id is null or length(p_event_id) not between 1 and 255 then
    perform private.invalid('p_event_id', 'must be 1 to 255 characters');
  end if;
  if p_type is null or length(p_type) not between 1 and 255 then
    perform private.invalid('p_type', 'must be 1 to 255 characters');
  end if;
  if p_payload is null or jsonb_typeof(p_payload) <> 'object' then
    perform private.invalid('p_payload', 'must be a JSON object');
  end if;

  -- One event at a time (see the Stripe chapter); also makes concurrent redeliveries queue.
  perform pg_advisory_xact_lock(7349210455160013);

  select * into v_existing from public.stripe_events e where e.event_id = p_event_id;
  if found and v_existing.outcome in ('applied', 'ignored') then
    update public.stripe_events e
       set deliveries = e.deliveries + 1, last_received_at = now()
     where e.event_id = p_event_id;
    return jsonb_build_object('event_id', p_event_id, 'type', v_existing.type, 'outcome', 'duplicate',
                              'first_outcome', v_existing.outcome, 'account_id', v_existing.account_id);
  end if;

  v_res := private.stripe_attempt(p_type, p_payload);
  if v_res ->> 'outcome' = 'retry' then
    v_outcome := private.stripe_transient(p_event_id, p_type, p_payload, v_res, true);
    v_res := private.stripe_result(v_outcome, case when v_outcome = 'failed' then 'transient_repeated'
                                                   else 'transient' end)
             || jsonb_build_object('error', v_res -> 'error');
  else
    if v_res ->> 'outcome' = 'parked' and v_customer is not null
       and (select count(*) from public.stripe_events e
             where e.outcome = 'parked' and e.customer_id = v_customer and e.event_id <> p_event_id)
           >= private.stripe_parked_cap() then
      v_res := private.stripe_result('failed', 'too_many_parked')
               || jsonb_build_object('error', jsonb_build_object('code', 'PT409', 'message', 'too_many_parked',
                                                                 'detail', jsonb_build_object('customer', v_customer)));
    end if;
    perform private.stripe_store(p_event_id, p_type, p_payload, v_res, true);
    if v_res ->> 'outcome' = 'applied' and jsonb_array_length(v_res -> 'touched') > 0 then
      v_ready := private.stripe_ready(array(select jsonb_array_elements_text(v_res -> 'touched')));
    end if;
  end if;
  return jsonb_build_object('event_id', p_event_id, 'type', p_type, 'outcome', v_res ->> 'outcome',
                            'reason', v_res ->> 'reason', 'error', v_res -> 'error' ->> 'message',
                            'account_id', v_res ->> 'account_id', 'ready', v_ready);
end
$$;

revoke all on function private.stripe_transient_cap(), private.stripe_ready(text[]),
  private.stripe_transient(text, text, jsonb, jsonb, boolean)
  from public, anon, authenticated, service_role;
