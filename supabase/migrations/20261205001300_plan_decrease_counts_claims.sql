-- A decrease counts what earlier clawbacks of the upgrade claimed on holds as
-- taken, and reports claims on holds as pending, not as shortfall.

-- A decrease invoiced mid-period that credits the customer money back
-- (p_credited, its negative proration) takes back, from this period's
-- increase grants, the credits that money had bought: floor(credits they
-- granted x p_credited / the positive proration paid for them), newest grant
-- first, never below zero (what was spent is the shortfall). Increases
-- recorded before the paid amount was kept count for nothing.
create or replace function private.stripe_plan_decrease(p_wallet public.credit_wallets, p_invoice text, p_credited bigint,
                                             p_touched text[])
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_granted bigint;
  v_paid bigint;
  v_target bigint;
  v_grant record;
  v_done bigint;
  v_take bigint;
  v_result jsonb;
  v_taken bigint := 0;
  v_pending bigint := 0;
  v_shortfall bigint := 0;
begin
  select coalesce(sum(t.promotional), 0), coalesce(sum((t.metadata ->> 'paid')::bigint), 0)
    into v_granted, v_paid
    from public.credit_transactions t
   where t.account_id = p_wallet.account_id and t.kind = 'promotion' and t.origin = 'stripe'
     and t.period_start = p_wallet.period_start and t.metadata ? 'allowance'
     and (t.metadata ->> 'paid')::bigint > 0;
  if v_paid = 0 then
    return private.stripe_result('ignored', 'not_an_increase', p_wallet.account_id);
  end if;
  v_target := least(v_granted, floor(v_granted::numeric * p_credited / v_paid)::bigint);
  for v_grant in select t.stripe_ref, sum(t.promotional)::bigint as granted, max(t.seq) as seq
                   from public.credit_transactions t
                  where t.account_id = p_wallet.account_id and t.kind = 'promotion' and t.origin = 'stripe'
                    and t.period_start = p_wallet.period_start and t.metadata ? 'allowance'
                    and (t.metadata ->> 'paid')::bigint > 0
                  group by t.stripe_ref order by max(t.seq) desc loop
    exit when v_taken + v_pending + v_shortfall >= v_target;
    -- Taken back so far, and claimed on active holds (as the clawback counts them).
    select coalesce(-sum(c.promotional + c.subscription + c.purchased), 0)
           + coalesce((select sum((e ->> 'amount')::bigint) from public.credit_holds h
                         cross join lateral jsonb_array_elements(h.claims) e
                        where h.account_id = p_wallet.account_id and h.status = 'active'
                          and e ->> 'stripe_ref' = v_grant.stripe_ref), 0)
      into v_done
      from public.credit_transactions c
     where c.account_id = p_wallet.account_id and c.stripe_ref = v_grant.stripe_ref
       and c.kind in ('clawback', 'reinstate');
    v_take := least(v_grant.granted - v_done, v_target - v_taken - v_pending - v_shortfall);
    continue when v_take <= 0;
    v_result := private.clawback(v_grant.stripe_ref, 'decrease:' || p_invoice || ':' || v_grant.stripe_ref,
                                 (v_done + v_take)::integer, 'plan decrease', 'stripe');
    v_taken := v_taken + (v_result ->> 'clawed_back')::bigint;
    v_pending := v_pending + (v_result ->> 'pending')::bigint;
    v_shortfall := v_shortfall + (v_result ->> 'shortfall')::bigint;
  end loop;
  return private.stripe_result('applied', 'allowance_lowered', p_wallet.account_id,
                               jsonb_build_object('clawed_back', v_taken, 'pending', v_pending,
                                                  'shortfall', v_shortfall), p_touched);
end
$$;
