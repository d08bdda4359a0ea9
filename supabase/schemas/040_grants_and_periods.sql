-- Grants and periods: how credits come in and how they run out.
--
-- Holds:
--   * private.grants: every arrival of credits (a grant) with its pool, its
--     source, its Stripe reference, its amount and its expiry (the
--     credit_grants view, in the spending chapter, lists them with what is
--     left of each now);
--   * the attribution of spent credits to grants, the renewal of a
--     subscription period (one set-based statement for one account or a
--     reset batch), opening an account;
--   * add_purchased_credits, add_subscription_credits,
--     expire_subscription_credits, grant_promotional_credits.
--
-- Rules:
--   * Every credit belongs to a grant; a pool is the sum of what its grants
--     have left (reconcile_credit_balances checks it). Within a pool, credits
--     are spent soonest expiry first, then oldest grant first (promotional
--     before subscription before purchased: private.spend_split, in the holds
--     chapter).
--   * A spend never walks grant rows. A grant's stored `remaining` is what
--     was left of it at its pool's last attribution; spends since then took
--     from the front of the spending order, so what is left now belongs to
--     the grants at its back (private.grant_attribution). The attribution is
--     written (private.materialize_grants) only when a grant's own credits
--     matter: a grant joining ahead of others, an expiry, a clawback or its
--     reversal, a hold taking or returning credits.
--   * A grant's stored `remaining` counts its free credits: a hold takes its
--     credits from the front grants of each pool (private.take_front) and
--     names them (credit_holds.parts); when it ends, what it releases goes
--     back to those grants.
--   * A calendar month's allowance (the monthly reset's, or a new account's
--     first month: no payment behind it, so nothing ever takes it back) is the
--     one grant without a row: its ledger row is its record, the wallet's
--     period_grant names it while it is the current period's, and the reset
--     writes nothing more per account. credit_grants lists it while current;
--     earlier ones are in the ledger and credit_pool_usage.
--   * A subscription grant belongs to its period (the wallet's sub_epoch):
--     a renewal or an explicit expiry moves the epoch on, and the earlier
--     grants have nothing left (their free credits were written off as the
--     expiry or the rollover).
--   * Each promotional grant expires on its own date whether or not a job
--     runs: reads never count expired credits, and the next write to the
--     account writes the expiry (one ledger row per grant).
--   * A renewal (a Stripe invoice or the monthly reset) moves up to the plan's
--     rollover_cap of unused allowance into a promotional grant (source
--     rollover, with the reference of the grant its credits are left of)
--     that expires at the end of the new period, expires the rest of the free
--     allowance, and grants the new one. Rolled-over credits are
--     promotional, so they never roll again. Subscription credits under a
--     hold expire when the hold ends uncaptured (the wallet's sub_epoch moves
--     on).
--   * A new user's account starts on `free` with its first month's allowance
--     and the free plan's signup_bonus as a promotional grant, once per
--     identity: the e-mail address (lower-cased, trimmed), else the phone
--     number. A salted hash of it is kept after the user is deleted
--     (private.signup_bonus_claims), so deleting and signing up again grants
--     nothing more; an anonymous user gets it when an identity is first set.

-- A grant's pool and source. Domains, not table CHECKs: a table CHECK is
-- prepared again by every statement that updates the row (each hold taking
-- or returning credits updates its grants); a domain's check runs on the
-- value alone, when one is written.
create domain private.pool_name as text check (value in ('promotional', 'subscription', 'purchased'));
create domain private.grant_source_name as text
  check (value in ('invoice', 'checkout', 'topup', 'reset', 'signup_bonus', 'promotion', 'rollover', 'plan_change',
                   'refund', 'adjustment'));

-- Like the ledger's rows, a grant references its account without a foreign
-- key (only definer code inserts, under the wallet's lock; the monthly reset
-- inserts one per account renewed): the ledger chapter's
-- private.delete_account_books is the ON DELETE CASCADE.
create table private.grants (
  id uuid primary key,
  account_id uuid not null,
  pool private.pool_name not null,
  source private.grant_source_name not null,
  stripe_ref text,
  -- The ledger row that brought the credits (null: credits an account held
  -- before grants were recorded, whose arrival is no single row).
  transaction_id uuid,
  granted bigint not null check (granted >= 0),
  -- Promotional: its own date; subscription: its period's end; purchased: none.
  expires_at timestamptz,
  -- Subscription: the wallet's sub_epoch of its period (a later epoch ended it).
  epoch integer,
  -- Left as of the pool's last attribution (see the header).
  remaining bigint not null check (remaining >= 0),
  -- It carries the source and Stripe reference of the credits it came from
  -- (a rollover, a refund of a spend): that payment did not grant it.
  carried boolean not null default false,
  created_at timestamptz not null default now()
-- fillfactor 70 and no index on `remaining`: a hold's taking and returning
-- rewrite the row in place (HOT).
) with (fillfactor = 70);
create index grants_account_idx on private.grants (account_id, pool, expires_at, id);
create index grants_stripe_ref_idx on private.grants (stripe_ref) where stripe_ref is not null;
comment on table private.grants is
  'Every arrival of credits; what is left of each is public.credit_grants.remaining.';

alter table private.grants enable row level security;
revoke all on private.grants from public, anon, authenticated, service_role;
grant select on private.grants to authenticated, service_role;
create policy grants_read on private.grants for select to authenticated
  using (account_id in (select private.readable_account_ids()) or (select private.is_super_admin()));

-- The source of a grant that post() records (renewals and promotions name theirs).
create function private.grant_source(p_kind private.entry_kind, p_origin private.entry_origin, p_stripe_ref text)
returns text
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
begin
  return case
    when p_kind in ('refund', 'adjustment', 'plan_change') then p_kind::text
    when p_stripe_ref like 'in\_%' then 'invoice'
    when p_kind = 'grant' and (p_stripe_ref is not null or p_origin = 'stripe') then 'invoice'
    when p_kind = 'grant' and p_origin = 'system' then 'reset'
    when p_kind = 'purchase' and (p_origin = 'stripe' or p_stripe_ref is not null) then 'checkout'
    else 'adjustment' end;
end
$$;

-- ---------------------------------------------------------------------------
-- Attribution: what is left of each of a pool's live grants, given the free
-- credits the pool has now (spending order: soonest expiry, then oldest
-- grant). Spends took from the front of the spending order, so the free
-- credits belong to its back: each grant keeps the part of them that falls
-- on it counting from the back, up to its stored remaining. The calendar
-- allowance (no row, see the header) is the front of its period's grants.
-- ---------------------------------------------------------------------------

-- (rows 4: a pool has a few live grants; the planner then joins them to grant
-- rows by their key instead of scanning the table.)
create function private.grant_attribution(p_wallet public.credit_wallets, p_pool text)
returns table (id uuid, expires_at timestamptz, created_at timestamptz, remaining bigint, attributed bigint)
language plpgsql stable rows 4
set search_path = pg_catalog, pg_temp
as $$
declare
  v_free bigint := case p_pool when 'promotional' then p_wallet.promotional - p_wallet.held_promotional
                               when 'subscription' then p_wallet.subscription - p_wallet.held_subscription
                               else p_wallet.purchased - p_wallet.held_purchased end;
begin
  return query
  select g.id, g.expires_at, g.created_at, g.remaining,
         greatest(0, least(g.remaining, g.cum - (g.total - v_free)))::bigint
    from (select p.id, p.expires_at, p.created_at, p.remaining,
                 sum(p.remaining) over (order by p.expires_at nulls last, p.created_at, p.id) as cum,
                 sum(p.remaining) over () as total
            from (select p.id, p.expires_at, p.created_at, p.remaining
                    from private.grants p
                   where p.account_id = p_wallet.account_id and p.pool = p_pool and p.remaining > 0
                     and (p_pool <> 'subscription' or p.epoch = p_wallet.sub_epoch)
                  union all
                  -- The calendar allowance, from its ledger row.
                  select t.id, t.period_end, t.created_at, t.subscription
                    from public.credit_transactions t
                   where p_pool = 'subscription' and t.id = p_wallet.period_grant
                     and t.subscription > 0) p) g;
end
$$;

-- Write a pool's attribution to its grants (the caller holds the wallet's
-- lock); for the promotional pool, also refresh the wallet's soonest-expiry
-- cache. Credits without a grant are a bug, never a state to keep.
create function private.materialize_grants(p_wallet public.credit_wallets, p_pool text default 'promotional')
returns public.credit_wallets
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_wallet public.credit_wallets := p_wallet;
  v_short boolean;
