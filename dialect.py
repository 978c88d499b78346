"""Everything that depends on the database engine lives here, and only here.

The rest of the code speaks portable SQLAlchemy. SQLite gets WAL mode and a cheap
cross-process change detector (`PRAGMA data_version`); other engines fall back to a
bounded periodic re-check.
"""
import sqlite3

from sqlalchemy import event


def is_sqlite(engine):
    """Tells whether the engine talks to SQLite."""
    return engine.dialect.name == "sqlite"


def engine_options(url, pool_size, pool_overflow):
    """Returns create_engine options that suit the database at url."""
    if url.startswith("sqlite"):
        # Held polls read concurrently from many threads; SQLite connections are cheap.
        return {"pool_size": pool_size, "max_overflow": pool_overflow, "pool_timeout": 10,
                "connect_args": {"timeout": 15, "check_same_thread": False}}
    return {"pool_size": pool_size, "max_overflow": pool_overflow, "pool_pre_ping": True,
            "pool_timeout": 10}


def tune_engine(engine):
    """Installs per-connection settings for the engine's dialect."""
    if not is_sqlite(engine):
        return

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        # WAL lets held polls read while the writer thread commits; NORMAL sync is
        # durable across application crashes, which is the failure mode we care about.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=15000")
        cursor.close()


class ChangeDetector:
    """Tells cheaply whether any process may have committed since the last call."""

    def __init__(self, engine):
        self._path = None
        self._connection = None
        self._last = None
        if is_sqlite(engine):
            self._path = engine.url.database
        # Without a cheap signal every check reports a possible change.
        self.interval_floor = 0.0 if self._path else 0.2

    def changed(self):
        """Returns True when the database may hold commits not seen at the last call."""
        if not self._path or self._path == ":memory:":
            return True
        try:
            if self._connection is None:
                self._connection = sqlite3.connect(self._path, check_same_thread=False, timeout=5)
            version = self._connection.execute("PRAGMA data_version").fetchone()[0]
        except sqlite3.Error:
            self.close()
            return True
        changed = version != self._last
        self._last = version
        return changed

    def close(self):
        """Closes the detector's own connection."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def checkpoint(engine):
    """Folds the SQLite write-ahead log back into the database file."""
    if is_sqlite(engine):
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
