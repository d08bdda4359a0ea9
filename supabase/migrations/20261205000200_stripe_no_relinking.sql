-- Stripe: an account is never relinked to another customer's subscription.
--
-- A subscription checkout names its account (client_reference_id or
-- metadata.account_id). If that account already has an active (or trialing,
-- or past-due) subscription of another Stripe customer, linking the new one
-- would detach the paying one: cancelling the new subscription would put the
-- account on free and the next reset would expire what the other customer
-- paid for. Such a checkout is refused (`account_has_active_subscription`),
-- recorded as failed for an operator, and changes nothing. The same
-- customer's second checkout (an upgrade by checkout) still replaces its own
-- subscription.

create or replace function private.stripe_link(p_account_id uuid, p_customer text, p_subscription text,
                                               p_status text, p_replace boolean) returns text[]
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
  v_account public.credit_accounts;
  v_other uuid;
  v_keys text[] := '{}';
begin
  select * into v_account from public.credit_accounts a where a.id = p_account_id for update;
  if p_replace and p_subscription is not null
     and v_account.stripe_subscription_id is not null
     and v_account.stripe_subscription_id <> p_subscription
     and coalesce(v_account.subscription_status, '') in ('active', 'trialing', 'past_due')
     and v_account.stripe_customer_id is distinct from p_customer then
    perform private.fail('PT409', 'account_has_active_subscription',
                         jsonb_build_object('account_id', p_account_id, 'subscription', p_subscription));
  end if;
  if p_customer is not null then
    if v_account.stripe_customer_id is null
       and not exists (select 1 from public.credit_accounts a where a.stripe_customer_id = p_customer) then
      update public.credit_accounts a set stripe_customer_id = p_customer, updated_at = now()
       where a.id = p_account_id;
    end if;
    v_keys := v_keys || ('customer:' || p_customer);
  end if;
  if p_subscription is not null then
    select a.id into v_other from public.credit_accounts a where a.stripe_subscription_id = p_subscription;
    if v_other is not null and v_other <> p_account_id then
      perform private.fail('PT409', 'subscription_linked_elsewhere',
                           jsonb_build_object('subscription', p_subscription));
    end if;
    if v_other is null and (p_replace or v_account.stripe_subscription_id is null
                            or coalesce(v_account.subscription_status, '') in ('canceled', 'incomplete_expired')) then
      update public.credit_accounts a
         set stripe_subscription_id = p_subscription, subscription_status = p_status, updated_at = now()
       where a.id = p_account_id;
    end if;
    v_keys := v_keys || ('subscription:' || p_subscription);
  end if;
  return v_keys;
end
$$;
