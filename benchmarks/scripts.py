"""pgbench scripts. Each contract call is one transaction shaped the way the
REST layer runs it: ``set local role``, the JWT claims in ``request.jwt.claims``,
then the function. Idempotency keys are fresh per call (client id + a random
uuid). ``:accounts`` is the number of accounts to pick from (1 = one hot account).
"""

from __future__ import annotations

from benchmarks.load import account_id_sql, license_key_sql

_AS_SERVICE = """BEGIN;
SET LOCAL ROLE service_role;
SELECT set_config('request.jwt.claims', '{"role": "service_role"}', true);
"""

_PICK = "\\set n random(1, :accounts)\n"
_ACCOUNT = account_id_sql(":n")
_KEY = "'{prefix}-' || :client_id || '-' || gen_random_uuid()"

DEDUCT = (_PICK + _AS_SERVICE
          + f"SELECT public.deduct_credits({_ACCOUNT}, {_KEY.format(prefix='d')}, 1);\nEND;\n")

# The bare pair the contract function is compared with: the cheapest correct
# spend on plain tables (guarded decrement, one ledger row), no roles, no checks.
BARE_PAIR = (_PICK + "BEGIN;\n"
             f"UPDATE bench.accounts SET balance = balance - 1 WHERE id = {_ACCOUNT} AND balance >= 1;\n"
             f"INSERT INTO bench.ledger (account_id, amount) VALUES ({_ACCOUNT}, -1);\n"
             "END;\n")

# The rows a deduct writes (the account update with the same guard, the
# transaction-log row with a result of the usual size, one ledger row) as plain
# statements: no function, no role switch, no checks. What the data model
# costs apart from the function layer; reported next to the other two.
_RESULT = ('{"transaction_id": "0190f3a0-0000-7000-8000-000000000000", "account_id": '
           '"0190f3a0-0000-7000-8000-000000000000", "charged": 1, "from_subscription": 0, '
           '"from_purchased": 1, "replayed": false, "balance": {"account_id": '
           '"0190f3a0-0000-7000-8000-000000000000", "subscription": 0, "purchased": 999, "held": 0, '
           '"available": 999, "total": 999, "period_start": "2026-11-01T00:00:00+00:00", '
           '"period_end": "2026-12-01T00:00:00+00:00"}}')
SAME_WRITES = (_PICK + "BEGIN;\n"
               "UPDATE public.credit_accounts SET subscription_balance = subscription_balance - "
               "least(subscription_balance, 1), purchased_balance = purchased_balance - "
               "(1 - least(subscription_balance, 1)), "
               "last_debit_subscription = least(subscription_balance, 1), "
               f"updated_at = now() WHERE id = {_ACCOUNT} "
               "AND subscription_balance + purchased_balance - held >= 1;\n"
               "INSERT INTO public.credit_transactions (account_id, kind, idempotency_key, request_hash, "
               f"result, amount, metadata) VALUES ({_ACCOUNT}, 'spend', {_KEY.format(prefix='w')}, "
               f"md5('x')::uuid, '{_RESULT}', 1, '{{}}') "
               "ON CONFLICT (account_id, idempotency_key) DO NOTHING;\n"
               "INSERT INTO public.credit_ledger (account_id, transaction_id, pool, amount, balance_after, "
               f"type, idempotency_key, metadata) VALUES ({_ACCOUNT}, gen_random_uuid(), 'purchased', "
               "-1, 999, 'spend', 'w', '{}');\n"
               "END;\n")

# Reserve then capture: two requests (two transactions), as a caller makes them
# around the work; one pgbench transaction is the pair.
RESERVE_CAPTURE = (_PICK + _AS_SERVICE
                   + f"SELECT public.reserve_credits({_ACCOUNT}, {_KEY.format(prefix='r')}, 1) ->> 'hold_id'"
                   " AS hold \\gset\nEND;\n"
                   + _AS_SERVICE + "SELECT public.capture_hold(:hold::uuid);\nEND;\n")

DEDUCT_BY_LICENSE = (_PICK + _AS_SERVICE
                     + f"SELECT public.deduct_credits_by_license({license_key_sql(':n')}, "
                     f"{_KEY.format(prefix='l')}, 1);\nEND;\n")
