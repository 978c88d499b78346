"""The reply workers: one named daemon thread per reply, plus a supervisor per process.

A reply thread claims its message, streams the upstream into the chunk buffer and
finalizes it. The supervisor renews this process's leases, notices stops made by other
processes (and closes their upstream connections), and fails replies whose process died.
"""
import logging
import os
import socket
import threading
import time

from sqlalchemy import bindparam, select, update

import buffer
import context
from dialect import change_detector, reclaim_space
from models import Conversation, Image, Message, RUNNING, db, now
from upstream import Stopped, Upstream, UpstreamError

log = logging.getLogger(__name__)

messages = Message.__table__
conversations = Conversation.__table__
images = Image.__table__

WORKER_LOST = ("worker_lost", "The server process running this reply stopped before it finished.")
# How often an idle process gives deleted space back and empties the write-ahead log.
RECLAIM_EVERY_SECONDS = 30.0


class Runtime:
    """The per-process machinery: writer, notifier, watcher, supervisor and running replies."""

    def __init__(self, app, background=True):
        self.app = app
        self.config = app.config
        self.engine = db.engine
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.notifier = buffer.Notifier()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._running = {}  # message id -> Reply
        self.writer = self.watcher = None
        if not background:
            # A thread-free web process only stores messages and answers polls.
            return
        self.writer = buffer.ChunkWriter(self.engine, self.notifier, self.config["FLUSH_INTERVAL_SECONDS"],
                                         self.config["LEASE_SECONDS"])
        self.watcher = buffer.CrossProcessWatcher(self.engine, self.notifier, change_detector(self.engine),
                                                  self.config["CROSS_PROCESS_CHECK_SECONDS"])
        self.upstream = Upstream(
            app.config["UPSTREAM_BASE_URL"], app.config["OPENAI_API_KEY"],
            connect_timeout=self.config["UPSTREAM_CONNECT_TIMEOUT"],
            idle_timeout=self.config["UPSTREAM_IDLE_TIMEOUT"],
            retries=self.config["UPSTREAM_RETRIES"],
            retry_max_wait=self.config["UPSTREAM_RETRY_MAX_WAIT"])
        self._supervisor = threading.Thread(target=self._supervise, name="reply-supervisor", daemon=True)
        self._supervisor.start()

    # Replies ---------------------------------------------------------------

    def start_reply(self, message_id, claimed_for=None):
        """Runs the reply in a new named daemon thread of this process.

        claimed_for is the owner of a reply stored already claimed by this process; it is not claimed again.
        """
        thread = threading.Thread(target=self.run_reply, args=(message_id, claimed_for),
                                  name=f"reply-{message_id}", daemon=True)
        thread.start()
        return thread

    def run_reply(self, message_id, claimed_for=None):
        """Claims the pending reply (unless it was stored claimed) and generates it; returns when it is final."""
        reply = Reply(self, message_id)
        try:
            claimed = reply.claim() if claimed_for is None else reply.adopt(claimed_for)
        except Exception:
            # The reply stays unclaimed; its lease runs out and it fails as worker_lost.
            log.exception("could not claim reply %s", message_id)
            return
        if not claimed:
            return
        with self._lock:
            self._running[message_id] = reply
        try:
            reply.run()
        except Exception:
            log.exception("reply %s crashed", message_id)
            self.writer.finish(message_id, status="failed",
                               error=("upstream_error", "The reply failed because of an internal error."))
        finally:
            with self._lock:
                self._running.pop(message_id, None)
            self.writer.close(message_id)

    def stop_local(self, message_id):
        """Closes the upstream of a reply running in this process, if it runs here."""
        with self._lock:
            reply = self._running.get(message_id)
        if reply is not None:
            reply.abort()

    def shutdown(self):
        """Stops this process's threads (used by tests that build many apps)."""
        self._closed.set()
        with self._lock:
            replies = list(self._running.values())
        for reply in replies:
            reply.abort()
        if self.watcher is not None:
            self.watcher.close()
            self.writer.shutdown()
        simulator = self.app.extensions.get("demo_simulator")
        if simulator is not None:
            simulator.stop()

    def running_ids(self):
        with self._lock:
            return list(self._running)

    def drain(self, seconds):
        """Lets running replies finish for up to seconds, then fails the rest as worker_lost; returns their ids."""
        if self.writer is None:
            return []
        deadline = time.monotonic() + seconds
        while self.running_ids() and time.monotonic() < deadline:
            time.sleep(0.05)
        lost = self.running_ids()
        if not lost:
            return []
        # The failure is recorded before the upstream is closed, so each reply thread ends without
        # writing again; the join is bounded in case a reply finishes by itself at this very moment.
        recorder = threading.Thread(target=self._record_lost, args=(lost,), name="reply-drain", daemon=True)
        recorder.start()
        recorder.join(5.0)
        for message_id in lost:
            self.stop_local(message_id)
        log.warning("process exiting: %d running replies marked failed (worker_lost)", len(lost))
        return lost

    def _record_lost(self, message_ids):
        for message_id in message_ids:
            self.writer.finish(message_id, status="failed", error=WORKER_LOST)

    def claim_pending(self, limit):
        """Claims up to limit pending replies that no process has taken (thread-free worker mode)."""
        with self.engine.connect() as conn:
            ids = conn.execute(
                select(messages.c.id).where(messages.c.status == "pending", messages.c.worker_id.is_(None))
                .order_by(messages.c.created_at).limit(limit)).scalars().all()
        started = []
        for message_id in ids:
            started.append(self.start_reply(message_id))
        return started

    # Supervision -----------------------------------------------------------

    def _supervise(self):
        lease = self.config["LEASE_SECONDS"]
        renew_every = max(lease / 3.0, 0.2)
        sweep_every = max(lease / 4.0, 0.2)
        next_renew = next_sweep = 0.0
        next_reclaim = time.monotonic() + RECLAIM_EVERY_SECONDS
        while not self._closed.wait(0.25):
            try:
                running = self.running_ids()
                if running:
                    self._abort_finished(running)
                clock = time.monotonic()
                if running and clock >= next_renew:
                    self._renew_leases()
                    next_renew = clock + renew_every
                if clock >= next_sweep:
                    fail_lost_replies(self.engine, self.notifier)
                    next_sweep = clock + sweep_every
                if not running and clock >= next_reclaim:
                    # Only while this process streams nothing: the pass may hold writers up briefly.
                    reclaim_space(self.engine)
                    next_reclaim = clock + RECLAIM_EVERY_SECONDS
            except Exception:
                log.exception("reply supervisor pass failed")

    def _abort_finished(self, running):
        # A stop recorded by another process reaches this one here, within about 0.25 s.
        with self.engine.connect() as conn:
            alive = set(conn.execute(
                select(messages.c.id).where(messages.c.id.in_(running), messages.c.status.in_(RUNNING))
            ).scalars().all())
        for message_id in running:
            if message_id not in alive:
                self.stop_local(message_id)

    def _renew_leases(self):
        # Rows another transaction holds are skipped, not waited for: the chunk writer locks its rows one
        # by one in its own order (and extends their leases itself), so waiting could deadlock with it.
        mine = (select(messages.c.id)
                .where(messages.c.worker_id == self.worker_id, messages.c.status.in_(RUNNING))
                .with_for_update(skip_locked=True))
        with self.engine.begin() as conn:
            conn.execute(update(messages).where(messages.c.id.in_(mine))
                         .values(lease_expires_at=now() + self.config["LEASE_SECONDS"]))


