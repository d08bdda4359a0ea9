-- Refunds and adjustments: giving back, taking back, correcting (service only).
--
-- Holds refund_credits, clawback_credits, admin_adjust_credits, the private
-- functions the Stripe chapter shares with them, and
-- reconcile_credit_balances (every balance against its ledger, its holds and
-- its grants).
--
-- Rules:
--   * Every one of them appends a row; nothing updates an earlier row. What
--     was refunded of a spend is the sum of the refund rows pointing at it;
--     what was clawed back of a payment, the sum of its clawback rows.
--   * A refund gives back (part of) a spend into the purchased pool, never
--     more than was spent minus earlier refunds, as grants that keep the
--     source and Stripe reference of the grants the spend took from
--     (private.spend_sources), so a later clawback of that payment reaches
--     them; they carry the reference without being granted by it.
--   * A clawback takes back what a Stripe payment granted, from what is left
--     of its own grants (those with its reference, in every pool, rollovers
--     and refunds carrying it included), in the spending order, never below
--     zero and never from held credits now: an earlier period's subscription
--     grant has nothing left (it ended at the renewal). What active holds
--     reserve of those grants is claimed on the holds, per grant, and taken
--     when each ends (if it is captured, those credits were spent). What is
--     neither free nor held is the shortfall. The amount is cumulative per
--     payment (Stripe reports refunds cumulatively), so only what was not yet
--     taken or claimed is taken now. The clawback records what it took of
--     each grant, so a won dispute gives back into the same grants.
--   * An adjustment changes one pool by a signed amount; a decrease takes
--     free credits only (insufficient_credits otherwise); promotional credits
--     are only decreased here (they are granted with an expiry, by
--     grant_promotional_credits).

-- Where a spend's credits came from, in the order it took them: for each
-- pool, the grants at the front of the spending order when it was made (its
-- subscription credits: the grants of its period), each as it stood then
-- (less what clawbacks had taken of it). The credits a pool had before the
-- spend are the back of its grants then, so the spend took the positions just
-- before them. What no grant explains (credits older than the grants) has no
-- source. Credits held at the time are not told apart: a spend made while a
-- hold was active may be placed on the grants the hold reserved. A captured
-- hold's spend is exact: its parts name the grants it charged.
create function private.spend_sources(p_spend public.credit_transactions)
returns table (source text, stripe_ref text, amount bigint)
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_pool text;
  v_taken bigint;
  v_before bigint;
  v_parts jsonb;
