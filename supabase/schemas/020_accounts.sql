-- Accounts and tenants: who holds credits, who may read or spend them, and the
-- catalog (plans, packs, prices) operators edit.
--
-- Holds:
--   * credit_plans, credit_packs, credit_prices: written by service_role (the
--     table editor), readable by everyone signed in;
--   * tenants and tenant_members: readable by the tenant's members;
--   * credit_accounts: identity, plan and Stripe links of an account (one per
--     user, made by a trigger on auth.users in the grants chapter, or per
--     tenant);
--   * credit_wallets: the account's balances, one narrow row per account,
--     apart from identity so the row a spend rewrites has no unique index,
--     foreign key or check to maintain beyond its own;
--   * private.authorize(): the one place that decides who may act on an
--     account; private.personal_account(): the account a user's call without
--     one acts on.
--
-- Rules:
--   * Users write no table. Every change goes through a SECURITY DEFINER
--     function, which decides who the caller is from the role the REST layer
--     set (`current_setting('role')`, which a definer function cannot change)
--     and from `auth.uid()`, never from an argument or from user_metadata.
--   * Reads follow RLS: own personal account, accounts of tenants one is a
--     member of, everything for a super admin (`app_metadata.role`).
--   * Spending needs the personal account or a tenant owner/admin.
--   * A user's read, spend or hold with a null account acts on the caller's
--     personal account; service calls must name the account.
--   * The `free` plan row is part of the schema: it is every new account's
--     plan (the column default) and the one row this file inserts.

-- ---------------------------------------------------------------------------
-- Catalog.
-- ---------------------------------------------------------------------------

create table public.credit_plans (
  id text primary key check (id ~ '^[a-z0-9_-]{1,64}$'),
  name text not null default '',
  monthly_credits integer not null check (monthly_credits between 0 and 1000000000),
  stripe_price_id text unique,
  -- At each period start up to this many unused allowance credits become a
  -- promotional grant expiring at the end of the new period.
  rollover_cap integer not null default 0 check (rollover_cap between 0 and 1000000000),
  -- Promotional credits granted once to a new user's account, valid this many days.
  signup_bonus integer not null default 0 check (signup_bonus between 0 and 1000000000),
  signup_bonus_days integer not null default 30 check (signup_bonus_days between 1 and 3660),
  created_at timestamptz not null default now()
);
comment on table public.credit_plans is
  'Plans: monthly allowance, rollover cap, sign-up bonus; stripe_price_id maps a Stripe price to a plan.';

-- The plan every account starts on (see the header).
insert into public.credit_plans (id, name, monthly_credits) values ('free', 'Free', 3);

create table public.credit_packs (
  stripe_price_id text primary key,
  credits integer not null check (credits between 1 and 1000000000),
  name text not null default '',
  created_at timestamptz not null default now()
);
comment on table public.credit_packs is 'One-off credit packs sold through Stripe Checkout, by price id.';

create table public.credit_prices (
  operation text primary key check (length(operation) between 1 and 128),
  credits integer not null default 0 check (credits between 0 and 1000000000),
  credits_per_1k_input_tokens numeric not null default 0 check (credits_per_1k_input_tokens >= 0),
  credits_per_1k_output_tokens numeric not null default 0 check (credits_per_1k_output_tokens >= 0),
  -- A spend that costs 0 is refused unless the operation is marked free here.
  free boolean not null default false,
  created_at timestamptz not null default now()
);
comment on table public.credit_prices is
  'Cost of an operation: flat credits plus credits per 1,000 input/output tokens, total rounded up.';

alter table public.credit_plans enable row level security;
alter table public.credit_packs enable row level security;
alter table public.credit_prices enable row level security;
create policy credit_plans_read on public.credit_plans for select to authenticated using (true);
create policy credit_packs_read on public.credit_packs for select to authenticated using (true);
create policy credit_prices_read on public.credit_prices for select to authenticated using (true);

revoke all on public.credit_plans, public.credit_packs, public.credit_prices
  from anon, authenticated, service_role;
grant select on public.credit_plans, public.credit_packs, public.credit_prices to authenticated;
grant select, insert, update, delete on public.credit_plans, public.credit_packs, public.credit_prices
  to service_role;

-- ---------------------------------------------------------------------------
-- Tenants and members. Written by service_role; readable by the members.
-- ---------------------------------------------------------------------------

