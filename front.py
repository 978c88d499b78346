"""The ASGI front that gunicorn's asgi worker serves: polls wait on the event loop, Flask answers the rest.

A poll is most of the traffic a streaming reply makes, and under a threaded WSGI server each
one pays for a thread hand-off, a Python HTTP parser and a Flask request (about 400 µs of CPU).
Here a poll of a reply that this process writes is answered straight from the chunk writer's
memory of committed text, on the event loop, with no thread and no database. Everything
else, including every poll this path does not cover (another process's reply, a final one, a
cookie not seen yet, any error), runs through the unchanged Flask app on a thread pool, so
the answers are the same as under any WSGI server.
"""
import asyncio
import gc
import io
import json
import logging
import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, quote, unquote_to_bytes

from gunicorn.asgi.protocol import ASGIProtocol
from gunicorn.workers import gasgi
from gunicorn.workers.gasgi import ASGIWorker

import api
import auth
import buffer
from errors import ApiError
from runtime import get_runtime

log = logging.getLogger(__name__)

POLL_PATH = re.compile(r"/api/messages/([A-Za-z0-9]{1,32})/poll")
# What api.poll_answer gives for a running reply, as Flask's jsonify writes it (sorted keys, compact).
RUNNING_ANSWER = '{"cursor":"%d","done":false,"error":null,"id":"%s","image_url":null,"status":"%s","text":%s}\n'
# A scope key set on a poll that the protocol already tried to answer from memory: Flask answers it.
TO_FLASK = "relay.to_flask"
# A refused oversize body is read and dropped up to this much, so the client can read the 413.
DRAIN_LIMIT_BYTES = 16 * 1024 * 1024
# Allocations before a young collection, then young collections per middle one and middle per full
# one (Python's defaults are 700, 10, 10).
GC_THRESHOLDS = (20000, 20, 100)


