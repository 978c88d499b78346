"""Several app hosts sharing one PostgreSQL: cross-host polls, stops, wake-ups and a crashed host.

Each host is its own gunicorn server on its own port. They share the database and the
session secret, and nothing else, as hosts behind a load balancer without sticky sessions.
Runs only when TEST_DATABASE_URL names a PostgreSQL server.
"""
import os
import signal
import statistics
import threading
import time
from contextlib import ExitStack, contextmanager

import pytest
from sqlalchemy import create_engine, select, text

import buffer
import dialect
from models import Message, db
from tests import pg
from tests.helpers import (ApiSession, get_message, lorem, new_conversation, poll, poll_to_end,
                           poll_to_end_counting_answers, poll_until_text, send, simulator_env, stop, wait_until)
from tests.servers import gunicorn_server

pytestmark = pytest.mark.skipif(not pg.enabled(), reason="set TEST_DATABASE_URL to a PostgreSQL server to run these")

LEASE_SECONDS = 2
# docs/API.md: a dead process's reply fails within LEASE_SECONDS plus about 3 s.
WORKER_LOST_BOUND = LEASE_SECONDS + 3


def host_env(simulator, database_url):
    return simulator_env(simulator, DATABASE_URL=database_url, SECRET_KEY="one-secret-for-every-host",
                         LEASE_SECONDS=LEASE_SECONDS, POLL_TIMEOUT=5, EXPOSE_WORKER_ID=1)


def sessions_for(host_a, host_b):
    """Returns one session per host that share one cookie jar: one owner, whichever host answers."""
    on_a, on_b = ApiSession(host_a), ApiSession(host_b)
    on_b.cookies = on_a.cookies
    return on_a, on_b


@pytest.fixture(scope="module")
def shared_database():
    with pg.fresh_database("relay_hosts") as url:
        yield url


@pytest.fixture(scope="module")
def hosts(simulator, shared_database):
    """Two hosts, A and B, one gunicorn worker each, on one database."""
    with ExitStack() as stack:
        host_a = stack.enter_context(gunicorn_server(env=host_env(simulator, shared_database), workers=1, threads=16))
        host_b = stack.enter_context(gunicorn_server(env=host_env(simulator, shared_database), workers=1, threads=16))
        yield host_a, host_b


@pytest.fixture
def on_a_and_b(hosts):
    on_a, on_b = sessions_for(*hosts)
    yield on_a, on_b
    on_a.close()
    on_b.close()


def test_a_reply_generated_on_host_a_is_polled_through_host_b(on_a_and_b):
    on_a, on_b = on_a_and_b
    reply = send(on_a, new_conversation(on_a), "hi [[sim tokens=40 rate=40]]")
    text, answer, answers_with_text = poll_to_end_counting_answers(on_b, reply["id"], 2.0)
    assert answer["status"] == "done"
    assert text == lorem(40)
    assert answers_with_text >= 2, "host B should see the text while host A streams it"
    assert get_message(on_b, reply["id"])["content"] == text
    assert poll_to_end(on_a, reply["id"])[0] == text


def test_a_reply_generated_on_host_a_is_stopped_through_host_b(on_a_and_b, simulator):
    on_a, on_b = on_a_and_b
    reply_id = send(on_a, new_conversation(on_a), "hi [[sim tokens=400 rate=20]]")["id"]
    seen, _ = poll_until_text(on_b, reply_id, min_chars=10)
    disconnects = simulator.stats()["disconnects"]
    stopped = stop(on_b, reply_id)
    assert stopped["status"] == "stopped"
    assert stopped["content"].startswith(seen)
    # Host A learns of the stop from the database and closes its upstream connection.
    assert wait_until(lambda: simulator.stats()["disconnects"] > disconnects, 2.0), "host A kept streaming"
    time.sleep(0.3)
    for session in (on_a, on_b):
        text, answer = poll_to_end(session, reply_id)
        assert answer["status"] == "stopped"
        assert text == stopped["content"]
        assert get_message(session, reply_id)["content"] == stopped["content"]


