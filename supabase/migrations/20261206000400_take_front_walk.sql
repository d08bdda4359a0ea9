-- A hold's grants found by walking the pool's few live grants in spending
-- order (private.grant_attribution's rule, stopped once past what is taken)
-- instead of a set query with windows on every reserve.

create or replace function private.take_front(p_wallet public.credit_wallets, p_pool text, p_amount bigint)
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