class Front:
    """An ASGI app: the fast poll path in front of a Flask (WSGI) app run on a thread pool."""

    def __init__(self, flask_app, threads=None):
        self.flask_app = flask_app
        self.settings = flask_app.config
        self.threads = threads or int(os.environ.get("GUNICORN_THREADS", "64"))
        self._executor = None
        self._executor_pid = None
        self._waker = None
        self._held = set()  # waiters of the polls held on the event loop now
        self.stopping = False
        self.active_requests = 0
        self._cookie_owners = {}  # Cookie header -> (owner, monotonic time until which it holds)
        self._static_headers = [(name.lower().encode("latin-1"), value.encode("latin-1"))
                                for name, value in poll_headers(flask_app).items()]

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.active_requests += 1
            try:
                if scope["method"] == "GET" and not scope.get(TO_FLASK):
                    match = POLL_PATH.fullmatch(scope["path"])
                    if match is not None and await self.fast_poll(match.group(1), scope, send):
                        return
                await self.run_flask(scope, receive, send)
            finally:
                self.active_requests -= 1
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.start_worker()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def start_worker(self):
        """Starts this worker's runtime, exempts everything made so far from garbage collection, and collects less often.

        A full collection walks every object; with the app, its libraries and its caches loaded
        that took 40-80 ms, a pause every token in flight waited through. Frozen, they are skipped.
        With the default thresholds the collector then still ran about 70 times a second under
        load (5 % of the worker's CPU), mostly promoting short-lived request objects that a
        later collection had to walk again; GC_THRESHOLDS lets most of them die young first.
        """
        try:
            get_runtime(self.flask_app)
        except Exception:  # the first request tries again and answers with the error
            log.exception("starting the reply runtime failed")
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)

    # The fast poll ------------------------------------------------------------

    async def fast_poll(self, message_id, scope, send):
        """Answers a poll as an ASGI call: from memory when it can; returns False to leave it to Flask as it came."""
        body, flask_query = await self.poll_from_memory(message_id, scope["query_string"], scope["headers"])
        if body is not None:
            await self.send_json(send, body)
            return True
        if flask_query is None:
            return False
        await self.run_flask({**scope, "query_string": flask_query}, no_body, send)
        return True

    async def poll_from_memory(self, message_id, query_string, headers):
        """Answers a poll of a reply this process writes from the writer's memory.

        Returns (answer body, None); or (None, query) when Flask must answer, with the time the
        poll has left in query; or (None, None) when this path does not apply to the poll at all.
        """
        request = PollRequest.parse(query_string, self.settings)
        if request is None:
            return None, None
        who = self.owner(headers)
        if who is None:
            return None, None
        runtime = get_runtime(self.flask_app)
        writer = runtime.writer
        if writer is None:
            return None, None
        deadline = time.monotonic() + request.timeout
        cursor = request.cursor
        waited = False
        with api.poll_load:
            while True:
                state = writer.local_state(message_id, who)
                if state is None and waited:
                    # The reply ended while this poll waited on it: its end is still in memory.
                    final = writer.final_reply(message_id, who)
                    if final is not None and cursor <= final.length:
                        return self.final_answer(final, cursor), None
                if state is None or cursor > state[0]:
                    # Final, another process's, not this owner's, or an error: Flask tells which.
                    return None, flask_poll_query(cursor, deadline)
                length, status = state
                if cursor < length:
                    break
                left = deadline - time.monotonic()
                if left <= 0 or self.stopping:
                    return running_answer(message_id, status, cursor, ""), None
                await self.wait_for_change(runtime, message_id, length, status, left)
                waited = True
            hold = api.gather_seconds(self.settings)
            if hold > 0:
                committed = writer.committed_at(message_id, cursor)
                pause = (committed if committed is not None else time.monotonic()) + hold - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
                    state = writer.local_state(message_id, who) or state
            text = writer.text_between(message_id, cursor, state[0])
            if text is None:
                return None, flask_poll_query(cursor, deadline)
            return running_answer(message_id, state[1], cursor, text), None

    async def wait_for_change(self, runtime, message_id, length, status, left):
        """Waits until the writer commits past (length, status), or left seconds pass."""
        loop = asyncio.get_running_loop()
        waker = self._waker
        if waker is None or waker.loop is not loop:
            waker = self._waker = LoopWaker(loop)
        waiter = LoopWaiter(waker)
        runtime.notifier.register_waiter(message_id, waiter, length, status)
        self._held.add(waiter)
        timer = None
        try:
            # The writer updates its memory before it notifies, so a commit that landed
            # before the waiter was registered shows here.
            if not runtime.writer.is_at(message_id, length, status):
                return
            timer = loop.call_later(left, waiter.wake)
            await waiter.future
        finally:
            if timer is not None:
                timer.cancel()
            self._held.discard(waiter)
            runtime.notifier.unregister(message_id, waiter)

    def release_held_polls(self):
        """Answers every held poll now (the worker is stopping): its client polls again elsewhere."""
        self.stopping = True
        for waiter in list(self._held):
            waiter.wake()

    def final_answer(self, final, cursor):
        """Returns the answer body for a reply this writer made final (a buffer.FinalReply), as Flask's jsonify writes it."""
        answer = api.poll_answer(final, cursor, final.content[cursor:])
        return (self.flask_app.json.dumps(answer, separators=(",", ":")) + "\n").encode("utf-8")

    def json_headers(self, length):
        """Returns the headers of a JSON answer of length bytes, as Flask's app gives them."""
        return [(b"content-type", b"application/json"), (b"content-length", b"%d" % length), *self._static_headers]

    async def send_json(self, send, body):
        await send({"type": "http.response.start", "status": 200, "headers": self.json_headers(len(body))})
        await send({"type": "http.response.body", "body": body})

    def owner(self, headers):
        """Returns the caller's owner when it is certain without Flask (a known cookie or a token), else None."""
        cookie_header = None
        authorization = None
        for name, value in headers:
            if name == b"cookie":
                cookie_header = value if cookie_header is None else cookie_header + b"; " + value
            elif name == b"authorization":
                authorization = value
        tokens = self.settings["ACCESS_TOKEN_LIST"]
        if tokens and authorization is not None:
            token = auth.bearer_from(authorization.decode("latin-1"))
            if token is not None:
                return auth.owner_for_token(token, tokens)
        if cookie_header is None:
            return None
        known = self._cookie_owners.get(cookie_header)
        if known is not None and known[1] > time.monotonic():
            return known[0]
        interface = self.flask_app.session_interface
        if not isinstance(interface, auth.CachedSessionInterface):
            return None
        cookie = cookie_value(cookie_header.decode("latin-1"), self.settings["SESSION_COOKIE_NAME"])
        cached = interface.cached_entry(cookie) if cookie else None
        if cached is None:
            return None
        until, contents = cached
        who = auth.session_owner(contents.get(auth.SESSION_KEY), self.settings)
        if who is None:
            return None
        if len(self._cookie_owners) >= auth.CachedSessionInterface.max_entries:
            self._cookie_owners.clear()
        self._cookie_owners[cookie_header] = (who, until)
        return who

    # Everything else: the Flask app on a thread pool ----------------------------------

    def executor(self):
        # Threads do not survive a fork; each worker process makes its own pool.
        if self._executor_pid != os.getpid():
            self._executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="flask")
            self._executor_pid = os.getpid()
        return self._executor

    async def run_flask(self, scope, receive, send):
        limit = self.settings["MAX_CONTENT_LENGTH"]
        declared = declared_length(scope["headers"])
        refused = limit is not None and declared is not None and declared > limit
        if refused:
            # Flask refuses it by its length alone; the client may read the 413 before it sends the rest.
            body = b""
        else:
            body, declared = await read_body(receive, limit)
        environ = wsgi_environ(scope, body, declared)
        loop = asyncio.get_running_loop()
        status, headers, content = await loop.run_in_executor(self.executor(), call_wsgi, self.flask_app, environ)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})
        if refused:
            await drain_body(receive)


