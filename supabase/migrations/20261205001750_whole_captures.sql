-- A hold captured whole with nothing claimed on it: every part's fate is
-- spend, so private.end_hold writes the spend without computing the fates
-- (the general rule stays for partial captures, claims and lapsed holds).

create or replace function private.end_hold(p_hold public.credit_holds, p_charge bigint,
                                 p_metadata jsonb default null, p_actor uuid default null,
                                 p_extra bigint default 0, p_usage jsonb default null)
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
  v_extra private.split := row(0, 0, 0)::private.split;
begin
  if p_charge = p_hold.amount and p_extra = 0 and p_hold.claims = '[]'::jsonb then
    -- Everything charged, nothing claimed: every part's fate is spend (the
    -- rule below, without computing it); the grants gave these credits at
    -- reserve, nothing goes back, nothing expires.
    v_spend := private.post(p_hold.account_id, 'spend', -p_hold.promotional, -p_hold.subscription,
                            -p_hold.purchased, -p_hold.promotional, -p_hold.subscription, -p_hold.purchased,
                            p_origin => 'system', p_ref_id => p_hold.id, p_metadata => p_metadata,
                            p_actor => p_actor,
                            p_period_start => case when p_hold.subscription > 0 then p_hold.period_start end,
                            p_period_end => case when p_hold.subscription > 0 then p_hold.period_end end,
                            p_operation => p_hold.operation, p_model => p_usage ->> 'model',
                            p_input_tokens => (p_usage ->> 'input_tokens')::integer,
                            p_output_tokens => (p_usage ->> 'output_tokens')::integer, p_price => p_hold.price);
    update public.credit_wallets w
       set next_hold_expiry = (select min(h.expires_at) from public.credit_holds h
                                where h.account_id = p_hold.account_id and h.status = 'active'
                                  and h.id <> p_hold.id)
     where w.account_id = p_hold.account_id and w.next_hold_expiry >= p_hold.expires_at
    returning w.* into v_wallet;
    if v_wallet.account_id is null then
      select * into v_wallet from public.credit_wallets w where w.account_id = p_hold.account_id;
    end if;
    if v_wallet.limited then
      perform private.count_usage(v_wallet, p_hold.actor_id, p_charge, -p_hold.amount);
    end if;
    return v_spend;
  end if;
  select * into v_wallet from public.credit_wallets w where w.account_id = p_hold.account_id;
  if p_extra > 0 then
    v_extra := private.spend_split(v_wallet.promotional - v_wallet.held_promotional,
                                   v_wallet.subscription - v_wallet.held_subscription,
                                   v_wallet.purchased - v_wallet.held_purchased, p_extra);
  end if;
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

  if v_sum.sp + v_sum.ss + v_sum.su + p_extra > 0 then
    v_spend := private.post(p_hold.account_id, 'spend', -v_sum.sp - v_extra.promotional,
                            -v_sum.ss - v_extra.subscription, -v_sum.su - v_extra.purchased,
                            -v_sum.sp, -v_sum.ss, -v_sum.su, p_origin => 'system', p_ref_id => p_hold.id,
                            p_metadata => p_metadata, p_actor => p_actor,
                            p_period_start => case when v_sum.ss > 0 then p_hold.period_start end,
                            p_period_end => case when v_sum.ss > 0 then p_hold.period_end end,
                            p_operation => p_hold.operation, p_model => p_usage ->> 'model',
                            p_input_tokens => (p_usage ->> 'input_tokens')::integer,
                            p_output_tokens => (p_usage ->> 'output_tokens')::integer,
                            p_price => p_hold.price,
                            p_outcome => case when p_extra > 0 then jsonb_build_object(
                                           'extra', jsonb_build_object('promotional', v_extra.promotional,
                                                                       'subscription', v_extra.subscription,
                                                                       'purchased', v_extra.purchased)) end);
  end if;
  -- One clawback row per claim's payment, key and grant (a won dispute gives
  -- back what its claims took, into the same grants).
  for v_row in select f.f_pool, f.f_ref, f.f_key, f.f_grant, sum(f.f_amount)::bigint as amount
                 from private.fates(v_fates) f
                where p_hold.claims <> '[]'::jsonb and f.f_fate = 'clawback'
                group by f.f_pool, f.f_ref, f.f_key, f.f_grant order by f.f_pool, f.f_ref, f.f_key, f.f_grant loop
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
                         p_period_end => case when v_row.f_pool = 'subscription' then p_hold.period_end end,
                         p_outcome => case when v_row.f_grant is not null
                                           then jsonb_build_object('grants',
                                                  jsonb_build_object(v_row.f_grant::text, v_row.amount)) end);
  end loop;
  if v_sum.ep + v_sum.es > 0 then
    perform private.post(p_hold.account_id, 'expire', -v_sum.ep, -v_sum.es, 0, -v_sum.ep, -v_sum.es, 0,
                         p_origin => 'system', p_ref_id => p_hold.id,
                         p_metadata => jsonb_build_object('reason', 'expired while held'),
                         p_period_start => case when v_sum.es > 0 then p_hold.period_start end,
                         p_period_end => case when v_sum.es > 0 then p_hold.period_end end);
  end if;
  -- The hold ends (its caller records how, in the same transaction): what it
  -- released is free again, and the next hold to lapse is another.
  if v_sum.fp + v_sum.fs + v_sum.fu > 0 then
    -- Released credits go back to their grants (spends since are attributed
    -- first; a calendar allowance has no row: it is the front, it gets them).
    select * into v_wallet from public.credit_wallets w where w.account_id = p_hold.account_id;
    for v_row in select distinct f.f_pool from private.fates(v_fates) f
                  where f.f_fate = 'free' and f.f_grant is not null loop
      perform private.materialize_grants(v_wallet, v_row.f_pool);
    end loop;
    update private.grants p set remaining = p.remaining + f.amount
      from (select s.f_grant, sum(s.f_amount) as amount from private.fates(v_fates) s
             where s.f_fate = 'free' and s.f_grant is not null group by s.f_grant) f
     where p.id = f.f_grant;
  end if;
  update public.credit_wallets w
     set held_promotional = w.held_promotional - v_sum.fp,
         held_subscription = w.held_subscription - v_sum.fs,
         held_purchased = w.held_purchased - v_sum.fu,
         next_hold_expiry = (select min(h.expires_at) from public.credit_holds h
                              where h.account_id = p_hold.account_id and h.status = 'active'
                                and h.id <> p_hold.id)
   where w.account_id = p_hold.account_id
  returning w.* into v_wallet;
  if v_sum.fp > 0 then
    perform private.materialize_grants(v_wallet);
  end if;
  if v_wallet.limited then
    perform private.count_usage(v_wallet, p_hold.actor_id, p_charge + p_extra, -p_hold.amount);
  end if;
  if v_sum.fp + v_sum.fs + v_sum.fu > 0 then
    perform private.settle_debt(p_hold.account_id);
  end if;
  return v_spend;
end
$$;

