-- Holds and the sweep: credits reserved for work in progress, and what
-- happens to them (and to promotional grants) when time passes.
--
-- Holds:
--   * credit_holds: one row per reservation, remembering which pools its
--     credits came from (which promotional grants, and which subscription
--     epoch and period; held subscription and purchased credits are the front
--     of their pool's grants, see the grants chapter), and what clawbacks
--     claimed of them, per grant;
--   * private.spend_split: the spending order (promotional, subscription,
--     purchased), the one place it is written;
--   * private.hold_fates: what becomes of a hold's credits when it ends;
--   * private.lock_wallet: the one lock a call on an account takes, and the
--     sweep of whatever lapsed (holds past their expiry, promotional grants
--     past theirs), applied before anything else reads the wallet;
--   * private.current_wallet: the same sweep, computed for reads without
--     writing (reads never show expired credits or lapsed holds);
--   * reserve_credits, capture_hold, release_hold: the common reserve and
--     the whole capture as a few statements whose WHERE is the rules
--     (private.reserve_credits, private.capture_hold); every other case, and
--     every exact error, in the checked code (private.reserve_checked,
--     private.settle_hold).
--
-- Rules:
--   * Held credits cannot be spent twice: a spend needs the free credits of
--     the pools (pool - held_pool); expiries, clawbacks and negative
--     adjustments never take held credits, so a capture never fails.
--   * A hold keeps the rules of the credits it reserves. When it ends, what it
--     charged is spent from exactly the pools it reserved (promotional parts
--     soonest-expiry first, then subscription, then purchased); of what it
--     releases, a clawback found under it takes its share first, then
--     promotional credits whose grant expired meanwhile and subscription
--     credits from an earlier epoch (a renewal or explicit expiry passed)
--     expire; the rest is free again.
--   * A hold past its expiry is released by the next write to its account
--     (reads already leave it out).
--   * Bounded holds and keys (private.write_bounds): at most 1,000 active
--     holds and 600 hold creations per UTC minute per account
--     (too_many_holds, 429, with when to retry), checked after the replay and
--     before the credits; at most 100 active license keys per account and
--     1,000 created per account in 24 hours (the license keys chapter).
--   * Lock order (no deadlocks): a call locks at most one wallet, first,
--     before any hold, grant or transaction row of that account. Only the
--     monthly reset locks several wallets, in ascending account id. Every
--     write of a hold holds its wallet's lock, so a hold read under that
--     lock cannot change before the call ends.

-- The account without a foreign key (as the ledger's rows and the wallet: a
-- check per reserve); the books' delete trigger removes holds with the account.
-- A hold's status and overage policy: domains, not table CHECKs (see
-- private.pool_name): every reserve inserts a hold and every capture or
-- release updates one.
create domain private.hold_status as text check (value in ('active', 'captured', 'released', 'expired'));
create domain private.overage_policy as text check (value in ('reject', 'if_available', 'overdraft'));

create table public.credit_holds (
  id uuid primary key default gen_random_uuid(),
  account_id uuid not null,
  -- The reserve row in credit_transactions.
  transaction_id uuid not null,
  amount bigint not null check (amount > 0),
  -- Which pools the amount came from (they sum to amount).
  promotional bigint not null default 0,
  subscription bigint not null default 0,
  purchased bigint not null default 0,
  -- The grants the credits came from, in the spending order:
  -- [{"p": pool, "g": grant id, "a": credits, "e": expires at}] (a part
  -- without "p" is promotional; a hold made before grants named theirs has
  -- no subscription or purchased parts).
  parts jsonb not null default '[]'::jsonb,
  -- The wallet's subscription epoch and period the subscription credits belong to.
  sub_epoch integer not null,
  period_start timestamptz,
  period_end timestamptz,
  -- Clawbacks that found credits under this hold: [{"pool", "g", "amount", "stripe_ref", "key"}]
  -- (the grant "g" whose part they claim).
  claims jsonb not null default '[]'::jsonb,
  status private.hold_status not null default 'active',
  expires_at timestamptz not null,
  operation text,
  metadata jsonb not null default '{}'::jsonb,
  -- The answer a repeated capture or release replays.
  result jsonb,
  created_at timestamptz not null default now(),
  settled_at timestamptz,
  -- Who made it (null: the service): its credits count against their spend limits.
  actor_id uuid,
  -- Above the hold at capture: reject, if_available or overdraft.
  overage private.overage_policy not null default 'reject',
  -- A hold priced from an operation: the price fixed when it was made
  -- ({credits, credits_per_1k_input_tokens, credits_per_1k_output_tokens}) and the estimate.
  price jsonb,
  input_tokens integer,
  output_tokens integer,
  model text,
  extensions integer not null default 0
);
create index credit_holds_active_account_idx on public.credit_holds (account_id, expires_at)
  where status = 'active';

alter table public.credit_holds enable row level security;
revoke all on public.credit_holds from anon, authenticated, service_role;
grant select on public.credit_holds to authenticated, service_role;
create policy credit_holds_read on public.credit_holds for select to authenticated
  using (account_id in (select private.readable_account_ids()) or (select private.is_super_admin()));

-- ---------------------------------------------------------------------------
-- The spending order: take p_cost from the free credits of each pool,
-- promotional first, then subscription, then purchased (the caller has
-- checked that they cover it).
-- ---------------------------------------------------------------------------

-- How many credits each pool gives.
create type private.split as (promotional bigint, subscription bigint, purchased bigint);

create function private.spend_split(p_promotional bigint, p_subscription bigint, p_purchased bigint,
                                    p_cost bigint)
returns private.split
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
declare
  v_promotional bigint := least(p_promotional, p_cost);
  v_subscription bigint := least(p_subscription, p_cost - v_promotional);
begin
  return row(v_promotional, v_subscription, p_cost - v_promotional - v_subscription)::private.split;
end
$$;

-- What becomes of a hold's credits when it ends having charged p_charge:
-- one row per (pool, grant, fate), fate being spend, clawback, expire or free
-- (a clawback's row names its payment, f_ref, and the clawback's key, f_key).
-- Per pool, the charge takes the parts in order; of what a part releases, a
-- clawback that claimed it takes its share first; the rest expires when its
-- grant's date passed (promotional) or its period ended (subscription: the
-- hold's epoch is not the wallet's), else it is free again.
create function private.hold_fates(p_hold public.credit_holds, p_charge bigint, p_epoch integer,
                                   p_now timestamptz)
returns table (f_pool text, f_grant uuid, f_amount bigint, f_fate text, f_ref text, f_key text)
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_charge private.split;
  v_left bigint;
  v_part record;
  v_take bigint;
  v_claim jsonb;
  v_released bigint;
  v_pool text;
begin
  v_charge := private.spend_split(p_hold.promotional, p_hold.subscription, p_hold.purchased, p_charge);
  foreach v_pool in array array['promotional', 'subscription', 'purchased'] loop
    continue when case v_pool when 'promotional' then p_hold.promotional
                              when 'subscription' then p_hold.subscription else p_hold.purchased end = 0;
    v_left := case v_pool when 'promotional' then v_charge.promotional
                          when 'subscription' then v_charge.subscription else v_charge.purchased end;
    f_pool := v_pool;
    for v_part in
      select (e ->> 'g')::uuid as g, (e ->> 'a')::bigint as a, o
        from jsonb_array_elements(p_hold.parts) with ordinality x(e, o)
       where coalesce(e ->> 'p', 'promotional') = v_pool
      union all
      -- A hold made before grants named theirs: its credits of the pool, of no grant.
      select null, case v_pool when 'promotional' then p_hold.promotional
                               when 'subscription' then p_hold.subscription else p_hold.purchased end
                   - coalesce((select sum((e ->> 'a')::bigint) from jsonb_array_elements(p_hold.parts) e
                                where coalesce(e ->> 'p', 'promotional') = v_pool), 0),
             1000000
      order by 3
    loop
      continue when v_part.a <= 0;
      f_grant := v_part.g;
      f_ref := null;
      f_key := null;
      v_take := least(v_part.a, v_left);
      v_left := v_left - v_take;
      if v_take > 0 then
        f_amount := v_take; f_fate := 'spend';
        return next;
      end if;
      v_released := v_part.a - v_take;
      -- A clawback that claimed this part takes its share first.
      for v_claim in select e from jsonb_array_elements(p_hold.claims) e
                      where p_hold.claims <> '[]'::jsonb and e ->> 'pool' = v_pool
                        and (e ->> 'g')::uuid is not distinct from v_part.g loop
        v_take := least(v_released, (v_claim ->> 'amount')::bigint);
        if v_take > 0 then
          f_amount := v_take; f_fate := 'clawback'; f_ref := v_claim ->> 'stripe_ref';
          f_key := v_claim ->> 'key';
          return next;
          v_released := v_released - v_take;
        end if;
      end loop;
      f_ref := null;
      f_key := null;
      if v_released > 0 then
        f_amount := v_released;
        f_fate := case when v_pool = 'promotional'
                            and (select p.expires_at from private.grants p where p.id = v_part.g) <= p_now
                       then 'expire'
                       when v_pool = 'subscription' and p_hold.sub_epoch <> p_epoch then 'expire'
                       else 'free' end;
        return next;
      end if;
    end loop;
  end loop;
