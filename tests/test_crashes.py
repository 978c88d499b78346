"""Crashes and restarts under real gunicorn, and upstream faults the simulator cannot play.

Every reply ends `done` or `failed` with `worker_lost` within a bounded time, none stays
running, and no text a client already polled disappears.
"""
import os
import signal
import socket
import ssl
import subprocess
import tempfile
import json
import threading
import time
from contextlib import contextmanager

import pytest
import requests

from simulator import Simulator, lorem_tokens
from tests import pg
from tests.helpers import ApiSession, ask, body_of, get_message, poll_to_end, poll_until_text, wait_until
from tests.servers import gunicorn_server, stop_process_group
from tests.test_storage import report

TOKEN = "crash-test-token"
RATE = 20  # simulator tokens per second for the replies that a crash interrupts
DRAIN_SECONDS = 4
SHORT_TOKENS = 30  # about 1.5 s of text: finishes inside the drain
LONG_TOKENS = 1200  # about 60 s of text: outlasts every drain


def lorem(count):
    return "".join(lorem_tokens(count))


@pytest.fixture(scope="module")
def sim():
    with Simulator(rate=0, content="lorem") as simulator:
        yield simulator


def server_env(sim, **settings):
    env = {"OPENAI_BASE_URL": sim.url, "OPENAI_API_KEY": "sk-test", "CHAT_MODEL": "sim-chat",
           "IMAGE_MODEL": "sim-image", "ACCESS_TOKENS": TOKEN, "EXPOSE_WORKER_ID": 1, "POLL_TIMEOUT": 5,
           "LEASE_SECONDS": 30, "REPLY_DRAIN_SECONDS": DRAIN_SECONDS}
    env.update(settings)
    return env


def api(base_url):
    """A session of the test owner (a Bearer token, so the owner survives restarts)."""
    session = ApiSession(base_url, timeout=15)
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    return session


def start_reply(session, tokens):
    """Starts a reply of tokens lorem tokens at RATE; returns (reply id, PID of the worker that runs it)."""
    created = session.post("/api/conversations", json={})
    assert created.status_code == 201, body_of(created)
    sent = session.post(f"/api/conversations/{body_of(created)['id']}/messages",
                        json={"content": f"go [[sim tokens={tokens} rate={RATE}]]"})
    assert sent.status_code == 202, body_of(sent)
    return body_of(sent)["reply"]["id"], int(sent.headers["X-Served-By"])


class Follower:
    """Follows one reply's cursor like a careful client: a lost answer is simply asked again."""

    def __init__(self, base_url, reply_id):
        self.base_url = base_url
        self.reply_id = reply_id
        self.cursor = "0"
        self.text = ""
        self.answer = None

    def poll_once(self, timeout=1.0):
        """Polls once; returns the answer, or None when the server could not be reached."""
        try:
            response = requests.get(f"{self.base_url}/api/messages/{self.reply_id}/poll",
                                    params={"cursor": self.cursor, "timeout": timeout},
                                    headers={"Authorization": f"Bearer {TOKEN}"}, timeout=timeout + 10)
        except requests.RequestException:
            time.sleep(0.1)
            return None
        assert response.status_code == 200, (response.status_code, response.text[:300])
        answer = response.json()
        assert answer["cursor"] == str(int(self.cursor) + len(answer["text"]))
        self.text += answer["text"]
        self.cursor = answer["cursor"]
        self.answer = answer
        return answer

    def until_text(self, chars, deadline_seconds=15):
        deadline = time.monotonic() + deadline_seconds
        while len(self.text) < chars:
            assert time.monotonic() < deadline, f"reply {self.reply_id} sent too little text"
            answer = self.poll_once()
            assert answer is None or not answer["done"], answer
        return self.text

    def to_end(self, deadline_seconds):
        """Polls until the reply is final and fully read; returns the seconds that took."""
        started = time.monotonic()
        while self.answer is None or not self.answer["done"]:
            assert time.monotonic() - started < deadline_seconds, (
                f"reply {self.reply_id} not final after {deadline_seconds} s: {self.answer}")
            self.poll_once()
        return time.monotonic() - started