create table public.tenants (
  id uuid primary key default gen_random_uuid(),
  name text not null check (length(name) between 1 and 200),
  created_at timestamptz not null default now()
);

create table public.tenant_members (
  tenant_id uuid not null references public.tenants (id) on delete cascade,
  user_id uuid not null references auth.users (id) on delete cascade,
  role text not null check (role in ('owner', 'admin', 'member')),
  created_at timestamptz not null default now(),
  primary key (tenant_id, user_id)
);
create index tenant_members_user_id_idx on public.tenant_members (user_id);

alter table public.tenants enable row level security;
alter table public.tenant_members enable row level security;
revoke all on public.tenants, public.tenant_members from anon, authenticated, service_role;
grant select on public.tenants, public.tenant_members to authenticated;
grant select, insert, update, delete on public.tenants, public.tenant_members to service_role;

-- ---------------------------------------------------------------------------
-- Accounts: identity, plan, Stripe links.
-- ---------------------------------------------------------------------------

create table public.credit_accounts (
  id uuid primary key default private.uuid_v7(),
  user_id uuid unique references auth.users (id) on delete cascade,
  tenant_id uuid unique references public.tenants (id) on delete cascade,
  plan_id text not null default 'free' references public.credit_plans (id),
  stripe_customer_id text unique,
  stripe_subscription_id text unique,
  subscription_status text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  -- A yearly Stripe price: how far the payment reaches, and how many seats it
  -- paid for (the monthly reset renews such an account within that period).
  stripe_paid_through timestamptz,
  stripe_quantity integer check (stripe_quantity between 1 and 1000000),
  -- The yearly period's start (its months run from it), the Stripe reference
  -- of the payment that paid it, the period's end as paid (stripe_paid_through
  -- is cut short by a full refund or a dispute), and the share of it a partial
  -- refund left paid.
  stripe_period_start timestamptz,
  stripe_paid_ref text,
  stripe_paid_until timestamptz,
  stripe_paid_scale numeric not null default 1 check (stripe_paid_scale between 0 and 1),
  -- The most debt overdraft holds may leave (set by the service only).
  overdraft_limit integer not null default 0 check (overdraft_limit between 0 and 1000000000),
  constraint credit_accounts_one_owner check (num_nonnulls(user_id, tenant_id) = 1)
);
comment on table public.credit_accounts is
  'Who holds credits: a user (personal account) or a tenant. Balances live in credit_wallets.';
comment on column public.credit_accounts.stripe_paid_through is
  'End of the paid Stripe period when it is longer than a month (a yearly price); the reset renews within it.';

alter table public.credit_accounts enable row level security;
revoke all on public.credit_accounts from anon, authenticated, service_role;
grant select on public.credit_accounts to authenticated, service_role;
-- Operators may move an account to another plan by hand; everything else is function-only.
grant update (plan_id, overdraft_limit) on public.credit_accounts to service_role;

-- ---------------------------------------------------------------------------
-- Wallets: the balances of an account, written only by the credit functions,
-- always under this row's lock (the one lock a call on one account takes).
--
-- Pools: promotional, subscription, purchased (total = their sum). held_* are
-- what active holds reserve of each pool; a pool's free credits are
-- pool - held_pool. Cached values, each maintained by one code path only:
--   * held_*            changed relatively by a hold's start and its end;
--   * next_hold_expiry  the earliest expiry of an active hold;
--   * promo_front_at /  the soonest expiry among promotional grants with free
--     promo_front_left  credits left, and how many free credits expire then;
--   * hold_minute /     the UTC minute of the latest hold creation and how
--     hold_minute_count many holds were made in it (the bound on creations);
-- sub_epoch counts subscription expiries (renewals, explicit expiries): a hold
-- whose subscription credits were reserved in an earlier epoch expires them
-- when it ends uncaptured.
-- ---------------------------------------------------------------------------

-- A count of credits: never below zero. A domain, not a table CHECK: the
-- check runs on the value alone, far cheaper on the row every spend rewrites.
create domain private.credits as bigint not null default 0 check (value >= 0);

