"""Everything that depends on the database engine lives here, and only here.

The rest of the code speaks portable SQLAlchemy. SQLite gets WAL mode, a cheap
cross-process change detector (`PRAGMA data_version`) and a file lock for migrations.
PostgreSQL gets LISTEN/NOTIFY, so a poll on one host wakes when another host writes,
and an advisory lock for migrations. Other engines fall back to a bounded periodic
re-check and no migration lock.
"""
import fcntl
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager

from sqlalchemy import event, text

log = logging.getLogger(__name__)

# The channel that carries "these messages changed" between hosts sharing PostgreSQL.
CHANGE_CHANNEL = "relay_message_changes"
# Whatever the notifications say, a waiting poll's message is re-read at least this often.
LISTEN_FALLBACK_SECONDS = 1.0
# PostgreSQL caps a notification's payload below 8000 bytes.
NOTIFY_PAYLOAD_BYTES = 7000
# The write-ahead log file is cut back to this size each time a checkpoint resets it.
WAL_SIZE_LIMIT_BYTES = 4 * 1024 * 1024
# How long a SQLite statement waits for another connection's write lock before it fails.
BUSY_TIMEOUT_MS = 15000
# reclaim_space gives back at most this many free pages per call, so it never blocks writers for long.
RECLAIM_PAGES_PER_CALL = 4096
# Arbitrary but fixed: every process of every host that migrates takes the same lock.
MIGRATION_LOCK_KEY = 0x72656C6179  # "relay"
# The first half of the two-part advisory lock keys that serialize one owner's posts.
OWNER_LOCK_SPACE = 0x72656C  # "rel"


def is_sqlite(engine):
    """Tells whether the engine talks to SQLite."""
    return engine.dialect.name == "sqlite"


def is_postgresql(engine):
    """Tells whether the engine talks to PostgreSQL."""
    return engine.dialect.name == "postgresql"


def normalize_url(url):
    """Returns the database URL with plain PostgreSQL URLs pointed at the psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def engine_options(url, pool_size, pool_overflow):
    """Returns create_engine options that suit the database at url."""
    if url.startswith("sqlite"):
        # Held polls read concurrently from many threads; SQLite connections are cheap to keep but
        # not to open (seven pragmas each): under a burst of replies a pool of 10 opened and closed
        # overflow connections all the time, so SQLite keeps every connection it opens.
        return {"pool_size": pool_size + pool_overflow, "max_overflow": 0, "pool_timeout": 10,
                "connect_args": {"timeout": 15, "check_same_thread": False}}
    options = {"pool_size": pool_size, "max_overflow": pool_overflow, "pool_pre_ping": True,
               "pool_timeout": 10}
    if url.startswith("postgresql+psycopg"):
        options["connect_args"] = {"connect_timeout": 10, "application_name": "relay"}
    return options


def tune_engine(engine):
    """Installs per-connection settings for the engine's dialect."""
    if not is_sqlite(engine):
        return

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        if cursor.execute("PRAGMA page_count").fetchone()[0] == 0:
            # Only a new, empty database can take it (elsewhere the pragma waits for the write
            # lock): deleted pages can then be given back to the file system (reclaim_space).
            # Older databases keep reusing their free pages.
            cursor.execute("PRAGMA auto_vacuum=INCREMENTAL")
        # WAL lets held polls read while the writer thread commits; NORMAL sync is
        # durable across application crashes, which is the failure mode we care about.
        cursor.execute("PRAGMA journal_mode=WAL")
        # However busy, the log file shrinks back to this size whenever a checkpoint resets it.
        cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.close()


def storable_text(bind, value):
    """Returns value as the engine of bind (a connection or engine) can store it in a text column."""
    if value is None or bind.dialect.name != "postgresql" or "\x00" not in value:
        return value
    # PostgreSQL refuses NUL in text; U+FFFD keeps every character offset unchanged.
    return value.replace("\x00", "\ufffd")


