-- Clawbacks of packs, won disputes of ended periods, yearly to monthly.
--
--   * A refund or dispute of a credit pack takes what is left of that pack
--     (purchased credits are spent oldest first, so the free ones belong to
--     the newest packs), never another pack's credits.
--   * A won dispute of a subscription payment whose period has ended writes
--     its credits back and expires them at once: they never land in a later
--     period.
--   * A monthly period clears a yearly price's record, so the reset no longer
--     renews a former yearly subscriber with the free plan.
--   * A rollover keeps the Stripe reference of the allowance it came from.
--   * A cancelled statement (the call's statement timeout) ends the whole call
--     instead of being counted on whichever event was running.

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
  v_upper bigint;
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
    -- Purchased credits never expire and are spent oldest first, so the free
    -- ones belong to the newest grants: the payment's share of them is what is
    -- left of it. (A grant: a payment's rows, or a refund or adjustment.)
    with g as (
      select coalesce(t.stripe_ref, t.id::text) as grant_key, min(t.seq) as first_seq,
             sum(t.purchased)::bigint as upper
        from public.credit_transactions t
       where t.account_id = v_grants.account_id and t.purchased <> 0
         and (t.kind in ('purchase', 'refund', 'adjustment', 'reinstate')
              or (t.kind = 'clawback' and t.stripe_ref is not null))
       group by 1
    ), tail as (
      select g.grant_key, g.upper,
             coalesce(sum(g.upper) over (order by g.first_seq desc
                                         rows between unbounded preceding and 1 preceding), 0) as newer
        from g where g.upper > 0
    )
    select coalesce(sum(greatest(0, least(t.upper, v_wallet.purchased - v_wallet.held_purchased - t.newer))), 0),
           coalesce(sum(t.upper), 0)
      into v_free, v_upper
      from tail t where t.grant_key = p_stripe_ref;
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
                         v_outstanding - v_take - v_claimed,
                         -- Of purchased credits, holds can reserve only what of the payment is not free.
                         case when v_grants.pool = 'purchased' then v_upper - v_free - v_claimed end);
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
    if -v_taken.subscription + v_held_back.subscription > 0
       and not exists (select 1 from public.credit_transactions t
                        where t.account_id = v_taken.account_id and t.kind = 'grant'
                          and t.stripe_ref = v_taken.stripe_ref and t.period_start = v_wallet.period_start) then
      -- The allowance they belonged to has ended: written back, they expire at once.
      perform private.post(v_taken.account_id, 'expire',
                           p_subscription => v_taken.subscription - v_held_back.subscription,
                           p_origin => 'system', p_ref_id => v_entry.id, p_stripe_ref => v_taken.stripe_ref,
                           p_metadata => '{"reason": "given back after its period ended"}'::jsonb);
    end if;
  end if;
  -- A won dispute of a yearly price's payment resumes its months.
  update public.credit_accounts a
     set stripe_paid_through = a.stripe_paid_until, updated_at = now()
   where a.id = v_taken.account_id and a.stripe_paid_ref = v_taken.stripe_ref and a.stripe_paid_scale > 0;
  return private.stripe_result('applied', 'reinstated', v_taken.account_id, private.result(v_entry, false));
end
$$;

-- invoice.paid: a period longer than a month (a yearly price) starts with
-- its month that contains now (its first month, unless the invoice arrives
-- late), from the period's anniversary; the account records the year's
-- start, end, seats and payment for the monthly renewals (the reset chapter).
create or replace function private.stripe_invoice_paid_yearly(p jsonb) returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_reason text := private.stripe_text(p, 'billing_reason');
  v_year_start timestamptz;
  v_paid_through timestamptz;
  v_quantity bigint;
  v_month record;
  v_lines jsonb;
  v_res jsonb;
begin
  if v_reason is not distinct from 'subscription_update'
     or jsonb_typeof(p -> 'lines') is distinct from 'array' then
    return private.stripe_invoice_paid(p);
  end if;
  -- The yearly plan line's period, and its current month in its place.
  select min(private.stripe_time(l, 'period_start')), max(private.stripe_time(l, 'period_end')),
         max(private.stripe_int(l, 'quantity'))
    into v_year_start, v_paid_through, v_quantity
    from jsonb_array_elements(p -> 'lines') l
   where private.stripe_time(l, 'period_end') > private.stripe_time(l, 'period_start') + interval '32 days';
  if v_paid_through is null then
    v_res := private.stripe_invoice_paid(p);
    if v_res ->> 'outcome' = 'applied' and v_res ->> 'reason' = 'period_started' then
      -- A monthly price now: its invoices renew it, no yearly months any more.
      update public.credit_accounts a
         set stripe_paid_through = null, stripe_paid_until = null, stripe_period_start = null,
             stripe_paid_ref = null, stripe_paid_scale = 1, updated_at = now()
       where a.id = (v_res ->> 'account_id')::uuid and a.stripe_paid_through is not null;
    end if;
    return v_res;
  end if;
  v_month := private.anniversary_month(v_year_start, least(greatest(now(), v_year_start),
                                                           v_paid_through - interval '1 second'));
  select jsonb_agg(case when private.stripe_time(l, 'period_end')
                              > private.stripe_time(l, 'period_start') + interval '32 days'
                        then l || jsonb_build_object(
                               'period_start', extract(epoch from v_month.month_start)::bigint,
                               'period_end', extract(epoch from least(v_month.month_end, v_paid_through))::bigint)
                        else l end)
    into v_lines from jsonb_array_elements(p -> 'lines') l;
  v_res := private.stripe_invoice_paid(p || jsonb_build_object('lines', v_lines));
  if v_res ->> 'outcome' = 'applied' and v_res ->> 'reason' = 'period_started' then
    update public.credit_accounts a
       set stripe_paid_through = v_paid_through, stripe_paid_until = v_paid_through,
           stripe_quantity = coalesce(v_quantity, 1), stripe_paid_scale = 1, stripe_period_start = v_year_start,
           stripe_paid_ref = coalesce(private.stripe_text(p, 'payment_intent'), private.stripe_text(p, 'invoice')),
           updated_at = now()
     where a.id = (v_res ->> 'account_id')::uuid;
  end if;
  return v_res;
end
$$;

create or replace function private.renew_to(p_accounts uuid[], p_amounts bigint[], p_caps bigint[], p_ends timestamptz[],
                                 p_start timestamptz, p_origin private.entry_origin, p_key text, p_hash uuid,
                                 p_stripe_ref text, p_metadata jsonb)
returns table (account_id uuid, expired bigint, rolled_over bigint, granted bigint, grant_id uuid)
language sql
set search_path = pg_catalog, pg_temp
as $$
  with calc as (
    -- The caller took the locks before this statement began, so its snapshot
    -- sees every committed change to these wallets.
    select w.*, b.amount as new_amount, b.period_end as new_end,
           least(b.cap, w.subscription - w.held_subscription) as rolled,
           w.subscription - w.held_subscription - least(b.cap, w.subscription - w.held_subscription) as lapsed,
           private.uuid_v7() as grant_id, private.uuid_v7() as roll_id, private.uuid_v7() as expire_id
      from unnest(p_accounts, p_amounts, p_caps, p_ends) as b(account_id, amount, cap, period_end)
      join public.credit_wallets w on w.account_id = b.account_id
     -- Older (ended before the current period began) changes nothing; a period
     -- that contains now starts even if a later one (a free month) began.
     where w.period_start is null or w.period_start <= p_start
        or (p_start <= now() and b.period_end > now() and b.period_end > w.period_start)
  ), renewed as (
    update public.credit_wallets w
       set subscription = c.held_subscription + c.new_amount,
           promotional = c.promotional + c.rolled,
           -- The rollover grant becomes the soonest expiry unless a grant with free
           -- credits expires earlier (front_left = 0: no free promotional credits).
           promo_front_at = case when c.rolled > 0 and (c.promo_front_left = 0 or c.promo_front_at >= c.new_end)
                                 then c.new_end else c.promo_front_at end,
           promo_front_left = case when c.rolled = 0 then c.promo_front_left
                                   when c.promo_front_left = 0 or c.promo_front_at > c.new_end then c.rolled
                                   when c.promo_front_at = c.new_end then c.promo_front_left + c.rolled
                                   else c.promo_front_left end,
           sub_epoch = c.sub_epoch + 1,
           period_start = p_start,
           period_end = c.new_end
      from calc c
     where w.account_id = c.account_id
    returning w.*
  ), promos as (
    insert into public.credit_promotions (id, account_id, amount, expires_at, remaining)
    select c.roll_id, c.account_id, c.rolled, c.new_end, c.rolled from calc c where c.rolled > 0
  ), entries as (
    insert into public.credit_transactions (
      id, account_id, kind, origin, idempotency_key, request_hash, promotional, subscription, purchased,
      promotional_after, subscription_after, purchased_after, held_after, period_start, period_end,
      next_expiry_amount, next_expiry_at, ref_id, stripe_ref, metadata)
    select e.id, c.account_id, e.kind, e.origin, e.key, e.hash, e.d_promo, e.d_sub, 0,
           n.promotional, e.sub_after, n.purchased,
           n.held_promotional + n.held_subscription + n.held_purchased, e.pstart, e.pend,
           (private.next_expiry(n) ->> 'amount')::bigint, (private.next_expiry(n) ->> 'at')::timestamptz,
           e.ref_id,
           -- A rollover keeps the Stripe reference of the allowance it came from.
           case when e.ord = 1 then (select t.stripe_ref from public.credit_transactions t
                                      where t.account_id = c.account_id and t.kind = 'grant'
                                        and t.period_start = c.period_start
                                      order by t.seq desc limit 1)
                else p_stripe_ref end,
           coalesce(p_metadata, '{}'::jsonb)
      from calc c
      join renewed n on n.account_id = c.account_id
     cross join lateral (values
       (1, c.roll_id, 'rollover'::private.entry_kind, 'system'::private.entry_origin, null::text, null::uuid,
        c.rolled, -c.rolled, c.subscription - c.rolled, c.period_start, c.period_end, c.grant_id),
       (2, c.expire_id, 'expire', 'system', null, null,
        0, -c.lapsed, c.held_subscription, c.period_start, c.period_end, c.grant_id),
       (3, c.grant_id, 'grant', p_origin, p_key, p_hash,
        0, c.new_amount, n.subscription, p_start, c.new_end, null))
       as e(ord, id, kind, origin, key, hash, d_promo, d_sub, sub_after, pstart, pend, ref_id)
     where e.ord = 3 or (e.ord = 1 and c.rolled > 0) or (e.ord = 2 and c.lapsed > 0)
     order by c.account_id, e.ord
    returning 1
  )
  select c.account_id, c.lapsed, c.rolled, c.new_amount, c.grant_id
    from calc c
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
exception when others then
  -- (A cancelled statement, e.g. the call's statement timeout, is not caught:
  -- it ends the whole call, whichever event was running.)
  get stacked diagnostics v_state = returned_sqlstate, v_message = message_text, v_detail = pg_exception_detail;
  return private.stripe_result(
           case when v_state in ('40001', '40P01', '55P03') or left(v_state, 2) in ('08', '53')
                then 'retry' else 'failed' end,
           left(v_message, 200))
         || jsonb_build_object('error', jsonb_build_object('code', v_state, 'message', v_message,
                                                           'detail', private.stripe_detail(v_detail)));
end
$$;