-- No foreign key to the account (a call that updates its wallet twice would
-- pay the key's check each time): only definer code inserts a wallet, when
-- it opens the account, and the books' delete trigger (the ledger chapter)
-- removes it with the account.
create table public.credit_wallets (
  account_id uuid primary key,
  promotional private.credits,
  subscription private.credits,
  purchased private.credits,
  held_promotional private.credits,
  held_subscription private.credits,
  held_purchased private.credits,
  sub_epoch integer not null default 0,
  period_start timestamptz,
  period_end timestamptz,
  next_hold_expiry timestamptz,
  promo_front_at timestamptz,
  promo_front_left private.credits,
  hold_minute timestamptz,
  hold_minute_count integer not null default 0,
  -- The transaction that granted this period's calendar allowance (the monthly
  -- reset's, or an account's first month): that grant has no row of its own.
  period_grant uuid,
  -- What overdraft captures left owed (paid first by any credits that arrive).
  debt private.credits,
  -- The account has spend limits: spends check them (one comparison otherwise).
  limited boolean not null default false,
  -- Scratch of the spend's fast path (private.deduct_credits): the split its
  -- UPDATE made and the promotional front before it, read back by the same
  -- call (RETURNING shows only the new row).
  split_promotional bigint,
  split_subscription bigint,
  front_before bigint,
  -- Balance alerts (the events chapter): the highest armed threshold (0: none)
  -- and the lowest re-arm level of a fired alert (null: none). A change can
  -- fire or re-arm an alert only when available passes one of them.
  alert_below bigint not null default 0,
  alert_rearm bigint,
  -- Auto top-up (its chapter): the threshold of an active setting (0: none).
  topup_below bigint not null default 0
  -- Never more held than there is: every path that changes a pool or what is
  -- held takes free credits only, under this row's lock (reconcile checks).
-- fillfactor 50: the monthly reset rewrites every row of a batch in one
-- transaction; room for a second version of each row keeps updates HOT.
) with (fillfactor = 50);
-- The few wallets that owe or have spend limits (the reset pays their debt
-- from the renewal and counts their new period); spends change neither, so
-- their updates stay HOT.
create index credit_wallets_attention_idx on public.credit_wallets (account_id) where debt > 0 or limited;
-- The few wallets with auto top-up on (notify looks for those still due).
create index credit_wallets_topup_idx on public.credit_wallets (account_id) where topup_below > 0;
comment on table public.credit_wallets is
  'Balances of an account (three pools and what holds reserve of each). Function-only writes.';

alter table public.credit_wallets enable row level security;
revoke all on public.credit_wallets from anon, authenticated, service_role;
grant select on public.credit_wallets to authenticated, service_role;

-- ---------------------------------------------------------------------------
-- Who is calling.
-- ---------------------------------------------------------------------------

-- True for service_role and for a direct owner/superuser session (no SET ROLE,
-- which only roles that already hold EXECUTE on the function can be).
create function private.is_service()
returns boolean
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
  return coalesce(nullif(current_setting('role', true), ''), 'none') in ('service_role', 'none');
end
$$;

create function private.is_super_admin()
returns boolean
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
  return coalesce(auth.jwt() -> 'app_metadata' ->> 'role', '') = 'super_admin';
end
$$;

-- The calling user, or null for service calls (recorded as the actor).
create function private.actor()
returns uuid
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
  return case when private.is_service() then null else auth.uid() end;
end
$$;

-- Tenants the caller belongs to (definer: reads members without recursing into RLS).
create function private.member_tenant_ids() returns setof uuid
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$
  select m.tenant_id from public.tenant_members m where m.user_id = (select auth.uid())
$$;

-- Accounts the caller may read (super admins read everything through the policies).
-- The accounts whose every ledger and usage row the caller reads: their own,
-- and those of tenants they own or administer (a plain member reads only the
-- rows of their own spends).
create function private.managed_account_ids() returns setof uuid
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$
  select a.id from public.credit_accounts a where a.user_id = (select auth.uid())
  union all
  select a.id from public.credit_accounts a
    join public.tenant_members m on m.tenant_id = a.tenant_id
   where m.user_id = (select auth.uid()) and m.role in ('owner', 'admin')
$$;

create function private.readable_account_ids() returns setof uuid
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$
  select a.id from public.credit_accounts a where a.user_id = (select auth.uid())
  union all
  select a.id from public.credit_accounts a
    join public.tenant_members m on m.tenant_id = a.tenant_id
   where m.user_id = (select auth.uid())