begin
  -- A captured hold says which grants it charged: its parts, pool by pool,
  -- in order (a part of the calendar allowance, which has no row, is reset).
  select h.parts into v_parts from public.credit_holds h
   where p_spend.ref_id is not null and h.id = p_spend.ref_id and h.account_id = p_spend.account_id;
  if v_parts is not null and v_parts <> '[]'::jsonb then
    return query
    with parts as (
      select coalesce(x.e ->> 'p', 'promotional') as pool, (x.e ->> 'g')::uuid as g, (x.e ->> 'a')::bigint as a,
             x.o
        from jsonb_array_elements(v_parts) with ordinality x(e, o)
    ), charged as (
      select q.pool, q.g, q.o,
             greatest(0, least(q.a, c.taken - (sum(q.a) over (partition by q.pool order by q.o) - q.a)))::bigint
               as amount
        from parts q
        join (values ('promotional', -p_spend.promotional), ('subscription', -p_spend.subscription),
                     ('purchased', -p_spend.purchased)) c(pool, taken) on c.pool = q.pool
    ), named as (
      select case when g.id is not null then g.source else 'reset' end as source, g.stripe_ref, c.amount,
             c.pool, c.o
        from charged c left join private.grants g on g.id = c.g
       where c.amount > 0
    )
    select n.source, n.stripe_ref, n.amount from named n
    union all
    -- What no part explains (a hold made before holds named their grants).
    select 'refund', null, (-(p_spend.promotional + p_spend.subscription + p_spend.purchased)
                            - coalesce((select sum(n.amount) from named n), 0))::bigint
     where -(p_spend.promotional + p_spend.subscription + p_spend.purchased)
           > coalesce((select sum(n.amount) from named n), 0);
    return;
  end if;
  foreach v_pool in array array['promotional', 'subscription', 'purchased'] loop
    v_taken := -case v_pool when 'promotional' then p_spend.promotional when 'subscription' then p_spend.subscription
                            else p_spend.purchased end;
    continue when v_taken <= 0;
    v_before := case v_pool when 'promotional' then p_spend.promotional_after
                            when 'subscription' then p_spend.subscription_after
                            else p_spend.purchased_after end + v_taken;
    return query
    with g as (
      -- Each grant as it stood then: less what clawbacks had taken of it, plus
      -- what won disputes had given back.
      select q.source, q.stripe_ref,
             q.granted + coalesce((select sum(e.value::bigint * case c.kind when 'clawback' then -1 else 1 end)
                                     from public.credit_transactions c
                                    cross join lateral jsonb_each_text(
                                      case when jsonb_typeof(c.outcome -> 'grants') = 'object'
                                           then c.outcome -> 'grants' else '{}'::jsonb end) e
                                    where q.stripe_ref is not null and c.stripe_ref = q.stripe_ref
                                      and c.account_id = p_spend.account_id and c.seq < p_spend.seq
                                      and c.kind in ('clawback', 'reinstate') and e.key = q.id::text), 0)
               as granted,
             q.expires_at, q.created_at, q.id
        from private.grants q
       where q.account_id = p_spend.account_id and q.pool = v_pool and q.created_at <= p_spend.created_at
         and case v_pool when 'promotional' then q.expires_at > p_spend.created_at
                         when 'subscription' then q.expires_at = p_spend.period_end
                         else true end
      union all
      -- A calendar allowance of the spend's period (its ledger row).
      select 'reset', null, t.subscription, t.period_end, t.created_at, t.id
        from public.credit_transactions t
       where v_pool = 'subscription' and t.account_id = p_spend.account_id and t.kind = 'grant'
         and t.origin = 'system' and t.stripe_ref is null and t.period_start = p_spend.period_start
         and t.seq < p_spend.seq and t.subscription > 0
    ), placed as (
      select g.source, g.stripe_ref,
             sum(g.granted) over (order by g.expires_at nulls last, g.created_at, g.id) as cum, g.granted,
             sum(g.granted) over () - v_before as start
        from g
    ), parts as (
      select p.source, p.stripe_ref,
             greatest(0, least(p.cum, p.start + v_taken) - greatest(p.cum - p.granted, p.start))::bigint as amount
        from placed p
    )
    select p.source, p.stripe_ref, p.amount from parts p where p.amount > 0
    union all
    select 'refund', null, v_taken - coalesce((select sum(p.amount) from parts p), 0)::bigint
     where v_taken > coalesce((select sum(p.amount) from parts p), 0);
  end loop;
end
$$;

create function private.refund_credits(p_transaction_id uuid, p_idempotency_key text, p_amount integer default null,
                                      p_reason text default null) returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_spend public.credit_transactions;
  v_hash uuid;
  v_entry public.credit_transactions;
  v_refundable bigint;
  v_done bigint;
  v_amount bigint;
  v_wallet public.credit_wallets;
