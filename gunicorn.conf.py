"""gunicorn settings: threaded workers, because every held poll occupies one thread."""
import os

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "64"))
# Held polls return within the poll timeout (25 s by default); leave headroom.
timeout = 90
graceful_timeout = 30
keepalive = 75
control_socket_disable = True
accesslog = os.environ.get("GUNICORN_ACCESS_LOG") or None
