"""The relay under each WSGI server that deploy/ ships a config for: replies stream, polls wake, stop works from any process.

Every server runs from its file in deploy/: gunicorn (gthread, 2 workers) and waitress
from their systemd units' ExecStart, uWSGI (threads, 2 processes) from uwsgi.ini, and
Apache with mod_wsgi in daemon mode (2 processes) from apache-relay.conf.
"""
import concurrent.futures
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests import deployed
from tests.helpers import (ask_served_by, bearer_session, body_of, get_message, lorem, poll_to_end,
                           poll_to_end_counting_answers, poll_until_text, simulator_env, simulator_fixture, wait_until)

TOKEN = "wsgi-suite-token"
SERVERS = {
    "gunicorn": (lambda env: deployed.unit_server("relay-web.service", env), 2),
    "uwsgi": (lambda env: deployed.uwsgi_server("uwsgi.ini", env), 2),
    "waitress": (lambda env: deployed.unit_server("relay-web-waitress.service", env), 1),
    "apache-mod_wsgi": (lambda env: deployed.apache_server(env), 2),
}
REPLIES_PER_ROUND = 2  # started at once, then stopped one by one on new connections
ROUNDS = 5
WAKE_LIMIT_SECONDS = 1.0  # generous for a loaded 2-core machine; idle it is a few tens of milliseconds


sim = simulator_fixture()


@pytest.fixture(scope="module", params=list(SERVERS))
def server(request, sim):
    """The app under one WSGI server, with .name and .processes (how many it runs)."""
    if request.param == "apache-mod_wsgi":
        assert deployed.apache_available(), (
            "Apache with mod_wsgi is needed: apt-get install -y apache2 libapache2-mod-wsgi-py3 python3-venv")
    start, processes = SERVERS[request.param]
    env = simulator_env(sim, ACCESS_TOKENS=TOKEN, EXPOSE_WORKER_ID=1, POLL_TIMEOUT=5, LEASE_SECONDS=5,
                        MAX_RUNNING_PER_OWNER=50, MESSAGES_PER_MINUTE=1000)
    with start(env) as base_url:
        base_url.name = request.param
        base_url.processes = processes
        yield base_url


def api(base_url):
    """A session of the suite's owner that opens a new connection for every request, as many clients do."""
    session = bearer_session(base_url, TOKEN)
    session.headers["Connection"] = "close"
    return session


def start_reply(base_url, directive):
    """Starts a reply in a new conversation; returns (reply id, PID of the process that runs it)."""
    return ask_served_by(api(base_url), f"go {directive}")


def test_a_reply_streams_through_several_poll_answers(server):
    reply_id, _ = start_reply(server, "[[sim tokens=40 rate=40]]")
    session = api(server)
    text, answer, answers_with_text = poll_to_end_counting_answers(session, reply_id, 5.0)
    assert answer["status"] == "done"
    assert text == lorem(40)
    assert answers_with_text >= 3, f"{server.name}: the text came in {answers_with_text} answer(s), not streamed"
    assert get_message(session, reply_id)["content"] == text


def held_poll(base_url, reply_id):
    """Polls from cursor 0 and returns (seconds from the first token's emission to the answer, serving PID)."""
    session = api(base_url)
    response = session.get(f"/api/messages/{reply_id}/poll", params={"cursor": "0", "timeout": 10})
    received = time.time()
    assert response.status_code == 200, body_of(response)
    text = body_of(response)["text"]
    assert text, f"the poll answered without text after {received} (timeout?)"
    emitted = int(text.split()[0]) / 1e6
    return received - emitted, int(response.headers["X-Served-By"])


def served_by(base_url):
    """Sends one cheap request on a new connection and returns the PID that answered it."""
    response = api(base_url).get("/api/config")
    assert response.status_code == 200, body_of(response)
    return int(response.headers["X-Served-By"])


