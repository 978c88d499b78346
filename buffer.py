"""The chunk buffer: append text in batches, read after a cursor, wait for and announce new text."""
import logging
import threading
import time

from sqlalchemy import delete, select, update

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


def finalize(conn, message_id, status, error=None, finish_reason=None, usage=None, has_image=False):
    """Makes a running message final: compacts its chunks into content. Returns False if already final."""
    values = {"status": status, "finished_at": now(), "worker_id": None, "lease_expires_at": None}
    if error is not None:
        values["error_code"], values["error_message"] = error
    if finish_reason:
        values["finish_reason"] = str(finish_reason)[:40]
    if usage:
        values["prompt_tokens"] = _int_or_none(usage.get("prompt_tokens"))
        values["completion_tokens"] = _int_or_none(usage.get("completion_tokens"))
    if has_image:
        values["has_image"] = 1
    # The status changes first: that write locks the row, so no writer can add a chunk
    # between reading the chunks and compacting them.
    result = conn.execute(
        update(messages).where(messages.c.id == message_id, messages.c.status.in_(RUNNING)).values(**values))
    if result.rowcount != 1:
        return False
    text = full_text(conn, message_id)
    conn.execute(update(messages).where(messages.c.id == message_id).values(content=text, length=len(text)))
    conn.execute(delete(chunks).where(chunks.c.message_id == message_id))
    return True


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
        with self._lock:
            self._waiters.setdefault(message_id, {})[event] = (length, status)
        return event

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

    A named daemon thread checks a cheap change signal every few milliseconds while polls
    wait, and only then reads the watched messages in one small query.
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

    def _run(self):
        while not self._closed:
            watched = self._notifier.watched()
            if not watched:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                if self._detector.changed():
                    self._check(watched)
            except Exception:
                log.exception("poll watcher check failed")
                time.sleep(0.5)
            time.sleep(self._interval)

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


class ChunkWriter:
    """Owns every chunk write of this process.

    Replies hand their text to a named daemon thread, which writes all that is pending,
    for every reply, in one short transaction. An idle writer writes at once; a busy one
    gathers for up to flush_interval, so there is never one database write per token.
    """

    def __init__(self, engine, notifier, flush_interval, lease_seconds):
        self._engine = engine
        self._notifier = notifier
        self._flush_interval = flush_interval
        self._lease_seconds = lease_seconds
        self._cond = threading.Condition()
        self._text = {}        # message id -> [pieces not yet written]
        self._finals = {}      # message id -> (kwargs for finalize, done event)
        self._lengths = {}     # message id -> characters written
        self._cancelled = set()
        self._last_write = 0.0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="chunk-writer", daemon=True)
        self._thread.start()

    def open(self, message_id):
        """Starts tracking a reply whose buffer is empty."""
        with self._cond:
            self._lengths[message_id] = 0
            self._cancelled.discard(message_id)

    def append(self, message_id, text):
        """Queues text for a reply; returns False once the reply no longer accepts text."""
        with self._cond:
            if message_id in self._cancelled:
                return False
            self._text.setdefault(message_id, []).append(text)
            self._cond.notify()
            return True

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
        while True:
            with self._cond:
                while not self._text and not self._finals:
                    if self._closed:
                        return
                    self._cond.wait()
                # Gather only when the last write was recent: an idle writer adds no delay.
                gather_until = self._last_write + self._flush_interval
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
            except Exception:
                log.exception("writing a batch of chunks failed; retrying")
                with self._cond:
                    for message_id, pieces in text.items():
                        self._text.setdefault(message_id, [])[:0] = pieces
                    for message_id, item in finals.items():
                        self._finals.setdefault(message_id, item)
                time.sleep(0.2)

    def _write(self, text, finals):
        changed = []
        written = {}
        lease = now() + self._lease_seconds
        with self._engine.begin() as conn:
            for message_id, pieces in text.items():
                joined = "".join(pieces)
                if not joined:
                    continue
                end = self._lengths.get(message_id, 0) + len(joined)
                result = conn.execute(
                    update(messages)
                    .where(messages.c.id == message_id, messages.c.status.in_(RUNNING))
                    .values(length=end, status="streaming", lease_expires_at=lease))
                if result.rowcount != 1:
                    self._cancel(message_id)
                    continue
                conn.execute(chunks.insert().values(message_id=message_id, end_offset=end, text=joined))
                written[message_id] = end
                changed.append(message_id)
            outcomes = {}
            for message_id, (final, _done, _outcome) in finals.items():
                outcomes[message_id] = finalize(conn, message_id, **final)
                changed.append(message_id)
        with self._cond:
            self._lengths.update(written)
        for message_id, (_final, done, outcome) in finals.items():
            outcome["finalized"] = outcomes[message_id]
            with self._cond:
                self._lengths.pop(message_id, None)
                self._cancelled.discard(message_id)
            done.set()
        self._notifier.notify(changed)

    def close(self, message_id):
        """Stops tracking a reply; text still queued for it is dropped."""
        with self._cond:
            self._lengths.pop(message_id, None)
            self._cancelled.discard(message_id)
            self._text.pop(message_id, None)

    def _cancel(self, message_id):
        with self._cond:
            self._cancelled.add(message_id)
            self._text.pop(message_id, None)
