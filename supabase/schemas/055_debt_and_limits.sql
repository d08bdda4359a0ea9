-- Debt and spend limits: what an account owes, and what its spenders may spend.
--
-- Holds:
--   * private.settle_debt: credits that arrive pay the debt first, in the
--     transaction that brings them (a ledger row of type debt_payment naming
--     the grants that paid, so a clawback of their payment owes it again);
--   * private.spend_limits: caps per member, per member by default, or per
--     license key, and per day, week, month (UTC calendar) or billing period;
--   * private.spend_usage: for accounts with limits, what each spender (a
--     user or a license key) spent in its current windows and holds now;
--   * private.limit_room, private.check_limits, private.count_usage, the
--     accounting every spend path calls; private.cache_limits, the figures
--     the deduct's fast path checks and counts in one statement;
--     set_spend_limit and the credit_spend_limits view.
--
-- Rules:
--   * Debt is a pool of its own, never negative: an overdraft capture adds to
--     it, arriving credits (grants, purchases, renewals, refunds, releases)
--     pay it first; available = max(0, total - held - debt). After every
--     write an account owes nothing or has no free credits (reconcile checks).
--   * A spend counts in the window containing its time, net of its refunds;
--     an active hold counts as held in every window of its maker. All limits
--     that apply are checked; a member named by any limit falls under no
--     default_member limit; owners and admins only under limits naming them.
--   * Limits cost nothing to an account without any: the wallet caches
--     `limited`, and spends look at limits only when it is set. Setting a
--     limit counts the current windows again from the ledger, so spends made
--     before the limit existed count.

-- ---------------------------------------------------------------------------
-- Debt.
-- ---------------------------------------------------------------------------

-- The front p_amount free credits of a pool, per grant (read only).
create function private.front_parts(p_wallet public.credit_wallets, p_pool text, p_amount bigint)
returns table (grant_id uuid, amount bigint)
language sql stable
set search_path = pg_catalog, pg_temp
as $$
  select a.id, greatest(0, least(a.attributed, p_amount - (a.cum - a.attributed)))::bigint
    from (select a.id, a.attributed,
                 sum(a.attributed) over (order by a.expires_at nulls last, a.created_at, a.id) as cum
            from private.grant_attribution(p_wallet, p_pool) a) a
   where p_amount > 0 and least(a.attributed, p_amount - (a.cum - a.attributed)) > 0
$$;

-- Pay what the account owes from its free credits (the caller holds the
-- wallet's lock and has written the credits that arrived, p_ref: their row,
-- whose answer then shows the balance after the payment).
create function private.settle_debt(p_account_id uuid, p_ref uuid default null) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_wallet public.credit_wallets;
  v_pay bigint;
  v_split private.split;
  v_grants jsonb;
begin
  select * into v_wallet from public.credit_wallets w where w.account_id = p_account_id;
  if v_wallet.debt = 0 then
    return;
  end if;
  v_pay := least(v_wallet.debt, v_wallet.promotional - v_wallet.held_promotional
                                + v_wallet.subscription - v_wallet.held_subscription
                                + v_wallet.purchased - v_wallet.held_purchased);
  if v_pay <= 0 then
    return;
  end if;
  v_split := private.spend_split(v_wallet.promotional - v_wallet.held_promotional,
                                 v_wallet.subscription - v_wallet.held_subscription,
                                 v_wallet.purchased - v_wallet.held_purchased, v_pay);
  select coalesce(jsonb_object_agg(x.grant_id, x.amount), '{}'::jsonb) into v_grants
    from (select * from private.front_parts(v_wallet, 'promotional', v_split.promotional)
          union all
          select * from private.front_parts(v_wallet, 'subscription', v_split.subscription)
          union all
          select * from private.front_parts(v_wallet, 'purchased', v_split.purchased)) x;
  perform private.post(p_account_id, 'debt_payment', -v_split.promotional, -v_split.subscription,
                       -v_split.purchased, p_origin => 'system', p_debt => -v_pay, p_ref_id => p_ref,
                       p_period_start => case when v_split.subscription > 0 then v_wallet.period_start end,
                       p_metadata => '{"reason": "debt paid by arriving credits"}'::jsonb,
                       p_outcome => jsonb_build_object('grants', v_grants));
end
$$;