def aim_at_another_process(base_url, pid, attempt, tries=300):
    """Sends cheap requests so that the next request most likely reaches a process other than pid.

    Servers hand new connections to their processes either in long runs (uWSGI's threads
    take turns by process) or strictly by turns (mod_wsgi's daemons pass the accept lock
    on). After a request answered by another process, the next one goes there too in the
    first case and back to pid in the second; odd attempts send one more request, so
    successive attempts cover both.
    """
    if not any(served_by(base_url) != pid for _ in range(tries)):
        return
    if attempt % 2:
        served_by(base_url)


def test_waiting_polls_wake_as_soon_as_text_arrives_in_every_process(server):
    woken = []  # (delay, poll PID, generating PID)
    for attempt in range(ROUNDS):
        reply_id, generating = start_reply(server, "[[sim content=timestamps tokens=3 rate=5 latency=1.5]]")
        if server.processes > 1:
            aim_at_another_process(server, generating, attempt)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: held_poll(server, reply_id), range(4)))
        woken += [(delay, pid, generating) for delay, pid in results]
        if server.processes == 1 or any(pid != generating for _, pid, generating in woken):
            break
    slow = [item for item in woken if item[0] > WAKE_LIMIT_SECONDS]
    assert not slow, f"{server.name}: polls woke late (delay s, poll PID, generating PID): {slow}"
    if server.processes > 1:
        assert any(pid != generating for _, pid, generating in woken), (
            f"{server.name}: no poll was answered by a process other than the generating one: {woken}")


def stop_and_check(base_url, reply_id, seen):
    """Stops a running reply on a new connection, checks the stop, and returns the PID that served it."""
    session = api(base_url)
    response = session.post(f"/api/messages/{reply_id}/stop")
    assert response.status_code == 200, body_of(response)
    stopped = body_of(response)
    assert stopped["status"] == "stopped"
    assert stopped["content"].startswith(seen)
    return int(response.headers["X-Served-By"]), stopped["content"]


def test_stop_works_from_any_process_and_closes_the_upstream(server, sim):
    pairs = []  # (generating PID, stopping PID)
    for _ in range(ROUNDS):
        with concurrent.futures.ThreadPoolExecutor(REPLIES_PER_ROUND) as pool:
            replies = list(pool.map(lambda _: start_reply(server, "[[sim tokens=400 rate=20]]"),
                                    range(REPLIES_PER_ROUND)))
        seen = {reply_id: poll_until_text(api(server), reply_id, min_chars=5)[0] for reply_id, _ in replies}
        disconnects = sim.stats()["disconnects"]
        frozen = {}
        for reply_id, generating in replies:
            if server.processes > 1:
                aim_at_another_process(server, generating, len(pairs))
            stopper, frozen[reply_id] = stop_and_check(server, reply_id, seen[reply_id])
            pairs.append((generating, stopper))
        assert wait_until(lambda: sim.stats()["disconnects"] >= disconnects + len(replies), 3), (
            f"{server.name}: not every stopped reply closed its upstream connection")
        time.sleep(0.3)
        for reply_id, content in frozen.items():
            text, answer = poll_to_end(api(server), reply_id)
            assert answer["status"] == "stopped"
            assert text == content, f"{server.name}: the text of a stopped reply changed"
        if server.processes == 1 or any(generating != stopper for generating, stopper in pairs):
            break
    if server.processes > 1:
        assert any(generating != stopper for generating, stopper in pairs), (
            f"{server.name}: every stop was served by the generating process: {pairs}")
        assert len({pid for pair in pairs for pid in pair}) >= 2


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_shipped_systemd_units_parse_cleanly(tmp_path):
    names = [name for name in os.listdir(deployed.DEPLOY) if name.endswith(".service")]
    assert {"relay-web.service", "relay-worker.service", "relay-web-waitress.service"} <= set(names)
    for name in names:
        text = deployed.render(deployed.read_deploy_file(name), [(deployed.EXAMPLE_VENV, sys.prefix)])
        (tmp_path / name).write_text(text.replace(deployed.EXAMPLE_ROOT, deployed.ROOT))
    checked = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / name) for name in names)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and not checked.stderr.strip(), checked.stderr
