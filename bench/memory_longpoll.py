"""A minimal in-memory long-poll relay: one process, a threading.Condition per reply, no database.

It keeps the product's cursor semantics (a character offset sent back as a string):

    POST /replies {"content": "..."}                 -> 201 {"id"}
    GET  /replies/<id>/poll?cursor=C&timeout=T       -> 200 {"cursor", "text", "done", "error"}

An answer goes out as soon as there is text after C; there is no gathering hold. It runs on
the product's web stack (Flask under gunicorn gthread, one worker), or with `--server stdlib`
on Python's own threaded HTTP server:

    python bench/memory_longpoll.py --port 8102 --upstream http://127.0.0.1:8100/v1 [--server stdlib]
"""
import argparse
import itertools
import os
import subprocess
import sys
import threading
import time
from urllib.parse import parse_qs, urlsplit

from flask import Flask, jsonify, request

from tinyhttp import Handler, open_upstream, serve, stream_reply
from upstream import UpstreamError

TIMEOUT_MAX = 60.0
HERE = os.path.dirname(os.path.abspath(__file__))


class Reply:
    """The text of one reply so far, and a condition that is notified whenever it grows or ends."""

    def __init__(self):
        self.condition = threading.Condition()
        self.text = ""
        self.done = False
        self.error = None

    def generate(self, upstream, content):
        """Appends the upstream's text as it arrives; marks the reply done (or failed) at the end."""
        error = None
        try:
            for piece in stream_reply(upstream, content).iter_text():
                with self.condition:
                    self.text += piece
                    self.condition.notify_all()
        except UpstreamError as failure:
            error = failure.code
        with self.condition:
            self.done = True
            self.error = error
            self.condition.notify_all()

    def after(self, cursor, timeout):
        """Waits up to timeout for text after cursor; returns (text, done, error)."""
        deadline = time.monotonic() + timeout
        with self.condition:
            while len(self.text) == cursor and not self.done:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.condition.wait(left)
            return self.text[cursor:], self.done, self.error


class Replies:
    """Every reply of this process, by id."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.by_id = {}
        self.ids = itertools.count(1)

    def start(self, content):
        reply_id = str(next(self.ids))
        reply = self.by_id[reply_id] = Reply()
        threading.Thread(target=reply.generate, args=(self.upstream, content), daemon=True).start()
        return reply_id

    def poll(self, reply_id, raw_cursor, raw_timeout):
        """Returns (status, answer) for a poll."""
        reply = self.by_id.get(reply_id)
        if reply is None:
            return 404, {"error": "not_found"}
        try:
            timeout = min(max(float(raw_timeout), 0.0), TIMEOUT_MAX)
        except ValueError:
            return 400, {"error": "bad_request"}
        if not raw_cursor.isdigit() or int(raw_cursor) > len(reply.text):
            return 400, {"error": "bad_cursor"}
        cursor = int(raw_cursor)
        text, done, error = reply.after(cursor, timeout)
        return 200, {"cursor": str(cursor + len(text)), "text": text, "done": done, "error": error}


# The product's web stack -------------------------------------------------------

app = Flask(__name__)
replies = Replies(open_upstream(os.environ.get("UPSTREAM_URL", "http://127.0.0.1:9/v1")))


@app.post("/replies")
def start_reply():
    return jsonify({"id": replies.start((request.get_json(silent=True) or {}).get("content", "hello"))}), 201


@app.get("/replies/<reply_id>/poll")
def poll_reply(reply_id):
    status, answer = replies.poll(reply_id, request.args.get("cursor", "0"), request.args.get("timeout", "25"))
    return jsonify(answer), status


# Python's threaded HTTP server ---------------------------------------------------

class LongPollHandler(Handler):
    """Starts replies and answers polls from memory."""

    def do_POST(self):
        if self.path != "/replies":
            return self.send_json(404, {"error": "not found"})
        self.send_json(201, {"id": self.server.replies.start(self.read_json().get("content", "hello"))})

    def do_GET(self):
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        if len(parts) != 3 or parts[0] != "replies" or parts[2] != "poll":
            return self.send_json(404, {"error": "not found"})
        query = parse_qs(url.query)
        self.send_json(*self.server.replies.poll(parts[1], query.get("cursor", ["0"])[0],
                                                 query.get("timeout", ["25"])[0]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="Base URL of the OpenAI-compatible upstream (…/v1).")
    parser.add_argument("--server", choices=("gunicorn", "stdlib"), default="gunicorn")
    parser.add_argument("--threads", type=int, default=128, help="gunicorn threads (held polls each take one).")
    args = parser.parse_args()
    if args.server == "stdlib":
        return serve(LongPollHandler, args.port, args.upstream,
                     setup=lambda server: setattr(server, "replies", Replies(server.upstream)))
    command = [sys.executable, "-m", "gunicorn", "--no-control-socket", "--worker-class", "gthread", "--workers", "1",
               "--threads", str(args.threads), "--keep-alive", "75", "--bind", f"127.0.0.1:{args.port}",
               "--chdir", HERE, "memory_longpoll:app"]
    # exec keeps one process tree: this process becomes the gunicorn master.
    os.environ["UPSTREAM_URL"] = args.upstream
    os.execv(sys.executable, command)


if __name__ == "__main__":
    main()