-- What a payment's grants paid of debt, less what clawbacks of it owed again.
create function private.debt_paid_by(p_account_id uuid, p_stripe_ref text) returns bigint
language sql stable
set search_path = pg_catalog, pg_temp
as $$
  select greatest(0,
    coalesce((select sum((e.value)::bigint) from public.credit_transactions t
               cross join lateral jsonb_each_text(t.outcome -> 'grants') e
               join private.grants g on g.id = e.key::uuid
              where t.account_id = p_account_id and t.kind = 'debt_payment' and g.stripe_ref = p_stripe_ref), 0)
    - coalesce((select sum(t.debt) from public.credit_transactions t
                 where t.account_id = p_account_id and t.stripe_ref = p_stripe_ref and t.kind = 'clawback'), 0)
    + coalesce((select -sum(t.debt) from public.credit_transactions t
                 where t.account_id = p_account_id and t.stripe_ref = p_stripe_ref and t.kind = 'reinstate'), 0))::bigint
$$;

revoke all on function private.front_parts(public.credit_wallets, text, bigint), private.settle_debt(uuid, uuid),
  private.debt_paid_by(uuid, text) from public, anon, authenticated, service_role;

-- ---------------------------------------------------------------------------
-- Spend limits.
-- ---------------------------------------------------------------------------

create table private.spend_limits (
  account_id uuid not null references public.credit_accounts (id) on delete cascade,
  subject text not null check (subject in ('member', 'default_member', 'license_key')),
  -- The member's user id or the key's id; null for default_member.
  subject_id uuid,
  period text not null check (period in ('day', 'week', 'month', 'billing_period')),
  credit_limit bigint not null check (credit_limit between 0 and 1000000000),
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint spend_limits_subject check ((subject = 'default_member') = (subject_id is null)),
  constraint spend_limits_one_per_period unique nulls not distinct (account_id, subject, subject_id, period)
);
comment on table private.spend_limits is 'Spend limits: a cap per spender and calendar window (set_spend_limit).';

-- Per spender of an account with limits: spent in the current windows, held now.
-- (No foreign key: it is written on every limited spend; the books' delete
-- trigger removes it with the account.)
create table private.spend_usage (
  account_id uuid not null,
  -- A user id, or a license key's id.
  spender uuid not null,
  held bigint not null default 0 check (held >= 0),
  day_start timestamptz,
  day_spent bigint not null default 0,
  week_start timestamptz,
  week_spent bigint not null default 0,
  month_start timestamptz,
  month_spent bigint not null default 0,
  period_start timestamptz,
  period_spent bigint not null default 0,
  -- The limits that apply to this spender per window (null: none), cached
  -- for the deduct's fast path while limits_cached (private.cache_limits).
  -- Setting a limit recounts the account (new rows, not cached). The fast
  -- path serves spenders whose limits no tenant membership decides (a user
  -- on their own personal account, a license key), so membership changes
  -- need not clear it.
  limits_cached boolean not null default false,
  day_limit bigint,
  week_limit bigint,
  month_limit bigint,
  period_limit bigint,
  primary key (account_id, spender)
);
comment on table private.spend_usage is
  'What each spender of an account with spend limits spent in its current windows, and holds.';

alter table private.spend_limits enable row level security;
alter table private.spend_usage enable row level security;
revoke all on private.spend_limits, private.spend_usage from public, anon, authenticated, service_role;
grant select on private.spend_limits, private.spend_usage to authenticated, service_role;
-- Owners and admins read every limit of the account; a plain member those that apply to them.
create policy spend_limits_read on private.spend_limits for select to authenticated
  using (account_id in (select private.managed_account_ids())
         or (account_id in (select private.readable_account_ids())
             and (subject_id = (select auth.uid()) or subject = 'default_member')));
create policy spend_usage_read on private.spend_usage for select to authenticated
  using (account_id in (select private.managed_account_ids())
         or (spender = (select auth.uid()) and account_id in (select private.readable_account_ids())));

-- A window's bounds at p_at: a UTC calendar day, ISO week or month, or the wallet's period.
create function private.window_bounds(p_period text, p_wallet public.credit_wallets, p_at timestamptz,
                                      out w_start timestamptz, out w_end timestamptz)
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
  if p_period = 'billing_period' then
    w_start := p_wallet.period_start;
    w_end := p_wallet.period_end;
    return;
  end if;
  w_start := date_trunc(p_period, p_at at time zone 'UTC') at time zone 'UTC';
  w_end := (date_trunc(p_period, p_at at time zone 'UTC') + ('1 ' || p_period)::interval) at time zone 'UTC';
