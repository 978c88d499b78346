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


def hold_queued_replies(runtime):
    """Renews the lease of pending replies no process has claimed yet, so a busy live worker's queue does not fail.

    Without this, a reply waiting longer than LEASE_SECONDS for a free slot would be failed as
    worker_lost by the very worker that is about to run it. Once no worker renews them, queued
    replies expire and fail as before.
    """
    from sqlalchemy import update

    from models import Message, now
    messages = Message.__table__
    lease = runtime.config["LEASE_SECONDS"]
    with runtime.engine.begin() as conn:
        conn.execute(update(messages)
                     .where(messages.c.status == "pending", messages.c.worker_id.is_(None),
                            messages.c.lease_expires_at < now() + lease / 2)
                     .values(lease_expires_at=now() + lease))
