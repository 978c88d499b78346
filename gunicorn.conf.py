"""gunicorn settings for `gunicorn -c gunicorn.conf.py asgi:app`.

gunicorn's asgi worker (front.Worker) runs front.py: polls wait on the event loop, and the
Flask app answers every other request on GUNICORN_THREADS threads per worker.
"""
import os

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
worker_class = "front.Worker"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Held polls return within the poll timeout (25 s by default); leave headroom.
timeout = 90
graceful_timeout = 30
keepalive = 75
control_socket_disable = True
accesslog = os.environ.get("GUNICORN_ACCESS_LOG") or None
# A stopping worker (reload, max_requests, shutdown) lets its running replies finish for up to
# this long, then marks the rest failed (worker_lost) at once instead of leaving them to their lease.
reply_drain_seconds = float(os.environ.get("REPLY_DRAIN_SECONDS", "20"))


def worker_int(worker):
    """Marks a worker told to quit at once (SIGINT, SIGQUIT): its replies get no drain time."""
    worker.relay_quick_exit = True


def worker_abort(worker):
    """Marks a worker aborted by the master (timeout): its replies get no drain time."""
    worker.relay_quick_exit = True


def worker_exit(server, worker):
    """Finishes or fails this worker's running replies before the process ends."""
    app = getattr(getattr(worker, "asgi", None), "flask_app", None)
    if os.getpid() != worker.pid or app is None:
        return  # the master calls this hook too, for workers that are already gone
    from generation import drain_on_exit
    drain_on_exit(app, 0.0 if getattr(worker, "relay_quick_exit", False) else reply_drain_seconds)