end
$$;

-- What a spender's holds past their expiry still count as held until the next write sweeps them.
create function private.lapsed_held(p_account_id uuid, p_spender uuid) returns bigint
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
  return (
    select coalesce(sum(h.amount), 0)::bigint from public.credit_holds h
     where h.account_id = p_account_id and h.status = 'active' and h.expires_at <= now()
       and h.actor_id = p_spender
  );
end
$$;

-- A plain member of the account's tenant (the only ones default_member limits cover).
create function private.is_plain_member(p_account_id uuid, p_user uuid) returns boolean
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
  return (
    select exists (select 1 from public.credit_accounts a
                     join public.tenant_members m on m.tenant_id = a.tenant_id
                    where a.id = p_account_id and m.user_id = p_user and m.role = 'member')
  );
end
$$;

-- The limits that apply to a spender now, each with what was spent and is
-- held in its window, tightest first.
create function private.applicable_limits(p_wallet public.credit_wallets, p_user uuid, p_key uuid)
returns table (credit_limit bigint, period text, spent bigint, held bigint, resets_at timestamptz, room bigint)
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
  return query
  select l.credit_limit, l.period, x.spent, x.held, b.w_end, l.credit_limit - x.spent - x.held
    from private.spend_limits l
    left join private.spend_usage u on u.account_id = l.account_id and u.spender = coalesce(p_key, p_user)
   cross join lateral private.window_bounds(l.period, p_wallet, now()) b
   cross join lateral (select coalesce(case l.period
                                         when 'day' then case when u.day_start = b.w_start then u.day_spent end
                                         when 'week' then case when u.week_start = b.w_start then u.week_spent end
                                         when 'month' then case when u.month_start = b.w_start then u.month_spent end
                                         else case when u.period_start = b.w_start then u.period_spent end
                                       end, 0) as spent,
                              -- Holds past their expiry are no longer held (a read before the sweep).
                              coalesce(u.held, 0)
                              - case when p_wallet.next_hold_expiry <= now()
                                     then private.lapsed_held(l.account_id, p_user) else 0 end as held) x
   where l.account_id = p_wallet.account_id
     and coalesce(p_key, p_user) is not null
     and case when p_key is not null then l.subject = 'license_key' and l.subject_id = p_key
              when l.subject = 'member' then l.subject_id = p_user
              when l.subject = 'default_member' then
                not exists (select 1 from private.spend_limits n
                             where n.account_id = l.account_id and n.subject = 'member' and n.subject_id = p_user)
                and private.is_plain_member(l.account_id, p_user)
              else false end
   order by 6, 5;
end
$$;

-- What the spender may still spend (null: no limit applies).
create function private.limit_room(p_wallet public.credit_wallets, p_user uuid, p_key uuid) returns bigint
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
  return (
    select case when count(*) > 0 then greatest(0, min(l.room))::bigint end
      from private.applicable_limits(p_wallet, p_user, p_key) l
  );
end
$$;

