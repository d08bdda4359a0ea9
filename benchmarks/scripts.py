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

# Reserve then capture: two requests (two transactions), as a caller makes them
# around the work; one pgbench transaction is the pair.
RESERVE_CAPTURE = (_PICK + _AS_SERVICE
                   + f"SELECT public.reserve_credits({_ACCOUNT}, {_KEY.format(prefix='r')}, 1) ->> 'hold_id'"
                   " AS hold \\gset\nEND;\n"
                   + _AS_SERVICE + "SELECT public.capture_hold(:hold::uuid);\nEND;\n")

DEDUCT_BY_LICENSE = (_PICK + _AS_SERVICE
                     + f"SELECT public.deduct_credits_by_license({license_key_sql(':n')}, "
                     f"{_KEY.format(prefix='l')}, 1);\nEND;\n")