def assert_ended_keeping_polled_text(follower, polled_before, expected_status, full_text=None):
    """Checks the reply's end: its status, and that what was polled is a prefix of the final content."""
    answer = follower.answer
    assert answer["status"] == expected_status, answer
    if expected_status == "failed":
        assert answer["error"]["code"] == "worker_lost", answer
    else:
        assert answer["error"] is None
    message = get_message(api(follower.base_url), follower.reply_id)
    assert message["status"] == expected_status
    assert message["content"] == follower.text
    assert message["content"].startswith(polled_before)
    if full_text is not None:
        assert message["content"] == full_text
    # From 0, any later reader gets the same final text.
    again = Follower(follower.base_url, follower.reply_id)
    again.to_end(10)
    assert again.text == message["content"]


def running_rows(database_url):
    """Counts the replies still marked running in the database at database_url (SQLite or PostgreSQL)."""
    return pg.query(database_url, "SELECT count(*) FROM messages WHERE status IN ('pending', 'streaming')")[0][0]


# kill -9 --------------------------------------------------------------------------------

def test_killing_the_only_worker_fails_its_reply_and_the_replacement_worker_answers(request, sim):
    lease = 2
    with gunicorn_server(env=server_env(sim, LEASE_SECONDS=lease), workers=1) as base_url:
        reply_id, worker = start_reply(api(base_url), LONG_TOKENS)
        follower = Follower(base_url, reply_id)
        polled = follower.until_text(40)
        os.kill(worker, signal.SIGKILL)
        took = follower.to_end(deadline_seconds=lease + 8)
        assert_ended_keeping_polled_text(follower, polled, "failed")
        assert worker not in base_url.worker_pids()
        assert running_rows(base_url.database_url) == 0
    report(request, f"kill -9 of the only worker (LEASE_SECONDS={lease}): worker_lost after {took:.2f} s")


# Graceful reload (HUP) ------------------------------------------------------------------

def test_a_graceful_reload_finishes_short_replies_and_fails_long_ones_at_once(request, sim):
    with gunicorn_server(env=server_env(sim), workers=2) as base_url:
        session = api(base_url)
        short_id, _ = start_reply(session, SHORT_TOKENS)
        long_id, _ = start_reply(session, LONG_TOKENS)
        short, long = Follower(base_url, short_id), Follower(base_url, long_id)
        short_polled, long_polled = short.until_text(10), long.until_text(10)
        old_workers = base_url.worker_pids()
        os.kill(base_url.process.pid, signal.SIGHUP)
        reloaded_at = time.monotonic()
        short.to_end(DRAIN_SECONDS + 8)
        long.to_end(DRAIN_SECONDS + 8)
        long_took = time.monotonic() - reloaded_at
        assert_ended_keeping_polled_text(short, short_polled, "done", lorem(SHORT_TOKENS))
        assert_ended_keeping_polled_text(long, long_polled, "failed")
        # The lease (30 s) had not run out: the exiting worker recorded the loss itself.
        assert long_took < DRAIN_SECONDS + 8
        assert wait_until(lambda: set(base_url.worker_pids()).isdisjoint(old_workers), 10)
        assert running_rows(base_url.database_url) == 0
    report(request, f"HUP reload (REPLY_DRAIN_SECONDS={DRAIN_SECONDS}, lease 30 s): short reply done; "
                    f"long reply worker_lost {long_took:.2f} s after the signal")


# Worker recycling (max_requests) -----------------------------------------------------