begin
  with a as (
    select * from private.grant_attribution(p_wallet, p_pool)
  ), written as (
    update private.grants p set remaining = a.attributed
      from a where p.id = a.id and p.remaining <> a.attributed
  )
  select coalesce(sum(a.remaining), 0) < case p_pool
           when 'promotional' then p_wallet.promotional - p_wallet.held_promotional
           when 'subscription' then p_wallet.subscription - p_wallet.held_subscription
           else p_wallet.purchased - p_wallet.held_purchased end
    into v_short from a;
  if v_short then
    raise exception using errcode = 'XX000', message = p_pool || ' credits without a grant';
  end if;
  if p_pool = 'promotional' then
    update public.credit_wallets w
       set promo_front_at = f.at, promo_front_left = coalesce(f.amount, 0)
      from (select null::int as one) x
      left join lateral (
        select p.expires_at as at, sum(p.remaining)::bigint as amount
          from private.grants p
         where p.account_id = p_wallet.account_id and p.pool = 'promotional' and p.remaining > 0
         group by p.expires_at order by p.expires_at limit 1) f on true
     where w.account_id = p_wallet.account_id
    returning w.* into v_wallet;
  end if;
  return v_wallet;
end
$$;

-- A hold's credits of one pool: p_amount free credits from the front of the
-- pool's grants (the caller holds the wallet's lock and has checked they
-- are there). The grants' stored remaining drops by what is taken (the
-- wallet's held counter rises by the same amount in the caller's post);
-- returns the parts, [{"p": pool, "g": grant, "a": credits, "e": expiry}].
-- The attribution is private.grant_attribution's (what the pool's spends
-- took comes off the front of the spending order), walked row by row and
-- stopped once past what is taken: a pool has a few live grants, and this
-- runs on every reserve (the set query with windows it replaced cost about
-- 150k instructions more per reserve).
create function private.take_front(p_wallet public.credit_wallets, p_pool text, p_amount bigint)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_free bigint := case p_pool when 'promotional' then p_wallet.promotional - p_wallet.held_promotional
                               when 'subscription' then p_wallet.subscription - p_wallet.held_subscription
                               else p_wallet.purchased - p_wallet.held_purchased end;
  v_ids uuid[];
  v_expires timestamptz[];
  v_remaining bigint[];
  v_total bigint;
  v_cum bigint := 0;
  v_attributed bigint;
  v_take bigint;
  v_left bigint := p_amount;
  v_parts jsonb := '[]'::jsonb;
