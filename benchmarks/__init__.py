"""Benchmarks of the credits engine: `python -m benchmarks` (or `./dev bench`).

Each benchmark runs against a PostgreSQL of its own (embedded, or the server
named by ``DATABASE_URL``) with the project's migrations applied, and compares
the contract functions with the bare SQL they must stay close to. See
docs/benchmarks.md for what is measured and the latest numbers.
"""