end
$$;

-- Fates collected as JSON (a definer function keeps no scratch table: a
-- caller could have put a table of that name in pg_temp).
create function private.fates(p_fates jsonb)
returns table (f_pool text, f_grant uuid, f_amount bigint, f_fate text, f_ref text, f_key text)
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  return query select * from jsonb_to_recordset(p_fates)
                 as f(f_pool text, f_grant uuid, f_amount bigint, f_fate text, f_ref text, f_key text);
end
$$;

-- End a hold (locked by the caller, who holds its wallet's lock): charge
-- p_charge from its pools (and p_extra more from the free credits, a capture
-- above the hold) and apply the fates of the rest; released credits pay debt
-- first. The caller marks the hold's status (with its answer, in one update).
-- Returns the spend row when something was charged.
create function private.end_hold(p_hold public.credit_holds, p_charge bigint,
                                 p_metadata jsonb default null, p_actor uuid default null,
                                 p_extra bigint default 0, p_usage jsonb default null)
returns public.credit_transactions
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_wallet public.credit_wallets;
  v_spend public.credit_transactions;
  v_row record;
  v_sum record;
  v_fates jsonb;
  v_extra private.split := row(0, 0, 0)::private.split;
begin
  if p_charge = p_hold.amount and p_extra = 0 and p_hold.claims = '[]'::jsonb then
    -- Everything charged, nothing claimed: every part's fate is spend (the
    -- rule below, without computing it); the grants gave these credits at
    -- reserve, nothing goes back, nothing expires.
    v_spend := private.post(p_hold.account_id, 'spend', -p_hold.promotional, -p_hold.subscription,
                            -p_hold.purchased, -p_hold.promotional, -p_hold.subscription, -p_hold.purchased,
                            p_origin => 'system', p_ref_id => p_hold.id, p_metadata => p_metadata,
                            p_actor => p_actor,
                            p_period_start => case when p_hold.subscription > 0 then p_hold.period_start end,
                            p_period_end => case when p_hold.subscription > 0 then p_hold.period_end end,
                            p_operation => p_hold.operation, p_model => p_usage ->> 'model',
                            p_input_tokens => (p_usage ->> 'input_tokens')::integer,
                            p_output_tokens => (p_usage ->> 'output_tokens')::integer, p_price => p_hold.price);
    update public.credit_wallets w
       set next_hold_expiry = (select min(h.expires_at) from public.credit_holds h
                                where h.account_id = p_hold.account_id and h.status = 'active'
                                  and h.id <> p_hold.id)
     where w.account_id = p_hold.account_id and w.next_hold_expiry >= p_hold.expires_at
    returning w.* into v_wallet;
    if v_wallet.account_id is null then
      select * into v_wallet from public.credit_wallets w where w.account_id = p_hold.account_id;
    end if;
    if v_wallet.limited then
      perform private.count_usage(v_wallet, p_hold.actor_id, p_charge, -p_hold.amount);
    end if;
    return v_spend;
  end if;
  select * into v_wallet from public.credit_wallets w where w.account_id = p_hold.account_id;
  if p_extra > 0 then
    v_extra := private.spend_split(v_wallet.promotional - v_wallet.held_promotional,
                                   v_wallet.subscription - v_wallet.held_subscription,
                                   v_wallet.purchased - v_wallet.held_purchased, p_extra);
  end if;
  select coalesce(jsonb_agg(to_jsonb(f)), '[]'::jsonb) into v_fates
    from private.hold_fates(p_hold, p_charge, v_wallet.sub_epoch, now()) f;

  select coalesce(sum(f.f_amount) filter (where f.f_pool = 'promotional' and f.f_fate = 'spend'), 0)::bigint as sp,
         coalesce(sum(f.f_amount) filter (where f.f_pool = 'subscription' and f.f_fate = 'spend'), 0)::bigint as ss,
         coalesce(sum(f.f_amount) filter (where f.f_pool = 'purchased' and f.f_fate = 'spend'), 0)::bigint as su,
         coalesce(sum(f.f_amount) filter (where f.f_pool = 'promotional' and f.f_fate = 'expire'), 0)::bigint as ep,
         coalesce(sum(f.f_amount) filter (where f.f_pool = 'subscription' and f.f_fate = 'expire'), 0)::bigint as es,
         coalesce(sum(f.f_amount) filter (where f.f_pool = 'promotional' and f.f_fate = 'free'), 0)::bigint as fp,
         coalesce(sum(f.f_amount) filter (where f.f_pool = 'subscription' and f.f_fate = 'free'), 0)::bigint as fs,
         coalesce(sum(f.f_amount) filter (where f.f_pool = 'purchased' and f.f_fate = 'free'), 0)::bigint as fu
    into v_sum from private.fates(v_fates) f;

  if v_sum.sp + v_sum.ss + v_sum.su + p_extra > 0 then
    v_spend := private.post(p_hold.account_id, 'spend', -v_sum.sp - v_extra.promotional,
                            -v_sum.ss - v_extra.subscription, -v_sum.su - v_extra.purchased,
                            -v_sum.sp, -v_sum.ss, -v_sum.su, p_origin => 'system', p_ref_id => p_hold.id,
                            p_metadata => p_metadata, p_actor => p_actor,
                            p_period_start => case when v_sum.ss > 0 then p_hold.period_start end,
                            p_period_end => case when v_sum.ss > 0 then p_hold.period_end end,
                            p_operation => p_hold.operation, p_model => p_usage ->> 'model',
                            p_input_tokens => (p_usage ->> 'input_tokens')::integer,
                            p_output_tokens => (p_usage ->> 'output_tokens')::integer,
                            p_price => p_hold.price,
                            p_outcome => case when p_extra > 0 then jsonb_build_object(
                                           'extra', jsonb_build_object('promotional', v_extra.promotional,
                                                                       'subscription', v_extra.subscription,
                                                                       'purchased', v_extra.purchased)) end);
  end if;
  -- One clawback row per claim's payment, key and grant (a won dispute gives
  -- back what its claims took, into the same grants).
  for v_row in select f.f_pool, f.f_ref, f.f_key, f.f_grant, sum(f.f_amount)::bigint as amount
                 from private.fates(v_fates) f
                where p_hold.claims <> '[]'::jsonb and f.f_fate = 'clawback'
                group by f.f_pool, f.f_ref, f.f_key, f.f_grant order by f.f_pool, f.f_ref, f.f_key, f.f_grant loop
    perform private.post(p_hold.account_id, 'clawback',
                         p_promotional => case when v_row.f_pool = 'promotional' then -v_row.amount else 0 end,
                         p_subscription => case when v_row.f_pool = 'subscription' then -v_row.amount else 0 end,
                         p_purchased => case when v_row.f_pool = 'purchased' then -v_row.amount else 0 end,
                         p_held_promotional => case when v_row.f_pool = 'promotional' then -v_row.amount
                                                    else 0 end,
                         p_held_subscription => case when v_row.f_pool = 'subscription' then -v_row.amount
                                                     else 0 end,
                         p_held_purchased => case when v_row.f_pool = 'purchased' then -v_row.amount else 0 end,
                         p_origin => 'system', p_ref_id => p_hold.id, p_stripe_ref => v_row.f_ref,
                         p_metadata => jsonb_strip_nulls(jsonb_build_object(
                                         'reason', 'clawback found under a hold', 'claim', v_row.f_key)),
                         p_period_start => case when v_row.f_pool = 'subscription' then p_hold.period_start end,
                         p_period_end => case when v_row.f_pool = 'subscription' then p_hold.period_end end,
                         p_outcome => case when v_row.f_grant is not null
                                           then jsonb_build_object('grants',
                                                  jsonb_build_object(v_row.f_grant::text, v_row.amount)) end);
  end loop;
  if v_sum.ep + v_sum.es > 0 then
    perform private.post(p_hold.account_id, 'expire', -v_sum.ep, -v_sum.es, 0, -v_sum.ep, -v_sum.es, 0,
                         p_origin => 'system', p_ref_id => p_hold.id,
                         p_metadata => jsonb_build_object('reason', 'expired while held'),
                         p_period_start => case when v_sum.es > 0 then p_hold.period_start end,
                         p_period_end => case when v_sum.es > 0 then p_hold.period_end end);
  end if;
  -- The hold ends (its caller records how, in the same transaction): what it
  -- released is free again, and the next hold to lapse is another.
  if v_sum.fp + v_sum.fs + v_sum.fu > 0 then
    -- Released credits go back to their grants (spends since are attributed
    -- first; a calendar allowance has no row: it is the front, it gets them).
    select * into v_wallet from public.credit_wallets w where w.account_id = p_hold.account_id;
    for v_row in select distinct f.f_pool from private.fates(v_fates) f
                  where f.f_fate = 'free' and f.f_grant is not null loop
      perform private.materialize_grants(v_wallet, v_row.f_pool);
    end loop;
    update private.grants p set remaining = p.remaining + f.amount
      from (select s.f_grant, sum(s.f_amount) as amount from private.fates(v_fates) s
             where s.f_fate = 'free' and s.f_grant is not null group by s.f_grant) f
     where p.id = f.f_grant;
  end if;
  update public.credit_wallets w
     set held_promotional = w.held_promotional - v_sum.fp,
         held_subscription = w.held_subscription - v_sum.fs,
         held_purchased = w.held_purchased - v_sum.fu,
         next_hold_expiry = (select min(h.expires_at) from public.credit_holds h
                              where h.account_id = p_hold.account_id and h.status = 'active'
                                and h.id <> p_hold.id)
   where w.account_id = p_hold.account_id
  returning w.* into v_wallet;
  if v_sum.fp > 0 then
    perform private.materialize_grants(v_wallet);
  end if;
  if v_wallet.limited then
    perform private.count_usage(v_wallet, p_hold.actor_id, p_charge + p_extra, -p_hold.amount);
  end if;
  if v_sum.fp + v_sum.fs + v_sum.fu > 0 then
    perform private.settle_debt(p_hold.account_id);
  end if;
  return v_spend;
