-- Clawbacks take the payment's own credits.
--
--   * A refund or dispute of an earlier period's subscription payment no
--     longer takes the current period's allowance (another payment's): only
--     a grant of the current period is still there to take.
--   * Promotional credits (a plan change) are taken from the payment's own
--     grants, and what holds reserve of them is claimed per grant and taken
--     when each hold ends (a hold no longer shields them).
--   * A won dispute gives back what its claims took from holds as they ended,
--     as well as what its clawback took at once.
--   * A Stripe renewal on a plan with rollover attributes earlier promotional
--     spends before the rollover grant joins (they no longer land on it), and
--     an invoice whose period contains now starts it even if a free month
--     (the reset's) began later, never over a later paid period.
-- hold_fates (and fates) also name the clawback of each claim (f_key).

drop function private.fates(jsonb);
drop function private.hold_fates(public.credit_holds, bigint, integer, timestamptz);

-- What becomes of a hold's credits when it ends having charged p_charge:
-- one row per (pool, grant, fate), fate being spend, clawback, expire or free
-- (a clawback's row names its payment, f_ref, and the clawback's key, f_key).
create function private.hold_fates(p_hold public.credit_holds, p_charge bigint, p_epoch integer,
                                   p_now timestamptz)
returns table (f_pool text, f_grant uuid, f_amount bigint, f_fate text, f_ref text, f_key text)
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_charge private.split;
  v_left bigint;
  v_part jsonb;
  v_amount bigint;
  v_take bigint;
  v_claim jsonb;
  v_released bigint;
  v_pool text;
begin
  v_charge := private.spend_split(p_hold.promotional, p_hold.subscription, p_hold.purchased, p_charge);
  v_left := v_charge.promotional;
  for v_part in select e from jsonb_array_elements(p_hold.promo_parts) e loop
    v_amount := (v_part ->> 'a')::bigint;
    v_take := least(v_amount, v_left);
    v_left := v_left - v_take;
    f_pool := 'promotional';
    f_grant := (v_part ->> 'g')::uuid;
    f_ref := null;
    if v_take > 0 then
      f_amount := v_take; f_fate := 'spend';
      return next;
    end if;
    v_released := v_amount - v_take;
    -- A clawback that found this grant's credits under the hold takes its share first.
    for v_claim in select e from jsonb_array_elements(p_hold.claims) e
                    where e ->> 'pool' = 'promotional' and e ->> 'g' = v_part ->> 'g' loop
      v_take := least(v_released, (v_claim ->> 'amount')::bigint);
      if v_take > 0 then
        f_amount := v_take; f_fate := 'clawback'; f_ref := v_claim ->> 'stripe_ref'; f_key := v_claim ->> 'key';
        return next;
        v_released := v_released - v_take;
      end if;
    end loop;
    f_ref := null;
    f_key := null;
    if v_released > 0 then
      f_amount := v_released;
      -- The grant's own date decides (the part keeps a copy only for ordering).
      f_fate := case when (select p.expires_at from public.credit_promotions p where p.id = f_grant) <= p_now
                     then 'expire' else 'free' end;
      return next;
    end if;
  end loop;
  foreach v_pool in array array['subscription', 'purchased'] loop
    f_pool := v_pool;
    f_grant := null;
    f_ref := null;
    v_take := case v_pool when 'subscription' then v_charge.subscription else v_charge.purchased end;
    v_released := case v_pool when 'subscription' then p_hold.subscription else p_hold.purchased end - v_take;
    if v_take > 0 then
      f_amount := v_take; f_fate := 'spend';
      return next;
    end if;
    for v_claim in select e from jsonb_array_elements(p_hold.claims) e where e ->> 'pool' = v_pool loop
      v_take := least(v_released, (v_claim ->> 'amount')::bigint);
      if v_take > 0 then
        f_amount := v_take; f_fate := 'clawback'; f_ref := v_claim ->> 'stripe_ref'; f_key := v_claim ->> 'key';
        return next;
        v_released := v_released - v_take;
      end if;
    end loop;
    f_ref := null;
    f_key := null;
    if v_released > 0 then
      f_amount := v_released;
      f_fate := case when v_pool = 'subscription' and p_hold.sub_epoch <> p_epoch then 'expire' else 'free' end;
      return next;
    end if;
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
-- p_charge from its pools, apply the fates of the rest, mark it p_status.
-- Returns the spend row when something was charged.
create or replace function private.end_hold(p_hold public.credit_holds, p_charge bigint, p_status text,
                                 p_metadata jsonb default null, p_actor uuid default null)
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
begin
  select * into v_wallet from public.credit_wallets w where w.account_id = p_hold.account_id;
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

  if v_sum.sp + v_sum.ss + v_sum.su > 0 then
    v_spend := private.post(p_hold.account_id, 'spend', -v_sum.sp, -v_sum.ss, -v_sum.su,
                            -v_sum.sp, -v_sum.ss, -v_sum.su, p_origin => 'system', p_ref_id => p_hold.id,
                            p_metadata => p_metadata, p_actor => p_actor,
                            p_period_start => case when v_sum.ss > 0 then p_hold.period_start end,
                            p_period_end => case when v_sum.ss > 0 then p_hold.period_end end,
                            p_operation => p_hold.operation);
  end if;
  -- One clawback row per claim's payment and key (a won dispute gives back what its claims took).
  for v_row in select f.f_pool, f.f_ref, f.f_key, sum(f.f_amount)::bigint as amount from private.fates(v_fates) f
                where p_hold.claims <> '[]'::jsonb and f.f_fate = 'clawback'
                group by f.f_pool, f.f_ref, f.f_key order by f.f_pool, f.f_ref, f.f_key loop
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
                         p_period_end => case when v_row.f_pool = 'subscription' then p_hold.period_end end);
  end loop;
  if v_sum.ep + v_sum.es > 0 then
    perform private.post(p_hold.account_id, 'expire', -v_sum.ep, -v_sum.es, 0, -v_sum.ep, -v_sum.es, 0,
                         p_origin => 'system', p_ref_id => p_hold.id,
                         p_metadata => jsonb_build_object('reason', 'expired while held'),
                         p_period_start => case when v_sum.es > 0 then p_hold.period_start end,
                         p_period_end => case when v_sum.es > 0 then p_hold.period_end end);
  end if;
  -- The hold ends: what it released is free again, and the next hold to lapse is another.
  update public.credit_holds h set status = p_status, settled_at = now() where h.id = p_hold.id;
  if v_sum.fp > 0 then
      -- Promotional credits go back to their grants (attribute spends first).
      select * into v_wallet from public.credit_wallets w where w.account_id = p_hold.account_id;
      perform private.materialize_promotions(v_wallet);
      update public.credit_promotions p set remaining = p.remaining + f.amount
        from (select s.f_grant, sum(s.f_amount) as amount from private.fates(v_fates) s
               where s.f_pool = 'promotional' and s.f_fate = 'free' group by s.f_grant) f
       where p.id = f.f_grant;
  end if;
  update public.credit_wallets w
     set held_promotional = w.held_promotional - v_sum.fp,
         held_subscription = w.held_subscription - v_sum.fs,
         held_purchased = w.held_purchased - v_sum.fu,
         next_hold_expiry = (select min(h.expires_at) from public.credit_holds h
                              where h.account_id = p_hold.account_id and h.status = 'active')
   where w.account_id = p_hold.account_id
  returning w.* into v_wallet;
  if v_sum.fp > 0 then
    perform private.materialize_promotions(v_wallet);
  end if;
  return v_spend;
