"""The relay under real gunicorn with two workers: polls, stops and a dead worker, across processes."""
import os
import signal
import time

import pytest

from tests.helpers import (ApiSession, body_of, get_message, lorem, new_conversation, poll_to_end,
                           poll_to_end_counting_answers, poll_until_text, send, simulator_env, simulator_fixture, stop,
                           wait_until)
from tests.servers import gunicorn_server

LEASE_SECONDS = 2

sim = simulator_fixture()


@pytest.fixture(scope="module")
def server(sim):
    env = simulator_env(sim, LEASE_SECONDS=LEASE_SECONDS, EXPOSE_WORKER_ID=1, POLL_TIMEOUT=5)
    with gunicorn_server(env=env, workers=2) as base_url:
        yield base_url


class PinnedSession(ApiSession):
    """A session whose kept-alive connection is served by one worker; every answer must come from it."""

    pid = None

    def request(self, method, url, *args, **kwargs):
        response = super().request(method, url, *args, **kwargs)
        served_by = int(response.headers["X-Served-By"])
        if self.pid is None:
            self.pid = served_by
        assert served_by == self.pid, f"{method} {url} was served by {served_by}, not worker {self.pid}"
        return response


def sessions_in_each_worker(base_url, count=2, deadline_seconds=20.0):
    """Returns one session per worker PID, all of the same owner (a new owner for each call)."""
    pinned = {}
    cookies = None
    deadline = time.monotonic() + deadline_seconds
    while len(pinned) < count:
        assert time.monotonic() < deadline, f"only workers {sorted(pinned)} answered"
        session = PinnedSession(base_url)
        if cookies is not None:
            session.cookies.update(cookies)
        response = session.get("/api/config")
        assert response.status_code == 200, body_of(response)
        if cookies is None:
            cookies = session.cookies.copy()
        if session.pid in pinned:
            session.close()
        else:
            pinned[session.pid] = session
    return list(pinned.values())


@pytest.fixture
def two_workers(server):
    """Two sessions of one owner: the first answered by one worker, the second by the other."""
    sessions = sessions_in_each_worker(server)
    yield sessions
    for session in sessions:
        session.close()


def test_a_reply_generated_in_one_worker_is_polled_through_the_other(two_workers):
    generating, other = two_workers
    reply = send(generating, new_conversation(generating), "hi [[sim tokens=50 rate=50]]")
    text, answer, answers_with_text = poll_to_end_counting_answers(other, reply["id"], 2.0)
    assert answer["status"] == "done"
    assert text == lorem(50)
    assert answers_with_text >= 2, "the other worker should see the text while it streams"
    assert get_message(other, reply["id"])["content"] == text
    assert poll_to_end(generating, reply["id"])[0] == text


@pytest.mark.parametrize("stopper", ["generating", "other"])
def test_stop_works_from_either_worker_and_closes_the_generating_workers_upstream(two_workers, sim, stopper):
    generating, other = two_workers
    reply_id = send(generating, new_conversation(generating), "hi [[sim tokens=200 rate=20]]")["id"]
    seen, _ = poll_until_text(other, reply_id, min_chars=10)
    disconnects = sim.stats()["disconnects"]
    stopped = stop(generating if stopper == "generating" else other, reply_id)
    assert stopped["status"] == "stopped"
    assert stopped["content"].startswith(seen)
    assert wait_until(lambda: sim.stats()["disconnects"] > disconnects, 1.5), "the upstream was not disconnected"
    time.sleep(0.3)
    for session in (generating, other):
        text, answer = poll_to_end(session, reply_id)
        assert answer["status"] == "stopped"
        assert text == stopped["content"]
        assert get_message(session, reply_id)["content"] == stopped["content"]


def test_killing_the_generating_worker_fails_the_reply_with_worker_lost_and_keeps_its_text(server, sim, two_workers):
    generating, other = two_workers
    conversation_id = new_conversation(generating)
    reply_id = send(generating, conversation_id, "hi [[sim tokens=400 rate=40]]")["id"]
    seen, answer = poll_until_text(other, reply_id, min_chars=20)
    assert answer["status"] == "streaming"
    disconnects = sim.stats()["disconnects"]
    os.kill(generating.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    rest, answer = poll_to_end(other, reply_id, cursor=answer["cursor"], deadline_seconds=10)
    # The documented bound is about LEASE_SECONDS plus a second; 10 s leaves room for a loaded machine.
    assert time.monotonic() - killed_at < 10
    assert sim.stats()["disconnects"] > disconnects
    assert answer["status"] == "failed"
    assert answer["error"]["code"] == "worker_lost"
    message = get_message(other, reply_id)
    assert message["content"] == seen + rest
    assert message["content"].startswith(seen)
    assert message["error"]["code"] == "worker_lost"
    # The conversation is free again: a new message is accepted and answered.
    follow_up = send(other, conversation_id, "again [[sim tokens=5]]")
    assert poll_to_end(other, follow_up["id"])[0] == lorem(5)
    assert wait_until(lambda: generating.pid not in server.worker_pids() and len(server.worker_pids()) == 2, 10)
