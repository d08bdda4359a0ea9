-- Cheaper row checks on the rows every hold writes: a grant's pool and
-- source and a hold's status and overage policy become domains instead of
-- table CHECKs, which every statement updating the row prepared again (each
-- reserve updates its grants and inserts a hold; each capture or release
-- updates the hold and its grants). The credit_grants view reads those
-- columns: it is dropped and made again, unchanged.

create domain private.pool_name as text check (value in ('promotional', 'subscription', 'purchased'));
create domain private.grant_source_name as text
  check (value in ('invoice', 'checkout', 'topup', 'reset', 'signup_bonus', 'promotion', 'rollover', 'plan_change',
                   'refund', 'adjustment'));

create domain private.hold_status as text check (value in ('active', 'captured', 'released', 'expired'));
create domain private.overage_policy as text check (value in ('reject', 'if_available', 'overdraft'));

drop view public.credit_grants;

alter table private.grants
  drop constraint grants_pool_check,
  drop constraint grants_source_check,
  alter column pool type private.pool_name,
  alter column source type private.grant_source_name;

alter table public.credit_holds
  drop constraint credit_holds_status_check,
  drop constraint credit_holds_overage_check,
  alter column status drop default,
  alter column overage drop default,
  alter column status type private.hold_status,
  alter column overage type private.overage_policy,
  alter column status set default 'active',
  alter column overage set default 'reject';

create view public.credit_grants with (security_invoker = true) as
select g.id as grant_id, g.account_id, g.pool, g.source, g.stripe_ref, g.granted,
       (case when g.pool = 'promotional' and g.expires_at <= now() then 0 else coalesce(a.attributed, 0) end
        + coalesce((select sum(x.amount) from (
                      select (e ->> 'a')::bigint as amount from public.credit_holds h
                       cross join lateral jsonb_array_elements(h.parts) e
                       where h.account_id = g.account_id and h.status = 'active' and h.expires_at > now()
                         and (e ->> 'g')::uuid = g.id
                      union all
                      -- A lapsed hold's credits as its end will leave them (current_wallet's rule).
                      select f.f_amount from public.credit_holds h
                        join public.credit_wallets hw on hw.account_id = h.account_id
                       cross join lateral private.hold_fates(h, 0, hw.sub_epoch, now()) f
                       where h.account_id = g.account_id and h.status = 'active' and h.expires_at <= now()
                         and f.f_fate = 'free' and f.f_grant = g.id) x), 0))::bigint as remaining,
       g.expires_at, g.created_at
  from (select p.id, p.account_id, p.pool, p.source, p.stripe_ref, p.granted, p.expires_at, p.created_at
          from private.grants p
        union all
        -- Calendar allowances: the current one, and earlier ones active holds still reserve.
        select t.id, t.account_id, 'subscription', 'reset', null, t.subscription, t.period_end, t.created_at
          from public.credit_wallets w
         cross join lateral (select w.period_grant as id where w.period_grant is not null
                             union
                             select (e ->> 'g')::uuid from public.credit_holds h
                              cross join lateral jsonb_array_elements(h.parts) e
                              where h.account_id = w.account_id and h.status = 'active'
                                and e ->> 'p' = 'subscription') v
          join public.credit_transactions t on t.id = v.id and t.account_id = w.account_id and t.kind = 'grant'
         where not exists (select 1 from private.grants x where x.id = t.id)) g
  left join (select w.account_id, a.id, a.attributed
               from public.credit_wallets w
              cross join lateral (values ('promotional'), ('subscription'), ('purchased')) p(pool)
              cross join lateral private.grant_attribution(w, p.pool) a) a
    on a.account_id = g.account_id and a.id = g.id;
comment on view public.credit_grants is
  'Every arrival of credits (pool, source, Stripe reference, amount, expiry) and what is left of it now.';
revoke all on public.credit_grants from anon, authenticated, service_role;
grant select on public.credit_grants to authenticated, service_role;