end
$$;

-- Take back what a payment granted (cumulative p_amount; default all).
create or replace function private.clawback(p_stripe_ref text, p_key text, p_amount integer, p_reason text,
                                 p_origin private.entry_origin)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_grants record;
  v_hash uuid;
  v_wallet public.credit_wallets;
  v_entry public.credit_transactions;
  v_done bigint;
  v_outstanding bigint;
  v_free bigint;
  v_take bigint;
  v_claimed bigint := 0;
  v_hold record;
  v_claim bigint;
  v_promos uuid[] := '{}';
  v_part jsonb;
begin
  perform private.require_service();
  perform private.check_key(p_key);
  perform private.check_text('p_stripe_ref', p_stripe_ref, 'stripe_ref', true);
  perform private.check_text('p_reason', p_reason, 'reason');
  if p_amount is not null then
    perform private.check_amount('p_amount', p_amount, 0);
  end if;
  select * into v_grants from private.payment_grants(p_stripe_ref);
  if v_grants.account_id is null then
    perform private.fail('PT404', 'transaction_not_found', jsonb_build_object('stripe_ref', p_stripe_ref));
  end if;
  v_hash := private.request_hash('clawback', jsonb_build_array(p_stripe_ref, p_amount, p_reason));
  v_wallet := private.lock_wallet(v_grants.account_id);
  v_entry := private.find_key(v_grants.account_id, p_key, v_hash, p_origin);
  if v_entry.id is not null then
    return private.result(v_entry, true);
  end if;

  -- Taken back so far (clawback and reinstatement rows), plus what holds still owe.
  select coalesce(-sum(t.promotional + t.subscription + t.purchased), 0) into v_done
    from public.credit_transactions t
   where t.stripe_ref = p_stripe_ref and t.account_id = v_grants.account_id
     and t.kind in ('clawback', 'reinstate');
  select v_done + coalesce(sum((c ->> 'amount')::bigint), 0) into v_done
    from public.credit_holds h cross join lateral jsonb_array_elements(h.claims) c
   where h.account_id = v_grants.account_id and h.status = 'active' and c ->> 'stripe_ref' = p_stripe_ref;
  v_outstanding := greatest(least(coalesce(p_amount, v_grants.granted), v_grants.granted) - v_done, 0);

  -- What is left of the payment's own grants, never another's.
  if v_grants.pool = 'promotional' then
    -- Its promotional grants, as attributed now (spends took the soonest-expiring first).
    v_wallet := private.materialize_promotions(v_wallet);
    select coalesce(array_agg(g.id), '{}'), coalesce(sum(g.remaining), 0) into v_promos, v_free
      from public.credit_promotions g
      join public.credit_transactions t on t.id = g.id and t.account_id = g.account_id
     where g.account_id = v_grants.account_id and t.stripe_ref = p_stripe_ref;
  elsif v_grants.pool = 'subscription' then
    -- Only a grant of the current period is still there: an earlier period's expired at its renewal.
    v_free := least(v_wallet.subscription - v_wallet.held_subscription,
                    (select coalesce(sum(t.subscription), 0) from public.credit_transactions t
                      where t.account_id = v_grants.account_id and t.stripe_ref = p_stripe_ref
                        and t.kind = 'grant' and t.period_start = v_wallet.period_start));
  else
    v_free := v_wallet.purchased - v_wallet.held_purchased;
  end if;
  v_take := least(v_outstanding, v_free);
  if v_grants.pool = 'promotional' and v_take > 0 then
    -- From those grants, soonest expiry first.
    update public.credit_promotions p set remaining = p.remaining - t.amount
      from (select g.id, least(g.remaining, v_take - (g.cum - g.remaining)) as amount
              from (select q.id, q.remaining,
                           sum(q.remaining) over (order by q.expires_at, q.id) as cum
                      from public.credit_promotions q
                     where q.id = any (v_promos) and q.remaining > 0) g
             where g.cum - g.remaining < v_take) t
     where p.id = t.id;
  end if;
  -- What active holds reserve of those credits is claimed, soonest-ending hold first.
  if v_outstanding > v_take then
    for v_hold in select h.id, h.subscription, h.purchased, h.promo_parts, h.claims, h.period_start, h.sub_epoch
                    from public.credit_holds h
                   where h.account_id = v_grants.account_id and h.status = 'active'
                   order by h.expires_at, h.id loop
      exit when v_outstanding - v_take - v_claimed <= 0;
      if v_grants.pool = 'promotional' then
        -- Per grant: the part of each of the payment's grants this hold reserves, less earlier claims.
        for v_part in select e from jsonb_array_elements(v_hold.promo_parts) e
                       where (e ->> 'g')::uuid = any (v_promos) loop
          v_claim := least((v_part ->> 'a')::bigint
                           - coalesce((select sum((c ->> 'amount')::bigint) from jsonb_array_elements(v_hold.claims) c
                                        where c ->> 'pool' = 'promotional' and c ->> 'g' = v_part ->> 'g'), 0),
                           v_outstanding - v_take - v_claimed);
          continue when v_claim <= 0;
          v_hold.claims := v_hold.claims || jsonb_build_array(jsonb_build_object(
            'pool', 'promotional', 'g', v_part ->> 'g', 'amount', v_claim, 'stripe_ref', p_stripe_ref,
            'key', p_key));
          v_claimed := v_claimed + v_claim;
        end loop;
      else
        continue when v_grants.pool = 'subscription'
                      and (v_hold.period_start is distinct from v_wallet.period_start
                           or v_hold.sub_epoch <> v_wallet.sub_epoch);
        v_claim := least(case v_grants.pool when 'subscription' then v_hold.subscription else v_hold.purchased end
                         - coalesce((select sum((c ->> 'amount')::bigint) from jsonb_array_elements(v_hold.claims) c
                                      where c ->> 'pool' = v_grants.pool), 0),
                         v_outstanding - v_take - v_claimed);
        continue when v_claim <= 0;
        v_hold.claims := v_hold.claims || jsonb_build_array(jsonb_build_object(
          'pool', v_grants.pool, 'amount', v_claim, 'stripe_ref', p_stripe_ref, 'key', p_key));
        v_claimed := v_claimed + v_claim;
      end if;
      update public.credit_holds h set claims = v_hold.claims where h.id = v_hold.id;
    end loop;
  end if;
  v_entry := private.post(
    v_grants.account_id, 'clawback',
    p_promotional => case when v_grants.pool = 'promotional' then -v_take else 0 end,
    p_subscription => case when v_grants.pool = 'subscription' then -v_take else 0 end,
    p_purchased => case when v_grants.pool = 'purchased' then -v_take else 0 end,
    p_origin => p_origin, p_key => p_key, p_hash => v_hash, p_stripe_ref => p_stripe_ref,
    p_description => p_reason,
    p_metadata => jsonb_build_object('reason', p_reason),
    p_outcome => jsonb_build_object('pending', v_claimed, 'shortfall', v_outstanding - v_take - v_claimed));
  if v_grants.pool = 'promotional' and v_take > 0 then
    -- The wallet's soonest-expiry cache follows the grants.
    perform private.materialize_promotions(
      (select w from public.credit_wallets w where w.account_id = v_grants.account_id));
  end if;
  return private.result(v_entry, false);
