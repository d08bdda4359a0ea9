-- The limit and price helpers in PL/pgSQL: SQL-language functions with a
-- fixed search_path are not inlined, and their statements were planned on
-- every call (on PostgreSQL 15 always; on 18 through the plan cache each
-- call); PL/pgSQL keeps their plans for the session.

create or replace function private.price_of(p_operation text) returns jsonb
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

create or replace function private.priced(p_price jsonb, p_input_tokens bigint, p_output_tokens bigint) returns bigint
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  return (
    select ceil((p_price ->> 'credits')::numeric
                + coalesce(p_input_tokens, 0) * (p_price ->> 'credits_per_1k_input_tokens')::numeric / 1000
                + coalesce(p_output_tokens, 0) * (p_price ->> 'credits_per_1k_output_tokens')::numeric / 1000)::bigint
  );
end
$$;

create or replace function private.max_output_tokens(p_price jsonb, p_input_tokens bigint, p_budget bigint) returns bigint
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

create or replace function private.lapsed_held(p_account_id uuid, p_spender uuid) returns bigint
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

create or replace function private.is_plain_member(p_account_id uuid, p_user uuid) returns boolean
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

create or replace function private.applicable_limits(p_wallet public.credit_wallets, p_user uuid, p_key uuid)
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

create or replace function private.limit_room(p_wallet public.credit_wallets, p_user uuid, p_key uuid) returns bigint
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

