"""The small threaded HTTP server and upstream access that the benchmark's baseline relays share."""
import http.server
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from upstream import Upstream  # noqa: E402

MODEL = "sim-chat"


class Server(http.server.ThreadingHTTPServer):
    """A thread-per-connection HTTP/1.1 server."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


class Handler(http.server.BaseHTTPRequestHandler):
    """A keep-alive request handler without Nagle delays or access logs."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format, *args):
        pass

    def read_json(self):
        """Returns the request's JSON body (an empty dict when it has none)."""
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else {}

    def send_json(self, status, payload):
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def open_upstream(base_url):
    """Returns the project's upstream client for base_url, so every relay reads the upstream the same way."""
    return Upstream(base_url, os.environ.get("OPENAI_API_KEY", ""))


def stream_reply(upstream, content):
    """Starts a streaming chat completion of one user message and returns its ChatStream."""
    return upstream.stream_chat(MODEL, [{"role": "user", "content": content}])


def serve(handler_class, port, upstream_url, setup=None):
    """Serves handler_class on 127.0.0.1:port until interrupted; setup(server) runs first."""
    server = Server(("127.0.0.1", port), handler_class)
    server.upstream = open_upstream(upstream_url)
    if setup is not None:
        setup(server)
    print(f"serving on http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
