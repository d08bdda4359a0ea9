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

# Benchmark 3 gives the odd accounts spend limits: the calls it compares pick even ones.
_PICK_EVEN = "\\set n 2 * random(1, :accounts / 2)\n"


def on_even_accounts(script: str) -> str:
    """The same script picking only even accounts (those without spend limits in benchmark 3)."""
    return script.replace(_PICK, _PICK_EVEN, 1)


DEDUCT = (_PICK + _AS_SERVICE
          + f"SELECT public.deduct_credits({_ACCOUNT}, {_KEY.format(prefix='d')}, 1);\nEND;\n")

# The bare pair the contract function is compared with: the cheapest correct
# spend on plain tables (guarded decrement, one ledger row), no roles, no checks.
BARE_PAIR = (_PICK + "BEGIN;\n"
             f"UPDATE bench.accounts SET balance = balance - 1 WHERE id = {_ACCOUNT} AND balance >= 1;\n"
             f"INSERT INTO bench.ledger (account_id, amount) VALUES ({_ACCOUNT}, -1);\n"
             "END;\n")

# The contract (v3) broadcasts every committed balance change with
# realtime.send; these are the two baselines above with that broadcast added
# the way their authors would add it: the floor of a contract-complete spend,
# and the naive design meeting the live-balance rule.
BARE_PAIR_BROADCAST = BARE_PAIR.replace(
    "END;\n",
    f"SELECT realtime.send(jsonb_build_object('balance', a.balance), 'balance', 'credits:' || a.id, true) "
    f"FROM bench.accounts a WHERE a.id = {_ACCOUNT};\nEND;\n")

# The rows a deduct writes (the wallet update with the same guard, one
# transaction row of the same width) as plain statements: no function, no role
# switch, no checks. What the data model costs apart from the function layer.
SAME_WRITES = (_PICK + "BEGIN;\n"
               f"SELECT * FROM public.credit_wallets WHERE account_id = {_ACCOUNT} FOR UPDATE;\n"
               "INSERT INTO public.credit_transactions (account_id, kind, idempotency_key, request_hash, "
               "purchased, promotional_after, subscription_after, purchased_after, held_after, metadata) "
               f"VALUES ({_ACCOUNT}, 'spend', {_KEY.format(prefix='w')}, md5('x')::uuid, -1, 0, 0, 999, 0, "
               "'{}') ON CONFLICT (account_id, idempotency_key, origin) DO NOTHING;\n"
               f"UPDATE public.credit_wallets SET purchased = purchased - 1 WHERE account_id = {_ACCOUNT};\n"
               "END;\n")

# The naive design (benchmarks/load.py NAIVE_SCHEMA), called as our functions are.
NAIVE = (_PICK + _AS_SERVICE + f"SELECT bench.naive_deduct({_ACCOUNT}, 1);\nEND;\n")
NAIVE_BROADCAST = (_PICK + _AS_SERVICE
                   + f"SELECT realtime.send(bench.naive_deduct({_ACCOUNT}, 1), 'balance', 'credits:' || "
                   f"{_ACCOUNT}, true);\nEND;\n")

# Reserve then capture: two requests (two transactions), as a caller makes them
# around the work; one pgbench transaction is the pair.
RESERVE_CAPTURE = (_PICK + _AS_SERVICE
                   + f"SELECT public.reserve_credits({_ACCOUNT}, {_KEY.format(prefix='r')}, 1) ->> 'hold_id'"
                   " AS hold \\gset\nEND;\n"
                   + _AS_SERVICE + "SELECT public.capture_hold(:hold::uuid);\nEND;\n")

DEDUCT_BY_LICENSE = (_PICK + _AS_SERVICE
                     + f"SELECT public.deduct_credits_by_license({license_key_sql(':n')}, "
                     f"{_KEY.format(prefix='l')}, 1);\nEND;\n")

# Holds priced from tokens (the 'bench-llm' price: 1 credit + 1 per 1k input + 2 per 1k output tokens),
# captured with the actual tokens: compared with RESERVE_CAPTURE (fixed amounts).
RESERVE_CAPTURE_TOKENS = (
    _PICK + _AS_SERVICE
    + f"SELECT public.reserve_credits({_ACCOUNT}, {_KEY.format(prefix='t')}, p_operation => 'bench-llm', "
    "p_input_tokens => 200, p_output_tokens => 400) ->> 'hold_id' AS hold \\gset\nEND;\n"
    + _AS_SERVICE
    + "SELECT public.capture_hold(:hold::uuid, p_input_tokens => 180, p_output_tokens => 250);\nEND;\n")


def _as_owner(n: str) -> str:
    """The REST layer's statements for the account's own user (authenticated, its JWT claims)."""
    return ("BEGIN;\nSET LOCAL ROLE authenticated;\n"
            "SELECT set_config('request.jwt.claims', json_build_object('sub', md5('bench-user-' || "
            f"{n})::uuid, 'role', 'authenticated')::text, true);\n")


# The owner's own deduct on an account without limits (even n) and on one
# whose limits apply to them (odd n, benchmarks/load.py load_limits).
DEDUCT_AS_OWNER = (_PICK_EVEN + _as_owner(":n")
                   + f"SELECT public.deduct_credits({_ACCOUNT}, {_KEY.format(prefix='o')}, 1);\nEND;\n")
DEDUCT_AS_LIMITED = ("\\set n 2 * random(1, :accounts / 2) - 1\n" + _as_owner(":n")
                     + f"SELECT public.deduct_credits({_ACCOUNT}, {_KEY.format(prefix='m')}, 1);\nEND;\n")
