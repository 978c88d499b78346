"""Starts real servers for tests: gunicorn running the app, on a free port, cleaned up afterwards."""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import requests

from tests import pg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    """Returns a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(base_url, process=None, timeout=30.0):
    """Waits until base_url/healthz answers 200; raises if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        try:
            if requests.get(base_url + "/healthz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{base_url} did not become healthy in {timeout} s")


def stop_process_group(process, timeout=10.0):
    """Stops a process started with start_new_session=True, and everything it started."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(5)


def app_environment(env, workdir):
    """Returns the environment a test server runs with: isolated instance folder and database."""
    merged = {key: value for key, value in os.environ.items()
              if not key.startswith(("OPENAI_", "ACCESS_TOKENS", "DATABASE_URL", "CHAT_MODEL", "IMAGE_MODEL"))}
    merged.update({
        "INSTANCE_PATH": os.path.join(workdir, "instance"),
        "DATABASE_URL": "sqlite:///" + os.path.join(workdir, "app.db"),
        "PYTHONUNBUFFERED": "1",
        # A test server stopped mid-reply need not wait long for its replies to finish.
        "REPLY_DRAIN_SECONDS": "2",
    })
    merged.update({key: str(value) for key, value in (env or {}).items()})
    return merged


@contextmanager
def gunicorn_server(env=None, workers=2, threads=64, extra_args=(), log_path=None):
    """Runs the app under gunicorn on a free port and yields its base URL.

    The server gets a fresh database: a SQLite file, or a new PostgreSQL database when
    TEST_DATABASE_URL is set; a DATABASE_URL in env (a shared one) is used as it is.
    """
    own_database = None
    if pg.enabled() and "DATABASE_URL" not in (env or {}):
        own_database = pg.create_database()
        env = {**(env or {}), "DATABASE_URL": own_database}
    with tempfile.TemporaryDirectory(prefix="relay-test-") as workdir:
        port = free_port()
        environment = app_environment(env, workdir)
        environment.update({"PORT": str(port), "WEB_CONCURRENCY": str(workers), "GUNICORN_THREADS": str(threads)})
        log_path = log_path or os.path.join(workdir, "server.log")
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *extra_args, "asgi:app"],
                cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        base_url = f"http://127.0.0.1:{port}"
        server = RunningServer(base_url, process, log_path, workdir)
        server.database_url = environment["DATABASE_URL"]
        try:
            wait_until_healthy(base_url, process)
            yield server
        finally:
            stop_process_group(process)
            if own_database is not None:
                pg.drop_database(own_database)


class RunningServer(str):
    """A server's base URL that also knows its process, log file and working folder."""

    def __new__(cls, base_url, process, log_path, workdir):
        value = super().__new__(cls, base_url)
        value.process = process
        value.log_path = log_path
        value.workdir = workdir
        return value

    def log_text(self):
        with open(self.log_path, errors="replace") as handle:
            return handle.read()

    def worker_pids(self):
        """Returns the PIDs of gunicorn's worker processes."""
        out = subprocess.run(["ps", "-o", "pid=,stat=", "--ppid", str(self.process.pid)],
                             capture_output=True, text=True).stdout
        return [int(line.split()[0]) for line in out.splitlines() if "Z" not in line.split()[1]]