def running_answer(message_id, status, cursor, text):
    """Returns the answer body for text after cursor of a running reply: api.poll_answer's JSON, spelled out because it is sent so often."""
    return (RUNNING_ANSWER % (cursor + len(text), message_id, status, json.dumps(text))).encode("ascii")


def flask_poll_query(cursor, deadline):
    """Returns the query of a poll passed on to Flask, with the time it has left."""
    return f"cursor={cursor}&timeout={max(0.0, deadline - time.monotonic()):.3f}".encode("ascii")


class PollRequest:
    """A poll's cursor and timeout, when both are plain; None sends the poll to Flask for its error."""

    __slots__ = ("cursor", "timeout")

    def __init__(self, cursor, timeout):
        self.cursor = cursor
        self.timeout = timeout

    @classmethod
    def parse(cls, query_string, settings):
        plain = PLAIN_POLL_QUERY.fullmatch(query_string)
        if plain is not None:
            cursor, timeout = plain.group(1), plain.group(2)
            cursor = cursor.decode("ascii") if cursor is not None else None
            timeout = timeout.decode("ascii") if timeout is not None else None
        else:
            try:
                args = parse_qs(query_string.decode("ascii"), keep_blank_values=True)
            except UnicodeDecodeError:
                return None
            cursor, timeout = first(args, "cursor"), first(args, "timeout")
        try:
            return cls(buffer.parse_cursor(cursor), api.poll_timeout_from(timeout, settings))
        except (buffer.BadCursor, ApiError):
            return None


# The query every client sends; anything else goes through parse_qs.
PLAIN_POLL_QUERY = re.compile(rb"cursor=([0-9]{0,12})(?:&timeout=([0-9]{1,6}(?:\.[0-9]{0,6})?))?")


