"""PostgreSQL for tests: a fresh database per test on the server that TEST_DATABASE_URL names.

TEST_DATABASE_URL is any URL of that server (for example the one `scripts/postgres.sh start`
prints); its own database only serves to create and drop the fresh ones.
"""
import os
import secrets
import threading
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from dialect import normalize_url

_lock = threading.Lock()
_admin = {}


def server_url():
    """Returns the test server's URL, or None when the tests run on SQLite only."""
    raw = os.environ.get("TEST_DATABASE_URL", "").strip()
    return normalize_url(raw) if raw else None


def enabled():
    """Tells whether the tests run against PostgreSQL."""
    return server_url() is not None


def admin_engine():
    """Returns an autocommit engine on the test server's own database."""
    url = server_url()
    with _lock:
        if url not in _admin:
            _admin[url] = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        return _admin[url]


def create_database(prefix="relay_test"):
    """Creates an empty database on the test server and returns its URL."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    with admin_engine().connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    return make_url(server_url()).set(database=name).render_as_string(hide_password=False)


def drop_database(url):
    """Drops a database that create_database made, closing whatever is still connected to it."""
    name = make_url(url).database
    with admin_engine().connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def fresh_database(prefix="relay_test"):
    """Yields the URL of a new empty database, dropped afterwards."""
    url = create_database(prefix)
    try:
        yield url
    finally:
        drop_database(url)


def open_transactions(url, idle_seconds=0.5):
    """Returns how many sessions of the database at url have sat in a transaction, idle, for idle_seconds."""
    name = make_url(url).database
    with admin_engine().connect() as conn:
        return conn.exec_driver_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %(name)s"
            " AND state LIKE 'idle in transaction%%'"
            " AND clock_timestamp() - state_change > make_interval(secs => %(idle)s)",
            {"name": name, "idle": idle_seconds}).scalar_one()


def query(database_url, sql, **params):
    """Runs one SQL statement on the database at url (SQLite or PostgreSQL) and returns its rows."""
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(sql), params)
            return result.all() if result.returns_rows else []
    finally:
        engine.dispose()
