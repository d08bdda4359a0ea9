-- Refunds and adjustments: giving back, taking back, correcting (service only).
--
-- Holds refund_credits, clawback_credits, admin_adjust_credits, the private
-- functions the Stripe chapter shares with them, and
-- reconcile_credit_balances (every balance against its ledger).
--
-- Rules:
--   * Every one of them appends a row; nothing updates an earlier row. What
--     was refunded of a spend is the sum of the refund rows pointing at it;
--     what was clawed back of a payment, the sum of its clawback rows.
--   * A refund gives back (part of) a spend into the purchased pool, never
--     more than was spent minus earlier refunds.
--   * A clawback takes back what a Stripe payment granted, from what is left
--     of its own grants, never below zero and never from held credits now:
--     of its promotional grants, what they have left (spends took the
--     soonest-expiring first); of a subscription grant, only while its period
--     is the current one (an earlier period's credits expired at the
--     renewal); of its purchased grant, what is left of it (purchased
--     credits are spent oldest first, so the free ones belong to the newest
--     grants). What active holds reserve of those credits (per grant for
--     promotional ones, of the current period for subscription ones) is
--     claimed on the holds and taken when each ends
--     (if it is captured, those credits were spent). What is neither free nor
--     held is the shortfall. The amount is cumulative per payment (Stripe
--     reports refunds so), so only what was not yet taken or claimed is taken
--     now.
--   * An adjustment changes one pool by a signed amount; a decrease takes
--     free credits only (insufficient_credits otherwise); promotional credits
--     are only decreased here (they are granted with an expiry, by
--     grant_promotional_credits).

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
  v_amount bigint;
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
  perform private.lock_wallet(v_spend.account_id);
  v_entry := private.find_key(v_spend.account_id, p_idempotency_key, v_hash);
  if v_entry.id is not null then
    return private.result(v_entry, true);
  end if;
  -- Under the wallet's lock: refunds of one spend queue here.
  select -(v_spend.promotional + v_spend.subscription + v_spend.purchased) - coalesce(sum(r.purchased), 0)
    into v_refundable
    from public.credit_transactions r where r.ref_id = p_transaction_id and r.kind = 'refund';
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

-- The pool a payment's credits went into and how many it granted.
create function private.payment_grants(p_stripe_ref text, out account_id uuid, out pool text, out granted bigint)
language sql stable
set search_path = pg_catalog, pg_temp
as $$
  select (array_agg(t.account_id order by t.seq))[1],
         (array_agg(case when t.purchased > 0 then 'purchased' when t.subscription > 0 then 'subscription'
                         else 'promotional' end order by t.seq))[1],
         sum(t.purchased + t.subscription + t.promotional)::bigint
    from public.credit_transactions t
   where t.stripe_ref = p_stripe_ref and t.kind in ('purchase', 'grant', 'promotion')
     and t.purchased + t.subscription + t.promotional > 0
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
  if p_pool is null or p_pool not in ('promotional', 'subscription', 'purchased') then
    perform private.invalid('p_pool', 'must be promotional, subscription or purchased');
  end if;
  if p_amount is null or p_amount = 0 or abs(p_amount::bigint) > (private.limits() ->> 'amount')::bigint then
    perform private.invalid('p_amount', 'must be a non-zero whole number from -1000000000 to 1000000000');
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
                        else v_wallet.purchased - v_wallet.held_purchased end;
  if p_amount < 0 and v_free < -p_amount then
    perform private.insufficient(-p_amount, v_free);
  end if;
  v_entry := private.post(p_account_id, 'adjustment',
                          p_promotional => case when p_pool = 'promotional' then p_amount else 0 end,
                          p_subscription => case when p_pool = 'subscription' then p_amount else 0 end,
                          p_purchased => case when p_pool = 'purchased' then p_amount else 0 end,
                          p_key => p_idempotency_key, p_hash => v_hash, p_description => p_reason,
                          p_metadata => jsonb_build_object('reason', p_reason));
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
           sum(t.purchased)::bigint as purchased
      from public.credit_transactions t group by t.account_id
  ), holds as (
    select h.account_id, sum(h.promotional)::bigint as promotional, sum(h.subscription)::bigint as subscription,
           sum(h.purchased)::bigint as purchased
      from public.credit_holds h where h.status = 'active' group by h.account_id
  ), checks as (
    select w.account_id, v.pool, v.balance, coalesce(v.expected, 0) as expected
      from public.credit_wallets w
      left join sums s on s.account_id = w.account_id
      left join holds h on h.account_id = w.account_id
     cross join lateral (values ('promotional', w.promotional, s.promotional),
                                ('subscription', w.subscription, s.subscription),
                                ('purchased', w.purchased, s.purchased),
                                ('held_promotional', w.held_promotional, h.promotional),
                                ('held_subscription', w.held_subscription, h.subscription),
                                ('held_purchased', w.held_purchased, h.purchased)) v(pool, balance, expected)
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
  'Service: every account/pool whose balance differs from its ledger, and held counters from active holds.';

revoke all on function public.refund_credits(uuid, text, integer, text),
  private.payment_grants(text), private.clawback(text, text, integer, text, private.entry_origin),
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
