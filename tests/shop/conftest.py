"""Fixtures of the shop's tests alone: its PostgreSQL, one embedded server per session and a database
per test (tests/shop_database.py). The fixtures of both trees are in tests/conftest.py.
"""

from tests.shop_database import shop_dsn, shop_postgres  # noqa: F401  (the shop's PostgreSQL, session-wide)