begin
  if p_amount <= 0 then
    return '[]'::jsonb;
  end if;
  -- The pool's live grants in spending order (the calendar allowance, which
  -- has no row, only in the subscription pool), in one aggregate.
  if p_pool = 'subscription' then
    select array_agg(g.id order by g.expires_at nulls last, g.created_at, g.id),
           array_agg(g.expires_at order by g.expires_at nulls last, g.created_at, g.id),
           array_agg(g.remaining order by g.expires_at nulls last, g.created_at, g.id), coalesce(sum(g.remaining), 0)
      into v_ids, v_expires, v_remaining, v_total
      from (select p.id, p.expires_at, p.created_at, p.remaining from private.grants p
             where p.account_id = p_wallet.account_id and p.pool = 'subscription' and p.remaining > 0
               and p.epoch = p_wallet.sub_epoch
            union all
            select t.id, t.period_end, t.created_at, t.subscription from public.credit_transactions t
             where t.id = p_wallet.period_grant and t.subscription > 0) g;
  else
    select array_agg(p.id order by p.expires_at nulls last, p.created_at, p.id),
           array_agg(p.expires_at order by p.expires_at nulls last, p.created_at, p.id),
           array_agg(p.remaining order by p.expires_at nulls last, p.created_at, p.id), coalesce(sum(p.remaining), 0)
      into v_ids, v_expires, v_remaining, v_total
      from private.grants p
     where p.account_id = p_wallet.account_id and p.pool = p_pool and p.remaining > 0;
  end if;
  if v_total < v_free then
    raise exception using errcode = 'XX000', message = p_pool || ' credits without a grant';
  end if;
  for i in 1 .. coalesce(array_length(v_ids, 1), 0) loop
    -- What is free of this grant: its credits past the pool's spent front.
    v_attributed := greatest(0, least(v_remaining[i], v_cum + v_remaining[i] - (v_total - v_free)));
    v_cum := v_cum + v_remaining[i];
    v_take := least(v_attributed, v_left);
    v_left := v_left - v_take;
    if v_remaining[i] <> v_attributed - v_take then
      -- (The calendar allowance's id is no grant's: nothing to write for it.)
      update private.grants p set remaining = v_attributed - v_take where p.id = v_ids[i];
    end if;
    if v_take > 0 then
      v_parts := v_parts || jsonb_build_array(jsonb_build_object('p', p_pool, 'g', v_ids[i], 'a', v_take,
                                                                 'e', v_expires[i]));
    end if;
    -- Past the spent front and what is taken, every grant keeps what it has.
    exit when v_left = 0 and v_cum >= v_total - v_free;
  end loop;
  return v_parts;
