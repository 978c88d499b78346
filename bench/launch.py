"""Starts and stops the benchmark's servers: the simulator, the baseline relays and the product under gunicorn."""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


def free_port():
    """Returns a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server process in its own session, with its URL and log; stop() ends its whole group."""

    def __init__(self, name, command, url, ready_path, env=None, cwd=ROOT, log_dir=None):
        self.name = name
        self.url = url
        self.workdir = tempfile.mkdtemp(prefix=f"bench-{name}-")
        self.log_path = os.path.join(log_dir or self.workdir, f"{name}.log")
        environment = dict(os.environ, PYTHONUNBUFFERED="1")
        environment.update({key: str(value) for key, value in (env or {}).items()})
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=cwd, env=environment, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.process.pid
        self._wait_ready(ready_path)

    def _wait_ready(self, path, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}")
            try:
                response = requests.request("GET" if path else "HEAD", self.url + (path or "/"), timeout=1)
                if not path or response.status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready in {timeout:g} s; see {self.log_path}")

    def stop(self, timeout=10.0):
        """Ends the server and every process it started, by process group id."""
        if self.process.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
                self.process.wait(timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.process.wait(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()


def simulator(rate, tokens, log_dir=None):
    """Runs the project's simulator standalone, emitting timestamp tokens."""
    port = free_port()
    command = [sys.executable, os.path.join(os.path.dirname(BENCH), "simulator.py"), "--port", str(port), "--content", "timestamps",
               "--rate", f"{rate:g}", "--tokens", str(tokens)]
    return Server("simulator", command, f"http://127.0.0.1:{port}", "/v1/models", log_dir=log_dir)


def sse_relay(upstream_url, log_dir=None):
    port = free_port()
    command = [sys.executable, os.path.join(BENCH, "sse_relay.py"), "--port", str(port), "--upstream", upstream_url]
    return Server("sse-relay", command, f"http://127.0.0.1:{port}", None, log_dir=log_dir)


def memory_longpoll(upstream_url, server="gunicorn", threads=128, log_dir=None):
    port = free_port()
    command = [sys.executable, os.path.join(BENCH, "memory_longpoll.py"), "--port", str(port),
               "--upstream", upstream_url, "--server", server, "--threads", str(threads)]
    return Server(f"memory-longpoll-{server}", command, f"http://127.0.0.1:{port}", None, log_dir=log_dir)


def product(upstream_url, workers, threads, extra_env=None, log_dir=None, root=ROOT):
    """Runs the app (from root, this checkout by default) under gunicorn (gunicorn.conf.py) with a fresh SQLite database."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="bench-product-")
    env = {
        "PORT": port, "WEB_CONCURRENCY": workers, "GUNICORN_THREADS": threads,
        "OPENAI_BASE_URL": upstream_url, "OPENAI_API_KEY": "sk-bench", "CHAT_MODEL": "sim-chat",
        "IMAGE_MODEL": "sim-image", "ACCESS_TOKENS": "",
        "INSTANCE_PATH": os.path.join(workdir, "instance"),
        "DATABASE_URL": "sqlite:///" + os.path.join(workdir, "app.db"),
    }
    env.update(extra_env or {})
    command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "asgi:app"]
    return Server(f"product-{workers}w", command, f"http://127.0.0.1:{port}", "/healthz", env=env,
                  cwd=root, log_dir=log_dir)
