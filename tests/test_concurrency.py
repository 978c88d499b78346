"""Load on two cores: 200 held polls and 50 streaming replies at once under gunicorn."""
import collections
import threading
import time

import pytest
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from runtime import get_runtime
from simulator import Simulator, lorem_tokens
from tests import pg
from tests.helpers import new_conversation, poll_until_text, send, stop
from tests.servers import gunicorn_server
from tests.test_storage import report

OWNERS = 10
REPLIES_PER_OWNER = 5  # 50 replies
FOLLOWERS_PER_REPLY = 4  # 200 polls in flight
TOKENS = 40
RATE = 4  # tokens a second: each reply streams for about 10 s, so most polls wait for their text
POLL_TIMEOUT = 5
SILENT_PER_OWNER = 1  # replies that start after a silence longer than the poll timeout
# The silence starts when a reply is posted, not when its followers first poll: twice the poll
# timeout leaves one whole timeout for the posting and the start of the followers.
SILENCE_SECONDS = 2 * POLL_TIMEOUT
SLACK_SECONDS = 2.0
THREADS_PER_WORKER = 160


def lorem(count):
    return "".join(lorem_tokens(count))


class Load:
    """Shared tallies of the followers: polls in flight, their durations, and anything that went wrong."""

    def __init__(self):
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak_in_flight = 0
        self.durations = []
        self.errors = []
        self.empty_answers = 0
        self.empty_by_follower = collections.Counter()

    def begin(self):
        with self.lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def end(self, seconds):
        with self.lock:
            self.in_flight -= 1
            self.durations.append(seconds)


def follow(base_url, token, reply_id, load, start, texts, index):
    """Polls one reply to its end on a connection of its own, timing every poll."""
    text, cursor = "", "0"
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {token}"
        start.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            load.begin()
            started = time.monotonic()
            try:
                response = session.get(f"{base_url}/api/messages/{reply_id}/poll",
                                       params={"cursor": cursor, "timeout": POLL_TIMEOUT}, timeout=POLL_TIMEOUT + 30)
            except requests.RequestException as error:
                load.end(time.monotonic() - started)
                load.errors.append(f"{reply_id}: {error!r}")
                return
            load.end(time.monotonic() - started)
            if response.status_code != 200:
                load.errors.append(f"{reply_id}: {response.status_code} {response.text[:200]}")
                return
            answer = response.json()
            if not answer["text"] and not answer["done"]:
                with load.lock:
                    load.empty_answers += 1
                    load.empty_by_follower[index] += 1
            text += answer["text"]
            cursor = answer["cursor"]
            if answer["done"]:
                if answer["status"] != "done":
                    load.errors.append(f"{reply_id}: ended {answer['status']} {answer['error']}")
                texts[index] = text
                return
        load.errors.append(f"{reply_id}: not done after 60 s")


