-- Auto top-up: buy a credit pack off-session when available credits run low,
-- never twice.
--
-- Holds:
--   * private.auto_topups: an account's setting (threshold, pack, monthly cap)
--     and its state: active, paused (a payment needed the customer, or a
--     refund or dispute hit the account) or disabled (by its owner, the third
--     failure in a row, or no Stripe key); the wallet caches the threshold of
--     an active setting (topup_below, 0 otherwise);
--   * public.credit_topups: one row per top-up started, its outcome and the
--     PaymentIntent that paid it;
--   * private.topup_if_due: the check the balance watch (the events chapter)
--     runs at the end of every transaction that lowered available below the
--     threshold; queue_due_topups: the same check for accounts nobody writes
--     to (notify runs it every minute);
--   * set_auto_topup, and the notify Lambda's claim_topups and
--     record_topup_result (the webhook's payment_intent.* events report
--     through the same function).
--
-- Rules:
--   * A top-up is due when auto top-up is active, available plus the credits
--     of top-ups in flight is below the threshold, none is in flight, the
--     last one started at least 10 minutes ago, and fewer than max_per_month
--     started this UTC calendar month. At most one is in flight per account:
--     a unique index on the pending state, besides the wallet's lock.
--   * Each top-up has one outcome; the first path to report it wins
--     (record_topup_result changes only a pending top-up). Success grants the
--     pack's credits once, under the key topup:<id> (source topup), whoever
--     reports it; action_required pauses; a failure counts, and the third in
--     a row disables; no Stripe key disables at once. Every outcome is an
--     event (topup.succeeded, topup.failed, topup.action_required,
--     topup.disabled, topup.paused).
--   * Only the account's owner (a tenant's owner) and the service may enable
--     auto top-up or change its pack, threshold or cap; a tenant's admin may
--     disable it. Enabling again clears a pause or a disable.

create table private.auto_topups (
  account_id uuid primary key references public.credit_accounts (id) on delete cascade,
  enabled boolean not null,
  threshold bigint not null check (threshold >= 1),
  pack text not null,
  max_per_month integer not null check (max_per_month between 1 and 31),
  status text not null check (status in ('active', 'paused', 'disabled')),
  -- Failures in a row (declines); the third disables.
  failures integer not null default 0,
  reason text,
  updated_at timestamptz not null default now()
);
alter table private.auto_topups enable row level security;
comment on table private.auto_topups is 'Auto top-up settings and state, one row per account that set it up.';

create table public.credit_topups (
  id uuid primary key default private.uuid_v7(),
  account_id uuid not null references public.credit_accounts (id) on delete cascade,
  pack text not null,
  credits bigint not null,
  status text not null default 'pending'
    check (status in ('pending', 'succeeded', 'failed', 'action_required')),
  created_at timestamptz not null default now(),
  -- The worker's lease and attempts (network errors retry with the same Stripe idempotency key).
  leased_until timestamptz,
  attempts integer not null default 0,
  payment_intent text,
  reason text,
  finished_at timestamptz,
  transaction_id uuid
);
-- At most one top-up in flight per account, whatever the callers do.
create unique index credit_topups_in_flight_idx on public.credit_topups (account_id) where status = 'pending';
create index credit_topups_account_idx on public.credit_topups (account_id, created_at);
create index credit_topups_pending_idx on public.credit_topups (created_at) where status = 'pending';
comment on table public.credit_topups is
  'Auto top-ups started: pack, credits, outcome and the PaymentIntent. Function-only writes.';

alter table public.credit_topups enable row level security;
revoke all on public.credit_topups from anon, authenticated, service_role;
grant select on public.credit_topups to authenticated, service_role;
create policy credit_topups_read on public.credit_topups for select to authenticated
  using (account_id in (select private.managed_account_ids()) or (select private.is_super_admin()));

-- ---------------------------------------------------------------------------
-- Starting a top-up.
-- ---------------------------------------------------------------------------

-- The wallet's cached threshold: what the balance watch compares available with.
create function private.cache_topup(p_account_id uuid) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  update public.credit_wallets w
     set topup_below = coalesce((select t.threshold from private.auto_topups t
                                  where t.account_id = p_account_id and t.enabled and t.status = 'active'), 0)
   where w.account_id = p_account_id;
end
$$;