end
$$;

-- ---------------------------------------------------------------------------
-- The sweep.
-- ---------------------------------------------------------------------------

-- True when something of this wallet lapsed and the sweep has work to do.
create function private.sweep_due(p_wallet public.credit_wallets)
returns boolean
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
  return coalesce(least(p_wallet.next_hold_expiry, p_wallet.promo_front_at) <= now(), false);
end
$$;

-- Lock an account's wallet and apply what lapsed: end expired holds, expire
-- promotional grants past their date. Every write to an account starts here.
create function private.lock_wallet(p_account_id uuid) returns public.credit_wallets
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_wallet public.credit_wallets;
  v_hold public.credit_holds;
  v_grant record;
begin
  select * into v_wallet from public.credit_wallets w where w.account_id = p_account_id for update;
  if not found then
    perform private.fail('PT404', 'account_not_found');
  end if;
  if not private.sweep_due(v_wallet) then
    return v_wallet;
  end if;
  for v_hold in select * from public.credit_holds h
                 where h.account_id = p_account_id and h.status = 'active' and h.expires_at <= now()
                 order by h.expires_at, h.id for update loop
    perform private.end_hold(v_hold, 0);
    update public.credit_holds h set status = 'expired', settled_at = now() where h.id = v_hold.id;
  end loop;
  select * into v_wallet from public.credit_wallets w where w.account_id = p_account_id;
  v_wallet := private.materialize_grants(v_wallet);
  for v_grant in select p.id, p.remaining from private.grants p
                  where p.account_id = p_account_id and p.pool = 'promotional' and p.remaining > 0
                    and p.expires_at <= now()
                  order by p.expires_at, p.id loop
    update private.grants p set remaining = 0 where p.id = v_grant.id;
    perform private.post(p_account_id, 'expire', p_promotional => -v_grant.remaining, p_origin => 'system',
                         p_ref_id => v_grant.id, p_metadata => '{"reason": "promotional grant expired"}'::jsonb);
  end loop;
  select * into v_wallet from public.credit_wallets w where w.account_id = p_account_id;
  return v_wallet;
end
$$;

-- The wallet as the sweep would leave it, without writing: for reads. The
-- same rules (hold_fates, grant_attribution), summed instead of applied.
create function private.current_wallet(p_wallet public.credit_wallets) returns public.credit_wallets
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_wallet public.credit_wallets := p_wallet;
  v_fates jsonb;
  v_sum record;
  v_front record;
begin
  if not private.sweep_due(p_wallet) then
    return p_wallet;
  end if;
  select coalesce(jsonb_agg(to_jsonb(f)), '[]'::jsonb) into v_fates
    from public.credit_holds h
   cross join lateral private.hold_fates(h, 0, p_wallet.sub_epoch, now()) f
   where h.account_id = p_wallet.account_id and h.status = 'active' and h.expires_at <= now();
  -- Lapsed holds: their parts leave held; what expires or is clawed back leaves the pools.
  select coalesce(sum(f.f_amount) filter (where f.f_pool = 'promotional'), 0) as hp,
         coalesce(sum(f.f_amount) filter (where f.f_pool = 'subscription'), 0) as hs,
         coalesce(sum(f.f_amount) filter (where f.f_pool = 'purchased'), 0) as hu,
         coalesce(sum(f.f_amount) filter (where f.f_pool = 'promotional' and f.f_fate <> 'free'), 0) as gp,
         coalesce(sum(f.f_amount) filter (where f.f_pool = 'subscription' and f.f_fate <> 'free'), 0) as gs,
         coalesce(sum(f.f_amount) filter (where f.f_pool = 'purchased' and f.f_fate <> 'free'), 0) as gu
    into v_sum from private.fates(v_fates) f;
  -- Promotional grants: the free credits attributed to each, plus what lapsed
  -- holds give back to it; those past their date expire, the soonest of the
  -- others is the new front.
  with back as (
    select f.f_grant, sum(f.f_amount) as amount from private.fates(v_fates) f
     where f.f_pool = 'promotional' and f.f_fate = 'free' group by f.f_grant
  ), grants as (
    select p.id, p.expires_at, coalesce(a.attributed, 0) + coalesce(b.amount, 0) as free
      from private.grants p
      left join private.grant_attribution(p_wallet, 'promotional') a on a.id = p.id
      left join back b on b.f_grant = p.id
     where p.account_id = p_wallet.account_id and p.pool = 'promotional'
       and (a.id is not null or b.f_grant is not null)
  ), front as (
    select g.expires_at as at from grants g where g.expires_at > now() and g.free > 0
     order by g.expires_at limit 1
  )
  select coalesce((select sum(g.free) from grants g where g.expires_at <= now()), 0)::bigint as expired,
         (select f.at from front f) as at,
         coalesce((select sum(g.free) from grants g join front f on g.expires_at = f.at), 0)::bigint as left_at
    into v_front;
  v_wallet.held_promotional := v_wallet.held_promotional - v_sum.hp;
  v_wallet.held_subscription := v_wallet.held_subscription - v_sum.hs;
  v_wallet.held_purchased := v_wallet.held_purchased - v_sum.hu;
  v_wallet.promotional := v_wallet.promotional - v_sum.gp - v_front.expired;
  v_wallet.subscription := v_wallet.subscription - v_sum.gs;
  v_wallet.purchased := v_wallet.purchased - v_sum.gu;
  v_wallet.promo_front_at := v_front.at;
  v_wallet.promo_front_left := v_front.left_at;
  v_wallet.next_hold_expiry := (select min(h.expires_at) from public.credit_holds h
                                 where h.account_id = p_wallet.account_id and h.status = 'active'
                                   and h.expires_at > now());
  return v_wallet;
