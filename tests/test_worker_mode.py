"""Thread-free mode: uWSGI without threads answers polls, a separate `flask worker` process runs the replies.

The web side is deploy/shared-host/uwsgi.ini (no --enable-threads, GENERATION_MODE=worker),
run with 2 processes; the worker is deploy/shared-host/always-on-task.sh, or the ExecStart
of deploy/relay-worker.service. Both are rendered for this checkout and run as shipped.
"""
import os
import signal
import sys
import time
from contextlib import contextmanager

import pytest

from tests import deployed
from tests.helpers import (ask_served_by, bearer_session, body_of, get_message, lorem, poll_to_end,
                           poll_to_end_counting_answers, poll_until_text, simulator_env, simulator_fixture, wait_until)

TOKEN = "thread-free-token"
LEASE_SECONDS = 2
POLL_TIMEOUT = 2
# With no live worker, a poll notices an expired lease when it starts; one held meanwhile
# first runs out its timeout. Documented in docs/DEPLOY.md; the rest is slack for a loaded machine.
WORKER_LOST_BOUND = LEASE_SECONDS + POLL_TIMEOUT + 3
RECHECK_SECONDS = 0.1
WORKER_COMMANDS = ("always-on-task.sh", "relay-worker.service")


def worker_command(name, extra_args=()):
    """Returns (argv, working directory) of a shipped worker command, rendered for this checkout."""
    if name == "relay-worker.service":
        argv, cwd = deployed.unit_command(name, port=0)
        return [*argv, *extra_args], cwd
    script = deployed.render(deployed.read_deploy_file(f"shared-host/{name}"),
                             [(deployed.EXAMPLE_VENV, sys.prefix), (deployed.EXAMPLE_ROOT, deployed.ROOT)])
    return ["sh", "-c", " ".join([script.rstrip(), *extra_args])], deployed.ROOT


sim = simulator_fixture()


@pytest.fixture(scope="module")
def web(sim):
    """The thread-free web processes: uWSGI as deploy/shared-host/uwsgi.ini runs it, with 2 processes."""
    env = simulator_env(sim, ACCESS_TOKENS=TOKEN, EXPOSE_WORKER_ID=1, POLL_TIMEOUT=POLL_TIMEOUT,
                        LEASE_SECONDS=LEASE_SECONDS, POLL_RECHECK_SECONDS=RECHECK_SECONDS, MAX_RUNNING_PER_OWNER=50,
                        MESSAGES_PER_MINUTE=1000, REPLY_DRAIN_SECONDS=1)
    with deployed.uwsgi_server("shared-host/uwsgi.ini", env, extra_args=("--processes", "2")) as base_url:
        base_url.env = env
        yield base_url


@contextmanager
def start_worker(web, name="always-on-task.sh", extra_args=(), **settings):
    """Runs a shipped worker command against the web server's database, once it is ready; yields its Popen.

    Replies must not be started before: one left pending longer than LEASE_SECONDS fails as worker_lost.
    """
    argv, cwd = worker_command(name, extra_args)
    with deployed.worker_process(argv, cwd, {**web.env, **settings}, web.workdir) as process:
        assert wait_until(lambda: process.poll() is not None or "running replies" in log_of(process), 30), (
            "the worker did not start in 30 s")
        assert process.poll() is None, log_of(process)
        yield process


def log_of(process):
    with open(process.log_path, errors="replace") as handle:
        return handle.read()


@pytest.fixture
def worker(web):
    with start_worker(web) as process:
        yield process


def api(base_url):
    return bearer_session(base_url, TOKEN)


def start_reply(base_url, directive):
    """Starts a reply in a new conversation; returns (reply id, PID of the web process that stored it)."""
    return ask_served_by(api(base_url), f"go {directive}")