def fail_lost_replies(engine, notifier=None):
    """Fails every running reply whose lease has expired, keeping its text."""
    with engine.connect() as conn:
        lost = conn.execute(
            select(messages.c.id).where(messages.c.status.in_(RUNNING), messages.c.lease_expires_at < now())
        ).scalars().all()
    for message_id in lost:
        with engine.begin() as conn:
            # Re-checked inside the write: a slow but live worker may have renewed it.
            row = conn.execute(
                update(messages).where(messages.c.id == message_id, messages.c.status.in_(RUNNING),
                                       messages.c.lease_expires_at < now())
                .values(lease_expires_at=messages.c.lease_expires_at)).rowcount
            if row == 1:
                buffer.finalize(conn, message_id, "failed", error=WORKER_LOST)
                log.warning("reply %s lost its worker; marked failed", message_id)
    if lost and notifier is not None:
        notifier.notify(lost)
    return lost


def drain_on_exit(app, seconds):
    """Before this process exits, lets its replies finish for up to seconds and fails the rest as worker_lost."""
    state = getattr(app, "extensions", {}).get("relay_runtime")
    if state is None or state[0] != os.getpid():
        return []
    return state[1].drain(seconds)


_CLAIM = (update(messages)
          .where(messages.c.id == bindparam("message_id"), messages.c.status == "pending",
                 messages.c.worker_id.is_(None))
          .values(worker_id=bindparam("worker_id"), lease_expires_at=bindparam("lease")))
