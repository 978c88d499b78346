"""The chunk buffer: append text in batches, read after a cursor, wait for and announce new text."""
import bisect
import collections
import logging
import operator
import threading
import time

from sqlalchemy import bindparam, delete, or_, select, update

import dialect
from models import Chunk, Message, RUNNING, now

log = logging.getLogger(__name__)

messages = Message.__table__
chunks = Chunk.__table__


class BadCursor(ValueError):
    """A cursor that is malformed, negative, or past the end of the text."""


def parse_cursor(raw):
    """Returns the character offset a client cursor names."""
    if raw is None or raw == "":
        return 0
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12:
        raise BadCursor(raw)
    return int(raw)


def text_after(conn, row, cursor):
    """Returns the committed text of a message after cursor, up to the end known in row."""
    if cursor > row.length:
        raise BadCursor(str(cursor))
    if row.status not in RUNNING:
        return row.content[cursor:]
    if cursor == row.length:
        return ""
    pieces = conn.execute(
        select(chunks.c.end_offset, chunks.c.text)
        .where(chunks.c.message_id == row.id, chunks.c.end_offset > cursor)
        .order_by(chunks.c.end_offset)
    ).all()
    text = _join_from(pieces, cursor)
    if len(text) < row.length - cursor:
        # The reply became final and was compacted between our two reads.
        fresh = conn.execute(select(messages.c.content).where(messages.c.id == row.id)).first()
        if fresh is not None:
            text = fresh.content[cursor:]
    return text


def _join_from(pieces, cursor):
    parts = []
    for end_offset, text in pieces:
        start = end_offset - len(text)
        parts.append(text[cursor - start:] if start < cursor else text)
    return "".join(parts)


def full_text(conn, message_id):
    """Returns all committed text of a running message."""
    pieces = conn.execute(
        select(chunks.c.text).where(chunks.c.message_id == message_id).order_by(chunks.c.end_offset)
    ).scalars().all()
    return "".join(pieces)


def final_values(conn, status, error=None, finish_reason=None, usage=None, has_image=False):
    """Returns every column that making a message final sets."""
    usage = usage or {}
    return {"status": status, "finished_at": now(), "worker_id": None, "lease_expires_at": None,
            "error_code": error[0] if error is not None else None,
            "error_message": dialect.storable_text(conn, error[1]) if error is not None else None,
            "finish_reason": str(finish_reason)[:40] if finish_reason else None,
            "prompt_tokens": _int_or_none(usage.get("prompt_tokens")),
            "completion_tokens": _int_or_none(usage.get("completion_tokens")),
            "has_image": 1 if has_image else 0}


def finalize(conn, message_id, status, error=None, finish_reason=None, usage=None, has_image=False, text=None):
    """Makes a running message final and compacts its chunks into content.

    text is the message's whole text when the caller holds it (the chunk writer of its own
    replies); else the chunks are read. Returns the columns set (content included), or None
    when the message was final already.
    """
    values = final_values(conn, status, error, finish_reason, usage, has_image)
    values["message_id"] = message_id
    if text is not None:
        values.update(content=text, length=len(text))
        if _MAKE_FINAL_WITH_TEXT.execute(conn, [values]).rowcount != 1:
            return None
    else:
        # The status changes first: that write locks the row, so no writer can add a chunk
        # between reading the chunks and compacting them.
        if _MAKE_FINAL.execute(conn, [values]).rowcount != 1:
            return None
        text = full_text(conn, message_id)
        values.update(content=text, length=len(text))
        _SET_CONTENT.execute(conn, [values])
    _DELETE_CHUNKS.execute(conn, [values])
    dialect.announce_changes(conn, [message_id])
    return values


def _int_or_none(value):
    return value if isinstance(value, int) else None