end
$$;

revoke all on function private.spend_split(bigint, bigint, bigint, bigint), private.fates(jsonb),
  private.hold_fates(public.credit_holds, bigint, integer, timestamptz),
  private.end_hold(public.credit_holds, bigint, jsonb, uuid, bigint, jsonb),
  private.sweep_due(public.credit_wallets), private.lock_wallet(uuid),
  private.current_wallet(public.credit_wallets)
  from public;

-- ---------------------------------------------------------------------------
-- Bounded holds: an account's holds, and how fast it makes them, are capped.
-- ---------------------------------------------------------------------------

-- The bounds, written once (docs/credits.md lists them).
create function private.write_bounds()
returns jsonb
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
begin
  return '{"license_keys": 100, "license_keys_per_day": 1000, "active_holds": 1000, "holds_per_minute": 600}'::jsonb;
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

-- ---------------------------------------------------------------------------
-- Reserve, capture, release.
-- ---------------------------------------------------------------------------

-- A price row as a hold fixes it.
create function private.price_of(p_operation text) returns jsonb
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
  return (
    select jsonb_build_object('credits', p.credits, 'credits_per_1k_input_tokens', p.credits_per_1k_input_tokens,
                              'credits_per_1k_output_tokens', p.credits_per_1k_output_tokens)
      from public.credit_prices p where p.operation = p_operation
  );
end
$$;

-- Tokens priced at a fixed price: flat plus per-1,000 rates, the total rounded up.
-- (A plain expression, no sub-select: PL/pgSQL evaluates it without the executor.)
create function private.priced(p_price jsonb, p_input_tokens bigint, p_output_tokens bigint) returns bigint
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  return ceil((p_price ->> 'credits')::numeric
              + coalesce(p_input_tokens, 0) * (p_price ->> 'credits_per_1k_input_tokens')::numeric / 1000
              + coalesce(p_output_tokens, 0) * (p_price ->> 'credits_per_1k_output_tokens')::numeric / 1000)::bigint;
end
$$;

-- The most output tokens p_budget credits cover at a price with these input
-- tokens (null when the price has no output rate).
create function private.max_output_tokens(p_price jsonb, p_input_tokens bigint, p_budget bigint) returns bigint
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  return (
    select case when p_price is null or (p_price ->> 'credits_per_1k_output_tokens')::numeric = 0 then null
                else least(greatest(0, floor((p_budget - (p_price ->> 'credits')::numeric
                                              - coalesce(p_input_tokens, 0)
                                                * (p_price ->> 'credits_per_1k_input_tokens')::numeric / 1000)
                                             * 1000 / (p_price ->> 'credits_per_1k_output_tokens')::numeric)),
                           (private.limits() ->> 'tokens')::bigint)::bigint end
  );
end
$$;

revoke all on function private.price_of(text), private.priced(jsonb, bigint, bigint),
  private.max_output_tokens(jsonb, bigint, bigint) from public, anon, authenticated, service_role;

-- Reserve, every case: the exact errors, limits, promotional grants, a
-- replay; private.reserve_credits is the common case in one statement.
create function private.reserve_checked(p_account_id uuid, p_idempotency_key text, p_amount integer,
                                        p_operation text, p_ttl_seconds integer, p_metadata jsonb,
                                        p_model text, p_input_tokens integer, p_output_tokens integer,
                                        p_overage text)
returns jsonb
language plpgsql
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
  v_price jsonb;
  v_room bigint;
begin
  v_actor := private.authorize(p_account_id, true, true);
  v_cost := private.spend_cost(p_idempotency_key, p_amount, p_operation, p_model, p_input_tokens,
                               p_output_tokens, p_metadata);
  if v_cost < 1 then
    perform private.invalid('p_operation', 'a hold must reserve at least 1 credit');
  end if;
  if p_ttl_seconds is null or p_ttl_seconds not between 1 and (private.limits() ->> 'ttl_seconds')::integer then
    perform private.invalid('p_ttl_seconds', format('must be 1 to %s seconds', private.limits() ->> 'ttl_seconds'));
  end if;
  if p_overage is null or p_overage not in ('reject', 'if_available', 'overdraft') then
    perform private.invalid('p_overage', 'must be reject, if_available or overdraft');
  end if;
  if p_overage = 'overdraft' and not private.is_service() then
    perform private.fail('PT403', 'forbidden', '{"reason": "only the service makes overdraft holds"}'::jsonb);
  end if;
  v_hash := private.request_hash('reserve', jsonb_build_array(p_amount, p_operation, p_ttl_seconds, p_metadata,
                                                              p_model, p_input_tokens, p_output_tokens,
                                                              p_overage));
  v_expires := now() + make_interval(secs => p_ttl_seconds);
  if p_operation is not null then
    v_price := private.price_of(p_operation);
  end if;

  v_wallet := private.lock_wallet(p_account_id);
  v_entry := private.find_key(p_account_id, p_idempotency_key, v_hash);
  if v_entry.id is not null then
    return private.result(v_entry, true);
  end if;
  perform private.check_hold_bounds(v_wallet);
  if v_wallet.limited and v_actor is not null then
    perform private.check_limits(v_wallet, v_actor, null, v_cost);
  end if;
  if private.available(v_wallet) < v_cost then
    if v_price is not null then
      -- What the credits cover is also bounded by the maker's remaining limit.
      if v_wallet.limited and v_actor is not null then
        v_room := private.limit_room(v_wallet, v_actor, null);
      end if;
      perform private.fail('PT402', 'insufficient_credits', jsonb_build_object(
        'required', v_cost, 'available', private.available(v_wallet),
        'max_output_tokens', private.max_output_tokens(v_price, p_input_tokens,
                                                       least(private.available(v_wallet), v_room))));
    end if;
    perform private.insufficient(v_cost, private.available(v_wallet));
  end if;
  v_split := private.spend_split(v_wallet.promotional - v_wallet.held_promotional,
                                 v_wallet.subscription - v_wallet.held_subscription,
                                 v_wallet.purchased - v_wallet.held_purchased, v_cost);
  -- Which grants, pool by pool: the front of each.
  if v_split.promotional > 0 then
    v_parts := private.take_front(v_wallet, 'promotional', v_split.promotional);
  end if;
  if v_split.subscription > 0 then
    v_parts := v_parts || private.take_front(v_wallet, 'subscription', v_split.subscription);
  end if;
  if v_split.purchased > 0 then
    v_parts := v_parts || private.take_front(v_wallet, 'purchased', v_split.purchased);
  end if;
  insert into public.credit_holds (id, account_id, transaction_id, amount, promotional, subscription, purchased,
                                   parts, sub_epoch, period_start, period_end, expires_at, operation,
                                   metadata, actor_id, overage, price, input_tokens, output_tokens, model)
  values (v_hold, p_account_id, v_tx, v_cost, v_split.promotional, v_split.subscription, v_split.purchased,
          v_parts, v_wallet.sub_epoch, v_wallet.period_start, v_wallet.period_end, v_expires, p_operation,
          coalesce(p_metadata, '{}'::jsonb), v_actor, p_overage, v_price, p_input_tokens, p_output_tokens,
          p_model);
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
                          p_operation => p_operation, p_id => v_tx,
                          p_outcome => jsonb_build_object('amount', v_cost, 'expires_at', v_expires));
  if v_wallet.limited then
    perform private.count_usage(v_wallet, v_actor, 0, v_cost);
  end if;
  return private.result(v_entry, false);
