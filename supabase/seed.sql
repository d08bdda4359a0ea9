-- Local demo data (`supabase db reset` / `./dev start`): two users, a tenant,
-- plans, packs, prices and one license key. Never run this on production.

-- Users (Supabase Auth would create these; the trigger opens their accounts
-- on the free plan with the first month's allowance).
insert into auth.users (id, email, raw_app_meta_data, raw_user_meta_data) values
  ('11111111-1111-4111-8111-111111111111', 'alice@example.com', '{"provider": "email"}', '{"name": "Alice"}'),
  ('22222222-2222-4222-8222-222222222222', 'bob@example.com', '{"provider": "email"}', '{"name": "Bob"}'),
  ('33333333-3333-4333-8333-333333333333', 'admin@example.com',
   '{"provider": "email", "role": "super_admin"}', '{"name": "Platform admin"}')
on conflict (id) do nothing;

-- Catalog.
insert into public.credit_plans (id, name, monthly_credits, stripe_price_id) values
  ('pro', 'Pro', 500, 'price_demo_pro_monthly'),
  ('team', 'Team', 2000, 'price_demo_team_monthly')
on conflict (id) do nothing;

insert into public.credit_packs (stripe_price_id, credits, name) values
  ('price_demo_pack_100', 100, '100 credits'),
  ('price_demo_pack_1000', 1000, '1,000 credits')
on conflict (stripe_price_id) do nothing;

insert into public.credit_prices (operation, credits, credits_per_1k_input_tokens, credits_per_1k_output_tokens) values
  ('image.generate', 4, 0, 0),
  ('chat.completion', 1, 0.5, 1.5),
  ('video.generate', 25, 0, 0)
on conflict (operation) do nothing;

-- A tenant: Alice owns it, Bob is a member (can read, not spend).
insert into public.tenants (id, name) values ('44444444-4444-4444-8444-444444444444', 'Acme Studio')
on conflict (id) do nothing;
insert into public.tenant_members (tenant_id, user_id, role) values
  ('44444444-4444-4444-8444-444444444444', '11111111-1111-4111-8111-111111111111', 'owner'),
  ('44444444-4444-4444-8444-444444444444', '22222222-2222-4222-8222-222222222222', 'member')
on conflict do nothing;

-- Alice's demo credits, so the README's examples can spend (a purchase, as a
-- credit pack's checkout would record it; the key makes it once only).
select public.add_purchased_credits(a.id, 1000, 'seed:alice-demo-credits', null, 'Demo credits')
  from public.credit_accounts a
 where a.user_id = '11111111-1111-4111-8111-111111111111';

-- No license key here: anything written in this file is public, and a key in
-- it would spend Alice's credits on every machine that runs the seed. The local
-- stack (`./dev start`) stores a random one per data directory (kept with its
-- other keys in .local/, printed in its banner); with the Supabase CLI, create
-- one as Alice with `create_license_key`.
