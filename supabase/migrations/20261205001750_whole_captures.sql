-- A hold captured whole with nothing claimed on it: every part's fate is
-- spend, so private.end_hold writes the spend without computing the fates
-- (the general rule stays for partial captures, claims and lapsed holds).
-- A reserve by the service looks up no spend limit (none applies to it).

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

create or replace function private.reserve_credits(p_account_id uuid, p_idempotency_key text, p_amount integer,
                                        p_operation text, p_ttl_seconds integer, p_metadata jsonb,
                                        p_model text, p_input_tokens integer, p_output_tokens integer,
                                        p_overage text)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  v_cost bigint;
  v_hash uuid;
  v_wallet public.credit_wallets;
  v_entry public.credit_transactions;
  v_split private.split;
  v_parts jsonb := '[]'::jsonb;
  v_hold uuid := gen_random_uuid();
  v_tx uuid := private.uuid_v7();
  v_expires timestamptz;
  v_actor uuid;
  v_price jsonb;
  v_room bigint;
begin
  v_actor := private.authorize(p_account_id, true, true);
  v_cost := private.spend_cost(p_idempotency_key, p_amount, p_operation, p_model, p_input_tokens,
                               p_output_tokens, p_metadata);
  if v_cost < 1 then
    perform private.invalid('p_operation', 'a hold must reserve at least 1 credit');
  end if;
  if p_ttl_seconds is null or p_ttl_seconds not between 1 and (private.limits() ->> 'ttl_seconds')::integer then
    perform private.invalid('p_ttl_seconds', format('must be 1 to %s seconds', private.limits() ->> 'ttl_seconds'));
  end if;
  if p_overage is null or p_overage not in ('reject', 'if_available', 'overdraft') then
    perform private.invalid('p_overage', 'must be reject, if_available or overdraft');
  end if;
  if p_overage = 'overdraft' and not private.is_service() then
    perform private.fail('PT403', 'forbidden', '{"reason": "only the service makes overdraft holds"}'::jsonb);
  end if;
  v_hash := private.request_hash('reserve', jsonb_build_array(p_amount, p_operation, p_ttl_seconds, p_metadata,
                                                              p_model, p_input_tokens, p_output_tokens,
                                                              p_overage));
  v_expires := now() + make_interval(secs => p_ttl_seconds);
  if p_operation is not null then
    v_price := private.price_of(p_operation);
  end if;

  v_wallet := private.lock_wallet(p_account_id);
  v_entry := private.find_key(p_account_id, p_idempotency_key, v_hash);
  if v_entry.id is not null then
    return private.result(v_entry, true);
  end if;
  perform private.check_hold_bounds(v_wallet);
  if v_wallet.limited and v_actor is not null then
    perform private.check_limits(v_wallet, v_actor, null, v_cost);
  end if;
  if private.available(v_wallet) < v_cost then
    if v_price is not null then
      -- What the credits cover is also bounded by the maker's remaining limit.
      if v_wallet.limited and v_actor is not null then
        v_room := private.limit_room(v_wallet, v_actor, null);
      end if;
      perform private.fail('PT402', 'insufficient_credits', jsonb_build_object(
        'required', v_cost, 'available', private.available(v_wallet),
        'max_output_tokens', private.max_output_tokens(v_price, p_input_tokens,
                                                       least(private.available(v_wallet), v_room))));
    end if;
    perform private.insufficient(v_cost, private.available(v_wallet));
  end if;
  v_split := private.spend_split(v_wallet.promotional - v_wallet.held_promotional,
                                 v_wallet.subscription - v_wallet.held_subscription,
                                 v_wallet.purchased - v_wallet.held_purchased, v_cost);
  -- Which grants, pool by pool: the front of each.
  if v_split.promotional > 0 then
    v_parts := private.take_front(v_wallet, 'promotional', v_split.promotional);
  end if;
  if v_split.subscription > 0 then
    v_parts := v_parts || private.take_front(v_wallet, 'subscription', v_split.subscription);
  end if;
  if v_split.purchased > 0 then
    v_parts := v_parts || private.take_front(v_wallet, 'purchased', v_split.purchased);
  end if;
  insert into public.credit_holds (id, account_id, transaction_id, amount, promotional, subscription, purchased,
                                   parts, sub_epoch, period_start, period_end, expires_at, operation,
                                   metadata, actor_id, overage, price, input_tokens, output_tokens, model)
  values (v_hold, p_account_id, v_tx, v_cost, v_split.promotional, v_split.subscription, v_split.purchased,
          v_parts, v_wallet.sub_epoch, v_wallet.period_start, v_wallet.period_end, v_expires, p_operation,
          coalesce(p_metadata, '{}'::jsonb), v_actor, p_overage, v_price, p_input_tokens, p_output_tokens,
          p_model);
  update public.credit_wallets w
     set next_hold_expiry = least(coalesce(w.next_hold_expiry, v_expires), v_expires),
         hold_minute = date_trunc('minute', now()),
         hold_minute_count = case when w.hold_minute = date_trunc('minute', now())
                                  then w.hold_minute_count + 1 else 1 end
   where w.account_id = p_account_id;
  v_entry := private.post(p_account_id, 'reserve',
                          p_held_promotional => v_split.promotional, p_held_subscription => v_split.subscription,
                          p_held_purchased => v_split.purchased, p_key => p_idempotency_key, p_hash => v_hash,
                          p_ref_id => v_hold, p_metadata => p_metadata, p_actor => v_actor,
                          p_operation => p_operation, p_id => v_tx,
                          p_outcome => jsonb_build_object('amount', v_cost, 'expires_at', v_expires));
  if v_wallet.limited then
    perform private.count_usage(v_wallet, v_actor, 0, v_cost);
  end if;
  return private.result(v_entry, false);
end
$$;