end
$$;

-- A promotional grant from p_source. The caller holds the wallet's lock.
create function private.add_promotion(
  p_wallet public.credit_wallets, p_kind private.entry_kind, p_amount bigint, p_expires_at timestamptz,
  p_origin private.entry_origin, p_key text, p_hash uuid, p_stripe_ref text, p_description text,
  p_metadata jsonb, p_actor uuid, p_source text)
returns public.credit_transactions
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_id uuid := private.uuid_v7();
begin
  -- Attribute earlier spends before a grant with an earlier expiry joins.
  perform private.materialize_grants(p_wallet);
  insert into private.grants (id, account_id, pool, source, stripe_ref, transaction_id, granted, expires_at,
                              remaining)
  values (v_id, p_wallet.account_id, 'promotional', p_source, p_stripe_ref, v_id, p_amount, p_expires_at,
          p_amount);
  return private.post(p_wallet.account_id, p_kind, p_promotional => p_amount, p_origin => p_origin,
                      p_key => p_key, p_hash => p_hash, p_ref_id => v_id, p_stripe_ref => p_stripe_ref,
                      p_description => p_description, p_metadata => p_metadata, p_actor => p_actor,
                      p_id => v_id);
end
$$;

revoke all on function private.grant_source(private.entry_kind, private.entry_origin, text),
  private.grant_attribution(public.credit_wallets, text),
  private.materialize_grants(public.credit_wallets, text),
  private.take_front(public.credit_wallets, text, bigint),
  private.add_promotion(public.credit_wallets, private.entry_kind, bigint, timestamptz, private.entry_origin,
                        text, uuid, text, text, jsonb, uuid, text)
  from public;


-- ---------------------------------------------------------------------------
-- Renewal: start a subscription period for a set of accounts (one for an
-- invoice, a batch for the monthly reset), in one statement. The caller holds
-- the wallets' locks (ascending account id), has swept them, and attributed
-- promotional spends on those with open grants (private.lock_wallet does
-- both). Accounts whose period starts after p_start are left alone (a late or
-- reordered grant changes nothing).
--
-- Per account: r = least(rollover cap, free allowance) becomes a promotional
-- grant expiring at the account's new period end; the rest of the free
-- allowance expires; the allowance is granted; sub_epoch moves on. Each
-- account has its own period end (p_ends): the monthly reset ends a month
-- renewed within a yearly Stripe payment no later than the paid period.
-- ---------------------------------------------------------------------------