def held_poll(session, reply_id, returned):
    answer = poll(session, reply_id, "0", 10.0)
    returned[session.base_url] = (time.monotonic(), answer)


def test_a_poll_held_on_host_b_wakes_promptly_when_host_a_writes(on_a_and_b):
    on_a, on_b = on_a_and_b
    delays = []
    for _ in range(5):
        reply_id = send(on_a, new_conversation(on_a), "hi [[sim tokens=3 rate=50 latency=0.6]]")["id"]
        returned = {}
        threads = [threading.Thread(target=held_poll, args=(session, reply_id, returned)) for session in (on_a, on_b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
        (at_a, answer_a), (at_b, answer_b) = returned[on_a.base_url], returned[on_b.base_url]
        assert answer_a["text"] and answer_b["text"], "both polls should have been woken by the first text"
        # Host A's poll wakes in-process at the commit; host B's poll through NOTIFY.
        delays.append(at_b - at_a)
        poll_to_end(on_a, reply_id)
    # Without notifications, B would only find the text at its periodic re-check (1 s).
    assert statistics.median(delays) < 0.15, delays
    assert max(delays) < dialect.LISTEN_FALLBACK_SECONDS, delays


def test_no_transaction_stays_open_while_polls_wait(on_a_and_b, shared_database):
    on_a, on_b = on_a_and_b
    reply_id = send(on_a, new_conversation(on_a), "hi [[sim tokens=3 latency=2.5]]")["id"]
    returned = {}
    threads = [threading.Thread(target=held_poll, args=(session, reply_id, returned))
               for session in (on_a, on_b, on_a, on_b)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    samples = []
    while any(thread.is_alive() for thread in threads) and len(samples) < 15:
        samples.append(pg.open_transactions(shared_database))
        time.sleep(0.1)
    for thread in threads:
        thread.join(10)
    assert len(samples) >= 5, "the polls should have been held while the database was watched"
    assert max(samples) == 0, samples


def test_every_host_listens_on_one_dedicated_connection(hosts, shared_database):
    with pg.admin_engine().connect() as conn:
        listening = conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = :name AND query LIKE 'LISTEN %'"),
            {"name": shared_database.rsplit("/", 1)[1]}).scalar_one()
    # One gunicorn worker per host, one listening connection per worker.
    assert listening == 2


def test_killing_host_a_mid_reply_lets_host_b_fail_it_as_worker_lost_in_the_documented_bound(simulator):
    with pg.fresh_database("relay_crash") as database_url, \
            gunicorn_server(env=host_env(simulator, database_url), workers=1, threads=16) as host_b, \
            gunicorn_server(env=host_env(simulator, database_url), workers=1, threads=16) as host_a:
        on_a, on_b = sessions_for(host_a, host_b)
        conversation_id = new_conversation(on_a)
        reply_id = send(on_a, conversation_id, "hi [[sim tokens=400 rate=40]]")["id"]
        seen, answer = poll_until_text(on_b, reply_id, min_chars=20)
        assert answer["status"] == "streaming"
        disconnects = simulator.stats()["disconnects"]
        os.killpg(host_a.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        rest, answer = poll_to_end(on_b, reply_id, cursor=answer["cursor"], deadline_seconds=WORKER_LOST_BOUND + 5)
        took = time.monotonic() - killed_at
        assert answer["status"] == "failed"
        assert answer["error"]["code"] == "worker_lost"
        assert took < WORKER_LOST_BOUND, f"host B noticed the dead host after {took:.1f} s"
        assert wait_until(lambda: simulator.stats()["disconnects"] > disconnects, 2.0)
        message = get_message(on_b, reply_id)
        assert message["content"] == seen + rest
        assert message["error"]["code"] == "worker_lost"
        follow_up = send(on_b, conversation_id, "again [[sim tokens=5]]")
        assert poll_to_end(on_b, follow_up["id"])[0] == lorem(5)
        on_a.close()
        on_b.close()


# The dialect's PostgreSQL parts, on their own -------------------------------------------

@pytest.fixture
def engine(database_url):
    engine = create_engine(database_url)
    db.metadata.create_all(engine)
    yield engine
    engine.dispose()


@contextmanager
def connected_detector(engine, fallback_seconds=30):
    """Yields a ListenDetector on engine once its listening connection is up, and closes it afterwards."""
    detector = dialect.ListenDetector(engine, fallback_seconds=fallback_seconds)
    try:
        assert detector.connected.wait(5)
        yield detector
    finally:
        detector.close()


def test_a_notification_names_the_messages_that_changed(engine):
    with connected_detector(engine) as detector:
        detector.changes(["m1", "m2"])  # the first answer covers everything
        with engine.begin() as conn:
            dialect.announce_changes(conn, ["m2", "m9"])
        started = time.monotonic()
        detector.wait()
        assert time.monotonic() - started < 1
        assert detector.changes(["m1", "m2"]) == ["m2"]
        assert detector.changes(["m1", "m2"]) == []


def test_nothing_is_announced_before_the_transaction_commits(engine):
    with connected_detector(engine) as detector:
        detector.changes(["m1"])
        with engine.connect() as conn:
            dialect.announce_changes(conn, ["m1"])
            time.sleep(0.3)
            assert detector.changes(["m1"]) == []
            conn.rollback()
        time.sleep(0.3)
        assert detector.changes(["m1"]) == []


def test_many_changed_messages_are_split_across_notifications(engine):
    with connected_detector(engine) as detector:
        ids = [f"message-{number:05d}-{'x' * 12}" for number in range(1000)]
        detector.changes(ids)
        with engine.begin() as conn:
            dialect.announce_changes(conn, ids)
        assert wait_until(lambda: len(detector._changed_ids) == len(ids), 5)
        assert sorted(detector.changes(ids)) == sorted(ids)


def test_the_listener_reconnects_and_then_counts_everything_as_changed(engine):
    with connected_detector(engine) as detector:
        detector.changes(["m1"])
        with engine.connect() as conn:
            conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query LIKE 'LISTEN %'"))
            conn.commit()
        assert wait_until(lambda: not detector.connected.is_set(), 5)
        assert detector.connected.wait(10), "the listener did not reconnect"
        assert detector.changes(["m1", "m2"]) == ["m1", "m2"]
        with engine.begin() as conn:
            dialect.announce_changes(conn, ["m2"])
        assert wait_until(lambda: "m2" in detector._changed_ids, 5)


def test_without_notifications_every_watched_message_is_rechecked_after_the_fallback(engine):
    with connected_detector(engine, fallback_seconds=0.3) as detector:
        detector.changes(["m1"])
        assert detector.changes(["m1"]) == []
        started = time.monotonic()
        detector.wait()
        assert 0.2 < time.monotonic() - started < 1.0
        assert detector.changes(["m1"]) == ["m1"]


def test_nul_characters_from_the_upstream_are_kept_as_replacement_characters(app):
    with app.app_context():
        engine = db.engine
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO conversations (id, owner, title, model, system_prompt, created_at, "
                              "updated_at) VALUES ('c1', 'o', '', '', '', 0, 0)"))
            conn.execute(Message.__table__.insert().values(
                id="m1", conversation_id="c1", owner="o", position=1, role="assistant", mode="chat", content="",
                length=0, status="streaming", has_image=0, model="", created_at=0.0))
        writer = buffer.ChunkWriter(engine, buffer.Notifier(), flush_interval=0.0, lease_seconds=10)
        try:
            writer.open("m1")
            writer.append("m1", "a\x00b")
            assert writer.finish("m1", status="failed", error=("upstream_error", "bad \x00 byte"))
        finally:
            writer.shutdown()
        with engine.connect() as conn:
            row = conn.execute(select(Message.__table__).where(Message.__table__.c.id == "m1")).first()
        assert row.content == "a\ufffdb" and row.length == 3
        assert row.error_message == "bad \ufffd byte"