def first(args, name):
    values = args.get(name)
    return values[0] if values else None


class LoopWaiter:
    """A notifier waiter that wakes a future on the event loop from any thread."""

    __slots__ = ("_waker", "future", "_woken")

    def __init__(self, waker):
        self._waker = waker
        self.future = waker.loop.create_future()
        self._woken = False

    def set(self):
        if not self._woken:
            self._woken = True
            self._waker.wake_soon(self)

    def wake(self):
        if not self.future.done():
            self.future.set_result(None)


class LoopWaker:
    """Hands the waiters a writer thread sets to the event loop in one call per batch.

    A commit may wake a hundred polls; one loop wake-up for all of them costs one pipe write
    instead of a hundred.
    """

    def __init__(self, loop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending = []

    def wake_soon(self, waiter):
        with self._lock:
            self._pending.append(waiter)
            first_of_batch = len(self._pending) == 1
        if first_of_batch:
            self.loop.call_soon_threadsafe(self._wake_pending)

    def _wake_pending(self):
        with self._lock:
            pending, self._pending = self._pending, []
        for waiter in pending:
            waiter.wake()


def cookie_value(header, name):
    try:
        morsel = SimpleCookie(header).get(name)
    except Exception:  # a malformed Cookie header: let Flask deal with it
        return None
    return morsel.value if morsel is not None else None


def poll_headers(flask_app):
    """Returns the headers Flask's after-request hook puts on an API answer."""
    import app as app_module
    headers = dict(app_module.SECURITY_HEADERS)
    headers["Cache-Control"] = "no-store"
    headers["Vary"] = "Cookie"
    if flask_app.config["EXPOSE_WORKER_ID"]:
        headers["X-Served-By"] = str(os.getpid())
    return headers


async def no_body():
    return {"type": "http.request", "body": b"", "more_body": False}


def declared_length(headers):
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def read_body(receive, limit):
    """Returns (body, None), or (b"", its length) for a body that grew past limit (Flask then refuses it)."""
    parts = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        parts.append(chunk)
        if limit is not None and size > limit:
            await drain_body(receive, size)
            return b"", size
        if not message.get("more_body", False):
            break
    return b"".join(parts), None


async def drain_body(receive, size=0):
    """Reads and drops the rest of a refused body, up to DRAIN_LIMIT_BYTES, so the connection stays usable."""
    while size <= DRAIN_LIMIT_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def wsgi_environ(scope, body, declared):
    """Builds the WSGI environ of an ASGI HTTP request (PEP 3333 strings: bytes as latin-1)."""
    raw_path = scope.get("raw_path") or quote(scope["path"]).encode("ascii")
    raw_path = raw_path.split(b"?", 1)[0]
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client") or ("", 0)
    environ = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": scope.get("root_path", "").encode("utf-8").decode("latin-1"),
        "PATH_INFO": unquote_to_bytes(raw_path).decode("latin-1"),
        "QUERY_STRING": scope["query_string"].decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]) if server[1] is not None else "80",
        "REMOTE_ADDR": str(client[0]),
        "REMOTE_PORT": str(client[1]),
        "SERVER_PROTOCOL": "HTTP/" + scope.get("http_version", "1.1"),
        "CONTENT_LENGTH": str(declared if declared is not None else len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body),
        "wsgi.input_terminated": True,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    for name, value in scope["headers"]:
        key = name.decode("latin-1").upper()
        if "_" in key:
            continue  # like gunicorn: X_Forwarded_For must not pass for X-Forwarded-For
        key = key.replace("-", "_")
        text = value.decode("latin-1")
        if key in ("CONTENT_LENGTH", "CONTENT_TYPE"):
            if key == "CONTENT_TYPE":
                environ[key] = text
            continue
        key = "HTTP_" + key
        if key in environ:
            environ[key] += ("; " if key == "HTTP_COOKIE" else ",") + text
        else:
            environ[key] = text
    return environ