begin
  perform private.require_service();
  perform private.check_key(p_idempotency_key);
  perform private.check_text('p_reason', p_reason, 'reason');
  if p_amount is not null then
    perform private.check_amount('p_amount', p_amount);
  end if;
  select * into v_spend from public.credit_transactions t where t.id = p_transaction_id and t.kind = 'spend';
  if not found then
    perform private.fail('PT404', 'transaction_not_found');
  end if;
  v_hash := private.request_hash('refund', jsonb_build_array(p_transaction_id, p_amount, p_reason));
  v_wallet := private.lock_wallet(v_spend.account_id);
  v_entry := private.find_key(v_spend.account_id, p_idempotency_key, v_hash);
  if v_entry.id is not null then
    return private.result(v_entry, true);
  end if;
  -- Under the wallet's lock: refunds of one spend queue here.
  select coalesce(sum(r.purchased), 0) into v_done
    from public.credit_transactions r where r.ref_id = p_transaction_id and r.kind = 'refund';
  -- What the spend charged: its credits, and the debt a capture above its hold added.
  v_refundable := -(v_spend.promotional + v_spend.subscription + v_spend.purchased) - v_done
                  + coalesce((select sum(o.debt) from public.credit_transactions o
                               where v_spend.ref_id is not null and o.ref_id = v_spend.ref_id
                                 and o.account_id = v_spend.account_id and o.kind = 'overdraft'), 0);
  v_amount := coalesce(p_amount, v_refundable);
  if v_amount < 1 then
    perform private.invalid('p_transaction_id', 'nothing left to refund');
  end if;
  if v_amount > v_refundable then
    perform private.fail('22023', 'invalid_argument',
      jsonb_build_object('argument', 'p_amount', 'reason', 'exceeds what is left to refund',
                         'refundable', v_refundable));
  end if;
  v_entry := private.post(v_spend.account_id, 'refund', p_purchased => v_amount, p_key => p_idempotency_key,
                          p_hash => v_hash, p_ref_id => p_transaction_id, p_description => p_reason,
                          p_metadata => jsonb_build_object('refund_of', p_transaction_id, 'reason', p_reason));
  -- Its grants keep where the spend's credits came from (a later clawback of
  -- that payment reaches them): earlier refunds of the spend gave back its
  -- first credits, this one the next.
  insert into private.grants (id, account_id, pool, source, stripe_ref, transaction_id, granted, remaining, carried)
  select private.uuid_v7(), v_spend.account_id, 'purchased', p.source, p.stripe_ref, v_entry.id, p.amount,
         p.amount, true
    from (select s.source, s.stripe_ref,
                 greatest(0, least(s.cum, v_done + v_amount) - greatest(s.cum - s.amount, v_done))::bigint as amount
            from (select s.source, s.stripe_ref, s.amount, sum(s.amount) over (order by s.ord) as cum
                    from private.spend_sources(v_spend) with ordinality s(source, stripe_ref, amount, ord)) s) p
   where p.amount > 0;
  -- A spend counts against its spender's limits net of its refunds.
  if v_wallet.limited then
    perform private.count_usage(v_wallet, coalesce(v_spend.license_key_id, v_spend.actor_id), -v_amount, 0,
                                v_spend.created_at);
  end if;
  perform private.settle_debt(v_spend.account_id, v_entry.id);
  return private.result(v_entry, false);
end
$$;

create function public.refund_credits(p_transaction_id uuid, p_idempotency_key text, p_amount integer default null,
                                      p_reason text default null)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.refund_credits(p_transaction_id, p_idempotency_key, p_amount, p_reason);
end
$$;
comment on function public.refund_credits(uuid, text, integer, text) is
  'Service: give back (part of) a spend into the purchased pool. {transaction_id, refunded, replayed, balance}.';

-- A payment's grants: the account, the pool of its first grant, and how many
-- credits it granted (null when it has no grant; a rollover or a refund
-- carrying its reference grants nothing new).
create function private.payment_grants(p_stripe_ref text, out account_id uuid, out pool text, out granted bigint)
language sql stable
set search_path = pg_catalog, pg_temp
as $$
  select (array_agg(g.account_id order by g.id))[1], (array_agg(g.pool order by g.id))[1],
         case when count(*) > 0 then coalesce(sum(g.granted) filter (where not g.carried), 0) end::bigint
    from private.grants g
   where g.stripe_ref = p_stripe_ref
$$;