class Notifier:
    """Wakes the polls waiting in this process when a message they watch changes."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiters = {}  # message id -> {event: (length, status) the waiter last saw}

    def register(self, message_id, length, status):
        """Returns an event that is set when message_id may have moved past (length, status)."""
        event = threading.Event()
        self.register_waiter(message_id, event, length, status)
        return event

    def register_waiter(self, message_id, waiter, length, status):
        """Calls waiter.set() (from any thread) when message_id may have moved past (length, status)."""
        with self._lock:
            self._waiters.setdefault(message_id, {})[waiter] = (length, status)

    def unregister(self, message_id, event):
        with self._lock:
            waiting = self._waiters.get(message_id)
            if waiting is not None:
                waiting.pop(event, None)
                if not waiting:
                    del self._waiters[message_id]

    def notify(self, message_ids):
        """Wakes every poll waiting on any of message_ids."""
        with self._lock:
            for message_id in message_ids:
                for event in self._waiters.get(message_id, ()):
                    event.set()

    def notify_changed(self, states):
        """Wakes the polls whose message's (length, status) differs from what they saw."""
        with self._lock:
            for message_id, state in states.items():
                for event, seen in self._waiters.get(message_id, {}).items():
                    if seen != state:
                        event.set()

    def watched(self):
        """Returns the ids of messages that polls are waiting on."""
        with self._lock:
            return list(self._waiters)

    def count(self):
        """Returns how many polls are waiting."""
        with self._lock:
            return sum(len(waiting) for waiting in self._waiters.values())


class CrossProcessWatcher:
    """Wakes local polls when another process (or host) commits text for what they watch.

    A named daemon thread asks a change detector (dialect.py) which watched messages may
    have changed, every few milliseconds or as notifications arrive, and only then reads
    those messages in one small query.
    """

    def __init__(self, engine, notifier, detector, interval):
        self._engine = engine
        self._notifier = notifier
        self._detector = detector
        self._interval = max(interval, detector.interval_floor)
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="poll-watcher", daemon=True)
        self._thread.start()

    def kick(self):
        """Tells the watcher that a poll has started waiting."""
        self._wake.set()

    def close(self):
        self._closed = True
        self._wake.set()
        self._detector.wake()

    def _run(self):
        try:
            while not self._closed:
                watched = self._notifier.watched()
                if not watched:
                    self._wake.wait(1.0)
                    self._wake.clear()
                    continue
                try:
                    changed = self._detector.changes(watched)
                    if changed:
                        self._check(changed)
                except Exception:
                    log.exception("poll watcher check failed")
                    time.sleep(0.5)
                time.sleep(self._interval)
                # Returns at once for polling detectors; a listening one blocks until news arrives.
                self._detector.wait()
        finally:
            self._detector.close()

    def _check(self, watched):
        states = {}
        with self._engine.connect() as conn:
            for start in range(0, len(watched), 500):
                rows = conn.execute(
                    select(messages.c.id, messages.c.length, messages.c.status)
                    .where(messages.c.id.in_(watched[start:start + 500]))).all()
                for row in rows:
                    states[row.id] = (row.length, row.status)
        for message_id in watched:
            states.setdefault(message_id, (-1, "deleted"))
        self._notifier.notify_changed(states)


# A reply this writer made final, as a poll answer needs it (the fields of api.PollRow).
FinalReply = collections.namedtuple(
    "FinalReply", ("id", "owner", "length", "status", "content", "error_code", "error_message", "has_image"))


class CommittedText:
    """The committed text of a reply this process writes, kept so polls here need not read chunks."""

    __slots__ = ("owner", "status", "text", "ends", "times")

    def __init__(self, owner):
        self.owner = owner
        self.status = "pending"
        self.text = ""
        self.ends = []   # end offset of each committed batch
        self.times = []  # monotonic time at which that batch was committed

    def add(self, piece, moment):
        self.text += piece
        self.ends.append(len(self.text))
        self.times.append(moment)
        self.status = "streaming"

    def committed_at(self, cursor):
        """Returns when the text just after cursor was committed, or None if it is not yet."""
        index = bisect.bisect_right(self.ends, cursor)
        return self.times[index] if index < len(self.times) else None


# One statement for the whole batch: the executemany path stays cheap however many replies stream.
_EXTEND_REPLY = (
    update(messages)
    .where(messages.c.id == bindparam("message_id"),
           or_(*(messages.c.status == status for status in RUNNING)))
    .values(length=bindparam("end"), status="streaming", lease_expires_at=bindparam("lease")))