create function private.renew_to(p_accounts uuid[], p_amounts bigint[], p_caps bigint[], p_ends timestamptz[],
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
           private.uuid_v7() as grant_id, private.uuid_v7() as roll_id, private.uuid_v7() as expire_id,
           -- A rollover keeps the Stripe reference of the grant its credits are
           -- left of: the period's last grant in the spending order that has
           -- any (spends took the front; the calendar allowance, no row and no
           -- reference, is the front).
           case when least(b.cap, w.subscription - w.held_subscription) > 0
                then (select g.stripe_ref from private.grants g
                       where g.account_id = w.account_id and g.pool = 'subscription' and g.epoch = w.sub_epoch
                         and g.remaining > 0
                       order by g.expires_at desc nulls first, g.created_at desc, g.id desc limit 1) end as roll_ref
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
           period_end = c.new_end,
           period_grant = case when p_origin = 'system' and p_stripe_ref is null then c.grant_id end
      from calc c
     where w.account_id = c.account_id
    returning w.*
  ), grants as (
    -- The new allowance (even of 0 credits: its payment is known; a calendar
    -- allowance has no row, see the header) and the rollover.
    insert into private.grants (id, account_id, pool, source, stripe_ref, transaction_id, granted, expires_at,
                                epoch, remaining, carried)
    select g.id, c.account_id, g.pool, g.source, g.ref, g.id, g.amount, c.new_end, g.epoch, g.amount,
           g.pool = 'promotional'
      from calc c
     cross join lateral (values
       (c.grant_id, 'subscription', (select private.grant_source('grant', p_origin, p_stripe_ref)), p_stripe_ref,
        c.new_amount, c.sub_epoch + 1),
       (c.roll_id, 'promotional', 'rollover', c.roll_ref, c.rolled, null)) g(id, pool, source, ref, amount, epoch)
     where (g.pool = 'subscription' and (p_origin <> 'system' or p_stripe_ref is not null))
        or (g.pool = 'promotional' and c.rolled > 0)
  ), entries as (
    insert into public.credit_transactions (
      id, account_id, kind, origin, idempotency_key, request_hash, promotional, subscription, purchased,
      promotional_after, subscription_after, purchased_after, held_after, period_start, period_end,
      next_expiry_amount, next_expiry_at, ref_id, stripe_ref, metadata, debt_after)
    select e.id, c.account_id, e.kind, e.origin, e.key, e.hash, e.d_promo, e.d_sub, 0,
           n.promotional, e.sub_after, n.purchased,
           n.held_promotional + n.held_subscription + n.held_purchased, e.pstart, e.pend,
           (private.next_expiry(n) ->> 'amount')::bigint, (private.next_expiry(n) ->> 'at')::timestamptz,
           e.ref_id,
           case when e.ord = 1 then c.roll_ref else p_stripe_ref end,
           coalesce(p_metadata, '{}'::jsonb), n.debt
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

-- The same renewal with one period end for every account.
create function private.renew(p_accounts uuid[], p_amounts bigint[], p_caps bigint[], p_start timestamptz,
                              p_end timestamptz, p_origin private.entry_origin, p_key text, p_hash uuid,
                              p_stripe_ref text, p_metadata jsonb)
returns table (account_id uuid, expired bigint, rolled_over bigint, granted bigint, grant_id uuid)
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return query select * from private.renew_to(p_accounts, p_amounts, p_caps,
                                              array_fill(p_end, array[cardinality(p_accounts)]), p_start,
                                              p_origin, p_key, p_hash, p_stripe_ref, p_metadata);
end
$$;

revoke all on function
  private.renew_to(uuid[], bigint[], bigint[], timestamptz[], timestamptz, private.entry_origin, text, uuid, text,
                   jsonb),
  private.renew(uuid[], bigint[], bigint[], timestamptz, timestamptz, private.entry_origin, text, uuid, text, jsonb)
  from public;

-- The period of the month containing p_at (UTC), for accounts the monthly reset renews.
create function private.month_of(p_at timestamptz, out period_start timestamptz, out period_end timestamptz)
language sql immutable
set search_path = pg_catalog, pg_temp
as $$
  select date_trunc('month', p_at, 'UTC'), date_trunc('month', p_at, 'UTC') + interval '1 month'
$$;
revoke all on function private.month_of(timestamptz) from public;

-- ---------------------------------------------------------------------------
-- Opening accounts: every user and tenant gets one on `free` with its first
-- month's allowance; a new user also gets the free plan's sign-up bonus,
-- once per e-mail address (the salt is random per database, so the hashes
-- are no list of addresses; it is the chapter's one other inserted row).
-- ---------------------------------------------------------------------------

create table private.signup_bonus_claims (
  identity_hash bytea primary key,
  claimed_at timestamptz not null default now()
);
comment on table private.signup_bonus_claims is
  'Identities (salted hashes of e-mail or phone) that received the sign-up bonus; kept after a user is deleted.';
alter table private.signup_bonus_claims enable row level security;
revoke all on private.signup_bonus_claims from public, anon, authenticated, service_role;

create table private.installation (
  singleton boolean primary key default true check (singleton),
  salt text not null
);
comment on table private.installation is 'Per-database secrets (the salt of signup_bonus_claims).';
alter table private.installation enable row level security;
revoke all on private.installation from public, anon, authenticated, service_role;
insert into private.installation (salt)
values (replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', ''));

-- Grant the free plan's sign-up bonus to a user's personal account, once per
-- identity. Nothing when the plan has none or the user has no e-mail or phone.
create function private.grant_signup_bonus(p_account_id uuid, p_user_id uuid) returns void
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_plan public.credit_plans;
  v_identity text;
  v_wallet public.credit_wallets;
begin
  select * into v_plan from public.credit_plans p where p.id = 'free';
  if coalesce(v_plan.signup_bonus, 0) = 0 then
    return;
  end if;
  select coalesce(nullif(lower(btrim(u.email)), ''), 'phone:' || nullif(btrim(u.phone), '')) into v_identity
    from auth.users u where u.id = p_user_id;
  if v_identity is null then
    return;
  end if;
  insert into private.signup_bonus_claims (identity_hash)
  values (sha256(convert_to((select i.salt from private.installation i) || ':' || v_identity, 'UTF8')))
  on conflict do nothing;
  if not found then
    return;
  end if;
  v_wallet := private.lock_wallet(p_account_id);
  perform private.add_promotion(v_wallet, 'promotion', v_plan.signup_bonus,
                                now() + make_interval(days => v_plan.signup_bonus_days), 'system', null, null,
                                null, 'sign-up bonus', '{"reason": "signup_bonus"}'::jsonb, null,
                                'signup_bonus');
end
$$;

create function private.open_account(p_user_id uuid, p_tenant_id uuid) returns uuid
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_plan public.credit_plans;
  v_account_id uuid;
  v_month record := private.month_of(now());
  v_grant uuid := private.uuid_v7();
begin
  select * into v_plan from public.credit_plans p where p.id = 'free';
  insert into public.credit_accounts (user_id, tenant_id, plan_id)
  values (p_user_id, p_tenant_id, 'free')
  returning id into v_account_id;
  insert into public.credit_wallets (account_id, period_start, period_end, period_grant)
  values (v_account_id, v_month.period_start, v_month.period_end, v_grant);
  perform private.post(v_account_id, 'grant', p_subscription => coalesce(v_plan.monthly_credits, 0),
                       p_origin => 'system', p_metadata => '{"reason": "signup"}'::jsonb, p_id => v_grant);
  if p_user_id is not null then
    perform private.grant_signup_bonus(v_account_id, p_user_id);
  end if;
  return v_account_id;
end
$$;

create function private.on_auth_user_created() returns trigger
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
begin
  perform private.open_account(new.id, null);
  return new;
end
$$;

create trigger on_auth_user_created_open_credit_account
  after insert on auth.users
  for each row execute function private.on_auth_user_created();

create function private.on_tenant_created() returns trigger
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
begin
  perform private.open_account(null, new.id);
  return new;
end
$$;

create trigger on_tenant_created_open_credit_account
  after insert on public.tenants
  for each row execute function private.on_tenant_created();

revoke all on function private.open_account(uuid, uuid), private.on_auth_user_created(),
  private.on_tenant_created() from public;

-- An anonymous user who sets an e-mail address or phone number later.
create function private.on_auth_user_identified() returns trigger
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
begin
  perform private.grant_signup_bonus(a.id, new.id)
     from public.credit_accounts a where a.user_id = new.id;
  return new;
end
$$;

create trigger on_auth_user_identified_grant_signup_bonus
  after update of email, phone on auth.users
  for each row when (old.email is null and old.phone is null and (new.email is not null or new.phone is not null))
  execute function private.on_auth_user_identified();

revoke all on function private.grant_signup_bonus(uuid, uuid), private.on_auth_user_identified() from public;

-- ---------------------------------------------------------------------------
-- Granting (service only). Each public function is a thin definer entry
-- point; the Stripe chapter calls the same private code with origin 'stripe'.
-- ---------------------------------------------------------------------------

create function private.add_purchased(p_account_id uuid, p_amount integer, p_key text, p_stripe_ref text,
                                      p_description text, p_metadata jsonb, p_origin private.entry_origin)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_hash uuid;
  v_entry public.credit_transactions;
begin
  perform private.authorize(p_account_id, true);
  perform private.check_amount('p_amount', p_amount);
  perform private.check_key(p_key);
  perform private.check_text('p_stripe_ref', p_stripe_ref, 'stripe_ref');
  perform private.check_text('p_description', p_description, 'description');
  perform private.check_metadata(p_metadata);
  v_hash := private.request_hash('purchase', jsonb_build_array(p_amount, p_stripe_ref, p_description, p_metadata));
  perform private.lock_wallet(p_account_id);
  v_entry := private.find_key(p_account_id, p_key, v_hash, p_origin);
  if v_entry.id is null then
    v_entry := private.post(p_account_id, 'purchase', p_purchased => p_amount, p_origin => p_origin,
                            p_key => p_key, p_hash => v_hash, p_stripe_ref => p_stripe_ref,
                            p_description => p_description, p_metadata => p_metadata);
    perform private.settle_debt(p_account_id, v_entry.id);
    return private.result(v_entry, false);
  end if;
  return private.result(v_entry, true);
end
$$;

create function private.add_purchased_credits(p_account_id uuid, p_amount integer, p_idempotency_key text,
                                             p_stripe_ref text default null, p_description text default null,
                                             p_metadata jsonb default '{}'::jsonb)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.add_purchased(p_account_id, p_amount, p_idempotency_key, p_stripe_ref, p_description,
                                 p_metadata, 'api');
end
$$;

create function public.add_purchased_credits(p_account_id uuid, p_amount integer, p_idempotency_key text,
                                             p_stripe_ref text default null, p_description text default null,
                                             p_metadata jsonb default '{}'::jsonb)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.add_purchased_credits(p_account_id, p_amount, p_idempotency_key, p_stripe_ref, p_description, p_metadata);
end
$$;
comment on function public.add_purchased_credits(uuid, integer, text, text, text, jsonb) is
  'Service: add purchased credits (never expire). Result {transaction_id, added, replayed, balance}.';

-- Start a subscription period for one account (Stripe invoices, operators).
create function private.add_subscription(p_account_id uuid, p_amount integer, p_period_start timestamptz,
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
    v_wallet := private.materialize_grants(v_wallet);
  end if;
  perform private.renew(array[p_account_id], array[p_amount::bigint], array[coalesce(v_cap, 0)],
                        p_period_start, p_period_end, p_origin, p_key, v_hash, p_stripe_ref, p_metadata);
  v_entry := private.find_key(p_account_id, p_key, v_hash, p_origin);
  perform private.settle_debt(p_account_id, v_entry.id);
  -- A new billing period: spend limits count it from its start.
  perform private.recount_usage(w) from public.credit_wallets w where w.account_id = p_account_id and w.limited;
  return private.result(v_entry, false);
end
$$;

create function private.add_subscription_credits(p_account_id uuid, p_amount integer, p_period_start timestamptz,
                                                p_period_end timestamptz, p_idempotency_key text,
                                                p_stripe_ref text default null,
                                                p_metadata jsonb default '{}'::jsonb)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.add_subscription(p_account_id, p_amount, p_period_start, p_period_end, p_idempotency_key,
                                    p_stripe_ref, p_metadata, 'api');
end
$$;

create function public.add_subscription_credits(p_account_id uuid, p_amount integer, p_period_start timestamptz,
                                                p_period_end timestamptz, p_idempotency_key text,
                                                p_stripe_ref text default null,
                                                p_metadata jsonb default '{}'::jsonb)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.add_subscription_credits(p_account_id, p_amount, p_period_start, p_period_end, p_idempotency_key, p_stripe_ref, p_metadata);
end
$$;
comment on function public.add_subscription_credits(uuid, integer, timestamptz, timestamptz, text, text, jsonb)
  is 'Service: start a period (roll over, expire the old allowance, grant). {expired, granted, replayed, balance}.';

create function private.expire_subscription_credits(p_account_id uuid, p_idempotency_key text) returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_hash uuid := private.request_hash('expire', '[]'::jsonb);
  v_wallet public.credit_wallets;
  v_entry public.credit_transactions;
begin
  perform private.require_service();
  perform private.authorize(p_account_id, true);
  perform private.check_key(p_idempotency_key);
  v_wallet := private.lock_wallet(p_account_id);
  v_entry := private.find_key(p_account_id, p_idempotency_key, v_hash);
  if v_entry.id is not null then
    return private.result(v_entry, true);
  end if;
  -- Held allowance expires when its hold ends uncaptured (the epoch moved on).
  update public.credit_wallets w set sub_epoch = w.sub_epoch + 1, period_grant = null
   where w.account_id = p_account_id;
  v_entry := private.post(p_account_id, 'expire',
                          p_subscription => -(v_wallet.subscription - v_wallet.held_subscription),
                          p_key => p_idempotency_key, p_hash => v_hash);
  return private.result(v_entry, false);
end
$$;

create function public.expire_subscription_credits(p_account_id uuid, p_idempotency_key text)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.expire_subscription_credits(p_account_id, p_idempotency_key);
end
$$;
comment on function public.expire_subscription_credits(uuid, text) is
  'Service: expire the subscription pool now (purchased untouched). {expired, replayed, balance}.';

create function private.grant_promotional(p_account_id uuid, p_amount integer, p_expires_at timestamptz,
                                          p_key text, p_reason text, p_metadata jsonb, p_stripe_ref text,
                                          p_origin private.entry_origin)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_hash uuid;
  v_wallet public.credit_wallets;
  v_entry public.credit_transactions;
begin
  perform private.authorize(p_account_id, true);
  perform private.check_amount('p_amount', p_amount);
  perform private.check_key(p_key);
  perform private.check_text('p_reason', p_reason, 'reason');
  perform private.check_metadata(p_metadata);
  if p_expires_at is null or p_expires_at <= now() then
    perform private.invalid('p_expires_at', 'must be in the future');
  end if;
  v_hash := private.request_hash('promotion', jsonb_build_array(p_amount, p_expires_at, p_reason, p_metadata,
                                                                 p_stripe_ref));
  v_wallet := private.lock_wallet(p_account_id);
  v_entry := private.find_key(p_account_id, p_key, v_hash, p_origin);
  if v_entry.id is not null then
    return private.result(v_entry, true);
  end if;
  v_entry := private.add_promotion(v_wallet, 'promotion', p_amount, p_expires_at, p_origin, p_key, v_hash,
                                   p_stripe_ref, p_reason, p_metadata, null, 'promotion');
  perform private.settle_debt(p_account_id, v_entry.id);
  return private.result(v_entry, false);
end
$$;

create function private.grant_promotional_credits(p_account_id uuid, p_amount integer, p_expires_at timestamptz,
                                                 p_idempotency_key text, p_reason text default null,
                                                 p_metadata jsonb default '{}'::jsonb)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.grant_promotional(p_account_id, p_amount, p_expires_at, p_idempotency_key, p_reason,
                                     p_metadata, null, 'api');
end
$$;

create function public.grant_promotional_credits(p_account_id uuid, p_amount integer, p_expires_at timestamptz,
                                                 p_idempotency_key text, p_reason text default null,
                                                 p_metadata jsonb default '{}'::jsonb)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.grant_promotional_credits(p_account_id, p_amount, p_expires_at, p_idempotency_key, p_reason, p_metadata);
end
$$;
comment on function public.grant_promotional_credits(uuid, integer, timestamptz, text, text, jsonb) is
  'Service: promotional credits expiring at p_expires_at. {transaction_id, granted, expires_at, replayed, balance}.';

revoke all on function
  private.add_purchased(uuid, integer, text, text, text, jsonb, private.entry_origin),
  private.add_subscription(uuid, integer, timestamptz, timestamptz, text, text, jsonb, private.entry_origin),
  private.grant_promotional(uuid, integer, timestamptz, text, text, jsonb, text, private.entry_origin),
  public.add_purchased_credits(uuid, integer, text, text, text, jsonb),
  public.add_subscription_credits(uuid, integer, timestamptz, timestamptz, text, text, jsonb),
  public.expire_subscription_credits(uuid, text),
  public.grant_promotional_credits(uuid, integer, timestamptz, text, text, jsonb)
  from public, anon, authenticated, service_role;
grant execute on function
  public.add_purchased_credits(uuid, integer, text, text, text, jsonb),
  public.add_subscription_credits(uuid, integer, timestamptz, timestamptz, text, text, jsonb),
  public.expire_subscription_credits(uuid, text),
  public.grant_promotional_credits(uuid, integer, timestamptz, text, text, jsonb)
  to service_role;

-- The definer code behind the public entry points.
revoke all on function private.add_purchased_credits(uuid, integer, text, text, text, jsonb) from public, anon, authenticated, service_role;
grant execute on function private.add_purchased_credits(uuid, integer, text, text, text, jsonb) to service_role;
revoke all on function private.add_subscription_credits(uuid, integer, timestamptz, timestamptz, text, text, jsonb) from public, anon, authenticated, service_role;
grant execute on function private.add_subscription_credits(uuid, integer, timestamptz, timestamptz, text, text, jsonb) to service_role;
revoke all on function private.expire_subscription_credits(uuid, text) from public, anon, authenticated, service_role;
grant execute on function private.expire_subscription_credits(uuid, text) to service_role;
revoke all on function private.grant_promotional_credits(uuid, integer, timestamptz, text, text, jsonb) from public, anon, authenticated, service_role;
grant execute on function private.grant_promotional_credits(uuid, integer, timestamptz, text, text, jsonb) to service_role;