_READ_MESSAGE = select(messages).where(messages.c.id == bindparam("message_id"))


class Reply:
    """One assistant reply being generated in this process."""

    def __init__(self, runtime, message_id):
        self.runtime = runtime
        self.id = message_id
        self.stream = None
        self._aborted = threading.Event()

    def claim(self):
        """Takes ownership of the pending message; returns False when another worker has it."""
        with self.runtime.engine.begin() as conn:
            result = conn.execute(_CLAIM, {"message_id": self.id, "worker_id": self.runtime.worker_id,
                                           "lease": now() + self.runtime.config["LEASE_SECONDS"]})
            if result.rowcount != 1:
                return False
            owner = conn.execute(select(messages.c.owner).where(messages.c.id == self.id)).scalar_one_or_none()
        return self.adopt(owner)

    def adopt(self, owner):
        """Takes on a reply this process has claimed: the writer starts its memory of it; returns True.

        Knowing the owner lets polls in this process check it without a query.
        """
        self.runtime.writer.open(self.id, owner)
        return True

    def abort(self):
        """Stops the reply: no more text is taken and the upstream connection is closed."""
        self._aborted.set()
        if self.stream is not None:
            self.stream.abort()

    def is_stopped(self):
        return self._aborted.is_set() or self.runtime.writer.is_cancelled(self.id)

    def run(self):
        config = self.runtime.config
        with self.runtime.engine.connect() as conn:
            message = conn.execute(_READ_MESSAGE, {"message_id": self.id}).first()
            if message is None or message.status not in RUNNING:
                return  # stopped (or deleted) before it started
            history = context.load(conn, message)
        writer = self.runtime.writer
        try:
            if message.mode == "image":
                prompt = history.image_prompt
                data, mime = self.runtime.upstream.generate_image(
                    message.model or config["IMAGE_MODEL"], prompt, config["MAX_IMAGE_BYTES"], self.is_stopped)
                if self.is_stopped():
                    return
                store_image(self.runtime.engine, self.id, data, mime)
                writer.finish(self.id, status="done", has_image=True)
                return
            stream = self.runtime.upstream.stream_chat(
                message.model or config["CHAT_MODEL"], history.messages(config["CONTEXT_BUDGET_CHARS"]),
                self.is_stopped)
            self.stream = stream
            if self._aborted.is_set():
                stream.abort()
            for piece in stream.iter_text():
                if not writer.append(self.id, piece):
                    stream.abort()
                    break
            if self.is_stopped():
                return
            writer.finish(self.id, status="done", finish_reason=stream.finish_reason, usage=stream.usage)
        except Stopped:
            return
        except UpstreamError as error:
            if self.is_stopped():
                return
            log.info("reply %s failed: %s", self.id, error.code)
            # Some upstreams echo the Authorization header in their error text.
            message = without_secret(error.message, config["OPENAI_API_KEY"])
            writer.finish(self.id, status="failed", error=(error.code, message))


def without_secret(text, secret):
    """Returns text with every occurrence of secret (the upstream API key) masked."""
    if not secret:
        return text
    return text.replace(secret, "[API key]")


def store_image(engine, message_id, data, mime):
    """Keeps a generated image in the database, where every host can serve it."""
    with engine.begin() as conn:
        conn.execute(images.insert().values(message_id=message_id, mime=mime, data=data))