$$;

-- The caller's right to act on an account; returns the acting user (null for
-- the service), recorded as the actor. Service: the account must exist.
-- Users: write needs the personal account or tenant owner/admin; spend
-- (p_spend) also a plain member to whom a spend limit applies; read also
-- allows any tenant member and super admins.
create function private.authorize(p_account_id uuid, p_write boolean, p_spend boolean default false)
returns uuid
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_uid uuid;
  v_user_id uuid;
  v_tenant_id uuid;
  v_role text;
begin
  if p_account_id is null then
    perform private.invalid('p_account_id', 'required');
  end if;
  if private.is_service() then
    if not exists (select 1 from public.credit_accounts a where a.id = p_account_id) then
      perform private.fail('PT404', 'account_not_found');
    end if;
    return null;
  end if;
  v_uid := auth.uid();
  if v_uid is null or current_setting('role', true) <> 'authenticated' then
    perform private.fail('PT403', 'forbidden');
  end if;
  select a.user_id, a.tenant_id into v_user_id, v_tenant_id
    from public.credit_accounts a where a.id = p_account_id;
  if not found then
    perform private.fail('PT404', 'account_not_found');
  end if;
  if v_user_id = v_uid then
    return v_uid;
  end if;
  if v_tenant_id is not null then
    select m.role into v_role from public.tenant_members m
     where m.tenant_id = v_tenant_id and m.user_id = v_uid;
    if v_role in ('owner', 'admin') or (v_role is not null and not p_write) then
      return v_uid;
    end if;
    -- A plain member spends only under a limit (their own or the default member limit).
    if p_spend and v_role = 'member' and exists (select 1 from private.spend_limits l
                                      where l.account_id = p_account_id
                                        and (l.subject = 'default_member'
                                             or (l.subject = 'member' and l.subject_id = v_uid))) then
      return v_uid;
    end if;
  end if;
  if not p_write and private.is_super_admin() then
    return v_uid;
  end if;
  perform private.fail('PT403', 'forbidden');
  return null;
end
$$;

create function private.require_service() returns void
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
  if not private.is_service() then
    perform private.fail('PT403', 'forbidden');
  end if;
end
$$;

-- The account a user's call without one acts on: get_credit_balance,
-- deduct_credits and reserve_credits take a null p_account_id as the
-- caller's personal account. Service calls must name the account.
create function private.personal_account() returns uuid
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_account_id uuid;
begin
  if private.is_service() then
    perform private.invalid('p_account_id', 'required for service calls');
  end if;
  if auth.uid() is null then
    perform private.fail('PT403', 'forbidden');
  end if;
  select a.id into v_account_id from public.credit_accounts a where a.user_id = auth.uid();
  if v_account_id is null then
    perform private.fail('PT404', 'account_not_found');
  end if;
  return v_account_id;
end
$$;
comment on function private.personal_account() is
  'The calling user''s personal account (a null p_account_id); service calls must name one.';
revoke all on function private.personal_account() from public, anon, authenticated, service_role;
grant execute on function private.personal_account() to authenticated, service_role;

revoke all on function private.is_service(), private.is_super_admin(), private.actor(),
  private.member_tenant_ids(), private.readable_account_ids(), private.managed_account_ids(),
  private.authorize(uuid, boolean, boolean),
  private.require_service() from public;
-- The read policies call these as the reading role.
grant execute on function private.is_super_admin(), private.member_tenant_ids(),
  private.readable_account_ids(), private.managed_account_ids() to authenticated, service_role;

-- ---------------------------------------------------------------------------
-- Read policies (one permissive policy per table, role and action).
-- ---------------------------------------------------------------------------

create policy tenants_read on public.tenants for select to authenticated
  using (id in (select private.member_tenant_ids()) or (select private.is_super_admin()));

create policy tenant_members_read on public.tenant_members for select to authenticated
  using (tenant_id in (select private.member_tenant_ids()) or (select private.is_super_admin()));

create policy credit_accounts_read on public.credit_accounts for select to authenticated
  using (user_id = (select auth.uid())
         or tenant_id in (select private.member_tenant_ids())
         or (select private.is_super_admin()));

create policy credit_wallets_read on public.credit_wallets for select to authenticated
  using (account_id in (select private.readable_account_ids()) or (select private.is_super_admin()));
