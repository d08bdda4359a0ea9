-- The sign-up bonus, once per e-mail address.
--
-- Deleting a user deletes its account; creating the same user again used to
-- grant the free plan's signup_bonus again. Now a bonus is claimed by a salted
-- SHA-256 of the user's identity (the e-mail address, lower-cased and
-- trimmed; else the phone number), kept after the user is deleted. A user
-- with neither (an anonymous sign-in) gets it when one is first set, if that
-- identity never had it. The salt is random per database: the hashes are no
-- list of e-mail addresses.

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
                                null, 'sign-up bonus', '{"reason": "signup_bonus"}'::jsonb, null);
end
$$;

create or replace function private.open_account(p_user_id uuid, p_tenant_id uuid) returns uuid
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_plan public.credit_plans;
  v_account_id uuid;
  v_month record := private.month_of(now());
begin
  select * into v_plan from public.credit_plans p where p.id = 'free';
  insert into public.credit_accounts (user_id, tenant_id, plan_id)
  values (p_user_id, p_tenant_id, 'free')
  returning id into v_account_id;
  insert into public.credit_wallets (account_id, period_start, period_end)
  values (v_account_id, v_month.period_start, v_month.period_end);
  perform private.post(v_account_id, 'grant', p_subscription => coalesce(v_plan.monthly_credits, 0),
                       p_origin => 'system', p_metadata => '{"reason": "signup"}'::jsonb);
  if p_user_id is not null then
    perform private.grant_signup_bonus(v_account_id, p_user_id);
  end if;
  return v_account_id;
end
$$;

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