end
$$;

-- charge.dispute.funds_reinstated, charge.dispute.closed: a won dispute gives
-- back exactly what its clawback took, once.
create or replace function private.stripe_dispute_won(p_type text, p jsonb) returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_dispute text := private.stripe_text(p, 'dispute');
  v_taken public.credit_transactions;
  v_wallet public.credit_wallets;
  v_entry public.credit_transactions;
  v_pending bigint;
  v_hash uuid;
  v_hold record;
  v_claims jsonb;
  v_held_back record;
begin
  if v_dispute is null then
    perform private.invalid('dispute', 'missing');
  end if;
  if p_type = 'charge.dispute.closed' and coalesce(p ->> 'status', '') <> 'won' then
    return private.stripe_result('ignored', 'dispute_' || coalesce(p ->> 'status', 'closed'));
  end if;
  select * into v_taken from public.credit_transactions t
   where t.idempotency_key = 'dispute:' || v_dispute and t.origin = 'stripe' and t.kind = 'clawback';
  if not found then
    -- Won before its creation was applied (Stripe does not guarantee order): wait for it.
    return private.stripe_result('parked', 'dispute_unknown', null, null, '{}', array['dispute:' || v_dispute]);
  end if;
  v_hash := private.request_hash('reinstate', to_jsonb(v_dispute));
  v_wallet := private.lock_wallet(v_taken.account_id);
  v_entry := private.find_key(v_taken.account_id, 'reinstate:' || v_dispute, v_hash, 'stripe');
  if v_entry.id is not null then
    return private.stripe_result('applied', 'already_reinstated', v_taken.account_id,
                                 private.result(v_entry, true));
  end if;
  -- What the dispute still claims on active holds is released from them.
  v_pending := coalesce((v_taken.outcome ->> 'pending')::bigint, 0);
  for v_hold in select h.id, h.claims from public.credit_holds h
                 where h.account_id = v_taken.account_id and h.status = 'active'
                   and h.claims @> jsonb_build_array(jsonb_build_object('stripe_ref', v_taken.stripe_ref))
                 order by h.expires_at desc, h.id loop
    exit when v_pending <= 0;
    select coalesce(jsonb_agg(c.value order by c.ordinality), '[]'::jsonb) into v_claims
      from (select e.value, e.ordinality,
                   sum((e.value ->> 'amount')::bigint) filter (where e.value ->> 'stripe_ref' = v_taken.stripe_ref)
                     over (order by e.ordinality desc) as from_end
              from jsonb_array_elements(v_hold.claims) with ordinality e) c
     where c.value ->> 'stripe_ref' is distinct from v_taken.stripe_ref or c.from_end > v_pending;
    v_pending := v_pending - (select coalesce(sum((e ->> 'amount')::bigint), 0)
                                from jsonb_array_elements(v_hold.claims) e
                               where e ->> 'stripe_ref' = v_taken.stripe_ref)
                           + (select coalesce(sum((e ->> 'amount')::bigint), 0)
                                from jsonb_array_elements(v_claims) e
                               where e ->> 'stripe_ref' = v_taken.stripe_ref);
    update public.credit_holds h set claims = v_claims where h.id = v_hold.id;
  end loop;
  -- What the dispute's claims took from holds as they ended comes back too.
  select coalesce(-sum(t.promotional), 0)::bigint as promotional,
         coalesce(-sum(t.subscription), 0)::bigint as subscription,
         coalesce(-sum(t.purchased), 0)::bigint as purchased
    into v_held_back
    from public.credit_transactions t
   where t.account_id = v_taken.account_id and t.kind = 'clawback' and t.stripe_ref = v_taken.stripe_ref
     and t.metadata ->> 'claim' = 'dispute:' || v_dispute;
  if v_taken.promotional < 0 or v_held_back.promotional > 0 then
    -- Promotional credits come back as a grant with the expiry of the one they
    -- were taken from; past it, they are written back and expired at once.
    v_entry := private.add_promotion(
      v_wallet, 'reinstate', -v_taken.promotional + v_held_back.promotional,
      coalesce((select max(g.expires_at) from public.credit_promotions g
                  join public.credit_transactions t on t.id = g.id
                 where t.account_id = v_taken.account_id and t.stripe_ref = v_taken.stripe_ref), now()),
      'stripe', 'reinstate:' || v_dispute, v_hash, v_taken.stripe_ref, null,
      jsonb_build_object('reason', 'dispute won', 'dispute', v_dispute), null);
    select * into v_wallet from public.credit_wallets w where w.account_id = v_taken.account_id;
    perform private.materialize_promotions(v_wallet);
    perform private.lock_wallet(v_taken.account_id);  -- sweeps it at once if its expiry passed
  else
    v_entry := private.post(v_taken.account_id, 'reinstate',
                            p_promotional => -v_taken.promotional,
                            p_subscription => -v_taken.subscription + v_held_back.subscription,
                            p_purchased => -v_taken.purchased + v_held_back.purchased, p_origin => 'stripe',
                            p_key => 'reinstate:' || v_dispute, p_hash => v_hash,
                            p_ref_id => v_taken.id, p_stripe_ref => v_taken.stripe_ref,
                            p_metadata => jsonb_build_object('reason', 'dispute won', 'dispute', v_dispute));
  end if;
  -- A won dispute of a yearly price's payment resumes its months.
  update public.credit_accounts a
     set stripe_paid_through = a.stripe_paid_until, updated_at = now()
   where a.id = v_taken.account_id and a.stripe_paid_ref = v_taken.stripe_ref and a.stripe_paid_scale > 0;
  return private.stripe_result('applied', 'reinstated', v_taken.account_id, private.result(v_entry, false));
