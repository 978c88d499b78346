"""Finds (or lazily starts) this process's generation runtime."""
import os
import threading

from flask import current_app

_lock = threading.Lock()


def get_runtime(app=None, generates=None):
    """Returns the Runtime of this process, starting it on first use after any fork.

    A process generates replies (and runs background threads) unless GENERATION_MODE is
    "worker", where only the `flask worker` process does.
    """
    app = app or current_app._get_current_object()
    state = app.extensions.get("relay_runtime")
    if state is not None and state[0] == os.getpid():
        return state[1]
    with _lock:
        state = app.extensions.get("relay_runtime")
        if state is not None and state[0] == os.getpid():
            return state[1]
        # Threads do not survive a fork, so each worker process builds its own.
        from generation import Runtime
        if generates is None:
            generates = app.config["GENERATION_MODE"] == "thread"
        with app.app_context():
            if generates:
                start_demo_upstream(app)
            runtime = Runtime(app, background=generates)
        app.extensions["relay_runtime"] = (os.getpid(), runtime)
        return runtime


def start_demo_upstream(app):
    """In demo mode, serves the simulator inside this process and points the upstream at it."""
    if app.config["UPSTREAM_KIND"] != "demo":
        return
    from simulator import Simulator
    simulator = Simulator(rate=app.config["DEMO_RATE"]).start()
    app.extensions["demo_simulator"] = simulator
    app.config["UPSTREAM_BASE_URL"] = simulator.url
