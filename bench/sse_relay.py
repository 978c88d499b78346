"""A minimal direct SSE relay of the upstream: each text piece goes out at once as one event (the floor).

POST /stream with {"content": "..."} answers text/event-stream: `data: <JSON string>` per piece,
then `data: [DONE]` (or `event: error`), and closes the connection.

    python bench/sse_relay.py --port 8101 --upstream http://127.0.0.1:8100/v1
"""
import argparse
import json

from tinyhttp import Handler, serve, stream_reply
from upstream import UpstreamError


class RelayHandler(Handler):
    """Relays one upstream chat stream per request."""

    def do_POST(self):
        if self.path != "/stream":
            return self.send_json(404, {"error": "not found"})
        content = self.read_json().get("content", "hello")
        try:
            stream = stream_reply(self.server.upstream, content)
        except UpstreamError as error:
            return self.send_json(502, {"error": error.code})
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for piece in stream.iter_text():
                self.wfile.write(b"data: " + json.dumps(piece).encode("utf-8") + b"\n\n")
            self.wfile.write(b"data: [DONE]\n\n")
        except UpstreamError as error:
            self.wfile.write(b"event: error\ndata: " + json.dumps(error.code).encode("utf-8") + b"\n\n")
        except OSError:
            stream.abort()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="Base URL of the OpenAI-compatible upstream (…/v1).")
    args = parser.parse_args()
    serve(RelayHandler, args.port, args.upstream)


if __name__ == "__main__":
    main()