def test_worker_recycling_by_max_requests_finishes_short_replies_and_fails_long_ones(request, sim):
    args = ("--max-requests", "40", "--max-requests-jitter", "0")
    with gunicorn_server(env=server_env(sim), workers=2, extra_args=args) as base_url:
        pinned = api(base_url)  # one kept-alive connection, so one worker serves all its requests
        short_id, worker = start_reply(pinned, SHORT_TOKENS)
        long_id, same_worker = start_reply(pinned, LONG_TOKENS)
        assert same_worker == worker
        short, long = Follower(base_url, short_id), Follower(base_url, long_id)
        short_polled, long_polled = short.until_text(10), long.until_text(10)
        recycled_at = None
        for _ in range(60):
            try:
                response = pinned.get("/healthz")
            except requests.ConnectionError:
                break
            if int(response.headers["X-Served-By"]) != worker or response.headers.get("Connection") == "close":
                break
        recycled_at = time.monotonic()
        # The worker logs it around the time it closes the connection; the log may trail a moment.
        assert wait_until(lambda: "Autorestarting worker" in base_url.log_text(), 5)
        short.to_end(DRAIN_SECONDS + 8)
        long.to_end(DRAIN_SECONDS + 8)
        long_took = time.monotonic() - recycled_at
        assert_ended_keeping_polled_text(short, short_polled, "done", lorem(SHORT_TOKENS))
        assert_ended_keeping_polled_text(long, long_polled, "failed")
        assert long_took < DRAIN_SECONDS + 8
        assert wait_until(lambda: worker not in base_url.worker_pids(), 10)
        assert running_rows(base_url.database_url) == 0
    report(request, f"max_requests recycling: short reply done; long reply worker_lost {long_took:.2f} s "
                    f"after the worker's last request")


# Full server restart ----------------------------------------------------------------------

@contextmanager
def shared_database():
    """A database and instance folder that outlive one server; yields (server settings, database URL)."""
    with tempfile.TemporaryDirectory(prefix="relay-restart-") as folder:
        if pg.enabled():
            with pg.fresh_database() as url:
                yield {"DATABASE_URL": url, "INSTANCE_PATH": os.path.join(folder, "instance")}, url
            return
        url = "sqlite:///" + os.path.join(folder, "app.db")
        yield {"DATABASE_URL": url, "INSTANCE_PATH": os.path.join(folder, "instance")}, url


def test_a_graceful_restart_finishes_short_replies_and_the_new_server_serves_every_reply(request, sim):
    with shared_database() as (paths, database):
        env = server_env(sim, **paths)
        with gunicorn_server(env=env, workers=2) as first:
            session = api(first)
            short_id, _ = start_reply(session, SHORT_TOKENS)
            long_id, _ = start_reply(session, LONG_TOKENS)
            short, long = Follower(first, short_id), Follower(first, long_id)
            short_polled, long_polled = short.until_text(10), long.until_text(10)
            stopping_at = time.monotonic()
            stop_process_group(first.process, timeout=DRAIN_SECONDS + 20)
            stopped_in = time.monotonic() - stopping_at
        assert running_rows(database) == 0, "the stopping server left replies running"
        with gunicorn_server(env=env, workers=2) as second:
            short.base_url = long.base_url = second
            short.to_end(10)
            long.to_end(10)
            assert_ended_keeping_polled_text(short, short_polled, "done", lorem(SHORT_TOKENS))
            assert_ended_keeping_polled_text(long, long_polled, "failed")
    report(request, f"graceful restart (SIGTERM): the old server stopped in {stopped_in:.2f} s; "
                    "short reply done, long reply worker_lost before the new server started")


def test_a_crash_of_the_whole_server_fails_its_replies_once_a_new_server_runs(request, sim):
    lease = 2
    with shared_database() as (paths, database):
        env = server_env(sim, LEASE_SECONDS=lease, **paths)
        with gunicorn_server(env=env, workers=2) as first:
            reply_id, _ = start_reply(api(first), LONG_TOKENS)
            follower = Follower(first, reply_id)
            polled = follower.until_text(40)
            os.killpg(first.process.pid, signal.SIGKILL)
            crashed_at = time.monotonic()
            first.process.wait(5)
        assert running_rows(database) == 1, "nobody was left to notice the crash"
        with gunicorn_server(env=env, workers=2) as second:
            follower.base_url = second
            follower.to_end(lease + 10)
            took = time.monotonic() - crashed_at
            assert_ended_keeping_polled_text(follower, polled, "failed")
        assert running_rows(database) == 0
    report(request, f"kill -9 of the whole server, then a new one (LEASE_SECONDS={lease}): "
                    f"worker_lost {took:.2f} s after the crash (server start included)")


# Upstream faults the simulator cannot play -----------------------------------------------

def failed_with(client, reply_id, code):
    text, answer = poll_to_end(client, reply_id, deadline_seconds=20)
    assert answer["status"] == "failed", answer
    assert answer["error"]["code"] == code, answer
    assert answer["error"]["message"]
    assert get_message(client, reply_id)["content"] == text
    return text, answer