-- Take back what a payment granted (cumulative p_amount; default all).
create function private.clawback(p_stripe_ref text, p_key text, p_amount integer, p_reason text,
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
  v_pool text;
  v_grant record;
  v_take bigint;
  v_taken jsonb := '{}'::jsonb;
  v_by_pool jsonb := '{"promotional": 0, "subscription": 0, "purchased": 0}'::jsonb;
  v_total bigint := 0;
  v_claimed bigint := 0;
  v_hold record;
  v_claim bigint;
  v_part jsonb;
  v_debt bigint := 0;
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
  select coalesce(-sum(t.promotional + t.subscription + t.purchased) + sum(t.debt), 0) into v_done
    from public.credit_transactions t
   where t.stripe_ref = p_stripe_ref and t.account_id = v_grants.account_id
     and t.kind in ('clawback', 'reinstate');
  select v_done + coalesce(sum((c ->> 'amount')::bigint), 0) into v_done
    from public.credit_holds h cross join lateral jsonb_array_elements(h.claims) c
   where h.account_id = v_grants.account_id and h.status = 'active' and c ->> 'stripe_ref' = p_stripe_ref;
  v_outstanding := greatest(least(coalesce(p_amount, v_grants.granted), v_grants.granted) - v_done, 0);

  -- What is left of the payment's own grants, never another's, in the
  -- spending order: the free credits are taken now.
  foreach v_pool in array array['promotional', 'subscription', 'purchased'] loop
    exit when v_outstanding - v_total <= 0;
    continue when not exists (select 1 from private.grants g where g.account_id = v_grants.account_id
                                and g.stripe_ref = p_stripe_ref and g.pool = v_pool and g.remaining > 0);
    v_wallet := private.materialize_grants(v_wallet, v_pool);
    for v_grant in select a.id, a.attributed as free
                     from private.grant_attribution(v_wallet, v_pool) a
                     join private.grants g on g.id = a.id
                    where g.stripe_ref = p_stripe_ref
                    order by a.expires_at nulls last, a.created_at, a.id loop
      v_take := least(v_outstanding - v_total, v_grant.free);
      continue when v_take <= 0;
      update private.grants g set remaining = g.remaining - v_take where g.id = v_grant.id;
      v_taken := v_taken || jsonb_build_object(v_grant.id::text, v_take);
      v_by_pool := jsonb_set(v_by_pool, array[v_pool], to_jsonb((v_by_pool ->> v_pool)::bigint + v_take));
      v_total := v_total + v_take;
    end loop;
  end loop;

  -- What active holds reserve of those grants (the parts naming them, less
  -- what earlier clawbacks claimed of them) is claimed on those holds,
  -- soonest-ending first, and taken when each ends.
  if v_outstanding > v_total then
    for v_hold in select h.id, h.parts, h.claims from public.credit_holds h
                   where h.account_id = v_grants.account_id and h.status = 'active'
                   order by h.expires_at, h.id loop
      exit when v_outstanding - v_total - v_claimed <= 0;
      for v_part in select e from jsonb_array_elements(v_hold.parts) e
                     where exists (select 1 from private.grants g
                                    where g.id = (e ->> 'g')::uuid and g.stripe_ref = p_stripe_ref) loop
        v_claim := least((v_part ->> 'a')::bigint
                         - (select coalesce(sum((c ->> 'amount')::bigint), 0) from jsonb_array_elements(v_hold.claims) c
                             where c ->> 'g' = v_part ->> 'g'),
                         v_outstanding - v_total - v_claimed);
        continue when v_claim <= 0;
        v_hold.claims := v_hold.claims || jsonb_build_array(jsonb_build_object(
          'pool', coalesce(v_part ->> 'p', 'promotional'), 'g', v_part ->> 'g', 'amount', v_claim,
          'stripe_ref', p_stripe_ref, 'key', p_key));
        v_claimed := v_claimed + v_claim;
      end loop;
      update public.credit_holds h set claims = v_hold.claims where h.id = v_hold.id;
    end loop;
  end if;
  -- A refund or dispute on the account pauses its auto top-up (the auto top-up chapter).
  perform private.pause_topup(v_grants.account_id, coalesce(p_reason, 'clawback'));
  -- Of what was spent, the part that paid debt is owed again (not a shortfall).
  if v_outstanding - v_total - v_claimed > 0 then
    v_debt := least(v_outstanding - v_total - v_claimed, private.debt_paid_by(v_grants.account_id, p_stripe_ref));
  end if;
  v_entry := private.post(
    v_grants.account_id, 'clawback',
    p_promotional => -(v_by_pool ->> 'promotional')::bigint,
    p_subscription => -(v_by_pool ->> 'subscription')::bigint,
    p_purchased => -(v_by_pool ->> 'purchased')::bigint,
    p_origin => p_origin, p_key => p_key, p_hash => v_hash, p_stripe_ref => p_stripe_ref,
    p_description => p_reason,
    p_metadata => jsonb_build_object('reason', p_reason), p_debt => v_debt,
    p_outcome => jsonb_build_object('pending', v_claimed,
                                    'shortfall', v_outstanding - v_total - v_claimed - v_debt,
                                    'grants', v_taken, 'debt', v_debt));
  return private.result(v_entry, false);
end
$$;

create function private.clawback_credits(p_stripe_ref text, p_idempotency_key text, p_amount integer default null,
                                        p_reason text default null)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.clawback(p_stripe_ref, p_idempotency_key, p_amount, p_reason, 'api');
end
$$;

create function public.clawback_credits(p_stripe_ref text, p_idempotency_key text, p_amount integer default null,
                                        p_reason text default null)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.clawback_credits(p_stripe_ref, p_idempotency_key, p_amount, p_reason);
end
$$;
comment on function public.clawback_credits(text, text, integer, text) is
  'Service: take back what a Stripe payment granted (cumulative amount). {clawed_back, shortfall, pending, ...}.';

create function private.admin_adjust_credits(p_account_id uuid, p_pool text, p_amount integer, p_reason text,
                                            p_idempotency_key text) returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_hash uuid;
  v_wallet public.credit_wallets;
  v_entry public.credit_transactions;
  v_free bigint;
begin
  perform private.require_service();
  perform private.authorize(p_account_id, true);
  if p_pool is null or p_pool not in ('promotional', 'subscription', 'purchased', 'debt') then
    perform private.invalid('p_pool', 'must be promotional, subscription, purchased or debt');
  end if;
  if p_amount is null or p_amount = 0 or abs(p_amount::bigint) > (private.limits() ->> 'amount')::bigint then
    perform private.invalid('p_amount', 'must be a non-zero whole number from -1000000000 to 1000000000');
  end if;
  if p_pool = 'debt' and p_amount > 0 then
    perform private.invalid('p_amount', 'debt is only written off (a negative amount)');
  end if;
  if p_pool = 'promotional' and p_amount > 0 then
    perform private.invalid('p_pool', 'promotional credits are granted with an expiry (grant_promotional_credits)');
  end if;
  if p_reason is null or length(btrim(p_reason)) = 0 then
    perform private.check_text('p_reason', null, 'reason', true);
  end if;
  perform private.check_text('p_reason', p_reason, 'reason', true);
  perform private.check_key(p_idempotency_key);
  v_hash := private.request_hash('adjust', jsonb_build_array(p_pool, p_amount, p_reason));
  v_wallet := private.lock_wallet(p_account_id);
  v_entry := private.find_key(p_account_id, p_idempotency_key, v_hash);
  if v_entry.id is not null then
    return private.result(v_entry, true);
  end if;
  v_free := case p_pool when 'promotional' then v_wallet.promotional - v_wallet.held_promotional
                        when 'subscription' then v_wallet.subscription - v_wallet.held_subscription
                        when 'debt' then v_wallet.debt
                        else v_wallet.purchased - v_wallet.held_purchased end;
  if p_amount < 0 and v_free < -p_amount then
    perform private.insufficient(-p_amount, v_free);
  end if;
  v_entry := private.post(p_account_id, 'adjustment',
                          p_promotional => case when p_pool = 'promotional' then p_amount else 0 end,
                          p_subscription => case when p_pool = 'subscription' then p_amount else 0 end,
                          p_purchased => case when p_pool = 'purchased' then p_amount else 0 end,
                          p_debt => case when p_pool = 'debt' then p_amount else 0 end,
                          p_key => p_idempotency_key, p_hash => v_hash, p_description => p_reason,
                          p_metadata => jsonb_build_object('reason', p_reason));
  if p_amount > 0 then
    perform private.settle_debt(p_account_id, v_entry.id);
  end if;
  return private.result(v_entry, false);
end
$$;

create function public.admin_adjust_credits(p_account_id uuid, p_pool text, p_amount integer, p_reason text,
                                            p_idempotency_key text)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.admin_adjust_credits(p_account_id, p_pool, p_amount, p_reason, p_idempotency_key);
end
$$;
comment on function public.admin_adjust_credits(uuid, text, integer, text, text) is
  'Service: signed adjustment of one pool (a decrease takes free credits only). {transaction_id, replayed, balance}.';

-- ---------------------------------------------------------------------------
-- Checking the books.
-- ---------------------------------------------------------------------------

create function private.reconcile_credit_balances() returns jsonb
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$
  with sums as (
    select t.account_id, sum(t.promotional)::bigint as promotional, sum(t.subscription)::bigint as subscription,
           sum(t.purchased)::bigint as purchased, sum(t.debt)::bigint as debt
      from public.credit_transactions t group by t.account_id
  ), holds as (
    select h.account_id, sum(h.promotional)::bigint as promotional, sum(h.subscription)::bigint as subscription,
           sum(h.purchased)::bigint as purchased
      from public.credit_holds h where h.status = 'active' group by h.account_id
  ), granted as (
    -- What the grants have left of the free credits (every credit belongs to one).
    select w.account_id,
           coalesce(sum(a.attributed) filter (where p.pool = 'promotional'), 0)::bigint as promotional,
           coalesce(sum(a.attributed) filter (where p.pool = 'subscription'), 0)::bigint as subscription,
           coalesce(sum(a.attributed) filter (where p.pool = 'purchased'), 0)::bigint as purchased
      from public.credit_wallets w
     cross join lateral (values ('promotional'), ('subscription'), ('purchased')) p(pool)
     cross join lateral private.grant_attribution(w, p.pool) a
     group by w.account_id
  ), checks as (
    select w.account_id, v.pool, v.balance, coalesce(v.expected, 0) as expected
      from public.credit_wallets w
      left join sums s on s.account_id = w.account_id
      left join holds h on h.account_id = w.account_id
      left join granted g on g.account_id = w.account_id
     cross join lateral (values ('promotional', w.promotional, s.promotional),
                                ('subscription', w.subscription, s.subscription),
                                ('purchased', w.purchased, s.purchased),
                                ('debt', w.debt, s.debt),
                                -- Debt is paid as soon as there are free credits.
                                ('debt_unpaid', least(w.debt, w.promotional - w.held_promotional
                                                              + w.subscription - w.held_subscription
                                                              + w.purchased - w.held_purchased), 0),
                                ('held_promotional', w.held_promotional, h.promotional),
                                ('held_subscription', w.held_subscription, h.subscription),
                                ('held_purchased', w.held_purchased, h.purchased),
                                -- Free credits (the pool less what is held) against their grants.
                                ('grants_promotional', w.promotional - w.held_promotional, g.promotional),
                                ('grants_subscription', w.subscription - w.held_subscription, g.subscription),
                                ('grants_purchased', w.purchased - w.held_purchased, g.purchased))
                          v(pool, balance, expected)
  )
  select jsonb_build_object(
    'checked', count(*),
    'mismatches', coalesce(jsonb_agg(jsonb_build_object('account_id', c.account_id, 'pool', c.pool,
                                                        'balance', c.balance, 'ledger', c.expected))
                           filter (where c.balance <> c.expected), '[]'::jsonb))
  from checks c
$$;

create function public.reconcile_credit_balances()
returns jsonb
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.reconcile_credit_balances();
end
$$;
comment on function public.reconcile_credit_balances() is
  'Service: every account/pool whose balance differs from its ledger or its grants, and held counters from active holds.';

revoke all on function public.refund_credits(uuid, text, integer, text),
  private.spend_sources(public.credit_transactions), private.payment_grants(text), private.clawback(text, text, integer, text, private.entry_origin),
  public.clawback_credits(text, text, integer, text),
  public.admin_adjust_credits(uuid, text, integer, text, text), public.reconcile_credit_balances()
  from public, anon, authenticated, service_role;
grant execute on function public.refund_credits(uuid, text, integer, text),
  public.clawback_credits(text, text, integer, text),
  public.admin_adjust_credits(uuid, text, integer, text, text), public.reconcile_credit_balances()
  to service_role;

-- The definer code behind the public entry points.
revoke all on function private.refund_credits(uuid, text, integer, text) from public, anon, authenticated, service_role;
grant execute on function private.refund_credits(uuid, text, integer, text) to service_role;
revoke all on function private.clawback_credits(text, text, integer, text) from public, anon, authenticated, service_role;
grant execute on function private.clawback_credits(text, text, integer, text) to service_role;
revoke all on function private.admin_adjust_credits(uuid, text, integer, text, text) from public, anon, authenticated, service_role;
grant execute on function private.admin_adjust_credits(uuid, text, integer, text, text) to service_role;
revoke all on function private.reconcile_credit_balances() from public, anon, authenticated, service_role;
grant execute on function private.reconcile_credit_balances() to service_role;
