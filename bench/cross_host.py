"""Cross-host wake delay: how long after host A's poll wakes does a poll held on host B wake?

Two gunicorn servers (one worker each, like two hosts) share a fresh PostgreSQL database.
For each sample, a reply starts on A with a pause before its first token; one poll held on
A and one held on B both wait at cursor 0. A's poll wakes in-process when A commits the
first text; B's poll can only learn of it through the database (LISTEN/NOTIFY, with a 1 s
periodic re-check as fallback). The delay is B's wake time minus A's.

    python bench/cross_host.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres

The URL names a server (its database only serves to create and drop a throwaway one);
TEST_DATABASE_URL is used when --database-url is not given. Prints a JSON summary.
"""
import argparse
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import requests
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dialect import normalize_url  # noqa: E402
from simulator import Simulator  # noqa: E402
from tests.servers import free_port, stop_process_group  # noqa: E402


def start_host(database_url, upstream_url, workdir, name):
    """Starts one gunicorn server (one worker) as a host; returns (process, base URL)."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("OPENAI_", "DATABASE_URL"))}
    env.update({"DATABASE_URL": database_url, "OPENAI_BASE_URL": upstream_url, "OPENAI_API_KEY": "sk-bench",
                "CHAT_MODEL": "sim-chat", "SECRET_KEY": "one-secret-for-every-host", "PORT": str(port),
                "WEB_CONCURRENCY": "1", "GUNICORN_THREADS": "16", "INSTANCE_PATH": os.path.join(workdir, name),
                "MESSAGES_PER_MINUTE": "100000", "PYTHONUNBUFFERED": "1"})
    log = open(os.path.join(workdir, f"{name}.log"), "ab")
    process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "asgi:app"], cwd=ROOT,
                               env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"host {name} exited; see {log.name}")
        try:
            if requests.get(base_url + "/healthz", timeout=1).status_code == 200:
                return process, base_url
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise SystemExit(f"host {name} did not start")


def measure(host_a, host_b, samples):
    """Returns the B-minus-A wake delays in seconds, one per sample."""
    on_a, on_b = requests.Session(), requests.Session()
    on_b.cookies = on_a.cookies
    conversation = on_a.post(host_a + "/api/conversations", json={}, timeout=10).json()["id"]
    delays = []
    for _ in range(samples):
        # A random pause spreads the writes over the phase of B's periodic re-check.
        latency = round(random.uniform(0.3, 0.8), 3)
        reply = on_a.post(f"{host_a}/api/conversations/{conversation}/messages", timeout=10,
                          json={"content": f"hi [[sim tokens=2 rate=100 latency={latency}]]"}).json()["reply"]
        woke = {}

        def hold(name, session, base_url, reply_id=reply["id"]):
            answer = session.get(f"{base_url}/api/messages/{reply_id}/poll?cursor=0&timeout=10", timeout=20).json()
            woke[name] = (time.monotonic(), answer["text"])

        threads = [threading.Thread(target=hold, args=("a", on_a, host_a)),
                   threading.Thread(target=hold, args=("b", on_b, host_b))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        if woke["a"][1] and woke["b"][1]:
            delays.append(woke["b"][0] - woke["a"][0])
        cursor = "0"
        while True:
            answer = on_a.get(f"{host_a}/api/messages/{reply['id']}/poll?cursor={cursor}&timeout=5", timeout=10).json()
            cursor = answer["cursor"]
            if answer["done"]:
                break
    return delays


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("TEST_DATABASE_URL", ""))
    parser.add_argument("--samples", type=int, default=40)
    args = parser.parse_args()
    if not args.database_url:
        raise SystemExit("give --database-url (or set TEST_DATABASE_URL) naming a PostgreSQL server")
    server_url = normalize_url(args.database_url)
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    name = f"relay_bench_{secrets.token_hex(4)}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    database_url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    hosts = []
    try:
        with Simulator(rate=100, content="lorem") as simulator, tempfile.TemporaryDirectory() as workdir:
            hosts.append(start_host(database_url, simulator.url, workdir, "host-a"))
            hosts.append(start_host(database_url, simulator.url, workdir, "host-b"))
            (_, host_a), (_, host_b) = hosts
            measure(host_a, host_b, 3)  # warm-up
            delays = sorted(measure(host_a, host_b, args.samples))
            for process, _ in hosts:
                stop_process_group(process)
    finally:
        for process, _ in hosts:
            stop_process_group(process)
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    def ms(value):
        return round(value * 1000, 1)

    print(json.dumps({
        "samples": len(delays),
        "median_ms": ms(statistics.median(delays)),
        "p90_ms": ms(delays[int(0.9 * (len(delays) - 1))]),
        "max_ms": ms(delays[-1]),
        "min_ms": ms(delays[0]),
        "method": "B's poll wake time minus A's, both held at cursor 0 when A commits the first text",
    }, indent=2))


if __name__ == "__main__":
    main()