def client_for(request, base_url, **settings):
    app_config = request.getfixturevalue("app_config")
    app_config.update({"OPENAI_BASE_URL": base_url, "UPSTREAM_RETRY_MAX_WAIT": 0.05}, **settings)
    return request.getfixturevalue("client")


def test_a_host_name_that_does_not_resolve_fails_the_reply_with_upstream_error(request):
    client = client_for(request, "http://nonexistent.invalid/v1")
    text, answer = failed_with(client, ask(client, "hi"), "upstream_error")
    assert text == ""
    assert "resolved" in answer["error"]["message"]


def test_https_to_a_plain_http_server_fails_the_reply_with_upstream_error(request, simulator):
    port = simulator.url.split(":")[2].split("/")[0]
    client = client_for(request, f"https://127.0.0.1:{port}/v1")
    text, answer = failed_with(client, ask(client, "hi"), "upstream_error")
    assert text == ""
    assert "TLS" in answer["error"]["message"]


@pytest.fixture
def self_signed_server(tmp_path):
    """A TLS server on 127.0.0.1 whose certificate nobody trusts."""
    if subprocess.run(["which", "openssl"], capture_output=True).returncode != 0:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    handshakes = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.settimeout(5)
            try:
                with context.wrap_socket(conn, server_side=True):
                    handshakes.append("completed")
            except (ssl.SSLError, OSError):
                handshakes.append("refused")
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{listener.getsockname()[1]}/v1", handshakes
    stop.set()
    thread.join(5)
    listener.close()


def test_an_untrusted_tls_certificate_fails_the_reply_with_upstream_error(request, self_signed_server):
    url, handshakes = self_signed_server
    client = client_for(request, url)
    text, answer = failed_with(client, ask(client, "hi"), "upstream_error")
    assert text == ""
    assert "TLS" in answer["error"]["message"]
    assert handshakes and "completed" not in handshakes


class RawUpstream:
    """A tiny raw-socket upstream: answers one chat request with a few SSE frames, then misbehaves."""

    def __init__(self, frames, then):
        self.frames = frames
        self.then = then  # "reset" (RST after the frames) or "silence" (send nothing at all)
        self.release = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1"
        self.connections = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        self.connections.append(conn)
        read_request(conn)
        if self.then == "silence":
            self.release.wait(30)
            conn.close()
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for frame in self.frames:
            data = f"data: {frame}\n\n".encode()
            conn.sendall(b"%x\r\n%s\r\n" % (len(data), data))
        # Resets only once the test saw the frames arrive, so none of them can be lost in flight.
        self.release.wait(30)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()

    def close(self):
        self.release.set()
        self.listener.close()
        self.thread.join(5)


def read_request(conn):
    conn.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        piece = conn.recv(65536)
        if not piece:
            return
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        piece = conn.recv(65536)
        if not piece:
            return
        body += piece


def content_frame(text):
    return json.dumps({"id": "c1", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": text}, "finish_reason": None}]})


def test_a_connection_reset_mid_stream_fails_the_reply_with_upstream_error_and_keeps_its_text(request):
    upstream = RawUpstream([content_frame("Hello "), content_frame("there, "), content_frame("partly")], "reset")
    try:
        client = client_for(request, upstream.url)
        reply_id = ask(client, "hi")
        seen, _ = poll_until_text(client, reply_id, min_chars=len("Hello there, partly"))
        upstream.release.set()
        text, answer = failed_with(client, reply_id, "upstream_error")
    finally:
        upstream.close()
    assert seen == text == "Hello there, partly"
    assert "broke" in answer["error"]["message"]


def test_an_upstream_that_accepts_but_never_answers_fails_the_reply_with_upstream_timeout(request):
    upstream = RawUpstream([], "silence")
    try:
        client = client_for(request, upstream.url, UPSTREAM_IDLE_TIMEOUT=1.0, UPSTREAM_RETRIES=0)
        started = time.monotonic()
        text, _ = failed_with(client, ask(client, "hi"), "upstream_timeout")
        assert time.monotonic() - started < 5
    finally:
        upstream.close()
    assert text == ""