_INSERT_CHUNK = chunks.insert().values(
    message_id=bindparam("message_id"), end_offset=bindparam("end_offset"), text=bindparam("text"))
_FINAL_COLUMNS = ("status", "finished_at", "worker_id", "lease_expires_at", "error_code", "error_message",
                  "finish_reason", "prompt_tokens", "completion_tokens", "has_image")
_MAKE_FINAL_STATEMENT = (
    update(messages)
    .where(messages.c.id == bindparam("message_id"), or_(*(messages.c.status == status for status in RUNNING)))
    .values({name: bindparam(name) for name in _FINAL_COLUMNS}))


class ManyStatement:
    """A statement compiled once for the engine and run through the driver's executemany.

    Given a hundred rows, SQLAlchemy's executemany converts every parameter of every row in
    Python, which cost the chunk writer a third of its time; here only the parameters whose
    type needs converting (a datetime on SQLite) are converted, once per call.
    """

    def __init__(self, statement):
        self._statement = statement
        self._compiled = None  # (dialect, SQL text, defaults, converters, positional order or None)

    def execute(self, conn, rows, shared=None):
        """Runs the statement once per row (dicts of bind values), with shared values added to each."""
        compiled = self._compiled
        if compiled is None or compiled[0] is not conn.dialect:
            compiled = self._compiled = self._compile(conn.dialect)
        _dialect, sql, defaults, converters, order = compiled
        common = dict(defaults)
        for name, value in (shared or {}).items():
            converter = converters.get(name)
            common[name] = converter(value) if converter is not None else value
        if order is None:
            parameters = [{**common, **row} for row in rows]
        else:
            parameters = [order({**common, **row}) for row in rows]
        return conn.exec_driver_sql(sql, parameters)

    def _compile(self, sql_dialect):
        compiled = self._statement.compile(dialect=sql_dialect)
        converters = {}
        defaults = {}
        for bind, name in compiled.bind_names.items():
            converter = bind.type.dialect_impl(sql_dialect).bind_processor(sql_dialect)
            if converter is not None:
                converters[name] = converter
            value = bind.effective_value
            defaults[name] = converter(value) if converter is not None and value is not None else value
        order = None
        if compiled.positional:
            names = list(compiled.positiontup)
            order = operator.itemgetter(*names) if len(names) > 1 else (lambda values, name=names[0]: (values[name],))
        return sql_dialect, str(compiled), defaults, converters, order


# finalize's statements, built and compiled once: every reply ends through them.
_MAKE_FINAL = ManyStatement(_MAKE_FINAL_STATEMENT)
_MAKE_FINAL_WITH_TEXT = ManyStatement(
    _MAKE_FINAL_STATEMENT.values(content=bindparam("content"), length=bindparam("length")))
_SET_CONTENT = ManyStatement(update(messages).where(messages.c.id == bindparam("message_id"))
                             .values(content=bindparam("content"), length=bindparam("length")))
_DELETE_CHUNKS = ManyStatement(delete(chunks).where(chunks.c.message_id == bindparam("message_id")))


