-- An invoice's account is its customer's account.
--
-- Metadata naming another account than the one the invoice's customer is
-- linked to no longer fails the invoice: the customer's account is used (the
-- contract's order: the customer's account, else the named one). Metadata
-- naming an account linked to another customer is still refused.

-- The account of a subscription's invoice or event: its customer's account;
-- if none, the account its metadata names (the caller links it); else the
-- subscription's; null while none is known (parked). Metadata naming an
-- account linked to another customer is refused (account_of_another_customer):
-- an invoice acts only on its own customer's account.
create or replace function private.stripe_billing_account(p_hint text, p_customer text, p_subscription text) returns uuid
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
  v_id uuid;
  v_named public.credit_accounts;
begin
  if p_customer is not null then
    select a.id into v_id from public.credit_accounts a where a.stripe_customer_id = p_customer;
  end if;
  if p_hint is not null then
    if p_hint !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' then
      perform private.invalid('account_id', 'must be a uuid');
    end if;
    select * into v_named from public.credit_accounts a where a.id = p_hint::uuid;
    if v_named.id is null then
      perform private.fail('PT404', 'account_not_found', jsonb_build_object('account_id', p_hint));
    end if;
    if v_named.stripe_customer_id is not null and v_named.stripe_customer_id is distinct from p_customer then
      perform private.fail('PT409', 'account_of_another_customer',
                           jsonb_build_object('account_id', p_hint, 'customer', p_customer));
    end if;
    return coalesce(v_id, v_named.id);
  end if;
  if v_id is null and p_subscription is not null then
    select a.id into v_id from public.credit_accounts a
     where a.stripe_subscription_id = p_subscription
       and (a.stripe_customer_id is null or p_customer is null or a.stripe_customer_id = p_customer);
  end if;
  return v_id;
end
$$;
