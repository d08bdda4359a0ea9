-- Stripe: parked events at scale.
--
-- Events for a customer not linked to an account yet are parked and applied
-- when the link arrives. With thousands parked on one customer, releasing
-- them must not take the linking event (and, through the webhook's lock,
-- every other customer's events) down with it:
--   * a release walks the parked events in waves (the keys the link made
--     known, then the keys the released events made known), each event once
--     per wave, in delivery order: time linear in their number;
--   * of a subscription's parked updates only the newest is applied; the
--     others are recorded as ignored (`superseded`);
--   * one call releases at most 500 events; the rest are marked ready and
--     released by the next calls (each webhook call releases up to 100 after
--     its own event, and `release_stripe_events` releases on demand), so no
--     lock is held across the whole release;
--   * at most 10,000 events are parked per customer; beyond, an event is
--     recorded as failed (`too_many_parked`) for an operator.

-- The release gains a budget (and handle_stripe_event below calls the new one).
drop function private.stripe_unpark(text[]);

create index stripe_events_parked_customer_idx on public.stripe_events (customer_id) where outcome = 'parked';

-- How many events may wait, parked, for one customer.
create function private.stripe_parked_cap() returns integer
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  return 10000;
end
$$;

create or replace function private.stripe_unpark(p_keys text[], p_budget integer default 500) returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_wave text[] := p_keys;
  v_seen text[] := p_keys;
  v_next text[];
  v_event record;
  v_res jsonb;
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
                    where e.outcome = 'parked' and e.parked_on && v_wave
                    order by e.stripe_created nulls last, e.first_received_at, e.event_id loop
      exit when v_done >= p_budget;
      v_res := private.stripe_attempt(v_event.type, v_event.payload);
      perform private.stripe_store(v_event.event_id, v_event.type, v_event.payload, v_res, false);
      v_done := v_done + 1;
      v_out := v_out || jsonb_build_array(jsonb_build_object('event_id', v_event.event_id,
                                                             'outcome', v_res ->> 'outcome'));
      if v_res ->> 'outcome' = 'applied' then
        v_next := v_next || array(select jsonb_array_elements_text(v_res -> 'touched'));
      end if;
    end loop;
    if v_done >= p_budget then
      -- Over this call's budget: what is left waits, ready, for the next calls.
      update public.stripe_events e set parked_on = array_append(e.parked_on, 'ready')
       where e.outcome = 'parked' and e.parked_on && (v_wave || v_next) and not ('ready' = any (e.parked_on));
      exit;
    end if;
    v_wave := array(select distinct k from unnest(v_next) k where k <> all (v_seen));
    v_seen := v_seen || v_wave;
  end loop;
  return v_out;
end
$$;

create or replace function private.handle_stripe_event(p_event_id text, p_type text, p_payload jsonb) returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_existing public.stripe_events;
  v_res jsonb;
  v_unparked jsonb := '[]'::jsonb;
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
    v_unparked := private.stripe_unpark(array(select jsonb_array_elements_text(v_res -> 'touched')));
  end if;
  -- A little of what earlier releases left ready, within this call's share.
  v_unparked := v_unparked
                || private.stripe_unpark(array['ready'], greatest(0, least(100, 500 - jsonb_array_length(v_unparked))));
  return jsonb_build_object('event_id', p_event_id, 'type', p_type, 'outcome', v_res ->> 'outcome',
                            'reason', v_res ->> 'reason', 'error', v_res -> 'error' ->> 'message',
                            'account_id', v_res ->> 'account_id', 'unparked', v_unparked);
end
$$;

-- Release up to p_limit parked events that are ready (their link arrived, the
-- releasing call's budget ran out). For operators and schedules.
create function private.release_stripe_events(p_limit integer) returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_out jsonb;
begin
  perform private.require_service();
  if p_limit is null or p_limit not between 1 and 10000 then
    perform private.invalid('p_limit', 'must be 1 to 10000');
  end if;
  perform pg_advisory_xact_lock(7349210455160013);
  v_out := private.stripe_unpark(array['ready'], p_limit);
  return jsonb_build_object('released', jsonb_array_length(v_out),
                            'remaining', (select count(*) from public.stripe_events e
                                           where e.outcome = 'parked' and 'ready' = any (e.parked_on)));
end
$$;

create function public.release_stripe_events(p_limit integer default 500) returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.release_stripe_events(p_limit);
end
$$;
comment on function public.release_stripe_events(integer) is
  'Service: apply up to p_limit parked Stripe events whose link arrived. {released, remaining}.';

revoke all on function private.stripe_unpark(text[], integer), private.release_stripe_events(integer),
  private.stripe_parked_cap(),
  public.release_stripe_events(integer) from public, anon, authenticated, service_role;
grant execute on function private.release_stripe_events(integer), public.release_stripe_events(integer)
  to service_role;