def call_wsgi(wsgi_app, environ):
    """Runs one WSGI request to the end; returns (status, ASGI headers, body bytes)."""
    started = []
    chunks = []

    def start_response(status, headers, exc_info=None):
        if exc_info is not None and started:
            raise exc_info[1].with_traceback(exc_info[2])
        started[:] = [status, headers]
        return chunks.append

    result = wsgi_app(environ, start_response)
    try:
        for chunk in result:
            if chunk:
                chunks.append(chunk)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    status, headers = started
    return (int(status.split(" ", 1)[0]),
            [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers],
            b"".join(chunks))


class Protocol(ASGIProtocol):
    """gunicorn's asgi connection protocol, which answers a poll Front can answer from memory without an ASGI call.

    An ASGI call costs a scope, a task, a future and two response messages checked one by one;
    for a poll answered from memory that was half of the worker's CPU per poll. The answer is
    written as gunicorn writes any response (status line, Server, Date, keep-alive decision).
    Everything else, including a poll Front hands to Flask, takes gunicorn's own path.
    """

    _to_flask = None  # the scope changes for the request being served, when it goes to Flask

    @classmethod
    def _check_h1c_protocol_available(cls):
        # gunicorn caches the answer on the class it asks through but reads it from ASGIProtocol:
        # asked through this subclass, it would fall back to its pure-Python parser.
        return ASGIProtocol._check_h1c_protocol_available()

    async def _serve_http_request(self, request, sockname, peername):
        front = self.worker.asgi
        if (request.method == "GET" and not request.chunked and not request.content_length
                and isinstance(request.headers_bytes, list) and isinstance(front, Front)
                and not self.log.access_log_enabled and self._post_request is None):
            match = POLL_PATH.fullmatch(request.path)
            if match is not None:
                front.active_requests += 1
                try:
                    body, flask_query = await front.poll_from_memory(
                        match.group(1), (request.query or "").encode("latin-1"), request.headers_bytes)
                except Exception:
                    log.exception("answering a poll from memory failed; Flask answers it")
                    body, flask_query = None, None
                finally:
                    front.active_requests -= 1
                if body is not None:
                    if self._closed:
                        return False
                    close = self._will_close(request, False)
                    self._send_response_start(200, front.json_headers(len(body)), request, close=close)
                    self._send_body(body)
                    return not close
                self._to_flask = {TO_FLASK: True}
                if flask_query is not None:
                    self._to_flask["query_string"] = flask_query
        return await super()._serve_http_request(request, sockname, peername)

    def _build_http_scope(self, request, sockname, peername):
        scope = super()._build_http_scope(request, sockname, peername)
        if self._to_flask is not None:
            scope.update(self._to_flask)
            self._to_flask = None
        return scope


class Worker(ASGIWorker):
    """gunicorn's asgi worker, which on a graceful stop waits for requests rather than connections.

    The stock worker waits up to the graceful timeout for every open connection, and a browser's
    idle keep-alive connection stays open for the keep-alive time; the replies' drain
    (gunicorn.conf.py's worker_exit) would start only after that. Here held polls are answered at
    once and only requests in progress are waited for.
    """

    def init_process(self):
        # The stock worker builds its connections from this module name.
        gasgi.ASGIProtocol = Protocol
        super().init_process()

    async def _shutdown(self):
        self.log.info("Worker shutting down...")
        for server in self.servers:
            server.close()
        front = self.asgi if isinstance(self.asgi, Front) else None
        if front is not None and not self._quick_shutdown:
            front.release_held_polls()
            deadline = self.loop.time() + self.cfg.graceful_timeout
            while front.active_requests > 0 and self.loop.time() < deadline and not self._quick_shutdown:
                await asyncio.sleep(0.05)
        if self.lifespan and not self._quick_shutdown:
            try:
                await self.lifespan.shutdown()
            except Exception as error:
                self.log.error("ASGI lifespan shutdown error: %s", error)