end
$$;

-- The fast paths' answers as typed rows (to_jsonb of a row is cheaper than
-- jsonb_build_object): the same keys as private.result and settle_hold give.
create type private.reserve_answer as (
  hold_id uuid, account_id uuid, amount bigint, expires_at timestamptz, overage text, replayed boolean,
  balance private.balance);
create type private.capture_answer as (
  transaction_id uuid, hold_id uuid, requested bigint, charged bigint, released bigint, uncovered bigint,
  debt_added bigint, from_promotional bigint, from_subscription bigint, from_purchased bigint, replayed boolean,
  balance private.balance);

-- Reserve: the common case as the deduct's fast path makes a spend. The
-- caller is the service or a user on their own personal account; an amount,
-- or an operation with a price; arguments in bounds; overage reject or
-- if_available. The wallet UPDATE's WHERE is the rules (private.reserve_checked
-- checks them one by one): the free credits cover it, no free promotional
-- credits (their grants' front and the wallet's cache of it are the checked
-- path's), no spend limits, no debt, nothing lapsed (private.sweep_due), the
-- hold bounds (private.check_hold_bounds); its SET moves the credits to
-- held in the spending order (private.spend_split) and records the split.
-- The reserve row's unique key is the idempotency check: a key used before
-- undoes the UPDATE and the checked path answers (a replay, or
-- idempotency_conflict), as it does every other case.
create function private.reserve_credits(p_account_id uuid, p_idempotency_key text, p_amount integer,
                                        p_operation text, p_ttl_seconds integer, p_metadata jsonb,
                                        p_model text, p_input_tokens integer, p_output_tokens integer,
                                        p_overage text)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_role text := current_setting('role', true);
  v_actor uuid;
  v_cost bigint;
  v_price jsonb;
  v_expires timestamptz;
  v_wallet public.credit_wallets;
  v_from_subscription bigint;
  v_expiry jsonb;
  v_tx uuid;
  v_hold uuid;
  v_parts jsonb := '[]'::jsonb;
  v_balance private.balance;
begin
  if p_ttl_seconds between 1 and (private.limits() ->> 'ttl_seconds')::integer
     and p_overage in ('reject', 'if_available')
     and ((p_amount between 1 and (private.limits() ->> 'amount')::integer and p_operation is null)
          or (p_amount is null and length(p_operation) between 1 and (private.limits() ->> 'operation')::integer))
     and length(p_idempotency_key) between 1 and (private.limits() ->> 'idempotency_key')::integer
     and (p_model is null or length(p_model) between 1 and (private.limits() ->> 'model')::integer)
     and coalesce(p_input_tokens, 0) between 0 and (private.limits() ->> 'tokens')::integer
     and coalesce(p_output_tokens, 0) between 0 and (private.limits() ->> 'tokens')::integer
     and jsonb_typeof(p_metadata) = 'object'
     and octet_length(p_metadata::text) <= (private.limits() ->> 'metadata_bytes')::integer
     and (v_role in ('service_role', '', 'none') or v_role is null or v_role = 'authenticated') then
    if v_role = 'authenticated' then
      v_actor := auth.uid();
      if not exists (select 1 from public.credit_accounts a where a.id = p_account_id and a.user_id = v_actor) then
        return private.reserve_checked(p_account_id, p_idempotency_key, p_amount, p_operation, p_ttl_seconds,
                                       p_metadata, p_model, p_input_tokens, p_output_tokens, p_overage);
      end if;
    end if;
    if p_operation is null then
      v_cost := p_amount;
    else
      -- (An unknown operation has no price: null, the checked path.)
      v_price := private.price_of(p_operation);
      v_cost := private.priced(v_price, p_input_tokens, p_output_tokens);
    end if;
    v_expires := now() + make_interval(secs => p_ttl_seconds);
    -- Plain parameters only in this statement: its plan stays generic (cached).
    update public.credit_wallets w
       set held_subscription = w.held_subscription + least(w.subscription - w.held_subscription, v_cost),
           held_purchased = w.held_purchased + v_cost - least(w.subscription - w.held_subscription, v_cost),
           split_subscription = least(w.subscription - w.held_subscription, v_cost),
           next_hold_expiry = least(coalesce(w.next_hold_expiry, v_expires), v_expires),
           hold_minute = date_trunc('minute', now()),
           hold_minute_count = case when w.hold_minute = date_trunc('minute', now())
                                    then w.hold_minute_count + 1 else 1 end
     where w.account_id = p_account_id
       and v_cost between 1 and (private.limits() ->> 'amount')::integer
       and w.subscription - w.held_subscription + w.purchased - w.held_purchased >= v_cost
       and w.promotional = w.held_promotional and w.debt = 0 and not w.limited
       and not coalesce(least(w.next_hold_expiry, w.promo_front_at) <= now(), false)
       and (w.hold_minute is distinct from date_trunc('minute', now())
            or w.hold_minute_count < (private.write_bounds() ->> 'holds_per_minute')::integer)
       and (w.next_hold_expiry is null
            or (select count(*) from (select 1 from public.credit_holds h
                                       where h.account_id = p_account_id and h.status = 'active'
                                       limit (private.write_bounds() ->> 'active_holds')::integer) x)
               < (private.write_bounds() ->> 'active_holds')::integer)
    returning w.* into v_wallet;
    if found then
      v_from_subscription := v_wallet.split_subscription;
      v_expiry := private.next_expiry(v_wallet);
      v_hold := gen_random_uuid();
      insert into public.credit_transactions (
        account_id, kind, idempotency_key, request_hash, promotional_after, subscription_after, purchased_after,
        held_after, period_start, period_end, next_expiry_amount, next_expiry_at, ref_id, operation, metadata,
        outcome, actor_id)
      values (
        p_account_id, 'reserve', p_idempotency_key,
        private.request_hash('reserve', jsonb_build_array(p_amount, p_operation, p_ttl_seconds, p_metadata, p_model,
                                                          p_input_tokens, p_output_tokens, p_overage)),
        v_wallet.promotional, v_wallet.subscription, v_wallet.purchased,
        v_wallet.held_promotional + v_wallet.held_subscription + v_wallet.held_purchased,
        v_wallet.period_start, v_wallet.period_end, (v_expiry ->> 'amount')::bigint,
        (v_expiry ->> 'at')::timestamptz, v_hold, p_operation, p_metadata,
        jsonb_build_object('amount', v_cost, 'expires_at', v_expires), v_actor)
      on conflict (account_id, idempotency_key, origin) do nothing
      returning id into v_tx;
      if v_tx is not null then
        v_balance := row(p_account_id, v_wallet.promotional, v_wallet.subscription, v_wallet.purchased,
                         v_wallet.held_promotional + v_wallet.held_subscription + v_wallet.held_purchased,
                         v_wallet.promotional + v_wallet.subscription + v_wallet.purchased
                         - v_wallet.held_promotional - v_wallet.held_subscription - v_wallet.held_purchased,
                         v_wallet.promotional + v_wallet.subscription + v_wallet.purchased,
                         v_wallet.period_start, v_wallet.period_end, v_expiry, 0)::private.balance;
        -- Which grants: the front of each pool, from the wallet as the hold found it.
        v_wallet.held_subscription := v_wallet.held_subscription - v_from_subscription;
        v_wallet.held_purchased := v_wallet.held_purchased - (v_cost - v_from_subscription);
        if v_from_subscription > 0 then
          v_parts := private.take_front(v_wallet, 'subscription', v_from_subscription);
        end if;
        if v_cost > v_from_subscription then
          v_parts := v_parts || private.take_front(v_wallet, 'purchased', v_cost - v_from_subscription);
        end if;
        insert into public.credit_holds (id, account_id, transaction_id, amount, subscription, purchased, parts,
                                         sub_epoch, period_start, period_end, expires_at, operation, metadata,
                                         actor_id, overage, price, input_tokens, output_tokens, model)
        values (v_hold, p_account_id, v_tx, v_cost, v_from_subscription, v_cost - v_from_subscription, v_parts,
                v_wallet.sub_epoch, v_wallet.period_start, v_wallet.period_end, v_expires, p_operation,
                p_metadata, v_actor, p_overage, v_price, p_input_tokens, p_output_tokens, p_model);
        return to_jsonb(row(v_hold, p_account_id, v_cost, v_expires, p_overage, false,
                            v_balance)::private.reserve_answer);
      end if;
      -- The key was used before: put the wallet back; the checked path answers.
      update public.credit_wallets w
         set held_subscription = w.held_subscription - w.split_subscription,
             held_purchased = w.held_purchased - (v_cost - w.split_subscription),
             hold_minute_count = w.hold_minute_count - 1,
             next_hold_expiry = (select min(h.expires_at) from public.credit_holds h
                                  where h.account_id = p_account_id and h.status = 'active')
       where w.account_id = p_account_id;
    end if;
  end if;
  return private.reserve_checked(p_account_id, p_idempotency_key, p_amount, p_operation, p_ttl_seconds,
                                 p_metadata, p_model, p_input_tokens, p_output_tokens, p_overage);
end
$$;

create function public.reserve_credits(p_account_id uuid, p_idempotency_key text,
                                       p_amount integer default null,
                                       p_operation text default null, p_ttl_seconds integer default 900,
                                       p_metadata jsonb default '{}'::jsonb, p_model text default null,
                                       p_input_tokens integer default null, p_output_tokens integer default null,
                                       p_overage text default 'reject')
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.reserve_credits(coalesce(p_account_id, private.personal_account()), p_idempotency_key,
                                 p_amount, p_operation, p_ttl_seconds, p_metadata, p_model, p_input_tokens,
                                 p_output_tokens, p_overage);
end
$$;
comment on function public.reserve_credits(uuid, text, integer, text, integer, jsonb, text, integer, integer, text) is
  'Reserve credits for work in progress (an amount, or an operation priced from token estimates, the price '
  'fixed now); a null account is the caller''s own. {hold_id, account_id, amount, expires_at, overage, replayed, '
  'balance}.';

-- Find a hold and check the caller may spend from its account (a plain
-- member: only the holds they made).
create function private.hold_account(p_hold_id uuid) returns uuid
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_hold record;
  v_actor uuid;
begin
  if p_hold_id is null then
    perform private.invalid('p_hold_id', 'required');
  end if;
  select h.account_id, h.actor_id into v_hold from public.credit_holds h where h.id = p_hold_id;
  if not found then
    perform private.fail('PT404', 'hold_not_found');
  end if;
  v_actor := private.authorize(v_hold.account_id, true, true);
  if v_actor is not null and v_hold.actor_id is distinct from v_actor
     and private.is_plain_member(v_hold.account_id, v_actor) then
    perform private.fail('PT403', 'forbidden');
  end if;
  return v_hold.account_id;
end
$$;

-- End a hold from the API: capture (with its cost) or release.
create function private.settle_hold(p_hold_id uuid, p_amount integer, p_metadata jsonb, p_capture boolean,
                                    p_input_tokens integer default null, p_output_tokens integer default null,
                                    p_model text default null)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_account_id uuid := private.hold_account(p_hold_id);
  v_wallet public.credit_wallets;
  v_hold public.credit_holds;
  v_spend public.credit_transactions;
  v_overdraft public.credit_transactions;
  v_cost bigint := 0;
  v_over bigint := 0;
  v_room bigint;
  v_extra bigint := 0;
  v_debt bigint := 0;
  v_metadata jsonb;
  v_result jsonb;
begin
  v_wallet := private.lock_wallet(v_account_id);
  select * into v_hold from public.credit_holds h where h.id = p_hold_id for update;
  if v_hold.status = (case when p_capture then 'captured' else 'released' end) then
    return v_hold.result || '{"replayed": true}'::jsonb;
  end if;
  perform private.check_metadata(p_metadata);
  if v_hold.status <> 'active' then
    perform private.fail('PT409', 'hold_not_active', jsonb_build_object('status', v_hold.status));
  end if;
  if p_capture then
    if p_amount is not null and (p_input_tokens is not null or p_output_tokens is not null) then
      perform private.invalid('p_amount', 'give p_amount or token counts, not both');
    end if;
    if (p_input_tokens is not null or p_output_tokens is not null) and v_hold.price is null then
      perform private.invalid(case when p_input_tokens is not null then 'p_input_tokens' else 'p_output_tokens' end,
                              'the hold was not priced from an operation');
    end if;
    if p_input_tokens not between 0 and (private.limits() ->> 'tokens')::integer then
      perform private.invalid('p_input_tokens', format('must be 0 to %s', private.limits() ->> 'tokens'));
    end if;
    if p_output_tokens not between 0 and (private.limits() ->> 'tokens')::integer then
      perform private.invalid('p_output_tokens', format('must be 0 to %s', private.limits() ->> 'tokens'));
    end if;
    perform private.check_text('p_model', p_model, 'model');
    if p_amount is not null then
      perform private.check_amount('p_amount', p_amount);
      v_cost := p_amount;
    elsif p_input_tokens is not null or p_output_tokens is not null then
      -- A missing count is priced from the hold's estimate.
      v_cost := private.priced(v_hold.price, coalesce(p_input_tokens, v_hold.input_tokens),
                               coalesce(p_output_tokens, v_hold.output_tokens));
    else
      v_cost := v_hold.amount;
    end if;
    if v_cost > (private.limits() ->> 'amount')::bigint then
      perform private.invalid('p_amount', format('cost exceeds %s credits', private.limits() ->> 'amount'));
    end if;
    v_over := greatest(0, v_cost - v_hold.amount);
    if v_over > 0 and v_hold.overage = 'reject' then
      perform private.invalid(case when p_amount is not null then 'p_amount' else 'p_output_tokens' end,
                              format('costs %s, more than the held amount (%s); the hold''s overage policy is reject',
                                     v_cost, v_hold.amount));
    end if;
    v_metadata := v_hold.metadata || coalesce(p_metadata, '{}'::jsonb);
    perform private.check_metadata(v_metadata, 'p_metadata (merged with the hold''s)');
    if v_over > 0 then
      -- Above the hold: what is available, then (overdraft) debt up to the
      -- account's overdraft limit, all within the maker's spend limits.
      if v_wallet.limited then
        v_room := private.limit_room(v_wallet, v_hold.actor_id, null);
      end if;
      v_extra := least(v_over, private.available(v_wallet), coalesce(v_room, v_over));
      if v_hold.overage = 'overdraft' then
        v_debt := greatest(0, least(v_over - v_extra,
                                    (select a.overdraft_limit from public.credit_accounts a
                                      where a.id = v_account_id) - v_wallet.debt,
                                    coalesce(v_room, v_over) - v_extra));
      end if;
    end if;
  end if;
  v_spend := private.end_hold(v_hold, least(v_cost, v_hold.amount), v_metadata,
                              coalesce(v_hold.actor_id, private.actor()), v_extra,
                              jsonb_build_object('model', coalesce(p_model, v_hold.model),
                                                 'input_tokens', coalesce(p_input_tokens, v_hold.input_tokens),
                                                 'output_tokens', coalesce(p_output_tokens, v_hold.output_tokens)));
  if v_debt > 0 then
    v_overdraft := private.post(v_account_id, 'overdraft', p_origin => 'system', p_ref_id => p_hold_id,
                                p_debt => v_debt, p_actor => coalesce(v_hold.actor_id, private.actor()),
                                p_metadata => '{"reason": "capture above the hold (overdraft)"}'::jsonb);
    select * into v_wallet from public.credit_wallets w where w.account_id = v_account_id;
    if v_wallet.limited then
      perform private.count_usage(v_wallet, v_hold.actor_id, v_debt, 0);
    end if;
  end if;
  if p_capture then
    v_result := jsonb_build_object(
      'transaction_id', coalesce(v_spend.id, v_overdraft.id), 'hold_id', p_hold_id, 'requested', v_cost,
      'charged', least(v_cost, v_hold.amount) + v_extra + v_debt,
      'released', v_hold.amount - least(v_cost, v_hold.amount),
      'uncovered', v_cost - least(v_cost, v_hold.amount) - v_extra - v_debt, 'debt_added', v_debt,
      'from_promotional', coalesce(-v_spend.promotional, 0),
      'from_subscription', coalesce(-v_spend.subscription, 0),
      'from_purchased', coalesce(-v_spend.purchased, 0), 'replayed', false);
  else
    v_result := jsonb_build_object('hold_id', p_hold_id, 'released', v_hold.amount, 'replayed', false);
  end if;
  v_result := v_result || jsonb_build_object('balance', private.balance_json(
    (select w from public.credit_wallets w where w.account_id = v_account_id)));
  update public.credit_holds h
     set status = case when p_capture then 'captured' else 'released' end, settled_at = now(), result = v_result
   where h.id = p_hold_id;
  return v_result;
end
$$;

-- Capture: a whole capture (everything the hold reserves charged, by its
-- amount, its token estimate or the actual tokens) written directly, as
-- private.end_hold's first case writes it; the caller is the service or a
-- user on their own personal account; the account has no spend limits and
-- nothing lapsed; the hold is active, nothing claimed under it, no
-- promotional credits in it. private.settle_hold takes every other case
-- (partial captures, overage, replays) and raises the exact errors. The
-- wallet is locked before the hold, as every writer of holds locks them.
create function private.capture_hold(p_hold_id uuid, p_amount integer, p_metadata jsonb, p_input_tokens integer,
                                     p_output_tokens integer, p_model text)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_role text := current_setting('role', true);
  v_actor uuid;
  v_account uuid;
  v_wallet public.credit_wallets;
  v_hold public.credit_holds;
  v_cost bigint;
  v_metadata jsonb;
  v_expiry jsonb;
  v_tx uuid;
  v_result jsonb;
begin
  if (p_amount is null or p_amount between 1 and (private.limits() ->> 'amount')::integer)
     and not (p_amount is not null and (p_input_tokens is not null or p_output_tokens is not null))
     and coalesce(p_input_tokens, 0) between 0 and (private.limits() ->> 'tokens')::integer
     and coalesce(p_output_tokens, 0) between 0 and (private.limits() ->> 'tokens')::integer
     and (p_model is null or length(p_model) between 1 and (private.limits() ->> 'model')::integer)
     and jsonb_typeof(p_metadata) = 'object'
     and (v_role in ('service_role', '', 'none') or v_role is null or v_role = 'authenticated') then
    if v_role = 'authenticated' then
      -- A user: only the holds of their own personal account (before any lock).
      v_actor := auth.uid();
      select a.id into v_account from public.credit_holds h join public.credit_accounts a on a.id = h.account_id
       where h.id = p_hold_id and a.user_id = v_actor;
    end if;
    select w.* into v_wallet from public.credit_wallets w join public.credit_holds h on h.account_id = w.account_id
     where h.id = p_hold_id and (v_role is distinct from 'authenticated' or w.account_id = v_account)
       for update of w;
    v_account := v_wallet.account_id;
    if found and not v_wallet.limited
       and not coalesce(least(v_wallet.next_hold_expiry, v_wallet.promo_front_at) <= now(), false) then
      -- (No row lock: every writer of a hold holds its wallet's lock, which this call now holds.)
      select * into v_hold from public.credit_holds h where h.id = p_hold_id;
      v_cost := case when p_amount is not null then p_amount
                     when p_input_tokens is null and p_output_tokens is null then v_hold.amount
                     else private.priced(v_hold.price, coalesce(p_input_tokens, v_hold.input_tokens),
                                         coalesce(p_output_tokens, v_hold.output_tokens)) end;
      v_metadata := v_hold.metadata || p_metadata;
      if v_hold.status = 'active' and v_cost = v_hold.amount and v_hold.claims = '[]'::jsonb
         and v_hold.promotional = 0
         and octet_length(v_metadata::text) <= (private.limits() ->> 'metadata_bytes')::integer then
        update public.credit_wallets w
           set subscription = w.subscription - v_hold.subscription, purchased = w.purchased - v_hold.purchased,
               held_subscription = w.held_subscription - v_hold.subscription,
               held_purchased = w.held_purchased - v_hold.purchased,
               next_hold_expiry = case when w.next_hold_expiry >= v_hold.expires_at
                                       then (select min(h.expires_at) from public.credit_holds h
                                              where h.account_id = v_account and h.status = 'active'
                                                and h.id <> p_hold_id)
                                       else w.next_hold_expiry end
         where w.account_id = v_account
        returning w.* into v_wallet;
        v_expiry := private.next_expiry(v_wallet);
        insert into public.credit_transactions (
          account_id, kind, origin, subscription, purchased, promotional_after, subscription_after,
          purchased_after, held_after, period_start, period_end, next_expiry_amount, next_expiry_at, ref_id,
          operation, model, input_tokens, output_tokens, metadata, actor_id, price)
        values (
          v_account, 'spend', 'system', -v_hold.subscription, -v_hold.purchased, v_wallet.promotional,
          v_wallet.subscription, v_wallet.purchased,
          v_wallet.held_promotional + v_wallet.held_subscription + v_wallet.held_purchased,
          case when v_hold.subscription > 0 then v_hold.period_start else v_wallet.period_start end,
          case when v_hold.subscription > 0 then v_hold.period_end else v_wallet.period_end end,
          (v_expiry ->> 'amount')::bigint, (v_expiry ->> 'at')::timestamptz, p_hold_id, v_hold.operation,
          coalesce(p_model, v_hold.model), coalesce(p_input_tokens, v_hold.input_tokens),
          coalesce(p_output_tokens, v_hold.output_tokens), v_metadata, coalesce(v_hold.actor_id, v_actor),
          v_hold.price)
        returning id into v_tx;
        v_result := to_jsonb(row(
          v_tx, p_hold_id, v_cost, v_cost, 0, 0, 0, 0, v_hold.subscription, v_hold.purchased, false,
          row(v_account, v_wallet.promotional, v_wallet.subscription, v_wallet.purchased,
              v_wallet.held_promotional + v_wallet.held_subscription + v_wallet.held_purchased,
              greatest(0, v_wallet.promotional + v_wallet.subscription + v_wallet.purchased
                          - v_wallet.held_promotional - v_wallet.held_subscription - v_wallet.held_purchased
                          - v_wallet.debt),
              v_wallet.promotional + v_wallet.subscription + v_wallet.purchased,
              v_wallet.period_start, v_wallet.period_end, v_expiry, v_wallet.debt)::private.balance
        )::private.capture_answer);
        update public.credit_holds h set status = 'captured', settled_at = now(), result = v_result
         where h.id = p_hold_id;
        return v_result;
      end if;
    end if;
  end if;
  return private.settle_hold(p_hold_id, p_amount, p_metadata, true, p_input_tokens, p_output_tokens, p_model);
end
$$;

create function public.capture_hold(p_hold_id uuid, p_amount integer default null,
                                    p_metadata jsonb default '{}'::jsonb, p_input_tokens integer default null,
                                    p_output_tokens integer default null, p_model text default null)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.capture_hold(p_hold_id, p_amount, p_metadata, p_input_tokens, p_output_tokens, p_model);
end
$$;
comment on function public.capture_hold(uuid, integer, jsonb, integer, integer, text) is
  'Charge the hold (an amount, the actual tokens at the hold''s price, or all of it) and release the rest; '
  'above the hold its overage policy applies.';

create function private.release_hold(p_hold_id uuid)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.settle_hold(p_hold_id, null, null, false);
end
$$;

create function public.release_hold(p_hold_id uuid)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.release_hold(p_hold_id);
end
$$;
comment on function public.release_hold(uuid) is 'Release a hold: {hold_id, released, replayed, balance}.';

-- Grow an active hold from available credits (all or nothing) and/or move
-- its expiry; at most 100 extensions per hold. The hold's new credits come
-- from the front grants of each pool, like a reserve's.
create function private.extend_hold(p_hold_id uuid, p_idempotency_key text, p_add_amount integer,
                                    p_ttl_seconds integer)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_account_id uuid := private.hold_account(p_hold_id);
  v_hash uuid;
  v_wallet public.credit_wallets;
  v_hold public.credit_holds;
  v_entry public.credit_transactions;
  v_split private.split := row(0, 0, 0)::private.split;
  v_parts jsonb := '[]'::jsonb;
  v_add bigint := coalesce(p_add_amount, 0);
  v_expires timestamptz;
begin
  perform private.check_key(p_idempotency_key);
  if v_add <> 0 then
    perform private.check_amount('p_add_amount', v_add);
  end if;
  if p_ttl_seconds is not null
     and p_ttl_seconds not between 1 and (private.limits() ->> 'ttl_seconds')::integer then
    perform private.invalid('p_ttl_seconds', format('must be 1 to %s seconds', private.limits() ->> 'ttl_seconds'));
  end if;
  if v_add = 0 and p_ttl_seconds is null then
    perform private.invalid('p_add_amount', 'give p_add_amount, p_ttl_seconds or both');
  end if;
  v_hash := private.request_hash('extend', jsonb_build_array(p_hold_id, v_add, p_ttl_seconds));
  v_wallet := private.lock_wallet(v_account_id);
  v_entry := private.find_key(v_account_id, p_idempotency_key, v_hash);
  if v_entry.id is not null then
    return private.result(v_entry, true);
  end if;
  select * into v_hold from public.credit_holds h where h.id = p_hold_id for update;
  if v_hold.status <> 'active' then
    perform private.fail('PT409', 'hold_not_active', jsonb_build_object('status', v_hold.status));
  end if;
  if v_hold.extensions >= 100 then
    perform private.fail('PT409', 'hold_extension_limit', '{"limit": 100}'::jsonb);
  end if;
  if v_add > 0 then
    if v_wallet.limited then
      perform private.check_limits(v_wallet, v_hold.actor_id, null, v_add);
    end if;
    if private.available(v_wallet) < v_add then
      perform private.insufficient(v_add, private.available(v_wallet));
    end if;
    v_split := private.spend_split(v_wallet.promotional - v_wallet.held_promotional,
                                   v_wallet.subscription - v_wallet.held_subscription,
                                   v_wallet.purchased - v_wallet.held_purchased, v_add);
    if v_split.subscription > 0 and v_hold.sub_epoch <> v_wallet.sub_epoch then
      -- Its subscription credits are of an earlier period: one hold keeps one period's.
      perform private.invalid('p_add_amount', 'the hold predates the current period; reserve a new hold');
    end if;
    if v_split.promotional > 0 then
      v_parts := private.take_front(v_wallet, 'promotional', v_split.promotional);
    end if;
    if v_split.subscription > 0 then
      v_parts := v_parts || private.take_front(v_wallet, 'subscription', v_split.subscription);
    end if;
    if v_split.purchased > 0 then
      v_parts := v_parts || private.take_front(v_wallet, 'purchased', v_split.purchased);
    end if;
    -- One part per grant (a clawback's claim on a grant is matched once), in the spending order.
    select coalesce(jsonb_agg(jsonb_strip_nulls(jsonb_build_object('p', x.p, 'g', x.g, 'a', x.a, 'e', x.e))
                              order by x.pool_order, x.e nulls last, x.first), '[]'::jsonb)
      into v_parts
      from (select e ->> 'p' as p, e ->> 'g' as g, sum((e ->> 'a')::bigint) as a, e -> 'e' as e,
                   min(o) as first,
                   case coalesce(e ->> 'p', 'promotional') when 'promotional' then 1
                                                            when 'subscription' then 2 else 3 end as pool_order
              from jsonb_array_elements(v_hold.parts || v_parts) with ordinality x(e, o)
             group by e ->> 'p', e ->> 'g', e -> 'e') x;
  end if;
  v_expires := case when p_ttl_seconds is not null then now() + make_interval(secs => p_ttl_seconds)
                    else v_hold.expires_at end;
  update public.credit_holds h
     set amount = h.amount + v_add, promotional = h.promotional + v_split.promotional,
         subscription = h.subscription + v_split.subscription, purchased = h.purchased + v_split.purchased,
         parts = case when v_add > 0 then v_parts else h.parts end, expires_at = v_expires,
         extensions = h.extensions + 1
   where h.id = p_hold_id;
  update public.credit_wallets w
     set next_hold_expiry = (select min(h.expires_at) from public.credit_holds h
                              where h.account_id = v_account_id and h.status = 'active')
   where w.account_id = v_account_id;
  v_entry := private.post(v_account_id, 'extend',
                          p_held_promotional => v_split.promotional, p_held_subscription => v_split.subscription,
                          p_held_purchased => v_split.purchased, p_key => p_idempotency_key, p_hash => v_hash,
                          p_ref_id => p_hold_id, p_actor => private.actor(),
                          p_outcome => jsonb_build_object('amount', v_hold.amount + v_add, 'expires_at', v_expires));
  if v_wallet.limited and v_add > 0 then
    perform private.count_usage(v_wallet, v_hold.actor_id, 0, v_add);
  end if;
  return private.result(v_entry, false);
end
$$;

create function public.extend_hold(p_hold_id uuid, p_idempotency_key text, p_add_amount integer default 0,
                                   p_ttl_seconds integer default null)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.extend_hold(p_hold_id, p_idempotency_key, p_add_amount, p_ttl_seconds);
end
$$;
comment on function public.extend_hold(uuid, text, integer, integer) is
  'Grow an active hold from available credits and/or move its expiry to now + ttl (at most 100 times). '
  '{hold_id, amount, expires_at, replayed, balance}.';

revoke all on function private.hold_account(uuid),
  private.settle_hold(uuid, integer, jsonb, boolean, integer, integer, text),
  public.reserve_credits(uuid, text, integer, text, integer, jsonb, text, integer, integer, text),
  public.capture_hold(uuid, integer, jsonb, integer, integer, text), public.release_hold(uuid),
  public.extend_hold(uuid, text, integer, integer)
  from public, anon, authenticated, service_role;
grant execute on function public.reserve_credits(uuid, text, integer, text, integer, jsonb, text, integer, integer, text),
  public.capture_hold(uuid, integer, jsonb, integer, integer, text), public.release_hold(uuid),
  public.extend_hold(uuid, text, integer, integer) to authenticated, service_role;

-- The definer code behind the public entry points.
revoke all on function private.reserve_credits(uuid, text, integer, text, integer, jsonb, text, integer, integer, text),
  private.reserve_checked(uuid, text, integer, text, integer, jsonb, text, integer, integer, text)
  from public, anon, authenticated, service_role;
grant execute on function private.reserve_credits(uuid, text, integer, text, integer, jsonb, text, integer, integer, text)
  to authenticated, service_role;
revoke all on function private.capture_hold(uuid, integer, jsonb, integer, integer, text)
  from public, anon, authenticated, service_role;
grant execute on function private.capture_hold(uuid, integer, jsonb, integer, integer, text)
  to authenticated, service_role;
revoke all on function private.release_hold(uuid) from public, anon, authenticated, service_role;
grant execute on function private.release_hold(uuid) to authenticated, service_role;
revoke all on function private.extend_hold(uuid, text, integer, integer) from public, anon, authenticated, service_role;
grant execute on function private.extend_hold(uuid, text, integer, integer) to authenticated, service_role;