def lock_owner(conn, owner):
    """Serializes, until conn's transaction ends, the transactions that check and add one owner's messages.

    SQLite already runs one writing transaction at a time. PostgreSQL runs them side by side,
    and at READ COMMITTED two of them would each count the other's new reply as absent.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:space, hashtext(:owner))"),
                     {"space": OWNER_LOCK_SPACE, "owner": owner})


def announce_changes(conn, message_ids):
    """Tells every host that message_ids changed, once conn's transaction commits (PostgreSQL only)."""
    if conn.dialect.name != "postgresql" or not message_ids:
        return
    for payload in _payloads(message_ids):
        conn.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANGE_CHANNEL, "payload": payload})


def _payloads(message_ids):
    batch, size = [], 0
    for message_id in message_ids:
        if batch and size + len(message_id) + 1 > NOTIFY_PAYLOAD_BYTES:
            yield ",".join(batch)
            batch, size = [], 0
        batch.append(message_id)
        size += len(message_id) + 1
    if batch:
        yield ",".join(batch)


def change_detector(engine):
    """Returns the cheapest way this engine offers to learn that other processes wrote."""
    if is_postgresql(engine) and engine.dialect.driver == "psycopg":
        return ListenDetector(engine)
    return ChangeDetector(engine)


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

    def changes(self, watched):
        """Returns those of the watched message ids that may have changed since the last call."""
        return list(watched) if self.changed() else []

    def wait(self):
        """Returns at once: the caller's own pacing decides how often changes() is asked."""

    def wake(self):
        """Ends a wait() early (nothing to do here)."""

    def close(self):
        """Closes the detector's own connection."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class ListenDetector:
    """Learns from PostgreSQL notifications which messages any host changed.

    A named daemon thread keeps one dedicated connection (outside the pool, in autocommit,
    so it never holds a transaction) listening on CHANGE_CHANNEL. When the connection is
    lost, or LISTEN_FALLBACK_SECONDS pass, every watched message counts as changed.
    """

    def __init__(self, engine, fallback_seconds=LISTEN_FALLBACK_SECONDS):
        cargs, cparams = engine.dialect.create_connect_args(engine.url)
        cparams.pop("context", None)
        self._connect_args = (cargs, cparams)
        self._dbapi = engine.dialect.loaded_dbapi
        self._fallback = fallback_seconds
        self._lock = threading.Lock()
        self._news = threading.Event()
        self._changed_ids = set()
        self._everything = True
        self._next_full_check = time.monotonic() + fallback_seconds
        self._closed = False
        self.interval_floor = 0.0
        self.connected = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="change-listener", daemon=True)
        self._thread.start()

    def changed(self):
        """Returns True when some message may have changed since the last call."""
        with self._lock:
            found = self._everything or bool(self._changed_ids) or time.monotonic() >= self._next_full_check
            if found:
                self._everything = False
                self._changed_ids.clear()
                self._news.clear()
                self._next_full_check = time.monotonic() + self._fallback
        return found

    def changes(self, watched):
        """Returns those of the watched message ids that may have changed since the last call."""
        with self._lock:
            if self._everything or time.monotonic() >= self._next_full_check:
                self._everything = False
                self._changed_ids.clear()
                self._news.clear()
                self._next_full_check = time.monotonic() + self._fallback
                return list(watched)
            hits = [message_id for message_id in watched if message_id in self._changed_ids]
            self._changed_ids.clear()
            self._news.clear()
            return hits

    def wait(self):
        """Blocks until a notification arrives or the fallback re-check is due."""
        with self._lock:
            left = self._next_full_check - time.monotonic()
        self._news.wait(max(0.0, left))

    def wake(self):
        """Ends a wait() early."""
        self._news.set()

    def close(self):
        """Stops listening; the listener thread closes its connection within half a second."""
        self._closed = True
        self._news.set()

    def _listen(self):
        backoff = 0.5
        while not self._closed:
            connection = None
            try:
                cargs, cparams = self._connect_args
                # Keepalives let a silently dropped network path end in an error and a reconnect.
                connection = self._dbapi.connect(*cargs, **cparams, autocommit=True, keepalives=1,
                                                 keepalives_idle=30, keepalives_interval=10, keepalives_count=3)
                connection.execute(f"LISTEN {CHANGE_CHANNEL}")
                self._everything_changed()  # whatever was sent while we were not listening
                self.connected.set()
                backoff = 0.5
                while not self._closed:
                    for notification in connection.notifies(timeout=0.5):
                        self._note(notification.payload)
            except Exception as error:
                if not self._closed:
                    log.warning("listening for changes failed (%s); polls re-check every %.1f s meanwhile",
                                error.__class__.__name__, self._fallback)
            finally:
                self.connected.clear()
                if connection is not None:
                    try:
                        connection.close()
                    except Exception:
                        pass
            self._everything_changed()
            deadline = time.monotonic() + backoff
            while not self._closed and time.monotonic() < deadline:
                time.sleep(0.1)
            backoff = min(backoff * 2, 5.0)

    def _note(self, payload):
        with self._lock:
            if payload:
                self._changed_ids.update(payload.split(","))
            else:
                self._everything = True
            if len(self._changed_ids) > 50000:
                # Nobody has asked for a long while; a full re-check is cheaper than the memory.
                self._changed_ids.clear()
                self._everything = True
        self._news.set()

    def _everything_changed(self):
        with self._lock:
            self._everything = True
        self._news.set()


@contextmanager
def migration_lock(engine):
    """Yields a connection while holding the lock that lets only one process migrate at a time."""
    if is_postgresql(engine):
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            conn.commit()
            try:
                yield conn
            finally:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
                conn.commit()
        return
    path = engine.url.database if is_sqlite(engine) else None
    if not path or path == ":memory:" or path.startswith("file:"):
        with engine.connect() as conn:
            yield conn
        return
    with open(os.path.abspath(path) + ".migrate-lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            with engine.connect() as conn:
                yield conn
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def checkpoint(engine):
    """Folds the SQLite write-ahead log back into the database file."""
    if is_sqlite(engine):
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


@contextmanager
def busy_fails_at_once(conn):
    """Makes conn's statements fail at once on a held SQLite write lock instead of waiting in SQLite.

    SQLite's own wait sleeps 1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50, 100 ms between looks. In a
    burst of posts the chunk writer met one busy transaction after another and slept through up
    to half a second with tokens waiting; a caller that looks again every millisecond (is_busy)
    gets the lock as soon as it is free.
    """
    if conn.dialect.name != "sqlite":
        yield
        return
    # On the driver's connection: through SQLAlchemy the pragma would begin a transaction.
    driver = conn.connection.driver_connection
    driver.execute("PRAGMA busy_timeout=0")
    try:
        yield
    finally:
        driver.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


def is_busy(error):
    """Tells whether error is SQLite's "database is locked": another connection holds the write lock."""
    original = getattr(error, "orig", error)
    return isinstance(original, sqlite3.OperationalError) and (
        getattr(original, "sqlite_errorcode", 0) & 0xFF in (5, 6) or "locked" in str(original))


def reclaim_space(engine, wait_seconds=0.2):
    """Gives free pages back to the file system and empties the write-ahead log (SQLite only).

    Waits at most wait_seconds for other connections, so writers are never held up for long;
    returns False when it had to give up, and the next call tries again.
    """
    path = engine.url.database if is_sqlite(engine) else None
    if not path or path == ":memory:":
        return True
    try:
        # A connection of its own, outside the pool, so no pooled connection's settings change.
        connection = sqlite3.connect(path, timeout=wait_seconds, isolation_level=None)
    except sqlite3.Error:
        return False
    try:
        # executescript steps the pragma to its end; execute would free a single page.
        connection.executescript(f"PRAGMA incremental_vacuum({RECLAIM_PAGES_PER_CALL});")
        busy = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        return busy == 0
    except sqlite3.Error:
        return False
    finally:
        connection.close()