def thread_count(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.mark.parametrize("command", WORKER_COMMANDS)
def test_the_worker_process_runs_replies_that_stream_through_thread_free_web_processes(web, command):
    with start_worker(web, command):
        reply_id, stored_by = start_reply(web, "[[sim tokens=40 rate=40]]")
        web_pids = {stored_by}
        text, answer, answers_with_text = poll_to_end_counting_answers(
            api(web), reply_id, 5, on_response=lambda response: web_pids.add(int(response.headers["X-Served-By"])))
    assert answer["status"] == "done"
    assert text == lorem(40)
    assert answers_with_text >= 3, f"the text came in {answers_with_text} answer(s), not streamed"
    for pid in web_pids:
        assert thread_count(pid) == 1, f"web process {pid} runs {thread_count(pid)} threads"


def test_a_reply_stays_pending_without_a_worker_and_runs_when_one_starts(web):
    reply_id, _ = start_reply(web, "[[sim tokens=5]]")
    time.sleep(0.5)
    assert get_message(api(web), reply_id)["status"] == "pending"
    with start_worker(web):
        text, answer = poll_to_end(api(web), reply_id, deadline_seconds=15)
    assert answer["status"] == "done"
    assert text == lorem(5)


def test_a_waiting_poll_wakes_within_the_recheck_interval(web, worker):
    delays = []
    for _ in range(3):
        reply_id, _ = start_reply(web, "[[sim content=timestamps tokens=2 rate=5 latency=1]]")
        response = api(web).get(f"/api/messages/{reply_id}/poll", params={"cursor": "0", "timeout": 10})
        received = time.time()
        assert response.status_code == 200, body_of(response)
        text = body_of(response)["text"]
        assert text, "the poll ran out its timeout instead of waking"
        delays.append(received - int(text.split()[0]) / 1e6)
    # Each wake costs at most one recheck interval plus the worker's write; the rest is a loaded machine.
    assert max(delays) < RECHECK_SECONDS + 0.9, delays


def test_a_stop_in_a_web_process_closes_the_upstream_of_the_worker(web, sim, worker):
    for _ in range(2):
        reply_id, _ = start_reply(web, "[[sim tokens=400 rate=20]]")
        seen, _ = poll_until_text(api(web), reply_id, min_chars=10)
        disconnects = sim.stats()["disconnects"]
        response = api(web).post(f"/api/messages/{reply_id}/stop")
        assert response.status_code == 200, body_of(response)
        stopped = body_of(response)
        assert stopped["status"] == "stopped"
        assert stopped["content"].startswith(seen)
        assert int(response.headers["X-Served-By"]) != worker.pid
        assert wait_until(lambda: sim.stats()["disconnects"] > disconnects, 2), "the worker kept its upstream open"
        time.sleep(0.3)
        text, answer = poll_to_end(api(web), reply_id)
        assert answer["status"] == "stopped"
        assert text == stopped["content"]


def test_killing_the_worker_mid_reply_fails_the_reply_as_worker_lost_within_the_bound(web, sim):
    with start_worker(web) as process:
        reply_id, _ = start_reply(web, "[[sim tokens=400 rate=20]]")
        seen, answer = poll_until_text(api(web), reply_id, min_chars=20)
        assert answer["status"] == "streaming"
        os.kill(process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        rest, answer = poll_to_end(api(web), reply_id, cursor=answer["cursor"], deadline_seconds=WORKER_LOST_BOUND + 5,
                                   poll_timeout=POLL_TIMEOUT)
        took = time.monotonic() - killed_at
    assert answer["status"] == "failed"
    assert answer["error"]["code"] == "worker_lost"
    assert took < WORKER_LOST_BOUND, f"worker_lost after {took:.1f} s"
    message = get_message(api(web), reply_id)
    assert message["content"] == seen + rest
    assert message["error"]["code"] == "worker_lost"


def test_replies_queued_beyond_the_workers_concurrency_wait_for_it_instead_of_failing(web):
    with start_worker(web, extra_args=("--concurrency", "1")) as process:
        first, _ = start_reply(web, f"[[sim tokens={LEASE_SECONDS * 30} rate=20]]")
        second, _ = start_reply(web, "[[sim tokens=5 rate=20]]")
        _, first_answer = poll_to_end(api(web), first, deadline_seconds=20)
        text, second_answer = poll_to_end(api(web), second, deadline_seconds=20)
        log = log_of(process)[-3000:]
    assert first_answer["status"] == "done", (first_answer, log)
    assert second_answer["status"] == "done", (second_answer, log)
    assert text == lorem(5)


def test_stopping_the_worker_lets_short_replies_finish_and_fails_the_rest_at_once(web):
    drain = 4
    # A long lease shows that the failure comes from the drain, not from the lease running out.
    with start_worker(web, REPLY_DRAIN_SECONDS=drain, LEASE_SECONDS=60) as process:
        long_id, _ = start_reply(web, "[[sim tokens=400 rate=20]]")
        short_id, _ = start_reply(web, "[[sim tokens=40 rate=20]]")
        poll_until_text(api(web), long_id, min_chars=5)
        poll_until_text(api(web), short_id, min_chars=5)
        process.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        short_text, short_answer = poll_to_end(api(web), short_id, deadline_seconds=drain + 5)
        long_text, long_answer = poll_to_end(api(web), long_id, deadline_seconds=drain + 5)
        took = time.monotonic() - stopped_at
        assert process.wait(5) == 0, log_of(process)[-3000:]
    assert short_answer["status"] == "done"
    assert short_text == lorem(40)
    assert long_answer["status"] == "failed"
    assert long_answer["error"]["code"] == "worker_lost"
    assert long_text == get_message(api(web), long_id)["content"]
    assert took < drain + 3, f"the long reply ended {took:.1f} s after SIGTERM"
