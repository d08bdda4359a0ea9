-- Wallets, holds and spend counters reference their account without a
-- foreign key, as the ledger's rows and grants do: a reserve updates its
-- wallet twice and inserts a hold, a capture updates the wallet several
-- times, and each paid a check of the account's key. Only definer code
-- writes them, under the wallet's lock; private.delete_account_books (after
-- an account's delete) removes them with the account, as the cascade did.
alter table public.credit_wallets drop constraint credit_wallets_account_id_fkey;
alter table public.credit_holds drop constraint credit_holds_account_id_fkey;
alter table private.spend_usage drop constraint spend_usage_account_id_fkey;

create or replace function private.delete_account_books() returns trigger
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
begin
  delete from public.credit_transactions t where t.account_id = old.id;
  delete from private.grants g where g.account_id = old.id;
  delete from public.credit_holds h where h.account_id = old.id;
  delete from public.credit_wallets w where w.account_id = old.id;
  delete from private.spend_usage u where u.account_id = old.id;
  return old;
end
$$;