def probe_health(base_url, stop, timings):
    """Times /healthz on fresh connections while the load runs: other requests must not starve."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            requests.get(f"{base_url}/healthz", timeout=30)
            timings.append(time.monotonic() - started)
        except requests.RequestException:
            timings.append(float("inf"))
        stop.wait(0.25)


def start_replies(base_url, token, count, silence):
    """Starts count replies of one owner, each in a conversation of its own; returns (token, reply id) pairs."""
    started = []
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {token}"
        for _ in range(count):
            conversation = session.post(f"{base_url}/api/conversations", json={}, timeout=30).json()
            sent = session.post(f"{base_url}/api/conversations/{conversation['id']}/messages",
                                json={"content": f"go [[sim tokens={TOKENS} rate={RATE} latency={silence}]]"},
                                timeout=30)
            assert sent.status_code == 202, sent.text
            started.append((token, sent.json()["reply"]["id"]))
    return started


@pytest.fixture(scope="module")
def sim():
    with Simulator(rate=0, content="lorem") as simulator:
        yield simulator


def test_two_hundred_held_polls_and_fifty_streaming_replies_share_two_cores(request, sim):
    tokens = [f"load-owner-{index}" for index in range(OWNERS)]
    env = {"OPENAI_BASE_URL": sim.url, "OPENAI_API_KEY": "sk-test", "CHAT_MODEL": "sim-chat",
           "ACCESS_TOKENS": ",".join(tokens), "MAX_RUNNING_PER_OWNER": REPLIES_PER_OWNER, "POLL_TIMEOUT": POLL_TIMEOUT}
    with gunicorn_server(env=env, workers=2, threads=THREADS_PER_WORKER) as base_url:
        load, start, stop = Load(), threading.Event(), threading.Event()
        followers, texts, threads = [], [], []

        def add_followers(started_replies):
            """Starts FOLLOWERS_PER_REPLY followers for each reply; they all wait for the start signal."""
            for token, reply_id in started_replies:
                for _ in range(FOLLOWERS_PER_REPLY):
                    index = len(followers)
                    followers.append((token, reply_id))
                    texts.append(None)
                    thread = threading.Thread(target=follow,
                                              args=(base_url, token, reply_id, load, start, texts, index))
                    threads.append(thread)
                    thread.start()

        streaming, silent = [], []
        try:
            for token in tokens:
                streaming += start_replies(base_url, token, REPLIES_PER_OWNER - SILENT_PER_OWNER, 0)
            add_followers(streaming)
            # The silent replies start last, just before the followers, so their silence outlasts a whole poll.
            silent_posted_at = time.monotonic()
            for token in tokens:
                silent += start_replies(base_url, token, SILENT_PER_OWNER, SILENCE_SECONDS)
            first_silent_follower = len(followers)
            add_followers(silent)
        finally:
            began = time.monotonic()
            start.set()  # also on a failed post, so no follower waits forever
        replies = streaming + silent
        health = []
        prober = threading.Thread(target=probe_health, args=(base_url, stop, health))
        prober.start()
        for thread in threads:
            thread.join(90)
        took = time.monotonic() - began
        stop.set()
        prober.join(35)
        log_text = base_url.log_text()

    assert not load.errors, load.errors[:5]
    assert all(text == lorem(TOKENS) for text in texts), "a follower's text differs from the reply"
    slowest = max(load.durations)
    assert slowest <= POLL_TIMEOUT + SLACK_SECONDS, f"a poll took {slowest:.2f} s"
    assert load.peak_in_flight >= len(followers) * 0.9
    # The followers of the silent replies each waited out at least one whole poll timeout.
    lag = began - silent_posted_at
    assert lag < SILENCE_SECONDS - POLL_TIMEOUT, f"posting the silent replies took {lag:.2f} s of their silence"
    held = [load.empty_by_follower[index] for index in range(first_silent_follower, len(followers))]
    assert all(held), f"empty answers of the silent replies' followers: {held} (followers began {lag:.2f} s late)"
    assert max(health) < SLACK_SECONDS, f"/healthz took {max(health):.2f} s under load"
    assert "Traceback" not in log_text and "[CRITICAL]" not in log_text
    durations = sorted(load.durations)
    median = durations[len(durations) // 2]
    p99 = durations[int(len(durations) * 0.99)]
    report(request, f"{len(replies)} replies x {FOLLOWERS_PER_REPLY} followers ({len(followers)} polls in flight, "
                    f"peak {load.peak_in_flight}) on 2 workers x {THREADS_PER_WORKER} threads: {len(durations)} polls "
                    f"in {took:.1f} s ({load.empty_answers} held to the {POLL_TIMEOUT} s timeout; the silent replies' "
                    f"followers began {lag:.2f} s into a {SILENCE_SECONDS} s silence), median {median:.3f} s, "
                    f"p99 {p99:.3f} s, slowest {slowest:.3f} s; "
                    f"/healthz slowest {max(health):.3f} s; all texts exact")


@pytest.mark.skipif(not pg.enabled(), reason="row locks that wait are PostgreSQL's; SQLite writes one at a time")
def test_renewing_leases_skips_a_reply_row_another_transaction_holds_instead_of_waiting(app, client):
    # The chunk writer locks its replies' rows one by one, in its own order, and extends their leases
    # itself; a renewal that waited for such a row could deadlock with it.
    reply_id = send(client, new_conversation(client), "go [[sim tokens=2000 rate=50]]")["id"]
    poll_until_text(client, reply_id, min_chars=20)
    runtime = get_runtime(app)
    holder = create_engine(app.config["SQLALCHEMY_DATABASE_URI"], poolclass=NullPool)
    renewal = threading.Thread(target=runtime._renew_leases, name="test-lease-renewal", daemon=True)
    try:
        with holder.connect() as conn:
            transaction = conn.begin()
            conn.execute(text("SELECT id FROM messages WHERE id = :id FOR UPDATE"), {"id": reply_id})
            renewal.start()
            renewal.join(3)
            waited = renewal.is_alive()
            transaction.rollback()
        renewal.join(10)
        assert not waited, "renewing leases waited for a row that another transaction holds"
    finally:
        holder.dispose()
        stop(client, reply_id)