class ChunkWriter:
    """Owns every chunk write of this process.

    Replies hand their text to a named daemon thread, which writes all that is pending,
    for every reply, in one short transaction. An idle writer writes at once; a busy one
    gathers for up to flush_interval, so there is never one database write per token.
    It also keeps the committed text of its replies in memory, for the polls of this process.
    """

    BUSY_REPLIES = 16  # replies streaming at once at which a busy writer gathers the full flush_interval
    FINAL_KEPT_SECONDS = 10.0  # how long the polls waiting on a reply may answer its end from memory

    def __init__(self, engine, notifier, flush_interval, lease_seconds):
        self._engine = engine
        self._notifier = notifier
        self._flush_interval = flush_interval
        self._lease_seconds = lease_seconds
        self._cond = threading.Condition()
        self._text = {}        # message id -> [pieces not yet written]
        self._finals = {}      # message id -> (kwargs for finalize, done event)
        self._cancelled = set()
        self._committed = {}   # message id -> CommittedText
        self._last_write = 0.0
        self._closed = False
        self._finished = {}    # message id -> (FinalReply, monotonic time it is forgotten)
        self._extend_reply = ManyStatement(_EXTEND_REPLY)
        self._insert_chunk = ManyStatement(_INSERT_CHUNK)
        self._thread = threading.Thread(target=self._run, name="chunk-writer", daemon=True)
        self._thread.start()

    def open(self, message_id, owner=None):
        """Starts tracking a reply whose buffer is empty."""
        with self._cond:
            self._cancelled.discard(message_id)
            self._committed[message_id] = CommittedText(owner)

    def append(self, message_id, text):
        """Queues text for a reply; returns False once the reply no longer accepts text."""
        with self._cond:
            if message_id in self._cancelled:
                return False
            if not self._text:
                # Only an idle writer needs waking; a gathering one takes this text with the rest.
                self._cond.notify()
            self._text.setdefault(message_id, []).append(text)
            return True

    def local_state(self, message_id, owner):
        """Returns (length, status) of a running reply that this process writes for owner, else None."""
        with self._cond:
            committed = self._committed.get(message_id)
            if committed is None or committed.owner is None or committed.owner != owner:
                return None
            return len(committed.text), committed.status

    def final_reply(self, message_id, owner):
        """Returns the FinalReply of a reply this writer made final moments ago for owner, else None.

        Only a poll that saw the reply running may answer from it (its answer then stands for the
        moment of that commit); a later poll reads the database, which may have changed since.
        """
        with self._cond:
            kept = self._finished.get(message_id)
            if kept is None or kept[0].owner is None or kept[0].owner != owner:
                return None
            return kept[0]

    def is_at(self, message_id, length, status):
        """Tells whether this writer writes the reply and has committed exactly (length, status) of it."""
        with self._cond:
            committed = self._committed.get(message_id)
            return committed is not None and (len(committed.text), committed.status) == (length, status)

    def committed_at(self, message_id, cursor):
        """Returns the monotonic time the text after cursor was committed, if this writer knows it."""
        with self._cond:
            committed = self._committed.get(message_id)
            return committed.committed_at(cursor) if committed is not None else None

    def text_between(self, message_id, start, end):
        """Returns the committed text from start to end, or None when this writer does not hold it."""
        with self._cond:
            committed = self._committed.get(message_id)
            if committed is None or len(committed.text) < end:
                return None
            return committed.text[start:end]

    def is_cancelled(self, message_id):
        with self._cond:
            return message_id in self._cancelled

    def finish(self, message_id, **final):
        """Writes the pending text, then makes the reply final; returns whether this call finalized it."""
        done = threading.Event()
        outcome = {}
        with self._cond:
            if self._closed:
                return False
            self._finals[message_id] = (final, done, outcome)
            self._cond.notify()
        done.wait()
        return outcome.get("finalized", False)

    def shutdown(self):
        """Writes what is pending, then ends the writer thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(5)

    def _run(self):
        busy_since = None
        while True:
            with self._cond:
                while not self._text and not self._finals:
                    if self._closed:
                        return
                    self._cond.wait()
                # Gather only when several replies stream here and the last write was recent: a lone
                # reply, or an idle writer, is written at once; the gathering grows with the replies.
                others = min(1.0, (len(self._committed) - 1) / self.BUSY_REPLIES)
                gather_until = self._last_write + self._flush_interval * max(others, 0.0)
                while not self._finals:
                    left = gather_until - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                text, self._text = self._text, {}
                finals, self._finals = self._finals, {}
            self._last_write = time.monotonic()
            try:
                self._write(text, finals)
                busy_since = None
            except Exception as error:
                with self._cond:
                    for message_id, pieces in text.items():
                        self._text.setdefault(message_id, [])[:0] = pieces
                    for message_id, item in finals.items():
                        self._finals.setdefault(message_id, item)
                if dialect.is_busy(error):
                    # Another connection holds the write lock: look again in a moment, without gathering.
                    busy_since = busy_since or time.monotonic()
                    if time.monotonic() - busy_since < dialect.BUSY_TIMEOUT_MS / 1000:
                        time.sleep(0.001)
                        self._last_write = 0.0
                        continue
                busy_since = None
                log.exception("writing a batch of chunks failed; retrying")
                time.sleep(0.2)

    def _write(self, text, finals):
        changed = []
        written = {}
        lease = now() + self._lease_seconds
        with self._engine.connect() as conn, dialect.busy_fails_at_once(conn), conn.begin():
            batch = {}
            for message_id, pieces in text.items():
                committed = self._committed.get(message_id)
                joined = dialect.storable_text(conn, "".join(pieces))
                if joined and committed is not None:
                    # Only this thread extends a reply's committed text, so its length is the next offset.
                    batch[message_id] = (len(committed.text) + len(joined), joined)
            if batch:
                result = self._extend_reply.execute(
                    conn, [{"message_id": message_id, "end": end} for message_id, (end, _joined) in batch.items()],
                    shared={"lease": lease})
                extended = set(batch)
                if not (conn.dialect.supports_sane_multi_rowcount and result.rowcount == len(batch)):
                    # A reply made final meanwhile (stopped, lost) kept its old length: it takes no more text.
                    extended = set()
                    ids = list(batch)
                    for start in range(0, len(ids), 500):
                        for row in conn.execute(select(messages.c.id, messages.c.length)
                                                .where(messages.c.id.in_(ids[start:start + 500]))):
                            if row.length == batch[row.id][0]:
                                extended.add(row.id)
                rows = []
                for message_id, (end, joined) in batch.items():
                    if message_id not in extended:
                        self._cancel(message_id)
                        continue
                    rows.append({"message_id": message_id, "end_offset": end, "text": joined})
                    written[message_id] = end
                    changed.append(message_id)
                if rows:
                    self._insert_chunk.execute(conn, rows)
            dialect.announce_changes(conn, list(written))
            outcomes, finished = self._finalize(conn, finals, batch, written)  # announces its own
            changed.extend(finals)
        moment = time.monotonic()
        with self._cond:
            for message_id in written:
                committed = self._committed.get(message_id)
                if committed is not None:
                    committed.add(batch[message_id][1], moment)
            for message_id in finals:
                # Polls that arrive from now on read a final reply from the database.
                self._committed.pop(message_id, None)
            # Kept in the order they finished, so the expired ones are at the front.
            while self._finished:
                oldest = next(iter(self._finished))
                if self._finished[oldest][1] >= moment:
                    break
                del self._finished[oldest]
            for message_id, reply in finished.items():
                self._finished[message_id] = (reply, moment + self.FINAL_KEPT_SECONDS)
        for message_id, (_final, done, outcome) in finals.items():
            outcome["finalized"] = outcomes[message_id]
            with self._cond:
                self._cancelled.discard(message_id)
            done.set()
        self._notifier.notify(changed)

    def _finalize(self, conn, finals, batch, written):
        """Makes finals final in conn's transaction; returns ({id: whether it did}, {id: FinalReply})."""
        outcomes = {}
        finished = {}
        for message_id, (final, _done, _outcome) in finals.items():
            committed = self._committed.get(message_id)
            # Only this thread writes the chunks of the replies it holds, so it holds all their text.
            text = None if committed is None else committed.text + (
                batch[message_id][1] if message_id in written else "")
            values = finalize(conn, message_id, text=text, **final)
            outcomes[message_id] = values is not None
            if values is not None and committed is not None:
                finished[message_id] = FinalReply(message_id, committed.owner, values["length"], values["status"],
                                                  values["content"], values["error_code"], values["error_message"],
                                                  values["has_image"])
        return outcomes, finished

    def close(self, message_id):
        """Stops tracking a reply; text still queued for it is dropped."""
        with self._cond:
            self._cancelled.discard(message_id)
            self._text.pop(message_id, None)
            self._committed.pop(message_id, None)

    def _cancel(self, message_id):
        with self._cond:
            self._cancelled.add(message_id)
            self._text.pop(message_id, None)
            self._committed.pop(message_id, None)