-- Start a top-up if one is due (the caller holds the wallet's lock).
create function private.topup_if_due(p_account_id uuid, p_available bigint) returns uuid
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_setting private.auto_topups;
  v_credits bigint;
  v_id uuid;
begin
  select * into v_setting from private.auto_topups t
   where t.account_id = p_account_id and t.enabled and t.status = 'active';
  if not found or p_available >= v_setting.threshold then
    return null;
  end if;
  if exists (select 1 from public.credit_topups p
              where p.account_id = p_account_id
                and (p.status = 'pending' or p.created_at > now() - interval '10 minutes')) then
    return null;
  end if;
  if (select count(*) from public.credit_topups p
       where p.account_id = p_account_id
         and p.created_at >= date_trunc('month', now() at time zone 'UTC') at time zone 'UTC')
     >= v_setting.max_per_month then
    return null;
  end if;
  select k.credits into v_credits from public.credit_packs k where k.stripe_price_id = v_setting.pack;
  if v_credits is null then
    return null;
  end if;
  insert into public.credit_topups (account_id, pack, credits)
  values (p_account_id, v_setting.pack, v_credits)
  on conflict (account_id) where status = 'pending' do nothing
  returning id into v_id;
  return v_id;
end
$$;

-- An outcome event of a top-up, with the figures a receiver needs.
create function private.topup_event(p_topup public.credit_topups, p_type text, p_extra jsonb default '{}'::jsonb)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  perform private.emit_event(p_topup.account_id, p_type,
    jsonb_build_object('topup_id', p_topup.id, 'pack', p_topup.pack, 'credits', p_topup.credits,
                       'payment_intent', p_topup.payment_intent, 'reason', p_topup.reason) || p_extra);
end
$$;

-- A top-up the worker has not picked up yet ends without a charge (auto
-- top-up paused or disabled meanwhile); one already sent to Stripe runs its course.
create function private.cancel_unstarted_topups(p_account_id uuid) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  update public.credit_topups p set status = 'failed', reason = 'cancelled', finished_at = now()
   where p.account_id = p_account_id and p.status = 'pending' and p.attempts = 0;
end
$$;

-- Pause an active auto top-up (a refund or dispute on the account), with its event.
create function private.pause_topup(p_account_id uuid, p_reason text) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  update private.auto_topups t set status = 'paused', reason = left(p_reason, 200), updated_at = now()
   where t.account_id = p_account_id and t.enabled and t.status = 'active';
  if found then
    perform private.cancel_unstarted_topups(p_account_id);
    perform private.cache_topup(p_account_id);
    perform private.emit_event(p_account_id, 'topup.paused', jsonb_build_object('reason', left(p_reason, 200)));
  end if;
end
$$;

revoke all on function private.cache_topup(uuid), private.topup_if_due(uuid, bigint),
  private.cancel_unstarted_topups(uuid),
  private.topup_event(public.credit_topups, text, jsonb), private.pause_topup(uuid, text) from public;

-- ---------------------------------------------------------------------------
-- set_auto_topup.
-- ---------------------------------------------------------------------------

create function private.set_auto_topup(p_account_id uuid, p_enabled boolean, p_threshold integer, p_pack text,
                                       p_max_per_month integer)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_uid uuid;
  v_account public.credit_accounts;
  v_owner boolean;
  v_old private.auto_topups;
  v_new private.auto_topups;
  v_credits bigint;
begin
  v_uid := private.authorize(p_account_id, true);
  if p_enabled is null then
    perform private.invalid('p_enabled', 'required');
  end if;
  select * into v_account from public.credit_accounts a where a.id = p_account_id;
  -- The service, the personal account's user, a tenant's owner; a tenant's admin may only disable.
  v_owner := v_uid is null or v_account.user_id is not distinct from v_uid
             or exists (select 1 from public.tenant_members m
                         where m.tenant_id = v_account.tenant_id and m.user_id = v_uid and m.role = 'owner');
  if p_enabled and not v_owner then
    perform private.fail('PT403', 'forbidden');
  end if;
  perform private.lock_wallet(p_account_id);
  select * into v_old from private.auto_topups t where t.account_id = p_account_id;
  if not p_enabled then
    if found then
      update private.auto_topups t set enabled = false, status = 'disabled', reason = 'disabled by the account',
                                       updated_at = now()
       where t.account_id = p_account_id returning * into v_new;
      perform private.cancel_unstarted_topups(p_account_id);
    end if;
  else
    if v_account.stripe_customer_id is null then
      perform private.invalid('p_account_id', 'no linked Stripe customer (buy through Checkout or set one up first)');
    end if;
    if p_max_per_month is null or p_max_per_month not between 1 and 31 then
      perform private.invalid('p_max_per_month', 'must be 1 to 31');
    end if;
    v_new.pack := coalesce(p_pack, v_old.pack);
    if v_new.pack is null then
      perform private.invalid('p_pack', 'required');
    end if;
    select k.credits into v_credits from public.credit_packs k where k.stripe_price_id = v_new.pack;
    if v_credits is null then
      perform private.invalid('p_pack', 'not a credit pack''s stripe_price_id');
    end if;
    v_new.threshold := coalesce(p_threshold, v_old.threshold);
    if v_new.threshold is null or v_new.threshold < 1 or v_new.threshold >= v_credits then
      perform private.invalid('p_threshold', 'must be 1 to less than the pack''s credits');
    end if;
    insert into private.auto_topups (account_id, enabled, threshold, pack, max_per_month, status)
    values (p_account_id, true, v_new.threshold, v_new.pack, p_max_per_month, 'active')
    on conflict (account_id) do update
      set enabled = true, threshold = excluded.threshold, pack = excluded.pack,
          max_per_month = excluded.max_per_month, status = 'active', failures = 0, reason = null,
          updated_at = now()
    returning * into v_new;
  end if;
  perform private.cache_topup(p_account_id);
  return jsonb_build_object(
    'account_id', p_account_id, 'enabled', coalesce(v_new.enabled, false), 'threshold', v_new.threshold,
    'pack', v_new.pack, 'max_per_month', coalesce(v_new.max_per_month, p_max_per_month),
    'status', coalesce(v_new.status, 'disabled'),
    'this_month', (select count(*) from public.credit_topups p
                    where p.account_id = p_account_id
                      and p.created_at >= date_trunc('month', now() at time zone 'UTC') at time zone 'UTC'));
end
$$;

create function public.set_auto_topup(p_account_id uuid, p_enabled boolean, p_threshold integer default null,
                                      p_pack text default null, p_max_per_month integer default 4)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.set_auto_topup(p_account_id, p_enabled, p_threshold, p_pack, p_max_per_month);
end
$$;
comment on function public.set_auto_topup(uuid, boolean, integer, text, integer) is
  'Enable (owner, service) or disable (also a tenant admin) auto top-up: buy p_pack when available drops below '
  'p_threshold, at most p_max_per_month a month. {account_id, enabled, threshold, pack, max_per_month, status, '
  'this_month}.';

revoke all on function private.set_auto_topup(uuid, boolean, integer, text, integer),
  public.set_auto_topup(uuid, boolean, integer, text, integer) from public, anon, authenticated, service_role;
grant execute on function private.set_auto_topup(uuid, boolean, integer, text, integer),
  public.set_auto_topup(uuid, boolean, integer, text, integer) to authenticated, service_role;

-- ---------------------------------------------------------------------------
-- The worker (notify) and the webhook.
-- ---------------------------------------------------------------------------

-- Start the top-ups due on accounts nobody wrote to (after a decline's
-- cooldown, or enabled while already low), then lease the pending ones.
create function private.claim_topups(p_limit integer, p_lease_seconds integer) returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_account uuid;
  v_out jsonb;
begin
  perform private.require_service();
  if p_limit is null or p_limit not between 1 and 1000 then
    perform private.invalid('p_limit', 'must be 1 to 1000');
  end if;
  if p_lease_seconds is null or p_lease_seconds not between 1 and 900 then
    perform private.invalid('p_lease_seconds', 'must be 1 to 900');
  end if;
  for v_account in select w.account_id from public.credit_wallets w
                    where w.topup_below > 0
                      and private.available(w) < w.topup_below
                      and not exists (select 1 from public.credit_topups p
                                       where p.account_id = w.account_id
                                         and (p.status = 'pending' or p.created_at > now() - interval '10 minutes'))
                    limit p_limit
                      for update skip locked loop
    perform private.topup_if_due(v_account, private.available(private.lock_wallet(v_account)));
  end loop;
  with due as (
    select p.id from public.credit_topups p
     where p.status = 'pending' and (p.leased_until is null or p.leased_until <= now())
     order by p.created_at
     limit p_limit
       for update skip locked
  ), leased as (
    update public.credit_topups p
       set leased_until = now() + make_interval(secs => p_lease_seconds), attempts = p.attempts + 1
      from due d
     where p.id = d.id
    returning p.*
  )
  select coalesce(jsonb_agg(jsonb_build_object(
           'topup_id', l.id, 'account_id', l.account_id, 'customer', a.stripe_customer_id, 'pack', l.pack,
           'credits', l.credits, 'created_at', l.created_at, 'attempts', l.attempts,
           'payment_intent', l.payment_intent) order by l.created_at), '[]'::jsonb)
    into v_out
    from leased l join public.credit_accounts a on a.id = l.account_id;
  return v_out;
end
$$;

-- The one way a top-up ends. p_outcome: succeeded, failed, action_required,
-- not_configured (no Stripe key: fails and disables), or retry (a network
-- error: stays pending, leased out again later with the same Stripe
-- idempotency key). A top-up that already ended answers its outcome again.
create function private.record_topup(p_topup_id uuid, p_outcome text, p_payment_intent text, p_reason text)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_topup public.credit_topups;
  v_setting private.auto_topups;
  v_entry public.credit_transactions;
  v_balance jsonb;
  v_was text;
begin
  if p_outcome is null or p_outcome not in ('succeeded', 'failed', 'action_required', 'not_configured', 'retry') then
    perform private.invalid('p_outcome', 'must be succeeded, failed, action_required, not_configured or retry');
  end if;
  perform private.check_text('p_payment_intent', p_payment_intent, 'stripe_ref');
  perform private.check_text('p_reason', p_reason, 'reason');
  select * into v_topup from public.credit_topups p where p.id = p_topup_id;
  if not found then
    perform private.fail('PT404', 'topup_not_found');
  end if;
  perform private.lock_wallet(v_topup.account_id);
  select * into v_topup from public.credit_topups p where p.id = p_topup_id for update;
  if v_topup.status <> 'pending' then
    return jsonb_build_object('topup_id', v_topup.id, 'status', v_topup.status, 'replayed', true);
  end if;
  if p_outcome = 'retry' then
    update public.credit_topups p
       set leased_until = null, payment_intent = coalesce(p_payment_intent, p.payment_intent),
           reason = left(p_reason, 200)
     where p.id = p_topup_id;
    return jsonb_build_object('topup_id', v_topup.id, 'status', 'pending', 'replayed', false);
  end if;
  update public.credit_topups p
     set status = case p_outcome when 'not_configured' then 'failed' else p_outcome end,
         payment_intent = coalesce(p_payment_intent, p.payment_intent),
         reason = case when p_outcome = 'not_configured' then 'not_configured' else left(p_reason, 200) end,
         finished_at = now(), leased_until = null
   where p.id = p_topup_id
  returning * into v_topup;
  select * into v_setting from private.auto_topups t where t.account_id = v_topup.account_id for update;
  if p_outcome = 'succeeded' then
    v_entry := private.post(v_topup.account_id, 'purchase', p_purchased => v_topup.credits, p_origin => 'stripe',
                            p_key => 'topup:' || v_topup.id::text, p_stripe_ref => v_topup.payment_intent,
                            p_description => 'auto top-up', p_source => 'topup',
                            p_metadata => jsonb_build_object('topup_id', v_topup.id, 'pack', v_topup.pack));
    perform private.settle_debt(v_topup.account_id, v_entry.id);
    update public.credit_topups p set transaction_id = v_entry.id where p.id = v_topup.id;
    update private.auto_topups t set failures = 0 where t.account_id = v_topup.account_id;
    select private.balance_json(w) into v_balance from public.credit_wallets w
     where w.account_id = v_topup.account_id;
    perform private.topup_event(v_topup, 'topup.succeeded', jsonb_build_object('balance', v_balance));
  elsif p_outcome = 'action_required' then
    update private.auto_topups t set status = 'paused', reason = 'action_required', updated_at = now()
     where t.account_id = v_topup.account_id and t.status = 'active';
    perform private.topup_event(v_topup, 'topup.action_required');
  else
    perform private.topup_event(v_topup, 'topup.failed');
    v_was := v_setting.status;
    update private.auto_topups t
       set failures = t.failures + 1,
           status = case when p_outcome = 'not_configured' or t.failures + 1 >= 3 then 'disabled' else t.status end,
           reason = case when p_outcome = 'not_configured' then 'not_configured'
                         when t.failures + 1 >= 3 then 'failed three times in a row' else t.reason end,
           updated_at = now()
     where t.account_id = v_topup.account_id
    returning * into v_setting;
    -- Only the failure that disabled it says so (not one reported after its owner turned it off).
    if v_setting.status = 'disabled' and v_was is distinct from 'disabled' then
      perform private.emit_event(v_topup.account_id, 'topup.disabled',
                                 jsonb_build_object('reason', v_setting.reason, 'topup_id', v_topup.id));
    end if;
  end if;
  perform private.cache_topup(v_topup.account_id);
  return jsonb_build_object('topup_id', v_topup.id, 'status', v_topup.status, 'replayed', false,
                            'transaction_id', v_entry.id);
end
$$;

create function private.record_topup_result(p_topup_id uuid, p_outcome text, p_payment_intent text,
                                            p_reason text)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
begin
  perform private.require_service();
  return private.record_topup(p_topup_id, p_outcome, p_payment_intent, p_reason);
end
$$;

create function public.claim_topups(p_limit integer default 50, p_lease_seconds integer default 120)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.claim_topups(p_limit, p_lease_seconds);
end
$$;
comment on function public.claim_topups(integer, integer) is
  'Service (notify): start the top-ups due on quiet accounts, then lease pending top-ups. '
  '[{topup_id, account_id, customer, pack, credits, created_at, attempts, payment_intent}].';

create function public.record_topup_result(p_topup_id uuid, p_outcome text, p_payment_intent text default null,
                                           p_reason text default null)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.record_topup_result(p_topup_id, p_outcome, p_payment_intent, p_reason);
end
$$;
comment on function public.record_topup_result(uuid, text, text, text) is
  'Service (notify): report a top-up''s outcome (succeeded, failed, action_required, not_configured, retry); '
  'the first report wins. {topup_id, status, replayed, transaction_id}.';

revoke all on function private.claim_topups(integer, integer), private.record_topup(uuid, text, text, text),
  private.record_topup_result(uuid, text, text, text), public.claim_topups(integer, integer),
  public.record_topup_result(uuid, text, text, text)
  from public, anon, authenticated, service_role;
grant execute on function private.claim_topups(integer, integer), private.record_topup_result(uuid, text, text, text),
  public.claim_topups(integer, integer), public.record_topup_result(uuid, text, text, text)
  to service_role;

-- The webhook's payment_intent.succeeded / payment_intent.payment_failed
-- (dispatched by private.stripe_apply): they apply only when metadata.topup_id
-- names a top-up of the account linked to the event's customer, and report
-- through record_topup, so the worker and the webhook grant once between them.
create function private.stripe_topup(p_type text, p jsonb) returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_topup public.credit_topups;
  v_id uuid;
  v_code text := private.stripe_text(p, 'error_code');
  v_result jsonb;
begin
  if private.stripe_text(p, 'topup_id') is null then
    return private.stripe_result('ignored', 'not_a_topup');
  end if;
  begin
    v_id := private.stripe_text(p, 'topup_id')::uuid;
  exception when invalid_text_representation then
    return private.stripe_result('ignored', 'unknown_topup');
  end;
  select t.* into v_topup from public.credit_topups t
    join public.credit_accounts a on a.id = t.account_id
   where t.id = v_id and a.stripe_customer_id = private.stripe_text(p, 'customer');
  if not found then
    return private.stripe_result('ignored', 'unknown_topup');
  end if;
  v_result := private.record_topup(
    v_id,
    case when p_type = 'payment_intent.succeeded' then 'succeeded'
         when v_code = 'authentication_required' then 'action_required'
         else 'failed' end,
    private.stripe_text(p, 'payment_intent'),
    case when p_type <> 'payment_intent.succeeded' then coalesce(v_code, 'payment_failed') end);
  return private.stripe_result(case when (v_result ->> 'replayed')::boolean then 'ignored' else 'applied' end,
                               case when (v_result ->> 'replayed')::boolean then 'topup_already_ended' end,
                               v_topup.account_id, v_result);
end
$$;
revoke all on function private.stripe_topup(text, jsonb) from public;