-- Refuse a spend of p_amount that would pass a limit (spend_limit_exceeded, the tightest limit's figures).
create function private.check_limits(p_wallet public.credit_wallets, p_user uuid, p_key uuid, p_amount bigint)
returns void
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_limit record;
begin
  select * into v_limit from private.applicable_limits(p_wallet, p_user, p_key) l limit 1;
  if found and v_limit.room < p_amount then
    perform private.fail('PT402', 'spend_limit_exceeded', jsonb_build_object(
      'limit', v_limit.credit_limit, 'spent', v_limit.spent, 'held', v_limit.held, 'required', p_amount,
      'period', v_limit.period, 'resets_at', v_limit.resets_at));
  end if;
end
$$;

-- Count a spender's spend (p_spent, at p_at: negative for a refund) and
-- change of what it holds, in an account with limits (the caller holds the
-- wallet's lock). A refund counts only in windows still current.
create function private.count_usage(p_wallet public.credit_wallets, p_spender uuid, p_spent bigint,
                                    p_held bigint, p_at timestamptz default null)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_at timestamptz;
  v_utc timestamp;
  v_day timestamptz;
  v_week timestamptz;
  v_month timestamptz;
  v_period timestamptz := p_wallet.period_start;
begin
  if p_spender is null or not p_wallet.limited then
    return;
  end if;
  -- The windows containing p_at (private.window_bounds, inline: this runs on every limited spend).
  v_at := coalesce(p_at, now());
  v_utc := v_at at time zone 'UTC';
  v_day := date_trunc('day', v_utc) at time zone 'UTC';
  v_week := date_trunc('week', v_utc) at time zone 'UTC';
  v_month := date_trunc('month', v_utc) at time zone 'UTC';
  if p_spent < 0 then
    -- A refund: it lowers what was spent in the windows its spend fell in, if they are current.
    update private.spend_usage u
       set day_spent = case when u.day_start = v_day then greatest(0, u.day_spent + p_spent) else u.day_spent end,
           week_spent = case when u.week_start = v_week then greatest(0, u.week_spent + p_spent)
                             else u.week_spent end,
           month_spent = case when u.month_start = v_month then greatest(0, u.month_spent + p_spent)
                              else u.month_spent end,
           period_spent = case when u.period_start = v_period and v_at >= p_wallet.period_start
                               then greatest(0, u.period_spent + p_spent) else u.period_spent end,
           held = greatest(0, u.held + p_held)
     where u.account_id = p_wallet.account_id and u.spender = p_spender;
    return;
  end if;
  insert into private.spend_usage as u (account_id, spender, held, day_start, day_spent, week_start, week_spent,
                                        month_start, month_spent, period_start, period_spent)
  values (p_wallet.account_id, p_spender, greatest(0, p_held), v_day, p_spent, v_week, p_spent, v_month, p_spent,
          v_period, p_spent)
  on conflict (account_id, spender) do update
    set held = greatest(0, u.held + p_held),
        day_spent = case when u.day_start = v_day then u.day_spent + p_spent else p_spent end,
        day_start = v_day,
        week_spent = case when u.week_start = v_week then u.week_spent + p_spent else p_spent end,
        week_start = v_week,
        month_spent = case when u.month_start = v_month then u.month_spent + p_spent else p_spent end,
        month_start = v_month,
        period_spent = case when u.period_start is not distinct from v_period then u.period_spent + p_spent
                            else p_spent end,
        period_start = v_period;
end
$$;

-- Cache the limits that apply to a spender on its usage row (made if
-- missing), for the deduct's fast path. The caller holds the wallet's lock.
create function private.cache_limits(p_wallet public.credit_wallets, p_user uuid, p_key uuid) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  insert into private.spend_usage as u (account_id, spender, limits_cached, day_limit, week_limit, month_limit,
                                        period_limit)
  select p_wallet.account_id, coalesce(p_key, p_user), true,
         min(a.credit_limit) filter (where a.period = 'day'),
         min(a.credit_limit) filter (where a.period = 'week'),
         min(a.credit_limit) filter (where a.period = 'month'),
         min(a.credit_limit) filter (where a.period = 'billing_period')
    from private.applicable_limits(p_wallet, p_user, p_key) a
  on conflict (account_id, spender) do update
    set limits_cached = true, day_limit = excluded.day_limit, week_limit = excluded.week_limit,
        month_limit = excluded.month_limit, period_limit = excluded.period_limit;
end
$$;

-- Count an account's current windows again from the ledger and its active
-- holds (when its limits change: spends made before a limit existed count).
create function private.recount_usage(p_wallet public.credit_wallets) returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_day timestamptz := (private.window_bounds('day', p_wallet, now())).w_start;
  v_week timestamptz := (private.window_bounds('week', p_wallet, now())).w_start;
  v_month timestamptz := (private.window_bounds('month', p_wallet, now())).w_start;
  v_period timestamptz := p_wallet.period_start;
  v_from timestamptz := least(v_day, v_week, v_month, coalesce(p_wallet.period_start, v_month));
begin
  if not p_wallet.limited then
    return;
  end if;
  delete from private.spend_usage u where u.account_id = p_wallet.account_id;
  insert into private.spend_usage (account_id, spender, held, day_start, day_spent, week_start, week_spent,
                                   month_start, month_spent, period_start, period_spent)
  select p_wallet.account_id, s.spender, coalesce(max(h.held), 0),
         v_day, coalesce(sum(s.net) filter (where s.at >= v_day), 0),
         v_week, coalesce(sum(s.net) filter (where s.at >= v_week), 0),
         v_month, coalesce(sum(s.net) filter (where s.at >= v_month), 0),
         v_period, coalesce(sum(s.net) filter (where s.at >= v_period), 0)
    from (select coalesce(t.license_key_id, t.actor_id) as spender, t.created_at as at,
                 -(t.promotional + t.subscription + t.purchased) + t.debt
                 - coalesce((select sum(r.purchased) from public.credit_transactions r
                              where r.ref_id = t.id and r.account_id = t.account_id and r.kind = 'refund'), 0)
                   as net
            from public.credit_transactions t
           where t.account_id = p_wallet.account_id and t.kind = 'spend' and t.created_at >= v_from
             and coalesce(t.license_key_id, t.actor_id) is not null
          union all
          select h.actor_id, null, 0 from public.credit_holds h
           where h.account_id = p_wallet.account_id and h.status = 'active' and h.actor_id is not null) s
    left join (select h.actor_id, sum(h.amount) as held from public.credit_holds h
                where h.account_id = p_wallet.account_id and h.status = 'active' and h.actor_id is not null
                group by h.actor_id) h on h.actor_id = s.spender
   group by s.spender;
end
$$;

revoke all on function private.window_bounds(text, public.credit_wallets, timestamptz),
  private.lapsed_held(uuid, uuid),
  private.is_plain_member(uuid, uuid), private.applicable_limits(public.credit_wallets, uuid, uuid),
  private.limit_room(public.credit_wallets, uuid, uuid),
  private.check_limits(public.credit_wallets, uuid, uuid, bigint),
  private.count_usage(public.credit_wallets, uuid, bigint, bigint, timestamptz),
  private.cache_limits(public.credit_wallets, uuid, uuid),
  private.recount_usage(public.credit_wallets)
  from public, anon, authenticated, service_role;

create function private.set_spend_limit(p_account_id uuid, p_subject text, p_limit integer, p_period text,
                                        p_subject_id uuid default null)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_actor uuid := private.authorize(p_account_id, true);
  v_account public.credit_accounts;
  v_target_role text;
  v_wallet public.credit_wallets;
  v_limit record;
  v_bounds record;
begin
  if p_subject is null or p_subject not in ('member', 'default_member', 'license_key') then
    perform private.invalid('p_subject', 'must be member, default_member or license_key');
  end if;
  if p_period is null or p_period not in ('day', 'week', 'month', 'billing_period') then
    perform private.invalid('p_period', 'must be day, week, month or billing_period');
  end if;
  if p_limit is not null and p_limit not between 0 and (private.limits() ->> 'amount')::integer then
    perform private.invalid('p_limit', format('must be 0 to %s, or null to remove the limit',
                                              private.limits() ->> 'amount'));
  end if;
  select * into v_account from public.credit_accounts a where a.id = p_account_id;
  if p_subject = 'default_member' then
    if p_subject_id is not null then
      perform private.invalid('p_subject_id', 'must be null for default_member');
    end if;
  elsif p_subject_id is null then
    perform private.invalid('p_subject_id', 'required for ' || p_subject);
  elsif p_subject = 'member' then
    v_target_role := case when v_account.user_id = p_subject_id then 'owner'
                          else (select m.role from public.tenant_members m
                                 where m.tenant_id = v_account.tenant_id and m.user_id = p_subject_id) end;
    if v_target_role is null then
      perform private.invalid('p_subject_id', 'not a member of the account');
    end if;
    -- Only an owner (or the service) limits an owner or an admin.
    if v_actor is not null and v_target_role in ('owner', 'admin') and v_account.user_id is distinct from v_actor
       and not exists (select 1 from public.tenant_members m
                        where m.tenant_id = v_account.tenant_id and m.user_id = v_actor and m.role = 'owner') then
      perform private.fail('PT403', 'forbidden');
    end if;
  elsif not exists (select 1 from public.credit_license_keys k
                     where k.id = p_subject_id and k.account_id = p_account_id) then
    perform private.invalid('p_subject_id', 'not a license key of the account');
  end if;

  v_wallet := private.lock_wallet(p_account_id);
  if p_limit is null then
    delete from private.spend_limits l
     where l.account_id = p_account_id and l.subject = p_subject and l.subject_id is not distinct from p_subject_id
       and l.period = p_period;
  else
    insert into private.spend_limits as l (account_id, subject, subject_id, period, credit_limit)
    values (p_account_id, p_subject, p_subject_id, p_period, p_limit)
    on conflict (account_id, subject, subject_id, period)
      do update set credit_limit = excluded.credit_limit, updated_at = now();
  end if;
  update public.credit_wallets w
     set limited = exists (select 1 from private.spend_limits l where l.account_id = p_account_id)
   where w.account_id = p_account_id
  returning w.* into v_wallet;
  if v_wallet.limited then
    perform private.recount_usage(v_wallet);
  else
    delete from private.spend_usage u where u.account_id = p_account_id;
  end if;

  v_bounds := private.window_bounds(p_period, v_wallet, now());
  select coalesce(case p_period when 'day' then case when u.day_start = v_bounds.w_start then u.day_spent end
                                when 'week' then case when u.week_start = v_bounds.w_start then u.week_spent end
                                when 'month' then case when u.month_start = v_bounds.w_start then u.month_spent end
                                else case when u.period_start = v_bounds.w_start then u.period_spent end end,
                  0) as spent, u.held
    into v_limit from private.spend_usage u where u.account_id = p_account_id and u.spender = p_subject_id;
  return jsonb_build_object(
    'account_id', p_account_id, 'subject', p_subject, 'subject_id', p_subject_id, 'limit', p_limit,
    'period', p_period,
    'spent', case when p_subject <> 'default_member' then coalesce(v_limit.spent, 0) end,
    'held', case when p_subject <> 'default_member' then coalesce(v_limit.held, 0) end,
    'resets_at', v_bounds.w_end);
end
$$;

create function public.set_spend_limit(p_account_id uuid, p_subject text, p_limit integer, p_period text,
                                       p_subject_id uuid default null)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  return private.set_spend_limit(p_account_id, p_subject, p_limit, p_period, p_subject_id);
end
$$;
comment on function public.set_spend_limit(uuid, text, integer, text, uuid) is
  'Cap what a member, each plain member, or a license key may spend per day, week, month or billing period '
  '(null limit: remove). {account_id, subject, subject_id, limit, period, spent, held, resets_at}.';

revoke all on function private.set_spend_limit(uuid, text, integer, text, uuid),
  public.set_spend_limit(uuid, text, integer, text, uuid) from public, anon, authenticated, service_role;
grant execute on function private.set_spend_limit(uuid, text, integer, text, uuid),
  public.set_spend_limit(uuid, text, integer, text, uuid) to authenticated, service_role;

-- One row per limit and spender it covers (a default_member limit: one per
-- plain member it covers), with the spender's figures in its current window.
create view public.credit_spend_limits with (security_invoker = true) as
select l.account_id, l.subject, s.subject_id, l.credit_limit as "limit", l.period,
       coalesce(case l.period when 'day' then case when u.day_start = b.w_start then u.day_spent end
                              when 'week' then case when u.week_start = b.w_start then u.week_spent end
                              when 'month' then case when u.month_start = b.w_start then u.month_spent end
                              else case when u.period_start = b.w_start then u.period_spent end end, 0)::bigint
         as spent,
       (coalesce(u.held, 0) - private.lapsed_held(l.account_id, s.subject_id))::bigint as held,
       b.w_end as resets_at
  from private.spend_limits l
  join public.credit_wallets w on w.account_id = l.account_id
  join public.credit_accounts a on a.id = l.account_id
 cross join lateral (select l.subject_id where l.subject <> 'default_member'
                     union all
                     select m.user_id from public.tenant_members m
                      where l.subject = 'default_member' and m.tenant_id = a.tenant_id and m.role = 'member'
                        and not exists (select 1 from private.spend_limits n
                                         where n.account_id = l.account_id and n.subject = 'member'
                                           and n.subject_id = m.user_id)) s(subject_id)
  left join private.spend_usage u on u.account_id = l.account_id and u.spender = s.subject_id
 cross join lateral private.window_bounds(l.period, w, now()) b
 where l.account_id in (select private.managed_account_ids())
    or s.subject_id = (select auth.uid())
    or current_user not in ('authenticated', 'anon')
    or (select private.is_super_admin());
comment on view public.credit_spend_limits is
  'Spend limits and, per spender they cover, what was spent and is held in the current window.';
revoke all on public.credit_spend_limits from anon, authenticated, service_role;
grant select on public.credit_spend_limits to authenticated, service_role;
grant execute on function private.window_bounds(text, public.credit_wallets, timestamptz),
  private.lapsed_held(uuid, uuid) to authenticated, service_role;