end
$$;

-- Start a subscription period for one account (Stripe invoices, operators).
create or replace function private.add_subscription(p_account_id uuid, p_amount integer, p_period_start timestamptz,
                                         p_period_end timestamptz, p_key text, p_stripe_ref text,
                                         p_metadata jsonb, p_origin private.entry_origin)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_hash uuid;
  v_wallet public.credit_wallets;
  v_entry public.credit_transactions;
  v_cap bigint;
begin
  perform private.authorize(p_account_id, true);
  perform private.check_amount('p_amount', p_amount, 0);
  perform private.check_key(p_key);
  perform private.check_text('p_stripe_ref', p_stripe_ref, 'stripe_ref');
  perform private.check_metadata(p_metadata);
  if p_period_start is null then
    perform private.invalid('p_period_start', 'required');
  end if;
  if p_period_end is null or p_period_end <= p_period_start then
    perform private.invalid('p_period_end', 'must be after p_period_start');
  end if;
  v_hash := private.request_hash('subscription',
    jsonb_build_array(p_amount, p_period_start, p_period_end, p_stripe_ref, p_metadata));
  v_wallet := private.lock_wallet(p_account_id);
  v_entry := private.find_key(p_account_id, p_key, v_hash, p_origin);
  if v_entry.id is not null then
    return private.result(v_entry, true);
  end if;
  if v_wallet.period_start is not null and p_period_start < v_wallet.period_start
     and not (p_period_start <= now() and p_period_end > now() and p_period_end > v_wallet.period_start
              and not exists (select 1 from public.credit_transactions t
                               where t.account_id = p_account_id and t.kind = 'grant' and t.origin <> 'system'
                                 and t.period_start = v_wallet.period_start)) then
    -- A grant for an older period (a late or reordered event) changes nothing; one
    -- whose period contains now starts it even if a later free period (the
    -- reset's) began, never over a later paid one.
    v_entry := private.post(p_account_id, 'grant', p_origin => p_origin, p_key => p_key, p_hash => v_hash,
                            p_stripe_ref => p_stripe_ref, p_metadata => p_metadata);
    return private.result(v_entry, false);
  end if;
  select p.rollover_cap into v_cap
    from public.credit_accounts a join public.credit_plans p on p.id = a.plan_id where a.id = p_account_id;
  if v_cap > 0 then
    -- Attribute earlier promotional spends before the rollover grant joins the
    -- grants: they were spent from the grants that existed then.
    v_wallet := private.materialize_promotions(v_wallet);
  end if;
  perform private.renew(array[p_account_id], array[p_amount::bigint], array[coalesce(v_cap, 0)],
                        p_period_start, p_period_end, p_origin, p_key, v_hash, p_stripe_ref, p_metadata);
  return private.result(private.find_key(p_account_id, p_key, v_hash, p_origin), false);
end
$$;

revoke all on function private.fates(jsonb), private.hold_fates(public.credit_holds, bigint, integer, timestamptz)
  from public;
grant execute on function private.hold_fates(public.credit_holds, bigint, integer, timestamptz),
  private.fates(jsonb) to authenticated, service_role;
